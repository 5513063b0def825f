"""Tests written against mutants that survived ``make mutation`` (CPU, fake arrays).

Each test pins down a behaviour the rest of the suite left open: an error
message that names the wrong argument, a dtype that must stay int64, a branch
no test reached (bfloat16 arrays that publish only a typestr, the erf fallback
without SciPy), NumPy warnings the references promise not to raise. Expected
values are written out here, not computed by the code under test.
docs/testing.md lists the mutants that remain, with the reason each one is
equivalent.
"""

from __future__ import annotations

import math
import sys
import types
import warnings

import ml_dtypes
import numpy as np
import pytest

import cublas_grouped as cg
from cublas_grouped import testing as ref
from cublas_grouped.gemm.config import Algorithm, ComputePrecision, GroupedGemmConfig, coerce_enum
from cublas_grouped.gemm.plan import check_group_sizes, host_group_sizes, plan_gmm
from cublas_grouped.moe.checks import check_layer_args, check_routing
from cublas_grouped.runtime import arrays as _arrays
from cublas_grouped.runtime.arrays import BFLOAT16, view


class GpuWorkStarted(Exception):
    pass


class _NoGpuCupy(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise GpuWorkStarted(name)


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", _NoGpuCupy("cupy"))


class ForeignArray:
    """A GPU array from another library: ``dtype`` is not a NumPy dtype (torch,
    JAX), so only the interface's typestr and descr say what it holds."""

    def __init__(self, shape, typestr, descr=None, device=None, ptr=0x7F0000000000):
        self.shape = shape
        self.dtype = "foreign." + typestr
        self._cai = {"shape": shape, "typestr": typestr, "data": (ptr, False), "version": 3}
        if descr is not None:
            self._cai["descr"] = descr
        if device is not None:
            self.device = device

    @property
    def __cuda_array_interface__(self):
        return self._cai


# --------------------------------------------------------------------------- array views


@pytest.mark.parametrize(
    "typestr, descr, expected",
    [
        ("<V2", [("bfloat16", "<V2")], BFLOAT16),  # a descr naming bfloat16
        ("<V2", [("", "<V2")], BFLOAT16),  # ml_dtypes / CuPy: an unnamed 2-byte void
        ("|V2", [("bf16", "|V2")], BFLOAT16),
        ("<V2", None, BFLOAT16),  # no descr at all
        ("<V2", ["bfloat16"], BFLOAT16),  # descr entries as bare strings
        ("<V2", [("my_pair", "<V2")], np.dtype("V2")),  # another 2-byte type: not bfloat16
        ("<V2", ["my_pair"], np.dtype("V2")),
        ("<f4", None, np.dtype(np.float32)),
        ("<f2", [("", "<f2")], np.dtype(np.float16)),
        ("<i4", None, np.dtype(np.int32)),
        ("<V4", [("", "<V4")], np.dtype("V4")),
    ],
)
def test_dtype_from_the_interface_alone(typestr, descr, expected):
    v = view(ForeignArray((3, 4), typestr, descr), "a")
    assert v.dtype == expected
    assert v.shape == (3, 4) and v.strides == (4, 1)


def test_view_of_an_object_without_a_dtype_attribute():
    class Bare:  # only the interface (e.g. a Numba device array wrapper)
        __cuda_array_interface__ = {"shape": (2, 3), "typestr": "<f2", "data": (0x1000, False), "version": 3}

    v = view(Bare(), "a")
    assert v.dtype == np.float16 and v.shape == (2, 3) and v.strides == (3, 1) and v.device is None


def test_bfloat16_from_the_interface_runs_the_checks(fake):
    # A foreign bfloat16 array passes gmm's argument checks like a CuPy one.
    a = ForeignArray((4, 8), "<V2", [("", "<V2")])
    b = ForeignArray((2, 8, 16), "<V2", [("bfloat16", "<V2")])
    plan = plan_gmm(view(a, "a"), view(b, "b"), np.array([1, 3]), trans_a=False, trans_b=False)
    assert plan.offsets.tolist() == [0, 1, 4]
    with pytest.raises(TypeError, match="a and b must have the same dtype"):
        plan_gmm(view(a, "a"), view(fake((2, 8, 16)), "b"), np.array([1, 3]), trans_a=False, trans_b=False)


def test_own_dtype_wins_over_the_typestr(fake):
    # A 2-byte structured array publishes "|V2" without a descr here; its own
    # dtype says what it is, so it is never taken for bfloat16.
    pair = np.dtype([("hi", "u1"), ("lo", "u1")])
    v = view(fake((4, 8), pair), "a")
    assert v.dtype == pair
    with pytest.raises(TypeError, match=r"^a has dtype \[\('hi', 'u1'\), \('lo', 'u1'\)\]; supported"):
        _arrays.cuda_dtype(v.dtype, "a")


def test_device_from_id_or_index():
    torch_like = types.SimpleNamespace(index=3)  # torch.device has .index
    cupy_like = types.SimpleNamespace(id=2)
    assert view(ForeignArray((2,), "<f4", device=torch_like), "a").device == 3
    assert view(ForeignArray((2,), "<f4", device=cupy_like), "a").device == 2
    assert view(ForeignArray((2,), "<f4", device=types.SimpleNamespace(index=None)), "a").device is None
    assert view(ForeignArray((2,), "<f4"), "a").device is None


def test_view_keeps_the_object_and_a_null_pointer(fake):
    arr = fake((0, 8), ptr=0)
    v = view(arr, "a")
    assert v.obj is arr
    assert v.ptr == 0  # empty arrays may publish a null pointer: still aligned
    assert view(ForeignArray((0, 8), "<f4", ptr=None), "a").ptr == 0
    assert view(v, "a") is v


def test_view_uses_the_interface_before_dlpack(fake, no_gpu):
    class Both(type(fake((1,)))):
        def __dlpack__(self, stream=None):
            raise GpuWorkStarted("dlpack")

    v = view(Both((4, 8)), "a")  # CuPy arrays have both: the interface is read directly
    assert v.shape == (4, 8)


def test_view_imports_dlpack_only_arrays_through_cupy(fake, monkeypatch):
    converted = fake((5, 3), np.float16)
    calls = []

    def from_dlpack(obj, name):
        calls.append((obj, name))
        return converted

    class DlpackOnly:
        def __dlpack__(self, stream=None):
            raise AssertionError("_from_dlpack does the import")

    monkeypatch.setattr(_arrays, "_from_dlpack", from_dlpack)
    src = DlpackOnly()
    v = view(src, "weights")
    assert calls == [(src, "weights")]
    assert v.shape == (5, 3) and v.dtype == np.float16 and v.obj is converted


def test_view_error_names_the_argument_and_its_type():
    with pytest.raises(TypeError, match=r"^x must be a GPU array exposing .* got list$"):
        view([1.0], "x")
    with pytest.raises(
        TypeError,
        match=r"^w1 is a NumPy array in host memory; pass a GPU array \(e\.g\. cupy\.asarray\(w1\)\)$",
    ):
        view(np.zeros(3), "w1")


# --------------------------------------------------------------------------- config


def test_config_bounds_both_sides():
    assert GroupedGemmConfig(workspace_mb=0).workspace_mb == 0
    with pytest.raises(ValueError, match=r"^workspace_mb must be a non-negative int; got -1$"):
        GroupedGemmConfig(workspace_mb=-1)
    with pytest.raises(ValueError, match="workspace_mb must be a non-negative int; got 1.5"):
        GroupedGemmConfig(workspace_mb=1.5)
    assert GroupedGemmConfig(chunk_rows=1).chunk_rows == 1
    assert GroupedGemmConfig(chunk_rows=None).chunk_rows is None
    for bad in (0, -3, 16.0, "16"):
        with pytest.raises(ValueError, match=rf"^chunk_rows must be a positive int or None; got {bad!r}$"):
            GroupedGemmConfig(chunk_rows=bad)


def test_config_precision_and_tensor_cores():
    for precision in ("fp32", "tf32", "fp16", "bf16"):
        config = GroupedGemmConfig(compute_precision=precision, use_tensor_cores=True)
        assert config.compute_precision is ComputePrecision(precision)
    assert not GroupedGemmConfig(use_tensor_cores=False).use_tensor_cores
    for precision in ("tf32", "fp16", "bf16"):
        with pytest.raises(
            ValueError, match=rf"^compute_precision={precision.upper()} needs use_tensor_cores=True$"
        ):
            GroupedGemmConfig(compute_precision=precision, use_tensor_cores=False)
    with pytest.raises(
        ValueError, match=r"^compute_precision must be one of FP32, TF32, FP16, BF16; got 'fp64'$"
    ):
        GroupedGemmConfig(compute_precision="fp64")


def test_config_coerce_messages():
    with pytest.raises(TypeError, match=r"^config must be a GroupedGemmConfig, a dict or None; got list$"):
        GroupedGemmConfig.coerce([])
    config = GroupedGemmConfig(chunk_rows=64)
    assert GroupedGemmConfig.coerce(config) is config
    assert GroupedGemmConfig.coerce(None) == GroupedGemmConfig()


def test_enum_values_are_their_lower_case_names():
    # coerce_enum tries the value (lower-cased), then the name (upper-cased):
    # with this property the two paths accept the same strings (docs/testing.md
    # counts mutants of either path as equivalent because of it).
    for kind in (Algorithm, ComputePrecision):
        for member in kind:
            assert member.value == member.name.lower()


def test_coerce_enum_accepts_values_and_names_in_any_case():
    for text in ("chunked_batched", "CHUNKED_BATCHED", "Chunked_Batched"):
        assert coerce_enum(Algorithm, text, "algorithm") is Algorithm.CHUNKED_BATCHED
    assert coerce_enum(ComputePrecision, ComputePrecision.TF32, "compute") is ComputePrecision.TF32
    with pytest.raises(ValueError, match=r"^compute must be one of FP32, TF32, FP16, BF16; got 3$"):
        coerce_enum(ComputePrecision, 3, "compute")


# --------------------------------------------------------------------------- planning


def test_host_group_sizes_types():
    sizes = host_group_sizes([1, 2], 2)
    assert sizes.dtype == np.int64 and sizes.tolist() == [1, 2]
    assert host_group_sizes(np.array([3, 0], dtype=np.uint8), 2).dtype == np.int64
    empty = host_group_sizes([], 0)  # no groups: an empty list is fine
    assert empty.dtype == np.int64 and empty.shape == (0,)
    with pytest.raises(TypeError, match=r"^group_sizes must hold integers; got dtype float64$"):
        host_group_sizes([2.0], 1)
    with pytest.raises(TypeError, match=r"^group_sizes must hold integers; got dtype object$"):
        host_group_sizes([1, None], 2)
    with pytest.raises(TypeError, match=r"^group_sizes must be a sequence of integers: "):
        host_group_sizes([[1], [2, 3]], 2)


def test_check_group_sizes_names_the_first_negative_group():
    with pytest.raises(ValueError, match=r"^group_sizes must be non-negative; group_sizes\[2\] = -2$"):
        check_group_sizes(np.array([0, 3, -2, -1]), 4)
    with pytest.raises(ValueError, match=r"^group_sizes has 3 entries but b has 2 groups$"):
        check_group_sizes(np.array([0, 3, 1]), 2)
    assert check_group_sizes(np.array([0, 0]), 2, 0).tolist() == [0, 0]


def test_plan_messages_and_dtypes(fake):
    a = view(fake((6, 8)), "a")
    with pytest.raises(
        ValueError, match=r"^trans_a and trans_b cannot both be set: with trans_a, b holds rows \[M, N\]$"
    ):
        plan_gmm(a, view(fake((6, 4)), "b"), None, trans_a=True, trans_b=True, num_experts=2)
    with pytest.raises(ValueError, match=r"^b must be 2-D; got shape \(6, 4, 1\)$"):
        plan_gmm(a, view(fake((6, 4, 1)), "b"), None, trans_a=True, trans_b=False, num_experts=2)
    with pytest.raises(ValueError, match=r"^b must be C-contiguous"):
        plan_gmm(
            a, view(fake((6, 4), strides=(4, 24)), "b"), None, trans_a=True, trans_b=False, num_experts=2
        )
    with pytest.raises(ValueError, match=r"^with trans_a the number of groups comes from group_sizes$"):
        plan_gmm(a, view(fake((6, 4)), "b"), None, trans_a=True, trans_b=False)
    # Sizes not known yet: all zero, int64, one per group of b.
    plan = plan_gmm(a, view(fake((3, 8, 4)), "b"), None, trans_a=False, trans_b=False)
    assert plan.sizes.dtype == np.int64 and plan.sizes.tolist() == [0, 0, 0]
    assert plan.offsets.dtype == np.int64 and plan.offsets.tolist() == [0, 0, 0, 0]
    sizes = np.array([2, 0, 4])
    plan = plan_gmm(a, view(fake((3, 8, 4)), "b"), sizes, trans_a=False, trans_b=False)
    assert plan.sizes is sizes and plan.offsets.dtype == np.int64 and plan.active.tolist() == [0, 2]


# --------------------------------------------------------------------------- the layer's checks

E3, H12, I5 = 3, 12, 5  # all different, so a swapped dimension shows


def _args(fake, **changes):
    args = {
        "x_v": view(fake((4, H12)), "x"),
        "topk_ids": fake((4, 2), np.int32),
        "topk_weights": None,
        "w1": fake((E3, H12, 2 * I5)),
        "w2": fake((E3, I5, H12)),
        "b1": None,
        "b2": None,
        "activation": "silu",
        "gated": True,
        "trans_b": False,
    }
    args.update(changes)
    return args


def layer_sizes(**args) -> tuple[int, int, int, int]:
    """(E, H, I, width) of the LayerShape that check_layer_args returns."""
    shape = check_layer_args(**args)
    return shape.num_experts, shape.hidden, shape.inter, shape.width


def test_layer_dimensions_in_both_layouts(fake):
    assert layer_sizes(**_args(fake)) == (E3, H12, I5, 2 * I5)
    linear = _args(fake, w1=fake((E3, 2 * I5, H12)), w2=fake((E3, H12, I5)), trans_b=True)
    assert layer_sizes(**linear) == (E3, H12, I5, 2 * I5)
    # Without x, H comes from w1 ([E, H, 2I], or [E, 2I, H] with trans_b).
    assert layer_sizes(**{**_args(fake), "x_v": None}) == (E3, H12, I5, 2 * I5)
    assert layer_sizes(**{**linear, "x_v": None}) == (E3, H12, I5, 2 * I5)
    # trans_b applies to w2 as well: w2 in the other layout is refused.
    with pytest.raises(ValueError, match=r"^w2 has K=12 but its input has 5 columns$"):
        check_layer_args(**{**linear, "w2": fake((E3, I5, H12))})
    with pytest.raises(ValueError, match=r"^w2 has 4 experts; expected 3$"):
        check_layer_args(**{**linear, "w2": fake((4, H12, I5))})


def test_layer_messages_name_the_argument(fake):
    cases = [
        ({"w1": np.zeros((E3, H12, 2 * I5), np.float32)}, TypeError, r"^w1 is a NumPy array in host memory"),
        ({"x_v": None, "w1": np.zeros((E3, H12, 2 * I5), np.float32)}, TypeError, r"^w1 is a NumPy array"),
        ({"w2": np.zeros((E3, I5, H12), np.float32)}, TypeError, r"^w2 is a NumPy array in host memory"),
        ({"topk_ids": np.zeros((4, 2), np.int32)}, TypeError, r"^topk_ids is a NumPy array in host memory"),
        ({"topk_weights": np.zeros((4, 2), np.float32)}, TypeError, r"^topk_weights is a NumPy array"),
        ({"b1": np.zeros((E3, 2 * I5), np.float32)}, TypeError, r"^b1 is a NumPy array in host memory"),
        ({"b2": np.zeros((E3, H12), np.float32)}, TypeError, r"^b2 is a NumPy array in host memory"),
        ({"w1": fake((E3, H12, 2 * I5), strides=(480, 4, 48))}, ValueError, r"^w1 must be C-contiguous$"),
        ({"w2": fake((E3, I5, H12), strides=(240, 4, 20))}, ValueError, r"^w2 must be C-contiguous$"),
        (
            {"b1": fake((E3, 2 * I5), strides=(4, 12))},
            ValueError,
            r"^b1 must be a C-contiguous float32 array of shape \(3, 10\); got float32 \(3, 10\)$",
        ),
        (
            {"topk_weights": fake((4, 2), np.float32, strides=(4, 16))},
            ValueError,
            r"^topk_weights must be C-contiguous$",
        ),
    ]
    for change, error, match in cases:
        with pytest.raises(error, match=match):
            check_layer_args(**_args(fake, **change))
    # Contiguous biases of the right shape are accepted.
    assert check_layer_args(**_args(fake, b1=fake((E3, 2 * I5)), b2=fake((E3, H12)))).num_experts == E3


def test_route_default_scoring_and_messages(fake, no_gpu):
    with pytest.raises(GpuWorkStarted):
        cg.route(fake((4, 8)), 2)  # the default scoring is a valid one
    with pytest.raises(TypeError, match=r"^router_logits is a NumPy array in host memory"):
        cg.route(np.zeros((4, 8), np.float32), 2)
    with pytest.raises(ValueError, match=r"^router_logits must be C-contiguous$"):
        cg.route(fake((4, 8), strides=(4, 16)), 2)
    with pytest.raises(ValueError, match=r"^scoring must be one of \['sigmoid', 'softmax'\]; got 'SOFTMAX'$"):
        cg.route(fake((4, 8)), 2, scoring="SOFTMAX")


# --------------------------------------------------------------------------- references


def test_references_compute_in_float64_whatever_the_input_dtype():
    rng = np.random.default_rng(0)
    # K = 256: a bfloat16 (float32-accumulated) product would differ from the
    # float64 one in the 7th digit.
    a = rng.normal(size=(6, 256)).astype(ml_dtypes.bfloat16)
    b = rng.normal(size=(2, 256, 3)).astype(ml_dtypes.bfloat16)
    out = ref.gmm_ref(a, b, [2, 4])
    assert out.dtype == np.float64
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    np.testing.assert_allclose(out, np.concatenate([a64[:2] @ b64[0], a64[2:] @ b64[1]]), rtol=1e-14)
    # int64 inputs: 2**40 * 2**40 overflows in integer arithmetic.
    assert ref.gmm_ref(np.array([[2**40]]), np.array([[[2**40]]]), [1]).tolist() == [[2.0**80]]
    # Integer inputs: products must not be integer arithmetic.
    ints = ref.activation_ref(np.array([[1, 2]]), 1, True, "silu")
    assert ints.dtype == np.float64 and ints[0, 0] == pytest.approx(2.0 / (1.0 + math.exp(-1.0)), rel=1e-15)
    logits = np.array([[1, 2, 3]], dtype=np.int32)
    w, _ = ref.route_ref(logits, 3, renormalize=False)
    assert w.dtype == np.float64 and w.sum() == pytest.approx(1.0, rel=1e-15)


def test_references_flatten_index_arrays():
    x = np.arange(12.0).reshape(4, 3)
    r2p = np.array([[3], [-1], [0]])  # a column: flattened like [3, -1, 0]
    assert ref.gather_ref(x, r2p, 1).tolist() == [x[3].tolist(), [0.0] * 3, x[0].tolist()]
    assert ref.scatter_ref(x, np.array([[2, -1]])).tolist() == [x[2].tolist(), [0.0] * 3]
    out = ref.activation_ref(
        np.array([[1.0], [2.0]]), 1, False, "relu", bias=np.array([[10.0]]), row_expert=np.array([[0], [-1]])
    )
    assert out.tolist() == [[11.0], [0.0]]
    assert ref.gmm_ref(x, np.ones((2, 3, 1)), np.array([[1], [3]])).tolist() == [
        [3.0],
        [12.0],
        [21.0],
        [30.0],
    ]
    # Weights given flat (T*k) are read as [T, k].
    ids = np.array([[0], [0]])
    flat = ref.moe_forward_ref(
        np.ones((2, 2)),
        ids,
        np.array([2.0, 3.0]),
        np.ones((1, 2, 1)),
        np.ones((1, 1, 2)),
        gated=False,
        activation="relu",
    )
    assert flat.tolist() == [[4.0, 4.0], [6.0, 6.0]]


def test_references_raise_no_numpy_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ref.route_ref(np.array([[-800.0, 800.0, 0.0]]), 2, scoring="sigmoid")  # exp(800)
        ref.route_ref(np.array([[np.inf, 0.0], [np.nan, 1.0]]), 1)  # inf - inf in the softmax
        ref.activation_ref(np.array([[-800.0, 1.0]]), 2, False, "silu")
        assert ref.rel_error([np.inf], [np.inf]) == math.inf  # inf - inf
        assert ref.rel_error([1e308], [-1e308]) == math.inf  # the difference overflows


def test_route_ref_defaults_and_per_row_shift():
    logits = np.array(
        [[0.0, math.log(3.0)], [-900.0, -900.0 + math.log(3.0)], [900.0, 900.0 + math.log(3.0)]]
    )
    w, ids = ref.route_ref(logits, 1)  # softmax, renormalized: the single weight is 1
    assert w.tolist() == [[1.0], [1.0], [1.0]] and ids.tolist() == [[1], [1], [1]]
    w, _ = ref.route_ref(logits, 2, renormalize=False)
    # Each row shifted by its own maximum: the same 3/4, 1/4 in every row.
    np.testing.assert_allclose(w, [[0.75, 0.25]] * 3, rtol=1e-12)


def test_reference_messages():
    checks = [
        (lambda: ref.route_ref(np.zeros(3), 1), r"^logits must be 2-D \[T, E\], got shape \(3,\)$"),
        (lambda: ref.route_ref(np.zeros((2, 3)), 4), r"^top_k must be in \[1, 3\], got 4$"),
        (
            lambda: ref.route_ref(np.zeros((2, 3)), 1, "tanh"),
            r"^scoring must be 'softmax' or 'sigmoid', got 'tanh'$",
        ),
        (lambda: ref.plan_ref(np.array([[0, 3]]), 3), r"^expert ids must be in \[0, 3\)$"),
        (lambda: ref.plan_ref(np.array([[-1, 0]]), 3), r"^expert ids must be in \[0, 3\)$"),
        (lambda: ref.plan_ref(np.array([[0]]), 3, align=0), r"^align must be >= 1, got 0$"),
        (
            lambda: ref.combine_ref(np.zeros((2, 1)), [0, 1], None, np.zeros(2)),
            r"^topk_ids must be 2-D \[T, k\], got shape \(2,\)$",
        ),
        (
            lambda: ref.activation_ref(np.zeros((2, 3)), 2, False, "relu"),
            r"^h must be \[R, 2\], got shape \(2, 3\)$",
        ),
        (lambda: ref.activation_ref(np.zeros(4), 2, True, "relu"), r"^h must be \[R, 4\], got shape \(4,\)$"),
        (
            lambda: ref.activation_ref(np.zeros((1, 2)), 2, False, "relu", bias=np.zeros((1, 2))),
            r"^a bias needs row_expert \(the expert of each row\)$",
        ),
        (lambda: ref.activation_ref(np.zeros((1, 2)), 2, False, 3), r"^unknown activation code 3$"),
        (lambda: ref.activation_ref(np.zeros((1, 2)), 2, False, -1), r"^unknown activation code -1$"),
        (
            lambda: ref.activation_ref(np.zeros((1, 2)), 2, False, "tanh"),
            r"^unknown activation 'tanh'; expected one of \('silu', 'gelu', 'relu'\) or 0/1/2$",
        ),
        (
            lambda: ref.gmm_ref(np.zeros((3, 2)), np.zeros((2, 2, 1)), [-1, 4]),
            r"^group sizes must be non-negative$",
        ),
        (lambda: ref.gmm_ref(np.zeros(3), np.zeros((1, 2, 1)), [1]), r"^a must be 2-D, got shape \(3,\)$"),
        (
            lambda: ref.gmm_ref(np.zeros((3, 2)), np.zeros((2, 2, 1)), [2, 2]),
            r"^group sizes sum to 4 > 3 rows$",
        ),
        (
            lambda: ref.gmm_ref(np.zeros((3, 2)), np.zeros((3, 1)), [1, 2], trans_a=True, trans_b=True),
            r"^trans_a and trans_b together are not supported$",
        ),
        (
            lambda: ref.gmm_ref(np.zeros((3, 2)), np.zeros((4, 1)), [1, 2], trans_a=True),
            r"^with trans_a, b must be \[M, N\] with M = 3$",
        ),
        (
            lambda: ref.gmm_ref(np.zeros((3, 2)), np.zeros((3, 1, 1)), [1, 2], trans_a=True),
            r"^with trans_a, b must be \[M, N\] with M = 3$",
        ),
        (
            lambda: ref.gmm_ref(np.zeros((3, 2)), np.zeros((3, 2, 1)), [1, 2]),
            r"^b must be \[E, K, N\] with E = 2, got shape \(3, 2, 1\)$",
        ),
        (
            lambda: ref.gmm_ref(np.zeros((3, 2)), np.zeros((2, 5, 1)), [1, 2]),
            r"^inner dimensions differ: a has K = 2, b has 5$",
        ),
        (
            lambda: ref.moe_forward_ref(
                np.zeros((1, 2)), [[0]], None, np.zeros((1, 2, 3)), np.zeros((1, 2, 2))
            ),
            r"^w1 has 3 columns, expected 4$",
        ),
        (
            lambda: ref.moe_forward_ref(
                np.zeros((1, 2)), [[0]], None, np.zeros((1, 2, 3)), np.zeros((1, 2, 2)), gated=False
            ),
            r"^w1 has 3 columns, expected 2$",
        ),
        (
            lambda: ref.moe_forward_ref(
                np.zeros((1, 2)), [[1]], None, np.zeros((1, 2, 4)), np.zeros((1, 2, 2))
            ),
            r"^expert ids must be in \[0, 1\)$",
        ),
        (
            lambda: ref.moe_forward_ref(
                np.zeros((1, 2)), [[-1]], None, np.zeros((1, 2, 4)), np.zeros((1, 2, 2))
            ),
            r"^expert ids must be in \[0, 1\)$",
        ),
        (lambda: ref.rel_error([1.0], [1.0, 2.0]), r"^shapes differ: \(1,\) vs \(2,\)$"),
    ]
    for call, match in checks:
        with pytest.raises(ValueError, match=match):
            call()


def test_gelu_without_scipy_uses_math_erf(monkeypatch):
    z = np.array([[-3.0, -0.5, 0.0, 0.7, 2.0]])
    with_scipy = ref.activation_ref(z, 5, False, "gelu")
    monkeypatch.setitem(sys.modules, "scipy.special", None)  # import fails
    without = ref.activation_ref(z, 5, False, "gelu")
    expected = [0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))) for v in z[0]]
    np.testing.assert_allclose(without[0], expected, rtol=1e-15)
    np.testing.assert_allclose(with_scipy, without, rtol=1e-14)
    empty = ref.activation_ref(np.zeros((0, 4)), 2, True, "gelu")  # no rows at all
    assert empty.shape == (0, 2) and empty.dtype == np.float64


