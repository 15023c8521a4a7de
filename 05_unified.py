"""Lesson 05: SFT, RFT, DPO, Online RFT, PPO and GRPO as one gradient (DeepSeekMath, section 5.2).

Every method is the same gradient, eq. (5):

    grad J_A(theta) = E[(q,o) ~ D] ( 1/|o| sum_t GC_A(q, o, t, pi_rf) * grad log pi_theta(o_t|..) )

The data source D, the reward pi_rf and the gradient coefficient GC tell them apart:

    method      data source                          reward   gradient coefficient GC
    SFT         q, o ~ P_sft (demonstrations)        none     1
    RFT         q ~ P_sft, o ~ pi_sft, offline       rule     I(o): 1 if the answer is right, else 0
    DPO         q ~ P_sft, o+, o- ~ pi_sft, offline  rule     +-beta*sigma(beta*(lr(o-) - lr(o+)))
    Online RFT  q ~ P_sft, o ~ pi_theta, online      rule     I(o)
    PPO         q ~ P_sft, o ~ pi_theta, online      rule*    A_t (GAE, a value model; eq. (1), (2))
    GRPO        q ~ P_sft, {o_i} ~ pi_theta, online  rule*    A_{i,t} + beta * (pi_ref/pi_theta - 1)

    * the paper's PPO and GRPO take a reward model's score; the task's exact verifier stands in.
    lr(o) = 1/|o| sum_t log pi_theta(o_t)/pi_ref(o_t): DPO's GC is the exact gradient of the paper's
    DPO objective (appendix A.1.4, eq. (12)); the paper's table (eq. (14)) writes it per token
    and without the beta in front.

The one update, whose gradient is eq. (5) (--normaliser constant / token: Dr. GRPO / DAPO):

    loss = -1/n sum_o 1/|o| sum_t stopgrad(GC_t) * log pi_theta(o_t)

Run:  python 05_unified.py                          every method, seeds 0,1,2 (--help: every option)
      python 05_unified.py --methods rft,online_rft --seeds 0
      python 05_unified.py --seeds 1 & ...          one process per seed, then
      python 05_unified.py --report_only            the tables and findings, from the logs
      python 05_unified.py --model smollm2 --seeds 0  the real model, a GPU (docs/real_model.md)
"""

import copy
import random
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

import common
import findings
import plumbing
import task
from plumbing import arg

# the paper's table: name on the command line -> (name in the tables, data source D, reward, GC)
METHODS = {
    "sft": ("SFT", "q, o ~ P_sft(Q, O): demonstrations", "none", "1"),
    "rft": ("RFT", "q ~ P_sft(Q), o ~ pi_sft(O|q): offline", "rule", "I(o)"),
    "dpo": ("DPO", "q ~ P_sft(Q), o+, o- ~ pi_sft(O|q): offline pairs", "rule",
            "+-beta * sigma(beta*lr(o-) - beta*lr(o+))"),
    "online_rft": ("Online RFT", "q ~ P_sft(Q), o ~ pi_theta(O|q): online", "rule", "I(o)"),
    "ppo": ("PPO", "q ~ P_sft(Q), o ~ pi_theta(O|q): online",
            "rule (verifier) in place of the paper's reward model, + KL, eq. (2)", "A_t (GAE)"),
    "grpo_os": ("GRPO+OS", "q ~ P_sft(Q), {o_i} ~ pi_theta(O|q): online",
                "rule (verifier, outcome) in place of the paper's reward model",
                "A_{i,t} + beta * (pi_ref/pi_theta - 1)"),
    "grpo_ps": ("GRPO+PS", "q ~ P_sft(Q), {o_i} ~ pi_theta(O|q): online",
                "rule (verifier, per step) in place of the paper's process reward model",
                "A_{i,t} + beta * (pi_ref/pi_theta - 1)"),
}
NEEDS_PI_REF = ("dpo", "ppo", "grpo_os", "grpo_ps")


