"""tf.distribute: MirroredStrategy on 2 logical CPU devices and
MultiWorkerMirroredStrategy with 2 worker processes, against one device.

Logical devices must be configured before TensorFlow initializes its devices,
so every check runs in its own Python process (the scripts next to this file)
and reports JSON; these tests launch them with bounded timeouts and always
kill what they started.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from keras_kfac import curvature, distributed

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _env():
    env = dict(os.environ)
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("TF_CONFIG", None)
    return env


def _run(args, timeout):
    proc = subprocess.Popen(
        [sys.executable, *args],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    return out, err


def mirrored(configs, steps=3, timeout=500):
    out, err = _run(
        [
            os.path.join(HERE, "distributed_mirrored_check.py"),
            "--configs",
            ",".join(configs),
            "--steps",
            str(steps),
        ],
        timeout,
    )
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert lines, err[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


def check_matches_single_device(result):
    for config, r in result.items():
        assert "error" not in r, (config, r.get("error"))
        assert r["replicas"] == 2 and r["copies_per_weight"] == 2, config
        # The run did something: weights moved well beyond the tolerance.
        assert r["weights_moved"] > 1e-2, (config, r)
        # Every replica's factors are the single-device global-batch factors.
        if r["factor_variables"]:
            assert r["max_factor_error"] < 1e-5, (config, r)
        # Every replica's weights are the single-device weights after the steps.
        assert r["max_weight_error"] < 2e-5, (config, r)


FAST = [
    "kfac:sampled",
    "kfac:empirical",
    "tengrad:sampled",
    "jit",
    "adaptive_step",
    "adaptive_damping",
]


def test_mirrored_strategy_matches_single_device_and_rejects_jit_compile():
    result = mirrored(FAST)
    jit = result.pop("jit")
    quadratic = [result.pop("adaptive_step"), result.pop("adaptive_damping")]
    check_matches_single_device(result)
    # The quadratic model is evaluated per replica (not reduced yet): refused
    # clearly rather than letting the replicas drift apart.
    for refused in quadratic:
        assert refused["raised"] == "DistributionError", refused
        assert "not reduced across" in refused["message"]
    assert result["kfac:sampled"]["factor_variables"], result
    # jit_compile=True with MirroredStrategy fails in Keras 3.15 even for SGD;
    # KFAC says so before tracing instead of XLA's device error.
    assert jit["raised"] == "DistributionError", jit
    assert "jit_compile=True does not work with MirroredStrategy" in jit["message"]


@pytest.mark.slow
def test_mirrored_strategy_every_curvature_method():
    configs = [m for m in curvature.available() if m not in ("kfac", "tengrad")]
    configs += ["kfac:sampled:eigen"]
    result = mirrored(configs, timeout=1500)
    assert set(result) == set(configs)
    check_matches_single_device(result)


def test_refresh_assignment_is_greedy_by_cost():
    costs = [1000, 8, 729, 0, 343, 27]
    owners = distributed.assign_owners(costs, 2)
    # Largest first, each to the least loaded replica; no work, no owner:
    # 1000 -> 0, 729 -> 1, 343 -> 1 (729 < 1000), 27 -> 0, 8 -> 0.
    assert owners == [0, 0, 1, -1, 1, 0]
    load = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(2)]
    assert load == [1035, 1072]
    assert distributed.assign_owners(costs, 1) == [0, 0, 0, -1, 0, 0]


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _multiworker(method, fisher, tmp, timeout=300):
    script = os.path.join(HERE, "distributed_multiworker_check.py")
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    try:
        for index in range(2):
            env = _env()
            env["TF_CONFIG"] = json.dumps(
                {"cluster": cluster, "task": {"type": "worker", "index": index}}
            )
            out = os.path.join(tmp, f"worker{index}.npz")
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        script,
                        "worker",
                        "--out",
                        out,
                        "--method",
                        method,
                        "--fisher",
                        fisher,
                    ],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        errors = [p.communicate(timeout=timeout)[1] for p in procs]
        for p, err in zip(procs, errors):
            assert p.returncode == 0, err[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    single = os.path.join(tmp, "single.npz")
    _run([script, "single", "--out", single, "--method", method, "--fisher", fisher], timeout)
    return [np.load(os.path.join(tmp, f"worker{i}.npz")) for i in range(2)], np.load(single)


@pytest.mark.parametrize("method,fisher", [("kfac", "sampled")])
def test_multi_worker_mirrored_strategy_matches_single_process(method, fisher):
    with tempfile.TemporaryDirectory() as tmp:
        workers, single = _multiworker(method, fisher, tmp)
        count = len([k for k in single.files if k.startswith("w")])
        assert count == 6
        for w in workers:
            assert int(w["replicas"]) == 2
            assert int(w["iterations"]) == int(single["iterations"]) == 3
            for i in range(count):
                np.testing.assert_array_equal(w[f"init{i}"], single[f"init{i}"])
        moved = sum(
            float(np.sum((single[f"w{i}"] - single[f"init{i}"]) ** 2)) for i in range(count)
        )
        assert moved > 1e-4
        for i in range(count):
            # Equal across workers (each updates its own copy) ...
            np.testing.assert_allclose(workers[0][f"w{i}"], workers[1][f"w{i}"], rtol=0, atol=0)
            # ... and equal to one process on the same global batches.
            np.testing.assert_allclose(workers[0][f"w{i}"], single[f"w{i}"], rtol=2e-5, atol=1e-6)
