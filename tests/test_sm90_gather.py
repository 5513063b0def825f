"""GEMM 1 gathering its rows (the kernel's SM90_GATHER_A variant, v11) on the
CPU: the compiled variant's MMA pipeline against the plain kernel's, the
128-byte swizzle its load warpgroup writes by hand against TMA's layout (a
NumPy model of the whole stage), and its launches on stubs (tests/host_stubs.py):
the GEMM's arguments and the kernel step with the gather inside GEMM 1."""

from __future__ import annotations

import re

import numpy as np
import pytest
from host_stubs import H100, fake_array, stub_gpu

import cublas_grouped as cg
from cublas_grouped.gemm.backends import hopper
from cublas_grouped.gemm.backends.hopper_variants import swizzle_128b_offset, variant_defines
from cublas_grouped.moe import kernel_step as S
from cublas_grouped.moe import layer_cache
from cublas_grouped.moe import routing as R
from cublas_grouped.runtime import nvrtc


def _ptx(defines) -> str:
    """The kernel source's PTX (NVRTC alone: no driver, no GPU)."""
    from cuda.bindings import nvrtc as N

    source = nvrtc.load_source("grouped_gemm_sm90").encode()
    err, prog = N.nvrtcCreateProgram(source, b"grouped_gemm_sm90.cu", 0, [], [])
    assert err == N.nvrtcResult.NVRTC_SUCCESS
    opts = [f"-arch={hopper.ARCH}".encode(), b"-std=c++17"] + [
        f"-D{k}={v}".encode() for k, v in defines.items()
    ]
    (err,) = N.nvrtcCompileProgram(prog, len(opts), opts)
    assert err == N.nvrtcResult.NVRTC_SUCCESS, err
    err, size = N.nvrtcGetPTXSize(prog)
    buf = b" " * size
    (err,) = N.nvrtcGetPTX(prog, buf)
    N.nvrtcDestroyProgram(prog)
    return buf.decode()


def _entries(ptx: str) -> dict[str, str]:
    return {part.split("(")[0].strip(): part for part in re.split(r"\.entry ", ptx)[1:]}


def test_the_gathering_kernels_keep_the_plain_mma_pipeline():
    """Same wgmma count per kernel as the plain kernels (the K loop unrolled
    alike: 28 = 7 stages of 4), a's copies by cp.async (8 per stage per thread:
    one 16-byte chunk of 8 rows) with one .noinc arrival per stage, and the
    proxy fence before the MMAs read them; the plain kernels have none of these."""
    plain = _entries(_ptx(hopper.DEFINES))
    gather = _entries(_ptx(variant_defines(hopper.DEFINES, None, _row_gather())))
    gemms = [f"grouped_gemm_{w}_{t}" for w in ("nt", "nn") for t in ("bf16", "f16")]
    for name in gemms:
        assert plain[name].count("wgmma.mma_async") == gather[name].count("wgmma.mma_async") == 28, name
        assert gather[name].count("cp.async.cg.shared.global") == 8
        assert gather[name].count("cp.async.mbarrier.arrive.noinc.shared::cta.b64") == 1
        assert gather[name].count("fence.proxy.async.shared::cta") >= 1
        assert "cp.async.cg" not in plain[name] and "fence.proxy.async" not in plain[name]


def test_swizzle_is_tmas_128_byte_swizzle():
    """The model equals the address-bit definition (bits 4-6 XOR bits 7-9 of
    the unswizzled offset), permutes the 64 chunks of each 1024-byte atom, and
    is the function the kernel uses (sm90.cuh's text)."""
    for row in range(256):
        atom = set()
        for chunk in range(8):
            plain = row * 128 + chunk * 16
            got = swizzle_128b_offset(row, chunk)
            assert got == plain ^ (((plain >> 7) & 7) << 4)
            assert got // 128 == row  # a chunk stays in its row's 128 bytes
            atom.add(got % 128)
        assert atom == set(range(0, 128, 16))
    assert swizzle_128b_offset(0, 3) == 48 and swizzle_128b_offset(1, 0) == 128 + 16
    assert swizzle_128b_offset(9, 2) == 9 * 128 + (2 ^ 1) * 16
    source = nvrtc.load_source("grouped_gemm_sm90")
    assert "return static_cast<unsigned>(row * 128 + ((chunk ^ (row & 7)) << 4));" in source


