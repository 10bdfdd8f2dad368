"""Convolution blocks (Conv1D/3D, grouped, depthwise, transposed, separable)
and the subclass rule, against brute force on tiny layers.

* the block's ``a``, ``g`` give each example's exact gradient:
  ``from_matrix(sum_t a_t g_t^T)`` equals the jacobian's per-example gradient;
* the K-FAC factors equal the reference (per group for grouped blocks);
* one ``model.fit`` step equals ``-lr (A + pi gamma I)^-1 V (G + gamma/pi I)^-1``
  (per group) in graph, eager and XLA modes;
* every other curvature method trains the blocks (grouped blocks: the methods
  that handle groups, and a clear error from the others).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_kfac
from keras_kfac import curvature as curvature_lib
from keras_kfac.fidelity import fitted_curvature
from keras_kfac.layers import block_class_for_layer, block_for_layer, unsupported_reason
from keras_kfac.layers.conv import ConvBlock, extract_patches, flatten_locations
from reference import (
    factored_damped,
    fisher_block,
    fisher_from_ag,
    kfac_factors,
    layer_ag,
    layer_batch,
    per_example_gradients,
    plain_kfac,
    reference_patches,
    rel,
)

L = keras.layers
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
LR, DAMPING = 0.1, 0.05

# (id, layer factory, input shape). channels_first cases avoid an output whose
# last axis equals the filter count: Keras 3.15.1's TF ``ops.add`` then takes
# the bias for channels_last and adds it along that axis.
CASES = {
    "conv1d_same_s2": (lambda: L.Conv1D(3, 3, strides=2, padding="same"), (9, 2)),
    "conv1d_causal_d2": (lambda: L.Conv1D(3, 3, dilation_rate=2, padding="causal"), (9, 2)),
    "conv1d_groups_cf": (
        lambda: L.Conv1D(4, 3, groups=2, padding="same", data_format="channels_first"),
        (4, 9),
    ),
    "conv2d_groups_s2": (lambda: L.Conv2D(4, 3, groups=2, strides=2, padding="same"), (6, 6, 4)),
    "conv3d_same_s2": (
        lambda: L.Conv3D(3, (2, 3, 2), strides=(2, 1, 2), padding="same"),
        (5, 5, 4, 2),
    ),
    "conv3d_dilated_cf": (
        lambda: L.Conv3D(3, (2, 3, 2), dilation_rate=(2, 1, 2), data_format="channels_first"),
        (2, 5, 5, 6),
    ),
    "depthwise2d_m2": (lambda: L.DepthwiseConv2D(3, depth_multiplier=2, padding="same"), (5, 5, 3)),
    "depthwise1d_s2": (lambda: L.DepthwiseConv1D(3, strides=2), (9, 3)),
    "conv2dT_same_s2": (lambda: L.Conv2DTranspose(3, 3, strides=2, padding="same"), (4, 4, 2)),
    "conv2dT_valid_s2": (lambda: L.Conv2DTranspose(3, 3, strides=2), (4, 4, 2)),
    "conv2dT_outpad": (
        lambda: L.Conv2DTranspose(3, 4, strides=3, padding="same", output_padding=1),
        (4, 4, 2),
    ),
    "conv2dT_dilated_cf": (
        lambda: L.Conv2DTranspose(
            3, 3, dilation_rate=2, padding="same", data_format="channels_first"
        ),
        (2, 4, 4),
    ),
    "conv1dT_outpad": (lambda: L.Conv1DTranspose(3, 3, strides=2, output_padding=1), (5, 2)),
    "conv3dT_same": (
        lambda: L.Conv3DTranspose(2, (2, 3, 2), strides=(2, 1, 2), padding="same"),
        (3, 3, 3, 2),
    ),
    "separable2d_s2": (
        lambda: L.SeparableConv2D(3, 3, depth_multiplier=2, strides=2, padding="same"),
        (6, 6, 2),
    ),
    "separable1d_cf": (
        lambda: L.SeparableConv1D(3, 3, dilation_rate=2, data_format="channels_first"),
        (2, 9),
    ),
}

# One of each block kind and rank for the (compiling) training steps.
STEP_CASES = [
    "conv1d_causal_d2",
    "conv3d_same_s2",
    "conv2dT_same_s2",
    "conv2d_groups_s2",
    "depthwise2d_m2",
    "separable2d_s2",
]


def make_problem(case, n=4, seed=0):
    factory, shape = CASES[case]
    keras.utils.set_random_seed(seed)
    layer = factory()
    layer.activation = keras.activations.get("tanh")
    model = keras.Sequential([keras.Input(shape), layer, L.Flatten(), L.Dense(3)])
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n,) + shape).astype("float32")
    y = rng.integers(0, 3, size=n)
    return model, layer, x, y


def split(block, flat):
    """A parameter-order vector -> the block's variable shapes."""
    parts, start = [], 0
    for v in block.variables:
        size = int(np.prod(v.shape))
        parts.append(tf.constant(flat[start : start + size].reshape(v.shape), tf.float32))
        start += size
    return parts


