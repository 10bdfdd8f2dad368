"""Training script for the BackupAndRestore crash-resume test
(tests/test_checkpoint.py). Run as

    python checkpoint_resume_script.py BACKUP_DIR OUT_JSON [HANG_EPOCH HANG_BATCH MARKER]

With a hang point it writes MARKER after that batch (0-based epoch and batch)
and sleeps, so the test can SIGKILL it mid-epoch. ``train`` is also imported
by the test for the uninterrupted reference run.
"""

import json
import os
import sys
import time

EPOCHS, BATCHES, BATCH_SIZE = 4, 8, 8


def data():
    import numpy as np

    rng = np.random.default_rng(0)
    n = BATCHES * BATCH_SIZE
    x = rng.normal(size=(n, 6)).astype("float32")
    y = np.argmax(x @ rng.normal(size=(6, 3)), axis=1)
    return x, y


def train(backup_dir, hang=None, marker=None):
    """Returns (weights as lists, iterations, epochs this run trained)."""
    import keras

    import keras_kfac

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="tanh"),
            keras.layers.LayerNormalization(),
            keras.layers.Dense(3),
        ]
    )
    opt = keras_kfac.KFAC(
        learning_rate=keras.optimizers.schedules.ExponentialDecay(0.05, 8, 0.8),
        inverse_every=3,
        seed=3,  # sampled Fisher; its RNG state is part of the backup
    )
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    epochs = []

    class Progress(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            epochs.append(epoch)

        def on_train_batch_end(self, batch, logs=None):
            if hang is not None and (epochs[-1], batch) == hang:
                with open(marker, "w") as f:
                    f.write("hanging\n")
                time.sleep(600)

    x, y = data()
    model.fit(
        x,
        y,
        batch_size=BATCH_SIZE,
        epochs=EPOCHS,
        shuffle=False,
        verbose=0,
        callbacks=[keras.callbacks.BackupAndRestore(backup_dir, save_freq="epoch"), Progress()],
    )
    return [w.numpy().tolist() for w in model.weights], int(opt.iterations.numpy()), epochs


def main(argv):
    backup_dir, out = argv[0], argv[1]
    hang = marker = None
    if len(argv) > 2:
        hang, marker = (int(argv[2]), int(argv[3])), argv[4]
    weights, iterations, epochs = train(backup_dir, hang, marker)
    with open(out, "w") as f:
        json.dump({"weights": weights, "iterations": iterations, "epochs": epochs}, f)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main(sys.argv[1:])
