"""K-FAC vs Adam on the MNIST deep autoencoder of the K-FAC paper.

Architecture (Hinton & Salakhutdinov 2006; Martens & Grosse 2015, sec. 13):
784-1000-500-250-30 encoder with a linear 30-unit code, mirrored
30-250-500-1000-784 decoder, logistic output. Batch size 1000. The hidden
units are ReLU by default (the network as it is written today);
``--activation sigmoid`` gives the paper's logistic units, a network that
from Keras's Glorot initialisation sits for its first hundreds of steps on
the plateau of the mean image (~206), for Adam and K-FAC alike (the paper
starts from a sparse initialisation).

Both optimizers start from the same initial weights and get the same budget
(``--seconds`` of wall-clock training, default 60, and/or ``--epochs``);
the first step, which traces the train function, is timed separately and
not counted, as in ``benchmarks/``. Every ``--eval-every`` seconds of training the test loss on the first 2000
test images is recorded (off the clock). The summary reports, per optimizer,
steps, seconds, median ms/step (excluding the first, compiling, step), the
final train and test loss as binary cross-entropy summed over the 784
pixels, per image, and how soon each optimizer reached the other's final
loss on those 2000 test images.

Usage::

    python examples/mnist_autoencoder.py                 # 60 s each
    python examples/mnist_autoencoder.py --epochs 5      # 5 epochs each
    python examples/mnist_autoencoder.py --activation sigmoid
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


def build_autoencoder(seed=0, activation="relu"):
    """The paper's autoencoder with ``activation`` hidden units; the last
    layer outputs logits (see `make_loss`)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(shape=(PIXELS,), name="pixels")
    h = inputs
    for i, units in enumerate((1000, 500, 250)):
        h = keras.layers.Dense(units, activation=activation, name=f"enc{i + 1}")(h)
    h = keras.layers.Dense(30, name="code")(h)  # linear code layer
    for i, units in enumerate((250, 500, 1000)):
        h = keras.layers.Dense(units, activation=activation, name=f"dec{i + 1}")(h)
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
    """Times every train step, stops training after `seconds` of training
    wall clock, and every `eval_every` seconds records `(seconds, loss)`
    with `evaluate()`. Neither the evaluations nor the first step (tracing
    the train function) are on the clock; the first step's time is kept in
    `first_step_seconds`."""

    def __init__(self, seconds=None, evaluate=None, eval_every=5.0):
        super().__init__()
        self.seconds = seconds
        self.evaluate = evaluate
        self.eval_every = eval_every
        self.step_seconds = []
        self.trace = []

    def on_train_begin(self, logs=None):
        self.start = time.perf_counter()
        self.off_clock = 0.0
        self.elapsed = 0.0
        if self.evaluate is not None:
            self._record(0.0)

    def _record(self, elapsed):
        begin = time.perf_counter()
        self.trace.append((elapsed, self.evaluate()))
        self.off_clock += time.perf_counter() - begin

    def on_train_batch_begin(self, batch, logs=None):
        self._begin = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        # Reading the loss waits for the step to finish (steps may run async).
        for v in (logs or {}).values():
            float(np.asarray(v))
            break
        now = time.perf_counter()
        self.step_seconds.append(now - self._begin)
        if len(self.step_seconds) == 1:
            self.first_step_seconds = self.step_seconds[0]
            self.off_clock += self.first_step_seconds
        elapsed = now - self.start - self.off_clock
        if self.evaluate is not None and elapsed - self.trace[-1][0] >= self.eval_every:
            self._record(elapsed)
        if self.seconds is not None and elapsed >= self.seconds:
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        self.elapsed = time.perf_counter() - self.start - self.off_clock
        if self.evaluate is not None:
            self._record(self.elapsed)

    def seconds_to_reach(self, loss):
        """The first recorded training time at which the loss was <= `loss`."""
        return next((t for t, value in self.trace if value <= loss), None)

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


def time_to_reach_lines(names, timers):
    """For each pair of optimizers: when the first reached the second's final
    loss on the tracked test images."""
    lines = []
    for name, timer in zip(names, timers):
        for other, other_timer in zip(names, timers):
            if other == name:
                continue
            target_seconds, target = other_timer.trace[-1]
            reached = timer.seconds_to_reach(target)
            if reached is None:
                lines.append(f"{name} did not reach {other}'s final test loss ({target:.2f}).")
            else:
                lines.append(
                    f"{name} reached {other}'s final test loss ({target:.2f}) after "
                    f"{reached:.1f} s: {reached / target_seconds:.2f} of {other}'s time."
                )
    return lines


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
    p.add_argument(
        "--activation",
        choices=("relu", "sigmoid"),
        default="relu",
        help="hidden units: relu (default) or the paper's logistic units",
    )
    p.add_argument(
        "--eval-every",
        type=float,
        default=5.0,
        help="seconds of training between test-loss records (default 5)",
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

    base = build_autoencoder(args.seed, args.activation)
    initial_weights = base.get_weights()
    epochs = args.epochs if args.epochs is not None else 1_000_000  # time-limited
    budget = (
        (f"{args.seconds:g} s" if args.seconds is not None else "")
        + (" / " if args.seconds is not None and args.epochs is not None else "")
        + (f"{args.epochs} epoch(s)" if args.epochs is not None else "")
    )
    print(
        f"MNIST autoencoder ({args.activation}): {len(x_train)} train / {len(x_test)} test "
        f"images, batch {args.batch_size}, budget {budget} per optimizer"
    )
    x_tracked = x_test[:2000]

    rows, timers = [], []
    for name, optimizer in optimizers.items():
        print(f"\n=== {name} ===")
        model = keras.models.clone_model(base)
        model.set_weights(initial_weights)
        model.compile(optimizer=optimizer, loss=make_loss())
        timer = StepTimer(
            args.seconds,
            evaluate=lambda model=model: summed_bce(model, x_tracked, args.batch_size),
            eval_every=args.eval_every,
        )
        model.fit(
            x_train,
            x_train,
            batch_size=args.batch_size,
            epochs=epochs,
            shuffle=True,
            callbacks=[timer],
            verbose=args.verbose,
        )
        timers.append(timer)
        rows.append(
            (
                name,
                timer.steps,
                timer.elapsed,
                timer.median_ms,
                summed_bce(model, x_train, args.batch_size),
                summed_bce(model, x_test, args.batch_size),
                timer.first_step_seconds,
            )
        )

    print(f"\n{SUMMARY_TITLE} (loss = binary cross-entropy summed over {PIXELS} pixels, per image)")
    header = ("optimizer", "steps", "seconds", "ms/step", "train loss", "test loss", "1st step s")
    print("{:<10} {:>7} {:>8} {:>9} {:>11} {:>10} {:>11}".format(*header))
    for r in rows:
        print("{:<10} {:>7d} {:>8.1f} {:>9.1f} {:>11.2f} {:>10.2f} {:>11.1f}".format(*r))
    for line in time_to_reach_lines(names, timers):
        print(line)
    return rows


if __name__ == "__main__":
    main()
