"""Character-level LSTM language model on the fortunes text, with temperature sampling.

Modeled on keras-io examples/generative/lstm_character_level_text_generation.py (this
project's own code, not a copy; it reads the offline fortunes text instead of a download).
Keras features: a ``keras.Sequential`` with one LSTM of 128 units over one-hot characters
(boolean arrays) and a softmax Dense over the alphabet; ``categorical_crossentropy``;
``fit`` on NumPy arrays; ``predict`` in a sampling loop; ``evaluate`` on held-out text.
Own optimizer: RMSprop, learning rate 0.01.

Data: the lower-cased fortunes text (shared/datasets/fortunes); windows of 40 characters
every 3 characters, each predicting the next character. Budget: the first 150,000
characters for training (about 50,000 windows; ``--quick``: 6,000 characters), one epoch,
batches of 128; the next 30,000 characters (``--quick``: 3,000) held out. After training, 40
characters are sampled at temperatures 0.5 and 1.0 (``--quick``: 2). Reported: last
training loss; metric: held-out cross-entropy (lower is better).
"""

import _client
import keras
import numpy as np

WINDOW = 40
STRIDE = 3


def one_hot_windows(text, index_of):
    """Boolean (N, WINDOW, V) inputs and (N, V) next-character targets."""
    codes = np.array([index_of[c] for c in text])
    starts = np.arange(0, len(text) - WINDOW, STRIDE)
    eye = np.eye(len(index_of), dtype=bool)
    inputs = eye[codes[starts[:, None] + np.arange(WINDOW)]]
    return inputs, eye[codes[starts + WINDOW]]


def sample_next(probabilities, temperature, rng):
    logits = np.log(np.maximum(probabilities.astype("float64"), 1e-12)) / temperature
    weights = np.exp(logits - logits.max())
    return rng.choice(len(weights), p=weights / weights.sum())


corpus = _client.fortunes_text().lower()
n_fit, n_heldout = _client.budget(150_000, 6_000), _client.budget(30_000, 3_000)
fit_text, heldout_text = corpus[:n_fit], corpus[n_fit : n_fit + n_heldout]
alphabet = sorted(set(fit_text) | set(heldout_text))
index_of = {c: i for i, c in enumerate(alphabet)}
x_fit, y_fit = one_hot_windows(fit_text, index_of)
x_heldout, y_heldout = one_hot_windows(heldout_text, index_of)
print(f"{len(alphabet)} characters, {len(x_fit)} training and {len(x_heldout)} held-out windows")

model = keras.Sequential(
    [
        keras.Input(shape=(WINDOW, len(alphabet))),
        keras.layers.LSTM(128),
        keras.layers.Dense(len(alphabet), activation="softmax"),
    ],
    name="char_lstm",
)
model.compile(
    optimizer=_client.optimizer(keras.optimizers.RMSprop(learning_rate=0.01)),
    loss="categorical_crossentropy",
)
log = model.fit(x_fit, y_fit, batch_size=128, epochs=1, verbose=2)

rng = np.random.default_rng(_client.ARGS.seed)
start = int(rng.integers(len(fit_text) - WINDOW))
for temperature in (0.5, 1.0):
    context = fit_text[start : start + WINDOW]
    produced = []
    for _ in range(_client.budget(40, 2)):
        window = np.zeros((1, WINDOW, len(alphabet)), dtype=bool)
        window[0, np.arange(WINDOW), [index_of[c] for c in context]] = True
        probabilities = model.predict(window, verbose=0)[0]
        produced.append(alphabet[sample_next(probabilities, temperature, rng)])
        context = context[1:] + produced[-1]
    print(f"T={temperature}: {fit_text[start : start + WINDOW]!r} -> {''.join(produced)!r}")

heldout_loss = model.evaluate(x_heldout, y_heldout, verbose=0)
_client.report(log.history["loss"][-1], "heldout_loss", heldout_loss, higher_is_better=False)
