"""Diagonal Fisher: ``F ~ diag(E[u o u])`` (the "diagonal" baseline of e.g.
Martens & Grosse 2015, sec. 1; the second moment of Adam without the square
root), from per-example gradients (:func:`factors.gradient_second_moment`:
Dense without forming u_i), running-averaged. ``P(V) = V / (s + lambda)``,
the exact damped inverse (``damping_mode`` does not apply)."""

import tensorflow as tf

from keras_kfac.curvature import factors as F
from keras_kfac.curvature.base import Curvature, group_shape


class Diagonal(Curvature):
    name = "diagonal"
    supports_groups = True

    def build(self, add_variable):
        self.s = add_variable(
            "diagonal", group_shape(self.block) + (self.block.a_dim, self.block.g_dim)
        )

    def update_statistics(self, batch, decay):
        return F.running_average(self.s, F.gradient_second_moment(batch.a(), batch.g()), decay)

    def refresh(self, damping):
        pass

    def refresh_state(self):
        return []

    def precondition(self, v, damping, batch=None):
        return v / (self.s + damping)

    def matrix(self):
        return tf.linalg.diag(tf.reshape(self.s, (-1,)))

    def factors(self):
        return {"diagonal": self.s}
