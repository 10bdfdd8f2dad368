"""The optimizer as users meet it: fit, custom loops, model kinds, saving,
mixed precision, sampled Fisher, errors."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_kfac
from reference import rel

SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def classification_data(n=64, d=6, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype("float32")
    w = rng.normal(size=(d, classes))
    y = np.argmax(x @ w, axis=1)
    return x, y


def mlp(d=6, classes=3):
    return keras.Sequential(
        [keras.Input((d,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(classes)]
    )


def fit_loss(model, x, y, epochs=15, **fit_kw):
    history = model.fit(x, y, batch_size=16, epochs=epochs, verbose=0, shuffle=False, **fit_kw)
    return history.history["loss"]


# --- sampled Fisher ----------------------------------------------------------


def averaged_output_factor(model, loss, x, y, steps=150):
    """Running-average G of the output layer with lr = 0 (weights fixed)."""
    opt = keras_kfac.KFAC(
        learning_rate=0.0, stats_decay=0.98, stats_every=1, fisher="sampled", seed=3
    )
    model.compile(optimizer=opt, loss=loss)
    xs = np.concatenate([x] * steps)
    ys = np.concatenate([y] * steps)
    model.fit(xs, ys, batch_size=len(x), epochs=1, verbose=0, shuffle=False)
    return opt.curvature_for(model.layers[-1]).g.numpy()


def test_sampled_fisher_softmax_matches_closed_form():
    keras.utils.set_random_seed(0)
    x, y = classification_data(n=32)
    model = mlp()
    G = averaged_output_factor(model, SCCE, x, y)
    p = tf.nn.softmax(model(x)).numpy()
    expected = np.mean([np.diag(pi) - np.outer(pi, pi) for pi in p], axis=0)
    assert rel(G, expected) < 0.12


def test_sampled_fisher_softmax_probabilities_output():
    """A softmax output layer with from_logits=False gives the same G at the
    pre-activation (the logits) as the logits model."""
    keras.utils.set_random_seed(0)
    x, y = classification_data(n=32)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    G = averaged_output_factor(model, "sparse_categorical_crossentropy", x, y)
    p = model(x).numpy()
    expected = np.mean([np.diag(pi) - np.outer(pi, pi) for pi in p], axis=0)
    assert rel(G, expected) < 0.12


def test_sampled_fisher_mse_is_the_gauss_newton_matrix():
    keras.utils.set_random_seed(0)
    x, _ = classification_data(n=32)
    y = np.random.default_rng(1).normal(size=(32, 4)).astype("float32")
    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(4)]
    )
    G = averaged_output_factor(model, "mse", x, y)
    expected = 2.0 / 4 * np.eye(4)  # d^2/df^2 of mean((y - f)^2) over 4 outputs
    assert rel(G, expected) < 0.12


def test_sampled_fisher_binary_crossentropy_is_the_gauss_newton_matrix():
    keras.utils.set_random_seed(0)
    x, _ = classification_data(n=32)
    y = (np.random.default_rng(1).random((32, 3)) > 0.5).astype("float32")
    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(3)]
    )
    G = averaged_output_factor(model, keras.losses.BinaryCrossentropy(from_logits=True), x, y)
    p = tf.sigmoid(model(x)).numpy()
    expected = np.mean([np.diag(pi * (1 - pi)) / 3 for pi in p], axis=0)
    assert rel(G, expected) < 0.12


def test_unsupported_loss_auto_falls_back_to_empirical_and_sampled_says_why():
    x, y = classification_data()
    model = mlp()

    def my_loss(y_true, y_pred):
        return tf.reduce_mean(tf.square(y_pred))

    model.compile(optimizer=keras_kfac.KFAC(fisher="sampled"), loss=my_loss)
    with pytest.raises(ValueError, match="fisher='empirical'"):
        model.fit(x, y, epochs=1, verbose=0)
    opt = keras_kfac.KFAC()  # fisher="auto"
    model.compile(optimizer=opt, loss=my_loss)
    with pytest.warns(UserWarning, match="empirical Fisher .* custom loss has no known likelihood"):
        model.fit(x, y, epochs=1, verbose=0)
    assert opt.estimator.fisher_used == "empirical"
    assert "Fisher: empirical (a custom loss" in opt.summary(print_fn=lambda s: None)
    supported = keras_kfac.KFAC()
    model.compile(optimizer=supported, loss=SCCE)
    model.fit(x, y, epochs=1, verbose=0)
    assert supported.estimator.fisher_used == "sampled"
    # the replaced optimizers no longer instrument the model
    assert opt.estimator.capture is None


# --- training in every way Keras trains ----------------------------------------


@pytest.mark.parametrize(
    "compile_kw",
    [{}, {"run_eagerly": True}, {"jit_compile": True}, {"steps_per_execution": 3}],
    ids=["graph", "eager", "xla", "steps_per_execution"],
)
def test_fit_reduces_loss(compile_kw):
    keras.utils.set_random_seed(0)
    x, y = classification_data()
    model = mlp()
    model.compile(optimizer=keras_kfac.KFAC(), loss=SCCE, metrics=["accuracy"], **compile_kw)
    losses = fit_loss(model, x, y)
    assert losses[-1] < 0.5 * losses[0]
    assert int(model.optimizer.iterations.numpy()) == 15 * 4


def test_functional_and_subclassed_models():
    x, y = classification_data()
    inputs = keras.Input((6,))
    h = keras.layers.Dense(16, activation="relu", name="hidden")(inputs)
    functional = keras.Model(inputs, keras.layers.Dense(3, name="out")(h))

    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.hidden = keras.layers.Dense(16, activation="relu")
            self.norm = keras.layers.LayerNormalization()
            self.act = keras.layers.PReLU()
            self.out = keras.layers.Dense(3)

        def call(self, x):
            return self.out(self.act(self.norm(self.hidden(x))))

    net = Net()
    for model, dense in (
        (functional, (functional.get_layer("hidden"), functional.get_layer("out"))),
        (net, (net.hidden, net.out)),
    ):
        keras.utils.set_random_seed(0)
        opt = keras_kfac.KFAC()
        model.compile(optimizer=opt, loss=SCCE)
        losses = fit_loss(model, x, y)
        assert losses[-1] < 0.5 * losses[0]
        assert len(opt.estimator.blocks) == (2 if model is functional else 3)
        text = opt.summary(print_fn=lambda s: None)
        rows = [line.split()[:5] for line in text.splitlines()]
        # One K-FAC row per Dense: name, type, curvature, a_dim (inputs + bias), g_dim.
        assert [dense[0].name, "Dense", "kfac", "7", "16"] in rows, text
        assert [dense[1].name, "Dense", "kfac", "17", "3"] in rows, text
    # the PReLU variables (no block) took the documented fallback and moved
    assert "Adam fallback" in text and "p_re_lu" in text
    assert "scale_and_shift" in text  # LayerNormalization has its block


def test_custom_training_loop():
    keras.utils.set_random_seed(0)
    x, y = classification_data()
    model = mlp()
    opt = keras_kfac.KFAC(model=model, loss=SCCE)
    first = last = None
    for _ in range(15):
        for i in range(0, len(x), 16):
            with tf.GradientTape() as tape:
                loss = SCCE(y[i : i + 16], model(x[i : i + 16], training=True))
            grads = tape.gradient(loss, model.trainable_variables)
            opt.apply_gradients(zip(grads, model.trainable_variables))
            first = float(loss) if first is None else first
            last = float(loss)
    assert last < 0.5 * first
    assert len(opt.estimator.blocks) == 2


def test_custom_loop_in_tf_function_with_register():
    keras.utils.set_random_seed(0)
    x, y = classification_data()
    model = mlp()
    model(x[:1])
    opt = keras_kfac.KFAC(loss=SCCE)
    opt.register(model)

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = SCCE(yb, model(xb, training=True))
        opt.apply_gradients(
            zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        )
        return loss

    losses = [
        float(step(x[i : i + 16], y[i : i + 16])) for _ in range(15) for i in range(0, 64, 16)
    ]
    assert losses[-1] < 0.5 * losses[0]


def test_apply_without_forward_pass_is_a_clear_error():
    model = mlp()
    model(np.zeros((1, 6), "float32"))
    opt = keras_kfac.KFAC(model=model, loss=SCCE)
    grads = [tf.zeros_like(v) for v in model.trainable_variables]
    with pytest.raises(ValueError, match="training=True"):
        opt.apply_gradients(zip(grads, model.trainable_variables))


def test_evaluate_and_predict_do_not_record_or_leak():
    x, y = classification_data()
    model = mlp()
    opt = keras_kfac.KFAC()
    model.compile(optimizer=opt, loss=SCCE)
    model.fit(x, y, epochs=1, verbose=0)
    assert opt.estimator.capture.current() is None
    model.evaluate(x, y, verbose=0)
    model.predict(x, verbose=0)
    assert opt.estimator.capture._record is None
    model.fit(x, y, epochs=1, verbose=0)


def test_schedules_clipnorm_weight_decay_and_config_round_trip():
    schedule = keras.optimizers.schedules.ExponentialDecay(0.05, 10, 0.5)
    damping = keras.optimizers.schedules.ExponentialDecay(1e-2, 10, 0.5)
    opt = keras_kfac.KFAC(
        learning_rate=schedule,
        damping=damping,
        weight_decay=1e-4,
        global_clipnorm=1.0,
        curvature={"dense": "kfac", "default": "kfac"},
        fisher="empirical",
        damping_mode="eigen",
        stats_every=2,
        inverse_every=4,
        kl_clip=None,
    )
    config = opt.get_config()
    clone = keras_kfac.KFAC.from_config(config)
    assert clone.get_config() == config
    x, y = classification_data()
    model = mlp()
    model.compile(optimizer=opt, loss=SCCE)
    losses = fit_loss(model, x, y, epochs=5)
    assert losses[-1] < losses[0]
    assert float(opt.damping) == pytest.approx(1e-2 * 0.5 ** (20 / 10), rel=1e-5)


def test_damping_change_does_not_retrace():
    x, y = classification_data()
    model = mlp()
    opt = keras_kfac.KFAC(damping_mode="eigen")
    model.compile(optimizer=opt, loss=SCCE)
    model.fit(x, y, epochs=1, verbose=0)
    traced = model.train_function
    opt.damping = 0.5
    opt.learning_rate = 0.001
    model.fit(x, y, epochs=1, verbose=0)
    assert model.train_function is traced
    assert float(opt.damping) == 0.5


def test_save_and_load_restores_optimizer_state(tmp_path):
    keras.utils.set_random_seed(0)
    x, y = classification_data()
    model = mlp()
    model.compile(optimizer=keras_kfac.KFAC(inverse_every=3), loss=SCCE)
    model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.optimizer, keras_kfac.KFAC)
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    original, restored = model.optimizer.variables, loaded.optimizer.variables
    assert len(original) == len(restored) > 10
    for a, b in zip(original, restored):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    assert int(loaded.optimizer.iterations.numpy()) == 8
    # Training on continues identically (sampled targets included).
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    loaded.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fisher", ["empirical", "sampled"])
def test_mixed_float16_keeps_float32_factors_and_unscales(fisher):
    x, y = classification_data()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [keras.Input((6,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(3)]
        )
        opt = keras_kfac.KFAC(fisher=fisher)
        model.compile(optimizer=opt, loss=SCCE)
        losses = fit_loss(model, x, y)
    finally:
        keras.config.set_dtype_policy("float32")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert int(opt.skipped_steps) == 0  # no float16 overflow in the statistics
    assert losses[-1] < 0.6 * losses[0]
    G = opt.curvature_for(model.layers[-1]).g
    assert G.dtype == "float32"
    # Unscaled: the output G of softmax cross-entropy has trace below 1 per
    # example; a loss scale of 2**15 left in would make it ~1e9.
    assert 0.0 < float(tf.linalg.trace(G)) < 2.0


class Affine(keras.layers.Layer):
    """A custom layer: no curvature block."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=(input_shape[-1], 3), name="w")

    def call(self, x):
        return x @ self.w


