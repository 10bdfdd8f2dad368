"""Deflation: the top two Kronecker pairs of the block, ``F ~ kron(A1,G1) +
kron(A2,G2)`` with ``(vec A_k, vec G_k)`` the top two singular pairs of the
rearranged block R(F) (Van Loan & Pitsianis 1993; Koroko et al. 2022,
arXiv 2201.10285, sec. 3.2). The first pair by power iteration on R(F) as in
"kpsvd", the second by power iteration on the deflated operator
``R(F) - sigma1 vec(Y1) vec(X1)^T``; both warm-started from the last pairs.
Damping and preconditioning: :mod:`keras_kfac.curvature.kronecker_sum`.

Options: ``power_iters`` (cap per pair, default 20), ``power_tol``
(relative change of the singular value, default 1e-4).
"""

from keras_kfac.curvature import factors as F
from keras_kfac.curvature.kronecker_sum import TwoKroneckerTerms


class Deflation(TwoKroneckerTerms):
    name = "deflation"

    def fit(self, batch, decay):
        op = F.RearrangedFisher(batch.a(), batch.g(), 1.0 - decay, self.previous_terms(decay))
        (_, g1), (_, g2) = self.pairs
        s1, y1, x1 = F.top_singular_pair(
            op, F.start_matrix(g1, self.block.g_dim), self.power_tol, self.power_iters
        )
        deflated = op.with_terms([(-s1, y1, x1)])
        s2, y2, x2 = F.top_singular_pair(
            deflated, F.start_matrix(g2, self.block.g_dim, seed=1), self.power_tol, self.power_iters
        )
        return [F.kronecker_pair(s1, y1, x1), F.kronecker_pair(s2, y2, x2)]
