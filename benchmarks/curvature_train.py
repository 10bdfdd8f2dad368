"""Every curvature method trains the MNIST autoencoder without NaN; time per
step against "kfac".

The K-FAC paper's autoencoder (examples/mnist_autoencoder.py) with
``--full``; by default a quarter-width copy on 14x14 downsampled images
(196-250-125-62-30-62-125-250-196, same activations and loss) so that all
ten methods fit in minutes on a small shared CPU. Each method trains from
the same weights with ``KFAC(curvature=method)`` and otherwise default
settings (sampled Fisher; the two-term methods and Auto with their
defaults) for ``--steps`` steps; we report the median step time (after one
untimed compiled step), its ratio to "kfac"'s, the final training loss and
whether any loss was NaN. Writes ``benchmarks/results/curvature_train.{md,json}``.

    python benchmarks/curvature_train.py --steps 300 --batch 256
"""

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_kfac  # noqa: E402
from keras_kfac import datasets  # noqa: E402

METHODS = keras_kfac.curvature.available()


def small_autoencoder(pixels, seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape=(pixels,))
    h = inputs
    for i, units in enumerate((250, 125, 62)):
        h = keras.layers.Dense(units, activation="sigmoid", name=f"enc{i + 1}")(h)
    h = keras.layers.Dense(30, name="code")(h)
    for i, units in enumerate((62, 125, 250)):
        h = keras.layers.Dense(units, activation="sigmoid", name=f"dec{i + 1}")(h)
    return keras.Model(inputs, keras.layers.Dense(pixels, name="logits")(h))


class Timer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.times, self.losses = [], []

    def on_train_batch_begin(self, batch, logs=None):
        self._t = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.losses.append(float(logs["loss"]))  # waits for the step
        self.times.append(time.perf_counter() - self._t)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument(
        "--full", action="store_true", help="the paper's 784-1000-500-250-30 autoencoder"
    )
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument(
        "--out", default=os.path.join(ROOT, "benchmarks", "results", "curvature_train")
    )
    args = parser.parse_args(argv)

    x, _ = datasets.load_numpy("mnist", "train")
    if args.full:
        from mnist_autoencoder import build_autoencoder

        x = x.reshape(len(x), -1)
        build = lambda: build_autoencoder(seed=0, activation="sigmoid")  # noqa: E731
    else:
        x = x.reshape(len(x), 14, 2, 14, 2).mean(axis=(2, 4)).reshape(len(x), -1)
        build = lambda: small_autoencoder(x.shape[1], seed=0)  # noqa: E731
    x = x[: args.steps * args.batch].astype("float32")
    rows = []
    for method in args.methods.split(","):
        model = build()
        opt = keras_kfac.KFAC(curvature=method)
        model.compile(optimizer=opt, loss=keras.losses.BinaryCrossentropy(from_logits=True))
        timer = Timer()
        t0 = time.time()
        model.fit(
            x, x, batch_size=args.batch, epochs=1, shuffle=False, verbose=0, callbacks=[timer]
        )
        curv = sorted({c.name for c in opt.estimator.curvatures})
        row = dict(
            method=method,
            blocks=curv,
            steps=len(timer.losses),
            median_ms=1000 * statistics.median(timer.times[1:]),
            first_loss=timer.losses[0] * x.shape[1],
            final_loss=float(np.mean(timer.losses[-10:])) * x.shape[1],
            nan=bool(not np.all(np.isfinite(timer.losses))),
            skipped_steps=int(opt.skipped_steps),
            wall_s=time.time() - t0,
        )
        rows.append(row)
        print(row, flush=True)
    base = next((r["median_ms"] for r in rows if r["method"] == "kfac"), None)
    for r in rows:
        r["vs_kfac"] = None if base is None else r["median_ms"] / base
    desc = (
        f"{'paper' if args.full else 'quarter-width, 14x14'} MNIST autoencoder, "
        f"batch {args.batch}, "
        f"{args.steps} steps, KFAC(curvature=method) defaults; loss = BCE summed over pixels"
    )
    with open(args.out + ".json", "w") as f:
        json.dump(dict(description=desc, rows=rows), f, indent=2)
    lines = [
        "# Training with each curvature method",
        "",
        desc + ".",
        "",
        "| method | blocks | ms/step | vs kfac | first loss | final loss (last 10) | NaN |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        vs = "" if r["vs_kfac"] is None else f"{r['vs_kfac']:.2f}"
        lines.append(
            f"| {r['method']} | {', '.join(r['blocks'])} | {r['median_ms']:.1f} | {vs} | "
            f"{r['first_loss']:.1f} | {r['final_loss']:.1f} | {r['nan']} |"
        )
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
