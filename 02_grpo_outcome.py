"""Lesson 02: GRPO with outcome supervision (DeepSeekMath, section 4.1).

GRPO drops PPO's value model. For each question q it samples a group of G outputs {o_1..o_G} from
pi_old, scores each with the reward, and uses the group itself as the baseline.

Outcome supervision: one reward per output, normalised within its group,

    r~_i = (r_i - mean(r)) / std(r),        A_{i,t} = r~_i   for every token t of o_i

(a group whose rewards are all equal carries no signal: its advantages are 0).

The GRPO objective, eq. (3), maximised for mu iterations on each sampled batch:

    J_GRPO(theta) = E[ 1/G sum_i 1/|o_i| sum_t { min( ratio_{i,t} A_{i,t},
                                                      clip(ratio_{i,t}, 1-eps, 1+eps) A_{i,t} )
                                                 - beta * D_KL[pi_theta || pi_ref] } ]
    ratio_{i,t} = pi_theta(o_{i,t} | q, o_{i,<t}) / pi_old(o_{i,t} | q, o_{i,<t})

The KL estimator of eq. (4) ("k3"), unbiased and never negative, in the loss rather than the reward:

    D_KL[pi_theta || pi_ref] = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1     (per token)

Its value, averaged over samples of pi_theta, is KL(pi_theta || pi_ref); its gradient in the loss
is, in expectation, the gradient of KL(pi_ref || pi_theta), the other direction (the sampling is
not differentiated). Both pull pi_theta towards pi_ref (tests/test_02_grpo_outcome.py works it out).

Three of the paper's choices are options, the paper's the default (docs/02_grpo_outcome.md):
--loss_agg output | token | constant   eq. (3)'s 1/|o_i| | DAPO's token mean | Dr. GRPO's constant
--scale_rewards group | none           divide by the group's std, or not (Dr. GRPO)
--kl_estimator k3 | k1 | k2            the KL term in the loss

The reward is the task's exact verifier: 1 when the final answer is right, else 0. pi_ref is the
SFT model and stays frozen. --micro_batch_size splits each update into passes of that many outputs
and adds up their gradients (gradient accumulation): the same gradient in less memory.

Run:  python 02_grpo_outcome.py                   (--help lists every option)
      python 02_grpo_outcome.py --model smollm2   (the real model, for a GPU: docs/real_model.md)
"""

import copy
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

import common
import task
import plumbing
from plumbing import arg

AGGS, SCALES, KLS = ("output", "token", "constant"), ("group", "none"), ("k3", "k1", "k2")
SEED_MUST = f"use a seed in 0 .. {2**32 - 1}"


@dataclass
class Args:
    model: str = arg("tiny", "tiny (built in), smollm2, a model folder, a .gguf file or a hub id")
    sft_steps: int = arg(plumbing.SFT_STEPS, "SFT steps that make pi_sft (cached)", min=0)
    seed: int = arg(0, "seed of the train problems, sampling and init", min=0, below=2**32,
                    must=SEED_MUST)
    device: str = arg("auto", "auto, cpu, cuda or cuda:N")
    steps: int = arg(60, "sampled batches; each gives mu policy updates", min=1)
    batch_size: int = arg(16, "questions per step", min=1)
    group_size: int = arg(8, "G: outputs sampled per question (a baseline needs 2)", min=2)
    micro_batch_size: int = arg(0, "outputs per forward/backward pass; 0: the whole batch", min=0)
    lr: float = arg(1e-4, "Adam learning rate of the policy", above=0)
    warmup_steps: int = arg(20, "steps of linear learning-rate warm-up", min=0)
    beta: float = arg(0.04, "KL coefficient beta of eq. (3)", min=0)
    clip_eps: float = arg(0.2, "clip range epsilon of eq. (3)", min=0, below=1)
    mu: int = arg(1, "GRPO iterations per sampled batch (1 in the paper)", min=1)
    temperature: float = arg(1.0, "sampling temperature (log-probs use the same)", above=0)
    max_new_tokens: int = arg(64, "longest completion", min=1)
    max_grad_norm: float = arg(1.0, "gradient clipping", above=0)
    eval_test: int = arg(200, "test problems evaluated before and after", min=0)
    eval_ood: int = arg(200, "out-of-distribution (longer) problems evaluated", min=0)
    k: int = arg(8, "K of Maj@K and Pass@K", min=0)
    loss_agg: str = arg("output", "output (eq. 3), token (DAPO), constant (Dr. GRPO)", choices=AGGS)
    scale_rewards: str = arg("group", "group (divide by std), none (Dr. GRPO)", choices=SCALES)
    kl_estimator: str = arg("k3", "k3 (eq. 4), k1 or k2: the KL term in the loss", choices=KLS)
    maj_pass_k: int = arg(0, "Figure 7: Maj@K, Pass@K for K = 1, 2, 4 .. this (0: skip)", min=0)
    maj_pass_problems: int = arg(100, "problems of each split for --maj_pass_k", min=1)
    maj_pass_temperature: float = arg(0.7, "sampling temperature of --maj_pass_k", above=0)
    out_dir: str = arg("", "where the log and model go (default: runs/02_grpo_outcome/<run>)")
    cache_dir: str = arg("", "where SFT models are cached (default ./cache)")


# A pretrained model (--model smollm2, a folder, a .gguf file or a hub id) replaces these defaults
# unless the flag is given: a short SFT (it knows language, not the answer format) and micro-batches
# that fit an 8 GB GPU (docs/real_model.md).
PRETRAINED = {"sft_steps": 200, "steps": 40, "micro_batch_size": 16}


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


