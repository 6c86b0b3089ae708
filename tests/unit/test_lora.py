"""LoRA fine-tuning (peft): only adapters train on a frozen base, exact resume, peft's adapter format, merged export
equal to merging at load, and every bad input refused in one line before anything is written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dimoo_npu import load_model
from dimoo_npu.checkpoint import save_pretrained
from dimoo_npu.files.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from dimoo_npu.model import DiMOOModel
from dimoo_npu.modeling.config import DiMOOConfig
from dimoo_npu.numerics.compare import compare_layer
from dimoo_npu.numerics.tolerances import tolerance
from dimoo_npu.train.checkpoint import export_hf
from dimoo_npu.train.config import load_config
from dimoo_npu.train.layout import plan_layout
from dimoo_npu.train.trainer import Trainer, run_training
from dimoo_npu.utils.errors import CheckpointError, ConfigError, InputError
from tests.unit.train_support import KILL_AT_STEP_4, TINY_CONFIG, tiny_run_config

pytest.importorskip("peft")

REPO = Path(__file__).resolve().parents[2]
STEPS = 4
LORA = ("lora.rank=4", "lora.alpha=8", "lora.dropout=0.1", f"lr_decay_iters={STEPS}")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A random tiny model as a Hugging Face folder: the base the LoRA runs start from."""
    folder = tmp_path_factory.mktemp("base")
    config = DiMOOConfig.from_dict({"model_type": "llada", **load_config(TINY_CONFIG).model.config})
    torch.manual_seed(7)
    save_pretrained(DiMOOModel(config).state_dict(), config, folder)
    return folder


def lora_config(tmp: Path, base: Path, *overrides: str):
    return tiny_run_config(tmp, f"model.init_from={base}", *LORA, *overrides)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, base) -> tuple[Path, list[float]]:
    """An uninterrupted LoRA run of STEPS steps, checkpoints at 2 and 4."""
    tmp = tmp_path_factory.mktemp("lora")
    return tmp, run_training(lora_config(tmp, base, f"train_iters={STEPS}", "save_interval=2"))


def test_only_adapters_reach_the_optimizer_and_the_base_stays_as_loaded(base, tmp_path):
    trainer = Trainer(lora_config(tmp_path, base, "train_iters=2"))
    trained = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert trained and all(".lora_A." in name or ".lora_B." in name for name in trained)
    assert "model.transformer.ff_out.weight" in dict(trainer.model.named_parameters()), "the head is not adapted"
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in trainer.model.parameters() if p.requires_grad}
    trainer.train()
    trainer.close()
    reference = load_model(base).state_dict()
    for name, value in trainer.model.state_dict().items():
        if ".lora_" not in name:
            assert torch.equal(value, reference[name.replace(".base_layer.", ".")]), name


def test_bf16_holds_the_frozen_base_once_in_bf16_and_trains_fp32_adapters(base, tmp_path):
    trainer = Trainer(lora_config(tmp_path, base, "train_iters=1", "gpt_args.bf16=true"))
    dtypes = {(p.requires_grad, p.dtype) for p in trainer.model.parameters()}
    assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}
    assert len(trainer.train()) == 1
    trainer.close()


def test_resume_reproduces_the_uninterrupted_losses(finished, base, tmp_path):
    _, expected = finished
    first = run_training(lora_config(tmp_path, base, "train_iters=2", "save_interval=0"))
    second = run_training(lora_config(tmp_path, base, f"train_iters={STEPS}"))
    assert first + second == expected  # adapter dropout included: its draws are a function of the step


def test_a_run_killed_while_saving_resumes_with_the_uninterrupted_losses(finished, base, tmp_path):
    _, expected = finished
    tiny_run_config(tmp_path)  # write the shards before the subprocess uses them
    overrides = [f"model.init_from={base}", *LORA, f"train_iters={STEPS}"]
    result = subprocess.run([sys.executable, "-c", KILL_AT_STEP_4, str(tmp_path), *overrides], cwd=REPO,
                            capture_output=True, text=True, timeout=240,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))  # fmt: skip
    assert result.returncode == -9, result.stderr[-2000:]
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / ".tmp-step-00000004" / "lora" / ADAPTER_WEIGHTS).is_file(), "killed with step 4 written"
    assert not (tmp_path / "run" / "lora").exists()
    trainer = Trainer(lora_config(tmp_path, base, f"train_iters={STEPS}", "save_interval=2"))
    assert trainer.step == 2 and not (checkpoints / ".tmp-step-00000004").exists()
    assert trainer.train() == expected[2:]
    trainer.close()
    assert (tmp_path / "run" / "lora" / ADAPTER_WEIGHTS).is_file()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("lora.rank=8", "trained with lora rank 4 on .*this run has lora rank 8"),
        ("lora.target_modules=[q_proj]", r"this run has lora rank 4 on \['q_proj'\]"),
        ("lora.rank=null", "this run has no lora"),
    ],
)
def test_resuming_with_other_adapters_is_refused(finished, base, tmp_path, change, message):
    shutil.copytree(finished[0] / "run" / "checkpoints", tmp_path / "run" / "checkpoints")
    with pytest.raises(CheckpointError, match=message):
        Trainer(lora_config(tmp_path, base, f"train_iters={STEPS + 1}", change))


