"""Lesson 05: every method's own loss has the gradient of the one unified loss, eq. (5)."""
import copy
import inspect
import json
import math
import statistics

import pytest
import torch
import torch.nn.functional as F

import common
import findings
import task

import plumbing
from conftest import TINY, error_line, load_lesson

L = load_lesson("05_unified")

PROBLEM = {"question": "7+5*3-9", "start": 7, "ops": [("+", 5), ("*", 3), ("-", 9)], "answer": 27}
OTHER = {"question": "2*3+4", "start": 2, "ops": [("*", 3), ("+", 4)], "answer": 10}
# two questions x G=2 outputs: right then wrong for each, so DPO has two pairs and GRPO two mixed groups
PROBLEMS = [PROBLEM, OTHER]
TEXTS = ["7+5=12\n12*3=36\n36-9=27\n#### 27\n", "7+5=12\n12*3=35\n#### 35\n",
         "2*3=6\n6+4=10\n#### 10\n", "2*3=5\n#### 5\n"]
G = 2


@pytest.fixture(scope="module")
def tiny():
    """A random tiny policy, a different random tiny reference, and a batch of the texts above."""
    tokenizer = plumbing.build_char_tokenizer()
    policy = plumbing.build_tiny_model(tokenizer, seed=0).eval()
    ref = plumbing.build_tiny_model(tokenizer, seed=1).eval().requires_grad_(False)
    prompts = [task.prompt_text(PROBLEMS[i // G]) for i in range(len(TEXTS))]
    batch = common.build_batch(tokenizer, prompts, TEXTS, "cpu")
    return policy, ref, tokenizer, batch


def grad(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, retain_graph=True)])


def assert_same_gradient(model, native_loss, unified_loss):
    a, b = grad(model, native_loss), grad(model, unified_loss)
    assert a.abs().max() > 1e-6  # a real gradient, not two zeros
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-7), (a - b).abs().max()


def per_output_ce(model, batch):
    """Each output's mean token cross-entropy, from transformers' own loss on the unpadded row.  # [N]"""
    losses = []
    for i in range(len(batch)):
        prompt = batch.prompt_ids[i][batch.prompt_mask[i] == 1]
        completion = batch.completion_ids[i][:int(batch.completion_mask[i].sum())]
        ids = torch.cat([prompt, completion])[None]
        labels = ids.clone()
        labels[0, :len(prompt)] = -100
        losses.append(model(input_ids=ids, labels=labels).loss)
    return torch.stack(losses)


# ----------------------------------------------------------------------------------------------------
# The gradient coefficient of each method reproduces the gradient of the method's own loss


def test_sft_cross_entropy_has_gradient_coefficient_one(tiny):
    policy, _, _, batch = tiny
    native = per_output_ce(policy, batch).mean()  # SFT: mean over outputs of the token-averaged cross-entropy
    logp = common.token_logprobs(policy, batch)
    unified = L.unified_loss(logp, batch.completion_mask, L.gc_sft(batch.completion_mask))
    assert_same_gradient(policy, native, unified)


def test_rft_objective_has_gradient_coefficient_indicator(tiny):
    policy, _, _, batch = tiny
    correct = L.outcome_rewards(PROBLEMS, batch.texts, G)
    assert correct.tolist() == [1, 0, 1, 0]
    # J_RFT = E[ I(o) * 1/|o| sum_t log pi(o_t) ]: cross-entropy on the right outputs, over all outputs drawn
    native = (correct * per_output_ce(policy, batch)).sum() / len(batch)
    logp = common.token_logprobs(policy, batch)
    unified = L.unified_loss(logp, batch.completion_mask, L.gc_rft(correct, batch.completion_mask))
    assert_same_gradient(policy, native, unified)


