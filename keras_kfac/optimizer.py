"""``keras_kfac.KFAC``: approximate natural-gradient descent for Keras 3.

Martens & Grosse 2015 (arXiv 1503.05671) for Dense layers, Grosse & Martens
2016 (arXiv 1602.01407) for Conv2D; other curvature approximations plug in
through :mod:`keras_kfac.curvature`.
"""

import inspect
import math
import weakref

import keras
import tensorflow as tf
from keras.src.optimizers.loss_scale_optimizer import LossScaleOptimizer

from keras_kfac import curvature as curvature_lib
from keras_kfac import distributed
from keras_kfac.capture import Capture, candidate_layers
from keras_kfac.layers import block_for_layer, unsupported_reason
from keras_kfac.layers.base import dense_matrix, matrix_inner, scale_matrix
from keras_kfac.losses import SampledLoss
from keras_kfac.monitoring import StepMonitor
from keras_kfac.graph_util import run_if

FISHER_TYPES = ("sampled", "empirical")
DAMPING_MODES = ("factored", "eigen")
#: Largest block (in parameters) for which ``curvature_matrix`` builds a dense matrix.
MAX_DENSE_PARAMETERS = 8192


def check_backend():
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise RuntimeError(
            f"keras_kfac needs the TensorFlow backend of Keras, but the backend is "
            f"{backend!r}. Set the environment variable KERAS_BACKEND=tensorflow "
            "before importing keras (or set \"backend\": \"tensorflow\" in "
            "~/.keras/keras.json)."
        )


