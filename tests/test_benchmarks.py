"""The benchmark harness's smoke mode (the suites themselves run by hand)."""

import json
import math
import os
import subprocess
import sys

import pytest

from keras_kfac.graph_util import PROFILE_SCOPES

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


@pytest.mark.slow  # 87 s at load 15 on 2 cores: four runs with their compilations
def test_panel_quick_mode(tmp_path):
    env = dict(os.environ, KERAS_KFAC_RESULTS=str(tmp_path), TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "panel", "--quick"]
    result = subprocess.run(
        command + ["--tasks", "mlp"], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    task = json.loads((tmp_path / "panel_quick.json").read_text())["tasks"]["mlp"]
    runs = {row["run"] for row in task["table"]}
    assert runs == {"adam lr=0.001", "muon lr=0.001", "sgd nesterov lr=0.03", "kfac"}
    assert task["best"] in runs - {"kfac"} and task["kfac_label"] == "kfac"
    for row in task["table"]:
        assert row["steps"] >= 2 and row["seed"] == 0
        for key in ("final", "median_step_ms", "mean_step_ms", "mean_step_cpu_ms"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["run"], key)
    best = [row for row in task["table"] if row["run"] == task["best"]][0]
    # The target is the best run's own final value: it reaches it, in its budget.
    assert task["target"] == best["final"] and best["steps_to_target"] <= best["steps"]
    assert 0 < best["seconds_to_target"] <= task["budget"] * 1.5
    kfac = task["kfac"]
    assert math.isfinite(kfac["final_median"]) and kfac["step_ratio_to_adam"] > 0
    if task["time_ratio"] is not None:
        assert task["time_ratio"] > 0 and task["verdict"].startswith(("meets", "misses"))
    else:
        assert task["verdict"] == "misses: KFAC does not reach the target"

    lines = (tmp_path / "panel_quick.md").read_text().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| task |"))
    row = lines[header + 2]
    assert row.startswith("| mlp |") and row.count("|") == lines[header].count("|") == 13
    for suffix in ("_time.png", "_steps.png", ".csv", ".json"):
        assert (tmp_path / f"panel_quick_mlp{suffix}").stat().st_size > 0

    # --kfac-only keeps the stored first-order runs and reruns KFAC alone.
    config = '{"damping": 0.1}'
    rerun = subprocess.run(
        command + ["--tasks", "mlp", "--kfac-only", "--kfac-config", config],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    again = json.loads((tmp_path / "panel_quick.json").read_text())["tasks"]["mlp"]
    label = 'kfac {"damping": 0.1}'
    assert again["kfac_label"] == label and again["first_order"] == "stored"
    first_order = {r["run"]: r["final"] for r in task["table"] if r["run"] != "kfac"}
    assert {r["run"]: r["final"] for r in again["table"] if r["run"] != label} == first_order
    assert "stored from an earlier run" in (tmp_path / "panel_quick.md").read_text()

    bad = subprocess.run(
        command + ["--tasks", "mlp,nosuch"], env=env, capture_output=True, text=True, timeout=120
    )
    assert bad.returncode != 0 and "unknown panel task(s) nosuch" in bad.stderr


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


def test_robust_step_cost_quick_mode():
    """benchmarks/robust.py: both runs timed interleaved, ratios to the
    fixed-damping run (1.00 for itself) and the load recorded."""
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "robust.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| KFAC(")]
    assert len(rows) == 2, result.stdout
    lm, fixed = ([float(c) for c in row.split("|")[2:6]] for row in rows)
    assert fixed[2:] == [1.0, 1.0]
    assert all(v > 0 for v in lm)
    assert "load average" in result.stdout


