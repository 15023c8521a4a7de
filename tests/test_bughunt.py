"""docs/bughunt.py: every planted bug turns its lesson's grading command red, the original is green,
and the student's path (plant, `git checkout`) works. All of it in a copy of the course under
tmp_path: the working tree is never touched."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

spec = importlib.util.spec_from_file_location("bughunt", REPO / "docs" / "bughunt.py")
bughunt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bughunt)


# the functions the bugs go into: the equations, and the update that holds pi_old
EQUATIONS = {"gae", "kl_penalised_rewards", "whiten", "ppo_clipped_surrogate",
             "grpo_outcome_advantages", "kl_k3", "grpo_loss", "grpo_step", "grpo_update",
             "grpo_process_advantages", "rm_logits", "reset_reference"}


def copy_course(dest):
    """The lessons, their helper modules, the shipped pi_sft, the tests and the bug hunt."""
    for path in REPO.glob("*.py"):
        shutil.copy(path, dest / path.name)
    shutil.copytree(REPO / "pi_sft", dest / "pi_sft")
    shutil.copytree(REPO / "tests", dest / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    (dest / "docs").mkdir()
    shutil.copy(REPO / "docs" / "bughunt.py", dest / "docs" / "bughunt.py")


def test_at_least_eight_bugs_in_three_lessons_each_found_once_in_its_function():
    assert len(bughunt.BUGS) >= 8 and len({bug.lesson for bug in bughunt.BUGS}) >= 3
    assert len({(bug.lesson, bug.name) for bug in bughunt.BUGS}) == len(bughunt.BUGS)
    for bug in bughunt.BUGS:
        lesson = bughunt.LESSONS[bug.lesson]
        assert (REPO / f"{lesson}.py").read_text().count(bug.old) == 1, (lesson, bug.name)
        assert bughunt.function_of(bug) in EQUATIONS, (lesson, bug.name)  # in a lesson function
        assert bug.new != bug.old


@pytest.mark.parametrize("key", sorted(bughunt.LESSONS))
def test_every_bug_turns_the_grading_command_red_and_the_original_is_green(key, tmp_path):
    copy_course(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run([sys.executable, "docs/bughunt.py", "--check", key], cwd=tmp_path,
                          capture_output=True, text=True, env=env, timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith("BUGHUNT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-3000:]
    codes = json.loads(lines[-1][len("BUGHUNT "):])
    assert codes.pop("original") == 0, "the original lesson fails its own grading command"
    assert codes == {bug.name: 1 for bug in bughunt.bugs_of(key)}  # 1: tests ran and failed
    original = (REPO / f"{bughunt.LESSONS[key]}.py").read_text()
    assert (tmp_path / f"{bughunt.LESSONS[key]}.py").read_text() == original  # restored


def test_a_student_plants_a_bug_and_git_checkout_restores_it(tmp_path):
    lesson = "02_grpo_outcome.py"
    shutil.copy(REPO / lesson, tmp_path / lesson)
    (tmp_path / "docs").mkdir()
    shutil.copy(REPO / "docs" / "bughunt.py", tmp_path / "docs" / "bughunt.py")
    git = lambda *args: subprocess.run(["git", *args], cwd=tmp_path, check=True,
                                       capture_output=True, text=True)
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=student", "-c", "user.email=s@example.org", "commit", "-q", "-m", "clone")
    hunt = lambda *args: subprocess.run([sys.executable, "docs/bughunt.py", *args], cwd=tmp_path,
                                        capture_output=True, text=True)
    original = (tmp_path / lesson).read_text()
    done = hunt("02", "7")
    assert done.returncode == 0, done.stderr
    bug = bughunt.pick("02", 7)
    assert bughunt.RUN["02"] in done.stdout and bughunt.GRADE["02"] in done.stdout
    assert bug.name not in done.stdout and bughunt.function_of(bug) not in done.stdout  # unsaid
    assert (tmp_path / lesson).read_text() == original.replace(bug.old, bug.new)
    again = hunt("02", "3")  # a second bug on top of the first: refused, nothing written
    assert again.returncode != 0 and "uncommitted changes" in again.stderr
    assert bug.name in hunt("--reveal", "02", "7").stdout
    git("checkout", lesson)
    assert (tmp_path / lesson).read_text() == original
    assert hunt("--check", "02").returncode != 0  # never every bug in a git checkout
    assert hunt("05").returncode != 0 and "use one of 01, 02, 03, 04" in hunt("05").stderr