# --------------------------------------------------------------------------- the other checks


def test_check_routing_returns_none_without_weights(fake):
    ids_v, w_v = check_routing(fake((4, 2), np.int32), None, 4)
    assert ids_v.shape == (4, 2) and w_v is None


def test_expert_output_and_counter_messages_are_exact(fake):
    from cublas_grouped.moe.dispatch import check_expert_outputs
    from cublas_grouped.moe.fixed_capacity import check_fixed_capacity_args

    inp = cg.DispatchPlan(
        rows=fake((12, 16)),
        pair_to_row=fake((12,), np.int32),
        row_to_pair=fake((12,), np.int32),
        topk_ids=fake((6, 2), np.int32),
        topk_weights=None,
        tokens_per_expert=fake((4,), np.int32),
        expert_offsets=fake((5,), np.int32),
        counts_host=np.array([3, 3, 3, 3]),
        algorithm=Algorithm.CUBLAS_GROUPED,
        layout=cg.RowLayout(),
        num_tokens=6,
        top_k=2,
        num_experts=4,
        stream=0,
    )
    with pytest.raises(ValueError, match=r"^expert_outputs must be C-contiguous$"):
        check_expert_outputs(fake((12, 16), strides=(4, 48)), inp)
    with pytest.raises(TypeError, match=r"^dropped_pairs is a NumPy array in host memory"):
        check_fixed_capacity_args(4, np.zeros(1, np.uint64))


