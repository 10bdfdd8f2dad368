"""Our side of the race against kfac-jax on the identical MNIST autoencoder.

The peer is ``../shared/peers/kfac_jax_autoencoder.py`` (kfac-jax 0.0.8 in its
own virtualenv, see ``../shared/peers/README.md``). This script trains
``keras_kfac.KFAC()`` on the same problem and writes the same files
(``curve_<tag>.csv``, ``eval_<tag>.csv``, ``steptimes_<tag>.csv``,
``summary_<tag>.json``), so one report compares both:

* 784-1000-500-250-30 encoder, mirrored decoder, ReLU hidden units, linear
  30-unit code, logits output; Glorot-uniform kernels, zero biases;
* binary cross-entropy summed over the 784 pixels and averaged over the
  batch (Keras's per-pixel mean with ``loss_weights=784``, which the sampled
  Fisher scales by the same weight), plus ``l2 / 2 * |theta|^2`` over every
  weight and bias in the loss, as the peer adds it;
* batch 1000 in the peer's order: the same NumPy generator and
  permutations, and the first 11 batches skipped, which kfac-jax spends on
  ``init`` (1) and its curvature burn-in (10), so that step k sees the peer's
  batch of step k;
* evaluation: summed BCE on the first 10,000 training images (file order)
  every 50 steps with the clock stopped; the clock starts after the first
  (tracing) step.

    python benchmarks/peer.py                                   # KFAC(), 150 s
    python benchmarks/peer.py --max-steps 400 --budget 1e9 --tag kfac_steps400
    python benchmarks/peer.py --kfac-config '{"inverse_every": 5}' --tag inv5
    python benchmarks/peer.py --report-only --peer-dir /work/peer-results
    python benchmarks/peer.py --quick                           # smoke, seconds

``--kfac-config`` is a JSON object of ``KFAC`` keyword arguments; its key
``"adapt_damping"`` (an object of :meth:`keras_kfac.KFAC.adapt_damping`
arguments, e.g. ``{"every": 5}``) turns on Levenberg-Marquardt damping.
``--peer-dir`` (with or without training) reads every run in its folders and in
``--out-dir`` and writes the joint table and plots to
``benchmarks/results/peer.{md,json,png}``.
"""

import argparse
import collections
import csv
import glob
import gzip
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from harness import RESULTS, machine  # noqa: E402

PIXELS = 784
HIDDEN = (1000, 500, 250)
CODE = 30
BATCH = 1000
EVAL_IMAGES = 10_000
PEER_SKIPPED_BATCHES = 11  # kfac-jax: 1 batch in opt.init, 10 burn-in batches in step 1
TARGET = 61.3  # kfac-jax's evaluation BCE at 78 s in issue 14
STEP_MARKS = (50, 100, 200, 400)


# --- problem ------------------------------------------------------------------


def load_images(data_dir=None):
    """MNIST training images in file order, float32 (60000, 784) in [0, 1]."""
    from keras_kfac import datasets

    folder = datasets.find_raw_dir("mnist", manual_dir=data_dir)
    if folder is None:
        raise datasets.DataNotFoundError(
            "The raw MNIST IDX files were not found; pass --data-dir or set "
            f"${datasets.ENV_VAR} to a folder holding {datasets.RAW_FILES[0]}."
        )
    with gzip.open(os.path.join(folder, "train-images-idx3-ubyte.gz"), "rb") as f:
        raw = np.frombuffer(f.read(), dtype=np.uint8, offset=16)
    return raw.reshape(-1, PIXELS).astype(np.float32) / 255.0


def peer_batches(x, batch, seed, skip):
    """The peer's batch order: a fresh permutation per epoch from
    ``np.random.default_rng(seed)``, incomplete last batch dropped."""
    rng = np.random.default_rng(seed)
    per_epoch = x.shape[0] // batch
    produced = 0
    while True:
        perm = rng.permutation(x.shape[0])
        for i in range(per_epoch):
            produced += 1
            if produced > skip:
                yield x[perm[i * batch : (i + 1) * batch]]


