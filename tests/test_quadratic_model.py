"""The quadratic model on a sub-batch (``KFAC(quadratic_model_batch_size=m)``):
rho and the adaptive step against dense computations on the same first ``m``
examples (exact GGN from ``GradientTape.jacobian``), and the whole-batch
fallback where slicing would change the loss."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_kfac  # noqa: E402
from keras_kfac import quadratic  # noqa: E402


def _flat(values):
    return np.concatenate([np.asarray(v, np.float64).ravel() for v in values])


def dense_quadratic(model, x, loss_of_outputs):
    """``(h, g, G)`` at the model's current parameters, all float64: the
    loss ``loss_of_outputs(outputs)`` on the batch ``x``, its gradient and
    its exact GGN ``J^T H J`` over the flattened trainable parameters
    (``J`` by ``GradientTape.jacobian`` of the concatenated outputs)."""
    variables = model.trainable_variables
    shapes = [v.shape for v in variables]
    sizes = [int(np.prod(s)) for s in shapes]
    non_trainable = [v.value for v in model.non_trainable_variables]
    theta = tf.constant(_flat([v.numpy() for v in variables]))

    def outputs_of(t):
        parts = tf.split(tf.cast(t, tf.float32), sizes)
        values = [tf.reshape(p, s) for p, s in zip(parts, shapes)]
        outputs, _ = model.stateless_call(values, non_trainable, x, training=True)
        return outputs

    def concat(outputs):
        return tf.concat([tf.reshape(o, [-1]) for o in tf.nest.flatten(outputs)], 0)

    with tf.GradientTape(persistent=True) as tape:
        tape.watch(theta)
        outputs = outputs_of(theta)
        flat = concat(outputs)
        loss = loss_of_outputs(outputs)
    jacobian = tape.jacobian(flat, theta).numpy().astype(np.float64)
    grad = tape.gradient(loss, theta).numpy()
    structure = tf.nest.map_structure(tf.stop_gradient, outputs)
    y0 = concat(structure)
    with tf.GradientTape() as outer:
        outer.watch(y0)
        with tf.GradientTape() as inner:
            inner.watch(y0)
            offsets = np.cumsum([0] + [int(np.prod(o.shape)) for o in tf.nest.flatten(structure)])
            pieces = [
                tf.reshape(y0[a:b], o.shape)
                for a, b, o in zip(offsets, offsets[1:], tf.nest.flatten(structure))
            ]
            value = loss_of_outputs(tf.nest.pack_sequence_as(structure, pieces))
        dy = inner.gradient(value, y0)
    hessian = outer.jacobian(dy, y0).numpy().astype(np.float64)
    return float(loss), grad, jacobian.T @ hessian @ jacobian


def _classifier(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(3)]
    )


def _classification(n=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5)).astype("float32")
    y = rng.integers(0, 3, size=n)
    w = rng.uniform(0.5, 2.0, size=n).astype("float32")
    return x, y, w


SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def test_rho_on_a_sub_batch_matches_the_dense_ggn_of_those_examples():
    """rho = (h_m(theta + delta) - h_m(theta)) / (1/2 delta^T (G_m + lambda I)
    delta + g_m^T delta), every term on the first m examples (sample weights
    sliced with them); it differs from the whole batch's rho."""
    x, y, w = _classification()
    m, damping = 6, 0.05
    rhos = {}
    for size in (m, None):
        model = _classifier()
        opt = keras_kfac.KFAC(
            damping=damping, damping_adaptation_interval=1, quadratic_model_batch_size=size
        )
        model.compile(optimizer=opt, loss=SCCE)
        theta = _flat([v.numpy() for v in model.trainable_variables])
        n = m if size else len(x)

        def loss_of(outputs, n=n):
            return SCCE(y[:n], outputs, sample_weight=w[:n])

        before, grad, ggn = dense_quadratic(model, x[:n], loss_of)
        model.fit(x, y, sample_weight=w, batch_size=len(x), shuffle=False, verbose=0)
        delta = _flat([v.numpy() for v in model.trainable_variables]) - theta
        after = float(loss_of(model(x[:n], training=True)))
        predicted = 0.5 * delta @ (ggn + damping * np.eye(len(delta))) @ delta + grad @ delta
        rhos[size] = float(opt.diagnostics()["rho"])
        np.testing.assert_allclose(rhos[size], (after - before) / predicted, rtol=2e-3)
    assert abs(rhos[m] - rhos[None]) > 1e-3


