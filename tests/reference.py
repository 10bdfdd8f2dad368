"""Brute-force references for tests: exact per-example gradients and
Fisher/GGN blocks (:mod:`keras_kfac.exact`, by ``GradientTape.jacobian``),
the layer's captured a/g, rearrangement, dense solves. Independent of the
curvature code under test.

    from reference import fisher_block, layer_ag, dense_solve
"""

import numpy as np
import tensorflow as tf

import keras_kfac
from keras_kfac.exact import fisher_block, ggn_block, per_example_gradients  # noqa: F401
from keras_kfac.fidelity import layer_batch


def layer_ag(model, layer, x, y, loss):
    """``(a, g)`` of ``layer`` as numpy arrays (n, T, a_dim), (n, T, g_dim):
    homogeneous inputs/patches and per-example pre-activation gradients."""
    batch = layer_batch(model, layer, x, y, loss)
    return batch.a().numpy(), batch.g().numpy()


def kfac_factors(a, g):
    """K-FAC/KFC ``A = (1/n) sum a a^T``, ``G = (1/(nT)) sum g g^T``; for
    grouped ``a``, ``g`` of (n, T, groups, d), one pair per group, stacked."""
    if a.ndim == 4:
        pairs = [kfac_factors(a[:, :, k], g[:, :, k]) for k in range(a.shape[2])]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
    n, t = a.shape[0], a.shape[1]
    a2, g2 = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
    return a2.T @ a2 / n, g2.T @ g2 / (n * t)


def fisher_from_ag(a, g):
    """``(1/n) sum_i vec(U_i) vec(U_i)^T``, ``U_i = sum_t a_t g_t^T`` (one
    per group for grouped ``a``, ``g``: vec over (group, a, g))."""
    u = np.einsum("nt...a,nt...g->n...ag", a, g).reshape(a.shape[0], -1)
    return u.T @ u / a.shape[0]


def rearrange(f, da, dg):
    """Van Loan-Pitsianis rearrangement: row (j, k) of R(F) is vec(F_jk),
    F_jk the (dg, dg) block; ``R(kron(A, G)) = vec(A) vec(G)^T``."""
    return f.reshape(da, dg, da, dg).transpose(0, 2, 1, 3).reshape(da * da, dg * dg)


def symmetric_projector(d):
    """The orthogonal projector onto vec(symmetric (d, d) matrices)."""
    eye = np.eye(d * d)
    swap = eye.reshape(d, d, d, d).transpose(1, 0, 2, 3).reshape(d * d, d * d)
    return 0.5 * (eye + swap)


def symmetric_top_pairs(f, da, dg, k):
    """``sum_{i<k} s_i vec(A_i) vec(G_i)^T``: the top k singular pairs of
    R(F) restricted to symmetric A_i, G_i (R(F) maps symmetric to symmetric
    and skew to skew; the curvature methods use the symmetric pairs)."""
    r = symmetric_projector(da) @ rearrange(f, da, dg) @ symmetric_projector(dg)
    u, s, vt = np.linalg.svd(r)
    return sum(s[i] * np.outer(u[:, i], vt[i]) for i in range(k))


def reference_patches(x, kh, kw, strides, dilation, padding):
    """Explicit-loop patch extraction in the kernel's (kh, kw, c_in) order."""
    n, H, W, C = x.shape
    sh, sw = strides
    dh, dw = dilation
    eh, ew = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    if padding == "same":
        oh, ow = -(-H // sh), -(-W // sw)
        ph = max((oh - 1) * sh + eh - H, 0)
        pw = max((ow - 1) * sw + ew - W, 0)
        x = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    else:
        oh, ow = (H - eh) // sh + 1, (W - ew) // sw + 1
    out = np.zeros((n, oh * ow, kh * kw * C), dtype=np.float64)
    for i in range(oh):
        for j in range(ow):
            patch = x[:, i * sh : i * sh + eh : dh, j * sw : j * sw + ew : dw, :]
            out[:, i * ow + j] = patch.reshape(n, -1)
    return out


def dense_solve(matrix, v, damping=0.0):
    """``(matrix + damping I)^-1 v`` in float64."""
    m = np.asarray(matrix, np.float64)
    return np.linalg.solve(m + damping * np.eye(m.shape[0]), np.asarray(v, np.float64))


def pi_correction(a, g):
    """Martens & Grosse's ``pi = sqrt((tr A / dim A) / (tr G / dim G))``."""
    return np.sqrt((np.trace(a) / a.shape[0]) / (np.trace(g) / g.shape[0]))


def factored_damped(a, g, damping):
    """K-FAC factored damping, ``kron(A + pi gamma I, G + gamma/pi I)``."""
    gamma = np.sqrt(damping)
    pi = pi_correction(a, g)
    return np.kron(a + pi * gamma * np.eye(len(a)), g + gamma / pi * np.eye(len(g)))


def damped_reference(a, g, damping, mode):
    """The damped Kronecker block of ``damping_mode`` ``"eigen"`` or ``"factored"``."""
    if mode == "eigen":
        return np.kron(a, g) + damping * np.eye(len(a) * len(g))
    return factored_damped(a, g, damping)


def flat_params(layer):
    """``vec_row([W; b])``: the layer's parameters in the blocks' order, float64."""
    parts = [layer.kernel.numpy().ravel()]
    if layer.bias is not None:
        parts.append(layer.bias.numpy().ravel())
    return np.concatenate(parts).astype(np.float64)


def rel(x, y):
    """``||x - y|| / ||y||``; below ``||y|| = 1e-12`` (e.g. state that is
    still zero), the absolute error over 1e-12."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-12))


def tf_float(x):
    return tf.constant(np.asarray(x, np.float32))


def plain_kfac(learning_rate, damping, **overrides):
    """A KFAC whose step is exactly ``-lr * P(grad)`` with this batch's
    statistics (the brute-force references' setting): no momentum, no KL
    clip, statistics and inverses every step, the empirical Fisher."""
    options = dict(
        momentum=0.0,
        kl_clip=None,
        stats_decay=0.0,
        stats_every=1,
        inverse_every=1,
        fisher="empirical",
    )
    options.update(overrides)
    return keras_kfac.KFAC(learning_rate=learning_rate, damping=damping, **options)
