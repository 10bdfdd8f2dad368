"""K-FAC / KFC statistics and updates against brute force on tiny layers.

References are built independently of the package: per-example gradients by
``GradientTape.jacobian``, patches by explicit loops, dense solves with
``tf.linalg.solve``.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_kfac
from reference import damped_reference, flat_params, plain_kfac, reference_patches

MODES = ["graph", "eager", "xla"]


def compile_kw(mode):
    return {"run_eagerly": mode == "eager", "jit_compile": mode == "xla"}


def one_step_optimizer(damping_mode="factored", lr=0.1, damping=0.05):
    return plain_kfac(lr, damping, stats_decay=0.5, damping_mode=damping_mode)


def per_example_losses(model, x, y):
    logits = model(x)
    return keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)


def per_example_param_grads(model, layer, x, y):
    """``u_i = concat(flatten(dW_i), db_i)``, shape (n, P)."""
    with tf.GradientTape(persistent=True) as tape:
        losses = per_example_losses(model, x, y)
    jk = tape.jacobian(losses, layer.kernel)
    jb = tape.jacobian(losses, layer.bias)
    n = x.shape[0]
    return tf.concat([tf.reshape(jk, (n, -1)), tf.reshape(jb, (n, -1))], axis=1)


# --- Dense ------------------------------------------------------------------


def dense_problem(seed=0, n=6):
    rng = np.random.default_rng(seed)
    keras.utils.set_random_seed(seed)
    x = rng.normal(size=(n, 3)).astype("float32")
    y = rng.integers(0, 3, size=(n,))
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(3)]
    )
    return model, x, y


def dense_factors(model, x, y):
    """Analytic a_bar and g for both layers of the tanh MLP (own forward)."""
    W1, b1 = model.layers[0].kernel.numpy(), model.layers[0].bias.numpy()
    W2, b2 = model.layers[1].kernel.numpy(), model.layers[1].bias.numpy()
    h = np.tanh(x @ W1 + b1)
    z = h @ W2 + b2
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    g2 = p - np.eye(3)[y]
    g1 = (g2 @ W2.T) * (1 - h**2)
    ones = np.ones((x.shape[0], 1))
    return [(np.hstack([x, ones]), g1), (np.hstack([h, ones]), g2)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("damping_mode", ["factored", "eigen"])
def test_dense_statistics_and_update(mode, damping_mode):
    model, x, y = dense_problem()
    lr, damping = 0.1, 0.05
    opt = one_step_optimizer(damping_mode, lr, damping)
    model.compile(
        optimizer=opt,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        **compile_kw(mode),
    )
    n = x.shape[0]
    refs = dense_factors(model, x, y)
    before = [flat_params(layer) for layer in model.layers]
    grads = [per_example_param_grads(model, layer, x, y).numpy() for layer in model.layers]
    model.fit(x, y, batch_size=n, epochs=1, shuffle=False, verbose=0)
    for layer, (a, g), u, theta0 in zip(model.layers, refs, grads, before):
        A = a.T @ a / n
        G = g.T @ g / n
        # The kernel gradient reconstructed from a and g is the true gradient.
        np.testing.assert_allclose((a.T @ g / n).ravel(), u.mean(0), rtol=1e-4, atol=1e-6)
        curv = opt.curvature_for(layer)
        np.testing.assert_allclose(curv.a.numpy(), A, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(curv.g.numpy(), G, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(
            opt.curvature_matrix(layer).numpy(), np.kron(A, G), rtol=1e-4, atol=1e-6
        )
        expected = -lr * np.linalg.solve(damped_reference(A, G, damping, damping_mode), u.mean(0))
        np.testing.assert_allclose(flat_params(layer) - theta0, expected, rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize("mode", ["graph", "xla"])
def test_curvature_warmup_schedule_matches_brute_force(mode):
    """``curvature_warmup=3`` with statistics every 4 and refreshes every 8
    steps: statistics (running average, decay 0.5) at steps 0, 1, 2, 4, 8,
    refreshes at 0, 1, 2, 8. Every step's update is checked against the
    factored-damped solve with the factors of the last refresh, built from
    analytic a, g at the weights each step saw."""
    model, x, y = dense_problem(n=5)
    lr, damping, decay = 0.2, 0.05, 0.5
    opt = plain_kfac(
        lr,
        damping,
        stats_decay=decay,
        stats_every=4,
        inverse_every=8,
        curvature_warmup=3,
        damping_adaptation_interval=0,
    )
    model.compile(
        optimizer=opt,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        **compile_kw(mode),
    )
    averaged, inverted = None, None
    for step in range(10):
        fresh = [(a.T @ a / len(x), g.T @ g / len(x)) for a, g in dense_factors(model, x, y)]
        if step < 3 or step % 4 == 0:
            averaged = (
                fresh
                if averaged is None
                else [
                    tuple(decay * old + (1 - decay) * new for old, new in zip(o, f))
                    for o, f in zip(averaged, fresh)
                ]
            )
        if step < 3 or step % 8 == 0:
            inverted = averaged
        grads = [
            per_example_param_grads(model, layer, x, y).numpy().mean(0) for layer in model.layers
        ]
        before = [flat_params(layer) for layer in model.layers]
        model.train_on_batch(x, y)
        for layer, (A, G), grad, theta0 in zip(model.layers, inverted, grads, before):
            expected = -lr * np.linalg.solve(damped_reference(A, G, damping, "factored"), grad)
            np.testing.assert_allclose(
                flat_params(layer) - theta0, expected, rtol=2e-3, atol=1e-6, err_msg=f"step {step}"
            )
    assert int(opt._stats_updates) == 5


def test_dense_kfac_is_exact_for_one_example():
    """With n = 1, kron(A, G) is the exact Fisher block u u^T of a Dense layer."""
    model, x, y = dense_problem(n=1)
    opt = one_step_optimizer(lr=0.0)
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    u = per_example_param_grads(model, model.layers[0], x, y).numpy()
    model.fit(x, y, batch_size=1, epochs=1, verbose=0)
    np.testing.assert_allclose(
        opt.curvature_matrix(model.layers[0]).numpy(), np.outer(u[0], u[0]), rtol=1e-4, atol=1e-7
    )


# --- Conv2D -----------------------------------------------------------------


CONV_CASES = [
    dict(strides=(1, 1), dilation=(1, 1), padding="valid"),
    dict(strides=(2, 2), dilation=(1, 1), padding="same"),
    dict(strides=(1, 2), dilation=(1, 1), padding="valid"),
    dict(strides=(1, 1), dilation=(2, 2), padding="same"),
]


@pytest.mark.parametrize(
    "case", CONV_CASES, ids=lambda c: f"s{c['strides']}d{c['dilation']}{c['padding']}"
)
@pytest.mark.parametrize(
    "mode,damping_mode", [("graph", "factored"), ("eager", "eigen"), ("xla", "factored")]
)
def test_conv2d_statistics_and_update(case, mode, damping_mode):
    keras.utils.set_random_seed(1)
    rng = np.random.default_rng(1)
    n, c_in, c_out, k = 3, 2, 3, 3
    x = rng.normal(size=(n, 7, 7, c_in)).astype("float32")
    y = rng.integers(0, 2, size=(n,))
    conv = keras.layers.Conv2D(
        c_out, k, strides=case["strides"], dilation_rate=case["dilation"], padding=case["padding"]
    )
    model = keras.Sequential(
        [keras.Input((7, 7, c_in)), conv, keras.layers.Flatten(), keras.layers.Dense(2)]
    )
    lr, damping = 0.1, 0.05
    opt = one_step_optimizer(damping_mode, lr, damping)
    model.compile(
        optimizer=opt,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        **compile_kw(mode),
    )

    patches = reference_patches(x, k, k, case["strides"], case["dilation"], case["padding"])
    a = np.concatenate([patches, np.ones(patches.shape[:2] + (1,))], axis=-1)
    # g_{i,t} = d l_i / d s_{i,t}, from an explicit forward pass of the model.
    with tf.GradientTape() as tape:
        s = (
            tf.nn.convolution(
                x,
                conv.kernel,
                strides=case["strides"],
                dilations=case["dilation"],
                padding=case["padding"].upper(),
            )
            + conv.bias
        )
        tape.watch(s)
        logits = model.layers[2](model.layers[1](s))
        total = tf.reduce_sum(
            keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
        )
    g = tape.gradient(total, s).numpy().reshape(n, -1, c_out)
    T = g.shape[1]
    assert a.shape[1] == T
    u = per_example_param_grads(model, conv, x, y).numpy()
    # Per-example gradient = sum over locations of kron(a_bar, g).
    np.testing.assert_allclose(
        np.einsum("nta,ntg->nag", a, g).reshape(n, -1), u, rtol=1e-4, atol=1e-5
    )
    A = np.einsum("nta,ntb->ab", a, a) / n
    G = np.einsum("nta,ntb->ab", g, g) / (n * T)
    theta0 = flat_params(conv)
    model.fit(x, y, batch_size=n, epochs=1, shuffle=False, verbose=0)
    curv = opt.curvature_for(conv)
    np.testing.assert_allclose(curv.a.numpy(), A, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(curv.g.numpy(), G, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(
        opt.curvature_matrix(conv).numpy(), np.kron(A, G), rtol=1e-4, atol=1e-7
    )
    expected = -lr * np.linalg.solve(damped_reference(A, G, damping, damping_mode), u.mean(0))
    np.testing.assert_allclose(flat_params(conv) - theta0, expected, rtol=2e-3, atol=1e-6)


def channels_first_conv_backward_error():
    """Why plain Keras cannot train a channels_first Conv2D on this platform,
    or None. Some TensorFlow CPU builds have no NCHW filter-gradient kernel
    (e.g. TF 2.21 with oneDNN off: ``Conv2DCustomBackpropFilterOp only supports
    NHWC``), which fails Adam as much as K-FAC, so it is probed, not versioned.
    Graph mode, like ``fit``: eagerly even the forward NCHW Conv2D can fail."""
    conv = keras.layers.Conv2D(1, 1, data_format="channels_first")
    x = tf.ones((1, 1, 2, 2))
    conv.build(x.shape)

    @tf.function
    def gradients():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(conv(x))
        return tape.gradient(loss, conv.trainable_variables)

    try:
        gradients()
    except tf.errors.OpError as error:
        # TF ends the message with the kernel's complaint, then "[[{{node ...}}]]".
        lines = [line.strip() for line in error.message.splitlines()]
        return [line for line in lines if line and not line.startswith("[[")][-1]
    return None


def test_conv2d_channels_first_matches_channels_last():
    reason = channels_first_conv_backward_error()
    if reason is not None:
        pytest.skip(
            f"this platform cannot train a channels_first Conv2D with plain Keras: {reason}"
        )
    keras.utils.set_random_seed(2)
    x = np.random.default_rng(2).normal(size=(2, 6, 6, 2)).astype("float32")
    y = np.array([0, 1])
    stats = []
    for data_format in ("channels_last", "channels_first"):
        keras.utils.set_random_seed(2)
        inputs = x if data_format == "channels_last" else x.transpose(0, 3, 1, 2)
        conv = keras.layers.Conv2D(3, 3, data_format=data_format, padding="same")
        model = keras.Sequential(
            [
                keras.Input(inputs.shape[1:]),
                conv,
                keras.layers.GlobalAveragePooling2D(data_format=data_format),
                keras.layers.Dense(2),
            ]
        )
        opt = one_step_optimizer()
        model.compile(
            optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        )
        model.fit(inputs, y, batch_size=2, verbose=0)
        stats.append((opt.curvature_for(conv).a.numpy(), opt.curvature_for(conv).g.numpy()))
    np.testing.assert_allclose(stats[0][0], stats[1][0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats[0][1], stats[1][1], rtol=1e-5, atol=1e-7)


# --- running averages, momentum, KL clipping -----------------------------------


def test_running_average_and_kl_clip_and_momentum():
    """Step 2 of ``m <- nu (mu m + P g)``, ``theta <- theta - lr m`` with
    ``nu = min(1, sqrt(kl_clip / (lr^2 (mu^2 ||m||^2 + 2 mu <m, g> + <g, P g>))))``,
    ``||m||^2`` the momentum's norm in step 1's damped metric."""
    model, x, y = dense_problem(n=8)
    lr, kl_clip, mu, decay, damping = 0.5, 1e-4, 0.9, 0.8, 0.05
    opt = keras_kfac.KFAC(
        learning_rate=lr,
        damping=damping,
        momentum=mu,
        kl_clip=kl_clip,
        stats_decay=decay,
        inverse_every=1,
        fisher="empirical",
    )
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    layer = model.layers[1]
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)

    def momentum(lyr):
        return np.concatenate(
            [
                opt._momentums[opt._get_variable_index(w)].numpy().ravel()
                for w in (lyr.kernel, lyr.bias)
            ]
        )

    momenta = [momentum(lyr) for lyr in model.layers]
    theta1 = flat_params(layer)
    # Everything the KL scale needs, for all layers, at the second step.
    all_refs = dense_factors(model, x, y)
    inner = momentum_dot_grad = momentum_norm = 0.0
    directions = []
    for lyr, (a, g), m in zip(model.layers, all_refs, momenta):
        c = opt.curvature_for(lyr)
        momentum_norm += m @ damped_reference(c.a.numpy(), c.g.numpy(), damping, "factored") @ m
        A = decay * c.a.numpy() + (1 - decay) * a.T @ a / 8
        G = decay * c.g.numpy() + (1 - decay) * g.T @ g / 8
        u = per_example_param_grads(model, lyr, x, y).numpy().mean(0)
        p = np.linalg.solve(damped_reference(A, G, damping, "factored"), u)
        inner += u @ p
        momentum_dot_grad += m @ u
        directions.append(p)
    update_curvature = mu**2 * momentum_norm + 2 * mu * momentum_dot_grad + inner
    nu = min(1.0, np.sqrt(kl_clip / (lr**2 * update_curvature)))
    assert nu < 1.0  # the clip is active in this test
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    expected_momentum = nu * (mu * momenta[1] + directions[1])
    # The package's P g itself agrees to 2e-3 (float32 factors and solves).
    error = np.linalg.norm(momentum(layer) - expected_momentum) / np.linalg.norm(expected_momentum)
    assert error < 5e-3
    np.testing.assert_allclose(
        flat_params(layer), theta1 - lr * expected_momentum, rtol=2e-3, atol=1e-6
    )


def test_kl_clip_bounds_the_update_with_momentum():
    """The KL clip bounds the step actually taken, momentum included:
    ``lr^2 delta^T (F + damping) delta <= kl_clip`` on every step. With a
    fixed batch the gradient keeps its direction, so clipping ``P g`` before
    adding momentum 0.9 (the rule before) gave steps 50x the bound within 15
    steps. Statistics and inverses are frozen after step 1, so the metric is
    exactly the one the optimizer inverts."""
    model, x, y = dense_problem(n=8)
    lr, kl_clip, damping = 1.0, 1e-4, 0.05
    opt = keras_kfac.KFAC(
        learning_rate=lr,
        damping=damping,
        momentum=0.9,
        kl_clip=kl_clip,
        stats_every=1000,
        inverse_every=1000,
        fisher="empirical",
    )
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    metrics = None
    kl = []
    for _ in range(15):
        before = [flat_params(lyr) for lyr in model.layers]
        model.train_on_batch(x, y)
        if metrics is None:
            metrics = [
                damped_reference(
                    opt.curvature_for(lyr).a.numpy(),
                    opt.curvature_for(lyr).g.numpy(),
                    damping,
                    "factored",
                )
                for lyr in model.layers
            ]
        deltas = [flat_params(lyr) - b for lyr, b in zip(model.layers, before)]
        kl.append(lr**2 * sum(d @ m @ d for d, m in zip(deltas, metrics)))
    kl = np.array(kl)
    # The clip binds on every step, and the bound holds for the whole update.
    np.testing.assert_allclose(kl, kl_clip, rtol=1e-2)
