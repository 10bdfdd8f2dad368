"""Real Keras programs: custom train steps with sub-models (VAE), two KFAC
optimizers in one step (GAN), trainable flags changing between fits,
fisher="auto", the sampled-Fisher families against the loss Hessian."""

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_kfac
from keras_kfac.losses import SampledLoss
from reference import layer_ag

MODES = [{}, {"run_eagerly": True}, {"jit_compile": True}]
MODE_IDS = ["graph", "eager", "xla"]


# --- VAE: sub-models inside the tape, no compiled loss ----------------------------
class Sampling(keras.layers.Layer):
    def call(self, inputs):
        mean, log_var = inputs
        return mean + tf.exp(0.5 * log_var) * keras.random.normal(tf.shape(mean), seed=1)


def vae_parts(d=8, latent=2):
    x = keras.Input((d,))
    h = keras.layers.Dense(16, activation="relu", name="enc_hidden")(x)
    mean = keras.layers.Dense(latent, name="z_mean")(h)
    log_var = keras.layers.Dense(latent, name="z_log_var")(h)
    encoder = keras.Model(x, [mean, log_var, Sampling()([mean, log_var])], name="encoder")
    z = keras.Input((latent,))
    h = keras.layers.Dense(16, activation="relu", name="dec_hidden")(z)
    decoder = keras.Model(
        z, keras.layers.Dense(d, activation="sigmoid", name="dec_out")(h), name="decoder"
    )
    return encoder, decoder


class VAE(keras.Model):
    """keras-io's VAE pattern: no call, no compiled loss, the KL term in the step."""

    def __init__(self, encoder, decoder, use_apply=False):
        super().__init__()
        self.encoder, self.decoder, self.use_apply = encoder, decoder, use_apply

    def train_step(self, data):
        with tf.GradientTape() as tape:
            z_mean, z_log_var, z = self.encoder(data)
            reconstruction = self.decoder(z)
            rec = tf.reduce_mean(
                tf.reduce_sum(
                    keras.losses.binary_crossentropy(data[..., None], reconstruction[..., None]),
                    axis=1,
                )
            )
            kl = tf.reduce_mean(
                tf.reduce_sum(-0.5 * (1 + z_log_var - z_mean**2 - tf.exp(z_log_var)), axis=1)
            )
            total = rec + kl
        grads = tape.gradient(total, self.trainable_weights)
        if self.use_apply:
            self.optimizer.apply(grads, self.trainable_weights)
        else:
            self.optimizer.apply_gradients(zip(grads, self.trainable_weights))
        return {"total": total}


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_vae_custom_train_step_with_sub_models(mode):
    keras.utils.set_random_seed(0)
    data = (np.random.default_rng(0).random((64, 8)) > 0.5).astype("float32")
    vae = VAE(*vae_parts(), use_apply=bool(mode.get("run_eagerly")))
    opt = keras_kfac.KFAC(learning_rate=0.1, stats_every=1, inverse_every=2)
    vae.compile(optimizer=opt, **mode)
    with pytest.warns(UserWarning, match="empirical Fisher .* overrides train_step"):
        history = vae.fit(data, epochs=6, batch_size=16, verbose=0)
    losses = history.history["total"]
    assert losses[-1] < losses[0]
    assert {b.name for b in opt.estimator.blocks} == {
        "enc_hidden",
        "z_mean",
        "z_log_var",
        "dec_hidden",
        "dec_out",
    }
    assert int(opt._stats_updates.numpy()) == 6 * 4 and int(opt.skipped_steps) == 0
    for block in opt.estimator.blocks:  # every block got statistics
        assert float(tf.linalg.trace(opt.curvature_for(block.name).g)) > 0


