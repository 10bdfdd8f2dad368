"""Shared benchmark machinery: wall-clock budgets, periodic evaluation with the
clock stopped, JSON/CSV logs and matplotlib plots.

Timing excludes the first (compiling) step and every evaluation; step times
are reported as medians. Process CPU time (all of TensorFlow's threads) is
recorded next to wall time, and the load average at the start and end of a
run, so that timings taken on a shared machine can be read under load. Every optimizer of a suite runs in the same process
from the same initial weights on the same batches, so ratios are comparable.
"""

import csv
import json
import os
import platform
import statistics
import time

import keras
import numpy as np

RESULTS = os.environ.get(
    "KERAS_KFAC_RESULTS", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
)


class BudgetLogger(keras.callbacks.Callback):
    """Stops training after ``budget`` seconds of (timed) training and
    evaluates ``evaluate()`` every ``eval_every`` seconds of training time,
    with the clock stopped. Records (step, seconds, metrics) rows."""

    def __init__(self, budget, eval_every, evaluate, max_steps=None):
        super().__init__()
        self.budget = budget
        self.eval_every = eval_every
        self.evaluate = evaluate
        self.max_steps = max_steps

    def on_train_begin(self, logs=None):
        self.step = 0
        self.elapsed = 0.0
        self.cpu_elapsed = 0.0
        self.step_times = []
        self.step_cpu_times = []
        self.rows = []
        self._next_eval = 0.0
        self.load_begin = os.getloadavg()[0]

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()
        self._start_cpu = time.process_time()

    def on_train_batch_end(self, batch, logs=None):
        dt = time.perf_counter() - self._start
        cpu = time.process_time() - self._start_cpu
        self.step += 1
        if self.step == 1:
            self.first_step_seconds = dt  # compile: excluded from the clock
        else:
            self.elapsed += dt
            self.cpu_elapsed += cpu
            self.step_times.append(dt)
            self.step_cpu_times.append(cpu)
        if self.step == 1 or self.elapsed >= self._next_eval:
            self._log()
            self._next_eval = self.elapsed + self.eval_every
        out_of_steps = self.max_steps is not None and self.step >= self.max_steps
        if self.elapsed >= self.budget or out_of_steps or not np.isfinite(logs.get("loss", 0.0)):
            self.model.stop_training = True

    def on_train_end(self, logs=None):
        if not self.rows or self.rows[-1]["step"] != self.step:
            self._log()
        self.load_end = os.getloadavg()[0]

    def _log(self):
        row = {"step": self.step, "seconds": self.elapsed, "cpu_seconds": self.cpu_elapsed}
        row.update(self.evaluate())
        self.rows.append(row)

    def summary(self):
        def ms(f, times):
            return 1000 * f(times) if times else float("nan")

        return {
            "steps": self.step,
            "seconds": self.elapsed,
            "cpu_seconds": self.cpu_elapsed,
            "median_step_ms": ms(statistics.median, self.step_times),
            # Amortized over statistics/refresh steps (the median hides them).
            "mean_step_ms": ms(statistics.mean, self.step_times),
            "median_step_cpu_ms": ms(statistics.median, self.step_cpu_times),
            "mean_step_cpu_ms": ms(statistics.mean, self.step_cpu_times),
            "first_step_s": getattr(self, "first_step_seconds", float("nan")),
            "load_begin": self.load_begin,
            "load_end": getattr(self, "load_end", float("nan")),
            "final": self.rows[-1],
        }


def first_reaching(rows, key, target):
    """First logged row with ``row[key] <= target`` (None if none)."""
    return next((row for row in rows if row[key] <= target), None)


def time_to_reach(rows, key, target):
    """First logged (seconds, step) at which ``rows[key] <= target``."""
    row = first_reaching(rows, key, target)
    return (None, None) if row is None else (row["seconds"], row["step"])


def machine():
    return f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, no GPU"


def write_tables(stem, tasks, md):
    """``<stem>.json`` (``{"machine", "tasks"}``) and ``<stem>.md`` of a
    per-task benchmark; prints the Markdown."""
    os.makedirs(os.path.dirname(stem), exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump({"machine": machine(), "tasks": tasks}, f, indent=1, default=float)
    with open(stem + ".md", "w") as f:
        f.write(md)
    print(md)


def write_results(
    name,
    payload,
    runs,
    x_key="seconds",
    y_key="train_loss",
    y_label=None,
    log_y=False,
    styles=None,
):
    """``results/<name>.json``, ``<name>.csv`` (all logged rows) and
    ``<name>_time.png`` / ``<name>_steps.png`` (one line per run;
    ``styles[label]``: that line's matplotlib keywords)."""
    os.makedirs(RESULTS, exist_ok=True)
    stem = os.path.join(RESULTS, name)
    payload = dict(payload, machine=machine(), runs=runs)
    with open(stem + ".json", "w") as f:
        json.dump(payload, f, indent=1, default=float)
    with open(stem + ".csv", "w", newline="") as f:
        keys = sorted({k for run in runs.values() for row in run["rows"] for k in row})
        writer = csv.DictWriter(f, fieldnames=["run"] + keys)
        writer.writeheader()
        for label, run in runs.items():
            for row in run["rows"]:
                writer.writerow(dict(row, run=label))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plots")
        return
    for axis, xlabel in (("seconds", "training wall time (s)"), ("step", "steps")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, run in runs.items():
            xs = [row[axis] for row in run["rows"]]
            ys = [row[y_key] for row in run["rows"]]
            ax.plot(xs, ys, label=label, **(styles or {}).get(label, {"linewidth": 1.5}))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(y_label or y_key)
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title(name.replace("_", " "))
        fig.tight_layout()
        fig.savefig(f"{stem}_{'time' if axis == 'seconds' else 'steps'}.png", dpi=110)
        plt.close(fig)
