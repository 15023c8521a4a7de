"""Lesson 05: SFT, RFT, DPO, Online RFT, PPO and GRPO as one gradient (DeepSeekMath, section 5.2).

The paper writes every one of these methods as the same gradient, eq. (5):

    grad J_A(theta) = E[(q,o) ~ D] ( 1/|o| sum_t GC_A(q, o, t, pi_rf) * grad log pi_theta(o_t | q, o_<t) )

Three things tell the methods apart: the data source D, the reward function pi_rf, and the gradient
coefficient GC that the algorithm A makes from them:

    method      data source                          reward   gradient coefficient GC
    SFT         q, o ~ P_sft (demonstrations)        none     1
    RFT         q ~ P_sft, o ~ pi_sft, offline       rule     I(o): 1 if the answer is right, else 0
    DPO         q ~ P_sft, o+, o- ~ pi_sft, offline  rule     beta * sigma(beta*lr(o-) - beta*lr(o+)), + for o+, - for o-
    Online RFT  q ~ P_sft, o ~ pi_theta, online      rule     I(o)
    PPO         q ~ P_sft, o ~ pi_theta, online      model*   A_t (GAE with a value model)
    GRPO        q ~ P_sft, {o_i} ~ pi_theta, online  model*   A_{i,t} + beta * (pi_ref/pi_theta - 1)

    * the paper's PPO and GRPO take a reward model's score; here, as for RFT, the rule (the task's exact
      verifier) stands in for it. Lesson 04 trains a reward model.
    lr(o) = 1/|o| sum_t log pi_theta(o_t)/pi_ref(o_t), the per-token-averaged log-ratio of the paper's
    DPO objective (appendix A.1.4). The GC above is the exact gradient of that objective (eq. (12) of the
    appendix): one coefficient per output, with beta in front. The paper's table (eq. (14)) writes DPO's
    row per token and without that beta; this file follows the objective, not the row.

So this file has ONE update, `unified_loss`: the loss whose gradient is eq. (5),

    loss = -1/n sum_o 1/|o| sum_t stopgrad(GC_t) * log pi_theta(o_t)

and each method is a few lines in `train_method` that supply its data and call its `gc_*` function.
The tests check, for every method, that autograd's gradient of the method's own loss (the SFT
cross-entropy, the RFT objective, the DPO loss, eq. (1) and eq. (3) with pi_old = pi_theta) is the
gradient of `unified_loss` with that GC. GRPO's GC is where eq. (3) and eq. (4) meet: at pi_old = pi_theta
the clipped ratio has gradient A_{i,t} grad log pi_theta, and the k3 KL
pi_ref/pi_theta - log(pi_ref/pi_theta) - 1 has gradient (1 - pi_ref/pi_theta) grad log pi_theta.

Then the paper's comparison at small scale: every method starts from the same SFT model, makes the
same number of policy updates, each from the same number of outputs (batch_size questions x
group_size outputs; SFT uses as many demonstrations), over several seeds. It prints the test-accuracy
curve, a final table (greedy, Maj@K, Pass@K, OOD), the cost of PPO against GRPO, and checks the
paper's findings one by one.

Choices made here, to keep every method comparable and the run short:
- every method is rewarded by the task's exact verifier (the paper's PPO and GRPO use a reward model;
  lesson 04 learns one); GRPO+PS uses the verifier's per-step grades as process rewards.
- one policy update per batch (pi_old = pi_theta), as the table assumes: the clip never acts.
- eq. (5)'s 1/|o| is the default normaliser; --normaliser constant (Dr. GRPO) or token (DAPO, TRL's
  default) changes it for every method alike. With 1/|o|, a right answer given at once (about 8
  tokens) pushes each of its tokens about four times harder than a right worked solution (about 30):
  docs/05_unified.md measures what that does to RFT and Online RFT.
- PPO has a value model as large as the policy (the SFT backbone with a scalar head), the per-token
  KL reward of eq. (2), GAE, and advantages whitened over the batch (as cleanrl does).
- RFT and DPO sample their data from pi_sft once, before training, as many outputs as the online
  methods sample in all; DPO pairs a right with a wrong output of the same question.

Run:  python 05_unified.py                        every method, seeds 0,1,2 (docs/05_unified.md has times)
      python 05_unified.py --methods rft,online_rft --seeds 0
      python 05_unified.py --seeds 1 & ...            one process per seed, then
      python 05_unified.py --report_only             the tables and findings of all seeds, from the logs
      python 05_unified.py --model smollm2 --seeds 0   the real model, for a GPU (docs/real_model.md)
Each seed writes runs/05_unified/seed<seed>/metrics.jsonl: one line per update with a "method" field
(test_greedy on the lines of the accuracy checks) and one "final" line per method; the report is read
back from these files.
"""

import copy
import inspect
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm import tqdm

import common
import plumbing

