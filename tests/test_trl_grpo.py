"""docs/trl_grpo.py: lesson 02's experiment through TRL's GRPOTrainer (runs only where trl is installed)."""
import importlib.util
import json

import pytest
import torch

import common
import task

import plumbing
from conftest import REPO, TINY, error_line, load_lesson

pytest.importorskip("trl", reason="trl is an optional install (pip install trl==1.16.0); CI installs it")

spec = importlib.util.spec_from_file_location("trl_grpo", REPO / "docs" / "trl_grpo.py")
trl_grpo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(trl_grpo)
grpo = load_lesson("02_grpo_outcome")


@pytest.mark.parametrize("loss_agg", ["output", "token", "constant"])
def test_trls_loss_with_our_mapping_is_lesson_02s_loss(loss_agg, tmp_path):
    """The same batch, advantages, pi_old and pi_ref log-probs: GRPOTrainer's loss (loss_type mapped from
    --loss_agg, beta, epsilon) equals lesson 02's grpo_loss, its clipping and its k3 KL included."""
    import datasets
    from trl import GRPOTrainer

    policy, tokenizer = plumbing.load_policy("tiny", plumbing.SFT_STEPS, "cpu")  # TRL loads pi_ref from its folder
    args = plumbing.parse_args(grpo.Args, ["--loss_agg", loss_agg, "--max_new_tokens", "30", "--group_size", "4",
                                         "--batch_size", "3", "--beta", "0.5"])
    with torch.no_grad():  # move pi_theta away from pi_ref, so the KL term is not 0
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    dataset = datasets.Dataset.from_dict({"prompt": ["1+1\n"] * 3})
    trainer = GRPOTrainer(model=policy, processing_class=tokenizer, reward_funcs=lambda completions, **_: [0.0],
                          args=trl_grpo.grpo_config(args, str(tmp_path), torch.device("cpu"), 1),
                          train_dataset=dataset)
    torch.manual_seed(0)
    batch = common.sample(policy, tokenizer, [task.prompt_text(p) for p in task.make_split("test", 3)], 4, 1.0, 30)
    with torch.no_grad():
        ref_logp = common.token_logprobs(trainer.ref_model, batch)  # [N, T]
        old_logp = common.token_logprobs(policy, batch) + 0.3 * torch.randn(batch.completion_mask.shape)  # ratios clip
    advantages = torch.randn(len(batch))  # [N]
    policy.train()
    trainer.current_gradient_accumulation_steps = 1  # set by trainer.train(); one step, no accumulation
    trl_loss = trainer._compute_loss(policy, {
        "prompt_ids": batch.prompt_ids, "prompt_mask": batch.prompt_mask, "completion_ids": batch.completion_ids,
        "completion_mask": batch.completion_mask, "advantages": advantages, "ref_per_token_logps": ref_logp,
        "old_per_token_logps": old_logp, "num_items_in_batch": batch.completion_mask.sum()})
    logp = common.token_logprobs(policy, batch)
    ours, _ = grpo.grpo_loss(logp, old_logp, ref_logp, advantages[:, None].expand_as(logp), batch.completion_mask,
                             args.clip_eps, args.beta, loss_agg, "k3", args.max_new_tokens)
    assert torch.allclose(trl_loss, ours, atol=1e-5), (trl_loss.item(), ours.item())


@pytest.fixture(scope="module")
def both_runs(cache_dir, tmp_path_factory):
    """docs/trl_grpo.py and lesson 02 with the same tiny settings: (TRL's result, TRL's records, ours)."""
    tmp_path = tmp_path_factory.mktemp("trl_and_ours")
    result = trl_grpo.main(TINY + ["--cache_dir", cache_dir, "--out_dir", str(tmp_path / "trl")])
    trl_lines = [json.loads(line) for line in (tmp_path / "trl" / "metrics.jsonl").read_text().splitlines()]
    grpo.main(TINY + ["--cache_dir", cache_dir, "--out_dir", str(tmp_path / "ours")])
    our_lines = [json.loads(line) for line in (tmp_path / "ours" / "metrics.jsonl").read_text().splitlines()]
    return result, trl_lines, our_lines


def test_script_runs_end_to_end_and_writes_lesson_02s_records(both_runs):
    result, trl_lines, our_lines = both_runs
    for table in (result["before"], result["after"]):
        assert set(table) == {"test_greedy", "test_maj@2", "test_pass@2", "ood_greedy"}
    assert [line["step"] for line in trl_lines[:-1]] == [1, 2] and trl_lines[-1]["final"]
    assert [set(line) for line in trl_lines[:-1]] == [set(line) for line in our_lines[:-1]]  # plot_curves draws both
    # the same pi_sft and seed: the same starting table; the verifier's 0/1 reward: mean reward = accuracy
    assert trl_lines[-1]["before"] == our_lines[-1]["before"] == result["before"]
    for line in trl_lines[:-1]:
        assert line["reward"] == pytest.approx(line["accuracy"]), line


def test_final_records_have_the_same_keys(both_runs):
    _, trl_lines, our_lines = both_runs
    assert set(trl_lines[-1]) == set(our_lines[-1])


def test_bad_arguments_are_one_line_errors(capsys, no_model):
    assert "TRL's GRPOTrainer has only k3" in error_line(trl_grpo.main, ["--kl_estimator", "k1"], capsys)
    assert "--lr -1.0" in error_line(trl_grpo.main, ["--lr", "-1"], capsys)
