"""How each framework's export is typed (CPU): DLPack codes, the CUDA array
interface's untyped '<V2', which of the two wins, and the zero-copy CuPy wrap.

Fakes stand in for GPU tensors; where torch or JAX is installed, their real
(CPU) DLPack capsules are read too. No test needs either framework."""

from __future__ import annotations

import ctypes
import sys
import types

import ml_dtypes
import numpy as np
import pytest

from cublas_grouped.gemm.plan import host_group_sizes
from cublas_grouped.runtime import arrays as _arrays
from cublas_grouped.runtime.arrays import as_cupy, dlpack_dtype, dlpack_export_dtype, is_host_array, view

BF16 = np.dtype(ml_dtypes.bfloat16)


# --------------------------------------------------------------------------- DLPack capsules made by hand


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device_type", ctypes.c_int32),
        ("device_id", ctypes.c_int32),
        ("ndim", ctypes.c_int32),
        ("dtype", DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]


class DLManagedTensorVersioned(ctypes.Structure):
    _fields_ = [
        ("major", ctypes.c_uint32),
        ("minor", ctypes.c_uint32),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", ctypes.c_void_p),
        ("flags", ctypes.c_uint64),
        ("dl_tensor", DLTensor),
    ]


_KEEP = []  # the structs and names the capsules point at stay alive for the test run


def make_capsule(code: int, bits: int, lanes: int = 1, *, versioned: bool = False, device_type: int = 2):
    shape = (ctypes.c_int64 * 1)(4)
    managed = DLManagedTensorVersioned(1, 0) if versioned else DLManagedTensor()
    managed.dl_tensor = DLTensor(
        0x7F0000000000, device_type, 0, 1, DLDataType(code, bits, lanes), shape, None, 0
    )
    name = ctypes.create_string_buffer(b"dltensor_versioned" if versioned else b"dltensor")
    _KEEP.extend([shape, managed, name])
    new = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)(
        ("PyCapsule_New", ctypes.pythonapi)
    )
    return new(ctypes.addressof(managed), ctypes.addressof(name), None)


class TorchLikeTensor:
    """What torch publishes for a CUDA tensor: an interface with '<V2' and no
    descr for bfloat16, a dtype that is not NumPy's, and a DLPack export."""

    def __init__(self, shape, typestr, dl_code, dl_bits, *, descr=None, dtype=None, strides=None):
        self.shape = shape
        self.dtype = dtype if dtype is not None else f"fake_torch.{dl_code}.{dl_bits}"
        self.device = type("Dev", (), {"index": 0})()
        self._cai = {"shape": shape, "typestr": typestr, "data": (0x7F0000001000, False), "version": 2}
        self._cai["strides"] = strides
        if descr is not None:
            self._cai["descr"] = descr
        self._dl = (dl_code, dl_bits)
        self.exports = []

    @property
    def __cuda_array_interface__(self):
        return self._cai

    def __dlpack_device__(self):
        return (2, 0)

    def __dlpack__(self, stream=None):
        self.exports.append(stream)
        return make_capsule(*self._dl)


@pytest.fixture(autouse=True)
def fresh_dtype_cache(monkeypatch):
    monkeypatch.setattr(_arrays, "_FOREIGN_DTYPES", {})


# --------------------------------------------------------------------------- the mapping


@pytest.mark.parametrize(
    "code, bits, expected",
    [
        (4, 16, BF16),  # kDLBfloat
        (2, 16, np.dtype(np.float16)),
        (2, 32, np.dtype(np.float32)),
        (2, 64, np.dtype(np.float64)),
        (0, 32, np.dtype(np.int32)),
        (0, 64, np.dtype(np.int64)),
        (1, 8, np.dtype(np.uint8)),
        (6, 8, np.dtype(np.bool_)),
    ],
)
def test_dlpack_codes_map_to_numpy_dtypes(code, bits, expected):
    assert dlpack_dtype(code, bits) == expected


@pytest.mark.parametrize("code, bits, lanes", [(5, 64, 1), (3, 64, 1), (2, 32, 4), (4, 32, 1), (2, 12, 1)])
def test_dlpack_codes_without_a_dtype_are_refused(code, bits, lanes):
    with pytest.raises(TypeError, match=rf"^DLPack element type \(code {code}, {bits} bits, {lanes} lanes\)"):
        dlpack_dtype(code, bits, lanes)


@pytest.mark.parametrize("versioned", [False, True])
@pytest.mark.parametrize(
    "code, bits, expected", [(4, 16, BF16), (2, 16, np.dtype(np.float16)), (2, 32, np.dtype(np.float32))]
)
def test_dtype_read_from_a_capsule(versioned, code, bits, expected):
    class Producer:
        def __dlpack_device__(self):
            return (2, 0)

        def __dlpack__(self, stream=None):
            assert stream == -1  # a GPU export for metadata asks for no stream sync
            return make_capsule(code, bits, versioned=versioned)

    assert dlpack_export_dtype(Producer()) == expected


