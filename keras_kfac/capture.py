"""Model discovery and layer instrumentation.

The optimizer never sees activations, only gradients, so it instruments the
model's supported layers (their instances, not their classes):

* each block layer's ``call`` records its input and, with the layer's own
  activation temporarily set to linear, its pre-activation output ``s``; the
  activation is applied afterwards, so fused activations work;
* ``fisher="empirical"``: an identity with a custom gradient on ``s`` records
  ``dL/ds`` during the ordinary backward pass (no extra cost);
* ``fisher="sampled"``: the model's ``call`` runs under a persistent
  ``tf.GradientTape``; the optimizer later back-propagates sampled-target
  output gradients from the model output to every ``s`` (one extra backward
  pass, only on statistics steps).

Recording happens only in training-mode forward passes under a gradient tape,
and the records belong to one train step: they are replaced at the next
training forward pass and only used from the graph that produced them, so no
tensor leaks into evaluate/predict or across traced functions.
"""

import collections
import contextlib
import inspect
import weakref

import keras
import tensorflow as tf

from keras_kfac import compat
from keras_kfac.curvature.base import LayerBatch
from keras_kfac.layers.base import block_class_for_layer


def _current_graph():
    if tf.executing_eagerly():
        return None
    return tf.compat.v1.get_default_graph()


def _graph_reaches(recorded, current):
    """True if tensors of ``recorded`` can be used in ``current`` (same graph
    or an enclosing one, as for a ``tf.cond`` branch)."""
    if recorded is None:
        return current is None
    graph = current
    while graph is not None:
        if graph is recorded:
            return True
        graph = getattr(graph, "outer_graph", None)
    return False


def _is_symbolic(x):
    return any(
        isinstance(t, keras.KerasTensor) for t in tf.nest.flatten(x)
    )


class StepRecord:
    """Tensors recorded by one training forward pass, per layer (keyed by
    ``id(layer)``), one entry per use of the layer."""

    def __init__(self, tape):
        self.graph = _current_graph()
        self.tape = tape
        self.outputs = None
        self.inputs = collections.defaultdict(list)
        self.preactivations = collections.defaultdict(list)
        self.output_grads = collections.defaultdict(list)
        #: ``(x, y, sample_weight)`` seen by ``model.compute_loss`` in this
        #: step (None in loops that do not call it); used by the quadratic
        #: model of :mod:`keras_kfac.quadratic` to re-evaluate the batch loss.
        self.loss_args = None


def candidate_layers(model):
    """Every layer of ``model`` (nested ones too) of a type with a block."""
    return [
        layer
        for layer in compat.flatten_layers(model)
        if block_class_for_layer(layer) is not None
    ]


