"""Model discovery and layer instrumentation.

The optimizer never sees activations, only gradients, so it instruments the
model's supported layers (their instances, not their classes):

* each block layer's ``call`` records its input and, with the layer's own
  activation temporarily set to linear, its pre-activation output ``s``; the
  activation is applied afterwards, so fused activations work;
* an identity with a custom gradient on ``s`` records ``dL/ds`` during the
  ordinary backward pass (no extra cost): the empirical Fisher's statistics,
  and for every Fisher the factored form of the gradient
  (:meth:`Capture.gradient_factors`);
* sampled Fisher: the registered model's ``call`` runs under a persistent
  ``tf.GradientTape``; the optimizer later back-propagates sampled-target
  output gradients from the model output to every ``s`` (one extra backward
  pass, only on statistics steps).

A layer is instrumented once, however many optimizers use it (a GAN's
generator and discriminator optimizers): its ``call`` is replaced by one
hook that records into the current step of every subscribed
:class:`Capture`, through one shared tap. The model's ``call``,
``compute_loss`` and ``train_step`` hooks are shared the same way (each
capture's handler wraps the next).

Record lifecycle (one :class:`StepRecord` per capture and train step):

* started by the registered model's training ``call`` (sampled Fisher: it
  needs the model's output and a tape around it) or, lazily, by the first
  recorded call of an instrumented layer, so sub-models called inside a
  custom ``train_step`` (a VAE's encoder and decoder) are recorded without
  the registered model ever being called;
* ended by the owning optimizer's apply (:meth:`Capture.clear`), by the
  start of the registered model's next ``train_step``, or when the graph it
  was recorded in cannot reach the current one (a new trace);
* recording happens only in training-mode calls under a gradient tape, so
  no tensor leaks into evaluate/predict or across traced functions.

Which uses of a layer count (empirical Fisher): a use whose backward pass
never ran has no gradient and is dropped alone (a generator's layers called
under the discriminator's tape). A use whose gradient came from an earlier
backward pass than the latest one is stale and dropped too: each forward
use and each gradient arrival is stamped with a global counter, and only
uses whose gradient arrived after the last forward use that received one
are kept, i.e. the uses of the last backward pass, which produced the
gradients being applied (in a GAN the discriminator's layers also run in
the generator's phase, where they receive the generator loss's gradient).
"""

import collections
import contextlib
import inspect
import itertools
import weakref

import keras
import tensorflow as tf

from keras_kfac import compat
from keras_kfac.curvature.base import LayerBatch
from keras_kfac.layers.base import LayerBlock, block_class_for_layer

#: Orders forward uses and gradient arrivals (Python execution order, which
#: is also the order of tracing in graph mode).
_CLOCK = itertools.count()


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
    return any(isinstance(t, keras.KerasTensor) for t in tf.nest.flatten(x))


class StepRecord:
    """Tensors recorded in one train step, per layer (keyed by
    ``id(layer)``), one entry per use of the layer."""

    def __init__(self, tape=None):
        self.graph = _current_graph()
        self.tape = tape
        #: True while the registered model's call runs under ``tape``.
        self.tape_active = False
        self.outputs = None
        self.inputs = collections.defaultdict(list)
        self.preactivations = collections.defaultdict(list)
        self.output_grads = collections.defaultdict(list)
        #: Stamps (:data:`_CLOCK`) of each use's forward call and of its
        #: gradient's arrival (None until the backward pass reaches it).
        self.forward_times = collections.defaultdict(list)
        self.grad_times = collections.defaultdict(list)
        #: Each use's Keras mask of its input (None when unmasked).
        self.masks = collections.defaultdict(list)
        #: True while the sampled Fisher back-propagates through the
        #: recorded forward pass: its gradients must not reach the taps.
        self.sampling = False
        #: ``(x, y, sample_weight)`` seen by ``model.compute_loss`` in this
        #: step (None in loops that do not call it); used by the quadratic
        #: model of :mod:`keras_kfac.quadratic` to re-evaluate the batch loss.
        self.loss_args = None
        #: The model's non-trainable values (dropout seeds, normalization
        #: statistics) when this step's training forward pass began, so
        #: that the quadratic model re-runs the batch with the step's own
        #: dropout masks (the pass itself advances the seeds).
        self.state = None

    def add_use(self, key, inputs, s, mask):
        self.inputs[key].append(inputs)
        self.preactivations[key].append(s)
        self.output_grads[key].append(None)
        self.forward_times[key].append(next(_CLOCK))
        self.grad_times[key].append(None)
        self.masks[key].append(mask)
        return len(self.inputs[key]) - 1

    def set_gradient(self, key, slot, dy):
        self.output_grads[key][slot] = dy
        self.grad_times[key][slot] = next(_CLOCK)

    def latest_uses(self, keys):
        """``{key: [use index]}``: the uses of ``keys`` that received their
        gradient from the last backward pass (see the module docstring)."""
        cutoff = max(
            (
                f
                for key in keys
                for f, t in zip(self.forward_times.get(key, []), self.grad_times.get(key, []))
                if t is not None
            ),
            default=None,
        )
        return {
            key: [
                i
                for i, t in enumerate(self.grad_times.get(key, []))
                if t is not None and t > cutoff
            ]
            for key in keys
        }


