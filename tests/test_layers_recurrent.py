"""LSTM, GRU and SimpleRNN blocks against brute force (T=4, units=3).

References: per-example gradients by ``GradientTape.jacobian``; the step
quantities ``a_t`` and ``g_t = dl_i/dz_t`` from an independent, explicitly
unrolled implementation of each cell (checked against the Keras layer's
output), with the gate pre-activations as differentiation targets.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_kfac
from keras_kfac.capture import Capture
from keras_kfac.curvature.base import LayerBatch
from keras_kfac.exact import per_example_gradients
from keras_kfac.layers import blocks_for_layer, unsupported_reason
from reference import dense_solve, factored_damped, kfac_factors, plain_kfac

KINDS = {"lstm": keras.layers.LSTM, "gru": keras.layers.GRU, "simple_rnn": keras.layers.SimpleRNN}
# XLA compiles the recurrent loop: ~30 s per model on 2 cores.
MODES = ["graph", "eager", pytest.param("xla", marks=pytest.mark.slow)]
N, T, D, UNITS, CLASSES = 5, 4, 2, 3, 3


def loss_fn(y, logits):
    return keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)


def problem(kind, seed=0, mask=False, return_state=False, **rnn_kwargs):
    """``x -> [Masking] -> RNN -> Dense`` (the head on the last output, or
    on every step with ``return_sequences``, then averaged over time)."""
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, T, D)).astype("float32")
    if mask:
        x[0, 2:] = 0.0  # padded at the end
        x[3, :1] = 0.0  # padded at the start
    y = rng.integers(0, CLASSES, size=(N,))
    inputs = keras.Input((T, D))
    h = keras.layers.Masking(0.0)(inputs) if mask else inputs
    rnn = KINDS[kind](UNITS, return_state=return_state, **rnn_kwargs)
    h = rnn(h)
    if return_state:
        h = keras.layers.Concatenate()([h[0], h[-1]])
    logits = keras.layers.Dense(CLASSES)(h)
    if rnn_kwargs.get("return_sequences"):
        logits = keras.layers.GlobalAveragePooling1D()(logits)
    return keras.Model(inputs, logits), rnn, x, y


def recorded_blocks(model, layer, x, y, function=False):
    """The layer's blocks with their ``(a, g)`` recorded by the optimizer's
    instrumentation (inference mode, ``g`` of the summed per-example
    losses), and the model's instrumented output."""
    blocks = blocks_for_layer(layer)
    capture = Capture(model, sampled=False, layers=[layer], inference=True)

    def run():
        with tf.GradientTape() as tape:
            out = model(x)
            total = tf.reduce_sum(loss_fn(y, out))
        tape.gradient(total, model.trainable_variables)
        record = capture.current()
        key = id(layer)
        batches = [LayerBatch(b, record.inputs[key], record.output_grads[key]) for b in blocks]
        return out, [(batch.a(), batch.g()) for batch in batches]

    try:
        out, ag = tf.function(run)() if function else run()
    finally:
        capture.remove()
    return blocks, out.numpy(), [(a.numpy(), g.numpy()) for a, g in ag]


def uninstrumented_output(model, x):
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return clone(x).numpy()


# --- independent reference: the cells unrolled, pre-activations as targets ---


