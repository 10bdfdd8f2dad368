"""The layer-block interface and the registry of supported layer types."""

import keras
import tensorflow as tf


class LayerBlock:
    """One supported layer seen as a Kronecker-factored Fisher block.

    Subclasses implement ``_locations`` (inputs -> ``(n, T, d_in)`` rows of
    the kernel's input side) and ``_output_locations`` (pre-activation
    gradients -> ``(n, T, d_out)``).
    """

    layer_types = ()
    #: Name of the curvature class this block always uses, whatever
    #: ``KFAC(curvature=...)`` says (blocks that are not Kronecker-factored,
    #: e.g. scale-and-shift); None: the user's choice.
    fixed_curvature = None
    #: Independent weight groups (grouped/depthwise convolutions). With
    #: ``groups > 1`` the block is block-diagonal over groups (each group's
    #: weight matrix a Fisher block of its own): ``a``,
    #: ``g`` are ``(n, T, groups, a_dim)``, ``(n, T, groups, g_dim)`` and
    #: ``V`` is ``(groups, a_dim, g_dim)``, with ``a_dim``, ``g_dim`` per group.
    groups = 1
    #: Methods a subclass of a supported layer may not override and keep the
    #: block (they compute what the block assumes).
    forward_methods = ("call",)

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
        return self.groups * self.a_dim * self.g_dim

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

    @staticmethod
    def forward(layer, call, tap, inputs, *args, **kwargs):
        """Run ``layer``'s original ``call`` for the instrumentation, passing
        the tensor whose loss gradient is the block's ``g`` through ``tap``
        (which records it and returns the tensor to continue with).

        Here that tensor is the pre-activation output: the layer's own
        activation is set to linear for the call and applied afterwards, so
        fused activations work. Blocks whose ``g`` lives elsewhere override
        this."""
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
#: Layer classes that have a block (subclasses get it if they keep its math).
SUPPORTED_LAYER_TYPES = set()


def register_block(cls):
    _BLOCK_TYPES.append(cls)
    SUPPORTED_LAYER_TYPES.update(cls.layer_types)
    return cls


def _registered(layer):
    """``(block class, supported base class)`` of the nearest supported class
    in ``type(layer)``'s MRO, or ``(None, None)``."""
    for base in type(layer).__mro__:
        for cls in _BLOCK_TYPES:
            if base in cls.layer_types:
                return cls, base
    return None, None


def _overridden(layer, cls, base):
    """The first of ``cls.forward_methods`` that ``type(layer)`` defines
    differently from the supported ``base`` (None if it keeps them all)."""
    for name in cls.forward_methods:
        if getattr(type(layer), name, None) is not getattr(base, name, None):
            return name
    return None


def unsupported_reason(layer):
    """Why ``layer`` gets no curvature block (None when it gets one)."""
    cls, base = _registered(layer)
    if cls is None:
        return "layer type has no curvature block"
    method = _overridden(layer, cls, base)
    if method is not None:
        return f"subclass {type(layer).__name__} overrides {method}"
    return cls.unsupported_reason(layer)


def block_class_for_layer(layer):
    """The block class for ``layer`` (None when it has none): that of its
    type, or of the nearest supported base class when ``layer``'s class does
    not override the methods the block's math depends on."""
    cls, base = _registered(layer)
    if cls is None or _overridden(layer, cls, base) is not None:
        return None
    return cls


def block_for_layer(layer):
    """The block for ``layer``, or None if its variables take the fallback."""
    cls = block_class_for_layer(layer)
    if cls is None or cls.unsupported_reason(layer) is not None:
        return None
    return cls(layer)
