"""Variables outside every curvature block are trained by a real
``keras.optimizers.Adam`` (Keras's formulation, sparse gradients, weight
decay at the fallback's own rate), saved and restored with the model."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_kfac
from test_checkpoint import assert_same_state

SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


class Scale(keras.layers.Layer):
    """A custom layer with a weight: no curvature block, so fallback."""

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(input_shape[-1],), initializer="ones", name="scale")

    def call(self, x):
        return x * self.scale


def token_data(n=32, length=6, vocab=20, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, vocab, size=(n, length)).astype("int32")
    y = (x.sum(axis=1) % classes).astype("int32")
    return x, y


def mixed_model(seed=0):
    """Embedding, a custom layer, BatchNormalization and Dense layers."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((6,), dtype="int32"),
            keras.layers.Embedding(20, 4, name="embed"),
            Scale(name="scale"),
            keras.layers.Flatten(),
            keras.layers.Dense(8, activation="tanh", name="hidden"),
            keras.layers.BatchNormalization(name="norm"),
            keras.layers.Dense(3, name="out"),
        ]
    )


def kfac(**kwargs):
    return keras_kfac.KFAC(learning_rate=0.1, inverse_every=2, stats_every=1, seed=3, **kwargs)


def test_fallback_is_keras_adam_with_its_own_weight_decay():
    x, y = token_data()
    model = mixed_model()
    opt = kfac(fallback_learning_rate=0.01, weight_decay=0.1)
    model.compile(optimizer=opt, loss=SCCE)
    opt.build(model.trainable_variables)
    scale = model.get_layer("scale").scale
    assert any(v is scale for v in opt.estimator.fallback_variables)
    before = scale.numpy().copy()
    # The same gradient through Keras's AdamW-style Adam gives the reference.
    reference = keras.optimizers.Adam(learning_rate=0.01, weight_decay=0.1)
    copy = keras.Variable(before)
    with tf.GradientTape() as tape:
        loss = SCCE(y, model(x, training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    opt.apply_gradients(zip(grads, model.trainable_variables))
    index = [i for i, v in enumerate(model.trainable_variables) if v is scale][0]
    reference.apply_gradients([(grads[index], copy)])
    np.testing.assert_allclose(scale.numpy(), copy.numpy(), rtol=1e-6, atol=1e-7)
    assert not np.allclose(scale.numpy(), before)
    assert int(opt.fallback_optimizer.iterations.numpy()) == 1


def test_sparse_embedding_gradients_reach_the_fallback_as_indexed_slices():
    x, y = token_data()
    model = mixed_model()
    opt = kfac()
    model.compile(optimizer=opt, loss=SCCE)
    embed = model.get_layer("embed")
    with tf.GradientTape() as tape:
        loss = SCCE(y, model(x, training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    index = [i for i, v in enumerate(model.trainable_variables) if v is embed.embeddings][0]
    assert isinstance(grads[index], tf.IndexedSlices)
    before = embed.embeddings.numpy().copy()
    opt.apply_gradients(zip(grads, model.trainable_variables))
    unused = sorted(set(range(20)) - set(x.ravel().tolist()))
    changed = np.abs(embed.embeddings.numpy() - before).sum(axis=1) > 0
    assert changed[np.unique(x)].all()
    if unused:
        assert not changed[unused].any()


@pytest.mark.parametrize("jit_compile", [False, True])
def test_embedding_and_batchnorm_model_save_load_resumes_exactly(tmp_path, jit_compile):
    x, y = token_data()
    fit = dict(batch_size=8, shuffle=False, verbose=0)
    reference = mixed_model()
    ref_opt = kfac()
    reference.compile(optimizer=ref_opt, loss=SCCE, jit_compile=jit_compile)
    reference.fit(x, y, epochs=4, **fit)

    model = mixed_model()
    model.compile(optimizer=kfac(), loss=SCCE, jit_compile=jit_compile)
    model.fit(x, y, epochs=2, **fit)
    path = str(tmp_path / "mixed.keras")
    model.save(path)
    loaded = keras.models.load_model(path, custom_objects={"Scale": Scale})
    assert int(loaded.optimizer.fallback_optimizer.iterations.numpy()) == 8
    loaded.fit(x, y, epochs=2, **fit)
    assert_same_state(loaded, reference, loaded.optimizer, ref_opt, tol=1e-5)


def test_fallback_layers_are_named_with_their_share_once():
    x, y = token_data()
    model = mixed_model()
    opt = kfac()
    model.compile(optimizer=opt, loss=SCCE)
    with pytest.warns(
        UserWarning, match=r"of the trainable parameters .* scale \(Scale\)"
    ) as record:
        model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    assert sum("Adam fallback" in str(w.message) for w in record) == 1  # once, at build
    share = 4 / sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    assert opt.estimator.fallback_share() == pytest.approx(share)
    rows = opt.summary(print_fn=lambda s: None).splitlines()
    row = [r for r in rows if r.startswith("scale ")]
    assert row and "fallback" in row[0] and "4 parameters" in row[0], rows
    assert "no curvature block for Scale" in row[0]
