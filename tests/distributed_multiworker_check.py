"""One process of the MultiWorkerMirroredStrategy check (tests/test_distributed.py).

``worker`` mode: TF_CONFIG (set by the parent) names this worker; it trains the
small model of ``distributed_mirrored_check`` with ``model.fit`` under
``MultiWorkerMirroredStrategy`` and saves its weights. ``single`` mode: the
same training in one process without a strategy. Weights go to ``--out``
(``.npz``).
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["worker", "single"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--method", default="kfac")
    parser.add_argument("--fisher", default="sampled")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    # The strategy must exist before any other TensorFlow op.
    strategy = tf.distribute.MultiWorkerMirroredStrategy() if args.mode == "worker" else None

    import keras

    keras.config.disable_traceback_filtering()

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import keras_kfac

    rng = np.random.default_rng(0)
    n = 16 * args.steps
    x = rng.normal(size=(n, 6, 6, 2)).astype("float32")
    y = rng.integers(0, 3, n).astype("int64")
    keras.utils.set_random_seed(1)

    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)

    def build():
        model = keras.Sequential(
            [
                keras.Input((6, 6, 2)),
                keras.layers.Conv2D(3, 3, activation="relu"),
                keras.layers.Flatten(),
                keras.layers.Dense(5, activation="tanh"),
                keras.layers.Dense(3),
            ]
        )
        opt = keras_kfac.KFAC(
            learning_rate=0.05,
            damping=1e-2,
            curvature=args.method,
            fisher=args.fisher,
            inverse_every=2,
            seed=3,
            model=model,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        return model, opt

    # Keras 3.15's model.fit fails under MultiWorkerMirroredStrategy for any
    # optimizer (an eager strategy.reduce of the first PerReplica batch, then
    # a MEAN reduce over axis 0 of the scalar loss), so this is the README's
    # hand-written loop under strategy.run: each worker feeds its slice of
    # every global batch, the loss is averaged over the global batch.
    if strategy is None:
        model, opt = build()
        workers, task = 1, 0
    else:
        with strategy.scope():
            model, opt = build()
        workers, task = strategy.num_replicas_in_sync, strategy.cluster_resolver.task_id
    initial = [w.copy() for w in model.get_weights()]
    local = 16 // workers

    def replica_step(xb, yb):
        with tf.GradientTape() as tape:
            per_example = loss_fn(yb, model(xb, training=True))
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=16)
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))

    @tf.function
    def train_step(xb, yb):
        if strategy is None:
            replica_step(xb, yb)
        else:
            strategy.run(replica_step, args=(xb, yb))

    for k in range(args.steps):
        lo = 16 * k + task * local
        train_step(tf.constant(x[lo : lo + local]), tf.constant(y[lo : lo + local]))
    weights = model.get_weights()
    replicas = 1 if strategy is None else strategy.num_replicas_in_sync
    np.savez(
        args.out,
        replicas=replicas,
        iterations=int(opt.iterations.numpy()),
        **{f"w{i}": w for i, w in enumerate(weights)},
        **{f"init{i}": w for i, w in enumerate(initial)},
    )


if __name__ == "__main__":
    main()
