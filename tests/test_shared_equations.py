"""One body per equation: where lessons share an equation, every copy is the owner's, character for
character (its docstring included), so a student comparing two lessons never meets two versions of
one formula. A lesson that needs a variant gives it another name."""

import ast

import pytest

from conftest import REPO

# equation -> (the lesson that teaches it, the lessons that copy it)
SHARED = {
    "outcome_rewards": ("02_grpo_outcome",
                        ["01_ppo", "03_grpo_process", "04_iterative_grpo", "05_unified"]),
    "grpo_outcome_advantages": ("02_grpo_outcome",
                                ["03_grpo_process", "04_iterative_grpo", "05_unified"]),
    "kl_k3": ("02_grpo_outcome", ["03_grpo_process", "04_iterative_grpo"]),
    "grpo_loss": ("02_grpo_outcome", ["03_grpo_process", "04_iterative_grpo"]),
    "grpo_update": ("02_grpo_outcome", ["03_grpo_process", "04_iterative_grpo"]),
    "grpo_process_advantages": ("03_grpo_process", ["05_unified"]),
    "step_rewards": ("03_grpo_process", ["05_unified"]),
    "kl_penalised_rewards": ("01_ppo", ["05_unified"]),
    "last_token_index": ("01_ppo", ["05_unified"]),
    "gae": ("01_ppo", ["05_unified"]),
    "whiten": ("01_ppo", ["05_unified"]),
    "load_value_model": ("01_ppo", ["05_unified"]),
    "token_values": ("01_ppo", ["05_unified"]),
}
LESSONS = ["01_ppo", "02_grpo_outcome", "03_grpo_process", "04_iterative_grpo", "05_unified"]


def functions(lesson: str) -> dict:
    """name -> source of every top-level function of a lesson file (decorators included)."""
    source = (REPO / f"{lesson}.py").read_text()
    lines = source.splitlines(keepends=True)
    out = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
            out[node.name] = "".join(lines[start:node.end_lineno])
    return out


@pytest.mark.parametrize("name", sorted(SHARED))
def test_every_copy_of_a_shared_equation_is_the_owners(name):
    owner, copies = SHARED[name]
    original = functions(owner)[name]
    for lesson in copies:
        copy = functions(lesson).get(name)
        assert copy is not None, f"{lesson}.py does not use {owner}.py's {name}"
        assert copy == original, f"{lesson}.py's {name} differs from {owner}.py's: copy it again"


def test_no_other_function_is_written_twice_with_different_bodies():
    """Beyond the list above: a function name that two lessons define names one thing (the same
    body), or it is lesson plumbing (main, report, a lesson's own step) that says so by its lesson."""
    per_lesson = {lesson: functions(lesson) for lesson in LESSONS}
    lesson_own = {"main", "report", "check_args", "grpo_step", "train", "parse_list"}
    for name in {n for fs in per_lesson.values() for n in fs} - lesson_own:
        bodies = {lesson: fs[name] for lesson, fs in per_lesson.items() if name in fs}
        if len(set(bodies.values())) > 1:
            pytest.fail(f"{name} has {len(set(bodies.values()))} different bodies in "
                        f"{', '.join(bodies)}: make the copies identical or rename the variant")


def test_the_check_catches_a_drifted_copy(tmp_path, monkeypatch):
    """The comparison is strict: one changed character in a copy fails it."""
    import conftest

    for lesson in ("02_grpo_outcome", "03_grpo_process"):
        (tmp_path / f"{lesson}.py").write_text((REPO / f"{lesson}.py").read_text())
    drifted = tmp_path / "03_grpo_process.py"
    source = drifted.read_text()
    body = functions("02_grpo_outcome")["kl_k3"]
    assert body in source
    drifted.write_text(source.replace(body, body.replace("- 1", "- 1.0")))
    monkeypatch.setattr(conftest, "REPO", tmp_path)
    monkeypatch.setitem(globals(), "REPO", tmp_path)
    with pytest.raises(AssertionError, match="differs"):
        test_every_copy_of_a_shared_equation_is_the_owners("kl_k3")
