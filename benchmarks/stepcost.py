"""Where a ``KFAC()`` step's time goes on the panel's short-budget tasks
(issue 14), and what the statistics/inverse cadence costs and buys.

    python benchmarks/stepcost.py                     # mlp and ae_relu, ~15 min on 2 busy cores
    python benchmarks/stepcost.py --tasks mlp --steps 400
    python benchmarks/stepcost.py --tasks convnet128,convnet512,mlp --set components
    python benchmarks/stepcost.py --quick             # smoke mode

Every configuration of a task trains its own copy of the same initial
weights on the same batches, in one process, interleaved in rounds of
``--round`` steps (``model.fit`` on the round's slice), so a change of load
hits all of them alike. Each step is timed and classified by the optimizer's
0-based step ``i`` (``train_on_batch``, one batch at a time): statistics (``i % stats_every == 0``), inverse refresh
(``i % inverse_every == 0``), ``rho`` (``(i + 1) % 5 == 0`` with the
Levenberg-Marquardt default), or plain. The first step (tracing and
compilation) is reported apart and left out of the amortized time, as the
panel's clock leaves it out.

Columns: the plain step's median; the extra time per step, amortized, of
each kind of step over a plain one (``(median of that kind - plain median) *
its share of the steps``); the amortized mean; its ratio to the first-order
optimizer's (same process); the task's metric after the steps (progress per
step); the first step in seconds. Results: ``results/stepcost[_quick].md``
and ``.json``.
"""

import argparse
import collections
import glob
import os
import statistics
import sys
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf
from harness import RESULTS, machine, write_tables
from panel import ADAMW_WEIGHT_DECAY, TASKS
from tensorflow.tsl.profiler.protobuf import xplane_pb2

import keras_kfac
from keras_kfac.graph_util import PROFILE_SCOPES

RHO_EVERY = 5  # KFAC's default damping_adaptation_interval

# --set: label -> KFAC keyword arguments; the first-order baseline is the
# panel's best configuration of each task (AdamW).
CONFIG_SETS = {
    "breakdown": {
        "kfac": {},
        "kfac fixed damping": {"damping_adaptation_interval": 0},
    },
    # What each optional piece of the step costs on a plain step: the rho
    # machinery (weight snapshot, tf.cond), the momentum variables. (Without
    # the KL clip the default learning rate diverges, and skipped steps are
    # not steps; --profile times the clip's ops.)
    "components": {
        "kfac": {},
        "kfac fixed damping": {"damping_adaptation_interval": 0},
        "kfac no momentum": {"momentum": 0.0},
    },
    # A/B of the StepMonitor's weight copy, in one process: "copy_weights"
    # runs CopyEveryWeight (every weight copied on every step, as before).
    "snapshot": {
        "kfac": {},
        "kfac copying every weight every step (before)": {"copy_weights": True},
    },
    "trajectory": {
        "kfac": {},
        "kfac stats 5 / inverse 5": {"stats_every": 5, "inverse_every": 5},
        "kfac stats 10 / inverse 20": {"stats_every": 10, "inverse_every": 20},
    },
    "cadence": {
        "kfac stats 10 / inverse 20": {"stats_every": 10, "inverse_every": 20},
        "kfac stats 5 / inverse 10": {"stats_every": 5, "inverse_every": 10},
        "kfac stats 5 / inverse 5": {"stats_every": 5, "inverse_every": 5},
        "kfac stats 2 / inverse 10": {"stats_every": 2, "inverse_every": 10},
        "kfac stats 20 / inverse 40": {"stats_every": 20, "inverse_every": 40},
    },
}
BASELINE_LR = {"mlp": 1e-3, "ae_relu": 3e-3, "convnet128": 3e-3, "convnet512": 3e-3}
DEFAULT_STEPS = {"mlp": 600, "ae_relu": 120, "convnet128": 300, "convnet512": 120}


class CopyEveryWeight(keras_kfac.KFAC):
    """``KFAC`` whose StepMonitor copies every weight on every step (what it
    did before the optimizer restored the step's start on rho steps)."""

    def _restorable(self, variable):
        return False


