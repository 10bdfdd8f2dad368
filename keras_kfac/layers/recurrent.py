"""LSTM, GRU and SimpleRNN: time steps as locations (K-FAC expand).

At step t the cell computes its gate pre-activations
``z_t = x_t K + h_{t-1} U + b`` (LSTM: ``4u`` gates, SimpleRNN: ``u``), so
the per-example gradients are exactly
``dK = sum_t x_t g_t^T``, ``db = sum_t g_t``, ``dU = sum_t h_{t-1} g_t^T``
with ``g_t = dl/dz_t``: the kernel block has ``a_t = [x_t; 1]`` and the
recurrent-kernel block ``a_t = h_{t-1}``, both with ``g_t``, each with its
own Kronecker factors (the time steps are the locations, as the spatial
locations of a convolution).

GRU (``reset_after=True``, Keras's default) has separate input and recurrent
biases ``b = [b_in; b_rec]`` and the reset gate multiplies the recurrent
projection of the candidate: ``hh_t = act(x_h + r_t * (h_{t-1} U_h + b_rec_h))``.
With ``m_t = x_t K + b_in`` and ``q_t = h_{t-1} U + b_rec`` the gradients are
``dK = sum_t x_t (dl/dm_t)^T`` and ``dU = sum_t h_{t-1} (dl/dq_t)^T``, where
``dl/dq_t`` differs from ``dl/dm_t`` in the candidate columns by the factor
``r_t``. A GRU therefore gives three blocks: kernel (``a = x_t``,
``g = dl/dm_t``), recurrent kernel (``a = h_{t-1}``, ``g = dl/dq_t``) and the
bias variable ``(2, 3u)`` as its own block (``a = 1``,
``g = [dl/dm_t; dl/dq_t]``), so that no variable is split between blocks.

Capturing ``g_t`` inside Keras's recurrent loop (a ``tf.while_loop`` in graph
and XLA modes): for the instrumented forward pass the cell's bias is
replaced, at step t, by ``B_t``, the bias broadcast to a ``(n, T, bias size)``
"probe" sequence concatenated to the layer's inputs (so the loop slices it
per step) and split off again inside the cell. Then ``dl/dB_t = dl/dz_t``
(for GRU, ``[dl/dm_t; dl/dq_t]``) comes out of the ordinary backward pass,
outside the loop, and ``B`` is what the instrumentation taps. A copy of the
bias rather than an added zero tensor, because the backward pass runs only
on paths from the trainable variables to the loss (hence ``use_bias=False``
is refused). The cell also outputs its incoming state ``h_{t-1}`` next to
its output, with the layer returning sequences, so ``h_{t-1}`` for every t
is read after the loop; the user's output (and states) are sliced back out
unchanged. Masked steps carry the state unchanged in Keras, so their
``g_t`` is zero; their ``a_t`` (homogeneous coordinate included) is zeroed
too, so padding does not enter the input factors (``G`` still averages over
all ``T`` steps, as the curvature methods' factor definition does).
``go_backwards``, ``unroll``, ``stateful``, ``return_state``, ``initial_state``
and masks are handled.

Known cost: the instrumented forward runs Keras's generic loop, not the fused
cuDNN kernel (which computes the whole sequence in one op, leaving no step to
probe). On a GPU, an LSTM/GRU with ``use_cudnn="auto"`` therefore trains at
the generic loop's speed under KFAC (inference is unaffected);
``use_cudnn=True`` is refused. Dropout inside the cell and
``implementation=1`` are refused (see ``unsupported_reason``).
"""

import inspect

import keras
import tensorflow as tf

from keras_kfac.layers.base import LayerBlock, recurrent_loop_reason, register_block

_RECURRENT_TYPES = (keras.layers.LSTM, keras.layers.GRU, keras.layers.SimpleRNN)


def _is_gru(layer):
    return isinstance(layer.cell, keras.layers.GRUCell)


def _probe_size(layer):
    """Columns of the probe: the size of the (full) bias."""
    cell = layer.cell
    gates = int(cell.kernel.shape[-1])
    return 2 * gates if _is_gru(layer) else gates


