"""Lesson 04: iterative GRPO with a learned reward model and 10% replay (DeepSeekMath, sections 4.1 and 5.2).

Lessons 01 to 03 reward the policy with the task's exact verifier. The paper's reward is a learned
model r_phi, and a learned model is only right about outputs like the ones it was trained on. As the
policy moves, its outputs drift away from that data, r_phi's scores stop meaning "correct", and the
policy learns to please r_phi instead of solving the problem (over-optimisation). Algorithm 1 of the
paper answers with iterations: after M GRPO steps, r_phi is trained again on the policy's own new
samples, with 10% of historical data replayed so it does not forget, and the reference pi_ref is reset
to the current policy so the KL term keeps the next iteration close to where it starts.

Algorithm 1 (the line numbers are in the comments of main()):

    1  pi_theta <- pi_init
    2  for iteration = 1..I:
    3      pi_ref <- pi_theta
    4      for step = 1..M:
    5          sample a batch D_b from D
    6          pi_old <- pi_theta
    7          sample G outputs {o_i} ~ pi_old(.|q) for each q in D_b
    8          compute rewards {r_i} for each o_i by running r_phi
    9          compute A_{i,t} by group relative advantage estimation
    10         for GRPO iteration = 1..mu: update pi_theta by maximising J_GRPO
    11     update r_phi by continuous training with a replay mechanism:
           new training data made from the policy's samples, plus 10% historical data

The reward model r_phi (outcome supervision): the policy's own architecture with a scalar head
(transformers' AutoModelForTokenClassification with one label), read at the last token of the output
(its EOS), r_phi(q, o) = sigmoid(logit) = the predicted probability that o's final answer is right.
It is trained with binary cross-entropy against the verifier's label; its first training set is
outputs of the SFT model. The verifier labels r_phi's training data and grades the policy for the
logs; the policy's update never sees it.

Line 9, outcome supervision: r~_i = (r_i - mean(r)) / std(r) within the group, A_{i,t} = r~_i.
--scale_rewards none drops the division by std (as "Dr. GRPO" does): A_{i,t} = r_i - mean(r). With the
verifier's 0/1 rewards the two differ only in scale. With r_phi they do not: its rewards are
probabilities that often differ little within a group (0.42, 0.45, 0.47, ...), and dividing by
their std turns those differences, mostly r_phi's noise, into advantages of full size; without it an
advantage is as large as r_phi's confidence in the difference.

Line 10, eq. (3), the GRPO objective:

    J_GRPO(theta) = E[ 1/G sum_i 1/|o_i| sum_t { min( ratio_{i,t} A_{i,t},
                                                      clip(ratio_{i,t}, 1-eps, 1+eps) A_{i,t} )
                                                 - beta * D_KL[pi_theta || pi_ref] } ]
    ratio_{i,t} = pi_theta(o_{i,t} | q, o_{i,<t}) / pi_old(o_{i,t} | q, o_{i,<t})

eq. (4), the k3 estimator:  D_KL[pi_theta || pi_ref] = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1

--frozen_rm is the comparison: r_phi is trained once on SFT samples and never again, and pi_ref stays
the SFT model (lines 3 and 11 run only before the first iteration), for the same I x M policy updates.

Logged after every iteration, on fresh samples of the current policy for held-out (test) questions:
r_phi's accuracy (agreement with the verifier) before and after its update, the mean reward r_phi
gives, and the true accuracy; plus greedy test accuracy. A mean reward that climbs while the true
accuracy does not is over-optimisation.

Run:  python 04_iterative_grpo.py              (iterative, the paper's Algorithm 1)
      python 04_iterative_grpo.py --frozen_rm  (the same policy updates with r_phi frozen)
      python 04_iterative_grpo.py --iterations 6 --steps 10 --scale_rewards none --eval_ood 0 --k 0
                                                (the 3-seed comparison; add --frozen_rm)
      python 04_iterative_grpo.py --model smollm2   (the real model, for a GPU: docs/real_model.md)
Each prints a before/after table and a table per iteration, and writes
runs/04_iterative_grpo/<iterative|frozen>-seed<seed>/metrics.jsonl, the policy and r_phi beside it.

What to expect (docs/04_iterative_grpo.md, 2-core CPU). First the defaults, which collapse: with
I = 3, M = 20 and the paper's std scaling, `python 04_iterative_grpo.py` (seed 0) goes from 45.0% greedy
test accuracy to 60.5% after iteration 1 and to 4.0% at the end (--frozen_rm: 0.5%). The policy learns
to please r_phi: the frozen r_phi's mean reward reaches 85.3% while the true accuracy of the same
samples is 1.6% (re-trained r_phi: 46.2% against 5.1%). That is the lesson's first observation, a learned reward
exploited. The third command is the regime in which Algorithm 1 does what it is for (3 seeds): the
frozen r_phi is over-optimised (its mean reward 44 -> 65% while the true accuracy goes 42 -> 35%), and
re-training keeps r_phi's over-estimate at 10-15 points against 24-33 frozen, on every seed. The policy
does not gain from it here: final greedy test, iterative - frozen, +0.5 ± 4.4 points (inconclusive);
both peak after the first iteration (83-87%) and fall after. r_phi is the limit: on the policy's
samples it is right 56-70% of the time, about what always answering "wrong" would score.
"""

