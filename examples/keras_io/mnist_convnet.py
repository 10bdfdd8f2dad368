"""Digit classifier: two conv/pool stages and a softmax head, trained with ``fit`` on arrays.

Modeled on keras-io examples/vision/mnist_convnet.py (this project's own code, not a copy).
Keras features: ``keras.Sequential`` with Conv2D, MaxPooling2D, Flatten, Dropout and Dense;
one-hot targets and categorical cross-entropy; ``fit(validation_split=...)`` on NumPy arrays;
``evaluate``. Own optimizer: Adam with Keras defaults.

Budget: one epoch over the first 20,000 training digits (``--quick``: 512), batches of 128.
Reported: last training loss; metric: accuracy on the 10,000 test digits.
"""

import _client
import keras
import numpy as np

CLASSES = 10


def as_images(pixels):
    """uint8 (N, 28, 28) -> float32 (N, 28, 28, 1) in [0, 1]."""
    return np.expand_dims(pixels.astype("float32") / 255.0, axis=-1)


def build_classifier():
    stages = []
    for width in (32, 64):
        stages.append(keras.layers.Conv2D(width, kernel_size=3, activation="relu"))
        stages.append(keras.layers.MaxPooling2D(pool_size=2))
    head = [
        keras.layers.Flatten(),
        keras.layers.Dropout(0.5),
        keras.layers.Dense(CLASSES, activation="softmax"),
    ]
    return keras.Sequential([keras.Input(shape=(28, 28, 1))] + stages + head, name="convnet")


(train_pixels, train_digits), (test_pixels, test_digits) = _client.mnist_load_data()
keep = _client.budget(20_000, 512)
x_fit = as_images(train_pixels[:keep])
t_fit = keras.utils.to_categorical(train_digits[:keep], CLASSES)
x_eval = as_images(test_pixels)
t_eval = keras.utils.to_categorical(test_digits, CLASSES)

classifier = build_classifier()
classifier.summary()
classifier.compile(
    optimizer=_client.optimizer("adam"),
    loss="categorical_crossentropy",
    metrics=["accuracy"],
)
log = classifier.fit(x_fit, t_fit, batch_size=128, epochs=1, validation_split=0.1, verbose=2)
scores = classifier.evaluate(x_eval, t_eval, verbose=0, return_dict=True)
print("test:", scores)

_client.report(log.history["loss"][-1], "test_accuracy", scores["accuracy"], higher_is_better=True)
