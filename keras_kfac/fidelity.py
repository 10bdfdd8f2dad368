"""How close each curvature method is to the exact Fisher block.

For a model, a batch and small layers: the exact block ``F = (1/n) sum_i u_i
u_i^T`` from per-example gradients (``GradientTape.jacobian``), each method's
``curvature_matrix`` fitted on the same batch (statistics of that batch only),
and the relative Frobenius error ``||F - F_hat||_F / ||F||_F``.

The brute-force pieces are public so tests and diagnostics can use them:
:func:`per_example_gradients`, :func:`exact_fisher_block`,
:func:`layer_batch` (the layer's a_bar and g of the conventions, captured
independently of the optimizer's instrumentation).
"""

import keras
import numpy as np
import tensorflow as tf

from keras_kfac import compat
from keras_kfac import curvature as curvature_lib
from keras_kfac.capture import Capture
from keras_kfac.curvature.base import LayerBatch
from keras_kfac.layers import block_for_layer

#: Methods whose ``matrix()`` is the batch's approximation (tengrad, cgfac
#: keep none: tengrad is exact, cgfac's matrix is kfac's).
MATRIX_METHODS = ("kfac", "ekfac", "kpsvd", "deflation", "kfac_corrected", "lanczos", "diagonal")


def per_example_loss_fn(loss):
    """``loss`` (name, function or ``keras.losses.Loss``) as a function
    returning the (n,) per-example losses."""
    if isinstance(loss, keras.losses.Loss):
        parts = compat.loss_function(loss)
        if parts is None:
            raise ValueError(f"Cannot get per-example values from {loss!r}; pass a loss function.")
        fn, kwargs = parts
        return lambda y, p: fn(y, p, **kwargs)
    return keras.losses.get(loss)


def _layer(model, layer):
    return model.get_layer(layer) if isinstance(layer, str) else layer


def per_example_gradients(model, layer, x, y, loss):
    """``u_i = grad l_i`` w.r.t. the layer block's variables, concatenated in
    parameter order (``concat(flatten(kernel), bias)``), shape (n, P)."""
    layer = _layer(model, layer)
    fn = per_example_loss_fn(loss)
    params = block_for_layer(layer).variables
    with tf.GradientTape(persistent=True) as tape:
        losses = tf.reshape(fn(y, model(x, training=False)), (-1,))
    # TF's vectorized jacobian (TF 2.21) is wrong through grouped
    # convolutions (every kernel gradient that flows through one) and fails
    # on some ops (BiasAddGrad of channels_first layers); the loop over
    # examples is right for both.
    grouped = any(
        getattr(l, "groups", 1) > 1 for l in compat.flatten_layers(model)
    )
    try:
        jac = tape.jacobian(losses, params, experimental_use_pfor=not grouped)
    except ValueError:
        jac = tape.jacobian(losses, params, experimental_use_pfor=False)
    n = int(losses.shape[0])
    return tf.concat([tf.reshape(tf.cast(j, tf.float32), (n, -1)) for j in jac], axis=1)


def matrix_order(block, u):
    """Per-example gradients ``(n, P)`` in parameter order -> in the order
    of ``vec(block.to_matrix(...))``, that of the curvature matrices (the
    same for Dense and Conv; a permutation for transposed and grouped
    convolutions)."""
    sizes = [int(np.prod(v.shape)) for v in block.variables]
    shapes = [tuple(v.shape) for v in block.variables]

    def one(row):
        parts = [tf.reshape(p, s) for p, s in zip(tf.split(row, sizes), shapes)]
        return tf.reshape(block.to_matrix(parts), (-1,))

    return tf.map_fn(one, u)


def exact_fisher_block(model, layer, x, y, loss):
    """``F = (1/n) sum_i u_i u_i^T`` of ``layer``, shape (P, P), in the order
    of the curvature matrices (:func:`matrix_order`)."""
    layer = _layer(model, layer)
    u = matrix_order(block_for_layer(layer), per_example_gradients(model, layer, x, y, loss))
    return tf.matmul(u, u, transpose_a=True) / tf.cast(tf.shape(u)[0], tf.float32)