@dataclass
class Args:
    normaliser: str = arg("output", "output: eq. (5)'s 1/|o|; constant: 1/max_new_tokens (Dr. "
                          "GRPO); token: 1/tokens (DAPO)", choices=("output", "constant", "token"))
    methods: str = arg(",".join(METHODS), "comma-separated subset of " + ",".join(METHODS))
    seeds: str = arg("0,1,2", "comma-separated seeds; every method runs once per seed")
    model: str = arg("tiny", "tiny (built in), smollm2, a model folder, a .gguf file or a hub id")
    sft_steps: int = arg(plumbing.SFT_STEPS, "SFT steps that make pi_sft (cached)", min=0)
    device: str = arg("auto", "auto, cpu, cuda or cuda:N")
    steps: int = arg(60, "policy updates per method (one batch each)", min=1)
    batch_size: int = arg(16, "questions per update", min=1)
    group_size: int = arg(4, "outputs per question (G); SFT takes batch_size x G demonstrations",
                          min=2, must="GRPO and DPO need at least 2 outputs per question")
    micro_batch_size: int = arg(0, "outputs per forward/backward pass; 0: the whole batch", min=0)
    lr: float = arg(5e-5, "Adam learning rate of the policy, the same for every method", above=0)
    beta: float = arg(0.04, "KL coefficient of GRPO's loss, eq. (3), PPO's reward, eq. (2)", min=0)
    dpo_beta: float = arg(0.1, "beta of the DPO loss", above=0)
    value_lr: float = arg(1e-4, "Adam learning rate of PPO's value model", above=0)
    gamma: float = arg(1.0, "PPO discount gamma of GAE", min=0, max=1)
    lam: float = arg(0.95, "PPO lambda of GAE", min=0, max=1)
    temperature: float = arg(1.0, "sampling temperature (log-probs use the same)", above=0)
    max_new_tokens: int = arg(64, "longest completion", min=1)
    max_grad_norm: float = arg(1.0, "gradient clipping", above=0)
    eval_every: int = arg(20, "updates between test-accuracy checks (0: none)", min=0)
    eval_curve: int = arg(100, "test problems of each check (greedy accuracy)", min=1)
    eval_test: int = arg(200, "test problems of the final evaluation", min=1)
    eval_ood: int = arg(200, "out-of-distribution (longer) problems of the final evaluation", min=0)
    k: int = arg(8, "K of Maj@K and Pass@K (the findings need it)", min=1)
    out_dir: str = arg("", "each seed logs to <out_dir>/seed<seed> (default runs/05_unified/<run>)")
    cache_dir: str = arg("", "where SFT models are cached (default ./cache)")
    report_only: bool = arg(False, "train nothing: tables and findings of --seeds, from the logs")


# A pretrained model (--model smollm2, a folder, a .gguf file or a hub id) replaces these defaults
# unless the flag is given: lesson 02's short SFT and its micro-batches (docs/real_model.md).
PRETRAINED = {"sft_steps": 200, "steps": 40, "micro_batch_size": 16}


# --------------------------------------------------------------------------------------------------
# The one update: eq. (5) as a loss


