"""Normalization layers' scale-and-shift blocks against brute force.

Per-example gradients from ``GradientTape.jacobian`` (inference mode), the
exact Fisher's per-feature blocks, and one ``KFAC`` step through
``train_on_batch`` against a numpy per-feature damped solve built from the
layer's own training-mode output (``xhat = (y - beta) / gamma``) and the
loss gradient at ``y``.
"""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_kfac
from keras_kfac import curvature as curvature_lib
from keras_kfac.capture import Capture
from keras_kfac.curvature.base import LayerBatch
from keras_kfac.exact import per_example_loss_fn
from keras_kfac.fidelity import fidelity, fitted_curvature
from keras_kfac.layers import block_for_layer, unsupported_reason
from reference import fisher_block, layer_batch, per_example_gradients, plain_kfac, rel

pytestmark = pytest.mark.filterwarnings("ignore:You passed `rms_scaling=True`")

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
LR, DAMPING = 0.1, 0.05
PER_EXAMPLE = per_example_loss_fn(LOSS)

# name: (input shape, layer factory)
CASES = {
    "layer_norm": ((5, 6), lambda: keras.layers.LayerNormalization()),
    "layer_norm_axes": ((3, 4, 2), lambda: keras.layers.LayerNormalization(axis=[1, 3])),
    "layer_norm_rms_scaling": ((5, 6), lambda: keras.layers.LayerNormalization(rms_scaling=True)),
    "batch_norm": ((4, 4, 3), lambda: keras.layers.BatchNormalization(momentum=0.8)),
    "batch_norm_channels_first": (
        (3, 4, 4),
        lambda: keras.layers.BatchNormalization(axis=1, momentum=0.8),
    ),
    "batch_norm_shift_only": (
        (4, 4, 3),
        lambda: keras.layers.BatchNormalization(scale=False, momentum=0.8),
    ),
    "group_norm": ((4, 4, 6), lambda: keras.layers.GroupNormalization(groups=3)),
    "rms_norm": ((5, 6), lambda: keras.layers.RMSNormalization()),
}


