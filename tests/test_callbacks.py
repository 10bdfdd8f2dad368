"""CurvatureMonitor, DampingScheduler and ``KFAC.diagnostics``: event files
are read back and their values checked against the optimizer's state."""

import glob
import os
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_kfac  # noqa: E402
from keras_kfac.callbacks import CurvatureMonitor, DampingScheduler  # noqa: E402
from reference import pi_correction, rel  # noqa: E402
from test_fallback import Scale  # noqa: E402


def read_events(directory):
    """``{tag: [(step, value), ...]}`` from every event file in ``directory``."""
    events = {}
    for path in sorted(glob.glob(os.path.join(directory, "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                events.setdefault(value.tag, []).append((event.step, tf.make_ndarray(value.tensor)))
    return events


def _convnet():
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(4, 3, activation="relu", name="conv"),
            keras.layers.Flatten(),
            keras.layers.Dense(3, name="logits"),
        ]
    )


def _classification(n=128, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 8, 8, 1)).astype("float32"), rng.integers(0, 3, n)


def _damped_condition(m, share):
    evals = np.clip(np.linalg.eigvalsh(m), 0.0, None)
    return (evals[-1] + share) / (evals[0] + share), evals


def test_curvature_monitor_writes_the_curvature_story(tmp_path):
    x, y = _classification()
    model = _convnet()
    # A fixed damping: every logged value is compared with the final one.
    opt = keras_kfac.KFAC(damping=3e-3, damping_adaptation_interval=0)
    model.compile(opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    log_dir = str(tmp_path / "run")
    model.fit(
        x,
        y,
        batch_size=16,
        epochs=1,
        verbose=0,
        callbacks=[
            keras.callbacks.TensorBoard(log_dir, update_freq=1),
            CurvatureMonitor(log_dir, update_freq=2),
        ],
    )
    events = read_events(os.path.join(log_dir, "train"))
    # Keras's own curves and ours, side by side in the same run directory.
    assert any(tag.startswith("batch_") or tag.startswith("epoch_") for tag in events)
    names = ("damping", "rho", "kl_clip_scale", "update_norm", "grad_norm", "grad_cosine")
    expected = {f"kfac/{n}" for n in names + ("skipped_steps",)}
    for layer in ("conv", "logits"):
        for f in ("A", "G"):
            quantities = ("trace", "min_eigenvalue", "max_eigenvalue", "condition_number")
            expected |= {f"kfac_layers/{layer}/{f}_{q}" for q in quantities}
            expected.add(f"kfac_spectra/{layer}/{f}")
        expected |= {f"kfac_layers/{layer}/pi", f"kfac_layers/{layer}/preconditioned_grad_norm"}
    assert expected <= set(events), expected - set(events)
    assert "kfac/alpha" not in events  # only with adaptive_step
    assert [s for s, _ in events["kfac/damping"]] == [2, 4, 6, 8]
    for _, value in events["kfac/damping"]:
        np.testing.assert_allclose(value, float(opt.damping), rtol=1e-6)
    # The last logged step is the last step: compare with the final factors.
    damping = float(opt.damping)
    for layer in ("conv", "logits"):
        factors = {
            k: np.asarray(v, np.float64) for k, v in opt.curvature_for(layer).factors().items()
        }
        a, g = factors["A"], factors["G"]
        pi = pi_correction(a, g)
        gamma = np.sqrt(damping)
        last = {tag: vals[-1][1] for tag, vals in events.items() if vals[-1][0] == 8}
        np.testing.assert_allclose(last[f"kfac_layers/{layer}/pi"], pi, rtol=1e-4)
        for name, m, share in (("A", a, pi * gamma), ("G", g, gamma / pi)):
            condition, evals = _damped_condition(m, share)
            np.testing.assert_allclose(
                last[f"kfac_layers/{layer}/{name}_condition_number"], condition, rtol=1e-3
            )
            np.testing.assert_allclose(
                last[f"kfac_layers/{layer}/{name}_trace"], np.trace(m), rtol=1e-4
            )
            np.testing.assert_allclose(
                last[f"kfac_layers/{layer}/{name}_max_eigenvalue"], evals[-1], rtol=1e-3
            )
            histogram = last[f"kfac_spectra/{layer}/{name}"]  # (buckets, [left, right, count])
            np.testing.assert_allclose(histogram[:, 2].sum(), len(m))
    for _, value in events["kfac/grad_cosine"]:
        assert 0.0 < value <= 1.0 + 1e-6  # P is positive definite
    for _, value in events["kfac/kl_clip_scale"]:
        assert 0.0 < value <= 1.0


def test_fidelity_against_the_exact_fisher_of_linear_regression(tmp_path):
    """For a linear layer with MSE the exact Fisher block is
    ``(2/(n m)) kron(Xb^T Xb, I)``; the logged relative error is
    ``||F - curvature_matrix||_F / ||F||_F``."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 3)).astype("float32")
    y = rng.normal(size=(32, 2)).astype("float32")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="linear")])
    opt = keras_kfac.KFAC(seed=0)
    model.compile(opt, loss="mse")
    log_dir = str(tmp_path)
    model.fit(
        x,
        y,
        batch_size=32,
        epochs=3,
        verbose=0,
        callbacks=[CurvatureMonitor(log_dir, update_freq=1, fidelity_layers=["linear"])],
    )
    xb = np.concatenate([x, np.ones((32, 1), "float32")], axis=1).astype(np.float64)
    exact = (2.0 / 64) * np.kron(xb.T @ xb, np.eye(2))
    approx = np.asarray(opt.curvature_matrix("linear"), np.float64)
    expected = rel(approx, exact)
    events = read_events(os.path.join(log_dir, "train"))
    step, logged = events["kfac_layers/linear/fidelity_relative_error"][-1]
    assert step == 3
    np.testing.assert_allclose(logged, expected, rtol=1e-3)
    assert expected > 1e-3  # sampled G is an estimate of the exact (2/m) I


def test_fidelity_of_a_convnet_matches_the_brute_force_block(tmp_path):
    """The in-step exact block (per-output backward passes through the
    sampled-Fisher tape) against ``J^T H J`` built from full Jacobians."""
    x, y = _classification(n=16)
    model = _convnet()
    opt = keras_kfac.KFAC(stats_decay=0.0, seed=1)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(opt, loss=loss)
    before = model.get_weights()
    model.fit(
        x,
        y,
        batch_size=16,
        epochs=1,
        verbose=0,
        callbacks=[CurvatureMonitor(str(tmp_path), update_freq=1, fidelity_layers=["conv"])],
    )
    after = model.get_weights()
    model.set_weights(before)
    conv = model.get_layer("conv")
    with tf.GradientTape() as tape:
        logits = model(x)
    jac = tape.jacobian(logits, [conv.kernel, conv.bias])
    j = np.concatenate([np.reshape(t, (16, 3, -1)) for t in jac], axis=2)  # (n, out, P)
    p = tf.nn.softmax(logits).numpy().astype(np.float64)
    exact = sum(j[i].T @ (np.diag(p[i]) - np.outer(p[i], p[i])) @ j[i] for i in range(16)) / 16
    model.set_weights(after)
    approx = np.asarray(opt.curvature_matrix("conv"), np.float64)
    expected = rel(approx, exact)
    logged = read_events(os.path.join(str(tmp_path), "train"))[
        "kfac_layers/conv/fidelity_relative_error"
    ]
    np.testing.assert_allclose(logged[-1][1], expected, rtol=2e-3)


def test_damping_scheduler_sets_the_variable_per_epoch(tmp_path):
    x, y = _classification(n=64)
    model = _convnet()
    opt = keras_kfac.KFAC(damping=1.0)
    model.compile(opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    schedule = lambda epoch: 1e-2 * 0.1**epoch  # noqa: E731
    history = model.fit(
        x,
        y,
        batch_size=32,
        epochs=3,
        verbose=0,
        callbacks=[DampingScheduler(schedule), CurvatureMonitor(str(tmp_path), update_freq=1)],
    )
    np.testing.assert_allclose(history.history["damping"], [1e-2, 1e-3, 1e-4], rtol=1e-6)
    np.testing.assert_allclose(float(opt.damping), 1e-4, rtol=1e-6)
    events = read_events(os.path.join(str(tmp_path), "train"))
    logged = dict(events["kfac/damping"])
    assert sorted(logged) == [1, 2, 3, 4, 5, 6]
    for step, value in logged.items():
        np.testing.assert_allclose(value, schedule((step - 1) // 2), rtol=1e-6)


def test_diagnostics_in_a_hand_written_loop():
    """``track_diagnostics`` + ``diagnostics()``: the gradient and update norms
    and the cosine between gradient and natural direction, recomputed here."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(16, 4)).astype("float32")
    y = rng.integers(0, 3, 16)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="dense")])
    opt = keras_kfac.KFAC(
        model=model, fisher="empirical", momentum=0.0, kl_clip=None, learning_rate=0.1
    )
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    opt.build(model.trainable_variables)
    opt.track_diagnostics(every=1)

    @tf.function
    def train_step():
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return grads

    before = [v.numpy() for v in model.trainable_variables]
    grads = [g.numpy() for g in train_step()]
    after = [v.numpy() for v in model.trainable_variables]
    d = {k: v.numpy() for k, v in opt.diagnostics().items()}
    g = np.concatenate([t.ravel() for t in grads])
    update = np.concatenate([(a - b).ravel() for a, b in zip(after, before)])
    np.testing.assert_allclose(d["grad_norm"], np.linalg.norm(g), rtol=1e-5)
    np.testing.assert_allclose(d["update_norm"], np.linalg.norm(update), rtol=1e-4)
    # update = -lr * P(g) (momentum 0, no clipping): cos(g, P g) = cos(g, -update)
    np.testing.assert_allclose(
        d["grad_cosine"], -(g @ update) / (np.linalg.norm(g) * np.linalg.norm(update)), rtol=1e-4
    )
    np.testing.assert_allclose(
        d["dense/preconditioned_grad_norm"], np.linalg.norm(update) / 0.1, rtol=1e-4
    )
    assert d["diagnostics_step"] == 1 and d["kl_clip_scale"] == 1.0
    assert np.isnan(d["rho"])  # rho needs model.compute_loss, not called in this loop


