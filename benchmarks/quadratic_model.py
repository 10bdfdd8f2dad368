"""The quadratic model on a sub-batch: how far rho, alpha and mu move from
their whole-batch values (``KFAC(quadratic_model_batch_size=...)``).

On each task a KFAC run with the whole-batch quadratic model trains; every
``--every`` steps, at the parameters the step started from and with the
step's own state (dropout masks), the step is re-measured on the first ``m``
examples for every ``m`` of the grid, next to the whole batch:

* ``rho`` of the default ``KFAC()``'s actual update (Levenberg-Marquardt,
  sec. 6.5), and whether the damping rule takes the same decision;
* ``alpha``, ``mu`` of ``KFAC(adaptive_step=True)`` with kfac-jax's cadence
  (sec. 7), the natural direction recovered from the step taken, with the
  linear term ``b`` from the whole batch's gradient ("b full") or from the
  sub-batch's own ("b sub", what ``adaptive_step`` does); the
  efficiency is the whole-batch model reduction of the sub-batch's step over
  the optimal one (1: as good as the whole batch).

Per step, so the machine's load does not matter.

    python benchmarks/quadratic_model.py            # results/quadratic.md
    python benchmarks/quadratic_model.py --quick    # smoke, a minute
"""

import argparse
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from divergence import build_model as divergence_model  # noqa: E402
from harness import RESULTS, machine  # noqa: E402
from peer import BATCH as PEER_BATCH  # noqa: E402
from peer import build_model as peer_model  # noqa: E402
from peer import compile_model as peer_compile  # noqa: E402

import keras_kfac  # noqa: E402
from keras_kfac import datasets, quadratic  # noqa: E402

PEER_CADENCE = dict(
    adaptive_step=True, damping=1.0, stats_every=1, stats_decay=0.95, inverse_every=5
)


def tasks(quick):
    """name -> (build_and_compile(optimizer) -> model, x, y, batch, sizes)."""
    images, labels = datasets.load_numpy("mnist", "train")
    images = images.reshape(len(images), -1).astype("float32")
    n = 4000 if quick else 20000

    def autoencoder(opt):
        model = peer_model(1e-5, 0)
        peer_compile(model, opt)
        return model

    def mlp(opt):
        keras.utils.set_random_seed(0)
        model = divergence_model("mlp")
        model.compile(
            optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        )
        return model

    return {
        "ReLU AE (peer), batch 1000": (
            autoencoder,
            images[:n],
            images[:n],
            PEER_BATCH,
            (32, 64, 125, 250, 500),
        ),
        "MNIST MLP dropout, batch 128": (mlp, images[:n], labels[:n], 128, (16, 32, 64)),
    }


def lm_decision(rho):
    """-1: damping down (rho > 3/4), +1: up (rho < 1/4 or NaN), 0: kept."""
    if not np.isfinite(rho) or rho < 0.25:
        return 1
    return -1 if rho > 0.75 else 0


def measure_task(build, x, y, batch, sizes, steps, every, adaptive):
    """Per measured step: ``{m: values}`` with ``m = None`` the whole batch."""
    config = dict(PEER_CADENCE) if adaptive else {}
    opt = keras_kfac.KFAC(seed=0, quadratic_model_batch_size=None, **config)
    model = build(opt)
    opt.build(model.trainable_variables)
    variables = model.trainable_variables
    capture = opt.estimator.capture
    grid = (None,) + tuple(sizes)

    @tf.function
    def measure(xb, yb, state, old, delta, natural, previous, damping):
        full = quadratic.BatchObjective(model, capture, (xb, yb, None), state)
        with tf.GradientTape() as tape:
            tape.watch(old)
            loss = full.loss(old)
        grads = tape.gradient(loss, old)
        new = [o + d for o, d in zip(old, delta)]
        out = []
        for m in grid:
            objective = quadratic.BatchObjective(model, capture, (xb, yb, None), state, m).subset
            if adaptive:
                q, _, slopes = quadratic.gram(objective, old, [natural, previous], damping)
                b_full = tf.stack([quadratic.dot(grads, natural), quadratic.dot(grads, previous)])
                out.append((q, b_full, slopes))
            else:
                predicted, before = quadratic.model_reduction(objective, old, delta, damping)
                out.append(quadratic.reduction_ratio(objective.loss(new) - before, predicted))
        return out

    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))
    records = []
    for step in range(1, steps + 1):
        start = (step - 1) * batch % (len(x) - batch + 1)
        idx = order[start : start + batch]
        xb, yb = tf.constant(x[idx]), tf.constant(y[idx])
        take = step % every == 0 and step > 1
        if take:
            state = [tf.identity(v.value) for v in model.non_trainable_variables]
            old = [tf.identity(v.value) for v in variables]
            damping = tf.constant(float(opt.damping))
            previous = (
                [tf.identity(opt.previous_update(v).value) for v in variables] if adaptive else old
            )
        model.train_on_batch(xb, yb)
        if not take:
            continue
        delta = [v.value - o for v, o in zip(variables, old)]
        natural = delta
        d = opt.diagnostics()
        if adaptive:
            alpha, mu = float(d["alpha"]), float(d["mu"])
            if alpha == 0.0:
                continue
            natural = [(dl - mu * p) / alpha for dl, p in zip(delta, previous)]
        out = measure(xb, yb, state, old, delta, natural, previous, damping)
        row = {"step": step}
        for m, values in zip(grid, out):
            if adaptive:
                q, b_full, slopes = (t.numpy().astype(np.float64) for t in values)
                row[m] = {"q": q, "b_full": b_full, "b_sub": slopes}
            else:
                row[m] = float(values)
        if adaptive:
            row["optimizer"] = (alpha, mu)
        else:
            row["optimizer_rho"] = float(d["rho"]) if step % 5 == 0 else None
        records.append(row)
    return records


