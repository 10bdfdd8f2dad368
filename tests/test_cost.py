"""The preconditioning of a gradient given by its factors (a Dense layer's
``V = a^T d``, :func:`keras_kfac.curvature.factors.factored_kronecker_solve`)
against dense solves, and the factors the capture records against the
gradient Keras applies."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_kfac import estimator as estimator_module
from keras_kfac.curvature import factors as F
from reference import damped_reference, flat_params, kfac_factors, layer_ag, plain_kfac, rel


def spd(rng, d):
    m = rng.normal(size=(d, d))
    return m @ m.T / d + 0.1 * np.eye(d)


def factored_problem(rows=5, da=9, dg=7, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(rows, da))
    d = rng.normal(size=(rows, dg))
    return a, d, np.linalg.inv(spd(rng, da)), np.linalg.inv(spd(rng, dg))


def solve(v, a, d, left, right):
    return F.factored_kronecker_solve(*(tf.constant(t) for t in (v, a, d, left, right))).numpy()


def test_crossover_is_where_the_factored_product_gets_dearer():
    for da, dg in ((785, 1000), (1001, 500), (31, 250), (4, 4)):
        n = F.factored_crossover(da, dg)
        per_row = da * da + dg * dg + da * dg
        assert n * per_row <= da * dg * (da + dg) < (n + 1) * per_row


def test_factored_solve_uses_the_factors_when_they_are_the_gradient():
    # float64, so that the two paths are told apart: V differs from a^T d by
    # 1e-7 relative (under the tolerance), and the result is L (a^T d) R.
    a, d, left, right = factored_problem()
    exact = a.T @ d
    v = exact + 1e-7 * np.linalg.norm(exact) * np.ones_like(exact) / exact.size**0.5
    assert rel(solve(v, a, d, left, right), left @ exact @ right) < 1e-12
    assert rel(left @ v @ right, left @ exact @ right) > 1e-9


@pytest.mark.parametrize("extra", [1e-4, 1.0])
def test_factored_solve_uses_the_gradient_when_the_factors_are_not_it(extra):
    # A term the factors miss (a regularizer, clipping): L V R from V.
    a, d, left, right = factored_problem()
    v = a.T @ d + extra * np.linalg.norm(a.T @ d) * np.eye(*(a.T @ d).shape) / 3
    assert rel(solve(v, a, d, left, right), left @ v @ right) < 1e-12


def test_factored_solve_uses_the_gradient_for_large_batches():
    # More rows than the crossover: the factored product is not even formed.
    a, d, left, right = factored_problem(rows=F.factored_crossover(9, 7) + 1)
    v = a.T @ d + 0.5
    assert rel(solve(v, a, d, left, right), left @ v @ right) < 1e-12


def wide_problem(regularizer=None, n=3, seed=0):
    """A Dense MLP wider than its batch: both blocks take the factored path."""
    rng = np.random.default_rng(seed)
    keras.utils.set_random_seed(seed)
    x = rng.normal(size=(n, 12)).astype("float32")
    y = rng.integers(0, 10, size=(n,))
    model = keras.Sequential(
        [
            keras.Input((12,)),
            keras.layers.Dense(16, activation="tanh", kernel_regularizer=regularizer),
            keras.layers.Dense(10),
        ]
    )
    for layer in model.layers:
        assert n <= F.factored_crossover(layer.kernel.shape[0] + 1, layer.kernel.shape[1])
    return model, x, y


def record_factored_solves(monkeypatch):
    """Every ``(V, a, d, factors_match)`` of the (eager) steps."""
    calls = []
    original = F.factored_kronecker_solve

    def recording(v, a, d, left, right):
        calls.append((v.numpy(), a.numpy(), d.numpy(), bool(F.factors_match(v, a, d))))
        return original(v, a, d, left, right)

    monkeypatch.setattr(estimator_module.F, "factored_kronecker_solve", recording)
    return calls


@pytest.mark.parametrize("fisher", ["empirical", "sampled"])
def test_recorded_factors_are_the_applied_gradient(monkeypatch, fisher):
    # Sampled Fisher: its extra backward pass (a statistics step) must not
    # overwrite the taps' dL/ds.
    calls = record_factored_solves(monkeypatch)
    model, x, y = wide_problem()
    model.compile(
        optimizer=plain_kfac(0.1, 0.05, fisher=fisher),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        run_eagerly=True,
    )
    with tf.GradientTape() as tape:
        loss = model.compute_loss(x, y, model(x))
    grads = tape.gradient(loss, model.trainable_variables)
    model.fit(x, y, batch_size=len(x), epochs=2, shuffle=False, verbose=0)
    assert len(calls) == 4  # two blocks, two steps
    for i, (v, a, d, match) in enumerate(calls[:2]):
        kernel, bias = grads[2 * i], grads[2 * i + 1]
        assert match
        expected = np.vstack([kernel.numpy(), bias.numpy()[None]])
        assert rel(v, expected) < 1e-6
        assert rel(a.T @ d, expected) < 1e-5
    assert all(match for *_, match in calls)


def test_regularized_layer_is_preconditioned_from_its_gradient(monkeypatch):
    calls = record_factored_solves(monkeypatch)
    model, x, y = wide_problem(regularizer=keras.regularizers.L2(0.1))
    lr, damping = 0.1, 0.05
    opt = plain_kfac(lr, damping)
    model.compile(
        optimizer=opt,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        run_eagerly=True,
    )
    with tf.GradientTape() as tape:
        loss = model.compute_loss(x, y, model(x))
    grads = tape.gradient(loss, model.trainable_variables)
    before = flat_params(model.layers[0])
    model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0)
    assert [match for *_, match in calls] == [False, True]
    curvature = opt.curvature_for(model.layers[0])
    reference = damped_reference(curvature.a.numpy(), curvature.g.numpy(), damping, "factored")
    gradient = np.concatenate([grads[0].numpy().ravel(), grads[1].numpy().ravel()])
    expected = -lr * np.linalg.solve(reference, gradient)
    assert rel(flat_params(model.layers[0]) - before, expected) < 2e-3


@pytest.mark.parametrize("mode", ["graph", "xla"])
def test_factored_path_update_matches_dense_solve(mode):
    # The whole step, compiled (tf.cond on the batch size and the check):
    # -lr (kron(A, G) damped)^-1 grad for both blocks.
    model, x, y = wide_problem()
    lr, damping = 0.1, 0.05
    opt = plain_kfac(lr, damping)
    model.compile(
        optimizer=opt,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=mode == "xla",
    )
    with tf.GradientTape() as tape:
        loss = model.compute_loss(x, y, model(x))
    grads = tape.gradient(loss, model.trainable_variables)
    before = [flat_params(layer) for layer in model.layers]
    model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0)
    for i, layer in enumerate(model.layers):
        curvature = opt.curvature_for(layer)
        reference = damped_reference(curvature.a.numpy(), curvature.g.numpy(), damping, "factored")
        gradient = np.concatenate([g.numpy().ravel() for g in grads[2 * i : 2 * i + 2]])
        expected = -lr * np.linalg.solve(reference, gradient)
        assert rel(flat_params(layer) - before[i], expected) < 2e-3


# --- Kronecker factors from upper column blocks (F.gram) ------------------------


@pytest.mark.parametrize("rows, dim", [(700, 1001), (600, 785), (100, 785), (900, 30)])
def test_gram_matches_the_full_product(rows, dim):
    x = np.random.default_rng(rows).normal(size=(rows, dim)).astype("float32")
    expected = x.astype(np.float64).T @ x.astype(np.float64)
    unknown_rows = tf.function(F.gram, input_signature=[tf.TensorSpec((None, dim))])
    for out in (F.gram(tf.constant(x)).numpy(), unknown_rows(tf.constant(x)).numpy()):
        assert rel(out, expected) < 1e-6
        np.testing.assert_array_equal(out, out.T)


def test_blocked_factors_match_brute_force(monkeypatch):
    # Thresholds lowered so that the tiny MLP's factors take the blocked path
    # (column blocks of 2: three for the 6-wide A and G of the first layer).
    monkeypatch.setattr(F, "GRAM_BLOCK", 2)
    monkeypatch.setattr(F, "GRAM_MIN_ROWS", 4)
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    x = rng.normal(size=(8, 5)).astype("float32")
    y = rng.integers(0, 3, size=(8,))
    model = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(6, activation="tanh"), keras.layers.Dense(3)]
    )
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    opt = plain_kfac(0.1, 0.05)
    model.compile(optimizer=opt, loss=loss)
    expected = [kfac_factors(*layer_ag(model, layer, x, y, loss)) for layer in model.layers]
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    for layer, (a, g) in zip(model.layers, expected):
        curvature = opt.curvature_for(layer)
        np.testing.assert_allclose(curvature.a.numpy(), a, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(curvature.g.numpy(), g, rtol=1e-5, atol=1e-6)
