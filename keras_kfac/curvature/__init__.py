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
from keras_kfac.curvature.scale_and_shift import ScaleAndShift
from keras_kfac.curvature.tengrad import TENGraD

_METHODS = {}
#: Registered classes that blocks fix for themselves (``fixed_curvature``)
#: and users cannot choose: they apply to one kind of block only.
_FIXED = set()


def register(cls, selectable=True):
    """Make ``cls`` selectable as ``KFAC(curvature=cls.name)`` (or, with
    ``selectable=False``, only findable by :func:`get` for blocks that name
    it as their ``fixed_curvature``)."""
    _METHODS[cls.name] = cls
    if not selectable:
        _FIXED.add(cls.name)
    return cls


def available():
    """The names users can pass as ``KFAC(curvature=...)``."""
    return sorted(set(_METHODS) - _FIXED)


def get(name):
    """The curvature class called ``name``, or a ValueError listing the choices."""
    if name not in _METHODS:
        raise ValueError(f"Unknown curvature={name!r}. Available: {', '.join(available())}.")
    return _METHODS[name]


def create(name, block, damping_mode="factored", **options):
    """The curvature ``name`` for ``block``, given the ``options`` it accepts
    (``KFAC(curvature_options=...)`` are shared by every layer's method, and
    each method takes its own; unknown keys are rejected at construction by
    the optimizer)."""
    cls = get(name)
    accepted = cls.option_names()
    return cls(
        block, damping_mode=damping_mode, **{k: v for k, v in options.items() if k in accepted}
    )


for _cls in (KFAC, EKFAC, KPSVD, Deflation, KFACCorrected, Lanczos, TENGraD, CGFAC, Diagonal, Auto):
    register(_cls)
register(ScaleAndShift, selectable=False)

__all__ = ["Curvature", "LayerBatch", "available", "create", "get", "register"]
