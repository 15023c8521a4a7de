"""plot_curves.py: draws a PNG from metrics.jsonl files, and says clearly when matplotlib is missing."""

import json
import sys

import pytest

import plot_curves


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def metrics_files(tmp_path):
    """Two seeds of a lesson 02 run (step lines, then a final line) and a lesson 05 file with methods."""
    seeds = []
    for seed in range(2):
        rows = [{"step": s, "reward": 0.1 * s + seed, "accuracy": 0.1 * s, "kl": 0.01 * s, "clip_frac": 0.0}
                for s in range(1, 5)]
        rows[2].pop("kl")  # a step that misses a key is skipped in that panel only
        rows.append({"final": True, "before": {"test_greedy": 0.4}, "after": {"test_greedy": 0.6}})
        seeds.append(write_jsonl(tmp_path / "runs" / f"seed{seed}" / "metrics.jsonl", rows))
    methods = []
    for method in ("SFT", "GRPO+OS", "GRPO+PS"):
        for s in range(1, 4):
            row = {"method": method, "step": s, "reward": 0.2 * s}
            if s == 3:
                row["test_greedy"] = 0.5
            methods.append(row)
    methods.append({"final": True, "before": {}, "after": {}})
    unified = write_jsonl(tmp_path / "runs" / "05_unified" / "metrics.jsonl", methods)
    return seeds, unified


def test_draws_png(tmp_path, metrics_files):
    seeds, unified = metrics_files
    out = tmp_path / "figures" / "02.png"
    plot_curves.main([*seeds, "--out", str(out), "--mean"])
    assert out.is_file() and out.stat().st_size > 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    out = tmp_path / "figures" / "05.png"
    plot_curves.main([unified, "--out", str(out), "--metrics", "reward", "test_greedy", "kl", "--smooth", "2"])
    assert out.is_file() and out.stat().st_size > 0


def test_read_steps_skips_final_line(metrics_files):
    seeds, unified = metrics_files
    assert [r["step"] for r in plot_curves.read_steps(seeds[0])] == [1, 2, 3, 4]
    curves = plot_curves.curves([unified], "test_greedy")
    assert set(curves) == {("SFT", "05_unified"), ("GRPO+OS", "05_unified"), ("GRPO+PS", "05_unified")}
    assert curves[("SFT", "05_unified")] == ([3], [0.5])
    assert plot_curves.curves([seeds[0]], "kl")[(None, "seed0")][0] == [1, 2, 4]


def test_mean_curve_and_smoothing():
    assert plot_curves.mean_curve([([1, 2], [0.0, 1.0]), ([1, 2, 3], [2.0, 3.0, 4.0])]) == ([1, 2, 3], [1.0, 2.0, 4.0])
    assert plot_curves.moving_average([1.0, 3.0, 5.0], 2) == [1.0, 2.0, 4.0]


def test_clear_errors(tmp_path, metrics_files, capsys):
    seeds, _ = metrics_files
    with pytest.raises(SystemExit, match="^error: .*is not a file"):
        plot_curves.main([str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit, match="^error: no step line"):
        plot_curves.main([seeds[0], "--metrics", "loss", "--out", str(tmp_path / "x.png")])


def test_missing_matplotlib(tmp_path, metrics_files, monkeypatch):
    seeds, _ = metrics_files
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    out = tmp_path / "none.png"
    with pytest.raises(SystemExit) as exit_info:
        plot_curves.main([seeds[0], "--out", str(out)])
    assert str(exit_info.value) == "error: plot_curves.py needs matplotlib: pip install matplotlib"
    assert not out.exists()


def test_groups_by_run_and_draws_other_x_keys(tmp_path):
    """Lesson 04's per-iteration lines (x = after_iteration), iterative and frozen over seeds: one group each."""
    files = []
    for mode in ("iterative", "frozen"):
        for seed in range(2):
            rows = [{"iteration": 1, "step": 1, "rm_reward": 0.5}]  # a per-step line: no after_iteration
            rows += [{"after_iteration": i, "test_greedy": 0.4 + 0.1 * i * (mode == "iterative")} for i in range(3)]
            files.append(write_jsonl(tmp_path / f"{mode}-seed{seed}" / "metrics.jsonl", rows))
    series = plot_curves.curves(files, "test_greedy", x="after_iteration")
    assert sorted({group for group, _ in series}) == ["frozen", "iterative"]
    xs, ys = series[("iterative", "iterative-seed1")]
    assert xs == [0, 1, 2] and ys == pytest.approx([0.4, 0.5, 0.6])
    assert plot_curves.curves(files, "rm_reward", x="after_iteration") == {}  # per-step lines are left out
    out = tmp_path / "fig6.png"
    plot_curves.main([*files, "--x", "after_iteration", "--metrics", "test_greedy", "--mean", "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # files that share a folder name (lesson 03: seed0/outcome, seed1/outcome) keep one line each
    same = [write_jsonl(tmp_path / f"seed{s}" / "outcome" / "metrics.jsonl", [{"step": 1, "kl": s}]) for s in range(2)]
    assert sorted(plot_curves.curves(same, "kl")) == [("outcome", "seed0/outcome"), ("outcome", "seed1/outcome")]


def test_maj_pass_figure_and_gains(tmp_path, capsys):
    files = []
    sft = {"maj@1": 0.4, "pass@1": 0.4, "maj@2": 0.45, "pass@2": 0.6, "maj@4": 0.5, "pass@4": 0.8}
    for seed in range(3):
        # test: Maj@K up 20 (+1 a seed) points, Pass@K (K > 1) up 0 (+1 a seed): a gap of +20 on every seed
        test = {key: v + (0.2 if key.startswith("maj") or key == "pass@1" else 0.0) + 0.01 * seed for key, v in sft.items()}
        # ood: Maj@K unchanged, Pass@K (K > 1) down 5 (+1 a seed) points: the gap is positive because Pass@K falls
        ood = {key: v - (0.05 + 0.01 * seed if key in ("pass@2", "pass@4") else 0.0) for key, v in sft.items()}
        rows = [{"step": 1}, {"final": True, "ks": [1, 2, 4], "temperature": 0.7, "problems": 10, "maj_pass": {
            "test, SFT model": sft, "test, after GRPO (outcome)": test,
            "ood, SFT model": sft, "ood, after GRPO (outcome)": ood}}]
        files.append(write_jsonl(tmp_path / f"seed{seed}" / "metrics.jsonl", rows))
    out = tmp_path / "fig7.png"
    plot_curves.main([*files, "--maj_pass", "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "| test | 1 | +21.0 ± 1.0 pts | +21.0 ± 1.0 pts | +0.0 ± 0.0 pts [equal by definition at K = 1] |" in printed
    assert "| test | 4 | +21.0 ± 1.0 pts | +1.0 ± 1.0 pts | +20.0 ± 0.0 pts [reproduced] |" in printed
    assert "| ood | 2 | +0.0 ± 0.0 pts | -6.0 ± 1.0 pts | +6.0 ± 1.0 pts [reproduced] |" in printed
    with pytest.raises(SystemExit, match="--maj_pass_k 64"):
        plot_curves.main([write_jsonl(tmp_path / "x" / "m.jsonl", [{"step": 1}]), "--maj_pass", "--out", str(out)])
