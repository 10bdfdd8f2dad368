"""MLP whose nonlinearity is a custom layer with its own weight matrix ("antirectifier").

Modeled on keras-io examples/keras_recipes/antirectifier.py (this project's own code, not a
copy). The custom layer centers each feature vector, keeps both signs of it side by side
(``relu(x)`` and ``relu(-x)``, so nothing is zeroed out) and maps the doubled vector back to
the input width with a trainable kernel it creates in ``build``.
Keras features: a ``keras.layers.Layer`` subclass with ``build``/``add_weight``/``get_config``
written with ``keras.ops``; Dense and Dropout in a ``keras.Sequential``; logits with
``SparseCategoricalCrossentropy(from_logits=True)``; ``fit(validation_split=...)``.
Own optimizer: RMSprop with Keras defaults.

Budget: 3 epochs over the 60,000 training digits (``--quick``: 1 epoch, 512 digits),
batches of 128, 15 % held out for validation. Reported: last training loss; metric: accuracy
on the 10,000 test digits.
"""

import _client
import keras
from keras import ops


class Antirectifier(keras.layers.Layer):
    def __init__(self, kernel_initializer="he_normal", **kwargs):
        super().__init__(**kwargs)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(self, input_shape):
        width = input_shape[-1]
        # Both signs are kept, so the projection reads twice the input width.
        self.projection = self.add_weight(
            name="projection", shape=(2 * width, width), initializer=self.kernel_initializer
        )

    def call(self, features):
        centered = features - ops.mean(features, axis=-1, keepdims=True)
        both_signs = ops.concatenate([ops.relu(centered), ops.relu(-centered)], axis=-1)
        return ops.matmul(both_signs, self.projection)

    def get_config(self):
        return {
            **super().get_config(),
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
        }


def flat_pixels(images):
    return images.reshape(len(images), 28 * 28).astype("float32") / 255.0


(train_images, train_labels), (test_images, test_labels) = _client.mnist_load_data()
keep = _client.budget(60_000, 512)
x_fit, y_fit = flat_pixels(train_images[:keep]), train_labels[:keep]
x_eval, y_eval = flat_pixels(test_images), test_labels

body = [keras.Input(shape=(28 * 28,))]
for _ in range(2):
    body += [keras.layers.Dense(256), Antirectifier()]
mlp = keras.Sequential(body + [keras.layers.Dropout(0.5), keras.layers.Dense(10)], name="anti_mlp")

mlp.compile(
    optimizer=_client.optimizer(keras.optimizers.RMSprop()),
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    metrics=[keras.metrics.SparseCategoricalAccuracy(name="acc")],
)
log = mlp.fit(
    x_fit, y_fit, batch_size=128, epochs=_client.budget(3, 1), validation_split=0.15, verbose=2
)
scores = mlp.evaluate(x_eval, y_eval, verbose=0, return_dict=True)
print("test:", scores)

_client.report(log.history["loss"][-1], "test_accuracy", scores["acc"], higher_is_better=True)
