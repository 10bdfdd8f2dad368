"""Factor math shared by the Kronecker-factored curvature methods.

Small pure functions; each names the equation it implements. Factors may
carry leading batch axes (one factor per weight group of a grouped block,
:attr:`keras_kfac.layers.base.LayerBlock.groups`); the matrix functions act
on the last two axes.
"""

import tensorflow as tf


def all_finite(x):
    return tf.reduce_all(tf.math.is_finite(x))


def running_average(variable, value, decay):
    """``X <- decay * X + (1 - decay) * value``, skipped if ``value`` is not
    finite. Returns whether it was applied."""
    ok = all_finite(value)
    new = decay * variable + (1.0 - decay) * value
    variable.assign(tf.where(ok, new, variable))
    return ok


def assign_if_finite(variable, value):
    """Assign unless ``value`` has NaN/Inf (then the old value is kept)."""
    ok = all_finite(value)
    variable.assign(tf.where(ok, value, variable))
    return ok


def transpose(m):
    """Transpose of the last two axes."""
    return tf.linalg.matrix_transpose(m)


def symmetrize(m):
    """``(M + M^T) / 2`` of a matrix or of a stack of matrices (last two axes)."""
    return 0.5 * (m + transpose(m))


def eye_like(m):
    """Identities of ``m``'s shape (one per leading index)."""
    return tf.broadcast_to(tf.eye(tf.shape(m)[-1], dtype=m.dtype), tf.shape(m))


def mean_eigenvalue(m):
    """``tr(M) / dim`` of a factor stored dense ``(..., d, d)`` (one per
    leading group index) or, ungrouped, as its diagonal ``(d,)``."""
    if len(m.shape) == 1:
        return tf.reduce_mean(m)
    return tf.linalg.trace(m) / tf.cast(tf.shape(m)[-1], m.dtype)


def as_dense(m):
    """A factor stored as its diagonal ``(d,)`` as the ``(d, d)`` matrix."""
    return tf.linalg.diag(m) if len(m.shape) == 1 else m


def damped_inverse(m, damping):
    """``(M + damping I)^-1`` by Cholesky (``damping``: a scalar or one per
    leading index of ``m``; a diagonal factor ``(d,)`` exactly in O(d)).
    Non-PD input yields NaN (not an exception) on every TF device and under
    XLA; callers check finiteness."""
    if len(m.shape) == 1:
        return 1.0 / (m + damping)
    eye = eye_like(m)
    damping = tf.convert_to_tensor(damping, m.dtype)[..., None, None]
    chol = tf.linalg.cholesky(symmetrize(m) + damping * eye)
    return symmetrize(tf.linalg.cholesky_solve(chol, eye))


#: ``gram`` forms a factor wider than this in about ``d / GRAM_BLOCK``
#: column blocks, from at least ``GRAM_MIN_ROWS`` rows.
GRAM_BLOCK = 320
GRAM_MIN_ROWS = 512


def gram(x):
    """``x^T x`` of the rows ``x`` ``(N, d)``, the sum of outer products of
    a Kronecker factor. From ``GRAM_MIN_ROWS`` rows a wide factor is formed
    from its upper column blocks ``x_i^T x_j`` (``i <= j``), the lower ones
    their transposes: the same dot products in ``(k + 1) / 2k`` of the
    flops for ``k`` blocks, and exactly symmetric. On 2 busy CPU cores
    (oneDNN, load 5-8) it took 9-10 ms instead of 14-17 for N = 1000,
    d = 785, and 14-16 instead of 22-37 for d = 1001; with 128 rows one
    product was faster (1.8 against 2.0-2.5 ms)."""
    d = x.shape[-1]
    k = max(1, round(d / GRAM_BLOCK)) if d is not None else 1
    if k == 1:
        return tf.matmul(x, x, transpose_a=True)

    def blocked():
        edges = [round(i * d / k) for i in range(k + 1)]
        parts = [x[:, edges[i] : edges[i + 1]] for i in range(k)]
        upper = {
            (i, j): tf.matmul(parts[i], parts[j], transpose_a=True)
            for i in range(k)
            for j in range(i, k)
        }
        rows = [
            tf.concat([upper[i, j] if i <= j else tf.transpose(upper[j, i]) for j in range(k)], 1)
            for i in range(k)
        ]
        return tf.concat(rows, 0)

    if x.shape[0] is not None:
        return blocked() if x.shape[0] >= GRAM_MIN_ROWS else tf.matmul(x, x, transpose_a=True)
    return tf.cond(
        tf.shape(x)[0] >= GRAM_MIN_ROWS, blocked, lambda: tf.matmul(x, x, transpose_a=True)
    )


