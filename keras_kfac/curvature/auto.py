"""Auto: per layer, the cheapest of an exact and a Kronecker method.

Rule (flop counts per step, from the layer's shapes ``a_dim``, ``g_dim``,
locations ``T`` and the batch size ``n``):

* exact block, "tengrad" (Woodbury, Soori et al. 2021):
  ``gram(n) + n^3/3 + 6 n T a_dim g_dim`` with ``gram(n) = n^2 (a_dim + g_dim)``
  (Dense) or ``n^2 min(T^2 (a_dim + g_dim), a_dim g_dim)`` (conv): ``U v``,
  ``U^T c`` and the back-propagation of the sampled output gradients through
  the layer, every step;
* Kronecker, "kfac": statistics ``2 n T (a_dim^2 + g_dim^2 + a_dim g_dim)``
  (factor products and that back-propagation) amortized over ``stats_every``,
  preconditioning ``2 a_dim g_dim (a_dim + g_dim)``, inversion
  ``(a_dim^3 + g_dim^3)`` amortized over ``inverse_every`` (both given by the
  optimizer: its own cadence).

"tengrad" is chosen when its cost is at most K-FAC's: it is exact and, for a
small batch against the layer's width, cheaper. The crossover batch size
``n*`` is computed per layer. With ``curvature_options={"batch_size": n}`` the
choice is made once (the summary shows ``auto:tengrad`` or ``auto:kfac``);
without it the choice is made at every step from the actual batch size
(``auto:tengrad<=n*``; K-FAC statistics are then kept up to date so that
large batches can switch), and a layer with ``n* = 0`` is plain K-FAC.
A per-layer choice is also accepted by the optimizer:
``KFAC(curvature={"dense_1": "tengrad", "default": "kfac"})``.
"""

import math

import tensorflow as tf

from keras_kfac.curvature.base import Curvature
from keras_kfac.curvature.kfac import KFAC
from keras_kfac.curvature.tengrad import TENGraD

#: Largest batch size the crossover search considers.
MAX_BATCH = 1 << 16


def _locations(block):
    """Output locations T of a convolution block (1 for Dense), when static."""
    layer = block.layer
    if not hasattr(layer, "kernel_size"):
        return 1
    try:
        shape = layer.compute_output_shape(layer.input.shape)
    except (AttributeError, ValueError):
        return None
    spatial = shape[2:] if layer.data_format == "channels_first" else shape[1:-1]
    if any(d is None for d in spatial):
        return None
    return math.prod(int(d) for d in spatial)


def woodbury_cost(n, da, dg, t):
    gram = n * n * ((da + dg) if t == 1 else min(t * t * (da + dg), da * dg))
    return gram + n**3 / 3.0 + 6.0 * n * t * da * dg


def kronecker_cost(n, da, dg, t, inverse_every, stats_every=1):
    statistics = 2.0 * n * t * (da * da + dg * dg + da * dg)
    return statistics / stats_every + 2.0 * da * dg * (da + dg) + (da**3 + dg**3) / inverse_every


def crossover(da, dg, t, inverse_every, stats_every=1):
    """Largest n with ``woodbury_cost <= kronecker_cost`` (0 if none)."""
    if t is None:
        return 0
    lo, hi = 0, MAX_BATCH
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if woodbury_cost(mid, da, dg, t) <= kronecker_cost(
            mid, da, dg, t, inverse_every, stats_every
        ):
            lo = mid
        else:
            hi = mid - 1
    return lo


class Auto(Curvature):
    name = "auto"
    supports_groups = True

    def __init__(
        self,
        block,
        damping_mode="factored",
        batch_size=None,
        stats_every=10,
        inverse_every=20,
        **options,
    ):
        super().__init__(block, damping_mode, stats_every=stats_every, inverse_every=inverse_every)
        options = dict(options, stats_every=stats_every, inverse_every=inverse_every)
        t = _locations(block)
        self.crossover = crossover(
            block.a_dim, block.g_dim, t, float(inverse_every), float(stats_every)
        )
        self.kfac = None
        self.tengrad = None
        if batch_size is not None:
            if int(batch_size) <= self.crossover:
                self.tengrad = TENGraD(block, damping_mode, **options)
                self.name = "auto:tengrad"
            else:
                self.kfac = KFAC(block, damping_mode, **options)
                self.name = "auto:kfac"
        elif self.crossover > 0:
            self.tengrad = TENGraD(block, damping_mode, **options)
            self.kfac = KFAC(block, damping_mode, **options)
            self.name = f"auto:tengrad<={self.crossover}"
        else:
            self.kfac = KFAC(block, damping_mode, **options)
            self.name = "auto:kfac"
        self.uses_current_batch = self.tengrad is not None

    @property
    def chosen(self):
        return self.tengrad if self.kfac is None else self.kfac

    def build(self, add_variable):
        if self.kfac is not None:
            self.kfac.build(add_variable)

    def update_statistics(self, batch, decay):
        if self.kfac is not None:
            self.kfac.update_statistics(batch, decay)

    def refresh(self, damping):
        if self.kfac is not None:
            self.kfac.refresh(damping)

    def refresh_state(self):
        return [] if self.kfac is None else self.kfac.refresh_state()

    def precondition(self, v, damping, batch=None):
        if self.tengrad is None:
            return self.kfac.precondition(v, damping)
        if self.kfac is None:
            return self.tengrad.precondition(v, damping, batch)
        n = tf.shape(batch.a())[0]
        return tf.cond(
            n <= self.crossover,
            lambda: self.tengrad.precondition(v, damping, batch),
            lambda: self.kfac.precondition(v, damping),
        )

    def kronecker_inverses(self):
        return self.kfac.kronecker_inverses() if self.tengrad is None else None

    def matrix(self):
        if self.kfac is None:
            return self.tengrad.matrix()
        return self.kfac.matrix()

    def factors(self):
        return {} if self.kfac is None else self.kfac.factors()

    def damping_multiplier(self):
        return self.chosen.damping_multiplier()

    @classmethod
    def option_names(cls):
        # The options given to the methods it chooses from.
        return super().option_names() | KFAC.option_names() | TENGraD.option_names()
