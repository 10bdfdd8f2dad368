"""KPSVD: the best single Kronecker pair, ``min ||F - kron(A, G)||_F`` (Koroko
et al. 2022, arXiv 2201.10285, sec. 3.1): ``(vec A, vec G)`` is the top
singular pair of the rearranged block R(F) (Van Loan & Pitsianis 1993),
found without forming F (:class:`factors.RearrangedFisher`) by block power
iteration to convergence (:func:`factors.top_singular_triples`),
warm-started from the last factors. The running average is taken inside the
operator: the pair is the best one for ``decay * kron(A_old, G_old) + (1 -
decay) F_batch``. Damping and inversion are K-FAC's (both damping modes).

Options (:mod:`keras_kfac.curvature.block_power`): ``power_tol``,
``power_iters``, ``power_oversample``.
"""

import tensorflow as tf

from keras_kfac.curvature import factors as F
from keras_kfac.curvature.block_power import BlockPower
from keras_kfac.curvature.kfac import KFAC


class KPSVD(BlockPower, KFAC):
    name = "kpsvd"
    rank = 1
    supports_groups = False

    def update_statistics(self, batch, decay):
        op = F.RearrangedFisher(batch.a(), batch.g(), 1.0 - decay, [(decay, self.a, self.g)])
        s, y, x = self.top_triples(op, [self.g])
        a, g = F.kronecker_pair(s[0], y[0], x[0])
        ok = F.all_finite(a) & F.all_finite(g)
        self.a.assign(tf.where(ok, a, self.a))
        self.g.assign(tf.where(ok, g, self.g))
        return ok