def _kernel_stage(x, src, top_k, row0, row_end, kt, stage):
    """The load warpgroup's copies of one stage, as the kernel issues them
    (thread t: chunk t % 8 of rows t / 8 + 16 i at swizzle(t / 8) + 2 KiB * i),
    into ``stage`` (1024 x 16 bytes as uint8 [16384])."""
    t_rows, k = x.shape
    flat = x.view(np.uint8).reshape(t_rows, -1)
    for tid in range(128):
        chunk, row_in = tid & 7, tid >> 3
        dst_in = swizzle_128b_offset(row_in, chunk)
        for i in range(8):
            row = row0 + row_in + 16 * i
            if row >= row_end:
                continue  # not the group's: not written
            p = src[row]
            token = p // top_k if p >= 0 else -1
            token = token if token < t_rows else -1
            col = kt * 64 + 8 * chunk
            dst = dst_in + i * 16 * 128
            if token >= 0 and col < k:
                stage[dst : dst + 16] = flat[token, 2 * col : 2 * col + 16]
            else:
                stage[dst : dst + 16] = 0


def _tma_stage(x, src, top_k, row0, kt):
    """What a 128 x 64 TMA box of the gathered copy (zeros past K and for
    missing rows) puts in the stage with the 128-byte swizzle: every row."""
    t_rows, k = x.shape
    rows = np.zeros((128, 64), x.dtype)
    for r in range(128):
        p = src[row0 + r] if row0 + r < len(src) else -1
        token = p // top_k if p >= 0 else -1
        if 0 <= token < t_rows:
            width = max(0, min(64, k - kt * 64))
            rows[r, :width] = x[token, kt * 64 : kt * 64 + width]
    chunks = rows.view(np.uint8).reshape(128, 8, 16)
    stage = np.zeros(128 * 128, np.uint8)
    for r in range(128):
        for c in range(8):
            at = swizzle_128b_offset(r, c)
            stage[at : at + 16] = chunks[r, c]
    return stage


@pytest.mark.parametrize("rows_in_group", [128, 100, 64, 5, 1, 0])
@pytest.mark.parametrize("kt", [0, 2])
def test_the_gathered_stage_is_the_tma_stage(rows_in_group, kt):
    """The kernel's copies (modelled) against TMA's box of the gathered copy:
    equal on every row the group holds (missing rows and K's tail as zeros,
    tokens past x's rows as zeros), untouched past them (v10's thin-tile rule)."""
    rng = np.random.default_rng(rows_in_group + 7 * kt)
    t_rows, top_k, k = 50, 3, 136  # K = 2 stages + 8: the second stage's tail is zeros
    x = rng.integers(1, 1 << 14, (t_rows, k)).astype(np.uint16)
    src = rng.integers(0, t_rows * top_k, 400).astype(np.int32)
    src[rng.random(400) < 0.1] = -1  # missing rows: zeros
    src[3] = t_rows * top_k + 2  # a token past x's rows: zeros
    row0 = 3 if kt == 0 else 0  # the tile's first row: any row of the layout
    row_end = row0 + rows_in_group
    stage = np.full(128 * 128, 0xEE, np.uint8)
    _kernel_stage(x, src, top_k, row0, row_end, kt, stage)
    want = _tma_stage(x, src, top_k, row0, kt)
    held = rows_in_group * 128
    assert (stage[:held] == want[:held]).all()
    assert (stage[held:] == 0xEE).all()
    if kt == 2:  # K's tail: columns 128 .. 135 are chunk 0 of each row, the other 7 chunks zeros
        for r in range(rows_in_group):
            for c in range(1, 8):
                at = swizzle_128b_offset(r, c)
                assert (stage[at : at + 16] == 0).all()


def test_each_warp_writes_whole_rows():
    """Per copy instruction (i), warp w's 32 threads read 4 whole 128-byte
    row spans and write 512 contiguous bytes of the stage (bank-conflict-free);
    over all threads and i every chunk of the 128-row stage is written once."""
    seen = np.zeros(1024, np.int64)
    for i in range(8):
        for warp in range(4):
            dst, src = [], []
            for lane in range(32):
                tid = 32 * warp + lane
                row = (tid >> 3) + 16 * i
                dst.append(swizzle_128b_offset(tid >> 3, tid & 7) + i * 2048)
                src.append((row, tid & 7))
                seen[row * 8 + (tid & 7)] += 1
                assert dst[-1] == swizzle_128b_offset(row, tid & 7)
            assert sorted(dst) == list(range(min(dst), min(dst) + 512, 16))
            assert {r for r, _ in src} == {4 * warp + 16 * i + j for j in range(4)}
    assert (seen == 1).all()


def _row_gather(src=0x7E0000100000, top_k=4, rows=9):
    return hopper.RowGather(src, top_k, rows)


