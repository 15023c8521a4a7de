"""Lesson 03: process-supervision advantages against hand-worked groups, and the lesson end to end."""
import inspect
import json
import math
import random
import copy
from pathlib import Path

import pytest
import torch

import common
import task

import plumbing
from conftest import TINY, TINY_PI_SFT, checksum, error_line, load_lesson

lesson = load_lesson("03_grpo_process")

PROBLEM = {"question": "7+5*3-9", "start": 7, "ops": [("+", 5), ("*", 3), ("-", 9)], "answer": 27}


@pytest.fixture(scope="module")
def tokenizer():
    return plumbing.build_char_tokenizer()


def reference_advantages(rewards, index, group_size, T):
    """The equations written out with plain loops: normalise over all steps of the group, then
    A_{i,t} = sum of r~_i^index(j) over the steps j with index(j) >= t."""
    A = torch.zeros(len(rewards), T)
    for g in range(0, len(rewards), group_size):
        R = [x for r_i in rewards[g:g + group_size] for x in r_i]
        mean = sum(R) / len(R)
        std = math.sqrt(sum((x - mean) ** 2 for x in R) / len(R))
        for i in range(g, g + group_size):
            for t in range(T):
                A[i, t] = sum((x - mean) / std for x, e in zip(rewards[i], index[i]) if e >= t) if std > 0 else 0.0
    return A


