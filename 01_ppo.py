"""Lesson 01: PPO with a value model, GAE and the per-token KL-penalised reward (DeepSeekMath 4.1).

This is the algorithm GRPO is defined against. PPO needs four models of the same size:

    pi_theta  the policy being trained, initialised from the SFT model pi_sft
    pi_ref    the reference: pi_sft, frozen
    r_phi     the reward model; here the task's exact verifier, 1 when the final answer is right,
              else 0. It scores the whole output, so its reward sits on the output's last token.
    V_psi     the value model (the critic): pi_sft with a scalar head on every token, trained
              alongside the policy. It is as large as the policy, and it is what GRPO removes.

The per-token reward with the KL penalty, eq. (2) (the log-ratio is taken at sampling time: a
number, not something to differentiate):

    r_t = r_phi(q, o_<=t) - beta * log( pi_theta(o_t | q, o_<t) / pi_ref(o_t | q, o_<t) )
          (r_phi only at the last token t = |o|; the KL term at every token)

Generalized Advantage Estimation over the completion tokens, V(s_{|o|+1}) = 0 after the last token:

    delta_t = r_t + gamma * V(s_{t+1}) - V(s_t),     A_t = sum_l (gamma*lambda)^l * delta_{t+l}
    returns_t = A_t + V(s_t)                         (the value model's target)

The clipped surrogate of eq. (1), maximised for several epochs over minibatches of each batch:

    J_PPO(theta) = E[ 1/|o| sum_t min( ratio_t A_t, clip(ratio_t, 1-eps, 1+eps) A_t ) ]
    ratio_t = pi_theta(o_t | q, o_<t) / pi_old(o_t | q, o_<t)

and the value loss, clipped like the policy so V_psi moves at most `value_clip` from its old values:

    L_V(psi) = 1/2 mean_t max( (V_t - returns_t)^2,
                               (V_old_t + clip(V_t - V_old_t, -c, c) - returns_t)^2 )

Implementation details (as in cleanrl's ppo.py and TRL's PPO trainer): advantages whitened over the
batch's real completion tokens; value clipping; gradient clipping for both models; separate Adam
optimizers for the policy and the value model (so no value-loss coefficient: --value_lr sets how
fast the critic learns). The paper gives no gamma or lambda: gamma = 1 (a finite output, nothing to
discount) and lambda = 1 by default, so A_t = return - V(s_t): the critic is only a baseline and its
errors add no bias while it learns; lambda < 1 (TRL uses 0.95) trusts the critic more.
--micro_batch_size splits each minibatch's forward/backward into passes of that many outputs and
adds up their gradients (gradient accumulation): the same update in less memory.

Run:  python 01_ppo.py                   (--help lists every option)
      python 01_ppo.py --model smollm2   (the real model, for a GPU: docs/real_model.md)
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

SEED_MUST = f"use a seed in 0 .. {2**32 - 1}"


@dataclass
class Args:
    model: str = arg("tiny", "tiny (built in), smollm2, a model folder, a .gguf file or a hub id")
    sft_steps: int = arg(plumbing.SFT_STEPS, "SFT steps that make pi_sft (cached)", min=0)
    seed: int = arg(0, "seed of the train problems, sampling and init", min=0, below=2**32,
                    must=SEED_MUST)
    device: str = arg("auto", "auto, cpu, cuda or cuda:N")
    steps: int = arg(60, "sampled batches; each gives ppo_epochs passes of updates", min=1)
    batch_size: int = arg(128, "questions per step, one output each", min=1)
    minibatch_size: int = arg(64, "outputs per optimizer step (<= batch_size)", min=1)
    micro_batch_size: int = arg(0, "outputs per forward/backward pass; 0: a whole minibatch", min=0)
    ppo_epochs: int = arg(2, "passes over each sampled batch", min=1)
    lr: float = arg(5e-5, "Adam learning rate of the policy pi_theta", above=0)
    value_lr: float = arg(1e-4, "Adam learning rate of the value model V_psi", above=0)
    beta: float = arg(0.04, "KL coefficient beta of the per-token reward, eq. (2)", min=0)
    clip_eps: float = arg(0.2, "clip range epsilon of eq. (1)", min=0, below=1)
    value_clip: float = arg(0.2, "how far V_psi may move from its old values per batch", min=0)
    gamma: float = arg(1.0, "discount gamma of GAE", min=0, max=1)
    lam: float = arg(1.0, "lambda of GAE (1: Monte Carlo returns, 0: one-step TD)", min=0, max=1)
    temperature: float = arg(1.0, "sampling temperature (log-probs use the same)", above=0)
    max_new_tokens: int = arg(64, "longest completion", min=1)
    max_grad_norm: float = arg(1.0, "gradient clipping, for policy and value model", above=0)
    eval_test: int = arg(200, "test problems evaluated before and after", min=0)
    eval_ood: int = arg(200, "out-of-distribution (longer) problems evaluated", min=0)
    k: int = arg(8, "K of Maj@K and Pass@K", min=0)
    out_dir: str = arg("", "where the log and models go (default: runs/01_ppo/<run>)")
    cache_dir: str = arg("", "where SFT models are cached (default ./cache)")


# A pretrained model (--model smollm2, a folder, a .gguf file or a hub id) replaces these defaults
# unless the flag is given: a short SFT (it knows language, not the answer format), lesson 02's
# steps (not yet probed for PPO) and micro-batches for a small GPU (docs/real_model.md).
PRETRAINED = {"sft_steps": 200, "steps": 40, "micro_batch_size": 16}


# --------------------------------------------------------------------------------------------------
# The value model V_psi


def load_value_model(sft_path: str, device):
    """V_psi: the SFT model's backbone with a new scalar head on every token (as large as pi_sft).

    AutoModelForTokenClassification with one label puts a Linear(hidden, 1) where the LM head was.
    Its dropout is 0 so values are deterministic, and the head starts at zero, so V_psi = 0
    everywhere at the start: with gamma = lambda = 1 the first advantages are the returns.
    """
    import transformers
    from transformers import AutoConfig, AutoModelForTokenClassification

    config = AutoConfig.from_pretrained(sft_path, num_labels=1)
    config.classifier_dropout = 0.0
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the head is new on purpose: no warning about it
    try:
        value_model = AutoModelForTokenClassification.from_pretrained(sft_path, config=config,
                                                                      dtype=torch.float32)
    except ValueError as e:  # a model family with no token-classification class
        plumbing.fail(f"no value model for {sft_path}: {str(e).splitlines()[0]}")
    finally:
        transformers.logging.set_verbosity(verbosity)
    head = value_model.score if hasattr(value_model, "score") else value_model.classifier
    torch.nn.init.zeros_(head.weight)
    if head.bias is not None:
        torch.nn.init.zeros_(head.bias)
    return value_model.to(device)


def token_values(value_model, batch: common.Batch) -> torch.Tensor:
    """V(s_t) for every completion token t; 0 where masked.  # [N, T]

    s_t is the state in which the policy chooses o_t: the question and the tokens before it,
    (q, o_<t). So V(s_t) is read at the position whose logits give pi(o_t | q, o_<t) in
    common.token_logprobs: position P-1+t of the sequence [q, o] (the last prompt token for t = 0),
    whose hidden state has seen q and o_<t but not o_t. The state after the last token is terminal:
    its value is 0 (see gae).
    """
    input_ids = torch.cat([batch.prompt_ids, batch.completion_ids], 1)  # [N, P+T]
    attention_mask = torch.cat([batch.prompt_mask, batch.completion_mask], 1)  # [N, P+T]
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    out = value_model(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=position_ids, use_cache=False).logits  # [N, P+T, 1]
    P = batch.prompt_ids.shape[1]
    values = out[:, P - 1:-1, 0].float()  # [N, T]: position P-1+t has seen q, o_<t
    return values * batch.completion_mask


# --------------------------------------------------------------------------------------------------
# The algorithm, one function per equation


def outcome_rewards(problems: list, texts: list, group_size: int) -> torch.Tensor:
    """r_i: 1 if output i's final answer is right, else 0.  # [B*G]"""
    graded = [task.verify(problems[i // group_size], t) for i, t in enumerate(texts)]
    return torch.tensor([float(g["correct"]) for g in graded])


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """The position of each output's last real token (its EOS when it has one).  # [N]

    The completion mask is 1 on a prefix of each row (up to and including the first EOS).
    """
    return (mask.sum(1) - 1).long().clamp(min=0)


@torch.no_grad()
def kl_penalised_rewards(scores, logp, ref_logp, mask, beta: float):
    """eq. (2): r_t = r_phi(q, o_<=t) - beta * log(pi_theta(o_t|..) / pi_ref(o_t|..)).

    scores: [N] r_phi of each whole output; logp, ref_logp: [N, T] log-probs of the sampled tokens
    under the policy that sampled them (pi_theta = pi_old at sampling time) and under pi_ref;
    mask: [N, T]. Returns the per-token rewards [N, T] (0 on padding) and the log-ratio [N, T].
    no_grad: the penalty is part of the reward, a number, not a term the policy differentiates.
    """
    mask = mask.float()
    log_ratio = (logp - ref_logp) * mask  # [N, T]
    rewards = -beta * log_ratio  # the KL penalty, at every token
    last = last_token_index(mask)  # [N]
    rewards[torch.arange(len(scores)), last] += scores.to(rewards.dtype)  # r_phi: last token only
    return rewards * mask, log_ratio


@torch.no_grad()
def gae(rewards, values, mask, gamma: float, lam: float):
    """Generalized Advantage Estimation over the completion tokens of each row.

    delta_t = r_t + gamma * V(s_{t+1}) - V(s_t),   A_t = delta_t + gamma * lambda * A_{t+1}
            (= sum_l (gamma*lambda)^l delta_{t+l}),  returns_t = A_t + V(s_t)

    rewards, values, mask: [N, T]. After the last real token the episode is over: V(s_{|o|+1}) = 0
    and nothing from the padding (or from tokens after the first EOS) flows back into the output.
    Returns advantages [N, T] and returns [N, T], both 0 on padding.
    """
    mask = mask.float()
    N, T = rewards.shape
    advantages = torch.zeros_like(rewards)  # [N, T]
    lastgaelam = torch.zeros(N, dtype=rewards.dtype, device=rewards.device)  # A_{t+1}
    for t in reversed(range(T)):
        if t + 1 < T:
            next_mask = mask[:, t + 1]  # 0 when t is the output's last token (or padding)
            nextvalues = values[:, t + 1] * next_mask  # V(s_{t+1}), 0 when s_{t+1} is terminal
        else:
            next_mask = nextvalues = torch.zeros_like(mask[:, 0])
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = (delta + gamma * lam * next_mask * lastgaelam) * mask[:, t]
        advantages[:, t] = lastgaelam
    returns = (advantages + values) * mask
    return advantages, returns


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the real tokens of the whole batch; 0 on padding.

    x, mask: [N, T]; mean and (population) std over the tokens where mask is 1.
    """
    mask = mask.float()
    n = mask.sum().clamp(min=1)
    mean = (x * mask).sum() / n
    var = (((x - mean) * mask) ** 2).sum() / n
    return (x - mean) / torch.sqrt(var + eps) * mask


def ppo_clipped_surrogate(logp, old_logp, advantages, mask, clip_eps: float,
                          num_outputs=None, num_tokens=None):
    """-J_PPO of eq. (1) and its statistics (token means over the minibatch: they add up).

    logp, old_logp: [n, T] log-probs of the sampled tokens under pi_theta and pi_old;
    advantages: [n, T]; mask: [n, T]. Each output's token sum is divided by its own length |o|,
    then outputs are averaged. num_outputs, num_tokens: the minibatch's outputs and tokens when
    these n rows are one micro-batch of it (default: these rows are the minibatch).
    """
    mask = mask.float()
    num_outputs = mask.shape[0] if num_outputs is None else num_outputs
    num_tokens = mask.sum().clamp(min=1) if num_tokens is None else num_tokens
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)  # [n, T]
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    surrogate = torch.min(ratio * advantages, clipped * advantages)
    per_output = common.masked_mean(surrogate, mask, dim=1)  # 1/|o| sum_t
    objective = per_output.sum() / num_outputs  # E over the minibatch's outputs
    with torch.no_grad():
        clip_frac = ((ratio - 1).abs() > clip_eps).float()
        # KL[pi_old || pi_theta] estimated with k3 = (ratio - 1) - log ratio: how far updates moved
        stats = {"clip_frac": ((clip_frac * mask).sum() / num_tokens).item(),
                 "approx_kl": ((((ratio - 1) - log_ratio) * mask).sum() / num_tokens).item()}
    return -objective, stats


def clipped_value_loss(values, old_values, returns, mask, value_clip: float, num_tokens=None):
    """1/2 mean_t max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2) over the real tokens.

    values: [n, T] V_psi now; old_values: [n, T] V_psi when the batch was sampled; returns: [n, T]
    targets; mask: [n, T]. num_tokens: the minibatch's tokens when these rows are a micro-batch.
    """
    mask = mask.float()
    num_tokens = mask.sum().clamp(min=1) if num_tokens is None else num_tokens
    clipped = old_values + torch.clamp(values - old_values, -value_clip, value_clip)
    loss = torch.max((values - returns) ** 2, (clipped - returns) ** 2)
    value_loss = 0.5 * (loss * mask).sum() / num_tokens
    with torch.no_grad():
        moved = ((values - old_values).abs() > value_clip).float()
        clip_frac = ((moved * mask).sum() / num_tokens).item()
    return value_loss, {"value_clip_frac": clip_frac}


def rollout(policy, ref_policy, tokenizer, problems: list, args: Args) -> dict:
    """pi_old <- pi_theta; one output o ~ pi_old(.|q) per question q, scored by r_phi; the
    per-token rewards of eq. (2); and the minibatches of every epoch (the same for both models)."""
    temperature, mbs = args.temperature, args.micro_batch_size
    prompts = [task.prompt_text(p) for p in problems]
    batch = common.sample(policy, tokenizer, prompts, 1, temperature, args.max_new_tokens)
    mask = batch.completion_mask.float()  # [N, T]
    scores = outcome_rewards(problems, batch.texts, 1).to(mask.device)  # [N]: r_phi, one a q
    old_logp = common.token_logprobs(policy, batch, temperature, grad=False,
                                     micro_batch_size=mbs)  # [N, T] pi_old
    ref_logp = common.token_logprobs(ref_policy, batch, temperature, grad=False,
                                     micro_batch_size=mbs)  # [N, T] pi_ref
    rewards, log_ratio = kl_penalised_rewards(scores, old_logp, ref_logp, mask, args.beta)
    minibatches = [idx.to(mask.device) for _ in range(args.ppo_epochs)  # a new order each epoch
                   for idx in torch.randperm(len(batch)).split(args.minibatch_size)]
    return {"batch": batch, "mask": mask, "scores": scores, "old_logp": old_logp,
            "rewards": rewards, "log_ratio": log_ratio, "minibatches": minibatches}


def value_step(value_model, value_optimizer, sampled: dict, args: Args) -> dict:
    """V_psi's part of the step, the part GRPO removes: V_old(s_t) at sampling time, GAE's
    advantages (whitened) and returns, then one Adam step of the clipped value loss a minibatch,
    its gradient added up over micro-batches."""
    batch, mask = sampled["batch"], sampled["mask"]
    old_values = common.no_grad_pass(token_values, value_model, batch,
                                     args.micro_batch_size)  # [N, T] V_old, at sampling time
    advantages, returns = gae(sampled["rewards"], old_values, mask, args.gamma, args.lam)
    value_model.train()
    losses, clip_fracs = [], []
    for idx in sampled["minibatches"]:
        minibatch, num_tokens = batch.select(idx), mask[idx].sum().clamp(min=1)
        value_optimizer.zero_grad()
        loss, clip_frac = 0, 0
        for rows in common.micro_batches(minibatch, args.micro_batch_size):
            i = idx[rows]  # the micro-batch's rows in the whole batch
            values = token_values(value_model, minibatch.select(rows))  # [n, T]
            part, stats = clipped_value_loss(values, old_values[i], returns[i], mask[i],
                                             args.value_clip, num_tokens)
            part.backward()
            loss, clip_frac = loss + part.item(), clip_frac + stats["value_clip_frac"]
        grad_norm = torch.nn.utils.clip_grad_norm_(value_model.parameters(), args.max_grad_norm)
        value_optimizer.step()
        losses.append(loss)
        clip_fracs.append(clip_frac)
    value_model.eval()
    return {"advantages": whiten(advantages, mask), "returns": returns, "old_values": old_values,
            "value_loss": losses, "value_clip_frac": clip_fracs, "value_grad_norm": grad_norm}


def policy_step(policy, optimizer, sampled: dict, advantages, args: Args) -> dict:
    """pi_theta's part: one Adam step of eq. (1) a minibatch, ppo_epochs passes over the batch,
    each minibatch's gradient added up over micro-batches with the minibatch's normalisers."""
    batch, mask, old_logp = sampled["batch"], sampled["mask"], sampled["old_logp"]
    policy.train()
    stats = {"policy_loss": [], "clip_frac": [], "approx_kl": []}
    for idx in sampled["minibatches"]:
        minibatch, num_tokens = batch.select(idx), mask[idx].sum().clamp(min=1)
        optimizer.zero_grad()
        totals = dict.fromkeys(stats, 0)
        for rows in common.micro_batches(minibatch, args.micro_batch_size):
            i = idx[rows]  # the micro-batch's rows in the whole batch
            logp = common.token_logprobs(policy, minibatch.select(rows), args.temperature)
            loss, part = ppo_clipped_surrogate(logp, old_logp[i], advantages[i], mask[i],
                                               args.clip_eps, len(idx), num_tokens)
            loss.backward()
            for key, value in {"policy_loss": loss.item(), **part}.items():
                totals[key] += value
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
        optimizer.step()
        for key in stats:
            stats[key].append(totals[key])
    policy.eval()
    return {**stats, "grad_norm": grad_norm}


def check_args(args: Args):
    """What the fields' bounds cannot say: a minibatch is a part of the sampled batch."""
    if args.minibatch_size > args.batch_size:
        plumbing.fail(f"--minibatch_size {args.minibatch_size} is larger than --batch_size "
                      f"{args.batch_size}: a minibatch is a part of the sampled batch")


def main(argv=None):
    args = plumbing.parse_args(Args, argv, PRETRAINED)
    check_args(args)
    started = time.time()
    device = plumbing.resolve_device(args.device)
    common.set_seed(args.seed)
    out_dir = plumbing.run_dir("01_ppo", args, PRETRAINED)

    policy, tokenizer = plumbing.load_policy(args.model, args.sft_steps, device,
                                             args.cache_dir or None,
                                             micro_batch_size=args.micro_batch_size)
    ref_policy = copy.deepcopy(policy).eval().requires_grad_(False)  # pi_ref: pi_sft, frozen
    before = final_evaluation(policy, tokenizer, args)
    print(plumbing.results_table({"SFT model": before}))
    # V_psi, from pi_sft; loaded after the evaluation, whose random state is then lesson 02's
    value_model = load_value_model(policy.name_or_path, device).eval()

    common.set_seed(args.seed)
    problems = task.train_problems(args.seed)
    optimizer = torch.optim.Adam(policy.parameters(), lr=args.lr)
    value_optimizer = torch.optim.Adam(value_model.parameters(), lr=args.value_lr)
    log = plumbing.MetricsLog(out_dir)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    records = []
    bar = tqdm(range(1, args.steps + 1), desc="PPO")
    for step in bar:
        questions = [next(problems) for _ in range(args.batch_size)]
        t0 = plumbing.clock(device)
        sampled = rollout(policy, ref_policy, tokenizer, questions, args)  # eq. (2)
        t1 = plumbing.clock(device)
        critic = value_step(value_model, value_optimizer, sampled, args)  # GAE, L_V
        t2 = plumbing.clock(device)
        updates = policy_step(policy, optimizer, sampled, critic["advantages"], args)  # eq. (1)
        records.append({"step": step, **step_stats(sampled, critic, updates),
                        "value_time": t2 - t1, "step_time": plumbing.clock(device) - t0})
        log.write(records[-1])
        bar.set_postfix(reward=f"{records[-1]['reward']:.2f}", kl=f"{records[-1]['kl']:.4f}",
                        vloss=f"{records[-1]['value_loss']:.3f}",
                        ev=f"{records[-1]['explained_variance']:.2f}",
                        clip=f"{records[-1]['clip_frac']:.3f}")
    memory = plumbing.peak_memory(device)  # of the training loop alone: read before the evaluation
    after = final_evaluation(policy, tokenizer, args)
    policy.save_pretrained(f"{out_dir}/model")
    tokenizer.save_pretrained(f"{out_dir}/model")
    value_model.save_pretrained(f"{out_dir}/value_model")
    result = {"before": before, "after": after, "out_dir": out_dir,
              "cost": cost_rows(policy, value_model, ref_policy, optimizer, value_optimizer),
              "memory": memory, "mean_step_time": mean([r["step_time"] for r in records]),
              "mean_value_time": mean([r["value_time"] for r in records])}
    log.write({"final": True, **{k: v for k, v in result.items() if k != "out_dir"},
               "wall_time": time.time() - started})
    report(result, args, device, started)
    return result


# --------------------------------------------------------------------------------------------------
# What the lesson prints and records, and what the critic costs


def final_evaluation(model, tokenizer, args):
    """Greedy, Maj@K and Pass@K on the test split, greedy on the OOD split."""
    return task.evaluate(model, tokenizer, args.eval_test, args.eval_ood, args.k, args.temperature,
                         args.max_new_tokens)


def explained_variance(values, returns, mask) -> float:
    """1 - Var(returns - V) / Var(returns) over the real tokens: 1 a perfect critic, 0 no better
    than predicting the mean return, negative worse than that; nan when the returns do not vary."""
    mask = mask.bool()
    y, y_pred = returns[mask], values[mask]
    var_y = y.var(unbiased=False)
    return float("nan") if var_y == 0 else (1 - (y - y_pred).var(unbiased=False) / var_y).item()


def mean(values: list) -> float:
    return sum(values) / len(values)  # over a step's minibatch updates, or over the steps


def step_stats(sampled: dict, critic: dict, updates: dict) -> dict:
    """One line of metrics.jsonl from what the three parts of a step returned."""
    mask, log_ratio, scores = sampled["mask"], sampled["log_ratio"], sampled["scores"]
    n_tokens = mask.sum().clamp(min=1)
    return {"reward": scores.mean().item(), "accuracy": (scores == 1).float().mean().item(),
            "kl": (log_ratio.sum() / n_tokens).item(),  # mean log(pi_old / pi_ref) per token
            "kl_per_output": log_ratio.sum(1).mean().item(),
            "explained_variance": explained_variance(critic["old_values"], critic["returns"], mask),
            **{key: mean(updates[key]) for key in ("policy_loss", "clip_frac", "approx_kl")},
            **{key: mean(critic[key]) for key in ("value_loss", "value_clip_frac")},
            "grad_norm": updates["grad_norm"].item(),
            "value_grad_norm": critic["value_grad_norm"].item(),
            "mean_value": ((critic["old_values"] * mask).sum() / n_tokens).item(),
            "completion_len": mask.sum(1).mean().item()}


def model_bytes(model, optimizer=None) -> int:
    """Bytes of the weights, plus the optimizer's state (Adam: two tensors per parameter)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if optimizer is not None:
        for state in optimizer.state.values():
            total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    return total


def cost_rows(policy, value_model, ref_policy, optimizer, value_optimizer) -> dict:
    """The cost table: parameters, trainable parameters, weights + Adam state of each model."""
    def row(model, optim=None):
        every = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return {"parameters": f"{every:,}", "trainable": f"{trainable:,}",
                "weights + Adam state": f"{model_bytes(model, optim) / 2**20:.1f} MiB"}
    return {"pi_theta (policy)": row(policy, optimizer),
            "V_psi (value model)": row(value_model, value_optimizer),
            "pi_ref (frozen)": row(ref_policy)}


def report(result: dict, args, device, started):
    """The before/after table, what the critic costs and where a step's time goes."""
    mean_step, mean_value = result["mean_step_time"], result["mean_value_time"]
    print(f"\nPPO, {args.steps} steps of {args.batch_size} questions x 1 output, {args.ppo_epochs} "
          f"epochs of minibatches of {args.minibatch_size}, on {device}, "
          f"{time.time() - started:.0f}s; log in {result['out_dir']}")
    print(plumbing.results_table({"SFT model": result["before"], "after PPO": result["after"]}))
    print("\nWhat the critic costs:")
    print(plumbing.results_table(result["cost"]))
    print(result["memory"])
    print(f"mean time per step: {mean_step:.2f}s, of which the value model (its forward at "
          f"sampling, GAE, its updates): {mean_value:.2f}s ({100 * mean_value / mean_step:.0f}%)")


if __name__ == "__main__":
    main()
