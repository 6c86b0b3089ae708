"""Exported ONNX files in onnxruntime: their signature against a checkpoint, their outputs against torch.

`validate_transformer_onnx` reads only the graph's signature and metadata (never the weights), so a
file made for another model is refused with the mismatch named before anything is run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dimoo_npu.export.onnx import INPUT_NAMES, META_PREFIX, VQ_INPUT, VQ_OUTPUT, VQDecoderForExport
from dimoo_npu.modeling.block_outputs import LOGITS, block_name, run_with_capture
from dimoo_npu.modeling.config import DiMOOConfig
from dimoo_npu.numerics.compare import LayerDiff, compare_layer
from dimoo_npu.numerics.tolerances import tolerance
from dimoo_npu.utils.errors import CheckpointError, InputError

REEXPORT_FIX = "re-export it from this checkpoint: dimoo export-onnx --checkpoint {checkpoint} --output FOLDER"


@dataclass(frozen=True)
class TransformerSignature:
    """What an exported transformer graph takes and returns, read from the file."""

    inputs: dict[str, list[int | str]]
    outputs: dict[str, list[int | str]]
    metadata: dict[str, str]

    @property
    def block_outputs(self) -> list[str]:
        return [name for name in self.outputs if name.startswith("block.")]

    def vocab_range(self, vocab: int) -> tuple[int, int]:
        """The head rows the logits cover (all ``vocab`` unless exported with a vocab range)."""
        lo, hi = self.metadata.get("vocab_range", f"0,{vocab}").split(",")
        return int(lo), int(hi)


def read_signature(path: str | os.PathLike) -> TransformerSignature:
    """Inputs, outputs (name -> dims, symbolic dims as names) and dimoo metadata of an ONNX file."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise InputError(f"ONNX file {path} does not exist: export one with `dimoo export-onnx`")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # protobuf raises its own DecodeError types
        raise InputError(f"{path} is not a readable ONNX file ({type(err).__name__}: {err})") from None

    def dims(value) -> list[int | str]:
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    return TransformerSignature(
        inputs={value.name: dims(value) for value in proto.graph.input},
        outputs={value.name: dims(value) for value in proto.graph.output},
        metadata={
            p.key.removeprefix(META_PREFIX): p.value for p in proto.metadata_props if p.key.startswith(META_PREFIX)
        },
    )


def validate_transformer_onnx(
    path: str | os.PathLike, config: DiMOOConfig, checkpoint: str | os.PathLike = "CHECKPOINT"
) -> TransformerSignature:
    """Raise `CheckpointError` naming every way the ONNX graph does not fit the checkpoint's config."""
    signature = read_signature(path)
    fix = REEXPORT_FIX.format(checkpoint=checkpoint)
    problems = _signature_problems(signature, config)
    if problems:
        raise CheckpointError(f"ONNX file {path} does not match checkpoint {checkpoint}: {'; '.join(problems)}; {fix}")
    return signature


def _signature_problems(signature: TransformerSignature, config: DiMOOConfig) -> list[str]:
    problems = []
    if tuple(signature.inputs) != INPUT_NAMES:
        problems.append(f"inputs are {list(signature.inputs)}, expected {list(INPUT_NAMES)}")
    if signature.metadata.get("kind", "transformer") != "transformer":
        problems.append(f"it is a {signature.metadata['kind']} graph, not the transformer")
    if LOGITS not in signature.outputs:
        problems.append(f"it has no '{LOGITS}' output (outputs: {list(signature.outputs)[:4]})")
    lo, hi = signature.vocab_range(config.embedding_size)
    width = signature.outputs.get(LOGITS, [None])[-1]
    if LOGITS in signature.outputs and width != hi - lo:
        problems.append(f"logits width {width} != vocabulary {hi - lo} (embedding_size {config.embedding_size})")
    for key in ("d_model", "n_layers", "n_heads", "embedding_size"):
        if key in signature.metadata and int(signature.metadata[key]) != getattr(config, key):
            problems.append(
                f"{key} is {signature.metadata[key]} in the ONNX file but {getattr(config, key)} in config.json"
            )
    blocks = signature.block_outputs
    if blocks and blocks != [block_name(i) for i in range(config.n_layers)]:
        problems.append(f"it has {len(blocks)} block outputs but the checkpoint has {config.n_layers} layers")
    widths = {signature.outputs[name][-1] for name in blocks}
    if blocks and widths != {config.d_model}:
        problems.append(
            f"block outputs have width {sorted(widths, key=str)}, the checkpoint's d_model is {config.d_model}"
        )
    return problems


class OrtSession:
    """An onnxruntime CPU session that maps named torch tensors to named fp32 torch tensors."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.log_severity_level = 3  # errors only
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.output_names = [value.name for value in self.session.get_outputs()]

    def run(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        feeds = {name: tensor.detach().cpu().numpy() for name, tensor in inputs.items()}
        results = self.session.run(self.output_names, feeds)
        return {
            name: torch.from_numpy(np.asarray(value)).float()
            for name, value in zip(self.output_names, results, strict=True)
        }


def run_transformer_onnx(path: str | os.PathLike, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """All outputs of an exported transformer (logits and any block outputs), fp32 CPU tensors."""
    return OrtSession(path).run(input_ids=input_ids.long(), attention_mask=attention_mask.long())


def verify_transformer(
    model, path: str | os.PathLike, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> list[LayerDiff]:
    """Every output of onnxruntime vs the torch model (reference ops, same dtype) on these inputs."""
    from dimoo_npu.ops import resolve_ops

    previous = model.ops
    model.use_ops(resolve_ops("cpu", "reference"))
    try:
        expected = run_with_capture(model, input_ids, attention_mask)
    finally:
        model.use_ops(previous)
    got = run_transformer_onnx(path, input_ids, attention_mask)
    lo, hi = read_signature(path).vocab_range(expected[LOGITS].shape[-1])
    expected[LOGITS] = expected[LOGITS][..., lo:hi]
    tol = tolerance("onnxruntime", next(model.parameters()).dtype)
    return [compare_layer(name, expected[name], got[name], tol) for name in got]


def verify_vq_decoder(vqvae, path: str | os.PathLike, codes: torch.Tensor) -> LayerDiff:
    """onnxruntime vs torch decoding ``codes`` (B, h, w) into images."""
    with torch.no_grad():
        expected = VQDecoderForExport(vqvae)(codes)
    (image,) = OrtSession(path).run(**{VQ_INPUT: codes.long()}).values()
    return compare_layer(VQ_OUTPUT, expected.float(), image, tolerance("onnxruntime", next(vqvae.parameters()).dtype))