def location_gram(x):
    """``sum_{n,t} x x^T`` of ``(n, T, d)`` rows; per group for grouped
    rows ``(n, T, groups, d)``."""
    if len(x.shape) == 3:
        return gram(tf.reshape(x, tf.stack([-1, tf.shape(x)[-1]])))
    return tf.einsum("nt...i,nt...j->...ij", x, x)


def safe_eigh(m):
    """Eigendecomposition of a PSD factor with eigenvalues clipped at 0.

    ``tf.linalg.eigh`` raises on NaN input outside XLA, so a non-finite factor
    is replaced by the identity here; the caller sees the non-finite result
    through :func:`all_finite` on ``m`` and keeps its previous state.
    """
    ok = all_finite(m)
    safe = tf.where(ok, symmetrize(m), eye_like(m))
    evals, evecs = tf.linalg.eigh(safe)
    return tf.maximum(evals, 0.0), evecs


def pi_correction(a, g):
    """Martens & Grosse 2015, sec. 6.3: ``pi = sqrt((tr A/dim A)/(tr G/dim G))``
    (1 when either trace vanishes, e.g. before any statistics)."""
    ta, tg = mean_eigenvalue(a), mean_eigenvalue(g)
    valid = (ta > 0.0) & (tg > 0.0)
    return tf.where(valid, tf.sqrt(tf.math.divide_no_nan(ta, tg)), 1.0)


def factored_damping(a, g, damping):
    """Damping split across the factors (sec. 6.3): ``(pi*gamma, gamma/pi)``
    with ``gamma = sqrt(damping)``."""
    gamma = tf.sqrt(damping)
    pi = pi_correction(a, g)
    return pi * gamma, gamma / pi


def kron(a, g):
    """Dense ``kron(A, G)`` (parameter index = a-index major, g-index minor);
    for grouped factors ``(groups, d, d)``, the block-diagonal matrix of the
    groups' products (parameter index = group major)."""
    da, dg = a.shape[-1], g.shape[-1]
    k = tf.reshape(tf.einsum("...ij,...kl->...ikjl", a, g), (-1, da * dg, da * dg))
    return block_diagonal(k) if len(a.shape) == 3 else k[0]


def block_diagonal(blocks):
    """``(groups, p, p) -> (groups * p, groups * p)`` block-diagonal."""
    groups, p = blocks.shape[0], blocks.shape[-1]
    dense = tf.einsum("kij,kl->kilj", blocks, tf.eye(groups, dtype=blocks.dtype))
    return tf.reshape(dense, (groups * p, groups * p))


def project(x, q):
    """``x`` (rows ``(..., d)`` with an optional group axis before ``d``)
    times ``q`` (``(d, e)``, or one per group ``(groups, d, e)``)."""
    if len(q.shape) == 2:
        return x @ q
    return tf.einsum("ntki,kij->ntkj", x, q)


def kronecker_apply(left, v, right):
    """``kron(L, R) vec_row(V) = vec_row(L V R^T)``."""
    return left @ v @ transpose(right)


def eigenbasis_solve(v, qa, qg, scale):
    """``Qa [(Qa^T V Qg) / scale] Qg^T``: the inverse of a matrix that is
    diagonal (``scale``, shape ``(a_dim, g_dim)``) in the Kronecker eigenbasis
    ``kron(Qa, Qg)`` (K-FAC eigen damping, EKFAC)."""
    return qa @ ((transpose(qa) @ v @ qg) / scale) @ transpose(qg)


def kronecker_solve(v, left, right, eigenvalues=None, damping=None):
    """Without ``eigenvalues``: ``L V R`` for symmetric factors (inverses)
    each dense ``(d, d)`` or diagonal ``(d,)``. With ``eigenvalues = (sa,
    sg)``: ``L [(L^T V R) / (sa sg^T + damping)] R^T``, the eigen-damped
    solve of :func:`eigenbasis_solve` with eigenvector matrices ``L``, ``R``;
    a diagonal factor's basis is the identity, passed as None.

    A row-sparse ``V`` (``tf.IndexedSlices`` over the ``A`` side, e.g. an
    embedding's gradient) stays sparse, touching only its rows; it needs a
    diagonal ``A`` side (``left`` a vector, or None with ``eigenvalues``)."""
    sparse = isinstance(v, tf.IndexedSlices)
    x = v.values if sparse else v
    if sparse and left is not None and left.shape.rank != 1:
        raise ValueError("A row-sparse gradient needs a diagonal input factor.")

    def right_apply(x, r, transpose=False):
        if r is None:
            return x
        if r.shape.rank == 1:
            return x * r[None, :]
        return x @ (tf.transpose(r) if transpose else r)

    if eigenvalues is None:
        if left is not None and left.shape.rank == 1:
            rows = tf.gather(left, v.indices) if sparse else left
            x = rows[:, None] * x
        elif left is not None:
            x = left @ x
        x = right_apply(x, right)
    else:
        if left is not None:
            x = tf.transpose(left) @ x
        x = right_apply(x, right)
        sa, sg = eigenvalues
        rows = tf.gather(sa, v.indices) if sparse else sa
        x = x / (rows[:, None] * sg[None, :] + damping)
        x = right_apply(x, right, transpose=True)
        if left is not None:
            x = left @ x
    return tf.IndexedSlices(x, v.indices, v.dense_shape) if sparse else x


