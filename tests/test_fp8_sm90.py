"""The FP8 Hopper kernel on the CPU: its build (ptxas's report), the launcher's
constants and argument checks (fake arrays, before any GPU work), what it takes,
the float64 reference it is tested against, and a NumPy model of the kernel's
tile walk (128 x 128 tiles, scale indexing, row masks) against that reference."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import cublas_grouped as cg
from cublas_grouped.gemm.backends import hopper, hopper_fp8
from cublas_grouped.runtime import nvrtc
from cublas_grouped.testing_fp8 import dequantize_ref, grouped_fp8_ref, quantize_ref

BF16 = ml_dtypes.bfloat16


def _ptxas_report(defines=None) -> str:
    from cuda.core import Program, ProgramOptions

    macros = [(name, str(value)) for name, value in (defines or hopper_fp8.DEFINES).items()]
    options = ProgramOptions(arch=hopper_fp8.ARCH, std="c++17", define_macro=macros, ptxas_options="-v")
    program = Program(nvrtc.load_source(hopper_fp8.SOURCE), code_type="c++", options=options)

    class Log:
        text = ""

        def write(self, chunk):
            self.text += chunk

    log = Log()
    program.compile("cubin", logs=log)
    return log.text


@pytest.mark.parametrize(
    "thin, cluster, loaders, wide",
    [
        (False, 1, 2, "fold"),
        (False, 2, 1, False),
        (False, 2, 2, False),
        (False, 1, 1, False),
        (True, 1, 1, False),
        (False, 1, 2, False),
        (True, 1, 2, False),
        (False, 1, 2, True),
        (False, 1, 1, True),
        (False, 1, 2, "serial"),
    ],
    ids=[
        "128x128 with the fold, two loaders",
        "pairs",
        "pairs, two loaders",
        "128x128",
        "thin",
        "128x128, two loaders",
        "thin, two loaders",
        "128x192, two loaders",
        "128x192",
        "128x192 serial",
    ],
)
def test_ptxas_report_no_spills_no_serialization_and_registers_in_budget(thin, cluster, loaders, wide):
    """384 threads of one CTA per SM start with 168 registers each (65,536 /
    384, rounded down to 8: what ptxas reports); the math warpgroups then take
    232 (setmaxnreg) for acc + tmp0 + tmp1, 192 of them, and the load thread
    keeps 40 (CTA pairs: with the pair's mailbox; the rank is read again where
    used, or its products spill). A spill, or a note that wgmma was serialized
    or a wait added, would cost the kernel its speed, not its results. Each
    tile shape, with and without CTA pairs."""
    pytest.importorskip("cuda.core")
    base = hopper_fp8.WIDE_DEFINES if wide is True or wide == "serial" else hopper_fp8.launch_defines(thin)
    if wide == "fold":  # 128 x 128 tiles with the fold (its walk serial, its ring 12 KiB larger)
        base = hopper_fp8.launch_defines(False, fold=True)
    if wide == "serial":
        base = {**base, "FP8_OVERLAP": 0}
    report = _ptxas_report({**base, "FP8_CLUSTER": cluster, "FP8_LOADERS": loaders})
    assert f"Compiling entry function '{hopper_fp8.KERNEL}'" in report
    # C7520/C7510/C7514: wgmma serialized; C7517: a wait ptxas had to add.
    assert not any(note in report for note in ("C7520", "C7510", "C7514", "C7517")), report
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if f"'{hopper_fp8.KERNEL}'" in line)
    spills = next(line for line in lines[start:] if "spill stores" in line)
    assert spills.strip().endswith("0 bytes spill stores, 0 bytes spill loads"), report
    used = next(line for line in lines[start:] if "Used " in line and "registers" in line)
    registers = int(used.split("Used ")[1].split(" registers")[0])
    assert registers <= 168, used


def _ptx(defines) -> str:
    nvrtc_api = pytest.importorskip("cuda.bindings.nvrtc")
    src = nvrtc.load_source(hopper_fp8.SOURCE).encode()
    err, prog = nvrtc_api.nvrtcCreateProgram(src, b"fp8.cu", 0, [], [])
    assert err == nvrtc_api.nvrtcResult.NVRTC_SUCCESS
    opts = [b"--gpu-architecture=sm_90a", b"-std=c++17", *(f"-D{k}={v}".encode() for k, v in defines.items())]
    (err,) = nvrtc_api.nvrtcCompileProgram(prog, len(opts), opts)
    assert err == nvrtc_api.nvrtcResult.NVRTC_SUCCESS
    err, size = nvrtc_api.nvrtcGetPTXSize(prog)
    ptx = b" " * size
    (err,) = nvrtc_api.nvrtcGetPTX(prog, ptx)
    nvrtc_api.nvrtcDestroyProgram(prog)
    return ptx.rstrip(b"\0").decode()


def test_ptx_has_the_e4m3_wgmma_and_2d_tma():
    text = _ptx(hopper_fp8.DEFINES)
    # Four steps per stage, issued at four places (a tile's first stage, the
    # two of each loop pass, the tail) by the overlapped promotion, which
    # waits for all but the newest group and trades registers between roles.
    assert text.count("wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3") == 4 * 4
    assert "wgmma.wait_group.sync.aligned 1;" in text
    assert "setmaxnreg.dec.sync.aligned.u32 40;" in text and "setmaxnreg.inc.sync.aligned.u32 232;" in text
    assert "cp.async.bulk.tensor.2d" in text and "ld.global.nc.f32" in text
    assert ".multicast::cluster" not in text and "barrier.cluster" not in text  # one CTA per tile


@pytest.mark.parametrize("overlap", [1, 0])
def test_ptx_of_wide_tiles(overlap):
    """FP8_BLOCK_N 192: each stage as two m64n96 groups, in the two
    instantiations of the K walk (a tile on or 64 past a scale block).
    Overlapped: issued at four places each (the first half 0, the loop's two,
    the tail's half 1), waiting for all but the newest group; serial: two
    places, each stage waited for. Registers traded between roles in both."""
    text = _ptx({**hopper_fp8.WIDE_DEFINES, "FP8_OVERLAP": overlap})
    assert "m64n128k32" not in text
    places = 4 if overlap else 2
    assert text.count("wgmma.mma_async.sync.aligned.m64n96k32.f32.e4m3.e4m3") == 2 * places * 4
    assert "wgmma.wait_group.sync.aligned 0;" in text
    assert ("wgmma.wait_group.sync.aligned 1;" in text) == bool(overlap)
    assert "setmaxnreg.dec.sync.aligned.u32 40;" in text and "setmaxnreg.inc.sync.aligned.u32 232;" in text


def test_ptx_of_cta_pairs():
    """FP8_CLUSTER 2: a multicast into both CTAs, releases in both, the pair's
    mailbox, the barrier both CTAs pass before they exit, and the cluster
    shape in the entry's directives (a plain launch then runs pairs)."""
    text = _ptx({**hopper_fp8.DEFINES, "FP8_CLUSTER": 2, "FP8_LOADERS": 1})
    assert text.count("wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3") == 4 * 4
    assert ".multicast::cluster" in text and "mbarrier.arrive.shared::cluster.b64" in text
    assert "mapa.shared::cluster.u32" in text and "st.shared::cluster.b64" in text
    assert "barrier.cluster.arrive.release;" in text
    assert ".explicitcluster" in text and ".reqnctapercluster 2, 1, 1" in text


def test_launch_constants_agree():
    assert hopper_fp8.BLOCK_M == hopper.BLOCK_M == 128  # grouped_tile_offsets' tiles are ours
    assert hopper_fp8.BLOCK_K == cg.gemm.fp8.BLOCK == 128  # one scale block per stage
    assert hopper_fp8.BLOCK_N == 128
    assert hopper_fp8.SHARED_BYTES == 6 * 256 * 128 + 2 * 64 * 72 * 2 + 1024
    assert hopper_fp8.SHARED_BYTES <= 227 * 1024  # the H100's opt-in limit per block
    # With the schedule table of the most groups kept in shared memory: still within it.
    table = 4 * (3 * hopper.TABLE_MAX_GROUPS + 1)
    assert hopper_fp8.shared_bytes(hopper.TABLE_MAX_GROUPS) == hopper_fp8.SHARED_BYTES + table <= 227 * 1024
    assert hopper_fp8.shared_bytes(hopper.TABLE_MAX_GROUPS + 1) == hopper_fp8.SHARED_BYTES
    assert "#define SM90_C_PITCH 72\n" in nvrtc.load_source(hopper_fp8.SOURCE) and hopper.C_PITCH == 72
    assert hopper_fp8.DEFINES == {
        "FP8_BLOCK_M": 128,
        "FP8_BLOCK_N": 128,
        "FP8_BLOCK_K": 128,
        "FP8_STAGES": hopper_fp8.STAGES,
        "FP8_OVERLAP": 1,
        "FP8_TABLE_MAX_GROUPS": hopper.TABLE_MAX_GROUPS,
        "FP8_A_BOX_ROWS": 16,
        "FP8_THIN": 0,
        "FP8_CLUSTER": 1,  # CTA pairs measured slower (hopper_fp8.CLUSTER)
        "FP8_LOADERS": 2,  # a and b issued by two threads: measured faster (hopper_fp8.LOADERS)
        "FP8_FOLD_ROWS": 0,  # the fold's launches set it (hopper_fp8.fold_tiles)
        "FP8_SMALL_A_ROWS": hopper_fp8.SMALL_A_ROWS,  # a's small boxes up to this many rows
    }
    # Thin tiles: 5 stages of 64 rows of a and 256 of b, the table as large as
    # fits, always one CTA per tile (the source refuses pairs of thin tiles).
    thin = hopper_fp8.launch_defines(True)
    assert thin["FP8_CLUSTER"] == 1
    assert {k: v for k, v in thin.items() if hopper_fp8.DEFINES[k] != v} == {
        "FP8_THIN": 1,
        "FP8_STAGES": 5,
        "FP8_TABLE_MAX_GROUPS": 597,
    }
    assert hopper_fp8.launch_defines(False) is hopper_fp8.DEFINES
    assert hopper_fp8.THIN_SHARED_BYTES == 5 * (64 + 256) * 128 + 2 * 64 * 72 * 2 + 1024
    most = hopper_fp8.THIN_TABLE_MAX_GROUPS
    # Within 227 KiB with 1 KiB left for the static barriers and mailboxes
    # (the opt-in failed on an H200 at 232,444 bytes of dynamic memory).
    limit = 227 * 1024 - 1024
    assert hopper_fp8.shared_bytes(most, thin=True) <= limit < hopper_fp8.shared_bytes(most, True) + 12
    assert hopper_fp8.shared_bytes(hopper.TABLE_MAX_GROUPS) <= limit
    assert hopper_fp8.shared_bytes(most + 1, thin=True) == hopper_fp8.THIN_SHARED_BYTES
    # Wide tiles: 5 stages of 128 rows of a and 192 of b, the table as large as fits.
    wide = hopper_fp8.WIDE_DEFINES
    assert {k: v for k, v in wide.items() if hopper_fp8.DEFINES[k] != v} == {
        "FP8_BLOCK_N": 192,
        "FP8_STAGES": 5,
        "FP8_TABLE_MAX_GROUPS": 597,
    }
    assert hopper_fp8.WIDE_SHARED_BYTES == 5 * (128 + 192) * 128 + 2 * 64 * 72 * 2 + 1024
    assert (
        hopper_fp8.shared_bytes(597, defines=wide) <= limit < hopper_fp8.shared_bytes(597, defines=wide) + 12
    )
    assert hopper_fp8.shared_bytes(598, defines=wide) == hopper_fp8.WIDE_SHARED_BYTES
    assert (
        hopper_fp8.tile_n(wide) == 192
        and hopper_fp8.tile_n(thin) == 256
        and hopper_fp8.tile_n(hopper_fp8.DEFINES) == 128
    )


def test_wide_tiles_only_where_asked(monkeypatch):
    """WIDE (off: measured slower) picks the wide tiles for prefill only;
    decode keeps its thin tiles either way."""
    assert hopper_fp8.launch_defines(False)["FP8_BLOCK_N"] == 128
    monkeypatch.setattr(hopper_fp8, "WIDE", True)
    assert hopper_fp8.launch_defines(False) is hopper_fp8.WIDE_DEFINES
    assert (
        hopper_fp8.launch_defines(True)["FP8_BLOCK_N"] == 128
        and hopper_fp8.launch_defines(True)["FP8_THIN"] == 1
    )


def test_thin_tiles_where_groups_average_at_most_16_rows(monkeypatch):
    """The tile shape is a rule of M and E alone (a captured graph replays with
    any sizes): decode steps take thin tiles, prefill the 128 x 128 ones."""
    assert hopper_fp8.thin_tiles(16 * 8, 128)  # Qwen3 at 16 tokens: 128 pairs over 128 experts
    assert hopper_fp8.thin_tiles(16 * 128, 128) and not hopper_fp8.thin_tiles(16 * 128 + 1, 128)
    assert hopper_fp8.thin_tiles(64 * 2, 8)  # Mixtral at 64 tokens
    assert not hopper_fp8.thin_tiles(4096 * 8, 256)  # DeepSeek-V3 prefill
    monkeypatch.setattr(hopper_fp8, "THIN", False)
    assert not hopper_fp8.thin_tiles(1, 128)


def test_grid_counts_tiles_of_the_launch_width():
    # 3 rows over 2 groups: at most 3 schedule tiles of 128 rows (hopper's
    # bound); N = 1024 is 8 column tiles of 128 or 4 thin ones.
    assert hopper_fp8.grid_size(3, 1024, 2, 132) == 24
    assert hopper_fp8.grid_size(3, 1024, 2, 132, tile_n=hopper_fp8.THIN_TILE_N) == 12
    # CTA pairs: a pair per slot of 256 columns (3 x 4 slots), an even count.
    assert hopper_fp8.grid_size(3, 1024, 2, 132, cluster=2) == 24
    assert hopper_fp8.grid_size(3, 1152, 2, 132, cluster=2) == 30  # 9 bands: 5 slots, the last half past N
    assert hopper_fp8.grid_size(16384, 1536, 128, 132, cluster=2) == 132
    assert hopper_fp8.grid_size(16384, 1536, 128, 131, cluster=2) == 130  # pairs only
    assert hopper_fp8.grid_size(16384, 1536, 128, 132, limit=3, cluster=2) == 2
    assert hopper_fp8.grid_size(16, 128, 1, 132, cluster=2) == 4  # 2 row tiles x 1 slot


def _w(fake, e=4, n=256, k=512, trans_b=True, scaling="block128", ptr=0x7F0000000000):
    if scaling == "block128":
        scales = (e, -(-n // 128), -(-k // 128)) if trans_b else (e, -(-k // 128), -(-n // 128))
    else:
        scales = (e, n, 1) if trans_b else (e, 1, n)
    shape = (e, n, k) if trans_b else (e, k, n)
    return cg.FP8ExpertWeights(fake(shape, np.uint8, ptr=ptr), fake(scales, np.float32), scaling, trans_b)


def test_what_it_takes(fake):
    w = _w(fake)
    assert hopper_fp8.unsupported((9, 0), w, BF16) is None
    assert hopper_fp8.unsupported((8, 0), w, BF16).startswith("needs an SM 9.0 GPU")
    assert hopper_fp8.unsupported((10, 0), w, BF16).startswith("needs an SM 9.0 GPU")
    assert "trans_b=True" in hopper_fp8.unsupported((9, 0), _w(fake, trans_b=False), BF16)
    assert "'block128'" in hopper_fp8.unsupported((9, 0), _w(fake, scaling="channel"), BF16)
    assert "bfloat16" in hopper_fp8.unsupported((9, 0), w, np.float16)
    assert "trans_a" in hopper_fp8.unsupported((9, 0), w, BF16, trans_a=True)
    assert "K % 16" in hopper_fp8.unsupported((9, 0), _w(fake, k=520), BF16)
    assert "N % 8" in hopper_fp8.unsupported((9, 0), _w(fake, n=260), BF16)
    assert hopper_fp8.unsupported((9, 0), _w(fake, n=136, k=144), BF16) is None  # tails are fine
    assert "FP8ExpertWeights" in hopper_fp8.unsupported((9, 0), fake((4, 256, 512), BF16), BF16)
    assert hopper_fp8.misaligned(0x1000, 0x2010) is None
    assert "16-byte aligned" in hopper_fp8.misaligned(0x1000, 0x2008)


FAKE_PTR = 0x7F0000000000  # FakeGpuArray's default address


def _operands(fake, m=300, e=4, n=256, k=512):
    kb = -(-k // 128)
    return fake((m, k), np.uint8), fake((m, kb), np.float32), _w(fake, e, n, k), fake((m, n), BF16)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"a_q": ((300, 512), np.int8)}, "a_q must be a C-contiguous uint8 array \\[M, 512\\]"),
        ({"a_q": ((300, 256), np.uint8)}, "a_q must be a C-contiguous uint8 array \\[M, 512\\]"),
        ({"a_scales": ((300, 3), np.float32)}, "a_scales must be a C-contiguous float32 array \\[300, 4\\]"),
        ({"a_scales": ((300, 4), np.float16)}, "a_scales must be"),
        # Rows with a pitch (views of wider arrays): the kernel reads and writes
        # whole rows back to back, so it would read or write past each row.
        ({"a_q": ((300, 512), np.uint8, FAKE_PTR, (1024, 1))}, "a_q must be a C-contiguous uint8 array"),
        ({"a_scales": ((300, 4), np.float32, FAKE_PTR, (32, 4))}, "a_scales must be a C-contiguous float32"),
        ({"out": ((300, 256), BF16, FAKE_PTR, (1024, 2))}, "out must be a C-contiguous bfloat16 array"),
        ({"out": ((300, 256), np.float16)}, "out must be a C-contiguous bfloat16 array \\[300, 256\\]"),
        ({"out": ((299, 256), BF16)}, "out must be"),
        ({"sizes": [100, 100, 100]}, "group_sizes must be 4 integers"),
        ({"sizes": [100, 100, 150, -50]}, "must not be negative"),
        ({"sizes": [100, 100, 100, 1]}, "must sum to M=300; they sum to 301"),
        ({"sizes": [1.0, 2.0, 3.0, 4.0]}, "group_sizes must be 4 integers"),
        ({"sizes_dev": ((3,), np.int32)}, "group_sizes must be a 1-D integer GPU array of 4"),
        ({"sizes_dev": ((4,), np.float32)}, "group_sizes must be a 1-D integer GPU array of 4"),
    ],
)
def test_grouped_fp8_argument_errors(fake, change, match):
    a_q, a_s, w, out = _operands(fake)
    sizes = [100, 100, 100, 0]
    if "a_q" in change:
        a_q = fake(*change["a_q"])
    if "a_scales" in change:
        a_s = fake(*change["a_scales"])
    if "out" in change:
        out = fake(*change["out"])
    if "sizes" in change:
        sizes = change["sizes"]
    if "sizes_dev" in change:
        sizes = fake(*change["sizes_dev"])
    with pytest.raises(ValueError, match=match):
        hopper_fp8.grouped_fp8(a_q, a_s, w, sizes, out=out)


