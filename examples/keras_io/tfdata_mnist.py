"""Functional MLP fed by ``tf.data.Dataset`` pipelines for training and evaluation.

Modeled on keras-io guides/training_with_built_in_methods.py, its section on training with
``tf.data`` Datasets (this project's own code, not a copy).
Keras features: a functional ``keras.Model`` (named Input, two ReLU Dense layers, softmax
Dense); integer labels with ``sparse_categorical_crossentropy``; ``fit`` and ``evaluate``
on batched ``tf.data.Dataset`` objects (shuffled for training, no ``batch_size`` argument).
Own optimizer: RMSprop with Keras defaults.

Budget: 2 epochs over 50,000 training digits (the last 10,000 of the training split are
left out, as a validation reserve would be; ``--quick``: 1 epoch, 512 digits), batches of
64. Reported: last training loss; metric: accuracy on the 10,000 test digits.
"""

import _client
import keras
import tensorflow as tf


def mlp_classifier():
    pixels = keras.Input(shape=(784,), name="pixels")
    hidden = pixels
    for depth in (1, 2):
        hidden = keras.layers.Dense(64, activation="relu", name=f"hidden_{depth}")(hidden)
    probabilities = keras.layers.Dense(10, activation="softmax", name="probabilities")(hidden)
    return keras.Model(pixels, probabilities, name="mlp")


def pipeline(images, labels, shuffle):
    x = images.reshape(-1, 784).astype("float32") / 255.0
    ds = tf.data.Dataset.from_tensor_slices((x, labels.astype("float32")))
    if shuffle:
        ds = ds.shuffle(1024)
    return ds.batch(64)


(train_images, train_labels), (test_images, test_labels) = _client.mnist_load_data()
used = _client.budget(50_000, 512)
train_ds = pipeline(train_images[:used], train_labels[:used], shuffle=True)
test_ds = pipeline(test_images, test_labels, shuffle=False)

model = mlp_classifier()
model.compile(
    optimizer=_client.optimizer("rmsprop"),
    loss="sparse_categorical_crossentropy",
    metrics=["sparse_categorical_accuracy"],
)
log = model.fit(train_ds, epochs=_client.budget(2, 1), verbose=2)
scores = model.evaluate(test_ds, verbose=0, return_dict=True)
print("test:", scores)

_client.report(
    log.history["loss"][-1],
    "test_accuracy",
    scores["sparse_categorical_accuracy"],
    higher_is_better=True,
)
