"""Property-based test (hypothesis): random small Dense / Conv2D layers
(shapes, strides, padding, dilation, bias, batch size, extra Dense location
axes), one K-FAC step against brute force: A and G from explicit patches
(``reference.reference_patches``) and pre-activation gradients of an
explicit forward pass, and the update ``-lr (damped kron(A, G))^-1 grad``
with the gradient from per-example Jacobians (``reference``)."""

import keras
import numpy as np
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reference import damped_reference, per_example_gradients, plain_kfac, reference_patches

SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@st.composite
def configurations(draw):
    kind = draw(st.sampled_from(["dense", "conv2d"]))
    config = dict(
        kind=kind,
        n=draw(st.integers(1, 4)),
        c_out=draw(st.integers(1, 3)),
        use_bias=draw(st.booleans()),
        damping_mode=draw(st.sampled_from(["factored", "eigen"])),
        seed=draw(st.integers(0, 2**16)),
    )
    if kind == "dense":
        config.update(d_in=draw(st.integers(1, 4)), locations=draw(st.sampled_from([None, 2, 3])))
    else:
        k = draw(st.integers(1, 3))
        dilation = draw(st.integers(1, 2))
        strides = (1, 1) if dilation > 1 else (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
        span = (k - 1) * dilation + 1
        config.update(
            k=k,
            dilation=(dilation, dilation),
            strides=strides,
            padding=draw(st.sampled_from(["valid", "same"])),
            size=draw(st.integers(span, span + 3)),
            c_in=draw(st.integers(1, 2)),
        )
    return config


def build(config):
    keras.utils.set_random_seed(config["seed"])
    rng = np.random.default_rng(config["seed"])
    n = config["n"]
    if config["kind"] == "dense":
        shape = (
            (config["d_in"],)
            if config["locations"] is None
            else (config["locations"], config["d_in"])
        )
        layer = keras.layers.Dense(config["c_out"], use_bias=config["use_bias"])
    else:
        shape = (config["size"], config["size"], config["c_in"])
        layer = keras.layers.Conv2D(
            config["c_out"],
            config["k"],
            strides=config["strides"],
            dilation_rate=config["dilation"],
            padding=config["padding"],
            use_bias=config["use_bias"],
        )
    x = rng.normal(size=(n,) + shape).astype("float32")
    y = rng.integers(0, 2, size=(n,))
    model = keras.Sequential(
        [keras.Input(shape), layer, keras.layers.Flatten(), keras.layers.Dense(2)]
    )
    return model, layer, x, y


def brute_force_ag(config, model, layer, x, y):
    n = len(x)
    if config["kind"] == "dense":
        a = x.reshape(n, -1, config["d_in"]).astype(np.float64)
    else:
        a = reference_patches(
            x, config["k"], config["k"], config["strides"], config["dilation"], config["padding"]
        )
    if config["use_bias"]:
        a = np.concatenate([a, np.ones(a.shape[:2] + (1,))], axis=-1)
    with tf.GradientTape() as tape:
        s = layer.call(tf.constant(x))  # no activation: the pre-activation
        tape.watch(s)
        logits = model.layers[2](model.layers[1](s))
        total = tf.reduce_sum(
            keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
        )
    g = tape.gradient(total, s).numpy().reshape(n, -1, config["c_out"])
    return a, g


@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(configurations())
def test_random_layer_statistics_and_one_step_update(config):
    model, layer, x, y = build(config)
    lr, damping = 0.1, 0.05
    # Expand factors (the reference's); "auto" would pick reduce for a Dense
    # over locations flattened before the loss.
    opt = plain_kfac(
        lr,
        damping,
        damping_mode=config["damping_mode"],
        curvature_options={"weight_sharing": "expand"},
    )
    model.compile(optimizer=opt, loss=SCCE, run_eagerly=True)
    a, g = brute_force_ag(config, model, layer, x, y)
    n, T = g.shape[0], g.shape[1]
    assert a.shape[1] == T
    A = np.einsum("nta,ntb->ab", a, a) / n
    G = np.einsum("nta,ntb->ab", g, g) / (n * T)
    u = per_example_gradients(model, layer, x, y, SCCE).numpy()
    # The per-example gradient is sum_t a_t g_t^T (the block's parametrization).
    np.testing.assert_allclose(
        np.einsum("nta,ntg->nag", a, g).reshape(n, -1), u, rtol=1e-4, atol=1e-5
    )
    params = [layer.kernel] + ([layer.bias] if config["use_bias"] else [])
    theta = np.concatenate([p.numpy().ravel() for p in params])
    model.fit(x, y, batch_size=n, epochs=1, verbose=0, shuffle=False)
    curvature = opt.curvature_for(layer)
    np.testing.assert_allclose(curvature.a.numpy(), A, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(curvature.g.numpy(), G, rtol=1e-4, atol=1e-7)
    expected = -lr * np.linalg.solve(
        damped_reference(A, G, damping, config["damping_mode"]), u.mean(0)
    )
    step = np.concatenate([p.numpy().ravel() for p in params]) - theta
    np.testing.assert_allclose(step, expected, rtol=5e-3, atol=2e-6 + 2e-3 * np.abs(expected).max())
