"""Every public entry point takes CuPy, torch and JAX arrays of every supported
dtype, zero-copy, and gives the same bits as with CuPy arrays of the same data
(the library is deterministic), which in turn match the float64 references.

{CuPy, torch, JAX} x {float32, float16, bfloat16} x {gmm, route, moe_forward,
FixedCapacityMoE, the step-by-step API, MoEMLP}; a framework that is not
installed (or, for JAX, has no GPU backend) is skipped."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from gpu_util import TOLERANCE, check_close

import cublas_grouped as cg
from cublas_grouped import testing as ref

pytestmark = pytest.mark.gpu

DTYPES = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}
FRAMEWORKS = ["cupy", "torch", "jax"]
E, H, INTER, T, K = 6, 64, 48, 37, 2


def to_framework(framework: str, host: np.ndarray, dtype_name: str | None = None):
    """``host`` (float32 or int) on the GPU as ``framework``'s array, converted to ``dtype_name``."""
    import cupy

    if framework == "cupy":
        arr = cupy.asarray(host)
        return arr.astype(DTYPES[dtype_name]) if dtype_name else arr
    if framework == "torch":
        torch = pytest.importorskip("torch")
        if not torch.cuda.is_available():
            pytest.skip("torch has no CUDA")
        t = torch.from_numpy(np.ascontiguousarray(host)).cuda()
        t = t.to(getattr(torch, dtype_name)) if dtype_name else t
        torch.cuda.synchronize()
        return t
    jax = pytest.importorskip("jax")
    try:
        gpu = jax.devices("gpu")[0]
    except RuntimeError:
        pytest.skip("JAX has no GPU backend")
    import jax.numpy as jnp

    arr = jax.device_put(jnp.asarray(host, dtype=getattr(jnp, dtype_name) if dtype_name else None), gpu)
    return arr.block_until_ready()


def rounded(host: np.ndarray, dtype_name: str) -> np.ndarray:
    """What the GPU holds after the conversion (round to nearest even), in float64."""
    return host.astype(DTYPES[dtype_name]).astype(np.float64)


def same_bits(ours, theirs):
    import cupy

    assert isinstance(ours, cupy.ndarray), f"outputs are CuPy arrays; got {type(ours).__name__}"
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    a, b = cupy.asnumpy(ours), cupy.asnumpy(theirs)
    assert a.tobytes() == b.tobytes()


@pytest.fixture
def data():
    rng = np.random.default_rng(19)
    ids = np.stack([rng.choice(E, size=K, replace=False) for _ in range(T)]).astype(np.int32)
    w = rng.random((T, K)).astype(np.float32)
    return {
        "x": rng.standard_normal((T, H)).astype(np.float32),
        "w1": (rng.standard_normal((E, H, 2 * INTER)) / np.sqrt(H)).astype(np.float32),
        "w2": (rng.standard_normal((E, INTER, H)) / np.sqrt(INTER)).astype(np.float32),
        "router": (rng.standard_normal((H, E)) / np.sqrt(H)).astype(np.float32),
        "ids": ids,
        "weights": w / w.sum(axis=1, keepdims=True),
        "sizes": np.array([5, 0, 11, 3, 0, 18], dtype=np.int64),
    }


