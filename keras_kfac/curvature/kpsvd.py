"""KPSVD: the best single Kronecker pair, ``min ||F - kron(A, G)||_F`` (Koroko
et al. 2022, arXiv 2201.10285, sec. 3.1): ``(vec A, vec G)`` is the top
singular pair of the rearranged block R(F) (Van Loan & Pitsianis 1993),
found by power iteration without forming F (:class:`factors.RearrangedFisher`),
warm-started from the last factors, with a tolerance and an iteration cap.
The running average is taken inside the operator: the pair is the best one
for ``decay * kron(A_old, G_old) + (1 - decay) F_batch``. Damping and
inversion are K-FAC's (both damping modes).

Options: ``power_iters`` (cap, default 20), ``power_tol`` (relative change of
the singular value, default 1e-4).
"""

import tensorflow as tf

from keras_kfac.curvature import factors as F
from keras_kfac.curvature.kfac import KFAC


class KPSVD(KFAC):
    name = "kpsvd"
    supports_groups = False

    def __init__(self, block, damping_mode="factored", power_iters=20, power_tol=1e-4, **options):
        super().__init__(block, damping_mode, **options)
        self.power_iters = int(power_iters)
        self.power_tol = float(power_tol)

    def update_statistics(self, batch, decay):
        op = F.RearrangedFisher(batch.a(), batch.g(), 1.0 - decay, [(decay, self.a, self.g)])
        sigma, y, x = F.top_singular_pair(
            op, F.start_matrix(self.g, self.block.g_dim), self.power_tol, self.power_iters
        )
        a, g = F.kronecker_pair(sigma, y, x)
        ok = F.all_finite(a) & F.all_finite(g)
        self.a.assign(tf.where(ok, a, self.a))
        self.g.assign(tf.where(ok, g, self.g))
        return ok
