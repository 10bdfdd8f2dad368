"""Class-conditional GAN on MNIST: one ``train_step`` updating two networks with two optimizers.

Modeled on keras-io examples/generative/conditional_gan.py (this project's own code, not a
copy).
Keras features: a generator and a discriminator as separate ``keras.Sequential`` models
(Conv2DTranspose upsampling with LeakyReLU; strided Conv2D with LeakyReLU, global max
pooling and a logit); a ``keras.Model`` subclass overriding ``compile(d_optimizer=...,
g_optimizer=..., loss_fn=...)`` and ``train_step`` with two ``tf.GradientTape`` s (the
discriminator is called in both, on real and generated images then on generated ones only);
class conditioning by concatenating one-hot labels to the noise and label planes to the
images; ``BinaryCrossentropy(from_logits=True)``; a shuffled ``tf.data.Dataset`` of
(image, one-hot label); ``predict`` on the trained generator.
Own optimizers: Adam, learning rate 3e-4, one for each network.

Budget: one epoch over the first 1,600 of the 70,000 digits (25 steps of 64; ``--quick``:
256 digits). Reported: the discriminator's loss of the last epoch as training loss; metric:
label accuracy, the fraction of 500 generated digits (50 per class) that a small classifier
trained here on 10,000 real digits (same seed and Adam in both runs, not the optimizer under
test) reads as the class they were conditioned on (chance: 0.1). The generator's loss is
kept as an extra number: it is adversarial (lower means the discriminator is fooled more
often, which a weak discriminator also gives), not a measure of the images. With
``--optimizer kfac`` each network gets its own ``KFAC()``.
"""

import _client
import keras
import numpy as np
import tensorflow as tf
from keras import ops

CLASSES = 10
NOISE = 128
SIDE = 28


def make_generator():
    channels = NOISE + CLASSES
    return keras.Sequential(
        [
            keras.Input(shape=(channels,)),
            keras.layers.Dense(7 * 7 * channels),
            keras.layers.LeakyReLU(negative_slope=0.2),
            keras.layers.Reshape((7, 7, channels)),
            keras.layers.Conv2DTranspose(128, 4, strides=2, padding="same"),
            keras.layers.LeakyReLU(negative_slope=0.2),
            keras.layers.Conv2DTranspose(128, 4, strides=2, padding="same"),
            keras.layers.LeakyReLU(negative_slope=0.2),
            keras.layers.Conv2D(1, 7, padding="same", activation="sigmoid"),
        ],
        name="generator",
    )


def make_discriminator():
    return keras.Sequential(
        [
            keras.Input(shape=(SIDE, SIDE, 1 + CLASSES)),
            keras.layers.Conv2D(64, 3, strides=2, padding="same"),
            keras.layers.LeakyReLU(negative_slope=0.2),
            keras.layers.Conv2D(128, 3, strides=2, padding="same"),
            keras.layers.LeakyReLU(negative_slope=0.2),
            keras.layers.GlobalMaxPooling2D(),
            keras.layers.Dense(1),
        ],
        name="discriminator",
    )


def with_label_planes(images, one_hot):
    """Append one constant plane per class to each image (1 on the plane of its label)."""
    n = ops.shape(images)[0]
    planes = ops.broadcast_to(one_hot[:, None, None, :], (n, SIDE, SIDE, CLASSES))
    return ops.concatenate([images, planes], axis=-1)


