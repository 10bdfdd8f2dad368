"""Siamese network on pairs of digits trained with a hand-written contrastive loss.

Modeled on keras-io examples/vision/siamese_contrastive.py (this project's own code, not a
copy).
Keras features: one functional embedding ``keras.Model`` (BatchNormalization on raw pixels,
two tanh Conv2D + AveragePooling2D stages, BatchNormalization, a 10-unit tanh Dense) shared
by two inputs of an outer functional model; a ``Lambda`` layer computing the Euclidean
distance of the two embeddings, BatchNormalization and a sigmoid Dense on it; a custom
``keras.losses.Loss`` subclass (contrastive loss, margin 1) passed to ``compile``; the
``accuracy`` metric; ``fit`` on a list of two arrays with ``validation_data``.
Own optimizer: RMSprop with Keras defaults.

Pairs: every image is paired once with a random image of the same digit (label 1) and once
with a random image of another digit (label 0); pixels stay in [0, 255] (the first
BatchNormalization scales them). Budget: one epoch over pairs from the first 4,000 training
images, validation pairs from 2,000 images of the second half of the training split, batches
of 16 (``--quick``: 128 and 64 images). Reported: last training loss; metric: accuracy on
pairs from the 10,000 test images (``--quick``: 256).
"""

import _client
import keras
import numpy as np
from keras import ops


class ContrastiveLoss(keras.losses.Loss):
    """Same-class pairs (label 1) are pushed to an output of at least ``margin``, other
    pairs (label 0) toward 0; squared penalties, averaged over the batch."""

    def __init__(self, margin=1.0, name="contrastive", **kwargs):
        super().__init__(name=name, **kwargs)
        self.margin = margin

    def call(self, y_true, y_pred):
        y_true = ops.cast(y_true, y_pred.dtype)
        shortfall = ops.maximum(self.margin - y_pred, 0.0)
        return y_true * ops.square(shortfall) + (1.0 - y_true) * ops.square(y_pred)

    def get_config(self):
        return {**super().get_config(), "margin": self.margin}


def make_pairs(images, digits, rng):
    """Two pairs per image: (image, same digit) labeled 1, (image, other digit) labeled 0."""
    by_digit = [np.flatnonzero(digits == d) for d in range(10)]
    same = np.array([rng.choice(by_digit[d]) for d in digits])
    other_digit = (digits + rng.integers(1, 10, size=len(digits))) % 10
    other = np.array([rng.choice(by_digit[d]) for d in other_digit])
    left = np.concatenate([images, images])
    right = np.concatenate([images[same], images[other]])
    labels = np.concatenate([np.ones(len(images)), np.zeros(len(images))]).astype("float32")
    order = rng.permutation(len(labels))
    return [left[order, ..., None], right[order, ..., None]], labels[order]


def embedding_network():
    pixels = keras.Input(shape=(28, 28, 1))
    h = keras.layers.BatchNormalization()(pixels)
    for width in (4, 16):
        h = keras.layers.Conv2D(width, 5, activation="tanh")(h)
        h = keras.layers.AveragePooling2D(2)(h)
    h = keras.layers.BatchNormalization()(keras.layers.Flatten()(h))
    return keras.Model(pixels, keras.layers.Dense(10, activation="tanh")(h), name="embedding")


def euclidean(pair):
    a, b = pair
    squared = ops.sum(ops.square(a - b), axis=1, keepdims=True)
    return ops.sqrt(ops.maximum(squared, keras.config.epsilon()))


def siamese_network():
    embed = embedding_network()
    left, right = keras.Input(shape=(28, 28, 1)), keras.Input(shape=(28, 28, 1))
    distance = keras.layers.Lambda(euclidean, name="distance")([embed(left), embed(right)])
    similar = keras.layers.Dense(1, activation="sigmoid")(
        keras.layers.BatchNormalization()(distance)
    )
    return keras.Model([left, right], similar, name="siamese")


rng = np.random.default_rng(_client.ARGS.seed)
(train_images, train_digits), (test_images, test_digits) = _client.mnist_load_data()
train_images, test_images = train_images.astype("float32"), test_images.astype("float32")
n_fit, n_val = _client.budget(4_000, 128), _client.budget(2_000, 64)
n_test = _client.budget(10_000, 256)
val_rows = slice(30_000, 30_000 + n_val)
x_fit, y_fit = make_pairs(train_images[:n_fit], train_digits[:n_fit], rng)
x_val, y_val = make_pairs(train_images[val_rows], train_digits[val_rows], rng)
x_test, y_test = make_pairs(test_images[:n_test], test_digits[:n_test], rng)

siamese = siamese_network()
siamese.compile(
    optimizer=_client.optimizer("rmsprop"), loss=ContrastiveLoss(margin=1.0), metrics=["accuracy"]
)
log = siamese.fit(x_fit, y_fit, validation_data=(x_val, y_val), batch_size=16, epochs=1, verbose=2)
scores = siamese.evaluate(x_test, y_test, verbose=0, return_dict=True)
print("test:", scores)

_client.report(log.history["loss"][-1], "test_accuracy", scores["accuracy"], higher_is_better=True)
