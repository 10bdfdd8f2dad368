"""The local quadratic model of the objective, with exact curvature products.

Martens & Grosse 2015 (arXiv 1503.05671):

* sec. 6.5, the Levenberg-Marquardt rule: the reduction ratio
  ``rho = (h(theta + delta) - h(theta)) / (M(delta) - M(0))`` with
  ``M(delta) = 1/2 delta^T (F + lambda I) delta + grad^T delta``;
* sec. 7, re-scaling and momentum: ``delta = alpha * Delta + mu * delta_prev``
  with ``(alpha, mu)`` minimising ``M`` (a 2x2 linear system).

The optimizer calls :func:`adaptive_step` (sec. 7) and applies the damping
rule through :class:`LevenbergMarquardt` with the ``rho`` the monitor
measured; the monitor (:mod:`keras_kfac.monitoring`) only observes.

``F`` here is the exact curvature on the current batch, not the Kronecker
approximation: the generalized Gauss-Newton matrix ``J^T H J`` of the
compiled loss (Schraudolph 2002; Martens 2020, arXiv 1412.1193 sec. 8), with
``J`` the Jacobian of the model output with respect to the parameters and
``H`` the Hessian of the loss with respect to the model output. For the losses
the sampled Fisher supports, applied to logits (``from_logits=True``) or to a
linear output with mean squared error, the GGN equals the Fisher. Quadratic
forms ``u^T F v = (J u)^T H (J v)`` need one forward-mode Jacobian-vector
product per direction (``tf.autodiff.ForwardAccumulator``) and one
forward-over-reverse Hessian-vector product at the output, which is cheap.

The model may be evaluated on a sub-batch, so that it costs a fraction of a
forward pass: the first ``m`` examples of the step's batch
(:attr:`BatchObjective.subset`), with the step's own non-trainable state.
``rho`` then measures the actual and the predicted reduction of that same
sub-batch objective, and the adaptive step minimises that sub-batch's model
(see :func:`adaptive_step`).

Every forward pass here is *stateless* (``keras.StatelessScope``): parameters
are given as tensors, non-trainable state (BatchNormalization statistics,
dropout seeds) is read from one snapshot and never written, so the passes
have no side effects and all of them see the same dropout masks.
"""

import collections

import keras
import numpy as np
import tensorflow as tf

from keras_kfac import compat
from keras_kfac.graph_util import untracked_variable


def _f32(x):
    return tf.cast(x, tf.float32)


def dot(us, vs):
    """``sum_k <u_k, v_k>`` over lists of tensors (float32)."""
    return tf.add_n([tf.reduce_sum(_f32(u) * _f32(v)) for u, v in zip(us, vs)])


def batch_objective(model, capture, record, sub_batch_size=None, forward_mode=True):
    """The :class:`BatchObjective` of a step's ``record``, or None when the
    step did not call ``model.compute_loss`` (see :func:`require`); its
    :attr:`~BatchObjective.subset` holds the first ``sub_batch_size``
    examples (None: the whole batch)."""
    if record is None or record.loss_args is None:
        return None
    return BatchObjective(
        model, capture, record.loss_args, record.state, sub_batch_size, forward_mode
    )


#: Reductions under which a loss is a mean over the examples, so that a
#: sub-batch's loss estimates the batch's on the same scale.
_MEAN_REDUCTIONS = ("sum_over_batch_size", "mean", "mean_with_sample_weight")


