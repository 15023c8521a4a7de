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
    import common

    return common.load_policy("tiny", common.SFT_STEPS, "cpu", cache_dir)