def candidate_layers(model):
    """Every layer of ``model`` (nested ones too) of a type with a block."""
    return [
        layer for layer in compat.flatten_layers(model) if block_class_for_layer(layer) is not None
    ]


# --- shared hooks -------------------------------------------------------------
_HOOKS = {}


class _Hook:
    """One replacement of ``obj.<name>`` shared by every capture subscribed
    to it; restores the original when the last one leaves."""

    def __init__(self, obj, name):
        self._ref = weakref.ref(obj)
        self.name = name
        self._had_own = name in obj.__dict__
        self._own = obj.__dict__.get(name)
        self.original = getattr(obj, name)
        self.subscribers = {}  # id(capture) -> handler

        def dispatch(*args, **kwargs):
            return self.dispatch(*args, **kwargs)

        dispatch.__wrapped__ = self.original
        object.__setattr__(obj, name, dispatch)

    @classmethod
    def subscribe(cls, obj, name, capture, handler):
        key = (id(obj), name)
        hook = _HOOKS.get(key)
        if hook is None or hook._ref() is not obj:
            hook = _HOOKS[key] = cls(obj, name)
        hook.subscribers[id(capture)] = handler
        return hook

    def unsubscribe(self, capture):
        self.subscribers.pop(id(capture), None)
        if self.subscribers:
            return
        obj = self._ref()
        key = (id(obj), self.name) if obj is not None else None
        if _HOOKS.get(key) is self:
            del _HOOKS[key]
        if obj is None:
            return
        if self._had_own:
            object.__setattr__(obj, self.name, self._own)
        else:
            object.__delattr__(obj, self.name)

    def dispatch(self, *args, **kwargs):
        fn = self.original
        for handler in list(self.subscribers.values()):
            fn = _chained(handler, fn)
        return fn(*args, **kwargs)


def _chained(handler, inner):
    return lambda *args, **kwargs: handler(inner, *args, **kwargs)


class _LayerHook(_Hook):
    """A block layer's ``call``: one forward and one tap for every
    subscribed capture that records this call."""

    def dispatch(self, inputs, *args, **kwargs):
        layer = self._ref()
        if layer is None or _is_symbolic(inputs):
            return self.original(inputs, *args, **kwargs)
        records = [
            record
            for record in (handler() for handler in list(self.subscribers.values()))
            if record is not None
        ]
        if not records:
            return self.original(inputs, *args, **kwargs)
        key = id(layer)
        mask = compat.keras_mask(inputs)
        uses = []

        def tap(s, recorded=None):
            # ``recorded``: what the block's ``activations`` gets instead of
            # the layer's inputs; a zero-argument callable is resolved when
            # the forward returns (values computed after ``s``).
            # Every Fisher taps dL/ds: the empirical one's statistics and
            # the gradient's factored form (Capture.gradient_factors) use it.
            s = _tap(s, [(r, key, len(r.inputs[key])) for r in records])
            for record in records:
                if record.tape_active:
                    record.tape.watch(s)
                uses.append(
                    (record, record.add_use(key, inputs if recorded is None else recorded, s, mask))
                )
            return s

        outputs = block_class_for_layer(layer).forward(
            layer, self.original, tap, inputs, *args, **kwargs
        )
        for record, slot in uses:
            x = record.inputs[key][slot]
            if callable(x):
                record.inputs[key][slot] = x()
        return outputs