def make_case(name, n=8, seed=0):
    """``Input -> norm ("target") -> Flatten -> Dense(3)``, with random
    scale, shift (and BatchNormalization moving statistics) so that every
    term of the block is exercised; inputs with non-zero mean and scale."""
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    shape, factory = CASES[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rms_scaling is deprecated
        layer = factory()
    model = keras.Sequential(
        [keras.Input(shape), layer, keras.layers.Flatten(), keras.layers.Dense(3)]
    )
    for w in layer.weights:
        if "variance" in w.path:
            w.assign(rng.uniform(0.5, 2.0, w.shape).astype("float32"))
        elif "gamma" in w.path or "scale" in w.path:
            w.assign(rng.uniform(0.5, 1.5, w.shape).astype("float32"))
        else:
            w.assign(rng.normal(size=w.shape).astype("float32"))
    x = (1.5 * rng.normal(size=(n,) + shape) + 0.7).astype("float32")
    y = rng.integers(0, 3, size=n)
    return model, layer, x, y


def per_example_u(batch):
    """The block's ``u_i = (sum_t g xhat, sum_t g)`` per feature, flattened
    in parameter order ``concat(gamma, beta)``: ``(n, k F)``."""
    return batch.per_example_gradients().numpy()


def training_batch(model, layer, x, y):
    """The block's batch recorded by the instrumentation in a training-mode
    forward pass (layer weights restored afterwards: BatchNormalization
    updates its moving statistics), and the total-loss gradient."""
    block = block_for_layer(layer)
    saved = [w.numpy() for w in layer.weights]
    capture = Capture(model, sampled=False, layers=[layer])
    try:
        with tf.GradientTape() as tape:
            total = tf.reduce_sum(PER_EXAMPLE(y, model(x, training=True)))
        grads = tape.gradient(total, block.variables)
        record = capture.current()
    finally:
        capture.remove()
        layer.set_weights(saved)
    key = id(layer)
    batch = LayerBatch(block, record.inputs[key], record.output_grads[key], 1.0)
    return batch, np.concatenate([g.numpy().ravel() for g in grads])


@pytest.mark.parametrize("name", list(CASES))
def test_per_example_gradients_exact(name):
    model, layer, x, y = make_case(name)
    want = per_example_gradients(model, layer, x, y, LOSS).numpy()
    got = per_example_u(layer_batch(model, layer, x, y, LOSS))
    assert got.shape == want.shape
    assert rel(got, want) < 1e-5


@pytest.mark.parametrize("name", list(CASES))
def test_training_mode_gradients_sum_to_the_gradient(name):
    """In training mode (batch statistics for BatchNormalization) the
    recorded ``xhat`` and ``g`` give the layer's gradient: ``sum_i u_i``."""
    model, layer, x, y = make_case(name)
    batch, grad = training_batch(model, layer, x, y)
    assert rel(per_example_u(batch).sum(0), grad) < 1e-5


@pytest.mark.parametrize("name", list(CASES))
def test_blocks_are_the_exact_per_feature_blocks(name):
    model, layer, x, y = make_case(name)
    exact = fisher_block(model, layer, x, y, LOSS).numpy().astype(np.float64)
    block = block_for_layer(layer)
    k, f = block.a_dim, block.g_dim
    same_feature = np.tile(np.eye(f), (k, k))
    got = fitted_curvature("scale_and_shift", model, layer, x, y, LOSS).matrix().numpy()
    assert got.shape == exact.shape == (k * f, k * f)
    assert rel(got, exact * same_feature) < 1e-5
    # The approximation drops real cross-feature terms (the test compares
    # something non-trivial).
    assert rel(exact * same_feature, exact) > 1e-2


def reference_step(model, layer, x, y):
    """``-lr (F_j + damping I)^-1 grad_j`` per feature, from the layer's own
    training-mode output ``y`` (``xhat = (y - beta) / gamma``) and
    ``g_i = n dL/dy_i`` of the batch-mean loss, in float64."""
    block = block_for_layer(layer)
    saved = [w.numpy() for w in layer.weights]
    head = keras.Sequential(model.layers[1:])
    with tf.GradientTape() as tape:
        out = layer(x, training=True)
        tape.watch(out)
        loss = tf.reduce_mean(PER_EXAMPLE(y, head(out)))
    gy = tape.gradient(loss, out).numpy().astype(np.float64) * len(x)
    layer.set_weights(saved)
    out = out.numpy().astype(np.float64)
    ndim = out.ndim
    axes = sorted(a % ndim for a in ([layer.axis] if isinstance(layer.axis, int) else layer.axis))
    shape = [1] * ndim
    for a in axes:
        shape[a] = out.shape[a]
    values = [v.numpy().astype(np.float64).reshape(shape) for v in block.variables]
    scale = values[0] if block.has_scale else 1.0
    shift = values[-1] if block.has_shift else 0.0
    xhat = (out - shift) / scale
    others = [d for d in range(1, ndim) if d not in axes]
    perm = [0] + others + axes
    xhat = xhat.transpose(perm).reshape(len(x), -1, block.g_dim)
    g = gy.transpose(perm).reshape(len(x), -1, block.g_dim)
    rows = ([np.einsum("ntf,ntf->nf", g, xhat)] if block.has_scale else []) + (
        [g.sum(1)] if block.has_shift else []
    )
    u = np.stack(rows, axis=1)  # (n, k, F)
    fisher = np.einsum("nkf,nlf->fkl", u, u) / len(x)
    grad = u.mean(0)  # (k, F)
    eye = np.eye(block.a_dim)
    step = np.stack(
        [np.linalg.solve(fisher[j] + DAMPING * eye, grad[:, j]) for j in range(block.g_dim)]
    )
    return -LR * step.T.ravel(), grad.ravel()


def flat(layer):
    return np.concatenate(
        [v.numpy().astype(np.float64).ravel() for v in block_for_layer(layer).variables]
    )


STEP_CASES = (
    [(name, "graph") for name in CASES]
    + [
        (name, mode)
        for name in ("layer_norm", "batch_norm_channels_first", "group_norm", "rms_norm")
        for mode in ("eager",)
    ]
    + [(name, "xla") for name in ("layer_norm", "batch_norm_channels_first")]
)  # XLA compiles are slow here


@pytest.mark.parametrize("name,mode", STEP_CASES)
def test_one_step_is_the_per_feature_damped_solve(name, mode):
    model, layer, x, y = make_case(name)
    want, grad = reference_step(model, layer, x, y)
    _, total = training_batch(model, layer, x, y)
    assert rel(grad, total / len(x)) < 1e-5  # the reference's gradient is the layer's
    # curvature="ekfac": the user's choice does not reach norm layers.
    opt = plain_kfac(LR, DAMPING, curvature="ekfac")
    model.compile(optimizer=opt, loss=LOSS, run_eagerly=mode == "eager", jit_compile=mode == "xla")
    before = flat(layer)
    model.train_on_batch(x, y)
    assert opt.curvature_for(layer).name == "scale_and_shift"
    assert rel(flat(layer) - before, want) < 1e-4


def test_batch_norm_moving_statistics_updated_once_and_not_by_the_optimizer():
    model, layer, x, y = make_case("batch_norm_channels_first")
    mean0, var0 = layer.moving_mean.numpy(), layer.moving_variance.numpy()
    model.compile(optimizer=keras_kfac.KFAC(learning_rate=LR, damping=DAMPING), loss=LOSS)
    model.train_on_batch(x, y)
    batch_mean = x.mean(axis=(0, 2, 3))
    batch_var = x.var(axis=(0, 2, 3))
    np.testing.assert_allclose(
        layer.moving_mean.numpy(), 0.8 * mean0 + 0.2 * batch_mean, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        layer.moving_variance.numpy(), 0.8 * var0 + 0.2 * batch_var, rtol=1e-5, atol=1e-6
    )
    paths = [v.path for v in block_for_layer(layer).variables]
    assert paths == [layer.gamma.path, layer.beta.path]
    # Inference uses the moving statistics and changes nothing.
    before = [w.numpy() for w in layer.weights]
    model.predict(x, verbose=0)
    for w, b in zip(layer.weights, before):
        np.testing.assert_array_equal(w.numpy(), b)


def test_bn_convnet_trains():
    keras.utils.set_random_seed(1)
    rng = np.random.default_rng(1)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(8, 3, padding="same", use_bias=False),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.Conv2D(8, 3, strides=2, use_bias=False),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(4),
        ]
    )
    x = rng.normal(size=(64, 8, 8, 3)).astype("float32")
    y = (x[:, :4, :4, 0].mean((1, 2)) > 0).astype("int64") + 2 * (x[:, 4:, 4:, 1].mean((1, 2)) > 0)
    opt = keras_kfac.KFAC(learning_rate=0.05, damping=1e-2)
    model.compile(optimizer=opt, loss=LOSS)
    losses = model.fit(x, y, batch_size=32, epochs=4, verbose=0).history["loss"]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.9 * losses[0], losses
    text = opt.summary(print_fn=lambda s: None)
    assert text.count("scale_and_shift") == 2 and "fallback" not in text