@pytest.mark.parametrize(
    "options",
    [
        dict(momentum=0.9, kl_clip=1e-3),
        dict(momentum=0.0, kl_clip=None),
        dict(adaptive_step=True),
        dict(momentum=0.9, weight_decay=0.1),
    ],
    ids=["momentum", "plain", "adaptive_step", "weight_decay"],
)
def test_the_step_start_is_restored_without_a_weight_copy(options):
    """The monitor copies only the weights the optimizer cannot restore (the
    fallback's, and with weight decay the decayed ones); every step's
    ``update_norm`` (new weights minus the start it restores) matches the
    change measured outside, on every update path, over several steps."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(16, 4)).astype("float32")
    y = rng.integers(0, 3, 16)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(5, activation="tanh", name="hidden"),
            Scale(name="scale"),
            keras.layers.Dense(3, name="out"),
        ]
    )
    model.compile(
        optimizer=keras_kfac.KFAC(learning_rate=0.3, stats_every=1, inverse_every=1, **options),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    opt = model.optimizer
    with pytest.warns(UserWarning, match="Adam fallback"):
        opt.build(model.trainable_variables)
    restorable = {
        v.path.removeprefix(f"{model.name}/"): opt._restorable(v) for v in model.trainable_variables
    }
    decayed = "weight_decay" in options
    assert restorable == {
        "hidden/kernel": not decayed,
        "hidden/bias": not decayed,
        "scale/scale": False,
        "out/kernel": not decayed,
        "out/bias": not decayed,
    }
    opt.track_diagnostics(every=1)
    for _ in range(3):
        before = [v.numpy() for v in model.trainable_variables]
        model.train_on_batch(x, y)
        change = np.concatenate(
            [(v.numpy() - b).ravel() for v, b in zip(model.trainable_variables, before)]
        )
        d = opt.diagnostics()
        assert np.linalg.norm(change) > 1e-4
        np.testing.assert_allclose(d["update_norm"], np.linalg.norm(change), rtol=1e-5)
        assert np.isfinite(float(d["rho"]))


def test_monitor_and_adaptive_damping_with_jit_compile_and_steps_per_execution(tmp_path):
    from keras_kfac.callbacks import AdaptiveDamping

    x, y = _classification(n=64)
    model = _convnet()
    opt = keras_kfac.KFAC(adaptive_step=True)
    model.compile(
        opt,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=True,
        steps_per_execution=2,
    )
    history = model.fit(
        x,
        y,
        batch_size=16,
        epochs=2,
        verbose=0,
        callbacks=[CurvatureMonitor(str(tmp_path), update_freq=2), AdaptiveDamping(every=2)],
    )
    events = read_events(os.path.join(str(tmp_path), "train"))
    assert [s for s, _ in events["kfac/alpha"]] == [2, 4, 6, 8]
    assert all(np.isfinite(v) for _, v in events["kfac/alpha"])
    assert all(np.isfinite(v) for _, v in events["kfac/rho"])
    assert np.isfinite(history.history["loss"]).all()
    # The LM rule on each logged rho (steps 2, 4, 6, 8), from the default 1e-2.
    decay, expected = AdaptiveDamping().decay, 1e-2
    for _, rho in events["kfac/rho"]:
        expected *= decay if rho > 0.75 else 1.0 / decay if rho < 0.25 else 1.0
    assert expected != 1e-2, [r for _, r in events["kfac/rho"]]  # the rule did act
    np.testing.assert_allclose(history.history["damping"][-1], expected, rtol=1e-5)
    np.testing.assert_allclose(float(opt.damping), expected, rtol=1e-5)


@pytest.mark.slow
def test_tensorboard_monitoring_example_quick(tmp_path_factory, raw_data, tfds_dir):
    """examples/tensorboard_monitoring.py --quick end to end: the curves are
    written and read back, and the tensorboard command is printed."""
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    raw_data("fashion-mnist")
    log_dir = tmp_path_factory.mktemp("tb")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(repo, "examples", "tensorboard_monitoring.py"),
            "--quick",
            "--verbose",
            "2",
            "--data-dir",
            tfds_dir,
            "--log-dir",
            str(log_dir),
        ],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert f"tensorboard --logdir {log_dir}" in proc.stdout
    events = read_events(os.path.join(str(log_dir), "train"))
    assert [s for s, _ in events["kfac/rho"]] == [2, 4]
    assert "kfac_layers/conv1/fidelity_relative_error" in events
    assert any(tag.startswith(("batch_", "epoch_")) for tag in events)  # Keras's own curves


def test_damping_adapts_only_every_steps_while_rho_is_logged_each_step(tmp_path):
    """AdaptiveDamping(every=4) with logging every step: rho is written at
    every step but the LM rule runs on steps 4 and 8 only (linear regression:
    rho ~ 1, so the damping halves twice)."""
    from keras_kfac.callbacks import AdaptiveDamping

    x, y = _linear_regression()
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    opt = keras_kfac.KFAC(damping=1e-2)
    model.compile(opt, loss="mse")
    model.fit(
        x,
        y,
        batch_size=32,
        epochs=8,
        verbose=0,
        callbacks=[
            CurvatureMonitor(str(tmp_path), update_freq=1),
            AdaptiveDamping(every=4, decay=0.5),
        ],
    )
    events = read_events(os.path.join(str(tmp_path), "train"))
    rho = dict(events["kfac/rho"])
    assert sorted(rho) == list(range(1, 9))
    assert all(0.75 < r < 1.01 for r in rho.values())
    logged = dict(events["kfac/damping"])  # the damping each step used
    np.testing.assert_allclose([logged[s] for s in range(1, 9)], [1e-2] * 4 + [5e-3] * 4, rtol=1e-6)
    np.testing.assert_allclose(float(opt.damping), 2.5e-3, rtol=1e-6)


def _linear_regression(seed=3):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(32, 3)).astype("float32")
    y = (x @ rng.normal(size=(3, 1)) + 0.5 * rng.normal(size=(32, 1))).astype("float32")
    return x, y


def test_kfac_adapts_its_damping_by_default_every_five_steps(tmp_path):
    """KFAC() runs the LM rule itself (damping_adaptation_interval=5, decay
    0.95**5): on a linear regression rho ~ 1 at steps 5 and 10, so the
    damping falls by 0.95**5 twice; every other step keeps it."""
    x, y = _linear_regression()
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    opt = keras_kfac.KFAC(damping=1e-2)
    model.compile(opt, loss="mse")
    model.fit(
        x,
        y,
        batch_size=32,
        epochs=10,
        verbose=0,
        callbacks=[CurvatureMonitor(str(tmp_path), update_freq=1)],
    )
    events = read_events(os.path.join(str(tmp_path), "train"))
    rho = dict(events["kfac/rho"])
    assert 0.75 < rho[5] < 1.01 and 0.75 < rho[10] < 1.01
    logged = dict(events["kfac/damping"])
    expected = [1e-2] * 5 + [1e-2 * 0.95**5] * 5
    np.testing.assert_allclose([logged[s] for s in range(1, 11)], expected, rtol=1e-5)
    np.testing.assert_allclose(float(opt.damping), 1e-2 * 0.95**10, rtol=1e-5)
    config = opt.get_config()
    assert config["damping_adaptation_interval"] == 5
    assert keras_kfac.KFAC.from_config(config).damping_adaptation_interval == 5


def test_default_damping_adaptation_comes_back_after_adaptive_damping():
    from keras_kfac.callbacks import AdaptiveDamping

    x, y = _linear_regression()
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    opt = keras_kfac.KFAC(damping=1e-2)
    model.compile(opt, loss="mse")
    model.fit(
        x, y, batch_size=32, epochs=4, verbose=0, callbacks=[AdaptiveDamping(every=2, decay=0.5)]
    )
    after_callback = float(opt.damping)
    np.testing.assert_allclose(after_callback, 2.5e-3, rtol=1e-6)
    # Without the callback: the constructor's rule again (steps 5, 10, ...
    # of the optimizer's step count).
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    at_five = float(opt.damping)
    np.testing.assert_allclose(at_five, after_callback * 0.95**5, rtol=1e-5)
    model.fit(x, y, batch_size=32, epochs=4, verbose=0)
    np.testing.assert_allclose(float(opt.damping), at_five, rtol=1e-6)
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    np.testing.assert_allclose(float(opt.damping), at_five * 0.95**5, rtol=1e-5)


def test_fixed_damping_when_the_train_step_has_no_batch_loss():
    """A custom train_step that never calls compute_loss: KFAC() trains, says
    once that its damping stays fixed, and keeps it."""

    class Custom(keras.Model):
        def train_step(self, data):
            x, y = data
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(self(x, training=True) - y))
            grads = tape.gradient(loss, self.trainable_variables)
            self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
            return {"mse": loss}  # "loss" would be Keras's own (empty) tracker

    x, y = _linear_regression()
    inputs = keras.Input((3,))
    model = Custom(inputs, keras.layers.Dense(1)(inputs))
    opt = keras_kfac.KFAC(damping=1e-2, fisher="empirical")
    model.compile(opt)
    with pytest.warns(UserWarning, match="keeps its damping fixed"):
        history = model.fit(x, y, batch_size=32, epochs=12, verbose=0)
    losses = history.history["mse"]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    np.testing.assert_allclose(float(opt.damping), 1e-2, rtol=1e-7)


def test_damping_adaptation_interval_rejects_bad_values():
    with pytest.raises(ValueError, match="damping_adaptation_interval must be an integer >= 0"):
        keras_kfac.KFAC(damping_adaptation_interval=-1)


@pytest.mark.parametrize("kind", ["lstm", "gru_adaptive_damping"])
def test_damping_adapts_through_a_recurrent_layer_in_a_traced_step(kind):
    """TF 2.21 cannot run an LSTM's traced forward pass under forward-mode
    autodiff; the layer blocks declare it, and rho's products take reverse
    passes instead (brute force: test_adaptive.py): the LM default and
    AdaptiveDamping adapt the damping by the measured rho, silently."""
    from keras_kfac.callbacks import AdaptiveDamping

    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 4, 2)).astype("float32")
    y = rng.integers(0, 3, 16)
    rnn = keras.layers.LSTM(3) if kind == "lstm" else keras.layers.GRU(3)
    model = keras.Sequential([keras.Input((4, 2)), rnn, keras.layers.Dense(3)])
    opt = keras_kfac.KFAC(damping=1e-2)
    model.compile(opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    callbacks = [AdaptiveDamping(every=2)] if kind != "lstm" else []
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        history = model.fit(x, y, batch_size=8, epochs=3, verbose=0, callbacks=callbacks)
    assert np.isfinite(history.history["loss"]).all()
    assert opt.monitor.forward_mode_blockers
    rho = float(opt.diagnostics()["rho"])
    assert np.isfinite(rho) and int(opt.diagnostics()["rho_step"]) > 0
    assert abs(float(opt.damping) - 1e-2) > 1e-4


def test_an_unexpected_error_while_tracing_rho_propagates(monkeypatch):
    """Only the layers known to block forward mode keep the damping fixed;
    any other error in rho's passes is a bug and must surface."""
    from keras_kfac import quadratic

    def broken(self, values):
        raise TypeError("injected failure in the batch objective")

    monkeypatch.setattr(quadratic.BatchObjective, "loss", broken)
    x, y = _linear_regression()
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(keras_kfac.KFAC(damping=1e-2), loss="mse")
    with pytest.raises(TypeError, match="injected failure"):
        model.fit(x, y, batch_size=32, epochs=2, verbose=0)
