"""Share of trainable parameters inside a curvature block, per model.

    python benchmarks/coverage.py            # the table of the README
    python benchmarks/coverage.py --json out.json

Uses the optimizer's own block discovery (``keras_kfac.layers.blocks_for_layer``
over the layers ``keras_kfac.capture.candidate_layers`` instruments, with
KFAC's default block options), so the numbers are what ``KFAC()`` would
precondition, without allocating any factor. Models: ``keras.applications``
with ``weights=None`` (no download), and three sequence models of the kind the
keras-io examples build (a Transformer text classifier, a ViT, a Conv1D + LSTM
model), written here.
"""

import argparse
import collections
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from keras_kfac import compat  # noqa: E402
from keras_kfac.capture import candidate_layers  # noqa: E402
from keras_kfac.layers import blocks_for_layer  # noqa: E402


def count(variables):
    return int(sum(np.prod(v.shape) for v in variables))


def coverage(model):
    """``(covered, total, fallback layer types)`` of ``model``."""
    covered = {}
    for layer in candidate_layers(model):
        for block in blocks_for_layer(layer, model=model):
            for v in block.variables:
                covered[id(v)] = v
    total = model.trainable_variables
    covered = {id(v): v for v in total if id(v) in covered}
    missing = {id(v) for v in total if id(v) not in covered}
    owners = {}
    for layer in compat.flatten_layers(model):
        for v in layer.trainable_weights:
            if id(v) in missing:
                owners[id(v)] = layer  # innermost owner last
    kinds = collections.Counter(
        type(layer).__name__ for layer in {id(owner): owner for owner in owners.values()}.values()
    )
    return count(covered.values()), count(total), [f"{n} x{k}" for n, k in sorted(kinds.items())]


class TransformerBlock(keras.layers.Layer):
    """Self-attention + feed-forward with residuals and layer norms."""

    def __init__(self, dim, heads, hidden, **kwargs):
        super().__init__(**kwargs)
        self.attention = keras.layers.MultiHeadAttention(heads, dim)
        self.feed_forward = keras.Sequential(
            [keras.layers.Dense(hidden, activation="relu"), keras.layers.Dense(dim)]
        )
        self.norm1 = keras.layers.LayerNormalization(epsilon=1e-6)
        self.norm2 = keras.layers.LayerNormalization(epsilon=1e-6)

    def call(self, x):
        x = self.norm1(x + self.attention(x, x))
        return self.norm2(x + self.feed_forward(x))


class TokenAndPosition(keras.layers.Layer):
    def __init__(self, length, vocab, dim, **kwargs):
        super().__init__(**kwargs)
        self.tokens = keras.layers.Embedding(vocab, dim)
        self.positions = keras.layers.Embedding(length, dim)

    def call(self, x):
        positions = keras.ops.arange(keras.ops.shape(x)[-1])
        return self.tokens(x) + self.positions(positions)


def transformer_classifier(length=200, vocab=20000, dim=32, heads=2, hidden=32):
    """Two Transformer blocks over token + position embeddings, pooled."""
    inputs = keras.Input((length,), dtype="int32")
    x = TokenAndPosition(length, vocab, dim)(inputs)
    x = TransformerBlock(dim, heads, hidden)(x)
    x = TransformerBlock(dim, heads, hidden)(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    x = keras.layers.Dropout(0.1)(x)
    x = keras.layers.Dense(20, activation="relu")(x)
    return keras.Model(
        inputs, keras.layers.Dense(2, activation="softmax")(x), name="transformer_text"
    )


class PatchEncoder(keras.layers.Layer):
    """Linear projection of image patches plus a learned position embedding."""

    def __init__(self, patches, dim, **kwargs):
        super().__init__(**kwargs)
        self.projection = keras.layers.Dense(dim)
        self.position = keras.layers.Embedding(patches, dim)
        self.patches = patches

    def call(self, x):
        return self.projection(x) + self.position(keras.ops.arange(self.patches))


def vision_transformer(image=72, patch=6, dim=64, heads=4, layers=8, classes=100):
    """A ViT of the keras-io image-classification example's shape."""
    inputs = keras.Input((image, image, 3))
    patches = (image // patch) ** 2
    x = keras.layers.Reshape((patches, patch * patch * 3))(
        keras.layers.Lambda(lambda t: keras.ops.image.extract_patches(t, patch))(inputs)
    )
    x = PatchEncoder(patches, dim)(x)
    for _ in range(layers):
        h = keras.layers.LayerNormalization(epsilon=1e-6)(x)
        h = keras.layers.MultiHeadAttention(heads, dim, dropout=0.1)(h, h)
        x = keras.layers.Add()([h, x])
        h = keras.layers.LayerNormalization(epsilon=1e-6)(x)
        h = keras.layers.Dense(2 * dim, activation="gelu")(h)
        h = keras.layers.Dense(dim, activation="gelu")(h)
        x = keras.layers.Add()([h, x])
    x = keras.layers.LayerNormalization(epsilon=1e-6)(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(2048, activation="gelu")(x)
    x = keras.layers.Dense(1024, activation="gelu")(x)
    return keras.Model(inputs, keras.layers.Dense(classes)(x), name="vit")


def conv1d_lstm(length=100, features=8, classes=5):
    inputs = keras.Input((length, features))
    x = keras.layers.Conv1D(32, 5, activation="relu")(inputs)
    x = keras.layers.MaxPooling1D()(x)
    x = keras.layers.LSTM(64)(x)
    return keras.Model(inputs, keras.layers.Dense(classes)(x), name="conv1d_lstm")


MODELS = {
    "ResNet50": lambda: keras.applications.ResNet50(weights=None),
    "MobileNetV2": lambda: keras.applications.MobileNetV2(weights=None),
    "EfficientNetB0": lambda: keras.applications.EfficientNetB0(weights=None),
    "ConvNeXtTiny": lambda: keras.applications.ConvNeXtTiny(weights=None),
    "VGG16": lambda: keras.applications.VGG16(weights=None),
    "Transformer text classifier": transformer_classifier,
    "ViT": vision_transformer,
    "Conv1D + LSTM": conv1d_lstm,
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated model names")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    names = [n for n in MODELS if not args.only or n in args.only.split(",")]
    rows = []
    print("| model | trainable parameters | in a curvature block | share | fallback |")
    print("|---|---:|---:|---:|---|")
    for name in names:
        keras.backend.clear_session()
        covered, total, kinds = coverage(MODELS[name]())
        rows.append(
            dict(model=name, total=total, covered=covered, share=covered / total, fallback=kinds)
        )
        share = 100 * covered / total
        print(f"| {name} | {total:,} | {covered:,} | {share:.2f}% | {', '.join(kinds) or '-'} |")
        sys.stdout.flush()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