def test_grouped_fp8_refuses_weights_it_cannot_read(fake):
    a_q, a_s, _, out = _operands(fake)
    for w, match in [
        (_w(fake, trans_b=False), "trans_b=True"),
        (_w(fake, scaling="channel"), "'block128'"),
        (fake((4, 256, 512), np.uint8), "FP8ExpertWeights"),
    ]:
        with pytest.raises(ValueError, match=match):
            hopper_fp8.grouped_fp8(a_q, a_s, w, [300, 0, 0, 0], out=out)
    with pytest.raises(ValueError, match="K must be a multiple of 16"):
        hopper_fp8.grouped_fp8(fake((8, 520), np.uint8), fake((8, 5), np.float32), _w(fake, k=520),
                               [8, 0, 0, 0], out=fake((8, 256), BF16))  # fmt: skip
    with pytest.raises(ValueError, match="N must be a multiple of 8"):
        hopper_fp8.grouped_fp8(a_q, a_s, _w(fake, n=260), [300, 0, 0, 0], out=fake((300, 260), BF16))
    with pytest.raises(ValueError, match="share a device"):
        hopper_fp8.grouped_fp8(a_q, a_s, _w(fake), [300, 0, 0, 0], out=fake((300, 256), BF16, device=1))
    values = fake((4, 256, 512), np.uint8, device=1)
    elsewhere = cg.FP8ExpertWeights(values, fake((4, 2, 4), np.float32, device=1), "block128", True)
    with pytest.raises(ValueError, match="share a device"):  # the weights on another GPU
        hopper_fp8.grouped_fp8(a_q, a_s, elsewhere, [300, 0, 0, 0], out=out)