def test_sub_batch_handles_dict_inputs_and_several_outputs():
    """A two-input (dict) two-output model, MSE + cross-entropy: rho on the
    first m examples of every input and target against the dense GGN."""
    rng = np.random.default_rng(1)
    n, m, damping = 12, 5, 0.1
    x = {
        "a": rng.normal(size=(n, 3)).astype("float32"),
        "b": rng.normal(size=(n, 2)).astype("float32"),
    }
    y = {"reg": rng.normal(size=(n, 2)).astype("float32"), "cls": rng.integers(0, 3, size=n)}
    keras.utils.set_random_seed(1)
    a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
    h = keras.layers.Dense(4, activation="tanh")(keras.layers.Concatenate()([a, b]))
    model = keras.Model(
        {"a": a, "b": b},
        {"reg": keras.layers.Dense(2, name="reg")(h), "cls": keras.layers.Dense(3, name="cls")(h)},
    )
    opt = keras_kfac.KFAC(
        damping=damping, damping_adaptation_interval=1, quadratic_model_batch_size=m
    )
    mse = keras.losses.MeanSquaredError()
    model.compile(optimizer=opt, loss={"reg": mse, "cls": SCCE})
    sub_x = {k: v[:m] for k, v in x.items()}

    def loss_of(outputs):
        return mse(y["reg"][:m], outputs["reg"]) + SCCE(y["cls"][:m], outputs["cls"])

    theta = _flat([v.numpy() for v in model.trainable_variables])
    before, grad, ggn = dense_quadratic(model, sub_x, loss_of)
    model.fit(x, y, batch_size=n, shuffle=False, verbose=0)
    delta = _flat([v.numpy() for v in model.trainable_variables]) - theta
    after = float(loss_of(model(sub_x, training=True)))
    predicted = 0.5 * delta @ (ggn + damping * np.eye(len(delta))) @ delta + grad @ delta
    np.testing.assert_allclose(
        float(opt.diagnostics()["rho"]), (after - before) / predicted, rtol=2e-3
    )


def test_adaptive_step_on_a_sub_batch_matches_a_dense_2x2_solve():
    """Sec. 7 on the first m examples: (alpha, mu) = -Q^-1 b with
    Q = D^T (G_m + lambda I) D, b = D^T g_m, D = (Delta, delta_prev), while
    the direction Delta = -(C + lambda I)^-1 g_n comes from the whole batch;
    rho of that step is the sub-batch model's."""
    x, y, w = _classification(n=20, seed=2)
    m, damping = 7, 0.05
    model = _classifier(seed=2)
    opt = keras_kfac.KFAC(
        adaptive_step=True,
        fisher="empirical",
        damping=damping,
        damping_mode="eigen",
        stats_every=1,
        inverse_every=1,
        damping_adaptation_interval=1,
        quadratic_model_batch_size=m,
    )
    model.compile(optimizer=opt, loss=SCCE)
    layers = model.layers
    previous = None
    for _ in range(3):
        damping = float(opt.damping)
        theta = _flat([v.numpy() for v in model.trainable_variables])
        _, grad_n, _ = dense_quadratic(model, x, lambda o: SCCE(y, o))
        before, grad_m, ggn_m = dense_quadratic(model, x[:m], lambda o: SCCE(y[:m], o))
        model.fit(x, y, batch_size=len(x), shuffle=False, verbose=0)
        update = _flat([v.numpy() for v in model.trainable_variables]) - theta
        if previous is not None:
            blocks = [np.asarray(opt.curvature_matrix(layer), np.float64) for layer in layers]
            sizes = [len(c) for c in blocks]
            curvature = np.zeros((sum(sizes), sum(sizes)))
            offsets = np.cumsum([0] + sizes)
            for c, a, b in zip(blocks, offsets, offsets[1:]):
                curvature[a:b, a:b] = c
            eye = np.eye(len(theta))
            natural = -np.linalg.solve(curvature + damping * eye, grad_n)
            directions = np.stack([natural, previous])
            q = directions @ (ggn_m + damping * eye) @ directions.T
            coefficients = -np.linalg.solve(q, directions @ grad_m)
            d = opt.diagnostics()
            np.testing.assert_allclose([float(d["alpha"]), float(d["mu"])], coefficients, rtol=5e-3)
            assert abs(coefficients[1]) > 1e-4  # the 2-D problem
            np.testing.assert_allclose(update, coefficients @ directions, rtol=5e-3, atol=1e-6)
            after = float(SCCE(y[:m], model(x[:m], training=True)))
            predicted = 0.5 * coefficients @ q @ coefficients + (directions @ grad_m) @ coefficients
            np.testing.assert_allclose(float(d["rho"]), (after - before) / predicted, rtol=5e-3)
        previous = update


