"""EinsumDense layers (MultiHeadAttention's query/key/value/output
projections, keras-hub transformers).

The layer computes ``s = einsum(equation, x, W) [+ b]``. Its equation's axes
are classified as

* batch: the input's first axis (kept in the output, absent from the kernel);
* ``a`` axes: in the input and the kernel, not in the output (contracted);
* ``g`` axes: in the kernel and the output, not in the input;
* locations: the other input axes kept in the output (the weight is shared
  across them, like a Dense applied over a sequence).

So ``s[n, t, g] = sum_a x[n, t, a] W[a, g]`` after transposing the kernel to
(``a`` axes, ``g`` axes) in the kernel's own axis order: one Kronecker block
with ``a_dim = prod(a sizes) (+1)`` and ``g_dim = prod(g sizes)``. The bias
is exact through the homogeneous coordinate only when it spans exactly the
``g`` axes (``b[g]``, shared across locations); other layouts (a bias over
some ``g`` axes, broadcast over the rest, or over location axes) are refused.
"""

import re

import keras
import tensorflow as tf

from keras_kfac.layers.base import LayerBlock, register_block


def _parse(equation):
    """``equation`` -> (input, kernel, output) axis strings, an ellipsis
    (allowed on the input and output only) replaced by ``"."``; None when it
    is not of the form ``in,kernel->out``."""
    match = re.fullmatch(r"\s*([a-zA-Z.]+)\s*,\s*([a-zA-Z]+)\s*->\s*([a-zA-Z.]+)\s*", equation)
    if match is None:
        return None
    return tuple(part.replace("...", ".") for part in match.groups())


@register_block
class EinsumDenseBlock(LayerBlock):
    layer_types = (keras.layers.EinsumDense,)

    @staticmethod
    def unsupported_reason(layer):
        if not layer.built:
            return "layer is not built"
        if getattr(layer, "quantization_mode", None):
            return "quantized EinsumDense"
        if getattr(layer, "lora_enabled", False):
            return "LoRA-enabled EinsumDense"
        try:
            EinsumDenseBlock._axes(layer)
        except ValueError as error:
            return str(error)
        return None

    @staticmethod
    def _axes(layer):
        """``(input, output, a_axes, g_axes, location_axes)`` with the ``a``
        and ``g`` axes in the kernel's order and the locations in the
        output's; ValueError naming what cannot be expressed exactly."""
        parsed = _parse(layer.equation)
        if parsed is None:
            raise ValueError(f"equation {layer.equation!r} is not 'input,kernel->output'")
        inp, kernel, out = parsed
        if "." in inp:
            rank = getattr(layer.input_spec, "ndim", None)
            if rank is None:
                raise ValueError(f"equation {layer.equation!r}: input rank unknown for '...'")
            # Distinct non-ASCII placeholders for the ellipsis axes (the
            # batch when leading, otherwise locations).
            fill = "".join(chr(0x100 + i) for i in range(rank - len(inp) + 1))
            inp, out = inp.replace(".", fill), out.replace(".", fill)
        elif "." in out:
            raise ValueError(f"equation {layer.equation!r}: '...' in the output only")
        batch = inp[0]
        if batch in kernel or batch not in out:
            raise ValueError(
                f"equation {layer.equation!r}: the batch axis must be kept and not in the kernel"
            )
        a_axes = [c for c in kernel if c in inp and c not in out]
        g_axes = [c for c in kernel if c in out and c not in inp]
        locations = [c for c in out if c in inp and c not in kernel and c != batch]
        shared = [c for c in kernel if c in inp and c in out]
        if shared:
            raise ValueError(
                f"equation {layer.equation!r}: kernel axes {''.join(shared)!r} also index input and "
                "output (a block-diagonal weight, not one Kronecker block)"
            )
        summed = [c for c in inp if c not in kernel and c not in out] + [
            c for c in kernel if c not in inp and c not in out
        ]
        if summed:
            raise ValueError(
                f"equation {layer.equation!r}: axes {''.join(summed)!r} are summed without a weight"
            )
        if not a_axes or not g_axes:
            raise ValueError(
                f"equation {layer.equation!r}: needs contracted and output kernel axes"
            )
        if layer.bias_axes is not None and set(layer.bias_axes) != set(g_axes):
            raise ValueError(
                f"bias_axes={layer.bias_axes!r} does not span exactly the kernel's output axes "
                f"{''.join(g_axes)!r} (a bias shared across some of them or per location is not "
                "one homogeneous-coordinate row)"
            )
        return inp, kernel, out, a_axes, g_axes, locations

    def __init__(self, layer):
        super().__init__(layer)
        inp, kernel, out, a_axes, g_axes, locations = self._axes(layer)
        sizes = dict(zip(kernel, self.kernel_shape))
        self.a_sizes = [sizes[c] for c in a_axes]
        self.g_sizes = [sizes[c] for c in g_axes]
        a_in = 1
        for d in self.a_sizes:
            a_in *= d
        g_dim = 1
        for d in self.g_sizes:
            g_dim *= d
        self.g_dim = g_dim
        self.a_dim = a_in + (1 if self.has_bias else 0)
        self._input_order = [inp.index(c) for c in [inp[0]] + locations + a_axes]
        self._output_order = [out.index(c) for c in [out[0]] + locations + g_axes]
        self._kernel_order = [kernel.index(c) for c in a_axes + g_axes]
        self._kernel_inverse = _inverse(self._kernel_order)
        self._kernel_transposed = [self.kernel_shape[i] for i in self._kernel_order]
        self._num_locations = len(locations)
        if self.has_bias:
            # The bias spans output axes from the first bias axis on, with
            # size 1 on the others (keras's layout); its g axes in output order.
            bias_out = [c for c in out if c in g_axes]
            self._bias_shape = tuple(int(d) for d in layer.bias.shape)
            self._bias_out_sizes = [sizes[c] for c in bias_out]
            self._bias_order = [bias_out.index(c) for c in g_axes]
            self._bias_inverse = _inverse(self._bias_order)

    def location_axes(self):
        return self._num_locations

    def _locations(self, inputs):
        x = tf.transpose(inputs, self._input_order)
        return tf.reshape(x, (tf.shape(x)[0], -1, self.a_dim - int(self.has_bias)))

    def _output_locations(self, ds):
        x = tf.transpose(ds, self._output_order)
        return tf.reshape(x, (tf.shape(x)[0], -1, self.g_dim))

    def to_matrix(self, grads):
        kernel = tf.transpose(tf.cast(grads[0], tf.float32), self._kernel_order)
        v = tf.reshape(kernel, (-1, self.g_dim))
        if self.has_bias:
            bias = tf.reshape(tf.cast(grads[1], tf.float32), self._bias_out_sizes)
            bias = tf.reshape(tf.transpose(bias, self._bias_order), (1, self.g_dim))
            v = tf.concat([v, bias], axis=0)
        return v

    def from_matrix(self, v):
        kernel = tf.reshape(v[: self.a_dim - int(self.has_bias)], self._kernel_transposed)
        kernel = tf.transpose(kernel, self._kernel_inverse)
        if not self.has_bias:
            return [kernel]
        bias = tf.reshape(v[-1], self.g_sizes)
        bias = tf.reshape(tf.transpose(bias, self._bias_inverse), self._bias_shape)
        return [kernel, bias]


def _inverse(permutation):
    inverse = [0] * len(permutation)
    for i, p in enumerate(permutation):
        inverse[p] = i
    return inverse
