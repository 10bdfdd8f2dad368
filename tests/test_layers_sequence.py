"""EinsumDense and Embedding blocks, K-FAC-expand/-reduce weight sharing and
the size guard (diagonal factors), against brute force: per-example gradients
by ``GradientTape.jacobian``, factors and one-step updates in numpy."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_kfac
from keras_kfac.capture import candidate_layers
from keras_kfac.curvature.ekfac import EKFAC
from keras_kfac.curvature.kfac import KFAC as KFACCurvature
from keras_kfac.layers import block_for_layer, unsupported_reason
from reference import factored_damped, layer_ag, layer_batch, per_example_gradients, plain_kfac, rel

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
LR, DAMPING = 0.1, 0.05


def per_example_from_ag(block, a, g):
    """``from_matrix(sum_t a_t g_t^T)`` per example, flattened in parameter order."""
    rows = []
    for ai, gi in zip(a, g):
        parts = block.from_matrix(tf.constant(ai.T @ gi))
        rows.append(np.concatenate([np.asarray(tf.convert_to_tensor(p)).ravel() for p in parts]))
    return np.stack(rows)


def reference_factors(a, g, mode):
    """numpy K-FAC-expand / -reduce factors (README, curvature.base)."""
    if mode == "reduce":
        a, g = a.mean(1, keepdims=True), g.sum(1, keepdims=True)
    n, t = a.shape[0], a.shape[1]
    a2, g2 = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
    return a2.T @ a2 / n, g2.T @ g2 / (n * t)


# --- EinsumDense ---------------------------------------------------------------
# (equation, output_shape, bias_axes, input shape without batch)
EQUATIONS = [
    ("abc,cd->abd", (5, 3), "d", (5, 4)),  # Dense over a sequence
    ("abc,cde->abde", (5, 2, 3), "de", (5, 4)),  # attention query/key/value
    ("abcd,cde->abe", (5, 3), "e", (5, 2, 3)),  # attention output
    ("abc,dc->abd", (5, 3), "d", (5, 4)),  # kernel stored (g, a)
    ("abc,cde->adbe", (2, 5, 3), "de", (5, 4)),  # location between g axes: bias (2, 1, 3)
    ("...b,bc->...c", (3,), "c", (5, 4)),  # ellipsis
    ("ab,bc->ac", (3,), None, (4,)),  # no locations, no bias
]


def einsum_problem(equation, output_shape, bias_axes, in_shape, n=6, seed=0):
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    model = keras.Sequential(
        [
            keras.Input(in_shape),
            keras.layers.EinsumDense(
                equation,
                output_shape,
                bias_axes=bias_axes,
                activation="tanh",
                bias_initializer="random_normal",
                name="target",
            ),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
    )
    x = rng.normal(size=(n,) + in_shape).astype("float32")
    y = rng.integers(0, 3, size=n)
    return model, model.get_layer("target"), x, y


@pytest.mark.parametrize("case", EQUATIONS, ids=[e[0] for e in EQUATIONS])
def test_einsum_dense_per_example_gradients_exact(case):
    model, layer, x, y = einsum_problem(*case)
    block = block_for_layer(layer)
    assert block is not None, unsupported_reason(layer)
    a, g = layer_ag(model, layer, x, y, LOSS)
    assert a.shape[-1] == block.a_dim and g.shape[-1] == block.g_dim
    u = per_example_gradients(model, layer, x, y, LOSS).numpy()
    assert rel(per_example_from_ag(block, a, g), u) < 1e-5
    v = tf.random.normal((block.a_dim, block.g_dim))
    assert rel(block.to_matrix(block.from_matrix(v)).numpy(), v.numpy()) == 0.0


@pytest.mark.parametrize(
    "equation,output_shape,bias_axes,reason",
    [
        ("abc,cde->abde", (5, 2, 3), "e", "bias_axes"),  # bias over some g axes only
        ("abc,cd->abd", (5, 3), "bd", "bias_axes"),  # bias per location
        ("abc,bcd->abd", (5, 3), None, "block-diagonal"),  # per-location weights
    ],
)
def test_einsum_dense_refuses_inexact_layouts(equation, output_shape, bias_axes, reason):
    layer = keras.layers.EinsumDense(equation, output_shape, bias_axes=bias_axes)
    layer.build((None, 5, 4))
    assert block_for_layer(layer) is None
    assert reason in unsupported_reason(layer)


def mha_model(n=5, seed=0):
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    inp = keras.Input((4, 6))
    h = keras.layers.MultiHeadAttention(2, 3, name="mha")(inp, inp)
    out = keras.layers.Dense(3)(keras.layers.Flatten()(h))
    model = keras.Model(inp, out)
    return model, rng.normal(size=(n, 4, 6)).astype("float32"), rng.integers(0, 3, size=n)


def test_multi_head_attention_projections_found_and_exact():
    model, x, y = mha_model()
    einsum = [x for x in candidate_layers(model) if isinstance(x, keras.layers.EinsumDense)]
    assert sorted(x.name for x in einsum) == ["attention_output", "key", "query", "value"]
    for layer in einsum:
        block = block_for_layer(layer, model=model)
        assert block is not None, unsupported_reason(layer)
        # The output is flattened (not pooled) before the loss: auto picks
        # expand (see test_auto_weight_sharing_tells_flatten_from_pooling).
        assert block.weight_sharing == "expand"
        a, g = layer_ag(model, layer, x, y, LOSS)
        u = per_example_gradients(model, layer, x, y, LOSS).numpy()
        # key and value are both called on the same input: still one use each.
        assert rel(per_example_from_ag(block, a, g), u) < 1e-5, layer.name
    opt = keras_kfac.KFAC(model=model, fisher="empirical")
    text = opt.summary(print_fn=lambda s: None)
    assert "fallback" not in text


# --- one step through the optimizer --------------------------------------------
def compiled(model, mode, **options):
    opt = plain_kfac(LR, DAMPING, curvature_options=options)
    model.compile(optimizer=opt, loss=LOSS, run_eagerly=mode == "eager", jit_compile=mode == "xla")
    return opt


def flat(block):
    return np.concatenate([np.asarray(v).ravel() for v in block.variables]).astype(np.float64)


def expect_step(model, layer, x, y, damped):
    block = block_for_layer(layer)
    grad = per_example_gradients(model, layer, x, y, LOSS).numpy().astype(np.float64).mean(0)
    before = flat(block)
    model.train_on_batch(x, y)
    want = -LR * np.linalg.solve(damped, grad)
    assert rel(flat(block) - before, want) < 1e-3, rel(flat(block) - before, want)


# Every mode with the default weight sharing, the other one in graph mode.
@pytest.mark.parametrize(
    "mode,sharing", [("graph", "auto"), ("eager", "auto"), ("xla", "auto"), ("graph", "reduce")]
)
def test_einsum_dense_one_step(mode, sharing):
    model, layer, x, y = einsum_problem(*EQUATIONS[1])
    opt = compiled(model, mode, weight_sharing=sharing)
    a, g = layer_ag(model, layer, x, y, LOSS)
    # Flatten before the loss: auto is expand.
    resolved = "expand" if sharing == "auto" else sharing
    A, G = reference_factors(a.astype(np.float64), g.astype(np.float64), resolved)
    expect_step(model, layer, x, y, factored_damped(A, G, DAMPING))
    assert (
        opt.estimator.blocks[[b.layer for b in opt.estimator.blocks].index(layer)].weight_sharing
        == resolved
    )
    assert f"AxG,{resolved}" in opt.summary(print_fn=lambda s: None)


# --- K-FAC-expand / K-FAC-reduce exactness (Eschenhagen et al. 2023) ------------
T, D_IN, C = 3, 4, 2


def linear_net(kind, pooled, seed=0, n=7):
    """A deep linear network with weight sharing over T locations; output
    per location (n, T, C) or pooled over the locations (n, C)."""
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    if kind == "dense":
        target = keras.layers.Dense(3, name="target", bias_initializer="random_normal")
    else:
        target = keras.layers.EinsumDense("abc,cde->abde", (T, 3, 2), bias_axes="de", name="target")
    layers = [keras.Input((T, D_IN)), target]
    if kind != "dense":
        layers.append(keras.layers.Reshape((T, 6)))
    layers += [keras.layers.Dense(4), keras.layers.Dense(C)]
    if pooled:
        layers.append(keras.layers.GlobalAveragePooling1D())
    model = keras.Sequential(layers)
    return model, model.get_layer("target"), rng.normal(size=(n, T, D_IN)).astype("float32")


def output_coordinates(pooled):
    """Each output coordinate as a "loss": for the Gaussian likelihood the
    Fisher is (1/n) sum_i sum_k J_ik^T J_ik, J_ik = d f_k(x_i) / d theta."""
    if pooled:
        return [lambda y, p, c=c: p[:, c] for c in range(C)]
    return [lambda y, p, t=t, c=c: p[:, t, c] for t in range(T) for c in range(C)]


@pytest.mark.parametrize("kind", ["dense", "einsum"])
@pytest.mark.parametrize("pooled", [False, True], ids=["per_location_loss", "pooled_loss"])
def test_expand_and_reduce_exact_in_their_setting(kind, pooled):
    model, layer, x = linear_net(kind, pooled)
    y = np.zeros(len(x))
    exact, factors = 0.0, {"expand": [None, 0.0], "reduce": [None, 0.0]}
    for fn in output_coordinates(pooled):
        u = per_example_gradients(model, layer, x, y, fn).numpy().astype(np.float64)
        exact = exact + u.T @ u / len(x)
        batch = layer_batch(model, layer, x, y, fn)
        for mode, f in factors.items():
            batch.block.weight_sharing = mode
            f[0] = batch.factor_a().numpy().astype(np.float64)  # same for every coordinate
            f[1] = f[1] + batch.factor_g().numpy().astype(np.float64)
    errors = {mode: rel(np.kron(a, g), exact) for mode, (a, g) in factors.items()}
    right, wrong = ("reduce", "expand") if pooled else ("expand", "reduce")
    assert errors[right] < 1e-5, errors
    assert errors[wrong] > 1e-2, errors
    assert block_for_layer(layer, model=model).weight_sharing == right  # "auto"


def test_weight_sharing_option_per_layer_and_validation():
    model, layer, _ = linear_net("dense", pooled=True)
    assert (
        block_for_layer(layer, model=model, weight_sharing={"target": "expand"}).weight_sharing
        == "expand"
    )
    assert (
        block_for_layer(layer, model=model, weight_sharing={"default": "reduce"}).weight_sharing
        == "reduce"
    )
    with pytest.raises(ValueError, match="weight_sharing"):
        block_for_layer(layer, model=model, weight_sharing="mean")
    with pytest.raises(ValueError, match="default"):
        block_for_layer(layer, model=model, weight_sharing={"other": "reduce"})


@pytest.mark.parametrize("head, expected", [("flatten", "expand"), ("pooling", "reduce")])
def test_auto_weight_sharing_tells_flatten_from_pooling(head, expected):
    """Flatten keeps each position's features apart (the next layer weights
    them separately): expand approximates that Fisher block better (see
    ``layers.base._flattened_after``); pooling is reduce's exact setting."""
    inputs = keras.Input((6, 3))
    h = keras.layers.Dense(5, activation="tanh", name="target")(inputs)
    h = keras.layers.Flatten()(h) if head == "flatten" else keras.layers.GlobalAveragePooling1D()(h)
    model = keras.Model(inputs, keras.layers.Dense(4)(h))
    assert block_for_layer(model.get_layer("target"), model=model).weight_sharing == expected