# --------------------------------------------------------------------------- selection and tuning tables

DEV = cg.DeviceInfo(sm=(9, 0), cublas_version=130100, name="NVIDIA H100 80GB HBM3")


@pytest.fixture
def tuning_dirs(tmp_path, monkeypatch):
    """Empty user and shipped tuning folders, no cached tables."""
    from cublas_grouped.gemm import select as _select
    from cublas_grouped.gemm import tables as _tables

    user, shipped = tmp_path / "user", tmp_path / "shipped"
    user.mkdir()
    shipped.mkdir()
    monkeypatch.setenv("CUBLAS_GROUPED_TUNING_DIR", str(user))
    monkeypatch.setattr(_tables, "SHIPPED_TUNING_DIR", shipped)
    monkeypatch.setattr(_tables, "_cache", {})
    monkeypatch.setattr(_select, "_layer_choices", {})
    return user, shipped


def _entry(**changes):
    entry = {
        "dtype": "bfloat16",
        "num_experts": 128,
        "active_experts": 128,
        "mean_rows": 255,
        "n": 1024,
        "k": 2048,
        "times_ms": {"cublas_grouped": 1.0, "sequential": 2.0, "chunked_batched": 3.0},
    }
    entry.update(changes)
    return entry


def _table_file(folder, name, gpu, version, entries=None, sm=(9, 0)):
    import json

    doc = {"gpu": gpu, "cublas_version": version, "sm": list(sm), "entries": entries or [_entry()]}
    (folder / name).write_text(json.dumps(doc))
    return folder / name


