"""SeparableConv1D/2D: a depthwise convolution, then a pointwise (1x1)
convolution plus bias.

One block covers one Kronecker-factored weight matrix, and this layer has two
of different structure (the depthwise kernel is per channel, the pointwise
one is dense), so the block covers the pointwise kernel and the bias, which
hold almost all of the layer's parameters (``c*m*filters + filters`` against
``prod(k)*c*m``), and the depthwise kernel is trained by the fallback (it
shows in ``summary()``). For the pointwise part ``a`` is the depthwise output
(recomputed from the recorded input with the current depthwise kernel: one
depthwise convolution per statistics step, no extra recording in the
forward pass) at each output location, ``g`` the pre-activation gradient:
exact per-example gradients ``sum_t a_t g_t^T``, KFC factors as for a 1x1
convolution.
"""

import keras
import tensorflow as tf

from keras_kfac.layers.base import register_block
from keras_kfac.layers.conv import (
    ConvolutionBlock,
    channels_last,
    common_unsupported_reason,
    flatten_locations,
)


@register_block
class SeparableConvBlock(ConvolutionBlock):
    layer_types = (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)

    @staticmethod
    def unsupported_reason(layer):
        return common_unsupported_reason(layer)

    def __init__(self, layer):
        self.layer = layer
        self.name = layer.name
        self.has_bias = layer.bias is not None
        self.kernel_shape = tuple(int(d) for d in layer.pointwise_kernel.shape)
        self.channels_first = layer.data_format == "channels_first"
        self.rank = len(layer.kernel_size)
        self.g_dim = self.kernel_shape[-1]
        self.a_dim = self.kernel_shape[-2] + int(self.has_bias)

    @property
    def variables(self):
        if self.has_bias:
            return [self.layer.pointwise_kernel, self.layer.bias]
        return [self.layer.pointwise_kernel]

    def _locations(self, inputs):
        layer = self.layer
        depthwise = keras.ops.depthwise_conv(
            inputs,
            layer.depthwise_kernel,
            strides=layer.strides,
            padding=layer.padding,
            dilation_rate=layer.dilation_rate,
            data_format=layer.data_format,
        )
        return flatten_locations(channels_last(tf.stop_gradient(depthwise), self.channels_first))
