"""Run the client corpus (``examples/keras_io/``: programs modeled on keras-io examples,
written for this project) with each program's own optimizer and with
``keras_kfac.KFAC()``, and tabulate the results.

    python benchmarks/clients.py                      # full budget (~1 min per own run)
    python benchmarks/clients.py --quick              # a few steps per run (smoke test)
    python benchmarks/clients.py --only vae,mnist_moe

Each run is a subprocess (``--optimizer own|kfac``, same seed); a run that fails or
times out is recorded with the last line of its error. Writes
``benchmarks/results/clients.md`` and ``clients.json`` (``clients_quick.*`` with
``--quick``; ``$KERAS_KFAC_RESULTS`` overrides the folder).

"KFAC equal or better?" (the rule, :func:`verdict`): an accuracy (higher is better)
counts as equal or better if KFAC()'s is at least the own optimizer's minus 0.005
(half a percentage point); a loss (lower is better) if KFAC()'s is at most the own
optimizer's plus 0.5 % of its magnitude; and, whatever the metric, KFAC()'s final
training loss must not exceed twice the own optimizer's (a metric can look fine after a
late loss blow-up). A KFAC() run that fails, times out or ends with a non-finite loss or
metric is a "no"; when the own run failed there is no verdict.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import RESULTS, machine  # noqa: E402

EXAMPLES = os.path.join(ROOT, "examples", "keras_io")
RESULT_TAG = "CLIENT_RESULT"  # examples/keras_io/_client.py prints it

#: name -> what the program exercises (its file is examples/keras_io/<name>.py).
PROGRAMS = {
    "mnist_convnet": "plain Sequential convnet, NumPy arrays, validation_split (Adam)",
    "antirectifier": "custom layer with its own kernel, Dropout, logits loss (RMSprop)",
    "mnist_moe": "mixture of experts: custom layer, custom train_step/test_step, penalty added in the step (Adam)",
    "vae": "VAE: custom train_step, encoder/decoder sub-models, no compiled loss (Adam)",
    "conditional_gan": "GAN: two optimizers in one train_step, discriminator called twice, tf.data (Adam x2)",
    "siamese_contrastive": "siamese: shared sub-model, two inputs, custom contrastive loss, BatchNorm (RMSprop)",
    "lstm_text_generation": "RNN: character-level LSTM on the fortunes text (RMSprop lr 0.01)",
    "text_classification_transformer": "Transformer block: Embedding, MultiHeadAttention, LayerNorm; generated data (Adam)",
    "multi_io": "two inputs (Conv2D, Conv1D), two outputs, per-output losses and loss weights, tf.data of dicts; generated data (RMSprop)",
    "tfdata_mnist": "tf.data.Dataset input, functional MLP (RMSprop)",
    "pydataset_mnist": "keras.utils.PyDataset input and validation (RMSprop)",
}

ACCURACY_SLACK = 0.005  # absolute, for metrics where higher is better
LOSS_SLACK = 0.005  # relative, for metrics where lower is better
BLOWUP = 2.0  # KFAC's final training loss over the own optimizer's, beyond which: "no"


def _finite(v):
    return isinstance(v, (int, float)) and math.isfinite(v)


def _last_error_line(output):
    """The exception's last line: the last line naming an Error/Exception, else the last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if head.endswith(("Error", "Exception", "Exit", "Interrupt")) or "Error: " in line:
            return line[:500]
    return lines[-1][:500] if lines else "no output"


