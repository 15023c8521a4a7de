"""Learning curves from one or more metrics.jsonl files, drawn to a PNG.

Each lesson writes runs/<lesson>/.../metrics.jsonl: one JSON object per training step
({"step": 1, "reward": ..., "accuracy": ..., "kl": ...}) and a last {"final": true, ...} line.
This script draws one panel per metric and one line per file, labelled by the file's folder.
Lines that carry a "method" key (lesson 05: SFT, RFT, DPO, PPO, GRPO+OS, ...) are split into
one line per method, so the methods can be compared in the same panel.

Run:  python plot_curves.py runs/02_grpo_outcome/seed*/metrics.jsonl --out figures/02_grpo_outcome.png
      python plot_curves.py runs/02_grpo_outcome/seed*/metrics.jsonl --mean   (adds the mean over seeds)
      python plot_curves.py runs/05_unified/seed0/metrics.jsonl --metrics reward test_greedy
      python plot_curves.py runs/04_iterative_grpo/*/metrics.jsonl --x after_iteration --metrics test_greedy rm_acc_before
      python plot_curves.py runs/02_grpo_outcome/seed*/metrics.jsonl --maj_pass   (Maj@K and Pass@K against K)

Needs matplotlib, which the lessons do not: pip install matplotlib
"""

import argparse
import json
import math
import re
import statistics
from pathlib import Path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Draw learning curves from metrics.jsonl files to a PNG.")
    parser.add_argument("files", nargs="+", help="metrics.jsonl files; each is labelled by its parent folder")
    parser.add_argument("--out", default="figures/curves.png", help="the PNG to write (folders are created)")
    parser.add_argument("--metrics", nargs="+", default=["reward", "accuracy", "kl", "test_greedy"],
                        help="keys to draw, one panel each; a key no line has is left out")
    parser.add_argument("--x", default="step", help="the key on the x axis; lines without it are left out "
                                                    "(lesson 04's per-iteration lines: after_iteration)")
    parser.add_argument("--methods", nargs="+", default=None, help="only these methods (lesson 05), e.g. RFT 'Online RFT'")
    parser.add_argument("--maj_pass", action="store_true", help="draw Maj@K and Pass@K against K from the lines "
                                                               "lesson 02 writes with --maj_pass_k, one panel per split")
    parser.add_argument("--mean", action="store_true",
                        help="also draw the mean over files (seeds) of each method, as a thick line")
    parser.add_argument("--smooth", type=int, default=1, help="moving-average window in steps (1: none); lines of "
                                                              "20 points or fewer (test accuracy) are never smoothed")
    parser.add_argument("--title", default="", help="figure title")
    return parser.parse_args(argv)


def fail(message: str):
    """Stop with one clear line for the user, not a traceback."""
    raise SystemExit(f"error: {message}")


def read_lines(path: str) -> list[dict]:
    """Every JSON object of a metrics.jsonl, blank lines skipped."""
    if not Path(path).is_file():
        fail(f"{path} is not a file: give the metrics.jsonl files a lesson wrote under runs/")
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            fail(f"{path}, line {n} is not JSON")
        if isinstance(row, dict):
            rows.append(row)
    return rows


def read_steps(path: str, x: str = "step") -> list[dict]:
    """The per-step lines of a metrics.jsonl: skips the final lines and the lines with no `x`."""
    return [row for row in read_lines(path) if not row.get("final") and is_number(row.get(x))]


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def file_labels(files: list[str]) -> dict:
    """Each file's label: its folder's name, or "grandparent/folder" where several files share a folder name
    (runs/03_grpo_process/ops2-4/seed0/outcome -> seed0/outcome)."""
    names = [Path(p).parent.name or p for p in files]
    return {p: (f"{Path(p).parent.parent.name}/{n}" if names.count(n) > 1 else n) for p, n in zip(files, names)}


def run_group(label: str):
    """What a file's runs have in common across seeds: its label without "seed<N>" (iterative-seed0 ->
    iterative, seed1/outcome -> outcome, seed2 -> None). Lines are grouped, and averaged, by it."""
    return re.sub(r"seed\d+", "", label).strip("-_/") or None


def curves(files: list[str], metric: str, x: str = "step", methods=None) -> dict:
    """{(method and/or run group, label): ([x values], [values])} for one metric; rows without it are skipped."""
    out = {}
    labels = file_labels(files)
    several_groups = len({run_group(label) for label in labels.values()}) > 1  # e.g. two normalisers of lesson 05
    for path, label in labels.items():
        for row in read_steps(path, x):
            if is_number(row.get(metric)) and (methods is None or row.get("method") in methods):
                group = row.get("method") or run_group(label)
                if row.get("method") and several_groups:
                    group = f"{group} {run_group(label)}"  # "RFT 05_constant"
                xs, ys = out.setdefault((group, label), ([], []))
                xs.append(row[x])
                ys.append(row[metric])
    return out


