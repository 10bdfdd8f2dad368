"""In-step diagnostics: the monitor observes the train step, it never
writes optimizer state.

The optimizer owns one :class:`StepMonitor`. Everything here runs inside the
compiled train step, behind ``tf.cond`` on the step counter, and keeps its
results in (untracked, non-checkpointed) ``tf.Variable``\\ s that
:meth:`keras_kfac.KFAC.diagnostics` and the callbacks of
:mod:`keras_kfac.callbacks` read:

* the reduction ratio ``rho`` (Martens & Grosse 2015, sec. 6.5) every
  ``every`` steps (:meth:`StepMonitor.track_rho`), returned to the optimizer,
  which applies the Levenberg-Marquardt damping rule;
* ``alpha``/``mu`` of the adaptive step (sec. 7, computed by the optimizer
  with :func:`keras_kfac.quadratic.adaptive_step`);
* curvature diagnostics (factor spectra, traces, condition numbers, pi,
  norms, cosines, the KL-clip scale, the exact-block fidelity of
  ``fidelity_layers``) on logging steps.

Which of these are traced into the step is fixed when the train function is
traced (``features()``); the callbacks retrace once at ``on_train_begin`` if
that set changes. How often they run is a variable: changing it never
retraces.
"""

import warnings

import numpy as np
import tensorflow as tf

from keras_kfac import compat, exact, quadratic
from keras_kfac.curvature import factors as factor_math
from keras_kfac.estimator import MAX_DENSE_PARAMETERS
from keras_kfac.graph_util import run_if, scoped, untracked_variable
from keras_kfac.layers import base as layer_blocks

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


