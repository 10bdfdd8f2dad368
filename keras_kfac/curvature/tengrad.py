"""TENGraD: the exact damped natural gradient of the block for the current
batch (Soori et al. 2021, arXiv 2106.03947), ``(F + lambda I)^-1 vec(V)`` with
``F = (1/n) U^T U`` the batch's per-example-gradient Fisher (empirical, or
sampled with ``fisher="sampled"``), by the Woodbury identity (eq. 9):

    (F + lambda I)^-1 v = (1/lambda) (v - U^T (n lambda I + U U^T)^-1 U v).

U is never formed for Dense: ``U U^T = (A_bar A_bar^T) o (G G^T)`` (eq. 11),
``U v`` = row sums of ``G o (A_bar V)``, ``U^T c = A_bar^T diag(c) G``; cost
``O(n^2 (d_in + d_out) + n^3 + n d_in d_out)`` per step, memory ``O(n^2)``.
Conv2D: ``<U_i, U_j> = sum_{t,s} (a_it . a_js)(g_it . g_js)``, computed from
location Grams in ``O(n^2 T^2 (a_dim + g_dim))`` or, when cheaper, from the
formed per-example gradients in ``O(n^2 a_dim g_dim)``
(:func:`factors.gradient_gram`).

No state: statistics, ``stats_decay``, ``stats_every``, ``inverse_every`` and
``damping_mode`` do not apply; there is no stored matrix (the block is the
current batch's exact F; see :func:`keras_kfac.exact.fisher_block`).
"""

from keras_kfac.curvature import factors as F
from keras_kfac.curvature.base import CurrentBatchCurvature


class TENGraD(CurrentBatchCurvature):
    name = "tengrad"
    supports_groups = True
    no_matrix_reason = (
        "it solves exactly with the current batch's per-example gradients. Use "
        "keras_kfac.exact.fisher_block for that batch's matrix."
    )

    def precondition(self, v, damping, batch=None):
        return F.woodbury_solve(batch.a(), batch.g(), v, damping)
