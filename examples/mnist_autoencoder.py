"""K-FAC vs Adam on the MNIST deep autoencoder of the K-FAC paper.

Architecture (Hinton & Salakhutdinov 2006; Martens & Grosse 2015, sec. 13):
784-1000-500-250-30 encoder with logistic hidden units and a linear 30-unit
code, mirrored 30-250-500-1000-784 decoder with logistic hidden units and a
logistic output. Batch size 1000.

Both optimizers start from the same initial weights and get the same budget
(``--seconds`` of wall-clock training, default 60, and/or ``--epochs``).
The summary reports, per optimizer, steps, seconds, median ms/step (excluding
the first, compiling, step), and the final train and test loss as binary
cross-entropy summed over the 784 pixels, per image.

Usage::

    python examples/mnist_autoencoder.py                 # 60 s each
    python examples/mnist_autoencoder.py --epochs 5      # 5 epochs each
    python examples/mnist_autoencoder.py --quick         # smoke test, seconds

Data: see ``keras_kfac.datasets`` (found in ``--data-dir``, or prepared from
raw IDX files in ``../shared/datasets/mnist``, or downloaded by TFDS).
"""

import argparse
import os
import statistics
import sys
import time

import numpy as np

try:
    import keras_kfac  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import keras_kfac  # noqa: F401

import keras

from keras_kfac import datasets

PIXELS = 784
SUMMARY_TITLE = "Summary: MNIST autoencoder"


def build_autoencoder(seed=0):
    """The paper's autoencoder; the last layer outputs logits (see `make_loss`)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape=(PIXELS,), name="pixels")
    h = inputs
    for i, units in enumerate((1000, 500, 250)):
        h = keras.layers.Dense(units, activation="sigmoid", name=f"enc{i + 1}")(h)
    h = keras.layers.Dense(30, name="code")(h)  # linear code layer
    for i, units in enumerate((250, 500, 1000)):
        h = keras.layers.Dense(units, activation="sigmoid", name=f"dec{i + 1}")(h)
    logits = keras.layers.Dense(PIXELS, name="logits")(h)
    return keras.Model(inputs, logits, name="mnist_autoencoder")


def make_loss():
    # The logistic output unit is folded into the loss: a stock Keras
    # BinaryCrossentropy(from_logits=True) on a linear last layer. This is the
    # numerically stable form and, being a stock loss on logits, it is one the
    # K-FAC optimizer recognises as a Bernoulli predictive distribution, so
    # `fisher="sampled"` (sampling targets from sigmoid(logits)) is supported.
    # Keras averages over the 784 pixels (and the batch); the summed-over-pixels
    # number reported by the paper is that mean times 784, applied when printing.
    # (A custom "summed" loss class would not be recognised by the sampled Fisher.)
    return keras.losses.BinaryCrossentropy(from_logits=True)


def make_optimizer(name):
    name = name.strip().lower()
    if name == "kfac":
        kfac_cls = getattr(keras_kfac, "KFAC", None)
        if kfac_cls is None:
            sys.exit("keras_kfac.KFAC is not available in this installation.")
        return kfac_cls()
    if name == "adam":
        return keras.optimizers.Adam(1e-3)
    sys.exit(f"Unknown optimizer {name!r}: use kfac and/or adam.")


class StepTimer(keras.callbacks.Callback):
    """Times every train step and stops training after `seconds` of wall clock."""

    def __init__(self, seconds=None):
        super().__init__()
        self.seconds = seconds
        self.step_seconds = []

    def on_train_begin(self, logs=None):
        self.start = time.perf_counter()
        self.elapsed = 0.0

    def on_train_batch_begin(self, batch, logs=None):
        self._begin = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        # Reading the loss waits for the step to finish (steps may run async).
        for v in (logs or {}).values():
            float(np.asarray(v))
            break
        now = time.perf_counter()
        self.step_seconds.append(now - self._begin)
        if self.seconds is not None and now - self.start >= self.seconds:
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        self.elapsed = time.perf_counter() - self.start

    @property
    def steps(self):
        return len(self.step_seconds)

    @property
    def median_ms(self):
        rest = self.step_seconds[1:]  # the first step includes tracing/compiling
        return 1000.0 * statistics.median(rest) if rest else float("nan")


def summed_bce(model, x, batch_size):
    mean_bce = model.evaluate(x, x, batch_size=batch_size, verbose=0)
    return PIXELS * float(mean_bce)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data-dir",
        default=None,
        help="TFDS data_dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets); "
        "a folder holding the raw IDX .gz files also works",
    )
    p.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="wall-clock training budget per optimizer (default 60 unless --epochs is given)",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="epochs per optimizer (combined with --seconds if both are given)",
    )
    p.add_argument(
        "--optimizers",
        default="kfac,adam",
        help="comma-separated list among kfac, adam (default: kfac,adam)",
    )
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--verbose",
        type=int,
        choices=(0, 1, 2),
        default=1,
        help="Keras fit verbosity: 1 progress bar, 2 one line per epoch",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 512 train/test images, 2 steps per optimizer",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.seconds, args.epochs, args.batch_size = None, 1, 256
    elif args.seconds is None and args.epochs is None:
        args.seconds = 60.0
    return args


def main(argv=None):
    args = parse_args(argv)
    names = [n.strip().lower() for n in args.optimizers.split(",") if n.strip()]
    optimizers = {n: make_optimizer(n) for n in names}  # fail early on a bad name

    x_train, _ = datasets.load_numpy("mnist", "train", data_dir=args.data_dir)
    x_test, _ = datasets.load_numpy("mnist", "test", data_dir=args.data_dir)
    x_train = x_train.reshape(len(x_train), PIXELS)
    x_test = x_test.reshape(len(x_test), PIXELS)
    if args.quick:
        x_train, x_test = x_train[:512], x_test[:512]

    base = build_autoencoder(args.seed)
    initial_weights = base.get_weights()
    epochs = args.epochs if args.epochs is not None else 1_000_000  # time-limited
    budget = (
        (f"{args.seconds:g} s" if args.seconds is not None else "")
        + (" / " if args.seconds is not None and args.epochs is not None else "")
        + (f"{args.epochs} epoch(s)" if args.epochs is not None else "")
    )
    print(
        f"MNIST autoencoder: {len(x_train)} train / {len(x_test)} test images, "
        f"batch {args.batch_size}, budget {budget} per optimizer"
    )

    rows = []
    for name, optimizer in optimizers.items():
        print(f"\n=== {name} ===")
        model = keras.models.clone_model(base)
        model.set_weights(initial_weights)
        model.compile(optimizer=optimizer, loss=make_loss())
        timer = StepTimer(args.seconds)
        model.fit(
            x_train,
            x_train,
            batch_size=args.batch_size,
            epochs=epochs,
            shuffle=True,
            callbacks=[timer],
            verbose=args.verbose,
        )
        rows.append(
            (
                name,
                timer.steps,
                timer.elapsed,
                timer.median_ms,
                summed_bce(model, x_train, args.batch_size),
                summed_bce(model, x_test, args.batch_size),
            )
        )

    print(f"\n{SUMMARY_TITLE} (loss = binary cross-entropy summed over {PIXELS} pixels, per image)")
    header = ("optimizer", "steps", "seconds", "ms/step", "train loss", "test loss")
    print("{:<10} {:>7} {:>8} {:>9} {:>11} {:>10}".format(*header))
    for r in rows:
        print("{:<10} {:>7d} {:>8.1f} {:>9.1f} {:>11.2f} {:>10.2f}".format(*r))
    return rows


if __name__ == "__main__":
    main()
