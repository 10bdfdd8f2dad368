"""The quadratic model of Martens & Grosse 2015: rho and the LM damping rule
(sec. 6.5), and the adaptive alpha/mu step (sec. 7), against closed forms."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import keras_kfac  # noqa: E402
from keras_kfac.callbacks import AdaptiveDamping  # noqa: E402
from reference import flat_params  # noqa: E402


def _regression(n=64, d_in=3, d_out=2, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d_in)).astype("float32")
    w = rng.normal(size=(d_in, d_out)).astype("float32")
    y = (x @ w + 0.3 * rng.normal(size=(n, d_out))).astype("float32")
    return x, y


def _mse_grad_and_fisher(layer, x, y):
    """Gradient and exact Fisher (= GGN = Hessian) of Keras's MSE for a
    linear Dense layer: ``L = mean((x W + b - y)^2)`` over n and m."""
    kernel, bias = (np.asarray(v, np.float64) for v in layer.get_weights())
    n, m = y.shape
    xb = np.concatenate([x, np.ones((n, 1))], axis=1).astype(np.float64)
    residual = xb @ np.concatenate([kernel, bias[None]], axis=0) - y
    grad = (2.0 / (n * m)) * xb.T @ residual
    fisher = (2.0 / (n * m)) * np.kron(xb.T @ xb, np.eye(m))
    return grad.reshape(-1), fisher


def _step(model, x, y):
    model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0)


def test_adaptive_step_matches_closed_form_on_linear_regression():
    """Sec. 7: (alpha, mu) = -Q^-1 b with Q_ij = d_i^T (F + lambda I) d_j,
    b_i = g^T d_i, d = (Delta, delta_prev), Delta = -(C + lambda I)^-1 g; the
    first step (no previous update) is the 1-D problem."""
    x, y = _regression()
    damping = 1e-2
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    opt = keras_kfac.KFAC(
        adaptive_step=True,
        fisher="empirical",
        damping=damping,
        damping_mode="eigen",
        inverse_every=1,
        stats_decay=0.5,
    )
    model.compile(optimizer=opt, loss="mse")
    layer = model.layers[0]
    previous = None
    for _ in range(3):
        theta = flat_params(layer)
        grad, fisher = _mse_grad_and_fisher(layer, x, y)
        _step(model, x, y)
        c = np.asarray(opt.curvature_matrix(layer), np.float64)
        eye = np.eye(len(theta))
        natural = -np.linalg.solve(c + damping * eye, grad)
        damped = fisher + damping * eye
        d = opt.diagnostics()
        alpha, mu = float(d["alpha"]), float(d["mu"])
        if previous is None:
            expected_alpha = -(grad @ natural) / (natural @ damped @ natural)
            expected_mu = 0.0
        else:
            dirs = np.stack([natural, previous])
            q = dirs @ damped @ dirs.T
            b = dirs @ grad
            expected_alpha, expected_mu = -np.linalg.solve(q, b)
        np.testing.assert_allclose(alpha, expected_alpha, rtol=2e-3)
        np.testing.assert_allclose(mu, expected_mu, rtol=2e-3, atol=1e-5)
        update = flat_params(layer) - theta
        expected_update = expected_alpha * natural + (
            0.0 if previous is None else expected_mu * previous
        )
        np.testing.assert_allclose(update, expected_update, rtol=5e-3, atol=1e-5)
        previous = update
    assert abs(float(opt.diagnostics()["mu"])) > 1e-4  # the 2-D problem was used


def test_adaptive_step_minimises_the_exact_quadratic():
    """On a quadratic objective the loss decrease of the step equals the
    model's prediction minus the damping term, and beats (alpha, mu) nearby."""
    x, y = _regression(seed=1)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    opt = keras_kfac.KFAC(adaptive_step=True, fisher="empirical", damping=1e-3, inverse_every=1)
    model.compile(optimizer=opt, loss="mse")
    losses = []
    for _ in range(4):
        losses.append(float(model.evaluate(x, y, batch_size=len(x), verbose=0)))
        _step(model, x, y)
    losses.append(float(model.evaluate(x, y, batch_size=len(x), verbose=0)))
    # Least squares: the optimum is reached in a few exact-model steps.
    xb = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    w_star = np.linalg.lstsq(xb, y, rcond=None)[0]
    optimum = np.mean((xb @ w_star - y) ** 2)
    assert losses[-1] < losses[0]
    assert all(b <= a + 1e-6 for a, b in zip(losses, losses[1:]))
    np.testing.assert_allclose(losses[-1], optimum, rtol=1e-3)


