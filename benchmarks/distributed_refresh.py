"""Refresh time of the inverses with 2 logical CPU devices (distributed
refresh: blocks split by cost, results all-reduced) against 1 device, and the
time per train step of model.fit under MirroredStrategy against one device.

    python benchmarks/distributed_refresh.py [--width 512] [--reps 10]

Prints JSON. Note: logical CPU devices share the machine's cores.
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import tensorflow as tf  # noqa: E402

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import keras_kfac  # noqa: E402
from keras_kfac import distributed  # noqa: E402


def build(strategy, width, layers, x, y, batch):
    with strategy.scope():
        model = keras.Sequential(
            [keras.Input((width,))]
            + [keras.layers.Dense(width, activation="tanh") for _ in range(layers)]
            + [keras.layers.Dense(10)]
        )
        opt = keras_kfac.KFAC(inverse_every=10**6)
        model.compile(
            optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        )
    model.fit(x[:batch], y[:batch], batch_size=batch, epochs=1, verbose=0)
    return model, opt


def refresh_time(strategy, opt, reps):
    def replica_fn():
        with distributed.replica_step() as replicas:
            distributed.refresh(replicas, opt.estimator.curvatures, opt.damping)
        return tf.constant(0.0)

    @tf.function
    def run():
        return strategy.run(replica_fn)

    run()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def step_time(model, x, y, batch, steps):
    model.fit(x[: batch * 2], y[: batch * 2], batch_size=batch, epochs=1, verbose=0)
    t = time.perf_counter()
    model.fit(x[: batch * steps], y[: batch * steps], batch_size=batch, epochs=1, verbose=0)
    return (time.perf_counter() - t) / steps


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch * args.steps, args.width)).astype("float32")
    y = rng.integers(0, 10, len(x))
    out = {"width": args.width, "layers": args.layers, "cores": os.cpu_count()}
    for name, strategy in (
        ("one_device", tf.distribute.OneDeviceStrategy("/cpu:0")),
        ("mirrored_2", tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])),
    ):
        model, opt = build(strategy, args.width, args.layers, x, y, args.batch)
        out[f"{name}_refresh_s"] = refresh_time(strategy, opt, args.reps)
        out[f"{name}_step_s"] = step_time(model, x, y, args.batch, args.steps)
    out["refresh_ratio_2_over_1"] = out["mirrored_2_refresh_s"] / out["one_device_refresh_s"]
    out["step_ratio_2_over_1"] = out["mirrored_2_step_s"] / out["one_device_step_s"]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