# --- a gradient given by its factors ------------------------------------------
# A Dense layer's gradient is V = a^T d with a (N, a_dim) its homogeneous
# inputs and d (N, g_dim) its dL/ds, N = batch x locations. ``L V R`` costs
# 2 a_dim g_dim (a_dim + g_dim) flops from V but 2 N (a_dim^2 + g_dim^2 +
# a_dim g_dim) from the factors, as (a L)^T (d R): the preconditioning of a
# small batch then shrinks with the batch.

#: Relative tolerance of the check that ``a^T d`` is the gradient being
#: preconditioned. Keras's float32 gradient and ``a^T d`` differ by 2e-7 to
#: 5e-7 relative (the benchmark autoencoder, batches 32 and 128); a
#: regularizer, clipping or tied-weight term of 1e-5 relative or more is
#: caught and the block is preconditioned from ``V``.
FACTORED_GRADIENT_TOL = 1e-5
#: Gaussian probe vectors of the check (a term the check must see is missed
#: only when all of them are nearly orthogonal to it).
FACTORED_GRADIENT_PROBES = 8


def factored_crossover(da, dg):
    """Largest row count N for which ``(a L)^T (d R)`` costs no more than
    ``L V R``: ``N (da^2 + dg^2 + da dg) <= da dg (da + dg)``."""
    return (da * dg * (da + dg)) // (da * da + dg * dg + da * dg)


def factors_match(v, a, d, tol=FACTORED_GRADIENT_TOL, probes=FACTORED_GRADIENT_PROBES):
    """Whether ``a^T d`` equals ``v`` to ``tol`` relative, compared on a
    fixed Gaussian sketch ``Z`` (``dg x probes``): ``||V Z - a^T (d Z)|| <=
    tol ||V Z||``, in O((a_dim + N) g_dim probes)."""
    z = tf.random.stateless_normal((v.shape[-1], probes), seed=(14, 3), dtype=v.dtype)
    vz = v @ z
    error = vz - tf.matmul(a, d @ z, transpose_a=True)
    return tf.norm(error) <= tol * tf.norm(vz)


def factored_kronecker_solve(v, a, d, left, right):
    """``L V R`` (dense ``L``, ``R``), from ``V``'s factors ``a^T d`` when
    they are fewer rows than :func:`factored_crossover` and
    :func:`factors_match` confirms them; else from ``V``."""
    da, dg = left.shape[-1], right.shape[-1]
    crossover = factored_crossover(da, dg)
    if crossover < 1 or (a.shape[0] is not None and a.shape[0] > crossover):
        return kronecker_solve(v, left, right)

    def from_factors():
        return tf.matmul(a @ left, d @ right, transpose_a=True)

    def from_matrix():
        return kronecker_solve(v, left, right)

    small = tf.shape(a)[0] <= crossover
    return tf.cond(
        small,
        lambda: tf.cond(factors_match(v, a, d), from_factors, from_matrix),
        from_matrix,
    )


# --- per-example gradients, matrix-free -------------------------------------
# ``a``: (n, T, a_dim) homogeneous inputs, ``g``: (n, T, g_dim) per-example
# output gradients; U_i = sum_t a_{i,t} g_{i,t}^T (Dense: T = 1). The exact
# block is F = (1/n) sum_i vec(U_i) vec(U_i)^T. Grouped blocks: ``a``, ``g``
# of (n, T, groups, d), one U_i per group, F block-diagonal over groups.


def _single_location(a):
    """True when the location axis is statically 1 (Dense): U_i = a_i g_i^T
    is then never formed."""
    return a.shape[1] == 1 and len(a.shape) == 3


def _grouped(a):
    return len(a.shape) == 4


