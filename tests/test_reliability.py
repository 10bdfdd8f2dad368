"""Reliability (issue 7): numerical faults, mixed precision, bad input, and
the cases that are handled rather than refused.

Faults are injected, never mocked: NaN batches, overflowing statistics,
factors forced singular, damping 0. Each test compares numbers (weights,
factors, counters) with a fault-free run or a brute-force reference.
"""

import numpy as np
import pytest
import keras
import tensorflow as tf

import keras_kfac
from reference import exact_fisher_block, per_example_gradients

SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def classification_data(n=64, d=6, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype("float32")
    y = np.argmax(x @ rng.normal(size=(d, classes)), axis=1)
    return x, y


def optimizer_state(opt):
    """Every optimizer variable except the step counters, by path."""
    skip = ("iteration", "skipped_steps")
    return {v.path: v.numpy().copy() for v in opt.variables if not any(s in v.path for s in skip)}


# --- numerical faults ---------------------------------------------------------


def nan_injection_run(inject):
    """Two epochs of 10 batches of 8; with ``inject`` a batch of NaN inputs is
    inserted after the 5th batch of each epoch."""
    x, y = classification_data(n=80)
    xs, ys = [x[i : i + 8] for i in range(0, 80, 8)], [y[i : i + 8] for i in range(0, 80, 8)]
    if inject:
        xs.insert(5, np.full((8, 6), np.nan, "float32"))
        ys.insert(5, y[:8])
    ds = tf.data.Dataset.from_tensor_slices((np.concatenate(xs), np.concatenate(ys))).batch(8)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="tanh"),
            keras.layers.LayerNormalization(),  # Adam fallback: bias correction uses the step
            keras.layers.Dense(3),
        ]
    )
    opt = keras_kfac.KFAC(
        learning_rate=keras.optimizers.schedules.ExponentialDecay(0.05, 4, 0.7),
        inverse_every=3,
        stats_every=2,
        seed=1,  # sampled Fisher: the RNG must not advance on the skipped step
    )
    model.compile(optimizer=opt, loss=SCCE)
    history = model.fit(ds, epochs=2, verbose=0, shuffle=False)
    return model, opt, history.history["loss"]


def test_nan_batch_mid_training_equals_a_run_without_it():
    clean, clean_opt, clean_loss = nan_injection_run(False)
    bad, bad_opt, bad_loss = nan_injection_run(True)
    assert int(clean_opt.skipped_steps) == 0
    assert int(bad_opt.skipped_steps) == 2
    # A skipped step does not count: schedules, inverse_every and the Adam
    # fallback's bias correction see the same step numbers.
    assert int(bad_opt.iterations) == int(clean_opt.iterations) == 20
    for a, b in zip(clean.weights, bad.weights):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-6, atol=1e-6, err_msg=a.path)
    clean_state, bad_state = optimizer_state(clean_opt), optimizer_state(bad_opt)
    assert len(clean_state) == len(bad_state) > 10
    for (path, value), other in zip(clean_state.items(), bad_state.values()):
        np.testing.assert_allclose(other, value, rtol=1e-6, atol=1e-6, err_msg=path)
    # Keras's own loss metric averages the NaN batch in (documented).
    assert np.all(np.isfinite(clean_loss)) and np.all(np.isnan(bad_loss))


def test_overflowing_statistics_with_finite_gradients_skip_the_step():
    """An example with inputs ~1e25 and sample weight 0 has zero gradient, but
    its a a^T overflows float32: the step is skipped as a whole (weights,
    factors, momentum unchanged), not applied with half-updated factors."""
    keras.utils.set_random_seed(0)
    x, y = classification_data(n=8)
    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(3)]
    )
    opt = keras_kfac.KFAC(fisher="empirical", inverse_every=1, learning_rate=0.05)
    model.compile(optimizer=opt, loss=SCCE)
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False)
    weights = [w.numpy().copy() for w in model.weights]
    state = optimizer_state(opt)
    iterations = int(opt.iterations)
    x_bad = x.copy()
    x_bad[0] = 1e25
    weight = np.ones(8, "float32")
    weight[0] = 0.0
    # The gradient is finite (the example's weight is 0) ...
    with tf.GradientTape() as tape:
        loss = SCCE(y, model(x_bad, training=False), sample_weight=weight)
    grads = tape.gradient(loss, model.trainable_variables)
    assert all(np.all(np.isfinite(g.numpy())) for g in grads)
    # ... but A of the first layer is not.
    assert not np.isfinite(np.float32(1e25) * np.float32(1e25))
    model.fit(x_bad, y, sample_weight=weight, batch_size=8, epochs=1, verbose=0, shuffle=False)
    assert int(opt.skipped_steps) == 1
    assert int(opt.iterations) == iterations
    for w, w0 in zip(model.weights, weights):
        np.testing.assert_array_equal(w.numpy(), w0, err_msg=w.path)
    after = optimizer_state(opt)
    for path, value in state.items():
        np.testing.assert_array_equal(after[path], value, err_msg=path)
    # Training goes on.
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert int(opt.iterations) == iterations + 1


