"""Lesson 04: iterative GRPO with a learned reward model and 10% replay (DeepSeekMath, 4.1.4, 5.2).

Algorithm 1 of the paper (its line numbers are in the comments of main()):

    1  pi_theta <- pi_init
    2  for iteration = 1..I:
    3      pi_ref <- pi_theta
    4      for step = 1..M:
    5          sample a batch D_b from D
    6          pi_old <- pi_theta
    7          sample G outputs {o_i} ~ pi_old(.|q) for each q in D_b
    8          compute rewards {r_i} for each o_i by running r_phi
    9          compute A_{i,t} for the t-th token of o_i by group relative advantage estimation
    10         for GRPO iteration = 1..mu:
    11             update pi_theta by maximising the GRPO objective
    12     update r_phi through continuous training using a replay mechanism
               (the policy's new samples, plus 10% historical data)

The reward model (outcome supervision): the policy's architecture with a scalar head, read at the
output's last token (its EOS): r_phi(q, o) = sigmoid(logit), the probability that o is right. It is
trained with binary cross-entropy against the verifier's label y (1 if o's answer is right),

    L(phi) = -1/N sum_n [ y_n log r_phi(q_n, o_n) + (1 - y_n) log(1 - r_phi(q_n, o_n)) ],

first on outputs of pi_sft. The verifier labels r_phi's data and grades the policy for the logs;
the policy's update never sees it.

Line 9: r~_i = (r_i - mean(r)) / std(r) within the group, A_{i,t} = r~_i (--scale_rewards group,
the paper's); by default here A_{i,t} = r_i - mean(r) (Dr. GRPO's --scale_rewards none): r_phi's
scores within a group differ by a few hundredths, mostly its noise, and dividing by their std
blows that noise up to unit-size advantages (docs/04_iterative_grpo.md measures it).
Line 11, eq. (3), with the k3 estimator of eq. (4):

    J_GRPO(theta) = E[ 1/G sum_i 1/|o_i| sum_t { min( ratio_{i,t} A_{i,t},
                                                      clip(ratio_{i,t}, 1-eps, 1+eps) A_{i,t} )
                                                 - beta * D_KL[pi_theta || pi_ref] } ]
    ratio_{i,t} = pi_theta(o_{i,t} | q, o_{i,<t}) / pi_old(o_{i,t} | q, o_{i,<t})
    D_KL[pi_theta || pi_ref] = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1     (per token)

The comparison: --frozen_rm skips line 12 (r_phi trained once, on pi_sft's samples; pi_ref is still
reset every iteration), so the policy climbs a reward model that never sees its new outputs. Watch
r_phi's gap (its mean score minus the true accuracy of the same samples) and its within-group AUC
(the chance it ranks a right output above a wrong one of the same question). --frozen_ref runs
line 3 only once (pi_ref stays pi_sft).
--micro_batch_size splits every pass of the policy, pi_ref and r_phi into that many outputs.

Run:  python 04_iterative_grpo.py                    Algorithm 1: I = 10 iterations of M = 10 steps
      python 04_iterative_grpo.py --frozen_rm        the same updates, r_phi never re-trained
      python 04_iterative_grpo.py --scale_rewards group  line 9 with the paper's std division
      python 04_iterative_grpo.py --model smollm2    the real model, for a GPU
(--help lists every option; docs/04_iterative_grpo.md has the results.)
"""

import copy
import random
import time
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

import common
import task
import plumbing
from plumbing import arg

SEED_MUST = f"use a seed in 0 .. {2**32 - 1}"


