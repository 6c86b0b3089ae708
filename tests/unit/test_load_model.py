"""Loading: keys, dtypes, sharded and single-file layouts, and one clear error per kind of bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import dimoo_npu
from dimoo_npu.checkpoint import save_pretrained
from dimoo_npu.files.safetensors_io import atomic_save_file, read_header
from dimoo_npu.modeling.config import DiMOOConfig
from dimoo_npu.utils.errors import CheckpointError, ConfigError, InputError
from tests.conftest import CHECKPOINT


@pytest.fixture
def ckpt_copy(tmp_path: Path) -> Path:
    target = tmp_path / "ckpt"
    shutil.copytree(CHECKPOINT, target, ignore=shutil.ignore_patterns("vqvae"))
    for path in target.iterdir():
        path.chmod(0o644)
    return target


def _edit_config(folder: Path, **changes) -> None:
    raw = json.loads((folder / "config.json").read_text())
    raw.update(changes)
    (folder / "config.json").write_text(json.dumps(raw))


def test_state_dict_keys_equal_checkpoint_keys(tiny_model):
    index = json.loads((CHECKPOINT / "model.safetensors.index.json").read_text())
    assert set(tiny_model.state_dict()) == set(index["weight_map"])
    assert all(key.startswith("model.transformer.") for key in tiny_model.state_dict())


def test_default_dtype_is_fp32_on_cpu_not_config_torch_dtype(tiny_model):
    assert json.loads((CHECKPOINT / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert {p.dtype for p in tiny_model.parameters()} == {torch.float32}
    assert not any(p.requires_grad for p in tiny_model.parameters())


def test_special_tokens_table(tiny_model, cases):
    table = tiny_model.config.special_tokens
    assert {k: table[k] for k in cases["special_tokens"]} == cases["special_tokens"]
    assert table["answer_pad"] == 126339


def test_special_tokens_overridden_by_config(ckpt_copy):
    _edit_config(ckpt_copy, special_tokens={"mask": 5, "codebook_size": 16})
    assert DiMOOConfig.from_json(ckpt_copy).special_tokens["mask"] == 5


def test_single_file_round_trip_and_fp16(tiny_model, tmp_path):
    save_pretrained(tiny_model.state_dict(), tiny_model.config, tmp_path / "single")
    assert (tmp_path / "single" / "model.safetensors").is_file()
    again = dimoo_npu.load_model(tmp_path / "single", dtype=torch.float16)
    ids = torch.tensor([[1, 2, 3, 126336]])
    torch.testing.assert_close(again(ids).float(), tiny_model(ids), atol=0.05, rtol=0.01)


def test_resharded_save_loads_identically(tiny_model, tmp_path):
    save_pretrained(tiny_model.state_dict(), tiny_model.config, tmp_path / "sharded", max_shard_bytes=1 << 20)
    assert len(list((tmp_path / "sharded").glob("model-*-of-*.safetensors"))) > 2
    again = dimoo_npu.load_model(tmp_path / "sharded")
    for key, value in tiny_model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value)


def test_missing_shard(ckpt_copy):
    (ckpt_copy / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing shard.*model-00002-of-00002"):
        dimoo_npu.load_model(ckpt_copy)


def test_truncated_shard(ckpt_copy):
    shard = ckpt_copy / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated.*download or copy it again"):
        dimoo_npu.load_model(ckpt_copy)


def test_no_weights_at_all(tmp_path):
    (tmp_path / "config.json").write_text((CHECKPOINT / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no safetensors weights"):
        dimoo_npu.load_model(tmp_path)


def test_shape_mismatch(ckpt_copy):
    _edit_config(ckpt_copy, mlp_hidden_size=96)
    expected = r"blocks.0.ff_out.weight has shape \(32, 80\) .* asks for \(32, 96\).* different models"
    with pytest.raises(CheckpointError, match=expected):
        dimoo_npu.load_model(ckpt_copy)


def test_dtype_mismatch(ckpt_copy, tiny_model):
    state = {k: v.to(torch.bfloat16) for k, v in tiny_model.state_dict().items()}
    state["model.transformer.ln_f.weight"] = torch.ones(32, dtype=torch.int32)
    _rewrite(ckpt_copy, state)
    with pytest.raises(CheckpointError, match="ln_f.weight is stored as torch.int32"):
        dimoo_npu.load_model(ckpt_copy)


def test_missing_keys(ckpt_copy, tiny_model):
    state = dict(tiny_model.state_dict())
    del state["model.transformer.blocks.1.q_proj.weight"]
    _rewrite(ckpt_copy, state)
    with pytest.raises(CheckpointError, match="lacks 1 weight.*blocks.1.q_proj"):
        dimoo_npu.load_model(ckpt_copy)


def test_unexpected_keys(ckpt_copy, tiny_model):
    state = dict(tiny_model.state_dict())
    state["model.transformer.blocks.2.q_proj.weight"] = torch.zeros(32, 32)
    _rewrite(ckpt_copy, state)
    with pytest.raises(CheckpointError, match="1 weight.*this model does not.*blocks.2.q_proj"):
        dimoo_npu.load_model(ckpt_copy)


def test_other_model_type(ckpt_copy):
    _edit_config(ckpt_copy, model_type="llama")
    with pytest.raises(ConfigError, match="model_type 'llama', not 'llada'"):
        dimoo_npu.load_model(ckpt_copy)


def test_unsupported_feature_in_config(ckpt_copy):
    _edit_config(ckpt_copy, weight_tying=True)
    with pytest.raises(ConfigError, match="weight_tying=True"):
        dimoo_npu.load_model(ckpt_copy)


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        dimoo_npu.load_model(tmp_path / "nowhere")


def test_ids_outside_vocabulary(tiny_model):
    with pytest.raises(InputError, match="token id 134548 is outside the vocabulary"):
        tiny_model(torch.tensor([[1, 134548]]))
    with pytest.raises(InputError, match="token id -1 is outside"):
        tiny_model(torch.tensor([[-1, 2]]))


def test_max_sequence_length_is_a_training_length_not_a_limit(tiny_model):
    """config.json says 4096, yet 1024 x 1024 text-to-image needs 4182 tokens: it runs, up to the cap (8192)."""
    assert tiny_model.max_length == 8192
    longer = torch.zeros(1, tiny_model.config.max_sequence_length + 86, dtype=torch.long)
    assert tiny_model(longer, vocab_range=(0, 1)).shape == (1, 4182, 1)


def test_sequence_longer_than_the_cap(tiny_model):
    cap = tiny_model.max_length
    try:
        tiny_model.max_length = 4100
        with pytest.raises(InputError, match="4101 tokens is longer than the cap of 4100: .*--max-length"):
            tiny_model(torch.zeros(1, 4101, dtype=torch.long), vocab_range=(0, 1))
    finally:
        tiny_model.max_length = cap


def test_cap_from_the_environment(monkeypatch):
    from dimoo_npu.tokens.lengths import length_cap

    assert length_cap(4096) == 8192
    assert length_cap(16384) == 16384  # never below what the checkpoint was trained at
    monkeypatch.setenv("DIMOO_MAX_LENGTH", "5000")
    assert length_cap(4096) == 5000
    assert length_cap(4096, requested=6000) == 6000
    monkeypatch.setenv("DIMOO_MAX_LENGTH", "lots")
    with pytest.raises(InputError, match="DIMOO_MAX_LENGTH='lots' is not a whole number: pass an integer in \\[1, "):
        length_cap(4096)


def test_bad_mask_and_id_dtype(tiny_model):
    with pytest.raises(InputError, match="attention_mask has shape"):
        tiny_model(torch.tensor([[1, 2, 3]]), torch.ones(1, 2))
    with pytest.raises(InputError, match="integer tensor"):
        tiny_model(torch.ones(1, 3))


def test_integer_attention_mask_equals_bool(tiny_model):
    ids = torch.tensor([[5, 6, 7, 0]])
    as_int = tiny_model(ids, torch.tensor([[1, 1, 1, 0]]))
    as_bool = tiny_model(ids, torch.tensor([[True, True, True, False]]))
    assert torch.equal(as_int, as_bool)


def test_atomic_save_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "w.safetensors"
    atomic_save_file({"a": torch.ones(2)}, target)
    with pytest.raises(AttributeError):  # a value that is not a tensor fails while writing the temp file
        atomic_save_file({"a": "not a tensor"}, target)  # type: ignore[dict-item]
    assert [entry.name for entry in read_header(target)] == ["a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


def _rewrite(folder: Path, state: dict[str, torch.Tensor]) -> None:
    for path in folder.glob("model*.safetensors*"):
        path.unlink()
    atomic_save_file(state, folder / "model.safetensors")
