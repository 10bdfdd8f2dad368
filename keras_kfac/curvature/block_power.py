"""The options of the block power iteration shared by "kpsvd", "deflation"
and "kfac_corrected" (:func:`factors.top_singular_triples`), given as
``KFAC(curvature_options=...)``:

* ``power_tol`` (default 1e-4): convergence tolerance. Iteration stops when,
  for every wanted pair, the Ritz residual divided by the gap to the
  neighbouring singular values, a bound on the sine of the angle between the
  computed and the exact singular vectors, is at most ``power_tol``.
  Where a gap is too small for float32 to meet it, iteration stops once the
  residual stops decreasing (roundoff reached).
* ``power_iters`` (default 100): safety bound on the iterations per
  statistics update, for a spectrum on which the block converges too slowly
  (many singular values within a few percent of the wanted ones). From a
  warm start on a slowly changing operator an update takes a few iterations.
* ``power_oversample`` (default 2): vectors iterated beyond the wanted pairs.
  The k-th pair converges like ``(s_{rank+oversample+1} / s_k)^2`` per
  iteration, so close singular values among the first ``rank + oversample``
  cost nothing; each extra vector costs one product with R and one with R^T
  per iteration.
"""

import numbers

from keras_kfac.curvature import factors as F


class BlockPower:
    """Mixin for a curvature class whose pairs are the top ``rank`` singular
    pairs of a rearranged operator; gives :meth:`top_triples`."""

    #: Pairs wanted from each :meth:`top_triples` call.
    rank = 2

    def __init__(
        self,
        block,
        damping_mode="factored",
        power_iters=100,
        power_tol=1e-4,
        power_oversample=2,
        **options,
    ):
        super().__init__(block, damping_mode, **options)
        if not (isinstance(power_iters, numbers.Integral) and power_iters >= 1):
            raise ValueError(
                f"power_iters={power_iters!r}: give a positive int (the iteration "
                "safety bound of the block power iteration)."
            )
        if not power_tol >= 0.0:
            raise ValueError(f"power_tol={power_tol!r}: give a tolerance >= 0 (e.g. 1e-4).")
        if not (isinstance(power_oversample, numbers.Integral) and power_oversample >= 0):
            raise ValueError(f"power_oversample={power_oversample!r}: give an int >= 0 (e.g. 2).")
        self.power_iters = int(power_iters)
        self.power_tol = float(power_tol)
        self.block_size = F.block_size(self.rank, power_oversample, block.a_dim, block.g_dim)

    def top_triples(self, op, previous):
        """``(s, Y, X)`` of the top ``rank`` singular triples of ``op``,
        warm-started from ``previous`` (the last right factors)."""
        starts = F.start_block(previous, self.block.g_dim, self.block_size)
        s, y, x, _ = F.top_singular_triples(op, starts, self.rank, self.power_tol, self.power_iters)
        return s, y, x