def solve(q, b):
    alpha, mu, _ = quadratic.solve_step_coefficients(
        tf.constant(q, tf.float64), tf.constant(b, tf.float64)
    )
    return np.array([float(alpha), float(mu)])


def summarize(records, sizes, adaptive):
    """Per sub-batch size: the spread against the whole batch (medians over
    the measured steps)."""
    rows = []
    for m in sizes:
        if not adaptive:
            diffs = [abs(r[m] - r[None]) for r in records if np.isfinite(r[m] - r[None])]
            agree = [lm_decision(r[m]) == lm_decision(r[None]) for r in records]
            rows.append(
                {
                    "m": m,
                    "rho_abs_diff_median": statistics.median(diffs) if diffs else float("nan"),
                    "rho_abs_diff_p90": float(np.percentile(diffs, 90)) if diffs else float("nan"),
                    "lm_agreement": float(np.mean(agree)),
                    "rho_full_median": statistics.median(r[None] for r in records),
                }
            )
            continue
        row = {"m": m}
        for b_key in ("b_full", "b_sub"):
            alpha_err, mu_err, efficiency = [], [], []
            for r in records:
                full, sub = r[None], r[m]
                x_full = solve(full["q"], full["b_full"])
                x_sub = solve(sub["q"], sub[b_key])
                alpha_err.append(abs(x_sub[0] / x_full[0] - 1.0))
                mu_err.append(abs(x_sub[1] - x_full[1]))

                def reduction(x, f=full):
                    return 0.5 * x @ f["q"] @ x + f["b_full"] @ x

                efficiency.append(reduction(x_sub) / reduction(x_full))
            row[b_key] = {
                "alpha_rel_err_median": statistics.median(alpha_err),
                "alpha_rel_err_p90": float(np.percentile(alpha_err, 90)),
                "mu_abs_err_median": statistics.median(mu_err),
                "efficiency_median": statistics.median(efficiency),
                "efficiency_p10": float(np.percentile(efficiency, 10)),
            }
        rows.append(row)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="smoke: 10 steps")
    args = ap.parse_args(argv)
    steps, every = (10, 5) if args.quick else (args.steps, args.every)
    load = [os.getloadavg()[0]]
    lines = [
        "### The quadratic model on a sub-batch: spread against the whole batch",
        "",
        f"`python benchmarks/quadratic_model.py {' '.join(sys.argv[1:])}` on {machine()}; "
        f"{steps} steps, measured every {every}; medians over the measured steps. rho: the "
        "default `KFAC()`'s steps; alpha/mu: `KFAC(adaptive_step=True, damping=1, "
        "stats_every=1, stats_decay=0.95, inverse_every=5)`. Efficiency: the whole-batch "
        "model reduction of the sub-batch's (alpha, mu) over the whole batch's optimum.",
        "",
    ]
    results = {}
    for name, (build, x, y, batch, sizes) in tasks(args.quick).items():
        rho_records = measure_task(build, x, y, batch, sizes, steps, every, adaptive=False)
        step_records = measure_task(build, x, y, batch, sizes, steps, every, adaptive=True)
        load.append(os.getloadavg()[0])
        rho_rows = summarize(rho_records, sizes, adaptive=False)
        step_rows = summarize(step_records, sizes, adaptive=True)
        # The whole-batch values recomputed here against the optimizer's own
        # (validates the measurement).
        rho_check = max(
            [abs(r["optimizer_rho"] - r[None]) for r in rho_records if r["optimizer_rho"]]
            or [float("nan")]
        )
        alpha_check = max(
            abs(solve(r[None]["q"], r[None]["b_full"])[0] / r["optimizer"][0] - 1.0)
            for r in step_records
        )
        results[name] = {
            "rho": rho_rows,
            "adaptive": step_rows,
            "check_rho_abs": rho_check,
            "check_alpha_rel": alpha_check,
        }
        lines += [
            f"**{name}** ({len(rho_records)} and {len(step_records)} measured steps; whole-"
            f"batch rho median {rho_rows[0]['rho_full_median']:.3f}; the whole-batch values "
            f"recomputed here differ from the optimizer's by at most {rho_check:.1e} (rho) "
            f"and {alpha_check:.1e} (alpha, relative))",
            "",
            "| m | rho abs. diff (median / p90) | LM decision agrees | alpha rel. err, b full "
            "| mu abs. err, b full | efficiency, b full (median / p10) | alpha rel. err, b sub "
            "| efficiency, b sub (median / p10) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r, a in zip(rho_rows, step_rows):
            f, s = a["b_full"], a["b_sub"]
            lines.append(
                f"| {r['m']} | {r['rho_abs_diff_median']:.3f} / {r['rho_abs_diff_p90']:.3f} | "
                f"{r['lm_agreement']:.2f} | {f['alpha_rel_err_median']:.3f} | "
                f"{f['mu_abs_err_median']:.3f} | {f['efficiency_median']:.3f} / "
                f"{f['efficiency_p10']:.3f} | {s['alpha_rel_err_median']:.3f} | "
                f"{s['efficiency_median']:.3f} / {s['efficiency_p10']:.3f} |"
            )
        lines.append("")
    lines.append(f"Load (1 min) over the run: {min(load):.1f}-{max(load):.1f}.")
    md = "\n".join(lines) + "\n"
    name = "quadratic" + ("_quick" if args.quick else "")
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, name + ".json"), "w") as f:
        json.dump({"machine": machine(), "load": load, "tasks": results}, f, indent=1)
    with open(os.path.join(RESULTS, name + ".md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