def test_grid_is_one_cta_per_sm_at_most_and_never_more_than_tiles():
    assert hopper_fp8.GRID_LIMIT is None
    # 16384 rows over 128 groups, N = 1536: (128 + 128) row tiles x 12 column tiles.
    assert hopper_fp8.grid_size(16384, 1536, 128, 132) == 132
    assert hopper_fp8.grid_size(16, 128, 1, 132) == 2  # hopper.max_tiles: ceil(16 / 128) + 1 groups
    assert hopper_fp8.grid_size(16, 256, 8, 132) == (1 + 8) * 2  # the bound of any 8 sizes summing to 16
    assert hopper_fp8.grid_size(16384, 1536, 128, 132, limit=3) == 3
    with pytest.raises(ValueError, match="at least one CTA"):
        hopper_fp8.grid_size(16, 128, 1, 132, limit=0)


def test_gmm_takes_the_kernel_only_where_it_can(fake, monkeypatch):
    """gmm's choice between the FP8 kernel and the dequantizing fallback, with
    the GPU questions answered by stand-ins."""
    from cublas_grouped.gemm import fp8_gmm
    from cublas_grouped.gemm import gmm as gmm_mod
    from cublas_grouped.gemm.config import Algorithm

    pytest.importorskip("cupy")
    import cupy

    sm = {"value": (9, 0)}
    monkeypatch.setattr(fp8_gmm, "device_info", lambda d: type("Info", (), {"sm": sm["value"]})())
    monkeypatch.setattr(cupy.cuda.runtime, "streamIsCapturing", lambda s: False)
    monkeypatch.setattr(fp8_gmm, "resolve_stream", lambda stream, device: 0)
    a = cg.runtime.arrays.view(fake((300, 512), BF16), "a")

    def runs(w, algorithm=Algorithm.AUTO, out=None, a_v=a):
        executor = gmm_mod.shared_executor(cg.ComputePrecision.FP32, algorithm)
        return fp8_gmm.fp8_kernel_runs(executor, a_v, w, out, None)

    assert runs(_w(fake))
    assert runs(_w(fake), Algorithm.SM90_GROUPED)
    assert not runs(_w(fake), Algorithm.CUBLAS_GROUPED)  # an explicit cuBLAS algorithm: the fallback
    assert not runs(_w(fake, trans_b=False))
    assert not runs(_w(fake, scaling="channel"))
    assert not runs(_w(fake), a_v=cg.runtime.arrays.view(fake((300, 512), np.float16), "a"))
    assert not runs(_w(fake, ptr=0x7F0000000008))  # misaligned values
    assert not runs(_w(fake), out=fake((300, 256), BF16, ptr=0x7F0000000004))
    strided = cg.runtime.arrays.view(fake((300, 512), BF16, strides=(2048, 2)), "a")  # rows 1024 apart
    assert not runs(_w(fake), a_v=strided)
    sm["value"] = (8, 0)
    assert not runs(_w(fake))
    sm["value"] = (9, 0)
    monkeypatch.setattr(cupy.cuda.runtime, "streamIsCapturing", lambda s: True)
    assert not runs(_w(fake))  # capture: the fallback, which refuses it


