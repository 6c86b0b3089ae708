"""Seeding a retrain from the shipped model when the word list grew: the same text gives the same logits."""

from __future__ import annotations

import json

import pytest
import torch

from dimoo_npu.shapes import embedded, warm_start, world

NEW_WORDS = ("add", "describe", "remove")  # in the grown list, alphabetically among the old words


def _checkpoint(folder, words, d_model=32):
    """A tiny random transformer with a word tokenizer over ``words`` (no VQ: the seed never reads it)."""
    from dimoo_npu.checkpoint import save_pretrained
    from dimoo_npu.model import DiMOOModel
    from dimoo_npu.modeling.config import DiMOOConfig
    from dimoo_npu.tokens.text_tokenizer import build_word_tokenizer

    raw = embedded.model_config(16, d_model=d_model, n_layers=1, n_heads=2, mlp_hidden_size=64)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(raw))
    build_word_tokenizer(words, folder, special_tokens=raw["special_tokens"], max_length=raw["max_sequence_length"])
    config = DiMOOConfig.from_dict(raw)
    save_pretrained(DiMOOModel(config).state_dict(), config, folder)
    return folder


@pytest.fixture()
def old_and_new(tmp_path):
    torch.manual_seed(0)
    words = world.vocabulary_words()
    assert set(NEW_WORDS) <= set(words)
    old = _checkpoint(tmp_path / "old", [w for w in words if w not in NEW_WORDS])
    new = _checkpoint(tmp_path / "new", words)
    return old, new


def _logits(folder, text):
    from dimoo_npu.checkpoint import load_model
    from dimoo_npu.tokens.text_tokenizer import load_text_tokenizer

    ids = load_text_tokenizer(folder)(text).input_ids
    return load_model(folder)(torch.tensor([ids]))[0], ids


def test_old_words_keep_their_rows_and_new_words_start_at_the_mean(old_and_new, tmp_path):
    old, new = old_and_new
    seed = warm_start.seed_from(old, new, tmp_path / "seed")
    text = "<user> what colour is the large circle in the top left </user>"
    before, old_ids = _logits(old, text)
    after, new_ids = _logits(seed, text)
    assert old_ids != new_ids, "the grown list must move some old word, or this test shows nothing"
    old_vocab, new_vocab = warm_start.word_ids(old), warm_start.word_ids(new)
    moved = [old_vocab[w] for w in old_vocab], [new_vocab[w] for w in old_vocab]
    torch.testing.assert_close(after[:, moved[1]], before[:, moved[0]], rtol=0, atol=1e-6)
    specials = slice(embedded.FIRST_SPECIAL, None)
    torch.testing.assert_close(after[:, specials], before[:, specials], rtol=0, atol=1e-6)

    from safetensors.torch import load_file

    rows = load_file(str(seed / warm_start.WEIGHTS))["model.transformer.wte.weight"]
    learnt = load_file(str(old / warm_start.WEIGHTS))["model.transformer.wte.weight"][sorted(old_vocab.values())]
    for word in NEW_WORDS:
        torch.testing.assert_close(rows[new_vocab[word]], learnt.mean(dim=0))
    assert json.loads((seed / "config.json").read_text()) == json.loads((new / "config.json").read_text())


def test_a_source_that_cannot_seed_is_refused_with_the_way_out(old_and_new, tmp_path):
    old, new = old_and_new
    wider = _checkpoint(tmp_path / "wider", world.vocabulary_words(), d_model=64)
    with pytest.raises(ValueError, match=r"d_model.*--from-scratch"):
        warm_start.seed_from(wider, new, tmp_path / "seed")
    with pytest.raises(ValueError, match=r"lost words \['add'.*--from-scratch"):
        warm_start.seed_from(new, old, tmp_path / "seed")


def test_a_seed_folder_it_did_not_make_is_left_untouched(old_and_new, tmp_path):
    """Issue 24: seed_from used to delete whatever folder it was given before filling it."""
    from dimoo_npu.utils.errors import InputError

    old, new = old_and_new
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep")
    with pytest.raises(InputError, match="did not make"):
        warm_start.seed_from(old, new, theirs)
    assert (theirs / "notes.txt").read_text() == "keep"
    seed = warm_start.seed_from(old, new, tmp_path / "seed")
    assert warm_start.seed_from(old, new, seed) == seed, "a rerun replaces the folder it made"
