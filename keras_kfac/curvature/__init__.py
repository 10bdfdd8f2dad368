"""Curvature estimators, one module per approximation, behind one interface
(:class:`keras_kfac.curvature.base.Curvature`). Adding a method means adding a
module and registering its class here; the optimizer never changes."""

from keras_kfac.curvature.auto import Auto
from keras_kfac.curvature.base import Curvature, LayerBatch
from keras_kfac.curvature.cgfac import CGFAC
from keras_kfac.curvature.deflation import Deflation
from keras_kfac.curvature.diagonal import Diagonal
from keras_kfac.curvature.ekfac import EKFAC
from keras_kfac.curvature.kfac import KFAC
from keras_kfac.curvature.kfac_corrected import KFACCorrected
from keras_kfac.curvature.kpsvd import KPSVD
from keras_kfac.curvature.lanczos import Lanczos
from keras_kfac.curvature.tengrad import TENGraD

_METHODS = {}


def register(cls):
    """Make ``cls`` selectable as ``KFAC(curvature=cls.name)``."""
    _METHODS[cls.name] = cls
    return cls


def available():
    return sorted(_METHODS)


def get(name):
    """The curvature class called ``name``, or a ValueError listing the choices."""
    if name not in _METHODS:
        raise ValueError(
            f"Unknown curvature={name!r}. Available: {', '.join(available())}."
        )
    return _METHODS[name]


for _cls in (KFAC, EKFAC, KPSVD, Deflation, KFACCorrected, Lanczos, TENGraD, CGFAC, Diagonal, Auto):
    register(_cls)

__all__ = ["Curvature", "LayerBatch", "available", "get", "register"]
