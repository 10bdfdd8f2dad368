"""Early-training curvature warm-up (issue 14): statistics and inverse
refreshes on every one of the first N steps (``KFAC(curvature_warmup=N)``),
then the automatic cadence, per step and per second.

    python benchmarks/warmup.py                                  # 5 tasks, 32 min at load 5-13 on 2 cores
    python benchmarks/warmup.py --tasks ae_relu --warmups 0,20,40 --seeds 2
    python benchmarks/warmup.py --quick                          # smoke mode

Every warm-up length of a task trains its own copy of the same initial
weights on the same batches (``train_on_batch``, full batches), in one
process, interleaved in rounds of ``--round`` steps, so a change of load hits
all of them alike. After each round the task's metric is evaluated with the
clock stopped. The clock leaves out the first (tracing) step, as the panel's
does.

Columns: the metric after each round (median over seeds: progress per step);
the amortized ms per step and its ratio to no warm-up; time to target: the
training seconds until the metric first reaches the no-warm-up run's final
value (linear between evaluations; median over seeds), as a ratio to the
no-warm-up run's own time; the metric at the no-warm-up run's final training
time (equal wall clock, linear between evaluations). Results:
``results/warmup[_quick].md`` and ``.json``.
"""

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
from harness import RESULTS, machine, write_tables
from panel import TASKS

import keras_kfac

DEFAULT_TASKS = "ae_relu,ae_tanh,ae_sigmoid,mlp,convnet128"
# Enough steps for the longest default warm-up (40) to have passed: at load
# 2-5 the ReLU autoencoder's two runs (0 and 40) take about 2 min a seed.
DEFAULT_STEPS = {"mlp": 400, "convnet128": 200}
AE_STEPS = 100


def time_at(curve, value):
    """Training seconds at which the metric first reaches ``value`` (linear
    between evaluations; None if never). ``curve``: (seconds, metric)
    rows, starting from the initial evaluation at 0 s."""
    for (t0, m0), (t1, m1) in zip(curve, curve[1:]):
        if m1 <= value:
            return t1 if m0 <= m1 else t0 + (t1 - t0) * (m0 - value) / (m0 - m1)
    return None


def metric_at(curve, seconds):
    """The metric at ``seconds`` of training (linear between evaluations;
    the last one beyond the curve)."""
    times = [t for t, _ in curve]
    return float(np.interp(seconds, times, [m for _, m in curve]))


