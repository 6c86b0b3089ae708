"""The shapes world: a synthetic, checkable domain for the embedded default model (issue 6)."""
