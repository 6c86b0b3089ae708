"""Training checkpoints: torch.distributed.checkpoint (DCP), sharded, atomic, loadable into any tp/pp/dp layout.

Layout under ``<output_dir>/checkpoints``::

    step-00000100/   .metadata + *.distcp (DCP: model and optimizer tensors, keyed by parameter name)
                     trainer_state.json (step, consumed samples, seed, layout), config.json (the model)
    latest           text: the name of the newest complete checkpoint (replaced atomically)
    .tmp-step-.../   a save in progress (or one a killed process left; removed at the next start)

Atomicity: every rank writes into ``.tmp-step-N``; once DCP has finished (its metadata file is written
last), rank 0 adds the JSON files, renames the folder to ``step-N`` and then rewrites ``latest``. A process
killed at any point leaves ``latest`` naming the previous complete checkpoint.

Resharding: model and optimizer states are keyed by fully-qualified parameter names (optimizer state
flattened per parameter, as torchtitan does for pipeline parallelism), and DCP maps saved shards onto
whatever DTensor layout the loading run has. Only tensors go into DCP files; everything else is JSON, and
DCP's pickled metadata is read through an allowlist (`dcp_reader`), so loading never runs pickled code.
The learning rate and every random draw are functions of the step (see `schedule` and `masking`), so
(step, consumed samples, seed) is the whole scheduler, RNG and data state.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from dimoo_npu.files.atomic import fsync, replace_directory, write_text_atomically
from dimoo_npu.files.lora import Adapter, merge_adapter, read_adapter
from dimoo_npu.modeling.config import DiMOOConfig
from dimoo_npu.quantization import refuse_quantized
from dimoo_npu.train.dcp_reader import SafeFileSystemReader, UnsafeCheckpointError
from dimoo_npu.train.lora import LORA_DIR, is_adapter, saved_name
from dimoo_npu.utils.errors import CheckpointError

logger = logging.getLogger(__name__)

LATEST = "latest"
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.json"
_FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


def step_name(step: int) -> str:
    return f"step-{step:08d}"


@contextlib.contextmanager
def _dcp_call():
    """Silence DCP's warning that a run without a process group is a single process: here that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def model_state(parts: list[nn.Module]) -> dict[str, torch.Tensor]:
    """Saved parameter name -> (possibly sharded) tensor, over every model part this rank owns (LoRA runs: peft's
    names mapped by `saved_name`, so base weights keep their plain names)."""
    state: dict[str, torch.Tensor] = {}
    for part in parts:
        state.update({saved_name(name): value for name, value in get_model_state_dict(part).items()})
    return state


def _set_model_state(parts: list[nn.Module], state: dict[str, torch.Tensor]) -> None:
    """Load a `model_state`-keyed dict into the parts under their own (possibly peft) names."""
    for part in parts:
        own = {name: state[saved_name(name)] for name in get_model_state_dict(part) if saved_name(name) in state}
        set_model_state_dict(part, own, options=StateDictOptions(strict=False))


def _only_part(parts: list[nn.Module]) -> nn.Module:
    """The rank's one model part (`dimoo_npu.parallel` gives each rank one pipeline stage)."""
    if len(parts) != 1:
        raise CheckpointError(f"this rank owns {len(parts)} model parts; optimizer checkpoints take one per rank")
    return parts[0]