def run_task(name, args):
    task = TASKS[name]
    build, (x, y), evaluate = task.make(args)
    steps = args.steps or DEFAULT_STEPS.get(name, AE_STEPS)
    batch = task.batch
    if args.quick:
        steps, batch = min(steps, 12), min(batch, 250)
    every = args.round or max(steps // 10, 1)
    warmups = [int(w) for w in args.warmups.split(",")]
    base = warmups[0]
    labels = {w: f"curvature_warmup={w}" for w in warmups}
    seeds = []
    loads = [os.getloadavg()[0]]
    for seed in range(args.seeds):
        models = {}
        for w in warmups:
            models[w] = build(seed)
            models[w].compile(
                optimizer=keras_kfac.KFAC(curvature_warmup=w, **args.kfac),
                **build.compile_kwargs,
            )
        initial = float(evaluate(models[base])[task.key])
        curves = {w: [(0, 0.0, initial)] for w in warmups}  # (step, seconds, metric)
        times = {w: [] for w in warmups}
        order = np.random.default_rng(seed).permutation(len(x))
        for start in range(0, steps, every):
            done = min(start + every, steps)
            for w, model in models.items():
                for step in range(start, done):
                    rows = np.take(order, range(step * batch, (step + 1) * batch), mode="wrap")
                    begin = time.perf_counter()
                    model.train_on_batch(x[rows], y[rows])
                    times[w].append(time.perf_counter() - begin)
                # The first step traces and compiles: off the clock.
                curves[w].append((done, sum(times[w][1:]), float(evaluate(model)[task.key])))
            loads.append(os.getloadavg()[0])
            print(
                f"  {name} seed {seed}: {done}/{steps} steps, load {loads[-1]:.1f}, "
                + ", ".join(f"{w}: {curves[w][-1][2]:.4g}" for w in warmups),
                flush=True,
            )
        target = curves[base][-1][2]
        base_seconds = curves[base][-1][1]
        runs = {}
        for w in warmups:
            timed = [(t, m) for _, t, m in curves[w]]
            reached = time_at(timed, target)
            runs[labels[w]] = {
                "curve": curves[w],
                "mean_ms": 1000 * float(np.mean(times[w][1:])),
                "seconds_to_target": reached,
                "time_ratio": None
                if reached is None
                else reached / time_at([(t, m) for _, t, m in curves[base]], target),
                "at_equal_time": metric_at(timed, base_seconds),
                "final_damping": float(models[w].optimizer.damping),
                "cadence": models[w].optimizer.cadence,
            }
        seeds.append(runs)
    summary = {}
    for w in warmups:
        per_seed = [s[labels[w]] for s in seeds]
        ratios = [r["time_ratio"] for r in per_seed]
        summary[labels[w]] = {
            "curve": [
                (step, statistics.median(r["curve"][i][2] for r in per_seed))
                for i, (step, _, _) in enumerate(per_seed[0]["curve"])
            ],
            "mean_ms": statistics.median(r["mean_ms"] for r in per_seed),
            "time_ratio": None if None in ratios else statistics.median(ratios),
            "time_ratios": ratios,
            "at_equal_time": statistics.median(r["at_equal_time"] for r in per_seed),
            "cadence": per_seed[0]["cadence"],
            "final_damping": statistics.median(r["final_damping"] for r in per_seed),
        }
    base_ms = summary[labels[base]]["mean_ms"]
    for r in summary.values():
        r["step_ratio"] = r["mean_ms"] / base_ms
    return {
        "title": task.title,
        "key": task.key,
        "batch": batch,
        "steps": steps,
        "seeds": args.seeds,
        "load": [min(loads), max(loads)],
        "runs": summary,
        "per_seed": seeds,
    }


def _f(v, fmt=".4g"):
    return "-" if v is None else format(v, fmt)


def markdown(results, command):
    lines = [
        "### Early-training curvature warm-up (issue 14)",
        "",
        f"`{command}` on {machine()}. Interleaved in one process (same initial weights "
        "and batches); the metric is the median over seeds; ms/step: amortized, "
        "first step left out; time ratio: seconds to reach the first run's final "
        "metric over the first run's own (median over seeds; - : not reached); "
        "equal time: the metric at the first run's final training time; final damping: "
        "after the last step (Levenberg-Marquardt-adapted).",
    ]
    for name, r in results.items():
        runs = r["runs"]
        points = [step for step, _ in next(iter(runs.values()))["curve"]][1:]
        lines += [
            "",
            f"#### {name}: {r['title']}, batch {r['batch']}, {r['steps']} steps, "
            f"{r['seeds']} seed(s), load {r['load'][0]:.1f}-{r['load'][1]:.1f}, "
            f"{r['key']}",
            "",
            "| run | cadence | "
            + " | ".join(str(p) for p in points)
            + " | ms/step | step ratio | time ratio (each seed) | equal time | final damping |",
            "|---|---|" + "---:|" * (len(points) + 5),
        ]
        for label, run in runs.items():
            each = ", ".join(_f(v, ".2f") for v in run["time_ratios"])
            lines.append(
                f"| {label} | {run['cadence']} | "
                + " | ".join(_f(m) for _, m in run["curve"][1:])
                + f" | {run['mean_ms']:.1f} | {run['step_ratio']:.2f} "
                f"| {_f(run['time_ratio'], '.2f')} ({each}) | {_f(run['at_equal_time'])} "
                f"| {run['final_damping']:.2g} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=DEFAULT_TASKS)
    parser.add_argument(
        "--warmups", default="0,10,20,40", help="curvature_warmup values; the first is the base"
    )
    parser.add_argument("--steps", type=int, default=None, help="steps per run (per task)")
    parser.add_argument("--round", type=int, default=None, help="steps between evaluations")
    parser.add_argument("--seeds", type=int, default=1, help="initial weights and batch orders")
    parser.add_argument(
        "--kfac", default="{}", metavar="JSON", help="other KFAC keyword arguments of every run"
    )
    parser.add_argument("--quick", action="store_true", help="smoke mode: few steps")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)
    args.kfac = json.loads(args.kfac)
    names = [n for n in args.tasks.split(",") if n]
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        sys.exit(f"unknown task(s) {unknown}; known: {sorted(TASKS)}")
    results = {name: run_task(name, args) for name in names}
    command = "python benchmarks/warmup.py " + " ".join(argv if argv is not None else sys.argv[1:])
    stem = os.path.join(RESULTS, "warmup" + ("_quick" if args.quick else ""))
    write_tables(stem, results, markdown(results, command.strip()))
    return results


if __name__ == "__main__":
    main()