def flatten(parts):
    return np.concatenate([np.asarray(p, np.float64).ravel() for p in parts])


@pytest.mark.parametrize("case", list(CASES))
def test_block_gives_exact_per_example_gradients(case):
    model, layer, x, y = make_problem(case)
    block = block_for_layer(layer)
    a, g = layer_ag(model, layer, x, y, LOSS)
    assert a.shape[-1] == block.a_dim and g.shape[-1] == block.g_dim
    assert (a.ndim == 4) == (block.groups > 1)
    u = per_example_gradients(model, layer, x, y, LOSS).numpy()
    assert block.num_parameters == u.shape[1]
    for i in range(len(x)):
        v = np.einsum("t...a,t...g->...ag", a[i], g[i])
        assert rel(flatten(block.from_matrix(tf.constant(v))), u[i]) < 1e-5
        np.testing.assert_allclose(
            block.to_matrix(split(block, u[i])).numpy(), v, rtol=1e-4, atol=1e-6
        )


@pytest.mark.parametrize(
    "case", ["conv1d_causal_d2", "conv2d_groups_s2", "depthwise2d_m2", "conv2dT_valid_s2"]
)
def test_kfac_factors_match_reference(case):
    model, layer, x, y = make_problem(case)
    want_a, want_g = kfac_factors(*layer_ag(model, layer, x, y, LOSS))
    curvature = fitted_curvature("kfac", model, layer, x, y, LOSS)
    np.testing.assert_allclose(curvature.a.numpy(), want_a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(curvature.g.numpy(), want_g, rtol=1e-5, atol=1e-8)


def expected_step(a, g, v, damping_mode):
    """``-lr (damped block)^-1 vec(V)`` per group, in V's layout."""
    grouped = a.ndim == 3
    a, g, v = (np.asarray(m, np.float64) for m in (a, g, v))
    if not grouped:
        a, g, v = a[None], g[None], v[None]
    out = []
    for ak, gk, vk in zip(a, g, v):
        if damping_mode == "factored":
            damped = factored_damped(ak, gk, DAMPING)
        else:
            damped = np.kron(ak, gk) + DAMPING * np.eye(ak.shape[0] * gk.shape[0])
        out.append(-LR * np.linalg.solve(damped, vk.ravel()).reshape(vk.shape))
    out = np.stack(out)
    return out if grouped else out[0]


@pytest.mark.parametrize(
    "mode,damping_mode",
    [("graph", "factored"), ("eager", "factored"), ("xla", "factored"), ("graph", "eigen")],
)
@pytest.mark.parametrize("case", STEP_CASES)
def test_one_step_update(case, mode, damping_mode):
    model, layer, x, y = make_problem(case)
    block = block_for_layer(layer)
    want_a, want_g = kfac_factors(*layer_ag(model, layer, x, y, LOSS))
    grad = per_example_gradients(model, layer, x, y, LOSS).numpy().astype(np.float64).mean(0)
    v = block.to_matrix(split(block, grad)).numpy()
    want = flatten(
        block.from_matrix(tf.constant(expected_step(want_a, want_g, v, damping_mode), tf.float32))
    )
    opt = plain_kfac(LR, DAMPING, damping_mode=damping_mode)
    model.compile(optimizer=opt, loss=LOSS, run_eagerly=mode == "eager", jit_compile=mode == "xla")
    before = flatten(block.variables)
    model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0)
    curvature = opt.curvature_for(layer)
    np.testing.assert_allclose(curvature.a.numpy(), want_a, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(curvature.g.numpy(), want_g, rtol=1e-4, atol=1e-8)
    assert rel(flatten(block.variables) - before, want) < 2e-3


def mixed_model():
    """Every new block kind in one small model (ranks 1, 2, 3)."""
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((4, 4, 2)),
            L.Conv2DTranspose(4, 3, strides=2, padding="same", activation="tanh", name="transpose"),
            L.Conv2D(4, 3, strides=2, groups=2, activation="tanh", name="grouped"),
            L.DepthwiseConv2D(2, depth_multiplier=2, activation="tanh", name="depthwise"),
            L.SeparableConv2D(4, 1, activation="tanh", name="separable"),
            L.Reshape((4, 4)),
            L.Conv1D(4, 2, padding="causal", activation="tanh", name="conv1d"),
            L.Reshape((1, 2, 2, 4)),
            L.Conv3D(3, (1, 2, 2), activation="tanh", name="conv3d"),
            L.Flatten(),
            L.Dense(3),
        ]
    )


