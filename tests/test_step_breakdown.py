"""docs/step_breakdown.py, the README's timing of a lesson 02 step piece by piece, runs as documented."""
import os
import subprocess
import sys

import common

import plumbing

SCRIPT = str(plumbing.REPO / "docs" / "step_breakdown.py")


def test_times_every_piece_of_a_step():
    out = subprocess.run([sys.executable, SCRIPT, f"now={plumbing.REPO}", "--steps", "1"], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    line = [l for l in out.stdout.splitlines() if l.startswith("from pi_sft, now:")]
    assert len(line) == 1, out.stdout
    import ast
    medians = {k: float(v.split()[0]) for k, v in ast.literal_eval(line[0].split(": ", 1)[1]).items()}
    assert set(medians) == {"sample", "pi_ref", "pi_theta", "backward", "rest", "step"}
    # every piece was timed (pi_ref's pass without gradient, pi_theta's with), none twice: the rest is not negative
    assert all(medians[k] > 0 for k in ("sample", "pi_ref", "pi_theta", "backward")), medians
    assert medians["rest"] >= 0 and medians["step"] >= max(medians[k] for k in ("sample", "pi_ref", "pi_theta")), medians


def test_bad_version_is_one_line():
    out = subprocess.run([sys.executable, SCRIPT, "."], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and out.stderr.strip().count("\n") == 0
    assert "LABEL=REPO_FOLDER" in out.stderr


def test_the_gpu_probe_runs_its_path_on_the_cpu(tmp_path):
    """docs/gpu_probe.py --smoke: a random-weight 2-layer SmolLM2 (no model file), the samplers'
    rates and two lesson 02 processes at once, the results written (issue 31)."""
    import json

    out = tmp_path / "probe.json"
    run = subprocess.run([sys.executable, str(plumbing.REPO / "docs" / "gpu_probe.py"), "--smoke",
                          "--out", str(out)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert {d["sampler"] for d in result["decode"]} == {"static, eager", "token loop"}
    assert result["steps"][0]["copies"] == 2 and all(s > 0 for s in result["steps"][0]["s_per_step"])
