"""KFAC-corrected: K-FAC's ``kron(A, G)`` plus the best Kronecker pair of the
residual, ``F ~ kron(A, G) + kron(A2, G2)`` with ``(vec A2, vec G2)`` the top
singular pair of ``R(F) - vec(A) vec(G)^T`` (Koroko et al. 2022, arXiv
2201.10285, sec. 3.4; R is Van Loan & Pitsianis' rearrangement). A, G are
K-FAC's running averages (Martens & Grosse 2015, eq. 1; KFC scaling for
Conv2D); the residual pair is found by block power iteration to convergence
(:func:`factors.top_singular_triples`), warm-started from the last one.
Damping and preconditioning: :mod:`keras_kfac.curvature.kronecker_sum`.

Options (:mod:`keras_kfac.curvature.block_power`):
``power_tol``, ``power_iters``, ``power_oversample``.
"""

from keras_kfac.curvature import factors as F
from keras_kfac.curvature.base import factor_a, factor_g
from keras_kfac.curvature.block_power import BlockPower
from keras_kfac.curvature.kronecker_sum import TwoKroneckerTerms


class KFACCorrected(BlockPower, TwoKroneckerTerms):
    name = "kfac_corrected"
    rank = 1

    def fit(self, batch, decay):
        a, g = batch.a(), batch.g()
        (a1, g1), (_, g2) = self.pairs
        a_new = decay * a1 + (1.0 - decay) * factor_a(a)
        g_new = decay * g1 + (1.0 - decay) * factor_g(g)
        residual = F.RearrangedFisher(
            a, g, 1.0 - decay, self.previous_terms(decay) + [(-1.0, a_new, g_new)]
        )
        s, y, x = self.top_triples(residual, [g2])
        return [(a_new, g_new), F.kronecker_pair(s[0], y[0], x[0])]