# name on the command line -> (name in the tables, data source, reward)
METHODS = {
    "sft": ("SFT", "q, o ~ P_sft(Q, O): demonstrations", "none"),
    "rft": ("RFT", "q ~ P_sft(Q), o ~ pi_sft(O|q): offline", "rule"),
    "dpo": ("DPO", "q ~ P_sft(Q), o+, o- ~ pi_sft(O|q): offline pairs", "rule"),
    "online_rft": ("Online RFT", "q ~ P_sft(Q), o ~ pi_theta(O|q): online", "rule"),
    "ppo": ("PPO", "q ~ P_sft(Q), o ~ pi_theta(O|q): online",
            "rule (verifier) in place of the paper's reward model, + KL, eq. (2)"),
    "grpo_os": ("GRPO+OS", "q ~ P_sft(Q), {o_i} ~ pi_theta(O|q): online",
                "rule (verifier, outcome) in place of the paper's reward model"),
    "grpo_ps": ("GRPO+PS", "q ~ P_sft(Q), {o_i} ~ pi_theta(O|q): online",
                "rule (verifier, per step) in place of the paper's process reward model"),
}

NORMALISERS = ("output", "constant", "token")


@dataclass
class Args:
    normaliser: str = field(default="output", metadata={"help": "what divides each output's sum over its tokens in "
                                                                 "eq. (5): output (1/|o|, the paper), constant (1/max_new_tokens, "
                                                                 "Dr. GRPO) or token (1/tokens of the batch, DAPO / TRL)",
                                                        "choices": NORMALISERS})
    methods: str = field(default=",".join(METHODS), metadata={"help": "comma-separated subset of " + ",".join(METHODS)})
    seeds: str = field(default="0,1,2", metadata={"help": "comma-separated seeds; every method runs once per seed"})
    model: str = field(default="tiny", metadata={"help": "'tiny' (built in), 'smollm2' (the course's real model, "
                                                        "SmolLM2-135M-Instruct), a causal LM folder, a .gguf "
                                                        "file or a hub id"})
    sft_steps: int = field(default=plumbing.SFT_STEPS, metadata={"help": "SFT warm-start steps that make pi_sft (cached)",
                                                               "min": 0})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    steps: int = field(default=60, metadata={"help": "policy updates per method (one batch each)", "min": 1})
    batch_size: int = field(default=16, metadata={"help": "questions per update", "min": 1})
    group_size: int = field(default=4, metadata={"help": "outputs per question (G of GRPO); SFT takes "
                                                         "batch_size x group_size demonstrations", "min": 2,
                                                 "must": "GRPO and DPO need at least 2 outputs per question"})
    lr: float = field(default=5e-5, metadata={"help": "Adam learning rate of the policy, the same for every method",
                                              "above": 0, "must": "the learning rate must be finite and > 0"})
    beta: float = field(default=0.04, metadata={
        "help": "KL coefficient: in GRPO's loss (eq. (3)) and PPO's reward (eq. (2))", "min": 0,
        "must": "the KL coefficient must be >= 0"})
    dpo_beta: float = field(default=0.1, metadata={"help": "beta of the DPO loss", "above": 0,
                                                   "must": "DPO's beta must be > 0"})
    value_lr: float = field(default=1e-4, metadata={"help": "Adam learning rate of PPO's value model", "above": 0,
                                                    "must": "the learning rate must be finite and > 0"})
    gamma: float = field(default=1.0, metadata={"help": "PPO discount gamma of GAE", "min": 0, "max": 1,
                                                "must": "GAE needs gamma in [0, 1]"})
    lam: float = field(default=0.95, metadata={"help": "PPO lambda of GAE", "min": 0, "max": 1,
                                               "must": "GAE needs lam in [0, 1]"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (log-probs use the same)",
                                                      "above": 0})
    max_new_tokens: int = field(default=64, metadata={"help": "longest completion", "min": 1})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping", "above": 0,
                                                        "must": "the gradient-norm limit must be > 0"})
    eval_every: int = field(default=20, metadata={"help": "updates between test-accuracy checks (0: none)", "min": 0})
    eval_curve: int = field(default=100, metadata={"help": "test problems of each check (greedy accuracy)", "min": 1})
    eval_test: int = field(default=200, metadata={"help": "test problems of the final evaluation", "min": 1,
                                                  "must": "must be >= 1 (the findings compare greedy test "
                                                          "accuracy, Maj@K and Pass@K)"})
    eval_ood: int = field(default=200, metadata={
        "help": "out-of-distribution (longer) problems of the final evaluation", "min": 0})
    k: int = field(default=8, metadata={"help": "K of Maj@K and Pass@K", "min": 1,
                                        "must": "must be >= 1 (the findings compare greedy test accuracy, Maj@K "
                                                "and Pass@K)"})
    out_dir: str = field(default="", metadata={"help": "each seed writes <out_dir>/seed<seed>/metrics.jsonl "
                                                       "(default runs/05_unified)"})
    cache_dir: str = field(default="", metadata={"help": "where SFT models are cached (default ./cache)"})
    report_only: bool = field(default=False, metadata={"help": "train nothing: print the tables and findings from "
                                                                "the metrics.jsonl of --seeds under --out_dir"})


# Settings for a pretrained model (--model smollm2, a folder, a .gguf file or a hub id): each replaces the
# default above unless its flag is given. The tiny model's SFT (800 steps at lr 1e-3) is made for random
# weights; 200 steps teach a pretrained model the answer format. These are lesson 02's measured settings,
# carried over; not yet probed for the other methods.
PRETRAINED = {"sft_steps": 200, "steps": 40}