import copy
import random
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

import common
import plumbing


@dataclass
class Args:
    model: str = field(default="tiny", metadata={"help": "'tiny' (built in), 'smollm2' (the course's real model, "
                                                        "SmolLM2-135M-Instruct), a causal LM folder, a .gguf "
                                                        "file or a hub id"})
    sft_steps: int = field(default=plumbing.SFT_STEPS, metadata={"help": "SFT warm-start steps that make pi_sft (cached)",
                                                               "min": 0})
    seed: int = field(default=0, metadata={"help": "seed of the train problems, sampling and init", "min": 0,
                                           "below": 2**32, "must": f"use a seed in 0 .. {2**32 - 1}"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    iterations: int = field(default=3, metadata={"help": "I: outer iterations of Algorithm 1", "min": 1})
    steps: int = field(default=20, metadata={"help": "M: GRPO steps (sampled batches) per iteration", "min": 1})
    batch_size: int = field(default=16, metadata={"help": "questions per step", "min": 1})
    group_size: int = field(default=8, metadata={"help": "G: outputs sampled per question", "min": 2, "must":
                                                 "GRPO needs at least 2 outputs per question to form a baseline"})
    lr: float = field(default=1e-4, metadata={"help": "Adam learning rate of the policy", "above": 0,
                                              "must": "the learning rate must be finite and > 0"})
    warmup_steps: int = field(default=20, metadata={"help": "linear learning-rate warm-up of the policy over its "
                                                            "first updates (once, not every iteration)", "min": 0})
    beta: float = field(default=0.04, metadata={"help": "KL coefficient beta of eq. (3)", "min": 0,
                                                "must": "the KL coefficient must be >= 0"})
    clip_eps: float = field(default=0.2, metadata={"help": "clip range epsilon of eq. (3)", "min": 0, "below": 1,
                                                   "must": "the clip range must be in [0, 1)"})
    mu: int = field(default=1, metadata={"help": "GRPO iterations per sampled batch (1 in the paper)", "min": 1,
                                         "must": "at least one GRPO iteration per batch"})
    temperature: float = field(default=1.0, metadata={
        "help": "sampling temperature (log-probs use the same)", "above": 0,
        "must": "must be > 0 (GRPO samples, it does not decode greedily)"})
    max_new_tokens: int = field(default=64, metadata={"help": "longest completion", "min": 1})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (policy and r_phi)", "above": 0,
                                                        "must": "the gradient-norm limit must be > 0"})
    scale_rewards: str = field(default="group", metadata={"help": "line 9: group (divide by the group's std, the "
                                                                  "paper) or none (r_i - mean(r) only, Dr. GRPO)",
                                                          "choices": ("group", "none"),
                                                          "must": "use group (the paper) or none"})
    frozen_rm: bool = field(default=False, metadata={"help": "the comparison: never re-train r_phi, never reset pi_ref"})
    rm_lr: float = field(default=3e-4, metadata={"help": "Adam learning rate of the reward model r_phi", "above": 0,
                                                 "must": "the learning rate must be finite and > 0"})
    rm_batch_size: int = field(default=64, metadata={"help": "outputs per r_phi training step", "min": 1})
    rm_init_questions: int = field(default=128, metadata={
        "help": "questions whose G SFT samples are r_phi's first training set", "min": 1})
    rm_init_steps: int = field(default=100, metadata={
        "help": "r_phi training steps on the SFT samples, before iteration 1", "min": 0})
    rm_steps: int = field(default=50, metadata={
        "help": "r_phi training steps at the end of each iteration (line 11)", "min": 0})
    replay_fraction: float = field(default=0.1, metadata={
        "help": "share of each r_phi batch drawn from earlier iterations' data", "min": 0, "below": 1,
        "must": "must be in [0, 1) (some of each batch must be new data)"})
    rm_eval_questions: int = field(default=64, metadata={
        "help": "test questions whose G fresh samples measure r_phi per iteration", "min": 1})
    eval_test: int = field(default=200, metadata={
        "help": "test problems evaluated (greedy every iteration, full table before/after)", "min": 1,
        "must": "must be >= 1 (greedy test accuracy is logged every iteration)"})
    eval_ood: int = field(default=200, metadata={"help": "out-of-distribution (longer) problems evaluated", "min": 0})
    k: int = field(default=8, metadata={"help": "K of Maj@K and Pass@K", "min": 0})
    out_dir: str = field(default="", metadata={"help": "where metrics.jsonl and the models go "
                                                        "(default runs/04_iterative_grpo/<mode>-seed<seed>)"})
    cache_dir: str = field(default="", metadata={"help": "where SFT models are cached (default ./cache)"})


