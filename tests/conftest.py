import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def load_lesson(name: str):
    """Import a lesson file such as "02_grpo_outcome" (its name starts with a digit)."""
    spec = importlib.util.spec_from_file_location(f"lesson_{name}", REPO / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One SFT cache for the whole test session, never the user's ./cache."""
    return str(tmp_path_factory.mktemp("sft-cache"))


# Tiny settings that run a whole lesson through main() in seconds on a CPU.
TINY = ["--sft_steps", "20", "--steps", "2", "--batch_size", "2", "--group_size", "2", "--eval_test", "4",
        "--eval_ood", "2", "--k", "2", "--max_new_tokens", "40", "--device", "cpu"]


@pytest.fixture(scope="session")
def sft_policy(cache_dir):
    """The course's default SFT model (built once per test session, about a minute on a 2-core CPU)."""
    import plumbing

    return plumbing.load_policy("tiny", plumbing.SFT_STEPS, "cpu", cache_dir)


@pytest.fixture
def no_model(monkeypatch):
    """Fail a test whose main() gets as far as loading a model: a bad option must stop it before any work."""
    import plumbing

    monkeypatch.setattr(plumbing, "load_policy",
                        lambda *a, **kw: pytest.fail("a model was loaded: the bad option got through"))


def error_line(main, argv, capsys) -> str:
    """The one line main(argv) stops with: plumbing.fail's "error: ...", or argparse's usage error (exit code 2:
    the usage, then "prog: error: ..." on stderr). No traceback, one "error:" line."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    if stop.value.code == 2:
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines[0].startswith("usage:") and sum("error:" in line for line in lines) == 1, lines
        return lines[-1]
    message = str(stop.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


# TINY from the shipped pi_sft: without --sft_steps the default (800 steps, seed 0) loads ./pi_sft and builds
# nothing. pi_sft is right about half the time, so even a two-step run has groups whose rewards differ and
# the policy moves: a test that needs the policy to move (a reset, a reload, pi_old held) starts here.
TINY_PI_SFT = [a for i, a in enumerate(TINY) if "--sft_steps" not in TINY[max(0, i - 1):i + 1]]


def checksum(model) -> float:
    """One number that changes when any weight changes."""
    return sum(p.detach().double().sum().item() + p.detach().double().abs().sum().item() for p in model.parameters())
