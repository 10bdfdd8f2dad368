"""The block-diagonal curvature estimator.

It owns, for one model, the instrumentation (:class:`keras_kfac.capture.Capture`),
the layer blocks (:mod:`keras_kfac.layers`) and one curvature object per block
(:mod:`keras_kfac.curvature`), and answers the optimizer's four questions of a
train step, each over all blocks at once:

1. ``batches(...)``: this step's per-block statistics ``(a, g)``;
2. ``update_statistics(batches, decay)``;
3. ``refresh(damping, replicas)``;
4. ``precondition(grads, variables, damping, batches)``: the preconditioned
   gradient of every block variable.

The optimizer (:class:`keras_kfac.KFAC`) keeps the hyperparameters, the
cadence, KL clipping, momentum and the Keras update, and talks only to this
class. Variables that no block covers are the optimizer's fallback.
"""

import weakref
from typing import Callable, Dict, List, Optional, Sequence

import keras
import tensorflow as tf

from keras_kfac import compat
from keras_kfac import curvature as curvature_lib
from keras_kfac import distributed
from keras_kfac.capture import Capture, candidate_layers
from keras_kfac.curvature.base import Curvature, LayerBatch
from keras_kfac.layers import LayerBlock, blocks_for_layer, unsupported_reason
from keras_kfac.layers.base import BLOCK_OPTIONS, matrix_inner, scale_matrix
from keras_kfac.losses import SampledLoss

#: Largest block (in parameters) for which ``matrix`` builds a dense matrix.
MAX_DENSE_PARAMETERS = 8192
#: The optimizer's cadence, given to every curvature class.
CADENCE_OPTIONS = ("stats_every", "inverse_every")


def method_names(curvature) -> List[str]:
    """The curvature method names a ``curvature=`` argument selects."""
    if isinstance(curvature, dict):
        names = set(curvature.values())
        if "default" not in curvature:
            names.add("kfac")
        return sorted(names)
    return [curvature]


def check_options(curvature, options: Dict) -> None:
    """Unknown ``curvature_options`` keys are an error naming the valid ones
    (the options of the selected methods)."""
    valid = set(BLOCK_OPTIONS)
    for name in method_names(curvature):
        valid |= curvature_lib.get(name).option_names()
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ValueError(
            f"Unknown curvature_options {', '.join(map(repr, unknown))} for "
            f"curvature={curvature!r}. Valid options: {', '.join(sorted(valid))}."
        )


