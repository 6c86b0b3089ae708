"""Make tests/fixtures/msmodelslim-w8a8 with msModelSlim itself: a W8A8-dynamic export of a small DiMOO model.

The model: the tiny fixture's trained blocks and norms, its embedding and head cut to their first
``VOCAB`` rows (`small_vocab_model`, which the tests rebuild the same way), so the export stays small.
msmodelslim 26.1.0 (PyPI) quantizes it on CPU with its Calibrator once the model exposes ``dtype``/``device``.

    pip install --no-deps msmodelslim==26.1.0 accelerate easydict einops pygtrie scipy wcmatch bracex
    python scripts/make_msmodelslim_fixture.py
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "tests" / "fixtures" / "tiny-dimoo" / "checkpoint"
OUT = ROOT / "tests" / "fixtures" / "msmodelslim-w8a8"
VOCAB = 512


def small_vocab_model(source: Path = SOURCE, vocab: int = VOCAB):
    """The tiny fixture with embedding and head cut to ``vocab`` rows (fp32, CPU)."""
    import dimoo_npu
    from dimoo_npu.model import DiMOOModel

    full = dimoo_npu.load_model(source)
    model = DiMOOModel(dataclasses.replace(full.config, embedding_size=vocab))
    state = {
        name: t[:vocab] if t.shape[0] == full.config.embedding_size else t for name, t in full.state_dict().items()
    }
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)


def main() -> int:
    from msmodelslim.pytorch.llm_ptq.llm_ptq_tools import Calibrator, QuantConfig

    from dimoo_npu.checkpoint import save_pretrained

    model = small_vocab_model()
    model.dtype, model.device = torch.float32, torch.device("cpu")  # what the Calibrator reads off a model
    calibration = [[torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))]]
    config = QuantConfig(
        w_bit=8, a_bit=8, disable_names=[], dev_type="cpu", act_method=1, is_dynamic=True, mm_tensor=False
    )
    with tempfile.TemporaryDirectory() as scratch, contextlib.chdir(scratch):  # it drops a features.npy in cwd
        calibrator = Calibrator(model, config, calib_data=calibration, disable_level="L0")
        calibrator.run()
        calibrator.save(scratch, save_type=["safe_tensor"])
        save_pretrained(model.state_dict(), model.config, Path(scratch) / "float")  # only for its config.json
        if OUT.exists():
            shutil.rmtree(OUT)
        OUT.mkdir(parents=True)
        for path in Path(scratch).glob("quant_model_*"):
            shutil.copy(path, OUT / path.name)
        shutil.copy(Path(scratch) / "float" / "config.json", OUT / "config.json")
    print(f"wrote {OUT}: {sorted(p.name for p in OUT.iterdir())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
