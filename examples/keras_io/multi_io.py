"""Two inputs, two outputs: per-output losses, metrics and loss weights, fed by a dict dataset.

Modeled on keras-io guides/training_with_built_in_methods.py, its section on multi-input,
multi-output models (this project's own code, not a copy).
Keras features: a functional ``keras.Model`` with an image input (Conv2D, GlobalMaxPooling2D)
and a variable-length sequence input (Conv1D, GlobalMaxPooling1D) merged by
``concatenate``; a linear regression head and a 5-way softmax head; ``compile`` with dicts
of losses (mean squared error, categorical cross-entropy), of metrics and of
``loss_weights`` (2 and 1), keyed by output name; a ``tf.data.Dataset`` yielding
``(inputs dict, targets dict)``.
Own optimizer: RMSprop, learning rate 1e-3.

Data: generated; uniform noise for both inputs (images 32x32x3, sequences of 20 steps of 10
features), uniform regression targets and random one-hot classes, so there is nothing to
generalize to. Budget: 2,000 samples, 4 epochs, batches of 64 (``--quick``: 128 samples,
1 epoch). Reported: last training loss, which is also the metric (lower is better).
"""

import _client
import keras
import numpy as np
import tensorflow as tf


def two_headed_model():
    image = keras.Input(shape=(32, 32, 3), name="image")
    series = keras.Input(shape=(None, 10), name="series")
    image_code = keras.layers.GlobalMaxPooling2D()(keras.layers.Conv2D(3, 3)(image))
    series_code = keras.layers.GlobalMaxPooling1D()(keras.layers.Conv1D(3, 3)(series))
    joint = keras.layers.concatenate([image_code, series_code])
    outputs = {
        "score": keras.layers.Dense(1, name="score")(joint),
        "category": keras.layers.Dense(5, activation="softmax", name="category")(joint),
    }
    return keras.Model({"image": image, "series": series}, outputs, name="two_headed")


rng = np.random.default_rng(_client.ARGS.seed)
count = _client.budget(2_000, 128)
inputs = {
    "image": rng.random((count, 32, 32, 3), dtype=np.float32),
    "series": rng.random((count, 20, 10), dtype=np.float32),
}
targets = {
    "score": rng.random((count, 1), dtype=np.float32),
    "category": np.eye(5, dtype=np.float32)[rng.integers(5, size=count)],
}
stream = tf.data.Dataset.from_tensor_slices((inputs, targets)).shuffle(1024).batch(64)

model = two_headed_model()
model.compile(
    optimizer=_client.optimizer(keras.optimizers.RMSprop(learning_rate=1e-3)),
    loss={
        "score": keras.losses.MeanSquaredError(),
        "category": keras.losses.CategoricalCrossentropy(),
    },
    loss_weights={"score": 2.0, "category": 1.0},
    metrics={
        "score": [keras.metrics.MeanAbsoluteError()],
        "category": [keras.metrics.CategoricalAccuracy()],
    },
)
log = model.fit(stream, epochs=_client.budget(4, 1), verbose=2)
final = log.history["loss"][-1]

_client.report(final, "train_loss", final, higher_is_better=False)
