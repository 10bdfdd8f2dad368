"""The layer-block interface and the registry of supported layer types."""

import keras
import tensorflow as tf

from keras_kfac import compat

#: Default largest Kronecker factor dimension (``max_factor_dim``): a dense
#: 8192 x 8192 float32 factor is 256 MiB, 512 MiB with its inverse.
DEFAULT_MAX_FACTOR_DIM = 8192
#: Default ``max_factor_ratio``: a factor above :data:`RATIO_FLOOR` and this
#: many times the other factor's dimension is kept as its diagonal. Its
#: statistics cost ``d / other`` times the layer's own forward pass and its
#: inverse ``d^3``, against ``d * other`` parameters: a conditional GAN's
#: final Conv2D (7x7x128 -> 1: A is 6273 x 6273 for 6273 weights) spent 114 s
#: per statistics update on A at load 11 (3.8 s diagonal), and its Dense
#: (139 -> 6762) 32 s per inverse of G, against a 0.5 s step.
DEFAULT_MAX_FACTOR_RATIO = 32
#: Factors up to this dimension (16 MiB) stay dense whatever the ratio: they
#: are cheap in absolute terms (an MNIST convnet's 1601 x 10 head keeps A).
RATIO_FLOOR = 2048
WEIGHT_SHARING_MODES = ("expand", "reduce", "auto")
#: ``KFAC(curvature_options=...)`` keys that configure blocks, not methods.
BLOCK_OPTIONS = ("weight_sharing", "max_factor_dim", "max_factor_ratio")


class LayerBlock:
    """One supported layer seen as a Kronecker-factored Fisher block.

    Subclasses implement ``_locations`` (inputs -> ``(n, T, d_in)`` rows of
    the kernel's input side) and ``_output_locations`` (pre-activation
    gradients -> ``(n, T, d_out)``).
    """

    layer_types = ()
    #: Whether the block's curvature is Kronecker-factored in ``(a, g)`` (the
    #: size guard and ``weight_sharing`` apply to it).
    kronecker = True
    #: Whether ``weight_sharing="auto"`` may choose reduce for this block type.
    auto_weight_sharing = True
    #: Name of the curvature class this block always uses, whatever
    #: ``KFAC(curvature=...)`` says (blocks that are not Kronecker-factored,
    #: e.g. scale-and-shift); None: the user's choice.
    fixed_curvature = None
    #: The input factor ``A`` is kept as its diagonal, shape ``(a_dim,)``
    #: (set per instance by the size guard of :func:`block_for_layer`).
    a_is_diagonal = False
    #: Same for the output factor ``G``.
    g_is_diagonal = False
    #: ``"expand"`` or ``"reduce"`` (resolved by :func:`block_for_layer`):
    #: how the Kronecker factors treat the locations, see
    #: :meth:`keras_kfac.curvature.base.LayerBatch.factor_a`.
    weight_sharing = "expand"
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

    def per_example_gradients(self, a, g):
        """``u_i = vec_row(sum_t a_bar_{i,t} g_{i,t}^T)``: ``(n, P)``
        per-example gradients in the order of ``vec_row(V)`` (grouped
        blocks: ``(group, a, g)``), from this block's :meth:`activations` and
        :meth:`output_gradients`. Blocks whose gradient is not that sum of
        outer products override it."""
        u = tf.einsum("nt...a,nt...g->n...ag", a, g)
        return tf.reshape(u, (tf.shape(a)[0], -1))

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

    @staticmethod
    def forward_mode_reason(layer):
        """Why TensorFlow cannot run ``layer``'s traced forward pass under
        forward-mode autodiff (the quadratic model's Jacobian-vector
        products, :mod:`keras_kfac.quadratic`), or None when it can. Read
        once per model by :func:`forward_mode_blockers`."""
        return None

    def location_axes(self):
        """How many axes besides the batch and the features the layer's input
        has (None when unknown); the weight-sharing rule of
        :func:`block_for_layer` compares it with the model output's."""
        shape = compat.built_input_shape(self.layer)
        return None if shape is None else len(shape) - 2

    def diagonal_factor_a(self, batch):
        """``diag(A)`` of ``batch`` under ``weight_sharing``, shape
        ``(a_dim,)``: ``(1/n) sum_i sum_t a_bar^2`` (expand) or ``(1/n)
        sum_i mean_t(a_bar)^2`` (reduce). Blocks whose ``a`` is one-hot
        override this to count ids instead of forming ``a``."""
        a = batch.a()
        if self.weight_sharing == "reduce":
            a = tf.reduce_mean(a, axis=1, keepdims=True)
        return tf.einsum("nti,nti->i", a, a) / tf.cast(tf.shape(a)[0], tf.float32)

    def structure(self):
        """How the block's Fisher is factored, for ``summary()``."""
        a = "diag(A)" if self.a_is_diagonal else "A"
        g = "diag(G)" if self.g_is_diagonal else "G"
        return f"{a}x{g},{self.weight_sharing}"

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