def test_problem_stats_from_sizes():
    from cublas_grouped import ProblemStats

    stats = ProblemStats.from_sizes(np.array([0, 5, 0, 9]), 64, 32, "float16")
    assert stats == ProblemStats(4, 2, 14, 9, 64, 32, "float16")
    none = ProblemStats.from_sizes(np.zeros(0, dtype=np.int64), 64, 32, "float32")  # no groups at all
    assert (none.num_experts, none.active_experts, none.max_rows) == (0, 0, 0)
    zeros = ProblemStats.from_sizes(np.zeros(3, dtype=np.int64), 64, 32, "float32")
    assert (zeros.active_experts, zeros.total_rows, zeros.max_rows, zeros.dtype) == (0, 0, 0, "float32")


def test_table_features_use_active_experts_and_rows_plus_one():
    from cublas_grouped import ProblemStats, TuningTable

    # Active experts 2 vs 1 is one log2 step; N and K twice: 1 + 1 + 1 = 3 > 2.
    table = TuningTable("t", 130100, [_entry(num_experts=8, active_experts=2, mean_rows=100)])
    assert table.nearest(ProblemStats(8, 1, 100, 100, 2048, 4096)) is None
    assert table.nearest(ProblemStats(8, 2, 200, 100, 2048, 4096)) is not None
    # One row per expert: log2(1 + 1) = 1 is a finite feature (log2(0) is not).
    one = TuningTable("t", 130100, [_entry(mean_rows=1)])
    assert one.nearest(ProblemStats(128, 128, 128, 1, 1024, 2048)) is not None
    # Rows 0 -> 1 per expert is one log2 step of (rows + 1); with N 2**1.095
    # times larger (1.2 squared) the sum 2.2 is past the limit.
    empty = TuningTable("t", 130100, [_entry(mean_rows=0)])
    assert empty.nearest(ProblemStats(128, 128, 128, 1, 2188, 2048)) is None
    assert empty.nearest(ProblemStats(128, 128, 128, 1, 1024, 2048)) is not None