def make_kfac(config):
    config = dict(config)
    cls = CopyEveryWeight if config.pop("copy_weights", False) else keras_kfac.KFAC
    return cls(**config)


def kind(step, config, cadence):
    """``"plain"`` or the ``+``-joined work this KFAC step does
    (``cadence``: the optimizer's ``(stats_every, inverse_every)``)."""
    if config is None:
        return "plain"
    parts = []
    if step % cadence[0] == 0:
        parts.append("stats")
    if step % cadence[1] == 0:
        parts.append("refresh")
    if config.get("damping_adaptation_interval", RHO_EVERY) and (step + 1) % RHO_EVERY == 0:
        parts.append("rho")
    return "+".join(parts) or "plain"


def breakdown(times, config, cadence):
    """Plain median and amortized extra ms per step of each kind of step
    (``times``: ``(step, seconds)`` of every run; the first steps apart)."""
    timed = [(s, 1000 * t) for s, t in times if s > 0]
    by_kind = {}
    for s, ms in timed:
        by_kind.setdefault(kind(s, config, cadence), []).append(ms)
    plain = statistics.median(by_kind["plain"])
    extra = {
        k: (statistics.median(v) - plain) * len(v) / len(timed)
        for k, v in by_kind.items()
        if k != "plain"
    }
    return {
        "plain_ms": plain,
        "extra_ms": extra,
        "mean_ms": float(np.mean([ms for _, ms in timed])),
        "first_step_s": statistics.median(t for s, t in times if s == 0),
    }


def run_task(name, args):
    task = TASKS[name]
    build, (x, y), evaluate = task.make(args)
    steps = args.steps or DEFAULT_STEPS[name]
    batch = task.batch
    if args.quick:
        steps, batch = min(steps, 30), min(batch, 250)
    lr = BASELINE_LR[name]
    makers = {
        f"adamw lr={lr:g}": (
            lambda: keras.optimizers.AdamW(lr, weight_decay=ADAMW_WEIGHT_DECAY),
            None,
        )
    }
    configs = CONFIG_SETS[args.set] if not args.quick else {"kfac": {}}
    for label, config in configs.items():
        makers[label] = (lambda config=config: make_kfac(config), config)
    times = {label: [] for label in makers}
    cadences = {}
    finals = {label: [] for label in makers}
    # The metric after every round (seed 0): progress per step.
    curves = {label: [] for label in makers}
    loads = [os.getloadavg()[0]]
    for seed in range(args.seeds):
        models = {}
        for label, (make, _) in makers.items():
            models[label] = build(seed)
            models[label].compile(optimizer=make(), **build.compile_kwargs)
        order = np.random.default_rng(seed).permutation(len(x))
        for start in range(0, steps, args.round):
            for label, model in models.items():
                for step in range(start, min(start + args.round, steps)):
                    rows = np.take(order, range(step * batch, (step + 1) * batch), mode="wrap")
                    # Full batches only, through train_on_batch: one traced
                    # function (a model.fit per round would retrace for its
                    # new dataset, a short batch for its shape).
                    begin = time.perf_counter()
                    model.train_on_batch(x[rows], y[rows])
                    times[label].append((step, time.perf_counter() - begin))
            loads.append(os.getloadavg()[0])
            done = min(start + args.round, steps)
            if args.curve and seed == 0:
                for label, model in models.items():
                    curves[label].append((done, float(evaluate(model)[task.key])))
            print(f"  {name} seed {seed}: {done}/{steps} steps, load {loads[-1]:.1f}", flush=True)
        for label, model in models.items():
            finals[label].append(float(evaluate(model)[task.key]))
            cadences[label] = getattr(model.optimizer, "cadence", None)
    results = {}
    for label, (_, config) in makers.items():
        results[label] = dict(
            breakdown(times[label], config, cadences[label]),
            cadence=cadences[label],
            finals=finals[label],
            curve=curves[label],
            final=statistics.median(finals[label]),
            config=config,
        )
    base = results[next(iter(makers))]["mean_ms"]
    for r in results.values():
        r["ratio"] = r["mean_ms"] / base
    return {
        "title": task.title,
        "batch": batch,
        "steps": steps,
        "seeds": args.seeds,
        "key": task.key,
        "load": [min(loads), max(loads)],
        "runs": results,
    }


