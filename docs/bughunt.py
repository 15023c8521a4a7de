"""Bug hunt: a realistic bug planted in a lesson; find it from the numbers, fix it; tests grade it.

    python docs/bughunt.py 02        # plant a bug in 02_grpo_outcome.py (01, 02, 03 or 04)
    python docs/bughunt.py 02 7      # the bug seed 7 picks, the same on every machine
    ... run the command it prints, read the numbers, find the bug, fix it ...
    python -m pytest -q ...          # the command it prints: red while the bug is there
    git checkout 02_grpo_outcome.py  # or give up: the original back
    python docs/bughunt.py --reveal 02 7   # which bug seed 7 planted (after the hunt)

It prints only the command that shows the symptoms and the pytest command that grades your fix,
not which bug: the lesson's page (docs/troubleshooting.md#bug-hunts) keeps each bug's measured
symptoms in a folded answer. Every bug is one exact text substitution on one line of one of the
lesson's equation functions, the kind of slip people make when they write GRPO or PPO themselves.

`--check LESSON` plants every bug of the lesson in turn and runs the grading command on each, then
on the original (tests/test_bughunt.py runs it in a copy of the course; it refuses a git checkout).
"""

import json
import os
import random
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LESSONS = {"01": "01_ppo", "02": "02_grpo_outcome", "03": "03_grpo_process",
           "04": "04_iterative_grpo"}

# What to run to see the symptoms (a short run: 30-60 s on a laptop CPU), and what grades the fix:
# the unit tests of the lesson's equations, a few seconds.
RUN = {
    "01": "python 01_ppo.py --steps 8 --batch_size 64 --minibatch_size 32 --eval_test 100 "
          "--eval_ood 0 --k 0 --out_dir runs/bughunt/01",
    "02": "python 02_grpo_outcome.py --steps 20 --eval_test 100 --eval_ood 0 --k 0 "
          "--out_dir runs/bughunt/02",
    "03": "python 03_grpo_process.py --steps 20 --eval_test 100 --eval_ood 0 --k 0 "
          "--out_dir runs/bughunt/03",
    "04": "python 04_iterative_grpo.py --iterations 3 --steps 5 --eval_test 100 --eval_ood 0 "
          "--k 0 --out_dir runs/bughunt/04",
}
GRADE = {
    "01": 'python -m pytest -q tests/test_01_ppo.py -k "gae or kl_penalised or surrogate or '
          'value_loss or whiten"',
    "02": 'python -m pytest -q tests/test_02_grpo_outcome.py -k "(advantages or k3 or loss or '
          'pi_old) and not bad_arguments"',
    "03": 'python -m pytest -q tests/test_03_grpo_process.py -k "advantage or normalisation or '
          'two_steps or cut_short"',
    "04": 'python -m pytest -q tests/test_04_iterative_grpo.py -k "rm_score or constant_reward '
          'or reset_reference_copies"',
}


@dataclass(frozen=True)
class Bug:
    lesson: str  # "01", "02", "03"
    name: str  # what the page's answer calls it
    old: str  # found exactly once in the lesson file
    new: str


