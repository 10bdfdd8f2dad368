"""In-step state of the quadratic model, adaptive damping and diagnostics.

The optimizer owns one :class:`StepMonitor`. Everything here runs inside the
compiled train step, behind ``tf.cond`` on the step counter, and keeps its
results in (untracked, non-checkpointed) ``tf.Variable``\\ s that
:meth:`keras_kfac.KFAC.diagnostics` and the callbacks of
:mod:`keras_kfac.callbacks` read:

* the reduction ratio ``rho`` and the Levenberg-Marquardt damping rule
  (Martens & Grosse 2015, sec. 6.5), every ``every`` steps;
* the adaptive step ``delta = alpha * Delta + mu * delta_prev`` (sec. 7),
  every step when ``KFAC(adaptive_step=True)``;
* curvature diagnostics (factor spectra, traces, condition numbers, pi,
  norms, cosines, the KL-clip scale) on logging steps.

Which of these are traced into the step is fixed when the train function is
traced (``features()``); the callbacks retrace once at ``on_train_begin`` if
that set changes. How often they run and the damping-rule constants are
variables: changing them never retraces.
"""

import numpy as np
import tensorflow as tf

from keras_kfac import compat, quadratic
from keras_kfac.curvature import factors as factor_math
from keras_kfac.estimator import MAX_DENSE_PARAMETERS
from keras_kfac.graph_util import run_if

#: Names of the optimizer-level scalars in :meth:`StepMonitor.values`.
SCALARS = (
    "damping",
    "rho",
    "alpha",
    "mu",
    "kl_clip_scale",
    "update_norm",
    "grad_norm",
    "grad_cosine",
    "skipped_steps",
)
#: Names of the per-factor scalars (for each of ``A`` and ``G``).
FACTOR_SCALARS = ("trace", "min_eigenvalue", "max_eigenvalue", "condition_number")


def _variable(value, dtype=tf.float32, shape=None):
    with tf.init_scope():
        return tf.Variable(value, dtype=dtype, trainable=False, shape=shape)


