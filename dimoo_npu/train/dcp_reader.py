"""A DCP reader that never runs arbitrary pickle code from a checkpoint.

DCP writes its ``.metadata`` file with pickle, and its stock reader loads it with ``pickle.load``: a
crafted checkpoint could run code on load. This reader unpickles the metadata with an allowlist of the
classes DCP metadata is made of (DCP's own dataclasses, ``torch.Size``, dtypes, layouts, paths) and
refuses anything else. Tensor data is read by DCP with ``torch.load(weights_only=True)``; our states hold
tensors only, so DCP's pickled "bytes" items are never requested.
"""

from __future__ import annotations

import pickle

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from dimoo_npu.utils.errors import CheckpointError

_DTYPES = {name for name in dir(torch) if isinstance(getattr(torch, name, None), torch.dtype)}
_ALLOWED: dict[str, set[str] | None] = {
    "torch.distributed.checkpoint.metadata": None,  # every class of DCP's metadata module
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size", *_DTYPES},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "slice"},
}


class UnsafeCheckpointError(CheckpointError):
    """Metadata that names something DCP never writes: refused outright, never skipped as merely broken."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        allowed = _ALLOWED.get(module, set())
        if allowed is not None and name not in allowed:
            raise UnsafeCheckpointError(
                f"checkpoint metadata refers to {module}.{name}, which DCP metadata never contains: the "
                "checkpoint was not written by DCP or was tampered with; refusing to load it"
            )
        return super().find_class(module, name)


class SafeFileSystemReader(FileSystemReader):
    """`FileSystemReader` whose metadata loading is restricted to DCP's own classes."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as handle:
            try:
                metadata = _MetadataUnpickler(handle).load()
            except (pickle.UnpicklingError, EOFError, AttributeError) as err:
                raise CheckpointError(f"{path} is not readable DCP metadata ({err}): the save did not finish") from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path} holds {type(metadata).__name__}, not DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
