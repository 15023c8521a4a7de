"""The one shared helper of the course: what every lesson needs to do RL and none of them teaches.
No RL algorithm is in here: each lesson file holds its whole algorithm.
- the task: chained arithmetic, one step per line, a final `#### answer` line, checked exactly
- `sample`: G completions per prompt, token by token with the KV cache, all rows in one batch
- `token_logprobs`: log pi(o_t | q, o_<t) of every completion token in one forward pass
- `micro_batches`: the rows of each forward/backward pass of gradient accumulation
- `evaluate`: greedy accuracy, Maj@K and Pass@K on the test split, greedy out of distribution
Loading models, the SFT warm start, the command line and reports: plumbing.py (no need to open).
"""

import functools
import math
import random
import re
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ANSWER_ONLY_SHARE = 0.6  # share of SFT demonstrations that give the final answer line alone

# --------------------------------------------------------------------------------------------------
# The task: "7+5*3-9" is computed left to right, one operation per line, like a pocket calculator:
#     prompt      7+5*3-9\n
#     completion  7+5=12\n12*3=36\n36-9=27\n#### 27\n<eos>
#
# Every intermediate value stays in 0..99, every operand is one digit. The final line uses GSM8K's
# "#### answer" mark. Step j of the paper (process supervision) is line j; it ends at its newline.

TRAIN_OPS = (2, 4)  # operations per problem in the train and test splits (inclusive range)
OOD_OPS = (5, 6)  # longer chains, never seen in training: the out-of-distribution split
TEST_SEED, OOD_SEED = 1_000_003, 2_000_003
MAX_VALUE = 99


def make_problem(rng: random.Random, num_ops: int) -> dict:
    """One problem: a start value and `num_ops` (operator, operand) pairs, values in 0..99."""
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


def prompt_text(problem: dict) -> str:
    return problem["question"] + "\n"


def answer_only_text(problem: dict) -> str:
    """The short demonstration: the final-answer line with no working shown."""
    return f"#### {problem['answer']}\n"


def sft_demonstration(problem: dict, rng: random.Random) -> str:
    """A draw from the SFT data P_sft(O|q): the answer line alone with probability
    ANSWER_ONLY_SHARE, else the worked solution."""
    return answer_only_text(problem) if rng.random() < ANSWER_ONLY_SHARE else solution_text(problem)


def solution_text(problem: dict) -> str:
    """The demonstration: one line per operation, then the answer line (tokenizers add EOS)."""
    lines, value = [], problem["start"]
    for op, b in problem["ops"]:
        c = apply_op(value, op, b)
        lines.append(f"{value}{op}{b}={c}")
        value = c
    return "\n".join(lines) + f"\n#### {value}\n"


STEP_RE = re.compile(r"([0-9]{1,4})([+\-*])([0-9]{1,4})=(-?[0-9]{1,4})")  # ASCII: "２７" isn't 27
ANSWER_RE = re.compile(r"#### (-?[0-9]{1,4})")


def split_lines(text: str) -> list[str]:
    """The steps of a completion: its lines; a last line without a newline still counts."""
    lines = text.split("\n")
    return lines[:-1] if lines[-1] == "" else lines


def verify(problem: dict, text: str) -> dict:
    """Grade a completion. Never raises, whatever the text.

    Returns {"correct": final answer right, "answer": the int after the first "####" or None,
    "steps": one bool per line of the text, "missing": the solution's steps the text never wrote}.
    A line is a correct step when it is "a<op>b=c" with a the previous line's result (the start
    value for line 1), <op>b the problem's operation of that line, and c = a<op>b exactly; the first
    "#### n" line is correct when n is the answer. The solution ends there: any line after it is a
    wrong step. "missing": the operations not written before the answer line, plus the answer line
    if there is none (a solution cut short is charged for what it left out).
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
        m, ok = STEP_RE.fullmatch(line), False
        if m and j < len(problem["ops"]):
            a, op, b, c = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
            ok = (a == prev and (op, b) == problem["ops"][j] and c == apply_op(a, op, b))
            prev = c
        steps.append(ok)
        worked += 1
    missing = max(0, len(problem["ops"]) - worked) + (answer is None)
    correct = answer is not None and answer == problem["answer"]
    return {"correct": correct, "answer": answer, "steps": steps, "missing": missing}


def set_seed(seed: int):
    random.seed(seed)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------------
# Sampling and log-probs


@dataclass
class Batch:
    """Prompts and completions, the layout every lesson trains on. Row i*G + g is the g-th
    completion of prompt i. Prompts are left-padded, completions right-padded."""
    prompt_ids: torch.Tensor  # [N, P] left-padded
    prompt_mask: torch.Tensor  # [N, P] 1 on real prompt tokens
    completion_ids: torch.Tensor  # [N, T]
    completion_mask: torch.Tensor  # [N, T] 1 up to and including the first EOS
    texts: list  # N decoded completions, without the EOS
    step_ends: list  # N lists: the completion position where each line (step) ends

    def __len__(self):
        return self.completion_ids.shape[0]

    def select(self, rows) -> "Batch":
        """The rows `rows` (a list or a tensor of indices) of the batch, in that order."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.completion_ids.device)
        rows = idx.tolist()
        return Batch(self.prompt_ids[idx], self.prompt_mask[idx], self.completion_ids[idx],
                     self.completion_mask[idx], [self.texts[i] for i in rows],
                     [self.step_ends[i] for i in rows])