def test_model_with_no_supported_layer_warns_and_trains():
    x, y = classification_data()
    model = keras.Sequential([keras.Input((6,)), Affine()])
    model.compile(optimizer=keras_kfac.KFAC(), loss=SCCE)
    with pytest.warns(UserWarning, match="no layer with a curvature block"):
        losses = fit_loss(model, x, y, epochs=5)
    assert losses[-1] < losses[0]


# --- bad input ------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"damping": -1.0}, "damping must be a positive"),
        ({"damping": 0.0}, "damping must be a positive"),
        ({"curvature": "magic"}, "Unknown curvature='magic'. Available: .*kfac"),
        ({"fisher": "true"}, "Unknown fisher='true'"),
        ({"damping_mode": "foo"}, "Unknown damping_mode='foo'"),
        ({"stats_decay": 1.0}, r"stats_decay must be in \[0, 1\)"),
        ({"stats_every": 0}, "stats_every must be an integer >= 1"),
        ({"inverse_every": 0}, "inverse_every must be an integer >= 1"),
        ({"curvature_warmup": -1}, "curvature_warmup must be an integer >= 0"),
        ({"curvature_warmup": 2.5}, "curvature_warmup must be an integer >= 0"),
        ({"curvature_warmup": True}, "curvature_warmup must be an integer >= 0"),
        ({"curvature_warmup": "10"}, "curvature_warmup must be an integer >= 0"),
        ({"momentum": 1.0}, "momentum must be in"),
        ({"kl_clip": 0.0}, "kl_clip must be positive"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        keras_kfac.KFAC(**kwargs)


def test_model_not_found_is_a_clear_error():
    model = mlp()
    opt = keras_kfac.KFAC()
    with pytest.raises(ValueError, match="KFAC\\(model=model\\)"):
        opt.build(model.trainable_variables)


def test_other_backend_is_a_clear_error():
    code = "import keras_kfac; keras_kfac.KFAC()"
    env = dict(os.environ, KERAS_BACKEND="jax")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert "KERAS_BACKEND=tensorflow" in result.stderr


@pytest.mark.parametrize(
    "batch, options, cadence",
    [
        (16, {}, (10, 20)),
        (999, {}, (10, 20)),
        (1000, {}, (5, 10)),
        (1000, {"inverse_every": 3}, (5, 3)),
        (1000, {"stats_every": 4, "inverse_every": 8}, (4, 8)),
        (16, {"curvature_warmup": 3}, (10, 20)),
        (1000, {"stats_every": 4, "inverse_every": 8, "curvature_warmup": 2}, (4, 8)),
    ],
)
def test_cadence_follows_the_first_batch(batch, options, cadence):
    # 2 * batch examples: the steps of the second epoch include a short
    # batch, which must not change the cadence chosen at the first step.
    x, y = classification_data(n=2 * batch + 3)
    model = mlp()
    opt = keras_kfac.KFAC(**options)
    model.compile(optimizer=opt, loss=SCCE)
    assert opt.cadence == (None if not options.get("stats_every") else cadence)
    model.fit(x, y, batch_size=batch, epochs=5, verbose=0, shuffle=False)  # steps 0..14
    assert opt.cadence == cadence
    stats_every, _ = cadence
    warmup = options.get("curvature_warmup", 0)
    assert int(opt._stats_updates) == len(
        [i for i in range(15) if i < warmup or i % stats_every == 0]
    )
    clone = keras_kfac.KFAC.from_config(opt.get_config())
    for name in ("stats_every", "inverse_every"):
        assert getattr(clone, name) == options.get(name)
    assert clone.curvature_warmup == warmup


def test_warmup_continues_after_save_and_load(tmp_path):
    # Saved at step 3 of a 6-step warm-up: the loaded optimizer updates its
    # statistics on steps 3, 4, 5, then at the cadence (10: step 10).
    x, y = classification_data(n=16 * 11)
    model = mlp()
    model.compile(optimizer=keras_kfac.KFAC(curvature_warmup=6), loss=SCCE)
    model.fit(x[:48], y[:48], batch_size=16, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    resumed = keras.models.load_model(path)
    assert resumed.optimizer.curvature_warmup == 6
    assert int(resumed.optimizer._stats_updates) == 3
    resumed.fit(x[48:], y[48:], batch_size=16, verbose=0)
    assert int(resumed.optimizer.iterations) == 11
    assert int(resumed.optimizer._stats_updates) == 7