# --- Embedding -----------------------------------------------------------------
VOCAB, DIM, LEN = 9, 3, 5


def embedding_problem(n=6, seed=0, vocab=VOCAB):
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    model = keras.Sequential(
        [
            keras.Input((LEN,), dtype="int32"),
            keras.layers.Embedding(vocab, DIM, name="target"),
            keras.layers.Dense(4, activation="tanh"),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
    )
    # Repeated ids within and across examples; some ids unused.
    x = rng.integers(0, min(vocab, 6), size=(n, LEN)).astype("int32")
    return model, model.get_layer("target"), x, rng.integers(0, 3, size=n)


def test_embedding_per_example_gradients_and_diagonal_factor():
    model, layer, x, y = embedding_problem()
    block = block_for_layer(layer)
    a, g = layer_ag(model, layer, x, y, LOSS)  # brute force only: forms the one-hot
    u = per_example_gradients(model, layer, x, y, LOSS).numpy()
    assert rel(per_example_from_ag(block, a, g), u) < 1e-5
    batch = layer_batch(model, layer, x, y, LOSS)
    for mode in ("expand", "reduce"):
        batch.block.weight_sharing = mode
        A, G = reference_factors(a.astype(np.float64), g.astype(np.float64), mode)
        if mode == "expand":
            assert np.allclose(A, np.diag(np.diag(A)))  # one-hot: exactly diagonal
        np.testing.assert_allclose(batch.factor_a().numpy(), np.diag(A), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(batch.factor_g().numpy(), G, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(
    "mode,sharing",
    [("graph", "expand"), ("eager", "expand"), ("xla", "expand"), ("graph", "reduce")],
)
def test_embedding_one_step(mode, sharing):
    model, layer, x, y = embedding_problem()
    compiled(model, mode, weight_sharing=sharing)
    a, g = layer_ag(model, layer, x, y, LOSS)
    A, G = reference_factors(a.astype(np.float64), g.astype(np.float64), sharing)
    expect_step(model, layer, x, y, factored_damped(np.diag(np.diag(A)), G, DAMPING))


def test_embedding_gradient_stays_sparse_through_the_preconditioner():
    model, layer, x, y = embedding_problem()
    block = block_for_layer(layer)
    curvature = KFACCurvature(block)
    curvature.build(
        lambda name, shape, initializer="zeros": tf.Variable(
            keras.initializers.get(initializer)(shape, dtype="float32")
        )
    )
    curvature.update_statistics(layer_batch(model, layer, x, y, LOSS), tf.constant(0.0))
    curvature.refresh(tf.constant(DAMPING))
    with tf.GradientTape() as tape:
        loss = LOSS(y, model(x))
    grad = tape.gradient(loss, block.variables)
    assert isinstance(grad[0], tf.IndexedSlices)
    v = block.to_matrix(grad)
    p = curvature.precondition(v, tf.constant(DAMPING))
    (d,) = block.from_matrix(p)
    assert isinstance(v, tf.IndexedSlices) and isinstance(d, tf.IndexedSlices)
    assert d.values.shape[0] == x.size  # rows of this batch's ids, not the vocabulary
    dense_v = tf.convert_to_tensor(grad[0])
    np.testing.assert_allclose(tf.convert_to_tensor(v).numpy(), dense_v.numpy(), atol=1e-7)
    want = curvature.a_inverse.numpy()[:, None] * (dense_v.numpy() @ curvature.g_inverse.numpy())
    np.testing.assert_allclose(tf.convert_to_tensor(d).numpy(), want, rtol=1e-5, atol=1e-7)


def test_embedding_memory_has_no_vocabulary_squared_state():
    vocab = 3000
    model, layer, x, y = embedding_problem(vocab=vocab)
    opt = compiled(model, "graph")
    model.train_on_batch(x, y)
    shapes = [tuple(v.shape) for v in opt.variables]
    assert max(np.prod(s) for s in shapes if s) <= vocab * DIM
    assert (vocab,) in shapes and (DIM, DIM) in shapes
    assert "diag(A)xG" in opt.summary(print_fn=lambda s: None)


def test_methods_without_diagonal_factors_refuse_clearly():
    model, layer, x, y = embedding_problem()
    with pytest.raises(ValueError, match="use curvature='kfac'"):
        EKFAC(block_for_layer(layer))
    # Through the optimizer the embedding keeps kfac whatever the choice.
    opt = keras_kfac.KFAC(model=model, curvature="ekfac", fisher="empirical")
    model.compile(optimizer=opt, loss=LOSS)
    model.train_on_batch(x, y)
    assert opt.curvature_for(layer).name == "kfac"


# --- size guard ------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["graph", "xla"])
def test_size_guard_diagonal_input_factor_one_step(mode):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    model = keras.Sequential(
        [
            keras.Input((40,)),
            keras.layers.Dense(3, activation="tanh", name="target"),
            keras.layers.Dense(3),
        ]
    )
    layer = model.get_layer("target")
    x, y = rng.normal(size=(8, 40)).astype("float32"), rng.integers(0, 3, size=8)
    opt = compiled(model, mode, max_factor_dim=32)
    a, g = layer_ag(model, layer, x, y, LOSS)
    A, G = reference_factors(a.astype(np.float64), g.astype(np.float64), "expand")
    expect_step(model, layer, x, y, factored_damped(np.diag(np.diag(A)), G, DAMPING))
    text = opt.summary(print_fn=lambda s: None)
    assert "target" in text and "diag(A)xG" in text
    assert opt.curvature_for(layer).a.shape == (41,)


def test_size_guard_on_a_vgg16_sized_dense_by_default():
    model = keras.Sequential(
        [keras.Input((25088,)), keras.layers.Dense(8, name="fc"), keras.layers.Dense(2)]
    )
    opt = keras_kfac.KFAC(model=model, fisher="empirical")
    text = opt.summary(print_fn=lambda s: None)
    fc_line = next(line for line in text.splitlines() if line.startswith("fc"))
    assert "diag(A)xG" in fc_line
    assert max(np.prod(v.shape) for v in opt.variables) <= 25089 * 8


def _structures(model, **options):
    opt = keras_kfac.KFAC(model=model, fisher="empirical", curvature_options=options or None)
    text = opt.summary(print_fn=lambda s: None)
    return {
        name: next(line for line in text.splitlines() if line.startswith(name))
        .split()[-1]
        .split(",")[0]
        for name in ("wide", "tall", "head", "conv")
    }


def test_size_guard_ratio_keeps_factors_far_larger_than_the_layer_diagonal():
    # The conditional GAN's shapes, scaled down: a Dense whose G (2100) is
    # > 32x its A (65), a Conv2D whose A (7*7*43 + 1 = 2108) is > 32x its G
    # (1); an MNIST-convnet-like head (1601 x 10) is under the 2048 floor.
    inputs = keras.Input((64,))
    h = keras.layers.Dense(2100, name="wide")(inputs)
    h = keras.layers.Reshape((10, 10, 21))(h)
    h = keras.layers.Conv2D(43, 1, name="tall")(h)
    h = keras.layers.Conv2D(1, 7, padding="same", name="conv")(h)
    h = keras.layers.Dense(1601)(keras.layers.Flatten()(h))
    model = keras.Model(inputs, keras.layers.Dense(10, name="head")(h))
    assert _structures(model) == {
        "wide": "Axdiag(G)",
        "tall": "AxG",
        "conv": "diag(A)xG",
        "head": "AxG",
    }
    off = _structures(model, max_factor_ratio=None)
    assert set(off.values()) == {"AxG"}
    per_layer = _structures(model, max_factor_ratio={"conv": None, "default": 32})
    assert per_layer["conv"] == "AxG" and per_layer["wide"] == "Axdiag(G)"
    with pytest.raises(ValueError, match="max_factor_ratio must be a positive number"):
        _structures(model, max_factor_ratio=0)


def test_eigen_damping_with_diagonal_factor_is_exact_inverse():
    model, layer, x, y = embedding_problem()
    block = block_for_layer(layer)
    curvature = KFACCurvature(block, damping_mode="eigen")
    curvature.build(
        lambda name, shape, initializer="zeros": tf.Variable(
            keras.initializers.get(initializer)(shape, dtype="float32")
        )
    )
    curvature.update_statistics(layer_batch(model, layer, x, y, LOSS), tf.constant(0.0))
    curvature.refresh(tf.constant(DAMPING))
    v = tf.random.normal((block.a_dim, block.g_dim), seed=1)
    p = curvature.precondition(v, tf.constant(DAMPING)).numpy()
    m = curvature.matrix().numpy().astype(np.float64)
    want = np.linalg.solve(m + DAMPING * np.eye(len(m)), v.numpy().ravel())
    assert rel(p.ravel(), want) < 1e-4
