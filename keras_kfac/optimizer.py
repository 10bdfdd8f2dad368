"""``keras_kfac.KFAC``: approximate natural-gradient descent for Keras 3.

Martens & Grosse 2015 (arXiv 1503.05671) for Dense layers, Grosse & Martens
2016 (arXiv 1602.01407) for Conv2D; other curvature approximations plug in
through :mod:`keras_kfac.curvature`.
"""

import math
import warnings

import keras
import tensorflow as tf

from keras_kfac import compat, distributed, quadratic
from keras_kfac import curvature as curvature_lib
from keras_kfac.estimator import (
    CurvatureEstimator,
    check_options,
    register_model_discovery,
    unwrap,
)
from keras_kfac.graph_util import run_if
from keras_kfac.monitoring import StepMonitor

FISHER_TYPES = ("auto", "sampled", "empirical")
#: ``stats_every`` / ``inverse_every`` left at None follow the batch size of
#: the first step: (below ``LARGE_BATCH`` examples, from it). At batch 1000
#: (ReLU autoencoder, 2 seeds) fresher curvature took the training loss after
#: 100 steps from 116.8 to 89.2 (5 / 10); the extra statistics updates and
#: refreshes cost about 27 ms per step (~0.1 s and ~0.3 s each on quiet
#: cores), ~15% of the 183 ms step; at
#: batch 128 (Dropout MLP, 1 seed) 5 / 10 was worse per step (held-out 0.184
#: against 0.162 after 600 steps). Batches between were not measured and keep
#: the small-batch cadence (benchmarks/results/stepcost_cadence.md).
CADENCE = {"stats_every": (10, 5), "inverse_every": (20, 10)}
LARGE_BATCH = 1000
DAMPING_MODES = ("factored", "eigen")


def check_backend():
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise RuntimeError(
            f"keras_kfac needs the TensorFlow backend of Keras, but the backend is "
            f"{backend!r}. Set the environment variable KERAS_BACKEND=tensorflow "
            'before importing keras (or set "backend": "tensorflow" in '
            "~/.keras/keras.json)."
        )


def _dense_values(gradient):
    """The values of a dense or sparse (``IndexedSlices``) gradient."""
    return gradient.values if isinstance(gradient, tf.IndexedSlices) else gradient


def _all_finite(tensors):
    return tf.reduce_all([tf.reduce_all(tf.math.is_finite(_dense_values(t))) for t in tensors])


