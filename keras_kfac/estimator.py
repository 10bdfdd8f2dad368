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
from collections.abc import Sequence
from typing import Callable, Optional

import keras
import tensorflow as tf

from keras_kfac import compat, distributed
from keras_kfac import curvature as curvature_lib
from keras_kfac.capture import Capture, candidate_layers
from keras_kfac.curvature import factors as F
from keras_kfac.curvature.base import Curvature, LayerBatch
from keras_kfac.graph_util import scoped
from keras_kfac.layers import LayerBlock, blocks_for_layer, unsupported_reason
from keras_kfac.layers.base import BLOCK_OPTIONS, matrix_inner, scale_matrix
from keras_kfac.losses import SampledLoss, UnsupportedLossError

#: Largest block (in parameters) for which ``matrix`` builds a dense matrix.
MAX_DENSE_PARAMETERS = 8192
#: The optimizer's cadence, given to every curvature class.
CADENCE_OPTIONS = ("stats_every", "inverse_every")


def method_names(curvature) -> list[str]:
    """The curvature method names a ``curvature=`` argument selects."""
    if isinstance(curvature, dict):
        names = set(curvature.values())
        if "default" not in curvature:
            names.add("kfac")
        return sorted(names)
    return [curvature]


def check_options(curvature, options: dict) -> None:
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
        fisher: ``"auto"``, ``"sampled"`` or ``"empirical"`` (resolved by
            :meth:`build`; ``fisher_used`` and ``fisher_reason`` say how).
        damping_mode: ``"factored"`` or ``"eigen"``.
        options: keyword arguments of the curvature classes, including the
            optimizer's cadence.
    """

    def __init__(
        self, model: keras.Model, curvature, fisher: str, damping_mode: str, options: dict
    ):
        self._model_ref = weakref.ref(model)
        self.curvature = curvature
        self.fisher = fisher
        self.damping_mode = damping_mode
        self.options = dict(options)
        # "auto" is decided at build time: until then record for both.
        self.capture = Capture(model, sampled={"sampled": True, "empirical": False}.get(fisher))
        self.blocks: list[LayerBlock] = []
        self.curvatures: list[Curvature] = []
        #: ``(layer, reason)`` of layers of a supported type left to the fallback.
        self.unsupported: list = []
        self.fallback_variables: list = []
        #: ``[(layer, variables)]`` of the variables outside every block.
        self.fallback_layers: list = []
        #: One :class:`SampledLoss` per model output (None: empirical Fisher).
        self.sampled_losses: Optional[list[SampledLoss]] = None
        #: ``"sampled"`` or ``"empirical"`` once built, and why.
        self.fisher_used: Optional[str] = None
        self.fisher_reason = ""
        self._block_keys: set = set()

    def model(self) -> Optional[keras.Model]:
        return self._model_ref()

    def remove(self) -> None:
        """Undo the model's instrumentation."""
        self.capture.remove()
        self.capture = None

    @property
    def attached(self) -> bool:
        return self.capture is not None

    def attach(self) -> None:
        """Instrument the model again after :meth:`remove` (the optimizer
        was compiled with the same model again)."""
        self.capture = Capture(self.model(), sampled=self._capture_mode())
        if self.fisher_used is not None:
            self.capture.keep_layers([b.layer for b in self.blocks])

    def _capture_mode(self):
        fisher = self.fisher_used or self.fisher
        return {"sampled": True, "empirical": False}.get(fisher)

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
        # Layers without a block of this optimizer (frozen, or another
        # optimizer's in a GAN) are not recorded any more.
        self.capture.keep_layers([b.layer for b in self.blocks])
        if self.blocks:
            self.fisher_used, self.fisher_reason = self._resolve_fisher(model, loss)
        else:
            self.fisher_used, self.fisher_reason = "empirical", "no curvature block"
        self.capture.sampled = self.fisher_used == "sampled"

    def _resolve_fisher(self, model, loss):
        """``(fisher, reason)``; raises :class:`UnsupportedLossError` for
        ``fisher="sampled"`` without a known likelihood."""
        if self.fisher == "empirical":
            return "empirical", "fisher='empirical'"
        explicit = loss is not None
        if not explicit:
            loss = getattr(model, "loss", None)
        try:
            if (
                self.fisher == "auto"
                and not explicit
                and type(model).train_step is not keras.Model.train_step
            ):
                raise UnsupportedLossError(
                    loss,
                    f"{type(model).__name__} overrides train_step, so the loss it minimises is not known",
                )
            self.sampled_losses = SampledLoss.for_outputs(
                loss, _output_names(model, loss), _loss_weights(model)
            )
        except UnsupportedLossError as error:
            if self.fisher == "sampled":
                raise
            return "empirical", error.reason
        return "sampled", "the loss has a known predictive distribution"

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
    def present(self, variables, key) -> list[bool]:
        """Per block: whether all its variables are among ``variables``."""
        keys = {key(v) for v in variables}
        return [all(key(w) in keys for w in block.variables) for block in self.blocks]

    @scoped("kfac_statistics")
    def batches(
        self, record, seed=None, loss_scale=None, replicas=None, present=None
    ) -> list[Optional[LayerBatch]]:
        """This step's :class:`LayerBatch` per block (None for a block the
        forward pass did not use, or not ``present``); under several
        replicas, the global batch."""
        batches = self.capture.batches(
            record,
            self.blocks,
            sampled_losses=self.sampled_losses,
            seed=seed,
            loss_scale=loss_scale,
            replicas=replicas,
        )
        if present is not None:
            batches = [b if p else None for b, p in zip(batches, present)]
        if replicas is not None:
            batches = replicas.gather_batches(batches)
        return batches

    def batch_size(self, record) -> tf.Tensor:
        """The examples of this step's forward pass (this replica's): the
        largest leading dimension among the recorded uses of block layers
        (0 when none was recorded)."""
        sizes = [
            tf.shape(x)[0] for block in self.blocks for x in record.inputs.get(id(block.layer), [])
        ]
        return tf.reduce_max(tf.stack(sizes)) if sizes else tf.constant(0)

    @staticmethod
    @scoped("kfac_statistics")
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

    @scoped("kfac_statistics")
    def update_statistics(self, batches, decay) -> None:
        for curvature, batch in zip(self.curvatures, batches):
            if batch is not None:
                curvature.update_statistics(batch, decay)

    @scoped("kfac_refresh")
    def refresh(self, damping, replicas=None) -> None:
        distributed.refresh(replicas, self.curvatures, damping)

    @scoped("kfac_layout")
    def block_gradients(self, grads, variables, key) -> list[tf.Tensor]:
        """Each block's gradient as its matrix ``V`` (``(a_dim, g_dim)``)."""
        position = {key(v): i for i, v in enumerate(variables)}
        return [
            block.to_matrix([grads[position[key(w)]] for w in block.variables])
            if all(key(w) in position for w in block.variables)
            else tf.zeros((block.a_dim, block.g_dim))
            for block in self.blocks
        ]

    @scoped("kfac_precondition")
    def precondition(self, matrices, damping, batches=None) -> list[tf.Tensor]:
        """``P(V)`` per block. A block whose ``P`` is a Kronecker product of
        inverses gets it from ``V``'s factors when the batch is small
        against the layer (:func:`factors.factored_kronecker_solve`: same
        ``P(V)``, fewer flops)."""
        inverses = [c.kronecker_inverses() for c in self.curvatures]
        record = self.capture.current() if any(i is not None for i in inverses) else None
        factors = (
            [None] * len(self.blocks)
            if record is None
            else self.capture.gradient_factors(record, self.blocks)
        )
        preconditioned = []
        for i, (curvature, v) in enumerate(zip(self.curvatures, matrices)):
            if inverses[i] is not None and factors[i] is not None:
                preconditioned.append(F.factored_kronecker_solve(v, *factors[i], *inverses[i]))
            else:
                batch = None if batches is None else batches[i]
                preconditioned.append(curvature.precondition(v, damping, batch))
        return preconditioned

    @staticmethod
    def inner_product(matrices, preconditioned) -> tf.Tensor:
        """``sum_blocks <V, P(V)>`` (sparse blocks stay sparse)."""
        return tf.add_n([matrix_inner(v, p) for v, p in zip(matrices, preconditioned)])

    @staticmethod
    def scaled(scale, matrices) -> list:
        return [scale_matrix(scale, m) for m in matrices]

    @scoped("kfac_layout")
    def to_variables(self, matrices, variables, key, into) -> list:
        """Write each block matrix back as its variables' tensors into the
        list ``into`` (aligned with ``variables``); returns ``into``."""
        position = {key(v): i for i, v in enumerate(variables)}
        for block, m in zip(self.blocks, matrices):
            for w, d in zip(block.variables, block.from_matrix(m)):
                if key(w) in position:
                    into[position[key(w)]] = tf.cast(d, w.dtype)
        return into

    # --- inspection -----------------------------------------------------------
    def block_index(self, layer) -> int:
        for i, block in enumerate(self.blocks):
            if block.layer is layer or block.name == layer:
                return i
        name = getattr(layer, "name", layer)
        raise ValueError(
            f"Layer {name!r} has no curvature block in this optimizer (see summary())."
        )

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

    def summary_rows(self) -> list[str]:
        rows = [f"Fisher: {self.fisher_used} ({self.fisher_reason})"] if self.fisher_used else []
        rows += [f"{'layer':<28}{'type':<20}{'curvature':<16}{'A':>8}{'G':>8}  structure"]
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