def grpo_step(policy, ref_policy, tokenizer, optimizer, problems: list, args: Args) -> dict:
    """One pass of the loop: sample a group per question from pi_old, score, then mu updates."""
    G = args.group_size
    # pi_old <- pi_theta; sample G outputs o_i ~ pi_old(.|q) for each question q
    prompts = [task.prompt_text(p) for p in problems]
    batch = common.sample(policy, tokenizer, prompts, G, args.temperature, args.max_new_tokens)
    mask = batch.completion_mask  # [B*G, T]
    rewards = outcome_rewards(problems, batch.texts, G).to(mask.device)  # [B*G]
    advantages = grpo_outcome_advantages(rewards, G, args.scale_rewards == "group")  # [B*G]
    token_advantages = advantages[:, None].expand_as(mask)  # [B*G, T]: A_{i,t} = r~_i
    updated = grpo_update(policy, ref_policy, optimizer, batch, token_advantages, args,
                          args.loss_agg, args.kl_estimator)  # mu updates of eq. (3)
    return {"reward": rewards.mean().item(), "accuracy": (rewards == 1).float().mean().item(),
            **updated,
            "zero_adv_groups": (rewards.view(-1, G).std(1) == 0).float().mean().item(),
            "completion_len": mask.sum(1).float().mean().item(),
            # outputs that do not answer at once with "#### n" (they work line by line, or babble)
            "worked": sum(not t.lstrip().startswith("#") for t in batch.texts) / len(batch.texts)}


def main(argv=None):
    args = plumbing.parse_args(Args, argv, PRETRAINED)
    started = time.time()
    device = plumbing.resolve_device(args.device)
    common.set_seed(args.seed)
    out_dir = plumbing.run_dir("02_grpo_outcome", args, PRETRAINED)

    policy, tokenizer = plumbing.load_policy(args.model, args.sft_steps, device,
                                             args.cache_dir or None,
                                             micro_batch_size=args.micro_batch_size)
    ref_policy = copy.deepcopy(policy).eval().requires_grad_(False)  # pi_ref: pi_sft, frozen
    before = final_evaluation(policy, tokenizer, args)
    print(plumbing.results_table({"SFT model": before}))

    common.set_seed(args.seed)
    problems = task.train_problems(args.seed)
    optimizer = torch.optim.Adam(policy.parameters(), lr=args.lr)
    warmup = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min(1.0, (i + 1) / max(1, args.warmup_steps)))
    log = plumbing.MetricsLog(out_dir)
    bar = tqdm(range(1, args.steps + 1), desc="GRPO (outcome)")
    for step in bar:
        t0 = plumbing.clock(device)
        record = grpo_step(policy, ref_policy, tokenizer, optimizer,
                           [next(problems) for _ in range(args.batch_size)], args)
        warmup.step()
        record = {"step": step, **record, "step_time": plumbing.clock(device) - t0}
        log.write(record)
        bar.set_postfix(reward=f"{record['reward']:.2f}", acc=f"{record['accuracy']:.2f}",
                        kl=f"{record['kl']:.4f}", clip=f"{record['clip_frac']:.3f}",
                        zero_adv=f"{record['zero_adv_groups']:.2f}")
    return report(policy, ref_policy, tokenizer, before, args, log, out_dir, device, started)


# --------------------------------------------------------------------------------------------------
# What the lesson prints and records


def final_evaluation(model, tokenizer, args):
    """Greedy, Maj@K and Pass@K on the test split, greedy on the OOD split."""
    return task.evaluate(model, tokenizer, args.eval_test, args.eval_ood, args.k, args.temperature,
                         args.max_new_tokens)


def report(policy, ref_policy, tokenizer, before, args, log, out_dir, device, started) -> dict:
    after = final_evaluation(policy, tokenizer, args)
    memory = plumbing.peak_memory(device)  # the whole run's: sampling, updates, evaluations
    policy.save_pretrained(f"{out_dir}/model")
    tokenizer.save_pretrained(f"{out_dir}/model")
    log.write({"final": True, "before": before, "after": after, "memory": memory,
               "wall_time": time.time() - started})
    print(f"\nGRPO with outcome supervision, {args.steps} steps of {args.batch_size} questions "
          f"x G={args.group_size} on {device}, {time.time() - started:.0f}s; log in {out_dir}")
    print(plumbing.results_table({"SFT model": before, "after GRPO (outcome)": after}))
    print(memory)
    result = {"before": before, "after": after, "out_dir": out_dir, "memory": memory}
    if args.maj_pass_k:
        result["maj_pass"] = maj_pass_report(policy, ref_policy, tokenizer, args, log)
    return result


def maj_pass_report(policy, ref_policy, tokenizer, args: Args, log) -> dict:
    """The paper's Figure 7 at small scale: Maj@K and Pass@K against K, before and after GRPO."""
    ks = [2 ** i for i in range(args.maj_pass_k.bit_length()) if 2 ** i <= args.maj_pass_k]
    curves = {}
    for split in ("test", "ood"):
        problems = task.make_split(split, args.maj_pass_problems)
        for name, model in (("SFT model", ref_policy), ("after GRPO (outcome)", policy)):
            common.set_seed(args.seed)
            curves[f"{split}, {name}"] = task.maj_pass_curve(
                model, tokenizer, problems, ks, args.maj_pass_temperature, args.max_new_tokens)
    log.write({"final": True, "maj_pass": curves, "ks": ks,
               "temperature": args.maj_pass_temperature, "problems": args.maj_pass_problems})
    print(f"\nMaj@K and Pass@K, {args.maj_pass_k} samples per problem at temperature "
          f"{args.maj_pass_temperature}, {args.maj_pass_problems} problems of each split:\n")
    print(plumbing.results_table(curves))
    return curves


if __name__ == "__main__":
    main()
