"""Reading runs back and judging them: what a student need not open to learn the algorithms.
- the verdict rule every finding of the course is judged by (`verdict`, `VERDICT_RULE`) and the
  formatting of its numbers (mean +- std over seeds, per seed)
- lesson 05's report: run storage (a folder per seed and settings), the tables, the costs, the
  paper's findings of section 5.2 with their verdicts, and the findings file beside the runs
- the finding rows of plot_curves.py (Figure 7's gains) and docs/real_model_runs.py (the GPU lane)

    python findings.py 05 [lesson 05's options]   lesson 05's tables and findings, from its logs
                                                   (what `05_unified.py --report_only` prints)
"""

import json
import math
import statistics
import sys
from dataclasses import fields
from pathlib import Path

import torch

import plumbing

# --------------------------------------------------------------------------------------------------
# The verdict rule and the numbers beside it

VERDICT_RULE = ("reproduced = the paper's sign on every seed and |mean| >= 2 std over seeds; "
                "contradicted = the opposite sign on every seed and |mean| >= 2 std; "
                "inconclusive = anything else (one seed is always inconclusive)")


def verdict(diffs: list) -> str:
    """The criterion every finding of the course is judged by (VERDICT_RULE), on per-seed
    differences (method - baseline, the paper's sign positive). Symmetric: a null result is
    inconclusive whatever the sign of its mean. One seed cannot tell a finding from noise."""
    diffs = [round(d, 9) for d in diffs]  # accuracies are counts / N: a residue is no difference
    if len(diffs) < 2:
        return "inconclusive, 1 seed"
    m = sum(diffs) / len(diffs)
    sd = math.sqrt(sum((d - m) ** 2 for d in diffs) / (len(diffs) - 1))
    if all(d > 0 for d in diffs) and m >= 2 * sd:
        return "reproduced"
    if all(d < 0 for d in diffs) and -m >= 2 * sd:
        return "contradicted"
    return "inconclusive"


def mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def pct(values):
    m, s = mean_std(values)
    return f"{100 * m:.1f} ± {100 * s:.1f}%" if len(values) > 1 else f"{100 * m:.1f}%"


def points(diffs, per_seed: bool = True) -> str:
    """Differences of accuracies in points: "+5.0 ± 1.2 pts (per seed +4.0, +6.0)"."""
    m, s = mean_std(diffs)
    text = f"{100 * m:+.1f} ± {100 * s:.1f} pts"
    return text + f" (per seed {', '.join(f'{100 * d:+.1f}' for d in diffs)})" if per_seed else text


def finding_line(claim: str, diffs: list, what: str) -> str:
    """A table row of a finding judged by the course's rule, with what its seeds could detect
    (docs/real_model_runs.py's results page)."""
    judged = verdict(diffs)
    per_seed = ", ".join(f"{100 * d:+.1f}" for d in diffs)
    if len(diffs) > 1:
        sd = statistics.stdev(diffs)
        numbers = f"{points(diffs, per_seed=False)}; smallest detectable about {200 * sd:.1f}"
    else:
        numbers = f"{100 * diffs[0]:+.1f} pts" if diffs else "no run finished"
    return f"| {claim} | {what} | {per_seed or '-'} | {numbers} | {judged if diffs else '-'} |"


# --------------------------------------------------------------------------------------------------
# Lesson 05: where its runs are kept, a folder per seed and settings; a --methods subset keeps the
# other methods' records


def settings(args) -> dict:
    """What was run: every option but those that only say where or which (seeds, methods)."""
    return {f.name: getattr(args, f.name) for f in fields(args)
            if f.name not in plumbing.NOT_IN_RUN_NAME}


def seed_dir(lesson: str, args, pretrained: dict, seed) -> str:
    """runs/<lesson>/<options not at their defaults>_seed<seed>, or <out_dir>/seed<seed>."""
    if args.out_dir:
        return f"{args.out_dir}/seed{seed}"
    return plumbing.run_dir(lesson, args, pretrained, seed=seed)


def seed_log(out_dir, names, args):
    """The seed's metrics.jsonl, started anew but for the records of the methods not run now (when
    they ran with the same settings): `--methods rft` does not erase GRPO's log. names: the methods
    run now, by their names in the tables."""
    path, saved = Path(out_dir) / "metrics.jsonl", Path(out_dir) / "settings.json"
    now = set(names) | {"SFT model"}
    keep = []
    if path.is_file() and saved.is_file() and json.loads(saved.read_text()) == settings(args):
        keep = [r for r in map(json.loads, path.read_text().splitlines()) if r["method"] not in now]
    log = plumbing.MetricsLog(out_dir)
    saved.write_text(json.dumps(settings(args), indent=1) + "\n")
    for record in keep:
        log.write(record)
    return log


