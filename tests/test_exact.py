"""The exact-curvature reference (keras_kfac.exact): Fisher and GGN modes
agree where theory says they do, the GGN has the closed form of linear
least squares, and the in-step GGN (graph and XLA, every block type) equals
the eager one built from full Jacobians."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_kfac  # noqa: E402
from keras_kfac import exact, quadratic  # noqa: E402
from keras_kfac.capture import Capture  # noqa: E402
from keras_kfac.layers import blocks_for_layer  # noqa: E402
from reference import rel  # noqa: E402

LOGITS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _classifier(seed=0, n=5, classes=3):
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(3, activation="tanh", name="hidden"),
            keras.layers.Dense(classes, name="logits"),
        ]
    )
    x = rng.normal(size=(n, 4)).astype("float32")
    y = rng.integers(0, classes, size=n)
    return model, x, y


@pytest.mark.parametrize("layer", ["hidden", "logits"])
def test_expected_fisher_over_labels_is_the_ggn(layer):
    """Softmax cross-entropy on logits: ``E_{y ~ p(y|x)}[F] = G`` exactly,
    the expectation computed by enumerating the 3 labels of every example:
    ``(1/n) sum_i sum_c p_ic u_i(c) u_i(c)^T``."""
    model, x, y = _classifier()
    n = len(x)
    probs = tf.nn.softmax(model(x)).numpy().astype(np.float64)
    expected = 0.0
    for c in range(3):
        u = exact.per_example_gradients(model, layer, x, np.full(n, c), LOGITS).numpy()
        expected = expected + (u.T * probs[:, c]) @ u / n
    ggn = exact.ggn_block(model, layer, x, y, LOGITS).numpy()
    assert ggn.shape == (exact.resolve_block(model, layer).num_parameters,) * 2
    np.testing.assert_allclose(ggn, expected, atol=1e-5 * np.abs(expected).max())
    # The empirical Fisher of the training labels is a different matrix.
    assert rel(exact.fisher_block(model, layer, x, y, LOGITS).numpy(), ggn) > 0.1


def test_monte_carlo_fisher_converges_to_the_ggn():
    """The Fisher of labels sampled from the model (one per example, each
    example repeated m times) approaches the GGN as ``1/sqrt(m)``."""
    model, x, y = _classifier(seed=1)
    ggn = exact.ggn_block(model, "hidden", x, y, LOGITS).numpy()
    errors = []
    for m in (10, 1000):
        xs = np.tile(x, (m, 1))
        labels = exact.sample_labels(model, xs, seed=0)
        errors.append(rel(exact.fisher_block(model, "hidden", xs, labels, LOGITS).numpy(), ggn))
    assert errors[1] < 0.05 < errors[0]


def test_ggn_of_linear_least_squares_is_the_closed_form():
    """Keras MSE ``(1/(n m)) sum ||x W + b - y||^2``: ``G = (2/(n m))
    kron(Xb^T Xb, I_m)`` (the Hessian), in parameter order ``[W; b]``; it is
    also the expected Fisher of the Gaussian of variance ``m/2``."""
    rng = np.random.default_rng(0)
    n, m = 6, 2
    x = rng.normal(size=(n, 3)).astype("float32")
    y = rng.normal(size=(n, m)).astype("float32")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(m, name="linear")])
    xb = np.concatenate([x, np.ones((n, 1))], axis=1).astype(np.float64)
    want = (2.0 / (n * m)) * np.kron(xb.T @ xb, np.eye(m))
    got = exact.ggn_block(model, "linear", x, y, "mse").numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_relative_error_is_a_tensor():
    error = exact.relative_error(
        tf.constant([[2.0, 0.0], [0.0, 0.0]]), np.array([[1.0, 0.0], [0.0, 0.0]])
    )
    assert isinstance(error, tf.Tensor) and error.dtype == tf.float32
    np.testing.assert_allclose(error.numpy(), 0.5)


def test_a_layer_with_several_blocks_must_be_named_by_block():
    model = keras.Sequential(
        [keras.Input((3, 2)), keras.layers.GRU(2, name="gru"), keras.layers.Dense(3)]
    )
    with pytest.raises(ValueError, match="gru_kernel, gru_recurrent_kernel, gru_bias"):
        exact.resolve_block(model, "gru")
    assert exact.resolve_block(model, "gru_bias").name == "gru_bias"
    with pytest.raises(ValueError, match="no layer or block named 'nope'"):
        exact.resolve_block(model, "nope")


# --- the in-step GGN -----------------------------------------------------------


def _conv_norm_model():
    return keras.Sequential(
        [
            keras.Input((5, 5, 1)),
            keras.layers.Conv2D(2, 3, activation="relu", name="conv"),
            keras.layers.LayerNormalization(name="norm"),
            keras.layers.Flatten(),
            keras.layers.Dense(3, name="logits"),
        ]
    )


def _recurrent_model():
    return keras.Sequential(
        [keras.Input((3, 2)), keras.layers.GRU(2, name="gru"), keras.layers.Dense(3, name="logits")]
    )


MODELS = {"conv_norm": (_conv_norm_model, (5, 5, 1)), "gru": (_recurrent_model, (3, 2))}


def _problem(kind, n=6, seed=0):
    keras.utils.set_random_seed(seed)
    build, shape = MODELS[kind]
    model = build()
    model.compile(loss=LOGITS)
    rng = np.random.default_rng(seed)
    # Non-trivial scale and shift for the normalization block.
    for layer in model.layers:
        if isinstance(layer, keras.layers.LayerNormalization):
            layer.gamma.assign(rng.uniform(0.5, 1.5, layer.gamma.shape))
            layer.beta.assign(rng.normal(size=layer.beta.shape))
    x = rng.normal(size=(n,) + shape).astype("float32")
    y = rng.integers(0, 3, size=n)
    return model, x, y


def _step_ggn(model, x, y, blocks, jit_compile):
    """Every block's :func:`exact.step_ggn_block` from a compiled
    training-mode forward pass recorded by the optimizer's instrumentation."""
    capture = Capture(model, sampled=True)

    @tf.function(jit_compile=jit_compile)
    def run(x, y):
        with tf.GradientTape():
            model.compute_loss(x, y, model(x, training=True))
        record = capture.current()
        objective = quadratic.require(quadratic.batch_objective(model, capture, record))
        values = objective.current_values()
        return [
            exact.step_ggn_block(record, b, lambda f: objective.output_loss(values, f))
            for b in blocks
        ]

    try:
        return [m.numpy() for m in run(tf.constant(x), tf.constant(y))]
    finally:
        capture.remove()