@dataclass
class Args:
    model: str = arg("tiny", "tiny (built in), smollm2, a model folder, a .gguf file or a hub id")
    sft_steps: int = arg(plumbing.SFT_STEPS, "SFT steps that make pi_sft (cached)", min=0)
    seed: int = arg(0, "seed of the train problems, sampling and init", min=0, below=2**32,
                    must=SEED_MUST)
    device: str = arg("auto", "auto, cpu, cuda or cuda:N")
    iterations: int = arg(10, "I: outer iterations of Algorithm 1", min=1)
    steps: int = arg(10, "M: GRPO steps (sampled batches) per iteration", min=1)
    batch_size: int = arg(16, "questions per step", min=1)
    group_size: int = arg(8, "G: outputs sampled per question (a baseline needs 2)", min=2)
    micro_batch_size: int = arg(0, "outputs per forward/backward pass; 0: the whole batch", min=0)
    lr: float = arg(1e-4, "Adam learning rate of the policy", above=0)
    warmup_steps: int = arg(20, "steps of linear learning-rate warm-up, once per run", min=0)
    beta: float = arg(0.1, "KL coefficient beta of eq. (3)", min=0)
    clip_eps: float = arg(0.2, "clip range epsilon of eq. (3)", min=0, below=1)
    mu: int = arg(1, "GRPO iterations per sampled batch (1 in the paper)", min=1)
    temperature: float = arg(1.0, "sampling temperature (log-probs use the same)", above=0)
    max_new_tokens: int = arg(64, "longest completion", min=1)
    max_grad_norm: float = arg(1.0, "gradient clipping (policy and r_phi)", above=0)
    scale_rewards: str = arg("none", "line 9: group (divide by the std) or none (Dr. GRPO)",
                             choices=("group", "none"))
    frozen_rm: bool = arg(False, "never re-train r_phi (skip line 12); pi_ref still resets")
    frozen_ref: bool = arg(False, "pi_ref stays pi_sft (line 3 once); r_phi still re-trains")
    rm_lr: float = arg(3e-4, "Adam learning rate of the reward model r_phi", above=0)
    rm_batch_size: int = arg(64, "outputs per r_phi training step", min=1)
    rm_init_questions: int = arg(128, "questions whose G pi_sft samples first train r_phi", min=1)
    rm_init_steps: int = arg(100, "r_phi training steps on pi_sft's samples, before line 2", min=0)
    rm_steps: int = arg(20, "r_phi training steps at the end of each iteration (line 12)", min=0)
    replay_fraction: float = arg(0.1, "share of r_phi batches from history", min=0, below=1)
    rm_balance: bool = arg(False, "r_phi's new data: right and wrong outputs equally often")
    rm_eval_questions: int = arg(64, "test questions whose G samples measure r_phi", min=1)
    eval_test: int = arg(200, "test problems evaluated (greedy after every iteration)", min=1)
    eval_ood: int = arg(200, "out-of-distribution (longer) problems evaluated", min=0)
    k: int = arg(8, "K of Maj@K and Pass@K", min=0)
    out_dir: str = arg("", "where the log and models go (default: runs/04_iterative_grpo/<run>)")
    cache_dir: str = arg("", "where SFT models are cached (default ./cache)")


# A pretrained model (--model smollm2, a folder, a .gguf file or a hub id) replaces these defaults
# unless the flag is given: a short SFT and micro-batches as in lesson 02; r_phi, a full fine-tune
# of a 135M backbone, at lr 1e-4 on class-balanced data for about two epochs (32 x 64 of its 1024
# pi_sft samples, 40 x 58 of an iteration's 1280 new ones). On the H200 an r_phi at lr 1e-5 on
# 81%-right samples called every output right; probed on the CPU's 2-layer SmolLM2 cut (81% right,
# docs/04_iterative_grpo.md), lr 1e-4 and two epochs lifted its within-group AUC most, and balance
# moved its scores off "always right". Not yet measured on the full model.
PRETRAINED = {"sft_steps": 200, "micro_batch_size": 16, "rm_lr": 1e-4, "rm_balance": True,
              "rm_init_steps": 32, "rm_steps": 40}


# --------------------------------------------------------------------------------------------------
# The reward model r_phi


def load_reward_model(policy, device):
    """r_phi: the policy's architecture and weights (the SFT model) with a fresh scalar head."""
    from transformers import AutoModelForTokenClassification

    try:
        reward_model = AutoModelForTokenClassification.from_pretrained(
            policy.name_or_path, num_labels=1, dtype=torch.float32)
    except (ValueError, KeyError) as e:
        plumbing.fail(f"{policy.name_or_path} has no token-classification head in transformers "
                      f"({e}): the reward model needs one")
    reward_model.config.pad_token_id = policy.config.pad_token_id
    return reward_model.to(device).eval()