@functools.lru_cache(maxsize=None)
def _piece(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def _finish(tokenizer, prompt_ids, prompt_mask, completion_ids) -> Batch:
    """Completion mask up to and including the first EOS; texts and step ends from the tokens."""
    is_eos = completion_ids == tokenizer.eos_token_id  # [N, T]
    T = completion_ids.shape[1]
    no_eos = torch.full_like(is_eos[:, 0], T, dtype=torch.long)
    first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), no_eos)  # [N]
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
    eos = [tokenizer.eos_token_id]
    rows = [tokenizer(c, add_special_tokens=False)["input_ids"] + eos for c in completions]
    T = max(len(r) for r in rows)
    completion_ids = torch.full((len(rows), T), tokenizer.pad_token_id, dtype=torch.long)  # [N, T]
    for i, r in enumerate(rows):
        completion_ids[i, :len(r)] = torch.tensor(r)
    return _finish(tokenizer, enc["input_ids"].to(device), enc["attention_mask"].to(device),
                   completion_ids.to(device))


def _cache_argument(model) -> str:
    """The name under which this transformers passes the KV cache to forward ("cache" from 5.2x)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], group_size: int = 1, temperature: float = 1.0,
           max_new_tokens: int = 64, greedy: bool = False) -> Batch:
    """G completions per prompt, token by token with the KV cache, all rows in one batch.

    The prompt's keys and values are computed once and repeated G times. Each step draws
    o_t ~ softmax(logits / temperature) over the whole vocabulary (no top-k, no top-p): exactly the
    pi_theta of token_logprobs, so the ratios pi_theta / pi_old start at 1. A row that has written
    EOS leaves the batch and its cache. The draws are `generate`'s on the G-times repeated prompts
    under the same seed, token for token (tests/test_common.py checks it); greedy: the argmax.
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left").to(device)
    was_training = model.training
    model.eval()
    cache = DynamicCache(config=model.config)
    kv = {_cache_argument(model): cache, "use_cache": True}
    position_ids = (enc["attention_mask"].cumsum(1) - 1).clamp(min=0)  # [B, P]
    logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                   position_ids=position_ids, logits_to_keep=1, **kv).logits[:, -1]
    logits = logits.float().repeat_interleave(group_size, 0)  # [n, V]: n rows still writing
    cache.batch_repeat_interleave(group_size)
    prompt_ids = enc["input_ids"].repeat_interleave(group_size, 0)  # [N, P], N = B*G
    prompt_mask = mask = enc["attention_mask"].repeat_interleave(group_size, 0)  # [N, P]
    N, position = mask.shape[0], mask.sum(1) - 1  # [N] each row's last prompt position
    completion_ids = torch.full((N, max_new_tokens), tokenizer.pad_token_id, dtype=torch.long,
                                device=device)  # [N, T]
    writing = torch.arange(N, device=device)  # [n] the rows that have not written EOS yet
    scores = torch.zeros(N, logits.shape[-1], device=device)  # [N, V]; done rows' draws are dropped
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
            writing, token, mask = writing[still], token[still], mask[still]
            position = position[still]
            cache.batch_select_indices(still.nonzero().squeeze(1))
        mask = torch.cat([mask, mask.new_ones(len(mask), 1)], 1)  # [n, P+t+1]
        position = position + 1
        logits = model(input_ids=token[:, None], attention_mask=mask,
                       position_ids=position[:, None], **kv).logits[:, -1].float()  # [n, V]
    model.train(was_training)
    return _finish(tokenizer, prompt_ids, prompt_mask, completion_ids[:, :t + 1])


def token_logprobs(model, batch: Batch, temperature: float = 1.0) -> torch.Tensor:
    """log pi(o_t | q, o_<t) for every completion token, one forward pass; 0 where masked.  # [N, T]

    Position ids come from the attention mask so left padding does not shift them; the logits are
    divided by the sampling temperature: the log-probs of the distribution that sampled."""
    input_ids = torch.cat([batch.prompt_ids, batch.completion_ids], 1)  # [N, P+T]
    attention_mask = torch.cat([batch.prompt_mask, batch.completion_mask], 1)  # [N, P+T]
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=False).logits
    P = batch.prompt_ids.shape[1]
    logits = logits[:, P - 1:-1].float() / temperature  # [N, T, V]: position P-1 predicts token 0
    logp = torch.gather(F.log_softmax(logits, -1), 2, batch.completion_ids.unsqueeze(-1))
    return logp.squeeze(-1) * batch.completion_mask


