"""The curvature-estimator interface shared by every approximation.

A curvature estimator owns the state of one layer block's Fisher
approximation. The optimizer drives it through four calls, all inside the
compiled train step:

1. ``update_statistics(batch, decay)`` on statistics steps,
2. ``refresh(damping)`` on inversion steps (after the statistics update),
3. ``precondition(v, damping, batch)`` on every step,
4. ``matrix()`` (dense, undamped, for tests and diagnostics).

``batch`` is a :class:`LayerBatch`; ``decay`` is 0 on the first statistics
update so running averages start at the first batch's value.
"""

import abc
import inspect
from typing import Callable, Optional

import tensorflow as tf

from keras_kfac.curvature import factors as F


class LayerBatch:
    """What one layer recorded in one train step, as per-location tensors.

    ``inputs``/``output_grads`` are lists over the layer's uses in the forward
    pass (a layer called twice shares its weights, so its uses are treated as
    extra locations, exactly like the spatial locations of a convolution).
    ``grad_scale`` converts recorded pre-activation gradients to per-example
    gradients ``d l_i / d s`` (the batch size for a batch-mean loss, divided by
    any loss scale).
    """

    def __init__(self, block, inputs, output_grads, grad_scale=1.0):
        self.block = block
        self._inputs = list(inputs)
        self._output_grads = list(output_grads)
        self._grad_scale = grad_scale

    def a(self):
        """``(n, T, a_dim)`` homogeneous activations / patches."""
        parts = [self.block.activations(x) for x in self._inputs]
        return parts[0] if len(parts) == 1 else tf.concat(parts, axis=1)

    def g(self):
        """``(n, T, g_dim)`` per-example pre-activation gradients."""
        parts = [self.block.output_gradients(d) for d in self._output_grads]
        g = parts[0] if len(parts) == 1 else tf.concat(parts, axis=1)
        return g * tf.cast(self._grad_scale, tf.float32)

    @property
    def inputs(self):
        """The layer's recorded inputs, one per use (empty for a batch built
        from already computed ``a``/``g``)."""
        return self._inputs

    # K-FAC-expand / K-FAC-reduce (Eschenhagen et al. 2023, arXiv 2311.00636)
    # in this project's convention (per-example loss l_i, F = (1/n) sum_i
    # grad l_i grad l_i^T, U_i = sum_t a_{i,t} g_{i,t}^T):
    #   expand: A = (1/n) sum_i sum_t a a^T,  G = (1/(nT)) sum_i sum_t g g^T
    #           (locations are extra examples; exact for a deep linear network
    #           whose loss is a sum over locations, each seeing its own input);
    #   reduce: A = (1/n) sum_i a_i a_i^T with a_i = mean_t a_{i,t},
    #           G = (1/n) sum_i g_i g_i^T with g_i = sum_t g_{i,t}
    #           (exact for a deep linear network pooled over the locations
    #           before the loss: then g_{i,t} = g_i / T and U_i = a_i g_i^T).
    def location_mask(self):
        """``(n, T)`` float weights of the locations that count (masked
        sequence positions are 0), or None when every location counts."""
        return None

    def _location_count(self, x):
        """``n T`` for the expand factors' average over locations: the
        number of unmasked locations when some are masked."""
        mask = self.location_mask()
        if mask is None:
            return batch_size(x) * locations(x)
        return tf.maximum(tf.reduce_sum(mask), 1.0)

    def factor_a(self):
        """The input factor under the block's ``weight_sharing``; its
        diagonal ``(a_dim,)`` when ``block.a_is_diagonal``."""
        if self.block.a_is_diagonal:
            return self.block.diagonal_factor_a(self)
        a = self.a()
        if self.block.weight_sharing == "reduce":
            mask = self.location_mask()
            if mask is None:
                a = tf.reduce_mean(a, axis=1, keepdims=True)
            else:  # the mean over each example's unmasked locations
                count = tf.maximum(tf.reduce_sum(mask, axis=1), 1.0)
                a = tf.reduce_sum(a, axis=1, keepdims=True) / count[:, None, None]
        return factor_a(a)

    def factor_g(self):
        """The output factor under the block's ``weight_sharing``; its
        diagonal ``(g_dim,)`` when ``block.g_is_diagonal``. Expand averages
        over the unmasked locations."""
        g = self.g()
        if self.block.weight_sharing == "reduce":
            g = tf.reduce_sum(g, axis=1, keepdims=True)
            count = batch_size(g)
        else:
            count = self._location_count(g)
        if self.block.g_is_diagonal:
            return tf.einsum("nti,nti->i", g, g) / count
        return F.location_gram(g) / count

    def statistics_tensors(self):
        """What must be finite for this batch's statistics to be used: ``g``,
        and ``a`` unless the block's ``a`` is a one-hot of ids (always
        finite, never formed)."""
        if getattr(self.block, "a_is_one_hot", False):
            return (self.g(),)
        return (self.a(), self.g())

    def per_example_gradients(self):
        """``(n, P)`` per-example gradients of the block's parameters, in
        parameter order (see ``LayerBlock.per_example_gradients``)."""
        return self.block.per_example_gradients(self.a(), self.g())