def maj_pass_figure(files: list[str], out: str, title: str, plt):
    """The paper's Figure 7: Maj@K and Pass@K against K, mean over files, one panel per split."""
    found = [row for path in files for row in read_lines(path) if isinstance(row.get("maj_pass"), dict)]
    if not found:
        fail(f"no line in {', '.join(files)} has Maj@K / Pass@K: run lesson 02 with --maj_pass_k 64")
    ks = found[0]["ks"]
    splits = list(dict.fromkeys(name.split(", ")[0] for name in found[0]["maj_pass"]))
    fig, axes = plt.subplots(1, len(splits), figsize=(5 * len(splits), 3.8), squeeze=False)
    for ax, split in zip(axes[0], splits):
        models = [name for name in found[0]["maj_pass"] if name.startswith(split + ", ")]
        for colour, name in zip(("tab:blue", "tab:orange"), models):
            for kind, style in (("maj", "-"), ("pass", "--")):
                ys = [100 * sum(r["maj_pass"][name][f"{kind}@{k}"] for r in found) / len(found) for k in ks]
                ax.plot(ks, ys, style, color=colour, marker="o", markersize=3,
                        label=f"{kind.capitalize()}@K, {name.split(', ', 1)[1]}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("K")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{split} split, mean of {len(found)} run(s), T={found[0]['temperature']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    print(f"wrote {out}: Maj@K and Pass@K for K = {ks}, {len(found)} file(s)")
    if len(found) > 1:  # the gains over seeds, judged by the course's criterion
        import common
        import plumbing

        print(f"\nGain after GRPO at each K, mean ± std over {len(found)} runs. The paper's finding (Figure 7) is "
              f"that RL raises Maj@K and not Pass@K. The bracket judges the gap Maj@K gain - Pass@K gain > 0, "
              f"which a falling Pass@K can make positive while Maj@K stays flat: read the Maj@K gain column for "
              f"the finding itself [{plumbing.VERDICT_RULE}]:\n")
        print("| split | K | Maj@K gain | Pass@K gain | Maj@K gain - Pass@K gain [verdict on the gap] |\n|---|---|---|---|---|")
        show = lambda xs: f"{100 * statistics.mean(xs):+.1f} ± {100 * statistics.stdev(xs):.1f} pts"
        for split in splits:
            before, after = (f"{split}, {m}" for m in ("SFT model", "after GRPO (outcome)"))
            for k in ks:
                gain = {kind: [r["maj_pass"][after][f"{kind}@{k}"] - r["maj_pass"][before][f"{kind}@{k}"] for r in found]
                        for kind in ("maj", "pass")}
                gap = [m - p for m, p in zip(gain["maj"], gain["pass"])]
                verdict = "equal by definition at K = 1" if k == 1 else plumbing.verdict(gap)
                print(f"| {split} | {k} | {show(gain['maj'])} | {show(gain['pass'])} | {show(gap)} [{verdict}] |")
    return out


SPARSE_POINTS = 20  # a line this short (e.g. test_greedy, logged only when the lesson evaluated) is drawn as points


def smoothed(ys: list[float], window: int) -> list[float]:
    """The moving average a line is drawn with: none for a sparse line, whose points are each a measurement."""
    return ys if len(ys) <= SPARSE_POINTS else moving_average(ys, window)


def moving_average(values: list[float], window: int) -> list[float]:
    # mean of the last `window` values (fewer at the start), so the curve keeps its length
    return [sum(values[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def mean_curve(series: list[tuple]) -> tuple:
    """Mean over files at each step, over the files that logged that step."""
    by_step = {}
    for xs, ys in series:
        for x, y in zip(xs, ys):
            by_step.setdefault(x, []).append(y)
    steps = sorted(by_step)
    return steps, [sum(by_step[s]) / len(by_step[s]) for s in steps]


def main(argv=None):
    args = parse_args(argv)
    if args.smooth < 1:
        fail(f"--smooth {args.smooth}: the window must be >= 1")
    try:  # an optional extra for this script only: the lessons never import it
        import matplotlib
        matplotlib.use("Agg")  # draw to a file, no window (works on a server with no display)
        import matplotlib.pyplot as plt
    except ImportError:
        fail("plot_curves.py needs matplotlib: pip install matplotlib")

    if args.maj_pass:
        return maj_pass_figure(args.files, args.out, args.title, plt)
    panels = {m: curves(args.files, m, args.x, args.methods) for m in args.metrics}
    panels = {m: c for m, c in panels.items() if c}
    if not panels:
        fail(f"no step line in {', '.join(args.files)} has any of: {', '.join(args.metrics)}")
    # methods and files in the order they first appear, so each keeps its colour in every panel
    methods = list(dict.fromkeys(method for c in panels.values() for method, _ in c))
    labels = list(dict.fromkeys(label for c in panels.values() for _, label in c))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    several_files = len(labels) > 1

    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (metric, series) in zip(axes[0], panels.items()):
        for i, method in enumerate(methods):
            ours = [(label, xs, ys) for (m, label), (xs, ys) in series.items() if m == method]
            # one colour per method when methods are compared, else one colour per file
            for label, xs, ys in ours:
                colour = colours[(i if len(methods) > 1 else labels.index(label)) % len(colours)]
                shown = (method, label if several_files or method is None else None)
                name = " ".join(str(p) for p in shown if p is not None)
                ax.plot(xs, smoothed(ys, args.smooth), color=colour, marker="o" if len(xs) <= SPARSE_POINTS else None,
                        markersize=3, linewidth=1, alpha=0.35 if args.mean and len(ours) > 1 else 1,
                        label="_nolegend_" if args.mean and len(ours) > 1 else name)  # the mean line names them
            if args.mean and len(ours) > 1:
                xs, ys = mean_curve([(xs, ys) for _, xs, ys in ours])
                mean_colour = colours[i % len(colours)] if len(methods) > 1 else "black"
                ax.plot(xs, smoothed(ys, args.smooth), color=mean_colour, linewidth=2.2,
                        label=" ".join(p for p in (method, f"mean of {len(ours)}") if p))
        ax.set_title(metric)
        ax.set_xlabel(args.x)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if args.title:
        fig.suptitle(args.title)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    plt.close(fig)
    print(f"wrote {args.out}: {', '.join(panels)} for {len(labels)} file(s)"
          + (f", methods {', '.join(str(m) for m in methods)}" if methods != [None] else ""))
    return args.out


if __name__ == "__main__":
    main()