def gradient_second_moment(a, g):
    """``E[U o U] = (1/n) sum_i U_i o U_i`` (Hadamard square), shape
    (a_dim, g_dim): the diagonal of F. Dense: ``(1/n) (a o a)^T (g o g)``;
    conv: from the per-example gradients summed over locations. With ``a``,
    ``g`` projected on eigenbases this is EKFAC's scaling (George et al.
    2018, eq. 10)."""
    n = tf.cast(tf.shape(a)[0], a.dtype)
    if _single_location(a):
        return tf.matmul(tf.square(a[:, 0]), tf.square(g[:, 0]), transpose_a=True) / n
    u = tf.einsum("nt...a,nt...g->n...ag", a, g)
    return tf.reduce_mean(tf.square(u), axis=0)


def gradient_inner(a, g, v):
    """``(U vec(V))_i = <U_i, V> = sum_t a_{i,t}^T V g_{i,t}``, shape (n,)
    (grouped: (groups, n)).

    Written as ``(a V) . g``: cost ``n T a_dim g_dim``, and no intermediate
    larger than ``g``, whatever order an einsum would choose."""
    if _grouped(a):
        return tf.transpose(tf.reduce_sum(project(a, v) * g, axis=(1, 3)))
    return tf.reduce_sum(tf.matmul(a, v) * g, axis=(1, 2))


def gradient_combination(a, g, c):
    """``U^T c = sum_i c_i U_i = A_bar^T diag(c) G``, shape (a_dim, g_dim):
    one matmul over all (example, location) rows. Grouped: ``c`` of
    (groups, n), result (groups, a_dim, g_dim)."""
    if _grouped(a):
        return tf.einsum("ntka,kn,ntkg->kag", a, c, g)
    weighted = tf.reshape(a * c[:, None, None], (-1, a.shape[-1]))
    return tf.matmul(weighted, tf.reshape(g, (-1, g.shape[-1])), transpose_a=True)


def gradient_gram(a, g):
    """``U U^T``, the (n, n) Gram matrix of per-example gradients.

    Dense (Soori et al. 2021, eq. 11): ``(A_bar A_bar^T) o (G G^T)``, cost
    ``n^2 (a_dim + g_dim)``. Conv: ``<U_i, U_j> = sum_{t,s} (a_it . a_js)
    (g_it . g_js)``; the location Grams cost ``n^2 T^2 (a_dim + g_dim)``,
    forming U costs ``n a_dim g_dim (n + 1)``; the cheaper one is chosen from
    the static shapes (location Grams when ``T^2 (a_dim + g_dim) < a_dim
    g_dim``). With T unknown, U is formed: its memory is bounded by the
    layer's size, that of the location Grams (n^2 T^2) is not.
    Grouped: one Gram per group from the formed U, (groups, n, n).
    """
    if _grouped(a):
        u = tf.einsum("ntka,ntkg->knag", a, g)
        u = tf.reshape(u, (a.shape[2], tf.shape(a)[0], a.shape[-1] * g.shape[-1]))
        return tf.matmul(u, u, transpose_b=True)
    if _single_location(a):
        a2, g2 = a[:, 0], g[:, 0]
        return tf.matmul(a2, a2, transpose_b=True) * tf.matmul(g2, g2, transpose_b=True)
    t, da, dg = a.shape[1], a.shape[2], g.shape[2]
    if t is not None and t * t * (da + dg) < da * dg:
        ka = tf.einsum("ita,jsa->ijts", a, a)
        kg = tf.einsum("itg,jsg->ijts", g, g)
        return tf.reduce_sum(ka * kg, axis=(2, 3))
    u = tf.reshape(tf.einsum("nta,ntg->nag", a, g), (tf.shape(a)[0], da * dg))
    return tf.matmul(u, u, transpose_b=True)


def woodbury_solve(a, g, v, damping):
    """Exact ``(F + lambda I)^-1 vec(V)`` for the batch's block F by the
    Woodbury identity (Soori et al. 2021, eq. 9):
    ``(1/lambda) (v - U^T (n lambda I + U U^T)^-1 U v)``; an (n, n) solve."""
    n = tf.shape(a)[0]
    nf = tf.cast(n, v.dtype)
    gram = symmetrize(gradient_gram(a, g)) + nf * damping * tf.eye(n, dtype=v.dtype)
    rhs = gradient_inner(a, g, v)[..., None]
    c = tf.linalg.cholesky_solve(tf.linalg.cholesky(gram), rhs)[..., 0]
    return (v - gradient_combination(a, g, c)) / damping