def inputs(framework, data, dtype_name, *names):
    out = []
    for name in names:
        if name in ("ids", "weights", "sizes"):
            out.append(to_framework(framework, data[name]))
        else:
            out.append(to_framework(framework, data[name], dtype_name))
    return out


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("sizes_on_device", [False, True])
def test_gmm(framework, dtype_name, sizes_on_device, data):
    a_h = data["x"][: int(data["sizes"].sum())]
    b_h = data["w1"]
    a, b = to_framework(framework, a_h, dtype_name), to_framework(framework, b_h, dtype_name)
    sizes = to_framework(framework, data["sizes"]) if sizes_on_device else data["sizes"]
    ours = cg.gmm(a, b, sizes, algorithm="cublas_grouped")
    ca, cb = to_framework("cupy", a_h, dtype_name), to_framework("cupy", b_h, dtype_name)
    same_bits(ours, cg.gmm(ca, cb, data["sizes"], algorithm="cublas_grouped"))
    want = ref.gmm_ref(rounded(a_h, dtype_name), rounded(b_h, dtype_name), data["sizes"])
    check_close(ours, want, TOLERANCE[dtype_name], f"gmm {framework} {dtype_name}")


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_route(framework, dtype_name, data):
    logits_h = data["x"][:, :E]
    (logits,) = [to_framework(framework, logits_h, dtype_name)]
    w, i = cg.route(logits, K)
    cw, ci = cg.route(to_framework("cupy", logits_h, dtype_name), K)
    same_bits(w, cw)
    same_bits(i, ci)


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("fixed_capacity", [False, True])
def test_moe_forward(framework, dtype_name, fixed_capacity, data):
    x, w1, w2, ids, wts = inputs(framework, data, dtype_name, "x", "w1", "w2", "ids", "weights")
    kw = {"fixed_capacity": True} if fixed_capacity else {"algorithm": "cublas_grouped"}
    ours = cg.moe_forward(x, ids, wts, w1, w2, **kw)
    same_bits(
        ours, cg.moe_forward(*inputs("cupy", data, dtype_name, "x", "ids", "weights", "w1", "w2"), **kw)
    )
    want = ref.moe_forward_ref(
        rounded(data["x"], dtype_name),
        data["ids"],
        data["weights"],
        rounded(data["w1"], dtype_name),
        rounded(data["w2"], dtype_name),
    )
    check_close(ours, want, 2 * TOLERANCE[dtype_name], f"moe_forward {framework} {dtype_name}")


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_fixed_capacity_moe(framework, dtype_name, data):
    x, w1, w2, ids, wts = inputs(framework, data, dtype_name, "x", "w1", "w2", "ids", "weights")
    ours = cg.FixedCapacityMoE(w1, w2, K, max_tokens=64).forward(x, ids, wts).copy()
    cx, cw1, cw2, cids, cwts = inputs("cupy", data, dtype_name, "x", "w1", "w2", "ids", "weights")
    same_bits(ours, cg.FixedCapacityMoE(cw1, cw2, K, max_tokens=64).forward(cx, cids, cwts))


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_step_by_step(framework, dtype_name, data):
    def steps(x, w, ids, wts):
        inp = cg.prepare_input(x, (wts, ids), E, algorithm="cublas_grouped")
        y = cg.expert_gemm(inp, w)
        return cg.combine_output(y, inp), cg.scatter_output(y, inp)

    x, w, ids, wts = inputs(framework, data, dtype_name, "x", "w1", "ids", "weights")
    ours, scattered = steps(x, w, ids, wts)
    theirs, scattered_cupy = steps(*inputs("cupy", data, dtype_name, "x", "w1", "ids", "weights"))
    same_bits(ours, theirs)
    same_bits(scattered, scattered_cupy)
    xr, wr = rounded(data["x"], dtype_name), rounded(data["w1"], dtype_name)
    want = np.zeros((T, wr.shape[2]))
    for t in range(T):
        for j in range(K):
            want[t] += data["weights"][t, j] * (xr[t] @ wr[data["ids"][t, j]])
    check_close(ours, want, 2 * TOLERANCE[dtype_name], f"steps {framework} {dtype_name}")


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_moe_mlp(framework, dtype_name, data):
    def layer(router, w1, w2):
        sw1, sw2 = w1[0], w2[0]  # a shared expert too: every argument goes through the wrap
        return cg.MoEMLP(router, w1, w2, K, shared_w1=sw1, shared_w2=sw2)

    x, router, w1, w2 = inputs(framework, data, dtype_name, "x", "router", "w1", "w2")
    ours = layer(router, w1, w2)(x, algorithm="cublas_grouped")
    cx, crouter, cw1, cw2 = inputs("cupy", data, dtype_name, "x", "router", "w1", "w2")
    same_bits(ours, layer(crouter, cw1, cw2)(cx, algorithm="cublas_grouped"))


def test_torch_parameters_that_require_grad_are_read_in_place(data):
    torch = pytest.importorskip("torch")
    x, w1, w2, ids, wts = inputs("torch", data, "bfloat16", "x", "w1", "w2", "ids", "weights")
    p1, p2 = torch.nn.Parameter(w1), torch.nn.Parameter(w2)
    ours = cg.moe_forward(x, ids, wts, p1, p2, algorithm="cublas_grouped")
    same_bits(ours, cg.moe_forward(x, ids, wts, w1, w2, algorithm="cublas_grouped"))


def test_outputs_convert_back_without_a_copy(data):
    torch = pytest.importorskip("torch")
    x, w1, w2, ids, wts = inputs("torch", data, "bfloat16", "x", "w1", "w2", "ids", "weights")
    out = cg.moe_forward(x, ids, wts, w1, w2)
    back = torch.from_dlpack(out)
    assert back.dtype == torch.bfloat16 and back.data_ptr() == out.data.ptr and back.shape == (T, H)


def test_torch_bfloat16_wraps_as_bfloat16_at_the_same_address(data):
    pytest.importorskip("torch")
    from cublas_grouped.runtime.arrays import as_cupy

    (t,) = inputs("torch", data, "bfloat16", "w1")
    view = as_cupy(t[:, 1:5, ::2], "w")  # strided too
    assert view.dtype == DTYPES["bfloat16"] and view.data.ptr == t[:, 1:5, ::2].data_ptr()
    assert view.strides == tuple(s * 2 for s in t[:, 1:5, ::2].stride())
    np.testing.assert_array_equal(view.get().astype(np.float32), t[:, 1:5, ::2].float().cpu().numpy())
