"""The GPU path (skipped where torch sees no GPU): every lesson's main() with tiny settings on --device cuda,
with every model and batch it computes on checked to be on the GPU; and the GPU's log-probs and losses
compared with the CPU's on the same weights and the same batch."""
import copy

import pytest
import torch

import common
import task

import plumbing
from conftest import TINY, load_lesson

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here: torch.cuda.is_available() is False")


def cuda_argv(name: str) -> list:
    """conftest's TINY with --device cuda; lesson 01 samples one output per question and has no --group_size."""
    argv = ["cuda" if a == "cpu" else a for a in TINY]
    if name == "01_ppo":
        i = argv.index("--group_size")
        del argv[i:i + 2]
    return argv


# what each lesson needs on top of TINY to run in seconds
EXTRA = {
    "01_ppo": ["--minibatch_size", "1"],
    "02_grpo_outcome": ["--mu", "2"],
    "03_grpo_process": ["--supervision", "both"],
    "04_iterative_grpo": ["--iterations", "2", "--rm_init_questions", "2", "--rm_init_steps", "3", "--rm_steps", "3",
                          "--rm_batch_size", "8", "--rm_eval_questions", "2"],
    "05_unified": ["--seeds", "0", "--eval_every", "1", "--eval_curve", "4"],
}


def test_lesson_01_argv_has_only_its_own_options():
    """Runs everywhere: lesson 01's Args parse the GPU argv (an unknown option is a usage error)."""
    ppo = load_lesson("01_ppo")
    args = plumbing.parse_args(ppo.Args, cuda_argv("01_ppo") + EXTRA["01_ppo"])
    assert args.device == "cuda" and args.batch_size == 2
    for name in EXTRA:
        assert "--device" in cuda_argv(name) and "cpu" not in cuda_argv(name)


class DeviceSpy:
    """Wraps functions that take a model first: records the device of the model's parameters and of every
    tensor (or Batch of tensors) passed in and returned, for every call."""

    def __init__(self, monkeypatch):
        self.monkeypatch, self.calls = monkeypatch, {}

    def wrap(self, owner, name):
        real = getattr(owner, name)

        def spied(*args, **kw):
            out = real(*args, **kw)
            devices = {p.device.type for p in args[0].parameters()} if hasattr(args[0], "parameters") else set()
            for x in list(args[1:]) + list(kw.values()) + [out]:
                tensors = [x] if torch.is_tensor(x) else [v for v in vars(x).values() if torch.is_tensor(v)] \
                    if isinstance(x, common.Batch) else []
                devices |= {t.device.type for t in tensors}
            self.calls.setdefault(name, []).append(devices)
            return out

        self.monkeypatch.setattr(owner, name, spied)

    def assert_all_on_cuda(self, *names):
        for name in names:
            assert self.calls.get(name), f"{name} was never called"
            assert all(d == {"cuda"} for d in self.calls[name]), (name, self.calls[name])


@GPU
@pytest.mark.parametrize("name", list(EXTRA))
def test_lesson_runs_on_the_gpu_with_every_model_and_batch_there(name, cache_dir, tmp_path, monkeypatch):
    lesson = load_lesson(name)
    spy = DeviceSpy(monkeypatch)
    spy.wrap(common, "token_logprobs")  # every policy / pi_ref log-prob, also those taken by length buckets
    spy.wrap(common, "sample")
    watched = ["token_logprobs", "sample"]
    if name == "01_ppo":
        spy.wrap(lesson, "token_values")  # V_psi
        watched.append("token_values")
    if name == "04_iterative_grpo":
        spy.wrap(lesson, "rm_logits")  # r_phi, scoring and training
        watched.append("rm_logits")
    if name == "05_unified":
        real_load, created = lesson.load_value_model, []
        monkeypatch.setattr(lesson, "load_value_model",
                            lambda *a: created.append(real_load(*a)) or created[-1])
    result = lesson.main(cuda_argv(name) + EXTRA[name] + ["--cache_dir", cache_dir, "--out_dir", str(tmp_path)])
    spy.assert_all_on_cuda(*watched)
    if name == "01_ppo":
        assert "n/a" not in result["memory"] and "peak GPU memory" in result["memory"]
    if name == "05_unified":
        assert created and all(p.device.type == "cuda" for m in created for p in m.parameters())  # PPO's V_psi
        assert all(c["peak_gpu_mb"] > 0 for cs in result["costs"].values() for c in cs)
    else:
        after = result["after"] if name != "03_grpo_process" else result["after"]["process"]
        assert {"test_greedy", "ood_greedy"} <= set(after)