def kronecker_matvec(a, g, v):
    """``kron(A, G) vec(V) = A V G`` with ``A = (1/n) A_bar^T A_bar``,
    ``G = (1/(nT)) G_mat^T G_mat`` never formed (Chen 2021, sec. 3): four
    products of cost ``nT a_dim g_dim`` (per group for grouped blocks)."""
    n = tf.cast(tf.shape(a)[0], v.dtype)
    t = tf.cast(tf.shape(a)[1], v.dtype)
    if _grouped(a):
        a2 = tf.reshape(a, (-1,) + tuple(a.shape[2:]))
        g2 = tf.reshape(g, (-1,) + tuple(g.shape[2:]))
        av = tf.einsum("mka,mkg->kag", a2, tf.einsum("mka,kag->mkg", a2, v)) / n
        avg = tf.einsum("kag,mkg->mka", av, g2)
        return tf.einsum("mka,mkh->kah", avg, g2) / (n * t)
    a2 = tf.reshape(a, (-1, a.shape[-1]))
    g2 = tf.reshape(g, (-1, g.shape[-1]))
    av = tf.matmul(a2, tf.matmul(a2, v), transpose_a=True) / n
    return tf.matmul(tf.matmul(av, g2, transpose_b=True), g2) / (n * t)


def conjugate_gradient(matvec, b, x0, tol, max_iters):
    """Solve ``M x = b`` (M symmetric positive definite, given by ``matvec``)
    from ``x0``, stopping when ``||r|| <= tol ||b||`` or after ``max_iters``
    iterations (Hestenes & Stiefel 1952). Returns ``(x, iterations)``."""
    r = b - matvec(x0)
    bound = tol * tf.norm(b)

    def cond(i, x, r, p, rr):
        return (i < max_iters) & (tf.sqrt(rr) > bound)

    def body(i, x, r, p, rr):
        mp = matvec(p)
        alpha = tf.math.divide_no_nan(rr, tf.reduce_sum(p * mp))
        x = x + alpha * p
        r = r - alpha * mp
        rr_new = tf.reduce_sum(r * r)
        p = r + tf.math.divide_no_nan(rr_new, rr) * p
        return i + 1, x, r, p, rr_new

    i, x, _, _, _ = tf.while_loop(cond, body, (tf.constant(0), x0, r, r, tf.reduce_sum(r * r)))
    return x, i


# --- the rearranged block (Van Loan & Pitsianis 1993) --------------------------


class RearrangedFisher:
    """The rearrangement R(F) of the block, as an operator, plus low-rank terms.

    R maps ``F = sum kron(A_k, G_k)`` to ``sum vec(A_k) vec(G_k)^T``, so
    ``||F - kron(A, G)||_F = ||R(F) - vec(A) vec(G)^T||_F`` and the best
    Kronecker pairs are the top singular pairs of R(F) (Van Loan & Pitsianis
    1993; Koroko et al. 2022, sec. 3). For ``F = (1/n) sum_i vec(U_i)
    vec(U_i)^T`` (Koroko et al. 2022, eqs. 9-10)::

        R(F) vec(X)   = (1/n) sum_i U_i X U_i^T    (Dense: (g_i^T X g_i) a_i a_i^T)
        R(F)^T vec(Y) = (1/n) sum_i U_i^T Y U_i    (Dense: (a_i^T Y a_i) g_i g_i^T)

    The operator here is ``weight * R(F_batch) + sum_k c_k vec(L_k) vec(R_k)^T``:
    ``weight = 1 - decay`` and the terms ``decay * (previous pairs)`` make it
    the rearrangement of the running average ``decay F_old + (1 - decay)
    F_batch`` with ``F_old`` replaced by its previous Kronecker-sum estimate;
    a negative term gives KFAC-corrected's residual.

    R(F) maps symmetric matrices to symmetric ones and skew to skew. Pairs are
    sought among symmetric matrices only: outputs are symmetrized, so the
    operator is R restricted to them (roundoff cannot grow a skew part). The
    top pair is symmetric anyway (and PSD for PSD F, Van Loan & Pitsianis
    1993); a skew pair ``kron(S_a, S_g)`` (symmetric, and sometimes the second
    singular pair of R(F)) has no real simultaneous diagonalization with the
    first, so the two-term methods use the best symmetric second pair.
    """

    def __init__(self, a, g, weight=1.0, terms=()):
        self.n = tf.cast(tf.shape(a)[0], tf.float32)
        self.weight = weight
        self.terms = list(terms)
        self.a_dim = a.shape[-1]
        if _single_location(a):
            self.a, self.g, self.u = a[:, 0], g[:, 0], None
        else:
            self.a, self.g = None, None
            self.u = tf.einsum("nta,ntg->nag", a, g)

    def matvec(self, x):
        """``R vec(X)`` as an (a_dim, a_dim) matrix, for X of (g_dim, g_dim);
        a stack of X (leading axes) gives the stack of products."""
        if self.u is None:
            q = tf.einsum("ng,...gh,nh->...n", self.g, x, self.g)
            y = tf.einsum("...n,na,nb->...ab", q, self.a, self.a) / self.n
        else:
            y = tf.einsum("nag,...gh,nbh->...ab", self.u, x, self.u) / self.n
        y = self.weight * y
        for c, left, right in self.terms:
            y = y + c * tf.reduce_sum(right * x, axis=(-2, -1))[..., None, None] * left
        return symmetrize(y)

    def rmatvec(self, y):
        """``R^T vec(Y)`` as a (g_dim, g_dim) matrix, for Y of (a_dim, a_dim)
        (or a stack of them)."""
        if self.u is None:
            q = tf.einsum("na,...ab,nb->...n", self.a, y, self.a)
            x = tf.einsum("...n,ng,nh->...gh", q, self.g, self.g) / self.n
        else:
            x = tf.einsum("nag,...ab,nbh->...gh", self.u, y, self.u) / self.n
        x = self.weight * x
        for c, left, right in self.terms:
            x = x + c * tf.reduce_sum(left * y, axis=(-2, -1))[..., None, None] * right
        return symmetrize(x)


