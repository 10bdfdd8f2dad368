"""Embedding layers: ``s[n, t] = E[x[n, t]]`` is a Dense layer on the one-hot
of the token id, ``a = onehot(x)`` (no bias), ``g = d l / d s``.

Because ``a a^T`` of a one-hot is diagonal, the expand input factor ``A =
(1/n) sum_i sum_t a a^T`` is exactly diagonal: the token frequencies per
example. The block keeps it as its diagonal (``a_is_diagonal``; curvature
``kfac``, the method that stores diagonal factors) and computes it from id
counts, so neither the ``(n, T, vocabulary)`` one-hot nor a
``vocabulary^2`` matrix is formed: memory ``O(vocabulary + d^2)``. Under
weight sharing ``reduce`` the factor ``(1/n) sum_i mean_t(a) mean_t(a)^T`` is
not diagonal (tokens co-occurring in one example); its diagonal is kept.

The embedding gradient is a row-sparse ``tf.IndexedSlices``; ``to_matrix``
merges duplicate rows and keeps it sparse through the diagonal-``A``
preconditioner (``curvature.factors.kronecker_solve``) and ``from_matrix``.
"""

import keras
import tensorflow as tf

from keras_kfac.layers.base import LayerBlock, register_block


@register_block
class EmbeddingBlock(LayerBlock):
    layer_types = (keras.layers.Embedding,)
    fixed_curvature = "kfac"
    a_is_diagonal = True
    #: ``a`` is a one-hot of integer ids: ``activations`` forms it (for
    #: brute-force checks), the optimizer's path never does.
    a_is_one_hot = True

    @staticmethod
    def unsupported_reason(layer):
        if not layer.built:
            return "layer is not built"
        if getattr(layer, "quantization_mode", None):
            return "quantized Embedding"
        if getattr(layer, "lora_enabled", False):
            return "LoRA-enabled Embedding"
        return None

    def __init__(self, layer):
        self.layer = layer
        self.name = layer.name
        self.has_bias = False
        self.kernel_shape = (int(layer.input_dim), int(layer.output_dim))
        self.a_dim, self.g_dim = self.kernel_shape

    @property
    def variables(self):
        return [self.layer.embeddings]

    def location_axes(self):
        shape = super().location_axes()
        # The input is (n, ...) ids: every axis but the batch is a location.
        return None if shape is None else shape + 1

    def _ids(self, inputs):
        ids = tf.cast(inputs, tf.int32)
        return tf.reshape(ids, (tf.shape(ids)[0], -1))

    def _locations(self, inputs):
        return tf.one_hot(self._ids(inputs), self.a_dim, dtype=tf.float32)

    def _output_locations(self, ds):
        return tf.reshape(ds, (tf.shape(ds)[0], -1, self.g_dim))

    def diagonal_factor_a(self, batch):
        if not batch.inputs:  # already gathered a (multi-replica statistics)
            return super().diagonal_factor_a(batch)
        parts = [self._ids(x) for x in batch.inputs]
        if len(parts) > 1:
            # Ids are counted per example, so every use must cover the same
            # examples (other blocks pad a smaller use, see capture._MaskedBatch).
            sizes = tf.stack([tf.shape(p)[0] for p in parts])
            with tf.control_dependencies(
                [
                    tf.debugging.assert_equal(
                        sizes,
                        sizes[0],
                        message=f"Embedding {self.layer.name!r} is called on batches of "
                        "different sizes in one step; K-FAC's statistics for it need every "
                        "call on the same examples. Call it once on the concatenated ids.",
                    )
                ]
            ):
                parts = [tf.identity(p) for p in parts]
        ids = parts[0] if len(parts) == 1 else tf.concat(parts, axis=1)
        n = tf.cast(tf.shape(ids)[0], tf.float32)
        if self.weight_sharing == "reduce":
            # sum_i (c_iv / T)^2 = sum_{i,t: x_it = v} m_it / T^2 with m_it
            # the number of positions of example i holding the same id.
            t = tf.cast(tf.shape(ids)[1], tf.float32)
            same = tf.reduce_sum(tf.cast(ids[:, :, None] == ids[:, None, :], tf.float32), axis=2)
            weights = same / (t * t)
        else:
            weights = tf.ones_like(ids, tf.float32)
        return (
            tf.math.unsorted_segment_sum(
                tf.reshape(weights, (-1,)), tf.reshape(ids, (-1,)), self.a_dim
            )
            / n
        )

    def to_matrix(self, grads):
        grad = grads[0]
        if not isinstance(grad, tf.IndexedSlices):
            return tf.cast(tf.reshape(grad, self.kernel_shape), tf.float32)
        return _merge_rows(grad)

    def from_matrix(self, v):
        return [v]


def _merge_rows(grad):
    """The same row-sparse matrix with one row per id (duplicate rows
    summed), so that row-wise products are Frobenius products. Static number
    of rows (XLA): slots left over by merged duplicates hold zero rows at
    id 0."""
    indices = tf.cast(grad.indices, tf.int32)
    values = tf.cast(grad.values, tf.float32)
    k = tf.shape(indices)[0]
    order = tf.argsort(indices)
    ordered = tf.gather(indices, order)
    first = tf.concat([[True], ordered[1:] != ordered[:-1]], axis=0)
    segment = tf.cumsum(tf.cast(first, tf.int32)) - 1
    merged = tf.math.unsorted_segment_sum(tf.gather(values, order), segment, k)
    ids = tf.tensor_scatter_nd_update(tf.zeros_like(indices), segment[:, None], ordered)
    return tf.IndexedSlices(merged, ids, grad.dense_shape)
