"""Reliability (issue 7): numerical faults, mixed precision, bad input, and
the cases that are handled rather than refused.

Faults are injected, never mocked: NaN batches, overflowing statistics,
factors forced singular, damping 0. Each test compares numbers (weights,
factors, counters) with a fault-free run or a brute-force reference.
"""

import traceback

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_kfac
from keras_kfac.curvature.base import factor_a
from keras_kfac.layers.base import block_for_layer
from reference import (
    factored_damped,
    flat_params,
    per_example_gradients,
    rel,
)

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
            keras.layers.PReLU(),  # Adam fallback: bias correction uses the step
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
    opt = keras_kfac.KFAC(fisher="empirical", stats_every=1, inverse_every=1, learning_rate=0.05)
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
    # ... but the first layer's A statistic of this batch, as keras_kfac forms
    # it from the (finite) captured inputs, is not.
    a = block_for_layer(model.layers[0]).activations(x_bad)
    assert np.all(np.isfinite(a.numpy()))
    assert not np.all(np.isfinite(factor_a(a).numpy()))
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
        [
            keras.Input((6,)),
            keras.layers.Dense(4, activation="tanh", use_bias=False),
            keras.layers.Dense(3),
        ]
    )
    opt = keras_kfac.KFAC(
        damping=damping,
        damping_mode=damping_mode,
        stats_every=1000,
        inverse_every=1,
        momentum=0.0,
        kl_clip=None,
        learning_rate=0.01,
        fisher="empirical",
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


# --- mixed precision ------------------------------------------------------------


def first_step_factors(policy, fisher):
    keras.config.set_dtype_policy(policy)
    try:
        keras.utils.set_random_seed(0)
        x = np.random.default_rng(0).normal(size=(16, 6, 6, 2)).astype("float32")
        y = np.random.default_rng(1).integers(0, 3, size=(16,))
        model = keras.Sequential(
            [
                keras.Input((6, 6, 2)),
                keras.layers.Conv2D(4, 3, activation="relu"),
                keras.layers.Flatten(),
                keras.layers.Dense(3, dtype="float32"),
            ]
        )
        opt = keras_kfac.KFAC(fisher=fisher, stats_decay=0.0, seed=2, learning_rate=0.05)
        model.compile(optimizer=opt, loss=SCCE)
        first = model.fit(x, y, batch_size=16, epochs=1, verbose=0).history["loss"][0]
        factors = {k: v.numpy() for k, v in opt.curvature_for(model.layers[0]).factors().items()}
        dtypes = {v.dtype for v in opt.curvature_for(model.layers[0]).factors().values()}
        last = model.fit(x, y, batch_size=16, epochs=15, verbose=0).history["loss"][-1]
        return factors, dtypes, first, last, model
    finally:
        keras.config.set_dtype_policy("float32")


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_statistics_in_float32(policy):
    reference, _, _, _, _ = first_step_factors("float32", "empirical")
    factors, dtypes, first, last, model = first_step_factors(policy, "empirical")
    assert model.layers[0].compute_dtype == policy.split("_")[1]
    assert dtypes == {"float32"}
    tol = 2e-2 if policy == "mixed_float16" else 6e-2  # bfloat16: 8-bit mantissa
    for name in ("A", "G"):
        err = rel(factors[name], reference[name])
        assert err < tol, (name, err)
    assert last < 0.7 * first
    # The sampled Fisher runs too (second backward pass in the low precision).
    factors, dtypes, first, last, model = first_step_factors(policy, "sampled")
    assert dtypes == {"float32"} and all(np.all(np.isfinite(f)) for f in factors.values())
    assert last < 0.7 * first
    assert all(np.all(np.isfinite(w.numpy())) for w in model.weights)


# --- bad input: clear errors at the right time -----------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"damping": float("nan")}, "damping must be a positive"),
        ({"damping": "big"}, "damping must be a positive"),
        ({"stats_decay": -0.1}, r"stats_decay must be in \[0, 1\)"),
        ({"stats_every": 1.5}, "stats_every must be an integer >= 1"),
        ({"inverse_every": -3}, "inverse_every must be an integer >= 1"),
        ({"curvature": {"dense": "nope"}}, "Unknown curvature='nope'. Available"),
        ({"fallback_learning_rate": 0.0}, "fallback_learning_rate must be positive"),
    ],
)
def test_more_bad_arguments_are_errors_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        keras_kfac.KFAC(**kwargs)


def two_output_model():
    inputs = keras.Input((6,))
    h = keras.layers.Dense(5, activation="tanh", name="trunk")(inputs)
    return keras.Model(
        inputs, [keras.layers.Dense(3, name="cls")(h), keras.layers.Dense(2, name="reg")(h)]
    )