BUGS = [
    Bug("01", "GAE bootstraps from the padding",
        "nextvalues = values[:, t + 1] * next_mask", "nextvalues = values[:, t + 1]"),
    Bug("01", "the ratio upside down, pi_old / pi_theta",
        "log_ratio = logp - old_logp", "log_ratio = old_logp - logp"),
    Bug("01", "the KL penalty with the wrong sign",
        "rewards = -beta * log_ratio", "rewards = beta * log_ratio"),
    Bug("01", "r_phi on the last column, not the last real token",
        "rewards[torch.arange(len(scores)), last] +=", "rewards[:, -1] +="),
    Bug("01", "whitening over the padding",
        "mean = (x * mask).sum() / n", "mean = x.mean()"),
    Bug("01", "max instead of min in the clipped surrogate",
        "surrogate = torch.min(ratio * advantages, clipped * advantages)\n"
        "    per_output",
        "surrogate = torch.max(ratio * advantages, clipped * advantages)\n"
        "    per_output"),
    Bug("02", "the sample std (ddof 1), not the group's population std",
        "std = r.std(1, keepdim=True, unbiased=False)", "std = r.std(1, keepdim=True)"),
    Bug("02", "no guard for a group whose rewards are all equal",
        "return torch.where(std > 0, (r - mean) / safe, torch.zeros_like(r)).view(-1)",
        "return ((r - mean) / std).view(-1)"),
    Bug("02", "the baseline is the batch's mean, not the group's",
        "mean = r.mean(1, keepdim=True)", "mean = r.mean()"),
    Bug("02", "k3 with pi_theta and pi_ref swapped",
        "log_ratio = ref_logp - logp", "log_ratio = logp - ref_logp"),
    Bug("02", "the KL term added, not subtracted",
        "per_token = surrogate - beta * kl\n", "per_token = surrogate + beta * kl\n"),
    Bug("02", "the padding mask dropped from the token sum",
        "objective = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / num_outputs",
        "objective = (per_token.sum(1) / mask.sum(1).clamp(min=1)).sum() / num_outputs"),
    Bug("02", "every output divided by the padded length T, not its own |o_i|",
        "objective = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / num_outputs",
        "objective = ((per_token * mask).sum(1) / mask.shape[1]).sum() / num_outputs"),
    Bug("02", "the gradient flows through pi_old's log-probs",
        "old_logp[rows] = logp.detach()", "old_logp[rows] = logp"),
    Bug("03", "the advantage sums the earlier steps, not the later ones",
        "return placed.flip(1).cumsum(1).flip(1)", "return placed.cumsum(1)"),
    Bug("03", "the sample std (ddof 1) over the group's steps",
        "(r - mean[group]) ** 2) / count).sqrt()", "(r - mean[group]) ** 2) / (count - 1)).sqrt()"),
    Bug("03", "two steps ending on one token: the second overwrites the first",
        "index_put_((row, end), normalised, accumulate=True)",
        "index_put_((row, end), normalised, accumulate=False)"),
    Bug("04", "r_phi read at the last column, not at each output's EOS",
        "last = batch.prompt_ids.shape[1] + batch.completion_mask.sum(1) - 1",
        "last = torch.full_like(batch.completion_mask.sum(1), input_ids.shape[1] - 1)"),
    Bug("04", "the update rewarded by the verifier, not by r_phi",
        "rewards = rm_rewards(reward_model, batch, args.micro_batch_size)",
        "rewards = outcome_rewards(problems, batch.texts, G)"),
    Bug("04", "pi_ref is the policy itself, not a frozen copy",
        "return copy.deepcopy(policy).eval().requires_grad_(False)", "return policy"),
]


def fail(message: str):
    raise SystemExit(f"error: {message}")


def lesson_key(name: str) -> str:
    """"02", "2" or "02_grpo_outcome.py" -> "02"."""
    key = Path(name).name[:2].zfill(2) if name[:1].isdigit() else ""
    if key not in LESSONS:
        fail(f"no bug hunt for {name!r}: use one of {', '.join(LESSONS)}")
    return key


def bugs_of(key: str) -> list:
    return [bug for bug in BUGS if bug.lesson == key]


def plant(source: str, bug: Bug, path: Path) -> str:
    """source with bug.old replaced by bug.new; a clear error if bug.old is not there once."""
    count = source.count(bug.old)
    if count != 1:
        first = bug.old.splitlines()[0]
        fail(f"{path.name}: the text this bug changes ({first!r}) is there {count} times, not "
             f"once: was the file edited, or a bug already planted? `git checkout {path.name}`")
    return source.replace(bug.old, bug.new)


def function_of(bug: Bug) -> str:
    """The name of the lesson's top-level function whose lines hold bug.old ("" if none)."""
    import ast

    source = (REPO / f"{LESSONS[bug.lesson]}.py").read_text()
    line = source[:source.find(bug.old)].count("\n") + 1
    return next((node.name for node in ast.parse(source).body if isinstance(node, ast.FunctionDef)
                 and node.lineno <= line <= node.end_lineno), "")


