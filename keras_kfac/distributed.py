"""``tf.distribute`` support: data-parallel K-FAC across replicas.

Under ``MirroredStrategy`` / ``MultiWorkerMirroredStrategy`` Keras runs the
train step once per replica on that replica's slice of the global batch and
all-reduces (sums) the gradients. KFAC's own state (factors, inverses,
momentum, the sampling seed) is made of mirrored variables with
``aggregation="none"``: every replica updates its own copy, so the copies stay
equal as long as every replica computes the same values. This module makes
them compute the values of a single device fed the global batch:

* **Statistics** (:meth:`Replicas.gather_batches`): each replica's per-example
  activations ``a`` and pre-activation gradients ``g`` of every block are
  all-gathered, so every curvature method (K-FAC, EKFAC, the SVD-based ones,
  and the methods that use the current batch, TENGraD, CG-FAC, auto) sees
  the global batch exactly as one device would. Cost per statistics step and
  block: ``N_global * T * (a_dim + g_dim)`` floats received per replica.
* **Per-example scaling**: Keras scales each replica's loss by
  ``1/num_replicas`` (so that the summed gradients are the global mean); the
  recorded ``dL/ds`` are therefore rescaled by ``n_local * num_replicas``
  (``capture.batches(replicas=...)``).
* **Sampled Fisher**: the model outputs are all-gathered, targets are drawn
  for the whole global batch with the (mirrored) seed, and each replica
  back-propagates its own rows. Each replica's examples get their own,
  independent draws, and they are the very draws one device would make for
  the global batch.
* **Nonlinear scalars**: the KL-clip factor ``nu`` is a function of the
  all-reduced gradient and of the (equal) factors, so it is already equal on
  every replica. The quadratic model of ``adaptive_step`` and ``rho``
  re-evaluate the loss on the local batch: their loss / curvature terms are
  summed across replicas (:func:`sum_over_replicas`).
* **Distributed inversion** (:func:`refresh`): on refresh steps the blocks are
  assigned to replicas greedily by estimated cost (``a_dim^3 + g_dim^3``,
  largest first, to the least loaded replica); each replica refreshes only its
  blocks and the results are shared with one all-reduce (sum) of the
  refreshed state, zero on the replicas that did not compute it.

Communication happens inside the replica function with collective ops
launched per replica (the strategy's own ``CollectiveAllReduce`` launchers),
not through ``merge_call``: the statistics and refreshes are behind
``tf.cond`` in the step, and ``merge_call`` cannot cross a ``tf.cond``. The
step runs with the strategy's ``merge_call`` disabled
(:func:`replica_step`), which is how ``MirroredStrategy`` already runs
XLA-compiled GPU steps: variable updates then go to the local copy.
"""

import contextlib

import tensorflow as tf

from keras_kfac import compat
from keras_kfac.curvature.base import LayerBatch


class DistributionError(RuntimeError):
    pass


def check_supported(strategy, jit_compile=False, run_eagerly=False, quadratic_model=False):
    """Clear errors for combinations that cannot work, before any tracing."""
    if strategy is None or strategy.num_replicas_in_sync <= 1:
        return
    if quadratic_model:
        raise DistributionError(
            "adaptive_step=True and AdaptiveDamping evaluate the "
            "quadratic model on each replica's local batch and are not reduced across "
            f"the {strategy.num_replicas_in_sync} replicas yet, so replicas would drift "
            "apart. Under a tf.distribute strategy use adaptive_step=False and a fixed "
            "damping (or a damping schedule / DampingScheduler)."
        )
    if compat.is_mirrored(strategy) and jit_compile:
        raise DistributionError(
            f"jit_compile=True does not work with {type(strategy).__name__} and "
            f"{strategy.num_replicas_in_sync} replicas in Keras 3 with TensorFlow: the "
            "XLA-compiled step reads variables placed on another device ('Trying to "
            "access resource ... located in device ...'), even with plain SGD. Compile "
            "with jit_compile=False under this strategy (the K-FAC step itself is "
            "XLA-compatible: jit_compile=True works on one device and under TPUStrategy)."
        )
    if run_eagerly:
        raise DistributionError(
            "KFAC under a tf.distribute strategy with several replicas needs the "
            "compiled train step (collective ops cannot run replica by replica in "
            "eager mode): compile without run_eagerly=True."
        )


class Replicas:
    """Collective communication among the replicas, from inside one
    replica's step (no ``merge_call``)."""

    def __init__(self, strategy, context):
        self.strategy = strategy
        self.num_replicas = strategy.num_replicas_in_sync
        self.replica_id = context.replica_id_in_sync_group
        self._context = context
        self._launcher = None
        if compat.is_mirrored(strategy):
            self._launcher = compat.collective_launcher(strategy, context)
            if self._launcher is None:
                raise DistributionError(
                    f"KFAC needs collective ops under {type(strategy).__name__}; this "
                    f"strategy uses {compat.cross_device_ops_name(strategy)}."
                )
        self._offset = None

    # --- primitives -----------------------------------------------------------
    def sum(self, tensors):
        """All-reduce (sum) a list of float32 tensors, as one packed buffer."""
        tensors = [tf.convert_to_tensor(t, tf.float32) for t in tensors]
        if not tensors:
            return []
        if self._launcher is None:
            return self._context.all_reduce(tf.distribute.ReduceOp.SUM, tensors)
        flat = tf.concat([tf.reshape(t, [-1]) for t in tensors], axis=0)
        reduced = self._launcher.all_reduce(flat)
        sizes = [int(t.shape.num_elements()) for t in tensors]
        parts = tf.split(reduced, sizes, axis=0)
        return [tf.reshape(p, t.shape) for p, t in zip(parts, tensors)]

    def gather(self, tensor):
        """All-gather along axis 0 (replica order; sizes may differ)."""
        tensor = tf.convert_to_tensor(tensor)
        if self._launcher is None:
            gathered = self._context.all_gather(tensor, axis=0)
        else:
            gathered = self._launcher.all_gather(tensor, axis=0)
        # The collective loses the static shape; only axis 0 changes.
        gathered.set_shape(tf.TensorShape([None]).concatenate(tensor.shape[1:]))
        return gathered

    def local_rows(self, global_tensor, local_size):
        """This replica's rows of a tensor gathered with :meth:`gather`."""
        if self._offset is None:
            ids = self.gather(tf.reshape(tf.cast(self.replica_id, tf.int32), [1]))
            sizes = self.gather(tf.reshape(tf.cast(local_size, tf.int32), [1]))
            rank = tf.argmax(tf.cast(tf.equal(ids, tf.cast(self.replica_id, tf.int32)), tf.int32))
            self._offset = tf.reduce_sum(sizes[:rank])
        return global_tensor[self._offset : self._offset + local_size]

    # --- what the optimizer calls -------------------------------------------------
    def gather_batches(self, batches):
        """The global batch's per-example ``a`` and ``g`` of every block."""
        out = []
        for batch in batches:
            if batch is None:
                out.append(None)
                continue
            out.append(GatheredBatch(batch.block, self.gather(batch.a()), self.gather(batch.g())))
        return out