def rm_logits(reward_model, batch: common.Batch) -> torch.Tensor:
    """The logit of r_phi(q, o) for each row: the scalar head read at the last completion token.

    The last completion token is the EOS when the output has one (the mask runs up to and
    including it), else the last token generated. Position ids come from the mask, as in
    common.token_logprobs.  # [N]
    """
    input_ids = torch.cat([batch.prompt_ids, batch.completion_ids], 1)  # [N, P+T]
    attention_mask = torch.cat([batch.prompt_mask, batch.completion_mask], 1)  # [N, P+T]
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    logits = reward_model(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids, use_cache=False).logits[..., 0]  # [N, P+T]
    last = batch.prompt_ids.shape[1] + batch.completion_mask.sum(1) - 1  # [N]
    return logits[torch.arange(len(last), device=logits.device), last].float()


@torch.no_grad()
def rm_rewards(reward_model, batch: common.Batch, micro_batch_size: int = 0) -> torch.Tensor:
    """Line 8: r_i = r_phi(q, o_i) = sigmoid(logit), micro_batch_size outputs a pass.  # [N]"""
    reward_model.eval()  # no dropout when scoring
    logits = torch.zeros(len(batch), device=batch.completion_ids.device)  # [N]
    for rows in common.micro_batches(batch, micro_batch_size):
        logits[rows] = rm_logits(reward_model, batch.select(rows))
    return torch.sigmoid(logits)


def rm_loss(logits: torch.Tensor, labels: torch.Tensor, num_outputs: int) -> torch.Tensor:
    """L(phi), binary cross-entropy, on n rows that are one micro-batch of num_outputs: their mean,
    weighted by their share n / num_outputs, so the micro-batches' losses add up to the batch's."""
    return F.binary_cross_entropy_with_logits(logits, labels) * (len(labels) / num_outputs)


def train_reward_model(reward_model, optimizer, new: list, history: list, steps: int,
                       batch_size: int, replay_fraction: float, rng: random.Random, pad_id: int,
                       max_grad_norm: float, micro_batch_size: int = 0) -> list:
    """Line 12: continue training r_phi on batches that mix the policy's new samples with
    replayed history (replay_batch), gradients added over micro-batches. Returns each loss."""
    device = next(reward_model.parameters()).device
    reward_model.train()
    losses = []
    for _ in range(steps):
        batch, labels = collate(replay_batch(new, history, batch_size, replay_fraction, rng),
                                pad_id, device)
        optimizer.zero_grad()
        loss = 0
        for rows in common.micro_batches(batch, micro_batch_size):
            part_loss = rm_loss(rm_logits(reward_model, batch.select(rows)), labels[rows],
                                len(batch))
            part_loss.backward()
            loss += part_loss.item()
        torch.nn.utils.clip_grad_norm_(reward_model.parameters(), max_grad_norm)
        optimizer.step()
        losses.append(loss)
    reward_model.eval()
    return losses


def replay_batch(new: list, history: list, batch_size: int, replay_fraction: float,
                 rng: random.Random) -> list:
    """One r_phi training batch: round(replay_fraction * batch_size) historical examples, the rest
    new, both drawn at random with replacement. With no history yet (r_phi's first training, on
    pi_sft's samples) the whole batch is new data."""
    n_old = round(replay_fraction * batch_size) if history else 0
    return rng.choices(new, k=batch_size - n_old) + rng.choices(history, k=n_old)


def balance_classes(examples: list, rng: random.Random) -> list:
    """The examples with the rarer label (right or wrong) drawn again at random until both labels
    are equally many, so that a batch drawn from them is half right, half wrong on average.
    Unweighted BCE on 81% right outputs rests at "always right"; balanced, it must discriminate.
    With one label only, the examples are returned as they are."""
    right = [e for e in examples if e["label"] == 1]
    wrong = [e for e in examples if e["label"] == 0]
    if not right or not wrong:
        return examples
    rare, frequent = (right, wrong) if len(right) < len(wrong) else (wrong, right)
    return frequent + rare + rng.choices(rare, k=len(frequent) - len(rare))


def examples_from_batch(batch: common.Batch, labels) -> list:
    """r_phi's training data: (prompt tokens, completion tokens, verifier label) of each output.
    Tokens, not texts, so r_phi trains on exactly the sequences it scored."""
    # one copy to the host per tensor, not one per row (each .tolist() of a GPU tensor waits)
    prompt_ids, prompt_mask = batch.prompt_ids.tolist(), batch.prompt_mask.tolist()  # [N, P]
    completion_ids = batch.completion_ids.tolist()  # [N, T]
    lengths = batch.completion_mask.sum(1).tolist()  # [N]: tokens up to and including the EOS
    examples = []
    for i, label in enumerate(labels):
        prompt = [t for t, m in zip(prompt_ids[i], prompt_mask[i]) if m]
        examples.append({"prompt": prompt, "completion": completion_ids[i][:lengths[i]],
                         "label": float(label)})
    return examples