def pick(key: str, seed: int) -> Bug:
    return random.Random(seed).choice(bugs_of(key))


def uncommitted(path: Path) -> bool:
    """True when git says the file differs from its last commit (a planted bug, your own edits)."""
    try:
        done = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", path.name], cwd=path.parent,
                              capture_output=True)
    except FileNotFoundError:
        fail("git is not installed: the bug hunt restores a lesson with `git checkout`")
    if done.returncode > 1:
        fail(f"{path.parent} is not a git checkout: the bug hunt restores a lesson with "
             "`git checkout`; clone the course first")
    return done.returncode == 1


def hunt(key: str, seed: int):
    path = REPO / f"{LESSONS[key]}.py"
    if uncommitted(path):
        fail(f"{path.name} has uncommitted changes (your own, or a bug still planted): commit "
             f"them, or `git checkout {path.name}` to start from the original")
    path.write_text(plant(path.read_text(), pick(key, seed), path))
    print(f"Planted one bug in {path.name} (bug hunt {key}, seed {seed}). Run it and read the "
          f"numbers:\n\n    {RUN[key]}\n\nthen find the bug in {path.name} and fix it. Your fix "
          f"is graded by (red while the bug is there):\n\n    {GRADE[key]}\n\n"
          f"Give up: `git checkout {path.name}`; `python docs/bughunt.py --reveal {key} {seed}` "
          f"names the bug; docs/troubleshooting.md#bug-hunts has the symptoms, measured.")


def run_pytest(command: str) -> int:
    """The grading command, in this process (torch and transformers stay imported between runs;
    the test modules and the lesson are imported anew each time)."""
    import pytest

    for name in list(sys.modules):
        if name == "conftest" or name.startswith(("test_", "lesson_")):
            del sys.modules[name]
    args = shlex.split(command)[3:]  # after "python -m pytest"
    return int(pytest.main(args + ["-p", "no:cacheprovider", "--no-header"]))


def check(key: str) -> dict:
    """Every bug of the lesson planted in turn, then the original: the grading command's exit code
    for each (1: a test failed, 0: all passed). The file is restored whatever happens."""
    if (REPO / ".git").exists():
        fail("--check plants every bug in this folder's lessons: run it in a copy of the course "
             "(tests/test_bughunt.py does), not in a git checkout")
    sys.dont_write_bytecode = True  # no .pyc: a planted file of equal size could meet a stale one
    os.chdir(REPO)
    path = REPO / f"{LESSONS[key]}.py"
    original = path.read_text()
    codes = {}
    try:
        for bug in bugs_of(key):
            path.write_text(plant(original, bug, path))
            codes[bug.name] = run_pytest(GRADE[key])
        path.write_text(original)
        codes["original"] = run_pytest(GRADE[key])
    finally:
        path.write_text(original)
    return codes


if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv[:1] == ["--check"] and len(argv) == 2:
        print("BUGHUNT " + json.dumps(check(lesson_key(argv[1]))))
    elif argv[:1] == ["--reveal"] and len(argv) == 3 and argv[2].isdigit():
        bug = pick(lesson_key(argv[1]), int(argv[2]))
        print(f"{LESSONS[bug.lesson]}.py, {function_of(bug)}: {bug.name}\n  original: "
              f"{bug.old.strip()}\n  planted:  {bug.new.strip()}")
    elif len(argv) in (1, 2) and not argv[0].startswith("-") and all(a.isdigit() for a in argv[1:]):
        hunt(lesson_key(argv[0]), int(argv[1]) if len(argv) == 2 else random.randrange(1000))
    else:
        raise SystemExit("usage: python docs/bughunt.py LESSON [N]   (LESSON: 01, 02 or 03)\n"
                         "       python docs/bughunt.py --reveal LESSON N\n"
                         "       python docs/bughunt.py --check LESSON   (in a copy of the course)")