def test_dpo_loss_has_the_sigmoid_gradient_coefficient(tiny):
    policy, ref, _, full = tiny
    chosen, rejected = L.dpo_pairs(PROBLEMS, full, G)
    assert (chosen, rejected) == ([0, 2], [1, 3])
    batch = full.select(chosen + rejected)
    mask = batch.completion_mask.float()
    beta = 0.5
    logp = common.token_logprobs(policy, batch)
    with torch.no_grad():
        ref_logp = common.token_logprobs(ref, batch)
    # the paper's DPO (appendix A.1.4): log-ratios averaged over tokens
    lr = ((logp - ref_logp) * mask).sum(1) / mask.sum(1)
    native = -F.logsigmoid(beta * lr[:2] - beta * lr[2:]).mean()
    gc = L.gc_dpo(logp, ref_logp, batch.completion_mask, 2, beta)
    unified = L.unified_loss(logp, batch.completion_mask, gc, n_samples=2)
    assert_same_gradient(policy, native, unified)
    # the GC by hand: + beta*sigma(...) on every token of o+, - the same on o-, 0 on padding
    s = torch.sigmoid(beta * lr[2:] - beta * lr[:2]).detach()
    assert torch.allclose(gc[0, :int(mask[0].sum())], beta * s[0])
    assert torch.allclose(gc[3, :int(mask[3].sum())], -beta * s[1])
    assert (gc[mask == 0] == 0).all()


def grpo_objective(logp, old_logp, ref_logp, advantages, mask, clip_eps, beta):
    """eq. (3) with eq. (4), written out as in lesson 02."""
    mask = mask.float()
    ratio = torch.exp(logp - old_logp)
    surrogate = torch.min(ratio * advantages, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * advantages)
    kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
    return (((surrogate - beta * kl) * mask).sum(1) / mask.sum(1)).mean()


@pytest.mark.parametrize("supervision", ["outcome", "process"])
def test_grpo_objective_at_pi_old_equal_pi_theta(tiny, supervision):
    policy, ref, _, batch = tiny
    mask = batch.completion_mask
    if supervision == "outcome":
        advantages = L.grpo_outcome_advantages(L.outcome_rewards(PROBLEMS, batch.texts, G), G)[:, None] * mask
    else:
        advantages = process_advantages(batch)
    assert advantages.abs().sum() > 0
    logp = common.token_logprobs(policy, batch)
    with torch.no_grad():
        ref_logp = common.token_logprobs(ref, batch)
    native = -grpo_objective(logp, logp.detach(), ref_logp, advantages, mask, clip_eps=0.2, beta=0.3)
    unified = L.unified_loss(logp, mask, L.gc_grpo(advantages, logp, ref_logp, mask, beta=0.3))
    assert_same_gradient(policy, native, unified)


def test_ppo_surrogate_at_pi_old_equal_pi_theta(tiny):
    policy, ref, _, batch = tiny
    mask = batch.completion_mask
    logp = common.token_logprobs(policy, batch)
    with torch.no_grad():
        ref_logp = common.token_logprobs(ref, batch)
    torch.manual_seed(0)
    values = torch.randn(mask.shape) * mask
    rewards, _ = L.kl_penalised_rewards(torch.tensor([1.0, 0, 1, 0]), logp.detach(), ref_logp, mask, 0.1)
    advantages = L.whiten(L.gae(rewards, values, mask, gamma=1.0, lam=0.95)[0], mask)
    ratio = torch.exp(logp - logp.detach())  # eq. (1) with pi_old = pi_theta
    surrogate = torch.min(ratio * advantages, torch.clamp(ratio, 0.8, 1.2) * advantages)
    m = mask.float()
    native = -((surrogate * m).sum(1) / m.sum(1)).mean()
    unified = L.unified_loss(logp, mask, L.gc_ppo(advantages, mask))
    assert_same_gradient(policy, native, unified)


# ----------------------------------------------------------------------------------------------------
# Advantages by hand


def test_gc_grpo_by_hand_and_zero_on_padding():
    """GC = A + beta (pi_ref/pi_theta - 1) on the real tokens, 0 on padding even where the inputs
    there are not 0 (update() masks them, so the gradient tests cannot see a missing mask)."""
    advantages = torch.tensor([[1.0, 1.0, 1.0], [-0.5, 3.0, 3.0]])
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.9], [0.5, 0.9, 0.9]]))
    ref_logp = torch.log(torch.tensor([[0.25, 0.25, 0.1], [1.0, 0.1, 0.1]]))
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    gc = L.gc_grpo(advantages, logp, ref_logp, mask, beta=0.1)
    # pi_ref/pi_theta = 1/2, 1 on output 0; 2 on output 1: 1 - 0.05, 1 + 0, -0.5 + 0.1
    assert torch.allclose(gc, torch.tensor([[0.95, 1.0, 0.0], [-0.4, 0.0, 0.0]]), atol=1e-6)