def test_capsule_lanes_and_producers_without_the_stream_keyword():
    # Pins dlpack_export_dtype's two remaining paths: a GPU producer whose
    # __dlpack__ takes no stream keyword is asked again without it, and the
    # capsule's lanes are read (two float32 lanes are no NumPy dtype).
    class OldGpuProducer:
        def __init__(self, lanes):
            self.lanes = lanes

        def __dlpack_device__(self):
            return (2, 0)

        def __dlpack__(self):
            return make_capsule(2, 32, self.lanes)

    assert dlpack_export_dtype(OldGpuProducer(1)) == np.float32
    with pytest.raises(TypeError, match=r"code 2, 32 bits, 2 lanes"):
        dlpack_export_dtype(OldGpuProducer(2))


def test_a_producer_that_returns_no_capsule_is_named():
    class Odd:
        def __dlpack__(self):
            return object()

    with pytest.raises(TypeError, match=r"^Odd.__dlpack__\(\) returned no DLPack tensor capsule$"):
        dlpack_export_dtype(Odd())


# --------------------------------------------------------------------------- which source wins


def test_torch_bfloat16_is_typed_by_dlpack_not_as_void():
    t = TorchLikeTensor((3, 4), "<V2", 4, 16)
    v = view(t, "x")
    assert v.dtype == BF16 and v.shape == (3, 4) and v.strides == (4, 1) and v.device == 0
    assert t.exports == [-1]


def test_dlpack_wins_over_a_void_typestr():
    # A producer whose interface says only "2-byte void" while DLPack says float16:
    # the more precise word is taken.
    v = view(TorchLikeTensor((2, 2), "<V2", 2, 16), "x")
    assert v.dtype == np.float16


def test_typed_typestrs_never_export():
    t = TorchLikeTensor((2, 2), "<f2", 2, 16)
    assert view(t, "x").dtype == np.float16
    assert t.exports == []  # a plain typestr says enough: no DLPack round trip


def test_the_export_happens_once_per_array_type_and_dtype():
    first = TorchLikeTensor((2, 2), "<V2", 4, 16, dtype="torch.bfloat16")
    second = TorchLikeTensor((5, 2), "<V2", 4, 16, dtype="torch.bfloat16")
    assert view(first, "a").dtype == BF16 and view(second, "b").dtype == BF16
    assert first.exports == [-1] and second.exports == []


def test_the_dtype_cache_keys_on_the_array_type_and_skips_unhashable_dtypes():
    # Pins the cache key of foreign dtypes: another array type with the same
    # dtype name and typestr asks DLPack itself (here it says float16, not
    # bfloat16), and arrays whose dtype object cannot be hashed are typed
    # each on their own, never from another array's entry.
    class OtherTensor(TorchLikeTensor):
        pass

    first = TorchLikeTensor((2, 2), "<V2", 4, 16, dtype="torch.x")
    other = OtherTensor((2, 2), "<V2", 2, 16, dtype="torch.x")
    assert view(first, "a").dtype == BF16
    assert view(other, "b").dtype == np.float16 and other.exports == [-1]
    f4 = TorchLikeTensor((2, 2), "<f4", 2, 32, dtype=["unhashable"])
    f2 = TorchLikeTensor((2, 2), "<f2", 2, 16, dtype=["unhashable"])
    assert view(f4, "c").dtype == np.float32 and view(f2, "d").dtype == np.float16


def test_interface_marker_types_bfloat16_without_dlpack():
    class MarkedOnly:
        __cuda_array_interface__ = {
            "shape": (2, 8),
            "typestr": "|V2",
            "descr": [("bfloat16", "|V2")],
            "data": (0x7F0000000000, False),
            "version": 3,
        }

    assert view(MarkedOnly(), "x").dtype == BF16


def test_a_failed_export_falls_back_to_the_interface():
    class Broken(TorchLikeTensor):
        def __dlpack__(self, stream=None):
            raise BufferError("cannot export")

    assert view(Broken((2, 2), "<V2", 4, 16, descr=[("bfloat16", "<V2")]), "x").dtype == BF16
    assert view(
        Broken((2, 2), "<V2", 4, 16, descr=[("my_pair", "<V2")], dtype="other"), "x"
    ).dtype == np.dtype("V2")


def test_a_tensor_that_requires_grad_is_read_through_detach():
    detached = TorchLikeTensor((3, 4), "<f4", 2, 32)

    class NeedsGrad:
        requires_grad = True

        @property
        def __cuda_array_interface__(self):
            raise RuntimeError("Can't get __cuda_array_interface__ on Variable that requires grad.")

        def detach(self):
            return detached

    v = view(NeedsGrad(), "w1")
    assert v.obj is detached and v.dtype == np.float32


