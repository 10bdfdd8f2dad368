"""Exact per-feature Fisher blocks of scale-and-shift layers (the
normalization blocks of :mod:`keras_kfac.layers.normalization`).

For feature ``j`` with per-example gradient ``u_ij = sum_t a_itj g_itj``
(``a = [xhat; 1]``, so ``u_ij = (sum_t g xhat, sum_t g)``), the block is
``F_j = (1/n) sum_i u_ij u_ij^T``: ``k x k`` with ``k`` = 2 (scale and shift)
or 1, running-averaged. The approximation is the block diagonal over
features of the layer's exact Fisher block (the idea of kfac-jax's
scale-and-shift blocks, between their diagonal and full variants: couplings
between features are dropped, the scale-shift coupling of a feature is kept).

``P(V)_j = (F_j + lambda I)^-1 V_j``, solved in closed form at every step
from the current statistics (O(F), as much as applying a stored inverse
would cost): nothing to refresh, and ``damping_mode`` does not apply.

Not user-selectable: the normalization blocks declare it as their
``fixed_curvature``, and it has no meaning for other blocks.
"""

import tensorflow as tf

from keras_kfac.curvature import factors as F
from keras_kfac.curvature.base import Curvature


class ScaleAndShift(Curvature):
    name = "scale_and_shift"

    def __init__(self, block, damping_mode="factored", **options):
        if not hasattr(block, "has_scale"):
            raise ValueError(
                f"curvature={self.name!r} is the fixed curvature of normalization layers "
                f"and does not apply to {type(block.layer).__name__} layer {block.name!r}; "
                "choose one of keras_kfac.curvature.available()."
            )
        super().__init__(block, damping_mode=damping_mode, **options)

    def build(self, add_variable):
        k = self.block.a_dim
        self.s = add_variable("scale_shift", (self.block.g_dim, k, k))

    def update_statistics(self, batch, decay):
        k, f = self.block.a_dim, self.block.g_dim
        u = tf.reshape(batch.per_example_gradients(), (-1, k, f))
        n = tf.cast(tf.shape(u)[0], tf.float32)
        return F.running_average(self.s, tf.einsum("nkf,nlf->fkl", u, u) / n, decay)

    def refresh(self, damping):
        pass

    def refresh_state(self):
        return []

    def precondition(self, v, damping, batch=None):
        s = self.s
        if self.block.a_dim == 1:
            return v / (s[:, 0, 0] + damping)
        a, b, c = s[:, 0, 0], s[:, 0, 1], s[:, 1, 1]
        p, q = v[0], v[1]
        # det(F_j + lambda I) = (ac - b^2) + lambda (a + c) + lambda^2, with
        # ac - b^2 >= 0 exactly (Cauchy-Schwarz) but not after float32
        # round-off when u_j's two entries are nearly collinear.
        det = tf.maximum(a * c - b * b, 0.0) + damping * (a + c) + damping * damping
        return tf.stack([((c + damping) * p - b * q) / det, ((a + damping) * q - b * p) / det])

    def matrix(self):
        """Dense ``(k F, k F)`` in parameter order ``concat(gamma, beta)``."""
        k, f = self.block.a_dim, self.block.g_dim
        dense = tf.einsum("fkl,fg->kflg", self.s, tf.eye(f))
        return tf.reshape(dense, (k * f, k * f))

    def factors(self):
        return {"scale_shift": self.s}
