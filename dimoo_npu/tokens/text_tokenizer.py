"""The text tokenizer: the checkpoint's own through ``transformers.AutoTokenizer`` (never remote code).

`build_word_tokenizer` makes a small word-level tokenizer for checkpoints that ship none (the tiny test
fixture, our own small models): every word of the task templates plus the given words, ids that never
collide with the checkpoint's special-token ids, and ``<uncondition>`` / ``<answer>`` / ``</answer>``
mapped onto the special ids the model uses for them. It is saved in the layout AutoTokenizer loads.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from dimoo_npu.tokens.prompts import template_texts
from dimoo_npu.tokens.special_tokens import build_special_tokens
from dimoo_npu.utils.errors import CheckpointError, InputError

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
UNKNOWN = "<unk>"
# Text markers of the prompt templates that are single ordinary tokens in the word tokenizer.
TEMPLATE_MARKERS = ("<system>", "</system>", "<user>", "</user>")
# Text markers that must encode to the model's own special ids (key in the special-token table).
SPECIAL_MARKERS = {"<uncondition>": "uncondition", "<answer>": "boa", "</answer>": "eoa", "<|endoftext|>": "eos"}


def has_tokenizer(folder: str | os.PathLike) -> bool:
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def load_text_tokenizer(folder: str | os.PathLike):
    """AutoTokenizer from ``folder`` (no remote code), or CheckpointError saying what is missing.

    A tokenizer_config.json whose ``auto_map`` names remote tokenizer code (which the public scripts run with
    trust_remote_code) gets its tokenizer.json loaded as a plain fast tokenizer instead, with a warning: the
    code is never run, and tokenizer.json alone fixes the ids. ``add_bos_token``/``add_eos_token`` change
    nothing when tokenizer.json is present (transformers 5 drops them; its post-processor decides).
    """
    folder = Path(folder)
    if not has_tokenizer(folder):
        raise CheckpointError(
            f"{folder} has no text tokenizer (none of {', '.join(TOKENIZER_FILES)}): copy the tokenizer files of the "
            "checkpoint into it, or build a small word-level one with "
            "dimoo_npu.tokens.text_tokenizer.build_word_tokenizer"
        )
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    loader = AutoTokenizer
    remote = remote_tokenizer_code(folder)
    if remote:
        if not (folder / "tokenizer.json").is_file():
            raise CheckpointError(
                f"the text tokenizer in {folder} is remote code ({remote}), which is never run: add the checkpoint's "
                "tokenizer.json next to tokenizer_config.json"
            )
        logger.warning(
            "%s/tokenizer_config.json names remote tokenizer code (%s), which is never run: using its tokenizer.json "
            "as a plain fast tokenizer",
            folder,
            remote,
        )
        loader = PreTrainedTokenizerFast
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # it warns that config.json's model_type (llada) is not a transformers one
    try:
        return loader.from_pretrained(str(folder), trust_remote_code=False)
    except (OSError, ValueError, KeyError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"cannot load the text tokenizer in {folder} without remote code ({reason}): provide a tokenizer.json "
            "(fast tokenizer) next to tokenizer_config.json"
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)


_WARNED_UNKNOWN: set[str] = set()


def warn_unknown_words(tokenizer, text: str) -> None:
    """Words of ``text`` the tokenizer maps to its unknown token: one warning naming them (each word once a run).

    A small word-level tokenizer knows only its world's words; the model then sees ``<unk>``, not the word.
    """
    unknown = getattr(tokenizer, "unk_token_id", None)
    if unknown is None:
        return
    encoded = tokenizer(text, return_offsets_mapping=True)
    words = {
        text[a:b] for tid, (a, b) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True) if tid == unknown
    }
    new = sorted(words - _WARNED_UNKNOWN)
    if new:
        _WARNED_UNKNOWN.update(new)
        logger.warning(
            "the text tokenizer does not know %s: mapped to %s, so the model cannot read it (rephrase with "
            "words it was trained on)",
            ", ".join(repr(w) for w in new),
            tokenizer.unk_token,
        )


def remote_tokenizer_code(folder: Path) -> str | None:
    """The class tokenizer_config.json's ``auto_map`` names for AutoTokenizer (remote code), or None."""
    try:
        auto_map = json.loads((folder / "tokenizer_config.json").read_text()).get("auto_map")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None  # no readable config: AutoTokenizer reports what is wrong
    entry = auto_map.get("AutoTokenizer") if isinstance(auto_map, dict) else auto_map
    names = [entry] if isinstance(entry, str) else [name for name in entry or [] if isinstance(name, str)]
    return ", ".join(names) or None


def word_ids(words: Iterable[str], reserved: set[int], limit: int) -> dict[str, int]:
    """Ids 0, 1, 2... for ``<unk>`` and then each word, skipping reserved ids; all below ``limit``."""
    vocab: dict[str, int] = {}
    next_id = 0
    for word in [UNKNOWN, *TEMPLATE_MARKERS, *words]:
        if word in vocab:
            continue
        while next_id in reserved:
            next_id += 1
        vocab[word] = next_id
        next_id += 1
    if next_id > limit:
        raise InputError(f"{len(vocab)} words do not fit below id {limit} beside the special tokens: use fewer words")
    return vocab


def build_word_tokenizer(
    words: Iterable[str],
    folder: str | os.PathLike,
    special_tokens: Mapping[str, int] | None = None,
    max_length: int | None = None,
) -> Path:
    """Write a lower-casing word-level tokenizer into ``folder`` (tokenizer.json + tokenizer_config.json).

    ``special_tokens`` defaults to the table of ``folder/config.json`` (or DiMOO's); word ids stay below
    the smallest special id so they never collide with it or with image codes.
    """
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers

    folder = Path(folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    table = dict(special_tokens or build_special_tokens(config))
    reserved = {value for key, value in table.items() if key not in ("codebook_size", "vocab")}
    all_words = sorted({w.lower() for text in [*template_texts(), *words] for w in re.findall(r"\w+|[^\w\s]", text)})
    vocab = word_ids(all_words, reserved, limit=min(reserved))
    vocab.update({marker: table[key] for marker, key in SPECIAL_MARKERS.items()})

    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNKNOWN))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_tokens([AddedToken(marker, normalized=False) for marker in TEMPLATE_MARKERS])
    tokenizer.add_special_tokens([AddedToken(marker, special=True, normalized=False) for marker in SPECIAL_MARKERS])
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": UNKNOWN,
        "eos_token": "<|endoftext|>",
        "model_max_length": int(max_length or config.get("max_sequence_length") or 4096),
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    logger.info("wrote a %d-word tokenizer to %s", len(vocab), folder)
    return folder