def test_rho_is_one_on_a_quadratic_and_damping_falls():
    """High rho (sec. 6.5): on linear regression with MSE the quadratic model
    is exact, rho = dL / (dL + lambda |delta|^2 / 2) ~ 1 > 3/4, so every
    adaptation multiplies the damping by ``decay``."""
    x, y = _regression(seed=2)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    opt = keras_kfac.KFAC(damping=1e-2, learning_rate=0.1, momentum=0.0, kl_clip=None)
    model.compile(optimizer=opt, loss="mse")
    layer = model.layers[0]
    callback = AdaptiveDamping(every=1, decay=0.5)
    traces = []
    begin = opt.monitor.begin
    opt.monitor.begin = lambda *a: (traces.append(1), begin(*a))[1]  # runs only when tracing
    theta = flat_params(layer)
    grad, fisher = _mse_grad_and_fisher(layer, x, y)
    loss0 = float(model.evaluate(x, y, batch_size=len(x), verbose=0))
    model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0, callbacks=[callback])
    delta = flat_params(layer) - theta
    loss1 = float(model.evaluate(x, y, batch_size=len(x), verbose=0))
    predicted = 0.5 * delta @ (fisher + 1e-2 * np.eye(len(delta))) @ delta + grad @ delta
    expected_rho = (loss1 - loss0) / predicted
    rho = float(opt.diagnostics()["rho"])
    np.testing.assert_allclose(rho, expected_rho, rtol=1e-3)
    assert 0.75 < rho < 1.01  # <= 1 up to float32 rounding
    np.testing.assert_allclose(float(opt.damping), 1e-2 * 0.5, rtol=1e-6)
    history = model.fit(
        x, y, batch_size=len(x), epochs=3, shuffle=False, verbose=0, callbacks=[callback]
    )
    np.testing.assert_allclose(float(opt.damping), 1e-2 * 0.5**4, rtol=1e-5)
    assert all(r > 0.75 for r in history.history["rho"])
    np.testing.assert_allclose(history.history["damping"][-1], 1e-2 * 0.5**4, rtol=1e-5)
    # Changing the damping variable did not retrace the train step.
    assert len(traces) == 1


def test_rho_is_low_on_a_saturated_logistic_unit_and_damping_rises():
    """Low rho: a logistic unit saturated on the wrong side (logit 5, label 0)
    has a tiny Fisher p(1-p) but a large gradient p; the natural step is huge
    and the predicted decrease (-1/2 g^2 / F) far exceeds the attainable one
    (the loss is ~linear, bounded below by 0). rho < 1/4: damping /= decay."""
    n = 2000
    x = np.ones((n, 1), "float32")
    y = np.zeros((n, 1), "float32")
    model = keras.Sequential(
        [
            keras.Input((1,)),
            keras.layers.Dense(
                1, use_bias=False, kernel_initializer=keras.initializers.Constant(5.0)
            ),
        ]
    )
    damping = 1e-4
    opt = keras_kfac.KFAC(
        learning_rate=1.0,
        momentum=0.0,
        kl_clip=None,
        damping=damping,
        damping_mode="eigen",
        inverse_every=1,
        seed=0,
    )
    model.compile(optimizer=opt, loss=keras.losses.BinaryCrossentropy(from_logits=True))
    model.fit(
        x, y, batch_size=n, epochs=1, verbose=0, callbacks=[AdaptiveDamping(every=1, decay=0.5)]
    )
    z0, z1 = 5.0, float(model.layers[0].get_weights()[0][0, 0])
    delta = z1 - z0
    p = 1.0 / (1.0 + np.exp(-z0))
    softplus = lambda z: np.logaddexp(0.0, z)  # noqa: E731
    predicted = 0.5 * (p * (1 - p) + damping) * delta**2 + p * delta
    expected_rho = (softplus(z1) - softplus(z0)) / predicted
    rho = float(opt.diagnostics()["rho"])
    np.testing.assert_allclose(rho, expected_rho, rtol=1e-3)
    assert delta < -20.0 and rho < 0.25
    np.testing.assert_allclose(float(opt.damping), damping / 0.5, rtol=1e-6)