def layer_batch(model, layer, x, y, loss):
    """The layer's :class:`LayerBatch` for ``(x, y)`` with the model in
    inference mode, recorded by the optimizer's own instrumentation
    (:class:`keras_kfac.capture.Capture`, restricted to ``layer``), with
    ``g_i = d l_i / d s_i`` (gradient of the summed per-example losses)."""
    layer = _layer(model, layer)
    block = block_for_layer(layer)
    fn = per_example_loss_fn(loss)
    capture = Capture(model, sampled=False, layers=[layer], inference=True)
    try:
        with tf.GradientTape() as tape:
            total = tf.reduce_sum(fn(y, model(x, training=False)))
        # Back-propagating to the layer's variables runs the recording taps.
        tape.gradient(total, layer.trainable_weights)
        record = capture.current()
    finally:
        capture.remove()
    key = id(layer)
    return LayerBatch(block, record.inputs[key], record.output_grads[key], 1.0)


def fitted_curvature(method, model, layer, x, y, loss, damping=1e-3, **options):
    """``method``'s curvature object for ``layer`` with statistics of this
    batch only (``decay = 0``) and refreshed with ``damping``. Two
    statistics/refresh rounds on the batch: EKFAC estimates its scaling in
    the basis of the previous refresh; for the other methods the second round
    only repeats the first (from a warm start)."""
    layer = _layer(model, layer)
    block = block_for_layer(layer)
    damping_mode = options.pop("damping_mode", "factored")
    curvature = curvature_lib.create(method, block, damping_mode, **options)

    def add_variable(name, shape, initializer="zeros"):
        init = keras.initializers.get(initializer)
        return tf.Variable(init(shape, dtype="float32"), name=name)

    curvature.build(add_variable)
    batch = layer_batch(model, layer, x, y, loss)
    for _ in range(2):
        curvature.update_statistics(batch, tf.constant(0.0))
        curvature.refresh(tf.constant(float(damping)))
    return curvature


def relative_error(exact, approx):
    """``||F - F_hat||_F / ||F||_F``."""
    return float(tf.norm(exact - approx) / tf.norm(exact))


def fidelity(model, x, y, loss, layers=None, methods=MATRIX_METHODS, max_parameters=8192, **options):
    """Relative Frobenius error of each method's block, per layer.

    Args:
        model: a built Keras model.
        x, y: one batch (y: the labels the Fisher uses; training labels for
            the empirical Fisher, or labels sampled from the model).
        loss: per-example loss (name, function or ``keras.losses.Loss``).
        layers: layers or names (default: every layer with a block and at
            most ``max_parameters`` parameters).
        methods: curvature names with a dense matrix (a block with a fixed
            curvature, e.g. a normalization layer's, is fitted with that one).
        **options: curvature options (e.g. ``power_iters``).

    Returns ``{layer_name: {method: error}}``.
    """
    if layers is None:
        layers = [
            l for l in compat.flatten_layers(model)
            if block_for_layer(l) is not None and block_for_layer(l).num_parameters <= max_parameters
        ]
    result = {}
    for layer in layers:
        layer = _layer(model, layer)
        exact = exact_fisher_block(model, layer, x, y, loss)
        # A block with a fixed curvature (normalization layers) has only that one.
        fixed = block_for_layer(layer).fixed_curvature
        result[layer.name] = {
            m: relative_error(exact, fitted_curvature(m, model, layer, x, y, loss, **options).matrix())
            for m in ((fixed,) if fixed else methods)
        }
    return result


def sample_labels(model, x, seed=0):
    """Labels drawn from a softmax-output model's predictive distribution
    (one per example), for a Monte-Carlo "true" Fisher with :func:`fidelity`."""
    logits = model(x, training=False)
    probs = np.asarray(logits)
    if not np.allclose(probs.sum(-1), 1.0, atol=1e-3) or probs.min() < 0:
        probs = tf.nn.softmax(logits).numpy()
    rng = np.random.default_rng(seed)
    cum = probs.cumsum(-1)
    return (rng.random((len(probs), 1)) > cum).sum(-1).clip(0, probs.shape[-1] - 1)