def _blocker(model, n=8, size=4, loss_args=None):
    x = tf.zeros((n,) + tuple(model.input_shape[1:]))
    return quadratic.sub_batch_blocker(model, loss_args or (x, x, None), size)


def test_sub_batch_falls_back_where_slicing_changes_the_loss():
    dense = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    dense.compile(loss="mse")
    assert _blocker(dense) is None
    assert "not larger" in _blocker(dense, n=4, size=4)
    assert "leading sizes" in _blocker(dense, loss_args=(tf.zeros((8, 3)), tf.zeros((6, 2)), None))
    assert "SparseTensor" in _blocker(
        dense, loss_args=(tf.sparse.from_dense(tf.ones((8, 3))), tf.zeros((8, 2)), None)
    )
    bn = keras.Sequential(
        [keras.Input((3,)), keras.layers.BatchNormalization(name="bn"), keras.layers.Dense(2)]
    )
    bn.compile(loss="mse")
    assert "'bn' normalizes" in _blocker(bn)
    stateful = keras.Sequential(
        [keras.Input((4, 3), batch_size=8), keras.layers.SimpleRNN(2, stateful=True, name="rnn")]
    )
    stateful.compile(loss="mse")
    assert "'rnn' is stateful" in _blocker(stateful)
    summed = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    summed.compile(loss=keras.losses.MeanSquaredError(reduction="sum"))
    assert "reduction='sum'" in _blocker(summed)

    class OwnLoss(keras.Sequential):
        def compute_loss(self, *args, **kwargs):
            return super().compute_loss(*args, **kwargs)

    own = OwnLoss([keras.Input((3,)), keras.layers.Dense(2)])
    own.compile(loss="mse")
    assert "overrides compute_loss" in _blocker(own)


def test_a_batch_normalization_model_uses_the_whole_batch():
    """With BatchNormalization (batch statistics) the sub-batch option falls
    back to the whole batch: rho equals the whole-batch run's."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(16, 4)).astype("float32")
    y = rng.normal(size=(16, 2)).astype("float32")
    rhos = []
    for size in (4, None):
        keras.utils.set_random_seed(3)
        model = keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(5, activation="tanh"),
                keras.layers.BatchNormalization(),
                keras.layers.Dense(2),
            ]
        )
        opt = keras_kfac.KFAC(damping_adaptation_interval=1, quadratic_model_batch_size=size)
        model.compile(optimizer=opt, loss="mse")
        model.fit(x, y, batch_size=16, shuffle=False, verbose=0)
        rhos.append(float(opt.diagnostics()["rho"]))
    assert np.isfinite(rhos[0])
    np.testing.assert_allclose(rhos[0], rhos[1], rtol=1e-5)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "32"])
def test_quadratic_model_batch_size_is_validated(bad):
    with pytest.raises(ValueError, match="quadratic_model_batch_size must be an integer >= 1"):
        keras_kfac.KFAC(quadratic_model_batch_size=bad)


def test_quadratic_model_batch_size_round_trips_through_get_config():
    for value in (None, 48):
        opt = keras_kfac.KFAC(quadratic_model_batch_size=value)
        config = opt.get_config()
        assert config["quadratic_model_batch_size"] == value
        assert keras_kfac.KFAC.from_config(config).quadratic_model_batch_size == value