def build_model(l2, seed):
    import keras

    keras.utils.set_random_seed(seed)
    # Keras's L2(c) adds c * sum(w^2); the peer adds l2 / 2 * sum(w^2).
    reg = keras.regularizers.L2(l2 / 2) if l2 > 0 else None

    def dense(units, activation=None):
        return keras.layers.Dense(
            units, activation=activation, kernel_regularizer=reg, bias_regularizer=reg
        )

    inputs = keras.Input((PIXELS,))
    h = inputs
    for units in HIDDEN:
        h = dense(units, "relu")(h)
    h = dense(CODE)(h)
    for units in reversed(HIDDEN):
        h = dense(units, "relu")(h)
    return keras.Model(inputs, dense(PIXELS)(h))


def make_optimizer(config):
    import keras_kfac

    config = dict(config)
    adapt = config.pop("adapt_damping", None)
    if adapt is not None and not isinstance(adapt, dict):
        raise ValueError(
            f'"adapt_damping" takes an object of KFAC.adapt_damping arguments, e.g. '
            f'{{"every": 5}}; got {adapt!r}.'
        )
    return keras_kfac.KFAC(**config), adapt


def compile_model(model, optimizer):
    """Summed BCE: Keras's per-pixel mean times 784 (a stock loss, so the
    sampled Fisher knows its likelihood and scales by the loss weight)."""
    import keras

    model.compile(
        optimizer=optimizer,
        loss=keras.losses.BinaryCrossentropy(from_logits=True),
        loss_weights=float(PIXELS),
        metrics=[keras.metrics.BinaryCrossentropy(from_logits=True, name="bce")],
    )


def summed_bce_fn(model):
    import tensorflow as tf

    @tf.function
    def summed_bce(x):
        logits = model(x, training=False)
        per_pixel = tf.nn.sigmoid_cross_entropy_with_logits(labels=x, logits=logits)
        return tf.reduce_mean(tf.reduce_sum(per_pixel, axis=1))

    return summed_bce