# --- GAN: two KFAC optimizers in one step -------------------------------------------
class GAN(keras.Model):
    """keras-io's dcgan_overriding_train_step pattern: the optimizers are
    given to an overridden compile, not to model.optimizer. The latent
    vectors come with the data so a step is deterministic."""

    def __init__(self, discriminator, generator):
        super().__init__()
        self.discriminator, self.generator = discriminator, generator

    def compile(self, d_optimizer, g_optimizer, **kwargs):
        super().compile(**kwargs)
        self.d_optimizer, self.g_optimizer = d_optimizer, g_optimizer
        self.loss_fn = keras.losses.BinaryCrossentropy(from_logits=True)

    def train_step(self, data):
        (real, z), _, _ = keras.utils.unpack_x_y_sample_weight(data)
        n = tf.shape(real)[0]
        fake = self.generator(z)  # outside any tape: not recorded
        combined = tf.concat([fake, real], axis=0)
        labels = tf.concat([tf.ones((n, 1)), tf.zeros((n, 1))], axis=0)
        with tf.GradientTape() as tape:
            d_loss = self.loss_fn(labels, self.discriminator(combined))
        grads = tape.gradient(d_loss, self.discriminator.trainable_weights)
        self.d_optimizer.apply_gradients(zip(grads, self.discriminator.trainable_weights))
        with tf.GradientTape() as tape:
            # the discriminator's layers run again; the generator's
            # gradients pass through them
            g_loss = self.loss_fn(tf.zeros((n, 1)), self.discriminator(self.generator(z)))
        grads = tape.gradient(g_loss, self.generator.trainable_weights)
        self.g_optimizer.apply_gradients(zip(grads, self.generator.trainable_weights))
        return {"d_loss": d_loss, "g_loss": g_loss}


def gan_parts(d=4, latent=3):
    discriminator = keras.Sequential(
        [
            keras.Input((d,)),
            keras.layers.Dense(8, activation="tanh", name="d_hidden"),
            keras.layers.Dense(1, name="d_out"),
        ],
        name="discriminator",
    )
    generator = keras.Sequential(
        [
            keras.Input((latent,)),
            keras.layers.Dense(8, activation="tanh", name="g_hidden"),
            keras.layers.Dense(d, name="g_out"),
        ],
        name="generator",
    )
    return discriminator, generator


def gan_data(n=32, d=4, latent=3):
    rng = np.random.default_rng(0)
    return rng.normal(1.0, 0.5, (n, d)).astype("float32"), rng.normal(size=(n, latent)).astype(
        "float32"
    )


def per_example_output_factor(loss_of_preactivation, s):
    """G = (1/n) sum_i g_i g_i^T, g_i = d l_i / d s_i for a batch-mean loss."""
    with tf.GradientTape() as tape:
        tape.watch(s)
        loss = loss_of_preactivation(s)
    g = tape.gradient(loss, s).numpy() * s.shape[0]
    return g.T @ g / s.shape[0]


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_gan_two_kfac_optimizers_each_with_its_own_statistics(mode):
    keras.utils.set_random_seed(0)
    discriminator, generator = gan_parts()
    gan = GAN(discriminator, generator)
    kw = dict(learning_rate=0.0, stats_every=1, stats_decay=0.0, momentum=0.0)
    d_opt, g_opt = keras_kfac.KFAC(**kw), keras_kfac.KFAC(**kw)
    gan.compile(d_optimizer=d_opt, g_optimizer=g_opt, **mode)
    real, z = gan_data()
    gan.fit((real, z), epochs=2, batch_size=32, verbose=0)  # two steps, weights fixed (lr 0)
    assert {b.name for b in d_opt.estimator.blocks} == {"d_hidden", "d_out"}
    assert {b.name for b in g_opt.estimator.blocks} == {"g_hidden", "g_out"}
    bce = keras.losses.BinaryCrossentropy(from_logits=True)
    fake = generator(z)
    combined = tf.concat([fake, real], 0)
    labels = tf.concat([tf.ones((32, 1)), tf.zeros((32, 1))], 0)
    # D's output G: the discriminator loss's gradients on real and generated
    # data, not the generator phase's (where D's layers run again).
    s = discriminator.get_layer("d_out")(discriminator.get_layer("d_hidden")(combined))
    expected = per_example_output_factor(lambda s: bce(labels, s), s)
    np.testing.assert_allclose(
        d_opt.curvature_for("d_out").g.numpy(), expected, rtol=1e-4, atol=1e-7
    )
    # G's output G: the generator loss through the discriminator.
    s = generator.get_layer("g_out")(generator.get_layer("g_hidden")(z))
    expected = per_example_output_factor(lambda s: bce(tf.zeros((32, 1)), discriminator(s)), s)
    np.testing.assert_allclose(
        g_opt.curvature_for("g_out").g.numpy(), expected, rtol=1e-4, atol=1e-7
    )
    assert int(d_opt.skipped_steps) == int(g_opt.skipped_steps) == 0