class CurvatureEstimator:
    """Block-diagonal approximate Fisher of one model.

    Args:
        model: the Keras model (held weakly: the model owns its optimizer).
        curvature: method name, or ``{layer_name: name}`` with an optional
            ``"default"``.
        fisher: ``"sampled"`` or ``"empirical"``.
        damping_mode: ``"factored"`` or ``"eigen"``.
        options: keyword arguments of the curvature classes, including the
            optimizer's cadence.
    """

    def __init__(self, model: keras.Model, curvature, fisher: str, damping_mode: str, options: Dict):
        self._model_ref = weakref.ref(model)
        self.curvature = curvature
        self.fisher = fisher
        self.damping_mode = damping_mode
        self.options = dict(options)
        self.capture = Capture(model, sampled=fisher == "sampled")
        self.blocks: List[LayerBlock] = []
        self.curvatures: List[Curvature] = []
        #: ``(layer, reason)`` of layers of a supported type left to the fallback.
        self.unsupported: List = []
        self.fallback_variables: List = []
        #: ``[(layer, variables)]`` of the variables outside every block.
        self.fallback_layers: List = []
        self.sampled_loss: Optional[SampledLoss] = None
        self._block_keys: set = set()

    def model(self) -> Optional[keras.Model]:
        return self._model_ref()

    def remove(self) -> None:
        """Undo the model's instrumentation."""
        self.capture.remove()

    # --- building ----------------------------------------------------------------
    def build(self, variables: Sequence, add_variable: Callable, key: Callable, loss=None) -> None:
        """Create a block and its curvature state for every supported layer
        whose variables are all in ``variables`` (frozen layers get none).

        ``add_variable(name, shape, initializer)`` creates optimizer-owned
        state; ``key(variable)`` identifies variables as the optimizer does;
        ``loss`` is the loss whose predictive distribution the sampled Fisher
        samples (default: the model's compiled loss)."""
        model = self.model()
        keys = {key(v) for v in variables}
        # One layer may give several blocks (a recurrent layer's kernels).
        for layer in candidate_layers(model):
            blocks = blocks_for_layer(layer, model=model, **self.options)
            if not blocks:
                self.unsupported.append((layer, unsupported_reason(layer)))
            for block in blocks:
                self._build_block(layer, block, keys, add_variable, key)
        self._block_keys = {key(v) for b in self.blocks for v in b.variables}
        self.fallback_variables = [v for v in variables if key(v) not in self._block_keys]
        self.fallback_layers = _owning_layers(model, self.fallback_variables, key)
        if self.fisher == "sampled" and self.blocks:
            self.sampled_loss = SampledLoss.from_keras(
                loss if loss is not None else getattr(model, "loss", None)
            )

    def _build_block(self, layer, block, keys, add_variable, key) -> None:
        if not all(key(v) in keys for v in block.variables):
            return  # frozen: nothing to update
        name = block.fixed_curvature or self._method_name(layer)
        curvature = curvature_lib.create(name, block, self.damping_mode, **self.options)
        curvature.built_variables = []

        def add(name, shape, initializer="zeros"):
            variable = add_variable(f"{block.name}_{name}", shape, initializer)
            curvature.built_variables.append(variable)
            return variable

        curvature.build(add)
        self.blocks.append(block)
        self.curvatures.append(curvature)

    def _method_name(self, layer) -> str:
        if isinstance(self.curvature, dict):
            return self.curvature.get(layer.name, self.curvature.get("default", "kfac"))
        return self.curvature

    def covers(self, key) -> bool:
        """Whether the variable with this key belongs to a block."""
        return key in self._block_keys

    @property
    def uses_current_batch(self) -> bool:
        return any(c.uses_current_batch for c in self.curvatures)

    # --- the step ---------------------------------------------------------------
    def batches(self, record, seed=None, loss_scale=None, replicas=None) -> List[Optional[LayerBatch]]:
        """This step's :class:`LayerBatch` per block (None for a block the
        forward pass did not use); under several replicas, the global batch."""
        batches = self.capture.batches(
            record,
            self.blocks,
            sampled_loss=self.sampled_loss,
            seed=seed,
            loss_scale=loss_scale,
            replicas=replicas,
        )
        if replicas is not None:
            batches = replicas.gather_batches(batches)
        return batches

    @staticmethod
    def statistics_finite(batches) -> tf.Tensor:
        """True when every block's ``a`` and ``g`` have a finite sum of
        squares: no NaN/Inf, and no factor entry can overflow float32 (each is
        bounded by that sum, e.g. ``|A_ij| <= sum a^2 / n``)."""
        checks = [
            tf.math.is_finite(tf.reduce_sum(tf.square(t)))
            for batch in batches
            if batch is not None
            for t in batch.statistics_tensors()
        ]
        return tf.reduce_all(checks) if checks else tf.constant(True)

    def update_statistics(self, batches, decay) -> None:
        for curvature, batch in zip(self.curvatures, batches):
            if batch is not None:
                curvature.update_statistics(batch, decay)

    def refresh(self, damping, replicas=None) -> None:
        distributed.refresh(replicas, self.curvatures, damping)

    def block_gradients(self, grads, variables, key) -> List[tf.Tensor]:
        """Each block's gradient as its matrix ``V`` (``(a_dim, g_dim)``)."""
        position = {key(v): i for i, v in enumerate(variables)}
        return [
            block.to_matrix([grads[position[key(w)]] for w in block.variables]) for block in self.blocks
        ]

    def precondition(self, matrices, damping, batches=None) -> List[tf.Tensor]:
        """``P(V)`` per block."""
        return [
            curvature.precondition(v, damping, None if batches is None else batches[i])
            for i, (curvature, v) in enumerate(zip(self.curvatures, matrices))
        ]

    @staticmethod
    def inner_product(matrices, preconditioned) -> tf.Tensor:
        """``sum_blocks <V, P(V)>`` (sparse blocks stay sparse)."""
        return tf.add_n([matrix_inner(v, p) for v, p in zip(matrices, preconditioned)])

    @staticmethod
    def scaled(scale, matrices) -> List:
        return [scale_matrix(scale, m) for m in matrices]

    def to_variables(self, matrices, variables, key, into) -> List:
        """Write each block matrix back as its variables' tensors into the
        list ``into`` (aligned with ``variables``); returns ``into``."""
        position = {key(v): i for i, v in enumerate(variables)}
        for block, m in zip(self.blocks, matrices):
            for w, d in zip(block.variables, block.from_matrix(m)):
                into[position[key(w)]] = tf.cast(d, w.dtype)
        return into

    # --- inspection -----------------------------------------------------------
    def block_index(self, layer) -> int:
        for i, block in enumerate(self.blocks):
            if block.layer is layer or block.name == layer:
                return i
        name = getattr(layer, "name", layer)
        raise ValueError(f"Layer {name!r} has no curvature block in this optimizer (see summary()).")

    def curvature_for(self, layer) -> Curvature:
        return self.curvatures[self.block_index(layer)]

    def damping_multiplier(self, layer) -> tf.Tensor:
        return self.curvature_for(layer).damping_multiplier()

    def matrix(self, layer) -> tf.Tensor:
        i = self.block_index(layer)
        block = self.blocks[i]
        if block.num_parameters > MAX_DENSE_PARAMETERS:
            raise ValueError(
                f"Layer {block.name!r} has {block.num_parameters} parameters; a dense "
                f"block is only built up to {MAX_DENSE_PARAMETERS}."
            )
        return self.curvatures[i].matrix()

    def summary_rows(self) -> List[str]:
        rows = [f"{'layer':<28}{'type':<20}{'curvature':<16}{'A':>8}{'G':>8}  structure"]
        for block, curvature in zip(self.blocks, self.curvatures):
            rows.append(
                f"{block.name:<28}{type(block.layer).__name__:<20}{curvature.name:<16}"
                f"{block.a_dim:>8}{block.g_dim:>8}  {block.structure()}"
            )
        reasons = {id(layer): reason for layer, reason in self.unsupported}
        for layer, variables in self.fallback_layers:
            reason = reasons.get(id(layer), f"no curvature block for {type(layer).__name__}")
            rows.append(
                f"{layer.name:<28}{type(layer).__name__:<20}{'fallback':<16}"
                f"{_parameters(variables):>8} parameters  ({reason})"
            )
        return rows

    def fallback_share(self) -> float:
        """The fraction of trainable parameters outside every block."""
        covered = _parameters([v for b in self.blocks for v in b.variables])
        fallback = _parameters(self.fallback_variables)
        return fallback / max(covered + fallback, 1)

    def fallback_warning(self) -> Optional[str]:
        """One sentence naming the layers trained by the fallback and their
        share of the parameters (None when every variable has a block)."""
        if not self.fallback_layers:
            return None
        names = ", ".join(
            f"{layer.name} ({type(layer).__name__})" for layer, _ in self.fallback_layers[:8]
        )
        more = len(self.fallback_layers) - 8
        if more > 0:
            names += f" and {more} more"
        return (
            f"KFAC: {100 * self.fallback_share():.1f}% of the trainable parameters of "
            f"{self.model().name!r} have no curvature block and are trained by the Adam "
            f"fallback: {names}. KFAC.summary() gives the reasons."
        )