def _tap(s, targets):
    """Identity on ``s`` whose gradient is stored into every ``(record,
    key, slot)`` of ``targets``."""

    @tf.custom_gradient
    def identity(x):
        def grad(dy):
            for record, key, slot in targets:
                if not record.sampling:
                    record.set_gradient(key, slot, dy)
            return dy

        return tf.identity(x), grad

    return identity(s)


def _location_mask(block, inputs, mask):
    """``mask`` as float ``(n, T)`` over the block's locations of a use, or
    None when the use is unmasked or its mask does not index the block's
    locations (e.g. a convolution's patches)."""
    if mask is None:
        return None
    locations = block.activations(inputs).shape[1]
    per_example = mask.shape[1:].num_elements()
    if locations is None or per_example != locations:
        return None
    return tf.reshape(tf.cast(mask, tf.float32), (tf.shape(mask)[0], locations))


class _MaskedBatch(LayerBatch):
    """A :class:`LayerBatch` whose masked locations (per use, ``(n, T)``
    float masks, None for unmasked uses) have zero ``a`` and ``g``, so they
    are left out of every statistic.

    Uses with different batch sizes (a layer called on ``x`` and on
    ``x[:k]``) are zero-padded to the largest one with masked rows: row
    ``i`` of every use is example ``i``'s (as ``x[:k]`` keeps them), and the
    padded rows are locations the example does not have, so expand's ``A``
    sums every real use over the ``n`` examples and ``G`` averages over the
    real locations only."""

    def __init__(self, block, inputs, output_grads, grad_scale, masks, g_scales=None):
        super().__init__(block, inputs, output_grads, grad_scale)
        self._masks = masks
        #: Per use, ``(n, T)`` factors of ``g`` (per-position sample weights) or None.
        self._g_scales = g_scales or [None] * len(masks)

    def _rows(self):
        return tf.reduce_max([tf.shape(self.block.activations(x))[0] for x in self._inputs])

    def _padded(self, parts, masks):
        rows = self._rows()
        out = []
        for x, m in zip(parts, masks):
            if m is not None:
                x = x * m[..., None]
            pad = rows - tf.shape(x)[0]
            out.append(
                tf.pad(x, tf.concat([[[0, pad]], tf.zeros([x.shape.rank - 1, 2], tf.int32)], 0))
            )
        return out[0] if len(out) == 1 else tf.concat(out, axis=1)

    def a(self):
        return self._padded([self.block.activations(x) for x in self._inputs], self._masks)

    def g(self):
        parts = [
            self.block.output_gradients(d) * (1.0 if c is None else c[..., None])
            for d, c in zip(self._output_grads, self._g_scales)
        ]
        return self._padded(parts, self._masks) * tf.cast(self._grad_scale, tf.float32)

    def location_mask(self):
        parts = [
            tf.ones(tf.shape(self.block.activations(x))[:2]) if m is None else m
            for x, m in zip(self._inputs, self._masks)
        ]
        rows = self._rows()
        padded = [tf.pad(m, [[0, rows - tf.shape(m)[0]], [0, 0]]) for m in parts]
        return padded[0] if len(padded) == 1 else tf.concat(padded, axis=1)


def _same_batch_size(inputs):
    """True when every use's batch size is statically known and equal."""
    sizes = {tf.nest.flatten(x)[0].shape[0] for x in inputs}
    return len(sizes) == 1 and None not in sizes


def _layer_batch(block, inputs, grads, scale, masks, g_scales=None):
    masks = [_location_mask(block, x, m) for x, m in zip(inputs, masks)]
    if (
        all(m is None for m in masks)
        and not any(c is not None for c in g_scales or [])
        and (len(inputs) == 1 or _same_batch_size(inputs))
    ):
        return LayerBatch(block, inputs, grads, scale)
    return _MaskedBatch(block, inputs, grads, scale, masks, g_scales)


