"""Convolutional variational autoencoder with a hand-written ``train_step`` and no compiled loss.

Modeled on keras-io examples/generative/vae.py (this project's own code, not a copy).
Keras features: two separate functional ``keras.Model`` s (a strided-Conv2D encoder that
outputs mean, log-variance and a sample of a 2-d code; a Dense + Conv2DTranspose decoder with
a sigmoid image), a custom ``Sampling`` layer (reparameterization with ``keras.random`` and
a ``SeedGenerator``), a ``keras.Model`` subclass owning both with its own ``train_step``
(``tf.GradientTape``; loss = per-image summed binary cross-entropy + KL divergence to the
unit Gaussian, averaged over the batch), ``keras.metrics.Mean`` trackers exposed through
``metrics``, and ``compile(optimizer=...)`` with no loss.
Own optimizer: Adam with Keras defaults.

Budget: one epoch over the first 20,000 of the 70,000 MNIST digits (train then test split;
``--quick``: 512), batches of 128. Reported: last epoch's total loss; metric: its
reconstruction term (summed binary cross-entropy per image, lower is better).
"""

import _client
import keras
import numpy as np
import tensorflow as tf
from keras import ops

CODE_SIZE = 2


class Sampling(keras.layers.Layer):
    """Draws ``mean + exp(log_var / 2) * eps`` so gradients reach mean and log-variance."""

    def __init__(self, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.noise_seed = keras.random.SeedGenerator(seed)

    def call(self, stats):
        mean, log_var = stats
        eps = keras.random.normal(ops.shape(mean), seed=self.noise_seed)
        return mean + ops.exp(0.5 * log_var) * eps


def make_encoder():
    image = keras.Input(shape=(28, 28, 1), name="image")
    h = image
    for width in (32, 64):
        h = keras.layers.Conv2D(width, 3, strides=2, padding="same", activation="relu")(h)
    h = keras.layers.Dense(16, activation="relu")(keras.layers.Flatten()(h))
    mean = keras.layers.Dense(CODE_SIZE, name="mean")(h)
    log_var = keras.layers.Dense(CODE_SIZE, name="log_var")(h)
    code = Sampling(seed=_client.ARGS.seed, name="code")([mean, log_var])
    return keras.Model(image, [mean, log_var, code], name="encoder")


def make_decoder():
    code = keras.Input(shape=(CODE_SIZE,), name="code")
    h = keras.layers.Dense(7 * 7 * 64, activation="relu")(code)
    h = keras.layers.Reshape((7, 7, 64))(h)
    for width in (64, 32):
        h = keras.layers.Conv2DTranspose(width, 3, strides=2, padding="same", activation="relu")(h)
    image = keras.layers.Conv2DTranspose(1, 3, padding="same", activation="sigmoid")(h)
    return keras.Model(code, image, name="decoder")


class VariationalAutoencoder(keras.Model):
    def __init__(self, encoder, decoder, **kwargs):
        super().__init__(**kwargs)
        self.encoder = encoder
        self.decoder = decoder
        self.total_mean = keras.metrics.Mean(name="loss")
        self.recon_mean = keras.metrics.Mean(name="reconstruction")
        self.kl_mean = keras.metrics.Mean(name="kl")

    @property
    def metrics(self):
        return [self.total_mean, self.recon_mean, self.kl_mean]

    def call(self, images):
        return self.decoder(self.encoder(images)[2])

    def train_step(self, images):
        with tf.GradientTape() as tape:
            mean, log_var, code = self.encoder(images, training=True)
            rebuilt = self.decoder(code, training=True)
            per_pixel = keras.losses.binary_crossentropy(images, rebuilt)  # (n, 28, 28)
            recon = ops.mean(ops.sum(per_pixel, axis=(1, 2)))
            kl_terms = ops.square(mean) + ops.exp(log_var) - 1.0 - log_var
            kl = ops.mean(0.5 * ops.sum(kl_terms, axis=1))
            total = recon + kl
        weights = self.trainable_weights
        self.optimizer.apply_gradients(zip(tape.gradient(total, weights), weights))
        for tracker, value in zip(self.metrics, (total, recon, kl)):
            tracker.update_state(value)
        return {tracker.name: tracker.result() for tracker in self.metrics}


(train_images, _), (test_images, _) = _client.mnist_load_data()
digits = np.concatenate([train_images, test_images])[: _client.budget(20_000, 512)]
digits = (digits.astype("float32") / 255.0)[..., None]

vae = VariationalAutoencoder(make_encoder(), make_decoder(), name="vae")
vae.compile(optimizer=_client.optimizer(keras.optimizers.Adam()))
log = vae.fit(digits, epochs=1, batch_size=128, verbose=2)

_client.report(
    log.history["loss"][-1],
    "reconstruction_loss",
    log.history["reconstruction"][-1],
    higher_is_better=False,
)
