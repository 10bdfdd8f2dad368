"""Candidate ``KFAC()`` defaults against Adam, per step, on every model kind.

Each task trains every optimizer from the same initial weights on the same
batches for a fixed number of steps; the table gives the training loss on a
fixed probe after 1/4, 1/2 and all of the steps (progress per step, so the
machine's load does not matter) and each run's median step time as a ratio
to the best Adam's, measured in the same process. Adam runs over a small
learning-rate grid and the best final loss is the reference.

    python benchmarks/defaults.py            # the table in results/defaults.md
    python benchmarks/defaults.py --quick    # smoke mode, a minute or two
    python benchmarks/defaults.py --tasks mlp --candidates "kfac()" "kfac adaptive+lm"

Tasks: the K-FAC paper's sigmoid autoencoder (summed BCE from logits, as in
examples/mnist_autoencoder.py, and as a Keras user writes it: sigmoid output,
Keras's mean ``binary_crossentropy``), the ReLU autoencoder (batch 1000), the
MNIST MLP with dropout (batch 128), the Fashion-MNIST convnet (batch 128) and
the two custom-layer models of benchmarks/divergence.py.
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from divergence import build_model as divergence_model  # noqa: E402
from harness import RESULTS, machine  # noqa: E402
from mnist_autoencoder import PIXELS, make_loss  # noqa: E402
from run import autoencoder, convnet  # noqa: E402

import keras_kfac  # noqa: E402
from keras_kfac import datasets  # noqa: E402

SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def sigmoid_output_autoencoder(seed=0):
    """The paper's autoencoder as a Keras user writes it: a sigmoid output
    trained with Keras's mean ``binary_crossentropy`` on probabilities."""
    logits_model = autoencoder("sigmoid", seed)
    outputs = keras.layers.Activation("sigmoid")(logits_model.output)
    return keras.Model(logits_model.input, outputs)


def tasks(quick, ae_steps, clf_steps):
    """name -> (build, loss, x, y, batch, steps, report scale of the loss)."""
    mnist, labels = datasets.load_numpy("mnist", "train")
    mnist = mnist.reshape(len(mnist), -1)
    fashion, fashion_labels = datasets.load_numpy("fashion_mnist", "train")
    n = 4000 if quick else 20000
    if quick:
        ae_steps, clf_steps = 6, 8
    x, y = mnist[:n], labels[:n]
    fx, fy = fashion[:n], fashion_labels[:n]
    return {
        "sigmoid AE (logits, summed BCE)": (
            lambda: autoencoder("sigmoid"),
            make_loss(),
            x,
            x,
            1000,
            ae_steps,
            PIXELS,
        ),
        "sigmoid AE (Keras mean BCE)": (
            sigmoid_output_autoencoder,
            "binary_crossentropy",
            x,
            x,
            1000,
            ae_steps,
            PIXELS,
        ),
        "ReLU AE": (lambda: autoencoder("relu"), make_loss(), x, x, 1000, ae_steps, PIXELS),
        "MNIST MLP dropout": (lambda: divergence_model("mlp"), SCCE, x, y, 128, clf_steps, 1),
        "Fashion convnet": (convnet, SCCE, fx, fy, 128, clf_steps, 1),
        "antirectifier": (lambda: divergence_model("antirectifier"), SCCE, x, y, 128, clf_steps, 1),
        "MoE": (lambda: divergence_model("moe"), SCCE, x, y, 128, clf_steps, 1),
    }


def candidates():
    """name -> (optimizer factory, callbacks factory)."""

    def kfac(**kw):
        return lambda: keras_kfac.KFAC(seed=0, **kw)

    def none():
        return []

    def lm():
        return [keras_kfac.callbacks.AdaptiveDamping()]

    return {
        "kfac()": (kfac(), none),
        "kfac kl_clip=1e-4": (kfac(kl_clip=1e-4), none),
        "kfac momentum=0": (kfac(momentum=0.0), none),
        "kfac damping=0.1": (kfac(damping=0.1), none),
        "kfac lm": (kfac(), lm),
        "kfac adaptive+lm": (kfac(adaptive_step=True, inverse_every=5), lm),
    }


def adam_runs(lrs):
    return {f"adam lr={lr:g}": (lambda lr=lr: keras.optimizers.Adam(lr), list) for lr in lrs}


class StepRecorder(keras.callbacks.Callback):
    """Stops after ``steps`` steps, evaluates the probe at the checkpoints
    with the clock stopped, records step times (the first, compiling, one
    excluded)."""

    def __init__(self, steps, checkpoints, evaluate):
        super().__init__()
        self.steps, self.checkpoints, self.evaluate = steps, checkpoints, evaluate
        self.losses, self.times, self.step = {}, [], 0

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        float(logs["loss"])  # waits for the step
        if self.step > 0:
            self.times.append(time.perf_counter() - self._start)
        self.step += 1
        diverged = not np.isfinite(float(logs["loss"]))
        if self.step in self.checkpoints or diverged:
            self.losses[self.step] = float("inf") if diverged else self.evaluate()
        if self.step >= self.steps or diverged:
            self.model.stop_training = True


