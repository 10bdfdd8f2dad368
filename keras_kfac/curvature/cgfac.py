"""CG-FAC (Chen 2021, arXiv 2101.00218): the K-FAC system
``(kron(A, G) + lambda I) x = vec(V)`` solved by conjugate gradients,
matrix-free from the current batch's activations and output gradients:
``kron(A, G) vec(X) = A X G`` evaluated as ``(1/n) A_bar^T (A_bar X)`` then
``(1/(nT)) (. G_mat^T) G_mat`` (Chen 2021, sec. 3; :func:`factors.kronecker_matvec`),
so A and G are never formed. Warm-started from the previous solution;
``cg_max_iters`` (default 20) and ``cg_tol`` (relative residual, default
1e-4). Converged, it is K-FAC with ``damping_mode="eigen"`` on the current
batch's factors (``damping_mode`` does not apply; no running average).

Memory: one (a_dim, g_dim) warm start, against "kfac"'s four factor matrices
``2 (a_dim^2 + g_dim^2)``; for a wide layer (a_dim = g_dim = d) that is d^2
against 4 d^2 floats, and no O(d^3) inversion. Cost per iteration:
``4 n T a_dim g_dim``.
"""

from keras_kfac.curvature import factors as F
from keras_kfac.curvature.base import CurrentBatchCurvature, group_shape


class CGFAC(CurrentBatchCurvature):
    name = "cgfac"
    supports_groups = True
    no_matrix_reason = (
        "it works matrix-free from the current batch. Its matrix is kron(A, G) of "
        "that batch (curvature='kfac' with stats_decay=0)."
    )

    def __init__(self, block, damping_mode="factored", cg_max_iters=20, cg_tol=1e-4, **options):
        super().__init__(block, damping_mode, **options)
        self.max_iters = int(cg_max_iters)
        self.tol = float(cg_tol)

    def build(self, add_variable):
        self.solution = add_variable(
            "cg_solution", group_shape(self.block) + (self.block.a_dim, self.block.g_dim)
        )

    def precondition(self, v, damping, batch=None):
        a, g = batch.a(), batch.g()
        x, _ = F.conjugate_gradient(
            lambda x: F.kronecker_matvec(a, g, x) + damping * x,
            v,
            self.solution,
            self.tol,
            self.max_iters,
        )
        F.assign_if_finite(self.solution, x)
        return x