@keras.saving.register_keras_serializable(package="keras_kfac")
class KFAC(compat.OptimizerHooks, keras.optimizers.Optimizer):
    """K-FAC: Kronecker-factored approximate natural gradient.

    Drop-in for any Keras optimizer with the TensorFlow backend::

        model.compile(optimizer=keras_kfac.KFAC(), loss="sparse_categorical_crossentropy")

    Each Dense and Conv2D layer gets a curvature block (``curvature=``); the
    update of its parameters is ``-lr * P(grad)`` with ``P`` the damped inverse
    of the block's approximate Fisher, with heavy-ball momentum and KL
    clipping of the whole update.
    All other trainable variables (layers without a block) are updated by a
    ``keras.optimizers.Adam`` with ``fallback_learning_rate`` (and this
    optimizer's ``weight_decay`` at that rate), saved with the model.
    ``summary()`` lists which is which.

    Args:
        learning_rate: float or ``keras.optimizers.schedules`` schedule.
        damping: Tikhonov damping lambda (> 0), float or schedule of the step;
            a float is the initial value of the Levenberg-Marquardt rule (see
            ``damping_adaptation_interval``).
        momentum: heavy-ball momentum on the preconditioned gradient, in [0, 1).
        curvature: name of the per-layer approximation
            (``keras_kfac.curvature.available()``), or a dict
            ``{layer_name: name}`` with an optional ``"default"`` entry.
        fisher: ``"auto"`` (default: the sampled Fisher when every model
            output's loss has a known predictive distribution, see
            :mod:`keras_kfac.losses`, else the empirical one, said once in a
            warning and by ``summary()``: custom losses, no compiled loss, an
            overridden ``train_step`` unless ``loss=`` is given),
            ``"sampled"`` (targets drawn from the model's predictive
            distribution; an unsupported loss is an error) or
            ``"empirical"`` (the training labels' gradients; any loss).
            ``add_loss`` terms and weight regularizers are in the gradient
            but outside the curvature. Sample and class weights weight the
            statistics as they weight the loss; masked positions of a
            layer's input (``Masking``, ``Embedding(mask_zero=True)``) are
            left out of its statistics.
        damping_mode: ``"factored"`` (sec. 6.3: ``(A + pi*gamma I)^-1 V (G +
            gamma/pi I)^-1``) or ``"eigen"`` (exact ``(kron(A,G) + lambda I)^-1``).
        stats_decay: running-average decay of the statistics per statistics
            update (not per step), in [0, 1). With ``stats_every=10`` the
            default 0.5 keeps a memory of about 20 steps.
        stats_every: statistics are updated every this many steps. None
            (default): 10, or 5 when the first step's (global) batch has at
            least 1000 examples (``CADENCE``, ``LARGE_BATCH``).
        inverse_every: inverses/eigenbases are refreshed every this many
            steps. None (default): 20, or 10 from a batch of 1000.
        curvature_warmup: statistics are updated and inverses refreshed on
            every one of the first this many steps, then at the cadence
            above. Default 0: it sped up the ReLU autoencoder per step (loss
            after 100 steps 93.6 -> 77.9 with 40) but slowed the tanh one
            (81.5 -> 92.9; ``benchmarks/results/warmup.md``).
        kl_clip: KL clipping bound (Ba et al. 2017) on the whole update,
            momentum included: ``lr^2 u^T (F + damping) u <= kl_clip``, or
            None.
        weight_decay: decoupled weight decay (as in AdamW), or None.
        model: the model to precondition; found automatically by
            ``model.compile``. Needed for hand-written training loops.
        loss: loss used to sample targets for ``fisher="sampled"`` in
            hand-written loops (defaults to the model's compiled loss).
        fallback_learning_rate: learning rate of the Adam fallback for
            variables outside a curvature block.
        curvature_options: extra keyword arguments for the curvature classes,
            plus the block options ``weight_sharing``, ``max_factor_dim`` and
            ``max_factor_ratio``
            (:func:`keras_kfac.layers.base.blocks_for_layer`); an unknown key
            is an error listing the valid ones.
        seed: seed of the target sampling.
        damping_adaptation_interval: every this many steps, ``rho`` (the
            actual over the predicted loss reduction of the step, exact GGN on
            the step's batch) adapts the damping by the Levenberg-Marquardt
            rule (Martens & Grosse 2015, sec. 6.5; decay ``0.95**interval``,
            damping in ``[1e-8, 1e4]``). Default 5: ``benchmarks/results/
            defaults.md`` measured it ahead of a fixed damping on every model
            there. 0 or None: fixed damping. It stays fixed, said once in a
            warning, where ``rho`` cannot be measured: a damping schedule, a
            training step that does not call ``model.compute_loss`` (a custom
            ``train_step`` without ``loss=``), or several replicas of a
            ``tf.distribute`` strategy.
        adaptive_step: choose the learning rate alpha and momentum mu of every
            step by minimising the exact quadratic model (GGN on the batch)
            over ``alpha * Delta + mu * delta_prev`` (Martens & Grosse 2015,
            sec. 7); ``learning_rate``, ``momentum`` and ``kl_clip`` then do
            not apply to the curvature blocks. Needs ``model.compute_loss``
            (``model.fit`` calls it). See :mod:`keras_kfac.quadratic`.
        quadratic_model_batch_size: the exact quadratic model (``rho`` of the
            damping rule, ``adaptive_step``'s curvature) is evaluated on the
            first this many examples of the step's batch, so that it costs a
            fraction of a forward pass; ``rho`` compares actual and predicted
            reductions on that same sub-batch. None: the whole batch. The
            whole batch is also used where slicing would change the loss: a
            BatchNormalization layer (batch statistics), a stateful RNN, a
            loss that is not a mean over examples (``reduction="sum"``), an
            overridden ``compute_loss``. Default 64: the smallest size whose
            ``rho`` took the damping rule's decision of the whole batch on
            95-100% of the steps and whose adaptive step kept a median 0.99 of
            the whole batch's model reduction, on the ReLU autoencoder (batch
            1000) and the Dropout MLP (batch 128;
            ``benchmarks/results/quadratic.md``).
        **kwargs: standard Keras optimizer arguments (``clipnorm``,
            ``global_clipnorm``, ``clipvalue``, ``use_ema``, ``name``, ...).
    """

    def __init__(
        self,
        learning_rate=1.0,
        damping=1e-2,
        momentum=0.9,
        curvature="kfac",
        fisher="auto",
        damping_mode="factored",
        stats_decay=0.5,
        stats_every=None,
        inverse_every=None,
        curvature_warmup=0,
        kl_clip=3e-3,
        weight_decay=None,
        model=None,
        loss=None,
        fallback_learning_rate=1e-3,
        curvature_options=None,
        seed=None,
        damping_adaptation_interval=5,
        adaptive_step=False,
        quadratic_model_batch_size=64,
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
            curvature_warmup=curvature_warmup,
            kl_clip=kl_clip,
            fallback_learning_rate=fallback_learning_rate,
        )
        check_options(curvature, dict(curvature_options or {}))
        super().__init__(
            learning_rate=learning_rate, weight_decay=weight_decay, name=name, **kwargs
        )
        self.momentum = float(momentum)
        self.curvature = curvature
        self.fisher = fisher
        self.damping_mode = damping_mode
        self.stats_decay = float(stats_decay)
        self.stats_every = stats_every
        self.inverse_every = inverse_every
        self.curvature_warmup = curvature_warmup
        self.kl_clip = None if kl_clip is None else float(kl_clip)
        self.loss = loss
        self.fallback_learning_rate = float(fallback_learning_rate)
        self.curvature_options = dict(curvature_options or {})
        self.seed = seed
        self.adaptive_step = bool(adaptive_step)
        if quadratic_model_batch_size is not None and (
            isinstance(quadratic_model_batch_size, bool)
            or not isinstance(quadratic_model_batch_size, int)
            or quadratic_model_batch_size < 1
        ):
            raise ValueError(
                "quadratic_model_batch_size must be an integer >= 1 (the number of "
                "examples of each batch the quadratic model uses) or None (the whole "
                f"batch); got {quadratic_model_batch_size!r}."
            )
        self.quadratic_model_batch_size = quadratic_model_batch_size
        if damping_adaptation_interval is not None and (
            not isinstance(damping_adaptation_interval, int) or damping_adaptation_interval < 0
        ):
            raise ValueError(
                "damping_adaptation_interval must be an integer >= 0 (0 or None: fixed "
                f"damping); got {damping_adaptation_interval!r}."
            )
        self.damping_adaptation_interval = int(damping_adaptation_interval or 0)
        self._monitor = StepMonitor(self)
        self._levenberg_marquardt = quadratic.LevenbergMarquardt()
        if isinstance(damping, keras.optimizers.schedules.LearningRateSchedule) or callable(
            damping
        ):
            self._damping_schedule = damping
            self._damping = None
        else:
            self._damping_schedule = None
            self._damping = self.add_variable(
                (),
                initializer=keras.initializers.Constant(float(damping)),
                dtype="float32",
                name="damping",
            )
        self._stats_updates = self.add_variable((), dtype="int64", name="stats_updates")
        self._skipped_steps = self.add_variable((), dtype="int64", name="skipped_steps")
        self._seed_generator = keras.random.SeedGenerator(seed, name="fisher_seed")
        # Assigning a keras.Variable to an optimizer attribute tracks it
        # (saved with the optimizer).
        self._fisher_seed_state = self._seed_generator.state
        # Variables outside every curvature block: Keras's own Adam, with this
        # optimizer's weight decay at the fallback's learning rate (AdamW).
        self._fallback = keras.optimizers.Adam(
            learning_rate=self.fallback_learning_rate,
            weight_decay=weight_decay,
            name=f"{name}_fallback",
        )
        self._estimator = None
        self._replicas = None  # keras_kfac.distributed.Replicas during a replicated step
        if model is not None:
            self.register(model)

    @property
    def variables(self):
        # The fallback's state is saved and restored with this optimizer's
        # (as keras.optimizers.LossScaleOptimizer does for its inner one).
        return self.own_variables() + self._fallback.variables

    # --- the model ---------------------------------------------------------
    def register(self, model):
        """Precondition ``model``'s layers. ``model.compile`` calls this for
        you; call it (or pass ``model=``) for hand-written training loops."""
        if not isinstance(model, keras.Model):
            raise TypeError(f"KFAC.register expects a keras.Model, got {type(model).__name__}.")
        if self._model() is model:
            if not self._estimator.attached:
                self._estimator.attach()
            return
        if self.built:
            raise ValueError(
                "This KFAC optimizer is already built for another model; create a "
                "new KFAC() for each model."
            )
        if self._estimator is not None and self._estimator.attached:
            self._estimator.remove()
        # The curvature classes' cost models assume the small-batch cadence
        # when it follows the batch.
        cadence = {
            name: CADENCE[name][0] if getattr(self, name) is None else getattr(self, name)
            for name in CADENCE
        }
        options = dict(cadence, **self.curvature_options)
        self._estimator = CurvatureEstimator(
            model, self.curvature, self.fisher, self.damping_mode, options
        )

    def release(self, model):
        """Stop instrumenting ``model`` (it was compiled with another
        optimizer); compiling it with this one again resumes."""
        if self._model() is model and self._estimator.attached:
            self._estimator.remove()

    @property
    def fallback_optimizer(self):
        """The ``keras.optimizers.Adam`` that trains the variables outside
        every curvature block."""
        return self._fallback

    @property
    def estimator(self):
        """The :class:`keras_kfac.estimator.CurvatureEstimator` of the
        registered model (None before ``register``/``compile``)."""
        return self._estimator

    def _model(self):
        # Not a property: Keras's saving walks an optimizer's attributes, and
        # must not walk back into the model.
        return None if self._estimator is None else self._estimator.model()

    def _find_model(self):
        """The registered model, else the Keras model whose ``fit``/``compile``
        is building this optimizer."""
        if self._model() is not None:
            return self._model()
        model = compat.model_on_call_stack(self._belongs_to)
        if model is None:
            raise ValueError(
                "KFAC could not find the model it optimizes. Use "
                "model.compile(optimizer=KFAC(...)), or, for a hand-written training "
                "loop, KFAC(model=model) / optimizer.register(model) before the "
                "first apply_gradients."
            )
        self.register(model)
        return model

    def _belongs_to(self, model):
        """Whether ``model`` holds this optimizer as an attribute (its
        ``optimizer``, or e.g. a GAN's ``d_optimizer``)."""
        return any(
            isinstance(value, keras.optimizers.Optimizer) and unwrap(value) is self
            for value in list(vars(model).values())
        )

    def _key(self, variable):
        return compat.variable_key(self, variable)

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

        def add_variable(name, shape, initializer):
            return self.add_variable(shape, initializer=initializer, dtype="float32", name=name)

        estimator = self._estimator
        estimator.build(variables, add_variable, self._key, loss=self.loss)
        self._fallback.build(estimator.fallback_variables)
        self._momentums = {}
        self._previous_updates = {}
        # (stats_every, inverse_every) fixed at the first step (0: not yet).
        self._cadence = self.add_variable((2,), initializer="zeros", dtype="int64", name="cadence")
        # ||m||^2 in the damped-curvature metric of the momentum m (see
        # `_kl_scale`); a scalar, saved with the optimizer.
        self._momentum_curvature = self.add_variable(
            (), initializer="zeros", dtype="float32", name="momentum_curvature"
        )
        for v in variables:
            if not estimator.covers(self._key(v)):
                continue
            index = self.variable_index(v)
            if self.adaptive_step:
                self._previous_updates[index] = self.add_variable_from_reference(
                    v, "previous_update"
                )
            elif self.momentum > 0:
                self._momentums[index] = self.add_variable_from_reference(v, "momentum")
        if self.fisher == "auto" and estimator.fisher_used == "empirical" and estimator.blocks:
            warnings.warn(
                f"KFAC(fisher='auto') uses the empirical Fisher for {model.name!r}: "
                f"{estimator.fisher_reason}. Pass fisher='empirical' to silence this, or "
                "loss=<a supported loss> for the sampled Fisher (see KFAC.summary()).",
                stacklevel=2,
            )
        if not estimator.blocks:
            warnings.warn(
                f"KFAC found no layer with a curvature block in {model.name!r}; every "
                "variable is trained by the Adam fallback (see KFAC.summary()).",
                stacklevel=2,
            )
        elif estimator.fallback_warning():
            # Once, when the optimizer is built (the first step): nothing
            # falls back silently.
            warnings.warn(estimator.fallback_warning(), stacklevel=2)
        self._monitor.build()
        self._levenberg_marquardt.build()
        self.reset_damping_adaptation()

    def reset_damping_adaptation(self):
        """Back to the constructor's Levenberg-Marquardt rule
        (``damping_adaptation_interval``), where ``rho`` can be measured;
        :meth:`adapt_damping` overrides it."""
        self._check_built()
        every = self.damping_adaptation_interval
        if not every:
            with tf.init_scope():
                self.adapt_damping(0)
            return
        replicated = (
            tf.distribute.has_strategy() and tf.distribute.get_strategy().num_replicas_in_sync > 1
        )
        reason = None
        if not self.damping_is_adaptive:
            reason = "the damping is a schedule"
        elif replicated:
            reason = "rho is not reduced across the replicas of a tf.distribute strategy yet"
        if reason is not None:
            warnings.warn(
                f"KFAC keeps its damping fixed ({reason}); pass "
                "damping_adaptation_interval=0 to silence this.",
                stacklevel=3,
            )
            return
        # Keras may build the optimizer while tracing the first train step:
        # the rule's settings are state, assigned now, not ops of that trace.
        with tf.init_scope():
            self.adapt_damping(every, decay=0.95**every)
        # A step without model.compute_loss has no batch loss to measure rho
        # on: that step keeps the damping (warned once at trace time).
        self._monitor.rho_optional = True

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
    def damping_is_adaptive(self):
        """True when damping is a variable (that the LM rule may adapt), not
        a schedule."""
        return self._damping_schedule is None

    def adapt_damping(self, every, decay=0.95**5, min_damping=1e-8, max_damping=1e4):
        """Levenberg-Marquardt damping (Martens & Grosse 2015, sec. 6.5):
        every ``every`` steps the monitor computes ``rho`` on the step's batch
        and this optimizer applies :func:`keras_kfac.quadratic.levenberg_marquardt`
        to its damping (``every=0`` stops). Inside the train step; changing
        these values never retraces. ``AdaptiveDamping`` calls this for
        ``model.fit`` users."""
        self._check_built()
        if every > 0 and not self.damping_is_adaptive:
            raise ValueError(
                "Adaptive damping changes the damping variable, but this KFAC's "
                "damping is a schedule; pass a number as damping=."
            )
        self._levenberg_marquardt.configure(every > 0, decay, min_damping, max_damping)
        self._monitor.track_rho(every)
        self._monitor.rho_optional = False

    @property
    def skipped_steps(self):
        """Steps skipped because gradients, statistics or the update were not
        finite."""
        return self._skipped_steps.value

    def damping_multiplier(self, layer):
        """The damping multiplier of ``layer``'s block (1 unless a refresh of
        its inverse failed; see ``keras_kfac.curvature.kfac``)."""
        self._check_built()
        return self._estimator.damping_multiplier(layer)

    def previous_update(self, variable):
        """The previous step's update of a block variable (``adaptive_step``)."""
        return self._previous_updates[self.variable_index(variable)]

    def _skip_step(self):
        """A skipped step changes nothing and does not count as a step: Keras
        adds 1 to ``iterations`` after ``apply``, so it is taken back here
        (as LossScaleOptimizer leaves its inner optimizer's counter alone)."""
        self._skipped_steps.assign_add(1)
        # iterations is aggregated "only_first_replica"; under a strategy every
        # replica skips alike and takes back its own copy (no merge_call).
        distributed.local_copy(self.iterations).assign_sub(1)

    # --- the update ------------------------------------------------------------
    # Overrides of keras's TensorFlow optimizer hooks (keras 3.0 - 3.15.1;
    # see keras_kfac.compat for the calls into it).
    def apply_update(self, grads, variables, learning_rate):
        """The whole step (Keras's hook, see ``compat.OptimizerHooks``);
        decoupled weight decay happens in ``update_step`` (block variables)
        and in the fallback optimizer, so a skipped step changes nothing."""
        # Under a tf.distribute strategy: collectives without merge_call, and
        # the global batch's statistics (see keras_kfac.distributed).
        with distributed.replica_step() as replicas:
            self._replicas = replicas
            try:
                self._update_step_in_replica(grads, variables, learning_rate)
            finally:
                self._replicas = None

    def _update_step_in_replica(self, local_grads, variables, learning_rate):
        """One step: layer -> capture -> estimator (statistics, refresh,
        precondition) -> KL clip -> Keras update; the fallback optimizer for
        the variables outside every block. Non-finite gradients, statistics
        or updates skip the whole step."""
        pairs = compat.all_reduce_sum_gradients(self, list(zip(local_grads, variables)))
        grads = [g for g, _ in pairs]
        estimator = self._estimator
        covered = [estimator.covers(self._key(v)) for v in variables]
        fallback = [
            (g, v) for g, v, c in zip(local_grads, variables, covered) if not c and g is not None
        ]

        def step():
            record = estimator.capture.current()
            objective = None
            if self.adaptive_step or self._monitor.uses_objective():
                objective = quadratic.batch_objective(
                    estimator.model(),
                    estimator.capture,
                    record,
                    self.quadratic_model_batch_size,
                    forward_mode=not self._monitor.forward_mode_blockers,
                )
            self._monitor.begin(grads, variables, record, objective, self._restorable)
            directions, ok, momentum_curvature = self._natural_directions(
                grads, variables, learning_rate, objective
            )
            # Never write NaN/Inf into the weights (e.g. damping 0 on a
            # singular factor): such a step is skipped too.
            ok = ok & _all_finite([d for d, c in zip(directions, covered) if c])

            def apply():
                block_pairs = [
                    (d, v.value if isinstance(v, keras.Variable) else v)
                    for d, v, c in zip(directions, variables, covered)
                    if c
                ]
                if block_pairs:
                    compat.apply_updates(self, block_pairs, learning_rate)
                    self._momentum_curvature.assign(momentum_curvature)
                if fallback:
                    # The fallback all-reduces its own (local) gradients.
                    self._fallback.apply([g for g, _ in fallback], [v for _, v in fallback])
                updated = {
                    self._key(v): d
                    for d, v, c in zip(directions, variables, covered)
                    if c and d is not None
                }

                def value_before(variable):
                    d = updated.get(self._key(variable))
                    if d is None:  # not updated by this step
                        return tf.convert_to_tensor(variable)
                    return self._value_before_update(variable, d, learning_rate)

                rho = self._monitor.end(grads, value_before)
                if rho is not None and self.damping_is_adaptive:
                    self._damping.assign(
                        self._levenberg_marquardt.next_damping(self._damping.value, *rho)
                    )

            run_if(ok, apply)
            run_if(tf.logical_not(ok), self._skip_step)

        finite = _all_finite([g for g in grads if g is not None])
        run_if(finite, step)
        run_if(tf.logical_not(finite), self._skip_step)
        estimator.capture.clear()

    def _natural_directions(self, grads, variables, learning_rate, objective):
        """Preconditioned directions for block variables (the gradients
        elsewhere; with ``adaptive_step``, minus the whole sec. 7 step),
        whether this step's statistics were finite (if not, nothing was
        updated and the step is skipped), and the momentum's curvature norm
        after this step. ``objective``: the step's batch objective (or None).

        The KL clip scales the whole update, momentum included:
        ``update_step``'s ``m <- momentum * m + d`` gets ``d = nu * P g + (nu
        - 1) * momentum * m``, i.e. ``m <- nu * (momentum * m + P g)``, so the
        momentum holds the update actually taken (divided by the learning
        rate)."""
        estimator = self._estimator
        if not estimator.blocks:
            return list(grads), tf.constant(True), self._momentum_curvature.value
        record = estimator.capture.current()
        if record is None:
            raise ValueError(
                "KFAC saw no training forward pass for this step. Call "
                "`model(x, training=True)` inside the GradientTape before "
                "`apply_gradients`, with the model KFAC was registered with."
            )
        damping = self.damping
        step = self.iterations
        # Blocks whose variables this step does not update (frozen since the
        # optimizer was built) get no statistics and no update.
        present = estimator.present(variables, self._key)

        def batches():
            return estimator.batches(
                record,
                seed=self._seed_generator,
                loss_scale=self._loss_scale(),
                replicas=self._replicas,
                present=present,
            )

        current = batches() if estimator.uses_current_batch else None

        def update_statistics():
            this_step = current if current is not None else batches()
            ok = estimator.statistics_finite(this_step)

            def apply():
                decay = tf.where(self._stats_updates > 0, self.stats_decay, 0.0)
                estimator.update_statistics(this_step, decay)
                self._stats_updates.assign_add(1)

            run_if(ok, apply)
            return ok

        stats_every, inverse_every = self._step_cadence(record)
        stats_due = tf.equal(step % stats_every, 0)
        refresh_due = tf.equal(step % inverse_every, 0)
        if self.curvature_warmup:
            # The first steps' curvature otherwise stays that of the first
            # batch (initial weights) for inverse_every steps.
            warming = step < self.curvature_warmup
            stats_due, refresh_due = stats_due | warming, refresh_due | warming
        stats_ok = tf.cond(stats_due, update_statistics, lambda: tf.constant(True))
        run_if(
            refresh_due & (self._stats_updates > 0) & stats_ok,
            lambda: estimator.refresh(damping, self._replicas),
        )
        matrices = estimator.block_gradients(grads, variables, self._key)
        preconditioned = estimator.precondition(matrices, damping, current)
        if self.adaptive_step:
            self._monitor.note_preconditioning(matrices, preconditioned, tf.constant(1.0))
            directions = self._adaptive_directions(
                grads, variables, preconditioned, objective, damping
            )
            return directions, stats_ok, self._momentum_curvature.value
        inner = estimator.inner_product(matrices, preconditioned)
        momentum_dot_grad = self._momentum_dot(grads, variables)
        # ||mu m + P g||^2 in the metric P^-1 = F + damping, with
        # <m, P^-1 P g> = <m, g> and ||m||^2 carried over from the last step.
        mu = tf.constant(self.momentum, tf.float32)
        update_curvature = mu * mu * self._momentum_curvature + 2.0 * mu * momentum_dot_grad + inner
        scale = self._kl_scale(update_curvature, learning_rate)
        self._monitor.note_preconditioning(matrices, preconditioned, scale)
        directions = estimator.to_variables(
            estimator.scaled(scale, preconditioned), variables, self._key, list(grads)
        )
        for i, v in enumerate(variables):
            m = self._momentum_of(v)
            if m is not None and directions[i] is not None:
                # Dense: the momentum of a sparse (embedding) block is dense.
                direction = tf.convert_to_tensor(directions[i])
                directions[i] = direction + tf.cast((scale - 1.0) * mu, v.dtype) * m
        return directions, stats_ok, scale * scale * tf.maximum(update_curvature, 0.0)

    def _step_cadence(self, record):
        """``(stats_every, inverse_every)`` of this step: the given ones, or
        :data:`CADENCE` for the first step's global batch, kept from then on
        (a later short batch does not change it, and every replica agrees)."""
        if self.stats_every is not None and self.inverse_every is not None:
            return self.stats_every, self.inverse_every
        examples = self._estimator.batch_size(record)
        if self._replicas is not None:
            examples = examples * self._replicas.num_replicas
        large = examples >= LARGE_BATCH
        chosen = tf.stack(
            [
                tf.constant(getattr(self, name), tf.int64)
                if getattr(self, name) is not None
                else tf.where(large, tf.constant(CADENCE[name][1], tf.int64), CADENCE[name][0])
                for name in CADENCE
            ]
        )
        cadence = tf.where(self._cadence > 0, self._cadence, chosen)
        self._cadence.assign(cadence)
        return cadence[0], cadence[1]

    @property
    def cadence(self):
        """``(stats_every, inverse_every)`` in use (fixed at the first step
        when they follow the batch size; None before it)."""
        if self.stats_every is not None and self.inverse_every is not None:
            return self.stats_every, self.inverse_every
        if not self.built or int(self._cadence[0]) == 0:
            return None
        return tuple(int(v) for v in self._cadence.numpy())

    def _adaptive_directions(self, grads, variables, preconditioned, objective, damping):
        """Sec. 7 (:func:`keras_kfac.quadratic.adaptive_step`): per block
        variable ``-(alpha Delta + mu delta_prev)`` with ``Delta = -P(grad)``
        and ``delta_prev`` the previous update (``update_step`` applies it
        whole); the gradients elsewhere."""
        objective = quadratic.require(objective).subset
        key = self._key
        natural, previous = {}, {}
        for block, p in zip(self._estimator.blocks, preconditioned):
            for w, d in zip(block.variables, block.from_matrix(-p)):
                natural[key(w)] = d
                previous[key(w)] = tf.cast(self.previous_update(w), tf.float32)
        result = quadratic.adaptive_step(
            objective,
            objective.align(natural, key),
            objective.align(previous, key),
            damping,
        )
        self._monitor.note_adaptive_step(result)
        directions = list(grads)
        for i, v in enumerate(variables):
            if key(v) in natural:
                delta = result.alpha * natural[key(v)] + result.mu * previous[key(v)]
                directions[i] = tf.cast(-delta, v.dtype)
        return directions

    def _momentum_of(self, variable):
        """The momentum of a block variable (None without momentum)."""
        return self._momentums.get(self.variable_index(variable))

    def _momentum_dot(self, grads, variables):
        """``<m, g>`` over the block variables (0 without momentum)."""
        terms = [
            tf.reduce_sum(tf.cast(m, tf.float32) * tf.cast(tf.convert_to_tensor(g), tf.float32))
            for g, m in ((g, self._momentum_of(v)) for g, v in zip(grads, variables))
            if g is not None and m is not None
        ]
        return tf.add_n(terms) if terms else tf.constant(0.0)

    def _kl_scale(self, update_curvature, learning_rate):
        """Ba et al. 2017's KL clip applied to the whole update: ``nu = min(1,
        sqrt(kl_clip / (lr^2 ||u||^2)))`` with ``u = momentum * m + P g`` and
        ``||u||^2 = u^T (F + damping) u`` (``<g, P g>`` without momentum).
        Clipping ``P g`` alone and then adding momentum lets momentum 0.9
        take steps of up to 100x the bound along a persistent direction
        (benchmarks/results/divergence.md)."""
        if self.kl_clip is None:
            return tf.constant(1.0)
        lr = tf.cast(learning_rate, tf.float32)
        bound = tf.math.divide_no_nan(self.kl_clip, lr * lr * update_curvature)
        return tf.where(update_curvature > 0.0, tf.minimum(1.0, tf.sqrt(bound)), 1.0)

    def _loss_scale(self):
        """The dynamic loss scale when a LossScaleOptimizer wraps this one."""
        wrapper = getattr(self._model(), "optimizer", None)
        if isinstance(wrapper, keras.optimizers.LossScaleOptimizer) and unwrap(wrapper) is self:
            return tf.cast(wrapper.dynamic_scale, tf.float32)
        return None

    def _decayed(self, variable):
        return self.weight_decay is not None and self.decays(variable)

    def _restorable(self, variable):
        """Whether :meth:`_value_before_update` can give back ``variable``'s
        value from before this step's update (the StepMonitor then copies
        it on no step): a block variable without weight decay."""
        return self._estimator.covers(self._key(variable)) and not self._decayed(variable)

    def _value_before_update(self, variable, gradient, learning_rate):
        """The value a restorable variable had before :meth:`update_step`
        applied ``gradient``, from the value and the state that step wrote
        (``new = old - u`` with ``u`` the update it subtracted, computed
        again with the same float operations, so ``new + u`` is ``old`` to
        the last bit of ``old``'s magnitude)."""
        new = tf.convert_to_tensor(variable)
        index = self.variable_index(variable)
        if index in self._previous_updates:  # adaptive_step: the whole update
            return new + tf.cast(gradient, variable.dtype)
        lr = tf.cast(learning_rate, variable.dtype)
        if index in self._momentums:
            return new + lr * tf.convert_to_tensor(self._momentums[index])
        return new + lr * tf.cast(gradient, variable.dtype)

    def update_step(self, gradient, variable, learning_rate):
        """One block variable's update, given its natural direction."""
        lr = tf.cast(learning_rate, variable.dtype)
        gradient = tf.cast(gradient, variable.dtype)
        index = self.variable_index(variable)
        if self._decayed(variable):
            self.assign_sub(variable, variable * tf.cast(self.weight_decay, variable.dtype) * lr)
        if index in self._previous_updates:
            # adaptive_step: `gradient` is minus the whole update (sec. 7).
            self.assign(self._previous_updates[index], -gradient)
            self.assign_sub(variable, gradient)
        elif index in self._momentums:
            m = self._momentums[index]
            self.assign(m, self.momentum * m + gradient)
            self.assign_sub(variable, lr * m)
        else:
            self.assign_sub(variable, lr * gradient)

    # --- inspection ------------------------------------------------------------
    def _check_built(self):
        if not self.built:
            raise ValueError("The optimizer is not built yet: train one step first.")

    def curvature_matrix(self, layer):
        """The undamped approximate Fisher block of ``layer`` (object or name)
        as a dense ``(P, P)`` tensor, parameters ordered as
        ``concat(flatten(kernel), bias)``."""
        self._check_built()
        return self._estimator.matrix(layer)

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
        self._monitor.track(every, histograms, fidelity_layers)

    @property
    def monitor(self):
        """The :class:`keras_kfac.monitoring.StepMonitor` (diagnostics)."""
        return self._monitor

    def curvature_for(self, layer):
        """The curvature object of ``layer`` (object or name)."""
        self._check_built()
        return self._estimator.curvature_for(layer)

    def summary(self, print_fn=print):
        """Which layers got which curvature block, and which variables fell
        back to the first-order update. Returns the text."""
        if not self.built:
            model = self._model()
            if model is None:
                raise ValueError("Register a model (compile or KFAC(model=...)) first.")
            self.build(model.trainable_variables)
        lines = [
            f"KFAC(curvature={self.curvature!r}, fisher={self.fisher!r}, damping_mode={self.damping_mode!r})"
        ]
        lines += self._estimator.summary_rows()
        fallback = self._estimator.fallback_variables
        if fallback:
            lines.append(
                f"Adam fallback (lr={self.fallback_learning_rate:g}, "
                f"{100 * self._estimator.fallback_share():.1f}% of the parameters) for: "
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
                "curvature_warmup": self.curvature_warmup,
                "kl_clip": self.kl_clip,
                "loss": keras.saving.serialize_keras_object(self.loss)
                if self.loss is not None
                else None,
                "fallback_learning_rate": self.fallback_learning_rate,
                "curvature_options": self.curvature_options,
                "seed": self.seed,
                "damping_adaptation_interval": self.damping_adaptation_interval,
                "adaptive_step": self.adaptive_step,
                "quadratic_model_batch_size": self.quadratic_model_batch_size,
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


def _validate(
    damping=1.0,
    momentum=0.0,
    curvature="kfac",
    fisher="auto",
    damping_mode="factored",
    stats_decay=0.0,
    stats_every=None,
    inverse_every=None,
    curvature_warmup=0,
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
        raise ValueError(f"Unknown fisher={fisher!r}: use 'auto', 'sampled' or 'empirical'.")
    if damping_mode not in DAMPING_MODES:
        raise ValueError(f"Unknown damping_mode={damping_mode!r}: use 'factored' or 'eigen'.")
    if not 0.0 <= stats_decay < 1.0:
        raise ValueError(f"stats_decay must be in [0, 1); got {stats_decay!r}.")
    for arg, value in (("stats_every", stats_every), ("inverse_every", inverse_every)):
        if value is not None and not (isinstance(value, int) and value >= 1):
            raise ValueError(
                f"{arg} must be an integer >= 1, or None to follow the batch size; got {value!r}."
            )
    if isinstance(curvature_warmup, bool) or not (
        isinstance(curvature_warmup, int) and curvature_warmup >= 0
    ):
        raise ValueError(
            "curvature_warmup must be an integer >= 0 (the first steps with statistics "
            f"and refreshes every step; 0: none); got {curvature_warmup!r}."
        )
    if kl_clip is not None and not kl_clip > 0:
        raise ValueError(f"kl_clip must be positive or None; got {kl_clip!r}.")
    if not fallback_learning_rate > 0:
        raise ValueError(
            f"fallback_learning_rate must be positive; got {fallback_learning_rate!r}."
        )


register_model_discovery(KFAC)
