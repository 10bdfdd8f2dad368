"""Every function of keras_kfac.compat (the one module that uses private
Keras/TensorFlow APIs) exercised directly: run this first after an upgrade."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import tensorflow as tf

import keras_kfac
from keras_kfac import compat

HERE = os.path.dirname(os.path.abspath(__file__))


def test_tape_and_training_call_detection():
    assert not compat.tape_could_record()
    with tf.GradientTape():
        assert compat.tape_could_record()
    seen = []

    class Probe(keras.layers.Layer):
        def call(self, x, training=None):
            seen.append(compat.is_training_call())
            return x

    model = keras.Sequential([keras.Input((2,)), Probe()])
    seen.clear()  # the symbolic call that built the model
    x = np.ones((1, 2), "float32")
    with tf.GradientTape():
        model(x, training=True)
        model(x, training=False)
    model(x, training=True)  # no tape: nothing to record
    assert seen == [True, False, False]


def test_model_introspection():
    inner = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(2, name="inner_dense")], name="inner"
    )
    outer = keras.Sequential([keras.Input((3,)), inner, keras.layers.Dense(1, name="top")])
    names = [layer.name for layer in compat.flatten_layers(outer)]
    assert "inner_dense" in names and "top" in names and "inner" in names

    class NoTraining(keras.Model):
        def call(self, x):
            return x

    assert compat.call_has_training_arg(outer)
    assert not compat.call_has_training_arg(NoTraining())


def test_compute_loss_and_loss_function():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(loss="mse")
    y = np.array([[1.0], [3.0]], "float32")
    pred = np.zeros((2, 1), "float32")
    assert float(compat.compute_loss(model, None, y, pred, None)) == np.float32(5.0)
    fn, kwargs = compat.loss_function(keras.losses.Huber(delta=2.0))
    assert kwargs["delta"] == 2.0
    assert float(np.mean(fn(y, pred, **kwargs))) == float(keras.losses.Huber(delta=2.0)(y, pred))
    assert compat.loss_function(lambda a, b: a) is None


def test_optimizer_assignment_hook_and_call_stack_lookup():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    opt = keras_kfac.KFAC(fisher="empirical")
    model.compile(optimizer=opt, loss="mse")  # the hook registers the model
    assert opt.estimator.model() is model

    class Holder(keras.Model):
        def lookup(self):
            return compat.model_on_call_stack(lambda m: m is self)

    holder = Holder()
    assert holder.lookup() is holder
    assert compat.model_on_call_stack(lambda m: True) is None


def test_optimizer_update_shims():
    variable = keras.Variable(np.ones((2,), "float32"))
    sgd = keras.optimizers.SGD(learning_rate=0.5)
    sgd.build([variable])
    assert compat.variable_key(sgd, variable) == compat.variable_key(sgd, variable)
    grad = tf.constant([1.0, 2.0])
    reduced = compat.all_reduce_sum_gradients(sgd, [(grad, variable)])  # no strategy: unchanged
    np.testing.assert_allclose(reduced[0][0].numpy(), [1.0, 2.0])
    compat.apply_updates(sgd, [(grad, variable)], tf.constant(0.5))
    np.testing.assert_allclose(variable.numpy(), [0.5, 0.0])

    @tf.function(jit_compile=True)
    def compiled():
        return tf.constant(compat.in_xla_context())

    @tf.function
    def graph():
        return tf.constant(compat.in_xla_context())

    assert bool(compiled()) and not bool(graph())


def test_distribution_shims_under_mirrored_strategy():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "compat_strategy_check.py")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT ") :])
    assert result["is_mirrored"] and not result["one_device_is_mirrored"]
    assert result["cross_device_ops_name"] == "ReductionToOneDevice"
    assert result["collective_launcher"]
    assert result["all_reduced"] == [2.0, 2.0]
    assert result["local_copies"] == [2.0, 3.0]  # each replica wrote only its copy


def test_model_attribute_hook_mask_and_loss_weights():
    seen = []
    compat.on_model_attribute(lambda *args: None)  # installed once: a no-op again
    holder = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    opt = keras_kfac.KFAC()
    holder.d_optimizer = opt  # any attribute registers an optimizer without a model
    assert opt.estimator.model() is holder
    seen.append(holder.__dict__.get("d_optimizer") is opt)
    assert seen == [True]
    embedded = keras.layers.Embedding(5, 3, mask_zero=True)(tf.constant([[1, 0, 2]]))
    np.testing.assert_array_equal(compat.keras_mask(embedded).numpy(), [[True, False, True]])
    assert compat.keras_mask(tf.ones((2,))) is None and compat.keras_mask(None) is None
    inputs = keras.Input((2,))
    model = keras.Model(inputs, [keras.layers.Dense(1)(inputs), keras.layers.Dense(1)(inputs)])
    model.compile(loss=["mse", "mse"], loss_weights=[0.5, 2.0])
    assert compat.compiled_loss_weights(model) == [0.5, 2.0]
    assert compat.compiled_loss_weights(keras.Sequential([keras.layers.Dense(1)])) is None


def test_optimizer_hooks_take_over_the_update():
    seen = []

    class Recording(compat.OptimizerHooks, keras.optimizers.Optimizer):
        def apply_update(self, grads, variables, learning_rate):
            seen.append([self.variable_index(v) for v in variables])
            for g, v in zip(grads, variables):
                v.assign_sub(learning_rate * g)

    variables = [keras.Variable(np.ones((2,), "float32")), keras.Variable(np.ones((), "float32"))]
    opt = Recording(learning_rate=0.5, weight_decay=0.1)
    opt.exclude_from_weight_decay(var_list=[variables[1]])
    opt.apply([tf.constant([1.0, 2.0]), tf.constant(4.0)], variables)
    assert seen == [[0, 1]]
    # Keras's own weight decay is off (the subclass owns it): only the step.
    np.testing.assert_allclose(variables[0].numpy(), [0.5, 0.0])
    assert opt.decays(variables[0]) and not opt.decays(variables[1])
    assert [v.path for v in opt.own_variables()] == [v.path for v in opt.variables]
