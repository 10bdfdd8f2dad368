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

A block may keep ``A`` and/or ``G`` as its diagonal (``block.a_is_diagonal``
/ ``g_is_diagonal``: an embedding's one-hot inputs, or a factor above the
size guard ``max_factor_dim``): that factor is stored as a ``(d,)`` vector,
its damped inverse is elementwise and its eigenbasis is the identity, so its
memory is ``O(d)``. An embedding's row-sparse gradient stays sparse.
"""

import tensorflow as tf

from keras_kfac.curvature import factors as F
from keras_kfac.curvature.base import Curvature, group_shape, grouped_names

#: Factor by which a failed refresh raises its layer's damping multiplier.
DAMPING_RAISE = 10.0


class KroneckerFactors(Curvature):
    """Running averages of ``A`` and ``G``; shared by methods built on them."""

    supports_groups = True

    def build(self, add_variable):
        self.a = self._add_factor(add_variable, "A", self.block.a_dim, self.block.a_is_diagonal)
        self.g = self._add_factor(add_variable, "G", self.block.g_dim, self.block.g_is_diagonal)

    def _add_factor(self, add_variable, name, dim, diagonal):
        # Grouped blocks keep one factor per group (never diagonal: the size
        # guard applies to ungrouped blocks).
        if diagonal:
            return add_variable(f"{name}_diagonal", (dim,))
        return add_variable(name, group_shape(self.block) + (dim, dim))

    def update_statistics(self, batch, decay):
        F.running_average(self.a, batch.factor_a(), decay)
        F.running_average(self.g, batch.factor_g(), decay)

    def matrix(self):
        return F.kron(F.as_dense(self.a), F.as_dense(self.g))

    def factors(self):
        a = "A_diagonal" if self.block.a_is_diagonal else "A"
        g = "G_diagonal" if self.block.g_is_diagonal else "G"
        return grouped_names(self.block, {a: self.a, g: self.g})


class KFAC(KroneckerFactors):
    name = "kfac"
    supports_diagonal_factors = True

    def build(self, add_variable):
        super().build(add_variable)
        block = self.block
        da, dg, gs = block.a_dim, block.g_dim, group_shape(block)
        if self.damping_mode == "factored":
            self.a_inverse = self._add_factor(add_variable, "A_inverse", da, block.a_is_diagonal)
            self.g_inverse = self._add_factor(add_variable, "G_inverse", dg, block.g_is_diagonal)
        else:
            # A diagonal factor is its own eigenvalues (identity eigenbasis).
            self.a_evecs = (
                None if block.a_is_diagonal else add_variable("A_eigenvectors", gs + (da, da))
            )
            self.a_evals = add_variable("A_eigenvalues", gs + (da,))
            self.g_evecs = (
                None if block.g_is_diagonal else add_variable("G_eigenvectors", gs + (dg, dg))
            )
            self.g_evals = add_variable("G_eigenvalues", gs + (dg,))
        self.multiplier = add_variable("damping_multiplier", (), initializer="ones")

    def refresh(self, damping):
        multiplier = self.multiplier
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
                if evecs is None:
                    updates.append((evals, tf.maximum(factor, 0.0), None, None))
                else:
                    values, vectors = F.safe_eigh(factor)
                    updates.append((evals, values, evecs, vectors))
            ok = ok & tf.reduce_all(
                [F.all_finite(t) for u in updates for t in (u[1], u[3]) if t is not None]
            )
            for evals, values, evecs, vectors in updates:
                evals.assign(tf.where(ok, values, evals))
                if evecs is not None:
                    evecs.assign(tf.where(ok, vectors, evecs))
        multiplier.assign(tf.where(ok, multiplier, multiplier * DAMPING_RAISE))
        return ok

    def damping_multiplier(self):
        return self.multiplier.value

    def refresh_state(self):
        if self.damping_mode == "factored":
            state = [self.a_inverse, self.g_inverse]
        else:
            state = [self.a_evecs, self.a_evals, self.g_evecs, self.g_evals]
            state = [v for v in state if v is not None]
        return state + [self.multiplier]

    def kronecker_inverses(self):
        # Eigen damping needs the middle (a_dim, g_dim) product formed.
        block = self.block
        if (
            self.damping_mode != "factored"
            or block.groups > 1
            or block.a_is_diagonal
            or block.g_is_diagonal
        ):
            return None
        return self.a_inverse, self.g_inverse

    def precondition(self, v, damping, batch=None):
        if self.damping_mode == "factored":
            if self.block.groups > 1:
                return self.a_inverse @ v @ self.g_inverse
            return F.kronecker_solve(v, self.a_inverse, self.g_inverse)
        if self.block.groups > 1:
            scale = (
                self.a_evals[..., :, None] * self.g_evals[..., None, :] + damping * self.multiplier
            )
            return F.eigenbasis_solve(v, self.a_evecs, self.g_evecs, scale)
        return F.kronecker_solve(
            v,
            self.a_evecs,
            self.g_evecs,
            eigenvalues=(self.a_evals, self.g_evals),
            damping=damping * self.multiplier,
        )
