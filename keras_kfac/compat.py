"""Every use of a private Keras or TensorFlow API, in one module.

keras_kfac needs a few things no public API gives: whether the current layer
call is a training call, a walk over nested layers, a hook on
``model.compile``'s optimizer assignment, Keras's gradient all-reduce and
cross-replica update, and the collective launchers of a mirrored strategy.
Each lives behind one function here, with the versions it was checked on, so
that a new release breaks one place. ``tests/test_compat.py`` exercises every
function; run it first after upgrading Keras or TensorFlow.

Checked on: keras 3.15.1 / tensorflow 2.21.0 (the pinned versions of
``constraints.txt``); the earliest versions named per function are those the
previous releases of keras_kfac ran on.
"""

import contextlib
import inspect

import keras
import tensorflow as tf

# compat: keras.src.backend (keras 3.6 - 3.15.1)
from keras.src import backend as _keras_backend

# compat: keras.src.backend.common.global_state (keras 3.0 - 3.15.1)
from keras.src.backend.common import global_state as _keras_global_state

# compat: tensorflow.python.distribute.cross_device_ops, mirrored_strategy
# (tf 2.16 - 2.21)
from tensorflow.python.distribute import cross_device_ops as _cross_device_ops
from tensorflow.python.distribute import mirrored_strategy as _mirrored_strategy

# compat: tensorflow.python.eager.record (tf 2.16 - 2.21)
from tensorflow.python.eager import record as _tape_record

# compat: tensorflow.python.ops.control_flow_util (tf 2.16 - 2.21)
from tensorflow.python.ops import control_flow_util as _control_flow_util


# --- layer calls -------------------------------------------------------------
def tape_could_record():
    """True when a gradient tape could record the ops run now (no public API:
    ``tf.GradientTape`` exposes no "am I inside a tape" query).
    Private: ``record.could_possibly_record`` (tf 2.16 - 2.21)."""
    return _tape_record.could_possibly_record()


def is_training_call():
    """True in a training-mode layer call under a gradient tape: Keras's
    ``training`` argument of the outermost call context, else (no context)
    whether a tape records.
    Private: ``global_state`` attribute ``current_call_ctx`` (keras 3.0 - 3.15.1)."""
    ctx = _keras_global_state.get_global_attribute("current_call_ctx")
    training = None if ctx is None else ctx.get_value("training")
    if training is None:
        return tape_could_record()
    return bool(training) and tape_could_record()


def flatten_layers(model):
    """Every layer nested in ``model`` (not the model itself), depth first.
    Private: ``Layer._flatten_layers`` (keras 3.0 - 3.15.1); the public
    ``model.layers`` is not recursive."""
    return list(model._flatten_layers(include_self=False, recursive=True))


def built_input_shape(layer):
    """The input shape ``layer`` was built with (None when unknown); nested
    layers (e.g. MultiHeadAttention's projections) have no public
    ``layer.input``.
    Private: ``Layer._build_shapes_dict`` (keras 3.0 - 3.15.1)."""
    shapes = getattr(layer, "_build_shapes_dict", None) or {}
    shape = next(iter(shapes.values()), None) if len(shapes) == 1 else None
    return None if shape is None else tuple(shape)


def call_has_training_arg(model):
    """Whether ``model.call`` takes ``training``.
    Private: ``Layer._call_has_training_arg`` (keras 3.0 - 3.15.1)."""
    return getattr(model, "_call_has_training_arg", True)


def compute_loss(model, x, y, y_pred, sample_weight):
    """``model.compute_loss`` in training mode, for overrides with and
    without the ``training`` argument.
    Private: ``Trainer._compute_loss`` (keras 3.4 - 3.15.1)."""
    return model._compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)


