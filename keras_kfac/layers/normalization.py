"""Normalization layers as scale-and-shift blocks.

``LayerNormalization``, ``BatchNormalization``, ``GroupNormalization`` and
``RMSNormalization`` all end with ``y = gamma * xhat + beta``, elementwise per
feature ``j`` (a position on the layer's parameter axes), where ``xhat`` is
the normalized input and the feature's ``(gamma_j, beta_j)`` is shared by the
remaining non-batch positions ``t`` (spatial positions for BatchNormalization
on images, sequence positions for LayerNormalization). With ``g = d l_i / d y``
the per-example gradient of feature ``j`` is

    u_ij = (sum_t g_itj xhat_itj, sum_t g_itj)

(one entry when the layer has only a scale or only a shift). This is not a
Kronecker product, so the blocks always use the per-feature curvature
:mod:`keras_kfac.curvature.scale_and_shift`, whatever ``KFAC(curvature=...)``
says.

Conventions of these blocks (``k`` = 2 with scale and shift, else 1;
``F`` = number of features):

* ``V`` has shape ``(k, F)``, rows ``[d gamma; d beta]`` (flattened
  row-major), so ``vec_row(V) = concat(gamma, beta)`` is the parameter order
  of ``variables``, as ``[dW; db]`` is for Dense (``a_dim = k``,
  ``g_dim = F``);
* ``activations`` is ``(n, T, k, F)``: per location and feature the
  homogeneous ``[xhat; 1]`` (the rows the layer has), so
  ``u_i = sum_t a_it * g_it`` feature by feature;
* ``output_gradients`` is ``(n, T, F)``.

``xhat`` is not re-implemented: the forward pass runs the layer's own call
with its scale and shift temporarily replaced by ones and zeros (so axes,
epsilon, groups, ``rms_scaling``, batch statistics in training mode, moving
statistics in inference mode and their single update per call, masks and
batch renormalization are all the layer's), then applies the real ``gamma``
and ``beta`` itself and records ``xhat``.
"""

import math

import keras
import tensorflow as tf

from keras_kfac.layers.base import LayerBlock, register_block


