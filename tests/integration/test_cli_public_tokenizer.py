"""Every CLI task on a checkpoint laid out like the public one: the tiny-dimoo weights with the real-vocabulary,
public-layout text tokenizer (random weights: outputs are noise; exit codes, files and ids are checked)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from dimoo_npu.cli import main
from dimoo_npu.tokens import prompts
from dimoo_npu.tokens.special_tokens import DIMOO_SPECIAL_TOKENS
from tests.public_checkpoint import assemble_public_checkpoint

FAST = ["--device", "cpu", "--timesteps", "2"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return assemble_public_checkpoint(tmp_path_factory.mktemp("public") / "Lumina-DiMOO")


@pytest.fixture(scope="module")
def source(fixture_dir):
    return str(fixture_dir / "image_96x64.png")


IMAGE_TASKS = {
    "t2i": (["--prompt", "a red cat on a mat", "--width", "32", "--height", "48"], (32, 48)),
    "edit": (["--image", "{source}", "--prompt", "a red cat", "--image-budget", "64"], (64, 32)),
    "inpaint": (["--image", "{source}", "--prompt", "a red cat"], (96, 64)),
    "outpaint": (["--image", "{source}", "--prompt", "a red cat"], (96, 64)),
}


@pytest.mark.parametrize("task", sorted(IMAGE_TASKS))
def test_image_task(task, checkpoint, source, tmp_path):
    argv, size = IMAGE_TASKS[task]
    output = tmp_path / f"{task}.png"
    args = [arg.format(source=source) for arg in argv]
    assert main([task, *FAST, "--checkpoint", str(checkpoint), *args, "--output", str(output)]) == 0
    assert Image.open(output).size == size


def test_understand(checkpoint, source, tmp_path, capsys):
    answers = tmp_path / "answers.jsonl"
    args = ["--device", "cpu", "--gen-length", "8", "--block-length", "4", "--steps", "2", "--image-budget", "64"]
    argv = ["understand", *args, "--checkpoint", str(checkpoint), "--image", source, "--question", "what is it ?"]
    code = main([*argv, "--output", str(answers)])
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["index"] == 0 and isinstance(rows[0]["answer"], str)
    answer = rows[0]["answer"]  # a random model's answer may decode to nothing: then an error and exit 1
    assert code == (0 if answer else 1) and ("error" in rows[0]) == (not answer)
    capsys.readouterr()
    assert (main(argv), capsys.readouterr().out) == ((0, answer + "\n") if answer else (1, ""))


def test_prompt_ids_on_the_real_vocabulary(checkpoint, source):
    """Text ids from the tokenizer, then the public ids: BOA BOI rows EOI EOA; images before </user>."""
    from dimoo_npu.pipeline import DiMOOPipeline
    from dimoo_npu.tasks import text_to_image, understand

    pipeline = DiMOOPipeline.from_pretrained(checkpoint, lazy=True)
    tokens = DIMOO_SPECIAL_TOKENS
    text = pipeline.encode_text(prompts.chat_text(prompts.SYSTEM_TEXTS["image_generation"], "a red cat")).tolist()
    request = text_to_image.prepare(pipeline.encoder, "a red cat", 32, 16)
    ids = request.prompt.tolist()
    row = [tokens["mask"], tokens["mask"], tokens["newline"]]
    assert ids == [*text, tokens["boa"], tokens["boi"], *row, tokens["eoi"], tokens["eoa"]]
    assert request.uncond.tolist()[-2] == tokens["uncondition"]
    question = prompts.chat_text(prompts.SYSTEM_TEXTS["understanding"], "what is it ?")
    text = pipeline.encode_text(question).tolist()
    ids = understand.prepare(pipeline.encoder, Image.open(source), "what is it ?", 4, image_budget=64).tolist()
    end_user = pipeline.text_tokenizer.convert_tokens_to_ids("</user>")
    assert ids[: len(text) - 1] == text[:-1] and ids[len(text) - 1] == tokens["boi"]
    assert ids[-8:] == [tokens["eoi"], end_user, tokens["boa"], *[tokens["mask"]] * 4, tokens["eoa"]]
