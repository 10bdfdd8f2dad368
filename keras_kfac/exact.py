"""The exact curvature block of one layer block: the reference every
approximation is measured against (tests, :mod:`keras_kfac.fidelity`, the
``fidelity_layers`` diagnostics of :mod:`keras_kfac.monitoring`).

Every matrix here is over one block's parameters ``theta_B`` in the block's
parameter order ``concat(flatten(v) for v in block.variables)`` (which is
``vec_row(V)`` of the block's matrix convention), for any block type
(Dense, Conv2D, the blocks of a recurrent layer, normalization layers, ...).
Two modes:

* **Fisher**: ``F = (1/n) sum_i u_i u_i^T`` with ``u_i = d l_i / d theta_B``
  the per-example gradients of the given labels' losses ``l_i = l(y_i,
  f(x_i))``. With the training labels it is the empirical Fisher; with
  labels drawn from the model's predictive distribution
  (:func:`sample_labels`) a Monte-Carlo estimate of the "true" Fisher.
* **GGN**: ``G = sum_i J_i^T H_i J_i`` with ``J_i = d f(x_i) / d theta_B``
  and ``H_i = d^2 h / d f_i^2`` the Hessian of the objective ``h`` with
  respect to example i's output (the objective must not couple examples).
  For ``h = (1/n) sum_i l_i`` (:func:`ggn_block`; a batch-mean compiled loss
  in :func:`step_ggn_block`) that is ``G = (1/n) sum_i J_i^T (d^2 l_i / d
  f_i^2) J_i``: the same ``1/n`` as the Fisher.

With that normalization the two agree where theory says they do: when
``l`` is the negative log-likelihood of an exponential family in its natural
parameter ``f`` (softmax cross-entropy on logits, sigmoid binary
cross-entropy on logits, mean squared error on a linear output, a Gaussian
of variance ``m/2`` per element), ``d^2 l / df^2 = E_{y ~ p(y|f)}[(dl/df)
(dl/df)^T]``, so the expectation of the Fisher over sampled labels is the
GGN (Martens 2020, arXiv 1412.1193, sec. 9.2). On a softmax or sigmoid
*output* the GGN is the one with respect to the probabilities, which is not
the Fisher: give such models logits and ``from_logits=True`` when the two
should agree.

The eager functions (:func:`per_example_gradients`, :func:`fisher_block`,
:func:`ggn_block`) differentiate the model's inference-mode forward pass
with ``tf.GradientTape.jacobian``: brute force, independent of the layer
blocks' statistics. :func:`step_ggn_block` runs inside the compiled train
step (graph and XLA) on the step's own recorded forward pass.
"""

import keras
import numpy as np
import tensorflow as tf

from keras_kfac import compat
from keras_kfac.curvature.base import LayerBatch
from keras_kfac.layers import LayerBlock, blocks_for_layer

#: Largest number of output values per example for :func:`step_ggn_block`
#: (one backward pass each).
MAX_STEP_OUTPUTS = 256


def _f32(x):
    return tf.cast(x, tf.float32)


def per_example_loss_fn(loss):
    """``loss`` (name, function or ``keras.losses.Loss``) as a function
    ``(y, y_pred) -> (n,)`` per-example losses."""
    if isinstance(loss, keras.losses.Loss):
        parts = compat.loss_function(loss)
        if parts is None:
            raise ValueError(f"Cannot get per-example values from {loss!r}; pass a loss function.")
        fn, kwargs = parts
        return lambda y, p: fn(y, p, **kwargs)
    return keras.losses.get(loss)


def resolve_block(model, block):
    """The :class:`~keras_kfac.layers.LayerBlock` meant by ``block``: a block,
    a layer with exactly one block, or the name of either (a recurrent layer
    has several blocks, named ``<layer>_kernel``, ``<layer>_recurrent_kernel``
    and, for GRU, ``<layer>_bias``)."""
    if isinstance(block, LayerBlock):
        return block
    if isinstance(block, str):
        layers = [layer for layer in compat.flatten_layers(model) if layer.name == block]
        if not layers:
            for layer in compat.flatten_layers(model):
                for candidate in blocks_for_layer(layer):
                    if candidate.name == block:
                        return candidate
            raise ValueError(f"{model.name!r} has no layer or block named {block!r}.")
        block = layers[0]
    blocks = blocks_for_layer(block)
    if len(blocks) != 1:
        if not blocks:
            raise ValueError(f"Layer {block.name!r} has no curvature block.")
        raise ValueError(
            f"Layer {block.name!r} has {len(blocks)} curvature blocks "
            f"({', '.join(b.name for b in blocks)}); pass one of them (a block or its name)."
        )
    return blocks[0]


