"""The benchmark harness's smoke mode (the suites themselves run by hand)."""

import json
import os
import subprocess
import sys

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


def test_defaults_table_quick_mode(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = tmp_path / "defaults_quick.md"
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "defaults.py"),
            "--quick",
            "--tasks",
            "MLP",
            "--candidates",
            "kfac()",
            "--out",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = json.loads((tmp_path / "defaults_quick.json").read_text())["MNIST MLP dropout"]
    assert set(runs) == {"adam lr=0.001", "adam lr=0.003", "kfac()"}
    for run in runs.values():
        # Probe losses at 1/4, 1/2 and all of the 8 quick steps.
        assert sorted(int(k) for k in run["losses"]) == [2, 4, 8]
        assert all(0 < v < 10 for v in run["losses"].values())
        assert run["median_ms"] > 0
    table = out.read_text()
    assert "| MNIST MLP dropout | 8 | adam lr=" in table and "(1.0x)" in table
