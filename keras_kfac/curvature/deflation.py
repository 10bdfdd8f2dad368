"""Deflation: the top two Kronecker pairs of the block, ``F ~ kron(A1,G1) +
kron(A2,G2)`` with ``(vec A_k, vec G_k)`` the top two singular pairs of the
rearranged block R(F) (Van Loan & Pitsianis 1993; Koroko et al. 2022,
arXiv 2201.10285, sec. 3.2). Koroko et al. find the second pair by power
iteration on the deflated ``R(F) - sigma1 vec(Y1) vec(X1)^T``; here the
power iteration is in block form (subspace iteration, deflating by
orthogonalization at every step, :func:`factors.top_singular_triples`), so a
second singular value close to the third converges as fast as a well
separated one, and it stops when the pairs have converged. Warm-started from
the last pairs. Damping and preconditioning:
:mod:`keras_kfac.curvature.kronecker_sum`.

Options (:mod:`keras_kfac.curvature.block_power`):
``power_tol``, ``power_iters``, ``power_oversample``.
"""

from keras_kfac.curvature import factors as F
from keras_kfac.curvature.block_power import BlockPower
from keras_kfac.curvature.kronecker_sum import TwoKroneckerTerms


class Deflation(BlockPower, TwoKroneckerTerms):
    name = "deflation"

    def fit(self, batch, decay):
        op = F.RearrangedFisher(batch.a(), batch.g(), 1.0 - decay, self.previous_terms(decay))
        s, y, x = self.top_triples(op, [g for _, g in self.pairs])
        return [F.kronecker_pair(s[k], y[k], x[k]) for k in range(2)]
