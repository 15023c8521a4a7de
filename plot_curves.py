"""Learning curves from one or more metrics.jsonl files, drawn to a PNG.

Each lesson writes runs/<lesson>/<run>/metrics.jsonl (<run>: seed<N> at the defaults, else the
non-default options and the seed, e.g. mu-2_seed0): one JSON object per training step
({"step": 1, "reward": ..., "accuracy": ..., "kl": ...}) and a last {"final": true, ...} line.
This script draws one panel per metric and one line per file, labelled by the file's folder.
Lines that carry a "method" key (lesson 05: SFT, RFT, DPO, PPO, GRPO+OS, ...) are split into
one line per method, so the methods can be compared in the same panel.

Runs are paired by seed and settings: a file's seed is the seed<N> of its folder, its settings the
rest of its path. Where the script averages over seeds (--mean, --maj_pass) it stops with one line
when the runs it would compare do not have the same seeds, or one settings' runs repeat a seed.

Run:  python plot_curves.py runs/02_grpo_outcome/seed*/metrics.jsonl --out figures/02.png
      python plot_curves.py runs/02_grpo_outcome/seed*/metrics.jsonl --mean   (mean over seeds)
      python plot_curves.py runs/05_unified/seed0/metrics.jsonl --metrics reward test_greedy
      python plot_curves.py runs/04_iterative_grpo/*/metrics.jsonl --x after_iteration \\
          --metrics test_greedy rm_acc_before
      python plot_curves.py runs/02_grpo_outcome/seed*/metrics.jsonl --maj_pass   (Maj@K, Pass@K)

Needs matplotlib, which the lessons do not: pip install matplotlib
"""

import argparse
import json
import math
import os
import re
import textwrap
from pathlib import Path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Draw learning curves from metrics.jsonl files to a PNG.")
    parser.add_argument("files", nargs="+",
                        help="metrics.jsonl files; each is labelled by its parent folder")
    parser.add_argument("--out", default="runs/curves.png",
                        help="the PNG to write (folders are created); figures/ holds the course's "
                             "own, so give it there only to redraw one of them")
    parser.add_argument("--metrics", nargs="+", default=["reward", "accuracy", "kl", "test_greedy"],
                        help="keys to draw, one panel each; a key no line has is left out")
    parser.add_argument("--x", default="step",
                        help="the key on the x axis; lines without it are left out "
                             "(lesson 04's per-iteration lines: after_iteration)")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="only these methods (lesson 05), e.g. RFT 'Online RFT'")
    parser.add_argument("--maj_pass", action="store_true",
                        help="draw Maj@K and Pass@K against K from the lines lesson 02 writes "
                             "with --maj_pass_k, one panel per split")
    parser.add_argument("--mean", action="store_true",
                        help="also draw the mean over files (seeds) of each method, thick")
    parser.add_argument("--smooth", type=int, default=1,
                        help="moving-average window in steps (1: none); lines of 20 points or "
                             "fewer (test accuracy) are never smoothed")
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


# ---- Seeds and settings: which runs may be averaged and compared

SEED_IN_NAME = re.compile(r"(?:^|[_-])seed(\d+)$")  # seed0, mu-2_seed0, iterative-seed0


def without_seed(folder: str) -> str:
    return SEED_IN_NAME.sub("", folder)


def seed_of(path: str):
    """The seed a run's folder names (the innermost seed<N>), or None."""
    for folder in reversed(Path(path).resolve().parent.parts):
        found = SEED_IN_NAME.search(folder)
        if found:
            return int(found.group(1))
    return None


def settings_of(path: str) -> str:
    """A run's settings: its folder's path with the seed left out (runs/02_grpo_outcome/mu-2)."""
    return str(Path(*[p for p in map(without_seed, Path(path).resolve().parent.parts) if p]))


