"""Shared plumbing of the client programs in this folder: flags, offline data, result line.

The programs here are this project's own code, each modeled on one keras-io example (its
docstring names the path) so that it reproduces the way a Keras user trains that kind of
model. They differ from what a user would run in three ways, all routed through this module:

1. :func:`optimizer` picks the optimizer: ``--optimizer own`` keeps the program's own
   choice (the one its keras-io model uses), ``--optimizer kfac`` swaps in
   ``keras_kfac.KFAC()`` with no arguments, the drop-in a user would try first;
2. data is read offline from ``shared/datasets`` (:func:`mnist_load_data`,
   :func:`fortunes_text`) or generated in the program;
3. :func:`budget` cuts epochs and sample counts so that a run with the own optimizer
   takes about a minute on 2 CPU cores; ``--quick`` picks a tiny budget for smoke tests.

Importing this module parses the command line and seeds Python, NumPy and TensorFlow
(``keras.utils.set_random_seed``), so both optimizers start from the same weights and
see the same batches. :func:`report` prints the last line, ``CLIENT_RESULT {json}``,
which ``benchmarks/clients.py`` reads.
"""

import argparse
import gzip
import json
import math
import os
import sys
import time

import numpy as np

# The repository root goes first so the checkout's keras_kfac is used even when another
# copy is installed.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import keras  # noqa: E402

from keras_kfac import datasets  # noqa: E402

RESULT_TAG = "CLIENT_RESULT"
_START = time.perf_counter()


def _parse_args():
    parser = argparse.ArgumentParser(
        description="A client program run with its own optimizer or with keras_kfac.KFAC()."
    )
    parser.add_argument(
        "--optimizer",
        choices=("own", "kfac"),
        default="own",
        help="own: the program's own optimizer; kfac: keras_kfac.KFAC()",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a few training steps only (smoke test)"
    )
    parser.add_argument("--seed", type=int, default=1337)
    return parser.parse_args()


ARGS = _parse_args()
keras.utils.set_random_seed(ARGS.seed)


def optimizer(own):
    """The optimizer to use in place of ``own`` (an optimizer instance or a Keras name)."""
    if ARGS.optimizer == "kfac":
        import keras_kfac

        return keras_kfac.KFAC()
    return own


def budget(full, quick):
    """``quick`` under ``--quick``, else ``full`` (epochs, steps, sample counts)."""
    return quick if ARGS.quick else full


def _read_idx(path, offset, shape):
    with gzip.open(path) as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset).reshape(shape)


def mnist_load_data():
    """Same arrays, order and dtypes as ``keras.datasets.mnist.load_data()``, offline.

    Keras checks a hash of its own ``mnist.npz``, so it cannot read the shared IDX files;
    these are the same 70,000 images in the same order (uint8, (N, 28, 28)).
    """
    folder = datasets.find_raw_dir("mnist")
    if folder is None:
        raise datasets.DataNotFoundError(
            "MNIST's raw IDX files were not found: put them in shared/datasets/mnist/ next "
            f"to the repository or set ${datasets.ENV_VAR} (see keras_kfac/datasets.py)."
        )
    out = []
    for prefix in ("train", "t10k"):
        y = _read_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz"), 8, (-1,))
        x = _read_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz"), 16, (len(y), 28, 28))
        out.append((x, y))
    return tuple(out)


def fortunes_text():
    """The English text of ``shared/datasets/fortunes/fortunes.txt.gz`` (see its README)."""
    for folder in (os.getcwd(), ROOT):
        while True:
            path = os.path.join(folder, "shared", "datasets", "fortunes", "fortunes.txt.gz")
            if os.path.isfile(path):
                with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
                    return f.read()
            parent = os.path.dirname(folder)
            if parent == folder:
                break
            folder = parent
    raise FileNotFoundError(
        "shared/datasets/fortunes/fortunes.txt.gz was not found above the current "
        "directory or the repository: run from a checkout next to the shared datasets."
    )


def report(loss, metric_name, metric, higher_is_better, extra=None):
    """Print the result line: final training loss, main metric, wall time since import;
    ``extra``: other numbers worth showing next to them, ``{name: value}``."""

    def number(v):
        v = float(v)
        return v if math.isfinite(v) else repr(v)  # JSON has no NaN/inf

    result = {
        "optimizer": ARGS.optimizer,
        "quick": ARGS.quick,
        "loss": number(loss),
        "metric_name": metric_name,
        "metric": number(metric),
        "higher_is_better": bool(higher_is_better),
        "extra": {name: number(v) for name, v in (extra or {}).items()},
        "seconds": round(time.perf_counter() - _START, 2),
    }
    print(RESULT_TAG, json.dumps(result), flush=True)
    return result