def collate(examples: list, pad_id: int, device) -> tuple:
    """Stored examples as a Batch (prompts left-padded, completions right-padded) and labels [N]."""
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
    tensors = [t.to(device) for t in (prompt_ids, prompt_mask, completion_ids, completion_mask)]
    return common.Batch(*tensors, [""] * N, [[] for _ in range(N)]), labels.to(device)


# --------------------------------------------------------------------------------------------------
# GRPO: lesson 02's functions, character for character; its grpo_step rewarded by r_phi


def reset_reference(policy):
    """Line 3: pi_ref <- pi_theta, a frozen copy: later policy updates do not move it."""
    return copy.deepcopy(policy).eval().requires_grad_(False)


def outcome_rewards(problems: list, texts: list, group_size: int) -> torch.Tensor:
    """r_i: 1 if output i's final answer is right, else 0.  # [B*G]"""
    graded = [task.verify(problems[i // group_size], t) for i, t in enumerate(texts)]
    return torch.tensor([float(g["correct"]) for g in graded])


def grpo_outcome_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True):
    """r~_i = (r_i - mean(r)) / std(r) within each group of G; 0 for a group whose rewards are all
    equal. rewards: [B*G], rows i*G..i*G+G-1 one group. Returns [B*G], the A_{i,t} of every token
    of o_i. std is the group's own (population) std. scale=False: r_i - mean(r) (Dr. GRPO)."""
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


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps: float, beta: float,
              loss_agg: str = "output", kl_estimator: str = "k3", max_len: int = 1,
              num_outputs=None, num_tokens=None):
    """-J_GRPO of eq. (3) and its statistics (token means over the whole batch: they add up).

    logp, old_logp, ref_logp: [n, T] log-probs of the sampled tokens under pi_theta, pi_old,
    pi_ref; advantages: [n, T] A_{i,t}; mask: [n, T] 1 on completion tokens (up to EOS).
    num_outputs, num_tokens: the whole batch's outputs and tokens when these n rows are one
    micro-batch of it (default: these rows are the batch), so the micro-batches' losses add up to
    the whole batch's loss. max_len: the constant of loss_agg "constant".
    Returns (loss, {"kl": float, "clip_frac": float}): the loss a 0-d tensor, -J, to call backward()
    on; the statistics plain floats (.item()), which the update adds up over its micro-batches.
    """
    mask = mask.float()
    num_outputs = mask.shape[0] if num_outputs is None else num_outputs
    num_tokens = mask.sum().clamp(min=1) if num_tokens is None else num_tokens
    ratio = torch.exp(logp - old_logp)  # [n, T]
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    surrogate = torch.min(ratio * advantages, clipped * advantages)
    kl = kl_k3(logp, ref_logp)  # [n, T], eq. (4); logged whatever the loss uses
    if kl_estimator == "k3":
        per_token = surrogate - beta * kl
    elif kl_estimator == "k1":
        per_token = surrogate - beta * (logp - ref_logp)
    else:  # "k2"
        per_token = surrogate - beta * 0.5 * (logp - ref_logp) ** 2
    if loss_agg == "output":  # eq. (3): 1/|o_i| sum_t, then the mean over outputs
        objective = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / num_outputs
    elif loss_agg == "token":  # DAPO: every token of the batch weighs the same
        objective = (per_token * mask).sum() / num_tokens
    else:  # "constant", Dr. GRPO: every output divided by the same max_len
        objective = ((per_token * mask).sum(1) / max_len).sum() / num_outputs
    with torch.no_grad():
        clipped = ((ratio - 1).abs() > clip_eps).float()
        stats = {"kl": ((kl * mask).sum() / num_tokens).item(),
                 "clip_frac": ((clipped * mask).sum() / num_tokens).item()}
    return -objective, stats


def grpo_update(policy, ref_policy, optimizer, batch, token_advantages, args, loss_agg="output",
                kl_estimator="k3") -> dict:
    """mu updates of eq. (3) on one batch sampled from pi_old (Algorithm 1's lines 10-11), each in
    micro-batches whose losses add up to the whole batch's. token_advantages: [B*G, T] A_{i,t}.
    Returns the last update's loss and statistics, summed over its micro-batches."""
    temperature, mask = args.temperature, batch.completion_mask  # mask: [B*G, T]
    ref_logp = common.token_logprobs(ref_policy, batch, temperature, grad=False,
                                     micro_batch_size=args.micro_batch_size, buckets=4)
    old_logp = torch.zeros_like(ref_logp)  # [B*G, T] pi_old, filled by the first iteration
    num_outputs, num_tokens = len(batch), mask.sum().clamp(min=1)
    policy.train()
    for grpo_iteration in range(args.mu):  # GRPO iterations on the same batch
        optimizer.zero_grad()
        loss, kl, clip_frac = 0, 0, 0
        # gradient accumulation: each micro-batch's loss is its share of the whole batch's
        for rows in common.micro_batches(batch, args.micro_batch_size):
            logp = common.token_logprobs(policy, batch.select(rows), temperature, buckets=4)
            if grpo_iteration == 0:  # pi_old is pi_theta before its first update
                old_logp[rows] = logp.detach()
            part_loss, stats = grpo_loss(logp, old_logp[rows], ref_logp[rows],
                                         token_advantages[rows], mask[rows], args.clip_eps,
                                         args.beta, loss_agg, kl_estimator, args.max_new_tokens,
                                         num_outputs, num_tokens)
            part_loss.backward()
            loss, kl = loss + part_loss.item(), kl + stats["kl"]
            clip_frac += stats["clip_frac"]
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
        optimizer.step()
    policy.eval()
    return {"kl": kl, "clip_frac": clip_frac, "loss": loss, "grad_norm": grad_norm.item()}


def grpo_step(policy, ref_policy, reward_model, tokenizer, optimizer, problems: list, args: Args):
    """Lines 6-11, lesson 02's grpo_step rewarded by r_phi: sample a group per question from pi_old,
    reward each output with r_phi, then mu updates of eq. (3). Returns the step's statistics and
    the outputs labelled by the verifier (r_phi's next data; the update never sees the labels)."""
    G = args.group_size
    # line 6: pi_old <- pi_theta, the policy as it is now; line 7: G outputs o_i ~ pi_old(.|q)
    prompts = [task.prompt_text(p) for p in problems]
    batch = common.sample(policy, tokenizer, prompts, G, args.temperature, args.max_new_tokens)
    mask = batch.completion_mask  # [B*G, T]
    rewards = rm_rewards(reward_model, batch, args.micro_batch_size)  # line 8: r_phi  [B*G]
    advantages = grpo_outcome_advantages(rewards, G, args.scale_rewards == "group")  # line 9
    token_advantages = advantages[:, None].expand_as(mask)  # [B*G, T]: A_{i,t} = r~_i
    updated = grpo_update(policy, ref_policy, optimizer, batch, token_advantages, args)  # 10-11
    correct = outcome_rewards(problems, batch.texts, G)  # the verifier: logs and r_phi's data only
    stats = {"rm_reward": rewards.mean().item(), "accuracy": correct.sum().item() / len(correct),
             # r_phi's over-estimate on this batch: the number that shows it being exploited
             "rm_gap": rewards.mean().item() - correct.mean().item(),
             **updated, "adv_abs": advantages.abs().mean().item(),
             "zero_adv_groups": (rewards.view(-1, G).std(1) == 0).float().mean().item(),
             "completion_len": mask.sum(1).float().mean().item()}
    return stats, examples_from_batch(batch, correct)


@torch.no_grad()
def sample_graded(policy, tokenizer, problems: list, args: Args):
    """G outputs of the policy per question and the verifier's grade of each: (batch, [N] 0/1)."""
    prompts = [task.prompt_text(p) for p in problems]
    batch = common.sample(policy, tokenizer, prompts, args.group_size, args.temperature,
                          args.max_new_tokens)
    return batch, outcome_rewards(problems, batch.texts, args.group_size)


def main(argv=None):
    args = plumbing.parse_args(Args, argv, PRETRAINED)
    started, device = time.time(), plumbing.resolve_device(args.device)
    common.set_seed(args.seed)
    out_dir = plumbing.run_dir("04_iterative_grpo", args, PRETRAINED)
    # line 1: pi_theta <- pi_init, the SFT model
    policy, tokenizer = plumbing.load_policy(args.model, args.sft_steps, device,
                                             args.cache_dir or None,
                                             micro_batch_size=args.micro_batch_size)
    before = evaluate_policy(policy, tokenizer, args, args.eval_ood, args.k)
    print(plumbing.results_table({"SFT model": before}))
    common.set_seed(args.seed)
    rng = random.Random(args.seed)  # draws r_phi's training batches
    problems = task.train_problems(args.seed)
    log, watched = plumbing.MetricsLog(out_dir), task.make_split("test", args.rm_eval_questions)
    # r_phi's first training set: outputs of pi_sft, labelled by the verifier
    reward_model = load_reward_model(policy, device)
    rm_optimizer = torch.optim.Adam(reward_model.parameters(), lr=args.rm_lr)
    first = [next(problems) for _ in range(args.rm_init_questions)]
    history = examples_from_batch(*sample_graded(policy, tokenizer, first, args))
    rm_losses = train_rm(reward_model, rm_optimizer, history, [], args.rm_init_steps, rng,
                         tokenizer, args)
    records = [first_record(log, probe(policy, tokenizer, watched, args), reward_model, history,
                            rm_losses, before, args)]
    optimizer = torch.optim.Adam(policy.parameters(), lr=args.lr)
    warmup = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min(1.0, (i + 1) / max(1, args.warmup_steps)))
    for iteration in range(1, args.iterations + 1):  # line 2
        if iteration == 1 or not args.frozen_ref:
            ref_policy = reset_reference(policy)  # line 3: pi_ref <- pi_theta
        new_data, bar = [], tqdm(range(1, args.steps + 1), desc=f"iteration {iteration} "
                                 f"of {args.iterations} ({mode_of(args)})")
        for step in bar:  # line 4
            t0 = plumbing.clock(device)
            batch_problems = [next(problems) for _ in range(args.batch_size)]  # line 5
            stats, labelled = grpo_step(policy, ref_policy, reward_model, tokenizer, optimizer,
                                        batch_problems, args)  # lines 6-11
            warmup.step()
            new_data += labelled
            log_step(log, bar, iteration, step, stats, plumbing.clock(device) - t0, args)
        sampled = probe(policy, tokenizer, watched, args)  # r_phi facing the policy it now has
        rm = {"before": rm_agreement(reward_model, sampled, args.group_size, args.micro_batch_size),
              "losses": []}
        if not args.frozen_rm:  # line 12: this iteration's samples, replaying the history
            rm["losses"] = train_rm(reward_model, rm_optimizer, new_data, history, args.rm_steps,
                                    rng, tokenizer, args)
            history += new_data
        rm["after"] = rm_agreement(reward_model, sampled, args.group_size, args.micro_batch_size)
        test_greedy = evaluate_policy(policy, tokenizer, args, 0, 0)["test_greedy"]
        records.append(iteration_record(log, iteration, sampled, rm, test_greedy, len(history),
                                        args))
    memory = plumbing.peak_memory(device)  # policy, pi_ref and r_phi, sampling and both trainings
    after = evaluate_policy(policy, tokenizer, args, args.eval_ood, args.k)
    for model, folder in ((policy, "model"), (tokenizer, "model"), (reward_model, "reward_model")):
        model.save_pretrained(f"{out_dir}/{folder}")
    log.write({"final": True, "before": before, "after": after, "memory": memory,
               "wall_time": time.time() - started})
    result = {"before": before, "after": after, "iterations": records, "out_dir": out_dir,
              "mode": mode_of(args), "memory": memory}
    report(result, device, time.time() - started, args)
    return result


