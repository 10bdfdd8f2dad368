"""Checkpoints and crash-resume (issue 7): ``model.save``/``load_model``
mid-training for every curvature method, ``tf.train.Checkpoint`` in a custom
loop, and ``keras.callbacks.BackupAndRestore`` after a SIGKILL. In each case
the resumed run must equal an uninterrupted one."""

import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import tensorflow as tf

import checkpoint_resume_script
import keras_kfac
from keras_kfac import curvature as curvature_lib

SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def data(n=32, d=5, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype("float32")
    y = np.argmax(x @ rng.normal(size=(d, classes)), axis=1)
    return x, y


def every_method_model(damping_mode):
    """One Dense layer per curvature method (``available()``), chained, so a
    single save/load covers the state of every method."""
    methods = curvature_lib.available()
    keras.utils.set_random_seed(0)
    layers = [keras.Input((5,))]
    for i, method in enumerate(methods):
        last = i == len(methods) - 1
        layers.append(
            keras.layers.Dense(
                3 if last else 5, activation=None if last else "tanh", name=f"d_{method}"
            )
        )
    model = keras.Sequential(layers)
    opt = keras_kfac.KFAC(
        curvature={f"d_{m}": m for m in methods},
        damping_mode=damping_mode,
        inverse_every=3,
        stats_decay=0.9,
        seed=7,
        learning_rate=0.02,
        curvature_options={"batch_size": 8, "inverse_every": 3},  # "auto"
    )
    model.compile(optimizer=opt, loss=SCCE)
    return model, opt, methods


def assert_same_state(model, reference, opt, ref_opt, tol=1e-6):
    for a, b in zip(model.weights, reference.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=tol, atol=tol, err_msg=a.path)
    assert len(opt.variables) == len(ref_opt.variables)
    for a, b in zip(opt.variables, ref_opt.variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=tol, atol=tol, err_msg=a.path)


def test_save_load_mid_training_equals_uninterrupted_for_every_method(tmp_path):
    # damping_mode="factored": the two-Kronecker-term methods support no other.
    damping_mode = "factored"
    x, y = data()
    fit = dict(batch_size=8, shuffle=False, verbose=0)
    reference, ref_opt, methods = every_method_model(damping_mode)
    reference.fit(x, y, epochs=4, **fit)
    assert sorted(type(c).name for c in ref_opt.estimator.curvatures) == sorted(methods)

    model, opt, _ = every_method_model(damping_mode)
    model.fit(x, y, epochs=2, **fit)
    path = str(tmp_path / "mid.keras")
    model.save(path)
    del model, opt
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.optimizer, keras_kfac.KFAC)
    assert int(loaded.optimizer.iterations.numpy()) == 8
    loaded.fit(x, y, epochs=2, **fit)
    assert int(loaded.optimizer.iterations.numpy()) == 16
    assert_same_state(loaded, reference, loaded.optimizer, ref_opt)


def custom_loop_setup(seed):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(6, activation="relu"), keras.layers.Dense(3)]
    )
    opt = keras_kfac.KFAC(model=model, loss=SCCE, inverse_every=2, seed=11)

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = SCCE(yb, model(xb, training=True))
        opt.apply_gradients(
            zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        )
        return loss

    return model, opt, step


def test_tf_train_checkpoint_in_a_custom_loop(tmp_path):
    x, y = data()
    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 32, 8)] * 3
    model, opt, step = custom_loop_setup(0)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=opt)
    for xb, yb in batches[:5]:
        step(xb, yb)
    path = checkpoint.save(str(tmp_path / "ckpt"))
    for xb, yb in batches[5:]:
        step(xb, yb)

    # A fresh model (other initial weights) and optimizer, restored.
    restored, restored_opt, restored_step = custom_loop_setup(1)
    restored_opt.build(restored.trainable_variables)
    status = tf.train.Checkpoint(model=restored, optimizer=restored_opt).restore(path)
    status.assert_existing_objects_matched()
    assert int(restored_opt.iterations.numpy()) == 5
    for xb, yb in batches[5:]:
        restored_step(xb, yb)
    assert int(restored_opt.iterations.numpy()) == 12
    assert_same_state(restored, model, restored_opt, opt)


def _run(args, timeout):
    env = dict(
        os.environ,
        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
        TF_CPP_MIN_LOG_LEVEL="3",
    )
    return subprocess.Popen(
        [sys.executable, os.path.join(HERE, "checkpoint_resume_script.py"), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_backup_and_restore_resumes_exactly_after_sigkill(tmp_path):
    """The script is killed with SIGKILL in the middle of epoch 2 (of 4); the
    restarted script resumes from the backup of the end of epoch 1 (weights,
    factors, inverses, momentum, step counters and the sampling RNG) and
    finishes with the weights of an uninterrupted run. Tolerance 1e-6
    (same process layout and ops; observed identical)."""
    backup, out = str(tmp_path / "backup"), str(tmp_path / "out.json")
    marker = str(tmp_path / "hanging")
    crashed = _run([backup, out, "2", "3", marker], timeout=None)
    try:
        deadline = time.monotonic() + 240
        while not os.path.exists(marker):
            assert crashed.poll() is None, crashed.stdout.read()
            assert time.monotonic() < deadline, "the script did not reach the hang point"
            time.sleep(0.2)
        os.kill(crashed.pid, signal.SIGKILL)
        assert crashed.wait(timeout=60) == -signal.SIGKILL
    finally:
        if crashed.poll() is None:
            crashed.kill()
            crashed.wait()
    assert not os.path.exists(out)
    assert os.path.exists(os.path.join(backup, "latest.weights.h5"))

    resumed = _run([backup, out], timeout=None)
    try:
        output, _ = resumed.communicate(timeout=300)
    finally:
        if resumed.poll() is None:
            resumed.kill()
            resumed.wait()
    assert resumed.returncode == 0, output
    with open(out) as f:
        result = json.load(f)
    assert result["epochs"] == [2, 3]  # resumed, not restarted
    assert result["iterations"] == 4 * 8

    weights, iterations, epochs = checkpoint_resume_script.train(str(tmp_path / "reference_backup"))
    assert epochs == [0, 1, 2, 3] and iterations == 32
    for got, want in zip(result["weights"], weights):
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-6, atol=1e-6)