def test_outcome_advantages_by_hand():
    adv = L.grpo_outcome_advantages(torch.tensor([1.0, 0, 1, 1]), 2)
    assert adv.tolist() == [1.0, -1.0, 0.0, 0.0]  # the second group is all right: no signal


def process_advantages(batch):
    """GRPO+PS's A_{i,t} as update() makes it: lesson 03's step rewards and advantages, masked."""
    T = batch.completion_ids.shape[1]
    return L.grpo_process_advantages(*L.step_rewards(PROBLEMS, batch, G), G, T) * batch.completion_mask


def test_process_advantages_by_hand(tiny):
    *_, batch = tiny
    adv = process_advantages(batch)
    # group 1: steps [T, T, T, T] and [T, F, F] + the "-9" step never written (0, at the EOS, token 23);
    # R has 5 ones and 3 zeros
    mean, std = 5 / 8, math.sqrt(5 / 8 * 3 / 8)
    up, down = (1 - mean) / std, (0 - mean) / std
    ends0, ends1 = batch.step_ends[0], batch.step_ends[1]
    assert ends0 == [6, 14, 22, 30] and ends1 == [6, 14, 22]
    assert adv[0, 0].item() == pytest.approx(4 * up)  # before step 1 ends: all 4 steps are at or after t
    assert adv[0, 7].item() == pytest.approx(3 * up)
    assert adv[0, 30].item() == pytest.approx(up)
    assert adv[0, 31].item() == 0  # the EOS comes after the last step
    assert adv[1, 0].item() == pytest.approx(up + 3 * down)
    assert adv[1, 15].item() == pytest.approx(2 * down)
    assert adv[1, 23].item() == pytest.approx(down)  # the missing step, charged at the last token


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    values = torch.tensor([[0.5, 0.5, 0.5], [1.0, 1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # the second output has two tokens
    adv, ret = L.gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # row 0: deltas 0, 0, 0.5 -> A = 0.125, 0.25, 0.5; row 1: deltas 0, 1 -> A = 0.5, 1
    assert torch.allclose(adv, torch.tensor([[0.125, 0.25, 0.5], [0.5, 1.0, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[0.625, 0.75, 1.0], [1.5, 2.0, 0.0]]))


# ----------------------------------------------------------------------------------------------------
# The data sources: offline means sampled once from pi_sft, online means from the current policy


def checksum(model):
    return sum(p.detach().double().sum().item() for p in model.parameters())


@pytest.fixture
def spy(monkeypatch):
    calls = []
    real = common.sample

    def sample(model, *a, **kw):
        calls.append((model, checksum(model)))
        return real(model, *a, **kw)

    monkeypatch.setattr(common, "sample", sample)
    return calls


SMALL = dict(steps=3, batch_size=2, group_size=2, max_new_tokens=8, eval_every=0, device="cpu")


def test_rft_data_is_sampled_once_from_the_sft_model(tiny, spy, monkeypatch):
    sft, _, tokenizer, _ = tiny
    args = L.Args(**SMALL)
    offline = L.offline_data(sft, tokenizer, args, seed=0)
    assert len(spy) == args.steps and all(model is sft for model, _ in spy)
    before = [b.completion_ids.clone() for _, b in offline]
    # a random model is never right: count every output as right, so GC = I(o) = 1 and the policy moves
    monkeypatch.setattr(L, "outcome_rewards", lambda problems, texts, g: torch.ones(len(texts)))
    trained_on, real_logprobs = [], common.token_logprobs
    monkeypatch.setattr(common, "token_logprobs", lambda model, batch, *a, **k: trained_on.append(
        batch.completion_ids.clone()) or real_logprobs(model, batch, *a, **k))
    policy = copy.deepcopy(sft).requires_grad_(True)
    start = checksum(policy)
    L.train_method("rft", policy, sft, tokenizer, args, seed=0, offline=offline)
    assert len(spy) == args.steps  # no sampling while training
    assert all(torch.equal(a, b.completion_ids) for a, (_, b) in zip(before, offline))
    assert len(trained_on) == args.steps and all(torch.equal(a, b) for a, b in zip(trained_on, before))  # in order
    assert checksum(policy) != start


def test_online_rft_samples_from_the_current_policy(tiny, spy, monkeypatch):
    sft, _, tokenizer, _ = tiny
    # a random model is never right: count every output as right, so GC = I(o) = 1 and the policy moves
    monkeypatch.setattr(L, "outcome_rewards", lambda problems, texts, g: torch.ones(len(texts)))
    policy = copy.deepcopy(sft).requires_grad_(True)
    L.train_method("online_rft", policy, sft, tokenizer, L.Args(**SMALL), seed=0)
    assert len(spy) == SMALL["steps"] and all(model is policy for model, _ in spy)
    sums = [s for _, s in spy]
    assert len(set(sums)) == len(sums)  # each batch came from the policy as it was after the last update


# ----------------------------------------------------------------------------------------------------
# The whole lesson


def test_main_end_to_end_tiny(cache_dir, tmp_path, capsys):
    argv = TINY + ["--cache_dir", cache_dir, "--out_dir", str(tmp_path), "--seeds", "0", "--eval_every", "1",
                   "--eval_curve", "4"]
    out = L.main(argv)
    names = [v[0] for v in L.METHODS.values()]
    assert list(out["final"]) == ["SFT model"] + names and all(len(v) == 1 for v in out["final"].values())
    assert len(out["findings"]) == 5
    lines = [json.loads(x) for x in (tmp_path / "seed0" / "metrics.jsonl").read_text().splitlines()]
    assert {x["method"] for x in lines} == {"SFT model"} | set(names)
    assert all("test_greedy" in x for x in lines if not x.get("final"))  # --eval_every 1
    assert sum(bool(x.get("final")) for x in lines) == 1 + len(names)
    printed = capsys.readouterr().out
    assert "| GRPO+OS | q ~ P_sft(Q), {o_i} ~ pi_theta(O|q): online |" in printed
    assert "A_{i,t} + beta * (pi_ref/pi_theta - 1) |" in printed
    assert "What GRPO saves" in printed
    # one seed: no verdict; under 1/|o| the two comparisons with Online RFT are labelled, not judged
    assert [row["verdict"] for row in out["findings"]] == [findings.ARTIFACT] * 2 + ["inconclusive, 1 seed"] * 3
    assert printed.count("- [inconclusive, 1 seed] ") == 3
    assert printed.count("smallest detectable difference n/a (one seed); test-set error ± ") == 5
    kept = json.loads(open(out["findings_file"]).read())  # the per-seed values of every finding
    assert [row["per_seed"] for row in kept["findings"]] == [row["per_seed"] for row in out["findings"]]
    # the report is made from the logs alone: `python findings.py 05` (lesson 05's --report_only)
    # prints the same tables and findings again
    again = findings.main(["05"] + argv)
    assert again["findings"] == out["findings"] and again["final"] == out["final"]
    assert printed.split("Final evaluation")[1] == capsys.readouterr().out.split("Final evaluation")[1]


def test_mean_and_std_over_seeds():
    assert findings.pct([0.5, 0.7]) == "60.0 ± 14.1%"
    assert findings.pct([0.25]) == "25.0%"


@pytest.mark.parametrize("argv,message", [
    (["--methods", "ppo,ppo2"], "unknown method 'ppo2'"), (["--group_size", "1"], "--group_size 1"),
    (["--lr", "-1"], "error: --lr -1.0: must be > 0"),
    (["--lr", "nan"], "error: --lr nan: must be a finite number"),
    (["--value_lr", "0"], "error: --value_lr 0.0: must be > 0"), (["--micro_batch_size", "-1"], "must be >= 0"),
    (["--k", "-1"], "error: --k -1: must be >= 1"), (["--k", "0"], "--k 0: must be >= 1"),  # the findings need Maj@K
    (["--eval_test", "-5"], "error: --eval_test -5: must be >= 1"),
    (["--grop_size", "4"], "error: unrecognized arguments: --grop_size 4"),
    (["--dpo_beta", "0"], "--dpo_beta 0.0"), (["--gamma", "1.5"], "--gamma 1.5"),
    (["--eval_every", "-1"], "--eval_every -1: must be >= 0"), (["--seeds", "-1"], "--seeds '-1'"),
    (["--normaliser", "sum"], "--normaliser 'sum'"), (["--max_grad_norm", "0"], "--max_grad_norm 0.0"),
    (["--device", "gpu0"], "--device 'gpu0'"),
])
def test_bad_arguments_are_one_line_errors(argv, message, capsys, no_model):
    assert message in error_line(L.main, argv, capsys)
    assert "unified paradigm" not in capsys.readouterr().out  # stopped before any output


# ----------------------------------------------------------------------------------------------------
# The copies of lessons 01, 02 and 03 (repeated on purpose, so each lesson reads alone) are identical to them

COPIES = {"02_grpo_outcome": ["outcome_rewards", "grpo_outcome_advantages"],
          "03_grpo_process": ["step_rewards", "grpo_process_advantages"],
          "01_ppo": ["last_token_index", "kl_penalised_rewards", "gae", "whiten", "load_value_model", "token_values"]}


@pytest.mark.parametrize("lesson", list(COPIES))
def test_copies_are_character_for_character_the_owners(lesson):
    owner = load_lesson(lesson)
    for name in COPIES[lesson]:
        assert inspect.getsource(getattr(L, name)) == inspect.getsource(getattr(owner, name)), name


# ----------------------------------------------------------------------------------------------------
# The normalisers of eq. (5), DPO's pairs, PPO's pieces (pinned to lesson 01), the findings on several seeds


def test_unified_loss_normalisers_worked_example():
    """o_1: one token with GC 2; o_2: three tokens with GC 1 (and a padded fourth). d loss / d log pi:
    output (1/|o|, then the mean over 2 outputs): -2/1/2 = -1 on o_1, -1/3/2 on each token of o_2;
    constant (1/max_len = 1/4, then the mean): -2/4/2, -1/4/2; token (1/4 tokens of the batch): -2/4, -1/4;
    output with n_samples = 1 (DPO: the two outputs are one draw): -2, -1/3."""
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0]])
    gc = torch.tensor([[2.0, 0, 0, 0], [1.0, 1.0, 1.0, 1.0]]) * mask
    expected = {("output", None): (-1.0, -1 / 6), ("constant", None): (-0.25, -0.125), ("token", None): (-0.5, -0.25),
                ("output", 1): (-2.0, -1 / 3)}
    for (normaliser, n_samples), (first, second) in expected.items():
        logp = torch.full((2, 4), -0.7, requires_grad=True)
        loss = L.unified_loss(logp, mask, gc, n_samples, normaliser, max_len=4)
        loss.backward()
        want = torch.tensor([[first, 0, 0, 0], [second, second, second, 0]])
        assert torch.allclose(logp.grad, want), (normaliser, n_samples, logp.grad)
        assert loss.item() == pytest.approx((want * -0.7).sum().item())  # the loss is linear in log pi


def test_dpo_pairs_uneven_all_right_all_wrong_groups():
    """Each question pairs its right outputs with its wrong ones one to one, in order, never across questions:
    [R W W W] -> one pair; [R R R W] -> one; all right or all wrong -> none; [W R W R] -> two."""
    tokenizer = plumbing.build_char_tokenizer()
    problems = task.make_split("test", 5)
    right = lambda p: task.solution_text(p)
    wrong = lambda p: f"#### {p['answer'] + 1}\n"
    patterns = ["RWWW", "RRRW", "RRRR", "WWWW", "WRWR"]
    texts = [right(p) if c == "R" else wrong(p) for p, pattern in zip(problems, patterns) for c in pattern]
    batch = common.build_batch(tokenizer, [task.prompt_text(p) for p in problems for _ in range(4)], texts, "cpu")
    chosen, rejected = L.dpo_pairs(problems, batch, 4)
    assert list(zip(chosen, rejected)) == [(0, 1), (4, 7), (17, 16), (19, 18)]


class ListLog:
    def __init__(self):
        self.records = []

    def write(self, record):
        self.records.append(record)


def test_dpo_without_a_pair_makes_no_update(tiny):
    """Two DPO updates: the first batch has a pair per question (the policy moves), the second has none (no
    question with both a right and a wrong output): GC = 0 and no optimizer step, so the weights stay where
    the first update left them (an Adam step on a zero gradient would still move them by its momentum)."""
    sft, _, tokenizer, batch = tiny  # TEXTS: right, wrong for each of the two questions
    all_wrong = common.build_batch(tokenizer, [task.prompt_text(PROBLEMS[i // G]) for i in range(4)],
                                   [TEXTS[1], TEXTS[1], TEXTS[3], TEXTS[3]], "cpu")
    policy = copy.deepcopy(sft).requires_grad_(True)
    start, after = checksum(policy), []
    log = ListLog()
    log.write = lambda record: (log.records.append(record), after.append(checksum(policy)))
    L.train_method("dpo", policy, sft, tokenizer, L.Args(**{**SMALL, "steps": 2}), seed=0, log=log,
                   offline=[(PROBLEMS, batch), (PROBLEMS, all_wrong)])
    assert [r["pairs"] for r in log.records] == [2, 0]
    assert log.records[0]["gc_abs_mean"] > 0 and log.records[1]["gc_abs_mean"] == 0
    assert after[0] != start and after[1] == after[0]


def test_ppo_value_loss_is_lesson_01s_at_the_first_update():
    """The value loss of 05's PPO, 1/2 the mean squared error per token, is lesson 01's clipped value loss at
    the first update of a batch (V = V_old, so lesson 01's clip does not act)."""
    ppo = load_lesson("01_ppo")
    g = torch.Generator().manual_seed(0)
    lengths, T = [5, 1, 3, 5], 5
    mask = torch.tensor([[1] * n + [0] * (T - n) for n in lengths])
    returns, v = torch.randn(4, T, generator=g) * mask, torch.randn(4, T, generator=g) * mask
    value_loss_05 = 0.5 * (((v - returns) ** 2) * mask).sum() / mask.sum()  # as written in ppo_advantages
    value_loss_01, _ = ppo.clipped_value_loss(v, v, returns, mask, value_clip=0.2)
    assert value_loss_05.item() == pytest.approx(value_loss_01.item())


@pytest.fixture
def saved_sft(tiny, tmp_path):
    """The tiny policy saved to a folder, as pi_sft is: PPO's value model loads from sft.name_or_path."""
    sft, _, tokenizer, _ = tiny
    sft = copy.deepcopy(sft)
    sft.save_pretrained(tmp_path)
    sft.name_or_path = str(tmp_path)
    return sft, tokenizer


def test_ppo_in_train_method_uses_the_value_loss_of_its_returns(saved_sft, monkeypatch):
    """One PPO update through train_method: the logged value loss is 1/2 the mean squared error between V_psi
    (read before its update) and the GAE returns of the same batch."""
    sft, tokenizer = saved_sft
    seen, real_gae = {}, L.gae
    monkeypatch.setattr(L, "gae", lambda rewards, values, mask, *a: seen.update(
        values=values.clone(), out=real_gae(rewards, values, mask, *a), mask=mask) or seen["out"])
    log = ListLog()
    L.train_method("ppo", copy.deepcopy(sft).requires_grad_(True), sft, tokenizer, L.Args(**{**SMALL, "steps": 1}),
                   seed=0, log=log)
    m = seen["mask"].float()
    expected = 0.5 * (((seen["values"] - seen["out"][1]) ** 2) * m).sum() / m.sum()
    assert log.records[-1]["value_loss"] == pytest.approx(expected.item(), rel=1e-5)


def stand_in_logs(folder, greedy, maj=None, pas=None, seeds=(0, 1, 2)):
    """metrics.jsonl of each seed with only the final lines, from per-seed greedy (Maj@8, Pass@8) values."""
    maj, pas = maj or {}, pas or {}
    for seed in seeds:
        lines = []
        for name, values in greedy.items():
            if seed >= len(values):
                continue  # this method did not run on this seed
            after = {"test_greedy": values[seed], "test_maj@8": maj.get(name, [.5] * 3)[seed],
                     "test_pass@8": pas.get(name, [.8] * 3)[seed], "ood_greedy": 0.0}
            cost = {} if name == "SFT model" else {"time_per_step": 1.0, "state_mb": 10.0, "trainable_params": 5,
                                                   "models": "policy"}
            lines.append(json.dumps({"method": name, "final": True, "seed": seed, "after": after, **cost}))
        (folder / f"seed{seed}").mkdir(parents=True, exist_ok=True)
        (folder / f"seed{seed}" / "metrics.jsonl").write_text("\n".join(lines) + "\n")


GREEDY = {"SFT model": [.40, .40, .40], "RFT": [.50, .52, .51], "Online RFT": [.60, .63, .61],
          "GRPO+OS": [.55, .56, .54], "GRPO+PS": [.56, .54, .56]}  # Online-RFT: +.10 +.11 +.10; GRPO-Online: -.05 -.07 -.07


@pytest.mark.parametrize("normaliser", ["constant", "output"])
def test_findings_on_several_seeds_from_the_logs(tmp_path, capsys, normaliser):
    """--report_only on three seeds' logs written here: each finding compares the right pair in the right
    direction and gets the stated rule's verdict (reproduced, contradicted, inconclusive); under 1/|o| the two
    comparisons with Online RFT are labelled as the artifact's, not judged. Each row gives the smallest
    difference its seeds could detect (2 std) and the test set's binomial error, and keeps its per-seed values."""
    maj = {"SFT model": [.50] * 3, "GRPO+OS": [.70, .72, .71]}  # +.20 +.22 +.21
    pas = {"SFT model": [.80] * 3, "GRPO+OS": [.85, .70, .95]}  # +.05 -.10 +.15: Maj gain - Pass gain .15 .32 .06
    stand_in_logs(tmp_path, GREEDY, maj, pas)
    out = L.main(["--report_only", "--seeds", "0,1,2", "--out_dir", str(tmp_path), "--normaliser", normaliser,
                  "--methods", "rft,online_rft,grpo_os,grpo_ps"])
    first = ["reproduced", "contradicted"] if normaliser == "constant" else [findings.ARTIFACT] * 2
    assert [(row["claim"], row["verdict"]) for row in out["findings"]] == [
        ("Online RFT ends above RFT (Figure 5)", first[0]),
        ("GRPO ends above Online RFT (Figure 5)", first[1]),
        ("GRPO+PS ends above GRPO+OS (Figure 5)", "inconclusive"),  # +.01 -.02 +.02
        ("RL (GRPO+OS) raises Maj@8", "reproduced"),
        ("RL (GRPO+OS) raises Maj@8 more than Pass@8", "inconclusive")]  # all > 0, but the mean .18 < 2 std .26
    rows = out["findings"]
    assert "+10.3 ± 0.6 pts" in rows[0]["numbers"] and "-6.3 ± 1.2 pts" in rows[1]["numbers"]
    assert rows[0]["detectable"] == pytest.approx(2 * 0.005774, rel=1e-3)  # 2 std of .10 .11 .10
    # the test set's error of Online RFT - RFT at seed 0: sqrt((.6 * .4 + .5 * .5) / 200) = 4.95 points
    assert rows[0]["test_error"] == pytest.approx(statistics.mean(
        math.sqrt((a * (1 - a) + b * (1 - b)) / 200) for a, b in zip(GREEDY["Online RFT"], GREEDY["RFT"])))
    assert rows[0]["per_seed"] == pytest.approx([.10, .11, .10])
    kept = json.loads(open(out["findings_file"]).read())
    assert kept["findings"][0]["values"] == {"Online RFT": GREEDY["Online RFT"], "RFT": GREEDY["RFT"]}
    printed = capsys.readouterr().out
    assert f"[{first[0]}] Online RFT ends above RFT" in printed
    assert "smallest detectable difference 1.2 pts; test-set error ± 4.9 pts" in printed
    assert "not that the two are the same" in printed


def test_report_only_with_mismatched_seeds_stops_with_one_line(tmp_path, capsys):
    """GRPO+OS has seeds 0, 1, 2 but Online RFT only 0, 1 (e.g. seed 2's log was overwritten by a subset run):
    one line that says so, and no verdict."""
    stand_in_logs(tmp_path, {**GREEDY, "Online RFT": GREEDY["Online RFT"][:2]})
    argv = ["--report_only", "--seeds", "0,1,2", "--out_dir", str(tmp_path), "--methods", "online_rft,grpo_os"]
    line = error_line(L.main, argv, capsys)
    assert "Online RFT has seeds 0,1 of 0,1,2" in line
    printed = capsys.readouterr().out
    assert "findings" not in printed and "reproduced" not in printed and "inconclusive" not in printed
    # seeds that ran with different settings are not paired either
    stand_in_logs(tmp_path, GREEDY)
    for seed, lr in ((0, 5e-5), (1, 5e-5), (2, 1e-4)):
        (tmp_path / f"seed{seed}" / "settings.json").write_text(json.dumps({"lr": lr}))
    assert "ran with different settings" in error_line(L.main, argv, capsys)


def test_two_runs_differing_in_one_option_leave_two_logs(cache_dir, tmp_path, monkeypatch):
    """Without --out_dir each run's folder names its non-default options and seed; a --methods subset run in
    the same folder keeps the other methods' records."""
    monkeypatch.chdir(tmp_path)
    argv = TINY + ["--cache_dir", cache_dir, "--seeds", "0", "--eval_every", "0", "--steps", "1"]
    first = L.main(argv + ["--methods", "sft"])["dirs"][0]
    second = L.main(argv + ["--methods", "sft", "--lr", "1e-4"])["dirs"][0]
    assert first != second and "lr-0.0001" in second and first.endswith("_seed0")
    for folder in (first, second):
        assert {json.loads(x)["method"] for x in open(f"{folder}/metrics.jsonl")} == {"SFT model", "SFT"}
    L.main(argv + ["--methods", "rft"])  # the same settings as the first run: its folder, SFT kept
    methods = [json.loads(x)["method"] for x in open(f"{first}/metrics.jsonl")]
    assert {"SFT", "RFT"} <= set(methods) and methods.count("SFT model") == 1
    both = L.main(argv + ["--methods", "sft,rft", "--report_only"])
    assert list(both["final"]) == ["SFT model", "SFT", "RFT"]


# ----------------------------------------------------------------------------------------------------
# Gradient accumulation: micro-batches of 3 of 8 outputs give the whole batch's gradient, for every method

TEXTS8 = [TEXTS[0], TEXTS[1], "7+5=12\n#### 12\n", "#### 27\n", TEXTS[2], TEXTS[3], "#### 10\n", "2*3=6\n"]


def update_gradients(method, policy, sft, batch, micro_batch_size, normaliser):
    """The policy's (and for PPO the value model's) gradient after one update() at micro_batch_size, with
    optimizers that do not move (SGD at lr 0) and no clipping, and the record update() returned."""
    args = L.Args(group_size=4, micro_batch_size=micro_batch_size, normaliser=normaliser, max_grad_norm=1e9,
                  max_new_tokens=40)
    policy = copy.deepcopy(policy).requires_grad_(True)
    critic = None
    if method == "ppo":
        torch.manual_seed(0)
        value_model = L.load_value_model(sft.name_or_path, "cpu").eval()
        critic = (value_model, torch.optim.SGD(value_model.parameters(), lr=0.0))
    record = L.update(method, PROBLEMS, batch, policy, sft, torch.optim.SGD(policy.parameters(), lr=0.0),
                      critic, args)
    models = [policy] + ([critic[0]] if critic else [])
    return torch.cat([p.grad.flatten() for m in models for p in m.parameters() if p.grad is not None]), record


@pytest.mark.parametrize("normaliser", ["output", "constant", "token"])
@pytest.mark.parametrize("method", list(L.METHODS))
def test_micro_batches_give_the_whole_batch_gradient(saved_sft, method, normaliser):
    """Tolerance: max |difference| <= 1e-5 x the largest gradient entry (float32 sums in another order)."""
    sft, tokenizer = saved_sft
    policy = plumbing.build_tiny_model(tokenizer, seed=3).eval()  # != pi_ref, so the KL terms are not 0
    prompts = [task.prompt_text(PROBLEMS[i // 4]) for i in range(8)]
    batch = common.build_batch(tokenizer, prompts, TEXTS8, "cpu")
    whole, record = update_gradients(method, policy, sft, batch, 0, normaliser)
    parts, record3 = update_gradients(method, policy, sft, batch, 3, normaliser)
    assert whole.abs().max() > 1e-6  # a real gradient
    assert (whole - parts).abs().max() <= 1e-5 * whole.abs().max()
    for key, value in record.items():
        assert record3[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
