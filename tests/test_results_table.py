"""plumbing.results_table: the Markdown table every lesson prints, well formed in every case."""

import plumbing


def cells(line: str) -> list:
    assert line.startswith("| ") and line.endswith(" |"), line
    return line[2:-2].split(" | ")


def test_a_table_of_scores():
    table = plumbing.results_table({"SFT model": {"test_greedy": 0.45, "ood_greedy": 0.03},
                                    "after GRPO": {"test_greedy": 0.82, "ood_greedy": 0.055}})
    assert table.splitlines() == ["| model | test_greedy | ood_greedy |", "|---|---|---|",
                                  "| SFT model | 45.0% | 3.0% |", "| after GRPO | 82.0% | 5.5% |"]


def test_evaluation_off_gives_a_well_formed_table():
    """--eval_test 0 --eval_ood 0: evaluate() returns {}; the table printed a header cell with no
    separator cell under it. Every line must have as many cells as the header."""
    lines = plumbing.results_table({"SFT model": {}, "after GRPO": {}}).splitlines()
    assert lines == ["| model | evaluated |", "|---|---|", "| SFT model | no |", "| after GRPO | no |"]


def test_rows_with_different_columns_share_one_header():
    lines = plumbing.results_table({"SFT model": {"test_greedy": 0.5},
                                    "after": {"test_greedy": 0.75, "test_step_err": 0.1}}).splitlines()
    assert lines[0] == "| model | test_greedy | test_step_err |"
    assert all(len(cells(line)) == 3 for line in lines[2:]) and lines[2].endswith("| - |")
    assert lines[1] == "|---|---|---|"
