"""The LoRA recipe on the bundled model, a couple of steps: shapes manifest -> pretokenize -> dimoo train ->
export-hf --merge-lora; sampling with --lora equals sampling the merged export, and bad adapters exit 2 with
nothing written."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dimoo_npu.cli import main
from dimoo_npu.files.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from dimoo_npu.files.outputs import read_png_text
from dimoo_npu.shapes.embedded import EMBEDDED_CHECKPOINT
from dimoo_npu.utils.errors import CheckpointError

pytest.importorskip("peft")
pytestmark = pytest.mark.skipif(
    not (EMBEDDED_CHECKPOINT / "model.safetensors").is_file(), reason="the embedded model is not installed"
)

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "train" / "shapes_lora_recolour.yaml"
T2I = ["t2i", "--prompt", "a large red circle in the top left", "--timesteps", "8", "--seed", "3"]


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory) -> Path:
    """Two steps of the recipe (a large rate, so the adapter visibly changes the pictures), then the merged export."""
    from dimoo_npu.shapes.dataset import DataMix, write_manifest

    tmp = tmp_path_factory.mktemp("lora_recipe")
    mix = DataMix(t2i=1, inpaint=1, outpaint=1, mmu=1, caption=1, edit=1, edit_weights=(("recolour", 3.0),), seed=5)
    manifest = write_manifest(tmp / "data", mix, progress=False)
    assert main(["pretokenize", str(manifest), str(tmp / "shards"), "--checkpoint", str(EMBEDDED_CHECKPOINT)]) == 0
    overrides = [
        f"output_dir={tmp / 'run'}",
        f"data.shards={tmp / 'shards'}",
        f"model.init_from={EMBEDDED_CHECKPOINT}",
        "train_iters=2",
        "micro_batch_size=4",
        "global_batch_size=4",
        "lr=0.05",
        "lr_warmup_iters=0",
        "peak_tflops=1",
    ]
    assert main(["train", str(RECIPE), *overrides]) == 0
    merged = tmp / "merged"
    assert main(["export-hf", str(tmp / "run" / "checkpoints"), str(merged), "--merge-lora", "--dtype", "float32"]) == 0
    return tmp


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_the_recipe_writes_a_peft_adapter_and_t2i_with_lora_equals_the_merged_export(recipe_run, tmp_path):
    adapter = recipe_run / "run" / "lora"
    assert {p.name for p in adapter.iterdir()} == {ADAPTER_CONFIG, ADAPTER_WEIGHTS}
    assert json.loads((adapter / ADAPTER_CONFIG).read_text())["r"] == 16
    outputs = {}
    for name, flags in {
        "lora": ["--lora", str(adapter)],
        "merged": ["--checkpoint", str(recipe_run / "merged")],
        "base": [],
    }.items():
        assert main([*T2I, *flags, "--out", str(tmp_path / f"{name}.png")]) == 0
        outputs[name] = pixels(tmp_path / f"{name}.png")
    assert np.array_equal(outputs["lora"], outputs["merged"])
    assert json.loads(read_png_text(tmp_path / "lora.png")["settings"])["lora"] == str(adapter), "the PNG names it"
    assert not np.array_equal(outputs["lora"], outputs["base"]), "the adapter changes the picture"


def test_understand_with_lora_answers_as_the_merged_export(recipe_run, tmp_path, capsys):
    image = next((recipe_run / "data" / "images").glob("*.png"))
    ask = ["understand", "--image", str(image), "--question", "describe the image"]
    capsys.readouterr()
    assert main([*ask, "--lora", str(recipe_run / "run" / "lora")]) == 0
    with_lora = capsys.readouterr().out
    assert main([*ask, "--checkpoint", str(recipe_run / "merged")]) == 0
    assert capsys.readouterr().out == with_lora


def broken_adapters(recipe_run: Path, tmp_path: Path) -> dict[str, Path]:
    """Adapter folders a user could pass by mistake: no config, and one whose target this model lacks."""
    import torch

    from dimoo_npu.files.lora import PEFT_PREFIX
    from dimoo_npu.files.safetensors_io import atomic_save_file

    no_config = shutil.copytree(recipe_run / "run" / "lora", tmp_path / "no-config")
    (no_config / ADAPTER_CONFIG).unlink()
    other = shutil.copytree(recipe_run / "run" / "lora", tmp_path / "other-model")
    module = f"{PEFT_PREFIX}model.transformer.blocks.9.q_proj"  # the bundled model has 6 blocks
    tensors = {f"{module}.lora_A.weight": torch.zeros(16, 256), f"{module}.lora_B.weight": torch.zeros(256, 16)}
    atomic_save_file(tensors, other / ADAPTER_WEIGHTS)
    return {"no adapter_config.json": no_config, "targets blocks.9.q_proj": other}


@pytest.mark.parametrize("problem", ["no adapter_config.json", "targets blocks.9.q_proj"])
def test_a_bad_adapter_exits_2_in_one_line_with_nothing_written(recipe_run, tmp_path, caplog, problem):
    adapter = broken_adapters(recipe_run, tmp_path)[problem]
    out = tmp_path / "out"
    assert main([*T2I, "--lora", str(adapter), "--out", str(out / "a.png")]) == 2
    assert not out.exists()
    message = caplog.records[-1].getMessage()
    assert "\n" not in message and ("pass the folder `dimoo train` wrote" in message or "blocks.9" in message)
    assert main(["eval", "shapes", "--lora", str(adapter), "--limit", "1", "--output", str(out / "r.json")]) == 2
    assert not out.exists()


def test_serve_refuses_a_mismatched_adapter_before_binding(recipe_run, tmp_path):
    from dimoo_npu.commands.serve import add_arguments, serve_config

    parser = argparse.ArgumentParser()
    add_arguments(parser, "serve")
    adapter = broken_adapters(recipe_run, tmp_path)["targets blocks.9.q_proj"]
    with pytest.raises(CheckpointError, match="targets model.transformer.blocks.9.q_proj"):
        serve_config(parser.parse_args(["--lora", str(adapter), "--device", "cpu"]))
    assert serve_config(parser.parse_args(["--lora", str(recipe_run / "run" / "lora"), "--device", "cpu"])).lora