class _CellProbe:
    """Context in which ``layer`` takes ``[x, B]`` sequences, uses ``B_t`` as
    its cell's bias at step t, runs the generic loop, and returns
    ``[output_t, h_{t-1}]`` for every step.

    Relies on the Keras 3 cells reading ``self.bias`` in ``call`` and adding
    it to the pre-activation once (implementation=2; checked on keras 3.15.1
    by the brute-force tests)."""

    def __init__(self, layer):
        self.layer = layer
        self.cell = layer.cell
        self.d_in = int(self.cell.kernel.shape[0])
        self.saved = []

    def _set(self, obj, name, value):
        self.saved.append((obj, name, name in obj.__dict__, obj.__dict__.get(name)))
        object.__setattr__(obj, name, value)

    def __enter__(self):
        self._set(self.layer, "return_sequences", True)
        if hasattr(self.layer, "use_cudnn"):
            self._set(self.layer, "use_cudnn", False)
        self._set(self.cell, "call", self._cell_call(self.cell.call))
        return self

    def __exit__(self, *exc):
        for obj, name, had_own, value in reversed(self.saved):
            if had_own:
                object.__setattr__(obj, name, value)
            else:
                object.__delattr__(obj, name)
        self.saved = []

    def _cell_call(self, original):
        cell, d_in, gru = self.cell, self.d_in, _is_gru(self.layer)

        def call(inputs, states, **kwargs):
            x, p = inputs[:, :d_in], inputs[:, d_in:]
            if gru:
                # (2, n, 3u): the cell splits its bias along the first axis.
                p = tf.stack(tf.split(p, 2, axis=-1))
            bias = cell.bias
            object.__setattr__(cell, "bias", p)
            try:
                output, new_states = original(x, states, **kwargs)
            finally:
                object.__setattr__(cell, "bias", bias)
            h_tm1 = states[0] if isinstance(states, (list, tuple)) else states
            return tf.concat([output, tf.cast(h_tm1, output.dtype)], axis=-1), new_states

        return call


