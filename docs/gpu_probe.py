"""The GPU probe of issue 31: what the real-model lane's estimate rests on, measured in one command
of at most about 5 minutes, with no model file (a random-weight SmolLM2: its architecture written
below, the course's character tokenizer; its outputs are noise that runs to the token limit, the
worst case for time).

    python docs/gpu_probe.py                # on a GPU; writes runs/gpu_probe.json
    python docs/gpu_probe.py --smoke        # the same path on the CPU, 2 layers, tiny (the tests)

1. sampling: seconds per decoded token, common.sample's token loop vs sample_static eager vs
   sample_static with its CUDA graph, at 16 .. 1,600 rows, matmuls in fp32 and in TF32;
2. a lesson 02 step (3 steps, the best of the last two) at micro-batches of 16 and whole batches,
   TRL's GRPOTrainer on the same settings and model (docs/trl_grpo.py), with each one's peak memory;
3. whether processes add up: 3 lesson 02 processes at once against one alone.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import common  # noqa: E402
import plumbing  # noqa: E402
import task  # noqa: E402

# SmolLM2-135M-Instruct's architecture (its config.json): the weights are random
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True,
               rms_norm_eps=1e-5, max_position_embeddings=8192, rope_theta=100000.0)


def random_smollm2(folder: Path, layers: int) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = plumbing.build_char_tokenizer()
    config = LlamaConfig(**{**SMOLLM2, "num_hidden_layers": layers},
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def clock(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def decode_rates(model, tokenizer, rows_list, tokens: int, device) -> list:
    """Seconds per decoded token of each sampler at each number of rows (a warm-up call first)."""
    samplers = {"static, eager": lambda p: common.sample_static(model, tokenizer, p, 1, 1.0,
                                                               tokens)}
    if device.type == "cuda":  # sample() is the captured path there; the loop's cost on a GPU is
        samplers["static, CUDA graph"] = lambda p: common.sample_static(  # about the eager one's
            model, tokenizer, p, 1, 1.0, tokens, capture=True)
    else:
        samplers["token loop"] = lambda p: common.sample(model, tokenizer, p, 1, 1.0, tokens)
    out = []
    for precision in (("fp32", "tf32") if device.type == "cuda" else ("fp32",)):
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        for rows in rows_list:
            prompts = [task.prompt_text(p) for p in task.make_split("test", rows)]
            for name, run in samplers.items():
                run(prompts)
                t0 = clock(device)
                batch = run(prompts)
                seconds = (clock(device) - t0) / batch.completion_ids.shape[1]
                out.append({"precision": precision, "rows": rows, "sampler": name,
                            "s_per_token": seconds})
                print(f"{precision} {rows:5d} rows {name:18s} {1000 * seconds:8.2f} ms/token",
                      flush=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    return out


def step_rates(script: str, model: str, extra: list, out: Path, copies: int, env: dict) -> dict:
    """`copies` processes of a script at once, each a few steps: the median of each one's steps
    after its first (s/step), its peak memory, the wall time."""
    folders = [out / f"{Path(script).stem}-{i}" for i in range(copies)]
    t0 = time.time()
    procs = [subprocess.Popen([sys.executable, str(REPO / script), "--model", model,
                               "--sft_steps", "0", "--eval_test", "0", "--eval_ood", "0",
                               "--k", "0", "--out_dir", str(f)] + extra, cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for f in folders]
    errors = [p.communicate()[1] for p in procs]
    result = {"script": script, "extra": extra, "copies": copies, "wall": time.time() - t0}
    for f, p, err in zip(folders, procs, errors):
        if p.returncode:
            raise SystemExit(f"{script} {' '.join(extra)} failed:\n{err[-2000:]}")
        records = [json.loads(x) for x in (f / "metrics.jsonl").read_text().splitlines()]
        steps = [r["step_time"] for r in records if "step_time" in r]
        result.setdefault("s_per_step", []).append(statistics.median(steps[1:] or steps))
        result.setdefault("memory", []).append(records[-1].get("memory"))
    print(json.dumps(result), flush=True)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, 2 layers, tiny settings")
    parser.add_argument("--out", default="runs/gpu_probe.json", help="where the results go")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if not args.smoke and device.type != "cuda":
        plumbing.fail("no GPU: the probe is for a GPU; --smoke runs its path on the CPU")
    started = time.time()
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": os.environ.get(
        "OMP_NUM_THREADS", "1"), "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE": "0"}
    result = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "env TORCH_ALLOW_TF32_CUBLAS_OVERRIDE":
              os.environ.get("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE"),
              "allow_tf32 at start": torch.backends.cuda.matmul.allow_tf32,
              "float32_matmul_precision at start": torch.get_float32_matmul_precision()}
    print(json.dumps(result), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = random_smollm2(tmp / "model", 2 if args.smoke else 30)
        policy, tokenizer = plumbing.load_policy(model, 0, device, tmp / "cache")
        rows, tokens = ([4], 8) if args.smoke else ([16, 128, 512, 1600], 32)
        result["decode"] = decode_rates(policy, tokenizer, rows, tokens, device)
        del policy
        tiny = (["--steps", "1", "--batch_size", "2", "--group_size", "2", "--max_new_tokens",
                 "8", "--device", "cpu"] if args.smoke else ["--steps", "3", "--device", "cuda"])
        env["PPO_GRPO_CACHE"] = str(tmp / "cache")
        runs = [("02_grpo_outcome.py", ["--micro_batch_size", "16"], 1),
                ("02_grpo_outcome.py", ["--micro_batch_size", "0"], 1),
                ("02_grpo_outcome.py", ["--micro_batch_size", "0"], 3),
                ("docs/trl_grpo.py", [], 1)]
        if args.smoke:  # the path, once: two processes at once (TRL's script has its own tests)
            runs = [("02_grpo_outcome.py", ["--micro_batch_size", "0"], 2)]
        result["steps"] = [step_rates(script, model, extra + tiny, tmp / "runs", copies, env)
                           for script, extra, copies in runs]
    result["seconds"] = time.time() - started
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out} in {result['seconds']:.0f} s")
    return result


if __name__ == "__main__":
    main()