def test_sampled_fisher_with_an_unsupported_output_loss_names_the_output():
    x, _ = classification_data()
    y = [np.zeros(len(x), "int64"), np.zeros((len(x), 2), "float32")]
    model = two_output_model()
    model.compile(
        optimizer=keras_kfac.KFAC(fisher="sampled"), loss=[SCCE, lambda t, p: tf.abs(t - p)]
    )
    with pytest.raises(ValueError, match="output 'reg'.*fisher='empirical'"):
        model.fit(x, y, epochs=1, verbose=0)


def test_unsamplable_loss_is_an_error_before_any_tracing():
    x, y = classification_data()
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)])

    def my_loss(y_true, y_pred):
        return tf.reduce_mean(tf.square(y_pred))

    model.compile(optimizer=keras_kfac.KFAC(fisher="sampled"), loss=my_loss)
    keras.config.disable_traceback_filtering()
    try:
        with pytest.raises(ValueError, match="cannot sample targets.*fisher='empirical'") as info:
            model.fit(x, y, epochs=1, verbose=0)
    finally:
        keras.config.enable_traceback_filtering()
    # Raised when fit builds the optimizer, before the train step is traced.
    frames = traceback.extract_tb(info.value.__traceback__)
    assert any(f.name == "build" and f.filename.endswith("optimizer.py") for f in frames)
    assert not any(
        "polymorphic_function" in f.filename or "autograph" in f.filename for f in frames
    )


# --- handled rather than refused ------------------------------------------------------


def exact_one_step(lr=0.1, damping=0.05):
    return keras_kfac.KFAC(
        learning_rate=lr,
        damping=damping,
        momentum=0.0,
        kl_clip=None,
        stats_decay=0.0,
        inverse_every=1,
        fisher="empirical",
    )