def reference_steps(model, layer, x, y):
    """Per block (in ``blocks_for_layer`` order) the reference ``(a, g)``,
    and the model output of the unrolled reference (no masking: ``x`` has
    none). ``g`` is of the summed per-example losses."""
    cell = layer.cell
    kernel, rec, bias = (
        tf.constant(v.numpy()) for v in (cell.kernel, cell.recurrent_kernel, cell.bias)
    )
    u = UNITS
    h = tf.zeros((N, u))
    c = tf.zeros((N, u))
    xs, hs, zs = [], [], []
    with tf.GradientTape() as tape:
        for t in range(T):
            xt = tf.constant(x[:, t])
            xs.append(xt)
            hs.append(h)
            if isinstance(layer, keras.layers.GRU):
                m = xt @ kernel + bias[0]
                q = h @ rec + bias[1]
                tape.watch([m, q])
                zs.append((m, q))
                zg = tf.sigmoid(m[:, :u] + q[:, :u])
                rg = tf.sigmoid(m[:, u : 2 * u] + q[:, u : 2 * u])
                hh = tf.tanh(m[:, 2 * u :] + rg * q[:, 2 * u :])
                h = zg * h + (1 - zg) * hh
            else:
                z = xt @ kernel + h @ rec + bias
                tape.watch(z)
                zs.append(z)
                if isinstance(layer, keras.layers.LSTM):
                    i, f, cc, o = tf.split(z, 4, axis=-1)
                    c = tf.sigmoid(f) * c + tf.sigmoid(i) * tf.tanh(cc)
                    h = tf.sigmoid(o) * tf.tanh(c)
                else:
                    h = tf.tanh(z)
        head = model.layers[-1]
        logits = h @ head.kernel + head.bias
        total = tf.reduce_sum(loss_fn(y, logits))
    grads = tape.gradient(total, zs)
    a_x = np.stack([v.numpy() for v in xs], axis=1)
    a_h = np.stack([v.numpy() for v in hs], axis=1)
    ones = np.ones((N, T, 1), np.float32)
    if isinstance(layer, keras.layers.GRU):
        g_in = np.stack([gm.numpy() for gm, _ in grads], axis=1)
        g_rec = np.stack([gq.numpy() for _, gq in grads], axis=1)
        steps = [(a_x, g_in), (a_h, g_rec), (ones, np.concatenate([g_in, g_rec], -1))]
    else:
        g = np.stack([v.numpy() for v in grads], axis=1)
        steps = [(np.concatenate([a_x, ones], -1), g), (a_h, g)]
    return steps, logits.numpy()


# --- tests --------------------------------------------------------------------

