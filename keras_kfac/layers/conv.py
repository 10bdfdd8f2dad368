"""Convolutions: KFC (Grosse & Martens 2016, arXiv 1602.01407).

The input side of the factorization is the patch matrix: at each output
location t, the input values the kernel sees, in the order of the kernel's
row-major flatten ``(k_1, ..., k_r, c_in)``. Padding is made explicit
(``"same"`` as TensorFlow places it, ``"causal"`` as Keras' Conv1D does),
then the patches of the padded input are taken with VALID geometry:
``tf.image.extract_patches`` over the last two spatial axes, strided slices
over a leading third one (Conv3D), a unit axis added for one spatial axis.
That covers every stride, dilation and padding Keras allows.

Grouped convolutions (``groups > 1``, depthwise) have one weight matrix per
group; each group is its own Fisher block (block-diagonal over groups, as
K-FAC is over layers: cross-group terms are dropped), and the block exposes
a group axis: ``a`` of shape ``(n, T, groups, a_dim)`` and ``g`` of
``(n, T, groups, g_dim)``, ``V`` of ``(groups, a_dim, g_dim)``, with
``a_dim``, ``g_dim`` per group. Only the patches of a group's own input
channels are formed, never a mostly-zero block-diagonal ``g``.
"""

import math

import keras
import tensorflow as tf

from keras_kfac.layers.base import LayerBlock, register_block


def _size(x, axis):
    """Static size of ``axis`` when known, else a scalar tensor."""
    size = x.shape[axis]
    return tf.shape(x)[axis] if size is None else size


def _max0(v):
    return max(v, 0) if isinstance(v, int) else tf.maximum(v, 0)


