"""keras_kfac: Kronecker-factored approximate natural-gradient training for
Keras 3 (TensorFlow backend).

    model.compile(optimizer=keras_kfac.KFAC(), loss="sparse_categorical_crossentropy")
"""

from keras_kfac import curvature
from keras_kfac.optimizer import KFAC

__version__ = "0.1.0"

__all__ = ["KFAC", "curvature", "__version__"]