def test_table_entries_keep_their_skew():
    from cublas_grouped import Algorithm, ProblemStats, TuningTable

    even = _entry(max_rows=255, times_ms={"cublas_grouped": 1.0, "sequential": 9.0})
    skewed = _entry(max_rows=4 * 255, times_ms={"cublas_grouped": 9.0, "sequential": 1.0})
    table = TuningTable("t", 130100, [even, skewed])
    got = table.nearest(ProblemStats(128, 128, 128 * 255, 4 * 255, 1024, 2048))
    assert min(got, key=got.get) is Algorithm.SEQUENTIAL
    got = table.nearest(ProblemStats(128, 128, 128 * 255, 255, 1024, 2048))
    assert min(got, key=got.get) is Algorithm.CUBLAS_GROUPED
    # Without max_rows an entry counts as an even load.
    old = TuningTable(
        "t", 130100, [_entry(max_rows=4 * 255), _entry(mean_rows=254.5, times_ms={"sequential": 7.0})]
    )
    got = old.nearest(ProblemStats(128, 128, 128 * 255, 255, 1024, 2048))
    assert got == {Algorithm.SEQUENTIAL: 7.0}


def test_table_sm_forms():
    from cublas_grouped import TuningTable

    assert TuningTable("x", 1, [], sm="9.0").sm == (9, 0)
    assert TuningTable("x", 1, [], sm=[8, 6]).sm == (8, 6)
    assert TuningTable("x", 1, [], sm=None).sm is None
    assert TuningTable("NVIDIA H100 PCIe", 1, []).sm == (9, 0)
    with pytest.raises(ValueError, match=r"^sm must be \[major, minor\] like \[9, 0\]; got 'nine'$"):
        TuningTable("x", 1, [], sm="nine")