def test_row_gather_refuses_bad_values():
    with pytest.raises(ValueError, match="gather: src must be the address"):
        hopper.RowGather(0, 2, 5)
    with pytest.raises(ValueError, match="gather: top_k must be at least 1; got 0"):
        hopper.RowGather(16, 0, 5)
    with pytest.raises(ValueError, match="gather: rows .* got -1"):
        hopper.RowGather(16, 1, -1)
    assert hopper.RowGather(16, 1, 0).rows == 0  # T = 0: no rows of x, none read
    with pytest.raises(ValueError) as error:
        hopper.RowGather(0, 2, 5)
    assert str(error.value) == "gather: src must be the address of an int32 [M] array on the device; got 0"
    assert variant_defines(hopper.DEFINES, None, None) is hopper.DEFINES
    codes = (("ACT_SILU", 0), ("ACT_GELU", 1), ("ACT_RELU", 2))
    epilogue = hopper.GatedEpilogue(1, codes)
    want = {**hopper.DEFINES, "ACT_SILU": 0, "ACT_GELU": 1, "ACT_RELU": 2, "SM90_EPILOGUE_ACT": 1}
    assert variant_defines(hopper.DEFINES, epilogue, None) == want
    assert variant_defines(hopper.DEFINES, epilogue, _row_gather()) == {**want, "SM90_GATHER_A": 1}
    assert variant_defines(hopper.DEFINES, None, _row_gather()) == {**hopper.DEFINES, "SM90_GATHER_A": 1}


@pytest.fixture
def gpu(monkeypatch):
    monkeypatch.setenv("CUBLAS_GROUPED_AUTOTUNE", "0")
    with stub_gpu(monkeypatch, info=H100) as rec:
        inner = nvrtc.get_kernel
        rec.kernels = []  # (kernel name, defines) of every kernel asked for

        def get_kernel(name, kernel, arch, *, defines=None):
            rec.kernels.append((kernel, dict(defines or {})))
            return inner(name, kernel, arch, defines=defines)

        monkeypatch.setattr(nvrtc, "get_kernel", get_kernel)
        layer_cache.clear()
        R._local.calls = {}
        yield rec
        layer_cache.clear()
        R._local.calls = {}


def _res():
    from cublas_grouped.runtime.device import resolve_stream, resources

    return resources(0, resolve_stream(None))


def test_gathering_launch_arguments(gpu):
    """The gathering GEMM: the gather variant compiled, b's map in every map
    argument (a is read by cp.async), x in slot 13 after the output, then
    src, top_k and x's rows; x is not part of the prepared launch's key."""
    e, m, n, k, t = 8, 40, 512, 136, 10
    b, out, src = fake_array((e, k, n)), fake_array((m, n)), fake_array((m,), "int32")
    sizes = fake_array((e,), "int32")
    problem = (e, m, n, k, False, np.dtype("bfloat16"))
    gather = hopper.RowGather(src.data.ptr, 4, t)
    for x in (fake_array((t, k)), fake_array((t, k))):
        gpu.clear()
        hopper.grouped_rows(_res(), problem, (x.data.ptr, b.data.ptr, out.data.ptr), sizes, gather=gather)
        scan, gemm = gpu.decoded
        values = gemm[4]
        b_map = (b.data.ptr, (e, k, n), (1, hopper.BLOCK_K, hopper.B_SPAN), "bfloat16", 0)  # no L2 promotion
        assert values[:3] == (b_map, b_map, b_map)
        assert values[7:11] == (e, m, n, k)
        assert values[11:] == (out.data.ptr, 0, x.data.ptr, src.data.ptr, 4, t)
        assert scan[4][0] == sizes.data.ptr
    # 40 rows over 8 groups: v12's idle-warpgroup skip is chosen too (hopper_variants.tile_defines).
    assert (
        "grouped_gemm_nn_bf16",
        {**hopper.DEFINES, "SM90_GATHER_A": 1, "SM90_SKIP_IDLE": 1},
    ) in gpu.kernels
    assert len(hopper._local.prepared) == 1  # two x addresses, one prepared launch
    # The plain launch of the same problem: a's two maps, no gather arguments.
    gpu.clear()
    a = fake_array((m, k))
    hopper.grouped_rows(_res(), problem, (a.data.ptr, b.data.ptr, out.data.ptr), sizes)
    values = gpu.decoded[-1][4]
    assert len(values) == 13 and values[0][:2] == (a.data.ptr, (m, k)) and values[11] == out.data.ptr
    with pytest.raises(ValueError, match="gather: x must start at a multiple of 16 bytes"):
        hopper.grouped_rows(_res(), problem, (x.data.ptr + 2, b.data.ptr, out.data.ptr), sizes, gather=gather)


