"""Why KFAC() drifts where the example's own optimizer does not (issue 12 item 4,
issue 14's MNIST MLP), measured per epoch on small budgets.

Models (MNIST subset from the shared copy, keras_kfac.datasets):
  mlp          784-256-256-10, ReLU, Dropout 0.5 (issue 14's classifier)
  antirectifier keras-io "antirectifier": Dense + custom Antirectifier layer
               (its own kernel, trained by the Adam fallback) + Dropout
  moe          a small mixture-of-experts classifier (softmax gate over
               Dense experts, custom layer)

Each run: same seed, same initial weights, same batches; per epoch the train
loss (on a fixed training subset, inference mode), validation loss and
accuracy, mean/max |logit|; and the KFAC step diagnostics (KL-clip scale nu,
update norm, gradient norm) averaged over the epoch's logging steps.

    python benchmarks/divergence.py                   # the full table
    python benchmarks/divergence.py --models mlp --epochs 2 --train 10000
"""

import argparse
import json
import os
import sys
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras import layers, ops  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import keras_kfac  # noqa: E402
from keras_kfac import datasets  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# --- models ------------------------------------------------------------------
class Antirectifier(layers.Layer):
    """keras-io examples/keras_recipes/antirectifier.py, as written there."""

    def __init__(self, initializer="he_normal", **kwargs):
        super().__init__(**kwargs)
        self.initializer = keras.initializers.get(initializer)

    def build(self, input_shape):
        output_dim = input_shape[-1]
        self.kernel = self.add_weight(
            shape=(output_dim * 2, output_dim),
            initializer=self.initializer,
            name="kernel",
            trainable=True,
        )

    def call(self, inputs):
        inputs -= ops.mean(inputs, axis=-1, keepdims=True)
        pos = ops.relu(inputs)
        neg = ops.relu(-inputs)
        concatenated = ops.concatenate([pos, neg], axis=-1)
        return ops.matmul(concatenated, self.kernel)


class LinearMoE(layers.Layer):
    """The keras-io mnist_moe classifier head: a softmax gate picks the
    top-k of ``num_experts`` Dense experts per example and mixes their
    outputs with the gate weights; the example's diversity and importance
    losses (coefficient 0.01) are added with ``add_loss`` (the example adds
    them in its train step)."""

    def __init__(self, hidden_size, num_experts=6, top_k=4, **kwargs):
        super().__init__(**kwargs)
        init = keras.initializers.RandomNormal(mean=0.0, stddev=0.001)
        self.experts = [
            layers.Dense(hidden_size, kernel_initializer=init, name=f"expert_{i}")
            for i in range(num_experts)
        ]
        self.gating_network = layers.Dense(num_experts, kernel_initializer=init, name="gate")
        self.top_k = top_k

    def build(self, input_shape):
        self.gating_network.build(input_shape)
        for e in self.experts:
            e.build(input_shape)

    def call(self, x):
        gates = ops.softmax(self.gating_network(x))
        entropy = -ops.sum(gates * ops.log(gates + 1e-10), axis=1)
        importance = ops.sum(gates, axis=0)
        self.add_loss(
            0.01 * (-ops.mean(entropy) + ops.mean(ops.square(importance - ops.mean(importance))))
        )
        top_w, top_i = tf.math.top_k(gates, k=self.top_k)
        outputs = ops.stack([e(x) for e in self.experts], axis=1)  # (n, E, hidden)
        chosen = tf.gather(outputs, top_i, batch_dims=1)  # (n, k, hidden)
        return ops.sum(chosen * top_w[..., None], axis=1)


def build_model(name):
    if name == "mlp":
        return keras.Sequential(
            [
                keras.Input((784,)),
                layers.Dense(256, activation="relu"),
                layers.Dropout(0.5),
                layers.Dense(256, activation="relu"),
                layers.Dropout(0.5),
                layers.Dense(10),
            ]
        )
    if name == "antirectifier":
        return keras.Sequential(
            [
                keras.Input((784,)),
                layers.Dense(256),
                Antirectifier(),
                layers.Dense(256),
                Antirectifier(),
                layers.Dropout(0.5),
                layers.Dense(10),
            ]
        )
    if name == "moe":
        return keras.Sequential(
            [
                keras.Input((784,)),
                layers.Dense(256, activation="relu"),
                layers.Dropout(0.5),
                LinearMoE(10),
            ]
        )
    raise ValueError(name)


# --- optimizers ----------------------------------------------------------------
def make_optimizer(spec):
    kind, _, args = spec.partition(":")
    kwargs = json.loads(args) if args else {}
    if kind == "kfac":
        return keras_kfac.KFAC(seed=0, **kwargs)
    if kind == "adam":
        return keras.optimizers.Adam(**kwargs)
    if kind == "rmsprop":
        return keras.optimizers.RMSprop(**kwargs)
    raise ValueError(spec)


