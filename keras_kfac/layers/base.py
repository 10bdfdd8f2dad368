"""The layer-block interface and the registry of supported layer types."""

import keras
import tensorflow as tf


class LayerBlock:
    """One Dense/Conv2D layer seen as a Kronecker-factored Fisher block.

    Subclasses implement ``_locations`` (inputs -> ``(n, T, d_in)`` rows of
    the kernel's input side) and ``_output_locations`` (pre-activation
    gradients -> ``(n, T, d_out)``).
    """

    layer_types = ()
    #: Name of the curvature class this block always uses, whatever
    #: ``KFAC(curvature=...)`` says (blocks that are not Kronecker-factored,
    #: e.g. scale-and-shift); None: the user's choice.
    fixed_curvature = None

    def __init__(self, layer):
        self.layer = layer
        self.name = layer.name
        self.has_bias = layer.bias is not None
        kernel_shape = tuple(int(d) for d in layer.kernel.shape)
        self.kernel_shape = kernel_shape
        self.g_dim = kernel_shape[-1]
        in_dim = 1
        for d in kernel_shape[:-1]:
            in_dim *= d
        self.a_dim = in_dim + (1 if self.has_bias else 0)

    @property
    def variables(self):
        """The layer's variables in parameter order: kernel, then bias."""
        if self.has_bias:
            return [self.layer.kernel, self.layer.bias]
        return [self.layer.kernel]

    @property
    def num_parameters(self):
        return self.a_dim * self.g_dim

    def activations(self, inputs):
        """Homogeneous inputs ``a_bar``, float32, shape ``(n, T, a_dim)``."""
        a = tf.cast(self._locations(inputs), tf.float32)
        if self.has_bias:
            ones = tf.ones_like(a[..., :1])
            a = tf.concat([a, ones], axis=-1)
        return a

    def output_gradients(self, ds):
        """Pre-activation gradients as float32 ``(n, T, g_dim)``."""
        return tf.cast(self._output_locations(ds), tf.float32)

    def per_example_gradients(self, a, g):
        """``u_i = vec_row(sum_t a_bar_{i,t} g_{i,t}^T)``: ``(n, P)``
        per-example gradients in parameter order, from this block's
        :meth:`activations` and :meth:`output_gradients`. Blocks whose
        gradient is not that sum of outer products override it."""
        return tf.reshape(tf.einsum("nta,ntg->nag", a, g), (tf.shape(a)[0], -1))

    def to_matrix(self, grads):
        """Variable gradients (kernel[, bias]) -> ``V`` of shape (a_dim, g_dim)."""
        v = tf.reshape(tf.cast(grads[0], tf.float32), (-1, self.g_dim))
        if self.has_bias:
            bias = tf.reshape(tf.cast(grads[1], tf.float32), (1, self.g_dim))
            v = tf.concat([v, bias], axis=0)
        return v

    def from_matrix(self, v):
        """Inverse of :meth:`to_matrix`."""
        kernel = tf.reshape(v[: self.a_dim - int(self.has_bias)], self.kernel_shape)
        if self.has_bias:
            return [kernel, v[-1]]
        return [kernel]

    @classmethod
    def blocks_for(cls, layer):
        """Every block of ``layer`` (one here). Layers with several weight
        matrices that need their own Kronecker factors (a recurrent layer's
        kernel and recurrent kernel) return one block per group; the blocks
        share the layer's recorded tensors and own disjoint variables."""
        return [cls(layer)]

    @staticmethod
    def forward(layer, call, tap, inputs, *args, **kwargs):
        """Run ``layer``'s original ``call`` for the instrumentation, passing
        the tensor whose loss gradient is the block's ``g`` through ``tap``
        (which records it and returns the tensor to continue with).
        ``tap(s, recorded=x)`` records ``x`` instead of the layer's
        ``inputs`` as what :meth:`activations` later receives (blocks whose
        ``a`` is an intermediate of the layer's own computation); a
        zero-argument callable is resolved when ``forward`` returns (values
        computed after ``s``, e.g. inside a recurrent loop).

        Here that tensor is the pre-activation output: the layer's own
        activation is set to linear for the call and applied afterwards, so
        fused activations work. Blocks whose ``g`` lives elsewhere override
        this; ``tap(s, recorded=x)`` makes ``activations`` receive ``x``
        instead of the layer's inputs (a zero-argument callable is resolved
        when ``forward`` returns, for values computed after ``s``)."""
        activation = getattr(layer, "activation", None)
        if activation is None:
            return tap(call(inputs, *args, **kwargs))
        object.__setattr__(layer, "activation", keras.activations.linear)
        try:
            s = call(inputs, *args, **kwargs)
        finally:
            object.__setattr__(layer, "activation", activation)
        return activation(tap(s))

    def _locations(self, inputs):
        raise NotImplementedError

    def _output_locations(self, ds):
        raise NotImplementedError


_BLOCK_TYPES = []
#: Exact layer classes that have a block (subclasses may change the forward).
SUPPORTED_LAYER_TYPES = set()


def register_block(cls):
    _BLOCK_TYPES.append(cls)
    SUPPORTED_LAYER_TYPES.update(cls.layer_types)
    return cls


def unsupported_reason(layer):
    """Why ``layer`` gets no curvature block (None when it gets one)."""
    for cls in _BLOCK_TYPES:
        if type(layer) in cls.layer_types:
            return cls.unsupported_reason(layer)
        if isinstance(layer, cls.layer_types):
            return (
                f"subclass {type(layer).__name__} of "
                f"{cls.layer_types[0].__name__} may change the forward pass"
            )
    return "layer type has no curvature block"


def block_class_for_layer(layer):
    """The block class for ``layer``'s type (None when it has none)."""
    for cls in _BLOCK_TYPES:
        if type(layer) in cls.layer_types:
            return cls
    return None


def block_for_layer(layer):
    """The block for ``layer`` (its first, for layers with several), or None
    if its variables take the fallback."""
    blocks = blocks_for_layer(layer)
    return blocks[0] if blocks else None


def blocks_for_layer(layer):
    """Every block of ``layer`` (empty if its variables take the fallback)."""
    for cls in _BLOCK_TYPES:
        if type(layer) in cls.layer_types and cls.unsupported_reason(layer) is None:
            return cls.blocks_for(layer)
    return []
