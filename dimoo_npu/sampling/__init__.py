"""Token-level samplers: image (MaskGIT-style, CFG, ML-Cache) and understanding (LLaDA block-wise), batched.

Stable API: `sample_image` and `sample_text` (golden checks outside the test suite call them).
"""

from __future__ import annotations

from dimoo_npu.sampling.cache import MLCache
from dimoo_npu.sampling.image import sample_image
from dimoo_npu.sampling.schedule import cosine_keep_masked, refresh_steps, transfer_tokens
from dimoo_npu.sampling.text import sample_text

__all__ = ["MLCache", "cosine_keep_masked", "refresh_steps", "sample_image", "sample_text", "transfer_tokens"]
