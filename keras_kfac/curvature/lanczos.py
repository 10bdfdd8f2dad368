"""Lanczos: the same two-term approximation as "deflation" (the top two
singular pairs of the rearranged block R(F); Koroko et al. 2022, arXiv
2201.10285, sec. 3.3), computed together by Golub-Kahan-Lanczos
bidiagonalization of R(F) (Golub & Kahan 1965), matrix-free, with full
reorthogonalization and explicit restarts warm-started from the last pairs
(:func:`factors.golub_kahan_lanczos`). Damping and preconditioning:
:mod:`keras_kfac.curvature.kronecker_sum`.

Options: ``lanczos_steps`` (Krylov dimension per restart, default 8, capped
by the dimension of the symmetric matrices), ``lanczos_restarts`` (default
5), ``lanczos_tol`` (relative Ritz residual, default 1e-3).
"""

from keras_kfac.curvature import factors as F
from keras_kfac.curvature.kronecker_sum import TwoKroneckerTerms


class Lanczos(TwoKroneckerTerms):
    name = "lanczos"

    def __init__(
        self,
        block,
        damping_mode="factored",
        lanczos_steps=8,
        lanczos_restarts=5,
        lanczos_tol=1e-3,
        **options,
    ):
        super().__init__(block, damping_mode, **options)
        space = min(F.symmetric_dim(block.a_dim), F.symmetric_dim(block.g_dim))
        self.steps = max(2, min(int(lanczos_steps), space))
        self.restarts = int(lanczos_restarts)
        self.tol = float(lanczos_tol)

    def fit(self, batch, decay):
        op = F.RearrangedFisher(batch.a(), batch.g(), 1.0 - decay, self.previous_terms(decay))
        (_, g1), (_, g2) = self.pairs
        start = F.start_matrix(g1 + g2, self.block.g_dim)
        sigmas, ys, xs = F.golub_kahan_lanczos(op, start, self.steps, 2, self.tol, self.restarts)
        return [F.kronecker_pair(s, y, x) for s, y, x in zip(sigmas, ys, xs)]