def sys_busy_s():
    """Non-idle CPU seconds of the whole machine (all cores)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


# --- one run ------------------------------------------------------------------


def train(args, config, tag, out_dir):
    import keras

    x_train = load_images(args.data_dir)
    x_eval = x_train[:EVAL_IMAGES]
    model = build_model(args.l2, args.seed)
    opt, adapt = make_optimizer(config)
    compile_model(model, opt)
    opt.build(model.trainable_variables)
    if adapt is not None:
        opt.adapt_damping(**adapt)
    eval_bce = summed_bce_fn(model)
    batches = peer_batches(x_train, BATCH, args.seed, args.skip_batches)
    print(f"[{tag}] KFAC config {json.dumps(config)}; load {os.getloadavg()}", flush=True)

    rows, eval_rows, step_times, step_cpu = [], [], [], []
    recent = collections.deque(maxlen=10)
    ncpu = os.cpu_count()
    mon = (time.perf_counter(), time.process_time(), sys_busy_s())
    load_start = os.getloadavg()
    paused = 0.0
    t_first_end = None
    step = 0
    t_since = 0.0
    while True:
        batch = next(batches)
        ts, cs = time.perf_counter(), time.process_time()
        logs = model.train_on_batch(batch, batch, return_dict=True)  # returns numpy: synced
        te = time.perf_counter()
        step_times.append(te - ts)
        step_cpu.append(time.process_time() - cs)
        loss, bce = float(logs["loss"]), PIXELS * float(logs["bce"])
        recent.append(bce)
        step += 1
        if step == 1:
            t_first_end = te
            print(f"[{tag}] first step {te - ts:.2f}s (tracing)", flush=True)
        t_since = te - t_first_end - paused
        if step % 10 == 0 or step == 1:
            diag = opt.diagnostics() if opt.adaptive_step else {}
            now = (time.perf_counter(), time.process_time(), sys_busy_s())
            wall = max(now[0] - mon[0], 1e-9)
            rows.append(
                dict(
                    step=step,
                    t=round(t_since, 4),
                    # TF traces the train step once, in step 1 (outside the clock).
                    t_excl_compile=round(t_since, 4),
                    loss=loss,
                    bce=bce,
                    bce_avg10=float(np.mean(recent)),
                    lr=float(diag["alpha"]) if "alpha" in diag else None,
                    mom=float(diag["mu"]) if "mu" in diag else None,
                    damp=float(opt.damping),
                    other_cpu_frac=round(
                        max(0.0, (now[2] - mon[2]) - (now[1] - mon[1])) / (wall * ncpu), 3
                    ),
                    own_cpu_per_wall=round((now[1] - mon[1]) / wall, 3),
                )
            )
            mon = now
            if step % 50 == 0 or step == 1:
                print(f"[{tag}] {rows[-1]}", flush=True)
        if step % args.eval_every == 0:
            e0 = time.perf_counter()
            eval_rows.append(
                dict(step=step, t=round(t_since, 4), eval_bce_train10k=float(eval_bce(x_eval)))
            )
            paused += time.perf_counter() - e0
        if not np.isfinite(loss):
            print(f"[{tag}] non-finite loss at step {step}", flush=True)
            break
        if t_since >= args.budget or step >= args.max_steps:
            break
    final_eval = float(eval_bce(x_eval))
    if not eval_rows or eval_rows[-1]["step"] != step:
        eval_rows.append(dict(step=step, t=round(t_since, 4), eval_bce_train10k=final_eval))

    times = np.array(step_times[1:] or step_times)
    summary = dict(
        tag=tag,
        opt="keras_kfac",
        kfac_config=config,
        steps=step,
        epochs=step * BATCH / x_train.shape[0],
        budget_s=args.budget,
        wall_after_first_s=t_since,
        first_step_s=step_times[0],
        median_step_ms=float(np.median(times) * 1e3),
        mean_step_ms=float(np.mean(times) * 1e3),
        p10_step_ms=float(np.percentile(times, 10) * 1e3),
        p90_step_ms=float(np.percentile(times, 90) * 1e3),
        final_bce_batch=rows[-1]["bce"],
        final_bce_avg10=rows[-1]["bce_avg10"],
        final_eval_bce_train10k=final_eval,
        mean_other_cpu_frac=float(np.mean([r["other_cpu_frac"] for r in rows[1:]] or [0.0])),
        max_other_cpu_frac=max((r["other_cpu_frac"] for r in rows[1:]), default=0.0),
        loadavg_start=load_start,
        loadavg_end=os.getloadavg(),
        skipped_batches=args.skip_batches,
        versions=dict(keras=keras.__version__, tensorflow=_tf_version(), numpy=np.__version__),
    )
    print(f"[{tag}] SUMMARY {json.dumps(summary)}", flush=True)
    os.makedirs(out_dir, exist_ok=True)
    _write_csv(os.path.join(out_dir, f"curve_{tag}.csv"), rows)
    _write_csv(os.path.join(out_dir, f"eval_{tag}.csv"), eval_rows)
    _write_csv(
        os.path.join(out_dir, f"steptimes_{tag}.csv"),
        [
            dict(step=k + 1, step_s=f"{s:.6f}", cpu_s=f"{c:.6f}", compile_s="0.000000")
            for k, (s, c) in enumerate(zip(step_times, step_cpu))
        ],
    )
    with open(os.path.join(out_dir, f"summary_{tag}.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def _tf_version():
    import tensorflow as tf

    return tf.__version__


def _write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows)


# --- joint report ---------------------------------------------------------------


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def load_run(summary_path):
    """A run's summary, evaluation rows and step times; evaluation times on
    the compile-excluded clock (the peer recompiles at its first inverse
    refresh, inside its clock: that step counts at the median step time)."""
    folder = os.path.dirname(summary_path)
    with open(summary_path) as f:
        summary = json.load(f)
    tag = summary["tag"]
    steps = _read_csv(os.path.join(folder, f"steptimes_{tag}.csv"))
    evals = _read_csv(os.path.join(folder, f"eval_{tag}.csv"))
    step_s = np.array([float(r["step_s"]) for r in steps])
    compile_s = np.array([float(r["compile_s"]) for r in steps])
    median = summary["median_step_ms"] / 1e3
    extra = np.where((np.arange(len(step_s)) > 0) & (compile_s > 0), step_s - median, 0.0)
    cum_extra = np.cumsum(extra)
    rows = []
    for r in evals:
        step = int(r["step"])
        t = float(r["t"])
        rows.append(
            dict(
                step=step,
                t=t,
                t_excl_compile=t - float(cum_extra[min(step, len(cum_extra)) - 1]),
                eval=float(r["eval_bce_train10k"]),
            )
        )
    name = ("kfac-jax " if summary["opt"] == "kfac" else "") + tag
    if summary["opt"] == "adam":
        name = f"optax {tag}"
    return dict(name=name, summary=summary, evals=rows)


def first_reach(evals, target, clock="t_excl_compile"):
    for r in evals:
        if r["eval"] <= target:
            return r[clock], r["step"]
    return None, None


def at_step(evals, step):
    for r in evals:
        if r["step"] == step:
            return r["eval"]
    return None


def report(dirs, min_race_budget, stem, marks=STEP_MARKS):
    paths = sorted({p for d in dirs for p in glob.glob(os.path.join(d, "summary_*.json"))})
    runs = [load_run(p) for p in paths]
    if not runs:
        raise SystemExit(
            f"No summary_*.json in {', '.join(dirs)}: run the peer and this script first."
        )
    # Race runs: stopped by a wall-clock budget of at least min_race_budget
    # (per-step runs stop at a step count, far inside their budget).
    race = [
        r
        for r in runs
        if min_race_budget <= r["summary"]["budget_s"] <= r["summary"]["wall_after_first_s"]
    ]
    peer_race = [r for r in race if r["summary"]["opt"] == "kfac"]
    peer_end = peer_race[0]["summary"]["final_eval_bce_train10k"] if peer_race else None

    def fmt(v, spec=".1f"):
        return "-" if v is None else format(v, spec)

    lines = [
        "# kfac-jax vs keras_kfac on the identical MNIST ReLU autoencoder",
        "",
        f"Machine: {machine()}. Evaluation: summed BCE on the first 10,000 training images "
        "(every 50 steps; time resolution is one evaluation interval).",
        "",
        "## Per step (load-independent): evaluation BCE after n steps",
        "",
        "| run | KFAC arguments | "
        + " | ".join(f"{s} steps" for s in marks)
        + " | median step ms |",
        "|---|---|" + "---|" * (len(marks) + 1),
    ]
    for r in runs:
        values = [fmt(at_step(r["evals"], s)) for s in marks]
        config = r["summary"].get("kfac_config")
        lines.append(
            f"| {r['name']} | {'-' if config is None else f'`{json.dumps(config)}`'} | "
            + " | ".join(values)
            + f" | {r['summary']['median_step_ms']:.0f} |"
        )
    lines += [
        "",
        f"## Wall-clock race (budget >= {min_race_budget:g} s, one run after the other)",
        "",
        f"Clock excludes compilation (`t`, which includes kfac-jax's recompile at its first "
        f"inverse refresh, in brackets). Targets: {TARGET} (issue 14) and kfac-jax's end value "
        f"({fmt(peer_end, '.2f')}).",
        "",
        f"| run | steps | median step ms | s to {TARGET} | s to peer end | end BCE | "
        "other CPU load (mean frac of cores) | loadavg |",
        "|---|---|---|---|---|---|---|---|",
    ]
    table = []
    for r in race:
        s = r["summary"]
        t1, n1 = first_reach(r["evals"], TARGET)
        t1_raw, _ = first_reach(r["evals"], TARGET, "t")
        t2, n2 = (None, None) if peer_end is None else first_reach(r["evals"], peer_end)
        load = s.get("loadavg_start")
        lines.append(
            f"| {r['name']} | {s['steps']} | {s['median_step_ms']:.0f} | "
            f"{fmt(t1)} ({fmt(t1_raw)}; step {fmt(n1, 'd')}) | {fmt(t2)} (step {fmt(n2, 'd')}) | "
            f"{s['final_eval_bce_train10k']:.2f} | {s.get('mean_other_cpu_frac', 0):.2f} | "
            f"{fmt(load and load[0], '.2f')} |"
        )
        table.append(
            dict(
                name=r["name"],
                steps=s["steps"],
                median_step_ms=s["median_step_ms"],
                seconds_to_target=t1,
                steps_to_target=n1,
                seconds_to_peer_end=t2,
                end_eval_bce=s["final_eval_bce_train10k"],
                mean_other_cpu_frac=s.get("mean_other_cpu_frac"),
            )
        )
    os.makedirs(os.path.dirname(stem), exist_ok=True)
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(stem + ".json", "w") as f:
        json.dump(
            dict(
                machine=machine(),
                target=TARGET,
                peer_end=peer_end,
                race=table,
                runs={r["name"]: dict(summary=r["summary"], evals=r["evals"]) for r in runs},
                steps_table={r["name"]: {s: at_step(r["evals"], s) for s in marks} for r in runs},
            ),
            f,
            indent=1,
        )
    _plot(runs, race, stem + ".png")
    print("\n".join(lines))


def _plot(runs, race, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot")
        return
    fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in race:
        ax_t.plot(
            [e["t_excl_compile"] for e in r["evals"]],
            [e["eval"] for e in r["evals"]],
            "o-",
            label=r["name"],
            markersize=3,
        )
    for r in runs:
        ax_s.plot(
            [e["step"] for e in r["evals"]],
            [e["eval"] for e in r["evals"]],
            "o-",
            label=r["name"],
            markersize=3,
        )
    for ax, xlabel in ((ax_t, "training wall time, compilation excluded (s)"), (ax_s, "steps")):
        ax.axhline(TARGET, color="gray", linewidth=0.8, linestyle="--")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("summed BCE, first 10k training images")
        ax.set_ylim(top=120)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    ax_t.set_title("race (wall time)")
    ax_s.set_title("per step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--budget", type=float, default=150.0, help="training seconds (clock excludes step 1)"
    )
    ap.add_argument("--max-steps", type=int, default=10**9)
    ap.add_argument("--kfac-config", default="{}", help="JSON object of KFAC keyword arguments")
    ap.add_argument("--tag", default="keras_kfac")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--l2", type=float, default=1e-5)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--skip-batches", type=int, default=PEER_SKIPPED_BATCHES)
    ap.add_argument("--data-dir", default=None, help="folder with the raw MNIST IDX files")
    ap.add_argument("--out-dir", default=None, help="this run's CSVs (default results/peer_runs)")
    ap.add_argument(
        "--peer-dir",
        nargs="+",
        default=None,
        help="the peer's OUT_DIR (and more run folders): write the joint report",
    )
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument(
        "--race-budget",
        type=float,
        default=150.0,
        help="runs with at least this budget enter the race table",
    )
    ap.add_argument("--quick", action="store_true", help="smoke: 12 steps, evaluation every 5")
    args = ap.parse_args()
    try:
        config = json.loads(args.kfac_config)
    except json.JSONDecodeError as error:
        raise SystemExit(
            f"--kfac-config must be a JSON object, e.g. '{{\"damping\": 1.0}}': {error}"
        ) from None
    if not isinstance(config, dict):
        raise SystemExit(
            f"--kfac-config must be a JSON object, e.g. '{{\"damping\": 1.0}}'; got {config!r}."
        )
    stem, marks = os.path.join(RESULTS, "peer"), STEP_MARKS
    if args.quick:
        # A smoke run leaves the committed results alone.
        args.max_steps, args.eval_every = 12, 5
        args.out_dir = args.out_dir or tempfile.mkdtemp(prefix="peer_quick_")
        stem, marks = os.path.join(args.out_dir, "peer"), (5, 10)
    args.out_dir = args.out_dir or os.path.join(RESULTS, "peer_runs")
    if not args.report_only:
        train(args, config, args.tag, args.out_dir)
    if args.peer_dir or args.report_only:
        dirs = [args.out_dir] + (args.peer_dir or [])
        report(dirs, args.race_budget, stem, marks)


if __name__ == "__main__":
    main()
