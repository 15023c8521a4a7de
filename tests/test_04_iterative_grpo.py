"""Lesson 04: iterative GRPO, a learned reward model r_phi re-trained with replay, pi_ref reset each iteration."""
import copy
import inspect
import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

import common
import task

import plumbing
from conftest import TINY, TINY_PI_SFT, checksum, error_line, load_lesson

lesson = load_lesson("04_iterative_grpo")

PROBLEM = {"question": "7+5*3-9", "start": 7, "ops": [("+", 5), ("*", 3), ("-", 9)], "answer": 27}
RIGHT = "7+5=12\n12*3=36\n36-9=27\n#### 27\n"
WRONG = "7+5=12\n12*3=35\n35-9=26\n#### 26\n"

# Lesson 04's own knobs, small enough for seconds on a CPU
TINY_04 = ["--iterations", "2", "--rm_init_questions", "2", "--rm_init_steps", "3", "--rm_steps", "3",
           "--rm_batch_size", "8", "--rm_eval_questions", "2"]


class ScriptedRM(torch.nn.Module):
    """A stand-in r_phi: the logit of row i is row_logits[i] (or `constant` for every row)."""

    def __init__(self, constant=None, row_logits=None):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.tensor(0.0 if constant is None else float(constant)))
        self.row_logits = row_logits

    def forward(self, input_ids, **kw):
        N, L = input_ids.shape
        if self.row_logits is not None:
            logits = self.row_logits[:, None].expand(N, L) + 0 * self.bias
        else:
            logits = self.bias.expand(N, L)  # the same score for every output, trainable
        return SimpleNamespace(logits=logits[..., None])  # [N, L, 1] like AutoModelForTokenClassification

    def save_pretrained(self, path):
        pass


@pytest.fixture(scope="module")
def sft(cache_dir):
    return plumbing.load_policy("tiny", sft_steps=20, device="cpu", cache_dir=cache_dir)


def tagged(source: str, n: int) -> list:
    return [{"prompt": [1], "completion": [2], "label": 0.0, "source": source} for _ in range(n)]


def test_replay_batch_has_exactly_the_requested_share_of_history():
    new, history, rng = tagged("new", 50), tagged("old", 30), random.Random(0)
    # (5, 0.5) and (25, 0.1): a share of 2.5 rounds to 2 as Python's round() does (half to even),
    # not to 3 as int(x + 0.5) or math.ceil would
    for batch_size, fraction in [(64, 0.1), (10, 0.1), (7, 0.1), (32, 0.25), (5, 0.0), (20, 0.5),
                                 (5, 0.5), (25, 0.1)]:
        for _ in range(5):
            batch = lesson.replay_batch(new, history, batch_size, fraction, rng)
            assert len(batch) == batch_size
            assert sum(e["source"] == "old" for e in batch) == round(fraction * batch_size)
    # r_phi's first training (no history yet): all new
    assert all(e["source"] == "new" for e in lesson.replay_batch(new, [], 64, 0.1, rng))


def test_reward_model_loss_falls_on_a_small_fixed_set_with_replay(sft, monkeypatch):
    policy, tokenizer = sft
    torch.manual_seed(0)
    reward_model = lesson.load_reward_model(policy, "cpu")
    assert sum(p.numel() for p in reward_model.parameters()) >= 0.9 * sum(p.numel() for p in policy.parameters())
    problems = task.make_split("test", 8)
    right = [task.solution_text(p) for p in problems]
    wrong = [t.replace("####", "#### 1") for t in right]  # a wrong final answer
    batch = common.build_batch(tokenizer, [task.prompt_text(p) for p in problems] * 2, right + wrong, "cpu")
    labels = [task.verify(problems[i % 8], t)["correct"] for i, t in enumerate(batch.texts)]
    assert labels == [True] * 8 + [False] * 8
    data = lesson.examples_from_batch(batch, labels)
    new, history = data[:12], data[12:]

    def fixed_set_loss():
        batch, labels = lesson.collate(data, tokenizer.pad_token_id, "cpu")
        with torch.no_grad():
            reward_model.eval()
            logits = lesson.rm_logits(reward_model, batch)
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels).item()

    seen = []  # every batch train_reward_model draws, to count its historical share
    real_replay_batch = lesson.replay_batch
    monkeypatch.setattr(lesson, "replay_batch", lambda *a: seen.append(real_replay_batch(*a)) or seen[-1])
    start = fixed_set_loss()
    optimizer = torch.optim.Adam(reward_model.parameters(), lr=1e-3)
    losses = lesson.train_reward_model(reward_model, optimizer, new, history, 40, 20, 0.1, random.Random(0),
                                       tokenizer.pad_token_id, 1.0)
    assert len(losses) == 40 and fixed_set_loss() < 0.5 * start
    assert not reward_model.training  # scoring happens in eval mode
    assert all(sum(e in history for e in b) == 2 for b in seen)  # round(0.1 * 20) of every batch