@pytest.mark.parametrize(
    "kind,jit_compile",
    [
        ("conv_norm", False),
        ("conv_norm", True),
        ("gru", False),
        pytest.param("gru", True, marks=pytest.mark.slow),
    ],
)
def test_step_ggn_equals_the_jacobian_ggn(kind, jit_compile):
    """Conv2D, LayerNormalization (scale-and-shift), Dense and the three
    blocks of a GRU: the in-step GGN (roots of the output Hessian, backward
    passes through the recorded tape, the block's own per-example
    gradients) equals ``(1/n) sum_i J_i^T H_i J_i`` from full Jacobians."""
    model, x, y = _problem(kind)
    blocks = [b for layer in model.layers for b in blocks_for_layer(layer)]
    assert len(blocks) == (3 if kind == "conv_norm" else 4)
    got = _step_ggn(model, x, y, blocks, jit_compile)
    for block, matrix in zip(blocks, got):
        want = exact.ggn_block(model, block, x, y, LOGITS).numpy()
        assert matrix.shape == want.shape == (block.num_parameters,) * 2
        assert rel(matrix, want) < 1e-4, block.name


@pytest.mark.parametrize("jit_compile", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_monitor_fidelity_of_a_normalization_block(jit_compile):
    """``track_diagnostics(fidelity_layers=[norm])`` in ``fit``: the logged
    error is ``||G - F_hat||_F / ||G||_F`` with ``G`` the exact GGN at the
    step's starting parameters and ``F_hat`` the block's curvature after the
    step (statistics of that batch only)."""
    model, x, y = _problem("conv_norm", n=8)
    opt = keras_kfac.KFAC(stats_decay=0.0, seed=0)
    model.compile(opt, loss=LOGITS, jit_compile=jit_compile)
    opt.build(model.trainable_variables)
    opt.track_diagnostics(every=1, fidelity_layers=["norm", "conv"])
    before = model.get_weights()
    model.fit(x, y, batch_size=len(x), epochs=1, verbose=0)
    after = model.get_weights()
    model.set_weights(before)
    reference = {name: exact.ggn_block(model, name, x, y, LOGITS) for name in ("norm", "conv")}
    model.set_weights(after)
    d = opt.diagnostics()
    for name, ggn in reference.items():
        expected = exact.relative_error(ggn, opt.curvature_matrix(name)).numpy()
        assert expected > 0.01  # a sampled estimate, not the exact block
        np.testing.assert_allclose(
            d[f"{name}/fidelity_relative_error"].numpy(), expected, rtol=2e-3
        )
