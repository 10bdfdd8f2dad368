"""The benchmark panel of issue 14: ``keras_kfac.KFAC()`` against tuned
first-order optimizers on nine tasks, in one command.

    python benchmarks/run.py panel                          # every task, ~35 min on 2 quiet cores
    python benchmarks/run.py panel --tasks ae_relu,mlp      # a subset, merged into the results
    python benchmarks/run.py panel --budget 60              # one budget (s) for every task
    python benchmarks/run.py panel --kfac-config '{"damping": 0.1}'   # another KFAC setting
    python benchmarks/run.py panel --quick                  # smoke mode, well under a minute a task

Per task, from the same initial weights on the same batches (seed 0): Adam and
AdamW (weight decay 1e-2) at learning rates 3e-4, 1e-3 and 3e-3, Muon
(Newton-Schulz orthogonalized momentum on 2-D kernels, AdamW on the rest,
Keras's other defaults) at 1e-3 and 3e-3, SGD
with Nesterov momentum 0.9 at two learning rates, and ``KFAC(**config)``
(``KFAC()`` unless ``--kfac-config``). The best first-order configuration (the
lowest final target metric at seed 0) and KFAC then run seeds 1..N-1,
interleaved so that a change of load hits both.

Target: the median over the best first-order configuration's seeds of its
final metric. Every run's time (and steps) to target is its first evaluation
at or below it; the headline ratio is KFAC's median time to target over the
best first-order configuration's (a run that never reaches it counts as
infinitely slow). Step ratios divide amortized step times (wall and process
CPU) by the median of the Adam runs'. Files: ``results/panel[_quick].md`` and
``.json`` (every task run so far), and ``panel[_quick]_<task>.json/.csv/
_time.png/_steps.png`` (every run's evaluations).
"""

import dataclasses
import json
import math
import os
import statistics
import sys

import keras
from harness import RESULTS, first_reaching, machine, write_results
from run import (
    autoencoder_task,
    charlm_task,
    convnet,
    fashion_mnist_task,
    first_order_runs,
    select,
    train,
    transformer_baselines,
    vit,
)

import keras_kfac

ADAM_LRS = (3e-4, 1e-3, 3e-3)
ADAMW_WEIGHT_DECAY = 1e-2
MUON_LRS = (1e-3, 3e-3)


# --- models (the others are run.py's) -------------------------------------------


