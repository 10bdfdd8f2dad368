"""Sampling targets from the model's predictive distribution (the "true"
Fisher, Martens & Grosse 2015 sec. 5; Martens 2020, arXiv 1412.1193 sec. 9).

For each supported Keras loss ``l`` (a per-example loss, the mean of per-
element terms over the non-batch axes), :class:`SampledLoss` draws targets
``y ~ p(y | f(x))`` and gives the gradient of ``sum_i l_i(y_i, f(x_i))`` with
respect to the model output, multiplied by ``sqrt(scale)``, so that
``E[g g^T]`` equals the Gauss-Newton matrix ``d^2 l / df^2`` of the loss:

* (sparse) categorical cross-entropy: ``y ~ Categorical(softmax(z))`` per
  position; ``scale`` = number of positions (the loss averages over them);
* binary cross-entropy: ``y ~ Bernoulli(p)`` per element; ``scale`` = number of
  elements per example (Keras averages over them);
* mean squared error: ``y ~ N(f, m/2 I)`` with ``m`` elements per example, the
  Gaussian whose negative log-likelihood is the loss; ``scale`` = 1.
"""

import math

import keras
import tensorflow as tf

_CATEGORICAL = "categorical"
_SPARSE_CATEGORICAL = "sparse_categorical"
_BINARY = "binary"
_SQUARED = "squared"

_NAMES = {
    "sparse_categorical_crossentropy": _SPARSE_CATEGORICAL,
    "categorical_crossentropy": _CATEGORICAL,
    "binary_crossentropy": _BINARY,
    "mse": _SQUARED,
    "mean_squared_error": _SQUARED,
}

_CLASSES = {
    keras.losses.SparseCategoricalCrossentropy: _SPARSE_CATEGORICAL,
    keras.losses.CategoricalCrossentropy: _CATEGORICAL,
    keras.losses.BinaryCrossentropy: _BINARY,
    keras.losses.MeanSquaredError: _SQUARED,
}

_FUNCTIONS = {
    keras.losses.sparse_categorical_crossentropy: _SPARSE_CATEGORICAL,
    keras.losses.categorical_crossentropy: _CATEGORICAL,
    keras.losses.binary_crossentropy: _BINARY,
    keras.losses.mean_squared_error: _SQUARED,
}

SUPPORTED = (
    "(sparse_)categorical_crossentropy, binary_crossentropy and "
    "mean_squared_error (as strings, keras.losses classes or functions)"
)


class UnsupportedLossError(ValueError):
    pass


def _unsupported(loss, why):
    return UnsupportedLossError(
        f"fisher='sampled' cannot sample targets for loss {loss!r}: {why}. "
        f"Supported: {SUPPORTED}. Use KFAC(fisher='empirical'), which works with "
        "any loss, or pass loss=<a supported loss> to KFAC."
    )


def _single_loss(loss):
    if isinstance(loss, dict):
        if len(loss) != 1:
            raise _unsupported(loss, "a model with several losses")
        return next(iter(loss.values()))
    if isinstance(loss, (list, tuple)):
        if len(loss) != 1:
            raise _unsupported(loss, "a model with several losses")
        return loss[0]
    return loss


class SampledLoss:
    """A supported loss, its family and ``from_logits``."""

    def __init__(self, family, from_logits):
        self.family = family
        self.from_logits = from_logits

    @classmethod
    def from_keras(cls, loss):
        """Recognise a compiled Keras loss, or raise with the fix."""
        loss = _single_loss(loss)
        if loss is None:
            raise _unsupported(loss, "the model has no compiled loss")
        if isinstance(loss, str):
            family = _NAMES.get(loss)
            if family is None:
                raise _unsupported(loss, "unknown loss name")
            return cls(family, from_logits=False)
        for loss_class, family in _CLASSES.items():
            if type(loss) is loss_class:
                config = loss.get_config()
                if config.get("label_smoothing"):
                    raise _unsupported(loss, "label smoothing changes the likelihood")
                return cls(family, from_logits=bool(config.get("from_logits", False)))
        for fn, family in _FUNCTIONS.items():
            if loss is fn:
                return cls(family, from_logits=False)
        raise _unsupported(loss, "a custom loss has no known likelihood")

    def output_gradient(self, y_pred, seed):
        """``sqrt(scale) * d/df sum_i l_i(y_sampled_i, f_i)``, float32."""
        # identity: drop Keras's cached `_keras_logits` on softmax/sigmoid
        # outputs, so the gradient is taken with respect to `y_pred` itself.
        f = tf.identity(tf.cast(y_pred, tf.float32))
        sample = tf.stop_gradient(self._sample(f, seed))
        with tf.GradientTape() as tape:
            tape.watch(f)
            per_example = self._per_example_loss(sample, f)
            total = tf.reduce_sum(per_example)
        return tape.gradient(total, f) * math.sqrt(self._scale(f))

    def _per_example_loss(self, y, f):
        n = tf.shape(f)[0]
        if self.family == _SPARSE_CATEGORICAL:
            per = keras.losses.sparse_categorical_crossentropy(y, f, from_logits=self.from_logits)
        elif self.family == _CATEGORICAL:
            per = keras.losses.categorical_crossentropy(y, f, from_logits=self.from_logits)
        elif self.family == _BINARY:
            per = keras.losses.binary_crossentropy(y, f, from_logits=self.from_logits)
        else:
            per = keras.losses.mean_squared_error(y, f)
        return tf.reduce_mean(tf.reshape(per, (n, -1)), axis=1)

    def _scale(self, f):
        shape = f.shape[1:]
        if None in shape.as_list():
            raise ValueError(
                "fisher='sampled' needs static output shapes beyond the batch "
                f"axis; got {f.shape}."
            )
        elements = math.prod(shape.as_list())
        if self.family in (_SPARSE_CATEGORICAL, _CATEGORICAL):
            return elements // shape[-1]
        if self.family == _BINARY:
            return elements
        return 1

    def _sample(self, f, seed):
        if self.family in (_SPARSE_CATEGORICAL, _CATEGORICAL):
            classes = f.shape[-1]
            logits = f if self.from_logits else tf.math.log(tf.maximum(f, 1e-7))
            flat = tf.reshape(logits, (-1, classes))
            labels = keras.random.categorical(flat, 1, seed=seed, dtype="int32")
            labels = tf.reshape(labels, tf.shape(f)[:-1])
            if self.family == _CATEGORICAL:
                return tf.one_hot(labels, classes, dtype=f.dtype)
            return labels
        if self.family == _BINARY:
            p = tf.sigmoid(f) if self.from_logits else f
            u = keras.random.uniform(tf.shape(f), seed=seed)
            return tf.cast(u < p, f.dtype)
        elements = math.prod(f.shape[1:].as_list())
        noise = keras.random.normal(tf.shape(f), seed=seed)
        return f + math.sqrt(elements / 2.0) * noise