def _optimizer_state(parts: list[nn.Module], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The flattened optimizer state under the part's own parameter names."""
    return get_optimizer_state_dict(_only_part(parts), optimizer, options=_FLAT)


def _tensors_only(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}


class Checkpointer:
    """Saves and finds the checkpoints of one run folder; every rank calls `save` and `load` together."""

    def __init__(self, root: str | os.PathLike, keep: int = 2, rank: int = 0):
        self.root = Path(root)
        self.keep = keep
        self.rank = rank
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-step-*"):
                logger.warning("removing %s, left by a save that did not finish", stale.name)
                shutil.rmtree(stale, ignore_errors=True)
            for stale in self.root.glob(f".{LATEST}.tmp-*"):  # write_text_atomically's temp name
                stale.unlink(missing_ok=True)
        _barrier()

    def latest(self) -> Path | None:
        """The newest intact checkpoint up to the one ``latest`` names, or None when the run has none yet.

        A broken one (a file torn or missing) is skipped with a warning naming it.
        """
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        named = pointer.read_text().strip()
        for path in sorted((p for p in self.root.glob("step-*") if p.name <= named), reverse=True):
            problem = intact_problem(path)
            if problem is None:
                if path.name != named and self.rank == 0:
                    logger.warning("resuming from %s, the newest intact checkpoint", path.name)
                return path
            if self.rank == 0:
                logger.warning("checkpoint %s is broken (%s): skipping it", path.name, problem)
        raise CheckpointError(
            f"no intact checkpoint in {self.root} ({LATEST} names {named}): choose a new output_dir, "
            "or delete the checkpoints folder to start fresh"
        )

    def save(
        self,
        step: int,
        parts: list[nn.Module],
        optimizer: torch.optim.Optimizer,
        trainer_state: dict[str, Any],
        model_config: DiMOOConfig,
        extra: Callable[[Path], None] | None = None,
    ) -> Path:
        """Save a checkpoint; ``extra(folder)`` (rank 0) adds files to it before it is committed."""
        final = self.root / step_name(step)
        tmp = self.root / f".tmp-{final.name}"
        if self.rank == 0 and tmp.exists():
            shutil.rmtree(tmp)
        _barrier()
        optim = _tensors_only(_optimizer_state(parts, optimizer))
        state = {"model": model_state(parts), "optim": {saved_name(key): value for key, value in optim.items()}}
        try:
            with _dcp_call():
                dcp.save(state, checkpoint_id=str(tmp), no_dist=not dist.is_initialized())
            if self.rank == 0:
                _write_json(tmp / STATE_FILE, trainer_state)
                _write_json(tmp / CONFIG_FILE, model_config.to_hf_dict())
                if extra is not None:
                    extra(tmp)
                self._commit(tmp, final)
        except BaseException as err:  # DCP wraps what interrupts it (Ctrl-C too) in a CheckpointException
            if self.rank == 0:  # no half-written save is left behind (``latest`` still names the last one)
                shutil.rmtree(tmp, ignore_errors=True)
            if _interrupted(err):
                raise KeyboardInterrupt from err
            raise
        _barrier()
        return final

    def _commit(self, tmp: Path, final: Path) -> None:
        """Rename the finished save into place, then point ``latest`` at it, then prune old ones."""
        if final.exists():  # a save of this step from before a crash that ``latest`` never named
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync(self.root)
        write_text_atomically(self.root / LATEST, final.name)
        logger.info("saved checkpoint %s", final)
        if self.keep:
            for old in sorted(self.root.glob("step-*"))[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)

    def load(self, path: Path, parts: list[nn.Module], optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
        """Load ``path`` into the parts (and optimizer) of this run's layout; return its trainer state."""
        state: dict[str, Any] = {"model": model_state(parts)}
        optim_full = None
        if optimizer is not None:
            optim_full = _optimizer_state(parts, optimizer)  # creates the states to load into
            state["optim"] = {saved_name(key): value for key, value in _tensors_only(optim_full).items()}
        with _dcp_call():
            dcp.load(state, storage_reader=SafeFileSystemReader(str(path)), no_dist=not dist.is_initialized())
        _set_model_state(parts, state["model"])
        if optimizer is not None:
            optim_full.update({key: state["optim"][saved_name(key)] for key in _tensors_only(optim_full)})
            set_optimizer_state_dict(_only_part(parts), optimizer, optim_full, options=_FLAT)
        logger.info("loaded checkpoint %s", path)
        return json.loads((path / STATE_FILE).read_text())


def intact_problem(path: Path) -> str | None:
    """What makes a checkpoint unusable (a file its DCP metadata names is missing or shorter than recorded,
    or its JSON does not read), or None when it is intact. Crafted metadata raises instead."""
    for name in (STATE_FILE, CONFIG_FILE):
        try:
            json.loads((path / name).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            return f"{name} does not read: {err}"
    try:
        metadata = SafeFileSystemReader(str(path)).read_metadata()
    except UnsafeCheckpointError:
        raise
    except (OSError, ValueError) as err:  # CheckpointError is a ValueError
        return f".metadata does not read: {err}"
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size < size:
            return f"{name} has {file.stat().st_size} bytes, its metadata records {size}"
    return None


def _interrupted(err: BaseException) -> bool:
    """Ctrl-C, whether raised as is or wrapped by DCP (its CheckpointException lists each rank's exception)."""
    failures = getattr(err, "failures", None)
    wrapped = [pair[0] for pair in failures.values()] if isinstance(failures, dict) else []
    return isinstance(err, KeyboardInterrupt) or any(isinstance(exc, KeyboardInterrupt) for exc in wrapped)


def load_hf_weights(parts: list[nn.Module], folder: str | os.PathLike) -> None:
    """Fill the parts (any layout; meta-initialised and ``to_empty``-ed) from a Hugging Face safetensors folder.

    Each rank reads only the slices of the shards it owns (DCP's Hugging Face reader); dtypes convert.
    """
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    state = {name: value for name, value in model_state(parts).items() if not is_adapter(name)}
    with _dcp_call():
        dcp.load(state, storage_reader=HuggingFaceStorageReader(str(folder)), no_dist=not dist.is_initialized())
    _set_model_state(parts, state)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    write_text_atomically(path, json.dumps(data, indent=2))


TOKENIZER_ASSETS = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
)


def export_hf(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    assets_from: str | os.PathLike | None = None,
    overwrite: bool = False,
    merge_lora: bool = False,
) -> Path:
    """Write a training checkpoint (any layout it was saved in) as a folder `dimoo_npu.load_model` reads.

    Runs in one process: DCP gathers every shard into whole tensors of ``dtype``. The tokenizer files and
    ``vqvae/`` are copied from ``assets_from`` (default: the folder the run was initialised from, if any).
    A non-empty ``output`` is refused unless ``overwrite``; then the new folder is built beside it and
    swapped in whole, so old shards never sit next to new ones. A LoRA run's checkpoint exports only with
    ``merge_lora``: its adapter (``lora/`` beside the DCP files) is merged into the base weights.
    """
    from dimoo_npu.checkpoint import save_pretrained
    from dimoo_npu.model import DiMOOModel

    checkpoint, output = Path(checkpoint), Path(output)
    _check_export_target(output, overwrite)
    if (checkpoint / LATEST).is_file():
        checkpoint = checkpoint / (checkpoint / LATEST).read_text().strip()
    if not (checkpoint / STATE_FILE).is_file():
        if (checkpoint / "config.json").is_file():
            refuse_quantized(
                DiMOOConfig.from_json(checkpoint), checkpoint, "export-hf (it takes a training checkpoint)"
            )
        raise CheckpointError(
            f"{checkpoint} is not a training checkpoint (no {STATE_FILE}): pass a step-* folder "
            "or the checkpoints folder of a run"
        )
    trainer_state = json.loads((checkpoint / STATE_FILE).read_text())
    adapter = _adapter_to_merge(checkpoint, trainer_state, merge_lora)
    config = DiMOOConfig.from_json(checkpoint / CONFIG_FILE)
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in DiMOOModel(config).state_dict().items()}
    weights = {name: torch.empty(shape, dtype=dtype) for name, shape in shapes.items()}
    with _dcp_call():
        dcp.load({"model": weights}, storage_reader=SafeFileSystemReader(str(checkpoint)), no_dist=True)
    if adapter is not None:
        merge_adapter(weights, adapter)
    assets_from = assets_from or trainer_state.get("init_from")

    def fill(staging: Path) -> None:
        save_pretrained(weights, config, staging)
        if assets_from:
            copy_assets(Path(assets_from), staging)

    return replace_directory(output, fill)


def _adapter_to_merge(checkpoint: Path, trainer_state: dict[str, Any], merge_lora: bool) -> Adapter | None:
    """The adapter of a LoRA run's checkpoint when ``merge_lora``; a LoRA checkpoint without it (or the flag on a
    full fine-tune's) is refused, since its base weights alone are not what was trained."""
    trained_lora = (trainer_state.get("run_config", {}).get("lora") or {}).get("rank") is not None
    if trained_lora and not merge_lora:
        raise CheckpointError(
            f"{checkpoint} is from a LoRA run: pass --merge-lora to export the base with the adapter merged in "
            f"(or sample the base checkpoint with --lora {checkpoint / LORA_DIR})"
        )
    if merge_lora and not trained_lora:
        raise CheckpointError(f"{checkpoint} is from a full fine-tune, not a LoRA run: export it without --merge-lora")
    return read_adapter(checkpoint / LORA_DIR) if merge_lora else None


def _check_export_target(output: Path, overwrite: bool) -> None:
    """Refuse, before any work, a target that is a file or a non-empty folder (unless ``overwrite``)."""
    if output.exists() and not output.is_dir():
        raise CheckpointError(f"export target {output} is a file: name a folder")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise CheckpointError(
            f"export target {output} is not empty: pass --overwrite to replace it whole, or choose a new folder"
        )


def copy_assets(source: Path, output: Path) -> None:
    """Tokenizer files and the VQ model, so the exported folder is a complete DiMOO checkpoint."""
    if not source.is_dir():
        logger.warning("not copying tokenizer/vqvae: %s does not exist", source)
        return
    for name in TOKENIZER_ASSETS:
        if (source / name).is_file():
            shutil.copy2(source / name, output / name)
    if (source / "vqvae").is_dir():
        shutil.copytree(source / "vqvae", output / "vqvae", dirs_exist_ok=True)
