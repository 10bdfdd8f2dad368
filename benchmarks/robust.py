"""What LM damping costs on a recurrent model, where rho's Jacobian-vector
products take two reverse passes (TF cannot run an LSTM's traced forward pass
in forward mode): step time of ``KFAC()`` against
``KFAC(damping_adaptation_interval=0)`` on the LSTM client's model (one LSTM of
128 units over 40 one-hot characters, softmax head, batch 128), measured
interleaved in one process (ratios hold under load; the load is recorded).

    python benchmarks/robust.py            # the table in results/robust.md
    python benchmarks/robust.py --quick    # smoke mode

The accuracy side (client programs, LM against fixed damping) is
``python benchmarks/clients.py --only lstm_text_generation,mnist_moe``.
"""

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_kfac  # noqa: E402

WINDOW, ALPHABET, UNITS, BATCH = 40, 48, 128, 128


def lstm_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((WINDOW, ALPHABET)),
            keras.layers.LSTM(UNITS),
            keras.layers.Dense(ALPHABET, activation="softmax"),
        ]
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    steps, warmup = (10, 5) if args.quick else (100, 10)
    rng = np.random.default_rng(0)
    codes = rng.integers(0, ALPHABET, size=(BATCH, WINDOW + 1))
    eye = np.eye(ALPHABET, dtype="float32")
    x, y = eye[codes[:, :-1]], eye[codes[:, -1]]
    runs = {
        "KFAC() (LM every 5 steps)": {},
        "KFAC(damping_adaptation_interval=0)": {"damping_adaptation_interval": 0},
    }
    models = {}
    for name, kwargs in runs.items():
        model = lstm_model()
        model.compile(keras_kfac.KFAC(**kwargs), loss="categorical_crossentropy")
        for _ in range(warmup):
            model.train_on_batch(x, y)
        models[name] = model
    times = {name: [] for name in runs}
    load = [os.getloadavg()[0]]
    for _ in range(steps):
        for name, model in models.items():
            start = time.perf_counter()
            model.train_on_batch(x, y)
            times[name].append(time.perf_counter() - start)
    load.append(os.getloadavg()[0])
    fixed = "KFAC(damping_adaptation_interval=0)"
    lines = [
        f"LSTM client model, batch {BATCH}, {steps} interleaved steps each after {warmup} "
        f"warm-up steps; 1-min load average {load[0]:.1f} -> {load[1]:.1f}.",
        "",
        "| run | mean step (ms) | median step (ms) | mean / fixed | median / fixed |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, t in times.items():
        mean, median = statistics.mean(t), statistics.median(t)
        lines.append(
            f"| {name} | {1e3 * mean:.1f} | {1e3 * median:.1f} | "
            f"{mean / statistics.mean(times[fixed]):.2f} | "
            f"{median / statistics.median(times[fixed]):.2f} |"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