def unified_loss(logp, mask, gc, n_samples=None, normaliser="output", max_len=64, n_tokens=None):
    """eq. (5): the loss whose gradient is -1/n sum_o 1/|o| sum_t GC_t * grad log pi_theta(o_t).

    logp: [N, T] log pi_theta of the output tokens (with grad); mask: [N, T] 1 on output tokens;
    gc: [N, T] the gradient coefficient, a constant (detached). n_samples: how many draws from the
    data source the batch is (default N; DPO's draws are pairs of outputs); n_tokens: the batch's
    output tokens (default: of these rows). When these rows are one micro-batch, pass the whole
    batch's n_samples and n_tokens: the micro-batches' losses then add up to the batch's loss.
    normaliser: what divides each output's sum over its tokens. "output" is eq. (5)'s 1/|o|;
    "constant" divides every output by max_len (Dr. GRPO); "token" divides the batch's sum by its
    number of tokens (DAPO, TRL's default).
    """
    mask = mask.float()
    weighted = gc.detach() * logp * mask  # [N, T] GC_t log pi
    n = logp.shape[0] if n_samples is None else n_samples
    if normaliser == "token":
        return -weighted.sum() / (mask.sum().clamp(min=1) if n_tokens is None else n_tokens)
    length = mask.sum(1).clamp(min=1) if normaliser == "output" else torch.full_like(mask[:, 0],
                                                                                     max_len)
    per_output = weighted.sum(1) / length  # 1/|o| sum_t GC_t log pi  (or 1/max_len sum_t)
    return -per_output.sum() / n


# --------------------------------------------------------------------------------------------------
# Each method's gradient coefficient GC, one row of the paper's table. [N, T], 0 on padding


def gc_sft(mask):
    return torch.ones_like(mask, dtype=torch.float)  # SFT: GC = 1


def gc_rft(correct, mask):
    return correct.float()[:, None] * mask  # RFT and Online RFT: GC = I(o)


def gc_dpo(logp, ref_logp, mask, n_pairs, beta):
    """Rows 0..P-1 are the chosen outputs o+, rows P..2P-1 the rejected o- of the same pairs."""
    mask = mask.float()
    log_ratio = common.masked_mean((logp - ref_logp).detach(), mask, dim=1)  # 1/|o| sum_t  [2P]
    s = torch.sigmoid(beta * log_ratio[n_pairs:] - beta * log_ratio[:n_pairs])  # [P]
    return beta * torch.cat([s, -s])[:, None] * mask  # DPO: GC = +-beta * sigma(...)


def gc_ppo(advantages, mask):
    """PPO's GC: the gradient of eq. (1) at pi_old = pi_theta (the clip is inactive) is A_t."""
    return advantages * mask  # PPO: GC = A_t


def gc_grpo(advantages, logp, ref_logp, mask, beta):
    """GRPO's GC: the gradient of eq. (3) with eq. (4)'s KL at pi_old = pi_theta."""
    return (advantages + beta * (torch.exp(ref_logp - logp.detach()) - 1)) * mask


# --------------------------------------------------------------------------------------------------
# Rewards, advantages and the value model: lessons 01-03's functions, copied character for
# character (tests/test_05_unified.py compares them), so this lesson reads alone


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