def test_adapter_in_peft_format_at_the_end_and_beside_each_checkpoint(finished, base):
    tmp, _ = finished
    run = tmp / "run"
    for folder in (
        run / "lora",
        run / "checkpoints" / "step-00000002" / "lora",
        run / "checkpoints" / "step-00000004" / "lora",
    ):
        assert {p.name for p in folder.iterdir()} == {ADAPTER_CONFIG, ADAPTER_WEIGHTS}
    final = run / "checkpoints" / "step-00000004" / "lora" / ADAPTER_WEIGHTS
    assert (run / "lora" / ADAPTER_WEIGHTS).read_bytes() == final.read_bytes()
    config = json.loads((run / "lora" / ADAPTER_CONFIG).read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["base_model_name_or_path"] == str(base)

    from peft import PeftModel

    ids = torch.randint(0, 80, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        wrapped = PeftModel.from_pretrained(load_model(base), str(run / "lora")).eval()(ids)
        merged = load_model(base, lora=run / "lora")(ids)
        plain = load_model(base)(ids)
    diff = compare_layer("logits", wrapped, merged, tolerance("layer", torch.float32))
    assert diff.passed, diff
    assert not torch.allclose(plain, merged), "the adapter changed the model"


def test_export_merge_lora_equals_merging_at_load(finished, base, tmp_path):
    tmp, _ = finished
    checkpoints = tmp / "run" / "checkpoints"
    with pytest.raises(CheckpointError, match="from a LoRA run: pass --merge-lora"):
        export_hf(checkpoints, tmp_path / "plain", dtype=torch.float32)
    assert not (tmp_path / "plain").exists()
    out = export_hf(checkpoints, tmp_path / "merged", dtype=torch.float32, merge_lora=True)
    exported = load_model(out).state_dict()
    merged = load_model(base, lora=tmp / "run" / "lora").state_dict()
    assert exported.keys() == merged.keys()
    for name, value in merged.items():
        assert torch.equal(exported[name], value), name


def test_merge_lora_on_a_full_fine_tune_is_refused(tmp_path):
    run_training(tiny_run_config(tmp_path, "train_iters=1"))
    with pytest.raises(CheckpointError, match="full fine-tune, not a LoRA run: export it without --merge-lora"):
        export_hf(tmp_path / "run" / "checkpoints", tmp_path / "out", merge_lora=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lora.rank=0", "lora.rank is 0; it must be at least 1"),
        ("lora.rank=-3", "lora.rank is -3; it must be at least 1"),
        ("lora.dropout=1.5", "lora.dropout 1.5 is not a probability"),
        ("lora.alpha=0", "lora.alpha is 0.0; it must be positive"),
    ],
)
def test_bad_lora_values_are_refused_when_the_config_loads(base, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        lora_config(tmp_path, base, override)


@pytest.mark.parametrize("targets", ["[lm_head]", "[q_proj, qproj]", "[wte]", "[ln_f]"])
def test_a_target_module_matching_no_block_projection_is_refused_before_anything_is_written(base, tmp_path, targets):
    config = lora_config(tmp_path, base, f"lora.target_modules={targets}")
    with pytest.raises(ConfigError, match=r"matches no projection of the blocks: choose among .*q_proj"):
        Trainer(config)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("tp", "pp"), [(2, 1), (1, 2)])
def test_tensor_and_pipeline_parallel_are_refused_naming_the_supported_layouts(base, tmp_path, tp, pp):
    config = lora_config(
        tmp_path, base, f"tensor_model_parallel_size={tp}", f"pipeline_model_parallel_size={pp}", "data.seq_length=64"
    )
    model = DiMOOConfig.from_json(base)
    with pytest.raises(ConfigError, match="LoRA runs on one device or FSDP2 data parallel only"):
        plan_layout(config, model, 2)
    plan_layout(lora_config(tmp_path, base), model, 2)  # dp 2 (FSDP2) is fine


def test_lora_on_a_quantized_checkpoint_is_refused(finished, base, tmp_path):
    from dimoo_npu.cli import main

    quantized = tmp_path / "quantized"
    assert main(["quantize", "--checkpoint", str(base), "--scheme", "w8a8", "--output", str(quantized)]) == 0
    with pytest.raises(InputError, match="int8 \\(w8a8\\) inference checkpoint; training .*needs its unquantized"):
        Trainer(lora_config(tmp_path, quantized))
    assert not (tmp_path / "run").exists()
    adapter = finished[0] / "run" / "lora"
    with pytest.raises(InputError, match="int8 \\(w8a8\\) inference checkpoint; merging a LoRA adapter needs"):
        load_model(quantized, lora=adapter)
    with pytest.raises(InputError, match="--lora and --quantize w8a16 cannot load together"):
        load_model(base, lora=adapter, quantize="w8a16")


def test_an_adapter_folder_without_its_config_is_refused(finished, base, tmp_path):
    adapter = shutil.copytree(finished[0] / "run" / "lora", tmp_path / "adapter")
    (adapter / ADAPTER_CONFIG).unlink()
    with pytest.raises(CheckpointError, match="has no adapter_config.json: pass the folder `dimoo train` wrote"):
        load_model(base, lora=adapter)


def test_an_adapter_for_another_base_is_refused_by_shape_and_by_target_name(finished, base, tmp_path):
    from safetensors.torch import load_file, save_file

    adapter = shutil.copytree(finished[0] / "run" / "lora", tmp_path / "adapter")
    bigger = DiMOOConfig.from_dict({**DiMOOConfig.from_json(base).to_hf_dict(), "d_model": 64})
    other = tmp_path / "other"
    save_pretrained(DiMOOModel(bigger).state_dict(), bigger, other)
    with pytest.raises(CheckpointError, match="trained on another model size"):
        load_model(other, device="meta", lora=adapter)
    tensors = load_file(adapter / ADAPTER_WEIGHTS)
    save_file({k.replace("blocks.1.", "blocks.7."): v for k, v in tensors.items()}, adapter / ADAPTER_WEIGHTS)
    with pytest.raises(CheckpointError, match=r"targets model\.transformer\.blocks\.7\..* trained on another model"):
        load_model(base, lora=adapter)
