"""Small helpers for code that runs inside the compiled train step."""

import functools

import tensorflow as tf

#: Name scope of each part of the step (``benchmarks/stepcost.py --profile``
#: attributes op time by them).
PROFILE_SCOPES = (
    "kfac_statistics",
    "kfac_refresh",
    "kfac_precondition",
    "kfac_layout",
    "kfac_monitor_begin",
    "kfac_monitor_end",
)


def scoped(name):
    """Trace the decorated function's ops under ``tf.name_scope(name)`` (one
    of :data:`PROFILE_SCOPES`), so that a profile of the step names them."""
    if name not in PROFILE_SCOPES:
        raise ValueError(f"Unknown profile scope {name!r}; add it to PROFILE_SCOPES.")

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            with tf.name_scope(name):
                return fn(*args, **kwargs)

        return inner

    return wrap


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
