"""Each curvature method against brute force on tiny Dense and Conv2D layers.

Exact blocks come from per-example gradients (``GradientTape.jacobian``,
tests/reference.py); methods are fitted on one batch (statistics of that
batch only) through :func:`keras_kfac.fidelity.fitted_curvature`, or trained
one step through ``KFAC`` (test_curvature_updates.py).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_kfac.curvature as curvature_lib
from keras_kfac.curvature import factors as F
from keras_kfac.curvature.base import LayerBatch
from keras_kfac.estimator import method_names
from keras_kfac.fidelity import fitted_curvature, layer_batch
from keras_kfac.layers import block_for_layer
from reference import (
    fisher_block,
    fisher_from_ag,
    kfac_factors,
    layer_ag,
    rearrange,
    rel,
    symmetric_projector,
    symmetric_top_pairs,
)

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
# The block power iteration (kpsvd, deflation, kfac_corrected) runs with its
# defaults: they stop on convergence. Lanczos' defaults are a speed trade-off.
PRECISE = dict(lanczos_steps=12, lanczos_restarts=20, lanczos_tol=1e-6)


def precise_options(curvature):
    """The :data:`PRECISE` options the method(s) of ``curvature=`` accept
    (unknown curvature options are errors)."""
    accepted = set().union(*(curvature_lib.get(m).option_names() for m in method_names(curvature)))
    return {k: v for k, v in PRECISE.items() if k in accepted}


def make_problem(kind, n=12, seed=0):
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    if kind == "dense":
        model = keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(3, activation="tanh", name="target"),
                keras.layers.Dense(3),
            ]
        )
        x = rng.normal(size=(n, 4)).astype("float32")
    else:
        model = keras.Sequential(
            [
                keras.Input((5, 5, 2)),
                keras.layers.Conv2D(
                    3, 3, strides=2, padding="same", activation="tanh", name="target"
                ),
                keras.layers.Flatten(),
                keras.layers.Dense(3),
            ]
        )
        x = rng.normal(size=(n, 5, 5, 2)).astype("float32")
    y = rng.integers(0, 3, size=n)
    return model, model.get_layer("target"), x, y


@pytest.fixture(scope="module", params=["dense", "conv"])
def problem(request):
    model, layer, x, y = make_problem(request.param)
    f = fisher_block(model, layer, x, y, LOSS).numpy().astype(np.float64)
    a, g = layer_ag(model, layer, x, y, LOSS)
    return dict(model=model, layer=layer, x=x, y=y, F=f, a=a, g=g, kind=request.param)


def fit(problem, method, mode="eager", **options):
    """The method fitted on the problem's batch (statistics of that batch
    only): eagerly by :func:`fitted_curvature`, or from a cold start by a
    ``tf.function`` statistics update (``mode="graph"``; ``"xla"`` with
    ``jit_compile=True``)."""
    opts = precise_options(method)
    opts.update(options)
    if mode == "eager":
        return fitted_curvature(
            method, problem["model"], problem["layer"], problem["x"], problem["y"], LOSS, **opts
        )
    batch = layer_batch(problem["model"], problem["layer"], problem["x"], problem["y"], LOSS)
    return fit_batch(method, batch, mode, **opts)


def fit_batch(method, batch, mode="eager", **options):
    """``method`` after one statistics update on ``batch`` from a cold start,
    eager or in a ``tf.function`` (``"graph"``, ``"xla"``)."""
    curvature = curvature_lib.create(method, batch.block, **options)
    curvature.build(
        lambda name, shape, initializer="zeros": tf.Variable(tf.zeros(shape), name=name)
    )
    update = lambda: curvature.update_statistics(batch, tf.constant(0.0))  # noqa: E731
    if mode != "eager":
        update = tf.function(update, jit_compile=mode == "xla")
    update()
    return curvature


def matrix(problem, method, **options):
    return fit(problem, method, **options).matrix().numpy().astype(np.float64)


def dims(problem):
    return problem["a"].shape[-1], problem["g"].shape[-1]


def err(problem, m):
    return rel(m, problem["F"])


def test_reference_fisher_from_captured_a_g(problem):
    """The captured a/g reproduce the exact block: F = (1/n) sum vec(U_i) vec(U_i)^T."""
    assert rel(fisher_from_ag(problem["a"], problem["g"]), problem["F"]) < 1e-5


def test_kfac_is_kron_of_reference_factors(problem):
    a, g = kfac_factors(problem["a"], problem["g"])
    assert rel(matrix(problem, "kfac"), np.kron(a, g)) < 1e-5


def top_pairs(problem, k):
    """Top k singular triples of R(F) restricted to symmetric matrices."""
    da, dg = dims(problem)
    r = symmetric_projector(da) @ rearrange(problem["F"], da, dg) @ symmetric_projector(dg)
    u, s, vt = np.linalg.svd(r)
    return [(s[i], u[:, i], vt[i]) for i in range(k)]


def test_top_pair_of_rearranged_fisher_is_symmetric(problem):
    """The unrestricted top pair of R(F) is the symmetric one (Van Loan &
    Pitsianis), so KPSVD's restriction to symmetric matrices loses nothing."""
    da, dg = dims(problem)
    s_all = np.linalg.svd(rearrange(problem["F"], da, dg), compute_uv=False)
    assert abs(top_pairs(problem, 1)[0][0] - s_all[0]) < 1e-6 * s_all[0]


