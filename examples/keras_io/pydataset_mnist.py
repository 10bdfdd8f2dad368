"""Functional MLP trained and validated from ``keras.utils.PyDataset`` objects.

Modeled on keras-io guides/training_with_built_in_methods.py, its section on ``PyDataset``
instances (this project's own code, not a copy).
Keras features: a ``keras.utils.PyDataset`` subclass (``__len__``, ``__getitem__``,
``on_epoch_end`` reshuffling the training order); ``fit(..., validation_data=PyDataset)`` and
``evaluate`` on one; the same functional MLP as ``tfdata_mnist.py`` (two ReLU Dense layers of
64, softmax head) with ``sparse_categorical_crossentropy``.
Own optimizer: RMSprop with Keras defaults.

Budget: one epoch over 30,000 training digits in batches of 32 (``--quick``: 512 digits);
the last 10,000 digits of the training split are the validation set. Reported: last
training loss; metric: accuracy on that validation set.
"""

import math

import _client
import keras
import numpy as np


class DigitBatches(keras.utils.PyDataset):
    def __init__(self, images, labels, batch_size, shuffle, seed=0, **kwargs):
        super().__init__(**kwargs)
        self.images = images.reshape(-1, 784).astype("float32") / 255.0
        self.labels = labels.astype("float32")
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.rng = np.random.default_rng(seed)
        self.order = np.arange(len(self.labels))
        self.on_epoch_end()

    def __len__(self):
        return math.ceil(len(self.order) / self.batch_size)

    def __getitem__(self, index):
        rows = self.order[index * self.batch_size : (index + 1) * self.batch_size]
        return self.images[rows], self.labels[rows]

    def on_epoch_end(self):
        if self.shuffle:
            self.rng.shuffle(self.order)


def mlp_classifier():
    pixels = keras.Input(shape=(784,), name="pixels")
    hidden = pixels
    for depth in (1, 2):
        hidden = keras.layers.Dense(64, activation="relu", name=f"hidden_{depth}")(hidden)
    probabilities = keras.layers.Dense(10, activation="softmax", name="probabilities")(hidden)
    return keras.Model(pixels, probabilities, name="mlp")


(train_images, train_labels), _ = _client.mnist_load_data()
holdout = slice(50_000, 60_000)
used = _client.budget(30_000, 512)
train_batches = DigitBatches(
    train_images[:used], train_labels[:used], 32, shuffle=True, seed=_client.ARGS.seed
)
val_batches = DigitBatches(train_images[holdout], train_labels[holdout], 32, shuffle=False)

model = mlp_classifier()
model.compile(
    optimizer=_client.optimizer("rmsprop"),
    loss="sparse_categorical_crossentropy",
    metrics=["sparse_categorical_accuracy"],
)
log = model.fit(train_batches, validation_data=val_batches, epochs=1, verbose=2)
scores = model.evaluate(val_batches, verbose=0, return_dict=True)
print("validation:", scores)

_client.report(
    log.history["loss"][-1],
    "val_accuracy",
    scores["sparse_categorical_accuracy"],
    higher_is_better=True,
)