def mlp(seed=0):
    """The plainest Keras classifier (the issue's MNIST MLP)."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(256, activation="relu"),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(10),
        ]
    )


def resnet(seed=0, widths=(16, 32, 64)):
    """A small ResNet: a Conv-BN-ReLU stem, one residual block per width
    (two 3x3 Conv-BN, stride 2 and a 1x1 Conv-BN projection when the width changes),
    global average pooling."""
    keras.utils.set_random_seed(seed)
    layers = keras.layers

    def conv_bn(x, width, size=3, strides=1):
        x = layers.Conv2D(width, size, strides=strides, padding="same", use_bias=False)(x)
        # Momentum 0.9 (not Keras's 0.99): the evaluations run in inference
        # mode, and with 0.99 the moving statistics would lag a run of a few
        # hundred steps, hiding its progress.
        return layers.BatchNormalization(momentum=0.9)(x)

    inputs = keras.Input((28, 28, 1))
    x = layers.ReLU()(conv_bn(inputs, widths[0]))
    for i, width in enumerate(widths):
        strides = 1 if i == 0 else 2
        h = layers.ReLU()(conv_bn(x, width, strides=strides))
        h = conv_bn(h, width)
        shortcut = x if strides == 1 else conv_bn(x, width, size=1, strides=strides)
        x = layers.ReLU()(layers.Add()([h, shortcut]))
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(10)(x))


# --- tasks ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Task:
    title: str
    batch: int
    budget: float  # default training seconds per run
    key: str  # the target metric, lower is better
    key_label: str
    make: object  # args -> (build, data, evaluate), as run.py's tasks
    sgd_lrs: tuple
    bound: float = 0.5  # issue 14: KFAC's time to target within this share of the best's


def _classifier(model_fn, dataset="fashion_mnist", probe=5000, test=5000):
    return lambda args: fashion_mnist_task(
        args, model_fn, train_size=2000, probe_size=probe, test_size=test, dataset=dataset
    )


def _autoencoder(activation):
    return lambda args: autoencoder_task(args, activation, probe_size=5000, test_size=2000)


# Budgets: the whole panel (15 runs a task at 3 seeds) in about 35 minutes on
# two quiet cores, long enough for Adam to leave the sigmoid autoencoder's
# plateau. Held-out loss where overfitting is the question (the MLP, the
# language model), training loss on a fixed probe of the training set (the
# optimization speed) elsewhere.
AE_LABEL = "train loss (summed BCE/image, 5k training images)"
TASKS = {
    "mlp": Task(
        "MNIST MLP 784-256-256-10, ReLU, Dropout 0.5",
        128,
        8,
        "test_loss",
        "held-out loss (cross-entropy, 10k test images)",
        _classifier(mlp, "mnist", test=None),
        (0.03, 0.1),
    ),
    "ae_sigmoid": Task(
        "MNIST autoencoder, sigmoid",
        1000,
        20,
        "train_loss",
        AE_LABEL,
        _autoencoder("sigmoid"),
        (1.0, 3.0),
        bound=0.25,
    ),
    "ae_relu": Task(
        "MNIST autoencoder, ReLU",
        1000,
        20,
        "train_loss",
        AE_LABEL,
        _autoencoder("relu"),
        (0.3, 1.0),
        bound=0.25,
    ),
    "ae_tanh": Task(
        "MNIST autoencoder, tanh (kfac-jax's example)",
        1000,
        20,
        "train_loss",
        AE_LABEL,
        _autoencoder("tanh"),
        (0.3, 1.0),
    ),
    "convnet128": Task(
        "Fashion-MNIST convnet (Suite 2)",
        128,
        8,
        "train_loss",
        "train loss (cross-entropy, 5k training images)",
        _classifier(convnet),
        (0.03, 0.1),
    ),
    "convnet512": Task(
        "Fashion-MNIST convnet (Suite 2)",
        512,
        10,
        "train_loss",
        "train loss (cross-entropy, 5k training images)",
        _classifier(convnet),
        (0.03, 0.1),
    ),
    "resnet": Task(
        "Fashion-MNIST BatchNorm ResNet (3 residual blocks)",
        128,
        12,
        "train_loss",
        "train loss (cross-entropy, 2k training images)",
        _classifier(resnet, probe=2000, test=1000),
        (0.03, 0.1),
    ),
    "vit": Task(
        "Fashion-MNIST ViT (2 layers, width 64)",
        128,
        8,
        "train_loss",
        "train loss (cross-entropy, 5k training images)",
        _classifier(vit, test=2000),
        (0.01, 0.03),
    ),
    "charlm": Task(
        "Character-level Transformer LM (fortunes)",
        128,
        20,
        "test_loss",
        "held-out loss (nats/char, 1k windows of 64)",
        lambda args: charlm_task(args, probe_size=1000, test_size=1000),
        (0.03, 0.1),
    ),
}


def parse_tasks(spec):
    names = [n.strip() for n in spec.split(",") if n.strip()] or list(TASKS)
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        sys.exit(f"unknown panel task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
    return names


def parse_kfac_config(spec):
    try:
        config = json.loads(spec)
    except json.JSONDecodeError as e:
        sys.exit(f"--kfac-config is not JSON ({e}); e.g. --kfac-config '{{\"damping\": 0.1}}'")
    if not isinstance(config, dict):
        sys.exit("--kfac-config must be a JSON object of KFAC keyword arguments")
    try:  # a bad keyword or value fails here, before any training
        keras_kfac.KFAC(**config)
    except (TypeError, ValueError) as e:
        sys.exit(f"--kfac-config: KFAC(**{config}) fails ({e}); see help(keras_kfac.KFAC)")
    return config


def kfac_label(config):
    return "kfac" if not config else "kfac " + json.dumps(config, sort_keys=True)


def baselines(task, quick):
    runs = transformer_baselines(ADAM_LRS, weight_decay=ADAMW_WEIGHT_DECAY)
    # Keras's Muon scales its orthogonalized step to Adam's RMS (Moonlight), so
    # Adam's learning rates apply; its default 1e-3 alone is no tuned baseline.
    runs.pop("muon (defaults)")
    for lr in MUON_LRS:
        runs[f"muon lr={lr:g}"] = (lambda lr=lr: keras.optimizers.Muon(lr), [])
    runs.update(first_order_runs([], task.sgd_lrs))
    if quick:  # one configuration per family
        runs = select(
            runs, ["adam lr=0.001", "muon lr=0.001", f"sgd nesterov lr={task.sgd_lrs[0]:g}"]
        )
    return {label: make for label, (make, _) in runs.items()}


# --- running --------------------------------------------------------------------


def stored_first_order(stem, budget, batch):
    """The first-order runs of a task's stored results, ``{label: {seed: run}}``,
    so that a KFAC change is measured against the same baselines without
    rerunning them (the table records when each run was measured: its load)."""
    if not os.path.exists(stem + ".json"):
        sys.exit(f"--kfac-only: {stem}.json does not exist; run the task once without it")
    with open(stem + ".json") as f:
        stored = json.load(f)
    if (stored["budget"], stored["batch"]) != (budget, batch):
        sys.exit(
            f"--kfac-only: {stem}.json was measured at budget {stored['budget']:g} s, batch "
            f"{stored['batch']}, not {budget:g} s, {batch}; rerun the task without --kfac-only"
        )
    runs = {}
    for flat_label, run in stored["runs"].items():
        label, seed = flat_label.rsplit(" seed=", 1)
        if not label.startswith("kfac"):
            runs.setdefault(label, {})[int(seed)] = run
    return runs


def run_task(name, task, args, kfac_config, stem):
    budget = task.budget if args.budget is None else args.budget
    batch = task.batch
    if args.quick:
        budget, batch = min(budget, 1.5), min(batch, 500)
    eval_every = args.eval_every or max(budget / 15, 0.25)
    build, (x, y), evaluate = task.make(args)
    kfac = kfac_label(kfac_config)
    first_order = baselines(task, args.quick)
    makers = dict(first_order, **{kfac: lambda: keras_kfac.KFAC(**kfac_config)})
    if args.optimizers:
        makers = select(makers, args.optimizers + [kfac])
    runs = {}  # label -> {seed: summary with rows}
    if args.kfac_only:
        runs = stored_first_order(stem, budget, batch)
        makers = {kfac: makers[kfac]}

    def one(label, seed):
        logger = train(
            build, makers[label], [], x, y, batch, budget, eval_every, evaluate, seed=seed
        )
        run = dict(logger.summary(), rows=logger.rows)
        runs.setdefault(label, {})[seed] = run
        print(
            f"  {label:<32} seed={seed} steps={run['steps']:5d} "
            f"{run['mean_step_ms']:7.1f} ms/step ({run['mean_step_cpu_ms']:7.1f} CPU) "
            f"{task.key}={run['final'][task.key]:.4g} load={run['load_begin']:.1f}",
            flush=True,
        )

    print(f"{name}: {task.title}, batch {batch}, {budget:g} s per run", flush=True)
    for label in makers:
        one(label, 0)
    best = best_first_order(runs, task.key)
    for seed in range(1, 1 if args.quick else args.seeds):
        for label in (kfac, best):
            if label in makers and seed not in runs[label]:
                one(label, seed)
    return dict(
        summarize(task, runs, kfac, best), title=task.title, batch=batch, budget=budget
    ), runs


def _finite(v):
    return v is not None and math.isfinite(v)


def best_first_order(runs, key):
    finals = {
        label: seeds[0]["final"][key]
        for label, seeds in runs.items()
        if not label.startswith("kfac") and _finite(seeds[0]["final"][key])
    }
    return min(finals, key=finals.get) if finals else None


def _median(values):
    """Median with None for a run that never got there (infinitely late)."""
    values = [math.inf if v is None else v for v in values]
    m = statistics.median(values) if values else math.inf
    return None if math.isinf(m) else m


def _spread(values):
    finite = [v for v in values if _finite(v)]
    return [min(finite), max(finite)] if finite else None


def value_at_step(rows, key, step):
    """``key`` at ``step``, linear between the logged rows that bracket it
    (None past the run's last row: it never took that many steps)."""
    for before, after in zip(rows, rows[1:]):
        if before["step"] <= step <= after["step"]:
            if after["step"] == before["step"]:
                return after[key]
            w = (step - before["step"]) / (after["step"] - before["step"])
            return before[key] + w * (after[key] - before[key])
    return rows[-1][key] if rows and rows[-1]["step"] == step else None


def per_step_comparison(runs, key, kfac, best):
    """Median over KFAC's seeds of (KFAC's final, the best configuration's
    value after as many steps as KFAC took), each seed against the best's run
    of the same seed (seed 0 where it has no such seed). It tells a miss by
    step cost (KFAC ahead at equal steps) from one by progress per step."""
    pairs = []
    for seed, run in runs.get(kfac, {}).items():
        reference = runs[best].get(seed, runs[best][0])
        at = value_at_step(reference["rows"], key, run["steps"])
        if at is not None and _finite(run["final"][key]):
            pairs.append((run["final"][key], at))
    if not pairs:
        return None
    return {
        "steps": statistics.median(runs[kfac][s]["steps"] for s in runs[kfac]),
        "kfac": statistics.median(p[0] for p in pairs),
        "best": statistics.median(p[1] for p in pairs),
    }


def summarize(task, runs, kfac, best):
    """The task's row and every run's time/steps/CPU to target."""
    key = task.key
    target = statistics.median(r["final"][key] for r in runs[best].values()) if best else None
    table = []
    for label, seeds in runs.items():
        for seed, run in seeds.items():
            row = None if target is None else first_reaching(run["rows"], key, target)
            table.append(
                {
                    "run": label,
                    "seed": seed,
                    "final": run["final"][key],
                    "steps": run["steps"],
                    "median_step_ms": run["median_step_ms"],
                    "mean_step_ms": run["mean_step_ms"],
                    "mean_step_cpu_ms": run["mean_step_cpu_ms"],
                    "load": [run["load_begin"], run["load_end"]],
                    "seconds_to_target": None if row is None else row["seconds"],
                    "cpu_seconds_to_target": None if row is None else row["cpu_seconds"],
                    "steps_to_target": None if row is None else row["step"],
                }
            )
    adam = [r for r in table if r["run"].startswith("adam lr")]

    def headline(label):
        rows = [r for r in table if r["run"] == label]
        if not rows:
            return None
        out = {
            "seeds": len(rows),
            "final_median": statistics.median(r["final"] for r in rows),
            "final_spread": _spread([r["final"] for r in rows]),
            "diverged": sum(not _finite(r["final"]) for r in rows),
        }
        for k in ("seconds_to_target", "cpu_seconds_to_target", "steps_to_target"):
            out[k] = _median([r[k] for r in rows])
        for k in ("median_step_ms", "mean_step_ms", "mean_step_cpu_ms"):
            out[k] = statistics.median(r[k] for r in rows)
        if adam:
            out["step_ratio_to_adam"] = out["mean_step_ms"] / statistics.median(
                r["mean_step_ms"] for r in adam
            )
            out["cpu_step_ratio_to_adam"] = out["mean_step_cpu_ms"] / statistics.median(
                r["mean_step_cpu_ms"] for r in adam
            )
        return out

    k, b = headline(kfac), headline(best) if best else None
    ratio = cpu_ratio = None
    if k and b and k["seconds_to_target"] is not None and b["seconds_to_target"]:
        ratio = k["seconds_to_target"] / b["seconds_to_target"]
        cpu_ratio = k["cpu_seconds_to_target"] / b["cpu_seconds_to_target"]
    equal_steps = per_step_comparison(runs, key, kfac, best) if k and b else None
    return {
        "key": key,
        "key_label": task.key_label,
        "bound": task.bound,
        "best": best,
        "target": target,
        "kfac_label": kfac,
        "kfac": k,
        "best_first_order": b,
        "time_ratio": ratio,
        "cpu_time_ratio": cpu_ratio,
        "at_kfac_steps": equal_steps,
        "verdict": verdict(k, b, ratio, task.bound, equal_steps),
        "table": table,
        "load": [min(r["load"][0] for r in table), max(r["load"][1] for r in table)],
    }


def verdict(kfac, best, ratio, bound, equal_steps):
    if kfac is None or best is None:
        return "no verdict (KFAC or first-order runs missing)"
    if kfac["diverged"] and not best["diverged"]:
        return f"misses: KFAC diverged ({kfac['diverged']} of {kfac['seeds']} seeds)"
    if ratio is not None and ratio <= bound:
        return f"meets (<= {bound:g})"
    missed = "misses: KFAC does not reach the target" if ratio is None else f"misses (<= {bound:g})"
    if equal_steps is None:
        return missed
    if equal_steps["kfac"] <= equal_steps["best"]:
        return missed + "; ahead at equal steps: the step cost stops it"
    return missed + "; behind at equal steps: progress per step stops it"


# --- report ---------------------------------------------------------------------


def _f(v, fmt=".3g", none="-"):
    return none if v is None else format(v, fmt)


def _final(h):
    s = _f(h["final_median"], ".4g")
    if h["seeds"] > 1 and h["final_spread"]:
        lo, hi = h["final_spread"]
        s += f" [{lo:.4g}-{hi:.4g}]"
    return s


def markdown(results, command, kfac_config, quick):
    lines = [
        "### Benchmark panel" + (" (quick smoke run)" if quick else ""),
        "",
        f"`{command}` (the latest run; `--tasks` merges) on {machine()}; KFAC run: "
        f"`keras_kfac.KFAC({', '.join(f'{k}={v!r}' for k, v in kfac_config.items())})`.",
        "",
        "Target: the best first-order run's median final metric. Ratio: KFAC's median time to "
        "target over the best first-order configuration's (wall; process CPU in parentheses). "
        "Finals: median [min-max] over seeds. At KFAC's steps: KFAC's final and the best "
        "configuration's value after as many steps (medians; the step count in parentheses): "
        "ahead at equal steps, KFAC misses by its step cost, behind, by its progress per step. "
        "Step ratio: amortized step time over Adam's (wall / CPU). Load: 1-minute load average "
        "during the task.",
        "",
    ]
    labels = {name: r["kfac_label"] for name, r in results.items()}
    if len(set(labels.values())) > 1:  # --tasks merged runs of different settings
        lines += [
            "KFAC settings differ between tasks: "
            + "; ".join(f"{name}: `{label}`" for name, label in labels.items())
            + ".",
            "",
        ]
    lines += [
        "| task | metric | budget (s) | best first-order | its final | KFAC final "
        "| time ratio (CPU) | steps to target KFAC / best | at KFAC's steps: KFAC / best "
        "| step ratio | load | verdict |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name in TASKS:
        if name not in results:
            continue
        r = results[name]
        k, b = r["kfac"], r["best_first_order"]
        ratio = "-" if r["time_ratio"] is None else f"{r['time_ratio']:.2f}"
        if r["cpu_time_ratio"] is not None:
            ratio += f" ({r['cpu_time_ratio']:.2f})"
        steps = f"{_f(k and k['steps_to_target'], 'd')} / {_f(b and b['steps_to_target'], 'd')}"
        step_ratio = (
            f"{k['step_ratio_to_adam']:.2f} / {k['cpu_step_ratio_to_adam']:.2f}"
            if k and "step_ratio_to_adam" in k
            else "-"
        )
        equal = r.get("at_kfac_steps")
        at_steps = (
            f"{equal['kfac']:.4g} / {equal['best']:.4g} ({equal['steps']:.0f})" if equal else "-"
        )
        lines.append(
            f"| {name} | {r['key_label']} | {r['budget']:g} | {r['best'] or '-'} "
            f"| {_final(b) if b else '-'} | {_final(k) if k else '-'} | {ratio} | {steps} "
            f"| {at_steps} | {step_ratio} | {r['load'][0]:.1f}-{r['load'][1]:.1f} "
            f"| {r['verdict']} |"
        )
    for name in TASKS:
        if name not in results:
            continue
        r = results[name]
        lines += [
            "",
            f"#### {name}: {r['title']}, batch {r['batch']}, {r['budget']:g} s per run",
            "",
            f"Target: {r['best']}'s median final {r['key_label']} = {_f(r['target'], '.4g')}. "
            f"Plots: `panel{r['suffix']}_{name}_time.png`, `_steps.png`."
            + (
                " First-order runs: stored from an earlier run of the task (`--kfac-only`)."
                if r.get("first_order") == "stored"
                else ""
            ),
            "",
            "| run | seed | final | steps | ms/step median | ms/step amortized (CPU) "
            "| time to target (s, CPU s) | steps to target |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in r["table"]:
            t = "-"
            if row["seconds_to_target"] is not None:
                t = f"{row['seconds_to_target']:.1f} ({row['cpu_seconds_to_target']:.1f})"
            lines.append(
                f"| {row['run']} | {row['seed']} | {row['final']:.4g} | {row['steps']} "
                f"| {row['median_step_ms']:.0f} | {row['mean_step_ms']:.0f} "
                f"({row['mean_step_cpu_ms']:.0f}) | {t} | {_f(row['steps_to_target'], 'd')} |"
            )
    return "\n".join(lines) + "\n"


def line_styles(labels, kfac, best):
    """KFAC's seeds in black, the best first-order configuration's in red,
    the rest thin, each its own color (the default cycle repeats after 10)."""
    import matplotlib

    colors = matplotlib.colormaps["tab20"].colors
    styles = {}
    for i, label in enumerate(labels):
        run = label.rsplit(" seed=", 1)[0]
        if run == kfac:
            styles[label] = {"color": "black", "linewidth": 2.2}
        elif run == best:
            styles[label] = {"color": "tab:red", "linewidth": 2.0}
        else:
            styles[label] = {"color": colors[i % len(colors)], "linewidth": 1.0, "alpha": 0.8}
    return styles


def write_task(stem, name, task, summary, runs):
    """One task's JSON, CSV and plots (every run's evaluations)."""
    flat = {f"{label} seed={s}": run for label, seeds in runs.items() for s, run in seeds.items()}
    try:
        styles = line_styles(flat, summary["kfac_label"], summary["best"])
    except ImportError:  # write_results says how to get the plots
        styles = None
    write_results(
        stem,
        {"task": name, **{k: v for k, v in summary.items() if k != "table"}},
        flat,
        y_key=task.key,
        y_label=task.key_label,
        log_y=True,
        styles=styles,
    )


def run_panel(args):
    names = parse_tasks(args.tasks)
    kfac_config = parse_kfac_config(args.kfac_config)
    suffix = args.tag + ("_quick" if args.quick else "")
    stem = os.path.join(RESULTS, "panel" + suffix)
    command = "python benchmarks/run.py " + " ".join(sys.argv[1:])
    results = {}
    if args.tasks and os.path.exists(stem + ".json"):
        # --tasks updates those tasks' rows of the existing panel.
        with open(stem + ".json") as f:
            results = json.load(f)["tasks"]
    for name in names:
        task = TASKS[name]
        task_stem = os.path.join(RESULTS, f"panel{suffix}_{name}")
        summary, runs = run_task(name, task, args, kfac_config, task_stem)
        summary.update(
            command=command,
            kfac_config=kfac_config,
            suffix=suffix,
            first_order="stored" if args.kfac_only else "run",
        )
        results[name] = summary
        write_task(f"panel{suffix}_{name}", name, task, summary, runs)
        with open(stem + ".json", "w") as f:
            json.dump({"machine": machine(), "tasks": results}, f, indent=1, default=float)
        md = markdown(results, command, kfac_config, args.quick)
        with open(stem + ".md", "w") as f:
            f.write(md)
    print(md)
    return results