def test_gan_trains_and_layers_are_instrumented_once():
    keras.utils.set_random_seed(0)
    discriminator, generator = gan_parts()
    gan = GAN(discriminator, generator)
    d_opt, g_opt = keras_kfac.KFAC(learning_rate=0.05), keras_kfac.KFAC(learning_rate=0.05)
    gan.compile(d_optimizer=d_opt, g_optimizer=g_opt)
    real, z = gan_data(n=64)
    history = gan.fit((real, z), epochs=3, batch_size=16, verbose=0)
    assert all(np.isfinite(history.history["d_loss"])) and all(
        np.isfinite(history.history["g_loss"])
    )
    layer = discriminator.get_layer("d_out")
    assert not hasattr(layer.call, "__wrapped__") or not hasattr(
        layer.call.__wrapped__, "__wrapped__"
    )
    d_opt.release(gan)
    g_opt.release(gan)
    assert "call" not in vars(layer) and "train_step" not in vars(gan)


# --- trainable flags changing between fits ---------------------------------------
def test_trainable_changes_between_fits():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype("float32")
    y = np.argmax(x @ rng.normal(size=(6, 3)), 1)
    base = keras.layers.Dense(16, activation="relu", name="base")
    model = keras.Sequential([keras.Input((6,)), base, keras.layers.Dense(3, name="head")])
    opt = keras_kfac.KFAC()
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=opt, loss=loss)
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    base.trainable = False  # same optimizer, fewer variables
    model.compile(optimizer=opt, loss=loss)
    frozen = base.kernel.numpy().copy()
    model.fit(x, y, epochs=2, batch_size=16, verbose=0)
    np.testing.assert_array_equal(base.kernel.numpy(), frozen)
    base.trainable = True  # new variables: a new optimizer, as in Keras
    fresh = keras_kfac.KFAC()
    model.compile(optimizer=fresh, loss=loss)
    losses = model.fit(x, y, epochs=3, batch_size=16, verbose=0).history["loss"]
    assert losses[-1] < losses[0]
    assert opt.estimator.capture is None  # the replaced optimizer let go
    assert {b.name for b in fresh.estimator.blocks} == {"base", "head"}


# --- the sampled families: E[g g^T] = loss Hessian (GGN) -----------------------------
def hessian_wrt_output(loss_fn, y_expected, f):
    """d^2/df^2 of sum_i l_i(E[y], f_i), per example: (n, m, m). Every
    supported loss is linear in the target, so E over y of its Hessian is
    the Hessian at E[y]."""
    shape = f.shape
    flat = tf.reshape(f, (shape[0], -1))
    with tf.GradientTape() as outer:
        outer.watch(flat)
        with tf.GradientTape() as inner:
            inner.watch(flat)
            total = tf.reduce_sum(loss_fn(y_expected, tf.reshape(flat, shape)))
        grad = inner.gradient(total, flat)
    return outer.batch_jacobian(grad, flat).numpy()


def enumerated_second_moment(sampled, f, outcomes):
    """sum over outcomes y (with probabilities) of g(y) g(y)^T per example."""
    n = f.shape[0]
    total = 0.0
    for y, prob in outcomes:
        g = tf.reshape(sampled.gradient(y, f), (n, -1)).numpy()
        total = total + prob[:, None, None] * np.einsum("ni,nj->nij", g, g)
    return total