def _flat(jacobians, leading):
    """Jacobians w.r.t. each variable -> one ``(*leading, P)`` tensor in
    parameter order."""
    return tf.concat([tf.reshape(_f32(j), leading + [-1]) for j in jacobians], axis=-1)


def _jacobian(tape, target, sources, model):
    # TF's vectorized jacobian (TF 2.21) is wrong through grouped
    # convolutions (every gradient that flows through one) and fails on some
    # ops (BiasAddGrad of channels_first layers); the loop is right for both.
    grouped = any(getattr(layer, "groups", 1) > 1 for layer in compat.flatten_layers(model))
    try:
        return tape.jacobian(target, sources, experimental_use_pfor=not grouped)
    except ValueError:
        return tape.jacobian(target, sources, experimental_use_pfor=False)


def per_example_gradients(model, block, x, y, loss):
    """``u_i = d l_i / d theta_B``, shape ``(n, P)``, in parameter order
    (model in inference mode)."""
    block = resolve_block(model, block)
    fn = per_example_loss_fn(loss)
    with tf.GradientTape(persistent=True) as tape:
        losses = tf.reshape(fn(y, model(x, training=False)), (-1,))
    n = int(losses.shape[0])
    return _flat(_jacobian(tape, losses, block.variables, model), [n])


def matrix_order(block, u):
    """Rows of parameter-order gradients ``(m, P)`` -> the order of the
    curvature matrices, ``vec_row(block.to_matrix(...))`` (the parameter
    order itself for Dense, Conv and normalization blocks; a permutation for
    transposed and grouped convolutions)."""
    sizes = [int(np.prod(v.shape)) for v in block.variables]
    shapes = [tuple(v.shape) for v in block.variables]

    def one(row):
        parts = [tf.reshape(p, s) for p, s in zip(tf.split(row, sizes), shapes)]
        return tf.reshape(block.to_matrix(parts), (-1,))

    return tf.map_fn(one, u)


def fisher_block(model, block, x, y, loss):
    """Fisher mode: ``F = (1/n) sum_i u_i u_i^T``, ``(P, P)`` in the order of
    the curvature matrices (:func:`matrix_order`): the empirical Fisher with
    training labels ``y``, a Monte-Carlo "true" Fisher with labels from
    :func:`sample_labels`."""
    block = resolve_block(model, block)
    u = matrix_order(block, per_example_gradients(model, block, x, y, loss))
    return tf.matmul(u, u, transpose_a=True) / tf.cast(tf.shape(u)[0], tf.float32)


