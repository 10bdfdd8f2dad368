"""EKFAC: eigenvalue-corrected K-FAC (George et al. 2018, arXiv 1806.03884).

``F ~ Q diag(s) Q^T`` with ``Q = kron(Qa, Qg)`` the Kronecker eigenbasis of
K-FAC's A and G (refreshed every ``inverse_every`` steps) and ``s = E[(Q^T
u)^2]`` (eq. 10), re-estimated at every statistics step from the per-example
gradients projected on the basis: Dense ``(1/n) ((A_bar Qa) o (A_bar Qa))^T
((G Qg) o (G Qg))``, never forming u_i; conv from the per-example gradients
summed over locations (:func:`factors.gradient_second_moment`). s is a
running average. For a fixed Q, s minimizes ``||F - Q diag(s) Q^T||_F``
(George et al. 2018, sec. 3.2), so EKFAC is never farther from F than K-FAC,
whose scaling ``sa sg^T`` is one point of that family.

Preconditioner: ``P(V) = Qa [(Qa^T V Qg) / (s + lambda)] Qg^T`` (eq. 11),
exactly ``(F_ekfac + lambda I)^-1``; ``damping_mode`` does not apply.

Basis changes: the optimizer updates statistics before it refreshes, so at a
refresh s was estimated in the old basis. It is carried to the new basis as
the diagonal of the old approximation there, ``s <- (Ra o Ra) s (Rg o Rg)^T``
with ``Ra = Qa_new^T Qa_old`` (the Frobenius-best diagonal in the new basis);
at the first refresh, when there is no old basis, s starts at K-FAC's
``sa sg^T``. The next statistics step re-estimates s in the new basis.
"""

import tensorflow as tf

from keras_kfac.curvature import factors as F
from keras_kfac.curvature.base import group_shape, grouped_names
from keras_kfac.curvature.kfac import KroneckerFactors


class EKFAC(KroneckerFactors):
    name = "ekfac"

    def build(self, add_variable):
        super().build(add_variable)
        da, dg, gs = self.block.a_dim, self.block.g_dim, group_shape(self.block)
        self.qa = add_variable("A_eigenvectors", gs + (da, da))
        self.qg = add_variable("G_eigenvectors", gs + (dg, dg))
        self.s = add_variable("scaling", gs + (da, dg))
        self.has_basis = add_variable("has_basis", ())

    def update_statistics(self, batch, decay):
        a, g = batch.a(), batch.g()
        super().update_statistics(batch, decay)
        s = F.gradient_second_moment(F.project(a, self.qa), F.project(g, self.qg))
        return F.running_average(self.s, s, decay)

    def refresh(self, damping):
        ok = F.all_finite(self.a) & F.all_finite(self.g)
        sa, qa = F.safe_eigh(self.a)
        sg, qg = F.safe_eigh(self.g)
        ra = tf.square(F.transpose(qa) @ self.qa)
        rg = tf.square(F.transpose(qg) @ self.qg)
        carried = ra @ self.s @ F.transpose(rg)
        s = tf.where(self.has_basis > 0.0, carried, sa[..., :, None] * sg[..., None, :])
        for var, value in ((self.qa, qa), (self.qg, qg), (self.s, s)):
            var.assign(tf.where(ok, value, var))
        self.has_basis.assign(tf.where(ok, 1.0, self.has_basis))
        return ok

    def refresh_state(self):
        return [self.qa, self.qg, self.s, self.has_basis]

    def precondition(self, v, damping, batch=None):
        return F.eigenbasis_solve(v, self.qa, self.qg, self.s + damping)

    def matrix(self):
        q = F.kron(self.qa, self.qg)
        return q @ tf.linalg.diag(tf.reshape(self.s, (-1,))) @ tf.transpose(q)

    def factors(self):
        return grouped_names(self.block, {"A": self.a, "G": self.g, "scaling": self.s})