def sub_batch_blocker(model, loss_args, size):
    """Why the quadratic model cannot run on the first ``size`` examples of
    ``loss_args`` (a sentence), or None when it can. Slicing must leave the
    loss an unbiased, same-scale estimate of the batch loss: no layer may
    couple the examples (batch statistics, stateful recurrent state), the
    loss must be a mean over examples, and every loss argument must be a
    batch-major dense array."""
    for layer in [model] + compat.flatten_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            return f"{layer.name!r} normalizes with statistics of the whole batch"
        if getattr(layer, "stateful", False):
            return f"{layer.name!r} is stateful (its state has the batch's size)"
    if type(model).compute_loss is not keras.Model.compute_loss:
        return f"{type(model).__name__} overrides compute_loss (its scale is unknown)"
    for loss in tf.nest.flatten(getattr(model, "loss", None)):
        reduction = getattr(loss, "reduction", "sum_over_batch_size")
        if isinstance(loss, keras.losses.Loss) and reduction not in _MEAN_REDUCTIONS:
            return f"the loss {loss.name!r} has reduction={reduction!r}, not a mean"
    leading = set()
    for leaf in tf.nest.flatten(loss_args):
        if leaf is None:
            continue
        if not isinstance(leaf, (tf.Tensor, tf.Variable, np.ndarray)) or len(leaf.shape) == 0:
            return f"a loss argument is a {type(leaf).__name__}, not a batch-major dense array"
        leading.add(leaf.shape[0])
    known = {n for n in leading if n is not None}
    if len(known) > 1:
        return f"the loss arguments have different leading sizes {sorted(known)}"
    if known and known.pop() <= size:
        return "the batch is not larger than the sub-batch"
    return None


def require(objective):
    """``objective``, or the error naming the fix when there is none."""
    if objective is None:
        raise ValueError(
            "KFAC(adaptive_step=True), AdaptiveDamping and the rho curve of "
            "CurvatureMonitor re-evaluate the batch loss, so they need "
            "model.compute_loss: train with model.fit, or call "
            "`loss = model.compute_loss(x, y, y_pred)` inside the "
            "GradientTape of a hand-written loop (compile the model with a loss)."
        )
    return objective


