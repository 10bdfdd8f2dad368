"""Factor math shared by the Kronecker-factored curvature methods.

Small pure functions; each names the equation it implements.
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


def symmetrize(m):
    return 0.5 * (m + tf.transpose(m))


def damped_inverse(m, damping):
    """``(M + damping I)^-1`` by Cholesky. Non-PD input yields NaN (not an
    exception) on every TF device and under XLA; callers check finiteness."""
    dim = tf.shape(m)[0]
    eye = tf.eye(dim, dtype=m.dtype)
    chol = tf.linalg.cholesky(symmetrize(m) + damping * eye)
    return symmetrize(tf.linalg.cholesky_solve(chol, eye))


def safe_eigh(m):
    """Eigendecomposition of a PSD factor with eigenvalues clipped at 0.

    ``tf.linalg.eigh`` raises on NaN input outside XLA, so a non-finite factor
    is replaced by the identity here; the caller sees the non-finite result
    through :func:`all_finite` on ``m`` and keeps its previous state.
    """
    ok = all_finite(m)
    safe = tf.where(ok, symmetrize(m), tf.eye(tf.shape(m)[0], dtype=m.dtype))
    evals, evecs = tf.linalg.eigh(safe)
    return tf.maximum(evals, 0.0), evecs


def pi_correction(a, g):
    """Martens & Grosse 2015, sec. 6.3: ``pi = sqrt((tr A/dim A)/(tr G/dim G))``
    (1 when either trace vanishes, e.g. before any statistics)."""
    ta = tf.linalg.trace(a) / tf.cast(tf.shape(a)[0], a.dtype)
    tg = tf.linalg.trace(g) / tf.cast(tf.shape(g)[0], g.dtype)
    valid = (ta > 0.0) & (tg > 0.0)
    return tf.where(valid, tf.sqrt(tf.math.divide_no_nan(ta, tg)), 1.0)


def factored_damping(a, g, damping):
    """Damping split across the factors (sec. 6.3): ``(pi*gamma, gamma/pi)``
    with ``gamma = sqrt(damping)``."""
    gamma = tf.sqrt(damping)
    pi = pi_correction(a, g)
    return pi * gamma, gamma / pi


def kron(a, g):
    """Dense ``kron(A, G)`` (parameter index = a-index major, g-index minor)."""
    da, dg = tf.shape(a)[0], tf.shape(g)[0]
    return tf.reshape(tf.einsum("ij,kl->ikjl", a, g), (da * dg, da * dg))


def kronecker_apply(left, v, right):
    """``kron(L, R) vec_row(V) = vec_row(L V R^T)``."""
    return left @ v @ tf.transpose(right)


def eigenbasis_solve(v, qa, qg, scale):
    """``Qa [(Qa^T V Qg) / scale] Qg^T``: the inverse of a matrix that is
    diagonal (``scale``, shape ``(a_dim, g_dim)``) in the Kronecker eigenbasis
    ``kron(Qa, Qg)`` (K-FAC eigen damping, EKFAC)."""
    return qa @ ((tf.transpose(qa) @ v @ qg) / scale) @ tf.transpose(qg)