# Settings for a pretrained model (--model smollm2, a folder, a .gguf file or a hub id): each replaces the
# default above unless its flag is given. The tiny model's SFT (800 steps at lr 1e-3) is made for random
# weights; 200 steps teach a pretrained model the answer format. Lesson 02's SFT warm start; the rest as for
# the tiny model, not yet probed.
PRETRAINED = {"sft_steps": 200}


# ----------------------------------------------------------------------------------------------------
# The reward model r_phi


def load_reward_model(policy, device):
    """r_phi: the policy's architecture and weights (the SFT model) with a fresh scalar head."""
    from transformers import AutoModelForTokenClassification

    try:
        reward_model = AutoModelForTokenClassification.from_pretrained(policy.name_or_path, num_labels=1,
                                                                       dtype=torch.float32)
    except (ValueError, KeyError) as e:
        plumbing.fail(f"{policy.name_or_path} has no token-classification head in transformers ({e}): "
                    "the reward model needs one")
    reward_model.config.pad_token_id = policy.config.pad_token_id
    return reward_model.to(device).eval()


def rm_logits(reward_model, prompt_ids, prompt_mask, completion_ids, completion_mask) -> torch.Tensor:
    """The logit of r_phi(q, o) for each row: the scalar head read at the last completion token.  # [N]

    The last completion token is the EOS when the output has one (the mask runs up to and including
    it), else the last token generated. Position ids come from the mask, as in common.token_logprobs.
    """
    input_ids = torch.cat([prompt_ids, completion_ids], 1)  # [N, P+T]
    attention_mask = torch.cat([prompt_mask, completion_mask], 1)  # [N, P+T]
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    logits = reward_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).logits[..., 0]  # [N, P+T]
    last = prompt_ids.shape[1] + completion_mask.sum(1) - 1  # [N]
    return logits[torch.arange(len(last), device=logits.device), last].float()