def same_padding(size, effective, stride):
    """TensorFlow's SAME padding ``(before, after)`` of one axis: total
    ``max((ceil(size/stride) - 1) * stride + effective - size, 0)``, the
    smaller half before."""
    out = -(-size // stride)
    total = _max0((out - 1) * stride + effective - size)
    return total // 2, total - total // 2


def pad_or_crop(x, pads):
    """Pad spatial axis ``i + 1`` of channels-last ``x`` by ``pads[i] =
    (before, after)``; negative amounts crop."""
    if all(isinstance(p, int) and p >= 0 for pair in pads for p in pair):
        if any(pair != (0, 0) for pair in pads):
            x = tf.pad(x, [(0, 0)] + [tuple(p) for p in pads] + [(0, 0)])
        return x
    x = tf.pad(x, [(0, 0)] + [(_max0(b), _max0(a)) for b, a in pads] + [(0, 0)])
    for axis, (before, after) in enumerate(pads, start=1):
        size = _size(x, axis)
        start = _max0(-before)
        stop = size - _max0(-after)
        index = [slice(None)] * len(x.shape)
        index[axis] = slice(start, stop)
        x = x[tuple(index)]
    return x


def explicit_padding(x, kernel_size, strides, dilation, padding):
    """Per-axis ``(before, after)`` of Keras' ``padding`` for channels-last ``x``."""
    pads = []
    for axis, (k, s, d) in enumerate(zip(kernel_size, strides, dilation), start=1):
        effective = (k - 1) * d + 1
        if padding == "valid":
            pads.append((0, 0))
        elif padding == "same":
            pads.append(same_padding(_size(x, axis), effective, s))
        elif padding == "causal":
            pads.append((effective - 1, 0))
        else:
            raise ValueError(f"Unknown padding {padding!r}.")
    return pads


def extract_patches(x, kernel_size, strides, dilation, padding="valid"):
    """``(n, *spatial, c)`` channels-last -> ``(n, *out_spatial, prod(k) * c)``
    patches in the kernel's row-major ``(k_1, ..., k_r, c)`` order."""
    rank = len(kernel_size)
    x = pad_or_crop(x, explicit_padding(x, kernel_size, strides, dilation, padding))
    if rank == 1:
        p = extract_patches(
            x[:, None], (1,) + tuple(kernel_size), (1,) + tuple(strides), (1,) + tuple(dilation)
        )
        return p[:, 0]
    if rank == 2:
        # One strided slice per kernel offset, stacked: the patches of
        # tf.image.extract_patches in about half its time on CPU (3x3
        # kernels, batch 128-512; benchmarks/results/stepcost_small.md).
        out = [
            (_size(x, axis) - (k - 1) * d - 1) // s + 1
            for axis, k, s, d in zip((1, 2), kernel_size, strides, dilation)
        ]
        (kh, kw), (sh, sw), (dh, dw) = kernel_size, strides, dilation
        slices = [
            x[
                :,
                i * dh : i * dh + (out[0] - 1) * sh + 1 : sh,
                j * dw : j * dw + (out[1] - 1) * sw + 1 : sw,
            ]
            for i in range(kh)
            for j in range(kw)
        ]
        channels = x.shape[-1]
        width = -1 if channels is None else kh * kw * channels
        return tf.reshape(tf.stack(slices, axis=3), [_size(x, 0), *out, width])
    if rank != 3:
        raise ValueError(f"Convolutions of rank {rank} are not supported (1, 2 or 3).")
    # Depth by strided slices of the per-slice 2-D patches: tf.extract_volume_patches
    # has no dilation.
    n, depth = _size(x, 0), _size(x, 1)
    rest = [_size(x, i) for i in (2, 3, 4)]
    planes = extract_patches(
        tf.reshape(x, [n * depth] + rest), kernel_size[1:], strides[1:], dilation[1:]
    )
    planes = tf.reshape(planes, [n, depth] + [_size(planes, i) for i in (1, 2, 3)])
    kd, sd, dd = kernel_size[0], strides[0], dilation[0]
    out = (depth - (kd - 1) * dd - 1) // sd + 1
    slices = [planes[:, j * dd : j * dd + (out - 1) * sd + 1 : sd] for j in range(kd)]
    p = tf.stack(slices, axis=4)
    return tf.reshape(p, [n] + [_size(p, i) for i in (1, 2, 3)] + [kd * planes.shape[-1]])


def flatten_locations(x):
    """``(n, *spatial, c) -> (n, prod(spatial), c)``, keeping the number of
    locations static when it is known (with a dynamic batch a ``-1`` would
    lose it, and the methods choose their algorithm from the static number of
    locations)."""
    spatial = x.shape[1:-1]
    locations = -1 if any(d is None for d in spatial) else math.prod(spatial)
    return tf.reshape(x, (tf.shape(x)[0], locations, x.shape[-1]))


def channels_last(x, channels_first):
    if not channels_first:
        return x
    rank = len(x.shape)
    return tf.transpose(x, (0, *range(2, rank), 1))


class ConvolutionBlock(LayerBlock):
    """Shared by the convolution blocks: data format, groups, and the
    mapping of grouped kernels to ``V``.

    A grouped kernel is viewed as ``(*k, cin_per_group, groups,
    out_per_group)`` (the layout of both grouped Conv and depthwise kernels,
    whose output channel is ``group * out_per_group + j``)."""

    #: A subclass that overrides one of these changes the block's math.
    forward_methods = ("call", "convolution_op")
    #: KFC (Grosse & Martens 2016) is expand over the spatial locations;
    #: ``weight_sharing="reduce"`` stays available per layer.
    auto_weight_sharing = False

    def __init__(self, layer):
        super().__init__(layer)
        self.channels_first = layer.data_format == "channels_first"
        self.rank = len(layer.kernel_size)

    def _set_groups(self, groups, in_per_group, out_channels):
        """Per-group dims; ``groups == 1`` keeps the plain ``(n, T, d)`` form."""
        self.groups = groups
        self.in_per_group = in_per_group
        self.g_dim = out_channels // groups
        self.a_dim = math.prod(self.kernel_shape[: self.rank]) * in_per_group + int(self.has_bias)

    @property
    def num_parameters(self):
        return self.groups * self.a_dim * self.g_dim

    def _grouped_patches(self, patches):
        """``(n, T, prod(k) * c)`` -> ``(n, T, groups, prod(k) * c/groups)``."""
        if self.groups == 1:
            return patches
        k = math.prod(self.layer.kernel_size)
        n, t = tf.shape(patches)[0], patches.shape[1]
        t = -1 if t is None else t
        p = tf.reshape(patches, (n, t, k, self.groups, self.in_per_group))
        p = tf.transpose(p, (0, 1, 3, 2, 4))
        return tf.reshape(p, (n, t, self.groups, k * self.in_per_group))

    def _output_locations(self, ds):
        g = flatten_locations(channels_last(ds, self.channels_first))
        if self.groups == 1:
            return g
        n, t = tf.shape(g)[0], g.shape[1]
        return tf.reshape(g, (n, -1 if t is None else t, self.groups, self.g_dim))

    def to_matrix(self, grads):
        if self.groups == 1:
            return super().to_matrix(grads)
        rows = self.a_dim - int(self.has_bias)
        kernel = tf.reshape(tf.cast(grads[0], tf.float32), (rows, self.groups, self.g_dim))
        v = tf.transpose(kernel, (1, 0, 2))
        if self.has_bias:
            bias = tf.reshape(tf.cast(grads[1], tf.float32), (self.groups, 1, self.g_dim))
            v = tf.concat([v, bias], axis=1)
        return v

    def from_matrix(self, v):
        if self.groups == 1:
            return super().from_matrix(v)
        rows = self.a_dim - int(self.has_bias)
        kernel = tf.reshape(tf.transpose(v[:, :rows], (1, 0, 2)), self.kernel_shape)
        if self.has_bias:
            return [kernel, tf.reshape(v[:, rows], (-1,))]
        return [kernel]

    def _locations(self, inputs):
        x = channels_last(inputs, self.channels_first)
        layer = self.layer
        patches = extract_patches(
            x, layer.kernel_size, layer.strides, layer.dilation_rate, layer.padding
        )
        return self._grouped_patches(flatten_locations(patches))


def common_unsupported_reason(layer):
    if not layer.built:
        return "layer is not built"
    if getattr(layer, "quantization_mode", None):
        return f"quantized {type(layer).__name__}"
    if getattr(layer, "lora_enabled", False):
        return f"LoRA-enabled {type(layer).__name__}"
    return None


@register_block
class ConvBlock(ConvolutionBlock):
    """Conv1D, Conv2D, Conv3D, grouped or not (``groups`` groups of
    ``c_in/groups`` input and ``filters/groups`` output channels)."""

    layer_types = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)

    @staticmethod
    def unsupported_reason(layer):
        return common_unsupported_reason(layer)

    def __init__(self, layer):
        super().__init__(layer)
        self._set_groups(layer.groups, self.kernel_shape[-2], self.kernel_shape[-1])


@register_block
class DepthwiseConvBlock(ConvolutionBlock):
    """DepthwiseConv1D/2D: input channel c is its own group, with
    ``depth_multiplier`` output channels ``c * m + j``."""

    layer_types = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)

    @staticmethod
    def unsupported_reason(layer):
        return common_unsupported_reason(layer)

    def __init__(self, layer):
        super().__init__(layer)
        channels, multiplier = self.kernel_shape[-2:]
        self._set_groups(channels, 1, channels * multiplier)
