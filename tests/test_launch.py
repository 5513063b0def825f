"""The cheap launch path (runtime/launch.py): argument packing and its fallbacks, on the CPU."""

from __future__ import annotations

import ctypes
import struct
from types import SimpleNamespace

import numpy as np
import pytest

from cublas_grouped.runtime import launch as L


def _values(packer, codes):
    out = []
    for code, ptr in zip(codes, packer.pointers):
        ctype = {"i": ctypes.c_int32, "I": ctypes.c_uint32, "q": ctypes.c_int64, "Q": ctypes.c_uint64,
                 "f": ctypes.c_float, "d": ctypes.c_double}[code]  # fmt: skip
        assert ptr % ctypes.sizeof(ctype) == 0, "each value sits at an offset aligned to its size"
        out.append(ctype.from_address(ptr).value)
    return out


def test_packer_places_each_value_where_its_pointer_says():
    args = (
        np.int32(-7),
        np.uint64(2**63 + 5),
        np.int32(3),
        np.float32(1.5),
        np.intp(123456789012),
        np.float64(-2.25),
    )
    types = tuple(map(type, args))
    packer = L._packer_for(types)
    packer.fmt.pack_into(packer.buffer, 0, *args)
    codes = tuple(L._CODES[t] for t in types)
    assert _values(packer, codes) == [-7, 2**63 + 5, 3, 1.5, 123456789012, -2.25]
    # int32 then uint64: the uint64 starts 8 bytes in, after 4 bytes of padding
    assert packer.pointers[1] - packer.pointers[0] == 8
    assert L._packer_for(types) is packer, "one buffer per (thread, signature)"


def test_other_arguments_fall_back_without_launching(monkeypatch):
    monkeypatch.setattr(L, "driver", lambda: pytest.fail("the driver must not be called"))
    assert L.launch_scalars(0, object(), 1, 32, (np.int32(1), object())) is False
    assert L.launch_scalars(0, object(), 1, 32, (np.int32(1), 5)) is False  # a bare int has no width
    assert L.launch_scalars(0, object(), 1, 32, (np.int16(1),)) is False


class _FakeKernel:
    handle = 0xABC


class _FakeDriver:
    def __init__(self, status):
        self.status, self.calls = status, []

    def cuLaunchKernel(self, *args):
        self.calls.append(args)
        return self.status

    def cuLaunchKernelEx(self, config, handle, params, extra):
        c = config._obj  # the CUlaunchConfig a byref points at
        attrs = [(c.attrs[i].id, c.attrs[i].value[0]) for i in range(c.num_attrs)]
        self.calls.append(("ex", tuple(c.grid), tuple(c.block), c.shared_bytes, c.stream, attrs, handle))
        return self.status

    def cuGetErrorName(self, status, out):
        ctypes.cast(out, ctypes.POINTER(ctypes.c_char_p))[0] = b"CUDA_ERROR_INVALID_VALUE"
        return 0


def test_launch_passes_grid_block_stream_and_shared_memory(monkeypatch):
    fake = _FakeDriver(0)
    monkeypatch.setattr(L, "driver", lambda: fake)
    kernel = _FakeKernel()
    assert L.launch_scalars(77, kernel, (3, 2), 128, (np.int32(4),), shmem=1024) is True
    (call,) = fake.calls
    assert call[:10] == (0xABC, 3, 2, 1, 128, 1, 1, 1024, 77, call[9])
    assert ctypes.c_int32.from_address(call[9][0]).value == 4
    assert call[10] is None


def test_a_refused_launch_names_the_driver_error(monkeypatch):
    monkeypatch.setattr(L, "driver", lambda: _FakeDriver(1))
    with pytest.raises(L.LaunchError, match="CUDA_ERROR_INVALID_VALUE.*|grid 9"):
        L.launch_scalars(0, _FakeKernel(), 9, 32, (np.int32(1),))
    with pytest.raises(L.LaunchError, match="grid 9, block 32"):
        L.launch_scalars(0, _FakeKernel(), 9, 32, (np.int32(1),))