def _unit(x):
    return tf.math.divide_no_nan(x, tf.norm(x))


def symmetric_dim(d):
    """The dimension of the space of symmetric (d, d) matrices."""
    return d * (d + 1) // 2


def block_size(rank, oversample, a_dim, g_dim):
    """Vectors iterated together by :func:`top_singular_triples`: the
    ``rank`` wanted plus ``oversample`` more, at most the dimension of the
    symmetric matrices R acts on (a larger block would only add null
    vectors)."""
    space = min(symmetric_dim(a_dim), symmetric_dim(g_dim))
    return max(rank, min(rank + int(oversample), space))


def start_matrix(previous, dim, seed=0):
    """A start for the right singular vector: ``previous`` (warm start) when
    nonzero, else the identity plus a fixed symmetric perturbation (so the
    start is not orthogonal to the top pair, which is PSD, nor, generically,
    to any other)."""
    noise = tf.random.stateless_normal((dim, dim), seed=(seed, 7), dtype=tf.float32)
    cold = tf.eye(dim) + 0.1 * symmetrize(noise)
    warm = tf.norm(previous) > 0.0
    return _unit(tf.where(warm, previous, cold))


def start_block(previous, dim, size):
    """``size`` starts for :func:`top_singular_triples`: the previous right
    vectors (warm starts, each replaced by a cold start while it is zero),
    then fixed random symmetric matrices for the extra vectors, so that the
    block is generically not orthogonal to any singular vector."""
    starts = [start_matrix(p, dim, seed=k) for k, p in enumerate(previous)]
    for k in range(len(previous), size):
        noise = tf.random.stateless_normal((dim, dim), seed=(k, 7), dtype=tf.float32)
        starts.append(_unit(symmetrize(noise)))
    return tf.stack(starts)


def _orthonormal(stack):
    """An orthonormal basis (Householder QR, so also for rank-deficient
    input) of the span of a stack of matrices, as a stack of the same shape
    (the first k span the first k inputs, when these are independent), and
    the triangular factor: ``input_j = sum_i r_ij basis_i``."""
    flat = tf.reshape(stack, (stack.shape[0], -1))
    q, r = tf.linalg.qr(tf.transpose(flat))
    return tf.reshape(tf.transpose(q), stack.shape), r


#: Iterations without a decrease of the residual after which
#: :func:`top_singular_triples` stops (float32 roundoff reached).
STALL_ITERS = 5