def test_categorical_with_label_smoothing_exact():
    rng = np.random.default_rng(0)
    f = tf.constant(rng.normal(size=(3, 4)).astype("float32"))
    loss = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.2)
    sampled = SampledLoss.from_keras(loss)
    p = tf.nn.softmax(f).numpy()
    outcomes = [(tf.one_hot([k] * 3, 4), p[:, k]) for k in range(4)]
    moment = enumerated_second_moment(sampled, f, outcomes)
    fn = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.2, reduction=None)
    expected = hessian_wrt_output(lambda y, f: fn(y, f), tf.one_hot([0] * 3, 4), f)  # any target
    np.testing.assert_allclose(moment, expected, atol=1e-5)


def test_binary_exact_by_enumeration():
    rng = np.random.default_rng(1)
    f = tf.constant(rng.normal(size=(2, 3)).astype("float32"))
    sampled = SampledLoss.from_keras(
        keras.losses.BinaryCrossentropy(from_logits=True, label_smoothing=0.1)
    )
    p = tf.sigmoid(f).numpy()
    outcomes = []
    for bits in itertools.product([0.0, 1.0], repeat=3):
        b = np.array(bits, "float32")
        outcomes.append(
            (tf.constant(np.tile(b, (2, 1))), np.prod(np.where(b == 1, p, 1 - p), axis=1))
        )
    moment = enumerated_second_moment(sampled, f, outcomes)
    fn = keras.losses.BinaryCrossentropy(from_logits=True, label_smoothing=0.1, reduction=None)
    expected = hessian_wrt_output(lambda y, f: fn(y, f), tf.zeros((2, 3)), f)
    np.testing.assert_allclose(moment, expected, atol=1e-5)


def test_poisson_exact_by_truncated_enumeration():
    from scipy import stats

    f = tf.constant([[0.7, 2.0], [1.5, 0.3]], tf.float32)
    sampled = SampledLoss.from_keras(keras.losses.Poisson())
    rates = f.numpy()
    outcomes = []
    for k0, k1 in itertools.product(range(25), repeat=2):
        y = np.tile(np.array([k0, k1], "float32"), (2, 1))
        outcomes.append(
            (
                tf.constant(y),
                stats.poisson.pmf(k0, rates[:, 0]) * stats.poisson.pmf(k1, rates[:, 1]),
            )
        )
    moment = enumerated_second_moment(sampled, f, outcomes)
    expected = hessian_wrt_output(lambda y, f: keras.losses.poisson(y, f), f, f)  # E[y] = rate
    np.testing.assert_allclose(moment, expected, rtol=1e-4, atol=1e-6)


def test_mse_and_poisson_sampling_by_monte_carlo():
    f = tf.constant(np.tile([[0.5, 1.5, 3.0]], (20000, 1)).astype("float32"))
    for loss, y_expected in ((keras.losses.MeanSquaredError(), f), (keras.losses.Poisson(), f)):
        sampled = SampledLoss.from_keras(loss)
        g = sampled.output_gradient(f, keras.random.SeedGenerator(0)).numpy()
        moment = g.T @ g / len(g)
        expected = hessian_wrt_output(loss.fn, y_expected[:2], f[:2])[0]
        np.testing.assert_allclose(moment, expected, rtol=0.05, atol=0.01)


# --- multi-output and auto ---------------------------------------------------------
def test_multi_output_sampled_per_output_weighted_and_mixed_falls_back():
    inputs = keras.Input((4,))
    h = keras.layers.Dense(8, activation="tanh")(inputs)
    model = keras.Model(
        inputs, [keras.layers.Dense(3, name="cls")(h), keras.layers.Dense(2, name="reg")(h)]
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 4)).astype("float32")
    ys = [rng.integers(0, 3, 32), rng.normal(size=(32, 2)).astype("float32")]
    opt = keras_kfac.KFAC()
    scce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=opt, loss=[scce, "mse"], loss_weights=[1.0, 0.25])
    model.fit(x, ys, epochs=1, verbose=0)
    assert opt.estimator.fisher_used == "sampled"
    assert [s.weight for s in opt.estimator.sampled_losses] == [1.0, 0.25]
    assert [s.family for s in opt.estimator.sampled_losses] == ["sparse_categorical", "squared"]
    mixed = keras_kfac.KFAC()
    model.compile(optimizer=mixed, loss=[scce, lambda y, p: tf.reduce_mean(tf.abs(y - p), -1)])
    with pytest.warns(UserWarning, match="output 'reg'"):
        model.fit(x, ys, epochs=1, verbose=0)
    assert mixed.estimator.fisher_used == "empirical"