def test_other_interface_errors_propagate():
    class Bad:
        requires_grad = False

        @property
        def __cuda_array_interface__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="^boom$"):
        view(Bad(), "x")

    class NoGradFlag:  # not a tensor at all: no requires_grad attribute
        @property
        def __cuda_array_interface__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="^boom$"):
        view(NoGradFlag(), "x")


def test_host_dlpack_arrays_are_refused_by_name():
    class HostOnly:
        def __dlpack_device__(self):
            return (1, 0)

        def __dlpack__(self, stream=None):
            raise AssertionError("never exported")

    with pytest.raises(
        TypeError, match=r"^topk_ids is in host memory \(DLPack device type 1\); pass a GPU array$"
    ):
        view(HostOnly(), "topk_ids")


# --------------------------------------------------------------------------- the CuPy wrap (no GPU needed to build it)


def test_as_cupy_wraps_torch_bfloat16_as_bfloat16_not_void():
    t = TorchLikeTensor((3, 4), "<V2", 4, 16)
    a = as_cupy(t, "x")
    assert a.dtype == BF16 and a.shape == (3, 4) and a.strides == (8, 2)
    assert a.data.ptr == 0x7F0000001000


def test_as_cupy_keeps_strides_and_reaches_below_the_pointer_for_negative_ones():
    t = TorchLikeTensor((3, 4), "<f4", 2, 32, strides=(-16, 4))
    a = as_cupy(t, "x")
    assert a.strides == (-16, 4) and a.data.ptr == 0x7F0000001000
    # The wrapped allocation starts two rows below element [0, 0] and spans all three.
    assert a.data.mem.ptr == 0x7F0000001000 - 32 and a.data.mem.size == 48


def test_as_cupy_of_a_view_reuses_its_dtype():
    t = TorchLikeTensor((2, 2), "<V2", 4, 16)
    v = view(t, "x")
    assert as_cupy(v).dtype == BF16
    assert t.exports == [-1]  # typed once, by the view


# --------------------------------------------------------------------------- real exports, where the frameworks are installed


@pytest.mark.parametrize("name", ["float32", "float16", "bfloat16"])
def test_torch_cpu_capsules_carry_the_dtype(name):
    torch = pytest.importorskip("torch")
    t = torch.zeros(3, dtype=getattr(torch, name))
    assert dlpack_export_dtype(t) == (BF16 if name == "bfloat16" else np.dtype(name))
    with pytest.raises(TypeError, match=r"^x is in host memory \(DLPack device type 1\)"):
        view(t, "x")


@pytest.mark.parametrize("name", ["float32", "float16", "bfloat16"])
def test_jax_cpu_capsules_carry_the_dtype(name):
    jnp = pytest.importorskip("jax.numpy")
    x = jnp.zeros(3, dtype=getattr(jnp, name))
    assert dlpack_export_dtype(x) == (BF16 if name == "bfloat16" else np.dtype(name))
    with pytest.raises(TypeError, match=r"^x is in host memory \(DLPack device type 1\)"):
        view(x, "x")


def test_an_interface_without_a_typestr_for_the_type_falls_back_to_dlpack(monkeypatch):
    # Older torch raised KeyError for bfloat16's interface; DLPack describes it.
    imported = []

    class OldTorchBf16:
        @property
        def __cuda_array_interface__(self):
            raise KeyError("torch.bfloat16")

        def __dlpack_device__(self):
            return (2, 0)

        def __dlpack__(self, stream=None):
            raise AssertionError("the import goes through _from_dlpack")

    class Imported:
        dtype = BF16
        __cuda_array_interface__ = {"shape": (2, 3), "typestr": "<V2", "data": (0x1000, False), "version": 3}

    def from_dlpack(obj, name):
        imported.append(name)
        return Imported()

    monkeypatch.setattr(_arrays, "_from_dlpack", from_dlpack)
    v = view(OldTorchBf16(), "w1")
    assert imported == ["w1"] and v.dtype == BF16 and v.shape == (2, 3)


def test_host_arrays_are_told_from_gpu_arrays(fake):
    class HostDlpack:
        def __dlpack_device__(self):
            return (1, 0)

        def __dlpack__(self, stream=None):
            raise AssertionError("not exported")

    assert is_host_array([1, 2]) and is_host_array(np.arange(3)) and is_host_array(HostDlpack())
    assert not is_host_array(fake((3,), np.int64))
    assert not is_host_array(TorchLikeTensor((3,), "<i8", 0, 64))