class ConditionalGAN(keras.Model):
    def __init__(self, generator, discriminator, **kwargs):
        super().__init__(**kwargs)
        self.generator = generator
        self.discriminator = discriminator
        self.noise_seed = keras.random.SeedGenerator(_client.ARGS.seed)
        self.g_mean = keras.metrics.Mean(name="generator_loss")
        self.d_mean = keras.metrics.Mean(name="discriminator_loss")

    @property
    def metrics(self):
        return [self.g_mean, self.d_mean]

    def compile(self, d_optimizer, g_optimizer, loss_fn):
        super().compile()
        self.d_optimizer = d_optimizer
        self.g_optimizer = g_optimizer
        self.loss_fn = loss_fn

    def _fake(self, one_hot, training):
        noise = keras.random.normal((ops.shape(one_hot)[0], NOISE), seed=self.noise_seed)
        return self.generator(ops.concatenate([noise, one_hot], axis=1), training=training)

    def train_step(self, batch):
        real, one_hot = batch
        n = ops.shape(real)[0]

        # Discriminator step: real images are labeled 1, generated ones 0.
        fake = self._fake(one_hot, training=False)
        both = ops.concatenate(
            [with_label_planes(real, one_hot), with_label_planes(fake, one_hot)], axis=0
        )
        truth = ops.concatenate([ops.ones((n, 1)), ops.zeros((n, 1))], axis=0)
        with tf.GradientTape() as tape:
            d_loss = self.loss_fn(truth, self.discriminator(both, training=True))
        d_vars = self.discriminator.trainable_weights
        self.d_optimizer.apply_gradients(zip(tape.gradient(d_loss, d_vars), d_vars))

        # Generator step: fresh samples, scored as if real; only generator weights move.
        with tf.GradientTape() as tape:
            fake = self._fake(one_hot, training=True)
            verdict = self.discriminator(with_label_planes(fake, one_hot), training=False)
            g_loss = self.loss_fn(ops.ones((n, 1)), verdict)
        g_vars = self.generator.trainable_weights
        self.g_optimizer.apply_gradients(zip(tape.gradient(g_loss, g_vars), g_vars))

        self.g_mean.update_state(g_loss)
        self.d_mean.update_state(d_loss)
        return {"generator_loss": self.g_mean.result(), "discriminator_loss": self.d_mean.result()}


(train_images, train_labels), (test_images, test_labels) = _client.mnist_load_data()
used = _client.budget(1_600, 256)
images = np.concatenate([train_images, test_images])[:used].astype("float32")[..., None] / 255.0
labels = np.eye(CLASSES, dtype="float32")[np.concatenate([train_labels, test_labels])[:used]]
batches = tf.data.Dataset.from_tensor_slices((images, labels)).shuffle(1024).batch(64)

gan = ConditionalGAN(make_generator(), make_discriminator(), name="cgan")
gan.compile(
    d_optimizer=_client.optimizer(keras.optimizers.Adam(learning_rate=3e-4)),
    g_optimizer=_client.optimizer(keras.optimizers.Adam(learning_rate=3e-4)),
    loss_fn=keras.losses.BinaryCrossentropy(from_logits=True),
)
log = gan.fit(batches, epochs=1, verbose=2)

# One generated digit per class, all from the same noise vector.
shared_noise = np.repeat(np.random.default_rng(0).normal(size=(1, NOISE)), CLASSES, axis=0)
samples = gan.generator.predict(
    np.hstack([shared_noise, np.eye(CLASSES)]).astype("float32"), verbose=0
)
print(
    "generated digits:",
    samples.shape,
    "mean intensity per class:",
    np.round(samples.mean(axis=(1, 2, 3)), 3).tolist(),
)


def label_accuracy(generator):
    """Fraction of generated digits a classifier of real digits reads as their label."""
    keras.utils.set_random_seed(_client.ARGS.seed)  # the same classifier in both runs
    real = _client.budget(10_000, 1_000)
    classifier = keras.Sequential(
        [
            keras.Input((SIDE, SIDE, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(CLASSES),
        ]
    )
    classifier.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    classifier.fit(
        train_images[:real, ..., None].astype("float32") / 255.0,
        train_labels[:real],
        epochs=_client.budget(3, 1),
        batch_size=128,
        verbose=0,
    )
    per_class = 50
    wanted = np.repeat(np.arange(CLASSES), per_class)
    noise = np.random.default_rng(1).normal(size=(len(wanted), NOISE))
    codes = np.hstack([noise, np.eye(CLASSES)[wanted]]).astype("float32")
    digits = generator.predict(codes, verbose=0)
    read = classifier.predict(digits, verbose=0).argmax(axis=1)
    return float(np.mean(read == wanted))


_client.report(
    log.history["discriminator_loss"][-1],
    "label_accuracy",
    label_accuracy(gan.generator),
    higher_is_better=True,
    extra={"generator_loss": log.history["generator_loss"][-1]},
)