class Capture:
    """Instruments ``model``: its ``call`` and every layer of a supported type.

    Which instrumented layers become curvature blocks is decided later, when
    the optimizer is built (layers may not be built before the first call).
    """

    def __init__(self, model, sampled, layers=None, inference=False):
        # ``layers``: instrument only these (default: every layer with a
        # block). ``inference``: record every forward pass run under a tape,
        # training or not (brute-force references evaluate the model with
        # ``training=False``).
        self.sampled = sampled
        self.inference = inference
        self._record = None
        self._originals = []
        self._paused = False
        self._wrap(model, "call", self._model_call(model.call))
        if callable(getattr(model, "compute_loss", None)):
            self._wrap(model, "compute_loss", self._loss_call(model.compute_loss))
        for layer in candidate_layers(model) if layers is None else layers:
            self._wrap(layer, "call", self._layer_call(layer))

    def _records(self):
        if self.inference:
            return compat.tape_could_record()
        return compat.is_training_call()

    def _wrap(self, obj, name, fn):
        had_own = name in obj.__dict__
        self._originals.append((weakref.ref(obj), name, had_own, obj.__dict__.get(name)))
        object.__setattr__(obj, name, fn)

    def remove(self):
        """Restore every instrumented object to its original state."""
        for ref, name, had_own, original in reversed(self._originals):
            obj = ref()
            if obj is None:
                continue
            if had_own:
                object.__setattr__(obj, name, original)
            else:
                object.__delattr__(obj, name)
        self._originals = []
        self._record = None

    @contextlib.contextmanager
    def paused(self):
        """Run forward passes without recording (extra passes of the
        optimizer itself, e.g. the quadratic model's Jacobian products)."""
        previous = self._paused
        self._paused = True
        try:
            yield
        finally:
            self._paused = previous

    def _loss_call(self, original):
        signature = inspect.signature(original)

        def compute_loss(*args, **kwargs):
            record = self._record
            if (
                record is not None
                and not self._paused
                and _graph_reaches(record.graph, _current_graph())
            ):
                try:
                    bound = signature.bind(*args, **kwargs).arguments
                except TypeError:
                    bound = {}
                record.loss_args = (
                    bound.get("x"),
                    bound.get("y"),
                    bound.get("sample_weight"),
                )
            return original(*args, **kwargs)

        compute_loss.__wrapped__ = original
        return compute_loss

    def _model_call(self, original):
        def call(*args, **kwargs):
            if self._paused or _is_symbolic(args) or not self._records():
                return original(*args, **kwargs)
            tape = tf.GradientTape(persistent=True) if self.sampled else None
            record = StepRecord(tape)
            self._record = record
            if tape is None:
                outputs = original(*args, **kwargs)
            else:
                with tape:
                    outputs = original(*args, **kwargs)
            record.outputs = outputs
            return outputs

        call.__wrapped__ = original
        return call

    def _layer_call(self, layer):
        original = layer.call
        key = id(layer)

        forward = block_class_for_layer(layer).forward

        def call(inputs, *args, **kwargs):
            record = self._record
            if record is None or self._paused or _is_symbolic(inputs) or not self._records():
                return original(inputs, *args, **kwargs)

            def tap(s, recorded=None):
                # ``recorded``: what the block's ``activations`` gets instead
                # of the layer's inputs; a zero-argument callable is resolved
                # when the forward returns (values computed after ``s``).
                if record.tape is None:
                    s = self._tap(record, key, s)
                else:
                    record.tape.watch(s)
                record.inputs[key].append(inputs if recorded is None else recorded)
                record.preactivations[key].append(s)
                return s

            outputs = forward(layer, original, tap, inputs, *args, **kwargs)
            entries = record.inputs[key]
            entries[:] = [x() if callable(x) else x for x in entries]
            return outputs

        call.__wrapped__ = original
        return call

    @staticmethod
    def _tap(record, key, s):
        slot = len(record.output_grads[key])
        record.output_grads[key].append(None)

        @tf.custom_gradient
        def identity(x):
            def grad(dy):
                record.output_grads[key][slot] = dy
                return dy

            return tf.identity(x), grad

        return identity(s)

    # --- reading a step ----------------------------------------------------
    def current(self):
        """This step's record, or None if no usable forward pass was seen."""
        record = self._record
        if record is None or not _graph_reaches(record.graph, _current_graph()):
            return None
        return record

    def clear(self):
        self._record = None

    def batches(self, record, blocks, sampled_loss=None, seed=None, loss_scale=None, replicas=None):
        """One :class:`LayerBatch` per block (None for a block the step did
        not use).

        Empirical: recorded ``dL/ds`` of the batch-mean loss, rescaled to
        per-example gradients by ``n / loss_scale``. Sampled: a second backward
        pass of sampled-target output gradients through the persistent tape.

        ``replicas`` (:class:`keras_kfac.distributed.Replicas`, under a
        tf.distribute strategy with several replicas): Keras scales each
        replica's loss by ``1/num_replicas``, so the empirical rescaling is
        ``n_local * num_replicas``; sampled targets are drawn for the gathered
        global batch's outputs and each replica keeps its own rows.
        """
        keys = [id(block.layer) for block in blocks]
        if sampled_loss is None:
            batches = []
            for block, key in zip(blocks, keys):
                inputs = record.inputs.get(key, [])
                grads = record.output_grads.get(key, [])
                if not inputs or any(g is None for g in grads):
                    batches.append(None)
                    continue
                n = tf.cast(tf.shape(inputs[0])[0], tf.float32)
                if replicas is not None:
                    n = n * replicas.num_replicas
                scale = n if loss_scale is None else n / loss_scale
                batches.append(LayerBatch(block, inputs, grads, scale))
            return batches
        outputs = tf.nest.flatten(record.outputs)
        if len(outputs) != 1:
            raise ValueError(
                "fisher='sampled' supports models with one output; this model "
                f"has {len(outputs)}. Use KFAC(fisher='empirical')."
            )
        output = outputs[0]
        if replicas is None:
            dy = sampled_loss.output_gradient(output, seed)
        else:
            dy = sampled_loss.output_gradient(replicas.gather(output), seed)
            dy = replicas.local_rows(dy, tf.shape(output)[0])
        # Per-example output gradients are O(1), safe in float16 without a
        # loss scale (which would overflow the float16 backward pass).
        targets = [s for key in keys for s in record.preactivations.get(key, [])]
        grads = record.tape.gradient(
            output, targets, output_gradients=tf.cast(dy, output.dtype)
        )
        batches, k = [], 0
        for block, key in zip(blocks, keys):
            inputs = record.inputs.get(key, [])
            uses = grads[k : k + len(inputs)]
            k += len(inputs)
            if not inputs or any(g is None for g in uses):
                batches.append(None)
            else:
                batches.append(LayerBatch(block, inputs, uses))
        return batches