def test_shared_memory_defaults_to_zero_and_short_shapes_are_padded_with_ones(monkeypatch):
    # Pins the default shmem (0 bytes) and how int and short tuple grids and
    # blocks become the driver's three dimensions (missing ones are 1).
    fake = _FakeDriver(0)
    monkeypatch.setattr(L, "driver", lambda: fake)
    for grid, block, dims in (
        (5, (64,), (5, 1, 1, 64, 1, 1)),
        ((5,), (64, 2), (5, 1, 1, 64, 2, 1)),
        ((5, 6, 7), (8, 4, 2), (5, 6, 7, 8, 4, 2)),
        (5, 64, (5, 1, 1, 64, 1, 1)),
    ):
        fake.calls.clear()
        assert L.launch_scalars(3, _FakeKernel(), grid, block, (np.int32(1),)) is True
        (call,) = fake.calls
        assert call[1:7] == dims, (grid, block)
        assert call[7] == 0, "no shared memory unless asked"


class _CountingKernel:
    reads = 0

    @property
    def handle(self):
        type(self).reads += 1
        return 0xDEF


def test_a_kernels_handle_is_read_once(monkeypatch):
    # Pins the handle cache: the cuda.core handle lookup is paid on the first
    # launch of a kernel only, and the cached handle is the one passed on.
    fake = _FakeDriver(0)
    monkeypatch.setattr(L, "driver", lambda: fake)
    kernel = _CountingKernel()
    for _ in range(3):
        L.launch_scalars(0, kernel, 1, 32, (np.int32(1),))
    assert _CountingKernel.reads == 1
    assert [c[0] for c in fake.calls] == [0xDEF] * 3


class _NamingDriver(_FakeDriver):
    """cuGetErrorName that knows one status and fails (status 500, a name left
    in the output) for any other, as a driver may."""

    def cuGetErrorName(self, status, out):
        name = b"CUDA_ERROR_OUT_OF_MEMORY" if status == 2 else b"LEFTOVER"
        ctypes.cast(out, ctypes.POINTER(ctypes.c_char_p))[0] = name
        return 0 if status == 2 else 500


def test_the_error_name_is_asked_for_the_launchs_status(monkeypatch):
    # Pins _error_name: the name of the status the launch returned, and the
    # bare number when the driver cannot name it (whatever it left behind).
    monkeypatch.setattr(L, "driver", lambda: _NamingDriver(2))
    with pytest.raises(L.LaunchError, match="CUDA_ERROR_OUT_OF_MEMORY"):
        L.launch_scalars(0, _FakeKernel(), 1, 32, (np.int32(1),))
    monkeypatch.setattr(L, "driver", lambda: _NamingDriver(999))
    with pytest.raises(L.LaunchError, match=r": CUresult 999$"):
        L.launch_scalars(0, _FakeKernel(), 1, 32, (np.int32(1),))


def test_signed_launch_packs_plain_ints_as_the_scalar_path_does(monkeypatch):
    fake = _FakeDriver(0)
    monkeypatch.setattr(L, "_driver", fake)  # the loaded driver, read without a call
    args = (-7, 2**63 + 5, 3, 1.5, 123456789012, -2.25)
    L.launch_signed(77, _FakeKernel(), 4, 128, "iQifqd", args, shmem=512)
    (call,) = fake.calls
    assert call[:9] == (0xABC, 4, 1, 1, 128, 1, 1, 512, 77)
    assert _values(SimpleNamespace(pointers=call[9]), "iQifqd") == list(args)
    scalar = L._packer_for((np.int32, np.uint64, np.int32, np.float32, np.intp, np.float64))
    assert [p - scalar.pointers[0] for p in scalar.pointers] == [p - call[9][0] for p in call[9]]
    monkeypatch.setattr(L, "_driver", _FakeDriver(1))
    with pytest.raises(L.LaunchError, match="grid 4, block 128"):
        L.launch_signed(0, _FakeKernel(), 4, 128, "i", (1,))
    with pytest.raises(struct.error):
        L.launch_signed(0, _FakeKernel(), 4, 128, "i", (2**31,))  # out of range: refused, not wrapped