# ----------------------------------------------------------------------------------------------------
# The one update: eq. (5) as a loss


def unified_loss(logp, mask, gc, n_samples=None, normaliser="output", max_len=64):
    """eq. (5): the loss whose gradient is -1/n sum_o 1/|o| sum_t GC_t * grad log pi_theta(o_t).

    logp: [N, T] log pi_theta of the output tokens (with grad); mask: [N, T] 1 on output tokens;
    gc: [N, T] the gradient coefficient, a constant (detached); n_samples: how many draws from the data
    source the N outputs are (N, except for DPO, whose every draw is a pair of outputs).
    normaliser: what divides each output's sum over its tokens. "output" is eq. (5)'s 1/|o| (the
    paper); "constant" divides every output by the same max_len (Dr. GRPO), so a token counts the same
    in a short output as in a long one; "token" divides the batch's sum by its number of tokens (DAPO,
    TRL's default loss_type).
    """
    mask = mask.float()
    weighted = gc.detach() * logp * mask  # [N, T] GC_t log pi
    n = logp.shape[0] if n_samples is None else n_samples
    if normaliser == "token":
        return -weighted.sum() / mask.sum().clamp(min=1)
    length = mask.sum(1).clamp(min=1) if normaliser == "output" else torch.full_like(mask[:, 0], max_len)
    per_output = weighted.sum(1) / length  # 1/|o| sum_t GC_t log pi  (or 1/max_len sum_t)
    return -per_output.sum() / n


# ----------------------------------------------------------------------------------------------------
# Each method, one row of the paper's table: its gradient coefficient GC (gc_*, [N, T]) and, beside it,
# the data source and reward it is computed from for one update (*_data_and_gc). Each *_data_and_gc
# returns (batch, logp, gc, n_samples, stats): the outputs, log pi_theta of their tokens (with grad), GC,
# how many draws of the data source they are (None: one per output) and what to log.


def gc_sft(mask):
    return torch.ones_like(mask, dtype=torch.float)  # SFT: GC = 1


def sft_data_and_gc(run, step):
    """SFT: demonstrations from P_sft, no reward, GC = 1."""
    B, G = run.args.batch_size, run.args.group_size
    batch = demonstrations(run.tokenizer, [next(run.problems) for _ in range(B * G)], run.device, run.style)
    return batch, log_pi(run, batch), gc_sft(batch.completion_mask), None, {}


def gc_rft(correct, mask):
    return correct.float()[:, None] * mask  # RFT and Online RFT: GC = I(o)


def rft_data_and_gc(run, step):
    """RFT: samples of pi_sft drawn once before training (offline); Online RFT: of pi_theta. GC = I(o)."""
    stats = {}
    problems, batch = run.offline[step - 1] if run.method == "rft" else online_batch(run)
    correct = rule_reward(run, problems, batch, stats)
    return batch, log_pi(run, batch), gc_rft(correct, batch.completion_mask), None, stats


def gc_dpo(logp, ref_logp, mask, n_pairs, beta):
    """Rows 0..P-1 are the chosen outputs o+, rows P..2P-1 the rejected o- of the same pairs."""
    mask = mask.float()
    lr = ((logp - ref_logp).detach() * mask).sum(1) / mask.sum(1).clamp(min=1)  # 1/|o| sum_t log pi/pi_ref
    s = torch.sigmoid(beta * lr[n_pairs:] - beta * lr[:n_pairs])  # [P]
    return beta * torch.cat([s, -s])[:, None] * mask  # DPO: GC = +-beta * sigma(beta*lr(o-) - beta*lr(o+))


def dpo_data_and_gc(run, step):
    """DPO: pi_sft's offline samples, each question's right outputs paired with its wrong ones."""
    stats = {}
    problems, batch = run.offline[step - 1]
    rule_reward(run, problems, batch, stats)
    chosen, rejected = dpo_pairs(problems, batch, run.args.group_size)
    stats["pairs"] = n_pairs = len(chosen)
    if n_pairs:
        batch = select(batch, chosen + rejected)
    logp = log_pi(run, batch)
    ref_logp = ref_log_pi(run, batch, logp, stats)
    mask = batch.completion_mask  # no pair (no question with a right and a wrong output): GC = 0, no update
    gc = gc_dpo(logp, ref_logp, mask, n_pairs, run.args.dpo_beta) if n_pairs else torch.zeros_like(logp)
    return batch, logp, gc, n_pairs or None, stats


def gc_ppo(advantages, mask):
    """PPO's GC: the gradient of eq. (1) at pi_old = pi_theta (the clip is inactive there) is A_t."""
    return advantages * mask  # PPO: GC = A_t


