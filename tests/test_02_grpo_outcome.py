"""Lesson 02: GRPO with outcome supervision, equations (3) and (4)."""
import copy
import json
import math
import time

import pytest
import torch

import common
import task

import plumbing
from conftest import TINY, TINY_PI_SFT, error_line, load_lesson

grpo = load_lesson("02_grpo_outcome")


def test_outcome_advantages_worked_example():
    rewards = torch.tensor([1., 0., 0., 1.,   # mean .5, std .5 -> +-1
                            1., 1., 1., 1.,   # all equal: no signal, advantage 0
                            1., 0., 0., 0.])  # mean .25, std sqrt(3)/4
    adv = grpo.grpo_outcome_advantages(rewards, group_size=4)
    s = math.sqrt(3) / 4
    expected = torch.tensor([1., -1., -1., 1., 0., 0., 0., 0., .75 / s, -.25 / s, -.25 / s, -.25 / s])
    assert torch.allclose(adv, expected, atol=1e-6)
    assert torch.allclose(adv.view(3, 4).sum(1), torch.zeros(3), atol=1e-6)  # zero mean within each group


def test_outcome_rewards_from_the_verifier():
    problems = [{"question": "1+2", "start": 1, "ops": [("+", 2)], "answer": 3}]
    rewards = grpo.outcome_rewards(problems, ["1+2=3\n#### 3\n", "1+2=4\n#### 4\n", "garbage", ""], group_size=4)
    assert rewards.tolist() == [1., 0., 0., 0.]


def test_k3_zero_when_equal_and_never_negative():
    logp = torch.log(torch.rand(1000))
    assert torch.allclose(grpo.kl_k3(logp, logp), torch.zeros(1000))
    ref = torch.log(torch.rand(1000))
    assert (grpo.kl_k3(logp, ref) >= 0).all()
    # the argument order: kl_k3(logp, ref_logp) with pi_theta = 1/2, pi_ref = 1/4 is
    # pi_ref/pi_theta - log(pi_ref/pi_theta) - 1 = 1/2 + log 2 - 1; swapped it would be 2 - log 2 - 1
    half, quarter = torch.tensor(0.5).log(), torch.tensor(0.25).log()
    assert grpo.kl_k3(half, quarter).item() == pytest.approx(0.5 + math.log(2) - 1)
    assert grpo.kl_k3(quarter, half).item() == pytest.approx(1 - math.log(2))


def test_k3_is_unbiased_for_the_kl_of_two_categoricals():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])  # pi_theta
    q = torch.tensor([0.25, 0.25, 0.25, 0.25])  # pi_ref
    exact = (p * (p / q).log()).sum()  # KL(pi_theta || pi_ref)
    k3 = grpo.kl_k3(p.log(), q.log())  # per outcome
    assert torch.allclose((p * k3).sum(), exact, atol=1e-6)  # expectation under pi_theta is exact
    g = torch.Generator().manual_seed(0)
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    assert abs(k3[x].mean() - exact) < 0.01  # and so is the sample mean, up to Monte Carlo noise


CONTRACT = 'grpo_loss returns (loss, {"kl": float, "clip_frac": float})'


def grpo_loss(*args, **kwargs):
    """grpo.grpo_loss, its return checked first against the contract grpo_step relies on: a
    version that returns something else fails here with a message that says so."""
    out = grpo.grpo_loss(*args, **kwargs)
    assert isinstance(out, tuple) and len(out) == 2, f"{CONTRACT}; yours returned {out!r:.80}"
    loss, stats = out
    assert torch.is_tensor(loss) and loss.dim() == 0, f"{CONTRACT}; your loss is {loss!r:.80}"
    assert isinstance(stats, dict) and {"kl", "clip_frac"} <= set(stats), \
        f"{CONTRACT}; your statistics are {stats!r:.80}"
    assert all(type(stats[key]) is float for key in ("kl", "clip_frac")), \
        f"{CONTRACT}: plain floats (.item()); yours are {stats!r:.80}"
    return loss, stats