def test_a_fixed_launch_writes_its_slots_and_passes_the_launch_as_built(monkeypatch):
    """FixedLaunch on cuda.core's real argument block (host packing only): the
    slot's new value is what the block holds at the launch; grid, block, shared
    memory, stream and the block's pointer array go to cuLaunchKernel with its
    trailing extra argument None; the loaded driver is used without asking again."""
    fake = _FakeDriver(0)
    monkeypatch.setattr(L, "_driver", fake)
    monkeypatch.setattr(L, "driver", lambda: pytest.fail("a loaded driver is not looked up again"))
    launch = L.FixedLaunch(_FakeKernel(), 3, 128, (np.int64(7), np.int32(2)), shmem=64, slots=(0,), label="k")
    launch(55, 0x1234)
    (call,) = fake.calls
    assert len(call) == 11 and call[10] is None
    assert call[:9] == (0xABC, 3, 1, 1, 128, 1, 1, 64, 55)
    pointers = (ctypes.c_void_p * 2).from_address(call[9].value)
    assert ctypes.c_int64.from_address(pointers[0]).value == 0x1234, (
        "the slot's value, written before the launch"
    )
    assert ctypes.c_int32.from_address(pointers[1]).value == 2, "a fixed argument as built"
    # No driver loaded yet: it is asked for.
    monkeypatch.setattr(L, "_driver", None)
    monkeypatch.setattr(L, "driver", lambda: fake)
    launch(56, 0x5678)
    assert fake.calls[-1][8] == 56


def test_a_refused_fixed_launch_names_its_kernel_and_the_driver_error(monkeypatch):
    monkeypatch.setattr(L, "_driver", _NamingDriver(2))  # names status 2 only: the launch's own
    launch = L.FixedLaunch(
        _FakeKernel(), 9, 384, (np.int32(1),), shmem=4096, label="gemm (kernels/x.cu, sm_90a)"
    )
    message = (
        "cuLaunchKernel failed for gemm (kernels/x.cu, sm_90a), grid 9, block 384, "
        "4096 bytes of shared memory: CUDA_ERROR_OUT_OF_MEMORY"
    )
    with pytest.raises(L.LaunchError) as refused:
        launch(0)
    assert str(refused.value) == message
    with pytest.raises(L.LaunchError, match="^cuLaunchKernel failed for a kernel, grid 2,"):
        L.FixedLaunch(_FakeKernel(), 2, 32, (np.int32(1),))(0)


def test_overlapped_launch_passes_the_programmatic_attribute_and_the_stream(monkeypatch):
    """launch_overlapped: cuLaunchKernelEx with the grid, block, shared memory,
    the call's stream and one attribute, programmatic stream serialization
    (id 6) on; the slots written first, as a plain call writes them; the
    config built once and reused with each call's stream."""
    fake = _FakeDriver(0)
    monkeypatch.setattr(L, "_driver", fake)
    monkeypatch.setattr(L, "driver", lambda: pytest.fail("a loaded driver is not looked up again"))
    launch = L.FixedLaunch(_FakeKernel(), 5, 256, (np.int64(7), np.int32(2)), shmem=96, slots=(0,))
    launch.launch_overlapped(41, 0x4321)
    config = launch._config
    launch.launch_overlapped(42, 0x8765)
    assert launch._config is config, "the config is built once"
    first, second = fake.calls
    assert first == ("ex", (5, 1, 1), (256, 1, 1), 96, 41, [(6, 1)], 0xABC)
    import gc

    gc.collect()  # the attribute lives as long as the config, with no reference of its own
    assert config[0].attrs[0].id == 6 and config[0].attrs[0].value[0] == 1
    assert second[4] == 42
    pointers = (ctypes.c_void_p * 2).from_address(launch.params.value)
    assert ctypes.c_int64.from_address(pointers[0]).value == 0x8765
    # No driver loaded yet: it is asked for.
    monkeypatch.setattr(L, "_driver", None)
    monkeypatch.setattr(L, "driver", lambda: fake)
    launch.launch_overlapped(43)
    assert fake.calls[-1][4] == 43


def test_a_refused_overlapped_launch_names_the_call_its_kernel_and_the_error(monkeypatch):
    monkeypatch.setattr(L, "_driver", _NamingDriver(2))
    launch = L.FixedLaunch(_FakeKernel(), 9, 384, (np.int32(1),), shmem=4096, label="gemm")
    with pytest.raises(L.LaunchError) as refused:
        launch.launch_overlapped(0)
    assert str(refused.value) == (
        "cuLaunchKernelEx (programmatic dependent launch) failed for gemm, grid 9, block 384, "
        "4096 bytes of shared memory: CUDA_ERROR_OUT_OF_MEMORY"
    )