# --- sample/class weights and masks in the statistics ---------------------------
def one_step_factors(model, x, y, loss, curvature_options=None, **fit_kw):
    """A and G of every block after one statistics update of this batch."""
    opt = keras_kfac.KFAC(
        learning_rate=0.0,
        stats_every=1,
        stats_decay=0.0,
        fisher="empirical",
        curvature_options=curvature_options,
    )
    model.compile(optimizer=opt, loss=loss)
    model.fit(x, y, batch_size=len(x), epochs=1, verbose=0, shuffle=False, **fit_kw)
    return opt


@pytest.mark.parametrize("kind", ["sample_weight", "class_weight"])
def test_weights_weight_the_statistics_as_the_loss(kind):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 5)).astype("float32")
    y = rng.integers(0, 3, 12)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3, name="out")])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    class_weight = {0: 0.5, 1: 2.0, 2: 0.0}
    w = (
        rng.random(12).astype("float32") * 2
        if kind == "sample_weight"
        else np.array([class_weight[c] for c in y], "float32")
    )
    fit_kw = {"sample_weight": w} if kind == "sample_weight" else {"class_weight": class_weight}
    opt = one_step_factors(model, x, y, loss, **fit_kw)
    # per-example gradients of the unweighted losses w.r.t. the logits
    layer = model.get_layer("out")
    s = x @ layer.kernel.numpy() + layer.bias.numpy()
    g = tf.nn.softmax(s).numpy() - np.eye(3)[y]
    expected = (w[:, None] * g).T @ g / len(x)  # (1/n) sum_i w_i g_i g_i^T
    np.testing.assert_allclose(opt.curvature_for("out").g.numpy(), expected, rtol=1e-4, atol=1e-7)


def test_masked_positions_are_left_out_of_the_statistics():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 6, (8, 5))
    tokens[:, 3:] = 0  # padding
    tokens[0, 1:] = 0
    y = rng.integers(0, 2, 8)
    inputs = keras.Input((5,), dtype="int32")
    e = keras.layers.Embedding(6, 3, mask_zero=True, name="emb")(inputs)
    h = keras.layers.Dense(4, activation="tanh", name="per_position")(e)
    out = keras.layers.Dense(2, name="out")(keras.layers.GlobalAveragePooling1D()(h))
    model = keras.Model(inputs, out)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    emb = model.get_layer("emb").embeddings.numpy()[tokens]  # before the step
    # K-FAC-expand: A sums over the (unmasked) positions.
    opt = one_step_factors(model, tokens, y, loss, curvature_options={"weight_sharing": "expand"})
    valid = tokens != 0
    a = np.concatenate([emb, np.ones(emb.shape[:2] + (1,), "float32")], -1) * valid[..., None]
    expected_a = np.einsum("nti,ntj->ij", a, a) / len(tokens)  # unmasked positions only
    np.testing.assert_allclose(
        opt.curvature_for("per_position").a.numpy(), expected_a, rtol=1e-5, atol=1e-6
    )
    # G averages over the unmasked positions only (lr 0: the weights did not move).
    _, g = layer_ag(model, model.get_layer("per_position"), tokens, y, loss)
    assert np.abs(g[~valid]).max() == 0.0  # the pooled loss ignores padding
    expected_g = np.einsum("nti,ntj->ij", g, g) / valid.sum()
    np.testing.assert_allclose(
        opt.curvature_for("per_position").g.numpy(), expected_g, rtol=1e-4, atol=1e-9
    )


