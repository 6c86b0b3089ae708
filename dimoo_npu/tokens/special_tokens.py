"""The special-token table: public DiMOO ids as defaults, overridable per checkpoint.

The public checkpoint's config.json holds only the mask and EOS ids (the public code hard-codes the
rest); our own small checkpoints carry a ``special_tokens`` object in config.json instead.
"""

from __future__ import annotations

from collections.abc import Mapping

DIMOO_SPECIAL_TOKENS: dict[str, int] = {
    "mask": 126336,
    "newline": 126084,  # end-of-line after each row of image codes
    "image_offset": 126356,  # id of image code 0
    "boa": 126354,  # begin of answer
    "eoa": 126355,  # end of answer
    "boi": 126349,  # begin of image
    "eoi": 126350,  # end of image
    "uncondition": 126351,
    "eos": 126081,
    "answer_pad": 126339,
    "codebook_size": 8192,
    "vocab": 134548,
}


def build_special_tokens(config_json: Mapping) -> dict[str, int]:
    """Defaults, then the checkpoint's mask/EOS ids and embedding size, then its ``special_tokens``."""
    table = dict(DIMOO_SPECIAL_TOKENS)
    if "mask_token_id" in config_json:
        table["mask"] = int(config_json["mask_token_id"])
    if "eos_token_id" in config_json:
        table["eos"] = int(config_json["eos_token_id"])
    size = config_json.get("embedding_size") or config_json.get("vocab_size")
    if size:
        table["vocab"] = int(size)
    table.update({key: int(value) for key, value in dict(config_json.get("special_tokens") or {}).items()})
    return table
