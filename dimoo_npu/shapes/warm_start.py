"""Start a retrain from the shipped embedded model when only its word list grew.

The word tokenizer numbers its words alphabetically, so new words (issue 18 added 'add', 'describe', ...)
shift the ids of old ones. The weights carry over row by row: every word keeps its learnt embedding and
output row at its new id; special tokens and image codes keep their ids. A new word starts at the mean of
the learnt word rows (a neutral guess its first steps correct, rather than noise that could outscore
trained words at the output head).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from dimoo_npu.files.safetensors_io import atomic_save_file
from dimoo_npu.files.work_folder import claim
from dimoo_npu.shapes.embedded import FIRST_SPECIAL

WEIGHTS = "model.safetensors"
SEED_MARKER = ".warm_start-seed"  # written into the folder seed_from fills; a rerun replaces only such a folder
# Rows indexed by token id: the input embedding and the output head.
VOCAB_ROWS = ("model.transformer.wte.weight", "model.transformer.ff_out.weight")
# What must agree for a row-by-row carry-over (everything that shapes a weight, and the non-word ids).
_SAME = ("d_model", "n_layers", "n_heads", "mlp_hidden_size", "embedding_size", "special_tokens")


def word_ids(folder: Path) -> dict[str, int]:
    """The word tokenizer's word -> id table (template tags included; special tokens, which keep their ids, not)."""
    vocab = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
    return {word: index for word, index in vocab.items() if index < FIRST_SPECIAL}


def check_compatible(source: Path, target: Path) -> None:
    """Refuse a source whose weights cannot carry over to ``target``'s config, naming the way out."""
    old, new = (json.loads((folder / "config.json").read_text()) for folder in (source, target))
    differ = [key for key in _SAME if old.get(key) != new.get(key)]
    if differ:
        raise ValueError(
            f"{source} cannot seed this model: its {', '.join(differ)} differ from the new config; "
            "retrain from nothing (scripts/train_embedded.py --from-scratch)"
        )
    dropped = sorted(set(word_ids(source)) - set(word_ids(target)))
    if dropped:
        raise ValueError(f"the new tokenizer lost words {dropped[:5]}: retrain with --from-scratch")


def remap_rows(rows: torch.Tensor, old: dict[str, int], new: dict[str, int]) -> torch.Tensor:
    """``rows`` (vocab x d) with each old word's row moved to its new id and new words at the word-row mean."""
    out = rows.clone()
    mean = rows[sorted(old.values())].mean(dim=0)
    for word, index in new.items():
        out[index] = rows[old[word]] if word in old else mean
    return out


def seed_from(source: Path, skeleton: Path, folder: Path) -> Path:
    """A Hugging Face folder in ``folder``: ``skeleton``'s config and tokenizer with ``source``'s weights remapped.

    ``model.init_from`` of `dimoo train` takes it as the starting point.
    """
    from safetensors.torch import load_file

    source, skeleton, folder = Path(source), Path(skeleton), Path(folder)
    check_compatible(source, skeleton)
    old, new = word_ids(source), word_ids(skeleton)
    weights = load_file(str(source / WEIGHTS))
    for name in VOCAB_ROWS:
        weights[name] = remap_rows(weights[name], old, new)
    claim(folder, SEED_MARKER, fresh=True, what="seed folder")  # never deletes a folder it did not write
    shutil.copytree(skeleton, folder, dirs_exist_ok=True)
    atomic_save_file(weights, folder / WEIGHTS, metadata={"format": "pt"})
    return folder