def test_layer_called_twice_accumulates_statistics_over_both_uses():
    """A shared Dense used twice: its uses are extra locations (T = 2):
    ``A = (1/n) sum_i sum_u a a^T``, ``G = (1/(2n)) sum_i sum_u g g^T``;
    the update is ``-lr (kron(A,G) + damping)^-1 grad`` with the summed gradient."""
    keras.utils.set_random_seed(0)
    x, y = classification_data(n=6)
    inputs = keras.Input((6,))
    shared = keras.layers.Dense(6, activation="tanh", name="shared")
    out = keras.layers.Dense(3, name="out")
    model = keras.Model(inputs, out(shared(shared(inputs))))
    lr, damping = 0.1, 0.05
    opt = exact_one_step(lr, damping)
    model.compile(optimizer=opt, loss=SCCE, run_eagerly=True)
    W, b = shared.kernel.numpy(), shared.bias.numpy()
    # Brute force: an explicit forward pass, g per use from the summed losses.
    with tf.GradientTape() as tape:
        s1 = tf.constant(x) @ W + b
        tape.watch(s1)
        h1 = tf.tanh(s1)
        s2 = h1 @ W + b
        tape.watch(s2)
        logits = out(tf.tanh(s2))
        total = tf.reduce_sum(
            keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
        )
    g1, g2 = [g.numpy() for g in tape.gradient(total, [s1, s2])]
    ones = np.ones((6, 1))
    a1, a2 = np.hstack([x, ones]), np.hstack([h1.numpy(), ones])
    A = (a1.T @ a1 + a2.T @ a2) / 6
    G = (g1.T @ g1 + g2.T @ g2) / 12
    grad = per_example_gradients(model, shared, x, y, SCCE).numpy().mean(0)
    np.testing.assert_allclose(grad, ((a1.T @ g1 + a2.T @ g2) / 6).ravel(), rtol=1e-4, atol=1e-6)
    theta = flat_params(shared)
    model.fit(x, y, batch_size=6, epochs=1, verbose=0, shuffle=False)
    curvature = opt.curvature_for(shared)
    np.testing.assert_allclose(curvature.a.numpy(), A, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(curvature.g.numpy(), G, rtol=1e-4, atol=1e-7)
    expected = -lr * np.linalg.solve(factored_damped(A, G, damping), grad)
    np.testing.assert_allclose(flat_params(shared) - theta, expected, rtol=2e-3, atol=1e-6)


class _TwoBatchSizes(keras.Model):
    """A shared Dense called on ``x`` and on ``x[:k]`` in one forward pass."""

    def __init__(self, k):
        super().__init__(name="two_batch_sizes")
        self.k = k
        self.shared = keras.layers.Dense(6, activation="tanh", name="shared")
        self.out = keras.layers.Dense(3, name="out")

    def call(self, x):
        part = self.shared(x[: self.k])[:, :3]
        pad = tf.shape(x)[0] - tf.shape(part)[0]
        return self.out(self.shared(x)) + tf.pad(part, [[0, pad], [0, 0]])


@pytest.mark.parametrize("k, eager", [(2, True), (2, False), (6, False)])
def test_layer_called_on_different_batch_sizes_in_one_step(k, eager):
    """Uses on ``x`` (n rows) and ``x[:k]``: the smaller use's rows are extra
    locations of the first k examples: ``A = (1/n) sum a a^T`` over both uses,
    ``G`` averaged over the ``n + k`` real locations. Graph mode has a dynamic
    batch size (the padded path even for k = n)."""
    keras.utils.set_random_seed(0)
    n = 6
    x, y = classification_data(n=n)
    model = _TwoBatchSizes(k)
    model(x[:1])
    shared = model.shared
    lr, damping = 0.1, 0.05
    opt = exact_one_step(lr, damping)
    model.compile(optimizer=opt, loss=SCCE, run_eagerly=eager)
    W, b = shared.kernel.numpy(), shared.bias.numpy()
    with tf.GradientTape() as tape:
        s1 = tf.constant(x) @ W + b
        s2 = tf.constant(x[:k]) @ W + b
        tape.watch([s1, s2])
        part = tf.pad(tf.tanh(s2)[:, :3], [[0, n - k], [0, 0]])
        logits = model.out(tf.tanh(s1)) + part
        total = tf.reduce_sum(
            keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
        )
    g1, g2 = [g.numpy() for g in tape.gradient(total, [s1, s2])]
    a1, a2 = np.hstack([x, np.ones((n, 1))]), np.hstack([x[:k], np.ones((k, 1))])
    A = (a1.T @ a1 + a2.T @ a2) / n
    G = (g1.T @ g1 + g2.T @ g2) / (n + k)
    grad = ((a1.T @ g1 + a2.T @ g2) / n).ravel()
    theta = flat_params(shared)
    model.fit(x, y, batch_size=n, epochs=1, verbose=0, shuffle=False)
    curvature = opt.curvature_for(shared)
    np.testing.assert_allclose(curvature.a.numpy(), A, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(curvature.g.numpy(), G, rtol=1e-4, atol=1e-7)
    expected = -lr * np.linalg.solve(factored_damped(A, G, damping), grad)
    np.testing.assert_allclose(flat_params(shared) - theta, expected, rtol=2e-3, atol=1e-6)


def test_frozen_layer_is_skipped_and_stays_fixed():
    keras.utils.set_random_seed(0)
    x, y = classification_data()
    frozen = keras.layers.Dense(8, activation="relu", name="frozen")
    frozen.trainable = False
    model = keras.Sequential(
        [keras.Input((6,)), frozen, keras.layers.Dense(8, activation="relu"), keras.layers.Dense(3)]
    )
    opt = keras_kfac.KFAC()
    model.compile(optimizer=opt, loss=SCCE)
    before = [w.numpy().copy() for w in frozen.weights]
    losses = model.fit(x, y, batch_size=16, epochs=10, verbose=0).history["loss"]
    assert losses[-1] < 0.7 * losses[0]  # trains (the point: the frozen layer does not)
    assert [b.layer.name for b in opt.estimator.blocks] == [
        model.layers[1].name,
        model.layers[2].name,
    ]
    for w, w0 in zip(frozen.weights, before):
        np.testing.assert_array_equal(w.numpy(), w0)
    with pytest.raises(ValueError, match="has no curvature block"):
        opt.curvature_for(frozen)


def dense_reference_factors(model, layer_index, x, y):
    """A, G of a Dense layer of a plain Sequential MLP from an explicit
    forward pass (per-example g from the summed losses)."""
    layers = model.layers
    h = tf.constant(x)
    for layer in layers[:layer_index]:
        h = layer(h)
    layer = layers[layer_index]
    with tf.GradientTape() as tape:
        s = h @ layer.kernel + layer.bias
        tape.watch(s)
        z = layer.activation(s)
        for later in layers[layer_index + 1 :]:
            z = later(z)
        total = tf.reduce_sum(keras.losses.sparse_categorical_crossentropy(y, z, from_logits=True))
    g = tape.gradient(total, s).numpy()
    a = np.hstack([h.numpy(), np.ones((len(x), 1))])
    return a.T @ a / len(x), g.T @ g / len(x)


def test_last_partial_batch_and_batch_size_one():
    """20 examples in batches of 8: the traced step also runs the last batch of
    4 (statistics of those 4, exactly); batch size 1 works and is exact."""
    keras.utils.set_random_seed(0)
    x, y = classification_data(n=20)
    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(3)]
    )
    opt = keras_kfac.KFAC(fisher="empirical", stats_decay=0.0, stats_every=1, learning_rate=0.0)
    model.compile(optimizer=opt, loss=SCCE)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    assert int(opt.iterations) == 3
    for i, layer in enumerate(model.layers):
        A, G = dense_reference_factors(model, i, x[16:], y[16:])
        np.testing.assert_allclose(opt.curvature_for(layer).a.numpy(), A, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(opt.curvature_for(layer).g.numpy(), G, rtol=1e-4, atol=1e-7)
    # Batch size 1 (one example per step, sampled Fisher included).
    opt1 = keras_kfac.KFAC(stats_decay=0.0, stats_every=1, learning_rate=0.0, seed=0)
    model.compile(optimizer=opt1, loss=SCCE)
    model.fit(x, y, batch_size=1, epochs=1, verbose=0, shuffle=False)
    assert int(opt1.iterations) == 20 and int(opt1.skipped_steps) == 0
    A, _ = dense_reference_factors(model, 0, x[19:], y[19:])
    np.testing.assert_allclose(
        opt1.curvature_for(model.layers[0]).a.numpy(), A, rtol=1e-5, atol=1e-6
    )
    assert np.linalg.matrix_rank(opt1.curvature_for(model.layers[1]).g.numpy(), tol=1e-6) <= 1


def test_unknown_batch_dimension_in_a_custom_loop():
    """A tf.function with input_signature (None, ...) traces once and serves
    batches of any size; statistics are those of the batch."""
    keras.utils.set_random_seed(0)
    x, y = classification_data(n=13)
    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(3)]
    )
    opt = keras_kfac.KFAC(
        model=model,
        loss=SCCE,
        stats_decay=0.0,
        stats_every=1,
        learning_rate=0.0,
        fisher="empirical",
    )

    @tf.function(
        input_signature=[tf.TensorSpec((None, 6), tf.float32), tf.TensorSpec((None,), tf.int64)]
    )
    def step(xb, yb):
        assert xb.shape[0] is None
        with tf.GradientTape() as tape:
            loss = SCCE(yb, model(xb, training=True))
        opt.apply_gradients(
            zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        )
        return loss

    traces = []
    for lo, hi in ((0, 5), (5, 12), (12, 13)):
        step(x[lo:hi], y[lo:hi])
        traces.append(step.experimental_get_tracing_count())
        for i, layer in enumerate(model.layers):
            A, G = dense_reference_factors(model, i, x[lo:hi], y[lo:hi])
            np.testing.assert_allclose(opt.curvature_for(layer).a.numpy(), A, rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(opt.curvature_for(layer).g.numpy(), G, rtol=1e-4, atol=1e-7)
    # The first call traces twice (the optimizer creates its variables), then never again.
    assert traces[0] <= 2 and traces[1] == traces[2] == traces[0]


def test_several_outputs_and_losses_with_empirical_fisher():
    """Two heads, two weighted losses: the trunk's G is that of the per-example
    total loss ``l_i = 1.0 * ce_i + 0.5 * mse_i``."""
    keras.utils.set_random_seed(0)
    x, y = classification_data(n=16)
    y2 = np.random.default_rng(3).normal(size=(16, 2)).astype("float32")
    model = two_output_model()
    opt = keras_kfac.KFAC(fisher="empirical", stats_decay=0.0, stats_every=1, learning_rate=0.0)
    model.compile(optimizer=opt, loss=[SCCE, "mse"], loss_weights=[1.0, 0.5])
    trunk = model.get_layer("trunk")
    with tf.GradientTape() as tape:
        s = tf.constant(x) @ trunk.kernel + trunk.bias
        tape.watch(s)
        h = tf.tanh(s)
        ce = keras.losses.sparse_categorical_crossentropy(
            y, model.get_layer("cls")(h), from_logits=True
        )
        mse = tf.reduce_mean(tf.square(y2 - model.get_layer("reg")(h)), axis=-1)
        total = tf.reduce_sum(ce + 0.5 * mse)
    g = tape.gradient(total, s).numpy()
    model.fit(x, [y, y2], batch_size=16, epochs=1, verbose=0)
    np.testing.assert_allclose(
        opt.curvature_for(trunk).g.numpy(), g.T @ g / 16, rtol=1e-4, atol=1e-7
    )
    # and it trains
    model.compile(
        optimizer=keras_kfac.KFAC(fisher="empirical"), loss=[SCCE, "mse"], loss_weights=[1.0, 0.5]
    )
    losses = model.fit(x, [y, y2], batch_size=8, epochs=10, verbose=0).history["loss"]
    assert losses[-1] < 0.6 * losses[0]