def run_group(label: str):
    """What a file's runs have in common across seeds: its label without "seed<N>"
    (iterative-seed0 -> iterative, seed1/outcome -> outcome, mu-2_seed0 -> mu-2, seed2 -> None).
    Lines are grouped, and averaged, by it."""
    return "/".join(p for p in map(without_seed, label.split("/")) if p) or None


def file_labels(files: list[str]) -> dict:
    """Each file's label: its folder's name, with as many folders above it as it takes to tell the
    files apart and to give runs of different settings different groups
    (runs/03_grpo_process/seed0/outcome, .../seed1/outcome -> seed0/outcome, seed1/outcome)."""
    parts = {p: Path(p).resolve().parent.parts for p in files}
    for depth in range(1, max(len(x) for x in parts.values()) + 1):
        labels = {p: "/".join(parts[p][-depth:]) or p for p in files}
        group_of = {}
        for p, label in labels.items():
            group_of.setdefault(run_group(label), set()).add(settings_of(p))
        if len(set(labels.values())) == len(files) and all(len(s) == 1 for s in group_of.values()):
            return labels
    return labels


def seeds_text(seeds) -> str:
    ordered = sorted(seeds, key=lambda s: (s is None, s))
    return ",".join("?" if s is None else str(s) for s in ordered)


def check_seeds(runs: dict, what: str):
    """runs: {name: [seed of each file]}. Stops with one line unless every name has distinct, known
    seeds (one file may go without) and, when several names are compared, the same seeds."""
    for name, seeds in runs.items():
        if len(seeds) > 1 and None in seeds:
            fail(f"{what}: {name} has a run whose folder names no seed<N>, so its seeds cannot be "
                 f"paired: give the runs folders named as the lessons name them (.../seed<N>)")
        repeated = sorted({s for s in seeds if seeds.count(s) > 1})
        if repeated:
            fail(f"{what}: {name} has seed {repeated[0]} more than once: give each seed's run once")
    seed_sets = {name: set(seeds) for name, seeds in runs.items()}
    first = next(iter(seed_sets))
    for name, seeds in seed_sets.items():
        if seeds != seed_sets[first]:
            fail(f"{what} compares mismatched seeds: {first} has seeds "
                 f"{seeds_text(seed_sets[first])} and {name} seeds {seeds_text(seeds)}: "
                 f"give every run the same seeds")


# ---- Curves

def curves(files: list[str], metric: str, x: str = "step", methods=None) -> dict:
    """{(method and/or run group, label): ([x values], [values])} for one metric; rows without it
    are skipped."""
    out = {}
    labels = file_labels(files)
    # several groups: e.g. lesson 05 with two normalisers
    several_groups = len({run_group(label) for label in labels.values()}) > 1
    for path, label in labels.items():
        for row in read_steps(path, x):
            if is_number(row.get(metric)) and (methods is None or row.get("method") in methods):
                run = run_group(label) or ("defaults" if several_groups else None)
                group = row.get("method") or run
                if row.get("method") and several_groups:
                    group = f"{group} {run}"  # "RFT normaliser-constant", "RFT defaults"
                xs, ys = out.setdefault((group, label), ([], []))
                xs.append(row[x])
                ys.append(row[metric])
    return out


def check_mean_seeds(panels: dict, files: list[str]):
    """--mean averages each group's files over seeds: the groups of a panel must share seeds."""
    seed_of_label = {label: seed_of(path) for path, label in file_labels(files).items()}
    for metric, series in panels.items():
        runs = {}
        for group, label in series:
            runs.setdefault(str(group), []).append(seed_of_label[label])
        check_seeds(runs, f"--mean, panel {metric}")


