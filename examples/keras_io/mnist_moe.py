"""MNIST convnet whose classifier is a top-k mixture of experts, with a balancing penalty
added to the loss in a custom ``train_step``.

Modeled on keras-io examples/vision/mnist_moe.py (this project's own code, not a copy).
Keras features: a custom ``keras.layers.Layer`` holding 6 Dense experts (10 outputs each)
and a Dense gate (both initialized from N(0, 0.001^2)), softmax gating, top-4 selection with
``keras.ops.top_k``, a non-trainable usage counter updated with ``assign_add``, and a
load-balancing penalty (negative gate entropy + variance of the per-expert gate mass +
overflow of the per-batch expert picks over an even share; coefficient 0.01); a
``keras.Model`` subclass (a Sequential conv block, the mixture, Softmax) overriding
``train_step`` and ``test_step`` (``self.compute_loss`` for the compiled cross-entropy plus the
penalty, ``tf.GradientTape``, its own ``Mean``/accuracy metrics returned by ``metrics``).
Own optimizer: Adam, learning rate 1e-3.

Budget: one epoch over the first 20,000 training digits, batches of 128, validation on the
first 5,000 test digits (``--quick``: 512 and 512). Reported: mean total loss (cross-entropy
+ penalty) over the training epoch; metric: accuracy on those test digits.
"""

import _client
import keras
import numpy as np
import tensorflow as tf
from keras import ops

CLASSES = 10
BATCH = 128


class TopKMixture(keras.layers.Layer):
    def __init__(self, units, experts=6, top_k=4, **kwargs):
        super().__init__(**kwargs)
        small = keras.initializers.RandomNormal(stddev=1e-3)
        self.experts = [keras.layers.Dense(units, kernel_initializer=small) for _ in range(experts)]
        self.gate = keras.layers.Dense(experts, kernel_initializer=small)
        self.top_k = top_k

    def build(self, input_shape):
        for layer in self.experts + [self.gate]:
            layer.build(input_shape)
        self.usage = self.add_weight(
            name="usage", shape=(len(self.experts),), initializer="zeros", trainable=False
        )

    def call(self, features):
        gates = ops.softmax(self.gate(features))  # (n, E)
        _, chosen = ops.top_k(gates, self.top_k)
        picked = ops.sum(ops.one_hot(chosen, len(self.experts)), axis=1)  # (n, E), 0/1
        counts = ops.sum(picked, axis=0)
        self.usage.assign_add(counts)

        entropy = -ops.sum(gates * ops.log(gates + 1e-10), axis=1)
        mass = ops.sum(gates, axis=0)
        # The overflow term has no gradient (picks are discrete); it only shifts the loss.
        self.penalty = (
            -ops.mean(entropy) + ops.var(mass) + ops.sum(ops.relu(counts - ops.mean(counts)))
        )

        outputs = ops.stack([expert(features) for expert in self.experts], axis=1)  # (n, E, C)
        return ops.einsum("ne,nec->nc", gates * picked, outputs)


class MixtureClassifier(keras.Model):
    def __init__(self, balance=0.01, **kwargs):
        super().__init__(**kwargs)
        self.backbone = keras.Sequential(
            [
                keras.layers.Conv2D(32, 3, activation="relu"),
                keras.layers.MaxPooling2D(2),
                keras.layers.Conv2D(64, 3, activation="relu"),
                keras.layers.MaxPooling2D(2),
                keras.layers.Flatten(),
                keras.layers.Dropout(0.5),
            ],
            name="features",
        )
        self.mixture = TopKMixture(CLASSES, name="mixture")
        self.to_probabilities = keras.layers.Softmax()
        self.balance = balance
        self.total_tracker = keras.metrics.Mean(name="loss")
        self.penalty_mean = keras.metrics.Mean(name="balance_penalty")
        self.hits = keras.metrics.CategoricalAccuracy(name="acc")

    @property
    def metrics(self):
        # Only these: the compiled loss is part of the total, tracked here.
        return [self.total_tracker, self.penalty_mean, self.hits]

    def call(self, images, training=False):
        return self.to_probabilities(self.mixture(self.backbone(images, training=training)))

    def _scored_forward(self, images, targets, training):
        probabilities = self(images, training=training)
        fit_loss = self.compute_loss(x=images, y=targets, y_pred=probabilities)
        penalty = self.balance * self.mixture.penalty
        return probabilities, fit_loss + penalty, penalty

    def _update_metrics(self, targets, probabilities, total, penalty):
        self.total_tracker.update_state(total)
        self.penalty_mean.update_state(penalty)
        self.hits.update_state(targets, probabilities)
        return {m.name: m.result() for m in self.metrics}

    def train_step(self, batch):
        images, targets = batch
        with tf.GradientTape() as tape:
            probabilities, total, penalty = self._scored_forward(images, targets, training=True)
        weights = self.trainable_variables
        self.optimizer.apply_gradients(zip(tape.gradient(total, weights), weights))
        return self._update_metrics(targets, probabilities, total, penalty)

    def test_step(self, batch):
        images, targets = batch
        probabilities, total, penalty = self._scored_forward(images, targets, training=False)
        return self._update_metrics(targets, probabilities, total, penalty)


(train_images, train_labels), (test_images, test_labels) = _client.mnist_load_data()
n_fit, n_test = _client.budget(20_000, 512), _client.budget(5_000, 512)
x_fit = (train_images[:n_fit, ..., None] / 255.0).astype("float32")
x_test = (test_images[:n_test, ..., None] / 255.0).astype("float32")
y_fit = np.eye(CLASSES, dtype="float32")[train_labels[:n_fit]]
y_test = np.eye(CLASSES, dtype="float32")[test_labels[:n_test]]

model = MixtureClassifier(name="moe")
model.compile(
    optimizer=_client.optimizer(keras.optimizers.Adam(learning_rate=1e-3)),
    loss=keras.losses.CategoricalCrossentropy(),
)
log = model.fit(
    x_fit, y_fit, batch_size=BATCH, epochs=1, validation_data=(x_test, y_test), verbose=2
)
scores = model.evaluate(x_test, y_test, batch_size=BATCH, verbose=0, return_dict=True)
print("test:", scores, "expert usage:", model.mixture.usage.numpy().tolist())

_client.report(log.history["loss"][-1], "test_accuracy", scores["acc"], higher_is_better=True)