class GatheredBatch(LayerBatch):
    """A :class:`LayerBatch` holding already computed ``(n, T, dim)``
    activations and per-example gradients (of the global batch)."""

    def __init__(self, block, a, g):
        super().__init__(block, [], [], 1.0)
        self._a, self._g = a, g

    def a(self):
        return self._a

    def g(self):
        return self._g


def current():
    """:class:`Replicas` for the replica context of the current step, or None
    when there is one replica (or no strategy, or a cross-replica context)."""
    if not tf.distribute.has_strategy():
        return None
    strategy = tf.distribute.get_strategy()
    if strategy.num_replicas_in_sync <= 1:
        return None
    context = tf.distribute.get_replica_context()
    if context is None:
        return None
    if tf.executing_eagerly():
        check_supported(strategy, run_eagerly=True)
    if compat.is_mirrored(strategy) and compat.in_xla_context():
        check_supported(strategy, jit_compile=True)
    return Replicas(strategy, context)


@contextlib.contextmanager
def replica_step():
    """Run one optimizer step in the replica context without ``merge_call``.

    Yields :func:`current`. MirroredStrategy (and MultiWorkerMirrored) run
    replica functions in threads, one at a time, switching only at
    ``merge_call``; with merge_call disabled none happens, so the switch of
    the strategy's ``_use_merge_call`` is only seen by this replica's step.
    With it, all-reduces use the collective launchers and variable updates in
    replica context write the local copy (``_replica_ctx_update``), as
    MirroredStrategy does for XLA-compiled GPU steps.
    """
    replicas = current()
    if replicas is None or not compat.is_mirrored(replicas.strategy):
        yield replicas
        return
    with compat.merge_call_disabled(replicas.strategy):
        yield replicas


def sum_over_replicas(values):
    """Sum a list of float32 scalars/tensors over the replicas of the current
    step (identity with one replica). For per-replica terms of a loss that
    Keras already scaled by ``1/num_replicas``."""
    replicas = current()
    if replicas is None:
        return list(values)
    return replicas.sum(values)


# --- distributed inversion ------------------------------------------------------


def refresh_cost(curvature):
    """Estimated cost of a refresh: ``a_dim^3 + g_dim^3`` (0 when the method
    has nothing to refresh)."""
    if not curvature.refresh_state():
        return 0
    return curvature.block.a_dim**3 + curvature.block.g_dim**3


def assign_owners(costs, num_replicas):
    """Greedy longest-processing-time assignment: blocks by decreasing cost,
    each to the least loaded replica. Returns the owner of every block (-1
    for a block with no work)."""
    load = [0] * num_replicas
    owners = [-1] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        if costs[i] <= 0:
            continue
        r = min(range(num_replicas), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += costs[i]
    return owners


def refresh(replicas, curvatures, damping):
    """Refresh every curvature's inverse/eigenbasis. With several replicas,
    each refreshes the blocks it owns and the refreshed state is shared by
    one all-reduce of zero-padded contributions."""
    if replicas is None:
        for c in curvatures:
            c.refresh(damping)
        return
    owners = assign_owners([refresh_cost(c) for c in curvatures], replicas.num_replicas)
    me = tf.get_static_value(replicas.replica_id)
    contributions, targets = [], []
    for owner, curvature in zip(owners, curvatures):
        if owner < 0:
            continue
        state = curvature.refresh_state()

        def mine(curvature=curvature, state=state):
            curvature.refresh(damping)
            return [tf.identity(tf.cast(v, tf.float32)) for v in state]

        def others(state=state):
            return [tf.zeros(v.shape, tf.float32) for v in state]

        if me is not None:
            values = mine() if int(me) == owner else others()
        else:
            values = tf.cond(tf.equal(replicas.replica_id, owner), mine, others)
        contributions.extend(values)
        targets.extend(state)
    for variable, value in zip(targets, replicas.sum(contributions)):
        variable.assign(tf.cast(value, variable.dtype))


def local_copy(variable):
    """The copy of a (mirrored) variable that the current replica owns, for
    writes that every replica makes identically (no aggregation, no
    ``merge_call``); the variable itself outside a replicated step."""
    value = getattr(variable, "value", variable)
    if (
        isinstance(value, tf.distribute.DistributedValues)
        and tf.distribute.has_strategy()
        and tf.distribute.get_replica_context() is not None
    ):
        return compat.local_component(value)
    return variable
