"""Watch K-FAC's curvature in TensorBoard: a small convnet on Fashion-MNIST.

Trains with ``keras_kfac.KFAC`` and three callbacks:

* ``keras.callbacks.TensorBoard``: Keras's own loss/accuracy curves;
* ``keras_kfac.callbacks.CurvatureMonitor``: damping, the reduction ratio
  rho, the KL-clip scale, gradient/update norms, the cosine between gradient
  and natural gradient, per-layer factor traces, eigenvalue ranges, condition
  numbers, pi, spectra histograms, and (for the first convolution) the
  relative error of the Kronecker approximation against the exact Fisher
  block of the batch;
* ``keras_kfac.callbacks.AdaptiveDamping``: the Levenberg-Marquardt rule of
  Martens & Grosse 2015, sec. 6.5.

All three write into the same run directory, so TensorBoard shows them
together. At the end the script prints the ``tensorboard --logdir`` command
and a few numbers read back from the event files.

Usage::

    python examples/tensorboard_monitoring.py                  # ~2 epochs on 20k images
    # alpha/mu from the quadratic model (sec. 7):
    python examples/tensorboard_monitoring.py --adaptive-step
    python examples/tensorboard_monitoring.py --quick          # smoke test
    tensorboard --logdir logs/tensorboard_monitoring

Data: see ``keras_kfac.datasets`` (``--data-dir``, or raw IDX files in
``../shared/datasets/fashion-mnist``, or a TFDS download).
"""

import argparse
import glob
import os
import sys

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_kfac  # noqa: E402
from keras_kfac import datasets  # noqa: E402
from keras_kfac.callbacks import AdaptiveDamping, CurvatureMonitor  # noqa: E402


def build_convnet(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(16, 3, activation="relu", name="conv1"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(32, 3, activation="relu", name="conv2"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu", name="dense"),
            keras.layers.Dense(10, name="logits"),
        ],
        name="fashion_convnet",
    )


def read_scalars(run_dir):
    """``{tag: [(step, value)]}`` of the scalar summaries in ``run_dir``."""
    out = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                array = tf.make_ndarray(value.tensor)
                if array.ndim == 0 and array.dtype.kind in "fiu":
                    out.setdefault(value.tag, []).append((event.step, float(array)))
    return {tag: sorted(points) for tag, points in out.items()}


def describe(scalars, tags):
    """One line per tag: first, median and last value with their steps."""
    lines = []
    for tag in tags:
        points = scalars.get(tag)
        if not points:
            continue
        values = np.array([v for _, v in points])
        finite = values[np.isfinite(values)]
        median = np.median(finite) if finite.size else float("nan")
        lines.append(
            f"  {tag:<44} step {points[0][0]:>5}: {points[0][1]:<11.4g} "
            f"median {median:<11.4g} step {points[-1][0]:>5}: {points[-1][1]:.4g}"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None, help="TFDS data_dir (see keras_kfac.datasets)")
    p.add_argument("--log-dir", default=os.path.join("logs", "tensorboard_monitoring"))
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument(
        "--train-size", type=int, default=20000, help="training images used (0: all 60000)"
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--update-freq", type=int, default=10, help="steps between curvature summaries")
    p.add_argument("--adaptive-step", action="store_true", help="KFAC(adaptive_step=True)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", type=int, choices=(0, 1, 2), default=1)
    p.add_argument("--quick", action="store_true", help="smoke test: 512 images, 1 epoch")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.train_size, args.batch_size, args.update_freq = 1, 512, 128, 2
    return args


def main(argv=None):
    args = parse_args(argv)
    x_train, y_train = datasets.load_numpy("fashion_mnist", "train", data_dir=args.data_dir)
    x_test, y_test = datasets.load_numpy("fashion_mnist", "test", data_dir=args.data_dir)
    if args.train_size:
        x_train, y_train = x_train[: args.train_size], y_train[: args.train_size]
    if args.quick:
        x_test, y_test = x_test[:512], y_test[:512]

    model = build_convnet(args.seed)
    optimizer = keras_kfac.KFAC(adaptive_step=args.adaptive_step)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    optimizer.build(model.trainable_variables)
    optimizer.summary()
    run = os.path.abspath(args.log_dir)
    model.fit(
        x_train,
        y_train,
        batch_size=args.batch_size,
        epochs=args.epochs,
        validation_data=(x_test, y_test),
        verbose=args.verbose,
        callbacks=[
            keras.callbacks.TensorBoard(run, update_freq=args.update_freq),
            CurvatureMonitor(run, update_freq=args.update_freq, fidelity_layers=["conv1"]),
            AdaptiveDamping(every=5),
        ],
    )

    scalars = read_scalars(os.path.join(run, "train"))
    tags = ["kfac/damping", "kfac/rho"]
    tags += ["kfac/alpha", "kfac/mu"] if args.adaptive_step else ["kfac/kl_clip_scale"]
    tags += ["kfac/grad_norm", "kfac/update_norm", "kfac/grad_cosine", "kfac/skipped_steps"]
    for layer in ("conv1", "conv2", "dense", "logits"):
        tags += [
            f"kfac_layers/{layer}/{q}" for q in ("A_condition_number", "G_condition_number", "pi")
        ]
    tags += ["kfac_layers/conv1/fidelity_relative_error"]
    print("\nCurvature curves written (first / median / last):")
    print(describe(scalars, tags))
    print(f"\nOpen them next to Keras's curves with:\n\n    tensorboard --logdir {run}\n")
    return scalars


if __name__ == "__main__":
    main()