def maj_pass_lines(files: list[str]) -> list[dict]:
    """Each file's Maj@K / Pass@K line (lesson 02 --maj_pass_k), checked to come from one settings'
    runs with distinct seeds and the same measurement."""
    found = {}
    for path in files:
        rows = [row for row in read_lines(path) if isinstance(row.get("maj_pass"), dict)]
        if rows:
            found[path] = rows[-1]
    if not found:
        fail(f"no line in {', '.join(files)} has Maj@K / Pass@K: "
             f"run lesson 02 with --maj_pass_k 64")
    missing = [path for path in files if path not in found]
    if missing:
        fail(f"--maj_pass: {', '.join(missing)} has no Maj@K / Pass@K line while the other "
             f"files do: re-run it with --maj_pass_k, or leave it out")
    if len(files) > 1:
        settings = sorted({settings_of(path) for path in files})
        if len(settings) > 1:
            shown = " and ".join(os.path.relpath(s) for s in settings)
            fail(f"--maj_pass mixes runs of different settings ({shown}): "
                 f"give the seeds of one run's settings")
        check_seeds({settings[0]: [seed_of(path) for path in files]}, "--maj_pass")
        measured = {(json.dumps(r["ks"]), r.get("temperature"), r.get("problems"))
                    for r in found.values()}
        if len(measured) > 1:
            fail("--maj_pass: the files measured Maj@K / Pass@K with different K, temperature or "
                 "problems: give runs made with the same --maj_pass_* options")
    return list(found.values())


def maj_pass_figure(files: list[str], out: str, title: str, plt):
    """The paper's Figure 7: Maj@K and Pass@K against K, mean over files, one panel per split."""
    found = maj_pass_lines(files)
    ks = found[0]["ks"]
    splits = list(dict.fromkeys(name.split(", ")[0] for name in found[0]["maj_pass"]))
    fig, axes = plt.subplots(1, len(splits), figsize=(5 * len(splits), 3.8), squeeze=False)
    for ax, split in zip(axes[0], splits):
        models = [name for name in found[0]["maj_pass"] if name.startswith(split + ", ")]
        for colour, name in zip(("tab:blue", "tab:orange"), models):
            for kind, style in (("maj", "-"), ("pass", "--")):
                ys = [100 * sum(r["maj_pass"][name][f"{kind}@{k}"] for r in found) / len(found)
                      for k in ks]
                ax.plot(ks, ys, style, color=colour, marker="o", markersize=3,
                        label=f"{kind.capitalize()}@K, {name.split(', ', 1)[1]}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("K")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{split} split, mean of {len(found)} run(s), T={found[0]['temperature']}")
        ax.grid(alpha=0.3)
        legend(ax)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, bbox_inches="tight",
                bbox_extra_artists=legends(fig))
    plt.close(fig)
    print(f"wrote {out}: Maj@K and Pass@K for K = {ks}, {len(found)} file(s)")
    if len(found) > 1:
        print_maj_pass_gains(found, splits, ks)
    return out


def print_maj_pass_gains(found: list[dict], splits: list[str], ks: list[int]):
    """The gains over seeds, judged by the course's criterion."""
    from findings import VERDICT_RULE, points, verdict

    print(f"\nGain after GRPO at each K, mean ± std over {len(found)} runs. The paper's finding "
          f"(Figure 7) is that RL raises Maj@K and not Pass@K. The bracket judges the gap Maj@K "
          f"gain - Pass@K gain > 0, which a falling Pass@K can make positive while Maj@K stays "
          f"flat: read the Maj@K gain column for the finding itself [{VERDICT_RULE}]:\n")
    print("| split | K | Maj@K gain | Pass@K gain "
          "| Maj@K gain - Pass@K gain [verdict on the gap] |\n|---|---|---|---|---|")

    for split in splits:
        before, after = (f"{split}, {m}" for m in ("SFT model", "after GRPO (outcome)"))
        for k in ks:
            gain = {kind: [r["maj_pass"][after][f"{kind}@{k}"]
                           - r["maj_pass"][before][f"{kind}@{k}"] for r in found]
                    for kind in ("maj", "pass")}
            gap = [m - p for m, p in zip(gain["maj"], gain["pass"])]
            judged = "equal by definition at K = 1" if k == 1 else verdict(gap)
            print(f"| {split} | {k} | {points(gain['maj'], False)} | "
                  f"{points(gain['pass'], False)} | {points(gap, False)} [{judged}] |")


