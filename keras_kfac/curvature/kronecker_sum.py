"""Two Kronecker terms, ``F ~ kron(A1, G1) + kron(A2, G2)``: the state, the
damping and the preconditioner shared by "deflation", "lanczos" and
"kfac_corrected" (Koroko et al. 2022, arXiv 2201.10285). Subclasses only say
how the two pairs are fitted (:meth:`TwoKroneckerTerms.fit`).

Damping is added to the first term, split as in K-FAC's factored damping
(Martens & Grosse 2015, sec. 6.3): ``A1' = A1 + pi*gamma I``, ``G1' = G1 +
gamma/pi I``. ``(kron(A1',G1') + kron(A2,G2))^-1`` is applied through the
simultaneous diagonalization :func:`factors.two_term_basis`:
``P(V) = K1 [(K1^T V K2) / (1 + s1 s2^T)] K2^T``. The second term is in
general indefinite (for the SVD-based pairs it is orthogonal to the PSD first
pair), so the denominator is clipped from below at the damping's own share
(:func:`factors.two_term_scale`): P is symmetric positive definite, and equal
to the exact inverse wherever the clip does not bind.

``damping_mode="eigen"`` (exact ``+ lambda I``) has no simultaneous
diagonalization for two terms and is rejected.
"""

import tensorflow as tf

from keras_kfac.curvature import factors as F
from keras_kfac.curvature.base import Curvature


class TwoKroneckerTerms(Curvature):
    uses_current_batch = False

    def __init__(self, block, damping_mode="factored", **options):
        if damping_mode != "factored":
            raise ValueError(
                f"curvature={self.name!r} supports damping_mode='factored' only: the "
                "exact damping (kron(A1,G1) + kron(A2,G2) + lambda I)^-1 has no "
                "Kronecker-factored inverse."
            )
        super().__init__(block, damping_mode, **options)

    def build(self, add_variable):
        da, dg = self.block.a_dim, self.block.g_dim
        self.pairs = [
            (add_variable(f"A{k}", (da, da)), add_variable(f"G{k}", (dg, dg))) for k in (1, 2)
        ]
        self.k1 = add_variable("K1", (da, da))
        self.k2 = add_variable("K2", (dg, dg))
        self.scale = add_variable("scale", (da, dg), initializer="ones")

    def previous_terms(self, decay):
        """The running average's old part, ``decay * (previous estimate)``,
        as low-rank terms of the rearranged operator."""
        return [(decay, a, g) for a, g in self.pairs]

    def fit(self, batch, decay):
        """The two pairs ``[(A1, G1), (A2, G2)]`` for this statistics step."""
        raise NotImplementedError

    def update_statistics(self, batch, decay):
        new = self.fit(batch, decay)
        ok = tf.reduce_all([F.all_finite(m) for pair in new for m in pair])
        for (a, g), (a_new, g_new) in zip(self.pairs, new):
            a.assign(tf.where(ok, a_new, a))
            g.assign(tf.where(ok, g_new, g))
        return ok

    def refresh(self, damping):
        (a1, g1), (a2, g2) = self.pairs
        damping_a, damping_g = F.factored_damping(a1, g1, damping)
        k1, s1, k2, s2 = F.two_term_basis(a1, g1, a2, g2, damping_a, damping_g)
        scale = F.two_term_scale(k1, s1, k2, s2, damping)
        ok = F.all_finite(k1) & F.all_finite(k2) & F.all_finite(scale)
        for var, value in ((self.k1, k1), (self.k2, k2), (self.scale, scale)):
            var.assign(tf.where(ok, value, var))
        return ok

    def refresh_state(self):
        return [self.k1, self.k2, self.scale]

    def precondition(self, v, damping, batch=None):
        return F.eigenbasis_solve(v, self.k1, self.k2, self.scale)

    def matrix(self):
        return tf.add_n([F.kron(a, g) for a, g in self.pairs])

    def preconditioner_inverse(self):
        """The dense matrix P inverts: ``kron(K1,K2)^-T diag(scale)
        kron(K1,K2)^-1`` (equals the damped two-term matrix where the clip
        does not bind). For tests and diagnostics."""
        k = F.kron(self.k1, self.k2)
        k_inv = tf.linalg.inv(k)
        return tf.transpose(k_inv) @ tf.linalg.diag(tf.reshape(self.scale, (-1,))) @ k_inv

    def factors(self):
        (a1, g1), (a2, g2) = self.pairs
        return {"A1": a1, "G1": g1, "A2": a2, "G2": g2}
