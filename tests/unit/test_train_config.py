"""Run config: YAML + overrides with MindSpeed-MM names, and layouts refused before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dimoo_npu.cli import main
from dimoo_npu.modeling.config import DiMOOConfig
from dimoo_npu.train.config import load_config
from dimoo_npu.train.layout import model_config_of, plan_layout
from dimoo_npu.train.schedule import learning_rate
from dimoo_npu.utils.errors import ConfigError
from tests.unit.train_support import TINY_CONFIG, small_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "train"


def test_tiny_config_plans_one_process():
    config = load_config(TINY_CONFIG)
    dims, options = plan_layout(config, model_config_of(config), 1)
    assert (dims.pp, dims.dp, dims.tp, options.microbatches) == (1, 1, 1, 2)


def test_8b_ascend_config_plans_the_cluster_it_documents():
    config = load_config(CONFIGS / "dimoo_8b_ascend.yaml")
    dimoo_8b = DiMOOConfig(d_model=4096, n_layers=32, n_heads=32, mlp_hidden_size=12288, embedding_size=134548)
    dims, options = plan_layout(config, dimoo_8b, world_size=16)  # 2 nodes x 8 NPUs, as its header says
    assert (dims.pp, dims.dp, dims.tp) == (2, 2, 4)
    assert options.microbatches == 32 and options.sequence_parallel and options.param_dtype is torch.bfloat16


def test_overrides_accept_bare_and_dotted_keys_and_yaml_numbers():
    config = load_config(TINY_CONFIG, ["lr=1e-4", "data.seq_length=64", "gpt_args.train_iters=3", "bf16=true"])
    assert config.gpt_args.lr == 1e-4 and isinstance(config.gpt_args.lr, float)
    assert config.data.seq_length == 64 and config.gpt_args.train_iters == 3 and config.gpt_args.bf16 is True


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("learning_rate=1", "unknown config key 'learning_rate'"),
        ("gpt_args.tensor_parallel=2", "did you mean 'gpt_args.tensor_model_parallel_size'"),
        ("train_iters=many", "must be int"),
        ("lr", "is not key=value"),
        ("lr_decay_style=step", "choose one of cosine, linear, constant"),
        ("micro_batch_size=0", "must be at least 1"),
        ("min_lr=1", "above lr"),
        ("model.config=null", "exactly one of model.init_from"),
        ("lr=.nan", "gpt_args.lr is nan: use a finite number"),
        ("lr=.inf", "gpt_args.lr is inf: use a finite number"),
        ("adam_eps=-.inf", "gpt_args.adam_eps is -inf"),
        ("data.cond_drop_prob=.nan", "data.cond_drop_prob is nan"),
        ("peak_tflops=.inf", "peak_tflops is inf"),
    ],
)
def test_bad_values_are_refused_with_the_key_named(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(TINY_CONFIG, [override])


@pytest.mark.parametrize(
    ("overrides", "world", "message"),
    [
        (["tensor_model_parallel_size=3"], 3, "does not divide the model's n_heads"),
        (["pipeline_model_parallel_size=3"], 3, "larger than the model's 2 layers"),
        (["tensor_model_parallel_size=2"], 3, "not a multiple of tensor_model_parallel_size"),
        (["global_batch_size=6", "micro_batch_size=2"], 2, "not divisible by micro_batch_size \\* dp"),
        (["pipeline_model_parallel_size=2"], 2, "set data.seq_length"),
        (["tensor_model_parallel_size=2", "sequence_parallel=true", "data.seq_length=63"], 2, "divisible by tp"),
        (["tensor_model_parallel_size=0"], 1, "tensor_model_parallel_size is 0; it must be at least 1"),
        (["recompute_granularity=partial"], 1, "choose one of none, selective, full"),
        (["pipeline_schedule=ZB"], 1, "choose one of 1F1B, GPipe"),
        (["pipeline_model_parallel_size=2", "data.seq_length=64", "global_batch_size=2"], 2, "at least as many micro"),
        (["use_distributed_optimizer=false", "tensor_model_parallel_size=2"], 2, "does not take tensor-parallel"),
        (
            [
                "use_distributed_optimizer=false",
                "pipeline_model_parallel_size=2",
                "data.seq_length=64",
                "micro_batch_size=1",
            ],
            4,
            "not supported with pipeline",
        ),  # fmt: skip
    ],
)
def test_invalid_layouts_are_refused_before_anything_starts(overrides, world, message):
    config = load_config(TINY_CONFIG, overrides)
    with pytest.raises(ConfigError, match=message):
        plan_layout(config, model_config_of(config), world)


def test_tp_must_divide_every_width_it_splits():
    config = load_config(TINY_CONFIG, ["tensor_model_parallel_size=3"])
    with pytest.raises(ConfigError, match=r"does not divide the model's mlp_hidden_size \(100\).*among \[1, 2\]"):
        plan_layout(config, small_config(mlp_hidden_size=100), 3)  # 6 heads of 8 split in 3, the MLP does not


def test_ddp_from_init_from_weights_is_refused_with_the_fix(tmp_path):
    """``init_from`` builds the model on meta, which DDP cannot broadcast (it crashed in DDP's constructor)."""
    ddp = ["use_distributed_optimizer=false", "model.config=null", f"model.init_from={tmp_path}"]
    with pytest.raises(ConfigError, match="cannot start from model.init_from at dp 2.*use_distributed_optimizer: true"):
        plan_layout(load_config(TINY_CONFIG, ddp), small_config(), 2)
    dims, options = plan_layout(load_config(TINY_CONFIG, ddp), small_config(), 1)  # one replica: no DDP wrapper
    assert (dims.dp, options.data_parallel) == (1, "ddp")
    fsdp = load_config(TINY_CONFIG, [*ddp, "use_distributed_optimizer=true"])
    assert plan_layout(fsdp, small_config(), 2)[1].data_parallel == "fsdp"
    fresh = load_config(TINY_CONFIG, ["use_distributed_optimizer=false"])  # a seeded model is real on every rank
    assert plan_layout(fresh, model_config_of(fresh), 2)[0].dp == 2


def test_cli_reports_a_bad_layout_without_a_traceback(monkeypatch, capsys, caplog):
    monkeypatch.setenv("WORLD_SIZE", "4")
    code = main(["train", str(TINY_CONFIG), "tensor_model_parallel_size=3", "--check"])
    assert code == 2
    assert "not a multiple of tensor_model_parallel_size" in caplog.text
    assert main(["train", str(TINY_CONFIG), "tensor_model_parallel_size=2", "--check"]) == 0
    assert "pp 1 x dp 2 x tp 2" in capsys.readouterr().out


def test_learning_rate_warms_up_then_decays_to_min_lr():
    config = load_config(TINY_CONFIG, ["lr=1.0", "min_lr=0.1", "lr_warmup_iters=2", "train_iters=10"])
    rates = [learning_rate(step, config) for step in range(12)]
    assert rates[:3] == [0.5, 1.0, 1.0]
    assert all(a >= b for a, b in zip(rates[2:-1], rates[3:], strict=True))  # cosine decay is monotone
    assert rates[6] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay: the middle of the cosine
    assert rates[10:] == [0.1, 0.1]
    linear = load_config(TINY_CONFIG, ["lr=1.0", "min_lr=0", "lr_warmup_iters=0", "train_iters=4",
                                       "lr_decay_style=linear"])  # fmt: skip
    assert [learning_rate(s, linear) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    fraction = load_config(TINY_CONFIG, ["lr_warmup_fraction=0.5", "train_iters=8"])
    assert fraction.warmup_iters() == 4


def test_a_weight_source_on_the_command_line_replaces_the_files_one(tmp_path):
    """tiny_cpu.yaml has model.config; model.init_from=... alone fine-tunes from a folder (no model.config=null)."""
    config = load_config(TINY_CONFIG, [f"model.init_from={tmp_path}"])
    assert (config.model.init_from, config.model.config) == (str(tmp_path), None)
    back = load_config(TINY_CONFIG, [f"model.init_from={tmp_path}", "model.config={d_model: 32}"])
    assert (back.model.init_from, back.model.config) == (None, {"d_model": 32})
    preset = load_config(TINY_CONFIG, ["model.preset=lumina-dimoo-8b"])
    assert (preset.model.preset, preset.model.config) == ("lumina-dimoo-8b", None)


def test_sequence_parallel_without_tensor_parallel_is_turned_off_with_one_warning(caplog):
    """Megatron-LM's convention (MindSpeed follows it): a warning, not an error, and the run goes on without it."""
    config = load_config(TINY_CONFIG, ["sequence_parallel=true", "data.seq_length=64"])
    with caplog.at_level("WARNING", logger="dimoo_npu.train.layout"):
        _, options = plan_layout(config, model_config_of(config), 1)
        plan_layout(config, model_config_of(config), 1)
    assert options.sequence_parallel is False and config.gpt_args.sequence_parallel is False
    assert [r.message for r in caplog.records] == [
        "sequence_parallel has no effect with tensor_model_parallel_size 1: turned off"
    ]