def op_times(logdir):
    """``{(scope, op type): ms}`` summed over the executor threads' op
    events of a ``tf.profiler`` trace."""
    (path,) = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
    space = xplane_pb2.XSpace()
    with open(path, "rb") as f:
        space.ParseFromString(f.read())
    times = collections.Counter()
    for plane in space.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                if ":" not in name or name.startswith(("Threadpool", "ExecutorState")):
                    continue
                scope, op = name.rsplit(":", 1)
                times[scope, op] += event.duration_ps / 1e9
    return times


def part(scope, optimizer_name):
    """The part of the step an op belongs to: the first
    ``keras_kfac.graph_util.PROFILE_SCOPES`` name in its scope, the model's
    own forward and backward pass outside the optimizer, or the rest of the
    optimizer (Keras's variable updates, KL clip, momentum, checks)."""
    for name in scope.split("/"):
        if name in PROFILE_SCOPES:
            return name
    if not scope.startswith(optimizer_name + "/"):
        return "model forward and backward"
    return "kfac other (update, KL clip, momentum, checks)"


def profile_task(name, args):
    """Op time per part of the step over ``--steps`` KFAC() steps (after
    the first few), from a ``tf.profiler`` trace. Op times are thread times
    (two ops may run at once on two cores): compare shares, not walls."""
    task = TASKS[name]
    build, (x, y), _ = task.make(args)
    steps = args.steps or 40
    batch = task.batch if not args.quick else min(task.batch, 250)
    model = build(0)
    model.compile(optimizer=keras_kfac.KFAC(), **build.compile_kwargs)
    rows = np.arange(batch) % len(x)
    for _ in range(4):
        model.train_on_batch(x[rows], y[rows])
    logdir = tempfile.mkdtemp(prefix="stepcost_profile_")
    load = os.getloadavg()[0]
    tf.profiler.experimental.start(logdir)
    for _ in range(steps):
        model.train_on_batch(x[rows], y[rows])
    tf.profiler.experimental.stop()
    times = op_times(logdir)
    parts = collections.Counter()
    ops = collections.Counter()
    for (scope, op), ms in times.items():
        p = part(scope, model.optimizer.name)
        parts[p] += ms / steps
        ops[p, op] += ms / steps
    return {
        "title": task.title,
        "batch": batch,
        "steps": steps,
        "load": [load, os.getloadavg()[0]],
        "cadence": model.optimizer.cadence,
        "parts": dict(parts.most_common()),
        "ops": [[p, op, ms] for (p, op), ms in ops.most_common(15)],
    }


def profile_markdown(results, command):
    lines = [
        "### Op time per part of a KFAC() step (issue 14)",
        "",
        f"`{command}` on {machine()}. `tf.profiler` trace of consecutive `train_on_batch` "
        "steps (after 4), op time summed over the executor threads per step, by the name "
        "scope of the step's part (`keras_kfac.graph_util.PROFILE_SCOPES`). Thread time: two "
        "ops may run at once, so shares compare, walls do not.",
    ]
    for name, r in results.items():
        total = sum(r["parts"].values())
        lines += [
            "",
            f"#### {name}: {r['title']}, batch {r['batch']}, {r['steps']} steps, cadence "
            f"{r['cadence']}, load {r['load'][0]:.1f}-{r['load'][1]:.1f}",
            "",
            "| part | op ms per step | share |",
            "|---|---:|---:|",
        ]
        lines += [f"| {p} | {ms:.2f} | {ms / total:.0%} |" for p, ms in r["parts"].items()]
        lines += ["", "| part | op type | op ms per step |", "|---|---|---:|"]
        lines += [f"| {p} | {op} | {ms:.2f} |" for p, op, ms in r["ops"]]
    return "\n".join(lines) + "\n"


