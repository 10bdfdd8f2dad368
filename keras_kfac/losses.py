"""Sampling targets from the model's predictive distribution (the "true"
Fisher, Martens & Grosse 2015 sec. 5; Martens 2020, arXiv 1412.1193 sec. 9).

For each supported Keras loss ``l`` (a per-example loss, the mean of per-
element terms over the non-batch axes), :class:`SampledLoss` draws targets
``y ~ p(y | f(x))`` and gives the gradient of ``sum_i l_i(y_i, f(x_i))`` with
respect to the model output, multiplied by ``sqrt(scale)``, so that
``E[g g^T]`` equals the Gauss-Newton matrix ``d^2 l / df^2`` of the loss
(for the losses below it is also the Hessian's expectation over the
targets, the loss being linear in them):

* (sparse) categorical cross-entropy: ``y ~ Categorical(softmax(z))`` per
  position; ``scale`` = number of positions (the loss averages over them).
  With ``label_smoothing`` the targets are still drawn from the model's
  predictive distribution and the gradient is the unsmoothed loss's: the
  smoothing is a regularizer of the training targets, not part of the
  likelihood. For a logits output (``from_logits=True``) this is exactly
  the smoothed loss's Hessian, which does not depend on the targets
  (``diag(p) - p p^T``); for a probabilities output it is the predictive
  distribution's Fisher;
* binary cross-entropy: ``y ~ Bernoulli(p)`` per element; ``scale`` = number
  of elements per example (Keras averages over them); label smoothing as
  above (exact for logits: ``p (1 - p)``);
* mean squared error: ``y ~ N(f, m/2 I)`` with ``m`` elements per example, the
  Gaussian whose negative log-likelihood is the loss; ``scale`` = 1;
* Poisson (``f`` the rate): ``y ~ Poisson(f)`` per element; ``scale`` =
  number of elements; ``E[g g^T] = diag(1 / (m f))``.

A model with several outputs gets one :class:`SampledLoss` per output, each
multiplying its gradient by the square root of its compiled loss weight
(the total loss's Gauss-Newton matrix is the weighted sum of the outputs').
Terms added with ``add_loss`` and weight regularizers are in the gradient
but outside the curvature.
"""

import math

import keras
import tensorflow as tf

_CATEGORICAL = "categorical"
_SPARSE_CATEGORICAL = "sparse_categorical"
_BINARY = "binary"
_SQUARED = "squared"
_POISSON = "poisson"

_NAMES = {
    "sparse_categorical_crossentropy": _SPARSE_CATEGORICAL,
    "categorical_crossentropy": _CATEGORICAL,
    "binary_crossentropy": _BINARY,
    "mse": _SQUARED,
    "mean_squared_error": _SQUARED,
    "poisson": _POISSON,
}

_CLASSES = {
    keras.losses.SparseCategoricalCrossentropy: _SPARSE_CATEGORICAL,
    keras.losses.CategoricalCrossentropy: _CATEGORICAL,
    keras.losses.BinaryCrossentropy: _BINARY,
    keras.losses.MeanSquaredError: _SQUARED,
    keras.losses.Poisson: _POISSON,
}

_FUNCTIONS = {
    keras.losses.sparse_categorical_crossentropy: _SPARSE_CATEGORICAL,
    keras.losses.categorical_crossentropy: _CATEGORICAL,
    keras.losses.binary_crossentropy: _BINARY,
    keras.losses.mean_squared_error: _SQUARED,
    keras.losses.poisson: _POISSON,
}

SUPPORTED = (
    "(sparse_)categorical_crossentropy, binary_crossentropy (label smoothing "
    "included), mean_squared_error and poisson (as strings, keras.losses "
    "classes or functions)"
)


class UnsupportedLossError(ValueError):
    """The loss has no known predictive distribution; ``reason`` says why."""

    def __init__(self, loss, reason):
        self.reason = reason
        super().__init__(
            f"fisher='sampled' cannot sample targets for loss {loss!r}: {reason}. "
            f"Supported: {SUPPORTED}. Use KFAC(fisher='empirical') or "
            "fisher='auto', which work with any loss, or pass loss=<a supported "
            "loss> to KFAC."
        )


def _per_output(value, names, what):
    """``value`` (one for all, a list, or a dict by output name) as a list
    aligned with the outputs ``names``."""
    if isinstance(value, dict):
        missing = [n for n in names if n not in value]
        if missing or len(value) != len(names):
            raise UnsupportedLossError(
                value, f"{what} keys {sorted(value)} do not match the outputs {names}"
            )
        return [value[n] for n in names]
    if isinstance(value, (list, tuple)):
        if len(value) != len(names):
            raise UnsupportedLossError(value, f"{len(value)} {what} for {len(names)} outputs")
        return list(value)
    return [value] * len(names)