def top_singular_triples(op, starts, rank, tol, max_iters):
    """Top ``rank`` singular triples of ``op`` by subspace (orthogonal)
    iteration with Rayleigh-Ritz (Rutishauser 1970; Golub & Van Loan, 4th
    ed., secs. 8.2.4 and 8.6), the block form of power iteration with
    deflation (Koroko et al. 2022, Alg. 1), started from the stack
    ``starts`` (b, g_dim, g_dim) with static ``b >= rank``.

    Each iteration maps the orthonormal block X to ``R X = Q B`` (QR), takes
    the SVD ``B = P diag(s) W^T`` (Ritz triples ``s_k``, ``Y = Q P``, ``X W``)
    and continues from an orthonormal basis of ``R^T Y``. The k-th pair
    converges like ``(s_{b+1} / s_k)^(2 i)``: close singular values inside
    the block do not slow it down.

    Stop: the Ritz residual ``r_k = ||R^T y_k - s_k x_k||`` is the change of
    the right vector in one more power step (times ``s_k``), and ``r_k /
    gap_k`` bounds the sine of its angle to the exact singular vector (Wedin
    1972), ``gap_k`` the distance from ``s_k`` to the nearest other Ritz
    value. The iteration stops when ``r_k <= tol * gap_k`` for every wanted
    k; or when the largest wanted residual has not decreased for
    ``STALL_ITERS`` iterations, i.e. it has reached float32 roundoff (about
    ``1e-5 s_1`` on a layer of width 100, so a gap below ``0.1 s_1 / tol``
    cannot meet the tolerance: the vectors are then as accurate as float32
    allows); or on non-finite values; or after ``max_iters``, a safety
    bound.

    Returns ``(s, Y, X, iterations)``: ``s`` (rank,) descending, ``Y``
    (rank, a_dim, a_dim), ``X`` (rank, g_dim, g_dim), unit norm, with
    ``R vec(X_k) = s_k vec(Y_k)``."""
    b = starts.shape[0]
    x0, _ = _orthonormal(starts)

    def ritz(x):
        q, r = _orthonormal(op.matvec(x))
        s, p, w = tf.linalg.svd(r)  # R X = Q r, so r = Q^T R X
        y = tf.tensordot(tf.transpose(p), q, 1)
        x = tf.tensordot(tf.transpose(w), x, 1)
        z = op.rmatvec(y)
        residual = tf.norm(tf.reshape(z - s[:, None, None] * x, (b, -1)), axis=1)
        return s, y, x, z, residual[:rank]

    def converged(s, residual):
        padded = tf.concat([[float("inf")], s, [0.0]], 0)
        gap = tf.minimum(padded[:-2] - s, s - padded[2:])
        return tf.reduce_all(residual <= tol * gap[:rank]) | ~all_finite(s)

    def cond(i, x, s, y, x_ritz, done, best, stall):
        return (i < max_iters) & ~done & (stall < STALL_ITERS)

    def body(i, x, s, y, x_ritz, done, best, stall):
        s, y, x_ritz, z, residual = ritz(x)
        x_next, _ = _orthonormal(z)
        worst = tf.reduce_max(residual)
        stall = tf.where(worst < best, 0, stall + 1)
        return i + 1, x_next, s, y, x_ritz, converged(s, residual), tf.minimum(worst, best), stall

    state = (
        tf.constant(0),
        x0,
        tf.zeros((b,)),
        tf.zeros((b, op.a_dim, op.a_dim)),
        x0,
        tf.constant(False),
        tf.constant(float("inf")),
        tf.constant(0),
    )
    i, _, s, y, x, _, _, _ = tf.while_loop(cond, body, state)
    return s[:rank], y[:rank], x[:rank], i


def kronecker_pair(sigma, y, x):
    """Split ``sigma vec(Y) vec(X)^T`` into ``kron(A, G)`` with ``||A|| =
    ||G|| = sqrt(sigma)``, signed so that ``tr A >= 0`` (for a PSD block the
    top pair is then PSD)."""
    sign = tf.where(tf.linalg.trace(y) < 0.0, -1.0, 1.0)
    root = tf.sqrt(tf.maximum(sigma, 0.0))
    return sign * root * symmetrize(y), sign * root * symmetrize(x)