@GPU
def test_a_gpu_past_the_last_is_a_one_line_error_on_this_machine():
    n = torch.cuda.device_count()
    with pytest.raises(SystemExit, match=f"this machine has {n} GPU"):
        plumbing.resolve_device(f"cuda:{n}")


def test_a_gpu_past_the_last_is_a_one_line_error(monkeypatch):
    """Runs everywhere: torch is told it has one GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SystemExit) as stop:
        plumbing.resolve_device("cuda:3")
    assert stop.value.code == "error: --device 'cuda:3': this machine has 1 GPU (cuda:0 .. cuda:0)"
    assert plumbing.resolve_device("cuda:0") == torch.device("cuda:0")
    assert plumbing.resolve_device("cuda") == torch.device("cuda")


# ----------------------------------------------------------------------------------------------------
# The GPU computes what the CPU computes.
#
# Tolerances: the tiny model is 4 layers of width 128 in fp32. With full-precision fp32 matmuls the two
# devices differ only in the order of their sums (about 1e-7 relative per operation, ~1e-6 on a log-prob
# after the model), so 1e-4 on a log-prob (and 1e-4 on a loss of order 1) is two orders of magnitude of
# room. TF32 (10-bit mantissa, ~1e-3 relative) would break that, so the fixture turns it off for the test;
# the lessons' own runs use whatever the user's torch has.


@pytest.fixture
def full_precision():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
    torch.set_float32_matmul_precision(saved[2])


def to(batch: common.Batch, device) -> common.Batch:
    return common.Batch(batch.prompt_ids.to(device), batch.prompt_mask.to(device), batch.completion_ids.to(device),
                        batch.completion_mask.to(device), batch.texts, batch.step_ends)


@pytest.fixture
def pi_sft_on_both():
    """The shipped pi_sft on the CPU and on the GPU, and a batch of right, wrong, cut-short and empty outputs
    (different lengths, so prompts are left-padded and completions right-padded)."""
    cpu_model, tokenizer = plumbing.load_policy("tiny", plumbing.SFT_STEPS, "cpu")
    gpu_model, _ = plumbing.load_policy("tiny", plumbing.SFT_STEPS, "cuda")
    problems = task.make_split("test", 6)
    texts = [task.solution_text(problems[0]), f"#### {problems[1]['answer'] + 1}\n", task.solution_text(problems[2])[:9],
             "", f"#### {problems[4]['answer']}\n", task.solution_text(problems[5]) + "1+1=2\n"]
    batch = common.build_batch(tokenizer, [task.prompt_text(p) for p in problems], texts, "cpu")
    return cpu_model, gpu_model, tokenizer, batch


@GPU
def test_pi_sft_loads_onto_the_gpu(pi_sft_on_both):
    _, gpu_model, _, _ = pi_sft_on_both
    assert all(p.device.type == "cuda" and p.dtype == torch.float32 for p in gpu_model.parameters())


@GPU
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_on_the_gpu_equal_the_cpus(pi_sft_on_both, full_precision, temperature):
    cpu_model, gpu_model, _, batch = pi_sft_on_both
    with torch.no_grad():
        on_cpu = common.token_logprobs(cpu_model, batch, temperature)
        on_gpu = common.token_logprobs(gpu_model, to(batch, "cuda"), temperature)
        by_length = common.token_logprobs(gpu_model, to(batch, "cuda"), temperature, buckets=4)
    assert on_gpu.device.type == "cuda"
    assert torch.allclose(on_gpu.cpu(), on_cpu, atol=1e-4), (on_gpu.cpu() - on_cpu).abs().max()
    assert torch.allclose(by_length.cpu(), on_cpu, atol=1e-4), (by_length.cpu() - on_cpu).abs().max()
    assert (on_gpu.cpu()[batch.completion_mask == 0] == 0).all()


@GPU
def test_grpo_loss_and_gradient_on_the_gpu_equal_the_cpus(pi_sft_on_both, full_precision):
    """Lesson 02's loss on the same batch, pi_old and pi_ref log-probs and advantages: the loss within 1e-4,
    and every parameter's gradient within 1e-4 + 1e-3 relative (a backward pass sums more terms)."""
    grpo = load_lesson("02_grpo_outcome")
    cpu_model, gpu_model, _, batch = pi_sft_on_both
    g = torch.Generator().manual_seed(0)
    mask = batch.completion_mask
    old_logp = common.token_logprobs(cpu_model, batch).detach() + 0.1 * torch.randn(mask.shape, generator=g)  # ratios != 1
    ref_logp = old_logp + 0.2 * torch.randn(mask.shape, generator=g)  # KL != 0
    advantages = torch.randn(len(batch), generator=g)[:, None].expand_as(mask)
    losses, grads = {}, {}
    for device, model in (("cpu", cpu_model), ("cuda", gpu_model)):
        model = copy.deepcopy(model).train()
        logp = common.token_logprobs(model, to(batch, device))
        loss, _ = grpo.grpo_loss(logp, old_logp.to(device), ref_logp.to(device), advantages.to(device), mask.to(device),
                                 0.2, 0.04)
        loss.backward()
        losses[device], grads[device] = loss, {n: p.grad for n, p in model.named_parameters()}
    assert losses["cuda"].device.type == "cuda"
    assert abs(losses["cuda"].item() - losses["cpu"].item()) < 1e-4, (losses["cuda"].item(), losses["cpu"].item())
    for n, grad in grads["cpu"].items():
        assert torch.allclose(grads["cuda"][n].cpu(), grad, atol=1e-4, rtol=1e-3), n