def test_adaptive_damping_rejects_a_damping_schedule():
    x, y = _regression()
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    schedule = keras.optimizers.schedules.ExponentialDecay(1e-2, 10, 0.5)
    model.compile(optimizer=keras_kfac.KFAC(damping=schedule), loss="mse")
    with pytest.raises(ValueError, match="schedule"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[AdaptiveDamping()])


def test_adaptive_step_needs_compute_loss_in_custom_loops():
    import tensorflow as tf

    x, y = _regression()
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    opt = keras_kfac.KFAC(adaptive_step=True, fisher="empirical", model=model)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean((model(x, training=True) - y) ** 2)
    grads = tape.gradient(loss, model.trainable_variables)
    with pytest.raises(ValueError, match="compute_loss"):
        opt.apply_gradients(zip(grads, model.trainable_variables))
    # With model.compute_loss inside the tape it works.
    model.compile(optimizer=opt, loss="mse")
    with tf.GradientTape() as tape:
        loss = model.compute_loss(x, y, model(x, training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    opt.apply_gradients(zip(grads, model.trainable_variables))
    assert float(opt.diagnostics()["alpha"]) > 0.0


def test_quadratic_model_reuses_the_steps_dropout_masks():
    """The batch objective of the quadratic model (rho, adaptive_step) is the
    loss the step's gradient came from: with Dropout, its passes must use
    the training pass's masks, not those of the next seeds."""
    import tensorflow as tf

    from keras_kfac import quadratic
    from keras_kfac.capture import Capture

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(3),
        ]
    )
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(32, 6)).astype("float32"))
    y = tf.constant(rng.integers(0, 3, size=32))
    capture = Capture(model, sampled=True)

    @tf.function
    def run():
        with tf.GradientTape() as tape:
            loss = model.compute_loss(x, y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        objective = quadratic.require(quadratic.batch_objective(model, capture, capture.current()))
        values = objective.current_values()
        with tf.GradientTape() as tape:
            tape.watch(values)
            replayed = objective.loss(values)
        # The next training pass draws new masks: dropout is active.
        fresh = model.compute_loss(x, y, model(x, training=True))
        return loss, replayed, fresh, grads, tape.gradient(replayed, values)

    try:
        loss, replayed, fresh, grads, replayed_grads = run()
    finally:
        capture.remove()
    assert abs(float(fresh) - float(loss)) > 1e-3
    np.testing.assert_allclose(float(replayed), float(loss), rtol=1e-5)
    for g, r in zip(grads, replayed_grads):
        np.testing.assert_allclose(r.numpy(), g.numpy(), rtol=1e-4, atol=1e-6)


def test_rho_models_the_measured_loss_when_the_gradient_has_other_terms():
    """A term added outside ``model.compute_loss`` (the mixture-of-experts
    client's balancing penalty) is in the step's gradient but not in the
    loss rho re-evaluates: rho's model uses that loss's own slope. Closed
    form on linear regression with MSE: ``h(theta + delta) - h(theta) =
    grad_h^T delta + 1/2 delta^T F delta`` exactly."""
    import tensorflow as tf

    x, y = _regression(seed=2)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    opt = keras_kfac.KFAC(damping=1e-2, damping_adaptation_interval=1, fisher="empirical")
    model.compile(optimizer=opt, loss="mse")
    layer = model.layers[0]
    for _ in range(2):
        theta = flat_params(layer)
        grad, fisher = _mse_grad_and_fisher(layer, x, y)
        damping = float(opt.damping)
        with tf.GradientTape() as tape:
            loss = model.compute_loss(x, y, model(x, training=True))
            total = loss + 0.5 * tf.reduce_sum(tf.square(layer.kernel))
        weights = model.trainable_variables
        opt.apply_gradients(zip(tape.gradient(total, weights), weights))
        delta = flat_params(layer) - theta
        curvature = 0.5 * delta @ fisher @ delta
        actual = grad @ delta + curvature
        expected = actual / (grad @ delta + curvature + 0.5 * damping * delta @ delta)
        rho = float(opt.diagnostics()["rho"])
        np.testing.assert_allclose(rho, expected, rtol=2e-3)
        # The step's own gradient (penalty included) would give another rho.
        total_grad = grad.copy()
        total_grad[:6] += np.asarray(layer.kernel).reshape(-1) - delta[:6]
        with_penalty = actual / (total_grad @ delta + curvature + 0.5 * damping * delta @ delta)
        assert abs(with_penalty - expected) > 0.1 * abs(expected)


@pytest.mark.parametrize("layer", ["lstm", "dense"])
def test_reverse_jacobian_vector_products_match_brute_force(layer):
    """``BatchObjective.jvp`` by two reverse passes (models with a layer that
    blocks forward mode, ``forward_mode=False``) in a traced function, and
    by forward mode where it runs, against the dense Jacobian
    (``GradientTape.jacobian``) and the loss gradient; the slope includes a
    kernel regularizer's term."""
    import tensorflow as tf

    from keras_kfac import quadratic
    from keras_kfac.capture import Capture

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(4, 3, 2)).astype("float32"))
    y = tf.constant(rng.integers(0, 3, size=4))
    hidden = keras.layers.LSTM(3) if layer == "lstm" else keras.layers.Flatten()
    model = keras.Sequential(
        [
            keras.Input((3, 2)),
            hidden,
            keras.layers.Dense(3, kernel_regularizer=keras.regularizers.L2(0.1)),
        ]
    )
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    values = [tf.identity(v) for v in model.trainable_variables]
    tangents = [tf.constant(rng.normal(size=v.shape).astype("float32")) for v in values]
    capture = Capture(model, sampled=True)

    def products(forward_mode):
        with tf.GradientTape():  # a training pass: the capture records it
            model.compute_loss(x, y, model(x, training=True))
        objective = quadratic.batch_objective(
            model, capture, capture.current(), forward_mode=forward_mode
        )
        return objective.jvp(values, tangents)

    try:
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(values)
            with keras.StatelessScope(
                state_mapping=list(zip(model.trainable_variables, values)), collect_losses=True
            ) as scope:
                logits = model(x, training=True)
                loss = model.compute_loss(x, y, logits)
        del scope
        jacobians = tape.jacobian(logits, values)
        expected_ju = sum(
            tf.tensordot(j, t, axes=len(t.shape)).numpy() for j, t in zip(jacobians, tangents)
        )
        expected_slope = sum(
            float(tf.reduce_sum(g * t)) for g, t in zip(tape.gradient(loss, values), tangents)
        )
        runs = {"reverse, traced": tf.function(lambda: products(False))()}
        runs["forward, eager"] = products(True)
        if layer == "dense":
            runs["forward, traced"] = tf.function(lambda: products(True))()
    finally:
        capture.remove()
    for name, (value, _, ju, slope) in runs.items():
        np.testing.assert_allclose(float(value), float(loss), rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(ju.numpy(), expected_ju, rtol=1e-4, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(float(slope), expected_slope, rtol=1e-4, err_msg=name)