def markdown(results, command):
    lines = [
        "### Where a KFAC step's time goes (issue 14)",
        "",
        f"`{command}` on {machine()}. Interleaved in one process (same weights, batches, "
        "dropout masks: the models are built from one seed); ms per step; extra: amortized ms per step of each kind of step "
        "over a plain one; ratio: amortized mean over the first-order run's; first step: "
        "tracing and compilation (outside the panel's clock).",
    ]
    for name, r in results.items():
        kinds = sorted({k for run in r["runs"].values() for k in run["extra_ms"]})
        lines += [
            "",
            f"#### {name}: {r['title']}, batch {r['batch']}, {r['steps']} steps, "
            f"{r['seeds']} seed(s), "
            f"load {r['load'][0]:.1f}-{r['load'][1]:.1f}",
            "",
            "| run | plain | "
            + " | ".join(f"+{k}" for k in kinds)
            + f" | amortized | ratio | {r['key']} after {r['steps']} steps"
            + (f" (median of {r['seeds']} seeds: each)" if r["seeds"] > 1 else "")
            + " | first step (s) |",
            "|---|---:|" + "---:|" * len(kinds) + "---:|---:|---:|---:|",
        ]
        for label, run in r["runs"].items():
            extra = " | ".join(
                f"{run['extra_ms'][k]:.2f}" if k in run["extra_ms"] else "-" for k in kinds
            )
            lines.append(
                f"| {label} | {run['plain_ms']:.2f} | {extra} | {run['mean_ms']:.2f} "
                f"| {run['ratio']:.2f} | {run['final']:.4g}"
                + (f" ({', '.join(f'{v:.4g}' for v in run['finals'])})" if r["seeds"] > 1 else "")
                + f" | {run['first_step_s']:.1f} |"
            )
        curves = {label: run["curve"] for label, run in r["runs"].items() if run.get("curve")}
        if curves:
            points = [step for step, _ in next(iter(curves.values()))]
            lines += [
                "",
                f"{r['key']} after each round (seed 0):",
                "",
                "| run | " + " | ".join(f"step {p}" for p in points) + " |",
                "|---|" + "---:|" * len(points),
            ]
            for label, curve in curves.items():
                lines.append(f"| {label} | " + " | ".join(f"{v:.4g}" for _, v in curve) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="mlp,ae_relu")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (per task)")
    parser.add_argument("--round", type=int, default=40, help="steps per interleaving round")
    parser.add_argument("--set", choices=sorted(CONFIG_SETS), default="breakdown")
    parser.add_argument("--seeds", type=int, default=1, help="initial weights and batch orders")
    parser.add_argument("--curve", action="store_true", help="evaluate after every round (seed 0)")
    parser.add_argument("--quick", action="store_true", help="smoke mode: few steps")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument(
        "--profile", action="store_true", help="op time per part of the step (tf.profiler)"
    )
    parser.add_argument(
        "--tag", default="", help="suffix of the result files (e.g. before/after a change)"
    )
    args = parser.parse_args(argv)
    names = [n for n in args.tasks.split(",") if n]
    unknown = [n for n in names if n not in BASELINE_LR]
    if unknown:
        sys.exit(f"unknown task(s) {unknown}; stepcost knows {sorted(BASELINE_LR)}")
    command = "python benchmarks/stepcost.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    if args.profile:
        results = {name: profile_task(name, args) for name in names}
        md = profile_markdown(results, command.strip())
    else:
        results = {name: run_task(name, args) for name in names}
        md = markdown(results, command.strip())
    stem = os.path.join(
        RESULTS,
        ("stepcost_profile" if args.profile else f"stepcost_{args.set}")
        + (f"_{args.tag}" if args.tag else "")
        + ("_quick" if args.quick else ""),
    )
    write_tables(stem, results, md)
    return results


if __name__ == "__main__":
    main()
