"""Median time per step of KFAC configurations against Adam, measured in one run.

The MNIST deep autoencoder of the K-FAC paper (examples/mnist_autoencoder.py)
at a given batch size; each optimizer trains from the same weights for
``--steps`` steps after one untimed compiled step; we report the median step
time and its ratio to Adam's. Writes JSON and Markdown under
``benchmarks/results/``.

    python benchmarks/step_overhead.py --batch 1000 --steps 60
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

import keras_kfac  # noqa: E402
from mnist_autoencoder import build_autoencoder, make_loss  # noqa: E402
from keras_kfac import datasets  # noqa: E402


class StepTimer(keras.callbacks.Callback):
    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter() - self._start)

    def on_train_begin(self, logs=None):
        self.times = []


def configurations(args):
    yield "adam", lambda: keras.optimizers.Adam(1e-3)
    for stats_every in (1, 10):
        for inverse_every in args.inverse_every:
            name = f"kfac stats_every={stats_every} inverse_every={inverse_every}"
            yield name, (
                lambda s=stats_every, i=inverse_every: keras_kfac.KFAC(stats_every=s, inverse_every=i)
            )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--inverse-every", type=int, nargs="+", default=[20, 100])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args(argv)

    x, _ = datasets.load_numpy("mnist", "train", data_dir=args.data_dir)
    x = x.reshape(len(x), -1)[: args.batch * (args.steps + 1)]
    initial = build_autoencoder().get_weights()
    rows = []
    for name, make in configurations(args):
        model = build_autoencoder()
        model.set_weights(initial)
        model.compile(optimizer=make(), loss=make_loss())
        timer = StepTimer()
        model.fit(x, x, batch_size=args.batch, epochs=1, shuffle=False, verbose=0, callbacks=[timer])
        median = statistics.median(timer.times[1:])
        rows.append({"optimizer": name, "median_ms": 1000 * median, "steps": len(timer.times) - 1})
        print(f"{name:<40} {1000 * median:8.1f} ms/step", flush=True)
    adam = rows[0]["median_ms"]
    for row in rows:
        row["ratio_to_adam"] = row["median_ms"] / adam
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"step_overhead_batch{args.batch}")
    with open(stem + ".json", "w") as f:
        json.dump({"batch": args.batch, "machine": f"{os.cpu_count()} CPU cores", "rows": rows}, f, indent=2)
    with open(stem + ".md", "w") as f:
        f.write(f"Autoencoder, batch {args.batch}, {os.cpu_count()} CPU cores, median of {args.steps} steps\n\n")
        f.write("| optimizer | ms/step | x Adam |\n|---|---:|---:|\n")
        for row in rows:
            f.write(f"| {row['optimizer']} | {row['median_ms']:.1f} | {row['ratio_to_adam']:.2f} |\n")
    print(open(stem + ".md").read())


if __name__ == "__main__":
    main()