def singular_factor_setup(damping, damping_mode="factored"):
    """One normal step (statistics only at step 0, inverse every step), then
    the first layer's A is forced to the rank-1 matrix of ones."""
    keras.utils.set_random_seed(0)
    x, _ = classification_data(n=8)
    y = np.random.default_rng(1).normal(size=(8, 3)).astype("float32")
    # MSE and a tanh hidden layer: every factor of the fault-free run is
    # positive definite (a softmax output's G never is).
    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(4, activation="tanh", use_bias=False), keras.layers.Dense(3)]
    )
    opt = keras_kfac.KFAC(
        damping=damping, damping_mode=damping_mode, stats_every=1000, inverse_every=1,
        momentum=0.0, kl_clip=None, learning_rate=0.01, fisher="empirical",
    )
    model.compile(optimizer=opt, loss="mse")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    layer = model.layers[0]
    curvature = opt.curvature_for(layer)
    curvature.a.assign(tf.ones((6, 6)))
    return model, opt, layer, curvature, x, y


def test_singular_factor_keeps_previous_inverse_and_raises_layer_damping():
    model, opt, layer, curvature, x, y = singular_factor_setup(1e-3)
    other = model.layers[1]
    g = curvature.g.numpy()
    pi = np.sqrt(1.0 / (np.trace(g) / g.shape[0]))  # A = ones(6): tr A / 6 = 1
    # pi * sqrt(damping) = 1e-9: ones(6) + 1e-9 I rounds to the rank-1 ones(6)
    # in float32 and its Cholesky factorization breaks down (NaN).
    opt.damping = float((1e-9 / pi) ** 2)
    previous = curvature.a_inverse.numpy().copy()
    previous_g = curvature.g_inverse.numpy().copy()
    assert np.all(np.isfinite(previous)) and np.abs(previous).max() > 0
    assert float(opt.damping_multiplier(layer)) == 1.0
    for k in range(1, 5):
        # multipliers 1, 10, 100, 1000 still round to ones(6): each refresh
        # fails, keeps both previous inverses, and raises the multiplier.
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)
        np.testing.assert_array_equal(curvature.a_inverse.numpy(), previous)
        np.testing.assert_array_equal(curvature.g_inverse.numpy(), previous_g)
        assert float(opt.damping_multiplier(layer)) == pytest.approx(10.0**k, rel=1e-6)
        assert float(opt.damping_multiplier(other)) == 1.0  # only that layer
        assert all(np.all(np.isfinite(w.numpy())) for w in model.weights)
    assert int(opt.skipped_steps) == 0  # the kept inverses still give finite steps
    # With a damping that makes the factor positive definite, the refresh
    # succeeds with damping * multiplier, and the multiplier stays.
    opt.damping = float((1e-2 / pi) ** 2 / 1e4)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    expected = np.linalg.inv(np.ones((6, 6)) + 1e-2 * np.eye(6))
    np.testing.assert_allclose(curvature.a_inverse.numpy(), expected, rtol=2e-3, atol=2e-3)
    assert float(opt.damping_multiplier(layer)) == pytest.approx(1e4, rel=1e-6)
    assert all(np.all(np.isfinite(w.numpy())) for w in model.weights)


@pytest.mark.parametrize("damping_mode", ["factored", "eigen"])
def test_damping_zero_and_singular_factor_never_write_nan(damping_mode):
    """Damping 0 (only possible through a schedule) with a singular factor:
    factored mode keeps the last good inverse; eigen mode divides by a zero
    eigenvalue, and that step is skipped. Weights stay finite, training goes on."""
    model, opt, layer, curvature, x, y = singular_factor_setup(lambda step: 0.0, damping_mode)
    weights = [w.numpy().copy() for w in model.weights]
    model.fit(x, y, batch_size=8, epochs=3, verbose=0)
    assert all(np.all(np.isfinite(w.numpy())) for w in model.weights)
    for v in opt.variables:
        assert np.all(np.isfinite(v.numpy())), v.path
    if damping_mode == "factored":
        assert int(opt.skipped_steps) == 0
        assert not np.array_equal(model.weights[0].numpy(), weights[0])
    else:
        assert int(opt.skipped_steps) == 3
        for w, w0 in zip(model.weights, weights):
            np.testing.assert_array_equal(w.numpy(), w0)
