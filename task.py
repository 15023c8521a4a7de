"""The task every lesson trains on, as its definition: chained arithmetic, one operation per line,
a final `#### answer` line, checked exactly.
- the problems: a seeded generator, the endless train split, the fixed test and OOD splits
- prompts and the SFT demonstrations P_sft(O|q) (worked, or the answer line alone)
- `verify`: the reward's meaning, outcome correctness and the correctness of every step
- `evaluate`: greedy accuracy, Maj@K and Pass@K on the test split, greedy out of distribution;
  `maj_pass_curve`: Maj@K and Pass@K for several K (the paper's Figure 7, lesson 02)
Sampling and log-probs: common.py. Models, the command line and run folders: plumbing.py.
"""

import math
import random
import re
from collections import Counter

import torch

import common

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
            out = common.sample(model, tokenizer, [prompt_text(p) for p in part], greedy=True,
                         max_new_tokens=max_new_tokens)
            correct += [verify(p, t)["correct"] for p, t in zip(part, out.texts)]
        result[f"{split}_greedy"] = sum(correct) / n
        if split == "test" and k > 0:
            maj, any_right = [], []
            per_chunk = max(1, chunk // k)
            for i in range(0, n, per_chunk):
                part = problems[i:i + per_chunk]
                out = common.sample(model, tokenizer, [prompt_text(p) for p in part], group_size=k,
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
        out = common.sample(model, tokenizer, [prompt_text(p) for p in part], group_size=N,
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