@GPU
def test_value_model_and_unified_loss_on_the_gpu_equal_the_cpus(pi_sft_on_both, full_precision, tmp_path):
    """Lesson 01's V_psi (with a random head, so values are not all 0) and lesson 05's unified loss with
    GRPO's gradient coefficient, on both devices: within 1e-4."""
    ppo, unified = load_lesson("01_ppo"), load_lesson("05_unified")
    cpu_model, gpu_model, _, batch = pi_sft_on_both
    torch.manual_seed(0)
    value_cpu = ppo.load_value_model(str(plumbing.SHIPPED_SFT), "cpu").eval()
    torch.nn.init.normal_(value_cpu.score.weight, std=0.1)
    value_gpu = copy.deepcopy(value_cpu).to("cuda")
    assert all(p.device.type == "cuda" for p in value_gpu.parameters())
    with torch.no_grad():
        v_cpu, v_gpu = ppo.token_values(value_cpu, batch), ppo.token_values(value_gpu, to(batch, "cuda"))
    assert v_cpu.abs().max() > 1e-3 and v_gpu.device.type == "cuda"
    assert torch.allclose(v_gpu.cpu(), v_cpu, atol=1e-4), (v_gpu.cpu() - v_cpu).abs().max()

    mask = batch.completion_mask
    advantages = torch.linspace(-1, 1, len(batch))[:, None] * mask
    losses = {}
    for device, model in (("cpu", cpu_model), ("cuda", gpu_model)):
        b = to(batch, device)
        logp = common.token_logprobs(model, b)
        ref_logp = logp.detach() - 0.1
        gc = unified.gc_grpo(advantages.to(device), logp, ref_logp, b.completion_mask, 0.04)
        losses[device] = unified.unified_loss(logp, b.completion_mask, gc).item()
    assert abs(losses["cuda"] - losses["cpu"]) < 1e-4, losses
