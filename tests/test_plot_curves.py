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


def one_line_error(argv) -> str:
    """The message plot_curves stops with: one line, starting with 'error: '."""
    with pytest.raises(SystemExit) as exit_info:
        plot_curves.main(argv)
    message = str(exit_info.value)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def test_mean_refuses_methods_with_mismatched_seeds(tmp_path):
    """Lesson 05 logs: GRPO+OS ran on seeds 0, 1, 2, Online RFT only on 0, 1 (seed 2 stopped early):
    their means would compare different seeds, so --mean stops; without --mean each line is drawn."""
    files = []
    for seed in range(3):
        methods = ("GRPO+OS", "Online RFT") if seed < 2 else ("GRPO+OS",)
        rows = [{"method": m, "step": s, "test_greedy": 0.5 + 0.1 * seed} for m in methods
                for s in (20, 40)]
        files.append(write_jsonl(tmp_path / "runs" / "05_unified" / f"seed{seed}" / "metrics.jsonl",
                                 rows))
    out = str(tmp_path / "05.png")
    message = one_line_error([*files, "--metrics", "test_greedy", "--mean", "--out", out])
    assert "mismatched seeds" in message and "seeds 0,1,2" in message and "seeds 0,1:" in message
    assert "GRPO+OS" in message and "Online RFT" in message
    plot_curves.main([*files, "--metrics", "test_greedy", "--out", out])  # no average, no refusal
    # the complete pair of seeds is averaged
    plot_curves.main([*files[:2], "--metrics", "test_greedy", "--mean", "--out", out])


def test_mean_pairs_runs_by_settings_and_seed(tmp_path):
    """Two settings of lesson 02 (the defaults and --mu 2, as plumbing.run_dir names them): told
    apart by their folders, and refused with --mean when one has a seed the other has not."""
    rows = [{"step": s, "kl": 0.01 * s} for s in range(1, 4)]
    runs = tmp_path / "runs" / "02_grpo_outcome"
    defaults = [write_jsonl(runs / f"seed{s}" / "metrics.jsonl", rows) for s in range(3)]
    mu2 = [write_jsonl(runs / f"mu-2_seed{s}" / "metrics.jsonl", rows) for s in range(2)]
    series = plot_curves.curves(defaults + mu2, "kl")
    assert {group for group, _ in series} == {"defaults", "mu-2"}
    assert plot_curves.seed_of(mu2[1]) == 1 and plot_curves.seed_of(defaults[2]) == 2
    assert plot_curves.settings_of(mu2[0]) == plot_curves.settings_of(mu2[1])
    assert plot_curves.settings_of(mu2[0]) != plot_curves.settings_of(defaults[0])
    out = str(tmp_path / "02.png")
    message = one_line_error([*defaults, *mu2, "--metrics", "kl", "--mean", "--out", out])
    assert "defaults has seeds 0,1,2" in message and "mu-2 seeds 0,1" in message
    plot_curves.main([*defaults[:2], *mu2, "--metrics", "kl", "--mean", "--out", out])
    # two lessons' runs whose folders are both seed<N> are not averaged together as one run
    other = write_jsonl(tmp_path / "runs" / "01_ppo" / "seed1" / "metrics.jsonl", rows)
    message = one_line_error([defaults[0], other, "--metrics", "kl", "--mean", "--out", out])
    assert "02_grpo_outcome has seeds 0 and 01_ppo seeds 1" in message
    assert "more than once" in one_line_error([defaults[0], defaults[0], "--out", out])


def test_check_seeds_repeated_and_unnamed():
    with pytest.raises(SystemExit, match="^error: x: a has seed 0 more than once"):
        plot_curves.check_seeds({"a": [0, 1, 0]}, "x")
    with pytest.raises(SystemExit, match="^error: x: a has a run whose folder names no seed"):
        plot_curves.check_seeds({"a": [0, None]}, "x")
    plot_curves.check_seeds({"a": [2, 0, 1], "b": [0, 1, 2]}, "x")  # the order does not matter


def test_maj_pass_refuses_incomplete_or_mixed_runs(tmp_path):
    """--maj_pass judges gains over seeds: every file must carry the measurement, come from one
    settings' runs, each seed once, measured the same way."""
    sft = {"maj@1": 0.4, "pass@1": 0.4, "maj@2": 0.45, "pass@2": 0.6}
    line = {"final": True, "ks": [1, 2], "temperature": 0.7, "problems": 10, "maj_pass": {
        "test, SFT model": sft, "test, after GRPO (outcome)": sft}}
    runs = tmp_path / "runs" / "02_grpo_outcome"
    good = [write_jsonl(runs / f"seed{s}" / "metrics.jsonl", [{"step": 1}, line]) for s in range(2)]
    out = str(tmp_path / "fig7.png")
    plot_curves.main([*good, "--maj_pass", "--out", out])
    no_line = write_jsonl(runs / "seed2" / "metrics.jsonl", [{"step": 1}])
    assert "has no Maj@K / Pass@K line" in one_line_error([*good, no_line, "--maj_pass", "--out", out])
    mu2 = write_jsonl(runs / "mu-2_seed2" / "metrics.jsonl", [line])
    assert "different settings" in one_line_error([*good, mu2, "--maj_pass", "--out", out])
    other_k = write_jsonl(runs / "seed3" / "metrics.jsonl", [{**line, "ks": [1]}])
    assert "different K" in one_line_error([*good, other_k, "--maj_pass", "--out", out])
    unnamed = [write_jsonl(tmp_path / name / "metrics.jsonl", [line]) for name in ("a", "b")]
    assert "different settings" in one_line_error([*unnamed, "--maj_pass", "--out", out])


def test_without_out_the_figure_goes_under_runs_not_into_figures(tmp_path, metrics_files, monkeypatch):
    """figures/ is tracked (the course's own figures): a figure drawn with no --out must not land there."""
    seeds, _ = metrics_files
    monkeypatch.chdir(tmp_path)
    plot_curves.main(seeds)
    assert (tmp_path / "runs" / "curves.png").is_file() and not (tmp_path / "figures").exists()


def test_long_run_names_stay_under_their_own_panel(tmp_path):
    """A legend sits below its panel, no wider than it, each label wrapped, so no name runs into the
    next panel or over the curves (they overflowed the panels when drawn inside them)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["loss_agg-constant_scale_rewards-none_kl_estimator-k2_mu-2_seed0",
             "loss_agg-token_kl_estimator-k1_warmup_steps-40_seed0", "seed0"]
    files = [write_jsonl(tmp_path / n / "metrics.jsonl", [{"step": s, "reward": s, "kl": s} for s in (1, 2)])
             for n in names]
    args = plot_curves.parse_args(files + ["--metrics", "reward", "kl"])
    panels = {m: plot_curves.curves(files, m, args.x, args.methods) for m in args.metrics}
    fig, _ = plot_curves.draw(panels, args, plt)
    fig.tight_layout()
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        panel, legend = ax.get_window_extent(renderer), ax.get_legend().get_window_extent(renderer)
        assert legend.width <= panel.width and legend.y1 <= panel.y0  # as wide as the panel, below it
        assert panel.x0 - 0.5 * (panel.width - legend.width) - 1 <= legend.x0  # centred under it
        assert all(len(line) <= 36 for t in ax.get_legend().get_texts() for line in t.get_text().split("\n"))
    plt.close(fig)
