"""Write the public-layout test tokenizer (tests/fixtures/public-tokenizer): a byte-level BPE, HF file layout.

    python scripts/make_test_tokenizer.py [--output tests/fixtures/public-tokenizer]

The real Lumina-DiMOO tokenizer cannot be downloaded here. This one has its shape: 134548 entries, the
special tokens at the public ids (eos 126081, end-of-line 126084, mask 126336, answer pad 126339, boi/eoi
126349/126350, uncondition 126351, boa/eoa 126354/126355, 8192 image codes from 126356), the prompt tags
(<system>, </system>, <user>, </user>) as single added tokens, and tokenizer.json + tokenizer_config.json +
special_tokens_map.json as AutoTokenizer reads them. `tokenizers` renumbers an added token that is not in
the model's vocabulary to the end of it, so every special token is also a vocabulary entry at its id and
the rest of the 134548 entries are short unique strings no merge produces. The merges come from a small
BPE trained on the prompt templates. Token strings the public code does not show are stand-ins (README.md
of the output folder); no test may depend on the ids of the prompt tags, which are not public.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import string
from collections.abc import Iterator
from pathlib import Path

from dimoo_npu.tokens.prompts import template_texts
from dimoo_npu.tokens.special_tokens import DIMOO_SPECIAL_TOKENS

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO / "tests" / "fixtures" / "public-tokenizer"
logger = logging.getLogger("make_test_tokenizer")

BOS = ("<|startoftext|>", 126080)  # LLaDA's begin-of-text; never added to prompts (see tokenizer_config.json)
# Special-token strings -> key of DIMOO_SPECIAL_TOKENS (their ids).
SPECIALS = {
    "<|endoftext|>": "eos",
    "<|newline|>": "newline",
    "<|mdm_mask|>": "mask",
    "<|answer_pad|>": "answer_pad",
    "<image>": "boi",
    "</image>": "eoi",
    "<uncondition>": "uncondition",
    "<answer>": "boa",
    "</answer>": "eoa",
}
# Prompt tags: single added (not special) tokens; stand-in ids, the public ones are not known.
TAGS = {"<system>": 126340, "</system>": 126341, "<user>": 126342, "</user>": 126343}
EXTRA_WORDS = ["a red cat on a mat", "what is in the picture ?", "a photo of a dog in the snow"]
MERGE_VOCAB = 640  # size of the trained BPE (byte alphabet + merges) at the start of the vocabulary
# Characters of the padding entries: printable ASCII that JSON writes unescaped (byte-level decodes them as is).
PAD_CHARS = "".join(c for c in string.printable[:94] if c not in '"\\')


def special_ids() -> dict[str, int]:
    """Every special or tag string -> its id."""
    table = {text: DIMOO_SPECIAL_TOKENS[key] for text, key in SPECIALS.items()}
    return {BOS[0]: BOS[1], **table, **TAGS}


def padding_names(taken: set[str]) -> Iterator[str]:
    """Short unique strings (2, then 3 characters) that are not in ``taken``."""
    for size in itertools.count(2):
        for chars in itertools.product(PAD_CHARS, repeat=size):
            name = "".join(chars)
            if name not in taken:
                yield name


def trained_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of a small byte-level BPE trained on the prompt templates."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=MERGE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator([*template_texts(), *EXTRA_WORDS], trainer)
    model = json.loads(tokenizer.to_str())["model"]
    return model["vocab"], [tuple(pair) for pair in model["merges"]]


def build(output: Path) -> Path:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json into ``output``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab, merges = trained_bpe()
    by_id = {token_id: text for text, token_id in special_ids().items()}
    size = DIMOO_SPECIAL_TOKENS["vocab"]
    assert min(by_id) >= len(vocab) and max(by_id) < size, "special ids must lie between the merges and the end"
    names = padding_names(set(vocab) | set(by_id.values()))
    for token_id in range(len(vocab), size):
        vocab[by_id.get(token_id) or next(names)] = token_id

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = [BOS[0], *SPECIALS]
    tokenizer.add_special_tokens([AddedToken(text, special=True, normalized=False) for text in specials])
    tokenizer.add_tokens([AddedToken(text, special=False, normalized=False) for text in TAGS])
    for text, token_id in special_ids().items():
        assert tokenizer.token_to_id(text) == token_id, f"{text} got id {tokenizer.token_to_id(text)}, not {token_id}"
    assert tokenizer.get_vocab_size(with_added_tokens=True) == size

    output.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(output / "tokenizer.json"), pretty=False)
    named = {
        "bos_token": BOS[0],
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "mask_token": "<|mdm_mask|>",
    }
    decoder = {
        str(token_id): {
            "content": text,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": text not in TAGS,
        }
        for text, token_id in sorted(special_ids().items(), key=lambda item: item[1])
    }
    config = {
        "added_tokens_decoder": decoder,
        **named,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 8192,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (output / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (output / "special_tokens_map.json").write_text(json.dumps(named, indent=2) + "\n")
    logger.info("wrote a %d-entry byte-level BPE (%d merges) to %s", size, len(merges), output)
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT), help="folder to write the three files into")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    build(Path(args.output))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