class GpuPeak:
    """Peak GPU memory of a method's updates, and of everything since the method before it (its
    checks and evaluations too): torch's peak is reset before each update, so torch's own reading
    is only the last stretch. Measures nothing on a CPU."""

    def __init__(self, device):
        self.device, self.cuda, self.updates, self.seen = device, device.type == "cuda", 0, 0

    def before_update(self):  # what came before (a check, an evaluation) counts in `seen`
        if self.cuda:
            self.seen = max(self.seen, torch.cuda.max_memory_allocated(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)

    def after_update(self):
        if self.cuda:
            self.updates = max(self.updates, torch.cuda.max_memory_allocated(self.device))

    def read(self):
        """(the updates' peak, the peak of everything) in bytes; None on a CPU."""
        if not self.cuda:
            return None
        self.seen = max(self.seen, torch.cuda.max_memory_allocated(self.device))
        return self.updates, self.seen


def method_costs(models, times, peak_gpu) -> dict:
    """A method's cost: time per update, the state its models keep (weights, and for trainable ones
    a gradient and Adam's two moments), trainable parameters; on a GPU peak_gpu = (the peak of its
    updates, the peak of everything since the method before it)."""
    state = sum(p.numel() * p.element_size() * (4 if p.requires_grad else 1)
                for m in models for p in m.parameters())
    out = {"time_per_step": statistics.mean(times), "state_mb": state / 2**20,
           "trainable_params": sum(p.numel() for m in models for p in m.parameters()
                                   if p.requires_grad),
           "models": "+".join(["policy", "pi_ref", "value"][:len(models)])}
    if peak_gpu is not None:
        out["peak_gpu_mb"], out["peak_gpu_seen_mb"] = peak_gpu[0] / 2**20, peak_gpu[1] / 2**20
    return out


def memory_line(device, all_costs) -> str:
    """The run's peak memory: on a GPU the largest over every method, its updates and evaluations
    (GpuPeak resets torch's peak before each update, so torch's own reading is only the last
    stretch); on a CPU the process's peak resident size."""
    if device.type != "cuda":
        return plumbing.peak_memory(device)
    seen = max([c["peak_gpu_seen_mb"] for c in all_costs]
               + [torch.cuda.max_memory_allocated(device) / 2**20])
    return f"peak GPU memory {seen:.0f} MiB (over every method, updates and evaluations)"


# --------------------------------------------------------------------------------------------------
# Lesson 05's report: the comparison and the paper's findings


def unified_report(table: dict, methods: list, dirs: dict, args) -> dict:
    """Lesson 05's tables and findings from the logs of `dirs` (seed -> folder): what 05_unified.py
    prints after training, and with --report_only (or `python findings.py 05`) alone. table: the
    lesson's METHODS."""
    seeds = list(dirs)
    final, curves, run_costs = read_runs(dirs, [table[m][0] for m in methods])
    checked = report(final, curves, run_costs, args, seeds)
    path = write_findings(checked, final, args, seeds, dirs[seeds[0]])
    print(f"\nPer-seed values of every finding: {path}")
    return {"final": final, "curves": curves, "costs": run_costs, "findings": checked,
            "dirs": dirs, "findings_file": path}


def paradigm_table(table: dict, methods) -> str:
    """The table of section 5.2 for the chosen methods (table: lesson 05's METHODS)."""
    lines = ["| method | data source | reward | gradient coefficient GC |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(table[m]) + " |" for m in methods]
    return "\n".join(lines)


def read_runs(dirs, methods):
    """Every seed's results, read back from its log; stops with one line when a seed lacks one of
    the methods (their names in the tables), or when the seeds ran with different settings (the
    report pairs like with like)."""
    names = ["SFT model"] + list(methods)
    found, curves, seen = {}, {}, {}  # name -> seed -> final record; name -> step -> [accuracy]
    for seed, folder in dirs.items():
        path = Path(folder) / "metrics.jsonl"
        if not path.is_file():
            plumbing.fail(f"{path} does not exist: run seed {seed} with these options first")
        saved = Path(folder) / "settings.json"
        if saved.is_file():
            seen[seed] = json.loads(saved.read_text())
        for record in map(json.loads, path.read_text().splitlines()):
            if record["method"] not in names:
                continue
            if record.get("final"):
                found.setdefault(record["method"], {})[seed] = record
            elif "test_greedy" in record:
                curves.setdefault(record["method"], {}).setdefault(record["step"], []).append(
                    record["test_greedy"])
    if len({json.dumps(s, sort_keys=True) for s in seen.values()}) > 1:
        plumbing.fail("--report_only: seeds " + ",".join(map(str, seen)) + " ran with different "
                      "settings (settings.json in their folders); compare runs of one setting")
    for name in names:
        have = sorted(found.get(name, {}))
        if have != sorted(dirs):
            plumbing.fail(f"--report_only: {name} has seeds {','.join(map(str, have)) or 'none'} "
                          f"of {','.join(map(str, dirs))}: run it for the missing seeds first, or "
                          "choose --seeds/--methods that every run has (no verdict on unpaired "
                          "seeds)")
    final = {n: [found[n][s]["after"] for s in dirs] for n in names}
    run_costs = {n: [found[n][s] for s in dirs] for n in names[1:]}
    return final, curves, run_costs


def cost_line(costs):
    """Section 4.1.1's motivation for GRPO, measured (a cost, not a finding of section 5.2)."""
    if "PPO" not in costs or "GRPO+OS" not in costs:
        return None
    p, g = costs["PPO"], costs["GRPO+OS"]
    line = (f"GRPO+OS keeps {mean_of(g, 'state_mb'):.1f} MiB of weights+grads+Adam against PPO's "
            f"{mean_of(p, 'state_mb'):.1f} MiB (no value model) and takes "
            f"{mean_of(g, 'time_per_step'):.2f} s per update against "
            f"{mean_of(p, 'time_per_step'):.2f} s")
    if all("peak_gpu_mb" in c for c in p + g):
        line += (f"; peak GPU memory {mean_of(g, 'peak_gpu_mb'):.0f} vs "
                 f"{mean_of(p, 'peak_gpu_mb'):.0f} MiB")
    return line


def mean_of(records: list, key: str) -> float:
    return statistics.mean(r[key] for r in records)


# The comparisons that the 1/|o| normaliser decides (Online RFT and RFT, whose GC is never negative,
# learn to answer at once and collapse; docs/05_unified.md): under it they say nothing of the paper.
ARTIFACT = "decided by the 1/|o| artifact, not a test of the paper (see --normaliser constant)"


def finding(claim, plus, minus, key, n, artifact=False) -> dict:
    """One finding from per-seed results: plus, minus = (name, [result per seed]), the difference
    plus - minus (the paper's sign positive). Besides the verdict: the smallest difference these
    seeds could detect (the rule's 2 std over seeds) and the test set's own sampling error of the
    difference (binomial, sqrt(p(1-p)/n) of each run, in quadrature; mean over seeds)."""
    (a, runs_a), (b, runs_b) = plus, minus
    per_seed = [x[key] - y[key] for x, y in zip(runs_a, runs_b)]
    error = statistics.mean(math.sqrt((x[key] * (1 - x[key]) + y[key] * (1 - y[key])) / n)
                            for x, y in zip(runs_a, runs_b))
    return {"claim": claim, "verdict": ARTIFACT if artifact else verdict(per_seed),
            "per_seed": per_seed, "detectable": 2 * mean_std(per_seed)[1] if len(per_seed) > 1
            else None, "test_error": error, "metric": key,
            "values": {a: [x[key] for x in runs_a], b: [y[key] for y in runs_b]}}


def findings(final, curves, args) -> list:
    """The paper's findings of section 5.2, each judged by verdict() (or labelled)."""
    out, n, k = [], args.eval_test, args.k
    for better, worse, claim in (("Online RFT", "RFT", "Online RFT ends above RFT (Figure 5)"),
                                 ("GRPO+OS", "Online RFT", "GRPO ends above Online RFT (Figure 5)"),
                                 ("GRPO+PS", "GRPO+OS", "GRPO+PS ends above GRPO+OS (Figure 5)")):
        if better in final and worse in final:
            row = finding(claim, (better, final[better]), (worse, final[worse]), "test_greedy", n,
                          artifact="Online RFT" in (better, worse) and args.normaliser == "output")
            row["numbers"] = f"greedy test, {better} - {worse}: {points(row['per_seed'])}"
            steps = sorted(set(curves.get(better, {})) & set(curves.get(worse, {})) - {0})
            if better == "Online RFT" and steps:
                gaps = [(s, 100 * statistics.mean(a - b for a, b in zip(curves[better][s],
                                                                         curves[worse][s])))
                        for s in steps]
                row["numbers"] += "; on the curve " + ", ".join(f"{gap:+.1f} at step {s}"
                                                                for s, gap in gaps)
            out.append(row)
    for m in ("GRPO+OS", "GRPO+PS", "PPO", "Online RFT"):
        if m in final:
            rl, sft = (m, final[m]), ("SFT model", final["SFT model"])
            maj = finding(f"RL ({m}) raises Maj@{k}", rl, sft, f"test_maj@{k}", n)
            maj["numbers"] = f"Maj@{k} - SFT model's: {points(maj['per_seed'])}"
            pas = finding(f"Pass@{k}", rl, sft, f"test_pass@{k}", n)
            gap = [a - b for a, b in zip(maj["per_seed"], pas["per_seed"])]
            more = {"claim": f"RL ({m}) raises Maj@{k} more than Pass@{k}",
                    "verdict": verdict(gap), "per_seed": gap,
                    "detectable": 2 * mean_std(gap)[1] if len(gap) > 1 else None,
                    "test_error": math.hypot(maj["test_error"], pas["test_error"]),
                    "metric": f"(maj - pass)@{k}", "values": {**maj["values"], **{
                        f"{name} pass": v for name, v in pas["values"].items()}},
                    "numbers": f"Maj@{k} gain - Pass@{k} gain: {points(gap)}; "
                               f"Pass@{k} - SFT model's: {points(pas['per_seed'])}"}
            out += [maj, more]
            break
    return out


def report(final, curves, costs, args, seeds) -> list:
    cols = list(final["SFT model"][0])
    print(f"Final evaluation ({args.eval_test} test, {args.eval_ood} OOD problems; mean ± std over "
          f"seeds {seeds}):\n")
    print("| model | " + " | ".join(cols) + " |\n" + "|---" * (len(cols) + 1) + "|")
    for name, results in final.items():
        print(f"| {name} | " + " | ".join(pct([r[c] for r in results]) for c in cols) + " |")
    if curves:
        steps = sorted({s for c in curves.values() for s in c})
        print(f"\nTest accuracy (greedy, {args.eval_curve} problems) during training, mean over "
              "seeds:\n")
        print("| method | " + " | ".join(f"step {s}" for s in steps) + " |\n"
              + "|---" * (len(steps) + 1) + "|")
        for name, c in curves.items():
            print(f"| {name} | " + " | ".join(f"{100 * statistics.mean(c[s]):.1f}%" if s in c
                                               else "" for s in steps) + " |")
    cost_table(costs)
    checked = findings(final, curves, args)
    print(f"\nThe paper's findings (section 5.2), judged on {len(seeds)} "
          f"seed{'s' if len(seeds) > 1 else ''}: {VERDICT_RULE}. Inconclusive means these "
          "runs cannot tell, not that the two are the same. Each row gives the smallest difference "
          f"its seeds could detect (2 std over seeds) and the test set's sampling error "
          f"(binomial, {args.eval_test} problems).\n")
    for row in checked:
        seen = ("n/a (one seed)" if row["detectable"] is None
                else f"{100 * row['detectable']:.1f} pts")
        print(f"- [{row['verdict']}] {row['claim']}: {row['numbers']}; smallest detectable "
              f"difference {seen}; test-set error ± {100 * row['test_error']:.1f} pts")
    return checked


def cost_table(costs):
    print("\nCost of each method at the same batch (state = weights + gradients + Adam moments of "
          "the models it keeps):\n")
    gpu = all("peak_gpu_mb" in x for c in costs.values() for x in c)
    print("| method | models kept | trainable params | state (MiB) | time per update (s) |"
          + (" peak GPU (MiB) |" if gpu else "") + "\n|---|---|---|---|---|"
          + ("---|" if gpu else ""))
    for name, c in costs.items():
        print(f"| {name} | {c[0]['models']} | {c[0]['trainable_params']:,} | "
              f"{mean_of(c, 'state_mb'):.1f} | {mean_of(c, 'time_per_step'):.2f} |"
              + (f" {mean_of(c, 'peak_gpu_mb'):.0f} |" if gpu else ""))
    if not gpu:
        print("(no GPU: peak GPU memory is measured only on CUDA; time per update is wall time)")
    line = cost_line(costs)
    if line:
        print(f"\nWhat GRPO saves (section 4.1.1's motivation, a cost measured here, not a "
              f"finding): {line}.")


def write_findings(checked, final, args, seeds, first_dir: str) -> str:
    """Every finding's per-seed values, beside the runs: <runs>/<options>_findings_seeds<S>.json."""
    path = (first_dir[:-len(f"seed{seeds[0]}")] + "findings_seeds" + "-".join(map(str, seeds))
            + ".json")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps({
        "command": "python findings.py 05 --seeds " + ",".join(map(str, seeds)),
        "settings": settings(args), "seeds": seeds, "rule": VERDICT_RULE,
        "test_problems": args.eval_test, "findings": checked,
        "final": {name: dict(zip(map(str, seeds), runs)) for name, runs in final.items()}},
        indent=1) + "\n")
    return path


def main(argv=None):
    """python findings.py 05 [options]: lesson 05's report from the logs that lesson 05 wrote with
    these options (its --seeds, --methods, --out_dir and settings)."""
    import importlib

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "05":
        plumbing.fail("usage: python findings.py 05 [lesson 05's options, e.g. --seeds 0,1,2]")
    return importlib.import_module("05_unified").main(argv[1:] + ["--report_only"])


if __name__ == "__main__":
    main()