def _kernel_model(a_q, a_s, w_q, w_s, sizes):
    """The kernel's walk in NumPy: the tile schedule of the 16-bit kernel with
    128-column tiles, per tile the K blocks in order, each a float64 partial
    product of the codes' values scaled by sa[min(row, M - 1)][kb] *
    sb[g][n0 / 128][kb] and added into a float32 accumulator; only rows before
    the group's end and columns before N stored. Unwritten rows stay NaN."""
    m, k = a_q.shape
    e, n, _ = w_q.shape
    a_val = dequantize_ref(a_q, np.ones((m, -(-k // 128)), np.float32), 1, 128).astype(np.float64)
    w_val = dequantize_ref(w_q, np.ones(w_s.shape, np.float32), 128, 128).astype(np.float64)
    out = np.full((m, n), np.nan, np.float32)
    offsets = np.concatenate(([0], np.cumsum(sizes)))
    for g, row0, _rows in hopper.tile_schedule(sizes):
        for n0 in range(0, n, 128):
            rows = np.arange(row0, row0 + 128)
            a_rows = np.where((rows < m)[:, None], a_val[np.minimum(rows, m - 1)], 0.0)  # TMA zeros past M
            cols = np.arange(n0, n0 + 128)
            flat = w_val.reshape(e * n, k)
            b_rows = g * n + cols
            b = np.where((b_rows < e * n)[:, None], flat[np.minimum(b_rows, e * n - 1)], 0.0)
            acc = np.zeros((128, 128), np.float32)
            for kb in range(-(-k // 128)):
                ks = slice(kb * 128, (kb + 1) * 128)
                part = a_rows[:, ks] @ b[:, ks].T
                scale = a_s[np.minimum(rows, m - 1), kb].astype(np.float32) * w_s[g, n0 // 128, kb]
                acc = np.float32(part) * scale[:, None] + acc
            keep_r = rows < min(offsets[g + 1], m)
            keep_c = cols < n
            out[np.ix_(rows[keep_r], cols[keep_c])] = acc[np.ix_(keep_r, keep_c)]
    return out


@pytest.mark.parametrize(
    "sizes, n, k",
    [([0, 1, 5, 219, 0], 136, 272), ([300], 128, 128), ([7, 0, 130], 264, 400), ([0, 0, 0, 2], 8, 16)],
)
def test_kernel_model_matches_the_float64_reference(sizes, n, k):
    """Indexing of the scales (A rows clamped at M - 1, B's block of the tile's
    first column), the K tail, and the row and column masks, on a model of the
    kernel: within fp32 accumulation of the float64 reference, every row written."""
    rng = np.random.default_rng(sum(sizes) + n + k)
    m, e = int(np.sum(sizes)), len(sizes)
    x = rng.standard_normal((m, k)).astype(np.float32) * rng.uniform(0.1, 10, (m, 1)).astype(np.float32)
    w = (rng.standard_normal((e, n, k)) * k**-0.5).astype(np.float32)
    a_q, a_s = quantize_ref(x, 1, 128)
    w_q, w_s = quantize_ref(w, 128, 128)
    ref = grouped_fp8_ref(a_q, a_s, w_q, w_s, sizes)
    got = _kernel_model(a_q, a_s, w_q, w_s, np.asarray(sizes))
    assert not np.isnan(got).any()
    scale = max(np.abs(ref).max(), 1e-30)
    assert np.abs(got - ref).max() / scale < 1e-5
    # And the reference itself: the dequantized operands' product, group by group.
    a64 = dequantize_ref(a_q, a_s, 1, 128).astype(np.float64)
    w64 = dequantize_ref(w_q, w_s, 128, 128).astype(np.float64)
    o = np.cumsum([0, *sizes])
    for g in range(e):
        assert np.allclose(ref[o[g] : o[g + 1]], a64[o[g] : o[g + 1]] @ w64[g].T, rtol=0, atol=1e-12)
    # The quantized operands are close to the originals (what gmm's FP8 path adds to the error).
    exact = np.concatenate(
        [x[o[g] : o[g + 1]].astype(np.float64) @ w[g].T.astype(np.float64) for g in range(e)]
    )
    if m:
        assert np.linalg.norm(ref - exact) / np.linalg.norm(exact) < 0.08


def test_the_fold_fits_its_shared_memory_and_goes_only_where_it_is_taken(monkeypatch):
    """The fold's ring (16 rows of a more a stage), staging areas and largest
    table fit 226 KiB (one group more does not); fold_tiles takes it where
    groups average at least 128 rows, on 128 x 128 tiles of one CTA with the
    overlapped promotion only, and launch_choice carries it; the source
    refuses it with thin tiles, CTA pairs, wide tiles, the serial walk or
    another box, and compiles the fold's swapped m64n16k32 product."""
    limit = 227 * 1024 - 1024
    fold = hopper_fp8.launch_defines(False, fold=True)
    assert {k: v for k, v in fold.items() if hopper_fp8.DEFINES[k] != v} == {
        "FP8_FOLD_ROWS": 16,
        "FP8_TABLE_MAX_GROUPS": hopper_fp8.FOLD_TABLE_MAX_GROUPS,
    }
    most = hopper_fp8.FOLD_TABLE_MAX_GROUPS
    assert hopper_fp8.FOLD_SHARED_BYTES == 6 * (128 + 128 + 16) * 128 + 2 * 64 * 72 * 2 + 1024
    assert (
        hopper_fp8.shared_bytes(most, defines=fold)
        <= limit
        < hopper_fp8.shared_bytes(most, defines=fold) + 12
    )
    assert hopper_fp8.shared_bytes(most + 1, defines=fold) == hopper_fp8.FOLD_SHARED_BYTES
    # Where: Qwen3-30B-A3B (128 experts) and DeepSeek-V3 (256) at 4096 and
    # 16384 tokens (8 pairs each), Mixtral (8 experts, 2 pairs) at 16384; not
    # below 128 rows a group, nor at decode (thin tiles).
    assert hopper_fp8.fold_tiles(32768, 128) and hopper_fp8.fold_tiles(32768, 256)
    assert hopper_fp8.fold_tiles(131072, 128) and hopper_fp8.fold_tiles(32768, 8)
    assert not hopper_fp8.fold_tiles(128 * 256 - 1, 256)
    assert not hopper_fp8.fold_tiles(16 * 8, 128)
    assert hopper_fp8.launch_defines(True, fold=True)["FP8_FOLD_ROWS"] == 0  # thin tiles never fold
    assert hopper_fp8.fold_tiles(128 * 256, 256)  # exactly 128 rows a group
    # A prepared launch's key holds the fold's defines, so that FOLD's A/B prepares anew.
    assert ("FP8_FOLD_ROWS", 16) in hopper_fp8.launch_choice(32768, 128)[1]
    assert ("FP8_FOLD_ROWS", 0) in hopper_fp8.launch_choice(16 * 8, 128)[1]
    # Not with the other forms of the kernel a probe may choose (each refused by the
    # source), nor where a probe's thin-tile bound reaches these rows.
    for name, value in (("WIDE", True), ("THIN_MAX_ROWS_PER_GROUP", 256), ("FOLD", False)):
        with monkeypatch.context() as m:
            m.setattr(hopper_fp8, name, value)
            assert not hopper_fp8.fold_tiles(32768, 128), name
    for define, value in (("FP8_OVERLAP", 0), ("FP8_CLUSTER", 2)):
        with monkeypatch.context() as m:
            m.setitem(hopper_fp8.DEFINES, define, value)
            assert not hopper_fp8.fold_tiles(32768, 128), define
    monkeypatch.setattr(hopper_fp8, "FOLD", False)
    assert ("FP8_FOLD_ROWS", 0) in hopper_fp8.launch_choice(32768, 128)[1]
    text = _ptx(fold)
    # The plain walk's 16 issues of the tile's MMAs, the fold walk's 4 more
    # (one loop, serial), and its 4 steps of the swapped product.
    assert text.count("wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3") == 4 * 4 + 4
    assert text.count("wgmma.mma_async.sync.aligned.m64n16k32.f32.e4m3.e4m3") == 4
    nvrtc_api = pytest.importorskip("cuda.bindings.nvrtc")
    src = nvrtc.load_source(hopper_fp8.SOURCE).encode()
    for change in (
        {"FP8_THIN": 1, "FP8_STAGES": 5},
        {"FP8_CLUSTER": 2, "FP8_A_BOX_ROWS": 16},
        {"FP8_BLOCK_N": 192, "FP8_STAGES": 5},
        {"FP8_OVERLAP": 0},
        {"FP8_A_BOX_ROWS": 32},
        {"FP8_FOLD_ROWS": 8},
    ):
        err, prog = nvrtc_api.nvrtcCreateProgram(src, b"fp8.cu", 0, [], [])
        opts = [b"--gpu-architecture=sm_90a", b"-std=c++17"]
        opts += [f"-D{k}={v}".encode() for k, v in {**fold, **change}.items()]
        (err,) = nvrtc_api.nvrtcCompileProgram(prog, len(opts), opts)
        nvrtc_api.nvrtcDestroyProgram(prog)
        assert err != nvrtc_api.nvrtcResult.NVRTC_SUCCESS, change