def test_step_rewards_and_advantages_hand_worked(tokenizer):
    """Three outputs: right; wrong from step 2 on and one operation short; an immediate EOS."""
    texts = ["7+5=12\n12*3=36\n36-9=27\n#### 27\n",  # 4 correct steps, ends at tokens 6, 14, 22, 30; EOS at 31
             "7+5=12\n12*3=35\n#### 35\n",  # right, wrong, wrong answer (ends 6, 14, 22), "-9" never written; EOS at 23
             ""]  # garbage: EOS at once, all 4 steps missing
    batch = common.build_batch(tokenizer, ["7+5*3-9\n"] * 3, texts, "cpu")
    rewards, index = lesson.step_rewards([PROBLEM], batch, group_size=3)
    assert rewards == [[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    assert index == [[6, 14, 22, 30], [6, 14, 22, 23], [0, 0, 0, 0]]  # missing steps end at the last token

    # R has 12 step rewards, five 1s and seven 0s: mean 5/12, std sqrt(5/12 * 7/12) = sqrt(35)/12,
    # so a right step is normalised to +7/sqrt(35) and a wrong or missing one to -5/sqrt(35).
    T = batch.completion_ids.shape[1]
    A = lesson.grpo_process_advantages(rewards, index, 3, T)
    u = 1 / math.sqrt(35)
    expected = torch.zeros(3, T)
    expected[0, 0:7], expected[0, 7:15], expected[0, 15:23], expected[0, 23:31] = 28 * u, 21 * u, 14 * u, 7 * u
    expected[1, 0:7], expected[1, 7:15], expected[1, 15:23], expected[1, 23] = -8 * u, -15 * u, -10 * u, -5 * u
    expected[2, 0] = -20 * u
    assert torch.allclose(A, expected, atol=1e-6)
    assert torch.allclose(A, reference_advantages(rewards, index, 3, T), atol=1e-6)


def test_a_solution_cut_short_never_out_scores_the_complete_right_one(tokenizer):
    """Every prefix of the right solution (cut anywhere, then EOS), and the right answer given with no
    working, or repeated: in a group with the complete right solution, none gets a higher advantage at
    any of its tokens' starts, nor a higher sum of step rewards. Without the missing steps, "7+5=12\n"
    alone would be a perfect output."""
    complete = solution = task.solution_text(PROBLEM)  # "7+5=12\n12*3=36\n36-9=27\n#### 27\n"
    others = [solution[:n] for n in range(len(solution) - 1)] + ["#### 27\n", solution + "#### 27\n#### 27\n"]
    for other in others:
        batch = common.build_batch(tokenizer, ["7+5*3-9\n"] * 2, [complete, other], "cpu")
        rewards, index = lesson.step_rewards([PROBLEM], batch, 2)
        assert sum(rewards[0]) / len(rewards[0]) > sum(rewards[1]) / len(rewards[1]), other
        A = lesson.grpo_process_advantages(rewards, index, 2, batch.completion_ids.shape[1])
        assert A[0, 0] > A[1, 0], other
    batch = common.build_batch(tokenizer, ["7+5*3-9\n"] * len(others + [complete]), others + [complete], "cpu")
    A = lesson.grpo_process_advantages(*lesson.step_rewards([PROBLEM], batch, len(others) + 1), len(others) + 1,
                                       batch.completion_ids.shape[1])
    assert A[-1, 0] == A[:, 0].max() and (A[:-1, 0] < A[-1, 0]).all()


def test_normalisation_uses_all_step_rewards_of_the_group():
    # Output 1 has three right steps, output 2 one wrong step. Per output, each is constant (no signal);
    # over the group R = {1, 1, 1, 0}: mean 3/4 (not the 1/2 of the two outputs' means), std sqrt(3)/4.
    rewards, index = [[1.0, 1.0, 1.0], [0.0]], [[1, 3, 5], [2]]
    A = lesson.grpo_process_advantages(rewards, index, 2, 7)
    right, wrong = (1 - 0.75) / (math.sqrt(3) / 4), (0 - 0.75) / (math.sqrt(3) / 4)
    assert torch.allclose(A[0], torch.tensor([3 * right, 3 * right, 2 * right, 2 * right, right, right, 0]), atol=1e-6)
    assert torch.allclose(A[1], torch.tensor([wrong, wrong, wrong, 0, 0, 0, 0]), atol=1e-6)
    # two groups in one batch are normalised independently of each other
    other = [[0.0, 1.0], [1.0]]
    both = lesson.grpo_process_advantages(rewards + other, index + [[0, 4], [6]], 2, 7)
    assert torch.allclose(both[:2], A, atol=1e-6)
    changed = lesson.grpo_process_advantages(rewards + [[0.0, 0.0], [0.0]], index + [[0, 4], [6]], 2, 7)
    assert torch.allclose(changed[:2], A, atol=1e-6)


def test_group_with_all_equal_step_rewards_has_zero_advantages():
    for value in (0.0, 1.0):
        rewards, index = [[value] * 4, [value] * 2, [value]], [[1, 2, 3, 4], [0, 5], [3]]
        assert (lesson.grpo_process_advantages(rewards, index, 3, 8) == 0).all()
    # ... while a group with signal beside it still gets its advantages
    A = lesson.grpo_process_advantages([[1.0], [1.0], [0.0], [1.0]], [[2], [3], [1], [2]], 2, 4)
    assert (A[:2] == 0).all() and (A[2:, 0] != 0).all()


def test_zero_advantage_after_the_last_step_and_matches_loop_reference():
    rng = random.Random(0)
    G, T = 4, 20
    rewards, index = [], []
    for _ in range(5 * G):  # 5 groups of outputs with 1..6 steps each, ends increasing within an output
        K = rng.randint(1, 6)
        ends = sorted(rng.sample(range(T - 2), K))
        rewards.append([float(rng.random() < 0.5) for _ in range(K)])
        index.append(ends)
    A = lesson.grpo_process_advantages(rewards, index, G, T)
    assert torch.allclose(A, reference_advantages(rewards, index, G, T), atol=1e-5)
    for i, ends in enumerate(index):
        assert (A[i, ends[-1] + 1:] == 0).all()  # the EOS and padding after the last step end
    # in a real batch: the EOS of a complete output carries no advantage, that of one cut short its missing steps
    tok = plumbing.build_char_tokenizer()
    texts = ["7+5=12\n12*3=36\n36-9=27\n#### 27\n", "7+5=12\n12*3=36\n36-9=26\n#### 26\n", "7+5=13\n"]
    batch = common.build_batch(tok, ["7+5*3-9\n"] * 3, texts, "cpu")
    R, idx = lesson.step_rewards([PROBLEM], batch, 3)
    A = lesson.grpo_process_advantages(R, idx, 3, batch.completion_ids.shape[1])
    eos = batch.completion_mask.sum(1) - 1
    assert A[0, eos[0]] == 0 and A[1, eos[1]] == 0 and A[2, eos[2]] < 0 and A[0, 0] > 0 > A[2, 0]


def test_outcome_mode_matches_lesson_02():
    """Lesson 02's functions, copied character for character (one body per equation)."""
    lesson02 = load_lesson("02_grpo_outcome")
    for name in ("outcome_rewards", "grpo_outcome_advantages", "kl_k3", "grpo_loss"):
        assert inspect.getsource(getattr(lesson, name)) == inspect.getsource(getattr(lesson02, name))
    torch.manual_seed(0)
    for G in (2, 4, 8):
        rewards = (torch.rand(6 * G) < 0.4).float()
        rewards[:G] = 1.0  # one group with no signal
        assert torch.equal(lesson.grpo_outcome_advantages(rewards, G), lesson02.grpo_outcome_advantages(rewards, G))
    texts = ["7+5=12\n12*3=36\n36-9=27\n#### 27\n", "#### 26\n", "", "#### 27"]
    assert torch.equal(lesson.outcome_rewards([PROBLEM], texts, 4), lesson02.outcome_rewards([PROBLEM], texts, 4))
    # the same GRPO loss as lesson 02
    logp, old, ref = (torch.randn(4, 6) - 1 for _ in range(3))
    adv, mask = torch.randn(4, 6), (torch.rand(4, 6) < 0.8).long()
    ours, ours_stats = lesson.grpo_loss(logp, old, ref, adv, mask, 0.2, 0.04)
    theirs, their_stats = lesson02.grpo_loss(logp, old, ref, adv, mask, 0.2, 0.04)
    assert torch.equal(ours, theirs) and ours_stats == their_stats


def test_a_token_that_ends_two_steps_gets_both_rewards():
    # a BPE token such as "\n\n" ends two lines at once: both normalised step rewards land on it
    # R = {1, 1, 0, 0}: mean 1/2, std 1/2, so r~ = +1, +1, -1 for output 1 and -1 for output 2
    rewards, index = [[1.0, 1.0, 0.0], [0.0]], [[2, 2, 4], [1]]
    A = lesson.grpo_process_advantages(rewards, index, 2, 6)
    assert A.tolist() == [[1.0, 1.0, 1.0, -1.0, -1.0, 0.0], [-1.0, -1.0, 0.0, 0.0, 0.0, 0.0]]
    assert torch.allclose(A, reference_advantages(rewards, index, 2, 6), atol=1e-6)


@pytest.mark.parametrize("extra,message", [
    (["--supervision", "steps"], "--supervision 'steps'"), (["--group_size", "1"], "--group_size 1"),
    (["--warmup_steps", "-1"], "--warmup_steps -1"),
    (["--lr", "-1"], "error: --lr -1.0: must be > 0"),
    (["--lr", "nan"], "error: --lr nan: must be a finite number"),
    (["--k", "-1"], "error: --k -1: must be >= 0"), (["--eval_test", "-5"], "error: --eval_test -5: must be >= 0"),
    (["--grop_size", "4"], "error: unrecognized arguments: --grop_size 4"),
    (["--train_ops", "4-2"], "--train_ops '4-2'"), (["--mu", "0"], "--mu 0"), (["--eval_ood", "-1"], "--eval_ood -1"),
    (["--max_grad_norm", "0"], "--max_grad_norm 0.0"),
    (["--clip_eps", "inf"], "--clip_eps inf: must be a finite number"),
])
def test_bad_arguments_are_one_line_errors(extra, message, capsys, no_model):
    assert message in error_line(lesson.main, extra, capsys)


def test_lesson_runs_end_to_end_on_cpu(cache_dir, tmp_path):
    # both supervisions, so the comparison path runs too: SFT, outcome and process, each evaluated
    result = lesson.main(TINY + ["--supervision", "both", "--k", "0", "--cache_dir", cache_dir,
                                 "--out_dir", str(tmp_path)])
    assert set(result["after"]) == {"outcome", "process"}
    for supervision in ("outcome", "process"):
        lines = [json.loads(l) for l in (Path(tmp_path) / supervision / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in lines[:-1]] == [1, 2] and lines[-1]["final"]
        for r in lines[:-1]:
            # the logged reward is the supervision's own: the outcome share, or the share of right steps
            assert r["reward"] == (r["accuracy"] if supervision == "outcome" else r["step_acc"])
        assert lines[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # each supervision's first step: pi_theta = pi_sft = pi_ref
        assert lines[-1]["after"] == result["after"][supervision] and lines[-1]["before"] == result["before"]
        assert (Path(tmp_path) / supervision / "model" / "config.json").exists()
    assert set(result["before"]) == {"test_greedy", "ood_greedy", "test_step_err", "ood_step_err"}


def run_spying_on_train(cache_dir, tmp_path, monkeypatch, *extra):
    """lesson.main from the shipped pi_sft with 4 questions x G=4 (groups with signal: the policy moves);
    records, for every call of train(), the policy and pi_ref it was given and their weights before and after."""
    calls, real_train = [], lesson.train

    def train(policy, ref_policy, *a, **kw):
        call = {"policy": policy, "ref": ref_policy, "start": checksum(policy), "ref_start": checksum(ref_policy)}
        log = real_train(policy, ref_policy, *a, **kw)
        calls.append({**call, "end": checksum(policy), "ref_end": checksum(ref_policy)})
        return log

    monkeypatch.setattr(lesson, "train", train)
    result = lesson.main(TINY_PI_SFT + ["--batch_size", "4", "--group_size", "4", "--k", "0", "--eval_ood", "0",
                                        "--cache_dir", cache_dir, "--out_dir", str(tmp_path), *extra])
    return result, calls


def test_both_supervisions_start_from_pi_sft(cache_dir, tmp_path, monkeypatch):
    """--supervision both: the process run starts from a fresh pi_sft, not from the outcome run's policy,
    and pi_ref stays pi_sft for both."""
    sft = checksum(plumbing.load_policy("tiny", plumbing.SFT_STEPS, "cpu")[0])
    _, calls = run_spying_on_train(cache_dir, tmp_path, monkeypatch, "--supervision", "both")
    assert len(calls) == 2
    assert calls[0]["end"] != sft  # the outcome run moved its policy (else this test could not tell)
    assert calls[1]["start"] == sft and calls[1]["policy"] is not calls[0]["policy"]
    assert all(c["ref_start"] == c["ref_end"] == sft for c in calls)


def test_pi_old_is_held_across_grpo_iterations(cache_dir, tmp_path, monkeypatch):
    """--mu 3: the three updates on one batch share pi_old's log-probs (those of the first pass, before any
    update), while pi_theta's move: the ratio leaves 1 on the second and third."""
    seen, real_loss = [], lesson.grpo_loss
    monkeypatch.setattr(lesson, "grpo_loss", lambda logp, old_logp, *a: seen.append(
        (logp.detach().clone(), old_logp.clone())) or real_loss(logp, old_logp, *a))
    lesson.main(TINY_PI_SFT + ["--mu", "3", "--steps", "1", "--batch_size", "4", "--group_size", "4", "--k", "0",
                               "--eval_test", "1", "--eval_ood", "0", "--cache_dir", cache_dir, "--out_dir", str(tmp_path)])
    assert len(seen) == 3
    (logp0, old0), (logp1, old1), (logp2, old2) = seen
    assert torch.equal(old0, logp0) and torch.equal(old1, old0) and torch.equal(old2, old0)
    assert not torch.allclose(logp1, old0, atol=1e-6) and not torch.allclose(logp2, logp1, atol=1e-6)


@pytest.mark.parametrize("supervision", ["outcome", "process"])
def test_micro_batches_accumulate_the_whole_batch_gradient(sft_policy, supervision):
    """--micro_batch_size 3 on 8 outputs (chunks of 3, 3, 2, by length) through grpo_step: the
    accumulated gradient equals the whole batch's (--micro_batch_size 0) within float rounding
    (atol 1e-6 on gradients of order 1e-2), and so do the logged loss and KL."""
    policy, tokenizer = sft_policy
    problems = task.make_split("test", 4)
    grads, computed = [], []
    for micro in (0, 3):
        model = copy.deepcopy(policy)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # a step that moves nothing
        args = lesson.Args(group_size=2, max_new_tokens=40, micro_batch_size=micro, beta=0.5)
        common.set_seed(0)
        computed.append(lesson.grpo_step(model, copy.deepcopy(policy).requires_grad_(False),
                                         tokenizer, optimizer, problems, args, supervision))
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.equal(computed[0]["advantages"], computed[1]["advantages"])  # the same batch
    assert grads[0].abs().max() > 1e-3  # the groups have signal: a real gradient is compared
    assert torch.allclose(grads[1], grads[0], atol=1e-6, rtol=1e-4)
    for key in ("loss", "kl", "clip_frac"):
        assert computed[1][key] == pytest.approx(computed[0][key], abs=1e-6)


def test_runs_that_differ_in_one_option_keep_two_logs():
    folders = {plumbing.run_dir("03_grpo_process", plumbing.parse_args(lesson.Args, argv))
               for argv in ([], ["--supervision", "both"], ["--train_ops", "5-6"], ["--seed", "1"])}
    assert len(folders) == 4 and "runs/03_grpo_process/seed0" in folders
