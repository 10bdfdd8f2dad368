"""Small helpers for code that runs inside the compiled train step."""

import tensorflow as tf


def run_if(pred, fn):
    """Run ``fn`` (stateful, no outputs) when ``pred`` holds, inside the graph
    (a ``tf.cond``: no host round-trip, no retracing when ``pred`` changes)."""

    def true_fn():
        fn()
        return tf.constant(True)

    return tf.cond(pred, true_fn, lambda: tf.constant(False))
