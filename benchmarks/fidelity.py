"""Fidelity of each curvature method to the exact Fisher block, on MNIST.

For a small MLP and a small convnet on downsampled MNIST, at initialization
and after training (Adam, so the trajectory does not depend on the methods),
the relative Frobenius error ``||F - F_hat||_F / ||F||_F`` of every layer's
block (``keras_kfac.fidelity.fidelity``) for one batch of ``--n`` examples,
for the empirical Fisher (training labels) and a one-sample Monte-Carlo
true Fisher (labels drawn from the model). Writes
``benchmarks/results/fidelity.{md,json}``.

    python benchmarks/fidelity.py --n 256 --train-steps 300
"""

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_kfac import exact  # noqa: E402
from keras_kfac import fidelity as fd  # noqa: E402

METHODS = ("kfac", "ekfac", "kpsvd", "deflation", "lanczos", "kfac_corrected", "diagonal")


def load_mnist():
    from keras_kfac import datasets

    return datasets.load_numpy("mnist", "train")


def downsample(x, factor):
    n, h, w, c = x.shape
    return x.reshape(n, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


def build(kind, seed):
    keras.utils.set_random_seed(seed)
    if kind == "mlp":
        return keras.Sequential(
            [
                keras.Input((7, 7, 1)),
                keras.layers.Flatten(),
                keras.layers.Dense(32, activation="tanh", name="dense1"),
                keras.layers.Dense(16, activation="tanh", name="dense2"),
                keras.layers.Dense(10, name="logits"),
            ]
        )
    return keras.Sequential(
        [
            keras.Input((14, 14, 1)),
            keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="conv1"),
            keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="conv2"),
            keras.layers.Flatten(),
            keras.layers.Dense(10, name="logits"),
        ]
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256, help="examples in the Fisher batch")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "fidelity"))
    args = parser.parse_args(argv)

    x_all, y_all = load_mnist()
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    rng = np.random.default_rng(args.seed)
    rows = []
    for kind, factor in (("mlp", 4), ("convnet", 2)):
        x = downsample(x_all, factor).astype("float32")
        model = build(kind, args.seed)
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss)
        idx = rng.choice(len(x), args.n, replace=False)
        xb, yb = x[idx], y_all[idx]
        for stage in ("init", "trained"):
            if stage == "trained":
                model.fit(
                    x, y_all, batch_size=128, epochs=1, steps_per_epoch=args.train_steps, verbose=0
                )
            for fisher in ("empirical", "sampled"):
                labels = (
                    yb if fisher == "empirical" else exact.sample_labels(model, xb, seed=args.seed)
                )
                t0 = time.time()
                errors = fd.fidelity(model, xb, labels, loss, methods=METHODS)
                for layer, per_method in errors.items():
                    block = exact.resolve_block(model, layer)
                    rows.append(
                        dict(
                            model=kind,
                            stage=stage,
                            fisher=fisher,
                            layer=layer,
                            parameters=block.num_parameters,
                            **per_method,
                        )
                    )
                print(f"{kind} {stage} {fisher}: {time.time() - t0:.1f}s", flush=True)
    write(rows, args)


def write(rows, args):
    checks = {
        "ekfac <= kfac": sum(r["ekfac"] <= r["kfac"] + 1e-6 for r in rows),
        "kpsvd <= kfac": sum(r["kpsvd"] <= r["kfac"] + 1e-6 for r in rows),
        "deflation <= kpsvd": sum(r["deflation"] <= r["kpsvd"] + 1e-6 for r in rows),
        "kfac_corrected <= kfac": sum(r["kfac_corrected"] <= r["kfac"] + 1e-6 for r in rows),
        "|lanczos - deflation| < 1e-3": sum(
            abs(r["lanczos"] - r["deflation"]) < 1e-3 for r in rows
        ),
    }
    means = {m: float(np.mean([r[m] for r in rows])) for m in METHODS}
    result = dict(
        description="relative Frobenius error ||F - F_hat||_F / ||F||_F per layer block, "
        f"one batch of {args.n} MNIST examples (MLP on 7x7, convnet on 14x14); "
        "'trained' = after Adam training; 'sampled' = one label per example drawn from the model",
        n=args.n,
        train_steps=args.train_steps,
        rows=rows,
        checks=checks,
        total=len(rows),
        mean=means,
    )
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    lines = [
        "# Fidelity of the curvature methods to the exact Fisher block",
        "",
        result["description"] + ". Lower is better; `tengrad` is exact (0) by "
        "construction and `cgfac` solves with `kfac`'s matrix of the current batch.",
        "",
        "| model | stage | fisher | layer | P | " + " | ".join(METHODS) + " |",
        "|" + "---|" * (5 + len(METHODS)),
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['stage']} | {r['fisher']} | {r['layer']} | {r['parameters']} | "
            + " | ".join(f"{r[m]:.3f}" for m in METHODS)
            + " |"
        )
    lines += ["", "| mean | " + " | ".join(f"{m}: {v:.3f}" for m, v in means.items()) + " |", ""]
    lines += ["Claims checked on every block (holds / blocks):", ""]
    lines += [f"- {k}: {v}/{len(rows)}" for k, v in checks.items()]
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