def token_logprobs_by_length(model, batch: Batch, temperature: float = 1.0,
                             buckets: int = 4) -> torch.Tensor:
    """token_logprobs in `buckets` passes over rows sorted by length, each cut to its longest row:
    the same log-probs (up to rounding) without the padding a long row forces on all.  # [N, T]"""
    P = batch.prompt_ids.shape[1]
    prompt_len, completion_len = batch.prompt_mask.sum(1), batch.completion_mask.sum(1)  # [N]
    logp = torch.zeros(batch.completion_ids.shape, device=batch.completion_ids.device)  # [N, T]
    for rows in torch.argsort(prompt_len + completion_len).chunk(buckets):
        p, c = int(prompt_len[rows].max()), int(completion_len[rows].max())  # prompts: left-padded
        part = Batch(batch.prompt_ids[rows, P - p:], batch.prompt_mask[rows, P - p:],
                     batch.completion_ids[rows, :c], batch.completion_mask[rows, :c], [], [])
        logp[rows, :c] = token_logprobs(model, part, temperature)  # [len(rows), c]
    return logp


def micro_batches(batch: Batch, size: int) -> list[torch.Tensor]:
    """The rows of each forward/backward pass of gradient accumulation: chunks of at most `size`
    outputs, rows of similar length together. size 0 (or >= the batch): one chunk, every row."""
    if size <= 0 or size >= len(batch):
        return [torch.arange(len(batch), device=batch.completion_ids.device)]
    lengths = batch.prompt_mask.sum(1) + batch.completion_mask.sum(1)  # [N]
    return list(torch.argsort(lengths, stable=True).split(size))


@torch.no_grad()
def no_grad_pass(per_token, model, batch: Batch, micro_batch_size: int, *args) -> torch.Tensor:
    """per_token(model, rows of batch, *args) ([n, T]) for every micro-batch of at most
    micro_batch_size outputs (0: all at once), with no graph: the log-probs of a frozen model
    (pi_ref) or of the policy that sampled (pi_old), or a value model's values.  # [N, T]"""
    out = torch.zeros(batch.completion_ids.shape, device=batch.completion_ids.device)  # [N, T]
    for rows in micro_batches(batch, micro_batch_size):
        out[rows] = per_token(model, batch.select(rows), *args)
    return out


def token_logprobs_no_grad(model, batch: Batch, temperature: float = 1.0,
                           micro_batch_size: int = 0) -> torch.Tensor:
    """token_logprobs_by_length with no graph, micro-batched (lessons 02-04's pi_ref).  # [N, T]"""
    return no_grad_pass(token_logprobs_by_length, model, batch, micro_batch_size, temperature)


# --------------------------------------------------------------------------------------------------
# Evaluation


def majority_correct(problem: dict, texts: list[str]) -> bool:
    """Maj@K: the most frequent final answer among K samples (first seen wins a tie) is right."""
    answers = [verify(problem, t)["answer"] for t in texts]
    answers = [a for a in answers if a is not None]
    return bool(answers) and Counter(answers).most_common(1)[0][0] == problem["answer"]


@torch.no_grad()
def evaluate(model, tokenizer, n_test: int = 200, n_ood: int = 200, k: int = 8,
             temperature: float = 1.0, max_new_tokens: int = 64, chunk: int = 256) -> dict:
    """Greedy accuracy, Maj@K and Pass@K (K samples at `temperature`) on test; greedy on OOD."""
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
def maj_pass_curve(model, tokenizer, problems: list, ks: list, temperature: float = 0.7,
                   max_new_tokens: int = 64, chunk: int = 256) -> dict:
    """Maj@K and Pass@K for every K in ks, from N = max(ks) samples per problem (paper's Figure 7).

    Pass@K: the unbiased 1 - C(N-c, K) / C(N, K) from the c right samples among N; Maj@K: the
    mean of majority_correct over the N // K disjoint blocks of K samples. {"maj@K", "pass@K"}.
    """
    N = max(ks)
    right, blocks = [], {k: [] for k in ks}
    per_chunk = max(1, chunk // N)
    for i in range(0, len(problems), per_chunk):
        part = problems[i:i + per_chunk]
        out = sample(model, tokenizer, [prompt_text(p) for p in part], group_size=N,
                     temperature=temperature, max_new_tokens=max_new_tokens)
        for j, p in enumerate(part):
            texts = out.texts[j * N:(j + 1) * N]
            right.append(sum(verify(p, t)["correct"] for t in texts))
            for k in ks:
                majority = [majority_correct(p, texts[b * k:(b + 1) * k]) for b in range(N // k)]
                blocks[k].append(sum(majority) / (N // k))
    result = {}
    for k in ks:
        result[f"maj@{k}"] = sum(blocks[k]) / len(problems)
        pass_k = [1 - math.comb(N - c, k) / math.comb(N, k) for c in right]
        result[f"pass@{k}"] = sum(pass_k) / len(problems)
    return result
