"""Dense layers (Martens & Grosse 2015, arXiv 1503.05671, sec. 3)."""

import keras
import tensorflow as tf

from keras_kfac.layers.base import LayerBlock, register_block


@register_block
class DenseBlock(LayerBlock):
    """``s = a W + b``. Leading axes beyond the batch are treated as locations
    (the weight is shared across them, as for convolutions)."""

    layer_types = (keras.layers.Dense,)

    @staticmethod
    def unsupported_reason(layer):
        if getattr(layer, "quantization_mode", None):
            return "quantized Dense"
        if not layer.built:
            return "layer is not built"
        if getattr(layer, "lora_enabled", False):
            return "LoRA-enabled Dense"
        return None

    def _locations(self, inputs):
        n = tf.shape(inputs)[0]
        return tf.reshape(inputs, (n, -1, inputs.shape[-1]))

    def _output_locations(self, ds):
        n = tf.shape(ds)[0]
        return tf.reshape(ds, (n, -1, self.g_dim))
