"""Layer blocks: what statistics each supported layer type contributes.

A block turns what the instrumentation recorded for one layer (its inputs and
the gradient of the loss with respect to its pre-activation output) into the
two per-location quantities every curvature method works with:

* ``a``: homogeneous inputs ``a_bar = [a; 1]`` (patches for convolutions),
  shape ``(n, T, a_dim)``;
* ``g``: per-example output gradients ``d l_i / d s``, shape ``(n, T, g_dim)``,

and maps the layer's variable gradients to and from the matrix ``V`` of shape
``(a_dim, g_dim)`` on which preconditioners act (``V = [dW; db]``, row-major
kernel order, so ``vec_row(V)`` is the parameter vector of the conventions),
and gives per-example parameter gradients from ``(a, g)``
(``per_example_gradients``, ``(n, P)`` in that order; the sum over locations
of ``a g^T`` unless the block overrides it).
"""

from keras_kfac.layers import normalization
from keras_kfac.layers.base import (
    LayerBlock,
    block_class_for_layer,
    block_for_layer,
    blocks_for_layer,
    forward_mode_blockers,
    register_block,
    unsupported_reason,
)
from keras_kfac.layers.conv import ConvBlock, DepthwiseConvBlock
from keras_kfac.layers.conv_transpose import ConvTransposeBlock
from keras_kfac.layers.dense import DenseBlock
from keras_kfac.layers.einsum_dense import EinsumDenseBlock
from keras_kfac.layers.embedding import EmbeddingBlock
from keras_kfac.layers.normalization import (
    BatchNormalizationBlock,
    GroupNormalizationBlock,
    LayerNormalizationBlock,
    ScaleAndShiftBlock,
)
from keras_kfac.layers.recurrent import GRUBiasBlock, RNNKernelBlock, RNNRecurrentKernelBlock
from keras_kfac.layers.separable import SeparableConvBlock

__all__ = [
    "LayerBlock",
    "DenseBlock",
    "ConvBlock",
    "DepthwiseConvBlock",
    "ConvTransposeBlock",
    "SeparableConvBlock",
    "ScaleAndShiftBlock",
    "LayerNormalizationBlock",
    "BatchNormalizationBlock",
    "GroupNormalizationBlock",
    "RNNKernelBlock",
    "RNNRecurrentKernelBlock",
    "GRUBiasBlock",
    "EinsumDenseBlock",
    "EmbeddingBlock",
    "block_class_for_layer",
    "block_for_layer",
    "blocks_for_layer",
    "forward_mode_blockers",
    "register_block",
    "unsupported_reason",
]
if hasattr(normalization, "RMSNormalizationBlock"):
    RMSNormalizationBlock = normalization.RMSNormalizationBlock
    __all__.append("RMSNormalizationBlock")
