"""Blank a function for a write-it-yourself exercise: its body becomes `raise NotImplementedError`,
its signature and docstring stay, so you write the equation from the lesson's page.

    python docs/blank.py 02_grpo_outcome.py grpo_outcome_advantages   # blank it
    python -m pytest -q tests/test_02_grpo_outcome.py -k advantages     # your version, graded
    git checkout 02_grpo_outcome.py                                     # the original back
"""

import ast
import sys
from pathlib import Path


def blank(path: Path, name: str) -> str:
    """The source of `path` with function `name`'s body (after its docstring) replaced."""
    source = path.read_text()
    tree = ast.parse(source)
    found = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name]
    if not found:
        names = ", ".join(n.name for n in tree.body if isinstance(n, ast.FunctionDef))
        raise SystemExit(f"error: {path} has no function {name!r}; it has: {names}")
    function = found[0]
    body = function.body
    has_doc = isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None),
                                                            ast.Constant)
    first = body[1] if has_doc and len(body) > 1 else body[0]
    lines = source.splitlines(keepends=True)
    indent = " " * first.col_offset
    # from the line after the docstring: a comment above the first statement goes with the body
    start, end = (body[0].end_lineno if has_doc else first.lineno - 1), function.end_lineno
    if has_doc and len(body) == 1:  # a docstring alone: nothing to blank
        raise SystemExit(f"error: {name} has no body to blank")
    stub = f'{indent}raise NotImplementedError("exercise: write {name} (docs: the lesson page)")\n'
    return "".join(lines[:start]) + stub + "".join(lines[end:])


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python docs/blank.py LESSON.py FUNCTION")
    lesson = Path(sys.argv[1])
    if not lesson.is_file():
        raise SystemExit(f"error: {lesson} is not a file: give a lesson such as 02_grpo_outcome.py")
    lesson.write_text(blank(lesson, sys.argv[2]))
    print(f"blanked {sys.argv[2]} in {lesson}; `git checkout {lesson}` brings the original back")
