"""ONNX round trips (transformer, VQ decoder) in onnxruntime at shapes other than the traced ones, and validation."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from dimoo_npu.export.onnx import (
    example_transformer_inputs,
    export_transformer,
    export_vq_decoder,
)
from dimoo_npu.modeling.block_outputs import layer_names
from dimoo_npu.numerics.onnx_check import (
    read_signature,
    run_transformer_onnx,
    validate_transformer_onnx,
    verify_transformer,
    verify_vq_decoder,
)
from dimoo_npu.tokens.image_tokenizer import load_vq_model
from dimoo_npu.utils.errors import CheckpointError, InputError

pytest.importorskip("onnxruntime", reason="needs the onnx extra: pip install -e '.[onnx]'")
pytest.importorskip("onnxscript", reason="needs the onnx extra: pip install -e '.[onnx]'")

TRACED = (2, 16)  # example_transformer_inputs' default shape, used for tracing


@pytest.fixture(scope="session")
def exported(tmp_path_factory, tiny_model, checkpoint_dir):
    """Transformer (with block outputs) and VQ decoder exported once per session from the fixture checkpoint."""
    folder = tmp_path_factory.mktemp("onnx")
    vqvae = load_vq_model(checkpoint_dir / "vqvae")
    with pytest.MonkeyPatch.context() as patch:  # the decoder goes through the > 1 GiB path: weights in a .data file
        patch.setattr("dimoo_npu.export.onnx.EXTERNAL_DATA_BYTES", 0)
        vq_decoder = export_vq_decoder(vqvae, folder / "vq_decoder.onnx")
    return {
        "transformer": export_transformer(tiny_model, folder / "transformer.onnx"),
        "vq_decoder": vq_decoder,
        "vqvae": vqvae,
    }


def test_transformer_signature_is_dynamic_with_block_outputs(exported, tiny_model):
    signature = read_signature(exported["transformer"])
    assert signature.inputs == {"input_ids": ["batch", "length"], "attention_mask": ["batch", "length"]}
    config = tiny_model.config
    assert sorted(signature.outputs) == sorted(layer_names(config.n_layers))
    assert signature.outputs["logits"] == ["batch", "length", config.embedding_size]
    assert signature.metadata["d_model"] == str(config.d_model) and signature.metadata["kind"] == "transformer"
    import onnx

    assert onnx.load(str(exported["transformer"]), load_external_data=False).opset_import[0].version >= 17


@pytest.mark.parametrize(("batch", "length"), [(3, 11), (1, 5)])
def test_transformer_matches_torch_within_1e4_at_untraced_shapes(exported, tiny_model, batch, length):
    assert (batch, length) != TRACED
    ids, mask = example_transformer_inputs(tiny_model.config, batch=batch, length=length, seed=batch)
    diffs = verify_transformer(tiny_model, exported["transformer"], ids, mask)
    assert [d.layer for d in diffs] == ["logits", "block.0", "block.1"]
    assert all(d.passed and d.max_abs <= 1e-4 for d in diffs), diffs
    assert tiny_model.ops.names["attention"] == "torch"  # the shared model's ops were restored


def test_attention_mask_is_part_of_the_graph(exported, tiny_model):
    ids, mask = example_transformer_inputs(tiny_model.config, batch=2, length=9)
    full = run_transformer_onnx(exported["transformer"], ids, torch.ones_like(mask))["logits"]
    padded = run_transformer_onnx(exported["transformer"], ids, mask)["logits"]
    assert not torch.allclose(full[-1], padded[-1], atol=1e-3)  # the padded row changes when keys are hidden
    torch.testing.assert_close(full[0], padded[0], atol=1e-5, rtol=0)  # the unpadded row does not


@pytest.mark.parametrize("shape", [(2, 3, 5), (1, 4, 4)])
def test_vq_decoder_matches_torch_within_1e4(exported, shape):
    vqvae = exported["vqvae"]
    assert sorted(p.name for p in exported["vq_decoder"].parent.glob("vq_decoder*")) == [
        "vq_decoder.onnx",
        "vq_decoder.onnx.data",
    ]  # run below from the external-data layout
    codes = torch.randint(0, vqvae.config.num_vq_embeddings, shape, generator=torch.Generator().manual_seed(3))
    diff = verify_vq_decoder(vqvae, exported["vq_decoder"], codes)
    assert diff.passed and diff.max_abs <= 1e-4, diff
    from dimoo_npu.numerics.onnx_check import OrtSession

    (image,) = OrtSession(exported["vq_decoder"]).run(codes=codes).values()
    factor = 2 ** (len(vqvae.config.block_out_channels) - 1)
    assert image.shape == (shape[0], 3, shape[1] * factor, shape[2] * factor)
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0


def test_image_vocab_range_export_returns_only_the_code_logits(tmp_path, tiny_model, exported):
    tokens = tiny_model.config.special_tokens
    lo, hi = tokens["image_offset"], tokens["image_offset"] + tokens["codebook_size"]
    path = export_transformer(tiny_model, tmp_path / "image.onnx", layer_outputs=False, vocab_range=(lo, hi))
    assert read_signature(path).outputs == {"logits": ["batch", "length", hi - lo]}
    assert path.stat().st_size < 0.6 * exported["transformer"].stat().st_size  # other head rows left out
    assert tiny_model.transformer.ff_out.weight.shape[0] == tiny_model.config.embedding_size  # head restored
    ids, mask = example_transformer_inputs(tiny_model.config, batch=1, length=7)
    (diff,) = verify_transformer(tiny_model, path, ids, mask)
    assert diff.passed and diff.max_abs <= 1e-4


def test_matching_file_validates(exported, tiny_model, checkpoint_dir):
    validate_transformer_onnx(exported["transformer"], tiny_model.config, checkpoint_dir)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"embedding_size": 1000}, "embedding_size is 134548 in the ONNX file but 1000 in config.json"),
        ({"d_model": 64}, "d_model is 32 in the ONNX file but 64 in config.json"),
        ({"n_layers": 3}, "n_layers is 2 in the ONNX file but 3"),
    ],
)
def test_file_for_another_model_is_refused_with_the_mismatch(exported, tiny_model, change, needle):
    other = replace(tiny_model.config, **change)
    with pytest.raises(CheckpointError, match="does not match checkpoint") as err:
        validate_transformer_onnx(exported["transformer"], other, "ckpt")
    assert needle in str(err.value) and "dimoo export-onnx --checkpoint ckpt" in str(err.value)


def test_decoder_file_is_not_a_transformer(exported, tiny_model):
    with pytest.raises(CheckpointError, match=r"inputs are \['codes'\]"):
        validate_transformer_onnx(exported["vq_decoder"], tiny_model.config)


def test_unreadable_or_missing_files_are_named(tmp_path, tiny_model):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not an onnx file" * 8)
    with pytest.raises(InputError, match="not a readable ONNX file"):
        validate_transformer_onnx(junk, tiny_model.config)
    with pytest.raises(InputError, match="does not exist"):
        validate_transformer_onnx(tmp_path / "missing.onnx", tiny_model.config)


def test_export_never_overwrites_and_checks_its_arguments(exported, tiny_model, tmp_path):
    before = exported["transformer"].read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_transformer(tiny_model, exported["transformer"])
    assert exported["transformer"].read_bytes() == before
    with pytest.raises(InputError, match=r"must end in \.onnx"):
        export_transformer(tiny_model, tmp_path / "model.bin")
    with pytest.raises(InputError, match="opset 16 is too old"):
        export_transformer(tiny_model, tmp_path / "old.onnx", opset=16)
    with pytest.raises(InputError, match="vocab range"):
        export_transformer(tiny_model, tmp_path / "v.onnx", vocab_range=(5, 5))
    with pytest.raises(CheckpointError, match="vqvae/ folder"):
        load_vq_model(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing half-written


def test_metadata_survives_in_the_file(exported):
    import onnx

    props = {p.key: p.value for p in onnx.load(str(exported["transformer"]), load_external_data=False).metadata_props}
    assert props["dimoo.vocab_range"] == "0,134548" and props["dimoo.dtype"] == "float32"