def _parameters(variables) -> int:
    total = 0
    for v in variables:
        count = 1
        for d in v.shape:
            count *= int(d)
        total += count
    return total


def _owning_layers(model, variables, key) -> List:
    """``[(layer, variables)]``: each variable under the innermost layer that
    owns it (``flatten_layers`` lists a layer before its sublayers), in
    model order; variables no layer owns come under the model."""
    wanted = {key(v) for v in variables}
    owner = {}
    for layer in [model] + compat.flatten_layers(model):
        for v in layer.trainable_weights:
            if key(v) in wanted:
                owner[key(v)] = layer
    grouped = {}
    for v in variables:
        layer = owner.get(key(v), model)
        grouped.setdefault(id(layer), (layer, []))[1].append(v)
    return list(grouped.values())


def register_model_discovery(optimizer_class) -> None:
    """``model.compile`` assigns ``model.optimizer``: an ``optimizer_class``
    instance (or one wrapped in a LossScaleOptimizer) learns its model there."""

    def on_assignment(model, optimizer):
        inner = unwrap(optimizer)
        if isinstance(inner, optimizer_class):
            inner.register(model)

    compat.on_optimizer_assignment(on_assignment)


def unwrap(optimizer):
    """The optimizer inside any ``keras.optimizers.LossScaleOptimizer``."""
    while isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    return optimizer