class StepLog(keras.callbacks.Callback):
    """KFAC diagnostics on every logging step, grouped per epoch."""

    def __init__(self, every):
        super().__init__()
        self.every = every
        self.rows = []
        self.epoch = 0

    def on_train_begin(self, logs=None):
        opt = self.model.optimizer
        if isinstance(opt, keras_kfac.KFAC):
            keras_kfac.callbacks.kfac_optimizer(self.model).track_diagnostics(
                self.every, histograms=False
            )
            if opt.monitor.trace_is_stale() and self.model.train_function is not None:
                self.model.make_train_function(force=True)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        opt = self.model.optimizer
        if not isinstance(opt, keras_kfac.KFAC) or (int(opt.iterations.numpy())) % self.every:
            return
        d = opt.diagnostics()
        self.rows.append(
            {
                "epoch": self.epoch,
                "nu": float(d["kl_clip_scale"]),
                "update_norm": float(d["update_norm"]),
                "grad_norm": float(d["grad_norm"]),
            }
        )


def evaluate(model, x, y):
    logits = model.predict(x, batch_size=1000, verbose=0)
    loss = float(keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, logits).numpy())
    acc = float(np.mean(np.argmax(logits, -1) == y))
    return loss, acc, float(np.mean(np.abs(logits))), float(np.max(np.abs(logits)))


def run(model_name, spec, data, epochs, batch, seed, diag_every):
    (x, y), (xv, yv) = data
    keras.utils.set_random_seed(seed)
    model = build_model(model_name)
    opt = make_optimizer(spec)
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    log = StepLog(diag_every)
    callbacks = [log]
    rows = []
    rng = np.random.default_rng(seed)
    fixed = rng.choice(len(x), size=min(5000, len(x)), replace=False)
    start = time.time()
    for epoch in range(epochs):
        history = model.fit(
            x,
            y,
            batch_size=batch,
            epochs=epoch + 1,
            initial_epoch=epoch,
            shuffle=True,
            callbacks=callbacks,
            verbose=0,
        )
        tr = evaluate(model, x[fixed], y[fixed])
        va = evaluate(model, xv, yv)
        diag = [r for r in log.rows if r["epoch"] == epoch]
        rows.append(
            {
                "epoch": epoch + 1,
                "fit_loss": float(history.history["loss"][-1]),
                "train_loss": tr[0],
                "val_loss": va[0],
                "val_acc": va[1],
                "mean_abs_logit": va[2],
                "max_abs_logit": va[3],
                "nu": float(np.mean([r["nu"] for r in diag])) if diag else float("nan"),
                "update_norm": float(np.mean([r["update_norm"] for r in diag]))
                if diag
                else float("nan"),
                "grad_norm": float(np.mean([r["grad_norm"] for r in diag]))
                if diag
                else float("nan"),
            }
        )
        print(model_name, spec, json.dumps(rows[-1]), flush=True)
    return {"model": model_name, "optimizer": spec, "seconds": time.time() - start, "epochs": rows}


def load(train, val):
    x, y = datasets.load_numpy("mnist", "train")
    x = x.reshape(len(x), -1)
    return (x[:train], y[:train]), (x[-val:], y[-val:])


DEFAULT_OPTIMIZERS = ["rmsprop", "adam", "kfac"]


def table(results):
    lines = []
    for model in dict.fromkeys(r["model"] for r in results):
        lines.append(f"\n#### {model}\n")
        lines.append(
            "| optimizer | epoch | fit loss (train mode) | train loss | val loss | val acc | mean/max abs logit | nu | update norm | grad norm |"
        )
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in results:
            if r["model"] != model:
                continue
            for e in r["epochs"]:
                diag = (
                    "| | | |"
                    if np.isnan(e["nu"])
                    else f"| {e['nu']:.3f} | {e['update_norm']:.3g} | {e['grad_norm']:.3g} |"
                )
                lines.append(
                    f"| `{r['optimizer']}` | {e['epoch']} | {e['fit_loss']:.4f} | {e['train_loss']:.4f} | {e['val_loss']:.4f} | "
                    f"{e['val_acc']:.4f} | {e['mean_abs_logit']:.1f} / {e['max_abs_logit']:.0f} {diag}"
                )
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", nargs="+", default=["mlp", "antirectifier", "moe"])
    p.add_argument(
        "--optimizers",
        nargs="+",
        default=DEFAULT_OPTIMIZERS,
        help="kind[:json kwargs], e.g. kfac:'{\"momentum\": 0}'",
    )
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train", type=int, default=20000)
    p.add_argument("--val", type=int, default=10000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--diag-every", type=int, default=10)
    p.add_argument("--out", default=None, help="JSON file for the results")
    args = p.parse_args(argv)
    data = load(args.train, args.val)
    results = [
        run(m, o, data, args.epochs, args.batch, args.seed, args.diag_every)
        for m in args.models
        for o in args.optimizers
    ]
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    print(table(results))
    return results


if __name__ == "__main__":
    main()
