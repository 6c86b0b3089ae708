"""Tokens, prompts and sequences: the special-token table, the text and image tokenizers, image preparation, prompt
texts, sequence layouts and length caps."""