def compiled_loss_weights(model):
    """The ``loss_weights`` given to ``model.compile`` (None if none).
    Private: ``Trainer._compile_config`` (keras 3.0 - 3.15.1); the public
    ``get_compile_config()`` serializes the optimizer, which cannot run
    inside a traced train step."""
    config = getattr(model, "_compile_config", None)
    return None if config is None else config.config.get("loss_weights")


def loss_function(loss):
    """``(fn, kwargs)`` of a ``keras.losses.LossFunctionWrapper`` (every
    built-in loss class), or None.
    Private: ``LossFunctionWrapper._fn_kwargs`` (keras 3.0 - 3.15.1)."""
    fn = getattr(loss, "fn", None)
    if fn is None:
        return None
    return fn, dict(getattr(loss, "_fn_kwargs", {}))


# --- model discovery ----------------------------------------------------------
def on_model_attribute(callback):
    """Call ``callback(model, name, previous, value)`` whenever an attribute
    of a ``keras.Model`` is assigned (``model.compile`` assigns
    ``optimizer``; a GAN's overridden ``compile`` assigns ``d_optimizer``),
    so an optimizer learns its model. ``previous``: the attribute's value
    before (None if unset). Called for every assignment: keep it cheap.
    Private: ``keras.Model._setattr_hook`` (keras 3.0 - 3.15.1), wrapped
    once."""
    original = keras.Model._setattr_hook
    if getattr(original, "_keras_kfac", False):
        return

    def _setattr_hook(model, name, value):
        previous = model.__dict__.get(name)
        name, value = original(model, name, value)
        callback(model, name, previous, value)
        return name, value

    _setattr_hook._keras_kfac = True
    keras.Model._setattr_hook = _setattr_hook


def keras_mask(x):
    """The Keras mask attached to tensor ``x`` (``Masking``,
    ``Embedding(mask_zero=True)`` and the layers that propagate it), or None.
    Private: ``backend.get_keras_mask`` (keras 3.6 - 3.15.1; the
    ``_keras_mask`` tensor attribute before)."""
    if not tf.is_tensor(x):
        return None
    return _keras_backend.get_keras_mask(x)


def model_on_call_stack(predicate, depth=40):
    """The first ``keras.Model`` ``self`` of the calling frames for which
    ``predicate(model)`` holds (a model whose ``fit`` builds its optimizer
    before ``compile`` could tell it), or None. Frame locals are CPython
    behaviour, not a Keras API."""
    frame = inspect.currentframe()
    for _ in range(depth):
        frame = frame.f_back if frame is not None else None
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, keras.Model) and predicate(candidate):
            return candidate
    return None


# --- the optimizer's update --------------------------------------------------
def variable_key(optimizer, variable):
    """The key Keras's optimizer uses for ``variable`` (also for mirrored
    variables).
    Private: ``Optimizer._var_key`` (keras 3.0 - 3.15.1)."""
    return optimizer._var_key(variable)


def all_reduce_sum_gradients(optimizer, grads_and_vars):
    """Keras's cross-replica gradient sum (identity without a strategy).
    Private: ``TFOptimizer._all_reduce_sum_gradients`` (keras 3.0 - 3.15.1)."""
    return optimizer._all_reduce_sum_gradients(grads_and_vars)


def apply_updates(optimizer, grads_and_vars, learning_rate):
    """Keras's per-variable ``update_step`` under the current distribution
    strategy (``distribution.extended.update``), as ``Optimizer.apply`` does
    after its own gradient processing.
    Private: ``TFOptimizer._distributed_tf_update_step``,
    ``Optimizer._distribution_strategy`` (keras 3.0 - 3.15.1) and
    ``tf.__internal__.distribute.interim.maybe_merge_call`` (tf 2.16 - 2.21)."""
    tf.__internal__.distribute.interim.maybe_merge_call(
        optimizer._distributed_tf_update_step,
        optimizer._distribution_strategy,
        grads_and_vars,
        learning_rate,
    )


