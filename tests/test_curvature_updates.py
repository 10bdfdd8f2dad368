"""One KFAC step with each curvature method equals ``-lr * solve(F_hat +
damping, grad)`` for that method's F_hat, computed by brute force.

``KFAC(momentum=0, kl_clip=None, stats_decay=0, stats_every=1, inverse_every=1,
fisher="empirical")`` and one train step on a fixed batch, so the
statistics are that batch's.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_kfac
from reference import (
    factored_damped,
    fisher_block,
    flat_params,
    kfac_factors,
    layer_ag,
    per_example_gradients,
    plain_kfac,
    rel,
    symmetric_top_pairs,
)
from test_curvature_methods import LOSS, make_problem, precise_options, rearrange_inverse

LR, DAMPING = 0.1, 0.05


def brute_force(model, layer, x, y):
    """Gradient, exact Fisher block and K-FAC factors at the current weights.
    Call it before ``compile`` or after the last step: the brute-force capture
    temporarily replaces ``layer.call``."""
    u = per_example_gradients(model, layer, x, y, LOSS).numpy().astype(np.float64)
    ref = dict(
        grad=u.mean(0),
        F=fisher_block(model, layer, x, y, LOSS).numpy().astype(np.float64),
    )
    ref["A"], ref["G"] = [
        m.astype(np.float64) for m in kfac_factors(*layer_ag(model, layer, x, y, LOSS))
    ]
    return ref


def setup(method, kind, mode="graph", n=12, damping_mode="factored", **options):
    model, layer, x, y = make_problem(kind, n=n)
    ref = brute_force(model, layer, x, y)
    opts = precise_options(method)
    opts.update(options)
    opt = plain_kfac(
        LR, DAMPING, curvature=method, damping_mode=damping_mode, curvature_options=opts
    )
    model.compile(optimizer=opt, loss=LOSS, run_eagerly=mode == "eager", jit_compile=mode == "xla")
    return model, layer, x, y, opt, ref


def step(model, layer, x, y):
    before = flat_params(layer).astype(np.float64)
    model.train_on_batch(x, y)
    return flat_params(layer).astype(np.float64) - before


def expect(delta, damped, grad, tol=1e-3):
    want = -LR * np.linalg.solve(damped, grad)
    assert rel(delta, want) < tol, rel(delta, want)


def top_pairs_matrix(f, da, dg, k):
    return rearrange_inverse(symmetric_top_pairs(f, da, dg, k), da, dg)


# Graph mode on both layers; XLA on the Dense one (compiles are slow here).
CASES = [("dense", "graph"), ("conv", "graph"), ("dense", "xla")]


@pytest.mark.parametrize("kind,mode", CASES)
@pytest.mark.parametrize("damping_mode", ["factored", "eigen"])
def test_kpsvd_step(kind, mode, damping_mode):
    model, layer, x, y, opt, ref = setup("kpsvd", kind, mode, damping_mode=damping_mode)
    delta = step(model, layer, x, y)
    c = opt.curvature_for(layer)
    a, g = c.a.numpy().astype(np.float64), c.g.numpy().astype(np.float64)
    da, dg = len(a), len(g)
    assert rel(np.kron(a, g), top_pairs_matrix(ref["F"], da, dg, 1)) < 1e-3
    if damping_mode == "factored":
        damped = factored_damped(a, g, DAMPING)
    else:
        damped = np.kron(a, g) + DAMPING * np.eye(da * dg)
    expect(delta, damped, ref["grad"])


@pytest.mark.parametrize("kind,mode", CASES)
@pytest.mark.parametrize("method", ["deflation", "lanczos", "kfac_corrected"])
def test_two_term_step(method, kind, mode):
    model, layer, x, y, opt, ref = setup(method, kind, mode)
    delta = step(model, layer, x, y)
    da, dg = len(ref["A"]), len(ref["G"])
    got = opt.curvature_matrix(layer).numpy().astype(np.float64)
    if method == "kfac_corrected":
        kf = np.kron(ref["A"], ref["G"])
        want = kf + top_pairs_matrix(ref["F"] - kf, da, dg, 1)
    else:
        want = top_pairs_matrix(ref["F"], da, dg, 2)
    assert rel(got, want) < 2e-3
    damped = opt.curvature_for(layer).preconditioner_inverse().numpy().astype(np.float64)
    assert np.linalg.eigvalsh(0.5 * (damped + damped.T)).min() > 0
    expect(delta, damped, ref["grad"])


@pytest.mark.parametrize("kind,mode", CASES)
def test_ekfac_step(kind, mode):
    """First step with lr = 0 (sets the eigenbasis), second the real one: the
    scaling is then that batch's E[(Q^T u)^2] in that batch's basis."""
    model, layer, x, y, opt, ref = setup("ekfac", kind, mode)
    opt.learning_rate = 0.0
    model.train_on_batch(x, y)
    opt.learning_rate = LR
    delta = step(model, layer, x, y)
    q = np.kron(np.linalg.eigh(ref["A"])[1], np.linalg.eigh(ref["G"])[1])
    want = q @ np.diag(np.diag(q.T @ ref["F"] @ q)) @ q.T
    got = opt.curvature_matrix(layer).numpy().astype(np.float64)
    assert rel(got, want) < 1e-3
    expect(delta, got + DAMPING * np.eye(len(got)), ref["grad"])


@pytest.mark.parametrize("kind,mode", CASES)
def test_tengrad_step_is_exact_damped_natural_gradient(kind, mode):
    model, layer, x, y, opt, ref = setup("tengrad", kind, mode)
    delta = step(model, layer, x, y)
    expect(delta, ref["F"] + DAMPING * np.eye(len(ref["F"])), ref["grad"], tol=1e-4)


@pytest.mark.parametrize("kind,mode", CASES)
def test_cgfac_step_converges_to_eigen_kfac(kind, mode):
    model, layer, x, y, opt, ref = setup("cgfac", kind, mode, cg_max_iters=300, cg_tol=1e-7)
    delta = step(model, layer, x, y)
    damped = np.kron(ref["A"], ref["G"]) + DAMPING * np.eye(len(ref["F"]))
    expect(delta, damped, ref["grad"])
    # ... and equals KFAC(damping_mode="eigen") on the same model and batch.
    model2, layer2, x2, y2, _, _ = setup("kfac", kind, mode, damping_mode="eigen")
    assert rel(delta, step(model2, layer2, x2, y2)) < 1e-3


def test_cgfac_iteration_cap_and_warm_start():
    """One CG iteration per step (cg_max_iters=1, cg_tol=0): the first step is
    one iteration from zero, far from converged; the second is one iteration
    from the first step's solution on the new gradient and factors, and lands
    nearer the exact solve than one iteration from zero would."""
    model, layer, x, y, opt, ref = setup("cgfac", "dense", cg_max_iters=1, cg_tol=0.0)

    def damped(r):
        return np.kron(r["A"], r["G"]) + DAMPING * np.eye(len(r["F"]))

    def one_iteration(m, v, x0):
        r = v - m @ x0
        return x0 + (r @ r) / (r @ m @ r) * r

    first = one_iteration(damped(ref), ref["grad"], np.zeros_like(ref["grad"]))
    assert rel(step(model, layer, x, y), -LR * first) < 1e-4
    assert rel(first, np.linalg.solve(damped(ref), ref["grad"])) > 0.1
    assert rel(opt.curvature_for(layer).solution.numpy().ravel(), first) < 1e-4

    weights = model.get_weights()
    delta = step(model, layer, x, y)
    model.set_weights(weights)
    ref2 = brute_force(model, layer, x, y)
    exact = np.linalg.solve(damped(ref2), ref2["grad"])
    warm = one_iteration(damped(ref2), ref2["grad"], first)
    cold = one_iteration(damped(ref2), ref2["grad"], np.zeros_like(first))
    # Measured: the step is the warm iteration to 4e-7 (0.29 from the cold
    # one); relative error to the exact solve 0.10 warm against 0.30 cold.
    assert rel(delta, -LR * warm) < 1e-4
    assert rel(warm, exact) < 0.5 * rel(cold, exact), (rel(warm, exact), rel(cold, exact))


@pytest.mark.parametrize("kind,mode", CASES)
def test_diagonal_step(kind, mode):
    model, layer, x, y, opt, ref = setup("diagonal", kind, mode)
    delta = step(model, layer, x, y)
    expect(delta, np.diag(np.diag(ref["F"])) + DAMPING * np.eye(len(ref["F"])), ref["grad"])


@pytest.mark.parametrize("n,choice", [(2, "tengrad"), (12, "kfac")])
def test_auto_static_choice_and_summary(n, choice):
    """The target Dense 4->3 (a_dim 5, g_dim 3, T 1) at the optimizer's cadence
    (statistics and inversion every step), flops per step: Woodbury
    ``n^2 (a+g) + n^3/3 + 6 n a g`` against K-FAC ``2 n (a^2 + g^2 + a g) +
    2 a g (a + g) + a^3 + g^3``: n = 2 gives 215 < 588 (TENGraD), n = 12 gives
    2808 > 1568 (K-FAC)."""
    model, layer, x, y, opt, ref = setup("auto", "dense", n=n, batch_size=n)
    delta = step(model, layer, x, y)
    c = opt.curvature_for(layer)
    assert c.name == f"auto:{choice}"
    rows = [line.split()[:5] for line in opt.summary(print_fn=lambda s: None).splitlines()]
    assert ["target", "Dense", c.name, "5", "3"] in rows
    if choice == "tengrad":
        expect(delta, ref["F"] + DAMPING * np.eye(len(ref["F"])), ref["grad"], tol=1e-4)
    else:
        expect(delta, factored_damped(ref["A"], ref["G"], DAMPING), ref["grad"])


@pytest.mark.parametrize("n", [2, 12])
def test_auto_runtime_choice_follows_batch_size(n):
    model, layer, x, y, opt, ref = setup("auto", "dense", n=n)
    delta = step(model, layer, x, y)
    c = opt.curvature_for(layer)
    assert c.name == f"auto:tengrad<={c.crossover}" and 2 <= c.crossover < 12
    if n <= c.crossover:
        expect(delta, ref["F"] + DAMPING * np.eye(len(ref["F"])), ref["grad"], tol=1e-4)
    else:
        expect(delta, factored_damped(ref["A"], ref["G"], DAMPING), ref["grad"])


def test_auto_rule_prefers_woodbury_for_small_batches_on_wide_layers():
    from keras_kfac.curvature.auto import crossover

    wide = crossover(785, 1000, 1, 20.0)
    narrow = crossover(5, 3, 1, 20.0)
    assert wide > 500 and narrow < 12
    from keras_kfac.curvature.auto import kronecker_cost, woodbury_cost

    for da, dg, t in [(785, 1000, 1), (289, 32, 196), (31, 784, 1)]:
        n = crossover(da, dg, t, 20.0)
        assert woodbury_cost(n, da, dg, t) <= kronecker_cost(n, da, dg, t, 20.0)
        assert woodbury_cost(n + 1, da, dg, t) > kronecker_cost(n + 1, da, dg, t, 20.0)


def test_auto_uses_the_optimizers_cadence():
    """Sparse statistics make K-FAC cheaper, so auto's crossover batch size
    falls; on the autoencoder's 785x1000 layer at batch 1000 with the default
    cadence it must choose K-FAC (TENGraD there measured ~20x slower)."""
    from keras_kfac.curvature.auto import crossover

    assert crossover(785, 1000, 1, 20.0, 10.0) < 1000 <= crossover(785, 1000, 1, 20.0, 1.0)

    def built(**kwargs):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(40), keras.layers.Dense(3)])
        opt = keras_kfac.KFAC(curvature="auto", **kwargs)
        model.compile(optimizer=opt, loss="mse")
        model.fit(np.ones((4, 6)), np.ones((4, 3)), verbose=0)
        return opt.curvature_for(model.layers[0]).crossover

    assert built(stats_every=10) < built(stats_every=1)
    assert built(stats_every=1) == built(stats_every=1, curvature_options={"stats_every": 1})


def test_tengrad_conv_with_unknown_locations_matches_static():
    """An unknown number of locations (e.g. variable image size) takes the
    formed-gradient path of the Gram matrix; same values, bounded memory."""
    from keras_kfac.curvature import factors as F

    rng = np.random.default_rng(0)
    a = tf.constant(rng.normal(size=(5, 9, 4)), tf.float32)
    g = tf.constant(rng.normal(size=(5, 9, 3)), tf.float32)
    v = tf.constant(rng.normal(size=(4, 3)), tf.float32)
    unknown = tf.TensorSpec((None, None, 4)), tf.TensorSpec((None, None, 3))
    dynamic = tf.function(lambda a, g: F.woodbury_solve(a, g, v, 0.1), input_signature=unknown)
    u = np.einsum("nta,ntg->nag", a, g).reshape(5, -1)
    want = np.linalg.solve(u.T @ u / 5 + 0.1 * np.eye(12), v.numpy().reshape(-1)).reshape(4, 3)
    atol = 1e-4 * np.abs(want).max()  # float32 Woodbury: cancellation in v - U^T c
    np.testing.assert_allclose(dynamic(a, g), want, rtol=1e-4, atol=atol)
    np.testing.assert_allclose(F.woodbury_solve(a, g, v, 0.1), want, rtol=1e-4, atol=atol)


def test_conv_block_keeps_static_locations_with_dynamic_batch():
    from keras_kfac.layers import block_for_layer

    layer = keras.layers.Conv2D(2, 3)
    layer.build((None, 8, 8, 3))
    block = block_for_layer(layer)
    seen = {}

    @tf.function(input_signature=[tf.TensorSpec((None, 8, 8, 3))])
    def locations(x):
        seen["a"] = block._locations(x).shape
        seen["g"] = block._output_locations(layer(x)).shape
        return x

    locations(tf.zeros((2, 8, 8, 3)))
    assert seen["a"][1:] == (36, 27) and seen["g"][1:] == (36, 2)


def test_per_layer_choice():
    model, layer, x, y, opt, ref = setup({"target": "tengrad", "default": "ekfac"}, "dense")
    step(model, layer, x, y)
    assert opt.curvature_for(layer).name == "tengrad"
    assert opt.curvature_for(model.layers[-1]).name == "ekfac"
