"""Transposed convolutions (Conv1DTranspose, Conv2DTranspose, Conv3DTranspose).

A transposed convolution is an ordinary stride-1 convolution (dilation d) of
the input upsampled by the strides (``s - 1`` zeros between neighbours) and
padded, with the kernel flipped along every spatial axis. Its output
location p sees, at flipped offset j, the upsampled input at ``p + j*d - L``
(``L = (k - 1) d - before``, ``before`` the SAME padding TensorFlow places
for the forward convolution whose input gradient this is). So with ``a_p`` =
the patch of the upsampled, padded input (plus 1) and ``g_p`` = the
pre-activation gradient at p, the per-example gradient of the kernel and
bias is exactly ``sum_p a_p g_p^T``: KFC (Grosse & Martens 2016) over the
output locations, with the bias in the homogeneous coordinate as for Conv.
(Taking the input positions as locations, with ``g`` the output gradient's
patches, also represents the kernel gradient, but not the bias's.)

``V`` has rows ``(flipped k_1, ..., k_r, c_in)`` and columns the output
channels; the kernel is stored ``(k_1, ..., k_r, c_out, c_in)``, so
``to_matrix`` flips and transposes. Most entries of ``a`` are zeros from the
upsampling (a fraction ``1 - 1/prod(s)``).
"""

import math

import keras
import tensorflow as tf

from keras_kfac.layers.base import register_block
from keras_kfac.layers.conv import (
    ConvolutionBlock,
    _max0,
    _size,
    channels_last,
    common_unsupported_reason,
    extract_patches,
    flatten_locations,
    pad_or_crop,
)


def output_size(size, kernel, stride, dilation, padding, output_padding):
    """Output length of one axis of Keras' transposed convolution (the
    formula of its TensorFlow backend)."""
    effective = (kernel - 1) * dilation + 1
    if padding == "valid":
        extra = max(effective, stride) - effective if output_padding is None else output_padding
        return (size - 1) * stride + effective + extra
    if output_padding is None:
        return size * stride
    return (size - 1) * stride + effective % 2 + output_padding


def upsample(x, strides):
    """Insert ``s - 1`` zeros after every element of spatial axis ``i + 1``
    (length ``X -> X * s``)."""
    for axis, s in enumerate(strides, start=1):
        if s == 1:
            continue
        shape = [_size(x, i) for i in range(len(x.shape))]
        pads = [(0, 0)] * (len(x.shape) + 1)
        pads[axis + 1] = (0, s - 1)
        x = tf.pad(tf.expand_dims(x, axis + 1), pads)
        shape[axis] = shape[axis] * s
        x = tf.reshape(x, shape)
    return x


@register_block
class ConvTransposeBlock(ConvolutionBlock):
    layer_types = (
        keras.layers.Conv1DTranspose,
        keras.layers.Conv2DTranspose,
        keras.layers.Conv3DTranspose,
    )

    @staticmethod
    def unsupported_reason(layer):
        return common_unsupported_reason(layer)

    def __init__(self, layer):
        super().__init__(layer)
        self.groups = 1
        self.g_dim = self.kernel_shape[-2]
        self.a_dim = math.prod(self.kernel_shape[: self.rank]) * self.kernel_shape[-1] + int(
            self.has_bias
        )

    def _locations(self, inputs):
        layer = self.layer
        x = channels_last(inputs, self.channels_first)
        output_padding = layer.output_padding or (None,) * self.rank
        pads = []
        for axis, (k, s, d, op) in enumerate(
            zip(layer.kernel_size, layer.strides, layer.dilation_rate, output_padding), start=1
        ):
            size = _size(x, axis)
            out = output_size(size, k, s, d, layer.padding, op)
            span = (k - 1) * d
            before = 0 if layer.padding == "valid" else _max0((size - 1) * s + span + 1 - out) // 2
            left = span - before
            pads.append((left, out + span - left - size * s))
        x = pad_or_crop(upsample(x, layer.strides), pads)
        ones = (1,) * self.rank
        return flatten_locations(extract_patches(x, layer.kernel_size, ones, layer.dilation_rate))

    def _kernel_axes(self):
        # (flipped k..., c_out, c_in) <-> (k..., c_in, c_out)
        return (*range(self.rank), self.rank + 1, self.rank)

    def to_matrix(self, grads):
        kernel = tf.reverse(tf.cast(grads[0], tf.float32), list(range(self.rank)))
        kernel = tf.transpose(kernel, self._kernel_axes())
        return super().to_matrix([kernel] + list(grads[1:]))

    def from_matrix(self, v):
        rows = self.a_dim - int(self.has_bias)
        shape = (*self.kernel_shape[: self.rank], self.kernel_shape[-1], self.kernel_shape[-2])
        kernel = tf.reshape(v[:rows], shape)
        kernel = tf.reverse(tf.transpose(kernel, self._kernel_axes()), list(range(self.rank)))
        return [kernel, v[-1]] if self.has_bias else [kernel]