def _sample_weight(record):
    """The weights given to ``compute_loss`` (sample or class weights):
    ``(n,)`` per example or ``(n, T)`` per sequence position; None when
    absent or of another layout (a dict of per-output weights)."""
    weight = None if record.loss_args is None else record.loss_args[2]
    if weight is None or not tf.is_tensor(weight) and not hasattr(weight, "shape"):
        return None
    weight = tf.cast(tf.convert_to_tensor(weight), tf.float32)
    if weight.shape.rank == 2 and weight.shape[1] == 1:
        return tf.reshape(weight, (-1,))
    return weight if weight.shape.rank in (1, 2) else None


def _inverse_root(weight):
    """``1 / sqrt(w)`` (0 where ``w <= 0``): recorded gradients carry ``w``
    linearly; the Fisher of the weighted loss weights ``g g^T`` by ``w``."""
    return tf.math.divide_no_nan(1.0, tf.sqrt(tf.maximum(weight, 0.0)))


def _weight_gradients(block, inputs, grads, weight):
    """``(grads, g_scales)`` of one block's uses under the sample weight.

    Per example ``(n,)``: each gradient is divided by ``sqrt(w_i)``. Per
    position ``(n, T)``: a use whose locations are the ``T`` positions (a
    Dense or recurrent layer on the sequence) has ``g`` at location ``t``
    divided by ``sqrt(w_it)``, as the per-position losses weight it; a use
    with other locations (before pooling, conv patches) sees a mix of the
    positions' losses and takes the example's mean weight."""
    if weight is None:
        return grads, [None] * len(grads)
    if weight.shape.rank == 1:
        return [_per_example(tf.multiply, g, _inverse_root(weight)) for g in grads], [None] * len(
            grads
        )
    per_example = _inverse_root(tf.reduce_mean(weight, axis=1))
    out, scales = [], []
    for x, g in zip(inputs, grads):
        if block.activations(x).shape[1] == weight.shape[1]:
            out.append(g)
            scales.append(_inverse_root(weight))
        else:
            out.append(_per_example(tf.multiply, g, per_example))
            scales.append(None)
    return out, scales


def _output_weights(record, output):
    """Loss weights of one model output for the sampled gradient: the
    sample weight given to ``compute_loss`` times the output's Keras mask
    scaled as Keras's loss reduction scales it (valid entries
    ``total / valid``, so the masked loss is the mean over unmasked
    positions); None when neither is present."""
    weight = None if record.loss_args is None else record.loss_args[2]
    weight = (
        None
        if weight is None or isinstance(weight, (dict, list, tuple))
        else tf.cast(weight, tf.float32)
    )
    mask = compat.keras_mask(output)
    if mask is not None:
        mask = tf.cast(mask, tf.float32)
        total = tf.cast(tf.size(mask), tf.float32)
        mask = mask * tf.math.divide_no_nan(total, tf.reduce_sum(mask))
        if weight is not None and weight.shape.rank < mask.shape.rank:
            weight = tf.reshape(
                weight,
                tf.concat(
                    [tf.shape(weight), tf.ones([mask.shape.rank - weight.shape.rank], tf.int32)], 0
                ),
            )
        weight = mask if weight is None else weight * mask
    return weight


