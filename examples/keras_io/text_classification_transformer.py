"""Binary text classifier built from one Transformer encoder block, on generated reviews.

Modeled on keras-io examples/nlp/text_classification_with_transformer.py (this project's own
code, not a copy; IMDB is a download, so the reviews are generated, see below).
Keras features: two custom ``keras.layers.Layer`` s, one adding a token Embedding (20,000
words) to a position Embedding (200 positions), one Transformer encoder block
(MultiHeadAttention with 2 heads of size 32, Dropout, residual connections,
LayerNormalization with epsilon 1e-6, a ReLU Dense of 32 and a linear Dense back to 32);
GlobalAveragePooling1D, Dropout and a 20-unit ReLU Dense before a 2-way softmax;
``sparse_categorical_crossentropy``; ``keras.utils.pad_sequences``; ``fit`` with
``validation_data``. Own optimizer: Adam with Keras defaults.

Data: each review is 40 to 200 word indices drawn from a Zipf law over the vocabulary
(indices 0 to 3 reserved as in ``keras.datasets.imdb``), in which 5 + Poisson(10) positions
are overwritten by "sentiment" words: each is, with probability 0.85, one of the 40 words of
the review's class (0 or 1), otherwise one of the other class's 40. Budget: 6,000 training
and 2,000 validation reviews, 2 epochs, batches of 32 (``--quick``: 256 and 256, 1 epoch).
Reported: last training loss; metric: validation accuracy of the last epoch.
"""

import _client
import keras
import numpy as np
from keras import ops

VOCAB = 20_000
MAX_WORDS = 200
WIDTH = 32
HEADS = 2
FEED_FORWARD = 32
FIRST_WORD = 4  # 0 pads, 1-3 are reserved markers
POLAR_WORDS = 40


def generated_reviews(count, rng):
    ranks = np.arange(1, VOCAB - FIRST_WORD + 1)
    zipf = (1.0 / ranks) / np.sum(1.0 / ranks)
    # Mid-frequency words carry the sentiment: neither stop words nor one-off words.
    polar = 200 + np.arange(2 * POLAR_WORDS).reshape(2, POLAR_WORDS)
    labels = rng.integers(2, size=count)
    reviews = []
    for label in labels:
        words = FIRST_WORD + rng.choice(len(ranks), size=rng.integers(40, MAX_WORDS + 1), p=zipf)
        planted = min(5 + rng.poisson(10), len(words))
        side = np.where(rng.random(planted) < 0.85, label, 1 - label)
        spots = rng.choice(len(words), size=planted, replace=False)
        words[spots] = polar[side, rng.integers(POLAR_WORDS, size=planted)]
        reviews.append(words.tolist())
    return keras.utils.pad_sequences(reviews, maxlen=MAX_WORDS), labels


class WordAndPositionEmbedding(keras.layers.Layer):
    def __init__(self, vocab, length, width, **kwargs):
        super().__init__(**kwargs)
        self.words = keras.layers.Embedding(vocab, width)
        self.positions = keras.layers.Embedding(length, width)

    def call(self, word_ids):
        where = ops.arange(ops.shape(word_ids)[-1])
        return self.words(word_ids) + self.positions(where)


class EncoderBlock(keras.layers.Layer):
    def __init__(self, width, heads, hidden, dropout=0.1, **kwargs):
        super().__init__(**kwargs)
        self.attention = keras.layers.MultiHeadAttention(num_heads=heads, key_dim=width)
        self.expand = keras.layers.Dense(hidden, activation="relu")
        self.project = keras.layers.Dense(width)
        self.norm_attention = keras.layers.LayerNormalization(epsilon=1e-6)
        self.norm_feed_forward = keras.layers.LayerNormalization(epsilon=1e-6)
        self.drop_attention = keras.layers.Dropout(dropout)
        self.drop_feed_forward = keras.layers.Dropout(dropout)

    def call(self, tokens, training=None):
        mixed = self.drop_attention(self.attention(tokens, tokens), training=training)
        tokens = self.norm_attention(tokens + mixed)
        update = self.drop_feed_forward(self.project(self.expand(tokens)), training=training)
        return self.norm_feed_forward(tokens + update)


def review_classifier():
    word_ids = keras.Input(shape=(MAX_WORDS,), dtype="int32")
    tokens = WordAndPositionEmbedding(VOCAB, MAX_WORDS, WIDTH)(word_ids)
    tokens = EncoderBlock(WIDTH, HEADS, FEED_FORWARD)(tokens)
    h = keras.layers.Dropout(0.1)(keras.layers.GlobalAveragePooling1D()(tokens))
    h = keras.layers.Dropout(0.1)(keras.layers.Dense(20, activation="relu")(h))
    return keras.Model(word_ids, keras.layers.Dense(2, activation="softmax")(h), name="reviews")


rng = np.random.default_rng(_client.ARGS.seed)
x_fit, y_fit = generated_reviews(_client.budget(6_000, 256), rng)
x_val, y_val = generated_reviews(_client.budget(2_000, 256), rng)

model = review_classifier()
model.compile(
    optimizer=_client.optimizer("adam"),
    loss="sparse_categorical_crossentropy",
    metrics=["accuracy"],
)
log = model.fit(
    x_fit,
    y_fit,
    batch_size=32,
    epochs=_client.budget(2, 1),
    validation_data=(x_val, y_val),
    verbose=2,
)

_client.report(
    log.history["loss"][-1], "val_accuracy", log.history["val_accuracy"][-1], higher_is_better=True
)
