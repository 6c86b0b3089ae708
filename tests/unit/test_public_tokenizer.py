"""The public-layout test tokenizer: special tokens at the public ids, prompts as the public templates, and
prompt ids that tokenizer_config.json keys transformers 5 reacts to (auto_map, add_bos/eos_token) leave alone."""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from pathlib import Path

import pytest

from dimoo_npu.tokens import prompts
from dimoo_npu.tokens.special_tokens import DIMOO_SPECIAL_TOKENS
from dimoo_npu.tokens.text_tokenizer import load_text_tokenizer
from dimoo_npu.utils.errors import CheckpointError
from tests.public_checkpoint import PUBLIC_TOKENIZER, TOKENIZER_FILES

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "make_test_tokenizer.py"
TEXTS = [
    prompts.chat_text(prompts.SYSTEM_TEXTS["image_generation"], "a red cat on a mat"),
    prompts.uncond_text(prompts.SYSTEM_TEXTS["image_generation"]),
    prompts.chat_text(prompts.SYSTEM_TEXTS["understanding"], "what is in the picture ?"),
]


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("make_test_tokenizer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tokenizer():
    return load_text_tokenizer(PUBLIC_TOKENIZER)


def test_script_writes_the_committed_files(script, tmp_path):
    script.build(tmp_path)
    for name in TOKENIZER_FILES:
        rebuilt, committed = (tmp_path / name).read_bytes(), (PUBLIC_TOKENIZER / name).read_bytes()
        assert rebuilt == committed, f"{name} is stale: rerun python scripts/make_test_tokenizer.py"


def test_special_tokens_keep_the_public_ids(script, tokenizer):
    table = DIMOO_SPECIAL_TOKENS
    assert len(tokenizer) == table["vocab"] == 134548
    assert table["vocab"] - table["image_offset"] == table["codebook_size"]  # 8192 codes fill the end
    for text, key in script.SPECIALS.items():
        assert tokenizer.convert_tokens_to_ids(text) == table[key], text
        assert tokenizer(text)["input_ids"] == [table[key]], text
    assert (tokenizer.eos_token_id, tokenizer.mask_token_id) == (table["eos"], table["mask"])
    assert table["image_offset"] not in tokenizer.all_special_ids


def test_prompts_follow_the_public_template(tokenizer):
    """Tags are single tokens; the prompt starts with <system> and ends with </user> (images go before it)."""
    tags = {tag: tokenizer.convert_tokens_to_ids(tag) for tag in ("<system>", "</system>", "<user>", "</user>")}
    for tag, token_id in tags.items():
        assert tokenizer(tag)["input_ids"] == [token_id]
    for text in TEXTS:
        ids = tokenizer(text)["input_ids"]
        assert (ids[0], ids[-1]) == (tags["<system>"], tags["</user>"])  # nothing added around the prompt
        assert tokenizer.decode(ids) == text
    uncond = tokenizer(TEXTS[1])["input_ids"]
    assert uncond[-3:] == [tags["<user>"], DIMOO_SPECIAL_TOKENS["uncondition"], tags["</user>"]]


def variant(folder: Path, config: dict | None = None, post_processor: bool = True) -> Path:
    """The test tokenizer with keys added to tokenizer_config.json (and tokenizer.json's post-processor removed)."""
    shutil.copytree(PUBLIC_TOKENIZER, folder)
    path = folder / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **(config or {})}))
    if not post_processor:
        tokenizer_json = json.loads((folder / "tokenizer.json").read_text())
        (folder / "tokenizer.json").write_text(json.dumps({**tokenizer_json, "post_processor": None}))
    return folder


REMOTE = {"AutoTokenizer": ["tokenization_dimoo.DiMOOTokenizer", "tokenization_dimoo.DiMOOTokenizerFast"]}
VARIANTS = {
    "add_bos_token": ({"add_bos_token": True}, True),
    "add_eos_token": ({"add_eos_token": True}, True),
    "both true, no post-processor in tokenizer.json": ({"add_bos_token": True, "add_eos_token": True}, False),
    "both false": ({"add_bos_token": False, "add_eos_token": False}, True),
    "auto_map beside a transformers class": ({"auto_map": REMOTE}, True),
    "auto_map with its own class": ({"auto_map": REMOTE, "tokenizer_class": "DiMOOTokenizer"}, True),
    "auto_map, legacy list form": ({"auto_map": REMOTE["AutoTokenizer"], "tokenizer_class": "DiMOOTokenizer"}, True),
}


@pytest.mark.parametrize("case", sorted(VARIANTS))
def test_config_keys_do_not_change_prompt_ids(case, tokenizer, tmp_path, caplog):
    config, post_processor = VARIANTS[case]
    with caplog.at_level(logging.WARNING, logger="dimoo_npu.tokens.text_tokenizer"):
        changed = load_text_tokenizer(variant(tmp_path / "tok", config, post_processor))
    assert [changed(text)["input_ids"] for text in TEXTS] == [tokenizer(text)["input_ids"] for text in TEXTS]
    assert changed.decode(changed(TEXTS[0])["input_ids"]) == TEXTS[0]
    remote = "auto_map" in config
    assert ("remote tokenizer code (tokenization_dimoo.DiMOOTokenizer" in caplog.text) == remote, caplog.text
    assert ("never run" in caplog.text) == remote


def test_remote_tokenizer_without_tokenizer_json_is_refused(tmp_path):
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer_config.json").write_text(json.dumps({"auto_map": REMOTE, "tokenizer_class": "DiMOOTokenizer"}))
    with pytest.raises(CheckpointError, match="remote code .* never run: add the checkpoint's tokenizer.json"):
        load_text_tokenizer(folder)
