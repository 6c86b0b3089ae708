"""How long a sequence may be: the checkpoint's training length is advice, an explicit cap is the limit.

LLaDA's rotary embeddings have no hard length limit and the public code never checks one; Lumina-DiMOO was
trained at 5120 tokens although its config.json says ``max_sequence_length: 4096``, and its own default
(1024 x 1024 text-to-image) needs 4182. So a longer sequence runs with one warning naming both numbers, up
to a cap that bounds memory (``--max-length`` / ``DIMOO_MAX_LENGTH``, default 8192, never below the
checkpoint's own length) and is refused beyond it with the fix.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from dimoo_npu.utils import envs
from dimoo_npu.utils.errors import InputError
from dimoo_npu.utils.validate import MAX_LENGTH_LIMIT, check_int

logger = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 8192


def length_cap(trained_length: int, requested: int | None = None) -> int:
    """The longest sequence to run: ``requested``, else DIMOO_MAX_LENGTH, else max(8192, the trained length)."""
    if requested is None:
        requested = envs.max_length()
    if requested is None:
        return max(DEFAULT_MAX_LENGTH, trained_length)
    return check_int("max length", requested, 1, MAX_LENGTH_LIMIT, f" tokens, e.g. {DEFAULT_MAX_LENGTH}")


@dataclass
class LengthLimit:
    """A checkpoint's training length and the cap in force; `check` warns once beyond the first, refuses the second."""

    trained: int
    cap: int
    _warned: bool = field(default=False, repr=False)

    @classmethod
    def for_model(cls, trained_length: int, requested: int | None = None) -> LengthLimit:
        return cls(trained_length, length_cap(trained_length, requested))

    def check(self, longest: int, what: str) -> None:
        if longest > self.cap:
            raise InputError(
                f"{what} needs {longest} tokens, more than the cap of {self.cap}: shorten the prompt or use a "
                f"smaller image / answer length, or raise the cap with --max-length {longest} "
                f"(or DIMOO_MAX_LENGTH={longest}); memory grows with the length"
            )
        if longest > self.trained and not self._warned:
            self._warned = True
            logger.warning(
                "%s needs %d tokens, longer than the %d the checkpoint names as its max_sequence_length; running it "
                "anyway (rotary positions have no hard limit; the cap is %d)",
                what,
                longest,
                self.trained,
                self.cap,
            )
