"""Curvature estimators, one module per approximation, behind one interface
(:class:`keras_kfac.curvature.base.Curvature`). Adding a method means adding a
module and registering its class here; the optimizer never changes."""

from keras_kfac.curvature.base import Curvature, LayerBatch
from keras_kfac.curvature.kfac import KFAC

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


register(KFAC)

__all__ = ["Curvature", "LayerBatch", "available", "get", "register"]