@pytest.mark.slow  # two KFAC compilations
def test_stepcost_quick_mode(tmp_path):
    env = dict(os.environ, KERAS_KFAC_RESULTS=str(tmp_path), TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "stepcost.py"), "--quick"]
    result = subprocess.run(
        command + ["--tasks", "mlp", "--steps", "12", "--round", "6", "--curve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    task = json.loads((tmp_path / "stepcost_breakdown_quick.json").read_text())["tasks"]["mlp"]
    assert set(task["runs"]) == {"adamw lr=0.001", "kfac"}
    kfac = task["runs"]["kfac"]
    # 11 timed steps (0 is the compile): statistics at 10, rho at 4 and 9.
    assert set(kfac["extra_ms"]) == {"stats", "rho"}
    assert kfac["plain_ms"] > 0 and kfac["first_step_s"] > 0 and math.isfinite(kfac["final"])
    assert [step for step, _ in kfac["curve"]] == [6, 12]
    assert task["runs"]["adamw lr=0.001"]["ratio"] == 1.0
    assert (tmp_path / "stepcost_breakdown_quick.md").stat().st_size > 0


@pytest.mark.slow  # one KFAC compilation under the profiler
def test_stepcost_profile_quick_mode(tmp_path):
    env = dict(os.environ, KERAS_KFAC_RESULTS=str(tmp_path), TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "stepcost.py"), "--quick"]
    result = subprocess.run(
        command + ["--profile", "--tasks", "mlp", "--steps", "12"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    task = json.loads((tmp_path / "stepcost_profile_quick.json").read_text())["tasks"]["mlp"]
    parts = task["parts"]
    # Steps 4-15: every step preconditions, step 10 updates the statistics.
    for name in ("model forward and backward", "kfac_precondition", "kfac_statistics"):
        assert parts[name] > 0, parts
    assert set(parts) <= {
        "model forward and backward",
        "kfac other (update, KL clip, momentum, checks)",
        *PROFILE_SCOPES,
    }
    assert (tmp_path / "stepcost_profile_quick.md").stat().st_size > 0


@pytest.mark.slow
def test_quadratic_model_spread_quick_mode(tmp_path):
    env = dict(os.environ, KERAS_KFAC_RESULTS=str(tmp_path), TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "quadratic_model.py"), "--quick"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    tasks = json.loads((tmp_path / "quadratic_quick.json").read_text())["tasks"]
    assert len(tasks) == 2
    for task in tasks.values():
        # The script's whole-batch values are the optimizer's own.
        assert task["check_rho_abs"] < 1e-4
        assert task["check_alpha_rel"] < 1e-4
        for row in task["adaptive"]:
            assert row["b_sub"]["efficiency_median"] > 0.5


def test_perstep_quick_mode(tmp_path):
    env = dict(os.environ, KERAS_KFAC_RESULTS=str(tmp_path), TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "perstep.py"), "--quick"]
    result = subprocess.run(
        command + ["--tasks", "mlp", "--diag-every", "5"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    task = json.loads((tmp_path / "perstep128_quick.json").read_text())["tasks"]["mlp"]
    assert task["checkpoints"] == [5, 10]
    assert set(task["curves"]) == {"adamw lr=0.001", "kfac", "momentum=0"}
    for curves in task["curves"].values():
        assert len(curves) == 1 and len(curves[0]) == 2 and all(map(math.isfinite, curves[0]))
    (diag,) = task["diagnostics"]["kfac"]
    # Diagnostics at steps 5 and 10: a damping, a rho and the clip's nu each.
    assert diag["damping_min"] > 0 and 0.0 <= diag["clip_share"] <= 1.0
    assert task["diagnostics"]["adamw lr=0.001"] == [None]
    assert "dense" in task["summary"]
    assert (tmp_path / "perstep128_quick.md").stat().st_size > 0


def test_warmup_quick_mode(tmp_path):
    env = dict(os.environ, KERAS_KFAC_RESULTS=str(tmp_path), TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "warmup.py"), "--quick"]
    result = subprocess.run(
        command + ["--tasks", "mlp", "--warmups", "0,4", "--round", "6"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    task = json.loads((tmp_path / "warmup_quick.json").read_text())["tasks"]["mlp"]
    base, warm = task["runs"]["curvature_warmup=0"], task["runs"]["curvature_warmup=4"]
    assert [step for step, _ in warm["curve"]] == [0, 6, 12]
    assert base["curve"][0] == warm["curve"][0]  # the same initial weights
    assert base["time_ratio"] == 1.0 and base["step_ratio"] == 1.0
    assert warm["mean_ms"] > 0 and math.isfinite(warm["at_equal_time"])
    assert (tmp_path / "warmup_quick.md").stat().st_size > 0
