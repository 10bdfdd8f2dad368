"""The tf.distribute shims of keras_kfac.compat under a MirroredStrategy of
two logical CPU devices (run in its own process: logical devices must be set
before TensorFlow initializes). Prints ``RESULT <json>``."""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import tensorflow as tf  # noqa: E402

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from keras_kfac import compat  # noqa: E402


def main():
    strategy = tf.distribute.MirroredStrategy(
        ["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice()
    )
    collective = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    result = {
        "is_mirrored": compat.is_mirrored(collective),
        "one_device_is_mirrored": compat.is_mirrored(tf.distribute.OneDeviceStrategy("/cpu:0")),
        "cross_device_ops_name": compat.cross_device_ops_name(strategy),
    }
    with collective.scope():
        variable = tf.Variable(1.0)
        sgd = keras.optimizers.SGD(learning_rate=1.0)
        sgd.build([variable])

    @tf.function
    def replica_fn():
        context = tf.distribute.get_replica_context()
        launcher = compat.collective_launcher(collective, context)
        local = compat.local_component(variable)
        with compat.merge_call_disabled(collective):
            # Without merge_call the update writes this replica's copy only.
            local.assign_add(tf.cast(context.replica_id_in_sync_group, tf.float32) + 1.0)
        pairs = compat.all_reduce_sum_gradients(sgd, [(tf.constant(1.0), variable)])
        return launcher is not None, pairs[0][0]

    has_launcher, summed = collective.run(replica_fn)
    result["collective_launcher"] = bool(collective.experimental_local_results(has_launcher)[0])
    result["all_reduced"] = [float(t) for t in collective.experimental_local_results(summed)]
    result["local_copies"] = [float(v) for v in collective.experimental_local_results(variable)]
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