GROUPED = ("grouped", "depthwise")


@pytest.mark.parametrize("method", [m for m in curvature_lib.available() if m != "kfac"])
def test_every_method_trains_the_new_blocks(method):
    model = mixed_model()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 4, 4, 2)).astype("float32")
    y = rng.integers(0, 3, size=6)
    # Few iterations: this checks that the methods run on the blocks, not
    # their accuracy (test_curvature_methods.py does, on any a/g).
    few = dict(power_iters=3, lanczos_steps=3, lanczos_restarts=1, cg_max_iters=3)
    accepted = curvature_lib.get(method).option_names()
    common = dict(
        learning_rate=0.05,
        stats_every=1,
        inverse_every=1,
        fisher="empirical",
        curvature_options={k: v for k, v in few.items() if k in accepted},
    )
    curvature = method
    if not curvature_lib.get(method).supports_groups:
        opt = keras_kfac.KFAC(curvature=method, **common)
        model.compile(optimizer=opt, loss=LOSS)
        with pytest.raises(
            ValueError, match="does not handle the grouped layer 'grouped'.*Methods that do: .*kfac"
        ):
            model.fit(x, y, batch_size=6, verbose=0)
        model = mixed_model()
        curvature = dict({name: "kfac" for name in GROUPED}, default=method)
    opt = keras_kfac.KFAC(curvature=curvature, **common)
    model.compile(optimizer=opt, loss=LOSS)
    names = ["transpose", "grouped", "depthwise", "separable", "conv1d", "conv3d"]
    before = {n: flatten(block_for_layer(model.get_layer(n)).variables) for n in names}
    model.fit(x, y, batch_size=6, epochs=1, verbose=0)
    for n in names:
        assert opt.curvature_for(n) is not None
        after = flatten(block_for_layer(model.get_layer(n)).variables)
        assert np.all(np.isfinite(after)), n
        assert np.linalg.norm(after - before[n]) > 0, n


# --- subclasses ----------------------------------------------------------------


class PlainConv(L.Conv2D):
    pass


class PlainConvChild(PlainConv):
    pass


class NewCall(L.Conv2D):
    def call(self, inputs):
        return super().call(inputs) * 2.0


class NewConvolutionOp(L.Conv2D):
    def convolution_op(self, inputs, kernel):
        return super().convolution_op(inputs, kernel / tf.norm(kernel))


class PlainDense(L.Dense):
    pass


@pytest.mark.parametrize("cls", [PlainConv, PlainConvChild])
def test_subclass_keeping_call_gets_parent_block(cls):
    keras.utils.set_random_seed(0)
    layer = cls(3, 3, activation="tanh")
    model = keras.Sequential([keras.Input((5, 5, 2)), layer, L.Flatten(), L.Dense(3)])
    assert block_class_for_layer(layer) is ConvBlock
    assert unsupported_reason(layer) is None
    x = np.random.default_rng(0).normal(size=(3, 5, 5, 2)).astype("float32")
    y = np.array([0, 1, 2])
    a, g = layer_ag(model, layer, x, y, LOSS)
    u = per_example_gradients(model, layer, x, y, LOSS).numpy()
    block = block_for_layer(layer)
    for i in range(3):
        v = np.einsum("ta,tg->ag", a[i], g[i])
        assert rel(flatten(block.from_matrix(tf.constant(v))), u[i]) < 1e-5
    opt = keras_kfac.KFAC(stats_every=1, inverse_every=1)
    model.compile(optimizer=opt, loss=LOSS)
    model.fit(x, y, batch_size=3, verbose=0)
    assert opt.curvature_for(layer).name == "kfac"


def test_dense_subclass_gets_dense_block():
    layer = PlainDense(3)
    layer.build((None, 4))
    assert block_for_layer(layer).a_dim == 5


@pytest.mark.parametrize("cls,method", [(NewCall, "call"), (NewConvolutionOp, "convolution_op")])
def test_subclass_overriding_forward_falls_back(cls, method):
    keras.utils.set_random_seed(0)
    layer = cls(3, 3)
    model = keras.Sequential([keras.Input((5, 5, 2)), layer, L.Flatten(), L.Dense(3, name="head")])
    assert block_class_for_layer(layer) is None
    assert block_for_layer(layer) is None
    assert unsupported_reason(layer) == f"subclass {cls.__name__} overrides {method}"
    opt = keras_kfac.KFAC(stats_every=1, inverse_every=1)
    model.compile(optimizer=opt, loss=LOSS)
    x = np.random.default_rng(0).normal(size=(3, 5, 5, 2)).astype("float32")
    model.fit(x, np.array([0, 1, 2]), batch_size=3, verbose=0)
    assert opt.curvature_for("head").name == "kfac"
    with pytest.raises(ValueError, match="has no curvature block"):
        opt.curvature_for(layer)


