"""Conv2D layers: KFC (Grosse & Martens 2016, arXiv 1602.01407).

The input side of the factorization is the patch matrix: at each output
location t, the ``kh*kw*c_in`` input values the kernel sees, in the order of
the kernel's row-major flatten ``(kh, kw, c_in)``. ``tf.image.extract_patches``
produces exactly that order, for every stride, dilation and padding.
"""

import keras
import tensorflow as tf

from keras_kfac.layers.base import LayerBlock, register_block


@register_block
class Conv2DBlock(LayerBlock):
    layer_types = (keras.layers.Conv2D,)

    @staticmethod
    def unsupported_reason(layer):
        if not layer.built:
            return "layer is not built"
        if layer.groups != 1:
            return "grouped convolution (groups > 1)"
        if getattr(layer, "quantization_mode", None):
            return "quantized Conv2D"
        if getattr(layer, "lora_enabled", False):
            return "LoRA-enabled Conv2D"
        return None

    def __init__(self, layer):
        super().__init__(layer)
        self.channels_first = layer.data_format == "channels_first"

    def _locations(self, inputs):
        if self.channels_first:
            inputs = tf.transpose(inputs, (0, 2, 3, 1))
        kh, kw = self.layer.kernel_size
        sh, sw = self.layer.strides
        dh, dw = self.layer.dilation_rate
        patches = tf.image.extract_patches(
            inputs,
            sizes=(1, kh, kw, 1),
            strides=(1, sh, sw, 1),
            rates=(1, dh, dw, 1),
            padding=self.layer.padding.upper(),
        )
        return _flatten_locations(patches, patches.shape[-1])

    def _output_locations(self, ds):
        if self.channels_first:
            ds = tf.transpose(ds, (0, 2, 3, 1))
        return _flatten_locations(ds, self.g_dim)


def _flatten_locations(x, channels):
    """``(n, h, w, c) -> (n, h*w, c)``, keeping ``h*w`` static when it is
    known (with a dynamic batch a ``-1`` would lose it, and the methods choose
    their algorithm from the static number of locations)."""
    h, w = x.shape[1], x.shape[2]
    locations = -1 if h is None or w is None else h * w
    return tf.reshape(x, (tf.shape(x)[0], locations, channels))