CONFIGS = {
    "last": {},
    "sequences": {"return_sequences": True},
    "go_backwards_masked": {"go_backwards": True, "mask": True},
    "masked_sequences": {"return_sequences": True, "mask": True, "zero_output_for_mask": True},
    "unroll_masked": {"unroll": True, "mask": True},
    "return_state": {"return_state": True},
}


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_blocks_give_exact_per_example_gradients(kind, config):
    model, layer, x, y = problem(kind, **CONFIGS[config])
    blocks, out, ag = recorded_blocks(model, layer, x, y)
    assert len(blocks) == (3 if kind == "gru" else 2)
    # The instrumentation leaves what the model computes unchanged.
    np.testing.assert_allclose(out, uninstrumented_output(model, x), rtol=1e-6, atol=1e-6)
    for block, (a, g) in zip(blocks, ag):
        assert a.shape == (N, T, block.a_dim) and g.shape == (N, T, block.g_dim)
        exact = per_example_gradients(model, block, x, y, loss_fn).numpy()
        np.testing.assert_allclose(
            block.per_example_gradients(a, g).numpy(),
            exact,
            rtol=1e-5,
            atol=1e-6,
            err_msg=block.name,
        )
    if CONFIGS[config].get("mask"):
        # Padded steps: no gradient and no input-factor contribution.
        for a, g in ag:
            np.testing.assert_array_equal(a[0, 2:], 0.0)
            np.testing.assert_array_equal(g[0, 2:], 0.0)
            np.testing.assert_array_equal(a[3, :1], 0.0)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_stateful_layer_outputs_states_and_first_step_input(kind):
    """Over two calls of a stateful layer: outputs and carried states equal
    an uninstrumented copy's, and the recorded ``h_0`` of the second call is
    the state the first left."""
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(N, T, D)).astype("float32")
    y = np.zeros((N,), "int64")
    inputs = keras.Input(batch_shape=(N, T, D))
    layer = KINDS[kind](UNITS, stateful=True)
    model = keras.Model(inputs, keras.layers.Dense(CLASSES)(layer(inputs)))
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    for _ in range(2):
        carried = layer.states[0].numpy()
        _, out, ag = recorded_blocks(model, layer, x, y)
        np.testing.assert_allclose(out, clone(x).numpy(), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(
            layer.states[0].numpy(), clone.layers[1].states[0].numpy(), atol=1e-6
        )
        np.testing.assert_allclose(ag[1][0][:, 0], carried, atol=1e-6)
    assert np.abs(carried).max() > 0.1


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_step_quantities_match_unrolled_reference_in_a_function(kind):
    """Graph mode (the recurrent loop is a ``tf.while_loop``): the recorded
    ``a_t``, ``g_t`` are the reference's, step by step."""
    model, layer, x, y = problem(kind)
    blocks, out, ag = recorded_blocks(model, layer, x, y, function=True)
    steps, logits = reference_steps(model, layer, x, y)
    np.testing.assert_allclose(out, logits, rtol=1e-5, atol=1e-6)
    for block, (a, g), (a_ref, g_ref) in zip(blocks, ag, steps):
        np.testing.assert_allclose(a, a_ref, rtol=1e-5, atol=1e-6, err_msg=block.name)
        np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6, err_msg=block.name)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_factors_and_one_step_update_through_fit(kind, mode):
    model, layer, x, y = problem(kind)
    lr, damping = 0.1, 0.05
    opt = plain_kfac(lr, damping, stats_decay=0.5)
    model.compile(
        optimizer=opt,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        run_eagerly=mode == "eager",
        jit_compile=mode == "xla",
    )
    steps, _ = reference_steps(model, layer, x, y)
    blocks = blocks_for_layer(layer)
    mean_grads = [per_example_gradients(model, b, x, y, loss_fn).numpy().mean(0) for b in blocks]
    before = [[v.numpy() for v in b.variables] for b in blocks]
    model.fit(x, y, batch_size=N, epochs=1, shuffle=False, verbose=0)
    assert opt.skipped_steps.numpy() == 0
    for block, (a, g), grad, theta0 in zip(blocks, steps, mean_grads, before):
        A, G = kfac_factors(a, g)
        curvature = opt.curvature_for(block.name)
        np.testing.assert_allclose(curvature.a.numpy(), A, rtol=1e-4, atol=1e-6, err_msg=block.name)
        np.testing.assert_allclose(curvature.g.numpy(), G, rtol=1e-4, atol=1e-6, err_msg=block.name)
        step = -lr * dense_solve(factored_damped(A, G, damping), grad.ravel())
        change = block.to_matrix([v.numpy() - v0 for v, v0 in zip(block.variables, theta0)])
        np.testing.assert_allclose(
            change.numpy().ravel(), step, rtol=2e-3, atol=1e-6, err_msg=block.name
        )


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_sampled_fisher_records_the_step_inputs(kind):
    """fisher='sampled' back-propagates sampled output gradients to the
    probe (a watched source): the input factors are the reference's, the
    output factors are finite and positive semi-definite."""
    model, layer, x, y = problem(kind)
    opt = keras_kfac.KFAC(learning_rate=0.01, stats_decay=0.5, fisher="sampled", seed=1)
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    steps, _ = reference_steps(model, layer, x, y)
    model.fit(x, y, batch_size=N, epochs=1, verbose=0)
    assert opt.skipped_steps.numpy() == 0
    for block, (a, g) in zip(blocks_for_layer(layer), steps):
        curvature = opt.curvature_for(block.name)
        np.testing.assert_allclose(curvature.a.numpy(), kfac_factors(a, g)[0], rtol=1e-4, atol=1e-6)
        eigenvalues = np.linalg.eigvalsh(curvature.g.numpy())
        assert eigenvalues.min() > -1e-6 and eigenvalues.max() > 1e-6, block.name