SPARSE_POINTS = 20  # a line this short (test_greedy, logged only at evaluations) is drawn as points


def smoothed(ys: list[float], window: int) -> list[float]:
    """The moving average a line is drawn with: none for a sparse line, whose points are each a
    measurement."""
    return ys if len(ys) <= SPARSE_POINTS else moving_average(ys, window)


def moving_average(values: list[float], window: int) -> list[float]:
    # mean of the last `window` values (fewer at the start), so the curve keeps its length
    out = []
    for i in range(len(values)):
        start = max(0, i - window + 1)
        out.append(sum(values[start:i + 1]) / (i + 1 - start))
    return out


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
    repeated = [p for p in dict.fromkeys(args.files) if args.files.count(p) > 1]
    if repeated:
        fail(f"{repeated[0]} is given more than once: give each run's file once")
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
    if args.mean:
        check_mean_seeds(panels, args.files)
    fig, wrote = draw(panels, args, plt)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120, bbox_inches="tight",
                bbox_extra_artists=legends(fig))
    plt.close(fig)
    print(wrote)
    return args.out


def legend(ax, width: int = 36):
    """The panel's legend below it, each label wrapped to the panel's width, so a long run name
    neither runs past the panel nor covers the curves (savefig's bbox_inches="tight" keeps it)."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, [textwrap.fill(label, width) for label in labels], fontsize=7,
                  loc="upper center", bbox_to_anchor=(0.5, -0.15), frameon=False
                  ).set_in_layout(False)  # the panels keep their size; the PNG grows to fit


def legends(fig) -> list:
    """The panels' legends: savefig(bbox_inches="tight") makes room for them."""
    return [ax.get_legend() for ax in fig.axes if ax.get_legend()]


def draw(panels: dict, args, plt):
    """One panel per metric; one colour per method when methods are compared, else per file."""
    # methods and files in the order they first appear, so each keeps its colour in every panel
    methods = list(dict.fromkeys(method for c in panels.values() for method, _ in c))
    labels = list(dict.fromkeys(label for c in panels.values() for _, label in c))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    several_files = len(labels) > 1
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (metric, series) in zip(axes[0], panels.items()):
        for i, method in enumerate(methods):
            ours = [(label, xs, ys) for (m, label), (xs, ys) in series.items() if m == method]
            faint = args.mean and len(ours) > 1  # the mean line names them
            for label, xs, ys in ours:
                colour = colours[(i if len(methods) > 1 else labels.index(label)) % len(colours)]
                shown = (method, label if several_files or method is None else None)
                name = " ".join(str(p) for p in shown if p is not None)
                ax.plot(xs, smoothed(ys, args.smooth), color=colour,
                        marker="o" if len(xs) <= SPARSE_POINTS else None, markersize=3,
                        linewidth=1, alpha=0.35 if faint else 1,
                        label="_nolegend_" if faint else name)
            if faint:
                xs, ys = mean_curve([(xs, ys) for _, xs, ys in ours])
                mean_colour = colours[i % len(colours)] if len(methods) > 1 else "black"
                ax.plot(xs, smoothed(ys, args.smooth), color=mean_colour, linewidth=2.2,
                        label=" ".join(p for p in (method, f"mean of {len(ours)}") if p))
        ax.set_title(metric)
        ax.set_xlabel(args.x)
        ax.grid(alpha=0.3)
        legend(ax)
    if args.title:
        fig.suptitle(args.title)
    wrote = (f"wrote {args.out}: {', '.join(panels)} for {len(labels)} file(s)"
             + (f", methods {', '.join(str(m) for m in methods)}" if methods != [None] else ""))
    return fig, wrote


if __name__ == "__main__":
    main()