@torch.no_grad()
def rm_rewards(reward_model, batch: common.Batch) -> torch.Tensor:
    """Line 8: r_i = r_phi(q, o_i) = sigmoid(logit), r_phi's probability that o_i is right.  # [N]"""
    reward_model.eval()  # no dropout when scoring
    return torch.sigmoid(rm_logits(reward_model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                   batch.completion_mask))


def examples_from_batch(batch: common.Batch, labels: list) -> list:
    """r_phi's training data: (prompt tokens, completion tokens, verifier label) of each sampled output.

    Tokens, not texts, are kept, so r_phi trains on exactly the sequences it scored (a decoded text need
    not encode back to the same tokens).
    """
    # One copy to the host per tensor, not several per row (each .tolist() or int() of a GPU tensor waits for it)
    prompt_ids, prompt_mask = batch.prompt_ids.tolist(), batch.prompt_mask.tolist()  # [N, P] each
    completion_ids = batch.completion_ids.tolist()  # [N, T]
    lengths = batch.completion_mask.sum(1).tolist()  # [N]: tokens up to and including the EOS
    examples = []
    for i, label in enumerate(labels):
        prompt = [t for t, m in zip(prompt_ids[i], prompt_mask[i]) if m]
        examples.append({"prompt": prompt, "completion": completion_ids[i][:lengths[i]], "label": float(label)})
    return examples


def collate(examples: list, pad_id: int, device):
    """Stored examples as tensors: prompts left-padded, completions right-padded, as in a Batch."""
    N = len(examples)
    P = max(len(e["prompt"]) for e in examples)
    T = max(len(e["completion"]) for e in examples)
    prompt_ids = torch.full((N, P), pad_id, dtype=torch.long)  # [N, P]
    prompt_mask = torch.zeros((N, P), dtype=torch.long)  # [N, P]
    completion_ids = torch.full((N, T), pad_id, dtype=torch.long)  # [N, T]
    completion_mask = torch.zeros((N, T), dtype=torch.long)  # [N, T]
    for i, e in enumerate(examples):
        p, c = len(e["prompt"]), len(e["completion"])
        prompt_ids[i, P - p:] = torch.tensor(e["prompt"])
        prompt_mask[i, P - p:] = 1
        completion_ids[i, :c] = torch.tensor(e["completion"])
        completion_mask[i, :c] = 1
    labels = torch.tensor([e["label"] for e in examples])  # [N]
    return [t.to(device) for t in (prompt_ids, prompt_mask, completion_ids, completion_mask, labels)]


def replay_batch(new: list, history: list, batch_size: int, replay_fraction: float, rng: random.Random) -> list:
    """One r_phi training batch: round(replay_fraction * batch_size) historical examples, the rest new.

    Both parts are drawn at random with replacement. With no history yet (r_phi's first training on
    SFT samples) the whole batch is new data.
    """
    n_old = round(replay_fraction * batch_size) if history else 0
    return rng.choices(new, k=batch_size - n_old) + rng.choices(history, k=n_old)


def train_reward_model(reward_model, optimizer, new: list, history: list, steps: int, batch_size: int,
                       replay_fraction: float, rng: random.Random, pad_id: int, max_grad_norm: float) -> list:
    """Line 11: continue training r_phi with binary cross-entropy against the verifier's labels.

    Each batch mixes the policy's new samples with replayed historical data (replay_batch).
    Returns the loss of every step.
    """
    device = next(reward_model.parameters()).device
    reward_model.train()
    losses = []
    for _ in range(steps):
        examples = replay_batch(new, history, batch_size, replay_fraction, rng)
        prompt_ids, prompt_mask, completion_ids, completion_mask, labels = collate(examples, pad_id, device)
        logits = rm_logits(reward_model, prompt_ids, prompt_mask, completion_ids, completion_mask)  # [B]
        loss = F.binary_cross_entropy_with_logits(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reward_model.parameters(), max_grad_norm)
        optimizer.step()
        losses.append(loss.item())
    reward_model.eval()
    return losses