def test_gpu_arrays_without_a_cuda_interface_are_not_host_arrays():
    # Pins is_host_array's other GPU signs: an interface that raises (a GPU
    # tensor that will not say), a DLPack device of CUDA (2) or CUDA managed
    # memory (13), whatever the device ordinal, and a __dlpack__ without a
    # device to ask (it cannot be told from GPU data, so it is not taken as host).
    class Refusing:
        @property
        def __cuda_array_interface__(self):
            raise RuntimeError("cannot export a tensor that requires grad")

    class DlpackOn:
        def __init__(self, device):
            self.device = device

        def __dlpack_device__(self):
            return self.device

    class DlpackOnly:
        def __dlpack__(self, stream=None):
            raise AssertionError("not exported")

    assert not is_host_array(Refusing())
    for device in ((2, 0), (2, 1), (13, 0)):
        assert not is_host_array(DlpackOn(device)), device
    assert is_host_array(DlpackOn((1, 2))), "CPU memory, device ordinal 2"
    assert not is_host_array(DlpackOnly())


def test_a_dlpack_array_without_a_host_device_goes_to_cupy(monkeypatch):
    # Pins _from_dlpack for a producer that has __dlpack__ but no
    # __dlpack_device__: nothing says it is host memory, so CuPy imports it.
    class DlpackOnly:
        def __dlpack__(self, stream=None):
            raise AssertionError("exported by CuPy, not here")

    fake_cupy = types.SimpleNamespace(from_dlpack=lambda obj: ("imported", obj))
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy)
    obj = DlpackOnly()
    assert _arrays._from_dlpack(obj, "x") == ("imported", obj)

    class OnGpu(DlpackOnly):
        def __dlpack_device__(self):
            return (2, 0)

    gpu = OnGpu()
    assert _arrays._from_dlpack(gpu, "x") == ("imported", gpu)


class _FakeCupyArray:
    """Stands in for cupy.ndarray in view()'s fast path (which reads only these attributes)."""

    def __init__(self, shape, byte_strides, dtype, contiguous):
        self.shape, self.strides, self.dtype = shape, byte_strides, np.dtype(dtype)
        self.flags = types.SimpleNamespace(c_contiguous=contiguous)
        self.data = types.SimpleNamespace(ptr=0x7F0000002000)
        self.device = types.SimpleNamespace(id=1)


def test_the_cupy_fast_path_reads_cupys_own_attributes(monkeypatch):
    # Pins view()'s CuPy fast path on the CPU: an array of exactly CuPy's type
    # is described from its own attributes: canonical strides when
    # C-contiguous (an empty one's zero strides too), byte strides turned into
    # elements otherwise, strides that are not whole elements refused by name.
    monkeypatch.setattr(_arrays, "_CUPY_NDARRAY", _FakeCupyArray)
    arr = _FakeCupyArray((2, 3), (12, 4), np.float32, True)
    v = view(arr, "x")
    assert (v.ptr, v.shape, v.strides, v.dtype, v.device, v.obj) == (
        0x7F0000002000,
        (2, 3),
        (3, 1),
        np.float32,
        1,
        arr,
    )
    assert view(_FakeCupyArray((0, 3), (0, 0), np.float16, True), "x").strides == (3, 1)
    sliced = _FakeCupyArray((2, 2), (24, 8), np.float32, False)
    strides = view(sliced, "x").strides
    assert strides == (6, 2) and all(type(s) is int for s in strides), "whole elements, as ints"
    with pytest.raises(ValueError, match=r"^w1 has strides \(6, 4\) that are not whole elements$"):
        view(_FakeCupyArray((2, 2), (6, 4), np.float32, False), "w1")


def test_cupys_array_type_is_found_once_or_stood_in_for(monkeypatch):
    # Pins _cupy_ndarray: CuPy's ndarray when CuPy imports; else a stand-in
    # type that no object has, so every array takes the generic path.
    import cupy

    monkeypatch.setattr(_arrays, "_CUPY_NDARRAY", None)
    assert _arrays._cupy_ndarray() is cupy.ndarray
    monkeypatch.setattr(_arrays, "_CUPY_NDARRAY", None)
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy now raises ImportError
    stand_in = _arrays._cupy_ndarray()
    assert isinstance(stand_in, type) and stand_in is not cupy.ndarray
    assert _arrays._cupy_ndarray() is stand_in, "looked up once"
    assert view(TorchLikeTensor((2, 2), "<f2", 2, 16), "x").dtype == np.float16


def test_cpu_framework_sizes_count_as_host_sizes():
    torch = pytest.importorskip("torch")
    assert is_host_array(torch.tensor([1, 2]))
    plan_sizes = host_group_sizes(torch.tensor([3, 0, 2]), 3)
    assert plan_sizes.tolist() == [3, 0, 2]
