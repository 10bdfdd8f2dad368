"""Keras callbacks for K-FAC: damping that adapts or follows a schedule, and
curvature diagnostics in TensorBoard.

::

    model.compile(optimizer=keras_kfac.KFAC(), loss=...)
    model.fit(x, y, callbacks=[
        keras.callbacks.TensorBoard("logs/run1"),
        keras_kfac.callbacks.CurvatureMonitor("logs/run1"),
        keras_kfac.callbacks.AdaptiveDamping(),
    ])

The work happens inside the compiled train step (see
:mod:`keras_kfac.monitoring`); the callbacks switch it on, set its constants
(variables: changing them never retraces) and read the results back.
"""

import math
import os

import keras
import tensorflow as tf

from keras_kfac import distributed
from keras_kfac.estimator import unwrap
from keras_kfac.optimizer import KFAC


def kfac_optimizer(model):
    """The (built) :class:`keras_kfac.KFAC` of a compiled model, through a
    ``LossScaleOptimizer`` if any."""
    wrapper = getattr(model, "optimizer", None)
    opt = unwrap(wrapper)
    if not isinstance(opt, KFAC):
        raise ValueError(
            "keras_kfac callbacks need a model compiled with keras_kfac.KFAC(); "
            f"this model's optimizer is {type(opt).__name__}."
        )
    if not opt.built:
        wrapper.build(model.trainable_variables)
    return opt


def _sync_trace(model, opt):
    """Retrace the train function once if the set of traced features (rho,
    diagnostics) changed since it was traced."""
    if opt.monitor.trace_is_stale() and model.train_function is not None:
        model.make_train_function(force=True)


class AdaptiveDamping(keras.callbacks.Callback):
    """Levenberg-Marquardt damping (Martens & Grosse 2015, sec. 6.5).

    Every ``every`` steps, inside the train step and on the step's own batch,
    the reduction ratio ``rho = (h(theta + delta) - h(theta)) / (M(delta) -
    M(0))`` is computed with ``M(delta) = 1/2 delta^T (F + lambda I) delta +
    grad_h^T delta`` (``grad_h``: the slope of the re-evaluated loss ``h``)
    and exact GGN-vector products (one forward pass with a forward-mode
    Jacobian-vector product, two reverse passes for recurrent layers without
    ``unroll=True``, and one stateless forward pass; see
    :mod:`keras_kfac.quadratic`). Then ``lambda <- decay * lambda`` if ``rho >
    3/4`` and ``lambda <- lambda / decay`` if ``rho < 1/4`` or ``rho`` is not
    finite (including a model that predicts no decrease), clipped to
    ``[min_damping, max_damping]``. ``delta`` is the update actually applied
    (learning rate, momentum, KL clipping, fallback variables included).

    ``damping`` and ``rho`` are added to the batch and epoch logs (progress
    bar, ``History``). Needs a float ``damping`` (not a schedule) and
    ``model.compute_loss`` (``model.fit`` calls it).
    """

    def __init__(self, every=5, decay=0.95**5, min_damping=1e-8, max_damping=1e4):
        super().__init__()
        if not (isinstance(every, int) and every >= 1):
            raise ValueError(f"every must be an integer >= 1; got {every!r}.")
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1); got {decay!r}.")
        if not 0.0 < min_damping <= max_damping:
            raise ValueError(
                f"Need 0 < min_damping <= max_damping; got {min_damping!r}, {max_damping!r}."
            )
        self.every = every
        self.decay = float(decay)
        self.min_damping = float(min_damping)
        self.max_damping = float(max_damping)

    def on_train_begin(self, logs=None):
        opt = kfac_optimizer(self.model)
        distributed.check_supported(self.model.distribute_strategy, quadratic_model=True)
        opt.adapt_damping(self.every, self.decay, self.min_damping, self.max_damping)
        _sync_trace(self.model, opt)
        self._opt = opt

    def _log(self, logs):
        if logs is not None:
            logs["damping"] = float(self._opt.damping)
            logs["rho"] = float(self._opt.diagnostics()["rho"].numpy())

    def on_train_batch_end(self, batch, logs=None):
        self._log(logs)

    def on_epoch_end(self, epoch, logs=None):
        self._log(logs)

    def on_train_end(self, logs=None):
        self._opt.reset_damping_adaptation()


class DampingScheduler(keras.callbacks.Callback):
    """Sets the damping at the start of each epoch, like
    ``keras.callbacks.LearningRateScheduler``: ``schedule(epoch, damping)``
    (or ``schedule(epoch)``) returns the new damping (Martens & Grosse 2015,
    sec. 6.5 discuss why damping needs to change during training). The
    damping is a variable: no retracing. For a per-step schedule pass a
    ``keras.optimizers.schedules.LearningRateSchedule`` as ``KFAC(damping=)``.
    During the fit the schedule replaces KFAC's own Levenberg-Marquardt rule
    (``damping_adaptation_interval``), which comes back at the end.
    """

    def __init__(self, schedule, verbose=0):
        super().__init__()
        self.schedule = schedule
        self.verbose = verbose

    def on_train_begin(self, logs=None):
        opt = kfac_optimizer(self.model)
        opt.adapt_damping(0)
        _sync_trace(self.model, opt)
        self._opt = opt

    def on_train_end(self, logs=None):
        self._opt.reset_damping_adaptation()

    def on_epoch_begin(self, epoch, logs=None):
        opt = kfac_optimizer(self.model)
        current = float(opt.damping)
        try:
            value = self.schedule(epoch, current)
        except TypeError:
            value = self.schedule(epoch)
        value = float(value)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"The damping schedule returned {value!r} at epoch {epoch}; need > 0.")
        opt.damping = value
        if self.verbose:
            print(f"\nEpoch {epoch + 1}: DampingScheduler setting damping to {value:g}.")

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["damping"] = float(kfac_optimizer(self.model).damping)