class OptimizerHooks:
    """The private hooks of Keras's TensorFlow optimizer that a second-order
    optimizer must take over, for a subclass of ``keras.optimizers.Optimizer``
    that defines ``apply_update(grads, variables, learning_rate)`` (the whole
    step, after Keras's gradient clipping and before ``iterations += 1``).
    Private: ``Optimizer._backend_update_step``, ``_apply_weight_decay``,
    ``_get_variable_index``, ``_use_weight_decay``, ``_variables`` (keras 3.0 -
    3.15.1; Keras's own optimizers use ``_get_variable_index`` the same way)."""

    def _backend_update_step(self, grads, variables, learning_rate):
        self.apply_update(grads, variables, learning_rate)

    def _apply_weight_decay(self, variables):
        # The subclass decays inside its own update, so that a skipped step
        # leaves the weights untouched.
        return

    def variable_index(self, variable):
        """The index of ``variable`` among the optimizer's built variables."""
        return self._get_variable_index(variable)

    def decays(self, variable):
        """Whether decoupled weight decay applies to ``variable``."""
        return self._use_weight_decay(variable)

    def own_variables(self):
        """The variables this optimizer created (not its sub-optimizers')."""
        return list(self._variables)


# --- tf.distribute -----------------------------------------------------------
def in_xla_context():
    """True when the current graph (or an enclosing one) is XLA-compiled.
    Private: ``control_flow_util.GraphOrParentsInXlaContext`` (tf 2.16 - 2.21)."""
    graph = tf.compat.v1.get_default_graph()
    return _control_flow_util.GraphOrParentsInXlaContext(graph)


def is_mirrored(strategy):
    """MirroredStrategy or MultiWorkerMirroredStrategy (one extended class).
    Private: ``mirrored_strategy.MirroredExtended`` (tf 2.16 - 2.21)."""
    return isinstance(strategy.extended, _mirrored_strategy.MirroredExtended)


def collective_launcher(strategy, replica_context):
    """The collective-ops launcher of this replica, for all-reduces and
    all-gathers issued from inside a replica's step (``merge_call`` cannot
    cross a ``tf.cond``), or None when the strategy uses other cross-device
    ops.
    Private: ``MirroredExtended._collective_ops`` / ``_cross_device_ops``,
    ``CollectiveAllReduce._launchers``, ``ReplicaContext._replica_id``
    (tf 2.16 - 2.21)."""
    extended = strategy.extended
    ops = getattr(extended, "_collective_ops", None)
    if not isinstance(ops, _cross_device_ops.CollectiveAllReduce):
        ops = getattr(extended, "_cross_device_ops", None)
    if not isinstance(ops, _cross_device_ops.CollectiveAllReduce):
        return None
    return ops._launchers[replica_context._replica_id]


def cross_device_ops_name(strategy):
    """Name of the strategy's configured cross-device ops, for error
    messages (same private attributes as :func:`collective_launcher`)."""
    extended = strategy.extended
    ops = getattr(extended, "_cross_device_ops", None) or getattr(extended, "_collective_ops", None)
    return type(ops).__name__


@contextlib.contextmanager
def merge_call_disabled(strategy):
    """Run the body with the strategy's ``merge_call`` disabled, as
    MirroredStrategy does for XLA-compiled GPU steps: replica functions then
    never switch threads, and updates in replica context write the local
    copy.
    Private: ``MirroredExtended._use_merge_call`` (tf 2.16 - 2.21)."""
    extended = strategy.extended
    had_own = "_use_merge_call" in extended.__dict__
    previous = extended.__dict__.get("_use_merge_call")
    extended._use_merge_call = lambda: False
    try:
        yield
    finally:
        if had_own:
            extended._use_merge_call = previous
        else:
            del extended._use_merge_call


def local_component(value):
    """The current replica's component of a distributed variable.
    Private: ``DistributedValues._get_on_device_or_primary`` (tf 2.16 - 2.21)."""
    return value._get_on_device_or_primary()