def _unwrap(optimizer):
    while isinstance(optimizer, LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    return optimizer


@keras.saving.register_keras_serializable(package="keras_kfac")
class KFAC(keras.optimizers.Optimizer):
    """K-FAC: Kronecker-factored approximate natural gradient.

    Drop-in for any Keras optimizer with the TensorFlow backend::

        model.compile(optimizer=keras_kfac.KFAC(), loss="sparse_categorical_crossentropy")

    Each Dense, EinsumDense, Embedding and Conv2D layer gets a curvature block
    (``curvature=``); the update of its parameters is ``-lr * P(grad)`` with
    ``P`` the damped inverse of the block's approximate Fisher, then KL
    clipping and heavy-ball momentum. All other trainable variables
    (BatchNormalization, custom
    layers, subclasses of Dense/Conv2D, grouped convolutions) are updated by
    Adam with ``fallback_learning_rate``. ``summary()`` lists which is which.

    Args:
        learning_rate: float or ``keras.optimizers.schedules`` schedule.
        damping: Tikhonov damping lambda (> 0), float or schedule of the step.
        momentum: heavy-ball momentum on the preconditioned gradient, in [0, 1).
        curvature: name of the per-layer approximation
            (``keras_kfac.curvature.available()``), or a dict
            ``{layer_name: name}`` with an optional ``"default"`` entry.
        fisher: ``"sampled"`` (targets drawn from the model's predictive
            distribution; needs a supported loss) or ``"empirical"`` (the
            training labels' gradients; any loss).
        damping_mode: ``"factored"`` (sec. 6.3: ``(A + pi*gamma I)^-1 V (G +
            gamma/pi I)^-1``) or ``"eigen"`` (exact ``(kron(A,G) + lambda I)^-1``).
        stats_decay: running-average decay of the statistics per statistics
            update (not per step), in [0, 1). With ``stats_every=10`` the
            default 0.5 keeps a memory of about 20 steps.
        stats_every: statistics are updated every this many steps.
        inverse_every: inverses/eigenbases are refreshed every this many steps.
        kl_clip: KL clipping bound (Ba et al. 2017), or None.
        weight_decay: decoupled weight decay (as in AdamW), or None.
        model: the model to precondition; found automatically by
            ``model.compile``. Needed for hand-written training loops.
        loss: loss used to sample targets for ``fisher="sampled"`` in
            hand-written loops (defaults to the model's compiled loss).
        fallback_learning_rate: Adam learning rate for variables outside a
            curvature block.
        curvature_options: extra keyword arguments for the curvature classes,
            plus the block options ``weight_sharing`` and ``max_factor_dim``
            (:func:`keras_kfac.layers.base.block_for_layer`).
        seed: seed of the target sampling.
        adaptive_step: choose the learning rate alpha and momentum mu of every
            step by minimising the exact quadratic model (GGN on the batch)
            over ``alpha * Delta + mu * delta_prev`` (Martens & Grosse 2015,
            sec. 7); ``learning_rate``, ``momentum`` and ``kl_clip`` then do
            not apply to the curvature blocks. Needs ``model.compute_loss``
            (``model.fit`` calls it). See :mod:`keras_kfac.quadratic`.
        **kwargs: standard Keras optimizer arguments (``clipnorm``,
            ``global_clipnorm``, ``clipvalue``, ``use_ema``, ``name``, ...).
    """

    def __init__(
        self,
        learning_rate=1.0,
        damping=1e-2,
        momentum=0.9,
        curvature="kfac",
        fisher="sampled",
        damping_mode="factored",
        stats_decay=0.5,
        stats_every=10,
        inverse_every=20,
        kl_clip=1e-3,
        weight_decay=None,
        model=None,
        loss=None,
        fallback_learning_rate=1e-3,
        curvature_options=None,
        seed=None,
        adaptive_step=False,
        name="kfac",
        **kwargs,
    ):
        check_backend()
        _validate(
            damping=damping,
            momentum=momentum,
            curvature=curvature,
            fisher=fisher,
            damping_mode=damping_mode,
            stats_decay=stats_decay,
            stats_every=stats_every,
            inverse_every=inverse_every,
            kl_clip=kl_clip,
            fallback_learning_rate=fallback_learning_rate,
        )
        super().__init__(learning_rate=learning_rate, weight_decay=weight_decay, name=name, **kwargs)
        self.momentum = float(momentum)
        self.curvature = curvature
        self.fisher = fisher
        self.damping_mode = damping_mode
        self.stats_decay = float(stats_decay)
        self.stats_every = int(stats_every)
        self.inverse_every = int(inverse_every)
        self.kl_clip = None if kl_clip is None else float(kl_clip)
        self.loss = loss
        self.fallback_learning_rate = float(fallback_learning_rate)
        self.curvature_options = dict(curvature_options or {})
        self.seed = seed
        self.adaptive_step = bool(adaptive_step)
        self._monitor = StepMonitor(self)
        with keras.name_scope(self.name, caller=self):
            if isinstance(damping, keras.optimizers.schedules.LearningRateSchedule) or callable(damping):
                self._damping_schedule = damping
                self._damping = None
            else:
                self._damping_schedule = None
                self._damping = keras.Variable(
                    float(damping), name="damping", dtype="float32", trainable=False
                )
                self._track_variable(self._damping)
            self._stats_updates = keras.Variable(
                0, name="stats_updates", dtype="int64", trainable=False
            )
            self._track_variable(self._stats_updates)
            self._skipped_steps = keras.Variable(
                0, name="skipped_steps", dtype="int64", trainable=False
            )
            self._track_variable(self._skipped_steps)
            self._seed_generator = keras.random.SeedGenerator(seed, name="fisher_seed")
            self._track_variable(self._seed_generator.state)
        self._model_ref = None
        self._capture = None
        self._replicas = None  # keras_kfac.distributed.Replicas during a replicated step
        self._blocks = []
        self._curvatures = []
        self._fallback_keys = set()
        if model is not None:
            self.register(model)

    # --- the model ---------------------------------------------------------
    def register(self, model):
        """Precondition ``model``'s layers. ``model.compile`` calls this for
        you; call it (or pass ``model=``) for hand-written training loops."""
        if not isinstance(model, keras.Model):
            raise TypeError(f"KFAC.register expects a keras.Model, got {type(model).__name__}.")
        current = self._model()
        if current is model:
            return
        if self.built:
            raise ValueError(
                "This KFAC optimizer is already built for another model; create a "
                "new KFAC() for each model."
            )
        if self._capture is not None:
            self._capture.remove()
        # A weak reference: the model owns the optimizer, not the other way
        # round (no checkpoint dependency, no reference cycle).
        if self.fisher == "sampled" and len(getattr(model, "outputs", None) or []) > 1:
            raise ValueError(
                f"fisher='sampled' supports models with one output; {model.name!r} has "
                f"{len(model.outputs)}. Use KFAC(fisher='empirical'), which works with "
                "several outputs and losses."
            )
        self._model_ref = weakref.ref(model)
        self._capture = Capture(model, sampled=self.fisher == "sampled")

    def _model(self):
        # Not a property: Keras's saving walks an optimizer's attributes, and
        # must not walk back into the model.
        return None if self._model_ref is None else self._model_ref()

    def _find_model(self):
        """The registered model, else the Keras model whose ``fit``/``compile``
        is building this optimizer (found on the call stack)."""
        if self._model() is not None:
            return self._model()
        frame = inspect.currentframe()
        for _ in range(12):
            frame = frame.f_back if frame is not None else None
            if frame is None:
                break
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, keras.Model) and _unwrap(getattr(candidate, "optimizer", None)) is self:
                self.register(candidate)
                return candidate
        raise ValueError(
            "KFAC could not find the model it optimizes. Use "
            "model.compile(optimizer=KFAC(...)), or, for a hand-written training "
            "loop, KFAC(model=model) / optimizer.register(model) before the "
            "first apply_gradients."
        )

    # --- state ---------------------------------------------------------------
    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        model = self._find_model()
        if tf.distribute.has_strategy():
            distributed.check_supported(
                tf.distribute.get_strategy(),
                jit_compile=getattr(model, "jit_compile", False) is True,
                run_eagerly=bool(getattr(model, "run_eagerly", False)),
                quadratic_model=self.adaptive_step,
            )
        keys = {self._var_key(v): v for v in variables}
        options = dict(
            {"stats_every": self.stats_every, "inverse_every": self.inverse_every},
            **self.curvature_options,
        )
        self._blocks, self._curvatures, self._unsupported = [], [], []
        for layer in candidate_layers(model):
            block = block_for_layer(layer, model=model, **self.curvature_options)
            if block is None:
                self._unsupported.append((layer, unsupported_reason(layer)))
                continue
            if not all(self._var_key(v) in keys for v in block.variables):
                continue  # frozen layer: nothing to update
            method = curvature_lib.get(block.fixed_curvature or self._curvature_name(layer))
            curvature = method(block, damping_mode=self.damping_mode, **options)

            def add_variable(name, shape, block=block, curvature=curvature, initializer="zeros"):
                variable = self.add_variable(
                    shape, initializer=initializer, dtype="float32", name=f"{block.name}_{name}"
                )
                curvature.built_variables = getattr(curvature, "built_variables", []) + [variable]
                return variable

            curvature.build(add_variable)
            self._blocks.append(block)
            self._curvatures.append(curvature)
        block_keys = {self._var_key(v) for b in self._blocks for v in b.variables}
        self._fallback_keys = {k for k in keys if k not in block_keys}
        if self.fisher == "sampled" and self._blocks:
            self._sampled_loss = SampledLoss.from_keras(
                self.loss if self.loss is not None else getattr(model, "loss", None)
            )
        else:
            self._sampled_loss = None
        self._momentums = {}
        self._adam_m, self._adam_v = {}, {}
        self._previous_updates = {}
        for v in variables:
            index = self._get_variable_index(v)
            if self._var_key(v) in self._fallback_keys:
                self._adam_m[index] = self.add_variable_from_reference(v, "adam_m")
                self._adam_v[index] = self.add_variable_from_reference(v, "adam_v")
            elif self.adaptive_step:
                self._previous_updates[index] = self.add_variable_from_reference(v, "previous_update")
            elif self.momentum > 0:
                self._momentums[index] = self.add_variable_from_reference(v, "momentum")
        if not self._blocks:
            import warnings

            warnings.warn(
                "KFAC found no Dense or Conv2D layer to precondition in "
                f"{model.name!r}; every variable is trained by the Adam fallback.",
                stacklevel=2,
            )
        self._monitor.build()

    def _curvature_name(self, layer):
        if isinstance(self.curvature, dict):
            return self.curvature.get(layer.name, self.curvature.get("default", "kfac"))
        return self.curvature

    # --- hyperparameters that callbacks change -----------------------------
    @property
    def damping(self):
        if self._damping_schedule is not None:
            return tf.cast(self._damping_schedule(self.iterations), "float32")
        return self._damping.value

    @damping.setter
    def damping(self, value):
        if self._damping_schedule is not None:
            raise TypeError("damping is a schedule; it cannot be assigned.")
        _validate(damping=value)
        self._damping.assign(float(value))

    @property
    def skipped_steps(self):
        """Steps skipped because gradients, statistics or the update were not
        finite."""
        return self._skipped_steps.value

    def damping_multiplier(self, layer):
        """The damping multiplier of ``layer``'s block (1 unless a refresh of
        its inverse failed; see ``keras_kfac.curvature.kfac``)."""
        curvature = self.curvature_for(layer)
        curvature = getattr(curvature, "kfac", None) or curvature  # "auto"
        multiplier = getattr(curvature, "damping_multiplier", None)
        return tf.constant(1.0) if multiplier is None else multiplier.value

    def _skip_step(self):
        """A skipped step changes nothing and does not count as a step: Keras
        adds 1 to ``iterations`` after ``apply``, so it is taken back here
        (as LossScaleOptimizer leaves its inner optimizer's counter alone)."""
        self._skipped_steps.assign_add(1)
        # iterations is aggregated "only_first_replica"; under a strategy every
        # replica skips alike and takes back its own copy (no merge_call).
        distributed.local_copy(self._iterations).assign_sub(1)

    # --- the update ------------------------------------------------------------
    def _apply_weight_decay(self, variables):
        # Decoupled weight decay happens in `update_step`, so that a skipped
        # (non-finite) step leaves the weights untouched.
        return

    def _backend_update_step(self, grads, variables, learning_rate):
        # Under a tf.distribute strategy: collectives without merge_call, and
        # the global batch's statistics (see keras_kfac.distributed).
        with distributed.replica_step() as replicas:
            self._replicas = replicas
            try:
                self._update_step_in_replica(grads, variables, learning_rate)
            finally:
                self._replicas = None

    def _update_step_in_replica(self, grads, variables, learning_rate):
        grads = [g for g, _ in self._all_reduce_sum_gradients(list(zip(grads, variables)))]
        finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads])

        def step():
            damping = self.damping
            record = None if self._capture is None else self._capture.current()
            self._monitor.begin(grads, variables, record)
            directions, ok = self._natural_directions(grads, variables, learning_rate)
            # Never write NaN/Inf into the weights (e.g. damping 0 on a
            # singular factor): such a step is skipped too.
            ok = ok & tf.reduce_all([tf.reduce_all(tf.math.is_finite(d)) for d in directions])

            def apply():
                pairs = [
                    (d, v.value if isinstance(v, keras.Variable) else v)
                    for d, v in zip(directions, variables)
                ]
                tf.__internal__.distribute.interim.maybe_merge_call(
                    self._distributed_tf_update_step, self._distribution_strategy, pairs, learning_rate
                )
                self._monitor.end(grads, variables, damping)

            run_if(ok, apply)
            run_if(tf.logical_not(ok), self._skip_step)

        run_if(finite, step)
        run_if(tf.logical_not(finite), self._skip_step)
        if self._capture is not None:
            self._capture.clear()

    def _natural_directions(self, grads, variables, learning_rate):
        """Preconditioned, KL-clipped directions for block variables; raw
        gradients for fallback variables; and whether this step's statistics
        were finite (if not, nothing was updated and the step is skipped)."""
        if not self._blocks:
            return list(grads), tf.constant(True)
        record = self._capture.current()
        if record is None:
            raise ValueError(
                "KFAC saw no training forward pass for this step. Call "
                "`model(x, training=True)` inside the GradientTape before "
                "`apply_gradients`, with the model KFAC was registered with."
            )
        position = {self._var_key(v): i for i, v in enumerate(variables)}
        damping = self.damping
        step = self.iterations
        uses_batch = any(c.uses_current_batch for c in self._curvatures)
        current = self._batches(record) if uses_batch else None

        def update_statistics():
            batches = current if current is not None else self._batches(record)
            ok = _statistics_finite(batches)

            def apply():
                decay = tf.where(self._stats_updates > 0, self.stats_decay, 0.0)
                for curvature, batch in zip(self._curvatures, batches):
                    if batch is not None:
                        curvature.update_statistics(batch, decay)
                self._stats_updates.assign_add(1)

            run_if(ok, apply)
            return ok

        stats_ok = tf.cond(
            tf.equal(step % self.stats_every, 0), update_statistics, lambda: tf.constant(True)
        )
        run_if(
            tf.equal(step % self.inverse_every, 0) & (self._stats_updates > 0) & stats_ok,
            lambda: distributed.refresh(self._replicas, self._curvatures, damping),
        )

        directions = list(grads)
        preconditioned, inner, matrices = [], [], []
        for i, (block, curvature) in enumerate(zip(self._blocks, self._curvatures)):
            v = block.to_matrix([grads[position[self._var_key(w)]] for w in block.variables])
            p = curvature.precondition(v, damping, None if current is None else current[i])
            preconditioned.append(p)
            matrices.append(v)
            inner.append(matrix_inner(v, p))
        if self.adaptive_step:
            self._monitor.note_preconditioning(matrices, preconditioned, tf.constant(1.0))
            directions = self._monitor.adaptive_directions(
                grads, variables, position, preconditioned, damping
            )
            return directions, stats_ok
        scale = self._kl_scale(tf.add_n(inner), learning_rate)
        self._monitor.note_preconditioning(
            [dense_matrix(m) for m in matrices], [dense_matrix(p) for p in preconditioned], scale
        )
        for block, p in zip(self._blocks, preconditioned):
            for w, d in zip(block.variables, block.from_matrix(scale_matrix(scale, p))):
                directions[position[self._var_key(w)]] = tf.cast(d, w.dtype)
        return directions, stats_ok

    def _kl_scale(self, grad_dot_update, learning_rate):
        """Ba et al. 2017: ``nu = min(1, sqrt(kl_clip / (lr^2 <g, P g>)))``."""
        if self.kl_clip is None:
            return tf.constant(1.0)
        lr = tf.cast(learning_rate, tf.float32)
        bound = tf.math.divide_no_nan(self.kl_clip, lr * lr * grad_dot_update)
        return tf.where(grad_dot_update > 0.0, tf.minimum(1.0, tf.sqrt(bound)), 1.0)

    def _batches(self, record):
        replicas = getattr(self, "_replicas", None)
        batches = self._capture.batches(
            record,
            self._blocks,
            sampled_loss=self._sampled_loss,
            seed=self._seed_generator,
            loss_scale=self._loss_scale(),
            replicas=replicas,
        )
        if replicas is not None:
            batches = replicas.gather_batches(batches)
        return batches

    def _loss_scale(self):
        """The dynamic loss scale when a LossScaleOptimizer wraps this one."""
        wrapper = getattr(self._model(), "optimizer", None)
        if isinstance(wrapper, LossScaleOptimizer) and _unwrap(wrapper) is self:
            return tf.cast(wrapper.dynamic_scale, tf.float32)
        return None

    def update_step(self, gradient, variable, learning_rate):
        """One variable's update, given its natural direction (block
        variables) or its raw gradient (fallback variables)."""
        lr = tf.cast(learning_rate, variable.dtype)
        gradient = tf.cast(gradient, variable.dtype)
        index = self._get_variable_index(variable)
        if self.weight_decay is not None and self._use_weight_decay(variable):
            variable.assign_sub(variable * tf.cast(self.weight_decay, variable.dtype) * lr)
        if index in self._adam_m:
            m, v = self._adam_m[index], self._adam_v[index]
            t = tf.cast(self.iterations + 1, variable.dtype)
            m.assign(0.9 * m + 0.1 * gradient)
            v.assign(0.999 * v + 0.001 * tf.square(gradient))
            m_hat = m / (1.0 - tf.pow(0.9, t))
            v_hat = v / (1.0 - tf.pow(0.999, t))
            variable.assign_sub(self.fallback_learning_rate * m_hat / (tf.sqrt(v_hat) + 1e-7))
        elif index in self._previous_updates:
            # adaptive_step: `gradient` is minus the whole update (sec. 7).
            self._previous_updates[index].assign(-gradient)
            variable.assign_sub(gradient)
        elif index in self._momentums:
            m = self._momentums[index]
            m.assign(self.momentum * m + gradient)
            variable.assign_sub(lr * m)
        else:
            variable.assign_sub(lr * gradient)

    # --- inspection ------------------------------------------------------------
    def _block_index(self, layer):
        if not self.built:
            raise ValueError("The optimizer is not built yet: train one step first.")
        for i, block in enumerate(self._blocks):
            if block.layer is layer or block.name == layer:
                return i
        name = getattr(layer, "name", layer)
        raise ValueError(f"Layer {name!r} has no curvature block in this optimizer (see summary()).")

    def curvature_matrix(self, layer):
        """The undamped approximate Fisher block of ``layer`` (object or name)
        as a dense ``(P, P)`` tensor, parameters ordered as
        ``concat(flatten(kernel), bias)``."""
        i = self._block_index(layer)
        block = self._blocks[i]
        if block.num_parameters > MAX_DENSE_PARAMETERS:
            raise ValueError(
                f"Layer {block.name!r} has {block.num_parameters} parameters; a dense "
                f"block is only built up to {MAX_DENSE_PARAMETERS}."
            )
        return self._curvatures[i].matrix()

    def diagnostics(self):
        """The latest curvature diagnostics as a dict of tensors.

        ``damping`` (current), ``rho`` (sec. 6.5), ``alpha``/``mu`` (sec. 7,
        with ``adaptive_step``), ``kl_clip_scale`` (nu), ``update_norm``,
        ``grad_norm``, ``grad_cosine`` (between the gradient and the
        preconditioned gradient over the curvature blocks), ``skipped_steps``,
        and per layer ``"<layer>/<quantity>"``: ``A_``/``G_`` ``trace``,
        ``min_eigenvalue``, ``max_eigenvalue``, ``condition_number`` (of the
        factor with its factored damping share), ``spectrum``, ``pi``,
        ``preconditioned_grad_norm``, ``fidelity_relative_error``.
        ``rho_step``/``diagnostics_step`` say at which step (1-based) the
        values were computed (-1: never). They are computed inside the train
        step only on logging steps: enable them with
        :meth:`track_diagnostics` (``CurvatureMonitor`` does it for you).
        """
        return self._monitor.values()

    def track_diagnostics(self, every=100, histograms=True, fidelity_layers=()):
        """Compute :meth:`diagnostics` every ``every`` steps inside the train
        step (0 disables). Call before training in hand-written loops; a
        ``model.fit`` user adds ``keras_kfac.callbacks.CurvatureMonitor``."""
        if not self.built:
            raise ValueError("The optimizer is not built yet: build or train one step first.")
        self._monitor._check_fidelity_layers(tuple(fidelity_layers))
        self._monitor.diagnostics_enabled = every > 0
        self._monitor.histograms = bool(histograms)
        self._monitor.fidelity_layers = tuple(fidelity_layers)
        self._monitor.diagnostics_every.assign(int(every))

    def curvature_for(self, layer):
        """The curvature estimator object of ``layer`` (object or name)."""
        return self._curvatures[self._block_index(layer)]

    def summary(self, print_fn=print):
        """Which layers got which curvature block, and which variables fell
        back to the first-order update. Returns the text."""
        if not self.built:
            model = self._model()
            if model is None:
                raise ValueError("Register a model (compile or KFAC(model=...)) first.")
            self.build(model.trainable_variables)
        lines = [f"KFAC(curvature={self.curvature!r}, fisher={self.fisher!r}, damping_mode={self.damping_mode!r})"]
        lines.append(f"{'layer':<28}{'type':<12}{'curvature':<14}{'A':>12}{'G':>12}  structure")
        for block, curvature in zip(self._blocks, self._curvatures):
            lines.append(
                f"{block.name:<28}{type(block.layer).__name__:<12}{curvature.name:<14}"
                f"{block.a_dim:>12}{block.g_dim:>12}  {block.structure()}"
            )
        for layer, reason in self._unsupported:
            lines.append(f"{layer.name:<28}{type(layer).__name__:<12}{'fallback':<14}  ({reason})")
        fallback = [v for v in self._trainable_variables if self._var_key(v) in self._fallback_keys]
        if fallback:
            lines.append(
                f"Adam fallback (lr={self.fallback_learning_rate:g}) for: "
                + ", ".join(v.path for v in fallback)
            )
        text = "\n".join(lines)
        print_fn(text)
        return text

    # --- serialization -----------------------------------------------------
    def get_config(self):
        config = super().get_config()
        if self._damping_schedule is not None:
            damping = keras.saving.serialize_keras_object(self._damping_schedule)
        else:
            damping = float(self._damping.numpy())
        config.update(
            {
                "damping": damping,
                "momentum": self.momentum,
                "curvature": self.curvature,
                "fisher": self.fisher,
                "damping_mode": self.damping_mode,
                "stats_decay": self.stats_decay,
                "stats_every": self.stats_every,
                "inverse_every": self.inverse_every,
                "kl_clip": self.kl_clip,
                "loss": keras.saving.serialize_keras_object(self.loss) if self.loss is not None else None,
                "fallback_learning_rate": self.fallback_learning_rate,
                "curvature_options": self.curvature_options,
                "seed": self.seed,
                "adaptive_step": self.adaptive_step,
            }
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        if isinstance(config.get("damping"), dict):
            config["damping"] = keras.saving.deserialize_keras_object(
                config["damping"], custom_objects=custom_objects
            )
        if isinstance(config.get("loss"), dict):
            config["loss"] = keras.losses.deserialize(config["loss"], custom_objects=custom_objects)
        return super().from_config(config, custom_objects=custom_objects)


def _statistics_finite(batches):
    """True when every layer's ``a`` and ``g`` have a finite sum of squares:
    no NaN/Inf, and no factor entry can overflow float32 (each is bounded by
    that sum, e.g. ``|A_ij| <= sum a^2 / n``)."""
    checks = [
        tf.math.is_finite(tf.reduce_sum(tf.square(t)))
        for batch in batches
        if batch is not None
        for t in batch.statistics_tensors()
    ]
    return tf.reduce_all(checks) if checks else tf.constant(True)


def _validate(
    damping=1.0,
    momentum=0.0,
    curvature="kfac",
    fisher="sampled",
    damping_mode="factored",
    stats_decay=0.0,
    stats_every=1,
    inverse_every=1,
    kl_clip=None,
    fallback_learning_rate=1e-3,
):
    """Reject bad hyperparameters at construction, naming the fix."""
    if not callable(damping):
        if not (isinstance(damping, (int, float)) and math.isfinite(damping) and damping > 0):
            raise ValueError(
                f"damping must be a positive number (e.g. 1e-3) or a schedule; got {damping!r}."
            )
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1); got {momentum!r}.")
    names = curvature.values() if isinstance(curvature, dict) else [curvature]
    for name in names:
        curvature_lib.get(name)
    if fisher not in FISHER_TYPES:
        raise ValueError(f"Unknown fisher={fisher!r}: use 'sampled' or 'empirical'.")
    if damping_mode not in DAMPING_MODES:
        raise ValueError(f"Unknown damping_mode={damping_mode!r}: use 'factored' or 'eigen'.")
    if not 0.0 <= stats_decay < 1.0:
        raise ValueError(f"stats_decay must be in [0, 1); got {stats_decay!r}.")
    for arg, value in (("stats_every", stats_every), ("inverse_every", inverse_every)):
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{arg} must be an integer >= 1; got {value!r}.")
    if kl_clip is not None and not kl_clip > 0:
        raise ValueError(f"kl_clip must be positive or None; got {kl_clip!r}.")
    if not fallback_learning_rate > 0:
        raise ValueError(f"fallback_learning_rate must be positive; got {fallback_learning_rate!r}.")


def _attach_on_compile():
    """``model.compile`` assigns ``model.optimizer``; Keras routes that
    assignment through ``_setattr_hook``. Wrap it so a KFAC optimizer (or one
    wrapped in a LossScaleOptimizer) learns its model there."""
    original = keras.Model._setattr_hook
    if getattr(original, "_keras_kfac", False):
        return

    def _setattr_hook(model, name, value):
        name, value = original(model, name, value)
        if name == "optimizer" and isinstance(_unwrap(value), KFAC):
            _unwrap(value).register(model)
        return name, value

    _setattr_hook._keras_kfac = True
    keras.Model._setattr_hook = _setattr_hook


_attach_on_compile()