class SampledLoss:
    """A supported loss: its family, ``from_logits`` and loss weight."""

    def __init__(self, family, from_logits, weight=1.0, label_smoothing=0.0):
        self.family = family
        self.from_logits = from_logits
        self.weight = float(weight)
        self.label_smoothing = float(label_smoothing)

    @classmethod
    def from_keras(cls, loss, weight=1.0):
        """Recognise one Keras loss, or raise :class:`UnsupportedLossError`."""
        if loss is None:
            raise UnsupportedLossError(loss, "the model has no compiled loss")
        if isinstance(loss, str):
            family = _NAMES.get(loss)
            if family is None:
                raise UnsupportedLossError(loss, "unknown loss name")
            return cls(family, from_logits=False, weight=weight)
        for loss_class, family in _CLASSES.items():
            if type(loss) is loss_class:
                config = loss.get_config()
                smoothing = float(config.get("label_smoothing") or 0.0)
                return cls(family, bool(config.get("from_logits", False)), weight, smoothing)
        for fn, family in _FUNCTIONS.items():
            if loss is fn:
                return cls(family, from_logits=False, weight=weight)
        raise UnsupportedLossError(loss, "a custom loss has no known likelihood")

    @classmethod
    def for_outputs(cls, loss, output_names, loss_weights=None):
        """One :class:`SampledLoss` per model output (``output_names`` in
        the order of ``tf.nest.flatten`` of the model's outputs), from a
        compiled loss (one for all outputs, a list, or a dict by name) and
        ``loss_weights``; raises :class:`UnsupportedLossError` naming the
        first output without a known likelihood."""
        if isinstance(loss, (list, tuple, dict)) and not loss:
            loss = None
        losses = _per_output(loss, output_names, "losses")
        weights = _per_output(
            1.0 if loss_weights is None else loss_weights, output_names, "loss weights"
        )
        result = []
        for name, output_loss, weight in zip(output_names, losses, weights):
            try:
                result.append(cls.from_keras(output_loss, 1.0 if weight is None else weight))
            except UnsupportedLossError as error:
                if len(output_names) == 1:
                    raise
                raise UnsupportedLossError(
                    output_loss, f"output {name!r}: {error.reason}"
                ) from None
        return result

    def output_gradient(self, y_pred, seed, weights=None):
        """``sqrt(weight * scale) * d/df sum_i l_i(y_sampled_i, f_i)``,
        float32. ``weights``: per-example (``(n,)``) or per-position
        (``(n, positions)``) loss weights (sample/class weights, masks),
        entering as ``sqrt`` like the loss weight."""
        # identity: drop Keras's cached `_keras_logits` on softmax/sigmoid
        # outputs, so the gradient is taken with respect to `y_pred` itself.
        f = tf.identity(tf.cast(y_pred, tf.float32))
        sample = tf.stop_gradient(self.sample(f, seed))
        dy = self.gradient(sample, f)
        if weights is not None:
            w = tf.cast(weights, tf.float32)
            w = tf.reshape(
                w, tf.concat([tf.shape(w), tf.ones([f.shape.rank - w.shape.rank], tf.int32)], 0)
            )
            dy = dy * tf.sqrt(tf.maximum(w, 0.0))
        return dy

    def gradient(self, y, f):
        """``sqrt(weight * scale) * d/df sum_i l_i(y_i, f_i)`` for given
        targets ``y`` (the tests enumerate them)."""
        with tf.GradientTape() as tape:
            tape.watch(f)
            total = tf.reduce_sum(self.per_example_loss(y, f))
        return tape.gradient(total, f) * math.sqrt(self.weight * self._scale(f))

    def per_example_loss(self, y, f):
        """The unsmoothed, unweighted ``l_i(y_i, f_i)``, shape (n,)."""
        n = tf.shape(f)[0]
        if self.family == _SPARSE_CATEGORICAL:
            per = keras.losses.sparse_categorical_crossentropy(y, f, from_logits=self.from_logits)
        elif self.family == _CATEGORICAL:
            per = keras.losses.categorical_crossentropy(y, f, from_logits=self.from_logits)
        elif self.family == _BINARY:
            per = keras.losses.binary_crossentropy(y, f, from_logits=self.from_logits)
        elif self.family == _POISSON:
            per = keras.losses.poisson(y, f)
        else:
            per = keras.losses.mean_squared_error(y, f)
        return tf.reduce_mean(tf.reshape(per, (n, -1)), axis=1)

    def _scale(self, f):
        shape = f.shape[1:]
        if None in shape.as_list():
            raise ValueError(
                f"fisher='sampled' needs static output shapes beyond the batch axis; got {f.shape}."
            )
        elements = math.prod(shape.as_list())
        if self.family in (_SPARSE_CATEGORICAL, _CATEGORICAL):
            return elements // shape[-1]
        if self.family in (_BINARY, _POISSON):
            return elements
        return 1

    def sample(self, f, seed):
        """Targets drawn from the predictive distribution at output ``f``."""
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
        if self.family == _POISSON:
            # keras.random has no Poisson sampler; a stateless TF one seeded
            # from the generator keeps the draws reproducible and saved.
            key = tf.cast(keras.random.randint((2,), 0, 2**31 - 1, seed=seed), tf.int32)
            return tf.random.stateless_poisson(tf.shape(f), key, tf.maximum(f, 0.0), dtype=f.dtype)
        elements = math.prod(f.shape[1:].as_list())
        noise = keras.random.normal(tf.shape(f), seed=seed)
        return f + math.sqrt(elements / 2.0) * noise