@pytest.mark.parametrize("case", ["conv2dT_valid_s2", "depthwise1d_s2"])
def test_exact_block_is_in_the_order_of_the_curvature_matrices(case):
    """For blocks whose ``V`` permutes the parameters, the exact Fisher of
    keras_kfac.fidelity (from the jacobian) is laid out like the curvature
    matrices, ``vec(V)``: it equals the block built from the captured a, g."""
    model, layer, x, y = make_problem(case, n=4)
    exact = fisher_block(model, layer, x, y, LOSS).numpy()
    a, g = layer_ag(model, layer, x, y, LOSS)
    assert rel(exact, fisher_from_ag(a, g)) < 1e-5


def block_diag(blocks):
    p = blocks[0].shape[0]
    out = np.zeros((len(blocks) * p, len(blocks) * p))
    for k, b in enumerate(blocks):
        out[k * p : (k + 1) * p, k * p : (k + 1) * p] = b
    return out


@pytest.mark.parametrize("case", ["conv2d_groups_s2", "depthwise2d_m2"])
def test_grouped_methods_match_brute_force(case):
    """Grouped blocks treat the groups as separate blocks (as K-FAC treats
    layers): each method that handles groups is, on each diagonal block
    ``F_kk`` of the exact Fisher, what it is for one matrix."""
    model, layer, x, y = make_problem(case, n=5)
    block = block_for_layer(layer)
    exact = fisher_block(model, layer, x, y, LOSS).numpy().astype(np.float64)
    p = block.a_dim * block.g_dim
    diagonal_blocks = [exact[k * p : (k + 1) * p, k * p : (k + 1) * p] for k in range(block.groups)]
    f = block_diag(diagonal_blocks)
    a, g = layer_ag(model, layer, x, y, LOSS)
    factors_a, factors_g = kfac_factors(a.astype(np.float64), g.astype(np.float64))

    got = fitted_curvature("diagonal", model, layer, x, y, LOSS).matrix().numpy()
    assert rel(got, np.diag(np.diag(f))) < 1e-5
    ekfac = []
    for fk, ak, gk in zip(diagonal_blocks, factors_a, factors_g):
        q = np.kron(np.linalg.eigh(ak)[1], np.linalg.eigh(gk)[1])
        ekfac.append(q @ np.diag(np.diag(q.T @ fk @ q)) @ q.T)
    got = fitted_curvature("ekfac", model, layer, x, y, LOSS).matrix().numpy()
    assert rel(got, block_diag(ekfac)) < 1e-3

    v = np.random.default_rng(1).normal(size=(block.groups, block.a_dim, block.g_dim))
    batch = layer_batch(model, layer, x, y, LOSS)
    tengrad = curvature_lib.get("tengrad")(block).precondition(
        tf.constant(v, tf.float32), DAMPING, batch
    )
    want = np.linalg.solve(f + DAMPING * np.eye(len(f)), v.ravel())
    assert rel(tengrad.numpy().ravel(), want) < 1e-3
    cgfac = curvature_lib.get("cgfac")(block, cg_max_iters=200, cg_tol=1e-7)
    cgfac.build(lambda name, shape, initializer="zeros": tf.Variable(tf.zeros(shape)))
    got = cgfac.precondition(tf.constant(v, tf.float32), DAMPING, batch).numpy().ravel()
    kfac = block_diag([np.kron(ak, gk) for ak, gk in zip(factors_a, factors_g)])
    assert rel(got, np.linalg.solve(kfac + DAMPING * np.eye(len(f)), v.ravel())) < 1e-3


@pytest.mark.parametrize(
    "kernel, strides, dilation, padding",
    [
        ((3, 3), (1, 1), (1, 1), "valid"),
        ((2, 3), (2, 1), (1, 1), "valid"),
        ((3, 2), (1, 2), (2, 1), "same"),
        ((3, 3), (2, 2), (1, 1), "same"),
        ((1, 1), (1, 1), (1, 1), "valid"),
    ],
)
def test_patches_match_the_loop_reference_with_a_dynamic_batch(kernel, strides, dilation, padding):
    """extract_patches (strided slices per kernel offset) against the explicit
    loop, traced with an unknown batch size and, once, unknown spatial sizes."""
    x = np.random.default_rng(0).normal(size=(3, 8, 7, 2)).astype("float32")
    expected = reference_patches(x, *kernel, strides, dilation, padding)
    for spec in ((None, 8, 7, 2), (None, None, None, 2)):

        @tf.function(input_signature=[tf.TensorSpec(spec, tf.float32)])
        def patches(x):
            return flatten_locations(extract_patches(x, kernel, strides, dilation, padding))

        np.testing.assert_array_equal(patches(x).numpy(), expected.astype("float32"))