def test_grpo_loss_returns_a_loss_tensor_and_float_statistics():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss, _ = grpo_loss(logp, logp.detach(), logp.detach() - 0.5, torch.ones(1, 2),
                        torch.ones(1, 2), 0.2, 0.04)
    assert loss.requires_grad  # the loss is what backward() is called on


def test_clipped_loss_worked_example():
    eps = 0.2
    # four one-token outputs: ratio inside / above / below the clip, both signs of advantage
    ratio = torch.tensor([[1.1], [1.5], [0.5], [1.5], [0.5]])
    adv = torch.tensor([[1.], [1.], [1.], [-1.], [-1.]])
    # min(r A, clip(r) A): 1.1 | clipped to 1.2 | 0.5 (min keeps the unclipped) | -1.5 | clipped to -0.8
    expected = torch.tensor([1.1, 1.2, 0.5, -1.5, -0.8])
    old = torch.zeros(5, 1)
    logp = ratio.log()
    loss, stats = grpo_loss(logp, old, logp, adv, torch.ones(5, 1), eps, beta=0.0)
    assert torch.allclose(loss, -expected.mean(), atol=1e-6)
    assert stats["clip_frac"] == pytest.approx(4 / 5)


def test_loss_normalises_per_output_then_over_outputs_and_adds_kl():
    # output 0 has 2 tokens, output 1 has 1 token (then padding): 1/G sum_i 1/|o_i| sum_t
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -9.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -2.0], [-0.5, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    adv = torch.tensor([[2.0, 2.0], [-1.0, -1.0]])
    beta = 0.1
    loss, _ = grpo_loss(logp, logp.detach(), ref, adv, mask, 0.2, beta)
    k3 = lambda lp, lr: math.exp(lr - lp) - (lr - lp) - 1
    out0 = (2.0 - beta * k3(-1.0, -1.5) + 2.0 - beta * k3(-2.0, -2.0)) / 2
    out1 = -1.0 - beta * k3(-0.5, -0.5)
    assert loss.item() == pytest.approx(-(out0 + out1) / 2, abs=1e-6)
    loss.backward()
    # at pi_old = pi_theta the surrogate's gradient is A / |o_i| / G; the padded token gets none
    assert logp.grad[1, 1] == 0
    assert logp.grad[1, 0].item() == pytest.approx(1.0 / 1 / 2, abs=1e-6)


@pytest.mark.parametrize("extra,message", [
    (["--lr", "-1"], "error: --lr -1.0: must be > 0"),
    (["--lr", "nan"], "error: --lr nan: must be a finite number"),
    (["--beta", "inf"], "error: --beta inf: must be a finite number"),
    (["--k", "-1"], "error: --k -1: must be >= 0"), (["--eval_test", "-5"], "error: --eval_test -5: must be >= 0"),
    (["--grop_size", "4"], "error: unrecognized arguments: --grop_size 4"),
    (["--group", "4"], "error: unrecognized arguments: --group 4"),  # no abbreviations
    (["--lr", "abc"], "error: argument --lr: invalid float value: 'abc'"),
    (["--group_size", "1"], "--group_size 1"), (["--beta", "-0.1"], "--beta -0.1"),
    (["--clip_eps", "-0.2"], "--clip_eps -0.2"), (["--device", "gpu0"], "--device 'gpu0'"), (["--mu", "0"], "--mu 0"),
    (["--warmup_steps", "-1"], "--warmup_steps -1: must be >= 0"), (["--steps", "0"], "--steps 0: must be >= 1"),
    (["--sft_steps", "-1"], "--sft_steps -1: must be >= 0"), (["--temperature", "0"], "--temperature 0.0"),
    (["--max_grad_norm", "0"], "--max_grad_norm 0.0"), (["--seed", "-1"], "--seed -1"),
    (["--maj_pass_k", "-1"], "--maj_pass_k -1: must be >= 0"), (["--maj_pass_problems", "0"], "--maj_pass_problems 0"),
    (["--maj_pass_temperature", "0"], "--maj_pass_temperature 0.0: must be > 0"),
    (["--loss_agg", "seq"], "--loss_agg 'seq': use one of output, token, constant"),
    (["--scale_rewards", "batch"], "--scale_rewards 'batch': use one of group, none"),
    (["--kl_estimator", "k4"], "--kl_estimator 'k4': use one of k3, k1, k2"),
])
def test_bad_arguments_are_one_line_errors(extra, message, capsys, no_model):
    assert message in error_line(grpo.main, ["--device", "cpu"] + extra, capsys)


def test_a_missing_model_folder_is_a_one_line_error(cache_dir):
    with pytest.raises(SystemExit, match="does not exist"):
        grpo.main(TINY + ["--cache_dir", cache_dir, "--model", "./no/such/folder"])


def test_lesson_runs_end_to_end_on_cpu(cache_dir, tmp_path):
    result = grpo.main(TINY + ["--cache_dir", cache_dir, "--out_dir", str(tmp_path)])
    for table in (result["before"], result["after"]):
        assert set(table) == {"test_greedy", "test_maj@2", "test_pass@2", "ood_greedy"}
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 3  # two steps and the final record
    assert [line["step"] for line in lines[:2]] == [1, 2] and lines[0]["kl"] == pytest.approx(0, abs=1e-6)
    assert lines[2]["before"] == result["before"] and lines[2]["after"] == result["after"]
    assert (tmp_path / "model" / "config.json").exists()


def test_qwen2_model_with_byte_level_bpe_runs_through_model_path(tmp_path, cache_dir):
    """--model PATH: a randomly initialised Qwen2 with its own byte-level BPE tokenizer (no BOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    rng_problems = task.train_problems(5)
    corpus = []
    for _ in range(300):
        p = next(rng_problems)
        corpus.append(task.prompt_text(p) + task.solution_text(p))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|pad|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|pad|>")
    text = task.solution_text(next(rng_problems))
    ids = tokenizer(text)["input_ids"]
    assert len(ids) < len(text) and tokenizer.bos_token is None  # multi-character tokens, no BOS
    assert tokenizer.decode(ids) == text
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    path = tmp_path / "qwen2-tiny"
    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)

    result = grpo.main(TINY + ["--cache_dir", cache_dir, "--out_dir", str(tmp_path / "run"), "--model", str(path),
                               "--sft_steps", "5"])
    assert set(result["after"]) == {"test_greedy", "test_maj@2", "test_pass@2", "ood_greedy"}
    # the step ends found from BPE tokens line up with the verifier's lines
    policy, tok = plumbing.load_policy(str(path), sft_steps=5, cache_dir=cache_dir)
    assert type(policy).__name__ == "Qwen2ForCausalLM"
    batch = common.sample(policy, tok, ["7+5*3-9\n"], group_size=8, max_new_tokens=24)
    for t, ends in zip(batch.texts, batch.step_ends):
        assert len(ends) == len(task.split_lines(t))


def test_a_short_grpo_run_raises_the_reward(sft_policy):
    """Learning test: 25 GRPO steps on 8 fixed questions raise the reward measured on them (fixed seed)."""
    import copy

    policy, tokenizer = sft_policy
    policy = copy.deepcopy(policy)
    ref_policy = copy.deepcopy(policy).requires_grad_(False)
    problems = task.make_split("test", 8)
    args = grpo.Args(group_size=8, lr=2e-4, max_new_tokens=48)

    def reward():  # mean verifier reward of 16 samples per question
        batch = common.sample(policy, tokenizer, [task.prompt_text(p) for p in problems], 16, 1.0, 48)
        return grpo.outcome_rewards(problems, batch.texts, 16).mean().item()

    common.set_seed(0)
    before = reward()
    optimizer = torch.optim.Adam(policy.parameters(), lr=args.lr)
    for _ in range(25):
        grpo.grpo_step(policy, ref_policy, tokenizer, optimizer, problems, args)
    after = reward()
    assert after > before + 0.15, (before, after)


def test_what_the_k3_kl_in_the_loss_differentiates():
    """k3's value is an unbiased estimate of KL(pi_theta || pi_ref), but on samples of pi_theta its gradient
    in the loss is, in expectation, the gradient of KL(pi_ref || pi_theta), the other direction; k1 in the
    loss has expected gradient 0, and k2 = (log ratio)^2 / 2 gives the gradient of KL(pi_theta || pi_ref)."""
    torch.manual_seed(0)
    theta = torch.randn(5, dtype=torch.float64, requires_grad=True)
    ref_logp = torch.log_softmax(torch.randn(5, dtype=torch.float64), dim=0)
    logp = torch.log_softmax(theta, dim=0)
    p = logp.exp().detach()  # the sampling distribution: the loss sees samples, not their probabilities

    def grad(f):
        return torch.autograd.grad(f, theta, retain_graph=True)[0]

    expected = lambda estimator: grad((p * estimator).sum())  # E_{x ~ pi_theta}[grad estimator(x)], exactly
    reverse_kl = (logp.exp() * (logp - ref_logp)).sum()  # KL(pi_theta || pi_ref), the paper's D_KL
    forward_kl = (ref_logp.exp() * (ref_logp - logp)).sum()  # KL(pi_ref || pi_theta)
    k3 = grpo.kl_k3(logp, ref_logp)
    assert torch.isclose((p * k3).sum(), reverse_kl.detach())  # the value: unbiased for the paper's KL
    assert torch.allclose(expected(k3), grad(forward_kl))  # the gradient: the other KL
    assert not torch.allclose(expected(k3), grad(reverse_kl), atol=1e-3)
    assert torch.allclose(expected(logp - ref_logp), torch.zeros(5, dtype=torch.float64))  # k1: no gradient
    assert torch.allclose(expected(0.5 * (logp - ref_logp) ** 2), grad(reverse_kl))  # k2: the paper's KL


def test_unscaled_advantages_worked_example():
    """--scale_rewards none (Dr. GRPO): r_i - mean(r), no division by the group's std."""
    rewards = torch.tensor([1., 0., 0., 1.,  1., 1., 1., 1.,  1., 0., 0., 0.])
    adv = grpo.grpo_outcome_advantages(rewards, group_size=4, scale=False)
    assert torch.allclose(adv, torch.tensor([.5, -.5, -.5, .5, 0., 0., 0., 0., .75, -.25, -.25, -.25]))


def test_loss_aggregations_worked_example():
    """Two outputs: o_1 one token with A = 2, o_2 three tokens with A = 1 (ratio 1, no KL).
    output (eq. 3): (2/1 + 3/3) / 2 = 1.5; token (DAPO): (2 + 1 + 1 + 1) / 4 = 1.25;
    constant (Dr. GRPO, max_len 4): (2/4 + 3/4) / 2 = 0.625."""
    logp = torch.zeros(2, 3)
    advantages = torch.tensor([[2., 0., 0.], [1., 1., 1.]])
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    for loss_agg, expected in (("output", 1.5), ("token", 1.25), ("constant", 0.625)):
        loss, _ = grpo_loss(logp, logp, logp, advantages, mask, 0.2, 0.04, loss_agg, "k3", max_len=4)
        assert loss.item() == pytest.approx(-expected)


def test_kl_estimators_in_the_loss_worked_example():
    """With A = 0 and ratio 1 the loss is beta times the token mean of the estimator:
    log pi_theta/pi_ref = 0.5 -> k1 0.5, k2 0.125, k3 e^-0.5 + 0.5 - 1 = 0.10653."""
    logp, ref_logp = torch.full((1, 2), -1.0), torch.full((1, 2), -1.5)
    mask, zero = torch.ones(1, 2), torch.zeros(1, 2)
    for estimator, value in (("k1", 0.5), ("k2", 0.125), ("k3", math.exp(-0.5) - 0.5)):
        loss, stats = grpo_loss(logp, logp, ref_logp, zero, mask, 0.2, 2.0, "token", estimator)
        assert loss.item() == pytest.approx(2.0 * value)
        assert stats["kl"] == pytest.approx(math.exp(-0.5) - 0.5)  # the log shows k3 whatever the loss uses


def test_pi_old_is_held_across_grpo_iterations(sft_policy, monkeypatch):
    """--mu 3: the three updates on one sampled batch share pi_old's log-probs (the first pass's, before any
    update) and pi_ref's, while pi_theta's move, so the ratio leaves 1 from the second update on."""
    policy, tokenizer = sft_policy
    policy = copy.deepcopy(policy)
    seen, real_loss = [], grpo.grpo_loss
    monkeypatch.setattr(grpo, "grpo_loss", lambda logp, old_logp, ref_logp, *a: seen.append(
        (logp.detach().clone(), old_logp.clone(), ref_logp.clone())) or real_loss(logp, old_logp, ref_logp, *a))
    args = grpo.Args(group_size=4, mu=3, max_new_tokens=40)
    common.set_seed(0)
    grpo.grpo_step(policy, copy.deepcopy(policy).requires_grad_(False), tokenizer,
                   torch.optim.Adam(policy.parameters(), lr=1e-3), task.make_split("test", 4), args)
    assert len(seen) == 3
    (logp0, old0, ref0), (logp1, old1, ref1), (logp2, old2, ref2) = seen
    assert torch.equal(old0, logp0) and torch.equal(old1, old0) and torch.equal(old2, old0)
    assert torch.equal(ref0, ref1) and torch.equal(ref1, ref2) and torch.allclose(ref0, logp0, atol=1e-5)
    assert not torch.allclose(logp1, old0, atol=1e-6) and not torch.allclose(logp2, logp1, atol=1e-6)


def test_main_warms_the_learning_rate_up_step_by_step(cache_dir, tmp_path, monkeypatch):
    """--warmup_steps 4: the updates of steps 1, 2, 3 use lr/4, 2lr/4, 3lr/4 (the scheduler steps once a step)."""
    lrs, real_step = [], grpo.grpo_step
    monkeypatch.setattr(grpo, "grpo_step", lambda policy, ref, tok, optimizer, *a: lrs.append(
        optimizer.param_groups[0]["lr"]) or real_step(policy, ref, tok, optimizer, *a))
    grpo.main(TINY_PI_SFT + ["--steps", "3", "--warmup_steps", "4", "--lr", "4e-4", "--eval_test", "1", "--eval_ood", "0",
                             "--k", "0", "--cache_dir", cache_dir, "--out_dir", str(tmp_path)])
    assert lrs == pytest.approx([1e-4, 2e-4, 3e-4])


@pytest.mark.parametrize("loss_agg", ["output", "token", "constant"])
def test_micro_batches_accumulate_the_whole_batch_gradient(sft_policy, loss_agg, monkeypatch):
    """--micro_batch_size 3 on 8 outputs (chunks of 3, 3, 2, by length): the accumulated gradient
    equals the whole batch's (--micro_batch_size 0) within float rounding (atol 1e-6 on gradients of
    order 1e-2), and so do the logged loss and KL, for every loss aggregation."""
    policy, tokenizer = sft_policy
    problems = task.make_split("test", 4)
    grads, records = [], []
    for micro in (0, 3):
        model = copy.deepcopy(policy)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # a step that moves nothing
        args = grpo.Args(group_size=2, max_new_tokens=40, micro_batch_size=micro, loss_agg=loss_agg,
                         beta=0.5)
        common.set_seed(0)
        records.append(grpo.grpo_step(model, copy.deepcopy(policy).requires_grad_(False), tokenizer,
                                      optimizer, problems, args))
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[0].abs().max() > 1e-3  # the groups have signal: a real gradient is compared
    assert torch.allclose(grads[1], grads[0], atol=1e-6, rtol=1e-4)
    for key in ("loss", "kl", "clip_frac", "reward"):
        assert records[1][key] == pytest.approx(records[0][key], abs=1e-6)


def test_micro_batches_split_by_length_and_cover_every_row():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    batch = common.Batch(torch.ones(5, 2, dtype=torch.long), torch.ones(5, 2, dtype=torch.long),
                         torch.zeros(5, 4, dtype=torch.long), mask, [""] * 5, [[]] * 5)
    assert [c.tolist() for c in common.micro_batches(batch, 2)] == [[1, 4], [3, 0], [2]]
    assert [c.tolist() for c in common.micro_batches(batch, 0)] == [[0, 1, 2, 3, 4]]
    assert [c.tolist() for c in common.micro_batches(batch, 9)] == [[0, 1, 2, 3, 4]]