def ppo_data_and_gc(run, step):
    """PPO: online samples; eq. (2)'s KL-penalised reward, GAE with V_psi (updated here), whitened."""
    stats, args = {}, run.args
    problems, batch = online_batch(run)
    correct = rule_reward(run, problems, batch, stats)
    logp = log_pi(run, batch)
    ref_logp = ref_log_pi(run, batch, logp, stats)
    mask = batch.completion_mask
    values = run.value_model(batch)  # [N, T]
    token_rewards = ppo_token_rewards(correct, logp.detach(), ref_logp, mask, args.beta)
    advantages, returns = gae(token_rewards, values.detach(), mask, args.gamma, args.lam)
    value_loss = 0.5 * (((values - returns) ** 2) * mask).sum() / mask.sum()
    run.value_optimizer.zero_grad()
    value_loss.backward()
    torch.nn.utils.clip_grad_norm_(run.value_model.parameters(), args.max_grad_norm)
    run.value_optimizer.step()
    stats["value_loss"] = value_loss.item()
    return batch, logp, gc_ppo(whiten(advantages, mask), mask), None, stats


def gc_grpo(advantages, logp, ref_logp, mask, beta):
    """GRPO's GC: the gradient of eq. (3) with eq. (4)'s KL at pi_old = pi_theta."""
    return (advantages + beta * (torch.exp(ref_logp - logp.detach()) - 1)) * mask  # GRPO: A + beta*(pi_ref/pi - 1)


def grpo_data_and_gc(run, step):
    """GRPO: G online samples per question; outcome (GRPO+OS) or per-step (GRPO+PS) group advantages."""
    stats, G = {}, run.args.group_size
    problems, batch = online_batch(run)
    correct = rule_reward(run, problems, batch, stats)
    logp = log_pi(run, batch)
    ref_logp = ref_log_pi(run, batch, logp, stats)
    mask = batch.completion_mask
    if run.method == "grpo_os":
        advantages = grpo_outcome_advantages(correct, G)[:, None] * mask  # [B*G, T]
    else:
        advantages = grpo_process_advantages(problems, batch, G)  # [B*G, T]
    return batch, logp, gc_grpo(advantages, logp, ref_logp, mask, run.args.beta), None, stats


GC_FUNCTIONS = {"sft": gc_sft, "rft": gc_rft, "dpo": gc_dpo, "online_rft": gc_rft, "ppo": gc_ppo,
                "grpo_os": gc_grpo, "grpo_ps": gc_grpo}


DATA_AND_GC = {"sft": sft_data_and_gc, "rft": rft_data_and_gc, "dpo": dpo_data_and_gc, "online_rft": rft_data_and_gc,
               "ppo": ppo_data_and_gc, "grpo_os": grpo_data_and_gc, "grpo_ps": grpo_data_and_gc}


# The pieces the methods share: log pi_theta with grad, log pi_ref and the KL to log, online samples, the rule reward


def log_pi(run, batch):
    run.policy.train()
    return common.token_logprobs(run.policy, batch, run.args.temperature)  # [N, T], with grad


def ref_log_pi(run, batch, logp, stats):
    """log pi_ref of the same tokens (pi_ref = pi_sft, frozen), and the KL[pi || pi_ref] estimate to log."""
    with torch.no_grad():
        ref_logp = common.token_logprobs(run.sft_model, batch, run.args.temperature)  # [N, T]
    mask = batch.completion_mask
    stats["kl"] = (((logp.detach() - ref_logp) * mask).sum() / mask.sum().clamp(min=1)).item()
    return ref_logp


def online_batch(run):
    """q ~ P_sft(Q), o ~ pi_theta(O|q): B questions, G outputs each, from the policy being trained."""
    problems = [next(run.problems) for _ in range(run.args.batch_size)]
    return problems, common.sample(run.policy, run.tokenizer, [common.prompt_text(p) for p in problems],
                                   run.args.group_size, run.args.temperature, run.args.max_new_tokens)


def rule_reward(run, problems, batch, stats):
    correct = outcome_rewards(problems, batch.texts, run.args.group_size).to(run.device)  # [B*G] I(o)
    stats["reward"] = correct.mean().item()
    return correct


