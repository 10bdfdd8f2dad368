"""What stops ``KFAC()`` per step at batch 128 (issue 14): the panel's
small-batch tasks trained for a fixed number of steps, ``KFAC()`` against
variants that each change one lever, and the first-order optimizer that wins
the panel there; and the same question on the batch-1000 autoencoders.

    python benchmarks/perstep.py                              # mlp, convnet128: one lever each
    python benchmarks/perstep.py --tasks mlp_nodrop --set core  # the MLP without Dropout
    python benchmarks/perstep.py --tasks mlp --set decay      # statistics' running-average decay
    python benchmarks/perstep.py --tasks ae_relu,ae_tanh --set ae   # the batch-1000 gate
    python benchmarks/perstep.py --quick                      # smoke mode

(``--skip-baselines``: KFAC runs only; ``--output``: the results' stem.)

Load-independent: every run of a task starts from the same initial weights
(one seed per ``--seeds``) and sees the same batches in the same order, one
``train_on_batch`` at a time; the task's metric is taken after fixed step
counts. Every KFAC run also records, through ``KFAC.track_diagnostics``
every ``--diag-every`` steps (steps where the Levenberg-Marquardt rule
measures ``rho`` too), the damping, ``rho`` and the KL clip's scale ``nu``
(``nu < 1``: the clip shrank the update). ``KFAC.summary()`` says which
variables fall back to Adam. Results: ``results/perstep<batch>[_quick].md``
and ``.json``.
"""

import argparse
import os
import statistics
import sys

import keras
import numpy as np
from harness import RESULTS, machine, write_tables
from panel import ADAMW_WEIGHT_DECAY, TASKS, mlp

import keras_kfac


def mlp_without_dropout(seed=0):
    """The panel's MLP with its Dropout layers removed (same Dense weights
    from the same seed): is the masked forward pass what hurts?"""
    model = mlp(seed)
    return keras.Sequential(
        [keras.Input((28, 28, 1))]
        + [layer for layer in model.layers if not isinstance(layer, keras.layers.Dropout)]
    )


BASELINES = {
    "mlp": {
        "adamw lr=0.001": lambda: keras.optimizers.AdamW(1e-3, weight_decay=ADAMW_WEIGHT_DECAY)
    },
    "convnet128": {
        "muon lr=0.003": lambda: keras.optimizers.Muon(3e-3),
        "adam lr=0.003": lambda: keras.optimizers.Adam(3e-3),
    },
    "ae_relu": {"adam lr=0.003": lambda: keras.optimizers.Adam(3e-3)},
    "ae_tanh": {
        "adamw lr=0.001": lambda: keras.optimizers.AdamW(1e-3, weight_decay=ADAMW_WEIGHT_DECAY)
    },
}
# --set: label -> KFAC keyword arguments, one lever each.
CONFIG_SETS = {
    "levers": {
        "kfac": {},
        "kl_clip=1e-3": {"kl_clip": 1e-3},
        "kl_clip=1e-4": {"kl_clip": 1e-4},
        "momentum=0": {"momentum": 0.0},
        "fixed damping 1e-2": {"damping_adaptation_interval": 0},
        "fixed damping 0.1": {"damping": 0.1, "damping_adaptation_interval": 0},
        "fisher=empirical": {"fisher": "empirical"},
        "stats 1 / inverse 5": {"stats_every": 1, "inverse_every": 5},
    },
    "core": {
        "kfac": {},
        "kl_clip=1e-4": {"kl_clip": 1e-4},
        "momentum=0": {"momentum": 0.0},
    },
    "decay": {
        "kfac": {},
        "stats_decay=0.8": {"stats_decay": 0.8},
        "stats_decay=0.9": {"stats_decay": 0.9},
        "stats_decay=0.95": {"stats_decay": 0.95},
    },
    "kfac": {"kfac": {}},
    "fixed": {"fixed damping 1e-2": {"damping_adaptation_interval": 0}},
    "ae": {
        "kfac": {},
        "stats_decay=0.8": {"stats_decay": 0.8},
        "stats_decay=0.95": {"stats_decay": 0.95},
    },
}
CHECKPOINTS = {128: (50, 100, 200, 400, 600), 1000: (25, 50, 100)}
NO_DROPOUT = "mlp_nodrop"