class StepMonitor:
    def __init__(self, optimizer):
        self._optimizer_ref = optimizer
        self.built = False
        self.rho_enabled = False
        self.diagnostics_enabled = False
        self.histograms = True
        self.fidelity_layers = ()
        self.traced_features = None
        self._step = None

    # --- state -------------------------------------------------------------
    def build(self):
        """Create the variables (eagerly, at the optimizer's ``build``)."""
        if self.built:
            return
        opt = self._optimizer_ref
        nan = float("nan")
        self.scalars = {name: _variable(nan) for name in SCALARS if name != "skipped_steps"}
        self.rho_every = _variable(0, tf.int64)
        self.rho_adapts_damping = _variable(False, tf.bool)
        self.damping_decay = _variable(0.95**5)
        self.min_damping = _variable(1e-8)
        self.max_damping = _variable(1e4)
        self.rho_step = _variable(-1, tf.int64)
        self.diagnostics_every = _variable(0, tf.int64)
        self.diagnostics_step = _variable(-1, tf.int64)
        self.layers = {}
        for block, curvature in zip(opt.estimator.blocks, opt.estimator.curvatures):
            entry = {"preconditioned_grad_norm": _variable(nan), "fidelity_relative_error": _variable(nan)}
            factors = curvature.factors()
            if "A" in factors and "G" in factors:
                entry["pi"] = _variable(nan)
                for f, dim in (("A", block.a_dim), ("G", block.g_dim)):
                    for name in FACTOR_SCALARS:
                        entry[f"{f}_{name}"] = _variable(nan)
                    entry[f"{f}_spectrum"] = _variable(np.zeros((dim,), np.float32))
            self.layers[block.name] = entry
        self.built = True

    # --- configuration (callbacks and KFAC.track_diagnostics) ------------------
    def track(self, every=100, histograms=True, fidelity_layers=()):
        """Compute diagnostics every ``every`` steps (0 disables)."""
        self._check_fidelity_layers(tuple(fidelity_layers))
        self.diagnostics_enabled = every > 0
        self.histograms = bool(histograms)
        self.fidelity_layers = tuple(fidelity_layers)
        self.diagnostics_every.assign(int(every))

    def adapt_damping(self, every, decay, min_damping, max_damping):
        """Compute ``rho`` every ``every`` steps and apply the
        Levenberg-Marquardt rule to the damping there (``every=0`` stops)."""
        self.rho_enabled = self.rho_enabled or every > 0
        self.rho_every.assign(int(every))
        self.damping_decay.assign(float(decay))
        self.min_damping.assign(float(min_damping))
        self.max_damping.assign(float(max_damping))
        self.rho_adapts_damping.assign(every > 0)

    def trace_is_stale(self):
        """Whether the train function was traced with other features than
        the current ones (it must then be retraced)."""
        return self.traced_features is not None and self.traced_features != self.features()

    @property
    def latest_diagnostics_step(self):
        return int(self.diagnostics_step.numpy())

    def features(self):
        """What is traced into the train step (changes need a retrace)."""
        return (
            self.rho_enabled,
            self.diagnostics_enabled,
            self.histograms,
            tuple(self.fidelity_layers),
        )

    def _check_fidelity_layers(self, names):
        opt = self._optimizer_ref
        if names and opt.estimator.fisher_used != "sampled":
            raise ValueError(
                "fidelity_layers needs the sampled Fisher (KFAC(fisher='sampled'), or "
                "'auto' with a supported loss): the exact block is computed through "
                "the sampled-Fisher pass's tape."
            )
        known = {b.name: b for b in opt.estimator.blocks}
        for name in names:
            if name not in known:
                raise ValueError(
                    f"fidelity_layers: {name!r} has no curvature block; blocks: "
                    f"{', '.join(known) or '(none)'}."
                )
            if known[name].num_parameters > MAX_DENSE_PARAMETERS:
                raise ValueError(
                    f"fidelity_layers: {name!r} has {known[name].num_parameters} "
                    f"parameters; the exact block is only built up to {MAX_DENSE_PARAMETERS}."
                )

    # --- the step -----------------------------------------------------------
    def begin(self, grads, variables, record):
        """Start of a (finite) step, before the update: snapshot the
        parameters when ``rho`` or diagnostics are traced."""
        opt = self._optimizer_ref
        self.traced_features = self.features()
        # The damping of this step, read now (a variable's value is read
        # where it is used, which could be after the LM rule changed it).
        damping = tf.identity(tf.convert_to_tensor(opt.damping))
        self._step = {"record": record, "objective": None, "damping": damping}
        step = opt.iterations
        rho_now = tf.constant(False)
        if self.rho_enabled:
            # Steps every, 2*every, ... (1-based, like the logging steps, so
            # that with update_freq a multiple of every no pass is repeated).
            rho_now = (self.rho_every > 0) & tf.equal(
                (step + 1) % tf.maximum(self.rho_every, 1), 0
            )
        diag_now = tf.constant(False)
        if self.diagnostics_enabled:
            diag_now = (self.diagnostics_every > 0) & tf.equal(
                (step + 1) % tf.maximum(self.diagnostics_every, 1), 0
            )
        self._step["rho_now"] = rho_now
        self._step["diag_now"] = diag_now
        if self.rho_enabled or self.diagnostics_enabled:
            model = opt.estimator.model()
            self._step["old"] = [tf.identity(v.value) for v in model.trainable_variables]

    def objective(self):
        """The batch objective of this step (needs ``model.compute_loss``)."""
        step = self._step
        if step["objective"] is None:
            record = step["record"]
            if record is None or record.loss_args is None:
                raise ValueError(
                    "KFAC(adaptive_step=True), AdaptiveDamping and the rho curve of "
                    "CurvatureMonitor re-evaluate the batch loss, so they need "
                    "model.compute_loss: train with model.fit, or call "
                    "`loss = model.compute_loss(x, y, y_pred)` inside the "
                    "GradientTape of a hand-written loop (compile the model with a loss)."
                )
            opt = self._optimizer_ref
            step["objective"] = quadratic.BatchObjective(opt.estimator.model(), opt.estimator.capture, record.loss_args)
        return step["objective"]

    def _model_grads(self, grads, variables):
        """The step's gradients aligned with ``model.trainable_variables``."""
        opt = self._optimizer_ref
        by_key = {compat.variable_key(opt, v): g for g, v in zip(grads, variables)}
        out = []
        for v in opt.estimator.model().trainable_variables:
            g = by_key.get(compat.variable_key(opt, v))
            out.append(tf.zeros(v.shape, tf.float32) if g is None else tf.cast(g, tf.float32))
        return out

    def note_preconditioning(self, matrices, preconditioned, scale):
        """Record ``V`` and ``P(V)`` per block and the KL-clip scale nu."""
        if self._step is not None:
            self._step.update(matrices=matrices, preconditioned=preconditioned, nu=scale)

    def adaptive_directions(self, grads, variables, preconditioned):
        """Sec. 7: per block variable, the direction ``-(alpha Delta + mu
        delta_prev)`` with ``Delta = -P(grad)``, ``delta_prev`` the previous
        update, and ``(alpha, mu)`` minimising the exact quadratic model."""
        opt = self._optimizer_ref
        damping = self._step["damping"]
        def key(v):
            return compat.variable_key(opt, v)

        model_vars = opt.estimator.model().trainable_variables
        index = {key(v): i for i, v in enumerate(model_vars)}
        position = {key(v): i for i, v in enumerate(variables)}
        natural = [tf.zeros(v.shape, tf.float32) for v in model_vars]
        previous = [tf.zeros(v.shape, tf.float32) for v in model_vars]
        for block, p in zip(opt.estimator.blocks, preconditioned):
            for w, d in zip(block.variables, block.from_matrix(-p)):
                i = index[key(w)]
                natural[i] = d
                previous[i] = tf.cast(opt.previous_update(w), tf.float32)
        objective = self.objective()
        values = objective.current_values()
        q, loss = quadratic.gram(objective, values, [natural, previous], damping)
        g = self._model_grads(grads, variables)
        b = tf.stack([quadratic.dot(g, natural), quadratic.dot(g, previous)])
        alpha, mu, reduction = quadratic.solve_step_coefficients(q, b)
        self.scalars["alpha"].assign(alpha)
        self.scalars["mu"].assign(mu)
        self._step.update(model_reduction=reduction, loss_before=loss)
        directions = list(grads)
        for block in opt.estimator.blocks:
            for w in block.variables:
                i = index[key(w)]
                delta = alpha * natural[i] + mu * previous[i]
                directions[position[key(w)]] = tf.cast(-delta, w.dtype)
        return directions

    def end(self, grads, variables, damping):
        """After the update: ``rho`` (and the damping rule), diagnostics."""
        if not (self.rho_enabled or self.diagnostics_enabled):
            self._step = None
            return
        step = self._step
        damping = step["damping"]
        opt = self._optimizer_ref
        model_vars = opt.estimator.model().trainable_variables
        new = [v.value for v in model_vars]
        delta = [tf.cast(n, tf.float32) - tf.cast(o, tf.float32) for n, o in zip(new, step["old"])]

        def compute_rho():
            objective = self.objective()
            g = self._model_grads(grads, variables)
            exact_reuse = (
                "model_reduction" in step
                and not opt.estimator.fallback_variables
                and opt.weight_decay is None
            )
            if exact_reuse:
                predicted, before = step["model_reduction"], step["loss_before"]
            else:
                predicted, before = quadratic.model_reduction(
                    objective, step["old"], delta, g, damping
                )
            after = objective.loss(new)
            rho = quadratic.reduction_ratio(after - before, predicted)
            self.scalars["rho"].assign(rho)
            self.rho_step.assign(opt.iterations + 1)
            if opt.damping_is_adaptive:
                adapted = quadratic.levenberg_marquardt(
                    opt.damping, rho, self.damping_decay, self.min_damping, self.max_damping
                )
                # Only on AdaptiveDamping's steps (rho is also computed on
                # logging steps, for the curve).
                adapt = self.rho_adapts_damping & step["rho_now"]
                opt.adapt_damping(tf.where(adapt, adapted, opt.damping))

        # rho on AdaptiveDamping's steps, and on logging steps when the batch
        # loss can be re-evaluated (model.compute_loss was called).
        record = step["record"]
        has_loss = record is not None and record.loss_args is not None
        when = step["rho_now"] if self.rho_enabled else tf.constant(False)
        if has_loss:
            when = when | step["diag_now"]
        if self.rho_enabled or has_loss:
            run_if(when, compute_rho)
        if self.diagnostics_enabled:
            run_if(step["diag_now"], lambda: self._diagnostics(grads, delta, damping))
        self._step = None

    def _diagnostics(self, grads, delta, damping):
        opt = self._optimizer_ref
        step = self._step
        s = self.scalars
        s["damping"].assign(tf.cast(damping, tf.float32))
        s["kl_clip_scale"].assign(tf.cast(step.get("nu", 1.0), tf.float32))
        s["update_norm"].assign(tf.sqrt(quadratic.dot(delta, delta)))
        g32 = [tf.cast(g, tf.float32) for g in grads]
        s["grad_norm"].assign(tf.sqrt(quadratic.dot(g32, g32)))
        vs, ps = step.get("matrices"), step.get("preconditioned")
        if vs:
            inner = quadratic.dot(vs, ps)
            norms = tf.sqrt(quadratic.dot(vs, vs) * quadratic.dot(ps, ps))
            s["grad_cosine"].assign(tf.math.divide_no_nan(inner, norms))
            for block, p in zip(opt.estimator.blocks, ps):
                self.layers[block.name]["preconditioned_grad_norm"].assign(tf.norm(p))
        for block, curvature in zip(opt.estimator.blocks, opt.estimator.curvatures):
            entry = self.layers[block.name]
            factors = curvature.factors()
            if "pi" not in entry:
                continue
            a, g = tf.convert_to_tensor(factors["A"]), tf.convert_to_tensor(factors["G"])
            entry["pi"].assign(factor_math.pi_correction(a, g))
            damping_a, damping_g = factor_math.factored_damping(a, g, tf.cast(damping, tf.float32))
            for name, m, d in (("A", a, damping_a), ("G", g, damping_g)):
                evals = factor_spectrum(m)
                entry[f"{name}_spectrum"].assign(evals)
                entry[f"{name}_trace"].assign(tf.linalg.trace(m))
                entry[f"{name}_min_eigenvalue"].assign(evals[0])
                entry[f"{name}_max_eigenvalue"].assign(evals[-1])
                entry[f"{name}_condition_number"].assign((evals[-1] + d) / (evals[0] + d))
        if self.fidelity_layers:
            self._fidelity()
        self.diagnostics_step.assign(opt.iterations + 1)

    def _fidelity(self):
        """Relative Frobenius error of each named layer's approximate block
        (``curvature_matrix``) against the exact GGN (= Fisher for the
        sampled-Fisher losses on logits/linear outputs) block of this batch,
        at the parameters the step started from."""
        # (keras_kfac.fidelity works eagerly on numpy batches; this runs in
        # the compiled step on the recorded batch.)
        opt = self._optimizer_ref
        objective = self.objective()
        estimator = opt.estimator
        for name in self.fidelity_layers:
            i = estimator.block_index(name)
            exact = quadratic.exact_ggn_block(objective, self._step["record"], estimator.blocks[i])
            approx = tf.convert_to_tensor(estimator.curvatures[i].matrix())
            error = quadratic.relative_error(exact, approx)
            self.layers[name]["fidelity_relative_error"].assign(tf.cast(error, tf.float32))

    # --- reading -------------------------------------------------------------
    def values(self):
        """The latest diagnostics as a flat dict of tensors."""
        opt = self._optimizer_ref
        out = {"damping": tf.convert_to_tensor(opt.damping)}
        if not self.built:
            return out
        for name, var in self.scalars.items():
            if name != "damping":
                out[name] = var.value()
        out["skipped_steps"] = opt.skipped_steps
        out["rho_step"] = self.rho_step.value()
        out["diagnostics_step"] = self.diagnostics_step.value()
        out["diagnostics_damping"] = self.scalars["damping"].value()
        for layer, entry in self.layers.items():
            for name, var in entry.items():
                out[f"{layer}/{name}"] = var.value()
        return out


def factor_spectrum(m):
    """Ascending eigenvalues of a symmetric PSD factor, clipped at 0 (NaN
    factors give NaN spectra instead of an exception)."""
    ok = factor_math.all_finite(m)
    safe = tf.where(ok, factor_math.symmetrize(m), tf.eye(tf.shape(m)[0], dtype=m.dtype))
    evals = tf.maximum(tf.linalg.eigvalsh(safe), 0.0)
    return tf.where(ok, evals, float("nan"))


__all__ = ["StepMonitor", "SCALARS", "FACTOR_SCALARS", "factor_spectrum"]
