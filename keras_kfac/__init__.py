"""keras_kfac: Kronecker-factored approximate natural-gradient training for
Keras 3 (TensorFlow backend).

    model.compile(optimizer=keras_kfac.KFAC(), loss="sparse_categorical_crossentropy")
"""

import os as _os


def _require_tensorflow_backend(backend):
    if backend != "tensorflow":
        raise ImportError(
            "keras_kfac needs the TensorFlow backend of Keras, but the backend is "
            f"{backend!r}. Set the environment variable KERAS_BACKEND=tensorflow "
            'before importing keras (or "backend": "tensorflow" in '
            "~/.keras/keras.json)."
        )


# Checked before importing keras: another backend's import may itself fail.
_require_tensorflow_backend(_os.environ.get("KERAS_BACKEND", "tensorflow"))

import keras as _keras  # noqa: E402

_require_tensorflow_backend(_keras.backend.backend())

from keras_kfac import callbacks, curvature  # noqa: E402
from keras_kfac.optimizer import KFAC  # noqa: E402

__version__ = "0.1.0"

__all__ = ["KFAC", "callbacks", "curvature", "__version__"]