def task_setup(name, args):
    """``(task, build, data, evaluate, baselines)`` of a panel task, or of
    the MLP without Dropout."""
    base = "mlp" if name == NO_DROPOUT else name
    task = TASKS[base]
    build, data, evaluate = task.make(args)
    if name == NO_DROPOUT:
        compile_kwargs = build.compile_kwargs
        build = mlp_without_dropout
        build.compile_kwargs = compile_kwargs
    return task, build, data, evaluate, BASELINES[base]


def diagnostics_summary(rows):
    """Damping, rho and KL-clip statistics of one run's diagnostics rows
    ``(step, damping, rho, nu)``."""
    damping = [r[1] for r in rows]
    rho = [r[2] for r in rows if np.isfinite(r[2])]
    nu = [r[3] for r in rows if np.isfinite(r[3])]
    clipped = [v for v in nu if v < 1.0]
    return {
        "damping_first": damping[0] if damping else None,
        "damping_min": min(damping) if damping else None,
        "damping_max": max(damping) if damping else None,
        "damping_last": damping[-1] if damping else None,
        "rho_median": statistics.median(rho) if rho else None,
        "rho_below_quarter": sum(v < 0.25 for v in rho) / len(rho) if rho else None,
        "rho_above_three_quarters": sum(v > 0.75 for v in rho) / len(rho) if rho else None,
        "clip_share": len(clipped) / len(nu) if nu else None,
        "nu_median_when_clipped": statistics.median(clipped) if clipped else None,
    }


def run_task(name, args):
    task, build, (x, y), evaluate, baselines = task_setup(name, args)
    batch = task.batch if not args.quick else min(task.batch, 250)
    checkpoints = CHECKPOINTS[128 if task.batch < 1000 else 1000]
    if args.steps:
        checkpoints = tuple(c for c in checkpoints if c < args.steps) + (args.steps,)
    if args.quick:
        checkpoints = (args.diag_every, 2 * args.diag_every)
    makers = dict(baselines) if not args.skip_baselines else {}
    configs = (
        CONFIG_SETS[args.set] if not args.quick else {"kfac": {}, "momentum=0": {"momentum": 0.0}}
    )
    for label, config in configs.items():
        makers[label] = lambda config=config: keras_kfac.KFAC(**config)
    curves = {label: [] for label in makers}  # per seed: [metric at each checkpoint]
    diagnostics = {label: [] for label in makers}  # per seed: summary
    summary_text = None
    loads = [os.getloadavg()[0]]
    for seed in range(args.seeds):
        order = np.random.default_rng(seed).permutation(len(x))
        for label, make in makers.items():
            model = build(seed)
            model.compile(optimizer=make(), **build.compile_kwargs)
            opt = model.optimizer
            is_kfac = isinstance(opt, keras_kfac.KFAC)
            rows, curve = [], []
            for step in range(checkpoints[-1]):
                index = np.take(order, range(step * batch, (step + 1) * batch), mode="wrap")
                model.train_on_batch(x[index], y[index])
                if is_kfac and step == 0:
                    opt.track_diagnostics(every=args.diag_every, histograms=False)
                    # The next call retraces with the diagnostics in the step.
                    model.make_train_function(force=True)
                    if summary_text is None:
                        summary_text = opt.summary(print_fn=lambda _: None)
                if is_kfac and opt.monitor.latest_diagnostics_step == step + 1:
                    d = opt.diagnostics()
                    rows.append(
                        (
                            step + 1,
                            float(d["diagnostics_damping"]),
                            float(d["rho"]),
                            float(d["kl_clip_scale"]),
                        )
                    )
                if step + 1 in checkpoints:
                    curve.append(float(evaluate(model)[task.key]))
            loads.append(os.getloadavg()[0])
            curves[label].append(curve)
            diagnostics[label].append(diagnostics_summary(rows) if is_kfac else None)
            print(
                f"  {name} seed {seed} {label}: {[f'{v:.4g}' for v in curve]}, load {loads[-1]:.1f}",
                flush=True,
            )
    return {
        "title": task.title + (" removed" if name == NO_DROPOUT else ""),
        "batch": batch,
        "key": task.key_label,
        "checkpoints": list(checkpoints),
        "seeds": args.seeds,
        "load": [min(loads), max(loads)],
        "summary": summary_text,
        "configs": {label: configs.get(label) for label in makers},
        "curves": curves,
        "diagnostics": diagnostics,
    }


