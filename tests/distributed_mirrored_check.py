"""MirroredStrategy (2 logical CPU devices) against one device, as JSON.

Run as a script in its own process (the logical devices must be configured
before TensorFlow initializes its devices); tests/test_distributed.py does.
For each configuration it trains the same small Conv2D + Dense model on the
same global batches with ``model.fit`` under ``MirroredStrategy`` and without
a strategy, then reports, per replica, the largest relative difference of
every KFAC state variable (factors, inverses, momentum, ...) and of the
weights from the single-device run.

    python tests/distributed_mirrored_check.py --configs kfac:sampled,tengrad:empirical
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import tensorflow as tf  # noqa: E402

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import keras_kfac  # noqa: E402
from reference import rel  # noqa: E402

GLOBAL_BATCH = 16


def make_data(n=64):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 6, 6, 2)).astype("float32")
    y = rng.integers(0, 3, n).astype("int64")
    return x, y


def make_model():
    return keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(3, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(5, activation="tanh"),
            keras.layers.Dense(3),
        ]
    )


def initial_weights():
    keras.utils.set_random_seed(1)
    return make_model().get_weights()


def optimizer(method, fisher, damping_mode):
    # CG-FAC stops at a residual tolerance; a tight one makes both runs take
    # the same number of iterations (else they agree to ~cg_tol).
    options = {"cg_tol": 1e-10} if method == "cgfac" else None
    return keras_kfac.KFAC(
        curvature_options=options,
        learning_rate=0.05,
        damping=1e-2,
        curvature=method,
        fisher=fisher,
        damping_mode=damping_mode,
        inverse_every=2,
        # Statistics at steps 0, 1 (a running average) and refreshes at 0, 1, 2.
        curvature_warmup=2,
        seed=3,
    )


def train(method, fisher, damping_mode, strategy, steps):
    x, y = make_data(GLOBAL_BATCH * steps)
    scope = strategy.scope() if strategy is not None else _null()
    with scope:
        model = make_model()
        model.set_weights(initial_weights())
        model.compile(
            optimizer=optimizer(method, fisher, damping_mode),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0)
    return model


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def copies(variable):
    """Every replica's copy of a (possibly mirrored) Keras variable."""
    value = variable.value if isinstance(variable, keras.Variable) else variable
    if isinstance(value, tf.distribute.DistributedValues):
        return [np.asarray(v.numpy(), dtype=np.float64) for v in value.values]
    return [np.asarray(value.numpy(), dtype=np.float64)]


_STRATEGY = []


def mirrored():
    # One strategy per process: a second MirroredStrategy over the same
    # devices reuses collective keys of the first and the runtime rejects it.
    if not _STRATEGY:
        _STRATEGY.append(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
    return _STRATEGY[0]


def compare(method, fisher, damping_mode, steps):
    strategy = mirrored()
    t0 = time.time()
    dist = train(method, fisher, damping_mode, strategy, steps)
    single = train(method, fisher, damping_mode, None, steps)
    state_errors, state_names = [], []
    for d, s in zip(dist.optimizer.variables, single.optimizer.variables):
        if d.dtype != "float32" or not d.path.startswith(dist.optimizer.name):
            continue
        reference = copies(s)[0]
        state_errors.append([rel(c, reference) for c in copies(d)])
        state_names.append(d.path)
    weight_errors = []
    for d, s in zip(dist.trainable_variables, single.trainable_variables):
        reference = copies(s)[0]
        weight_errors.append([rel(c, reference) for c in copies(d)])
    moved = rel(
        np.concatenate([copies(s)[0].ravel() for s in single.trainable_variables]),
        np.concatenate([w.ravel() for w in initial_weights()]),
    )
    # The factors (basis-free). Eigenvectors are defined up to sign and, for
    # close eigenvalues, rotation, so they are compared through the weights.
    suffixes = ("_A", "_G", "_A1", "_G1", "_A2", "_G2", "_diagonal")
    factors = [n for n in state_names if n.endswith(suffixes)]
    return {
        "replicas": strategy.num_replicas_in_sync,
        "state_variables": len(state_names),
        "factor_variables": factors,
        "max_state_error": max((max(e) for e in state_errors), default=0.0),
        "max_factor_error": max(
            (max(e) for n, e in zip(state_names, state_errors) if n in factors), default=0.0
        ),
        "max_weight_error": max(max(e) for e in weight_errors),
        "copies_per_weight": len(weight_errors[0]),
        "weights_moved": moved,
        "seconds": time.time() - t0,
    }


def refusal(optimizer_kwargs=None, compile_kwargs=None, callbacks=()):
    """The error KFAC raises for a combination it refuses under
    MirroredStrategy (its message, not a trace from deep inside)."""
    x, y = make_data(GLOBAL_BATCH)
    with mirrored().scope():
        model = make_model()
        model.compile(
            optimizer=keras_kfac.KFAC(**(optimizer_kwargs or {})),
            loss="sparse_categorical_crossentropy",
            **(compile_kwargs or {}),
        )
    try:
        model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=1, verbose=0, callbacks=list(callbacks))
    except Exception as e:  # the message is what is checked
        return {"raised": type(e).__name__, "message": str(e)}
    return {"raised": None}


REFUSALS = {
    "jit": lambda: refusal(compile_kwargs={"jit_compile": True}),
    "adaptive_step": lambda: refusal(optimizer_kwargs={"adaptive_step": True}),
    "adaptive_damping": lambda: refusal(callbacks=[keras_kfac.callbacks.AdaptiveDamping()]),
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", default="kfac:sampled:factored")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    out = {}
    for config in args.configs.split(","):
        if config in REFUSALS:
            out[config] = REFUSALS[config]()
            continue
        parts = config.split(":")
        method = parts[0]
        fisher = parts[1] if len(parts) > 1 else "sampled"
        mode = parts[2] if len(parts) > 2 else "factored"
        try:
            out[config] = compare(method, fisher, mode, args.steps)
        except Exception as e:  # reported, and the test fails on it
            import traceback

            traceback.print_exc()
            out[config] = {"error": f"{type(e).__name__}: {e}"[:2000]}
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