def test_kpsvd_is_top_singular_pair_of_rearranged_fisher(problem):
    da, dg = dims(problem)
    ((s, u, v),) = top_pairs(problem, 1)
    got = rearrange(matrix(problem, "kpsvd"), da, dg)
    assert rel(got, s * np.outer(u, v)) < 1e-4


def test_deflation_is_top_two_singular_pairs(problem):
    da, dg = dims(problem)
    want = sum(s * np.outer(u, v) for s, u, v in top_pairs(problem, 2))
    assert rel(rearrange(matrix(problem, "deflation"), da, dg), want) < 1e-3


def test_lanczos_equals_deflation_pairs(problem):
    lan, defl = fit(problem, "lanczos"), fit(problem, "deflation")
    for (a_l, g_l), (a_d, g_d) in zip(lan.pairs, defl.pairs):
        # Each term kron(A_k, G_k) (pairs are defined up to a joint sign and scale split).
        assert rel(F.kron(a_l, g_l).numpy(), F.kron(a_d, g_d).numpy()) < 1e-3
    (s1, _, _), (s2, _, _) = top_pairs(problem, 2)
    a2, g2 = lan.pairs[1]
    assert abs(float(tf.norm(a2) * tf.norm(g2)) - s2) < 1e-3 * s1


@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])
def test_kfac_corrected_is_kfac_plus_best_residual_pair(problem, mode):
    da, dg = dims(problem)
    a, g = kfac_factors(problem["a"], problem["g"])
    sym_a, sym_g = symmetric_projector(da), symmetric_projector(dg)
    residual = sym_a @ rearrange(problem["F"] - np.kron(a, g), da, dg) @ sym_g
    u, s, vt = np.linalg.svd(residual)
    want = np.kron(a, g) + rearrange_inverse(s[0] * np.outer(u[:, 0], vt[0]), da, dg)
    assert rel(fit(problem, "kfac_corrected", mode).matrix().numpy(), want) < 1e-4


def close_pairs_case(seed=1):
    """Dense ``a``, ``g`` (one location, no bias) whose rearranged block
    restricted to symmetric matrices has singular values ``s2, s3`` 7% apart
    and a slowly decaying tail ``s4..s8``: three examples ``sqrt(w_k) q_k``,
    ``p_k`` from orthonormal bases give the singular values ``w_k / n``
    (the ``vec(q q^T)`` are orthonormal), the others add small noise."""
    rng = np.random.default_rng(seed)
    da, dg, n = 9, 8, 60
    w = np.array([1.0, 0.45, 0.42, 0.40, 0.38, 0.36, 0.34, 0.32])
    qa = np.linalg.qr(rng.normal(size=(da, da)))[0][: len(w)]
    qg = np.linalg.qr(rng.normal(size=(dg, dg)))[0][: len(w)]
    a = np.concatenate([np.sqrt(w)[:, None] * qa, 0.05 * rng.normal(size=(n - len(w), da))])
    g = np.concatenate([qg, 0.05 * rng.normal(size=(n - len(w), dg))])
    return a[:, None].astype("float32"), g[:, None].astype("float32")


def close_pairs_spectrum(a, g):
    da, dg = a.shape[-1], g.shape[-1]
    f = fisher_from_ag(a.astype(np.float64), g.astype(np.float64))
    r = symmetric_projector(da) @ rearrange(f, da, dg) @ symmetric_projector(dg)
    return f, np.linalg.svd(r, compute_uv=False)