# ----------------------------------------------------------------------------------------------------
# GRPO (as in lesson 02, repeated here so this file reads alone)


def reset_reference(policy):
    """Line 3: pi_ref <- pi_theta, a frozen copy: later policy updates do not move it."""
    return copy.deepcopy(policy).eval().requires_grad_(False)


def grpo_outcome_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
    """Line 9: r~_i = (r_i - mean(r)) / std(r) within each group of G; 0 where the group's rewards are equal.

    rewards: [B*G], rows i*G..i*G+G-1 one group. Returns [B*G], the A_{i,t} of every token of o_i.
    std is the group's population standard deviation. scale=False leaves out the division by std
    (Dr. GRPO): A = r_i - mean(r), so a group whose scores barely differ gets a small advantage.
    """
    r = rewards.view(-1, group_size)  # [B, G]
    mean = r.mean(1, keepdim=True)
    std = r.std(1, keepdim=True, unbiased=False)
    if not scale:
        return (r - mean).view(-1)
    safe = torch.where(std > 0, std, torch.ones_like(std))
    return torch.where(std > 0, (r - mean) / safe, torch.zeros_like(r)).view(-1)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """eq. (4): D_KL = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1, per token, >= 0."""
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps: float, beta: float):
    """-J_GRPO of eq. (3) and its statistics.

    logp, old_logp, ref_logp: [N, T] log-probs of the sampled tokens under pi_theta, pi_old, pi_ref;
    advantages: [N, T] A_{i,t}; mask: [N, T] 1 on completion tokens (up to and including EOS).
    """
    mask = mask.float()
    ratio = torch.exp(logp - old_logp)  # [N, T]
    surrogate = torch.min(ratio * advantages, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * advantages)
    kl = kl_k3(logp, ref_logp)  # [N, T]
    per_token = surrogate - beta * kl
    per_output = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)  # 1/|o_i| sum_t
    objective = per_output.mean()  # 1/G sum_i, and the mean over questions
    n = mask.sum().clamp(min=1)
    stats = {
        "kl": ((kl * mask).sum() / n).item(),
        "clip_frac": ((((ratio - 1).abs() > clip_eps).float() * mask).sum() / n).item(),
    }
    return -objective, stats


def grpo_step(policy, ref_policy, reward_model, tokenizer, optimizer, problems: list, args: Args):
    """Lines 6-10, lesson 02's grpo_step with r_phi's reward: sample a group per question from pi_old,
    reward each output with r_phi, then mu updates of eq. (3). Returns the step's statistics and the
    outputs labelled by the verifier (r_phi's next training data; the update never sees the labels)."""
    G = args.group_size
    # line 6: pi_old <- pi_theta, the policy as it is now: it samples, and its log-probs before the update are old_logp
    batch = common.sample(policy, tokenizer, [common.prompt_text(p) for p in problems], G,
                          args.temperature, args.max_new_tokens)  # line 7
    rewards = rm_rewards(reward_model, batch)  # line 8: r_i from r_phi, never the verifier  # [B*G]
    advantages = grpo_outcome_advantages(rewards, G, args.scale_rewards == "group")  # line 9  # [B*G]
    token_advantages = advantages[:, None].expand_as(batch.completion_mask)  # [B*G, T]: A_{i,t} = r~_i
    with torch.no_grad():
        ref_logp = common.token_logprobs_by_length(ref_policy, batch, args.temperature)  # [B*G, T]
    policy.train()
    for grpo_iteration in range(args.mu):  # line 10
        logp = common.token_logprobs_by_length(policy, batch, args.temperature)  # [B*G, T]
        if grpo_iteration == 0:  # pi_old is pi_theta before its first update: its log-probs, detached
            old_logp = logp.detach()  # [B*G, T]
        loss, stats = grpo_loss(logp, old_logp, ref_logp, token_advantages, batch.completion_mask,
                                args.clip_eps, args.beta)
        optimizer.zero_grad()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
        optimizer.step()
    policy.eval()
    correct = verifier_labels(problems, batch.texts, G)  # for the logs and r_phi's next training set only
    return {"rm_reward": rewards.mean().item(), "accuracy": sum(correct) / len(correct),
            "kl": stats["kl"], "clip_frac": stats["clip_frac"], "loss": loss.item(),
            "grad_norm": grad_norm.item(), "adv_abs": advantages.abs().mean().item(),
            "zero_adv_groups": (rewards.view(-1, G).std(1) == 0).float().mean().item(),
            "completion_len": batch.completion_mask.sum(1).float().mean().item()}, examples_from_batch(batch, correct)