def test_rm_score_is_read_at_the_last_completion_token(sft):
    policy, tokenizer = sft
    reward_model = lesson.load_reward_model(policy, "cpu")
    batch = common.build_batch(tokenizer, ["7+5*3-9\n", "1+1\n"], [RIGHT, "1+1=2\n"], "cpu")
    scores = lesson.rm_logits(reward_model, batch)
    with torch.no_grad():  # the second row alone, without padding, read at its EOS
        ids = torch.cat([batch.prompt_ids[1:, batch.prompt_mask[1].bool()],
                         batch.completion_ids[1:, :int(batch.completion_mask[1].sum())]], 1)
        assert ids[0, -1] == tokenizer.eos_token_id
        alone = reward_model(input_ids=ids).logits[0, -1, 0]
    assert torch.allclose(scores[1], alone, atol=1e-5)
    assert torch.allclose(lesson.rm_rewards(reward_model, batch), torch.sigmoid(scores), atol=1e-6)


def test_advantages_come_from_r_phi_not_the_verifier(sft):
    _, tokenizer = sft
    batch = common.build_batch(tokenizer, ["7+5*3-9\n"] * 2, [RIGHT, WRONG], "cpu")  # one group, G = 2
    assert [task.verify(PROBLEM, t)["correct"] for t in batch.texts] == [True, False]
    # an r_phi that scores everything the same: no advantage, though the verifier tells the two apart
    rewards = lesson.rm_rewards(ScriptedRM(constant=1.3), batch)
    assert torch.equal(lesson.grpo_outcome_advantages(rewards, 2), torch.zeros(2))
    # an r_phi that prefers the wrong output: the wrong output gets the positive advantage
    rewards = lesson.rm_rewards(ScriptedRM(row_logits=torch.tensor([-2.0, 2.0])), batch)
    assert torch.allclose(rewards, torch.sigmoid(torch.tensor([-2.0, 2.0])))
    assert torch.allclose(lesson.grpo_outcome_advantages(rewards, 2), torch.tensor([-1.0, 1.0]))


def test_main_with_a_constant_reward_model_never_moves_the_policy(cache_dir, tmp_path, monkeypatch):
    """Through main(), from the shipped pi_sft (right about half the time, so the verifier's rewards would
    differ within most groups of 4): rewards from a constant r_phi give zero advantage, so the policy stays
    pi_sft. The policy's update sees r_phi, never the verifier."""
    monkeypatch.setattr(lesson, "load_reward_model", lambda policy, device: ScriptedRM(constant=0.0))
    out = lesson.main(TINY_PI_SFT + TINY_04 + ["--batch_size", "4", "--group_size", "4", "--out_dir", str(tmp_path),
                                               "--cache_dir", cache_dir])
    steps = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "step" in r]
    assert len(steps) == 4
    seen = [(r["adv_abs"], r["zero_adv_groups"]) for r in steps]
    assert all(adv == 0 and zero == 1 for adv, zero in seen), (
        f"a constant r_phi gives every group equal rewards, so (adv_abs, zero_adv_groups) should be "
        f"(0, 1) on every step; got {seen}: the update's rewards do not come from r_phi")
    assert any(0 < r["accuracy"] < 1 for r in steps)  # the verifier would have given this run a signal
    trained = AutoModelForCausalLM.from_pretrained(Path(out["out_dir"]) / "model").state_dict()
    for name, weights in plumbing.load_policy("tiny", plumbing.SFT_STEPS, "cpu")[0].state_dict().items():
        assert torch.equal(weights, trained[name]), name