class StepMonitor:
    def __init__(self, optimizer):
        self._optimizer_ref = optimizer
        self.built = False
        self.rho_enabled = False
        # True when rho was enabled by default (KFAC's LM rule), not asked
        # for: a step with no batch loss then skips it instead of failing.
        self.rho_optional = False
        self.diagnostics_enabled = False
        self.histograms = True
        self.fidelity_layers = ()
        self.traced_features = None
        self._step = None
        #: ``{layer name: reason}``: layers whose traced forward pass cannot
        #: run under forward-mode autodiff (set at :meth:`build`); the
        #: quadratic model's products then take reverse passes.
        self.forward_mode_blockers = {}

    # --- state -------------------------------------------------------------
    def build(self):
        """Create the variables (eagerly, at the optimizer's ``build``)."""
        if self.built:
            return
        opt = self._optimizer_ref
        nan = float("nan")
        self.scalars = {
            name: untracked_variable(nan) for name in SCALARS if name != "skipped_steps"
        }
        self.rho_every = untracked_variable(0, tf.int64)
        self.rho_step = untracked_variable(-1, tf.int64)
        self.diagnostics_every = untracked_variable(0, tf.int64)
        self.diagnostics_step = untracked_variable(-1, tf.int64)
        self.forward_mode_blockers = layer_blocks.forward_mode_blockers(
            compat.flatten_layers(opt.estimator.model())
        )
        self.layers = {}
        for block, curvature in zip(opt.estimator.blocks, opt.estimator.curvatures):
            entry = {
                "preconditioned_grad_norm": untracked_variable(nan),
                "fidelity_relative_error": untracked_variable(nan),
            }
            factors = curvature.factors()
            if "A" in factors and "G" in factors:
                entry["pi"] = untracked_variable(nan)
                for f, dim in (("A", block.a_dim), ("G", block.g_dim)):
                    for name in FACTOR_SCALARS:
                        entry[f"{f}_{name}"] = untracked_variable(nan)
                    entry[f"{f}_spectrum"] = untracked_variable(np.zeros((dim,), np.float32))
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

    def track_rho(self, every):
        """Compute ``rho`` every ``every`` steps (``every=0`` stops; once
        enabled, the computation stays traced). :meth:`end` returns it with
        whether this was such a step (the optimizer's damping rule uses it)."""
        self.rho_enabled = self.rho_enabled or every > 0
        self.rho_every.assign(int(every))

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
            self.rho_optional,
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
    def uses_objective(self):
        """Whether the traced features may re-evaluate the batch loss."""
        return self.rho_enabled or self.diagnostics_enabled

    @scoped("kfac_monitor_begin")
    def begin(self, grads, variables, record, objective, restorable=lambda variable: False):
        """Start of a (finite) step, before the update. ``objective``: the
        step's :class:`keras_kfac.quadratic.BatchObjective` (None when the
        step did not call ``model.compute_loss``). ``restorable(variable)``:
        whether the optimizer can give back, after the update, the value a
        model variable had before it (:meth:`end`'s ``value_before``); the
        others are copied here when ``rho`` or diagnostics are traced."""
        opt = self._optimizer_ref
        self.traced_features = self.features()
        # The damping of this step, read now (a variable's value is read
        # where it is used, which could be after the LM rule changed it).
        damping = tf.identity(tf.convert_to_tensor(opt.damping))
        self._step = {"record": record, "objective": objective, "damping": damping}
        step = opt.iterations
        rho_now = tf.constant(False)
        if self.rho_enabled:
            # Steps every, 2*every, ... (1-based, like the logging steps, so
            # that with update_freq a multiple of every no pass is repeated).
            rho_now = (self.rho_every > 0) & tf.equal((step + 1) % tf.maximum(self.rho_every, 1), 0)
        diag_now = tf.constant(False)
        if self.diagnostics_enabled:
            diag_now = (self.diagnostics_every > 0) & tf.equal(
                (step + 1) % tf.maximum(self.diagnostics_every, 1), 0
            )
        self._step["rho_now"] = rho_now
        self._step["diag_now"] = diag_now
        if self.rho_enabled or self.diagnostics_enabled:
            # Only the variables the optimizer cannot restore are copied: a
            # copy of every weight on every step served only rho's and the
            # logging steps, and made every weight update copy-on-write.
            self._step["snapshot"] = {
                i: tf.identity(v.value)
                for i, v in enumerate(opt.estimator.model().trainable_variables)
                if not restorable(v)
            }

    def note_preconditioning(self, matrices, preconditioned, scale):
        """Record ``V`` and ``P(V)`` per block and the KL-clip scale nu."""
        if self._step is not None:
            self._step.update(matrices=matrices, preconditioned=preconditioned, nu=scale)

    def note_adaptive_step(self, result):
        """Record the :class:`keras_kfac.quadratic.AdaptiveStep` of this step
        (``alpha``, ``mu``; its model reduction is reused for ``rho``)."""
        self.scalars["alpha"].assign(result.alpha)
        self.scalars["mu"].assign(result.mu)
        if self._step is not None:
            self._step.update(model_reduction=result.model_reduction, loss_before=result.loss)

    @scoped("kfac_monitor_end")
    def end(self, grads, value_before=None):
        """After the update: ``rho`` and diagnostics. ``value_before(variable)``:
        the value a ``restorable`` variable (see :meth:`begin`) had before the
        update, called only on the steps that use it. Returns ``(rho,
        rho_now)``: this step's ``rho`` (NaN when not computed) and whether
        this is one of :meth:`track_rho`'s steps, or None when ``rho`` is
        not traced."""
        if not (self.rho_enabled or self.diagnostics_enabled):
            self._step = None
            return None
        step = self._step
        damping = step["damping"]
        opt = self._optimizer_ref
        model_vars = opt.estimator.model().trainable_variables
        new = [v.value for v in model_vars]
        snapshot = step["snapshot"]

        def start():
            # The parameters the step started from, formed inside the
            # branches that use them.
            return [
                snapshot[i] if i in snapshot else value_before(v) for i, v in enumerate(model_vars)
            ]

        def update(old):
            return [tf.cast(n, tf.float32) - tf.cast(o, tf.float32) for n, o in zip(new, old)]

        step["update"] = update

        def compute_rho():
            # Actual and predicted reductions of one objective: the
            # quadratic model's sub-batch (the whole batch when it cannot
            # be sliced), the same one the adaptive step used.
            objective = quadratic.require(step["objective"]).subset
            exact_reuse = (
                "model_reduction" in step
                and not opt.estimator.fallback_variables
                and opt.weight_decay is None
            )
            if exact_reuse:
                predicted, before = step["model_reduction"], step["loss_before"]
            else:
                old = start()
                predicted, before = quadratic.model_reduction(objective, old, update(old), damping)
            after = objective.loss(new)
            rho = quadratic.reduction_ratio(after - before, predicted)
            self.scalars["rho"].assign(rho)
            self.rho_step.assign(opt.iterations + 1)
            return rho

        # rho on track_rho's steps, and on logging steps when the batch loss
        # can be re-evaluated (model.compute_loss was called).
        has_loss = step["objective"] is not None
        if self.rho_enabled and not has_loss and self.rho_optional:
            self._warn_no_loss_once()
            if self.diagnostics_enabled:
                run_if(step["diag_now"], lambda: self._diagnostics(grads, start(), damping))
            self._step = None
            return tf.constant(float("nan")), tf.constant(False)
        when = step["rho_now"] if self.rho_enabled else tf.constant(False)
        if has_loss:
            when = when | step["diag_now"]
        rho = None
        if self.rho_enabled or has_loss:
            rho = tf.cond(when, compute_rho, lambda: tf.constant(float("nan")))
        if self.diagnostics_enabled:
            run_if(step["diag_now"], lambda: self._diagnostics(grads, start(), damping))
        self._step = None
        return (rho, step["rho_now"]) if self.rho_enabled else None

    def _warn_no_loss_once(self):
        if getattr(self, "_warned_no_loss", False):
            return
        self._warned_no_loss = True
        warnings.warn(
            "KFAC keeps its damping fixed: this training step does not call "
            "model.compute_loss, so rho (Levenberg-Marquardt damping) cannot be measured. "
            "Pass damping_adaptation_interval=0 to silence this, or call "
            "model.compute_loss(x, y, y_pred) in the train step.",
            stacklevel=3,
        )

    def _diagnostics(self, grads, old, damping):
        opt = self._optimizer_ref
        step = self._step
        delta = step["update"](old)
        s = self.scalars
        s["damping"].assign(tf.cast(damping, tf.float32))
        s["kl_clip_scale"].assign(tf.cast(step.get("nu", 1.0), tf.float32))
        s["update_norm"].assign(tf.sqrt(quadratic.dot(delta, delta)))
        g32 = [tf.cast(g, tf.float32) for g in grads]
        s["grad_norm"].assign(tf.sqrt(quadratic.dot(g32, g32)))
        vs, ps = step.get("matrices"), step.get("preconditioned")
        if vs:
            # Dense only here, on logging steps (embedding blocks are sparse).
            vs, ps = [tf.convert_to_tensor(v) for v in vs], [tf.convert_to_tensor(p) for p in ps]
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
            self._fidelity(old)
        self.diagnostics_step.assign(opt.iterations + 1)

    def _fidelity(self, start):
        """Relative Frobenius error of each named block's approximation
        (``curvature_matrix``) against the exact GGN block of this batch
        (:func:`keras_kfac.exact.step_ggn_block`; the Fisher for the
        sampled-Fisher losses on logits/linear outputs), at the parameters
        the step started from."""
        opt = self._optimizer_ref
        objective = quadratic.require(self._step["objective"])
        estimator = opt.estimator
        for name in self.fidelity_layers:
            i = estimator.block_index(name)
            reference = exact.step_ggn_block(
                self._step["record"], estimator.blocks[i], lambda y: objective.output_loss(start, y)
            )
            error = exact.relative_error(reference, estimator.curvatures[i].matrix())
            self.layers[name]["fidelity_relative_error"].assign(error)

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
