"""docs/blank.py on every write-it-yourself exercise the lesson pages give: the blanked lesson still
compiles, the function keeps its signature and docstring, and nothing of its body is left (no
statement, no comment)."""

import ast
import importlib.util
import re

import pytest

from conftest import REPO

spec = importlib.util.spec_from_file_location("blank", REPO / "docs" / "blank.py")
blank = importlib.util.module_from_spec(spec)
spec.loader.exec_module(blank)

COMMAND = re.compile(r"python docs/blank\.py (\S+\.py) (\w+)")
EXERCISES = sorted({m.groups() for page in (REPO / "docs").glob("*.md")
                    for m in COMMAND.finditer(page.read_text())})


def test_the_pages_give_exercises():
    assert len(EXERCISES) >= 10


@pytest.mark.parametrize("lesson,name", EXERCISES)
def test_blanking_leaves_the_signature_the_docstring_and_nothing_else(lesson, name):
    source = blank.blank(REPO / lesson, name)
    node = next(n for n in ast.parse(source).body
                if isinstance(n, ast.FunctionDef) and n.name == name)
    assert len(node.body) == 2 and isinstance(node.body[1], ast.Raise)  # docstring, raise
    body = source.splitlines()[node.body[0].end_lineno:node.end_lineno]
    assert [line.strip() for line in body] == [
        f'raise NotImplementedError("exercise: write {name} (docs: the lesson page)")']