class BatchObjective:
    """The model's training loss on one recorded batch, as a function of the
    trainable parameters (Martens & Grosse 2015, sec. 6.5: ``rho`` is measured
    on the same mini-batch as the update).

    Args:
        model: the Keras model.
        capture: its :class:`keras_kfac.capture.Capture` (paused during the
            passes so they are not recorded as the step's statistics).
        loss_args: ``(x, y, sample_weight)`` recorded from ``compute_loss``.
        state: the non-trainable values when the step's forward pass began
            (``StepRecord.state``); None: their current values.
        sub_batch_size: the size of :attr:`subset` (None: the whole batch).
        forward_mode: False when the model has a layer whose traced forward
            pass cannot run under forward-mode autodiff
            (``keras_kfac.layers.forward_mode_blockers``): :meth:`jvp` then
            takes two reverse passes.
    """

    def __init__(
        self, model, capture, loss_args, state=None, sub_batch_size=None, forward_mode=True
    ):
        self.model = model
        self.forward_mode = forward_mode
        self.capture = capture
        self.x, self.y, self.sample_weight = loss_args
        self.trainable = list(model.trainable_variables)
        self.non_trainable = list(model.non_trainable_variables)
        # One snapshot of the non-trainable state: every pass uses it. The
        # one from before the training pass gives the passes the gradient's
        # dropout masks; a later one would give other masks, and the model
        # (rho, adaptive_step) would then pair the step's gradient with
        # another batch objective: on a Dropout(0.5) MLP rho fell from ~1 to
        # 0.1-0.2 (benchmarks/results/defaults.md).
        if state is None:
            state = [tf.identity(v.value) for v in self.non_trainable]
        self.state = list(state)
        #: The same objective on the first ``sub_batch_size`` examples, with
        #: this step's state; ``self`` when slicing is not possible
        #: (:func:`sub_batch_blocker`). Sliced here, once per step and outside
        #: the ``tf.cond`` branches that use it.
        self.subset = self
        if sub_batch_size is not None and not sub_batch_blocker(model, loss_args, sub_batch_size):
            sliced = tf.nest.map_structure(
                lambda t: None if t is None else t[:sub_batch_size], tuple(loss_args)
            )
            self.subset = BatchObjective(
                model, capture, sliced, self.state, forward_mode=forward_mode
            )

    def _mapping(self, values):
        return list(zip(self.trainable, values)) + list(zip(self.non_trainable, self.state))

    def _call(self):
        if compat.call_has_training_arg(self.model):
            return self.model(self.x, training=True)
        return self.model(self.x)

    def _loss(self, y_pred):
        loss = compat.compute_loss(self.model, self.x, self.y, y_pred, self.sample_weight)
        return _f32(loss)

    def output_loss(self, values, y_pred):
        """The batch loss as a function of the model output ``y_pred`` alone
        (no forward pass), with the parameters ``values`` for the loss's own
        terms."""
        with (
            self.capture.paused(),
            keras.StatelessScope(state_mapping=self._mapping(values), collect_losses=True),
        ):
            return self._loss(y_pred)

    def align(self, by_key, key):
        """Per-variable tensors ``{key(variable): tensor}`` as a float32 list
        aligned with the trainable variables (zeros where absent)."""
        out = []
        for v in self.trainable:
            t = by_key.get(key(v))
            out.append(tf.zeros(v.shape, tf.float32) if t is None else _f32(t))
        return out

    def current_values(self):
        return [v.value for v in self.trainable]

    def loss(self, values):
        """``h(theta)`` at ``values`` (one stateless forward pass)."""
        with (
            self.capture.paused(),
            keras.StatelessScope(state_mapping=self._mapping(values), collect_losses=True),
        ):
            return self._loss(self._call())

    def jvp(self, values, tangents):
        """``(h(theta), y_pred, J v, grad h(theta)^T v)`` at ``values`` along
        ``tangents``: one forward pass with a forward-mode accumulator, or
        with ``forward_mode=False`` two reverse passes (:meth:`_reverse_jvp`)."""
        values = [tf.convert_to_tensor(v) for v in values]
        tangents = [tf.cast(t, v.dtype) for t, v in zip(tangents, values)]
        with self.capture.paused():
            if not self.forward_mode:
                return self._reverse_jvp(values, tangents)
            with tf.autodiff.ForwardAccumulator(values, tangents) as acc:
                with keras.StatelessScope(state_mapping=self._mapping(values), collect_losses=True):
                    y_pred = self._call()
                    loss = self._loss(y_pred)
            ju = acc.jvp(y_pred, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            slope = acc.jvp(loss, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return loss, tf.nest.map_structure(tf.stop_gradient, y_pred), ju, slope

    def _reverse_jvp(self, values, tangents):
        """:meth:`jvp` by reverse-over-reverse: ``J v = d/du <J^T u, v>``
        (linear in ``u``, so its gradient at ``u = 0`` is exact), for models
        whose forward pass cannot run under a ``ForwardAccumulator`` in a
        traced function (``keras_kfac.layers.forward_mode_blockers``). Costs
        a forward pass and three reverse passes against forward mode's one
        forward pass with tangents."""
        with tf.GradientTape() as outer:
            with tf.GradientTape(persistent=True) as inner:
                inner.watch(values)
                with keras.StatelessScope(state_mapping=self._mapping(values), collect_losses=True):
                    y_pred = self._call()
                    loss = self._loss(y_pred)
            flat_y = tf.nest.flatten(y_pred)
            probes = [tf.zeros_like(y) for y in flat_y]
            outer.watch(probes)
            pulled = inner.gradient(
                flat_y,
                values,
                output_gradients=probes,
                unconnected_gradients=tf.UnconnectedGradients.ZERO,
            )
            along = dot(pulled, tangents)
        ju = outer.gradient(along, probes, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        grads = inner.gradient(loss, values, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        y_pred = tf.nest.map_structure(tf.stop_gradient, y_pred)
        return loss, y_pred, tf.nest.pack_sequence_as(y_pred, ju), dot(grads, tangents)

    def output_hvp(self, values, y_pred, u):
        """``H u`` with ``H`` the Hessian of the loss with respect to the model
        output ``y_pred`` (forward-over-reverse)."""
        y_pred = tf.nest.map_structure(tf.convert_to_tensor, y_pred)
        u = tf.nest.map_structure(lambda t, y: tf.cast(t, y.dtype), u, y_pred)
        flat_y = tf.nest.flatten(y_pred)
        with tf.autodiff.ForwardAccumulator(flat_y, tf.nest.flatten(u)) as acc:
            with tf.GradientTape() as tape:
                tape.watch(flat_y)
                loss = self.output_loss(values, tf.nest.pack_sequence_as(y_pred, flat_y))
            grads = tape.gradient(loss, flat_y, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return acc.jvp(grads, unconnected_gradients=tf.UnconnectedGradients.ZERO)


def gram(objective, values, directions, damping):
    """Exact ``Q_ij = d_i^T (F + lambda I) d_j`` for a few directions, plus
    ``h(theta)`` and the slopes ``grad h(theta)^T d_i``. One Jacobian-vector
    forward pass per direction."""
    jus, slopes, loss, y_pred = [], [], None, None
    for d in directions:
        loss, y_pred, ju, slope = objective.jvp(values, d)
        jus.append(tf.nest.flatten(ju))
        slopes.append(_f32(slope))
    hus = [objective.output_hvp(values, y_pred, tf.nest.pack_sequence_as(y_pred, ju)) for ju in jus]
    k = len(directions)
    rows = []
    for i in range(k):
        row = []
        for j in range(k):
            row.append(dot(jus[i], hus[j]) + damping * dot(directions[i], directions[j]))
        rows.append(tf.stack(row))
    q = tf.stack(rows)
    return 0.5 * (q + tf.transpose(q)), loss, tf.stack(slopes)


def model_reduction(objective, values, delta, damping):
    """``(M(delta) - M(0), h(theta))`` with ``M`` as in sec. 6.5 and exact
    GGN products (one Jacobian-vector forward pass).

    The linear term is ``h``'s own slope along ``delta``, measured in the
    same pass, not the step's gradient: the two differ when the gradient is
    not ``h``'s (a loss term added outside ``model.compute_loss``, clipped
    gradients), and ``rho`` then compared ``h``'s change with another
    function's model. On the mixture-of-experts client (balancing penalty
    added in ``train_step``, 100x ``h``'s slope) rho sat at ~0.01 and the
    LM rule raised the damping 78x (benchmarks/results/robust.md)."""
    q, loss, slopes = gram(objective, values, [delta], damping)
    return 0.5 * q[0, 0] + slopes[0], loss


def reduction_ratio(actual, predicted):
    """``rho = actual / predicted``; NaN when the model predicts no decrease
    (``predicted >= 0``) or either value is not finite (sec. 6.5)."""
    ok = tf.math.is_finite(actual) & tf.math.is_finite(predicted) & (predicted < 0.0)
    return tf.where(ok, actual / tf.where(ok, predicted, -1.0), float("nan"))


def levenberg_marquardt(damping, rho, decay, min_damping, max_damping):
    """Sec. 6.5: ``lambda <- decay * lambda`` if ``rho > 3/4``,
    ``lambda <- lambda / decay`` if ``rho < 1/4`` or ``rho`` is not finite;
    clipped to ``[min_damping, max_damping]``."""
    finite = tf.math.is_finite(rho)
    new = tf.where(finite & (rho > 0.75), damping * decay, damping)
    new = tf.where(tf.logical_not(finite) | (rho < 0.25), damping / decay, new)
    return tf.clip_by_value(new, min_damping, max_damping)


def solve_step_coefficients(q, b):
    """Sec. 7: ``(alpha, mu) = argmin 1/2 x^T Q x + b^T x``, ``x = -Q^-1 b``.

    Safeguards: the 1-D problem (``mu = 0``, ``alpha = -b_0 / Q_00``) when
    ``Q`` is (numerically) singular, e.g. on the first step where there is no
    previous update, or when the 2-D solution is not finite or does not
    decrease the model; ``alpha = mu = 0`` (no step) if nothing is finite and
    decreasing. Returns ``(alpha, mu, M(delta) - M(0))``.
    """
    q00, q01, q11 = q[0, 0], q[0, 1], q[1, 1]
    b0, b1 = b[0], b[1]
    det = q00 * q11 - q01 * q01
    regular = (det > 1e-6 * q00 * q11) & (q11 > 0.0)
    safe_det = tf.where(regular, det, 1.0)
    alpha2 = -(q11 * b0 - q01 * b1) / safe_det
    mu2 = -(-q01 * b0 + q00 * b1) / safe_det
    m2 = 0.5 * (alpha2 * b0 + mu2 * b1)
    ok2 = regular & tf.math.is_finite(alpha2) & tf.math.is_finite(mu2) & (m2 < 0.0)
    alpha1 = -b0 / tf.where(q00 > 0.0, q00, 1.0)
    m1 = 0.5 * alpha1 * b0
    ok1 = (q00 > 0.0) & tf.math.is_finite(alpha1) & (m1 < 0.0)
    alpha = tf.where(ok2, alpha2, tf.where(ok1, alpha1, 0.0))
    mu = tf.where(ok2, mu2, 0.0)
    m = tf.where(ok2, m2, tf.where(ok1, m1, 0.0))
    return alpha, mu, m


#: Result of :func:`adaptive_step`: the coefficients, ``M(delta) - M(0)`` of
#: the chosen step and ``h(theta)``.
AdaptiveStep = collections.namedtuple("AdaptiveStep", "alpha mu model_reduction loss")


def adaptive_step(objective, natural, previous, damping):
    """Sec. 7: ``(alpha, mu)`` minimising the exact quadratic model
    ``M(alpha Delta + mu delta_prev)`` of ``objective`` for the natural
    direction ``Delta`` (``natural``, ``-P(grad)``) and the previous update
    ``delta_prev`` (``previous``), lists aligned with ``objective.trainable``
    (:meth:`BatchObjective.align`). The step is ``alpha * Delta + mu *
    delta_prev``; the linear terms are ``h``'s own slopes (see
    :func:`model_reduction`). Returns an :data:`AdaptiveStep`.

    Both ``Q`` and the linear term ``b_i = grad h^T d_i`` come from
    ``objective``, also when it is a sub-batch (:attr:`BatchObjective.subset`;
    ``b`` comes free with the forward passes of ``Q``). The whole batch's
    gradient in ``b`` was measured no better (benchmarks/results/
    quadratic.md: same or lower efficiency, and a tenth-percentile step
    that increased the whole batch's model at 16 of 128 examples), and it
    would let the sub-batch's own model predict an increase, leaving ``rho``
    undefined."""
    q, loss, b = gram(objective, objective.current_values(), [natural, previous], damping)
    return AdaptiveStep(*solve_step_coefficients(q, b), loss)


class LevenbergMarquardt:
    """The state of the sec. 6.5 damping rule (:func:`levenberg_marquardt`):
    whether it is active and its constants, as variables (changing them
    never retraces the train step; not saved: the
    :class:`keras_kfac.callbacks.AdaptiveDamping` callback sets them)."""

    def __init__(self):
        self.built = False

    def build(self):
        if self.built:
            return
        self.active = untracked_variable(False, tf.bool)
        self.decay = untracked_variable(0.95**5)
        self.min_damping = untracked_variable(1e-8)
        self.max_damping = untracked_variable(1e4)
        self.built = True

    def configure(self, active, decay, min_damping, max_damping):
        self.active.assign(bool(active))
        self.decay.assign(float(decay))
        self.min_damping.assign(float(min_damping))
        self.max_damping.assign(float(max_damping))

    def next_damping(self, damping, rho, now):
        """The damping after this step: the rule applied to ``damping`` when
        active and ``now`` (a step whose ``rho`` is meant for it), else
        ``damping``."""
        adapted = levenberg_marquardt(damping, rho, self.decay, self.min_damping, self.max_damping)
        return tf.where(self.active & now, adapted, damping)