def paradigm_table(methods) -> str:
    """The table of section 5.2, with the line of this file that makes each GC."""
    lines = ["| method | data source | reward | code of the gradient coefficient GC |", "|---|---|---|---|"]
    for m in methods:
        name, source, reward = METHODS[m]
        code = [s.strip() for s in inspect.getsource(GC_FUNCTIONS[m]).splitlines() if s.strip().startswith("return")]
        lines.append(f"| {name} | {source} | {reward} | `{GC_FUNCTIONS[m].__name__}: {code[-1].split('  #')[0]}` |")
    if "dpo" in methods:
        lines.append("\nDPO's GC is the exact gradient of the paper's DPO objective (appendix A.1.4, eq. (12)): one "
                     "coefficient per output, from the per-token-averaged log-ratio lr(o), with beta in front; the "
                     "paper's table writes that row per token and without the beta.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Rewards and advantages (repeated from lessons 01-03 on purpose: each lesson is whole)


def outcome_rewards(problems, texts, group_size):
    """I(o_i) = r_i: 1 if output i's final answer is right, else 0.  # [B*G]"""
    return torch.tensor([float(common.verify(problems[i // group_size], t)["correct"]) for i, t in enumerate(texts)])


def grpo_outcome_advantages(rewards, group_size):
    """Outcome supervision: A_{i,t} = r~_i = (r_i - mean(r)) / std(r) within each group; 0 if all equal.  # [B*G]"""
    r = rewards.view(-1, group_size)  # [B, G]
    mean, std = r.mean(1, keepdim=True), r.std(1, keepdim=True, unbiased=False)
    return torch.where(std > 0, (r - mean) / torch.where(std > 0, std, torch.ones_like(std)), torch.zeros_like(r)).view(-1)


def grpo_process_advantages(problems, batch, group_size):
    """Process supervision: A_{i,t} = sum of r~_i^index(j) over the steps j with index(j) >= t.  # [B*G, T]

    Step j of output i is its j-th line, graded by the verifier; index(j) = batch.step_ends[i][j]. As in
    lesson 03, every step the output never wrote is a step of reward 0 at its last token.
    r~ = (r - mean(R)) / std(R), with the mean and std of ALL step rewards R of the group.
    """
    N, T = batch.completion_ids.shape
    last_token = (batch.completion_mask.sum(1) - 1).tolist()  # [N]
    advantages = torch.zeros(N, T)  # [B*G, T]
    for q in range(N // group_size):
        rows = range(q * group_size, (q + 1) * group_size)
        steps, ends = {}, {}
        for i in rows:
            graded = common.verify(problems[q], batch.texts[i])
            steps[i] = [float(s) for s in graded["steps"]] + [0.0] * graded["missing"]
            ends[i] = list(batch.step_ends[i]) + [last_token[i]] * graded["missing"]
        R = torch.tensor([r for i in rows for r in steps[i]])
        if R.std(unbiased=False) == 0:
            continue  # every step graded the same: no signal in this group
        mean, std = R.mean(), R.std(unbiased=False)
        for i in rows:
            for r, end in zip(steps[i], ends[i]):
                advantages[i, :end + 1] += (r - mean) / std  # every token t <= index(j) gets step j's reward
    return advantages.to(batch.completion_mask.device) * batch.completion_mask


class ValueModel(torch.nn.Module):
    """V_psi of PPO: a copy of the policy's backbone with a scalar head, as large as the policy."""

    def __init__(self, policy):
        super().__init__()
        self.backbone = copy.deepcopy(policy.base_model)
        self.head = torch.nn.Linear(policy.config.hidden_size, 1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, batch):
        """V(s_t), the value of the state before output token t.  # [N, T]"""
        input_ids = torch.cat([batch.prompt_ids, batch.completion_ids], 1)  # [N, P+T]
        attention_mask = torch.cat([batch.prompt_mask, batch.completion_mask], 1)
        position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
        P = batch.prompt_ids.shape[1]
        return self.head(hidden[:, P - 1:-1].float()).squeeze(-1) * batch.completion_mask  # [N, T]


def ppo_token_rewards(outcome, logp, ref_logp, mask, beta):
    """eq. (2): r_t = r_phi(q, o) at the last token - beta * log(pi_theta(o_t) / pi_ref(o_t)) at every token.  # [N, T]"""
    mask = mask.float()
    rewards = -beta * (logp - ref_logp) * mask
    last = mask.sum(1).long().clamp(min=1) - 1  # [N]
    rewards[torch.arange(len(last)), last] += outcome
    return rewards


def gae(rewards, values, mask, gamma, lam):
    """Generalised advantage estimation (the A_t of eq. (1)), written as the plain backward loop.

    delta_t = r_t + gamma * V(s_{t+1}) - V(s_t),  A_t = delta_t + gamma * lam * A_{t+1}; V after the last token is 0.
    Returns advantages and returns = A_t + V(s_t), both [N, T].
    """
    mask = mask.float()
    N, T = rewards.shape
    advantages = torch.zeros(N, T, device=rewards.device)
    lastgaelam = torch.zeros(N, device=rewards.device)
    for t in reversed(range(T)):
        nextnonterminal = mask[:, t + 1] if t + 1 < T else torch.zeros(N, device=rewards.device)
        nextvalues = values[:, t + 1] if t + 1 < T else torch.zeros(N, device=rewards.device)
        delta = rewards[:, t] + gamma * nextvalues * nextnonterminal - values[:, t]
        lastgaelam = delta + gamma * lam * nextnonterminal * lastgaelam
        advantages[:, t] = lastgaelam
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def whiten(x, mask):
    mask = mask.float()
    mean = (x * mask).sum() / mask.sum()
    var = (((x - mean) * mask) ** 2).sum() / mask.sum()
    return (x - mean) / torch.sqrt(var + 1e-8) * mask


# ----------------------------------------------------------------------------------------------------
# Data sources


def select(batch, rows):
    """The rows `rows` of a Batch, in that order."""
    idx = torch.tensor(rows, dtype=torch.long, device=batch.completion_ids.device)
    return common.Batch(batch.prompt_ids[idx], batch.prompt_mask[idx], batch.completion_ids[idx],
                        batch.completion_mask[idx], [batch.texts[i] for i in rows], [batch.step_ends[i] for i in rows])


def demonstrations(tokenizer, problems, device, rng):
    """SFT's data source: more of the SFT data P_sft, the same mix of worked and answer-only solutions."""
    return common.build_batch(tokenizer, [common.prompt_text(p) for p in problems],
                              [common.sft_demonstration(p, rng) for p in problems], device)


def offline_data(sft_model, tokenizer, args, seed):
    """RFT's and DPO's data source: every batch sampled ONCE from pi_sft, before any training.

    As many outputs as an online method samples over the whole run, from the same questions.
    """
    common.set_seed(seed)
    problems = common.train_problems(seed)
    data = []
    for _ in tqdm(range(args.steps), desc="sampling offline data from pi_sft", leave=False):
        batch_problems = [next(problems) for _ in range(args.batch_size)]
        batch = common.sample(sft_model, tokenizer, [common.prompt_text(p) for p in batch_problems],
                              args.group_size, args.temperature, args.max_new_tokens)
        data.append((batch_problems, batch))
    return data


def dpo_pairs(problems, batch, group_size):
    """(chosen rows, rejected rows): each question pairs its right outputs with its wrong ones, one to one."""
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


# ----------------------------------------------------------------------------------------------------
# Training: one loop for every method


def quick_test_accuracy(policy, tokenizer, n, max_new_tokens):
    """Greedy accuracy on the first n test problems, for the learning curve (no OOD, no Maj/Pass@K)."""
    return common.evaluate(policy, tokenizer, n_test=n, n_ood=0, k=0, max_new_tokens=max_new_tokens)["test_greedy"]


def state_bytes(models):
    """Bytes a method keeps to train: every weight, and for trainable ones a gradient and Adam's two moments."""
    return sum(p.numel() * p.element_size() * (4 if p.requires_grad else 1) for m in models for p in m.parameters())


def train_method(method, policy, sft_model, tokenizer, args, seed, log=None, offline=None):
    """`args.steps` updates of `policy` (a copy of pi_sft) by `method`, all through unified_loss.

    sft_model is pi_sft: the reference pi_ref of DPO, PPO and GRPO, frozen. offline: RFT's and DPO's
    data, sampled from pi_sft before training. Returns the method's costs.
    """
    device = next(policy.parameters()).device
    common.set_seed(seed)
    run = SimpleNamespace(method=method, policy=policy, sft_model=sft_model, tokenizer=tokenizer, args=args,
                          device=device, offline=offline,
                          problems=common.train_problems(seed))  # the same questions, in the same order, for every method
    optimizer = torch.optim.Adam(policy.parameters(), lr=args.lr)
    models = [policy] + ([sft_model] if method in ("dpo", "ppo", "grpo_os", "grpo_ps") else [])  # + pi_ref
    if method == "ppo":
        run.value_model = ValueModel(policy).to(device)
        run.value_optimizer = torch.optim.Adam(run.value_model.parameters(), lr=args.value_lr)
        models.append(run.value_model)
    run.style = random.Random(seed)  # SFT's draws of worked vs answer-only demonstrations
    meter = Meter(METHODS[method][0], policy, tokenizer, args, device, log)
    for step in meter.bar(seed):
        meter.start()
        # 1. the data source and the reward, 2. the gradient coefficient: the method's own function
        batch, logp, gc, n_samples, stats = DATA_AND_GC[method](run, step)
        # 3. the one update, eq. (5)
        loss = unified_loss(logp, batch.completion_mask, gc, n_samples, args.normaliser, args.max_new_tokens)
        optimizer.zero_grad()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
        if stats.get("pairs", 1):  # DPO with no pair has GC = 0: no update (Adam's momentum would still move it)
            optimizer.step()
        policy.eval()
        meter.step(step, stats, loss, grad_norm, gc, batch.completion_mask)
    return meter.costs(models)


class Meter:
    """What train_method logs: per-update records, the learning curve, time and peak GPU memory per update."""

    def __init__(self, name, policy, tokenizer, args, device, log):
        self.name, self.policy, self.tokenizer, self.args, self.device, self.log = name, policy, tokenizer, args, device, log
        self.step_times, self.peak_gpu = [], 0  # of the updates alone, not of the accuracy checks between them

    def bar(self, seed):
        if self.log is not None and self.args.eval_every:
            self.log.write({"method": self.name, "step": 0, "test_greedy": quick_test_accuracy(
                self.policy, self.tokenizer, self.args.eval_curve, self.args.max_new_tokens)})
        self._bar = tqdm(range(1, self.args.steps + 1), desc=f"{self.name} seed {seed}", leave=False)
        return self._bar

    def start(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.t0 = plumbing.clock(self.device)

    def step(self, step, stats, loss, grad_norm, gc, mask):
        self.step_times.append(plumbing.clock(self.device) - self.t0)  # sampling, forward, backward, optimizer step
        if self.device.type == "cuda":
            self.peak_gpu = max(self.peak_gpu, torch.cuda.max_memory_allocated(self.device))
        args = self.args
        record = {"method": self.name, "step": step, **stats, "loss": loss.item(), "grad_norm": grad_norm.item(),
                  "gc_abs_mean": ((gc.abs() * mask).sum() / mask.sum().clamp(min=1)).item(),
                  "completion_len": mask.sum(1).float().mean().item(), "step_time": self.step_times[-1]}
        if args.eval_every and (step % args.eval_every == 0 or step == args.steps):
            record["test_greedy"] = quick_test_accuracy(self.policy, self.tokenizer, args.eval_curve, args.max_new_tokens)
        if self.log is not None:
            self.log.write(record)
        self._bar.set_postfix({k: f"{v:.3f}" for k, v in record.items() if k in ("reward", "kl", "loss", "test_greedy")})

    def costs(self, models) -> dict:
        costs = {"time_per_step": statistics.mean(self.step_times), "state_mb": state_bytes(models) / 2**20,
                 "trainable_params": sum(p.numel() for m in models for p in m.parameters() if p.requires_grad),
                 "models": "+".join(["policy", "pi_ref", "value"][:len(models)])}
        if self.device.type == "cuda":
            costs["peak_gpu_mb"] = self.peak_gpu / 2**20
        return costs


# ----------------------------------------------------------------------------------------------------
# The comparison and the paper's findings


def mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def pct(values):
    m, s = mean_std(values)
    return f"{100 * m:.1f} ± {100 * s:.1f}%" if len(values) > 1 else f"{100 * m:.1f}%"


def findings(final, curves, costs, k):
    """The paper's findings of section 5.2, each judged by plumbing.verdict: (finding, verdict, numbers)."""
    out = []
    per_seed = lambda m, key: [r[key] for r in final[m]]
    diff = lambda a, b, key="test_greedy": [x - y for x, y in zip(per_seed(a, key), per_seed(b, key))]
    show = lambda ds: f"{100 * mean_std(ds)[0]:+.1f} ± {100 * mean_std(ds)[1]:.1f} pts (per seed " + \
        ", ".join(f"{100 * d:+.1f}" for d in ds) + ")"
    for better, worse, claim in (("Online RFT", "RFT", "Online RFT ends above RFT (Figure 5)"),
                                 ("GRPO+OS", "Online RFT", "GRPO ends above Online RFT (Figure 5)"),
                                 ("GRPO+PS", "GRPO+OS", "GRPO+PS ends above GRPO+OS (Figure 5)")):
        if better in final and worse in final:
            ds = diff(better, worse)
            numbers = f"greedy test, {better} - {worse}: {show(ds)}"
            steps = sorted(set(curves.get(better, {})) & set(curves.get(worse, {})) - {0})
            if better == "Online RFT" and steps:
                gap = lambda s: 100 * statistics.mean(a - b for a, b in zip(curves[better][s], curves[worse][s]))
                numbers += "; on the curve " + ", ".join(f"{gap(s):+.1f} at step {s}" for s in steps)
            out.append((claim, plumbing.verdict(ds), numbers))
    for m in ("GRPO+OS", "GRPO+PS", "PPO", "Online RFT"):
        if m in final:
            d_maj, d_pass = diff(m, "SFT model", f"test_maj@{k}"), diff(m, "SFT model", f"test_pass@{k}")
            out.append((f"RL ({m}) raises Maj@{k}", plumbing.verdict(d_maj), f"Maj@{k} - SFT model's: {show(d_maj)}"))
            d_gap = [a - b for a, b in zip(d_maj, d_pass)]
            out.append((f"RL ({m}) raises Maj@{k} more than Pass@{k}", plumbing.verdict(d_gap),
                        f"Maj@{k} gain - Pass@{k} gain: {show(d_gap)}; Pass@{k} - SFT model's: {show(d_pass)}"))
            break
    return out


def cost_line(costs):
    """Section 4.1.1's motivation for GRPO, measured (a cost, not a finding of section 5.2)."""
    if "PPO" not in costs or "GRPO+OS" not in costs:
        return None
    p, g = costs["PPO"], costs["GRPO+OS"]
    mean = lambda cs, key: statistics.mean(c[key] for c in cs)
    line = (f"GRPO+OS keeps {mean(g, 'state_mb'):.1f} MiB of weights+grads+Adam against PPO's {mean(p, 'state_mb'):.1f} MiB "
            f"(no value model) and takes {mean(g, 'time_per_step'):.2f} s per update against {mean(p, 'time_per_step'):.2f} s")
    if all("peak_gpu_mb" in c for c in p + g):
        line += f"; peak GPU memory {mean(g, 'peak_gpu_mb'):.0f} vs {mean(p, 'peak_gpu_mb'):.0f} MiB"
    return line


def read_runs(out_root, seeds):
    """The results of every seed, read back from its metrics.jsonl: the report is made from the logs alone."""
    final, curves, costs = {}, {}, {}  # name -> [result per seed]; name -> step -> [accuracy]; name -> [cost]
    for seed in seeds:
        path = Path(out_root) / f"seed{seed}" / "metrics.jsonl"
        if not path.is_file():
            plumbing.fail(f"{path} does not exist: run the comparison for seed {seed} first")
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record.get("final"):
                final.setdefault(record["method"], []).append(record["after"])
                if record["method"] != "SFT model":
                    costs.setdefault(record["method"], []).append(record)
            elif "test_greedy" in record:
                curves.setdefault(record["method"], {}).setdefault(record["step"], []).append(record["test_greedy"])
    return final, curves, costs


def report(final, curves, costs, args, seeds):
    cols = list(final["SFT model"][0])
    print(f"Final evaluation ({args.eval_test} test, {args.eval_ood} OOD problems; mean ± std over seeds {seeds}):\n")
    print("| model | " + " | ".join(cols) + " |\n" + "|---" * (len(cols) + 1) + "|")
    for n, results in final.items():
        print(f"| {n} | " + " | ".join(pct([r[c] for r in results]) for c in cols) + " |")
    if curves:
        steps = sorted({s for c in curves.values() for s in c})
        print(f"\nTest accuracy (greedy, {args.eval_curve} problems) during training, mean over seeds:\n")
        print("| method | " + " | ".join(f"step {s}" for s in steps) + " |\n" + "|---" * (len(steps) + 1) + "|")
        for n, c in curves.items():
            print(f"| {n} | " + " | ".join(f"{100 * statistics.mean(c[s]):.1f}%" if s in c else "" for s in steps) + " |")
    print("\nCost of each method at the same batch (state = weights + gradients + Adam moments of the models it keeps):\n")
    gpu = all("peak_gpu_mb" in x for c in costs.values() for x in c)
    print("| method | models kept | trainable params | state (MiB) | time per update (s) |" + (" peak GPU (MiB) |" if gpu else "")
          + "\n|---|---|---|---|---|" + ("---|" if gpu else ""))
    for n, c in costs.items():
        print(f"| {n} | {c[0]['models']} | {c[0]['trainable_params']:,} | {statistics.mean(x['state_mb'] for x in c):.1f} | "
              f"{statistics.mean(x['time_per_step'] for x in c):.2f} |"
              + (f" {statistics.mean(x['peak_gpu_mb'] for x in c):.0f} |" if gpu else ""))
    if not gpu:
        print("(no GPU: peak GPU memory is measured only on CUDA; time per update is wall time on this CPU)")
    line = cost_line(costs)
    if line:
        print(f"\nWhat GRPO saves (section 4.1.1's motivation, a cost measured here, not a finding): {line}.")
    print(f"\nThe paper's findings (section 5.2), judged on {len(seeds)} seed{'s' if len(seeds) > 1 else ''}: {plumbing.VERDICT_RULE}.\n")
    checked = findings(final, curves, costs, args.k)
    for claim, judged, numbers in checked:
        print(f"- [{judged}] {claim}: {numbers}")
    return checked


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
    """What the fields' bounds cannot say (plumbing.parse_args has checked those): the items of --methods and --seeds."""
    for m in parse_list(args.methods, "methods"):
        if m not in METHODS:
            plumbing.fail(f"--methods: unknown method {m!r}; choose from {','.join(METHODS)}")
    for seed in parse_list(args.seeds, "seeds", int):
        if not 0 <= seed < 2**32:
            plumbing.fail(f"--seeds {args.seeds!r}: use seeds in 0 .. {2**32 - 1}")


def main(argv=None):
    args = plumbing.parse_args(Args, argv, PRETRAINED)
    check_args(args)
    started = time.time()
    methods = parse_list(args.methods, "methods")
    seeds = parse_list(args.seeds, "seeds", int)
    out_root = args.out_dir or "runs/05_unified"
    device = None if args.report_only else plumbing.resolve_device(args.device)  # a bad --device fails before any output
    print("The unified paradigm, eq. (5): each method is a data source, a reward and a gradient coefficient\n")
    print(paradigm_table(methods) + "\n")
    if not args.report_only:
        sft_model, tokenizer = plumbing.load_policy(args.model, args.sft_steps, device, args.cache_dir or None)
        sft_model.eval().requires_grad_(False)  # pi_sft: the start of every method, pi_ref, and RFT/DPO's sampler
        evaluate = lambda model: common.evaluate(model, tokenizer, args.eval_test, args.eval_ood, args.k,
                                                 args.temperature, args.max_new_tokens)
        for seed in seeds:
            log = plumbing.MetricsLog(f"{out_root}/seed{seed}")
            common.set_seed(seed)
            log.write({"method": "SFT model", "final": True, "seed": seed, "after": evaluate(sft_model)})
            offline = None
            for method in methods:
                name = METHODS[method][0]
                if method in ("rft", "dpo") and offline is None:
                    offline = offline_data(sft_model, tokenizer, args, seed)  # shared by RFT and DPO of this seed
                policy = copy.deepcopy(sft_model).requires_grad_(True)
                cost = train_method(method, policy, sft_model, tokenizer, args, seed, log, offline)
                common.set_seed(seed)
                result = evaluate(policy)
                log.write({"method": name, "final": True, "seed": seed, "after": result, **cost})
                print(f"seed {seed} {name}: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in result.items())
                      + f", {cost['time_per_step']:.2f} s/update")
                del policy
        print(f"\nThe comparison: {len(methods)} methods x {len(seeds)} seeds, {args.steps} updates of "
              f"{args.batch_size} questions x {args.group_size} outputs each, on {device}, {time.time() - started:.0f}s; "
              + plumbing.peak_memory(device))
    final, curves, costs = read_runs(out_root, seeds)
    checked = report(final, curves, costs, args, seeds)
    return {"final": final, "curves": curves, "costs": costs, "findings": checked, "out_dir": out_root}


if __name__ == "__main__":
    main()
