"""Benchmarks of keras_kfac against Adam and SGD. Run by hand, one suite per
command; results (JSON, CSV, PNG, Markdown) go to ``benchmarks/results/``.

    python benchmarks/run.py autoencoder            # MNIST deep autoencoder (sigmoid)
    python benchmarks/run.py autoencoder --relu     # the ReLU variant
    python benchmarks/run.py convnet --batch 128    # Fashion-MNIST convnet
    python benchmarks/run.py overhead --batch 1000  # time per step / memory per method
    python benchmarks/run.py xla                    # XLA against graph steps, every method
    python benchmarks/run.py vit                    # small ViT on Fashion-MNIST
    python benchmarks/run.py charlm                 # character-level Transformer LM
    python benchmarks/run.py panel                  # every task against tuned baselines
    python benchmarks/run.py autoencoder --quick     # smoke mode, well under a minute

``--budget`` is the training wall-clock per optimizer (seconds, excluding the
first compiled step and evaluations; default 60, per task for the panel);
``--optimizers`` restricts the runs. The panel is in ``benchmarks/panel.py``.
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
from harness import RESULTS, BudgetLogger, machine, time_to_reach, write_results  # noqa: E402
from mnist_autoencoder import PIXELS, make_loss  # noqa: E402

import keras_kfac  # noqa: E402
from keras_kfac import datasets  # noqa: E402

# The methods whose cost is dominated by dense work on the full block for
# 1000-wide layers; they run in the overhead suite and on small models.
ALL_METHODS = keras_kfac.curvature.available()


# --- models ------------------------------------------------------------------


def autoencoder(activation, seed=0, width=1.0):
    """The deep autoencoder 784-1000-500-250-30 mirrored (``width`` scales
    the three outer hidden widths)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((PIXELS,))
    h = inputs
    hidden = [max(1, round(units * width)) for units in (1000, 500, 250)]
    for units in hidden:
        h = keras.layers.Dense(units, activation=activation)(h)
    h = keras.layers.Dense(30)(h)
    for units in reversed(hidden):
        h = keras.layers.Dense(units, activation=activation)(h)
    return keras.Model(inputs, keras.layers.Dense(PIXELS)(h))


def convnet(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(64, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(10),
        ]
    )


class PatchEmbedding(keras.layers.Layer):
    """Non-overlapping image patches, linearly projected, plus a learned
    position embedding (the ViT input of Dosovitskiy et al. 2021)."""

    def __init__(self, patch, patches, dim, **kwargs):
        super().__init__(**kwargs)
        self.patch = patch
        self.patches = patches
        self.projection = keras.layers.Dense(dim)
        self.position = keras.layers.Embedding(patches, dim)

    def call(self, images):
        flat = keras.ops.image.extract_patches(images, self.patch)
        flat = keras.ops.reshape(flat, (-1, self.patches, flat.shape[-1]))
        return self.projection(flat) + self.position(keras.ops.arange(self.patches))