def test_reset_reference_copies_and_freezes(sft):
    policy, _ = sft
    policy = lesson.reset_reference(policy).train().requires_grad_(True)  # a private, trainable copy
    ref = lesson.reset_reference(policy)
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    assert all(torch.equal(a, b) for a, b in zip(policy.parameters(), ref.parameters()))
    snapshot = [p.clone() for p in ref.parameters()]
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.1)
    policy(input_ids=torch.tensor([[1, 5, 6, 7]])).logits.sum().backward()
    optimizer.step()
    assert not all(torch.equal(a, b) for a, b in zip(policy.parameters(), ref.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(snapshot, ref.parameters()))


def run_tiny(cache_dir, out_dir, *extra):
    out = lesson.main(TINY + TINY_04 + ["--out_dir", str(out_dir), "--cache_dir", cache_dir, *extra])
    records = [json.loads(l) for l in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return out, records


def test_lesson_runs_end_to_end_on_cpu(cache_dir, tmp_path, sft):
    out, records = run_tiny(cache_dir, tmp_path / "iterative")
    assert out["mode"] == "iterative"
    assert set(out["before"]) == set(out["after"]) == {"test_greedy", "test_maj@2", "test_pass@2", "ood_greedy"}
    assert [r["iteration"] for r in out["iterations"]] == [0, 1, 2]
    assert [r["policy_updates"] for r in out["iterations"]] == [0, 2, 4]
    # the greedy test accuracy logged per iteration is the before / after table's at the two ends
    assert out["iterations"][0]["test_greedy"] == out["before"]["test_greedy"]
    assert out["iterations"][-1]["test_greedy"] == out["after"]["test_greedy"]
    # line 11: r_phi trains on this iteration's 2 steps x 2 questions x G=2 outputs; history grows
    assert [r["rm_train_size"] for r in out["iterations"][1:]] == [8, 8]
    assert [r["history_size"] for r in out["iterations"][1:]] == [4 + 8, 4 + 16]
    # line 3: pi_ref <- pi_theta at the start of every iteration, so the first step of each sees KL = 0
    steps = [r for r in records if "step" in r]
    assert [(r["iteration"], r["step"]) for r in steps] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    firsts = [r["kl"] for r in steps if r["step"] == 1]
    assert all(abs(kl) < 1e-6 for kl in firsts)
    assert records[-1]["final"] and (tmp_path / "iterative" / "reward_model").exists()
    # what decides: r_phi's over-estimate, false positives, within-group AUC, favourite answers
    for r in out["iterations"]:
        assert r["rm_gap"] == pytest.approx(r["rm_reward"] - r["true_acc"])
        assert r["rm_auc"] is None or 0 <= r["rm_auc"] <= 1
        assert 0 <= r["rm_false_pos"] <= 1
        assert sum(n for _, n in r["favourite_answers"]) <= 2 * 2  # 2 probe questions x G = 2
    for r in steps:
        assert r["rm_gap"] == pytest.approx(r["rm_reward"] - r["accuracy"])


@pytest.mark.parametrize("frozen_ref", [False, True])
def test_frozen_rm_keeps_r_phi_and_only_that(cache_dir, tmp_path, sft, frozen_ref):
    """--frozen_rm skips line 12 and nothing else: pi_ref still resets each iteration unless
    --frozen_ref is given too."""
    extra = ["--frozen_rm"] + (["--frozen_ref"] if frozen_ref else [])
    out, records = run_tiny(cache_dir, tmp_path / "frozen", *extra)
    assert out["mode"] == ("r_phi and pi_ref frozen" if frozen_ref else "r_phi frozen")
    for r in out["iterations"][1:]:
        assert r["rm_acc_before"] == r["rm_acc_after"] and r["rm_loss_first"] is None
        assert r["history_size"] == 4  # only r_phi's first training set, on SFT samples
    steps = [r for r in records if "step" in r]
    assert abs(steps[0]["kl"]) < 1e-6  # pi_ref = pi_sft = pi_theta at the very start


def test_frozen_ref_keeps_pi_ref_and_still_retrains_r_phi(cache_dir, tmp_path, sft):
    out, records = run_tiny(cache_dir, tmp_path / "frozen_ref", "--frozen_ref")
    assert out["mode"] == "pi_ref frozen"
    assert [r["history_size"] for r in out["iterations"][1:]] == [4 + 8, 4 + 16]  # line 12 runs
    assert all(r["rm_loss_first"] is not None for r in out["iterations"][1:])


@pytest.mark.parametrize("bad,match", [
    (["--replay_fraction", "1.0"], "replay_fraction"), (["--group_size", "1"], "group_size"),
    (["--iterations", "0"], "iterations"), (["--rm_steps", "-1"], "rm_steps"),
    (["--lr", "-1"], "error: --lr -1.0: must be > 0"),
    (["--lr", "nan"], "error: --lr nan: must be a finite number"),
    (["--rm_lr", "0"], "error: --rm_lr 0.0: must be > 0"),
    (["--replay_fraction", "nan"], "error: --replay_fraction nan: must be a finite number"),
    (["--k", "-1"], "error: --k -1: must be >= 0"), (["--eval_test", "-5"], "error: --eval_test -5: must be >= 1"),
    (["--eval_test", "0"], "--eval_test 0: must be >= 1"),  # greedy test accuracy is logged every iteration
    (["--grop_size", "4"], "error: unrecognized arguments: --grop_size 4"),
    (["--rm_init_steps", "-1"], "--rm_init_steps -1"), (["--rm_batch_size", "0"], "--rm_batch_size 0"),
    (["--max_grad_norm", "0"], "--max_grad_norm 0.0"), (["--seed", "-1"], "--seed -1"),
])
def test_bad_arguments_are_one_line_errors(bad, match, capsys, no_model):
    assert match in error_line(lesson.main, bad, capsys)


def test_grpo_copies_match_lesson_02():
    """The outcome advantages, k3 and the GRPO loss are lesson 02's, copied on purpose: pinned to it."""
    lesson02 = load_lesson("02_grpo_outcome")
    for name in ("outcome_rewards", "grpo_outcome_advantages", "kl_k3", "grpo_loss"):
        assert inspect.getsource(getattr(lesson, name)) == inspect.getsource(getattr(lesson02, name))
    torch.manual_seed(0)
    for G in (2, 3, 4, 8):
        for rewards in ((torch.rand(6 * G) < 0.4).float(), torch.rand(6 * G)):  # 0/1, and r_phi's probabilities
            rewards[:G] = rewards[0]  # one group whose rewards are all equal
            for scale in (True, False):  # --scale_rewards group / none
                assert torch.equal(lesson.grpo_outcome_advantages(rewards, G, scale),
                                   lesson02.grpo_outcome_advantages(rewards, G, scale))
    for clip_eps, beta in ((0.2, 0.04), (0.1, 0.0), (0.3, 1.0)):
        logp, old, ref = (torch.randn(5, 7) - 1 for _ in range(3))
        adv, mask = torch.randn(5, 7), (torch.rand(5, 7) < 0.8).long()
        assert torch.equal(lesson.kl_k3(logp, ref), lesson02.kl_k3(logp, ref))
        ours_logp, their_logp = logp.clone().requires_grad_(), logp.clone().requires_grad_()
        ours, ours_stats = lesson.grpo_loss(ours_logp, old, ref, adv, mask, clip_eps, beta)
        theirs, their_stats = lesson02.grpo_loss(their_logp, old, ref, adv, mask, clip_eps, beta)
        assert torch.equal(ours, theirs) and ours_stats == their_stats
        ours.backward()
        theirs.backward()
        assert torch.equal(ours_logp.grad, their_logp.grad)


def test_examples_from_batch_keep_the_unpadded_tokens_and_collate_rebuilds_the_batch():
    tokenizer = plumbing.build_char_tokenizer()
    prompts, texts = ["7+5*3-9\n", "1+1\n", "2*3+4\n"], [RIGHT, "", "2*3=6\n"]
    batch = common.build_batch(tokenizer, prompts, texts, "cpu")
    examples = lesson.examples_from_batch(batch, [True, False, False])
    for e, prompt, text in zip(examples, prompts, texts):
        assert e["prompt"] == tokenizer(prompt)["input_ids"]
        assert e["completion"] == tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert [e["label"] for e in examples] == [1.0, 0.0, 0.0]
    rebuilt, labels = lesson.collate(examples, tokenizer.pad_token_id, "cpu")
    assert labels.tolist() == [1.0, 0.0, 0.0]
    assert torch.equal(rebuilt.prompt_ids, batch.prompt_ids) and torch.equal(rebuilt.prompt_mask, batch.prompt_mask)
    assert torch.equal(rebuilt.completion_ids, batch.completion_ids)
    assert torch.equal(rebuilt.completion_mask, batch.completion_mask)


def spy_on(monkeypatch, name, record):
    real = getattr(lesson, name)
    monkeypatch.setattr(lesson, name, lambda *a: (record(*a), real(*a))[1])


@pytest.mark.parametrize("frozen", [False, True])
def test_reference_is_reset_to_the_current_policy_each_iteration(cache_dir, tmp_path, monkeypatch, frozen):
    """Line 3: iterative, pi_ref <- pi_theta at the start of each iteration (the second time from a policy
    that has moved); --frozen_ref: once, from pi_sft. pi_ref is a frozen copy: it does not follow the policy."""
    refs = []
    real_reset = lesson.reset_reference
    monkeypatch.setattr(lesson, "reset_reference", lambda policy: refs.append(
        (checksum(policy), real_reset(policy))) or refs[-1][1])
    run_tiny(cache_dir, tmp_path, *(["--frozen_ref"] if frozen else []))
    sft = checksum(plumbing.load_policy("tiny", sft_steps=20, device="cpu", cache_dir=cache_dir)[0])
    assert [c for c, _ in refs] == ([sft] if frozen else [sft, refs[1][0]])
    if not frozen:
        assert refs[1][0] != sft  # iteration 1 moved the policy: the second reference is a new one
    assert [checksum(ref) for _, ref in refs] == [c for c, _ in refs]  # still the weights it was copied from


def test_main_retrains_r_phi_on_new_data_replaying_the_earlier_history(cache_dir, tmp_path, monkeypatch):
    """Line 11 through main(): each re-training gets this iteration's samples as new data and everything
    before them (SFT samples, earlier iterations) as history, with --replay_fraction; every batch it draws
    has round(fraction * batch) historical examples."""
    calls, batches = [], []
    spy_on(monkeypatch, "train_reward_model", lambda rm, opt, new, history, steps, batch_size, fraction, *a:
           calls.append({"new": list(new), "history": list(history), "steps": steps, "fraction": fraction}))
    spy_on(monkeypatch, "replay_batch", lambda new, history, batch_size, fraction, rng:
           batches.append((list(history), batch_size, fraction)))
    run_tiny(cache_dir, tmp_path, "--replay_fraction", "0.25", "--iterations", "3")
    assert [len(c["new"]) for c in calls] == [4, 8, 8, 8]  # SFT samples of 2 questions x G=2; then 2 steps x 2 x 2
    assert [c["steps"] for c in calls] == [3, 3, 3, 3] and [c["fraction"] for c in calls] == [0.25] * 4
    same = lambda a, b: len(a) == len(b) and all(x is y for x, y in zip(a, b))
    assert calls[0]["history"] == []  # r_phi's first training: nothing to replay
    for i in range(1, 4):  # the earlier data, not this iteration's
        assert same(calls[i]["history"], [e for c in calls[:i] for e in c["new"]]), i
        assert not any(e is h for e in calls[i]["new"] for h in calls[i]["history"])
    later = [b for b in batches if b[0]]
    assert len(later) == 9 and all(size == 8 and fraction == 0.25 for _, size, fraction in later)


def test_pi_old_is_held_across_grpo_iterations(monkeypatch):
    """--mu 3 in lesson 04's grpo_step (rewards from a scripted r_phi that tells the outputs apart): the three
    updates on one sampled batch share pi_old's log-probs, those of the first pass before any update."""
    policy, tokenizer = plumbing.load_policy("tiny", plumbing.SFT_STEPS, "cpu")  # the shipped pi_sft
    seen, real_loss = [], lesson.grpo_loss
    monkeypatch.setattr(lesson, "grpo_loss", lambda logp, old_logp, *a: seen.append(
        (logp.detach().clone(), old_logp.clone())) or real_loss(logp, old_logp, *a))
    args = plumbing.parse_args(lesson.Args, ["--group_size", "4", "--mu", "3", "--max_new_tokens", "40"])
    common.set_seed(0)
    rm = ScriptedRM(row_logits=torch.linspace(-2, 2, 16))  # 4 questions x G=4
    lesson.grpo_step(policy, lesson.reset_reference(policy), rm, tokenizer, torch.optim.Adam(policy.parameters(), lr=1e-3),
                     task.make_split("test", 4), args)
    assert len(seen) == 3
    (logp0, old0), (logp1, old1), (logp2, old2) = seen
    assert torch.equal(old0, logp0) and torch.equal(old1, old0) and torch.equal(old2, old0)
    assert not torch.allclose(logp1, old0, atol=1e-6) and not torch.allclose(logp2, logp1, atol=1e-6)


def test_micro_batches_accumulate_the_whole_batch_gradient_of_grpo(sft_policy):
    """--micro_batch_size 3 on 8 outputs through grpo_step (r_phi's scoring, pi_ref's and pi_theta's
    passes in chunks of 3, 3, 2): the accumulated gradient equals the whole batch's (0) within
    float rounding (atol 1e-6 on gradients of order 1e-2), and so do r_phi's rewards and the loss."""
    policy, tokenizer = sft_policy
    torch.manual_seed(0)
    reward_model = lesson.load_reward_model(policy, "cpu")  # a fresh head: rewards differ per output
    problems = task.make_split("test", 4)
    grads, stats = [], []
    for micro in (0, 3):
        model = copy.deepcopy(policy)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # a step that moves nothing
        args = lesson.Args(group_size=2, max_new_tokens=40, micro_batch_size=micro, beta=0.5)
        common.set_seed(0)
        stats.append(lesson.grpo_step(model, lesson.reset_reference(policy), reward_model,
                                      tokenizer, optimizer, problems, args)[0])
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[0].abs().max() > 1e-3  # the groups have signal: a real gradient is compared
    assert torch.allclose(grads[1], grads[0], atol=1e-6, rtol=1e-4)
    for key in ("rm_reward", "adv_abs", "loss", "kl", "clip_frac"):
        assert stats[1][key] == pytest.approx(stats[0][key], abs=1e-6)


def test_micro_batches_accumulate_the_whole_batch_gradient_of_r_phi(sft_policy):
    """One r_phi training step on 8 examples, --micro_batch_size 3 against 0: the same batch (the
    same rng), the same loss (a mean over the whole batch) and gradient (atol 1e-6). The head's
    dropout (0.1 in transformers' token classification) is switched off here: with it, each
    micro-batch draws its own mask, and the two gradients are equal only in expectation."""
    policy, tokenizer = sft_policy
    problems = task.make_split("test", 4)
    right = [task.solution_text(p) for p in problems]
    wrong = [t.replace("####", "#### 1") for t in right]
    batch = common.build_batch(tokenizer, [task.prompt_text(p) for p in problems] * 2,
                               right + wrong, "cpu")
    data = lesson.examples_from_batch(batch, [True] * 4 + [False] * 4)
    torch.manual_seed(0)
    start = lesson.load_reward_model(policy, "cpu")
    for module in start.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    grads, losses = [], []
    for micro in (0, 3):
        reward_model = copy.deepcopy(start)
        optimizer = torch.optim.SGD(reward_model.parameters(), lr=0.0)
        losses += lesson.train_reward_model(reward_model, optimizer, data[:6], data[6:], 1, 8, 0.25,
                                            random.Random(0), tokenizer.pad_token_id, 1e9, micro)
        grads.append(torch.cat([p.grad.flatten() for p in reward_model.parameters()]))
    assert grads[0].abs().max() > 1e-3
    assert torch.allclose(grads[1], grads[0], atol=1e-6, rtol=1e-4)
    assert losses[1] == pytest.approx(losses[0], abs=1e-6)


def test_runs_that_differ_in_one_option_keep_two_logs():
    folders = [plumbing.run_dir("04_iterative_grpo", plumbing.parse_args(lesson.Args, argv))
               for argv in ([], ["--frozen_rm"], ["--frozen_ref"], ["--scale_rewards", "group"],
                            ["--scale_rewards", "group", "--frozen_rm", "--frozen_ref"])]
    assert len(set(folders)) == 5 and folders[0] == "runs/04_iterative_grpo/seed0"


def test_within_group_auc_on_a_hand_worked_case():
    """Pairs (right i, wrong j) inside a group: 1 when r_phi scores i above j, 1/2 on a tie.
    Group 1: right 0.9, 0.4, 0.1 against wrong 0.4: 1 + 1/2 + 0 = 1.5 of 3 pairs. Group 2: all
    right, group 4: all wrong: no pairs, left out. Group 3: right 0.3, 0.5 against wrong 0.2, 0.5:
    1 + 0 + 1 + 1/2 = 2.5 of 4. Pooled: 4 of 7 (not the mean of the groups' AUCs, 0.5625)."""
    scores = torch.tensor([0.9, 0.4, 0.4, 0.1, 0.2, 0.3, 0.5, 0.6,
                           0.3, 0.2, 0.5, 0.5, 0.9, 0.8, 0.7, 0.6])
    labels = torch.tensor([1., 0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 0, 0, 0, 0])
    assert lesson.within_group_auc(scores, labels, 4) == pytest.approx(4 / 7)
    # one class in every group: no pair, no AUC
    assert lesson.within_group_auc(scores[4:8], labels[4:8], 4) is None
    # groups of 2, the same outputs: a different grouping gives a different pairing
    assert lesson.within_group_auc(scores[:4], labels[:4], 2) == pytest.approx(1.0)


def test_within_group_auc_matches_a_brute_force_count():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (48,), generator=g).float() / 4  # ties on purpose
    labels = torch.randint(0, 2, (48,), generator=g).float()
    wins = pairs = 0
    for start in range(0, 48, 6):
        for i in range(start, start + 6):
            for j in range(start, start + 6):
                if labels[i] == 1 and labels[j] == 0:
                    pairs += 1
                    wins += 1.0 if scores[i] > scores[j] else 0.5 if scores[i] == scores[j] else 0
    assert lesson.within_group_auc(scores, labels, 6) == pytest.approx(wins / pairs)


def test_balance_classes_repeats_the_rarer_label_until_both_are_equal():
    right = [{"label": 1.0, "id": i} for i in range(8)]
    wrong = [{"label": 0.0, "id": 100 + i} for i in range(2)]
    balanced = lesson.balance_classes(right + wrong, random.Random(0))
    assert sum(e["label"] == 1 for e in balanced) == sum(e["label"] == 0 for e in balanced) == 8
    assert {e["id"] for e in balanced} == {e["id"] for e in right + wrong}  # nothing dropped
    assert lesson.balance_classes(right, random.Random(0)) == right  # one label: as it was
