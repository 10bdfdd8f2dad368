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

import tensorflow as tf


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


def batch_size(x):
    return tf.cast(tf.shape(x)[0], tf.float32)


def locations(x):
    return tf.cast(tf.shape(x)[1], tf.float32)


def factor_a(a):
    """``A = (1/n) sum_i sum_t a_bar a_bar^T`` (KFC: summed over locations);
    one per group for grouped blocks."""
    return tf.einsum("nt...i,nt...j->...ij", a, a) / batch_size(a)


def factor_g(g):
    """``G = (1/(n T)) sum_i sum_t g g^T`` (KFC: averaged over locations);
    one per group for grouped blocks."""
    return tf.einsum("nt...i,nt...j->...ij", g, g) / (batch_size(g) * locations(g))


def per_example_gradients(a, g):
    """``U_i = sum_t a_bar_{i,t} g_{i,t}^T``, shape ``(n, a_dim, g_dim)``
    (grouped: ``(n, groups, a_dim, g_dim)``)."""
    return tf.einsum("nt...a,nt...g->n...ag", a, g)


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


class Curvature:
    """Base class: one layer block's curvature approximation.

    Subclasses set ``name`` and implement the four calls. ``add_variable``
    (given to ``build``) creates optimizer-owned float32 state, so that it is
    saved with the optimizer and restored by ``keras.models.load_model``.
    """

    name = None
    #: True when ``precondition`` needs the current step's ``batch``.
    uses_current_batch = False
    #: True when the method handles grouped blocks (``block.groups > 1``:
    #: factors and ``V`` with a leading group axis).
    supports_groups = False

    def __init__(self, block, damping_mode="factored", **options):
        # ``options`` are ``KFAC(curvature_options=...)`` plus the optimizer's
        # ``stats_every`` and ``inverse_every``, given to every curvature
        # class; a class takes the ones it defines and ignores the rest (a
        # per-layer choice can mix methods with different options).
        if damping_mode not in ("factored", "eigen"):
            raise ValueError(
                f"Unknown damping_mode={damping_mode!r}: use 'factored' or 'eigen'."
            )
        if block.groups > 1 and not self.supports_groups:
            from keras_kfac import curvature as curvature_lib  # the registry imports this module

            able = [n for n in curvature_lib.available() if curvature_lib.get(n).supports_groups]
            raise ValueError(
                f"curvature={self.name!r} does not handle the grouped layer {block.name!r} "
                f"({type(block.layer).__name__}, {block.groups} weight groups: a block-diagonal "
                f"Fisher). Methods that do: {', '.join(able)}; choose one for this layer, e.g. "
                f"KFAC(curvature={{{block.name!r}: 'kfac', 'default': {self.name!r}}})."
            )
        self.block = block
        self.damping_mode = damping_mode

    def build(self, add_variable):
        raise NotImplementedError

    def update_statistics(self, batch, decay):
        raise NotImplementedError

    def refresh(self, damping):
        raise NotImplementedError

    def precondition(self, v, damping, batch=None):
        raise NotImplementedError

    def matrix(self):
        raise NotImplementedError

    def factors(self):
        """Named Kronecker factors, for diagnostics (empty when none)."""
        return {}

    def refresh_state(self):
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