def transformer_layer(x, heads, dim, hidden, causal=False):
    """Pre-norm Transformer layer: attention and MLP, each with a residual."""
    h = keras.layers.LayerNormalization(epsilon=1e-6)(x)
    h = keras.layers.MultiHeadAttention(heads, dim // heads)(h, h, use_causal_mask=causal)
    x = keras.layers.Add()([x, h])
    h = keras.layers.LayerNormalization(epsilon=1e-6)(x)
    h = keras.layers.Dense(hidden, activation="gelu")(h)
    h = keras.layers.Dense(dim)(h)
    return keras.layers.Add()([x, h])


def vit(seed=0, patch=7, dim=64, heads=4, depth=2):
    """A small ViT for 28x28 images: 16 patches of 7x7, two layers, mean pooling."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((28, 28, 1))
    x = PatchEmbedding(patch, (28 // patch) ** 2, dim)(inputs)
    for _ in range(depth):
        x = transformer_layer(x, heads, dim, 2 * dim)
    x = keras.layers.LayerNormalization(epsilon=1e-6)(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(inputs, keras.layers.Dense(10)(x))


class TokenAndPosition(keras.layers.Layer):
    def __init__(self, length, vocab, dim, **kwargs):
        super().__init__(**kwargs)
        self.tokens = keras.layers.Embedding(vocab, dim)
        self.positions = keras.layers.Embedding(length, dim)
        self.length = length

    def call(self, ids):
        return self.tokens(ids) + self.positions(keras.ops.arange(self.length))


def char_lm(vocab, length, seed=0, dim=128, heads=4, depth=2):
    """A causal character-level Transformer language model (per-token loss)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((length,), dtype="int32")
    x = TokenAndPosition(length, vocab, dim)(inputs)
    for _ in range(depth):
        x = transformer_layer(x, heads, dim, 4 * dim, causal=True)
    x = keras.layers.LayerNormalization(epsilon=1e-6)(x)
    return keras.Model(inputs, keras.layers.Dense(vocab)(x))


FORTUNES = os.path.join(os.path.dirname(ROOT), "shared", "datasets", "fortunes", "fortunes.txt.gz")


def fortunes_sequences(length, path=FORTUNES):
    """Debian's ``fortunes`` text (see ../shared/datasets/fortunes/README.md:
    ``apt-get download fortunes``; the data files concatenated and gzipped) as
    non-overlapping character windows: ``(x, y)`` with ``y`` ``x`` shifted by
    one, a vocabulary of the printable characters (others map to one id), and
    the last 5% of the text held out."""
    import gzip

    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
        text = f.read()
    chars = sorted({c for c in text if c.isprintable() or c == "\n"})
    index = {c: i + 1 for i, c in enumerate(chars)}  # 0: anything else
    ids = np.array([index.get(c, 0) for c in text], dtype=np.int32)
    windows = (len(ids) - 1) // length
    x = ids[: windows * length].reshape(windows, length)
    y = ids[1 : windows * length + 1].reshape(windows, length)
    split = int(0.95 * windows)
    return (x[:split], y[:split]), (x[split:], y[split:]), len(chars) + 1


# --- optimizers ----------------------------------------------------------------


def kfac_runs(methods, tuned):
    runs = {"kfac (defaults)": (lambda: keras_kfac.KFAC(), [])}
    for name, kwargs in tuned.items():
        runs[name] = (lambda kw=kwargs: keras_kfac.KFAC(**kw), [])
    for method in methods:
        if method != "kfac":
            runs[f"{method} (defaults)"] = (lambda m=method: keras_kfac.KFAC(curvature=m), [])
    return runs


def first_order_runs(adam_lrs, sgd_lrs):
    runs = {}
    for lr in adam_lrs:
        runs[f"adam lr={lr:g}"] = (lambda lr=lr: keras.optimizers.Adam(lr), [])
    for lr in sgd_lrs:
        runs[f"sgd nesterov lr={lr:g}"] = (
            lambda lr=lr: keras.optimizers.SGD(lr, momentum=0.9, nesterov=True),
            [],
        )
    return runs


def transformer_baselines(adam_lrs, weight_decay=0.05):
    """Adam and AdamW over a learning-rate grid, and Muon (Keras's defaults:
    Newton-Schulz orthogonalized momentum on 2-D weights, AdamW on the rest)."""
    runs = {}
    for lr in adam_lrs:
        runs[f"adam lr={lr:g}"] = (lambda lr=lr: keras.optimizers.Adam(lr), [])
    for lr in adam_lrs:
        runs[f"adamw lr={lr:g}"] = (
            lambda lr=lr: keras.optimizers.AdamW(lr, weight_decay=weight_decay),
            [],
        )
    runs["muon (defaults)"] = (lambda: keras.optimizers.Muon(), [])
    return runs


def select(runs, patterns):
    if not patterns:
        return runs
    return {k: v for k, v in runs.items() if any(p in k for p in patterns)}


# --- training -----------------------------------------------------------------


def train(
    build,
    make_optimizer,
    callbacks,
    x,
    y,
    batch,
    budget,
    eval_every,
    evaluate,
    max_steps=None,
    seed=0,
):
    """One run; ``seed`` picks the initial weights and the batch order (and
    dropout), the same for every optimizer."""
    model = build(seed)
    model.compile(optimizer=make_optimizer(), **build.compile_kwargs)
    logger = BudgetLogger(budget, eval_every, lambda: evaluate(model), max_steps)
    keras.utils.set_random_seed(1234 + seed)
    epochs = 10_000 if max_steps is None else -(-max_steps * batch // len(x))
    model.fit(x, y, batch_size=batch, epochs=epochs, verbose=0, callbacks=[logger] + callbacks)
    return logger


def run_suite(name, runs, build, data, args, evaluate, key, higher_is_better=False):
    x, y = data
    results = {}
    for label, (make_optimizer, callbacks) in runs.items():
        logger = train(
            build,
            make_optimizer,
            callbacks,
            x,
            y,
            args.batch,
            args.budget,
            args.eval_every,
            evaluate,
            args.max_steps,
        )
        results[label] = dict(logger.summary(), rows=logger.rows)
        final = results[label]["final"]
        print(
            f"{label:<34} steps={logger.step:5d}  "
            f"median={results[label]['median_step_ms']:7.1f} ms/step  "
            + "  ".join(f"{k}={v:.4g}" for k, v in final.items() if k not in ("step", "seconds")),
            flush=True,
        )
    return results


def report_time_to_target(results, key, target_label, higher_is_better=False):
    """Each run's wall time and steps to reach the best first-order run's
    final ``key`` (the "target")."""
    sign = -1 if higher_is_better else 1
    baselines = {k: v for k, v in results.items() if k.startswith(target_label)}
    if not baselines:  # e.g. --optimizers without Adam: no target, still a table
        best, target = None, None
    else:
        best = min(baselines, key=lambda k: sign * baselines[k]["final"][key])
        target = results[best]["final"][key]
    table = []
    for label, run in results.items():
        rows = (
            run["rows"]
            if not higher_is_better
            else [dict(r, **{key: -r[key]}) for r in run["rows"]]
        )
        seconds, steps = (None, None) if best is None else time_to_reach(rows, key, sign * target)
        table.append(
            {
                "run": label,
                "final": run["final"][key],
                "steps": run["steps"],
                "median_step_ms": run["median_step_ms"],
                "mean_step_ms": run["mean_step_ms"],
                "seconds_to_target": seconds,
                "steps_to_target": steps,
                "time_ratio_to_best_baseline": (
                    None if seconds is None else seconds / results[best]["seconds"]
                ),
            }
        )
    return best, target, table


def adam_step_ms(results):
    """Median amortized step time of the Adam runs (None without Adam)."""
    times = [r["mean_step_ms"] for k, r in results.items() if k.startswith("adam")]
    return statistics.median(times) if times else None


def markdown(title, command, best, target, key, table, adam_ms):
    lines = [f"### {title}", "", f"`{command}` on {machine()}.", ""]
    if best is not None:
        lines.append(f"Target: {best}'s final {key} = {target:.4g} (end of its budget).")
    lines.append("")
    lines.append(
        f"| run | final {key} | steps | ms/step median | ms/step amortized | x Adam (amortized) "
        "| time to target (s) | steps to target | time / target run's |"
    )
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in table:
        t = "-" if row["seconds_to_target"] is None else f"{row['seconds_to_target']:.0f}"
        s = "-" if row["steps_to_target"] is None else str(row["steps_to_target"])
        ratio = row["time_ratio_to_best_baseline"]
        r = "-" if ratio is None else f"{ratio:.2f}"
        x_adam = "-" if adam_ms is None else f"{row['mean_step_ms'] / adam_ms:.2f}"
        lines.append(
            f"| {row['run']} | {row['final']:.4g} | {row['steps']} | {row['median_step_ms']:.0f} | "
            f"{row['mean_step_ms']:.0f} | {x_adam} | {t} | {s} | {r} |"
        )
    return "\n".join(lines) + "\n"


# --- suites --------------------------------------------------------------------


def autoencoder_task(args, activation, probe_size=10000, test_size=None):
    """MNIST autoencoder: ``(build, data, evaluate)`` for :func:`run_suite`
    (summed BCE per image on a fixed training probe and on the test set)."""
    x, _ = datasets.load_numpy("mnist", "train", data_dir=args.data_dir)
    xt, _ = datasets.load_numpy("mnist", "test", data_dir=args.data_dir)
    x, xt = x.reshape(len(x), -1), xt.reshape(len(xt), -1)
    if args.quick:
        x, xt = x[:4000], xt[:1000]
    probe, probe_test = x[:probe_size], xt[:test_size]

    def build(seed=0):
        return autoencoder(activation, seed)

    build.compile_kwargs = {"loss": make_loss()}

    def evaluate(model):
        return {
            "train_loss": PIXELS * model.evaluate(probe, probe, batch_size=2000, verbose=0),
            "test_loss": PIXELS
            * model.evaluate(probe_test, probe_test, batch_size=2000, verbose=0),
        }

    return build, (x, x), evaluate


def suite_autoencoder(args):
    activation = "relu" if args.relu else "sigmoid"
    build, data, evaluate = autoencoder_task(args, activation)
    tuned = {
        "kfac adaptive (peer-like)": dict(
            adaptive_step=True, inverse_every=5, damping=args.adaptive_damping
        )
    }
    tuned.update(args.kfac)
    runs = dict(kfac_runs(args.methods, tuned))
    runs["kfac adaptive (peer-like)"] = (
        runs["kfac adaptive (peer-like)"][0],
        [keras_kfac.callbacks.AdaptiveDamping()],
    )
    runs.update(first_order_runs([1e-4, 3e-4, 1e-3, 3e-3], [0.3, 1.0, 3.0]))
    runs = select(runs, args.optimizers)
    results = run_suite("autoencoder", runs, build, data, args, evaluate, "train_loss")
    name = (
        f"autoencoder_{activation}_batch{args.batch}" + args.tag + ("_quick" if args.quick else "")
    )
    report(
        args,
        name,
        f"MNIST autoencoder ({activation})",
        results,
        "train_loss",
        "adam",
        "train loss (summed BCE per image)",
        higher_is_better=False,
        log_y=True,
        key_label="train_loss (summed BCE/image)",
    )


def fashion_mnist_task(
    args, model_fn, train_size=None, probe_size=10000, test_size=None, dataset="fashion_mnist"
):
    """Fashion-MNIST (or MNIST) classification: ``(build, data, evaluate)``
    for :func:`run_suite` (train loss on a fixed probe of the training set,
    test loss and accuracy). ``model_fn(seed=...)`` builds the model."""
    x, y = datasets.load_numpy(dataset, "train", data_dir=args.data_dir)
    xt, yt = datasets.load_numpy(dataset, "test", data_dir=args.data_dir)
    if args.quick:
        x, y, xt, yt = x[:train_size], y[:train_size], xt[: train_size // 4], yt[: train_size // 4]
    probe = (x[:probe_size], y[:probe_size])
    xt, yt = xt[:test_size], yt[:test_size]

    def build(seed=0):
        return model_fn(seed=seed)

    build.compile_kwargs = {
        "loss": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        "metrics": ["accuracy"],
    }

    def evaluate(model):
        train_loss, _ = model.evaluate(*probe, batch_size=1000, verbose=0)
        test_loss, test_acc = model.evaluate(xt, yt, batch_size=1000, verbose=0)
        return {"train_loss": train_loss, "test_loss": test_loss, "test_accuracy": test_acc}

    return build, (x, y), evaluate


def report(
    args, name, title, results, key, target_labels, y_label, higher_is_better, log_y, key_label=None
):
    """Time-to-target table against the best of ``target_labels``' runs:
    Markdown, JSON, CSV and plots under ``benchmarks/results/``."""
    best, target, table = report_time_to_target(
        results, key, target_labels, higher_is_better=higher_is_better
    )
    command = "python benchmarks/run.py " + " ".join(sys.argv[1:])
    md = markdown(
        f"{title} (batch {args.batch}, {args.budget:g} s each)",
        command,
        best,
        target,
        key_label or key,
        table,
        adam_step_ms(results),
    )
    summary = {"suite": args.suite, "batch": args.batch, "budget": args.budget}
    write_results(
        name,
        dict(summary, target=target, table=table),
        results,
        y_key=key,
        y_label=y_label,
        log_y=log_y,
    )
    with open(os.path.join(RESULTS, name + ".md"), "w") as f:
        f.write(md)
    print(md)


def suite_convnet(args):
    build, data, evaluate = fashion_mnist_task(args, convnet, train_size=4000)
    methods = [m for m in args.methods if m in ("kfac", "ekfac", "tengrad")]
    runs = dict(kfac_runs(methods, args.kfac))
    runs.update(first_order_runs([3e-4, 1e-3, 3e-3], [0.01, 0.03, 0.1]))
    runs = select(runs, args.optimizers)
    results = run_suite("convnet", runs, build, data, args, evaluate, "test_accuracy")
    name = f"convnet_batch{args.batch}" + args.tag + ("_quick" if args.quick else "")
    report(
        args,
        name,
        "Fashion-MNIST convnet",
        results,
        "test_accuracy",
        "adam",
        "test accuracy",
        higher_is_better=True,
        log_y=False,
    )


def suite_sequence(args, name, title, build, data, evaluate, y_label):
    """A Transformer suite: KFAC() against Adam, AdamW and Muon, on the
    training loss."""
    runs = dict(kfac_runs([m for m in args.methods if m in ("kfac", "ekfac")], args.kfac))
    runs.update(transformer_baselines([3e-4, 1e-3, 3e-3]))
    runs = select(runs, args.optimizers)
    results = run_suite(name, runs, build, data, args, evaluate, "train_loss")
    name = name + args.tag + ("_quick" if args.quick else "")
    report(
        args,
        name,
        title,
        results,
        "train_loss",
        ("adam", "muon"),
        y_label,
        higher_is_better=False,
        log_y=True,
    )


def suite_vit(args):
    build, data, evaluate = fashion_mnist_task(args, vit, train_size=2000)
    suite_sequence(
        args,
        f"vit_batch{args.batch}",
        "Fashion-MNIST ViT",
        build,
        data,
        evaluate,
        "train loss (cross-entropy)",
    )


def charlm_task(args, probe_size=4000, test_size=None, length=64):
    """Character-level LM on the fortunes text: ``(build, data, evaluate)``
    for :func:`run_suite` (per-character loss on a training probe and on the
    held-out text)."""
    (x, y), (xt, yt), vocab = fortunes_sequences(length)
    if args.quick:
        x, y, xt, yt = x[:1000], y[:1000], xt[:200], yt[:200]
    probe = (x[:probe_size], y[:probe_size])
    xt, yt = xt[:test_size], yt[:test_size]

    def build(seed=0):
        return char_lm(vocab, length, seed)

    build.compile_kwargs = {"loss": keras.losses.SparseCategoricalCrossentropy(from_logits=True)}

    def evaluate(model):
        return {
            "train_loss": model.evaluate(*probe, batch_size=500, verbose=0),
            "test_loss": model.evaluate(xt, yt, batch_size=500, verbose=0),
        }

    return build, (x, y), evaluate


def suite_charlm(args):
    build, data, evaluate = charlm_task(args)
    suite_sequence(
        args,
        f"charlm_batch{args.batch}",
        "Character-level Transformer LM (fortunes)",
        build,
        data,
        evaluate,
        "train loss (nats/char)",
    )


def optimizer_state_floats(opt, model):
    weights = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    state = sum(int(np.prod(v.shape)) for v in opt.variables)
    return state, weights


def write_table(name, batch, rows, lines):
    """``results/<name>.md`` (the table ``lines``) and ``<name>.json`` (the rows)."""
    md = "\n".join(lines) + "\n"
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, name + ".json"), "w") as f:
        json.dump({"batch": batch, "machine": machine(), "rows": rows}, f, indent=1)
    with open(os.path.join(RESULTS, name + ".md"), "w") as f:
        f.write(md)
    print(md)


def suite_overhead(args):
    x, _ = datasets.load_numpy("mnist", "train", data_dir=args.data_dir)
    x = x.reshape(len(x), -1)
    steps = 6 if args.quick else args.steps
    needed = args.batch * (steps + 1)
    x = np.concatenate([x] * -(-needed // len(x)))[:needed]  # repeat MNIST for long runs
    peer_cadence = dict(
        adaptive_step=True, damping=1.0, stats_every=1, stats_decay=0.95, inverse_every=5
    )
    configs = [
        ("adam lr=0.001", lambda: keras.optimizers.Adam(1e-3)),
        ("kfac (defaults)", lambda: keras_kfac.KFAC()),
        # What the quadratic model costs: fixed damping has none, the whole
        # batch was the default before quadratic_model_batch_size.
        ("kfac fixed damping", lambda: keras_kfac.KFAC(damping_adaptation_interval=0)),
        (
            "kfac whole-batch quadratic model",
            lambda: keras_kfac.KFAC(quadratic_model_batch_size=None),
        ),
    ]
    for size in (64, 250, None):
        configs.append(
            (
                f"kfac adaptive peer cadence quadratic_model_batch_size={size}",
                lambda s=size: keras_kfac.KFAC(quadratic_model_batch_size=s, **peer_cadence),
            )
        )
    for stats_every in (1, 10):
        for inverse_every in (20, 100):
            configs.append(
                (
                    f"kfac stats_every={stats_every} inverse_every={inverse_every}",
                    lambda s=stats_every, i=inverse_every: keras_kfac.KFAC(
                        stats_every=s, inverse_every=i
                    ),
                )
            )
    for method in args.methods:
        if method != "kfac":
            configs.append((f"{method} (defaults)", lambda m=method: keras_kfac.KFAC(curvature=m)))
    configs = [c for c in configs if not args.optimizers or any(p in c[0] for p in args.optimizers)]
    models, optimizers = {}, {}
    for label, make in configs:
        optimizers[label] = make()
        models[label] = autoencoder("sigmoid")
        models[label].compile(optimizer=optimizers[label], loss=make_loss())
    rounds = 1 if args.quick else 4
    timing = interleaved_step_ms(models, x, args.batch, rounds, steps // rounds)
    rows = []
    for label, model in models.items():
        state, weights = optimizer_state_floats(optimizers[label], model)
        mean, median, load, _ = timing[label]
        rows.append(
            {
                "run": label,
                "median_step_ms": median,
                "mean_step_ms": mean,
                "state_floats": state,
                "weights": weights,
                "load": load,
            }
        )
    adam = rows[0]["mean_step_ms"]
    name = f"overhead_autoencoder_batch{args.batch}" + args.tag + ("_quick" if args.quick else "")
    lines = [
        f"### Step overhead, MNIST autoencoder, batch {args.batch}",
        "",
        f"`python benchmarks/run.py {' '.join(sys.argv[1:])}` on {machine()}; {steps} steps "
        f"after the compiled one, in {rounds} rounds in which the optimizers take turns "
        "(amortized = mean, including statistics and refresh steps; load: the 1-minute load "
        "average over the optimizer's rounds).",
        "",
        "| optimizer | ms/step median | ms/step amortized | x Adam (amortized) "
        "| optimizer state / model size | load (1 min) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        row["ratio_to_adam"] = row["mean_step_ms"] / adam
        lines.append(
            f"| {row['run']} | {row['median_step_ms']:.0f} | {row['mean_step_ms']:.0f} | "
            f"{row['ratio_to_adam']:.2f} | {row['state_floats'] / row['weights']:.2f} | "
            f"{row['load'][0]:.1f}-{row['load'][1]:.1f} |"
        )
    write_table(name, args.batch, rows, lines)


def suite_panel(args):
    import panel  # imports this module's models and tasks, hence not at the top

    panel.run_panel(args)


def interleaved_step_ms(models, x, batch, rounds, steps):
    """Per model, ``(mean, median, [min, max] load, first step s)`` of its
    ms/step over
    ``rounds`` fits of ``steps`` steps each, the models taking turns (so
    that a change of the machine's load hits them alike); one compiling
    step first, untimed. Means amortize the statistics and refresh steps."""
    times = {label: [] for label in models}
    loads = {label: [] for label in models}
    compile_s = {}
    for label, model in models.items():
        start = time.perf_counter()
        model.fit(x[:batch], x[:batch], batch_size=batch, epochs=1, verbose=0)
        compile_s[label] = time.perf_counter() - start
    for r in range(rounds):
        chunk = x[(r * steps + 1) * batch : ((r + 1) * steps + 1) * batch]
        for label, model in models.items():
            logger = BudgetLogger(1e9, 1e9, lambda: {})
            loads[label].append(os.getloadavg()[0])
            model.fit(
                chunk,
                chunk,
                batch_size=batch,
                epochs=1,
                shuffle=False,
                verbose=0,
                callbacks=[logger],
            )
            loads[label].append(os.getloadavg()[0])
            times[label] += [logger.first_step_seconds] + logger.step_times
    return {
        label: (
            1000 * statistics.mean(t),
            1000 * statistics.median(t),
            [min(loads[label]), max(loads[label])],
            compile_s[label],
        )
        for label, t in times.items()
    }


def suite_xla(args):
    """Every method's step compiled by XLA (``jit_compile=True``, what Keras
    runs on a GPU/TPU) against the graph step, on CPU. The full-width
    autoencoder for Adam and the default KFAC; every method on the
    quarter-width one (XLA's CPU eigh takes ~27 s on a 1000 x 1000 factor,
    which the eigenbasis methods refresh)."""
    x, _ = datasets.load_numpy("mnist", "train", data_dir=args.data_dir)
    x = x.reshape(len(x), -1)
    rounds, steps = (1, 2) if args.quick else (4, 5)
    needed = args.batch * (rounds * steps + 1)
    x = np.concatenate([x] * -(-needed // len(x)))[:needed]
    runs = [(1.0, "adam lr=0.001", lambda: keras.optimizers.Adam(1e-3))]
    runs.append((1.0, "kfac (defaults)", lambda: keras_kfac.KFAC()))
    methods = ["kfac"] if args.quick else ALL_METHODS
    for method in methods:
        runs.append((0.25, f"{method}", lambda m=method: keras_kfac.KFAC(curvature=m)))
    if args.quick:
        runs = [(0.25 if w == 1.0 else w, label, make) for w, label, make in runs]
    runs = [r for r in runs if not args.optimizers or any(p in r[1] for p in args.optimizers)]

    def write():
        name = f"xla_batch{args.batch}" + args.tag + ("_quick" if args.quick else "")
        lines = [
            f"### XLA against graph steps on CPU, MNIST autoencoder, batch {args.batch}",
            "",
            f"`python benchmarks/run.py {' '.join(sys.argv[1:])}` on {machine()}; "
            f"{rounds} x {steps} steps per mode after the compiled one, graph and XLA taking turns "
            "(amortized: mean over statistics and refresh steps). Width x0.25: hidden widths "
            "250-125-62-30 mirrored.",
            "",
            "| optimizer | width | graph ms/step | XLA ms/step | XLA / graph "
            "| first step s (trace, compile): graph / XLA | load (1 min) |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for row in rows:
            lines.append(
                f"| {row['run']} | x{row['width']:g} | {row['graph_ms']:.0f} | {row['xla_ms']:.0f} | "
                f"{row['xla_ms'] / row['graph_ms']:.2f} | {row['graph_first_step_s']:.0f} / "
                f"{row['xla_first_step_s']:.0f} | {row['load'][0]:.1f}-{row['load'][1]:.1f} |"
            )
        write_table(name, args.batch, rows, lines)

    rows = []
    for width, label, make in runs:
        load_before = os.getloadavg()[0]
        models = {}
        for jit in (False, True):
            model = autoencoder("sigmoid", width=width)
            model.compile(optimizer=make(), loss=make_loss(), jit_compile=jit)
            models["xla" if jit else "graph"] = model
        timing = interleaved_step_ms(models, x, args.batch, rounds, steps)
        ms = {mode: timing[mode][0] for mode in timing}
        row = {
            "run": label,
            "width": width,
            "graph_ms": ms["graph"],
            "xla_ms": ms["xla"],
            "graph_first_step_s": timing["graph"][3],
            "xla_first_step_s": timing["xla"][3],
            "load": [load_before, os.getloadavg()[0]],
        }
        rows.append(row)
        print(
            f"{label:<24} width x{width:<5} graph {ms['graph']:8.1f}  xla {ms['xla']:8.1f} ms/step"
            f"  load {row['load'][0]:.1f}-{row['load'][1]:.1f}",
            flush=True,
        )
        write()  # after every row: a long run leaves a partial table


SUITES = {
    "autoencoder": suite_autoencoder,
    "convnet": suite_convnet,
    "overhead": suite_overhead,
    "xla": suite_xla,
    "vit": suite_vit,
    "charlm": suite_charlm,
    "panel": suite_panel,
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suite", choices=sorted(SUITES))
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        help="default: 1000 (autoencoder, overhead), 128 (convnet, vit, charlm, xla)",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="training seconds per optimizer (default 60; the panel: per task)",
    )
    parser.add_argument(
        "--eval-every", type=float, default=None, help="seconds of training between evaluations"
    )
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument(
        "--steps",
        type=int,
        default=40,
        help="overhead suite: timed steps (a multiple of 20 amortizes the default cadence exactly)",
    )
    parser.add_argument("--relu", action="store_true", help="autoencoder: ReLU hidden units")
    parser.add_argument(
        "--methods",
        nargs="*",
        default=["kfac"],
        help=f"curvature methods to add; 'all' = {ALL_METHODS}",
    )
    parser.add_argument(
        "--optimizers", nargs="*", default=None, help="only runs whose label contains one of these"
    )
    parser.add_argument(
        "--kfac",
        action="append",
        default=[],
        metavar="JSON",
        help='extra KFAC run, e.g. --kfac \'{"learning_rate": 0.3, "damping": 0.01}\' (repeatable)',
    )
    parser.add_argument(
        "--adaptive-damping", type=float, default=0.1, help="initial damping of the adaptive run"
    )
    parser.add_argument(
        "--tag", default="", help="suffix of the result files' names, e.g. _methods"
    )
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--quick", action="store_true", help="smoke mode: tiny data, 2 s budgets")
    parser.add_argument(
        "--tasks", default="", help="panel: comma-separated tasks (merged into the results file)"
    )
    parser.add_argument(
        "--kfac-config",
        default="{}",
        metavar="JSON",
        help="panel: keyword arguments of the KFAC run, e.g. '{\"damping\": 0.1}'",
    )
    parser.add_argument("--seeds", type=int, default=3, help="panel: seeds of the headline rows")
    parser.add_argument(
        "--kfac-only",
        action="store_true",
        help="panel: rerun only the KFAC runs; the first-order runs come from the task's "
        "stored results (benchmarks/results/panel_<task>.json)",
    )
    args = parser.parse_args(argv)
    if args.suite == "panel":  # batch, budget and evaluation cadence are per task
        SUITES["panel"](args)
        return
    args.kfac = {f"kfac {spec}": json.loads(spec) for spec in args.kfac}
    if args.methods == ["all"]:
        args.methods = ALL_METHODS
    if args.batch is None:
        args.batch = 128 if args.suite in ("convnet", "vit", "charlm", "xla") else 1000
    if args.budget is None:
        args.budget = 60.0
    if args.quick:
        args.budget = min(args.budget, 2.0)
        args.batch = min(args.batch, 500)
        if args.optimizers is None:
            args.optimizers = ["kfac (defaults)", "adam lr=0.001"]
    if args.eval_every is None:
        args.eval_every = max(args.budget / 20, 0.5)
    SUITES[args.suite](args)


if __name__ == "__main__":
    main()