def test_every_variable_of_the_layer_gets_a_block():
    model, layer, x, y = problem("gru")
    opt = keras_kfac.KFAC(learning_rate=0.01)
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    text = opt.summary(print_fn=lambda _: None)
    for suffix in ("kernel", "recurrent_kernel", "bias"):
        assert f"{layer.name}_{suffix} " in text
    assert "fallback" not in text


@pytest.mark.parametrize(
    "kind, kwargs, reason",
    [
        ("lstm", {"dropout": 0.1}, "dropout"),
        ("gru", {"recurrent_dropout": 0.1}, "dropout"),
        ("gru", {"reset_after": False}, "reset_after=False"),
        ("lstm", {"implementation": 1}, "implementation=1"),
        ("lstm", {"use_cudnn": True}, "use_cudnn=True"),
        ("simple_rnn", {"use_bias": False}, "use_bias=False"),
    ],
)
def test_unsupported_configurations_are_refused_with_a_reason(kind, kwargs, reason):
    _, layer, _, _ = problem(kind, **kwargs)
    assert blocks_for_layer(layer) == []
    assert reason in unsupported_reason(layer)


class _ScanCell(keras.layers.Layer):
    """A minimal custom RNN cell (no block: the model-level rule applies)."""

    state_size = 3

    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(input_shape[-1] + 3, 3))

    def call(self, inputs, states):
        h = tf.tanh(tf.concat([inputs, states[0]], axis=-1) @ self.kernel)
        return h, [h]


FORWARD_MODE_CASES = {
    "lstm": (lambda: keras.layers.LSTM(3), True),
    "gru": (lambda: keras.layers.GRU(3), True),
    "simple_rnn_sequences": (lambda: keras.layers.SimpleRNN(3, return_sequences=True), True),
    "custom_cell": (lambda: keras.layers.RNN(_ScanCell()), True),
    "bidirectional": (lambda: keras.layers.Bidirectional(keras.layers.GRU(3)), True),
    "conv_lstm1d": (lambda: keras.layers.ConvLSTM1D(2, 1), True),
    "lstm_unrolled": (lambda: keras.layers.LSTM(3, unroll=True), False),
    "time_distributed": (lambda: keras.layers.TimeDistributed(keras.layers.Dense(3)), False),
    "attention": (None, False),
}


@pytest.mark.parametrize("case", sorted(FORWARD_MODE_CASES))
def test_forward_mode_declaration_matches_tensorflow(case):
    """The layers declared to block forward-mode autodiff
    (``forward_mode_blockers``, read by the LM damping default) are exactly
    those whose traced forward pass TensorFlow cannot run under a
    ``ForwardAccumulator``; a TF release that lifts (or widens) the
    limitation fails here."""
    from keras_kfac import compat
    from keras_kfac.layers import forward_mode_blockers

    make, blocked = FORWARD_MODE_CASES[case]
    keras.utils.set_random_seed(0)
    shape = (T, 2, 1) if case == "conv_lstm1d" else (T, D)
    inputs = keras.Input(shape)
    if make is None:
        h = keras.layers.MultiHeadAttention(2, 2)(inputs, inputs)
    else:
        h = make()(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(h)))
    found = forward_mode_blockers(compat.flatten_layers(model))
    assert bool(found) == blocked, found
    if blocked:
        assert all("unroll=True" in reason for reason in found.values())
    x = np.random.default_rng(0).normal(size=(2,) + shape).astype("float32")
    weights = model.trainable_variables

    @tf.function
    def jvp():
        values = [tf.identity(v) for v in weights]
        with tf.autodiff.ForwardAccumulator(values, [tf.ones_like(v) for v in values]) as acc:
            with keras.StatelessScope(state_mapping=list(zip(weights, values))):
                y = model(x, training=True)
        return acc.jvp(y, unconnected_gradients=tf.UnconnectedGradients.ZERO)

    if blocked:
        with pytest.raises(TypeError, match="variant"):
            jvp()
    else:
        assert np.isfinite(jvp().numpy()).all()