def run_program(name, optimizer, quick=False, timeout=None, seed=None):
    """Run one program in a subprocess; return its result dict (``error`` set on failure)."""
    cmd = [sys.executable, os.path.join(EXAMPLES, f"{name}.py"), "--optimizer", optimizer]
    if quick:
        cmd.append("--quick")
    if seed is not None:
        cmd += ["--seed", str(seed)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    started = time.perf_counter()
    # The machine is shared: the load next to each time says how much of it was ours.
    record = {
        "program": name,
        "optimizer": optimizer,
        "quick": quick,
        "error": None,
        "load_before": round(os.getloadavg()[0], 1),
    }
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"") + (e.stderr or b"")
        out = out.decode(errors="replace") if isinstance(out, bytes) else out
        record.update(error=f"timeout after {timeout} s", log_tail=out.splitlines()[-30:])
        record["seconds"] = round(time.perf_counter() - started, 1)
        return record
    output = proc.stdout + "\n" + proc.stderr
    results = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not results:
        record["error"] = _last_error_line(proc.stderr or proc.stdout)
        record["returncode"] = proc.returncode
        record["log_tail"] = output.strip().splitlines()[-40:]
        record["seconds"] = round(time.perf_counter() - started, 1)
        return record
    payload = json.loads(results[-1][len(RESULT_TAG) :])
    for key in ("loss", "metric"):  # non-finite numbers arrive as strings ('nan', 'inf')
        if isinstance(payload[key], str):
            payload[key] = float(payload[key])
    record.update(payload)
    return record


def verdict(own, kfac):
    """'yes' / 'no' / '' (no verdict) by the rule in the module docstring."""
    if own.get("error") or not _finite(own.get("metric")):
        return ""
    if kfac.get("error"):
        return "no (error)"
    if not (_finite(kfac.get("metric")) and _finite(kfac.get("loss"))):
        return "no (not finite)"
    if _finite(own.get("loss")) and own["loss"] > 0 and kfac["loss"] > BLOWUP * own["loss"]:
        return f"no (training loss x{kfac['loss'] / own['loss']:.1f})"
    a, b = own["metric"], kfac["metric"]
    if own["higher_is_better"]:
        ok = b >= a - ACCURACY_SLACK
    else:
        ok = b <= a + LOSS_SLACK * abs(a)
    return "yes" if ok else "no"


def _fmt(v, digits=4):
    if isinstance(v, float):
        return f"{v:.{digits}g}" if math.isfinite(v) else str(v)
    return "" if v is None else str(v)


def _short(error, limit=160):
    """The error's first sentence (the JSON keeps the whole line and the log's tail)."""
    cut = error.find(". ", 40)
    text = error[: cut + 1] if 0 < cut < limit else error[:limit]
    return text.replace("|", "\\|")


def _cells(r):
    if r.get("error"):
        return ["", "", _fmt(r.get("seconds"), 3), _short(r["error"])]
    return [_fmt(r["loss"]), _fmt(r["metric"]), _fmt(r["seconds"], 3), ""]


def _extra(own, kfac):
    """The programs' other numbers (not judged), as ``name own / KFAC``."""
    names = list(dict.fromkeys([*own.get("extra", {}), *kfac.get("extra", {})]))
    return "; ".join(
        f"{n} {_fmt(own.get('extra', {}).get(n))} / {_fmt(kfac.get('extra', {}).get(n))}"
        for n in names
    )


def _load_note(rows):
    loads = [r[o]["load_before"] for r in rows for o in ("own", "kfac") if "load_before" in r[o]]
    if not loads:
        return ""
    return (
        f"Load average (1 min) before each run: {min(loads):g} to {max(loads):g} "
        f"(shared machine: times are inflated when it exceeds the 2 cores). "
    )


