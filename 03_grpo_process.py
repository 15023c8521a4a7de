"""Lesson 03: GRPO with process supervision (DeepSeekMath, section 4.1).

Process supervision rewards each reasoning step at the token where that step ends. The verifier
grades every step (here: every line; the "#### answer" line is the last step). For a group of G
outputs of one question, with index(j) the token where step j ends and K_i the steps of o_i,

    R = {{r_1^index(1) .. r_1^index(K_1)}, .., {r_G^index(1) .. r_G^index(K_G)}}
    r~_i^index(j) = (r_i^index(j) - mean(R)) / std(R)      mean and std over ALL steps of the group
    A_{i,t} = sum over j with index(j) >= t of r~_i^index(j)

Tokens after the last step (the EOS) get A = 0; a group whose step rewards are all equal gets A = 0.
Every step an output never wrote (an operation with no line, or the answer line) is a step of
reward 0 ending at the output's last token, and every line after the answer line a wrong step: a
solution cut short must not earn more per step than the whole one (task.verify counts them).

Outcome supervision (--supervision outcome, lesson 02): one reward per output,
r~_i = (r_i - mean(r)) / std(r) within the group, A_{i,t} = r~_i for every token of o_i.

The GRPO objective, eq. (3), as in lesson 02, with the k3 estimator of eq. (4):

    J_GRPO(theta) = E[ 1/G sum_i 1/|o_i| sum_t { min( ratio_{i,t} A_{i,t},
                                                      clip(ratio_{i,t}, 1-eps, 1+eps) A_{i,t} )
                                                 - beta * D_KL[pi_theta || pi_ref] } ]
    ratio_{i,t} = pi_theta(o_{i,t} | q, o_{i,<t}) / pi_old(o_{i,t} | q, o_{i,<t})
    D_KL[pi_theta || pi_ref] = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1     (per token)

The step rewards come from the task's exact verifier (a rule standing in for the paper's process
reward model). pi_ref is the SFT model and stays frozen. --micro_batch_size splits each update into
passes of that many outputs and adds up their gradients (gradient accumulation).

Run:  python 03_grpo_process.py                                      process supervision
      python 03_grpo_process.py --supervision both                   outcome and process, one table
      python 03_grpo_process.py --supervision both --train_ops 5-6   on long chains
      python 03_grpo_process.py --model smollm2 --supervision both   the real model, for a GPU
(--help lists every option; docs/03_grpo_process.md has the results.)
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
    supervision: str = arg("process", "process (a reward per step), outcome (lesson 02), or both",
                           choices=("outcome", "process", "both"))
    train_ops: str = arg("2-4", "operations per training problem: 2-4, or 5-6 (long chains)")
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
    out_dir: str = arg("", "where the logs and models go (default: runs/03_grpo_process/<run>)")
    cache_dir: str = arg("", "where SFT models are cached (default ./cache)")


# A pretrained model (--model smollm2, a folder, a .gguf file or a hub id) replaces these defaults
# unless the flag is given: lesson 02's settings (a short SFT, micro-batches that fit an 8 GB GPU),
# carried over; not yet probed for process rewards.
PRETRAINED = {"sft_steps": 200, "steps": 40, "micro_batch_size": 16}


# --------------------------------------------------------------------------------------------------
# Process supervision: a reward per step, at the token where the step ends


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


# --------------------------------------------------------------------------------------------------
# Outcome supervision, as in lesson 02 (the --supervision outcome baseline)


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


# --------------------------------------------------------------------------------------------------
# GRPO, as in lesson 02 (the same functions, character for character)


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


def grpo_step(policy, ref_policy, tokenizer, optimizer, problems: list, args: Args,
              supervision: str) -> dict:
    """One pass of the loop, lesson 02's grpo_step with a reward per step (process) or per output
    (outcome): sample a group per question from pi_old, score, then mu updates of eq. (3)."""
    G = args.group_size
    # pi_old <- pi_theta; sample G outputs o_i ~ pi_old(.|q) for each question q
    prompts = [task.prompt_text(p) for p in problems]
    batch = common.sample(policy, tokenizer, prompts, G, args.temperature, args.max_new_tokens)
    mask = batch.completion_mask  # [B*G, T]
    outcome = outcome_rewards(problems, batch.texts, G).to(mask.device)  # r_i  [B*G]
    R, index = step_rewards(problems, batch, G)  # r_i^index(j) and index(j), K_i of each o_i
    if supervision == "process":
        token_advantages = grpo_process_advantages(R, index, G, mask.shape[1]).to(mask.device)
    else:  # outcome: A_{i,t} = r~_i for every token of o_i
        token_advantages = grpo_outcome_advantages(outcome, G)[:, None].expand_as(mask)
    updated = grpo_update(policy, ref_policy, optimizer, batch, token_advantages, args)
    return {"outcome": outcome, "step_rewards": R, "advantages": token_advantages, **updated,
            "completion_len": mask.sum(1).float().mean().item()}


def train(policy, ref_policy, tokenizer, args: Args, supervision: str, out_dir: str, device):
    """The GRPO loop with outcome or process supervision; writes out_dir/metrics.jsonl."""
    common.set_seed(args.seed)  # both supervisions see the same questions from the same state
    problems = task.train_problems(args.seed, ops=plumbing.parse_ops(args.train_ops))
    optimizer = torch.optim.Adam(policy.parameters(), lr=args.lr)
    warmup = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min(1.0, (i + 1) / max(1, args.warmup_steps)))
    log = plumbing.MetricsLog(out_dir)
    bar = tqdm(range(1, args.steps + 1), desc=f"GRPO ({supervision})")
    for step in bar:
        t0 = plumbing.clock(device)
        computed = grpo_step(policy, ref_policy, tokenizer, optimizer,
                             [next(problems) for _ in range(args.batch_size)], args, supervision)
        warmup.step()
        record = step_record(step, computed, supervision, args.group_size)
        log.write({**record, "step_time": plumbing.clock(device) - t0})
        bar.set_postfix(acc=f"{record['accuracy']:.2f}", step_acc=f"{record['step_acc']:.2f}",
                        steps=f"{record['steps_per_output']:.1f}", kl=f"{record['kl']:.4f}",
                        zero_adv=f"{record['zero_adv_groups']:.2f}")
    return log


def main(argv=None):
    args = plumbing.parse_args(Args, argv, PRETRAINED)
    plumbing.parse_ops(args.train_ops)  # --train_ops is a range: one line if it is not
    started = time.time()
    device = plumbing.resolve_device(args.device)
    common.set_seed(args.seed)
    out_dir = plumbing.run_dir("03_grpo_process", args, PRETRAINED)

    def load():  # pi_sft, freshly loaded
        return plumbing.load_policy(args.model, args.sft_steps, device, args.cache_dir or None,
                                    micro_batch_size=args.micro_batch_size)

    policy, tokenizer = load()
    ref_policy = copy.deepcopy(policy).eval().requires_grad_(False)  # pi_ref: pi_sft, frozen
    before = evaluate_with_step_errors(policy, tokenizer, args)
    print(plumbing.results_table({"SFT model": before}))
    after = {}
    supervisions = ["outcome", "process"] if args.supervision == "both" else [args.supervision]
    for n, supervision in enumerate(supervisions):
        if n > 0:
            policy, _ = load()  # a fresh pi_sft: every supervision starts from the same weights
        log = train(policy, ref_policy, tokenizer, args, supervision, f"{out_dir}/{supervision}",
                    device)
        memory = plumbing.peak_memory(device)  # so far: the largest of the runs
        after[supervision] = evaluate_with_step_errors(policy, tokenizer, args)
        save(policy, tokenizer, log, f"{out_dir}/{supervision}", before, after[supervision],
             memory, started)
    return report(args, supervisions, before, after, out_dir, device, memory, started)


# --------------------------------------------------------------------------------------------------
# What the lesson prints and records


def step_record(step: int, computed: dict, supervision: str, group_size: int) -> dict:
    """One line of metrics.jsonl from what grpo_step computed. Steps are counted in both modes, so
    the two logs compare line for line; a group with no signal has all its advantages 0."""
    R, outcome, advantages = computed["step_rewards"], computed["outcome"], computed["advantages"]
    n_steps = sum(len(r_i) for r_i in R)
    step_acc = sum(sum(r_i) for r_i in R) / n_steps
    T = advantages.shape[1]
    zero_adv = (advantages.reshape(-1, group_size * T) == 0).all(1).float().mean().item()
    return {"step": step,
            "reward": outcome.mean().item() if supervision == "outcome" else step_acc,
            "accuracy": outcome.mean().item(), "step_acc": step_acc,
            "steps_per_output": n_steps / len(R), "kl": computed["kl"],
            "clip_frac": computed["clip_frac"], "loss": computed["loss"],
            "grad_norm": computed["grad_norm"], "zero_adv_groups": zero_adv,
            "completion_len": computed["completion_len"]}


def evaluate_with_step_errors(model, tokenizer, args: Args) -> dict:
    """Greedy accuracy, Maj@K, Pass@K and OOD (task.evaluate), and the step errors."""
    return {**task.evaluate(model, tokenizer, args.eval_test, args.eval_ood, args.k,
                            args.temperature, args.max_new_tokens),
            **step_error_rates(model, tokenizer, args.eval_test, args.eval_ood,
                               args.max_new_tokens)}


@torch.no_grad()
def step_error_rates(model, tokenizer, n_test: int, n_ood: int, max_new_tokens: int,
                     chunk: int = 256) -> dict:
    """Share of wrong steps among all steps of greedy outputs: wrong lines (the final-answer line
    included) and steps never written, over lines written plus steps never written."""
    result = {}
    for split, n in (("test", n_test), ("ood", n_ood)):
        problems = task.make_split(split, n)
        wrong = total = 0
        for i in range(0, n, chunk):
            part = problems[i:i + chunk]
            out = common.sample(model, tokenizer, [task.prompt_text(p) for p in part],
                                greedy=True, max_new_tokens=max_new_tokens)
            for p, text in zip(part, out.texts):
                graded = task.verify(p, text)
                wrong += graded["steps"].count(False) + graded["missing"]
                total += len(graded["steps"]) + graded["missing"]
        if n:
            result[f"{split}_step_err"] = wrong / total
    return result


def save(policy, tokenizer, log, out_dir: str, before, after, memory, started):
    """The trained model beside its metrics.jsonl, and the log's final line."""
    policy.save_pretrained(f"{out_dir}/model")
    tokenizer.save_pretrained(f"{out_dir}/model")
    log.write({"final": True, "before": before, "after": after, "memory": memory,
               "wall_time": time.time() - started})


def report(args: Args, supervisions, before, after, out_dir, device, memory, started) -> dict:
    rows = {"SFT model": before, **{f"after GRPO ({s})": after[s] for s in supervisions}}
    print(f"\nGRPO with {' and '.join(supervisions)} supervision, {args.steps} steps of "
          f"{args.batch_size} questions x G={args.group_size} each, seed {args.seed}, on {device}, "
          f"{time.time() - started:.0f}s; logs in {out_dir}/<supervision>")
    print(plumbing.results_table(rows))
    print(memory)
    return {"before": before, "after": after, "out_dir": out_dir, "memory": memory}


if __name__ == "__main__":
    main()
