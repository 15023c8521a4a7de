"""Where a lesson 02 step goes: `grpo_step` timed piece by piece, for one or several code versions.

The versions are loaded in one process and take turns step by step, so a slower minute of a shared
machine slows all of them alike; each prints the median of its steps (after one warm-up step) for
sampling, pi_ref's log-probs, pi_theta's log-probs, the backward pass and the rest. One thread.

    git worktree add /tmp/v527 527a645 && git worktree add /tmp/v5dc 5dcb694
    python docs/step_breakdown.py 527a645=/tmp/v527 5dcb694=/tmp/v5dc now=. \\
        --late_model runs/02_grpo_outcome/seed1/model

Each version starts from pi_sft (early, short outputs) and, with --late_model, from a trained model
(late, longer outputs). The versions must share pi_sft (the last one's is loaded for all).
On a GPU: --device cuda (each piece between two CUDA synchronisations); the real model:
--model smollm2.
"""
import argparse
import collections
import copy
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch


def load_module(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("versions", nargs="+", help="LABEL=REPO_FOLDER, e.g. now=.")
    parser.add_argument("--late_model", default="",
                        help="a trained model folder (lesson 02's runs/.../model)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per version and start")
    parser.add_argument("--device", default="cpu",
                        help="cpu (one thread) or cuda: on a GPU every piece is timed between two "
                             "synchronisations, so it is the GPU's time")
    parser.add_argument("--model", default="tiny",
                        help="tiny, smollm2, or any --model of the lessons")
    parser.add_argument("--sft_steps", type=int, default=-1,
                        help="pi_sft's SFT steps (default: the lesson's, its PRETRAINED value "
                             "for a pretrained model)")
    args = parser.parse_args()
    if any("=" not in v for v in args.versions):
        sys.exit(f"error: versions are LABEL=REPO_FOLDER, got {args.versions}: e.g. now=.")
    if args.device == "cpu":
        torch.set_num_threads(1)
    current = {"pieces": collections.defaultdict(float)}  # piece -> seconds in the step being timed

    def clock():  # wall time once the GPU has finished what it was given (CUDA runs asynchronously)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter()

    def timed(f, piece):  # piece None: pi_ref's pass when no gradient is recorded, else pi_theta's
        def wrapper(*a, **k):
            start = clock()
            out = f(*a, **k)
            key = piece or ("pi_theta" if torch.is_grad_enabled() and k.get("grad", True)
                            else "pi_ref")
            current["pieces"][key] += clock() - start
            return out
        return wrapper

    versions = {}
    for label, repo in (v.split("=", 1) for v in args.versions):
        common = load_module(f"{repo}/common.py", f"common_{label}")
        sys.modules["common"] = common  # the lesson file imports `common`: this version's
        task_v = common  # and `task` where the task has a module of its own (since task.py)
        if Path(f"{repo}/task.py").exists():
            task_v = sys.modules["task"] = load_module(f"{repo}/task.py", f"task_{label}")
        # and `plumbing` where that version has one (earlier versions kept it all in common.py)
        has_plumbing = Path(f"{repo}/plumbing.py").exists()
        plumbing_v = (load_module(f"{repo}/plumbing.py", f"plumbing_{label}") if has_plumbing
                      else common)
        sys.modules["plumbing"] = plumbing_v
        lesson = load_module(f"{repo}/02_grpo_outcome.py", f"lesson02_{label}")
        # the lesson calls token_logprobs_by_length where it exists (which calls token_logprobs):
        # time the outer call (since task.py: token_logprobs is the one entry point)
        log_probs = ("token_logprobs_by_length" if hasattr(common, "token_logprobs_by_length")
                     else "token_logprobs")
        common.sample = timed(common.sample, "sample")
        setattr(common, log_probs, timed(getattr(common, log_probs), None))
        versions[label] = (common, lesson, plumbing_v, task_v)
    torch.Tensor.backward = timed(torch.Tensor.backward, "backward")

    from transformers import AutoModelForCausalLM
    common, lesson, plumbing, _ = versions[list(versions)[-1]]
    device = plumbing.resolve_device(args.device)
    pretrained_sft = getattr(lesson, "PRETRAINED", {}).get("sft_steps", plumbing.SFT_STEPS)
    sft_steps = args.sft_steps if args.sft_steps >= 0 else (
        plumbing.SFT_STEPS if args.model == "tiny" else pretrained_sft)
    ref_policy, tokenizer = plumbing.load_policy(args.model, sft_steps, device)
    ref_policy.eval().requires_grad_(False)
    for start_from in ["pi_sft"] + ([args.late_model] if args.late_model else []):
        policies, rows = {}, {}
        for label in versions:
            if start_from == "pi_sft":
                policy = copy.deepcopy(ref_policy)
            else:
                late = AutoModelForCausalLM.from_pretrained(start_from, dtype=torch.float32)
                policy = plumbing._prepare(late, tokenizer, device)
            optimizer = torch.optim.Adam(policy.parameters(), lr=1e-4)
            policies[label] = (policy.requires_grad_(True), optimizer)
            rows[label] = collections.defaultdict(list)
        for step in range(args.steps + 1):  # step 0 is a warm-up
            for label, (common_v, lesson, _, task_v) in versions.items():
                pieces = current["pieces"] = collections.defaultdict(float)
                common_v.set_seed(step)
                questions = task_v.train_problems(step)
                problems = [next(questions) for _ in range(16)]
                policy, optimizer = policies[label]
                start = clock()
                lesson.grpo_step(policy, ref_policy, tokenizer, optimizer, problems, lesson.Args())
                total = clock() - start
                if step:
                    for key in ("sample", "pi_ref", "pi_theta", "backward"):
                        rows[label][key].append(pieces[key])
                    rows[label]["rest"].append(total - sum(pieces.values()))
                    rows[label]["step"].append(total)
        for label in versions:
            medians = {key: f"{statistics.median(v):.3f} s" for key, v in rows[label].items()}
            print(f"from {start_from}, {label}: {medians}", flush=True)


if __name__ == "__main__":
    main()