class ScaleAndShiftBlock(LayerBlock):
    """Base of the normalization blocks. Subclasses set ``layer_types`` and
    the attribute names of the layer's scale and shift variables."""

    fixed_curvature = "scale_and_shift"
    kronecker = False
    scale_attribute = "gamma"
    shift_attribute = "beta"

    @classmethod
    def _parameters(cls, layer):
        """``[(attribute, variable, neutral value)]`` for the scale and shift
        the layer has, in parameter order."""
        out = []
        for attribute, neutral in ((cls.scale_attribute, tf.ones), (cls.shift_attribute, tf.zeros)):
            variable = getattr(layer, attribute, None) if attribute else None
            if isinstance(variable, keras.Variable):
                out.append((attribute, variable, neutral))
        return out

    @staticmethod
    def _raw_axes(layer):
        axis = layer.axis
        return list(axis) if isinstance(axis, (list, tuple)) else [axis]

    @classmethod
    def _axes(cls, layer, ndim):
        """The layer's parameter axes as sorted non-negative indices."""
        return sorted(a % ndim for a in cls._raw_axes(layer))

    @classmethod
    def unsupported_reason(cls, layer):
        if not layer.built:
            return "layer is not built"
        if not cls._parameters(layer):
            return "no scale or shift parameter (scale=False and center=False)"
        if 0 in cls._raw_axes(layer):
            return "parameters along the batch axis (axis=0)"
        return None

    def __init__(self, layer):
        self.layer = layer
        self.name = layer.name
        parameters = self._parameters(layer)
        self.has_scale = parameters[0][0] == self.scale_attribute
        self.has_shift = parameters[-1][0] == self.shift_attribute
        self.parameter_shape = tuple(int(d) for d in parameters[0][1].shape)
        self.a_dim = len(parameters)
        self.g_dim = math.prod(self.parameter_shape)

    @property
    def variables(self):
        """Scale, then shift (those the layer has)."""
        return [variable for _, variable, _ in self._parameters(self.layer)]

    def _features_last(self, x):
        """``(n, ..., F at the parameter axes, ...) -> (n, T, F)``: the
        parameter axes flattened row-major (the order of ``gamma.ravel()``)
        last, every other non-batch axis a location."""
        ndim = len(x.shape)
        axes = self._axes(self.layer, ndim)
        others = [d for d in range(1, ndim) if d not in axes]
        x = tf.transpose(x, [0] + others + axes)
        sizes = [x.shape[1 + i] for i in range(len(others))]
        locations = -1 if any(s is None for s in sizes) else math.prod(sizes)
        return tf.reshape(x, (tf.shape(x)[0], locations, self.g_dim))

    def activations(self, xhat):
        """``(n, T, k, F)``: ``[xhat; 1]`` per location and feature."""
        x = tf.cast(self._features_last(xhat), tf.float32)
        rows = ([x] if self.has_scale else []) + ([tf.ones_like(x)] if self.has_shift else [])
        return tf.stack(rows, axis=2)

    def output_gradients(self, ds):
        return tf.cast(self._features_last(ds), tf.float32)

    def per_example_gradients(self, a, g):
        """``u_i = [sum_t xhat g; sum_t g]`` feature by feature (the rows the
        layer has), flattened row-major: ``concat(gamma, beta)`` order."""
        return tf.reshape(tf.einsum("ntkf,ntf->nkf", a, g), (tf.shape(a)[0], -1))

    def to_matrix(self, grads):
        return tf.stack([tf.reshape(tf.cast(g, tf.float32), (-1,)) for g in grads])

    def from_matrix(self, v):
        return [tf.reshape(v[r], self.parameter_shape) for r in range(self.a_dim)]

    @classmethod
    def forward(cls, layer, call, tap, inputs, *args, **kwargs):
        """The layer's call with neutral scale and shift gives ``xhat``; the
        real ones are applied here, to the tapped ``y``."""
        parameters = cls._parameters(layer)
        for attribute, variable, neutral in parameters:
            object.__setattr__(layer, attribute, neutral(variable.shape, variable.dtype))
        try:
            xhat = call(inputs, *args, **kwargs)
        finally:
            for attribute, variable, _ in parameters:
                object.__setattr__(layer, attribute, variable)
        if not parameters:
            return tap(xhat)
        ndim = len(xhat.shape)
        shape = [1] * ndim
        for axis in cls._axes(layer, ndim):
            shape[axis] = xhat.shape[axis]
        # Half-precision outputs: combine in float32, as the layers do.
        dtype = tf.float32 if xhat.dtype in (tf.float16, tf.bfloat16) else xhat.dtype
        y = tf.cast(xhat, dtype)
        values = {
            a: tf.reshape(tf.cast(keras.ops.convert_to_tensor(v), dtype), shape)
            for a, v, _ in parameters
        }
        if cls.scale_attribute in values:
            y = y * values[cls.scale_attribute]
        if cls.shift_attribute in values:
            y = y + values[cls.shift_attribute]
        return tap(tf.cast(y, xhat.dtype), recorded=xhat)


@register_block
class LayerNormalizationBlock(ScaleAndShiftBlock):
    """Including ``rms_scaling=True`` (scale only; the layer's own call
    computes its ``xhat``)."""

    layer_types = (keras.layers.LayerNormalization,)


@register_block
class BatchNormalizationBlock(ScaleAndShiftBlock):
    """``xhat`` from the batch's statistics in training mode (the moving
    statistics are updated once, by the layer's call), from the moving
    statistics in inference mode. The moving statistics are not trainable:
    the optimizer never updates them."""

    layer_types = (keras.layers.BatchNormalization,)


@register_block
class GroupNormalizationBlock(ScaleAndShiftBlock):
    """Statistics per group of channels, but one scale and shift per
    channel: the features are the channels."""

    layer_types = (keras.layers.GroupNormalization,)


if hasattr(keras.layers, "RMSNormalization"):  # Keras >= 3.9

    @register_block
    class RMSNormalizationBlock(ScaleAndShiftBlock):
        """Scale only (the layer's variable is called ``scale``)."""

        layer_types = (keras.layers.RMSNormalization,)
        scale_attribute = "scale"
        shift_attribute = None

        @classmethod
        def unsupported_reason(cls, layer):
            reason = super().unsupported_reason(layer)
            if reason is None and not _trailing(cls._raw_axes(layer)):
                # Keras multiplies by ``scale`` broadcast against the
                # trailing axes, whatever ``axis`` says.
                return (
                    f"axis={layer.axis} is not the trailing axes written as negative "
                    "indices (e.g. axis=-1 or [-2, -1])"
                )
            return reason


def _trailing(axes):
    return sorted(axes) == list(range(-len(axes), 0))