def verifier_labels(problems: list, texts: list, group_size: int) -> list:
    """The verifier's grade of output i (True when its final answer is right): r_phi's training labels."""
    return [common.verify(problems[i // group_size], t)["correct"] for i, t in enumerate(texts)]


@torch.no_grad()
def sample_graded(policy, tokenizer, problems: list, args: Args):
    """G outputs of the policy per question and the verifier's grade of each: (batch, labels)."""
    batch = common.sample(policy, tokenizer, [common.prompt_text(p) for p in problems], args.group_size,
                          args.temperature, args.max_new_tokens)
    return batch, verifier_labels(problems, batch.texts, args.group_size)


def main(argv=None):
    args = plumbing.parse_args(Args, argv, PRETRAINED)
    started = time.time()
    device = plumbing.resolve_device(args.device)
    common.set_seed(args.seed)
    mode = "frozen" if args.frozen_rm else "iterative"
    out_dir = args.out_dir or f"runs/04_iterative_grpo/{mode}-seed{args.seed}"
    policy, tokenizer = plumbing.load_policy(args.model, args.sft_steps, device, args.cache_dir or None)
    before = common.evaluate(policy, tokenizer, args.eval_test, args.eval_ood, args.k, args.temperature,
                             args.max_new_tokens)
    print(plumbing.results_table({"SFT model": before}))

    common.set_seed(args.seed)
    rng = random.Random(args.seed)  # draws r_phi's training batches
    problems = common.train_problems(args.seed)
    watch = Watch(tokenizer, args, out_dir, device)
    # r_phi's first training set: outputs of the SFT model, labelled by the verifier
    reward_model = load_reward_model(policy, device)
    rm_optimizer = torch.optim.Adam(reward_model.parameters(), lr=args.rm_lr)
    sft_problems = [next(problems) for _ in range(args.rm_init_questions)]
    history = examples_from_batch(*sample_graded(policy, tokenizer, sft_problems, args))
    rm_losses = train_reward_model(reward_model, rm_optimizer, history, [], args.rm_init_steps, args.rm_batch_size,
                                   args.replay_fraction, rng, tokenizer.pad_token_id, args.max_grad_norm)
    watch.first_reward_model(policy, reward_model, history, rm_losses, before)

    optimizer = torch.optim.Adam(policy.parameters(), lr=args.lr)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: min(1.0, (i + 1) / max(1, args.warmup_steps)))
    ref_policy = None
    # line 1: pi_theta <- pi_init, the SFT model loaded above
    for iteration in range(1, args.iterations + 1):  # line 2
        if ref_policy is None or not args.frozen_rm:
            ref_policy = reset_reference(policy)  # line 3: pi_ref <- pi_theta (frozen mode: pi_sft, once)
        new_data = []
        bar = tqdm(range(1, args.steps + 1), desc=f"GRPO iteration {iteration}/{args.iterations} ({mode} r_phi)")
        for step in bar:  # line 4
            t0 = plumbing.clock(device)
            batch_problems = [next(problems) for _ in range(args.batch_size)]  # line 5
            stats, labelled = grpo_step(policy, ref_policy, reward_model, tokenizer, optimizer, batch_problems,
                                        args)  # lines 6-10
            warmup.step()
            new_data += labelled
            watch.step(bar, iteration, step, stats, plumbing.clock(device) - t0)
        rm_before = watch.reward_model_on_fresh_samples(policy, reward_model)  # r_phi facing the policy it now has
        rm_losses = []
        if not args.frozen_rm:  # line 11: continuous training on this iteration's samples, replaying history
            rm_losses = train_reward_model(reward_model, rm_optimizer, new_data, history, args.rm_steps,
                                           args.rm_batch_size, args.replay_fraction, rng, tokenizer.pad_token_id,
                                           args.max_grad_norm)
            history += new_data
        watch.iteration(policy, reward_model, iteration, rm_before, rm_losses, len(new_data), len(history))
    return watch.final(policy, reward_model, before, mode, started)


# ----------------------------------------------------------------------------------------------------
# What the lesson logs and prints: r_phi watched on fresh samples of held-out questions


@torch.no_grad()
def probe(policy, tokenizer, problems: list, args: Args) -> dict:
    """Fresh samples of the current policy on held-out questions: what r_phi says and what is true."""
    batch, labels = sample_graded(policy, tokenizer, problems, args)
    return {"batch": batch, "labels": torch.tensor([float(c) for c in labels])}


@torch.no_grad()
def rm_agreement(reward_model, sampled: dict) -> dict:
    """r_phi's accuracy (r_phi > 0.5 agrees with the verifier) and its mean reward on probe samples."""
    scores = rm_rewards(reward_model, sampled["batch"]).cpu()  # [N]
    labels = sampled["labels"]
    wrong = labels == 0
    return {"rm_acc": ((scores > 0.5).float() == labels).float().mean().item(),
            "rm_reward": scores.mean().item(),
            # wrong outputs that r_phi calls right: the holes a policy can learn to exploit
            "rm_false_pos": (scores[wrong] > 0.5).float().mean().item() if wrong.any() else 0.0}


class Watch:
    """metrics.jsonl, the progress bar and the printed tables, in one place."""

    def __init__(self, tokenizer, args: Args, out_dir: str, device):
        self.tokenizer, self.args, self.out_dir, self.device = tokenizer, args, out_dir, device
        self.log = plumbing.MetricsLog(out_dir)
        self.probe_problems = common.make_split("test", args.rm_eval_questions)
        self.iterations, self.sampled = [], None

    def reward_model_on_fresh_samples(self, policy, reward_model) -> dict:
        self.sampled = probe(policy, self.tokenizer, self.probe_problems, self.args)
        return rm_agreement(reward_model, self.sampled)

    def first_reward_model(self, policy, reward_model, history, rm_losses, before):
        rm_now = self.reward_model_on_fresh_samples(policy, reward_model)
        first = {"iteration": 0, "after_iteration": 0, "policy_updates": 0,
                 "true_acc": self.sampled["labels"].mean().item(), "test_greedy": before["test_greedy"],
                 "rm_acc_before": rm_now["rm_acc"], "rm_acc_after": rm_now["rm_acc"], "rm_reward": rm_now["rm_reward"],
                 "rm_false_pos": rm_now["rm_false_pos"], "rm_loss_first": rm_losses[0] if rm_losses else None,
                 "rm_loss_last": rm_losses[-1] if rm_losses else None, "rm_train_size": len(history),
                 "sft_sample_acc": sum(e["label"] for e in history) / len(history)}
        self.log.write(first)
        self.iterations.append(first)
        print(f"r_phi trained on {len(history)} SFT samples: accuracy {rm_now['rm_acc']:.3f} on fresh SFT samples "
              f"(true accuracy {first['true_acc']:.3f}, mean reward {rm_now['rm_reward']:.3f})")

    def step(self, bar, iteration: int, step: int, stats: dict, step_time: float):
        policy_updates = ((iteration - 1) * self.args.steps + step) * self.args.mu
        record = {"iteration": iteration, "step": step, "policy_updates": policy_updates, **stats,
                  "step_time": step_time}
        self.log.write(record)
        bar.set_postfix(rm_reward=f"{record['rm_reward']:.2f}", acc=f"{record['accuracy']:.2f}",
                        kl=f"{record['kl']:.4f}", clip=f"{record['clip_frac']:.3f}")

    def iteration(self, policy, reward_model, iteration, rm_before, rm_losses, new_size, history_size):
        args = self.args
        rm_after = rm_agreement(reward_model, self.sampled)  # the same samples, after line 11
        test_greedy = common.evaluate(policy, self.tokenizer, args.eval_test, 0, 0, args.temperature,
                                      args.max_new_tokens)["test_greedy"]
        record = {"iteration": iteration, "after_iteration": iteration,
                  "policy_updates": iteration * args.steps * args.mu, "true_acc": self.sampled["labels"].mean().item(),
                  "test_greedy": test_greedy, "rm_acc_before": rm_before["rm_acc"], "rm_acc_after": rm_after["rm_acc"],
                  "rm_reward": rm_before["rm_reward"], "rm_false_pos": rm_before["rm_false_pos"],
                  "rm_loss_first": rm_losses[0] if rm_losses else None,
                  "rm_loss_last": rm_losses[-1] if rm_losses else None,
                  "rm_train_size": new_size if not args.frozen_rm else 0, "history_size": history_size}
        self.log.write(record)
        self.iterations.append(record)
        print(f"iteration {iteration}: true accuracy {record['true_acc']:.3f}, r_phi mean reward "
              f"{record['rm_reward']:.3f}, r_phi accuracy {record['rm_acc_before']:.3f} -> {record['rm_acc_after']:.3f}, "
              f"greedy test {test_greedy:.3f}")

    def final(self, policy, reward_model, before, mode, started) -> dict:
        args, out_dir = self.args, self.out_dir
        memory = plumbing.peak_memory(self.device)  # policy, pi_ref and r_phi, sampling and both trainings
        after = common.evaluate(policy, self.tokenizer, args.eval_test, args.eval_ood, args.k, args.temperature,
                                args.max_new_tokens)
        policy.save_pretrained(f"{out_dir}/model")
        self.tokenizer.save_pretrained(f"{out_dir}/model")
        reward_model.save_pretrained(f"{out_dir}/reward_model")
        self.log.write({"final": True, "before": before, "after": after, "memory": memory,
                        "wall_time": time.time() - started})
        print(f"\nIterative GRPO ({mode} r_phi), {args.iterations} iterations x {args.steps} steps of "
              f"{args.batch_size} questions x G={args.group_size} on {self.device}, {time.time() - started:.0f}s")
        print(plumbing.results_table({"SFT model": before, f"after GRPO ({mode} r_phi)": after}))
        print("\nPer iteration, on fresh samples of the policy for held-out questions (temperature "
              f"{args.temperature}):\n")
        print(plumbing.results_table({f"iteration {r['iteration']}": {
            "policy updates": r["policy_updates"], "true accuracy": r["true_acc"], "r_phi mean reward": r["rm_reward"],
            "r_phi acc before": r["rm_acc_before"], "r_phi acc after": r["rm_acc_after"],
            "greedy test": r["test_greedy"]} for r in self.iterations}))
        print(memory)
        return {"before": before, "after": after, "iterations": self.iterations, "out_dir": out_dir, "mode": mode,
                "memory": memory}


if __name__ == "__main__":
    main()