def fit_on(method, a, g, mode="eager", **options):
    """``method`` fitted from a cold start on given Dense ``a``, ``g``."""
    layer = keras.layers.Dense(g.shape[-1], use_bias=False)
    layer.build((None, a.shape[-1]))
    batch = LayerBatch(block_for_layer(layer), [tf.constant(a[:, 0])], [tf.constant(g[:, 0])])
    return fit_batch(method, batch, mode, **options)


def test_close_pairs_case_has_close_singular_values():
    _, s = close_pairs_spectrum(*close_pairs_case())
    assert 0.05 < (s[1] - s[2]) / s[1] < 0.08
    assert s[4] / s[1] > 0.8  # the tail is slow too: a block of 4 must iterate


@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])
def test_deflation_converges_on_close_singular_values(mode):
    """The best two pairs although s3 is within 7% of s2 (plain power
    iteration stopped on the change of sigma returned pairs 3% off)."""
    a, g = close_pairs_case()
    f, _ = close_pairs_spectrum(a, g)
    da, dg = a.shape[-1], g.shape[-1]
    got = fit_on("deflation", a, g, mode).matrix().numpy().astype(np.float64)
    assert rel(rearrange(got, da, dg), symmetric_top_pairs(f, da, dg, 2)) < 1e-3


def test_block_power_iteration_stops_on_convergence():
    """Converged pairs before the safety bound; fewer iterations (the bound)
    are not converged on this spectrum; an unreachable tolerance stops when
    roundoff is reached; a warm start from the converged vectors stops after
    one iteration."""
    a, g = close_pairs_case()
    f, s_exact = close_pairs_spectrum(a, g)
    da, dg = a.shape[-1], g.shape[-1]
    op = F.RearrangedFisher(tf.constant(a), tf.constant(g))
    starts = F.start_block([tf.zeros((dg, dg))] * 2, dg, F.block_size(2, 2, da, dg))
    want = symmetric_top_pairs(f, da, dg, 2)

    def solve(starts, tol, max_iters):
        s, y, x, i = F.top_singular_triples(op, starts, 2, tol, max_iters)
        pairs = sum(
            s[k].numpy() * np.outer(y[k].numpy().ravel(), x[k].numpy().ravel()) for k in range(2)
        )
        return rel(pairs, want), int(i), s.numpy(), x

    error, iterations, s, x = solve(starts, 1e-4, 200)
    assert error < 1e-4 and 5 < iterations < 200
    np.testing.assert_allclose(s, s_exact[:2], rtol=1e-5)
    short = iterations // 4
    assert solve(starts, 1e-4, short)[0] > 1e-3 and solve(starts, 1e-4, short)[1] == short
    error, stalled, _, _ = solve(starts, 0.0, 500)
    assert error < 1e-4 and iterations < stalled < 500
    assert solve(tf.concat([x, starts[2:]], 0), 1e-4, 200)[1] == 1