def test_not_user_selectable():
    assert "scale_and_shift" not in curvature_lib.available()
    assert curvature_lib.get("scale_and_shift").name == "scale_and_shift"
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(optimizer=keras_kfac.KFAC(curvature="scale_and_shift"), loss=LOSS)
    with pytest.raises(ValueError, match="fixed curvature of normalization layers.*available"):
        model.train_on_batch(np.zeros((2, 4), "float32"), np.zeros(2))


def test_unsupported_configurations_are_named():
    ln = keras.layers.LayerNormalization(center=False, scale=False)
    ln.build((None, 5))
    assert "scale=False and center=False" in unsupported_reason(ln)
    assert block_for_layer(ln) is None
    rms = keras.layers.RMSNormalization(axis=1)
    rms.build((None, 5, 5))
    assert "trailing axes" in unsupported_reason(rms)


def test_fidelity_report_uses_the_fixed_curvature():
    model, layer, x, y = make_case("batch_norm")
    report = fidelity(model, x, y, LOSS, methods=("kfac",))  # default layers: every block
    exact = fisher_block(model, layer, x, y, LOSS).numpy()
    f = block_for_layer(layer).g_dim
    assert set(report[layer.name]) == {"scale_and_shift"}
    assert (
        abs(report[layer.name]["scale_and_shift"] - rel(exact * np.tile(np.eye(f), (2, 2)), exact))
        < 1e-4
    )
    assert set(report[model.layers[-1].name]) == {"kfac"}