def _sequence_problem(seed=0, n=6, t=4):
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, t, 3)).astype("float32")
    y = rng.integers(0, 3, (n, t))
    w = (rng.random((n, t)) * 2).astype("float32")
    w[0, 2:] = 0.0  # padding-like zero weights
    inputs = keras.Input((t, 3))
    h = keras.layers.Dense(4, activation="tanh", name="hidden")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3, name="out")(h))
    return model, x, y, w


def test_per_position_sample_weight_weights_the_empirical_statistics():
    """sample_weight (n, T) on a per-position loss: G of a layer whose
    locations are the positions is ``(1/(nT)) sum_it w_it g_it g_it^T`` with
    ``g_it`` the unweighted per-example loss's gradient (Keras's loss is
    ``sum_it w_it l_it / (nT)``, so the example's loss is ``mean_t l_it`` and
    ``g_it`` is ``1/T`` times the position's gradient that ``layer_ag`` gives)."""
    model, x, y, w = _sequence_problem()
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    n, t = y.shape
    opt = one_step_factors(
        model, x, y, loss, sample_weight=w, curvature_options={"weight_sharing": "expand"}
    )
    for name in ("hidden", "out"):
        _, g = layer_ag(model, model.get_layer(name), x, y, loss)  # unweighted, lr 0
        g = g / t
        expected = np.einsum("nt,nti,ntj->ij", w, g, g) / (n * t)
        np.testing.assert_allclose(
            opt.curvature_for(name).g.numpy(), expected, rtol=1e-4, atol=1e-8
        )


@pytest.mark.parametrize("kind", ["sample_weight", "class_weight", "per_position"])
def test_sampled_fisher_weighting_matches_the_weighted_ggn(kind):
    """fisher="sampled": G of the output layer is a Monte Carlo estimate of
    ``E_y[g g^T]`` = the weighted GGN ``(1/(nT)) sum w (diag p - p p^T) / T``
    (softmax cross-entropy; the example's loss ``mean_t l_t`` has Hessian
    ``(1/T) sum_t H_t``, so the sampled per-position gradient carries
    ``1/sqrt(T)``). The batch repeats each example 400 times, so the
    estimate is within a few percent."""
    reps = 400
    if kind == "per_position":
        model, x, y, w = _sequence_problem()
        fit_kw = {"sample_weight": np.tile(w, (reps, 1))}
    else:
        keras.utils.set_random_seed(0)
        rng = np.random.default_rng(0)
        x = rng.normal(size=(12, 1, 5)).astype("float32")
        y = rng.integers(0, 3, (12, 1))
        model = keras.Sequential([keras.Input((1, 5)), keras.layers.Dense(3, name="out")])
        class_weight = {0: 0.5, 1: 2.0, 2: 0.0}
        if kind == "sample_weight":
            w = (rng.random((12, 1)) * 2).astype("float32")
            fit_kw = {"sample_weight": np.tile(w[:, 0], reps)}
        else:
            w = np.array([[class_weight[c]] for c in y[:, 0]], "float32")
            fit_kw = {"class_weight": class_weight}
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    opt = keras_kfac.KFAC(
        learning_rate=0.0,
        stats_every=1,
        stats_decay=0.0,
        fisher="sampled",
        curvature_options={"weight_sharing": "expand"},
    )
    model.compile(optimizer=opt, loss=loss)
    xs, ys = np.tile(x, (reps, 1, 1)), np.tile(y, (reps,) + (1,) * (y.ndim - 1))
    model.fit(xs, ys, batch_size=len(xs), epochs=1, verbose=0, shuffle=False, **fit_kw)
    p = tf.nn.softmax(model(x)).numpy()  # lr 0: the weights did not move
    t = p.shape[1]
    hessian = np.einsum("nti,ij->ntij", p, np.eye(3)) - np.einsum("nti,ntj->ntij", p, p)
    expected = np.einsum("nt,ntij->ij", w, hessian) / (len(x) * t) / t
    got = opt.curvature_for("out").g.numpy()
    assert np.linalg.norm(got - expected) < 0.06 * np.linalg.norm(expected)