def batch_size(x):
    return tf.cast(tf.shape(x)[0], tf.float32)


def locations(x):
    return tf.cast(tf.shape(x)[1], tf.float32)


def factor_a(a):
    """``A = (1/n) sum_i sum_t a_bar a_bar^T`` (KFC: summed over locations);
    one per group for grouped blocks."""
    return F.location_gram(a) / batch_size(a)


def factor_g(g):
    """``G = (1/(n T)) sum_i sum_t g g^T`` (KFC: averaged over locations);
    one per group for grouped blocks."""
    return F.location_gram(g) / (batch_size(g) * locations(g))


def group_shape(block):
    """Leading shape of the block's per-group state: ``()`` or ``(groups,)``."""
    return (block.groups,) if block.groups > 1 else ()


def grouped_names(block, factors):
    """``factors`` keyed ``"<name>_per_group"`` for a grouped block: the
    per-layer diagnostics read ``"A"``/``"G"`` as single matrices."""
    if block.groups == 1:
        return factors
    return {f"{name}_per_group": value for name, value in factors.items()}


class NoDenseMatrixError(ValueError):
    """Raised by ``matrix()`` of a method that stores no Fisher block."""


class Curvature(abc.ABC):
    """Base class: one layer block's curvature approximation.

    Subclasses set ``name`` and implement the abstract calls. ``add_variable``
    (given to ``build``) creates optimizer-owned float32 state, so that it is
    saved with the optimizer and restored by ``keras.models.load_model``.
    A subclass's options are the keyword arguments of its ``__init__`` (and
    of its bases'), given through ``KFAC(curvature_options=...)``.
    """

    name: str = ""
    #: True when ``precondition`` needs the current step's ``batch``.
    uses_current_batch: bool = False
    #: Whether the method works with a block whose ``A``/``G`` is kept as
    #: its diagonal (``block.a_is_diagonal`` / ``g_is_diagonal``).
    supports_diagonal_factors: bool = False
    #: True when the method handles grouped blocks (``block.groups > 1``:
    #: factors and ``V`` with a leading group axis).
    supports_groups: bool = False

    def __init__(self, block, damping_mode="factored", stats_every=10, inverse_every=20):
        # ``stats_every``/``inverse_every`` are the optimizer's cadence, given
        # to every class (cost models use them).
        if damping_mode not in ("factored", "eigen"):
            raise ValueError(f"Unknown damping_mode={damping_mode!r}: use 'factored' or 'eigen'.")
        if (block.a_is_diagonal or block.g_is_diagonal) and not self.supports_diagonal_factors:
            raise ValueError(
                f"curvature={self.name!r} cannot use layer {block.name!r}: its block keeps a "
                f"diagonal Kronecker factor ({block.structure()}); use curvature='kfac' for it."
            )
        if block.groups > 1 and not self.supports_groups:
            able = sorted({c.name for c in _subclasses(Curvature) if c.supports_groups and c.name})
            raise ValueError(
                f"curvature={self.name!r} does not handle the grouped layer {block.name!r} "
                f"({type(block.layer).__name__}, {block.groups} weight groups: a block-diagonal "
                f"Fisher). Methods that do: {', '.join(able)}; choose one for this layer, e.g. "
                f"KFAC(curvature={{{block.name!r}: 'kfac', 'default': {self.name!r}}})."
            )
        self.block = block
        self.damping_mode = damping_mode
        self.stats_every = int(stats_every)
        self.inverse_every = int(inverse_every)

    @classmethod
    def option_names(cls) -> set:
        """The ``curvature_options`` keys this class accepts."""
        names = set()
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None:
                continue
            for parameter in inspect.signature(init).parameters.values():
                if parameter.kind is inspect.Parameter.KEYWORD_ONLY or (
                    parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
                    and parameter.default is not inspect.Parameter.empty
                ):
                    names.add(parameter.name)
        return names - {"damping_mode"}

    @abc.abstractmethod
    def build(self, add_variable: Callable[..., tf.Variable]) -> None:
        """Create the state with ``add_variable(name, shape, initializer=...)``."""

    @abc.abstractmethod
    def update_statistics(self, batch: LayerBatch, decay: tf.Tensor) -> None:
        """Fold this batch's statistics into the running averages."""

    @abc.abstractmethod
    def refresh(self, damping: tf.Tensor) -> Optional[tf.Tensor]:
        """Recompute inverses / eigenbases; returns whether it succeeded
        (None when there is nothing that can fail)."""

    @abc.abstractmethod
    def precondition(
        self, v: tf.Tensor, damping: tf.Tensor, batch: Optional[LayerBatch] = None
    ) -> tf.Tensor:
        """The damped inverse curvature applied to ``V`` (``(a_dim, g_dim)``)."""

    def kronecker_inverses(self) -> Optional[tuple]:
        """``(L, R)``, dense ``(a_dim, a_dim)`` and ``(g_dim, g_dim)``, when
        ``precondition(V)`` is ``L V R`` for every ``V`` until the next
        refresh (the estimator then applies it to a gradient given by its
        factors, :func:`factors.factored_kronecker_solve`); None otherwise."""
        return None

    @abc.abstractmethod
    def matrix(self) -> tf.Tensor:
        """The dense undamped block ``(P, P)``, parameters in ``vec_row(V)``
        order (raises :class:`NoDenseMatrixError` when none is stored)."""

    def factors(self) -> dict[str, tf.Tensor]:
        """Named Kronecker factors, for diagnostics (empty when none)."""
        return {}

    def damping_multiplier(self) -> tf.Tensor:
        """The factor this block's damping is multiplied by (raised after a
        failed refresh by the methods that can fail)."""
        return tf.constant(1.0)

    def refresh_state(self) -> list[tf.Variable]:
        """The variables ``refresh`` writes. Under a tf.distribute strategy
        one replica refreshes a block and these are shared with the others
        (:func:`keras_kfac.distributed.refresh`). Default: every variable the
        estimator built (always correct); methods whose ``refresh`` does
        nothing return ``[]``."""
        return list(getattr(self, "built_variables", []))


class CurrentBatchCurvature(Curvature):
    """A method that works from the current step's batch alone (TENGraD,
    CG-FAC): no running statistics, nothing to refresh, no stored block."""

    uses_current_batch = True
    #: Why ``matrix()`` has no answer, for the error message.
    no_matrix_reason = ""

    def build(self, add_variable):
        pass

    def update_statistics(self, batch, decay):
        pass

    def refresh(self, damping):
        pass

    def refresh_state(self):
        return []

    def matrix(self):
        raise NoDenseMatrixError(
            f"curvature={self.name!r} keeps no Fisher block: {self.no_matrix_reason}"
        )


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)
