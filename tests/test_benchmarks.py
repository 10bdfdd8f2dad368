"""The benchmark harness's smoke mode (the suites themselves run by hand)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_autoencoder_suite_quick_mode(tmp_path):
    env = dict(os.environ, KERAS_KFAC_RESULTS=str(tmp_path), TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "autoencoder", "--quick"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads((tmp_path / "autoencoder_sigmoid_batch500_quick.json").read_text())
    assert set(payload["runs"]) == {"kfac (defaults)", "adam lr=0.001"}
    for run in payload["runs"].values():
        assert run["steps"] >= 2 and run["rows"][-1]["train_loss"] > 0
        assert run["median_step_ms"] > 0
    for suffix in ("_time.png", "_steps.png", ".csv", ".md"):
        assert (tmp_path / f"autoencoder_sigmoid_batch500_quick{suffix}").stat().st_size > 0


@pytest.mark.slow
def test_xla_and_overhead_suites_quick_mode(tmp_path):
    env = dict(os.environ, KERAS_KFAC_RESULTS=str(tmp_path), TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    for suite, name in (
        ("xla", "xla_batch128_quick"),
        ("overhead", "overhead_autoencoder_batch500_quick"),
    ):
        result = subprocess.run(
            [sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), suite, "--quick"],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        rows = json.loads((tmp_path / f"{name}.json").read_text())["rows"]
        assert [row["run"] for row in rows] == ["adam lr=0.001", "kfac (defaults)"]
        for row in rows:
            times = [row[k] for k in ("graph_ms", "xla_ms", "mean_step_ms") if k in row]
            assert times and all(t > 0 for t in times)