def test_table_load_and_atomic_save(tmp_path, monkeypatch):
    import json
    import os

    from cublas_grouped import TuningTable

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"gpu": "g", "cublas_version": 1, "entries": {}}))
    with pytest.raises(ValueError, match=rf"^{bad} is not a tuning table \(no list of entries\)$"):
        TuningTable.load(bad)
    table = TuningTable("g", 130100, [_entry()], sm=(9, 0))
    target = tmp_path / "a" / "b" / "t.json"  # folders made as needed
    replaced = []
    real_replace = os.replace

    def spy(src, dst):
        replaced.append((src, dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    table.save(target)
    ((src, dst),) = replaced
    assert str(dst) == str(target)
    # The temporary file sits next to the table (a rename, not a copy across
    # file systems) and is not a *.json that a reader could take for a table.
    assert os.path.dirname(src) == str(target.parent) and not str(src).endswith(".json")
    assert TuningTable.load(target).to_json() == table.to_json()

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        table.save(tmp_path / "c.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "bad.json"]  # nothing left behind


def test_tuning_paths(tuning_dirs, monkeypatch, tmp_path):
    from cublas_grouped.gemm import tables as _tables

    user, shipped = tuning_dirs
    odd = cg.DeviceInfo(sm=(9, 0), cublas_version=130100, name=" (NVIDIA H100 80GB HBM3) ")
    assert _tables.tuning_table_path(odd) == user / "nvidia-h100-80gb-hbm3-cublas130100.json"
    assert _tables.tuning_table_path(odd, user=False) == shipped / "nvidia-h100-80gb-hbm3-cublas130100.json"
    titan = cg.DeviceInfo(sm=(7, 0), cublas_version=120900, name="NVIDIA TITAN X-")
    assert _tables.tuning_table_path(titan).name == "nvidia-titan-x-cublas120900.json"
    monkeypatch.delenv("CUBLAS_GROUPED_TUNING_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert _tables.user_tuning_dir() == tmp_path / "home" / ".cache" / "cublas_grouped" / "tuning"


def test_a_broken_table_does_not_hide_the_next_one(tuning_dirs):
    from cublas_grouped.gemm import tables as _tables

    user, _ = tuning_dirs
    (user / "a-broken.json").write_text("{not json")
    _table_file(user, "b-good.json", DEV.name, DEV.cublas_version)
    table, why = _tables.tuning_table_for(DEV)
    assert table is not None and why.startswith(f"user table {user / 'b-good.json'}: exact match")


def test_fallback_reasons_and_version_order(tuning_dirs):
    from cublas_grouped.gemm import tables as _tables

    user, shipped = tuning_dirs
    dev = cg.DeviceInfo(sm=(9, 0), cublas_version=130200, name=DEV.name)
    path = _table_file(shipped, "a.json", DEV.name, 130000)
    _table_file(shipped, "b.json", DEV.name, 131000)
    table, why = _tables.tuning_table_for(dev)
    assert table.cublas_version == 130000  # same major, nearest
    assert why == (
        f"shipped table {path}: same GPU, nearest cuBLAS ({DEV.name}, cuBLAS 130000); "
        f"running {DEV.name}, cuBLAS 130200, SM 9.0"
    )
    # A same-major table far away beats a nearer one of another major.
    for version in (130000, 130200):
        far = cg.DeviceInfo(sm=(9, 0), cublas_version=version, name=f"far-{version}")
        _table_file(shipped, f"c{version}.json", far.name, 121000)  # 9000-9200 away, cuBLAS 12
        _table_file(shipped, f"d{version}.json", far.name, 139900)  # 9700-9900 away, cuBLAS 13
        assert _tables.tuning_table_for(far)[0].cublas_version == 139900
    # Equal distance: the newer cuBLAS.
    tie = cg.DeviceInfo(sm=(9, 0), cublas_version=130500, name="tie")
    _table_file(shipped, "e.json", "tie", 130400)
    _table_file(shipped, "f.json", "tie", 130600)
    assert _tables.tuning_table_for(tie)[0].cublas_version == 130600
    # Another GPU of the same architecture, with its reason.
    other = cg.DeviceInfo(sm=(9, 0), cublas_version=130100, name="NVIDIA H200")
    arch_table, why = _tables.tuning_table_for(other)
    assert ": same architecture (" in why and why.startswith("shipped table ")
    assert why.endswith("; running NVIDIA H200, cuBLAS 130100, SM 9.0")
    assert arch_table.gpu != "NVIDIA H200"


def test_closeness_at_major_version_edges():
    from cublas_grouped import TuningTable
    from cublas_grouped.gemm.tables import is_close_table

    for table_version, device_version, close in (
        (130000, 130100, True),
        (130100, 130000, True),
        (139999, 130000, True),
        (129999, 130000, False),
        (120900, 130100, False),
    ):
        table = TuningTable(DEV.name, table_version, [], sm=(9, 0))
        device = cg.DeviceInfo(sm=(9, 0), cublas_version=device_version, name=DEV.name)
        assert is_close_table(table, device) is close, (table_version, device_version)
    assert not is_close_table(None, DEV)
    assert not is_close_table(TuningTable("other", 130100, []), DEV)


def test_table_cache_follows_the_tuning_folder(tuning_dirs, tmp_path, monkeypatch):
    from cublas_grouped.gemm import tables as _tables

    user, _ = tuning_dirs
    _table_file(user, "t.json", DEV.name, DEV.cublas_version, [_entry(n=111)])
    assert _tables.tuning_table_for(DEV)[0].entries[0]["n"] == 111
    other = tmp_path / "other"
    other.mkdir()
    _table_file(other, "t.json", DEV.name, DEV.cublas_version, [_entry(n=222)])
    monkeypatch.setenv("CUBLAS_GROUPED_TUNING_DIR", str(other))
    assert _tables.tuning_table_for(DEV)[0].entries[0]["n"] == 222


def test_select_and_best_measured_defaults(tuning_dirs):
    from cublas_grouped import Algorithm, ProblemStats, TuningTable
    from cublas_grouped.gemm import select as _select

    stats = ProblemStats(128, 128, 128 * 255, 255, 1024, 2048)  # mean 255: chunked by the rules
    # Packed rows unless told otherwise: no CHUNKED_BATCHED by default.
    assert _select.select_algorithm(stats, DEV, table=None) is Algorithm.CUBLAS_GROUPED
    assert _select.select_algorithm(stats, DEV, table=None, padded_layouts=True) is Algorithm.CHUNKED_BATCHED
    table = TuningTable(
        "t", 130100, [_entry(times_ms={"sequential": 0.5, "cublas_grouped": 1.0, "chunked_batched": 0.1})]
    )
    grouped_seq = (Algorithm.CUBLAS_GROUPED, Algorithm.SEQUENTIAL)
    assert _select.best_measured(stats, DEV, grouped_seq, table) is Algorithm.SEQUENTIAL
    assert _select.best_measured(stats, DEV, (*grouped_seq, Algorithm.CHUNKED_BATCHED), table) is (
        Algorithm.CHUNKED_BATCHED
    )
    assert _select.best_measured(stats, DEV, grouped_seq, None) is None
    assert _select.best_measured(stats, DEV, (Algorithm.PADDED_STRIDED,), table) is None
    # table=True (the default) reads the tuning folders: empty here.
    assert _select.best_measured(stats, DEV, grouped_seq) is None
    _table_file(
        tuning_dirs[0],
        "t.json",
        DEV.name,
        DEV.cublas_version,
        [_entry(times_ms={"sequential": 0.5, "cublas_grouped": 1.0})],
    )
    _select.reset_tuning_cache()
    assert _select.best_measured(stats, DEV, grouped_seq) is Algorithm.SEQUENTIAL


def test_layer_choice_edge_cases(tuning_dirs):
    from cublas_grouped import Algorithm
    from cublas_grouped.gemm import select as _select

    shapes = ((1024, 2048), (2048, 1024))
    sizes = np.full(64, 800)  # the rules would say CHUNKED_BATCHED
    seq, grouped = Algorithm.SEQUENTIAL, Algorithm.CUBLAS_GROUPED
    chunked, strided = Algorithm.CHUNKED_BATCHED, Algorithm.PADDED_STRIDED

    def only_first(stats, candidates):
        if stats.n == 1024:
            return {seq: 1.0, grouped: 2.0, chunked: 3.0}
        return None

    # Times for the first GEMM only: its fastest serves both.
    assert _select.choose_layer_algorithms(sizes, *shapes, "bfloat16", DEV, times=only_first) == (seq, seq)

    def nothing_on_grouped_layout(stats, candidates):
        if stats.n == 1024:
            return {grouped: 1.0, strided: 5.0}
        return {strided: 1.0}

    # GEMM 2 has no time on the packed layout: padded strided for both (5 + 1 < 1 + inf).
    got = _select.choose_layer_algorithms(sizes, *shapes, "float32", DEV, times=nothing_on_grouped_layout)
    assert got == (strided, strided)


def test_layer_choice_passes_the_dtype_and_memoizes(tuning_dirs):
    from cublas_grouped import Algorithm
    from cublas_grouped.gemm import select as _select

    seen = []

    def times(stats, candidates):
        seen.append(stats.dtype)
        return {Algorithm.SEQUENTIAL: 1.0} if stats.dtype == "float16" else None

    sizes = np.full(8, 100)
    got = _select.choose_layer_algorithms(sizes, (64, 32), (32, 64), "float16", DEV, times=times)
    assert got == (Algorithm.SEQUENTIAL, Algorithm.SEQUENTIAL) and seen == ["float16", "float16"]
    # The same load again: the memo answers, times is not asked.
    assert _select.choose_layer_algorithms(sizes, (64, 32), (32, 64), "float16", DEV, times=times) == got
    assert seen == ["float16", "float16"]


def test_layer_choice_memo_separates_one_and_two_active_experts(tuning_dirs):
    from cublas_grouped import Algorithm
    from cublas_grouped.gemm import select as _select

    def times(stats, candidates):
        best = Algorithm.SEQUENTIAL if stats.active_experts == 1 else Algorithm.CUBLAS_GROUPED
        return {best: 1.0}

    one = np.array([600, 0, 0, 0])
    two = np.array([600, 600, 0, 0])
    shapes = ((64, 32), (32, 64), "bfloat16", DEV)
    assert _select.choose_layer_algorithms(one, *shapes, times=times)[0] is Algorithm.SEQUENTIAL
    assert _select.choose_layer_algorithms(two, *shapes, times=times)[0] is Algorithm.CUBLAS_GROUPED