E, K, H, I = 16, 4, 64, 128  # noqa: E741  (I a multiple of 128: gate_up_blocked runs too)


def _step_call(layout="gate_up", x=None, fixed=False):
    t = dict(
        x=fake_array((3, H)) if x is None else x,
        ids=fake_array((3, K), "int32"),
        weights=fake_array((3, K), "float32"),
        w1=fake_array((E, H, 2 * I)),
        w2=fake_array((E, I, H)),
    )
    return cg.moe_forward(
        t["x"], t["ids"], t["weights"], t["w1"], t["w2"], w1_layout=layout, fixed_capacity=fixed
    )


def _copies(rec, x) -> bool:
    """Whether the step gathered x's rows: a gather launch (gather_rows_by_token's
    arguments: x, hidden, pair_to_row, row_to_pair, k, tokens, rows, out; or
    gather_rows': x, hidden, row_to_pair, k, rows, out), or place_one_block's
    with x (its 7th argument) and a rows buffer (its last)."""
    gather = any(len(v[4]) in (6, 8) and v[4][0] == x.data.ptr and v[4][1] == H for v in rec.decoded)
    place = any(len(v[4]) == 19 and v[4][6] == x.data.ptr and v[4][18] != 0 for v in rec.decoded)
    return gather or place


def _gemm1(rec):
    """GEMM 1's argument values: those of the first launch whose first argument
    is a tensor map (recorded as its fields, a tuple)."""
    return next(v[4] for v in rec.decoded if v[4] and isinstance(v[4][0], tuple))


@pytest.mark.parametrize("one_launch", [True, False])
@pytest.mark.parametrize("layout", ["gate_up", "gate_up_blocked"])
@pytest.mark.parametrize("fixed", [False, True])
def test_the_step_gathers_in_gemm1_when_asked(gpu, monkeypatch, layout, fixed, one_launch):
    """GATHER_IN_GEMM1 off (the default): the rows gathered (by gather_rows, or
    with the placement in one launch by place_one_block), then GEMM 1 on the
    copy. On: no copy; GEMM 1 gets x, row_to_pair, k and T, the same on the
    prepared replay as on the first call, and the step queues one launch fewer
    (with four placement launches; the one launch stays, without rows).
    An x off a 16-byte boundary keeps the copy."""
    from cublas_grouped.moe import fixed_capacity as F
    from cublas_grouped.moe import layer as L

    assert S.GATHER_IN_GEMM1 is False
    monkeypatch.setattr(S, "PLACE_IN_ONE_LAUNCH", one_launch)
    gpu.clear()
    x = fake_array((3, H))
    _step_call(layout, x=x, fixed=fixed)
    assert _copies(gpu, x)
    off_launches = len(gpu.decoded)
    assert len(_gemm1(gpu)) == 13

    monkeypatch.setattr(S, "GATHER_IN_GEMM1", True)
    timed = []

    def with_timer(res, shape, buf, x, ids, weights, params, out, dropped, timer=None):
        S.kernel_step(res, shape, buf, x, ids, weights, params, out, dropped, timer or cg.StageTimer())

    for prepared in (False, True, True):
        x = fake_array((3, H))
        gpu.clear()
        with pytest.MonkeyPatch.context() as mp:
            if not prepared:
                for module in (F, L):
                    mp.setattr(module, "kernel_step", with_timer)
                mp.setattr(S, "TIME_PREPARED", False)  # the timed step launches afresh
            _step_call(layout, x=x, fixed=fixed)
        assert not _copies(gpu, x)
        values = _gemm1(gpu)
        assert len(values) == 17 and values[13] == x.data.ptr and values[15:] == (K, 3)
        assert values[0] == values[2]  # b's map stands in for a's
        timed.append((values[14], len(gpu.decoded)))
    assert timed[0] == timed[1] == timed[2]  # the same row_to_pair, the same launches
    assert timed[0][1] == off_launches - (0 if one_launch else 1)

    gpu.clear()
    x = _misaligned_x()
    _step_call(layout, x=x, fixed=fixed)
    assert _copies(gpu, x) and len(_gemm1(gpu)) == 13


def _misaligned_x():
    """A [3, H] x starting 2 bytes past a 16-byte boundary."""
    return fake_array((3, H), ptr=0x7E0000200002)


def test_gather_in_gemm1_reads_the_constant_and_the_address(monkeypatch):
    x = fake_array((3, H))
    assert S.gather_in_gemm1(x) is False
    monkeypatch.setattr(S, "GATHER_IN_GEMM1", True)
    assert S.gather_in_gemm1(x) is True
    assert S.gather_in_gemm1(_misaligned_x()) is False