def step_rewards(problems: list, batch: common.Batch, group_size: int) -> tuple[list, list]:
    """R of the paper and the index(j) of every step: two lists of N lists, ragged (K_i steps).

    r_i^index(j) = 1 if the verifier says line j of o_i is a correct step, else 0; the final-answer
    line is the last step. index(j) = the completion position of the token that ends line j
    (Batch.step_ends, aligned with verify()'s "steps"). Every step o_i never wrote (verify()'s
    "missing") is one more step of reward 0 at o_i's last completion token: a solution cut short,
    or an empty one, is charged for what it left out.
    """
    last_token = (batch.completion_mask.sum(1) - 1).tolist()  # [N]
    rewards, index = [], []
    for i, (text, ends) in enumerate(zip(batch.texts, batch.step_ends)):
        graded = task.verify(problems[i // group_size], text)
        rewards.append([float(ok) for ok in graded["steps"]] + [0.0] * graded["missing"])
        index.append(list(ends) + [last_token[i]] * graded["missing"])
    return rewards, index


def grpo_process_advantages(rewards: list, index: list, group_size: int, T: int) -> torch.Tensor:
    """A_{i,t} = sum over j with index(j) >= t of r~_i^index(j).  # [N, T]

    rewards, index: N ragged lists from step_rewards(); rows i*G..i*G+G-1 are one group. Each step
    reward is normalised with the mean and (population) std of ALL step rewards of its group (R in
    the paper), whatever output they belong to; a group whose step rewards are all equal gets 0.
    """
    # R flattened: one entry per step of the batch, with its output (row) and its end token index(j)
    row = torch.tensor([i for i, r_i in enumerate(rewards) for _ in r_i])  # [S], S steps in all
    r = torch.tensor([x for r_i in rewards for x in r_i], dtype=torch.float32)  # [S]
    end = torch.tensor([e for index_i in index for e in index_i])  # [S]
    group = row // group_size  # [S]: the group of each step
    n_groups = len(rewards) // group_size

    # r~ = (r - mean(R)) / std(R), mean and std over all the steps of each group
    count = torch.zeros(n_groups).index_add_(0, group, torch.ones_like(r))  # [n_groups]
    mean = torch.zeros(n_groups).index_add_(0, group, r) / count  # [n_groups]
    std = (torch.zeros(n_groups).index_add_(0, group, (r - mean[group]) ** 2) / count).sqrt()
    safe = torch.where(std > 0, std, torch.ones_like(std))
    normalised = torch.where(std[group] > 0, (r - mean[group]) / safe[group],
                             torch.zeros_like(r))  # r~  [S]

    # Each r~_i^index(j) on its token index(j) (added up: one token of a hub tokenizer, "\n\n", may
    # end two lines), then summed from the right: token t collects every step ending at or after t.
    placed = torch.zeros(len(rewards), T).index_put_((row, end), normalised, accumulate=True)
    return placed.flip(1).cumsum(1).flip(1)  # [N, T]; 0 after the last step's end


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
# The data sources D


def demonstrations(tokenizer, problems, device, rng):
    """SFT's data source: more of the SFT data P_sft, the same mix of worked and answer-only
    solutions."""
    return common.build_batch(tokenizer, [task.prompt_text(p) for p in problems],
                              [task.sft_demonstration(p, rng) for p in problems], device)


def offline_data(sft_model, tokenizer, args, seed):
    """RFT's and DPO's data source: every batch sampled ONCE from pi_sft, before any training.

    As many outputs as an online method samples over the whole run, from the same questions.
    """
    common.set_seed(seed)
    problems = task.train_problems(seed)
    data = []
    for _ in tqdm(range(args.steps), desc="sampling offline data from pi_sft", leave=False):
        batch_problems = [next(problems) for _ in range(args.batch_size)]
        batch = common.sample(sft_model, tokenizer, [task.prompt_text(p) for p in batch_problems],
                              args.group_size, args.temperature, args.max_new_tokens)
        data.append((batch_problems, batch))
    return data


def dpo_pairs(problems, batch, group_size):
    """(chosen rows, rejected rows): each question pairs its right outputs with its wrong ones."""
    correct = outcome_rewards(problems, batch.texts, group_size)
    chosen, rejected = [], []
    for q in range(len(problems)):
        rows = range(q * group_size, (q + 1) * group_size)
        right = [i for i in rows if correct[i] == 1]
        wrong = [i for i in rows if correct[i] == 0]
        for c, r in zip(right, wrong):
            chosen.append(c)
            rejected.append(r)
    return chosen, rejected


def data_source(method, step, policy, tokenizer, questions, offline, style, args):
    """D of eq. (5) for update `step`: (questions, Batch of their outputs)."""
    B, G = args.batch_size, args.group_size
    if method == "sft":  # q, o ~ P_sft: B*G more demonstrations, no sampling
        problems = [next(questions) for _ in range(B * G)]
        return problems, demonstrations(tokenizer, problems, policy.device, style)
    if method in ("rft", "dpo"):  # q ~ P_sft, o ~ pi_sft: sampled once, before training
        return offline[step - 1]
    problems = [next(questions) for _ in range(B)]  # q ~ P_sft, o ~ pi_theta: sampled now
    return problems, common.sample(policy, tokenizer, [task.prompt_text(p) for p in problems], G,
                                   args.temperature, args.max_new_tokens)


# --------------------------------------------------------------------------------------------------
# One update of each method: its reward, its gradient coefficient, then eq. (5)


def update(method, problems, batch, policy, sft_model, optimizer, critic, args) -> dict:
    """One update of `method` from its data: the reward pi_rf, the gradient coefficient GC for the
    whole batch, then eq. (5) in micro-batches. critic: PPO's (V_psi, its optimizer), else None."""
    G, temperature, mbs = args.group_size, args.temperature, args.micro_batch_size
    stats, n_samples, mask = {}, len(batch), batch.completion_mask
    if method != "sft":  # the reward: the rule, I(o) = 1 if the final answer is right
        correct = outcome_rewards(problems, batch.texts, G).to(mask.device)  # [B*G]
        stats["reward"] = correct.mean().item()
    if method == "dpo":  # o+, o-: each question's right outputs paired with its wrong ones
        chosen, rejected = dpo_pairs(problems, batch, G)
        stats["pairs"] = len(chosen)
        if chosen:
            batch, n_samples = batch.select(chosen + rejected), len(chosen)
        mask = batch.completion_mask
    if method in NEEDS_PI_REF:  # log pi_theta and log pi_ref of every output, no graph  # [N, T]
        logp = common.token_logprobs(policy, batch, temperature, grad=False, micro_batch_size=mbs)
        ref_logp = common.token_logprobs(sft_model, batch, temperature, grad=False,
                                         micro_batch_size=mbs)
        stats["kl"] = common.masked_mean(logp - ref_logp, mask).item()
    # the gradient coefficient GC  # [N, T]
    if method == "sft":
        gc = gc_sft(mask)
    elif method in ("rft", "online_rft"):
        gc = gc_rft(correct, mask)
    elif method == "dpo":  # no pair (no question with a right and a wrong output): GC = 0
        gc = gc_dpo(logp, ref_logp, mask, n_samples, args.dpo_beta) if stats["pairs"] \
            else torch.zeros_like(logp)
    elif method == "ppo":
        advantages, stats["value_loss"] = ppo_advantages(critic, batch, correct, logp, ref_logp,
                                                         args)
        gc = gc_ppo(advantages, mask)
    else:
        if method == "grpo_os":  # outcome supervision: A_{i,t} = r~_i
            advantages = grpo_outcome_advantages(correct, G)[:, None] * mask
        else:  # process supervision: A_{i,t} = sum of r~_i^index(j) over index(j) >= t
            advantages = grpo_process_advantages(*step_rewards(problems, batch, G), G,
                                                 mask.shape[1]).to(mask.device) * mask
        gc = gc_grpo(advantages, logp, ref_logp, mask, args.beta)
    # an Adam step on a zero gradient still moves the weights (momentum): DPO with no pair skips it
    return {**stats, **policy_update(policy, optimizer, batch, gc, n_samples, args,
                                     step=stats.get("pairs", 1) > 0)}


def policy_update(policy, optimizer, batch, gc, n_samples, args, step=True) -> dict:
    """eq. (5): unified_loss's gradient, accumulated over micro-batches, then one Adam step."""
    mask = batch.completion_mask
    n_tokens = mask.float().sum().clamp(min=1)  # the whole batch's, for every micro-batch
    policy.train()
    optimizer.zero_grad()
    loss = 0
    for rows in common.micro_batches(batch, args.micro_batch_size):
        logp = common.token_logprobs(policy, batch.select(rows), args.temperature)  # [n, T]
        part = unified_loss(logp, mask[rows], gc[rows], n_samples, args.normaliser,
                            args.max_new_tokens, n_tokens)
        part.backward()
        loss += part.item()
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
    if step:
        optimizer.step()
    policy.eval()
    return {"loss": loss, "grad_norm": grad_norm.item(),
            "gc_abs_mean": common.masked_mean(gc.abs(), mask).item(),
            "completion_len": mask.sum(1).float().mean().item()}


def ppo_advantages(critic, batch, correct, logp, ref_logp, args):
    """PPO's A_t: eq. (2)'s reward, GAE with V_psi, whitened over the batch; then V_psi regresses
    on the returns, in micro-batches (no policy graph is alive meanwhile). Returns A, V's loss."""
    value_model, value_optimizer = critic
    mask = batch.completion_mask
    rewards, _ = kl_penalised_rewards(correct, logp, ref_logp, mask, args.beta)  # [N, T]
    values = common.no_grad_pass(token_values, value_model, batch, args.micro_batch_size)
    advantages, returns = gae(rewards, values, mask, args.gamma, args.lam)
    n_tokens = mask.float().sum().clamp(min=1)
    value_optimizer.zero_grad()
    value_loss = 0
    for rows in common.micro_batches(batch, args.micro_batch_size):
        v = token_values(value_model, batch.select(rows))  # [n, T], with grad
        part = 0.5 * (((v - returns[rows]) ** 2) * mask[rows]).sum() / n_tokens
        part.backward()
        value_loss += part.item()
    torch.nn.utils.clip_grad_norm_(value_model.parameters(), args.max_grad_norm)
    value_optimizer.step()
    return whiten(advantages, mask), value_loss


# --------------------------------------------------------------------------------------------------
# Training: one loop for every method


def train_method(method, policy, sft_model, tokenizer, args, seed, log=None, offline=None) -> dict:
    """`args.steps` updates of `policy` (a copy of pi_sft) by `method`; returns the method's costs.

    sft_model is pi_sft: the reference pi_ref of DPO, PPO and GRPO, frozen. offline: RFT's and DPO's
    data, sampled from pi_sft before training. Timing and the learning curve are measured here,
    around the updates; `log` gets a record per update.
    """
    device = policy.device
    common.set_seed(seed)
    questions = task.train_problems(seed)  # the same questions in the same order for every method
    optimizer = torch.optim.Adam(policy.parameters(), lr=args.lr)
    models, critic = [policy] + ([sft_model] if method in NEEDS_PI_REF else []), None
    if method == "ppo":  # V_psi: pi_sft's backbone with a scalar head, as large as the policy
        value_model = load_value_model(sft_model.name_or_path, device).eval()
        critic = (value_model, torch.optim.Adam(value_model.parameters(), lr=args.value_lr))
        models.append(value_model)
    style = random.Random(seed)  # SFT's draws of worked vs answer-only demonstrations
    name, times, memory = METHODS[method][0], [], findings.GpuPeak(device)
    if log is not None and args.eval_every:
        log.write({"method": name, "step": 0, "test_greedy": quick_test_accuracy(policy, tokenizer,
                                                                                  args)})
    bar = tqdm(range(1, args.steps + 1), desc=f"{name} seed {seed}", leave=False)
    for step in bar:
        memory.before_update()
        t0 = plumbing.clock(device)
        problems, batch = data_source(method, step, policy, tokenizer, questions, offline, style,
                                      args)
        record = update(method, problems, batch, policy, sft_model, optimizer, critic, args)
        times.append(plumbing.clock(device) - t0)  # sampling, forward, backward, optimizer step
        memory.after_update()
        record = {"method": name, "step": step, **record, "step_time": times[-1]}
        if args.eval_every and (step % args.eval_every == 0 or step == args.steps):
            record["test_greedy"] = quick_test_accuracy(policy, tokenizer, args)
        if log is not None:
            log.write(record)
        bar.set_postfix({k: f"{v:.3f}" for k, v in record.items()
                         if k in ("reward", "kl", "loss", "test_greedy")})
    return findings.method_costs(models, times, memory.read())


def quick_test_accuracy(policy, tokenizer, args):
    """Greedy accuracy on the first eval_curve test problems: the learning curve (no OOD, no
    Maj/Pass)."""
    return task.evaluate(policy, tokenizer, n_test=args.eval_curve, n_ood=0, k=0,
                         max_new_tokens=args.max_new_tokens)["test_greedy"]


def final_evaluation(model, tokenizer, args):
    """Greedy, Maj@K and Pass@K on the test split, greedy on the OOD split."""
    return task.evaluate(model, tokenizer, args.eval_test, args.eval_ood, args.k, args.temperature,
                         args.max_new_tokens)


def run_seed(sft_model, tokenizer, methods, args, seed, out_dir) -> list:
    """Every method of one seed from pi_sft, each evaluated after; returns their costs."""
    log = findings.seed_log(out_dir, [METHODS[m][0] for m in methods], args)
    common.set_seed(seed)
    log.write({"method": "SFT model", "final": True, "seed": seed,
               "after": final_evaluation(sft_model, tokenizer, args)})
    offline, all_costs = None, []
    for method in methods:
        name = METHODS[method][0]
        if method in ("rft", "dpo") and offline is None:  # shared by RFT and DPO of this seed
            offline = offline_data(sft_model, tokenizer, args, seed)
        policy = copy.deepcopy(sft_model).requires_grad_(True)
        cost = train_method(method, policy, sft_model, tokenizer, args, seed, log, offline)
        common.set_seed(seed)
        result = final_evaluation(policy, tokenizer, args)
        log.write({"method": name, "final": True, "seed": seed, "after": result, **cost})
        print(f"seed {seed} {name}: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in result.items())
              + f", {cost['time_per_step']:.2f} s/update")
        all_costs.append(cost)
        del policy
    return all_costs


def main(argv=None):
    args = plumbing.parse_args(Args, argv, PRETRAINED)
    check_args(args)
    started = time.time()
    methods = parse_list(args.methods, "methods")
    seeds = parse_list(args.seeds, "seeds", int)
    device = None if args.report_only else plumbing.resolve_device(args.device)  # fails first
    print("The unified paradigm, eq. (5): each method is a data source, a reward and a gradient "
          "coefficient\n")
    print(findings.paradigm_table(METHODS, methods) + "\n")
    dirs = {seed: findings.seed_dir("05_unified", args, PRETRAINED, seed) for seed in seeds}
    if not args.report_only:
        sft_model, tokenizer = plumbing.load_policy(args.model, args.sft_steps, device,
                                                    args.cache_dir or None,
                                                    micro_batch_size=args.micro_batch_size)
        sft_model.eval().requires_grad_(False)  # pi_sft: each method's start, pi_ref, RFT's sampler
        all_costs = [c for seed in seeds
                     for c in run_seed(sft_model, tokenizer, methods, args, seed, dirs[seed])]
        print(f"\nThe comparison: {len(methods)} methods x {len(seeds)} seeds, {args.steps} "
              f"updates of {args.batch_size} questions x {args.group_size} outputs each, on "
              f"{device}, {time.time() - started:.0f}s; {findings.memory_line(device, all_costs)}; "
              "logs in " + ", ".join(dirs.values()))
    return findings.unified_report(METHODS, methods, dirs, args)  # tables, costs, the findings


def parse_list(text: str, what: str, cast=str) -> list:
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        items = [cast(t) for t in items]
    except ValueError:
        plumbing.fail(f"--{what} {text!r}: give a comma-separated list")
    if not items:
        plumbing.fail(f"--{what} is empty")
    return items


def check_args(args: Args):
    """What the fields' bounds cannot say: the items of --methods and --seeds."""
    for m in parse_list(args.methods, "methods"):
        if m not in METHODS:
            plumbing.fail(f"--methods: unknown method {m!r}; choose from {','.join(METHODS)}")
    for seed in parse_list(args.seeds, "seeds", int):
        if not 0 <= seed < 2**32:
            plumbing.fail(f"--seeds {args.seeds!r}: use seeds in 0 .. {2**32 - 1}")


if __name__ == "__main__":
    main()
