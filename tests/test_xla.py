"""The XLA path (what Keras runs on a GPU/TPU: ``jit_compile="auto"``):
the compiled KFAC train step makes no host round-trip and, in the default
configuration, no eigendecomposition (XLA's CPU ``eigh`` is a slow Jacobi
iteration: 27 s for a 1000 x 1000 factor, benchmarks/results/xla.md).

Read from the compiled program itself: the HLO of a jit-compiled
``model.train_step`` (``tf.function.experimental_get_compiler_ir``).
``benchmarks/device_check.sh`` runs this file on whatever device is present.
"""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_kfac

#: HLO instructions that move data between the device and the host.
HOST_OPCODES = ("send", "send-done", "recv", "recv-done", "infeed", "outfeed")
#: TF ops of a dense eigendecomposition or SVD, named in the HLO's metadata.
EIGEN_OPS = ("SelfAdjointEigV2", "Svd")


def compiled_hlo(function, *args):
    """The optimized-before HLO text of ``function`` (a ``tf.function``
    with ``jit_compile=True``) for ``args``; raises ``ValueError`` naming
    the ops XLA cannot compile."""
    return function.experimental_get_compiler_ir(*args)(stage="hlo")


def host_round_trips(function, *args):
    """What in ``function``'s compiled step would run on or talk to the
    host: host-transfer HLO instructions and host callbacks, or the TF ops
    XLA refused to compile (under ``jit_compile=True`` they cannot run on
    the device at all)."""
    try:
        hlo = compiled_hlo(function, *args)
    except ValueError as error:
        if "unsupported operations" not in str(error):
            raise
        return sorted(set(re.findall(r"(\w+) \(No registered", str(error))))
    opcodes = re.findall(r"= \S+ ([a-z][a-z\-]*)\(", hlo)
    found = [op for op in opcodes if op in HOST_OPCODES]
    found += re.findall(r"is_host_transfer=true", hlo)
    found += re.findall(r'custom_call_target="([^"]*(?:[Cc]allback|[Hh]ost)[^"]*)"', hlo)
    return found


def eigen_ops(function, *args):
    """Eigendecomposition/SVD ops in ``function``'s compiled step."""
    hlo = compiled_hlo(function, *args)
    return sorted({op for op in re.findall(r'op_type="(\w+)"', hlo) if op in EIGEN_OPS})


def jitted_train_step(optimizer):
    """A tiny MLP trained one step by ``model.fit`` (which builds the
    optimizer; in graph mode, quicker to trace than to compile), and its
    ``train_step`` as a jit-compiled function with example arguments."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(3)]
    )
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=False,
    )
    x = np.random.default_rng(0).normal(size=(4, 6)).astype("float32")
    y = np.array([0, 1, 2, 0])
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)

    @tf.function(jit_compile=True)
    def step(x, y):
        return model.train_step((x, y))

    return step, (tf.constant(x), tf.constant(y))


@pytest.mark.parametrize(
    "options",
    [
        {},
        pytest.param({"fisher": "empirical"}, marks=pytest.mark.slow),
        pytest.param({"curvature": "auto"}, marks=pytest.mark.slow),
        pytest.param({"adaptive_step": True}, marks=pytest.mark.slow),
    ],
    ids=["default", "empirical", "auto", "adaptive_step"],
)
def test_compiled_step_has_no_host_round_trip(options):
    step, args = jitted_train_step(keras_kfac.KFAC(**options))
    # The step is really compiled: its HLO has the refresh's Cholesky.
    assert "cholesky(" in compiled_hlo(step, *args)
    assert host_round_trips(step, *args) == []


def test_host_round_trip_is_detected():
    # The negative control: a step that calls back into Python.
    step, args = jitted_train_step(keras_kfac.KFAC())

    @tf.function(jit_compile=True)
    def with_callback(x, y):
        logs = step.python_function(x, y)
        return tf.py_function(lambda t: t, [logs["loss"]], tf.float32)

    assert host_round_trips(with_callback, *args) == ["EagerPyFunc"]


def test_default_step_has_no_eigendecomposition():
    step, args = jitted_train_step(keras_kfac.KFAC())
    assert eigen_ops(step, *args) == []


@pytest.mark.slow
def test_eigendecomposition_is_detected():
    # The negative control: eigen damping's eigenbases.
    step, args = jitted_train_step(keras_kfac.KFAC(damping_mode="eigen"))
    assert eigen_ops(step, *args) == ["SelfAdjointEigV2"]
