"""The GPU path: every lesson's main() with tiny settings on --device cuda (skipped where torch sees no GPU)."""
import pytest
import torch

import common
from conftest import TINY, load_lesson

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here: torch.cuda.is_available() is False")
CUDA_TINY = ["cuda" if a == "cpu" else a for a in TINY]  # conftest's TINY with --device cuda

# what each lesson needs on top of TINY to run in seconds
EXTRA = {
    "01_ppo": ["--minibatch_size", "1"],
    "02_grpo_outcome": [],
    "03_grpo_process": ["--supervision", "both"],
    "04_iterative_grpo": ["--iterations", "2", "--rm_init_questions", "2", "--rm_init_steps", "3", "--rm_steps", "3",
                          "--rm_batch_size", "8", "--rm_eval_questions", "2"],
    "05_unified": ["--seeds", "0", "--eval_every", "1", "--eval_curve", "4"],
}


@GPU
@pytest.mark.parametrize("name", list(EXTRA))
def test_lesson_runs_end_to_end_on_the_gpu(name, cache_dir, tmp_path):
    lesson = load_lesson(name)
    result = lesson.main(CUDA_TINY + EXTRA[name] + ["--cache_dir", cache_dir, "--out_dir", str(tmp_path)])
    if name == "01_ppo":
        assert "n/a" not in result["memory"] and result["mean_step_time"] > 0
    elif name == "05_unified":
        assert all(c["peak_gpu_mb"] > 0 and c["time_per_step"] > 0 for cs in result["costs"].values() for c in cs)
    else:
        assert result["after"]


@GPU
def test_a_gpu_past_the_last_is_a_one_line_error_on_this_machine():
    n = torch.cuda.device_count()
    with pytest.raises(SystemExit, match=f"this machine has {n} GPU"):
        common.resolve_device(f"cuda:{n}")


def test_a_gpu_past_the_last_is_a_one_line_error(monkeypatch):
    """Runs everywhere: torch is told it has one GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SystemExit) as stop:
        common.resolve_device("cuda:3")
    assert stop.value.code == "error: --device 'cuda:3': this machine has 1 GPU (cuda:0 .. cuda:0)"
    assert common.resolve_device("cuda:0") == torch.device("cuda:0")
    assert common.resolve_device("cuda") == torch.device("cuda")
