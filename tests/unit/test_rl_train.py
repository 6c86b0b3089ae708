"""Self-GRPO through the trainer on a tiny model with the bundled model's tokenizer and VQ: the metrics, exact
resume, a failing reward stopping the run with its last checkpoint intact, and refusals before any rollout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dimoo_npu.rl.reward import RewardError, RewardItem, checked_rewards
from dimoo_npu.rl.trainer import GRPOTrainer, check_rl_layout, run_grpo, step_items
from dimoo_npu.train.checkpoint import LATEST
from dimoo_npu.train.config import load_config
from dimoo_npu.utils.errors import ConfigError
from tests.unit import rl_rewards
from tests.unit.rl_support import CONFIG, tiny_grpo_config

REPO = Path(__file__).resolve().parents[2]
STEPS = 3
METRICS = {"reward_mean", "reward_std", "kl", "clip_fraction", "entropy", "rollout_s", "update_s", "loss", "lr"}


def _records(tmp: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, list[float]]:
    """An uninterrupted run with an external reward (rewards differ within groups, so the policy moves)."""
    tmp = tmp_path_factory.mktemp("grpo")
    return tmp, run_grpo(tiny_grpo_config(tmp, "rl.reward_function=tests.unit.rl_rewards:redness", "plot=true"))


def test_metrics_of_every_step(reference):
    tmp, losses = reference
    records = _records(tmp)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in records] == losses
    for record in records:
        assert METRICS <= set(record)
        assert 0 <= record["reward_mean"] <= 1 and record["reward_std"] > 0
        assert record["rollout_s"] > 0 and record["update_s"] > 0 and record["grad_norm"] > 0
    assert records[0]["kl"] == 0, "the policy starts at the reference"
    assert records[-1]["kl"] > 0, "and moves away from it"
    assert (tmp / "run" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "overrides",
    [
        ("rl.likelihood=trajectory",),
        ("rl.cfg_scale=2.0",),
        ("rl.num_iterations=2", "lr=0.05"),
        ("bf16=true",),
        ("rl.understanding=true", "rl.likelihood=trajectory"),
        ("rl.understanding=true",),
    ],
)
def test_one_step_of_each_option(tmp_path, overrides):
    reward = "rl.reward_function=tests.unit.rl_rewards:redness"
    run_grpo(tiny_grpo_config(tmp_path, reward, "train_iters=1", *overrides))
    (record,) = _records(tmp_path)
    assert record["grad_norm"] > 0 and record["entropy"] > 0
    if "rl.num_iterations=2" in overrides:  # the second update's ratio moved off 1 and past the clip range
        assert record["clip_fraction"] > 0
    assert ("answer_reward_mean" in record) == ("rl.understanding=true" in overrides)


KILLED_IN_STEP_3 = """
import os, signal, sys
from pathlib import Path
from dimoo_npu.rl import trainer
from tests.unit.rl_support import tiny_grpo_config

rewards = trainer.GRPOTrainer._rewards
def killed_in_step_3(self, rollout, items):
    if self.step == 2:  # steps 1 and 2 are checkpointed; step 3 is sampled and being scored
        os.kill(os.getpid(), signal.SIGKILL)
    return rewards(self, rollout, items)
trainer.GRPOTrainer._rewards = killed_in_step_3
trainer.run_grpo(tiny_grpo_config(Path(sys.argv[1]), "rl.reward_function=tests.unit.rl_rewards:redness",
                                  "save_interval=1"))