def run_one(task, make_optimizer, make_callbacks):
    build, loss, x, y, batch, steps, scale = task
    keras.utils.set_random_seed(0)
    model = build()
    model.compile(optimizer=make_optimizer(), loss=loss)
    probe = (x[:5000], y[:5000])

    def evaluate():
        return scale * float(model.evaluate(*probe, batch_size=1000, verbose=0))

    checkpoints = sorted({max(1, steps // 4), max(1, steps // 2), steps})
    recorder = StepRecorder(steps, checkpoints, evaluate)
    keras.utils.set_random_seed(1234)  # the same batches for every optimizer
    epochs = -(-steps * batch // len(x))
    model.fit(
        x, y, batch_size=batch, epochs=epochs, verbose=0, callbacks=[recorder] + make_callbacks()
    )
    median_ms = 1000 * statistics.median(recorder.times) if recorder.times else float("nan")
    return {"losses": recorder.losses, "median_ms": median_ms, "load": os.getloadavg()[0]}


def _cell(run, target, adam_ms, bold):
    """``loss/loss/loss (ratio)``, bold when the final loss reaches ``target``."""
    losses = run["losses"]
    text = "/".join(f"{v:.4g}" for _, v in sorted(losses.items()))
    if bold and losses[max(losses)] <= target:
        text = f"**{text}**"
    return f"{text} ({run['median_ms'] / adam_ms:.1f}x)"


def markdown(results, names, command):
    lines = [
        "### Candidate defaults: probe training loss after 1/4, 1/2, all steps",
        "",
        f"Command: `{command}`; {machine()}. Loss per image (summed BCE) for the autoencoders,",
        "per example for the classifiers; `(r x)`: median step time / the best Adam's, same process;",
        "**bold**: at or below the best Adam's final loss. inf: diverged.",
        "",
        "| task | steps | best Adam | " + " | ".join(names) + " |",
        "|---|---:|---|" + "---|" * len(names),
    ]
    for task, runs in results.items():
        adams = {k: v for k, v in runs.items() if k.startswith("adam")}
        best = min(adams, key=lambda k: adams[k]["losses"][max(adams[k]["losses"])])
        target = adams[best]["losses"][max(adams[best]["losses"])]
        ms = adams[best]["median_ms"]

        steps = max(adams[best]["losses"])
        row = [task, str(steps), f"{best}: {_cell(adams[best], target, ms, False)}"]
        row += [_cell(runs[n], target, ms, True) if n in runs else "-" for n in names]
        lines.append("| " + " | ".join(row) + " |")
    loads = [r["load"] for runs in results.values() for r in runs.values()]
    lines += ["", f"1-minute load average while measuring: {min(loads):.1f} to {max(loads):.1f}."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke mode: tiny data, a few steps")
    p.add_argument("--tasks", nargs="*", default=None, help="substrings of task names")
    p.add_argument("--candidates", nargs="*", default=None, help="candidate names")
    p.add_argument("--ae-steps", type=int, default=100, help="steps on the autoencoders")
    p.add_argument("--clf-steps", type=int, default=300, help="steps on the classifiers")
    p.add_argument("--adam-lrs", nargs="*", type=float, default=None, help="default 3e-4 1e-3 3e-3")
    p.add_argument("--out", default=None, help="Markdown file (default results/defaults.md)")
    args = p.parse_args(argv)
    all_tasks = tasks(args.quick, args.ae_steps, args.clf_steps)
    chosen = {
        k: v for k, v in all_tasks.items() if not args.tasks or any(t in k for t in args.tasks)
    }
    cands = candidates()
    names = args.candidates or list(cands)
    unknown = [n for n in names if n not in cands]
    if unknown:
        sys.exit(f"Unknown candidates {unknown}: choose among {list(cands)}")
    lrs = args.adam_lrs or ((1e-3, 3e-3) if args.quick else (3e-4, 1e-3, 3e-3))
    results = {}
    for task_name, task in chosen.items():
        runs = dict(adam_runs(lrs))
        runs.update({n: cands[n] for n in names})
        results[task_name] = {}
        for label, (make_optimizer, make_callbacks) in runs.items():
            out = run_one(task, make_optimizer, make_callbacks)
            results[task_name][label] = out
            print(task_name, "|", label, json.dumps(out), flush=True)
    command = "python benchmarks/defaults.py " + " ".join(sys.argv[1:] if argv is None else argv)
    md = markdown(results, names, command.strip())
    out = args.out or os.path.join(RESULTS, "defaults" + ("_quick" if args.quick else "") + ".md")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write(md)
    with open(out[:-3] + ".json", "w") as f:
        json.dump(results, f, indent=1)
    print(md)


if __name__ == "__main__":
    main()
