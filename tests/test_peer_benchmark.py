"""benchmarks/peer.py: the problem is the kfac-jax peer's (data order, loss,
initialization), its files have the peer's columns, and the joint report's
clock and targets are right."""

import csv
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import peer  # noqa: E402

# The columns ../shared/peers/kfac_jax_autoencoder.py writes.
PEER_COLUMNS = {
    "curve": [
        "step",
        "t",
        "t_excl_compile",
        "loss",
        "bce",
        "bce_avg10",
        "lr",
        "mom",
        "damp",
        "other_cpu_frac",
        "own_cpu_per_wall",
    ],  # fmt: skip
    "eval": ["step", "t", "eval_bce_train10k"],
    "steptimes": ["step", "step_s", "cpu_s", "compile_s"],
}


def test_batches_follow_the_peer_order_across_epochs():
    x = np.arange(62, dtype=np.float32)[:, None]  # 12 batches of 5 per epoch, 2 rows dropped
    rng = np.random.default_rng(3)
    first, second = rng.permutation(62), rng.permutation(62)
    batches = peer.peer_batches(x, 5, seed=3, skip=11)
    np.testing.assert_array_equal(next(batches)[:, 0], first[55:60])  # 12th batch of epoch 1
    np.testing.assert_array_equal(next(batches)[:, 0], second[0:5])
    np.testing.assert_array_equal(next(batches)[:, 0], second[5:10])


def test_loss_is_summed_bce_plus_half_l2_and_init_is_glorot():
    l2 = 1e-2  # large enough to matter in float32
    model = peer.build_model(l2, seed=0)
    peer.compile_model(model, keras.optimizers.SGD())
    sizes = [784, 1000, 500, 250, 30, 250, 500, 1000, 784]
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    assert [d.kernel.shape for d in dense] == list(zip(sizes[:-1], sizes[1:]))
    for d, (fan_in, fan_out) in zip(dense, zip(sizes[:-1], sizes[1:])):
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        kernel = d.kernel.numpy()
        assert np.abs(kernel).max() <= limit and np.abs(kernel).max() > 0.9 * limit
        np.testing.assert_allclose(kernel.std(), limit / np.sqrt(3.0), rtol=0.05)
        assert not d.bias.numpy().any()
    x = np.random.default_rng(0).uniform(size=(8, 784)).astype(np.float32)
    logits = model(x).numpy().astype(np.float64)
    bce = np.logaddexp(0.0, logits) - x * logits  # -x log s(z) - (1 - x) log(1 - s(z))
    squares = sum(float(np.sum(v.numpy().astype(np.float64) ** 2)) for v in model.weights)
    expected = bce.sum(axis=1).mean() + l2 / 2 * squares
    loss = float(model.compute_loss(x=x, y=x, y_pred=model(x), training=True))
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def _write_run(folder, tag, opt, step_s, compile_s, evals, budget):
    """A run in the peer's file format: evaluation rows (step, t, value)."""
    with open(folder / f"steptimes_{tag}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(PEER_COLUMNS["steptimes"])
        for k, (s, c) in enumerate(zip(step_s, compile_s)):
            w.writerow([k + 1, s, s, c])
    with open(folder / f"eval_{tag}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(PEER_COLUMNS["eval"])
        w.writerows(evals)
    summary = dict(
        tag=tag,
        opt=opt,
        steps=len(step_s),
        budget_s=budget,
        wall_after_first_s=evals[-1][1],
        median_step_ms=1000 * float(np.median(step_s[1:])),
        final_eval_bce_train10k=evals[-1][2],
    )
    (folder / f"summary_{tag}.json").write_text(json.dumps(summary))


def test_report_excludes_the_peers_recompile_and_finds_both_targets(tmp_path):
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    theirs.mkdir()
    # Peer: 1 s steps, step 3 recompiles for 11 s (10 s more than the median).
    step_s = [20.0, 1.0, 11.0, 1.0, 1.0, 1.0, 1.0]
    _write_run(
        theirs, "kfac", "kfac", step_s, [9, 0, 10, 0, 0, 0, 0],
        [(2, 1.0, 90.0), (4, 13.0, 61.0), (6, 15.0, 58.0), (7, 16.0, 57.5)], budget=16,
    )  # fmt: skip
    _write_run(
        ours, "fast", "keras_kfac", [5.0] + [0.5] * 9, [0] * 10,
        [(2, 0.5, 80.0), (4, 1.5, 70.0), (8, 3.5, 60.0), (10, 4.5, 57.0)], budget=4,
    )  # fmt: skip
    # Stopped by its step count, not its budget: per-step table only.
    _write_run(ours, "steps", "keras_kfac", [5.0, 0.5, 0.5], [0] * 3, [(2, 0.5, 75.0)], budget=1e9)
    peer.report([str(ours), str(theirs)], 4.0, str(tmp_path / "out" / "peer"), marks=(2, 4))
    payload = json.loads((tmp_path / "out" / "peer.json").read_text())
    assert payload["peer_end"] == 57.5
    race = {row["name"]: row for row in payload["race"]}
    assert set(race) == {"kfac-jax kfac", "fast"}
    assert race["kfac-jax kfac"]["seconds_to_target"] == pytest.approx(3.0)  # 13 s minus 10 s
    assert race["kfac-jax kfac"]["steps_to_target"] == 4
    assert race["fast"]["seconds_to_target"] == pytest.approx(3.5)
    assert race["fast"]["seconds_to_peer_end"] == pytest.approx(4.5)
    assert payload["steps_table"]["steps"] == {"2": 75.0, "4": None}
    assert payload["steps_table"]["fast"] == {"2": 80.0, "4": 70.0}
    assert (tmp_path / "out" / "peer.png").stat().st_size > 0


def test_quick_mode_writes_the_peers_columns(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    (tmp_path / "peer").mkdir()
    script = os.path.join(ROOT, "benchmarks", "peer.py")
    result = subprocess.run(
        [sys.executable, script, "--quick", "--out-dir", str(tmp_path), "--peer-dir",
         str(tmp_path / "peer"), "--kfac-config", '{"inverse_every": 5}'],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for kind, columns in PEER_COLUMNS.items():
        with open(tmp_path / f"{kind}_keras_kfac.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert list(rows[0]) == columns
    summary = json.loads((tmp_path / "summary_keras_kfac.json").read_text())
    assert summary["steps"] == 12 and summary["kfac_config"] == {"inverse_every": 5}
    evals = json.loads((tmp_path / "peer.json").read_text())["steps_table"]["keras_kfac"]
    # From 543 at initialization (logits 0 would give 784 log 2 = 543).
    assert 0 < evals["10"] < evals["5"] < 543