def _owning_layers(model, variables, key) -> list:
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
    """An ``optimizer_class`` instance (or one wrapped in a
    LossScaleOptimizer) learns its model when assigned to a model attribute:
    ``model.compile`` assigns ``model.optimizer`` (the optimizer follows it
    to a new model until it is built); an overridden ``compile`` that keeps
    several optimizers (a GAN's ``self.d_optimizer = d_optimizer``) assigns
    others, and each registers the model if it has none yet. An optimizer
    replaced as ``model.optimizer`` (recompiling with a new one) stops
    instrumenting the model."""

    def on_attribute(model, name, previous, value):
        new = unwrap(value) if isinstance(value, keras.optimizers.Optimizer) else None
        old = unwrap(previous) if isinstance(previous, keras.optimizers.Optimizer) else None
        if name == "optimizer" and isinstance(old, optimizer_class) and old is not new:
            old.release(model)
        if isinstance(new, optimizer_class):
            if name == "optimizer" or new.estimator is None:
                new.register(model)

    compat.on_model_attribute(on_attribute)


def _output_names(model, loss) -> list[str]:
    """The model's output names in ``tf.nest.flatten`` order of its
    outputs (one placeholder name for a single output)."""
    names = list(getattr(model, "output_names", None) or [])
    if isinstance(loss, dict) and isinstance(getattr(model, "output", None), dict):
        names = sorted(names)
    return names if len(names) > 1 or isinstance(loss, (list, tuple, dict)) else ["output"]


def _loss_weights(model):
    """The ``loss_weights`` given to ``model.compile`` (None if none)."""
    return compat.compiled_loss_weights(model)


def unwrap(optimizer):
    """The optimizer inside any ``keras.optimizers.LossScaleOptimizer``."""
    while isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    return optimizer