def recurrent_loop_reason(layer):
    """Why a ``keras.layers.RNN`` (LSTM, GRU, SimpleRNN, ConvLSTM*, RNN of
    any cell; also inside Bidirectional) blocks forward-mode autodiff, or
    None. Its loop (``unroll=False``) writes each step's output to a
    ``tf.TensorArray``; TensorFlow has no forward-mode derivative of that
    write in a traced function ("`dtype` <dtype: 'variant'> is not
    compatible with 1 of dtype int64"). Measured on TF 2.21 / keras 3.15.1
    (``tests/test_layers_recurrent.py`` keeps it checked): eager passes
    work, graph and XLA fail; ``unroll=True`` works in all three; of the
    other layers only those running ``keras.ops.scan`` or ``tf.map_fn``
    fail (none in ``keras.layers`` with trainable weights), while
    ``tf.while_loop`` without a TensorArray, TimeDistributed,
    MultiHeadAttention, normalization and Dropout work."""
    if isinstance(layer, keras.layers.RNN) and not layer.unroll:
        return (
            "its recurrent loop writes a TensorArray, which TensorFlow cannot "
            "differentiate in forward mode in a traced function (unroll=True avoids it)"
        )
    return None


def forward_mode_blockers(layers):
    """``{layer name: reason}`` for the ``layers`` (every layer of a model,
    nested ones too) whose traced forward pass cannot run under forward-mode
    autodiff: a block's declaration (:meth:`LayerBlock.forward_mode_reason`)
    for layers with a block type, the known Keras layers otherwise."""
    out = {}
    for layer in layers:
        cls = block_class_for_layer(layer)
        if cls is not None:
            reason = cls.forward_mode_reason(layer)
        else:
            reason = recurrent_loop_reason(layer)
        if reason is not None:
            out[layer.name] = reason
    return out


def block_for_layer(layer, **options):
    """The block for ``layer`` (its first, for layers with several), or None
    if its variables take the fallback; ``options`` as :func:`blocks_for_layer`."""
    blocks = blocks_for_layer(layer, **options)
    return blocks[0] if blocks else None


def blocks_for_layer(
    layer,
    model=None,
    weight_sharing="auto",
    max_factor_dim=DEFAULT_MAX_FACTOR_DIM,
    max_factor_ratio=DEFAULT_MAX_FACTOR_RATIO,
    **_curvature_options,
):
    """Every block of ``layer`` (empty if its variables take the fallback).

    ``weight_sharing`` and ``max_factor_dim`` are curvature options
    (``KFAC(curvature_options=...)``; the others are ignored here), each a
    value or a dict ``{layer_name: value}`` with an optional ``"default"``.

    * ``weight_sharing``: ``"expand"``, ``"reduce"`` or ``"auto"`` (K-FAC-
      expand / -reduce, Eschenhagen et al. 2023). ``"auto"`` picks reduce when
      the layer has location axes (a sequence, an image) and every output of
      ``model`` has fewer (``rank - 2``: batch and feature axes aside), i.e.
      the locations are pooled before the loss; expand otherwise (a per-token
      loss, a Flatten or Reshape after the layer, or the model's outputs or
      the layer's input rank are unknown, e.g. a subclassed model). Conv2D stays expand under ``"auto"`` (KFC).
    * ``max_factor_dim``: a factor larger than this is kept as its diagonal
      (size guard). A diagonal ``A`` with a dense ``G`` keeps the output
      correlations that K-FAC's update relies on most while its memory is
      ``O(a_dim + g_dim^2)``; the alternatives are worse: the fallback (no
      curvature at all), an all-diagonal Fisher (drops the output
      correlations too), or a low-rank ``A`` (needs an eigendecomposition of
      the same huge matrix, or randomized sketches with their own error). For
      such layers (VGG16's 25088-input Dense: ``A`` alone would be 2.5 GB)
      the inputs are post-ReLU/pooled features whose cross-correlations
      matter less than the output side's. ``G`` gets the same treatment when
      ``g_dim`` exceeds the limit (e.g. a language model's vocabulary head).
    * ``max_factor_ratio``: a factor larger than ``RATIO_FLOOR`` (2048) and
      more than this many times the other factor is kept as its diagonal too
      (None: never); see :data:`DEFAULT_MAX_FACTOR_RATIO` for the cost.
    """
    cls = block_class_for_layer(layer)
    if cls is None or cls.unsupported_reason(layer) is not None:
        return []
    blocks = cls.blocks_for(layer)
    for block in blocks:
        _configure(block, layer, model, weight_sharing, max_factor_dim, max_factor_ratio)
    return blocks


