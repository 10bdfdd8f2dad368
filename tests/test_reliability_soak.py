"""Soak test (slow): a few thousand K-FAC steps with evaluate/predict
interleaved. Memory must stay flat, the train/eval/predict functions must
never be retraced, and the instrumentation must hold no tensor between steps."""

import os

import keras
import numpy as np
import pytest

import keras_kfac

STEPS = int(os.environ.get("KFAC_SOAK_STEPS", "3000"))


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.slow
def test_soak_memory_flat_and_no_retracing():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 4, size=(512,))
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(4),
        ]
    )
    opt = keras_kfac.KFAC(inverse_every=10)
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    traces = {"train": 0}
    original = model.train_step

    def counting_train_step(data):
        traces["train"] += 1  # Python runs only while tracing
        return original(data)

    model.train_step = counting_train_step
    steps_per_round = 512 // 32  # one epoch
    rounds = max(STEPS // steps_per_round, 4)
    memory, functions = [], None
    for r in range(rounds):
        model.fit(x, y, batch_size=32, epochs=1, verbose=0)
        model.evaluate(x[:64], y[:64], verbose=0)
        model.predict(x[:64], verbose=0)
        assert opt.estimator.capture._record is None  # nothing recorded survives a step
        if r == 1:
            functions = (model.train_function, model.test_function, model.predict_function)
            traces_after_warmup = traces["train"]
        if r >= 1:
            memory.append(rss_mb())
    assert int(opt.iterations) == rounds * steps_per_round
    assert int(opt.skipped_steps) == 0
    assert (model.train_function, model.test_function, model.predict_function) == functions
    assert traces["train"] == traces_after_warmup <= 2
    growth = memory[-1] - memory[0]
    assert growth < 40.0, f"RSS grew by {growth:.1f} MB over {rounds} epochs: {memory[::10]}"
    assert np.all(np.isfinite(model.predict(x[:8], verbose=0)))