class Capture:
    """Instruments ``model`` (its ``call``, ``compute_loss``, ``train_step``)
    and every layer of a supported type.

    ``sampled``: True records the model's call under a persistent tape,
    False taps ``dL/ds`` only, None (not decided yet, ``fisher="auto"``
    before the optimizer is built) does both. Which instrumented layers
    become curvature blocks is decided when the optimizer is built (layers
    may not be built before the first call); :meth:`keep_layers` then drops
    the others.
    """

    def __init__(self, model, sampled, layers=None, inference=False):
        # ``layers``: instrument only these (default: every layer with a
        # block). ``inference``: record every forward pass run under a tape,
        # training or not (brute-force references evaluate the model with
        # ``training=False``).
        self.sampled = sampled
        self.inference = inference
        self._model_ref = weakref.ref(model)
        self._record = None
        self._paused = False
        self._hooks = []
        self._layer_hooks = {}
        self._hooks.append(_Hook.subscribe(model, "call", self, self._model_call))
        for name, handler in (("compute_loss", self._loss_call), ("train_step", self._train_step)):
            if callable(getattr(model, name, None)):
                self._hooks.append(_Hook.subscribe(model, name, self, handler))
        for layer in candidate_layers(model) if layers is None else layers:
            self._layer_hooks[id(layer)] = _LayerHook.subscribe(
                layer, "call", self, self._layer_record
            )

    def keep_layers(self, layers):
        """Stop instrumenting every layer not in ``layers``."""
        keep = {id(layer) for layer in layers}
        for key in list(self._layer_hooks):
            if key not in keep:
                self._layer_hooks.pop(key).unsubscribe(self)

    def remove(self):
        """Undo this capture's instrumentation (shared hooks stay while
        other captures use them)."""
        for hook in list(self._layer_hooks.values()) + self._hooks:
            hook.unsubscribe(self)
        self._layer_hooks = {}
        self._hooks = []
        self._record = None

    def _records(self):
        if self._paused:
            return False
        if self.inference:
            return compat.tape_could_record()
        return compat.is_training_call()

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

    def _new_record(self, tape=None):
        record = StepRecord(tape)
        self._record = record
        return record

    def _layer_record(self):
        """The record this layer call goes into (started lazily), or None
        when the call is not recorded."""
        if not self._records():
            return None
        record = self.current()
        return record if record is not None else self._new_record()

    def _train_step(self, original, *args, **kwargs):
        self._record = None  # a new step: nothing of the previous one counts
        return original(*args, **kwargs)

    def _loss_call(self, original, *args, **kwargs):
        record = self.current()
        if record is not None and not self._paused:
            try:
                bound = inspect.signature(original).bind(*args, **kwargs).arguments
            except TypeError:
                bound = {}
            record.loss_args = (bound.get("x"), bound.get("y"), bound.get("sample_weight"))
        return original(*args, **kwargs)

    def _model_call(self, original, *args, **kwargs):
        if _is_symbolic(args) or not self._records():
            return original(*args, **kwargs)
        state = [tf.identity(v.value) for v in self._model_ref().non_trainable_variables]
        if self.sampled is False:
            record = self.current() or self._new_record()
            outputs = original(*args, **kwargs)
        else:
            # The sampled Fisher back-propagates from this call's output, so
            # the step's record starts here, under a persistent tape.
            tape = tf.GradientTape(persistent=True)
            record = self._new_record(tape)
            record.tape_active = True
            try:
                with tape:
                    outputs = original(*args, **kwargs)
            finally:
                record.tape_active = False
        if record.state is None:
            record.state = state
        record.outputs = outputs
        return outputs

    # --- reading a step ----------------------------------------------------
    def current(self):
        """This step's record, or None if no usable forward pass was seen."""
        record = self._record
        if record is None or not _graph_reaches(record.graph, _current_graph()):
            return None
        return record

    def clear(self):
        self._record = None

    def batches(
        self, record, blocks, sampled_losses=None, seed=None, loss_scale=None, replicas=None
    ):
        """One :class:`LayerBatch` per block (None for a block the step did
        not use).

        Empirical: recorded ``dL/ds`` of the batch-mean loss, rescaled to
        per-example gradients by ``n / loss_scale``. Sampled
        (``sampled_losses``: one :class:`keras_kfac.losses.SampledLoss` per
        model output, with its compiled loss weight): a second backward pass
        of sampled-target output gradients through the persistent tape.

        ``replicas`` (:class:`keras_kfac.distributed.Replicas`, under a
        tf.distribute strategy with several replicas): Keras scales each
        replica's loss by ``1/num_replicas``, so the empirical rescaling is
        ``n_local * num_replicas``; sampled targets are drawn for the gathered
        global batch's outputs and each replica keeps its own rows.
        """
        keys = [id(block.layer) for block in blocks]
        if sampled_losses is None:
            uses = record.latest_uses(set(keys))
            weight = _sample_weight(record)
            batches = []
            for block, key in zip(blocks, keys):
                if not uses[key]:
                    batches.append(None)
                    continue
                inputs = [record.inputs[key][i] for i in uses[key]]
                grads = [record.output_grads[key][i] for i in uses[key]]
                grads, g_scales = _weight_gradients(block, inputs, grads, weight)
                # The examples: the largest use (see _MaskedBatch).
                n = tf.cast(tf.reduce_max([tf.shape(x)[0] for x in inputs]), tf.float32)
                if replicas is not None:
                    n = n * replicas.num_replicas
                scale = n if loss_scale is None else n / loss_scale
                masks = [record.masks[key][i] for i in uses[key]]
                batches.append(_layer_batch(block, inputs, grads, scale, masks, g_scales))
            return batches
        if record.tape is None:
            raise ValueError(
                "fisher='sampled' back-propagates sampled targets from the "
                "registered model's output, but this step never called the model "
                "(a custom train_step that calls sub-models). Use "
                "KFAC(fisher='empirical') or fisher='auto'."
            )
        outputs = tf.nest.flatten(record.outputs)
        if len(outputs) != len(sampled_losses):
            raise ValueError(
                f"fisher='sampled': the model returned {len(outputs)} outputs but "
                f"{len(sampled_losses)} losses are compiled; use KFAC(fisher='empirical')."
            )
        dys = []
        for output, sampled_loss in zip(outputs, sampled_losses):
            weights = _output_weights(record, output)
            if replicas is None:
                dy = sampled_loss.output_gradient(output, seed, weights)
            else:
                if weights is not None:
                    weights = replicas.gather(weights)
                dy = sampled_loss.output_gradient(replicas.gather(output), seed, weights)
                dy = replicas.local_rows(dy, tf.shape(output)[0])
            # Per-example output gradients are O(1), safe in float16 without
            # a loss scale (which would overflow the float16 backward pass).
            dys.append(tf.cast(dy, output.dtype))
        targets = [s for key in keys for s in record.preactivations.get(key, [])]
        record.sampling = True
        try:
            grads = record.tape.gradient(outputs, targets, output_gradients=dys)
        finally:
            record.sampling = False
        # A gradient summed over several outputs can lose its static shape;
        # it is that of its target (the blocks read static location counts).
        grads = [None if g is None else tf.ensure_shape(g, s.shape) for g, s in zip(grads, targets)]
        batches, k = [], 0
        for block, key in zip(blocks, keys):
            inputs = record.inputs.get(key, [])
            uses = grads[k : k + len(inputs)]
            k += len(inputs)
            masks = record.masks.get(key, [])
            kept = [(x, g, m) for x, g, m in zip(inputs, uses, masks) if g is not None]
            if not kept:
                batches.append(None)
            else:
                xs, gs, ms = zip(*kept)
                batches.append(_layer_batch(block, list(xs), list(gs), 1.0, list(ms)))
        return batches

    def gradient_factors(self, record, blocks):
        """Per block, ``(a, d)`` of shapes ``(N, a_dim)``, ``(N, g_dim)``:
        the rows ``a_bar`` and ``dL/ds`` of every location of the uses that
        received the last backward pass's gradient, so that ``a^T d`` is
        the block's gradient ``V`` when that gradient is exactly the one
        applied. None for a block whose gradient is not a sum of outer
        products (grouped blocks, blocks that override
        ``per_example_gradients``) or that no use reached. Nothing here
        proves that the applied gradient is this one (a weight regularizer,
        a tied weight, gradient clipping, a loss scale, the all-reduce of
        several replicas change it): the caller checks ``a^T d`` against
        ``V``."""
        keys = [id(block.layer) for block in blocks]
        uses = record.latest_uses(set(keys))
        factors = []
        for block, key in zip(blocks, keys):
            if (
                not uses[key]
                or block.groups > 1
                or type(block).per_example_gradients is not LayerBlock.per_example_gradients
            ):
                factors.append(None)
                continue
            a = [
                tf.reshape(block.activations(record.inputs[key][i]), (-1, block.a_dim))
                for i in uses[key]
            ]
            d = [
                tf.reshape(block.output_gradients(record.output_grads[key][i]), (-1, block.g_dim))
                for i in uses[key]
            ]
            factors.append((tf.concat(a, axis=0), tf.concat(d, axis=0)))
        return factors


def _per_example(op, x, weights):
    """``op(x, w)`` with per-example ``weights`` ``(n,)`` broadcast over the
    other axes of ``x``."""
    w = tf.cast(
        tf.reshape(
            weights, tf.concat([tf.shape(weights), tf.ones([x.shape.rank - 1], tf.int32)], 0)
        ),
        x.dtype,
    )
    return op(x, w)