def _g(v):
    return "-" if v is None else f"{v:.3g}"


def markdown(results, command):
    lines = [
        "### Per step at batch 128: what stops `KFAC()` (issue 14)",
        "",
        f"`{command}` on {machine()}. Same initial weights and batches for every run of a "
        "seed; metric after each step count, median over seeds (each seed in parentheses "
        "at the last count). Diagnostics (KFAC runs): over the `track_diagnostics` steps, "
        "median over seeds of: damping at the first diagnostics step / min / max / last; "
        "median rho and the share of rho < 1/4 (damping raised) and > 3/4 (lowered); clip: "
        "share of steps with the KL clip binding (nu < 1), and median nu when it binds.",
    ]
    for name, r in results.items():
        points = r["checkpoints"]
        lines += [
            "",
            f"#### {name}: {r['title']}, batch {r['batch']}, {r['seeds']} seed(s), "
            f"load {r['load'][0]:.1f}-{r['load'][1]:.1f}",
            "",
            f"{r['key']}:",
            "",
            "| run | " + " | ".join(f"{p}" for p in points) + " | damping first/min/max/last "
            "| rho median (<1/4, >3/4) | clip binds (median nu) |",
            "|---|" + "---:|" * len(points) + "---|---|---|",
        ]
        for label, curves in r["curves"].items():
            medians = [statistics.median(c[i] for c in curves) for i in range(len(points))]
            cells = [f"{v:.4g}" for v in medians]
            if len(curves) > 1:
                cells[-1] += " (" + ", ".join(f"{c[-1]:.4g}" for c in curves) + ")"
            diag = [d for d in r["diagnostics"][label] if d is not None]

            def med(key, diag=diag):
                values = [d[key] for d in diag if d[key] is not None]
                return statistics.median(values) if values else None

            if diag:
                extra = (
                    f"{_g(med('damping_first'))} / {_g(med('damping_min'))} / "
                    f"{_g(med('damping_max'))} / {_g(med('damping_last'))} | "
                    f"{_g(med('rho_median'))} ({_g(med('rho_below_quarter'))}, "
                    f"{_g(med('rho_above_three_quarters'))}) | "
                    f"{_g(med('clip_share'))} ({_g(med('nu_median_when_clipped'))})"
                )
            else:
                extra = "- | - | -"
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {extra} |")
        if r["summary"]:
            lines += ["", "`KFAC.summary()`:", "", "```", r["summary"], "```"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="mlp,convnet128")
    parser.add_argument("--set", choices=sorted(CONFIG_SETS), default="levers")
    parser.add_argument("--steps", type=int, default=None, help="last step count")
    parser.add_argument("--seeds", type=int, default=2, help="initial weights and batch orders")
    parser.add_argument("--diag-every", type=int, default=10, help="diagnostics every N steps")
    parser.add_argument("--output", default=None, help="results file stem (default perstep<batch>)")
    parser.add_argument(
        "--skip-baselines", action="store_true", help="KFAC runs only (no first-order runs)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke mode: few steps, one seed")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)
    names = [n for n in args.tasks.split(",") if n]
    known = set(BASELINES) | {NO_DROPOUT}
    unknown = [n for n in names if n not in known]
    if unknown:
        sys.exit(f"unknown task(s) {unknown}; perstep knows {sorted(known)}")
    if args.quick:
        args.seeds = 1
    results = {name: run_task(name, args) for name in names}
    command = "python benchmarks/perstep.py " + " ".join(argv if argv is not None else sys.argv[1:])
    batch = min(r["batch"] for r in results.values())
    stem = os.path.join(
        RESULTS, (args.output or f"perstep{batch}") + ("_quick" if args.quick else "")
    )
    write_tables(stem, results, markdown(results, command.strip()))
    return results


if __name__ == "__main__":
    main()
