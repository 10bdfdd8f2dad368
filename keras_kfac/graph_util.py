"""Small helpers for code that runs inside the compiled train step."""

import tensorflow as tf


def run_if(pred, fn):
    """Run ``fn`` (stateful, no outputs) when ``pred`` holds, inside the graph
    (a ``tf.cond``: no host round-trip, no retracing when ``pred`` changes)."""

    def true_fn():
        fn()
        return tf.constant(True)

    return tf.cond(pred, true_fn, lambda: tf.constant(False))


def untracked_variable(value, dtype=tf.float32, shape=None):
    """A non-trainable ``tf.Variable`` for in-step state that is neither
    saved nor restored (diagnostics, constants that callbacks set): created
    outside any function being traced, held by plain Python objects (which
    no checkpoint walks)."""
    with tf.init_scope():
        return tf.Variable(value, dtype=dtype, trainable=False, shape=shape)