def _configure(block, layer, model, weight_sharing, max_factor_dim, max_factor_ratio):
    """Apply the size guard and the weight-sharing mode to a Kronecker block
    (grouped blocks: per-group factors are small, and groups are not
    locations, so neither applies)."""
    if not block.kronecker or block.groups > 1:
        return
    limit = int(_per_layer(max_factor_dim, layer, "max_factor_dim"))
    if limit < 1:
        raise ValueError(f"max_factor_dim must be a positive integer; got {max_factor_dim!r}.")
    ratio = _per_layer(max_factor_ratio, layer, "max_factor_ratio")
    if ratio is not None and not ratio > 0:
        raise ValueError(
            f"max_factor_ratio must be a positive number or None; got {max_factor_ratio!r}."
        )

    def too_large(dim, other):
        return dim > limit or (ratio is not None and dim > RATIO_FLOOR and dim > ratio * other)

    if too_large(block.a_dim, block.g_dim):
        block.a_is_diagonal = True
    if too_large(block.g_dim, block.a_dim):
        block.g_is_diagonal = True
    if block.a_is_diagonal or block.g_is_diagonal:
        # The one method with diagonal factors (see curvature.kfac).
        block.fixed_curvature = "kfac"
    block.weight_sharing = _resolve_weight_sharing(
        block, model, _per_layer(weight_sharing, layer, "weight_sharing")
    )


def _per_layer(option, layer, name):
    if isinstance(option, dict):
        unknown = [k for k in option if k != "default" and not isinstance(k, str)]
        if unknown:
            raise ValueError(f"{name} keys must be layer names or 'default'; got {unknown!r}.")
        if layer.name in option:
            return option[layer.name]
        if "default" not in option:
            raise ValueError(
                f"{name}={option!r} has no entry for layer {layer.name!r}: add it or a 'default'."
            )
        return option["default"]
    return option


def _resolve_weight_sharing(block, model, mode):
    if mode not in WEIGHT_SHARING_MODES:
        raise ValueError(
            f"Unknown weight_sharing={mode!r} for layer {block.name!r}: use one of {WEIGHT_SHARING_MODES}."
        )
    if mode != "auto":
        return mode
    if not block.auto_weight_sharing:
        return "expand"
    layer_axes = block.location_axes()
    outputs = getattr(model, "outputs", None) if model is not None else None
    if not layer_axes or not outputs:
        return "expand"
    output_axes = [len(o.shape) - 2 for o in outputs]
    if any(k >= layer_axes for k in output_axes) or _flattened_after(block, model):
        return "expand"
    return "reduce"


def _flattened_after(block, model):
    """Whether a Flatten or Reshape after ``block``'s layer in ``model``'s
    layer order (topological for Sequential and functional models; any later
    one counts, erring towards expand) folds the locations into features:
    its output does not start with the layer's location axes. The next layer
    then weights each location separately, which is not the pooling reduce is
    exact for. Measured (relative Frobenius error of ``A x G`` against the
    exact Fisher block, Dense on 6 positions, n = 64, 5 seeds, at init):
    followed by Flatten -> Dense expand 0.66, reduce 0.74; by
    GlobalAveragePooling1D -> Dense expand 0.81, reduce 0.19."""
    layer = block.layer
    layers = compat.flatten_layers(model)
    later = next((layers[i + 1 :] for i, x in enumerate(layers) if x is layer), [])
    locations = _output_shape(layer)
    for x in later:
        if isinstance(x, (keras.layers.Flatten, keras.layers.Reshape)):
            shape = _output_shape(x)
            k = block.location_axes()
            if locations is None or shape is None or shape[1 : 1 + k] != locations[1 : 1 + k]:
                return True
    return False


def _output_shape(layer):
    """The layer's symbolic output shape, or None (never called
    symbolically, or called more than once)."""
    try:
        return tuple(layer.output.shape)
    except (AttributeError, ValueError):
        return None


def _is_sparse(v):
    return isinstance(v, tf.IndexedSlices)


def matrix_inner(v, p):
    """``<V, P>`` (Frobenius) of a block's gradient matrix and its
    preconditioned image; row-sparse ``tf.IndexedSlices`` pairs (embeddings)
    share their unique row indices (see ``EmbeddingBlock.to_matrix``)."""
    if _is_sparse(v) and _is_sparse(p):
        return tf.reduce_sum(v.values * p.values)
    return tf.reduce_sum(tf.convert_to_tensor(v) * tf.convert_to_tensor(p))


def scale_matrix(scale, v):
    """``scale * V``, keeping a row-sparse ``V`` sparse."""
    if _is_sparse(v):
        return tf.IndexedSlices(scale * v.values, v.indices, v.dense_shape)
    return scale * v