def markdown(rows, quick, command):
    lines = [
        "# Client programs (modeled on keras-io examples): own optimizer vs `keras_kfac.KFAC()`",
        "",
        f"Command: `{command}`. Machine: {machine()}. {_load_note(rows)}"
        f"Budget: {'--quick (a few steps; smoke test, not a comparison)' if quick else 'full (see each file docstring)'}.",
        "Each program (`examples/keras_io/`) is modeled on a keras-io example and written for "
        "this project; it runs twice in a subprocess with the same seed: with its own "
        "optimizer and with `KFAC()` (no "
        "arguments). Loss: final training loss; metric: the program's main metric "
        "(name in the table, ↑ higher / ↓ lower is better); time: wall seconds of the "
        "whole program (data, compile, training, evaluation).",
        f'Rule for "KFAC equal or better?": accuracy-like metrics (↑): KFAC ≥ own − '
        f"{ACCURACY_SLACK}; loss-like metrics (↓): KFAC ≤ own + {LOSS_SLACK:.1%} of |own|. "
        f"And KFAC's final training loss ≤ {BLOWUP:g} × own's. "
        'A KFAC() error, timeout or non-finite result is a "no". '
        '"other": numbers a program also reports, shown but not judged.',
        "",
        "| program | exercises | metric | own loss | own metric | own s | own error "
        "| KFAC loss | KFAC metric | KFAC s | KFAC error | KFAC equal or better? | other (own / KFAC) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        own, kfac = row["own"], row["kfac"]
        meta = own if not own.get("error") else kfac
        metric = ""
        if meta.get("metric_name"):
            metric = meta["metric_name"] + (" ↑" if meta["higher_is_better"] else " ↓")
        lines.append(
            "| "
            + " | ".join(
                [row["program"], PROGRAMS[row["program"]], metric]
                + _cells(own)
                + _cells(kfac)
                + [row["verdict"], _extra(own, kfac)]
            )
            + " |"
        )
    judged = [r for r in rows if r["verdict"]]
    yes = sum(r["verdict"] == "yes" for r in judged)
    lines += ["", f"KFAC() equal or better on {yes} of {len(judged)} programs with a verdict."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few training steps per run")
    parser.add_argument("--only", default="", help="comma-separated program names")
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds per run (default 600, 240 with --quick)",
    )
    parser.add_argument("--seed", type=int, default=None, help="passed to every program")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(PROGRAMS)
    unknown = sorted(set(names) - set(PROGRAMS))
    if unknown:
        parser.error(f"unknown program(s) {', '.join(unknown)}; known: {', '.join(PROGRAMS)}")
    timeout = args.timeout or (240 if args.quick else 600)

    rows = []
    for name in names:
        row = {"program": name, "exercises": PROGRAMS[name]}
        for optimizer in ("own", "kfac"):
            r = run_program(name, optimizer, quick=args.quick, timeout=timeout, seed=args.seed)
            row[optimizer] = r
            print(
                f"{name:32s} {optimizer:4s} "
                + (
                    f"ERROR {r['error']}"
                    if r["error"]
                    else f"loss {_fmt(r['loss'])}  {r['metric_name']} {_fmt(r['metric'])}  "
                    f"{r['seconds']} s"
                ),
                flush=True,
            )
        row["verdict"] = verdict(row["own"], row["kfac"])
        rows.append(row)

    os.makedirs(RESULTS, exist_ok=True)
    stem = os.path.join(RESULTS, "clients" + ("_quick" if args.quick else ""))
    if args.only and os.path.exists(stem + ".json"):
        # --only updates those programs' rows of the existing table.
        with open(stem + ".json") as f:
            previous = {row["program"]: row for row in json.load(f)["rows"]}
        previous.update({row["program"]: row for row in rows})
        rows = [previous[name] for name in PROGRAMS if name in previous]
    command = (
        "python benchmarks/clients.py"
        + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    )
    with open(stem + ".md", "w") as f:
        f.write(markdown(rows, args.quick, command))
    with open(stem + ".json", "w") as f:
        json.dump(
            {
                "command": command,
                "machine": machine(),
                "quick": args.quick,
                "accuracy_slack": ACCURACY_SLACK,
                "loss_slack": LOSS_SLACK,
                "blowup": BLOWUP,
                "rows": rows,
            },
            f,
            indent=1,
        )
    print(f"wrote {stem}.md and {stem}.json")
    return rows


if __name__ == "__main__":
    main()