@register_block
class RNNKernelBlock(LayerBlock):
    """The input kernel of an LSTM/GRU/SimpleRNN (with the bias, except for
    GRU, whose bias is its own block). ``blocks_for`` gives every block of
    the layer; they read the same recorded tensors:
    ``[x_t, h_{t-1}, mask_t]`` (zeroed at masked steps) and ``dl/dp_t``."""

    # Time steps are locations of a recurrence, not pooled weight sharing:
    # expand (the per-example gradient sums a_t g_t^T over t exactly).
    auto_weight_sharing = False

    layer_types = _RECURRENT_TYPES
    #: The recorded ``dl/dp`` columns this block's ``g`` is.
    g_offset = 0

    @staticmethod
    def unsupported_reason(layer):
        if not layer.built:
            return "layer is not built"
        cell = layer.cell
        if cell.dropout > 0 or cell.recurrent_dropout > 0:
            return (
                "dropout/recurrent_dropout inside the cell: the kernels multiply "
                "inputs dropped out inside the loop, which are not recorded "
                "(apply keras.layers.Dropout to the inputs before the layer instead)"
            )
        if not cell.use_bias:
            return (
                "use_bias=False: the step gradients are read at per-step copies "
                "of the bias (which put them on the variables' backward pass)"
            )
        if getattr(cell, "implementation", 2) != 2:
            return "implementation=1 (use implementation=2, the default: same math)"
        if _is_gru(layer) and not cell.reset_after:
            return (
                "GRU(reset_after=False): the candidate's recurrent kernel sees "
                "r_t * h_{t-1}, computed inside the cell and not recorded "
                "(use reset_after=True, the default)"
            )
        if getattr(layer, "use_cudnn", "auto") is True:
            return (
                "use_cudnn=True: the cuDNN kernel leaves no step to record; use "
                "use_cudnn='auto' (KFAC's training forward then runs the generic loop)"
            )
        if (
            layer.unroll
            and layer.go_backwards
            and layer.zero_output_for_mask
            and not layer.return_sequences
        ):
            # Keras's unrolled loop zeroes this output with the mask of the
            # first step, not of the last processed one, so it is not the
            # last element of the returned sequence the block reads.
            return "unroll=True with go_backwards and zero_output_for_mask and no return_sequences"
        return None

    @staticmethod
    def forward_mode_reason(layer):
        # The block's instrumented forward runs the layer's own loop.
        return recurrent_loop_reason(layer)

    @classmethod
    def blocks_for(cls, layer):
        blocks = [cls(layer), RNNRecurrentKernelBlock(layer)]
        if _is_gru(layer) and layer.cell.bias is not None:
            blocks.append(GRUBiasBlock(layer))
        return blocks

    def __init__(self, layer):
        self._init(
            layer, layer.cell.kernel, layer.cell.bias if not _is_gru(layer) else None, "kernel"
        )

    def _init(self, layer, kernel, bias, suffix):
        # Not LayerBlock.__init__: the weights live on the cell, and one
        # layer has several blocks (distinct names: they name state variables).
        cell = layer.cell
        self.layer = layer
        self.name = f"{layer.name}_{suffix}"
        self.kernel = kernel
        self.bias = bias
        self.has_bias = bias is not None
        self.kernel_shape = tuple(int(d) for d in kernel.shape)
        self.g_dim = self.kernel_shape[-1]
        self.a_dim = self.kernel_shape[0] + int(self.has_bias)
        self.d_in = int(cell.kernel.shape[0])
        self.units = int(cell.units)

    @property
    def variables(self):
        return [self.kernel, self.bias] if self.has_bias else [self.kernel]

    def activations(self, inputs):
        a = tf.cast(inputs, tf.float32)
        x = a[..., : self.d_in]
        return tf.concat([x, a[..., -1:]], axis=-1) if self.has_bias else x

    def output_gradients(self, ds):
        return tf.cast(ds[..., self.g_offset : self.g_offset + self.g_dim], tf.float32)

    @staticmethod
    def forward(layer, call, tap, inputs, *args, **kwargs):
        """Run ``layer`` with the probe (module docstring); tap the probe and
        record ``[x_t, h_{t-1}, 1]``, zeroed at masked steps. Inputs must be
        ``(n, T, d)`` sequences."""
        bound = inspect.signature(call).bind(inputs, *args, **kwargs).arguments
        mask = bound.get("mask")
        if isinstance(mask, (list, tuple)):
            mask = mask[0]
        units = int(layer.cell.units)
        shape = tf.concat([tf.shape(inputs)[:2], [_probe_size(layer)]], axis=0)
        bias = tf.reshape(tf.cast(layer.cell.bias, inputs.dtype), (-1,))
        recorded = []
        probe = tap(tf.broadcast_to(bias, shape), recorded=lambda: recorded[0])
        with _CellProbe(layer):
            result = call(tf.concat([inputs, probe], axis=-1), *args, **kwargs)
        sequence = result[0] if layer.return_state else result
        output, h_prev = sequence[..., :units], sequence[..., units:]
        if layer.go_backwards:
            # The loop emits steps in processing order; the probe and inputs
            # are in time order.
            h_prev = tf.reverse(h_prev, axis=[1])
        rows = tf.concat(
            [inputs, tf.cast(h_prev, inputs.dtype), tf.ones_like(inputs[..., :1])], axis=-1
        )
        if mask is not None:
            rows = rows * tf.cast(mask, rows.dtype)[..., None]
        recorded.append(rows)
        if not layer.return_sequences:
            output = output[:, -1]
        if layer.return_state:
            return (output,) + tuple(result[1:])
        return output


class RNNRecurrentKernelBlock(RNNKernelBlock):
    """The recurrent kernel: ``a_t = h_{t-1}``; for GRU, ``g_t`` is the
    gradient at the recurrent projection ``h_{t-1} U + b_rec``."""

    def __init__(self, layer):
        self._init(layer, layer.cell.recurrent_kernel, None, "recurrent_kernel")
        if _is_gru(layer):
            self.g_offset = self.g_dim

    def activations(self, inputs):
        return tf.cast(inputs[..., self.d_in : self.d_in + self.units], tf.float32)


class GRUBiasBlock(RNNKernelBlock):
    """A GRU's bias ``[b_in; b_rec]`` (shape ``(2, 3u)``): ``a_t = 1``,
    ``g_t = [dl/dm_t; dl/dq_t]`` (``V`` is the bias, flattened row-major)."""

    def __init__(self, layer):
        self._init(layer, layer.cell.bias, None, "bias")
        self.g_dim = self.kernel_shape[0] * self.kernel_shape[1]
        self.a_dim = 1

    def activations(self, inputs):
        return tf.cast(inputs[..., -1:], tf.float32)