"""


def test_killed_mid_run_and_relaunched_gives_the_same_rewards_and_losses(reference, tmp_path):
    ref_tmp, expected = reference
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))  # as this process: sums in the same order
    result = subprocess.run([sys.executable, "-c", KILLED_IN_STEP_3, str(tmp_path)], cwd=REPO, capture_output=True,
                            text=True, timeout=240, env=env)  # fmt: skip
    assert result.returncode == -9, result.stderr[-2000:]
    reward = "rl.reward_function=tests.unit.rl_rewards:redness"
    assert run_grpo(tiny_grpo_config(tmp_path, reward, "save_interval=1")) == expected[2:]
    assert _records(tmp_path) == [
        {**record, **{k: r[k] for k in ("rollout_s", "update_s", "step_time_s", "tokens_per_s")}}
        for record, r in zip(_records(ref_tmp), _records(tmp_path), strict=True)
    ], "every metric but the timings repeats"


def _scored_rows(monkeypatch) -> list[int]:
    """Rows of every likelihood the update scores (the policy's, and the reference's with beta > 0)."""
    rows: list[int] = []
    scores = GRPOTrainer._scores

    def counted(self, model, part, lo, hi):
        rows.append(hi - lo)
        return scores(self, model, part, lo, hi)

    monkeypatch.setattr(GRPOTrainer, "_scores", counted)
    return rows


def _trained(config) -> tuple[list[float], dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """The run's losses, its final weights and its frozen reference's (the starting weights; None with beta 0)."""
    trainer = GRPOTrainer(config)
    try:
        losses = trainer.train()
        weights = [{n: v.detach().clone() for n, v in m.state_dict().items()} if m is not None else None
                   for m in (trainer.model, trainer.reference)]  # fmt: skip
        return losses, *weights
    finally:
        trainer.close()


def test_groups_that_all_scored_alike_are_left_out_of_the_update_at_no_cost_to_it(tmp_path, monkeypatch):
    rows = _scored_rows(monkeypatch)
    reward = "rl.reward_function=tests.unit.rl_rewards:first_prompt_constant"  # 1 of each step's 2 groups: no signal
    runs = {}
    for skip in (False, True):
        rows.clear()
        config = tiny_grpo_config(tmp_path / str(skip), reward, "rl.beta=0", f"rl.skip_uniform_groups={skip}",
                                  "train_iters=2")  # fmt: skip
        losses, weights, _ = _trained(config)
        runs[skip] = (losses, weights, sum(rows), _records(tmp_path / str(skip)))
    (losses, weights, every, records), (skipped_losses, skipped_weights, fewer, skipped_records) = runs.values()
    assert [r["uniform_groups"] for r in records + skipped_records] == [0.5] * 4
    assert all(r["grad_norm"] > 0 for r in skipped_records), "the other group still moved the policy"
    assert fewer * 2 == every == 2 * 4, "half the completions went through the update"
    assert skipped_losses == pytest.approx(losses, abs=1e-7)
    for name, value in weights.items():
        torch.testing.assert_close(skipped_weights[name], value, msg=name)


def test_a_step_with_no_signal_and_the_skip_on_leaves_the_weights_alone(tmp_path, monkeypatch):
    rows = _scored_rows(monkeypatch)
    reward = "rl.reward_function=tests.unit.rl_rewards:constant"
    _, after, start = _trained(tiny_grpo_config(tmp_path, reward, "rl.skip_uniform_groups=true", "train_iters=1"))
    (record,) = _records(tmp_path)
    assert rows == [] and record["uniform_groups"] == 1.0 and record["grad_norm"] == 0
    for name, value in start.items():
        assert torch.equal(after[name], value), name


@pytest.mark.parametrize("answers", ["policy", "reference"])
def test_self_reward_asks_the_chosen_model_about_each_image(tmp_path, monkeypatch, answers):
    from dimoo_npu.rl import trainer as grpo_trainer

    asked: list[str] = []
    answer = GRPOTrainer._answer

    def spy(self, model, images, questions):
        asked.extend(questions)
        assert model is (self.model if answers == "policy" else self.reference)
        assert all(image.size == (128, 128) for image in images)
        return answer(self, model, images, questions)

    monkeypatch.setattr(grpo_trainer.GRPOTrainer, "_answer", spy)
    overrides = ["train_iters=1", "rl.attributes=[colour, size]", "rl.beta=0", f"rl.reward_model={answers}"]
    run_grpo(tiny_grpo_config(tmp_path, *overrides))
    (record,) = _records(tmp_path)
    assert len(asked) == 4 * 2, "two questions about each of the 4 images"
    assert 0 <= record["reward_mean"] <= 1 and record["kl"] == 0


def test_prompts_follow_a_seeded_order_per_pass():
    items = {"t2i": [RewardItem(str(i), ()) for i in range(5)]}
    drawn = [item.prompt for step in range(5) for item in step_items(["t2i"], items, 2 * step, 2, seed=3)]
    assert sorted(drawn[:5]) == sorted(drawn[5:]) == [str(i) for i in range(5)], "each pass shows every prompt once"
    assert drawn[:5] != drawn[5:], "in a new order"
    assert step_items(["t2i"], items, 8, 2, seed=3) == step_items(["t2i"], items, 8, 2, seed=3)


def test_groups_take_the_tasks_in_turn_and_each_task_walks_its_own_items():
    items = {"a": [RewardItem(f"a{i}", (), task="a") for i in range(3)], "b": [RewardItem("b0", (), task="b")]}
    drawn = step_items(["a", "a", "b"], items, 0, 9, seed=1)
    assert [item.task for item in drawn] == ["a", "a", "b"] * 3, "a task listed twice gets twice the groups"
    assert sorted(item.prompt for item in drawn[:2] + drawn[3:4]) == ["a0", "a1", "a2"], "a pass over a's items"
    assert step_items(["a", "a", "b"], items, 4, 3, seed=1) == drawn[4:7], "a group's item depends on its index only"


@pytest.mark.parametrize("function", ["raises", "not_a_number", "too_large"])
def test_bad_reward_is_named_and_refused(function):
    images = [object(), object()]
    with pytest.raises(RewardError, match=f"reward function {function}"):
        checked_rewards(function, getattr(rl_rewards, function), images, ["a", "b"])


def test_bad_reward_stops_the_run_and_keeps_the_last_checkpoint(tmp_path):
    good = "rl.reward_function=tests.unit.rl_rewards:redness"
    run_grpo(tiny_grpo_config(tmp_path, good, "train_iters=1"))
    checkpoints = tmp_path / "run" / "checkpoints"
    before = {p: p.read_bytes() for p in checkpoints.rglob("*") if p.is_file()}
    with pytest.raises(RewardError, match="tests.unit.rl_rewards:raises raised RuntimeError: the scorer is down"):
        run_grpo(tiny_grpo_config(tmp_path, "rl.reward_function=tests.unit.rl_rewards:raises"))
    assert {p: p.read_bytes() for p in checkpoints.rglob("*") if p.is_file()} == before
    assert (checkpoints / LATEST).read_text().strip() == "step-00000001"
    run_grpo(tiny_grpo_config(tmp_path, good, "train_iters=2"))  # the lock was released; the run goes on


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["rl.num_generations=1"], "at least 2 completions"),
        (["rl.attributes=[colour, texture]"], "'texture'"),
        (["rl.attributes=[]"], "rl.attributes is empty"),
        (["rl.temperature=0"], "every advantage 0"),
        (["global_batch_size=3", "micro_batch_size=1"], "multiple of rl.num_generations"),
        (["rl.reward_function=tests.unit.rl_rewards:missing"], "has no function missing"),
        (["rl.answer_kv_cache=full"], "rl.answer_kv_cache.*'full' is not a cache mode"),
        (["rl.answer_parallel_threshold=1.5"], "parallel_threshold=1.5 must be within"),
    ],
)
def test_refused_before_any_rollout(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        GRPOTrainer(tiny_grpo_config(tmp_path, *overrides))
    assert not (tmp_path / "run").exists(), "nothing was started"


def test_understanding_rollouts_are_rewarded_by_answer_correctness(tmp_path, monkeypatch):
    """Every completion slot also gets a sampled answer about its prompt's true picture; an answer earns 1 when it is
    the expected one (here every answer decodes to 'circle', so the circles' groups earn 1 and the others 0)."""
    from dimoo_npu.rl import trainer as grpo_trainer
    from dimoo_npu.rl.reward import shapes_spec

    pictures = []
    prepare = grpo_trainer.understand.prepare

    def remember(encoder, image, question, *args):
        pictures.append(image.size)
        return prepare(encoder, image, question, *args)

    def circle(*_):
        answers.append("circle")
        return "circle"

    answers = []
    monkeypatch.setattr(grpo_trainer.understand, "prepare", remember)
    monkeypatch.setattr(grpo_trainer.understand, "decode_answer", circle)
    reward = "rl.reward_function=tests.unit.rl_rewards:redness"
    config = tiny_grpo_config(tmp_path, reward, "train_iters=1", "rl.understanding=true", "rl.attributes=[shape]")
    run_grpo(config)
    (record,) = _records(tmp_path)
    assert pictures == [(128, 128)] * 2, "one question per prompt, asked of its true picture"
    assert len(answers) == 4, "one answer per completion slot: 2 prompts x 2 generations"
    items = step_items(["t2i"], {"t2i": shapes_spec(["shape"], config.gpt_args.seed)}, 0, 2, config.gpt_args.seed)
    assert record["answer_reward_mean"] == sum(item.scene.objects[0].shape == "circle" for item in items) / 2


def test_empty_jsonl_spec_is_refused(tmp_path):
    spec = tmp_path / "spec.jsonl"
    spec.write_text("\n")
    with pytest.raises(ConfigError, match="holds no prompt"):
        GRPOTrainer(tiny_grpo_config(tmp_path, f"rl.prompts={spec}", "rl.attributes=null"))
    spec.write_text(json.dumps({"prompt": "a red circle", "questions": []}) + "\n")
    with pytest.raises(ConfigError, match="line 1 has no questions"):
        GRPOTrainer(tiny_grpo_config(tmp_path, f"rl.prompts={spec}", "rl.attributes=null"))
    spec.write_text(json.dumps({"prompt": "a red circle", "questions": [{"question": "q", "answer": "a"}]}) + "\n")
    with pytest.raises(ConfigError, match="rl.understanding needs pictures"):
        GRPOTrainer(tiny_grpo_config(tmp_path, f"rl.prompts={spec}", "rl.attributes=null", "rl.understanding=true"))


def test_jsonl_spec_drives_the_self_reward(tmp_path):
    spec = tmp_path / "spec.jsonl"
    question = {"question": "what shape is it?", "answer": "circle"}
    line = {"prompt": "a small red circle in the center", "questions": [question]}
    spec.write_text(json.dumps(line) + "\n")
    run_grpo(tiny_grpo_config(tmp_path, f"rl.prompts={spec}", "rl.attributes=null", "train_iters=1", "rl.beta=0"))
    assert _records(tmp_path)[0]["reward_mean"] in (0.0, 0.25, 0.5, 0.75, 1.0)


def test_layouts_other_than_data_parallel_fsdp_are_refused():
    config = load_config(CONFIG, ["global_batch_size=8", "rl.num_generations=2", "rl.answer_parallel_threshold=null",
                                  "rl.tasks=[edit-recolour, caption, edit-move, caption]"])  # 4 groups  # fmt: skip
    check_rl_layout(config, world_size=2)  # each rank: a picture group and a caption group
    with pytest.raises(ConfigError, match=r"different mixes at step 1 \(caption groups per rank: \[0, 1, 0, 1\]"):
        check_rl_layout(config, world_size=4)
    with pytest.raises(ConfigError, match="do not split over 8"):
        check_rl_layout(config, world_size=8)
    config.gpt_args.use_distributed_optimizer = False
    with pytest.raises(ConfigError, match="needs FSDP2"):
        check_rl_layout(config, world_size=2)
    config.gpt_args.tensor_model_parallel_size = 2
    with pytest.raises(ConfigError, match="tp 2"):
        check_rl_layout(config, world_size=2)


@pytest.mark.parametrize(
    ("tasks", "groups", "world_size", "refused_at"),
    [
        ("[t2i, caption]", 4, 2, None),  # each rank: t2i then caption
        ("[t2i, caption]", 2, 2, 1),
        ("[caption, t2i, t2i, caption]", 4, 2, None),
        ("[t2i, caption, caption, t2i, t2i, t2i]", 4, 2, 2),  # groups 4-7 of the run: t2i t2i | t2i caption
        ("[edit-recolour, edit-move, edit-add]", 3, 3, None),  # pictures everywhere
    ],
)
def test_data_parallel_ranks_must_roll_out_the_same_mix_every_step(tasks, groups, world_size, refused_at):
    config = load_config(CONFIG, [f"global_batch_size={2 * groups}", "rl.num_generations=2", f"rl.tasks={tasks}",
                                  "rl.answer_parallel_threshold=null"])  # fmt: skip
    if refused_at is None:
        check_rl_layout(config, world_size)
    else:
        with pytest.raises(ConfigError, match=f"different mixes at step {refused_at} "):
            check_rl_layout(config, world_size)
    check_rl_layout(config, world_size=1)


def test_a_judge_with_threshold_decoding_is_refused_under_data_parallel():
    config = load_config(CONFIG, ["global_batch_size=16", "rl.num_generations=8", "rl.tasks=[t2i]"])
    assert config.rl.answer_parallel_threshold == 0.95, "the shipped config's: it runs on one process"
    check_rl_layout(config, world_size=1)
    with pytest.raises(ConfigError, match="answer_parallel_threshold=null under torchrun"):
        check_rl_layout(config, world_size=2)


def test_dimoo_train_runs_the_rl_section(tmp_path, capsys, caplog):
    from dimoo_npu.cli import main

    config = tiny_grpo_config(tmp_path, "train_iters=1", "rl.reward_function=tests.unit.rl_rewards:redness")
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    assert main(["train", str(path)]) == 0
    assert "trained 1 step(s)" in capsys.readouterr().out
    assert "reward_mean" in _records(tmp_path)[0]
    assert main(["train", str(path), "rl.num_generations=1"]) == 2
    assert "num_generations is 1" in caplog.text


@pytest.mark.slow  # about 6 minutes a step on 2 shared CPU cores: 32 answers of 24 steps from the 5M-parameter model
def test_bundled_model_self_grpo_step(tmp_path):
    run_grpo(load_config(CONFIG, [f"output_dir={tmp_path / 'run'}", "train_iters=1", "plot=false"]))
    (record,) = _records(tmp_path)
    assert record["reward_mean"] >= 0.5, "the shipped model draws what it is asked and says what it drew"


def test_edit_and_caption_tasks_take_their_turns_and_the_heldout_slice_is_scored(tmp_path, monkeypatch):
    """Groups alternate an augmented recolour edit (its source picture inside the prompt, rewarded by the policy's
    caption of the result) and a caption of a true picture; the held-out slice is scored at the last step."""
    from dimoo_npu.rl import trainer as grpo_trainer

    prepared = []
    prepare = grpo_trainer.edit.prepare

    def remember(encoder, image, instruction, edit_type, **kwargs):
        prepared.append((np.asarray(image), instruction, edit_type))
        return prepare(encoder, image, instruction, edit_type, **kwargs)

    monkeypatch.setattr(grpo_trainer.edit, "prepare", remember)
    tasks = ["rl.tasks=[edit-recolour, caption]", "rl.augment=true", "rl.task_items=3"]
    scoring = ["rl.eval_interval=5", "rl.eval_tasks=[edit-recolour, caption]", "rl.eval_limit=1"]
    run_grpo(tiny_grpo_config(tmp_path, "train_iters=1", *tasks, *scoring))
    (record,) = _records(tmp_path)
    rollout, heldout = prepared[0], prepared[-1]
    assert rollout[1].startswith("make the ") and rollout[2] == "edit"
    assert not np.isin(rollout[0], (0, 255)).all(), "the rollout's source picture is augmented"
    assert np.isin(heldout[0], (0, 255)).sum() > heldout[0].size // 2, "the held-out source is the plain render"
    for key in ("reward_edit-recolour", "reward_caption", "heldout_edit-recolour", "heldout_caption"):
        assert 0 <= record[key] <= 1, key
    assert record["heldout_s"] > 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("rl.tasks=[edit-remove]",), "rl.tasks names 'edit-remove'"),
        (("rl.tasks=[]",), "rl.tasks is empty"),
        (("rl.tasks=[edit-add]", "rl.cfg_scale=2"), "edit rollouts run unguided"),
        (("rl.eval_tasks=[everything]",), "rl.eval_tasks names 'everything'"),
    ],
)
def test_unknown_or_unguidable_tasks_are_refused_before_any_rollout(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        GRPOTrainer(tiny_grpo_config(tmp_path, *overrides))
    assert not (tmp_path / "run").exists(), "nothing was started"


def test_self_reward_answers_with_the_configured_decoding(tmp_path, monkeypatch):
    """The judge's answers use rl.answer_kv_cache / rl.answer_parallel_threshold; the rollouts' own answers do not."""
    from dimoo_npu.rl import trainer as grpo_trainer

    seen = []
    sample = grpo_trainer.sample_text

    def remember(*args, **kwargs):
        seen.append((kwargs.get("temperature"), kwargs.get("kv_cache", "none"), kwargs.get("parallel_threshold")))
        return sample(*args, **kwargs)

    monkeypatch.setattr(grpo_trainer, "sample_text", remember)
    fast = ("rl.answer_kv_cache=dual", "rl.answer_parallel_threshold=0.95", "rl.understanding=true")
    run_grpo(tiny_grpo_config(tmp_path, "train_iters=1", *fast))
    judged = [s for s in seen if s[0] == 0.0]
    sampled = [s for s in seen if s[0] != 0.0]
    assert judged and all(s[1:] == ("dual", 0.95) for s in judged)
    assert sampled and all(s[1:] == ("none", None) for s in sampled)
