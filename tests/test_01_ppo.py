"""Lesson 01, PPO: GAE, the KL-penalised reward, the clipped losses, the value model, gradient
accumulation, and main() end to end."""
import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch

import common
import task

import plumbing
from conftest import TINY_PI_SFT, error_line, load_lesson

ppo = load_lesson("01_ppo")


def padded_batch(lengths, T, seed=0):
    """Random rewards and values for rows of the given lengths; garbage (large numbers) in the
    padding."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lengths])  # [N, T]
    rewards = torch.randn(len(lengths), T, generator=g)
    values = torch.randn(len(lengths), T, generator=g)
    garbage = 100 * torch.randn(len(lengths), T, generator=g)
    keep = mask.bool()
    return torch.where(keep, rewards, garbage), torch.where(keep, values, -garbage), mask


def gae_double_loop(rewards, values, length, gamma, lam):
    """A_t = sum_l (gamma*lambda)^l delta_{t+l} for one row, read only up to its last real token."""
    r, v = rewards[:length].tolist(), values[:length].tolist()
    v_next = v[1:] + [0.0]  # the state after the last token is terminal
    delta = [r[t] + gamma * v_next[t] - v[t] for t in range(length)]
    return [sum((gamma * lam) ** l * delta[t + l] for l in range(length - t))
            for t in range(length)]


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (1.0, 1.0), (0.9, 0.8), (1.0, 0.0), (0.0, 0.5)])
def test_gae_matches_double_loop_with_padding(gamma, lam):
    lengths, T = [9, 1, 4, 7, 6], 9
    rewards, values, mask = padded_batch(lengths, T)
    advantages, returns = ppo.gae(rewards, values, mask, gamma, lam)
    for i, n in enumerate(lengths):
        expected = torch.tensor(gae_double_loop(rewards[i], values[i], n, gamma, lam))
        assert torch.allclose(advantages[i, :n], expected, atol=1e-5)
        assert torch.allclose(returns[i, :n], expected + values[i, :n], atol=1e-5)
        assert (advantages[i, n:] == 0).all() and (returns[i, n:] == 0).all()
    # other garbage in the padding changes nothing: no value leaks across the EOS or out of it
    other_rewards, other_values, _ = padded_batch(lengths, T, seed=1)
    keep = mask.bool()
    again, _ = ppo.gae(torch.where(keep, rewards, other_rewards * 7),
                       torch.where(keep, values, other_values), mask, gamma, lam)
    assert torch.allclose(again, advantages)


def test_gae_hand_worked():
    # three tokens, reward 1 at the end, values 0.5 everywhere; gamma = lambda = 1:
    # A_t = return - V(s_t)
    rewards, values = torch.tensor([[0.0, 0.0, 1.0]]), torch.full((1, 3), 0.5)
    mask = torch.ones(1, 3)
    advantages, returns = ppo.gae(rewards, values, mask, 1.0, 1.0)
    assert torch.allclose(returns, torch.ones(1, 3))
    assert torch.allclose(advantages, torch.full((1, 3), 0.5))
    # lambda = 0: A_t = delta_t = r_t + V(s_{t+1}) - V(s_t) = [0, 0, 0.5]
    # (the last next-state is terminal)
    advantages, _ = ppo.gae(rewards, values, mask, 1.0, 0.0)
    assert torch.allclose(advantages, torch.tensor([[0.0, 0.0, 0.5]]))


def test_kl_penalised_reward_puts_r_phi_on_the_last_real_token_only():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])  # lengths 3, 5, 1
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.5, 0.9, 0.9], [0.5] * 5,
                                   [0.125, 0.9, 0.9, 0.9, 0.9]]))
    ref_logp = torch.log(torch.tensor([[0.25, 0.25, 1.0, 0.1, 0.1], [0.5] * 5,
                                       [0.5, 0.1, 0.1, 0.1, 0.1]]))
    logp.requires_grad_(True)
    scores, beta, ln2 = torch.tensor([1.0, 0.0, 1.0]), 0.1, torch.log(torch.tensor(2.0)).item()
    rewards, log_ratio = ppo.kl_penalised_rewards(scores, logp, ref_logp, mask, beta)
    expected = torch.tensor([[-beta * ln2, 0.0, beta * ln2 + 1.0, 0.0, 0.0],  # r_phi on token 3
                             [0.0] * 5,  # r_phi = 0 and pi_theta = pi_ref: nothing anywhere
                             [beta * 2 * ln2 + 1.0, 0.0, 0.0, 0.0, 0.0]])  # one token: both on it
    assert torch.allclose(rewards, expected, atol=1e-6)
    assert torch.allclose(log_ratio[0, :3], torch.tensor([ln2, 0.0, -ln2]), atol=1e-6)
    assert not rewards.requires_grad  # taken at sampling time: a number, not differentiated


def test_clipped_surrogate_worked_example():
    # output 1: two tokens, ratios 1.5 and 0.5, advantages +1 and -1
    #   -> min(1.5, 1.2) = 1.2, min(-0.5, -0.8) = -0.8
    # output 2: one token (then padding), ratio 0.9, advantage 2 -> min(1.8, 1.8) = 1.8
    # J = mean(1/2 * (1.2 - 0.8), 1/1 * 1.8) = mean(0.2, 1.8) = 1.0
    old_logp = torch.zeros(2, 2)
    logp = torch.log(torch.tensor([[1.5, 0.5], [0.9, 5.0]])).requires_grad_(True)
    advantages = torch.tensor([[1.0, -1.0], [2.0, 100.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, stats = ppo.ppo_clipped_surrogate(logp, old_logp, advantages, mask, clip_eps=0.2)
    assert torch.allclose(loss, torch.tensor(-1.0))
    assert stats["clip_frac"] == pytest.approx(2 / 3)  # ratios 1.5 and 0.5 are outside [0.8, 1.2]
    loss.backward()
    # clipped tokens get no gradient; the unclipped one:
    # d(-J)/d logp = -(1/2 outputs)(1/|o|=1) * A * ratio
    assert torch.allclose(logp.grad, torch.tensor([[0.0, 0.0], [-0.5 * 2.0 * 0.9, 0.0]]), atol=1e-6)
    # pi_theta = pi_old: the approximate KL between them is 0
    _, stats = ppo.ppo_clipped_surrogate(old_logp, old_logp, advantages, mask, clip_eps=0.2)
    assert stats["approx_kl"] == 0 and stats["clip_frac"] == 0


def test_clipped_value_loss_worked_example():
    # token 1: V moved 0 -> 1 toward return 1; unclipped error 0, clipped V = 0.2 gives 0.64;
    #   max = 0.64
    # token 2: V moved 0.5 -> 0.6 (inside the clip) with return 0: both errors 0.36
    # token 3: padding. Loss = 1/2 * mean(0.64, 0.36) = 0.25
    values = torch.tensor([[1.0, 0.6, 9.0]], requires_grad=True)
    old_values = torch.tensor([[0.0, 0.5, 0.0]])
    returns = torch.tensor([[1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, stats = ppo.clipped_value_loss(values, old_values, returns, mask, value_clip=0.2)
    assert torch.allclose(loss, torch.tensor(0.25))
    assert stats["value_clip_frac"] == pytest.approx(0.5)
    loss.backward()
    # token 1: the clipped term wins and does not depend on V: no gradient;
    # token 2: (V - R) / 2 tokens = 0.3
    assert torch.allclose(values.grad, torch.tensor([[0.0, 0.3, 0.0]]))


def test_explained_variance_known_cases():
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0, 50.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    assert ppo.explained_variance(returns, returns, mask) == pytest.approx(1.0)
    mean_only = torch.full_like(returns, 2.5)
    assert ppo.explained_variance(mean_only, returns, mask) == pytest.approx(0.0)
    # error [0, 0, 0, -1]: Var = 0.1875; Var(returns) = 1.25; EV = 1 - 0.15 = 0.85
    values = torch.tensor([[1.0, 2.0, 3.0, 5.0, -7.0]])
    assert ppo.explained_variance(values, returns, mask) == pytest.approx(0.85)
    assert ppo.explained_variance(-returns, returns, mask) < 0  # worse than predicting the mean


def test_whiten_over_valid_tokens():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, 5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    w = ppo.whiten(x, mask)
    valid = w[mask.bool()]
    assert valid.mean().abs() < 1e-6 and valid.std(unbiased=False).sub(1).abs() < 1e-4
    assert w[0, 2] == 0


def test_value_model_reads_the_state_before_each_token(tmp_path):
    """V(s_t) depends on q and o_<t only: changing o_t leaves V(s_t) alone and changes
    V(s_{t+1})."""
    tokenizer = plumbing.build_char_tokenizer()
    plumbing.build_tiny_model(tokenizer, seed=0).save_pretrained(tmp_path)
    value_model = ppo.load_value_model(str(tmp_path), "cpu").eval()
    policy_size = sum(p.numel() for p in plumbing.build_tiny_model(tokenizer, seed=0).parameters())
    assert sum(p.numel() for p in value_model.parameters()) >= 0.99 * policy_size  # as large
    torch.nn.init.normal_(value_model.score.weight)  # the head starts at 0; give it something
    batch = common.build_batch(tokenizer, ["7+5\n", "1+1\n"], ["7+5=12\n", "1+1=3\n"], "cpu")
    with torch.no_grad():
        v = ppo.token_values(value_model, batch)  # [2, T]
    assert v.shape == batch.completion_ids.shape
    # o_5 '2' -> '3'
    other = common.build_batch(tokenizer, ["7+5\n", "1+1\n"], ["7+5=13\n", "1+1=3\n"], "cpu")
    with torch.no_grad():
        w = ppo.token_values(value_model, other)
    assert torch.allclose(v[0, :6], w[0, :6], atol=1e-6)  # V(s_0..s_5): have not seen o_5
    assert not torch.allclose(v[0, 6], w[0, 6])  # V(s_6) has
    assert (v[batch.completion_mask == 0] == 0).all()
    # with the head at zero, as loaded, V_psi is 0 everywhere
    fresh = ppo.load_value_model(str(tmp_path), "cpu").eval()
    with torch.no_grad():
        assert (ppo.token_values(fresh, batch) == 0).all()


@pytest.mark.parametrize("flag,value,message", [
    ("--lam", "1.5", "--lam 1.5"), ("--lam", "-0.1", "--lam -0.1"),
    ("--gamma", "1.01", "--gamma 1.01"),
    ("--gamma", "-1", "--gamma -1"), ("--ppo_epochs", "0", "--ppo_epochs 0"),
    ("--minibatch_size", "9", "larger than --batch_size 8"),
    ("--lr", "-1", "error: --lr -1.0: must be > 0"),
    ("--lr", "nan", "error: --lr nan: must be a finite number"),
    ("--value_lr", "0", "error: --value_lr 0.0: must be > 0"),
    ("--micro_batch_size", "-1", "error: --micro_batch_size -1: must be >= 0"),
    ("--value_lr", "inf", "error: --value_lr inf: must be a finite number"),
    ("--k", "-1", "error: --k -1: must be >= 0"),
    ("--eval_test", "-5", "error: --eval_test -5: must be >= 0"),
    ("--grop_size", "4", "error: unrecognized arguments: --grop_size 4"),
    ("--value_clip", "-0.1", "--value_clip -0.1"), ("--clip_eps", "1", "--clip_eps 1.0"),
    ("--max_grad_norm", "-1", "--max_grad_norm -1.0"), ("--temperature", "0", "--temperature 0.0"),
    ("--beta", "-0.1", "--beta -0.1"), ("--steps", "0", "--steps 0: must be >= 1"),
    ("--seed", "-1", "--seed -1"),
])
def test_bad_arguments_are_one_line_errors(flag, value, message, tmp_path, capsys, no_model):
    argv = ["--batch_size", "8", "--minibatch_size", "4", flag, value, "--device", "cpu",
            "--out_dir", str(tmp_path)]
    assert message in error_line(ppo.main, argv, capsys)


def test_lesson_runs_end_to_end_on_cpu(cache_dir, tmp_path):
    # the 20-step SFT model is a cached prerequisite shared by every lesson's test
    plumbing.load_policy("tiny", sft_steps=20, device="cpu", cache_dir=cache_dir)
    result = ppo.main(["--sft_steps", "20", "--cache_dir", cache_dir, "--steps", "2",
                       "--batch_size", "2", "--minibatch_size", "1", "--ppo_epochs", "2",
                       "--eval_test", "4", "--eval_ood", "2", "--k", "2", "--max_new_tokens", "40",
                       "--device", "cpu", "--out_dir", str(tmp_path)])
    expected = {"test_greedy", "test_maj@2", "test_pass@2", "ood_greedy"}
    assert set(result["before"]) == set(result["after"]) == expected
    lines = [json.loads(l) for l in (Path(tmp_path) / "metrics.jsonl").read_text().splitlines()]
    steps = [l for l in lines if "step" in l]
    assert [l["step"] for l in steps] == [1, 2]
    for key in ("reward", "kl", "value_loss", "explained_variance", "clip_frac", "approx_kl",
                "step_time"):
        assert key in steps[0]
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # pi_theta = pi_ref before any update
    assert lines[-1]["final"] and "cost" in lines[-1]
    cost = result["cost"]
    count = lambda row, key: int(cost[row][key].replace(",", ""))
    mib = lambda row: float(cost[row]["weights + Adam state"].split()[0])
    assert count("pi_theta (policy)", "parameters") == count("pi_ref (frozen)", "parameters")
    assert count("pi_ref (frozen)", "trainable") == 0
    assert count("V_psi (value model)", "trainable") == pytest.approx(
        count("pi_theta (policy)", "trainable"), rel=0.01)
    # weights + Adam's 2 moments
    assert mib("pi_theta (policy)") == pytest.approx(3 * mib("pi_ref (frozen)"), abs=0.1)
    assert "n/a" in result["memory"]
    # the summary is the mean of the logged steps, and the value model's time a part of each step's
    assert result["mean_step_time"] == pytest.approx(sum(l["step_time"] for l in steps) / 2)
    assert result["mean_value_time"] == pytest.approx(sum(l["value_time"] for l in steps) / 2)
    assert all(0 < l["value_time"] < l["step_time"] for l in steps)
    assert (Path(tmp_path) / "model" / "config.json").exists()
    assert (Path(tmp_path) / "value_model" / "config.json").exists()


def test_pi_old_is_held_across_ppo_epochs_and_v_psi_learns(cache_dir, tmp_path, monkeypatch):
    """From the shipped pi_sft (right about half the time, so returns vary): every epoch over a
    sampled batch compares pi_theta with the same pi_old log-probs (those taken at sampling time),
    so the ratio is 1 on the first minibatch and moves away from 1 after updates; and the value
    model is trained (its head, zero at the start, is not zero at the end)."""
    from transformers import AutoModelForTokenClassification

    seen, real = [], ppo.ppo_clipped_surrogate
    monkeypatch.setattr(ppo, "ppo_clipped_surrogate", lambda logp, old_logp, *a: seen.append(
        (logp.detach().clone(), old_logp.clone())) or real(logp, old_logp, *a))
    argv = list(TINY_PI_SFT)
    # lesson 01 samples one output a question
    del argv[argv.index("--group_size"):argv.index("--group_size") + 2]
    argv += ["--batch_size", "8"]
    ppo.main(argv + ["--minibatch_size", "8", "--ppo_epochs", "3", "--steps", "1",
                     "--eval_test", "1", "--eval_ood", "0", "--k", "0", "--cache_dir", cache_dir,
                     "--out_dir", str(tmp_path)])
    assert len(seen) == 3  # 3 epochs of one minibatch (the whole batch, in a new order each epoch)
    as_set = lambda x: x.flatten().sort().values
    (logp0, old0), (logp1, old1), (logp2, old2) = seen
    assert torch.allclose(logp0, old0, atol=1e-5)  # before any update pi_theta is pi_old
    assert torch.equal(as_set(old1), as_set(old0)) and torch.equal(as_set(old2), as_set(old0))
    assert not torch.allclose(as_set(logp1), as_set(old0), atol=1e-6)  # the ratio has left 1
    value_model = AutoModelForTokenClassification.from_pretrained(tmp_path / "value_model")
    assert value_model.score.weight.abs().max() > 0


@pytest.fixture(scope="module")
def sampled_batch():
    """Eight outputs of the shipped pi_sft with everything the updates need, and V_psi with a random
    head (so its values, its loss and its gradient are not all 0)."""
    policy, tokenizer = plumbing.load_policy("tiny", device="cpu")
    ref_policy = copy.deepcopy(policy).eval().requires_grad_(False)
    torch.manual_seed(0)
    value_model = ppo.load_value_model(str(plumbing.SHIPPED_SFT), "cpu").eval()
    torch.nn.init.normal_(value_model.score.weight, std=0.1)
    args = ppo.Args(batch_size=8, minibatch_size=8, ppo_epochs=1, max_grad_norm=1e9)
    problems = task.make_split("test", 8)
    sampled = ppo.rollout(policy, ref_policy, tokenizer, problems, args)
    assert len(set(sampled["mask"].sum(1).tolist())) > 1  # outputs of several lengths
    return policy, value_model, sampled, args


def grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("micro_batch_size", [3, 1])
def test_micro_batches_give_the_whole_minibatchs_policy_gradient(sampled_batch, micro_batch_size):
    """Gradient accumulation: pi_theta's gradient of eq. (1) over one minibatch of 8 outputs,
    taken in micro-batches of 3 (3 + 3 + 2, rows sorted by length) or of 1, equals the whole
    minibatch's within 1e-6 of the gradient's scale, through policy_step itself; so do its
    statistics. pi_old is perturbed so that the clip acts on some tokens. SGD with lr 0 leaves the
    weights as they were."""
    policy, _, sampled, args = sampled_batch
    g = torch.Generator().manual_seed(1)
    sampled = {**sampled, "old_logp": sampled["old_logp"] + 0.3 * torch.randn(
        sampled["old_logp"].shape, generator=g) * sampled["mask"]}
    advantages = torch.randn(sampled["mask"].shape, generator=g) * sampled["mask"]
    results = {}
    for size in (0, micro_batch_size):
        model = copy.deepcopy(policy)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        stats = ppo.policy_step(model, optimizer, sampled, advantages,
                                dataclasses.replace(args, micro_batch_size=size))
        results[size] = grads(model), stats
    (whole, s0), (parts, s1) = results[0], results[micro_batch_size]
    assert whole.abs().max() > 0 and s0["clip_frac"][0] > 0  # a real gradient, the clip acting
    assert torch.allclose(parts, whole, rtol=0, atol=1e-6 * whole.abs().max().item())
    for key in ("policy_loss", "clip_frac", "approx_kl"):
        assert s1[key] == pytest.approx(s0[key], abs=1e-6)


@pytest.mark.parametrize("micro_batch_size", [3, 1])
def test_micro_batches_give_the_whole_minibatchs_value_gradient(sampled_batch, micro_batch_size):
    """The same for V_psi's clipped value loss, through value_step: two updates on the same 8
    outputs (SGD, lr 2), so that at the second V_psi has moved from V_old and the value clip acts;
    the gradient left after the second update, in micro-batches of 3 or 1, equals the whole
    minibatch's within 1e-5 of its scale (after one step of different rounding), and so do the
    losses."""
    _, value_model, sampled, args = sampled_batch
    everything = torch.arange(8)
    sampled = {**sampled, "minibatches": [everything, everything]}
    results = {}
    for size in (0, micro_batch_size):
        model = copy.deepcopy(value_model)
        optimizer = torch.optim.SGD(model.parameters(), lr=2.0)
        out = ppo.value_step(model, optimizer, sampled,
                             dataclasses.replace(args, micro_batch_size=size))
        results[size] = grads(model), out
    (whole, v0), (parts, v1) = results[0], results[micro_batch_size]
    assert whole.abs().max() > 0 and v0["value_clip_frac"][1] > 0  # the clip acts at the second
    assert torch.allclose(parts, whole, rtol=0, atol=1e-5 * whole.abs().max().item())
    assert v1["value_loss"] == pytest.approx(v0["value_loss"], rel=1e-5)
    assert torch.allclose(v1["old_values"], v0["old_values"], atol=1e-5)  # V_old, no-grad passes
