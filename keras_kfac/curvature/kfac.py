"""K-FAC / KFC: ``F ~ kron(A, G)`` (Martens & Grosse 2015, eq. 1 and sec. 3;
Grosse & Martens 2016 for convolutions).

Damping (sec. 6.3):

* ``"factored"``: ``P(V) = (A + pi*gamma I)^-1 V (G + gamma/pi I)^-1``; the two
  damped inverses are formed by Cholesky at each refresh (cheap, and fast
  under XLA where ``eigh`` is slow on CPU);
* ``"eigen"``: ``P(V) = Qa [(Qa^T V Qg) / (sa sg^T + lambda)] Qg^T``, the exact
  ``(kron(A, G) + lambda I)^-1``; eigenbases at each refresh, damping applied
  at every step.

Per-layer damping multiplier ``m`` (a saved variable, 1 at the start): the
layer uses damping ``lambda * m``. A refresh whose inverses (or eigenvalues)
are not finite, e.g. the Cholesky factorization of a near-singular factor
whose damping is below float32 resolution, keeps the previous inverses (both
of them, so they stay a pair) and multiplies ``m`` by ``DAMPING_RAISE``; the
next refresh retries with the larger damping. ``m`` is never lowered.
"""

import tensorflow as tf

from keras_kfac.curvature import factors as F
from keras_kfac.curvature.base import Curvature, factor_a, factor_g, group_shape, grouped_names

#: Factor by which a failed refresh raises its layer's damping multiplier.
DAMPING_RAISE = 10.0


class KroneckerFactors(Curvature):
    """Running averages of ``A`` and ``G``; shared by methods built on them."""

    supports_groups = True

    def build(self, add_variable):
        da, dg, gs = self.block.a_dim, self.block.g_dim, group_shape(self.block)
        self.a = add_variable("A", gs + (da, da))
        self.g = add_variable("G", gs + (dg, dg))

    def update_statistics(self, batch, decay):
        F.running_average(self.a, factor_a(batch.a()), decay)
        F.running_average(self.g, factor_g(batch.g()), decay)

    def matrix(self):
        return F.kron(self.a, self.g)

    def factors(self):
        return grouped_names(self.block, {"A": self.a, "G": self.g})


class KFAC(KroneckerFactors):
    name = "kfac"

    def build(self, add_variable):
        super().build(add_variable)
        da, dg, gs = self.block.a_dim, self.block.g_dim, group_shape(self.block)
        if self.damping_mode == "factored":
            self.a_inverse = add_variable("A_inverse", gs + (da, da))
            self.g_inverse = add_variable("G_inverse", gs + (dg, dg))
        else:
            self.a_evecs = add_variable("A_eigenvectors", gs + (da, da))
            self.a_evals = add_variable("A_eigenvalues", gs + (da,))
            self.g_evecs = add_variable("G_eigenvectors", gs + (dg, dg))
            self.g_evals = add_variable("G_eigenvalues", gs + (dg,))
        self.damping_multiplier = add_variable("damping_multiplier", (), initializer="ones")

    def refresh(self, damping):
        multiplier = self.damping_multiplier
        if self.damping_mode == "factored":
            damping_a, damping_g = F.factored_damping(self.a, self.g, damping * multiplier)
            a_inverse = F.damped_inverse(self.a, damping_a)
            g_inverse = F.damped_inverse(self.g, damping_g)
            ok = F.all_finite(a_inverse) & F.all_finite(g_inverse)
            self.a_inverse.assign(tf.where(ok, a_inverse, self.a_inverse))
            self.g_inverse.assign(tf.where(ok, g_inverse, self.g_inverse))
        else:
            ok = F.all_finite(self.a) & F.all_finite(self.g)
            updates = []
            for factor, evals, evecs in (
                (self.a, self.a_evals, self.a_evecs),
                (self.g, self.g_evals, self.g_evecs),
            ):
                values, vectors = F.safe_eigh(factor)
                updates.append((evals, values, evecs, vectors))
            ok = ok & tf.reduce_all([F.all_finite(t) for u in updates for t in (u[1], u[3])])
            for evals, values, evecs, vectors in updates:
                evals.assign(tf.where(ok, values, evals))
                evecs.assign(tf.where(ok, vectors, evecs))
        multiplier.assign(tf.where(ok, multiplier, multiplier * DAMPING_RAISE))
        return ok

    def refresh_state(self):
        if self.damping_mode == "factored":
            state = [self.a_inverse, self.g_inverse]
        else:
            state = [self.a_evecs, self.a_evals, self.g_evecs, self.g_evals]
        return state + [self.damping_multiplier]

    def precondition(self, v, damping, batch=None):
        if self.damping_mode == "factored":
            return self.a_inverse @ v @ self.g_inverse
        scale = self.a_evals[..., :, None] * self.g_evals[..., None, :] + damping * self.damping_multiplier
        return F.eigenbasis_solve(v, self.a_evecs, self.g_evecs, scale)