def output_hessian(objective, output):
    """``H_i = d^2 objective / d output_i^2`` for a ``(n, d)`` ``output``,
    shape ``(n, d, d)`` (a batch Jacobian: the objective must not couple
    examples)."""
    output = tf.stop_gradient(_f32(output))
    with tf.GradientTape() as outer:
        outer.watch(output)
        with tf.GradientTape() as inner:
            inner.watch(output)
            value = objective(output)
        grad = inner.gradient(value, output, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    hessian = outer.batch_jacobian(grad, output)
    return 0.5 * (hessian + tf.transpose(hessian, (0, 2, 1)))


def _single_output(outputs):
    outputs = tf.nest.flatten(outputs)
    if len(outputs) != 1:
        raise ValueError(
            f"The exact GGN block supports single-output models; this one has {len(outputs)}."
        )
    return outputs[0]


def ggn_block(model, block, x, y, loss):
    """GGN mode: ``G = (1/n) sum_i J_i^T (d^2 l_i / d f_i^2) J_i``, ``(P,
    P)`` in the order of the curvature matrices, with full Jacobians of the inference-mode output (memory ``n * d
    * P`` for ``d`` output values per example)."""
    block = resolve_block(model, block)
    fn = per_example_loss_fn(loss)
    with tf.GradientTape(persistent=True) as tape:
        output = _single_output(model(x, training=False))
    n = int(output.shape[0])
    d = int(np.prod(output.shape[1:]))
    jacobian = _flat(_jacobian(tape, output, block.variables, model), [n, d])
    jacobian = tf.reshape(matrix_order(block, tf.reshape(jacobian, (n * d, -1))), (n, d, -1))

    def objective(flat):
        return tf.reduce_mean(fn(y, tf.reshape(flat, tf.shape(output))))

    hessian = output_hessian(objective, tf.reshape(output, (n, d)))
    return tf.einsum("ndp,nde,neq->pq", jacobian, hessian, jacobian)


def step_ggn_block(record, block, output_loss):
    """GGN mode inside the train step: ``G = sum_i J_i^T H_i J_i`` of
    ``block`` on the step's batch, at the step's parameters, with ``H_i`` the
    Hessian of ``output_loss`` (the compiled batch loss as a function of the
    model output; for a batch-mean loss the ``1/n`` of :func:`ggn_block`).

    ``record``: the step's :class:`keras_kfac.capture.StepRecord` with its
    persistent tape (``KFAC(fisher="sampled")``). With ``H_i = sum_k h_ik
    h_ik^T`` (eigendecomposition), ``J_i^T h_ik`` is the per-example gradient
    of ``h_ik^T f_i``: one backward pass per output value through the tape to
    the block's recorded tensors, turned into per-example parameter
    gradients by the block's own
    :meth:`~keras_kfac.layers.LayerBlock.per_example_gradients` (memory: one
    ``(n, P)`` at a time)."""
    if record.tape is None:
        raise ValueError("The exact GGN block in the train step needs KFAC(fisher='sampled').")
    output = _single_output(record.outputs)
    dim = int(np.prod(output.shape[1:]))
    if dim > MAX_STEP_OUTPUTS:
        raise ValueError(
            f"The exact GGN block needs one backward pass per output value; this "
            f"model has {dim} per example (at most {MAX_STEP_OUTPUTS})."
        )
    n = tf.shape(output)[0]

    def objective(flat):
        return _f32(output_loss(tf.cast(tf.reshape(flat, tf.shape(output)), output.dtype)))

    hessian = output_hessian(objective, tf.reshape(output, (n, dim)))
    evals, evecs = tf.linalg.eigh(hessian)
    roots = evecs * tf.sqrt(tf.maximum(evals, 0.0))[:, None, :]
    key = id(block.layer)
    inputs, recorded = record.inputs[key], record.preactivations[key]
    total = tf.zeros((block.num_parameters, block.num_parameters))
    for k in range(dim):
        dy = tf.cast(tf.reshape(roots[:, :, k], tf.shape(output)), output.dtype)
        grads = record.tape.gradient(output, recorded, output_gradients=dy)
        u = LayerBatch(block, inputs, grads).per_example_gradients()
        total += tf.matmul(u, u, transpose_a=True)
    return total


def sample_labels(model, x, seed=0):
    """Labels drawn from a classifier's predictive distribution (one per
    example; softmax of the output unless it already is a distribution), for
    the Monte-Carlo "true" Fisher of :func:`fisher_block`."""
    logits = model(x, training=False)
    probs = np.asarray(logits)
    if not np.allclose(probs.sum(-1), 1.0, atol=1e-3) or probs.min() < 0:
        probs = tf.nn.softmax(logits).numpy()
    rng = np.random.default_rng(seed)
    cum = probs.cumsum(-1)
    return (rng.random((len(probs), 1)) > cum).sum(-1).clip(0, probs.shape[-1] - 1)


def relative_error(exact, approx):
    """``||F - F_hat||_F / ||F||_F`` as a float32 scalar tensor."""
    exact, approx = _f32(exact), _f32(approx)
    return tf.norm(exact - approx) / tf.norm(exact)