def train_rm(reward_model, rm_optimizer, new: list, history: list, steps: int, rng, tokenizer,
             args: Args) -> list:
    """train_reward_model with the lesson's settings (--rm_balance: new data class-balanced)."""
    if args.rm_balance:
        new = balance_classes(new, rng)
    return train_reward_model(reward_model, rm_optimizer, new, history, steps, args.rm_batch_size,
                              args.replay_fraction, rng, tokenizer.pad_token_id,
                              args.max_grad_norm, args.micro_batch_size)


# --------------------------------------------------------------------------------------------------
# What the lesson prints and records: r_phi watched on fresh samples of held-out questions


def mode_of(args: Args) -> str:
    """Which lines of Algorithm 1 run every iteration: "iterative" (all), or what is frozen."""
    frozen = [name for name, on in (("r_phi", args.frozen_rm), ("pi_ref", args.frozen_ref)) if on]
    return " and ".join(frozen) + " frozen" if frozen else "iterative"


def evaluate_policy(policy, tokenizer, args: Args, n_ood: int, k: int) -> dict:
    return task.evaluate(policy, tokenizer, args.eval_test, n_ood, k, args.temperature,
                           args.max_new_tokens)


@torch.no_grad()
def probe(policy, tokenizer, problems: list, args: Args) -> dict:
    """Fresh samples of the current policy on held-out questions: what r_phi says, what is true,
    and the final answers the policy gives (a policy that exploits r_phi has favourites)."""
    batch, labels = sample_graded(policy, tokenizer, problems, args)
    answers = [task.verify(problems[i // args.group_size], t)["answer"]
               for i, t in enumerate(batch.texts)]
    return {"batch": batch, "labels": labels, "answers": answers}


def within_group_auc(scores: torch.Tensor, labels: torch.Tensor, group_size: int):
    """P(r_phi scores a right output above a wrong one of the same group), ties counting 1/2, over
    every (right, wrong) pair inside a group; groups with one class only have no pair. This is
    what the group-relative advantage can use: 0.5 is no signal, below 0.5 the wrong way round.
    None when no group has both classes. scores, labels: [B*G]."""
    s, y = scores.view(-1, group_size), labels.view(-1, group_size)  # [B, G]
    right_minus_wrong = s[:, :, None] - s[:, None, :]  # [B, G, G]: s_i - s_j
    pairs = (y[:, :, None] == 1) & (y[:, None, :] == 0)  # [B, G, G]: i right, j wrong
    if not pairs.any():
        return None
    wins = (right_minus_wrong > 0).float() + 0.5 * (right_minus_wrong == 0).float()
    return (wins[pairs].sum() / pairs.sum()).item()


@torch.no_grad()
def rm_agreement(reward_model, sampled: dict, group_size: int, micro_batch_size: int = 0) -> dict:
    """r_phi on probe samples against the verifier: agreement (r_phi > 0.5 is right), mean
    reward, its over-estimate of the true accuracy, false positives, within-group AUC."""
    scores = rm_rewards(reward_model, sampled["batch"], micro_batch_size).cpu()  # [N]
    labels = sampled["labels"]
    wrong = labels == 0
    return {"rm_acc": ((scores > 0.5).float() == labels).float().mean().item(),
            "rm_reward": scores.mean().item(),
            "rm_gap": scores.mean().item() - labels.mean().item(),
            # wrong outputs that r_phi calls right: the holes a policy can learn to exploit
            "rm_false_pos": (scores[wrong] > 0.5).float().mean().item() if wrong.any() else 0.0,
            "rm_auc": within_group_auc(scores, labels, group_size)}


def favourite_answers(sampled: dict, top: int = 3) -> list:
    """The most frequent final answers among the probe samples, whatever the question:
    [[answer, count], ...]; None counts the outputs with no answer line."""
    return [[a, n] for a, n in Counter(sampled["answers"]).most_common(top)]


def first_record(log, sampled: dict, reward_model, history: list, rm_losses: list, before: dict,
                 args: Args) -> dict:
    """Iteration 0: r_phi after its first training, on fresh samples of pi_sft."""
    rm_now = rm_agreement(reward_model, sampled, args.group_size, args.micro_batch_size)
    record = {"iteration": 0, "after_iteration": 0, "policy_updates": 0,
              "true_acc": sampled["labels"].mean().item(), "test_greedy": before["test_greedy"],
              "rm_acc_before": rm_now["rm_acc"], "rm_acc_after": rm_now["rm_acc"],
              "rm_reward": rm_now["rm_reward"], "rm_gap": rm_now["rm_gap"],
              "rm_false_pos": rm_now["rm_false_pos"], "rm_auc": rm_now["rm_auc"],
              "favourite_answers": favourite_answers(sampled),
              "rm_loss_first": rm_losses[0] if rm_losses else None,
              "rm_loss_last": rm_losses[-1] if rm_losses else None, "rm_train_size": len(history),
              "sft_sample_acc": sum(e["label"] for e in history) / len(history)}
    log.write(record)
    print(f"r_phi trained on {len(history)} SFT samples: accuracy {rm_now['rm_acc']:.3f} on fresh "
          f"SFT samples (true accuracy {record['true_acc']:.3f}, mean reward "
          f"{rm_now['rm_reward']:.3f})")
    return record


def log_step(log, bar, iteration: int, step: int, stats: dict, step_time: float, args: Args):
    policy_updates = ((iteration - 1) * args.steps + step) * args.mu
    log.write({"iteration": iteration, "step": step, "policy_updates": policy_updates, **stats,
               "step_time": step_time})
    bar.set_postfix(rm_reward=f"{stats['rm_reward']:.2f}", acc=f"{stats['accuracy']:.2f}",
                    gap=f"{stats['rm_gap']:+.2f}", kl=f"{stats['kl']:.4f}",
                    clip=f"{stats['clip_frac']:.3f}")


def iteration_record(log, iteration: int, sampled: dict, rm: dict, test_greedy: float,
                     history_size: int, args: Args) -> dict:
    """After line 12: r_phi on the same probe samples before and after it (rm: its agreement
    before and after, its training losses), and greedy test accuracy."""
    rm_before, rm_after, rm_losses = rm["before"], rm["after"], rm["losses"]
    new_size = args.steps * args.batch_size * args.group_size  # line 12's new data: M x B x G
    record = {"iteration": iteration, "after_iteration": iteration,
              "policy_updates": iteration * args.steps * args.mu,
              "true_acc": sampled["labels"].mean().item(), "test_greedy": test_greedy,
              "rm_acc_before": rm_before["rm_acc"], "rm_acc_after": rm_after["rm_acc"],
              "rm_reward": rm_before["rm_reward"], "rm_gap": rm_before["rm_gap"],
              "rm_false_pos": rm_before["rm_false_pos"], "rm_auc": rm_before["rm_auc"],
              "rm_gap_after": rm_after["rm_gap"], "rm_false_pos_after": rm_after["rm_false_pos"],
              "rm_auc_after": rm_after["rm_auc"], "favourite_answers": favourite_answers(sampled),
              "rm_loss_first": rm_losses[0] if rm_losses else None,
              "rm_loss_last": rm_losses[-1] if rm_losses else None,
              "rm_train_size": 0 if args.frozen_rm else new_size,
              "history_size": history_size}
    log.write(record)
    print(f"iteration {iteration}: true accuracy {record['true_acc']:.3f}, r_phi mean reward "
          f"{record['rm_reward']:.3f} (gap {record['rm_gap']:+.3f}, within-group AUC "
          f"{record['rm_auc'] if record['rm_auc'] is None else round(record['rm_auc'], 3)}), "
          f"r_phi accuracy {record['rm_acc_before']:.3f} -> "
          f"{record['rm_acc_after']:.3f}, greedy test {test_greedy:.3f}")
    return record


def report(result: dict, device, seconds: float, args: Args):
    """The run's tables: before / after, r_phi and the policy per iteration, favourite answers."""
    mode, records = result["mode"], result["iterations"]
    print(f"\nIterative GRPO ({mode}), {args.iterations} iterations x {args.steps} steps of "
          f"{args.batch_size} questions x G={args.group_size} on {device}, "
          f"{seconds:.0f}s; log in {result['out_dir']}")
    print(plumbing.results_table({"SFT model": result["before"],
                                  f"after GRPO ({mode})": result["after"]}))
    print("\nPer iteration, on fresh samples of the policy for held-out questions (temperature "
          f"{args.temperature}):\n")
    print(plumbing.results_table({f"iteration {r['iteration']}": {
        "policy updates": r["policy_updates"], "true accuracy": r["true_acc"],
        "r_phi mean reward": r["rm_reward"], "r_phi gap": r["rm_gap"],
        "r_phi false pos": r["rm_false_pos"], "r_phi AUC in group": r["rm_auc"],
        "r_phi acc before": r["rm_acc_before"], "r_phi acc after": r["rm_acc_after"],
        "greedy test": r["test_greedy"]} for r in records}))
    print(f"The last probe's favourite final answers ({args.rm_eval_questions} questions x G = "
          f"{args.group_size}; answer: outputs): "
          + ", ".join(f"{a}: {n}" for a, n in records[-1]["favourite_answers"]))
    print(result["memory"])


if __name__ == "__main__":
    main()
