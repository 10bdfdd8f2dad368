"""How close each curvature method is to the exact Fisher block.

For a model, a batch and small blocks: the exact block ``F = (1/n) sum_i
u_i u_i^T`` (:func:`keras_kfac.exact.fisher_block`), each method's
``curvature_matrix`` fitted on the same batch (statistics of that batch
only), and the relative Frobenius error ``||F - F_hat||_F / ||F||_F``
(:func:`keras_kfac.exact.relative_error`).

:func:`layer_batch` gives a block's ``LayerBatch`` for a batch, recorded by
the optimizer's own instrumentation (:class:`keras_kfac.capture.Capture`).
"""

import keras
import tensorflow as tf

from keras_kfac import compat, exact
from keras_kfac import curvature as curvature_lib
from keras_kfac.capture import Capture
from keras_kfac.curvature.base import LayerBatch
from keras_kfac.layers import blocks_for_layer

#: Methods whose ``matrix()`` is the batch's approximation (tengrad, cgfac
#: keep none: tengrad is exact, cgfac's matrix is kfac's).
MATRIX_METHODS = ("kfac", "ekfac", "kpsvd", "deflation", "kfac_corrected", "lanczos", "diagonal")


def layer_batch(model, block, x, y, loss):
    """The :class:`LayerBatch` of ``block`` (a block, a layer with one block,
    or a name: :func:`keras_kfac.exact.resolve_block`) for ``(x, y)`` with
    the model in inference mode, recorded by the optimizer's own
    instrumentation (:class:`keras_kfac.capture.Capture`, restricted to the
    block's layer), with ``g_i = d l_i / d s_i`` (gradient of the summed
    per-example losses)."""
    block = exact.resolve_block(model, block)
    layer = block.layer
    fn = exact.per_example_loss_fn(loss)
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


def fitted_curvature(method, model, block, x, y, loss, damping=1e-3, **options):
    """``method``'s curvature object for ``block`` (as for
    :func:`layer_batch`) with statistics of this batch only (``decay = 0``)
    and refreshed with ``damping``. Two statistics/refresh rounds on the
    batch: EKFAC estimates its scaling in the basis of the previous refresh;
    for the other methods the second round only repeats the first (from a
    warm start)."""
    block = exact.resolve_block(model, block)
    damping_mode = options.pop("damping_mode", "factored")
    curvature = curvature_lib.create(method, block, damping_mode, **options)

    def add_variable(name, shape, initializer="zeros"):
        init = keras.initializers.get(initializer)
        return tf.Variable(init(shape, dtype="float32"), name=name)

    curvature.build(add_variable)
    batch = layer_batch(model, block, x, y, loss)
    for _ in range(2):
        curvature.update_statistics(batch, tf.constant(0.0))
        curvature.refresh(tf.constant(float(damping)))
    return curvature


def fidelity(
    model, x, y, loss, layers=None, methods=MATRIX_METHODS, max_parameters=8192, **options
):
    """Relative Frobenius error of each method's block against the exact
    Fisher block, per block.

    Args:
        model: a built Keras model.
        x, y: one batch (y: the labels the Fisher uses; training labels for
            the empirical Fisher, or labels sampled from the model,
            :func:`keras_kfac.exact.sample_labels`).
        loss: per-example loss (name, function or ``keras.losses.Loss``).
        layers: layers, blocks or their names (a layer stands for all its
            blocks; default: every block with at most ``max_parameters``
            parameters).
        methods: curvature names with a dense matrix (a block with a fixed
            curvature, e.g. a normalization layer's, is fitted with that one).
        **options: curvature options (e.g. ``lanczos_steps``), each given to
            the methods that accept it (an option no method accepts is an
            error).

    Returns ``{block_name: {method: error}}`` (a layer with one block: its
    name).
    """
    valid = set().union(*(_accepted(m) for m in methods))
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ValueError(
            f"Unknown curvature options {', '.join(map(repr, unknown))} for methods "
            f"{', '.join(methods)}; valid: {', '.join(sorted(valid))}."
        )
    if layers is None:
        blocks = [
            b
            for layer in compat.flatten_layers(model)
            for b in blocks_for_layer(layer)
            if b.num_parameters <= max_parameters
        ]
    else:
        blocks = [b for item in layers for b in _blocks(model, item)]
    result = {}
    for block in blocks:
        reference = exact.fisher_block(model, block, x, y, loss)
        # A block with a fixed curvature (normalization layers) has only that one.
        fixed = block.fixed_curvature
        result[block.name] = {}
        for m in (fixed,) if fixed else methods:
            own = {k: v for k, v in options.items() if k in _accepted(m)}
            curvature = fitted_curvature(m, model, block, x, y, loss, **own)
            result[block.name][m] = float(exact.relative_error(reference, curvature.matrix()))
    return result


def _accepted(method):
    """The options ``method`` takes (``damping_mode``: every method's)."""
    return curvature_lib.get(method).option_names() | {"damping_mode"}


def _blocks(model, item):
    """Every block of a layer (or layer name), or the one block given."""
    if isinstance(item, str):
        item = {layer.name: layer for layer in compat.flatten_layers(model)}.get(item, item)
    if isinstance(item, keras.layers.Layer):
        blocks = blocks_for_layer(item)
        if not blocks:
            raise ValueError(f"Layer {item.name!r} has no curvature block.")
        return blocks
    return [exact.resolve_block(model, item)]