class CurvatureMonitor(keras.callbacks.Callback):
    """Writes the optimizer's curvature story to TensorBoard.

    Every ``update_freq`` steps the train step itself computes (Martens &
    Grosse 2015: sec. 6.3 for ``pi`` and the factored damping, sec. 6.5 for
    ``rho``, sec. 7 for ``alpha``/``mu``; Ba et al. 2017 for the KL-clip
    scale ``nu``; Grosse & Martens 2016 for the convolution factors), and
    this callback writes with ``tf.summary`` into ``<log_dir>/train``, the run
    layout of ``keras.callbacks.TensorBoard``, at the step count (1-based
    batch index over the whole run, as TensorBoard's ``batch_*`` curves):

    * ``kfac/damping``, ``kfac/rho`` (exact quadratic model, on that step's
      batch), ``kfac/alpha`` and ``kfac/mu`` (with ``adaptive_step``),
      ``kfac/kl_clip_scale``, ``kfac/update_norm``, ``kfac/grad_norm``,
      ``kfac/grad_cosine`` (gradient vs preconditioned gradient),
      ``kfac/skipped_steps``;
    * ``kfac_layers/<layer>/{A,G}_{trace,min_eigenvalue,max_eigenvalue,
      condition_number}`` (undamped eigenvalues; the condition number of the
      factor plus its factored damping share ``pi*gamma`` or ``gamma/pi``),
      ``kfac_layers/<layer>/pi``, ``kfac_layers/<layer>/preconditioned_grad_norm``;
    * histograms ``kfac_spectra/<layer>/{A,G}`` of the factor eigenvalues;
    * for ``fidelity_layers``: ``kfac_layers/<layer>/fidelity_relative_error``,
      ``||F - F_kfac||_F / ||F||_F`` against the exact GGN block of the batch
      (brute force: small layers and outputs only).

    With ``steps_per_execution > 1`` the last logging step of each execution
    is written.
    """

    def __init__(self, log_dir="logs", update_freq=100, histograms=True, fidelity_layers=()):
        super().__init__()
        if not (isinstance(update_freq, int) and update_freq >= 1):
            raise ValueError(f"update_freq must be an integer >= 1; got {update_freq!r}.")
        self.log_dir = os.fspath(log_dir)
        self.update_freq = update_freq
        self.histograms = bool(histograms)
        self.fidelity_layers = tuple(fidelity_layers)
        self._writer = None

    def on_train_begin(self, logs=None):
        opt = kfac_optimizer(self.model)
        opt.track_diagnostics(self.update_freq, self.histograms, self.fidelity_layers)
        _sync_trace(self.model, opt)
        self._opt = opt
        self._writer = tf.summary.create_file_writer(os.path.join(self.log_dir, "train"))
        self._written = opt.monitor.latest_diagnostics_step

    def on_train_batch_end(self, batch, logs=None):
        step = self._opt.monitor.latest_diagnostics_step
        if step > self._written:
            self._write(step)
            self._written = step

    def _write(self, step):
        opt = self._opt
        monitor = opt.monitor
        values = {k: v.numpy() for k, v in opt.diagnostics().items()}
        names = ["rho", "update_norm", "grad_norm", "grad_cosine", "skipped_steps"]
        names += ["alpha", "mu"] if opt.adaptive_step else ["kl_clip_scale"]
        with self._writer.as_default(step=step):
            tf.summary.scalar("kfac/damping", values["diagnostics_damping"])
            for name in names:
                tf.summary.scalar(f"kfac/{name}", values[name])
            for layer, entry in monitor.layers.items():
                for name in entry:
                    value = values[f"{layer}/{name}"]
                    if name.endswith("_spectrum"):
                        if self.histograms:
                            tf.summary.histogram(f"kfac_spectra/{layer}/{name[0]}", value)
                    elif name == "fidelity_relative_error":
                        if layer in self.fidelity_layers:
                            tf.summary.scalar(f"kfac_layers/{layer}/{name}", value)
                    else:
                        tf.summary.scalar(f"kfac_layers/{layer}/{name}", value)
        self._writer.flush()

    def on_train_end(self, logs=None):
        self._opt.monitor.track(0)
        if self._writer is not None:
            self._writer.close()
            self._writer = None


__all__ = ["AdaptiveDamping", "DampingScheduler", "CurvatureMonitor", "kfac_optimizer"]
