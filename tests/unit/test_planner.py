"""`dimoo train --plan/--sweep` and `dimoo plan sample` on the shipped 8B config without any checkpoint folder;
the activation formula against what a tiny model really keeps (tp 1, and tp 2 with sequence parallel on a fake
process group)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor.parallel import loss_parallel
from torch.testing._internal.distributed.fake_pg import FakeStore

from dimoo_npu.cli import main
from dimoo_npu.model import DiMOOModel
from dimoo_npu.modeling.config import DiMOOConfig
from dimoo_npu.ops import resolve_ops
from dimoo_npu.parallel import ParallelDims, build_mesh
from dimoo_npu.parallel.recompute import RECOMPUTE_MODES, apply_recompute
from dimoo_npu.parallel.tensor_parallel import apply_tp
from dimoo_npu.planner.activations import stage_activation_terms
from dimoo_npu.planner.measure import measure_kept_bytes, measure_peak_bytes, summed_loss
from dimoo_npu.planner.sample_plan import SampleSettings, per_row_terms
from dimoo_npu.planner.train_plan import chunk_sizes
from dimoo_npu.sampling.cache import MLCache
from dimoo_npu.train.config import load_config
from dimoo_npu.train.layout import model_config_of
from dimoo_npu.utils.errors import ConfigError

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "train" / "dimoo_8b_ascend.yaml")


@pytest.fixture
def plan_cli(monkeypatch, capsys, tmp_path):
    """Run ``dimoo`` for a world size; returns (exit code, stdout)."""
    monkeypatch.chdir(tmp_path)

    def run(world: int, *argv: str) -> tuple[int, str]:
        monkeypatch.setenv("WORLD_SIZE", str(world))
        code = main(list(argv))
        return code, capsys.readouterr().out

    return run


def test_chunk_sizes_are_torch_chunk_with_empty_ranks():
    for length, parts in [(134548, 8), (16819, 4), (10, 4), (3, 4), (0, 2), (4096, 2)]:
        real = [c.shape[0] for c in torch.empty(length).chunk(parts)] if length else []
        assert chunk_sizes(length, parts) == real + [0] * (parts - len(real))


def test_8b_config_plans_16_ranks_without_its_checkpoint(plan_cli, tmp_path):
    assert not Path("/data/models/Lumina-DiMOO").exists()  # the config's init_from: model.preset stands in
    code, out = plan_cli(16, "train", CONFIG, "--plan", "--json", "plan.json")
    assert code == 0, out
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert (plan["layout"]["tp"], plan["layout"]["pp"], plan["layout"]["dp"]) == (4, 2, 2)
    assert plan["fits"] and len(plan["ranks"]) == 16
    assert {r["rank"] for r in plan["ranks"]} == set(range(16))
    assert "assumptions:" in out and "HCCS" in out and "bubble 3.0%" in out
    code, out = plan_cli(16, "train", CONFIG, "--check")
    assert code == 0 and "pp 2 x dp 2 x tp 4" in out


def test_the_preset_stands_in_for_a_missing_checkpoint_only_when_planning():
    config = load_config(CONFIG)
    assert model_config_of(config, planning=True).d_model == 4096
    with pytest.raises(ConfigError, match="is not a folder"):
        model_config_of(config)  # a run still needs its weights: refused before any process group starts


def test_a_rank_that_does_not_fit_exits_1_naming_the_term_and_the_fix(plan_cli):
    one_device = ["tensor_model_parallel_size=1", "pipeline_model_parallel_size=1", "sequence_parallel=false"]
    code, out = plan_cli(1, "train", CONFIG, *one_device, "--plan")
    assert code == 1
    assert "does not fit: rank 0" in out and "the largest term is AdamW m, v fp32" in out
    code, out = plan_cli(8, "train", CONFIG, *one_device, "micro_batch_size=8", "recompute_granularity=none", "--plan")
    assert code == 1
    assert "the largest term is activations kept" in out and "recompute_granularity: full" in out


def test_sweep_lists_fitting_layouts_fastest_first(plan_cli, tmp_path):
    code, out = plan_cli(16, "train", CONFIG, "--sweep", "--json", "sweep.json")
    assert code == 0, out
    result = json.loads((tmp_path / "sweep.json").read_text())
    steps = [plan["step"]["step_s"] for plan in result["fits"]]
    assert steps == sorted(steps) and 0 < len(steps) <= result["valid"]
    assert all(plan["fits"] for plan in result["fits"])
    worlds = {p["layout"]["tp"] * p["layout"]["pp"] * p["layout"]["dp"] for p in result["fits"]}
    assert worlds == {16}


def test_sampling_plan_of_the_8b_at_1024(plan_cli, tmp_path):
    code, out = plan_cli(1, "plan", "sample", "--accelerator", "910b", "--use-cache", "--json", "s.json")
    assert code == 0, out
    plan = json.loads((tmp_path / "s.json").read_text())
    assert plan["sequence_length"] == 64 + 4 + 64 * 65
    assert plan["per_row"]["ML-Cache K/V"] == 2 * 32 * plan["sequence_length"] * 4096 * 2  # ~2.2 GB per row
    assert 2.1e9 < plan["per_row"]["ML-Cache K/V"] < 2.3e9
    fits_910b = plan["largest_batch"]
    code, _ = plan_cli(1, "plan", "sample", "--accelerator", "h200", "--use-cache", "--json", "h.json")
    assert json.loads((tmp_path / "h.json").read_text())["largest_batch"] > fits_910b >= 1
    code, out = plan_cli(1, "plan", "sample", "--accelerator", "910b", "--use-cache", "--batch", str(fits_910b + 1))
    assert code == 1 and "does not fit" in out


TINY = DiMOOConfig(
    d_model=64, n_layers=2, n_heads=4, mlp_hidden_size=176, embedding_size=320, special_tokens={"mask": 319}
)


def _measured_and_planned(mode: str, tp: int, sequence_parallel: bool) -> tuple[int, float]:
    torch.manual_seed(0)
    model = DiMOOModel(TINY, resolve_ops("cpu")).to(torch.bfloat16)
    if tp > 1:
        apply_tp(model, build_mesh(ParallelDims(1, 1, tp), "cpu")["tp"], sequence_parallel)
    apply_recompute(model, mode)
    batch, length = 2, 48
    ids = torch.randint(0, 300, (batch, length))
    positions = torch.arange(length).expand(batch, length)
    with loss_parallel() if tp > 1 else contextlib.nullcontext():
        measured, _ = measure_kept_bytes(model, lambda: summed_loss(model(ids, positions=positions), ids))
    planned = stage_activation_terms(TINY, batch * length, 2, tp, sequence_parallel, mode, "torch", last_stage=True)
    return measured, sum(planned.values())


@pytest.mark.parametrize("mode", RECOMPUTE_MODES)
def test_activation_formula_matches_what_one_micro_batch_keeps(mode):
    measured, planned = _measured_and_planned(mode, 1, False)
    assert abs(planned - measured) / measured < 0.01, (measured, planned)


@pytest.mark.parametrize("mode", RECOMPUTE_MODES)
def test_activation_formula_under_tensor_and_sequence_parallel(mode):
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process; the fake one needs a clean slate")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        measured, planned = _measured_and_planned(mode, 2, True)
    finally:
        dist.destroy_process_group()
    assert abs(planned - measured) / measured < 0.02, (measured, planned)


def test_ml_cache_terms_are_what_the_cache_holds_after_a_refresh(checkpoint_dir):
    config = DiMOOConfig.from_json(checkpoint_dir)
    settings = SampleSettings(width=64, height=32, cfg_scale=4.0, use_cache=True, prompt_tokens=10)
    model = DiMOOModel(config, resolve_ops("cpu")).to(torch.bfloat16)
    rows, length = settings.branches, settings.sequence_length
    offset, codes = config.special_tokens["image_offset"], config.special_tokens["codebook_size"]
    cache = MLCache()
    cache.begin_step(True)
    with torch.no_grad():
        ids = torch.randint(0, 1000, (rows, length))
        cache.store_logits(model(ids, cache=cache, vocab_range=(offset, offset + codes)))
    held = sum(t.nbytes for t in [*cache.keys.values(), *cache.values.values()])
    planned = per_row_terms(config, settings)
    assert held == rows * planned["ML-Cache K/V"]
    assert cache.logits.nbytes + cache.max_logit.nbytes == rows * planned["ML-Cache logits"]


@pytest.mark.parametrize("d_model, hidden", [(128, 352), (192, 704)])
def test_sampling_working_set_is_the_peak_of_a_no_grad_forward(d_model, hidden):
    codes = {"mask": 2999, "image_offset": 100, "codebook_size": 2048}
    config = DiMOOConfig(
        d_model=d_model, n_layers=2, n_heads=4, mlp_hidden_size=hidden, embedding_size=3000, special_tokens=codes
    )
    settings = SampleSettings(width=128, height=128, cfg_scale=0.0, use_cache=False, prompt_tokens=20)
    model = DiMOOModel(config, resolve_ops("cpu")).to(torch.bfloat16)
    ids = torch.randint(0, 2000, (1, settings.sequence_length))
    with torch.no_grad():
        peak = measure_peak_bytes(model, lambda: model(ids, vocab_range=(100, 101)))  # one logit: blocks dominate
    planned = per_row_terms(config, settings)["forward working set"]
    assert abs(planned - peak) / peak < 0.03, (peak, planned)