@pytest.mark.parametrize(
    "bad",
    [dict(power_iters=0), dict(power_iters=2.5), dict(power_tol=-1.0), dict(power_oversample=-1)],
)
def test_block_power_options_are_checked(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        fit_on("kpsvd", *close_pairs_case(), **bad)


def rearrange_inverse(r, da, dg):
    return r.reshape(da, da, dg, dg).transpose(0, 2, 1, 3).reshape(da * dg, da * dg)


def test_ekfac_is_best_diagonal_in_kfac_eigenbasis(problem):
    a, g = kfac_factors(problem["a"], problem["g"])
    q = np.kron(np.linalg.eigh(a)[1], np.linalg.eigh(g)[1])
    s = np.diag(q.T @ problem["F"] @ q)  # = E[(Q^T u)^2]
    want = q @ np.diag(s) @ q.T
    got = matrix(problem, "ekfac")
    assert rel(got, want) < 1e-4
    kfac = matrix(problem, "kfac")
    assert err(problem, got) <= err(problem, kfac) + 1e-6


def test_diagonal_is_fisher_diagonal(problem):
    assert rel(matrix(problem, "diagonal"), np.diag(np.diag(problem["F"]))) < 1e-5


def test_fidelity_inequalities(problem):
    """Optimality that holds on every batch: KPSVD is the best single pair,
    deflation/Lanczos the best two pairs, EKFAC the best diagonal in K-FAC's
    basis, KFAC-corrected adds the best pair of K-FAC's residual."""
    e = {
        m: err(problem, matrix(problem, m))
        for m in ("kfac", "ekfac", "kpsvd", "deflation", "lanczos", "kfac_corrected")
    }
    tol = 1e-5
    assert e["ekfac"] <= e["kfac"] + tol
    assert e["kpsvd"] <= e["kfac"] + tol
    assert e["deflation"] <= e["kpsvd"] + tol
    assert abs(e["lanczos"] - e["deflation"]) < 1e-4
    assert e["kfac_corrected"] <= e["kfac"] + tol
    assert e["deflation"] <= e["kfac_corrected"] + tol


def dense_preconditioner(curvature, shape, damping, batch=None):
    """P as a dense (P, P) matrix, column k = vec(P(E_k))."""
    da, dg = shape
    cols = []
    for k in range(da * dg):
        e = tf.reshape(tf.one_hot(k, da * dg), (da, dg))
        cols.append(tf.reshape(curvature.precondition(e, tf.constant(damping), batch), (-1,)))
    return tf.stack(cols, axis=1).numpy().astype(np.float64)


@pytest.mark.parametrize(
    "method",
    [
        "kfac",
        "ekfac",
        "kpsvd",
        "deflation",
        "kfac_corrected",
        "lanczos",
        "tengrad",
        "cgfac",
        "diagonal",
    ],
)
@pytest.mark.parametrize("damping", [1e-1, 1e-4])
def test_preconditioner_is_symmetric_positive_definite(problem, method, damping):
    from keras_kfac.fidelity import layer_batch

    options = dict(cg_max_iters=400, cg_tol=1e-10) if method == "cgfac" else {}
    curvature = fit(problem, method, damping=damping, **options)
    batch = layer_batch(problem["model"], problem["layer"], problem["x"], problem["y"], LOSS)
    if method == "cgfac":  # cold start per column: P is then a fixed linear map
        p = _cold_dense(curvature, dims(problem), damping, batch)
    else:
        p = dense_preconditioner(curvature, dims(problem), damping, batch)
    scale = np.abs(p).max()
    assert np.abs(p - p.T).max() < 1e-3 * scale
    assert np.linalg.eigvalsh(0.5 * (p + p.T)).min() > 0


def _cold_dense(curvature, shape, damping, batch):
    da, dg = shape
    cols = []
    for k in range(da * dg):
        curvature.solution.assign(tf.zeros_like(curvature.solution))
        e = tf.reshape(tf.one_hot(k, da * dg), (da, dg))
        cols.append(tf.reshape(curvature.precondition(e, tf.constant(damping), batch), (-1,)))
    return tf.stack(cols, axis=1).numpy().astype(np.float64)


@pytest.mark.parametrize("method", ["deflation", "kfac_corrected", "lanczos"])
def test_two_term_simultaneous_diagonalization(problem, method):
    """Unclipped, ``kron(K1,K2)^-T diag(1 + s1 s2^T) kron(K1,K2)^-1`` is the
    damped two-term matrix ``kron(A1',G1') + kron(A2,G2)``; with the clip, the
    matrix P inverts is that matrix wherever the clip does not bind."""
    damping = 1e-2
    curvature = fit(problem, method, damping=damping)
    (a1, g1), (a2, g2) = [(a.numpy(), g.numpy()) for a, g in curvature.pairs]
    da_, dg_ = [float(d) for d in F.factored_damping(a1, g1, damping)]
    k1, s1, k2, s2 = [
        t.numpy().astype(np.float64) for t in F.two_term_basis(a1, g1, a2, g2, da_, dg_)
    ]
    k_inv = np.linalg.inv(np.kron(k1, k2))
    unclipped = k_inv.T @ np.diag((1 + np.outer(s1, s2)).ravel()) @ k_inv
    # A1, G1 are PSD here (clipping at 0 in two_term_basis changes nothing).
    want = np.kron(a1 + da_ * np.eye(len(a1)), g1 + dg_ * np.eye(len(g1))) + np.kron(a2, g2)
    assert rel(unclipped, want) < 1e-3
    # P is applied through the stored scale; where it was not clipped it is 1 + s1 s2^T.
    scale = curvature.scale.numpy()
    free = scale > 1.0 + np.outer(s1, s2) - 1e-6
    assert np.allclose(scale[free], (1.0 + np.outer(s1, s2))[free], rtol=1e-4, atol=1e-6)
