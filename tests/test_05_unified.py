"""Lesson 05: every method's own loss has the gradient of the one unified loss, eq. (5)."""
import json
import math
import random
import time

import pytest
import torch
import torch.nn.functional as F

import common

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
    prompts = [common.prompt_text(PROBLEMS[i // G]) for i in range(len(TEXTS))]
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
    batch = L.select(full, chosen + rejected)
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
        advantages = L.grpo_process_advantages(PROBLEMS, batch, G)
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
    rewards = L.ppo_token_rewards(torch.tensor([1.0, 0, 1, 0]), logp.detach(), ref_logp, mask, beta=0.1)
    advantages = L.whiten(L.gae(rewards, values, mask, gamma=1.0, lam=0.95)[0], mask)
    ratio = torch.exp(logp - logp.detach())  # eq. (1) with pi_old = pi_theta
    surrogate = torch.min(ratio * advantages, torch.clamp(ratio, 0.8, 1.2) * advantages)
    m = mask.float()
    native = -((surrogate * m).sum(1) / m.sum(1)).mean()
    unified = L.unified_loss(logp, mask, L.gc_ppo(advantages, mask))
    assert_same_gradient(policy, native, unified)


# ----------------------------------------------------------------------------------------------------
# Advantages by hand


def test_outcome_advantages_by_hand():
    adv = L.grpo_outcome_advantages(torch.tensor([1.0, 0, 1, 1]), 2)
    assert adv.tolist() == [1.0, -1.0, 0.0, 0.0]  # the second group is all right: no signal


def test_process_advantages_by_hand(tiny):
    *_, batch = tiny
    adv = L.grpo_process_advantages(PROBLEMS, batch, G)
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
    import copy
    sft, _, tokenizer, _ = tiny
    args = L.Args(**SMALL)
    offline = L.offline_data(sft, tokenizer, args, seed=0)
    assert len(spy) == args.steps and all(model is sft for model, _ in spy)
    before = [b.completion_ids.clone() for _, b in offline]
    # a random model is never right: count every output as right, so GC = I(o) = 1 and the policy moves
    monkeypatch.setattr(L, "outcome_rewards", lambda problems, texts, g: torch.ones(len(texts)))
    trained_on, real_logprobs = [], common.token_logprobs
    monkeypatch.setattr(common, "token_logprobs", lambda model, batch, *a: trained_on.append(
        batch.completion_ids.clone()) or real_logprobs(model, batch, *a))
    policy = copy.deepcopy(sft).requires_grad_(True)
    start = checksum(policy)
    L.train_method("rft", policy, sft, tokenizer, args, seed=0, offline=offline)
    assert len(spy) == args.steps  # no sampling while training
    assert all(torch.equal(a, b.completion_ids) for a, (_, b) in zip(before, offline))
    assert len(trained_on) == args.steps and all(torch.equal(a, b) for a, b in zip(trained_on, before))  # in order
    assert checksum(policy) != start


def test_online_rft_samples_from_the_current_policy(tiny, spy, monkeypatch):
    import copy
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
    started = time.time()
    argv = TINY + ["--cache_dir", cache_dir, "--out_dir", str(tmp_path), "--seeds", "0", "--eval_every", "1",
                   "--eval_curve", "4"]
    out = L.main(argv)
    elapsed = time.time() - started
    names = [v[0] for v in L.METHODS.values()]
    assert list(out["final"]) == ["SFT model"] + names and all(len(v) == 1 for v in out["final"].values())
    assert len(out["findings"]) == 5
    lines = [json.loads(x) for x in (tmp_path / "seed0" / "metrics.jsonl").read_text().splitlines()]
    assert {x["method"] for x in lines} == {"SFT model"} | set(names)
    assert all("test_greedy" in x for x in lines if not x.get("final"))  # --eval_every 1
    assert sum(bool(x.get("final")) for x in lines) == 1 + len(names)
    printed = capsys.readouterr().out
    assert "gc_grpo: return (advantages + beta * (torch.exp(ref_logp - logp.detach()) - 1)) * mask" in printed
    assert "What GRPO saves" in printed
    # one seed: the criterion gives no verdict, for every finding
    assert [verdict for _, verdict, _ in out["findings"]] == ["inconclusive, 1 seed"] * 5
    assert printed.count("- [inconclusive, 1 seed] ") == 5
    # the report is made from the logs alone: --report_only prints the same tables and findings again
    again = L.main(argv + ["--report_only"])
    assert again["findings"] == out["findings"] and again["final"] == out["final"]
    assert printed.split("Final evaluation")[1] == capsys.readouterr().out.split("Final evaluation")[1]
    assert elapsed < 60


def test_mean_and_std_over_seeds():
    assert L.pct([0.5, 0.7]) == "60.0 ± 14.1%"
    assert L.pct([0.25]) == "25.0%"


@pytest.mark.parametrize("argv,message", [
    (["--methods", "ppo,ppo2"], "unknown method 'ppo2'"), (["--group_size", "1"], "--group_size 1"),
    (["--lr", "-1"], "error: --lr -1.0: the learning rate must be finite and > 0"),
    (["--lr", "nan"], "error: --lr nan: must be a finite number"),
    (["--value_lr", "0"], "error: --value_lr 0.0: the learning rate must be finite and > 0"),
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
# The copies of lessons 02 and 03 (repeated on purpose, so each lesson reads alone) are pinned to them

THIRD = {"question": "9-4*5", "start": 9, "ops": [("-", 4), ("*", 5)], "answer": 25}


def outputs_of_every_kind(problem):
    """Right, wrong, cut short, answer only, empty, garbage, and a solution with extra lines after it."""
    solution, answer = common.solution_text(problem), problem["answer"]
    return [solution, solution.replace(f"#### {answer}", f"#### {answer + 1}"), solution.replace("=", "=1", 1),
            *(solution[:n] for n in (1, 4, 7, len(solution) - 3)), f"#### {answer}\n", f"#### {answer}", "",
            "12*=+#\n##", " 7\n\n3", solution + "1+1=2\n#### 3\n", solution + solution]


def test_outcome_copies_match_lesson_02():
    lesson02 = load_lesson("02_grpo_outcome")
    torch.manual_seed(0)
    for G in (2, 3, 4, 8):
        rewards = (torch.rand(6 * G) < 0.4).float()
        rewards[:G] = 1.0  # one group with no signal
        assert torch.equal(L.grpo_outcome_advantages(rewards, G), lesson02.grpo_outcome_advantages(rewards, G))
    problems = [PROBLEM, OTHER, THIRD]
    texts = [t for p in problems for t in outputs_of_every_kind(p)]
    n = len(texts) // len(problems)
    assert torch.equal(L.outcome_rewards(problems, texts, n), lesson02.outcome_rewards(problems, texts, n))


def test_process_advantages_match_lesson_03():
    lesson03 = load_lesson("03_grpo_process")
    tokenizer = plumbing.build_char_tokenizer()
    problems = [PROBLEM, OTHER, THIRD]
    rng = random.Random(0)
    for G in (2, 3, 4):
        groups = [[rng.sample(outputs_of_every_kind(p), G) for p in problems] for _ in range(6)]
        groups.append([[common.solution_text(p)] * G for p in problems])  # all steps right: no signal
        groups.append([[""] * G, [common.solution_text(OTHER)] * (G - 1) + [""], ["#### 25"] * G])
        for group in groups:
            texts = [t for texts_q in group for t in texts_q]
            prompts = [common.prompt_text(p) for p in problems for _ in range(G)]
            batch = common.build_batch(tokenizer, prompts, texts, "cpu")
            T = batch.completion_ids.shape[1]
            ours = L.grpo_process_advantages(problems, batch, G)  # [3G, T]
            theirs = lesson03.grpo_process_advantages(*lesson03.step_rewards(problems, batch, G), G, T)  # [3G, T]
            assert torch.allclose(ours, theirs * batch.completion_mask, atol=1e-5), (G, texts)


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
    problems = common.make_split("test", 5)
    right = lambda p: common.solution_text(p)
    wrong = lambda p: f"#### {p['answer'] + 1}\n"
    patterns = ["RWWW", "RRRW", "RRRR", "WWWW", "WRWR"]
    texts = [right(p) if c == "R" else wrong(p) for p, pattern in zip(problems, patterns) for c in pattern]
    batch = common.build_batch(tokenizer, [common.prompt_text(p) for p in problems for _ in range(4)], texts, "cpu")
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
    import copy
    sft, _, tokenizer, batch = tiny  # TEXTS: right, wrong for each of the two questions
    all_wrong = common.build_batch(tokenizer, [common.prompt_text(PROBLEMS[i // G]) for i in range(4)],
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


def test_ppo_pieces_equal_lesson_01s():
    """Lesson 05's PPO is lesson 01's: the per-token KL-penalised reward of eq. (2), GAE, whitening, and the
    value loss at the first update of a batch (V = V_old, so lesson 01's clip does not act)."""
    ppo = load_lesson("01_ppo")
    g = torch.Generator().manual_seed(0)
    lengths, T = [5, 1, 3, 5], 5
    mask = torch.tensor([[1] * n + [0] * (T - n) for n in lengths])
    logp, ref_logp = -torch.rand(4, T, generator=g), -torch.rand(4, T, generator=g)
    scores, values = torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.randn(4, T, generator=g) * mask
    ours = L.ppo_token_rewards(scores, logp, ref_logp, mask, 0.1)
    theirs, _ = ppo.kl_penalised_rewards(scores, logp, ref_logp, mask, 0.1)
    assert torch.allclose(ours * mask, theirs, atol=1e-6)
    for gamma, lam in ((1.0, 0.95), (1.0, 1.0), (0.9, 0.5)):
        (a, r), (a1, r1) = L.gae(ours, values, mask, gamma, lam), ppo.gae(theirs, values, mask, gamma, lam)
        assert torch.allclose(a, a1, atol=1e-6) and torch.allclose(r, r1, atol=1e-6)
        assert torch.allclose(L.whiten(a, mask), ppo.whiten(a1, mask), atol=1e-5)
    returns = L.gae(ours, values, mask, 1.0, 0.95)[1]
    v = (values + 0.3 * torch.randn(4, T, generator=g)) * mask
    value_loss_05 = 0.5 * (((v - returns) ** 2) * mask).sum() / mask.sum()  # as written in train_method
    value_loss_01, _ = ppo.clipped_value_loss(v, v, returns, mask, value_clip=0.2)
    assert value_loss_05.item() == pytest.approx(value_loss_01.item())


def test_ppo_in_train_method_uses_the_value_loss_of_its_returns(tiny, monkeypatch):
    """One PPO update through train_method: the logged value loss is 1/2 the mean squared error between V_psi
    (read before its update) and the GAE returns of the same batch."""
    import copy
    sft, _, tokenizer, _ = tiny
    seen, real_gae = {}, L.gae
    monkeypatch.setattr(L, "gae", lambda rewards, values, mask, *a: seen.update(
        values=values.clone(), out=real_gae(rewards, values, mask, *a), mask=mask) or seen["out"])
    log = ListLog()
    L.train_method("ppo", copy.deepcopy(sft).requires_grad_(True), sft, tokenizer, L.Args(**{**SMALL, "steps": 1}),
                   seed=0, log=log)
    m = seen["mask"].float()
    expected = 0.5 * (((seen["values"] - seen["out"][1]) ** 2) * m).sum() / m.sum()
    assert log.records[-1]["value_loss"] == pytest.approx(expected.item(), rel=1e-5)


def test_findings_on_several_seeds_from_the_logs(tmp_path, capsys):
    """--report_only on three seeds' logs written here: each finding compares the right pair in the right
    direction and gets the stated rule's verdict (reproduced, contradicted, inconclusive)."""
    greedy = {"SFT model": [.40, .40, .40], "RFT": [.50, .52, .51], "Online RFT": [.60, .63, .61],
              "GRPO+OS": [.55, .56, .54], "GRPO+PS": [.56, .54, .56]}  # Online-RFT: +.10 +.11 +.10; GRPO-Online: -.05 -.07 -.07
    maj = {"SFT model": [.50] * 3, "GRPO+OS": [.70, .72, .71]}  # +.20 +.22 +.21
    pas = {"SFT model": [.80] * 3, "GRPO+OS": [.85, .70, .95]}  # +.05 -.10 +.15: Maj gain - Pass gain .15 .32 .06
    for seed in range(3):
        lines = []
        for name, values in greedy.items():
            after = {"test_greedy": values[seed], "test_maj@8": maj.get(name, [.5] * 3)[seed],
                     "test_pass@8": pas.get(name, [.8] * 3)[seed], "ood_greedy": 0.0}
            cost = {} if name == "SFT model" else {"time_per_step": 1.0, "state_mb": 10.0, "trainable_params": 5,
                                                   "models": "policy"}
            lines.append(json.dumps({"method": name, "final": True, "seed": seed, "after": after, **cost}))
        (tmp_path / f"seed{seed}").mkdir()
        (tmp_path / f"seed{seed}" / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    out = L.main(["--report_only", "--seeds", "0,1,2", "--out_dir", str(tmp_path),
                  "--methods", "rft,online_rft,grpo_os,grpo_ps"])
    assert [(claim, verdict) for claim, verdict, _ in out["findings"]] == [
        ("Online RFT ends above RFT (Figure 5)", "reproduced"),
        ("GRPO ends above Online RFT (Figure 5)", "contradicted"),
        ("GRPO+PS ends above GRPO+OS (Figure 5)", "inconclusive"),  # +.01 -.02 +.02
        ("RL (GRPO+OS) raises Maj@8", "reproduced"),
        ("RL (GRPO+OS) raises Maj@8 more than Pass@8", "inconclusive")]  # all > 0, but the mean .18 < 2 std .26
    assert "+10.3 ± 0.6 pts" in out["findings"][0][2] and "-6.3 ± 1.2 pts" in out["findings"][1][2]
    assert "[reproduced] Online RFT ends above RFT" in capsys.readouterr().out