def golub_kahan_lanczos(op, x0, steps, rank, tol, max_restarts):
    """Top ``rank`` singular triples of ``op`` by Golub-Kahan-Lanczos
    bidiagonalization (Golub & Kahan 1965) with full reorthogonalization and
    explicit restarts from the sum of the Ritz right vectors (Golub & Van Loan,
    sec. 10.4). ``steps`` (static) is the Krylov dimension per restart;
    restarts stop when every Ritz residual ``||R^T y_k - sigma_k x_k||`` is
    below ``tol * sigma_1`` or after ``max_restarts``. Returns lists of
    ``sigma_k, Y_k, X_k``."""
    shape_x = x0.shape
    shape_y = op.matvec(tf.zeros(shape_x)).shape
    tiny = 1e-6

    def orthogonalize(w, basis):
        for _ in range(2):  # twice is enough (Giraud et al. 2005)
            for b in basis:
                w = w - tf.reduce_sum(b * w) * b
        return w

    def normalized(w, scale):
        norm = tf.norm(w)
        keep = norm > tiny * scale
        unit = tf.where(keep, w / tf.where(keep, norm, 1.0), tf.zeros_like(w))
        return unit, tf.where(keep, norm, 0.0)

    def bidiagonalize(x):
        xs, ys, alphas, betas = [x], [], [], []
        y, alpha = normalized(op.matvec(x), 1.0)
        scale = tf.maximum(alpha, 1e-30)
        ys.append(y)
        alphas.append(alpha)
        for _ in range(steps - 1):
            w = orthogonalize(op.rmatvec(ys[-1]) - alphas[-1] * xs[-1], xs)
            x_next, beta = normalized(w, scale)
            w = orthogonalize(op.matvec(x_next) - beta * ys[-1], ys)
            y_next, alpha = normalized(w, scale)
            xs.append(x_next)
            ys.append(y_next)
            betas.append(beta)
            alphas.append(alpha)
        b = tf.linalg.diag(tf.stack(alphas))
        if betas:
            b = b + tf.linalg.diag(tf.stack(betas), k=1, num_rows=steps, num_cols=steps)
        s, p, q = tf.linalg.svd(b)  # B = P diag(s) Q^T, s descending
        xk = tf.stack(xs)
        yk = tf.stack(ys)
        right = [tf.tensordot(q[:, k], xk, 1) for k in range(rank)]
        left = [tf.tensordot(p[:, k], yk, 1) for k in range(rank)]
        return s[:rank], left, right

    def residual(s, left, right):
        r = [tf.norm(op.rmatvec(left[k]) - s[k] * right[k]) for k in range(rank)]
        return tf.reduce_max(tf.stack(r)) / tf.maximum(s[0], 1e-30)

    def cond(i, x, s, left, right, res):
        return (i < max_restarts) & (res > tol)

    def body(i, x, s, left, right, res):
        s, left, right = bidiagonalize(x)
        x_next = _unit(tf.add_n(right))
        return i + 1, x_next, s, left, right, residual(s, left, right)

    zeros_x = [tf.zeros(shape_x)] * rank
    zeros_y = [tf.zeros(shape_y)] * rank
    _, _, s, left, right, _ = tf.while_loop(
        cond,
        body,
        (tf.constant(0), _unit(x0), tf.zeros((rank,)), zeros_y, zeros_x, tf.constant(1.0)),
    )
    return [s[k] for k in range(rank)], left, right


# --- two Kronecker terms: simultaneous diagonalization ------------------------


def two_term_basis(a1, g1, a2, g2, damping_a, damping_g):
    """Simultaneous diagonalization of ``kron(A1', G1') + kron(A2, G2)`` with
    ``A1' = A1 + damping_a I``, ``G1' = G1 + damping_g I`` (Koroko et al.
    2022, sec. 4; Martens & Grosse 2015, app. B for the same device):
    ``K1 = A1'^-1/2 E1``, ``E1 diag(s1) E1^T = A1'^-1/2 A2 A1'^-1/2`` (and
    likewise K2, s2), so that ``K1^T A1' K1 = I``, ``K1^T A2 K1 = diag(s1)``.
    The first term's spectra are clipped at 0 so A1', G1' are positive
    definite. Returns ``K1, s1, K2, s2``."""

    def side(m1, m2, damping):
        evals, evecs = safe_eigh(m1)
        inv_root = evecs @ tf.linalg.diag(tf.math.rsqrt(evals + damping)) @ tf.transpose(evecs)
        s, e = tf.linalg.eigh(symmetrize(inv_root @ m2 @ inv_root))
        return inv_root @ e, s

    k1, s1 = side(a1, a2, damping_a)
    k2, s2 = side(g1, g2, damping_g)
    return k1, s1, k2, s2


def two_term_scale(k1, s1, k2, s2, damping):
    """The diagonal of ``kron(A1',G1') + kron(A2,G2)`` in the basis
    ``kron(K1, K2)``: ``1 + s1 s2^T``, clipped from below so P is positive
    definite. The second term may be indefinite; in any basis the exact damped
    block satisfies ``K^T (F + lambda I) K >= lambda K^T K`` (F is PSD), so each
    entry is floored at ``lambda ||k1_i||^2 ||k2_j||^2``, the damping's own share
    (at most 1, since ``A1' (x) G1' >= lambda I``). Where the floor does not
    bind, P is exactly the inverse of the damped two-term matrix."""
    norms1 = tf.reduce_sum(tf.square(k1), 0)[:, None]
    norms2 = tf.reduce_sum(tf.square(k2), 0)[None, :]
    floor = damping * norms1 * norms2
    return tf.maximum(1.0 + s1[:, None] * s2[None, :], floor)
