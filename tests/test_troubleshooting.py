"""docs/troubleshooting.md: every symptom's command is on the page as written here, and runs in a
short form (2 steps, no evaluation, from the shipped pi_sft) through the same main() a user runs,
logging the numbers the page tells you to read. Where two steps can show the symptom itself, the
test checks it too (the loss about 0 at mu = 1 while the gradient is not)."""

import importlib.util
import json
import math

import pytest

from conftest import REPO, load_lesson

PAGE = (REPO / "docs" / "troubleshooting.md").read_text()
E = "--eval_test 100 --eval_ood 0 --k 0"

# symptom -> (the command on the page, the keys of metrics.jsonl's step lines the page reads)
SYMPTOMS = {
    "loss about 0": (f"python 02_grpo_outcome.py --steps 20 {E}",
                     ["loss", "grad_norm", "kl", "step_time", "completion_len", "worked"]),
    "accuracy flat": (f"python 02_grpo_outcome.py --steps 20 --lr 1e-6 {E}",
                      ["accuracy", "grad_norm"]),
    "zero advantage": (f"python 02_grpo_outcome.py --steps 20 --group_size 2 {E}",
                       ["zero_adv_groups", "accuracy"]),
    "KL running away": (f"python 02_grpo_outcome.py --steps 20 --beta 0 --lr 1e-3 {E}",
                        ["kl", "completion_len", "accuracy"]),
    "KL, a huge learning rate": (f"python 02_grpo_outcome.py --steps 10 --lr 0.1 {E}",
                                 ["kl", "completion_len", "zero_adv_groups"]),
    "value model": (f"python 01_ppo.py --steps 8 --batch_size 64 --minibatch_size 32 {E}",
                    ["explained_variance", "value_loss", "mean_value"]),
    "value model, faster critic": (
        f"python 01_ppo.py --steps 8 --batch_size 64 --minibatch_size 32 --value_lr 1e-3 {E}",
        ["explained_variance", "value_loss"]),
    "length": ("python 05_unified.py --methods online_rft --seeds 0", ["completion_len"]),
    "reward up, accuracy down": ("python 04_iterative_grpo.py --frozen_rm",
                                 ["rm_reward", "accuracy", "rm_gap"]),
}
# what makes a command short: the page's options, then these (argparse keeps the last value)
SHORT = {
    "01_ppo": ["--steps", "2", "--batch_size", "8", "--minibatch_size", "4", "--eval_test", "0"],
    "02_grpo_outcome": ["--steps", "2", "--batch_size", "2", "--eval_test", "0"],
    "04_iterative_grpo": ["--iterations", "1", "--steps", "1", "--batch_size", "2",
                          "--group_size", "2", "--rm_init_questions", "2", "--rm_init_steps", "1",
                          "--rm_steps", "1", "--rm_batch_size", "4", "--rm_eval_questions", "2",
                          "--eval_test", "1", "--eval_ood", "0", "--k", "0"],
    "05_unified": ["--steps", "2", "--batch_size", "2", "--group_size", "2", "--eval_every", "0",
                   "--eval_test", "1", "--eval_ood", "0", "--k", "1"],
}
BASE = ["--device", "cpu", "--max_new_tokens", "40"]  # the shipped pi_sft: no --sft_steps


def test_every_symptom_has_its_section_and_its_command_on_the_page():
    for heading in ("Loss about 0", "Accuracy flat", "zero advantage", "KL running away",
                    "length", "reward rises while the accuracy falls", "explained variance",
                    "NaN", "Out of memory", "Slow steps", "Bug hunts"):
        assert f"## {heading}".lower() in PAGE.lower() or heading.lower() in PAGE.lower()
    for command, _ in SYMPTOMS.values():
        assert command in PAGE, command


def short_run(command: str, tmp_path) -> list:
    """The command through its lesson's main(), short; the step lines of its metrics.jsonl."""
    words = command.split()
    lesson = words[1].removesuffix(".py")
    load_lesson(lesson).main(BASE + words[2:] + SHORT[lesson] + ["--out_dir", str(tmp_path)])
    lines = [json.loads(line) for f in sorted(tmp_path.rglob("metrics.jsonl"))
             for line in f.read_text().splitlines()]
    return [line for line in lines if "step" in line and not line.get("final")]


@pytest.mark.parametrize("symptom", sorted(SYMPTOMS))
def test_each_symptoms_command_runs_short_and_logs_what_the_page_reads(symptom, tmp_path):
    command, keys = SYMPTOMS[symptom]
    steps = short_run(command, tmp_path)
    assert steps, command
    for key in keys:
        assert any(key in line for line in steps), (command, key)
    if symptom == "loss about 0":  # mu = 1: ratio 1, advantages sum to 0 in each group, KL 0
        first = steps[0]
        assert first["kl"] == pytest.approx(0, abs=1e-6) and abs(first["loss"]) < 1e-5
        assert first["grad_norm"] > 0.01 or first["zero_adv_groups"] == 1  # the gradient is not 0


def test_the_nan_sections_bug_makes_nan_at_step_1_and_stops_the_run_at_step_2(tmp_path):
    """The NaN section's commands, short: `python docs/bughunt.py 02 6` plants the std without its
    guard (here into a copy of the lesson), then 2 steps of 16 questions: step 1 logs a NaN loss
    (a group with equal rewards: 0/0), step 2 cannot sample from the NaN weights."""
    spec = importlib.util.spec_from_file_location("bughunt", REPO / "docs" / "bughunt.py")
    bughunt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bughunt)
    bug = bughunt.pick("02", 6)
    assert "python docs/bughunt.py 02 6" in PAGE and bug.name.startswith("no guard")
    lesson = tmp_path / "02_grpo_outcome.py"
    lesson.write_text(bughunt.plant((REPO / lesson.name).read_text(), bug, lesson))
    spec = importlib.util.spec_from_file_location("lesson_02_planted", lesson)
    planted = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(planted)
    with pytest.raises(RuntimeError, match="probability tensor contains"):
        planted.main(BASE + ["--steps", "2", "--eval_test", "0", "--eval_ood", "0", "--k", "0",
                             "--out_dir", str(tmp_path / "run")])
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert math.isnan(first["loss"]) and math.isnan(first["grad_norm"]) and first["step"] == 1
