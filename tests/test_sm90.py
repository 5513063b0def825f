"""The sm90 back end on the CPU: its tile schedule against a model written
differently, and which plans it takes."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import cublas_grouped as cg
from cublas_grouped.gemm.backends import hopper
from cublas_grouped.gemm.plan import GemmPlan
from cublas_grouped.runtime import nvrtc


def test_tile_schedule_hand_worked():
    # 64-row tiles: 5 rows (one partial tile), 130 rows from row 5 (two full, one
    # of 2), 64 rows from row 135 (one full); empty groups get none.
    got = hopper.tile_schedule(np.array([0, 5, 0, 130, 64]), block_m=64)
    assert got.tolist() == [[1, 0, 5], [3, 5, 64], [3, 69, 64], [3, 133, 2], [4, 135, 64]]
    assert hopper.tile_schedule(np.zeros(7, np.int64)).shape == (0, 3)
    assert hopper.tile_schedule(np.array([-3, 2])).tolist() == [[1, 0, 2]]  # negative counts as 0
    one = hopper.tile_schedule(np.array([0, 100_000, 0]), block_m=128)
    assert len(one) == -(-100_000 // 128) and set(one[:, 0]) == {1}
    assert one[-1].tolist() == [1, 99_968, 32]
    assert hopper.BLOCK_M == 128  # the kernel's tile (two math warpgroups of 64 rows)


def test_masked_tile_schedule_hand_worked():
    # Capacity 100, 64-row tiles: group 0 has 5 rows at 0 (one tile of 5);
    # group 1 none; group 2 asks 250 but holds 100, at row 200 (64 + 36);
    # group 3 has 64 at row 300; negative counts as 0.
    got = hopper.tile_schedule(np.array([5, 0, 250, 64, -1]), block_m=64, capacity=100)
    assert got.tolist() == [[0, 0, 5], [2, 200, 64], [2, 264, 36], [3, 300, 64]]
    # No tile reaches past its group's block, whatever the counts ask.
    sizes = np.random.default_rng(3).integers(-5, 400, 50)
    for g, first, rows in hopper.tile_schedule(sizes, capacity=300):
        assert g * 300 <= first and first + rows <= g * 300 + min(max(sizes[g], 0), 300)
    assert len(hopper.tile_schedule(sizes, capacity=300)) <= 50 * -(-300 // hopper.BLOCK_M)


def _kernel_model(sizes, block_m):
    """The kernel's own steps: prefix sums, then per CTA a search for the last
    group whose tile offset is <= the CTA's tile."""
    sizes = np.maximum(sizes, 0)
    row_offsets = np.concatenate(([0], np.cumsum(sizes)))
    tile_offsets = np.concatenate(([0], np.cumsum((sizes + block_m - 1) // block_m)))
    out = []
    for tile in range(hopper.max_tiles(int(row_offsets[-1]), len(sizes))):
        if tile >= tile_offsets[-1]:
            continue  # the CTA exits
        g = int(np.searchsorted(tile_offsets[:-1], tile, side="right") - 1)
        first = row_offsets[g] + (tile - tile_offsets[g]) * block_m
        out.append([g, int(first), int(min(block_m, row_offsets[g + 1] - first))])
    return out


@pytest.mark.parametrize("seed", range(6))
def test_tile_schedule_covers_every_row_once(seed):
    rng = np.random.default_rng(seed)
    experts = [1, 8, 128, 1024, 1024, 3][seed]
    sizes = rng.integers(0, 300, experts)
    sizes[rng.random(experts) < 0.3] = 0
    got = hopper.tile_schedule(sizes)
    assert got.tolist() == _kernel_model(sizes, hopper.BLOCK_M)
    covered = np.zeros(int(sizes.sum()), np.int64)
    for g, first, rows in got:
        assert 0 < rows <= hopper.BLOCK_M
        covered[first : first + rows] += 1
        assert first >= sizes[:g].sum() and first + rows <= sizes[: g + 1].sum()  # inside its group
    assert (covered == 1).all()
    assert len(got) <= hopper.max_tiles(int(sizes.sum()), experts)


def _plan(trans_a=False, trans_b=True, n=256, k=512):
    empty = np.zeros(0, np.int64)
    return GemmPlan(4, 100, n, k, trans_a, trans_b, empty, np.zeros(1, np.int64), empty)


def test_which_plans_it_takes():
    bf16 = np.dtype(ml_dtypes.bfloat16)
    assert hopper.unsupported((9, 0), bf16, _plan()) is None
    assert hopper.unsupported((9, 0), np.float16, _plan()) is None
    assert hopper.unsupported((8, 0), bf16, _plan()) == "needs an SM 9.0 GPU (Hopper); this one is SM 8.0"
    assert hopper.unsupported((10, 0), bf16, _plan()).startswith("needs an SM 9.0 GPU")
    assert hopper.unsupported((9, 0), np.float32, _plan()) == "takes bfloat16 or float16; got float32"
    assert hopper.unsupported((9, 0), bf16, _plan(trans_a=True, trans_b=False)) == (
        "does not run the K-grouped product (trans_a)"
    )
    assert hopper.unsupported((9, 0), bf16, _plan(trans_b=False)) is None  # [E, K, N]: the nn kernels
    assert hopper.unsupported((9, 0), np.float16, _plan(trans_b=False, n=8, k=8)) is None
    assert hopper.unsupported((9, 0), bf16, _plan(trans_b=False, n=12)).endswith("got K=512, N=12")
    assert hopper.unsupported((9, 0), bf16, _plan(n=260)).startswith("needs K and N to be multiples of 8")
    assert hopper.unsupported((9, 0), bf16, _plan(k=12)).endswith("got K=12, N=256")
    assert hopper.unsupported((9, 0), bf16, _plan(n=8, k=8)) is None


def test_launch_constants_agree():
    # The ring, two staging areas of 64 rows at the kernel's pitch, the alignment.
    source = nvrtc.load_source("grouped_gemm_sm90")
    assert f"#define SM90_C_PITCH {hopper.C_PITCH}\n" in source
    assert hopper.SHARED_BYTES == hopper.STAGES * (128 + 256) * 64 * 2 + 2 * 64 * hopper.C_PITCH * 2 + 1024
    assert hopper.SHARED_BYTES <= 227 * 1024  # the H100's opt-in limit per block
    # With the largest schedule table (v14), the wide and the narrow tiles still fit.
    table = 4 * (3 * hopper.TABLE_MAX_GROUPS + 1)
    assert hopper.shared_bytes(4, 256, hopper.TABLE_MAX_GROUPS) == hopper.SHARED_BYTES + table <= 227 * 1024
    assert hopper.shared_bytes(6, 128, hopper.TABLE_MAX_GROUPS) <= 227 * 1024
    assert hopper.shared_bytes(4, 256, hopper.TABLE_MAX_GROUPS + 1) == hopper.SHARED_BYTES  # no table
    assert hopper.DEFINES == {
        "SM90_BLOCK_M": hopper.BLOCK_M,
        "SM90_BLOCK_N": hopper.BLOCK_N,
        "SM90_BLOCK_K": hopper.BLOCK_K,
        "SM90_STAGES": hopper.STAGES,
        "SM90_TILE_THREADS": hopper.TILE_THREADS,
        "SM90_A_BOX_ROWS": hopper.A_BOX_ROWS,
        "SM90_TABLE_MAX_GROUPS": hopper.TABLE_MAX_GROUPS,
        "SM90_THIN": 0,
        "SM90_FOLD_ROWS": 0,  # set per launch where the fold pays
        "SM90_SMALL_A_ROWS": hopper.SMALL_A_ROWS,  # a's small boxes up to this many rows
    }


def test_a_refused_shared_memory_limit_is_an_error(monkeypatch):
    """Above 48 KiB a launch needs the opt-in; if the driver refuses it, say so."""
    import types

    from cuda.bindings import driver

    calls = []

    def refuse(attribute, value, kernel, device):
        calls.append((attribute, value, device))
        return (driver.CUresult.CUDA_ERROR_INVALID_VALUE,)

    monkeypatch.setattr(driver, "cuKernelSetAttribute", refuse)
    monkeypatch.setattr(hopper, "_shared_set", set())
    kernel = types.SimpleNamespace(handle=driver.CUkernel())
    with pytest.raises(RuntimeError, match=f"could not allow {hopper.SHARED_BYTES} bytes of shared memory"):
        hopper._allow_shared_memory(kernel, 0)
    assert calls and calls[0][1] == hopper.SHARED_BYTES
    monkeypatch.setattr(driver, "cuKernelSetAttribute", lambda *a: (driver.CUresult.CUDA_SUCCESS,))
    hopper._allow_shared_memory(kernel, 0)
    hopper._allow_shared_memory(kernel, 0)  # once per kernel and device: the second call asks nothing
    assert len(hopper._shared_set) == 1


def test_weights_layouts_and_their_tensor_maps():
    """[E, N, K] weights: one 2-D map, a box of a tile's N rows; [E, K, N]: a 3-D
    map (a K tail reads zeros, not the next group), boxes of 64 columns."""
    nt, nn = _plan(n=392, k=200), _plan(trans_b=False, n=392, k=200)
    assert hopper.weights_layout(nt.trans_b) == "nt" and hopper.weights_layout(nn.trans_b) == "nn"
    assert hopper.b_map_shape(4, 392, 200, nt.trans_b) == ((4 * 392, 200), (hopper.BLOCK_N, hopper.BLOCK_K))
    assert hopper.b_map_shape(4, 392, 200, nn.trans_b) == ((4, 200, 392), (1, hopper.BLOCK_K, hopper.B_SPAN))
    # 64 16-bit columns are the 128 bytes of the swizzle; the boxes tile BLOCK_N.
    assert hopper.B_SPAN * 2 == 128 and hopper.BLOCK_N % hopper.B_SPAN == 0


@pytest.mark.parametrize(
    "act, gather, block_n",
    [(act, gather, 256) for act in (None, "silu", "gelu", "relu") for gather in (False, True)]
    + [(None, False, 128), (None, True, 128), ("thin", False, 256), ("thin-row-scale", False, 256)]
    + [("thin-row-scale-prefetch", False, 256), ("row-scale-prefetch", False, 256)],
)
def test_ptxas_keeps_the_wgmma_pipeline_and_spills_nothing(act, gather, block_n):
    """ptxas's verbose report of every sm90 kernel, plain and with each gated
    epilogue, with a's rows from TMA and gathered by cp.async (SM90_GATHER_A),
    the 128-column tiles (SM90_BLOCK_N=128, 6 stages: wgmma n128), and the
    thin tiles (SM90_THIN, plain and with the row-scale epilogue), and a
    layer's GEMM 2 prefetching its weights before it waits (SM90_PREFETCH_B):
    no local-memory spills, no note C7520 (wgmma serialized: each MMA waits
    for the one before, as a branch on accumulator values in the epilogue
    once caused in the bf16 kernels), and at most 168 registers (384
    threads in one CTA per SM)."""
    from cublas_grouped.moe.kernels import ACTIVATIONS

    defines = dict(hopper.DEFINES)
    if act is not None and ("thin" in act or "prefetch" in act):
        if act.startswith("thin"):
            defines.update(SM90_THIN=1, SM90_STAGES=5, SM90_TABLE_MAX_GROUPS=597)
        if "row-scale" in act:
            defines["SM90_EPILOGUE_ROW_SCALE"] = 1
        if act.endswith("prefetch"):
            defines["SM90_PREFETCH_B"] = 1
    elif act is not None:
        defines.update(
            {f"ACT_{n.upper()}": c for n, c in ACTIVATIONS.items()}, SM90_EPILOGUE_ACT=ACTIVATIONS[act]
        )
    if gather:
        defines["SM90_GATHER_A"] = 1
    if block_n != hopper.BLOCK_N:
        defines.update(SM90_BLOCK_N=block_n, SM90_STAGES=6)
    _assert_pipeline_kept(defines)


def _assert_pipeline_kept(defines):
    """Compile the kernel source under ``defines`` and read ptxas's report:
    every GEMM entry compiled, no note C7520 or C7515 (wgmma serialized), no
    spills, at most 168 registers a thread."""
    import re

    from cuda.core import Program, ProgramOptions

    from cublas_grouped.runtime import nvrtc

    macros = [(name, str(value)) for name, value in defines.items()]
    options = ProgramOptions(arch=hopper.ARCH, std="c++17", define_macro=macros, ptxas_options="-v")
    program = Program(nvrtc.load_source("grouped_gemm_sm90"), code_type="c++", options=options)

    class Log:
        text = ""

        def write(self, chunk):
            self.text += chunk

    log = Log()
    program.compile("cubin", logs=log)
    report = log.text
    for kernel in ("nt_bf16", "nt_f16", "nn_bf16", "nn_f16"):
        assert f"Compiling entry function 'grouped_gemm_{kernel}'" in report
    assert "C7520" not in report and "C7515" not in report, report
    assert "spill stores" in report and not any(
        "spill" in line and not line.strip().endswith("0 bytes spill stores, 0 bytes spill loads")
        for line in report.splitlines()
    ), report
    registers = [int(n) for n in re.findall(r"Used (\d+) registers", report)]
    # Four GEMMs and the offsets kernel for int32 and int64 sizes.
    assert len(registers) == 6 and max(registers) <= 168, report


@pytest.mark.parametrize("variant", ["plain", "skip-idle-silu", "row-scale-prefetch"])
def test_the_fold_keeps_the_wgmma_pipeline(variant):
    """v15's fold (SM90_FOLD_ROWS=16: two forms of the K walk, the fold's
    m64n16 wgmmas, setmaxnreg 40 / 232) under the defines the layer's GEMMs
    take at prefill: ptxas serializes no wgmma and spills nothing (the first
    draft, with an MMA in flight where the two walks joined, drew note C7515
    on every GEMM)."""
    from cublas_grouped.gemm.backends import hopper_variants as V
    from cublas_grouped.moe.kernels import ACTIVATIONS

    defines = V.fold_defines(hopper.DEFINES, None, 256, 1)
    assert defines["SM90_FOLD_ROWS"] == V.FOLD_ROWS == hopper.A_BOX_ROWS
    if variant == "skip-idle-silu":
        codes = {f"ACT_{n.upper()}": c for n, c in ACTIVATIONS.items()}
        defines.update(codes, SM90_SKIP_IDLE=1, SM90_EPILOGUE_ACT=ACTIVATIONS["silu"])
    elif variant == "row-scale-prefetch":
        defines.update(SM90_EPILOGUE_ROW_SCALE=1, SM90_PREFETCH_B=1, SM90_SKIP_IDLE=1)
    _assert_pipeline_kept(defines)


def test_the_fold_fits_its_shared_memory_and_goes_only_where_it_is_taken():
    """The fold's ring (16 rows of a more a stage), staging areas and largest
    table fit 226 KiB (one group more does not); fold_defines keeps it for
    128-row tiles of 256 columns from the rule's lower to its upper end,
    keeps a probe's lower limits, and drops it for thin or 128-column tiles
    and a row gather at rows it would fold; each of the rule's constants is
    part of choice_key; the source refuses it there and at another row count."""
    from cuda.core import Program, ProgramOptions

    from cublas_grouped.gemm.backends import hopper_variants as V
    from cublas_grouped.runtime import nvrtc

    limit = 227 * 1024 - 1024
    most = V.FOLD_TABLE_MAX_GROUPS
    ring = {"table_max": most + 1, "fold": 16}
    assert hopper.shared_bytes(4, 256, most, **ring) <= limit < hopper.shared_bytes(4, 256, most + 1, **ring)
    base = hopper.DEFINES
    rule = V.FOLD_MAX_ROWS_PER_GROUP
    assert rule > 0 and base["SM90_FOLD_ROWS"] == 0
    kept = V.fold_defines(base, None, rule * 8, 8)  # groups averaging the rule's rows: folded
    assert kept["SM90_FOLD_ROWS"] == 16 and kept["SM90_TABLE_MAX_GROUPS"] == most
    # Where it folds, a tile of more than 16 rows of its group loads a's whole box.
    assert kept["SM90_SMALL_A_ROWS"] == V.FOLD_SMALL_A_ROWS == 16 and base["SM90_SMALL_A_ROWS"] == 64
    lowest = V.fold_defines(base, None, V.FOLD_MIN_ROWS_PER_GROUP * 8, 8)  # the rule's lower end: folded
    assert lowest["SM90_FOLD_ROWS"] == 16
    # A probe's lower table limit or smaller boxes' bound stays (the fold only lowers them).
    probe = V.fold_defines({**base, "SM90_TABLE_MAX_GROUPS": 100, "SM90_SMALL_A_ROWS": 0}, None, rule * 8, 8)
    assert (
        probe["SM90_FOLD_ROWS"] == 16
        and probe["SM90_TABLE_MAX_GROUPS"] == 100
        and probe["SM90_SMALL_A_ROWS"] == 0
    )
    gather = V.RowGather(src=1, top_k=2, rows=3)
    for left in (
        V.fold_defines(base, None, rule * 8 + 1, 8),  # one row more: not folded
        V.fold_defines(base, None, V.FOLD_MIN_ROWS_PER_GROUP * 8 - 1, 8),  # less than a tile a group
        # Rows the rule folds, in tiles the fold does not take.
        V.fold_defines({**base, "SM90_THIN": 1}, None, rule * 8, 8),
        V.fold_defines({**base, "SM90_BLOCK_N": 128}, None, rule * 8, 8),
        V.fold_defines(base, gather, rule * 8, 8),
    ):
        assert left["SM90_FOLD_ROWS"] == 0 and left["SM90_SMALL_A_ROWS"] == 64
    # Each of the rule's constants is part of the prepared launches' key (a probe's A/B prepares anew).
    key = V.choice_key(base)
    for name in ("FOLD_MAX_ROWS_PER_GROUP", "FOLD_MIN_ROWS_PER_GROUP", "FOLD_ROWS", "FOLD_SMALL_A_ROWS"):
        with pytest.MonkeyPatch.context() as m:
            m.setattr(V, name, getattr(V, name) + 1)
            assert V.choice_key(base) != key, name
    # The layer's prefill launches at 4096 tokens take it (Qwen3-30B-A3B, DeepSeek-V3), 16384 not.
    assert V.kernel_defines(base, False, 4096 * 8, 128, None, None)["SM90_FOLD_ROWS"] == 16
    assert V.kernel_defines(base, False, 16384 * 8, 128, None, None)["SM90_FOLD_ROWS"] == 0
    # The thin tiles a decode launch chooses drop it before they compile.
    thin = V.kernel_defines(base, True, 16, 8, None, None)
    assert thin["SM90_THIN"] == 1 and thin["SM90_FOLD_ROWS"] == 0
    for extra in ({"SM90_THIN": 1, "SM90_STAGES": 5}, {"SM90_GATHER_A": 1}, {"SM90_FOLD_ROWS": 8}):
        macros = [(k, str(v)) for k, v in {**kept, **extra}.items()]
        options = ProgramOptions(arch=hopper.ARCH, std="c++17", define_macro=macros)
        with pytest.raises(Exception, match=r"SM90_FOLD_ROWS \(v15\) must equal SM90_A_BOX_ROWS"):
            Program(nvrtc.load_source("grouped_gemm_sm90"), code_type="c++", options=options).compile("cubin")


def test_thin_tiles_fit_their_shared_memory_and_refuse_what_they_do_not_take():
    """The thin tiles' ring, staging areas and largest schedule table fit the
    227 KiB opt-in less 1 KiB for the kernel's static shared memory (one group
    more does not); the source refuses them with the gated epilogue, a row
    gather, v12 or 128-column tiles."""
    from cuda.core import Program, ProgramOptions

    from cublas_grouped.gemm.backends import hopper_variants as V
    from cublas_grouped.moe.kernels import ACTIVATIONS
    from cublas_grouped.runtime import nvrtc

    limit = 227 * 1024 - 1024
    table_max = V.THIN_TABLE_MAX_GROUPS
    ring = {"thin": 1, "table_max": table_max + 1}
    assert hopper.shared_bytes(V.THIN_STAGES, 256, table_max, **ring) <= limit
    assert hopper.shared_bytes(V.THIN_STAGES, 256, table_max + 1, **ring) > limit
    thin = {**hopper.DEFINES, "SM90_THIN": 1, "SM90_STAGES": 5, "SM90_TABLE_MAX_GROUPS": table_max}
    codes = {f"ACT_{n.upper()}": c for n, c in ACTIVATIONS.items()}
    for extra in (
        {**codes, "SM90_EPILOGUE_ACT": 1},
        {"SM90_GATHER_A": 1},
        {"SM90_SKIP_IDLE": 1},
        {"SM90_BLOCK_N": 128},
    ):
        macros = [(k, str(v)) for k, v in {**thin, **extra}.items()]
        options = ProgramOptions(arch=hopper.ARCH, std="c++17", define_macro=macros)
        with pytest.raises(Exception, match=r"thin tiles \(SM90_THIN\) need SM90_BLOCK_N=256"):
            Program(nvrtc.load_source("grouped_gemm_sm90"), code_type="c++", options=options).compile("cubin")


def test_narrow_tiles_issue_n128_and_refuse_the_fused_epilogue():
    """SM90_BLOCK_N=128 selects the m64n128k16 MMA (its own wrapper) and the
    source refuses it with the gated epilogue, which needs 256-column tiles
    (gate and up of the same 128 outputs in one tile)."""
    from cuda.core import Program, ProgramOptions

    from cublas_grouped.moe.kernels import ACTIVATIONS
    from cublas_grouped.runtime import nvrtc

    src = nvrtc.load_source("grouped_gemm_sm90")
    assert "wgmma.mma_async.sync.aligned.m64n128k16.f32." in src
    assert "#if defined(SM90_EPILOGUE_ACT) && SM90_BLOCK_N != 256" in src
    assert hopper.shared_bytes(6, 128) <= 227 * 1024 < hopper.shared_bytes(6, 256)
    assert hopper.b_map_shape(4, 392, 200, True, 128) == ((4 * 392, 200), (128, hopper.BLOCK_K))
    defines = {**hopper.DEFINES, "SM90_BLOCK_N": 128, "SM90_STAGES": 6}
    defines.update({f"ACT_{n.upper()}": c for n, c in ACTIVATIONS.items()}, SM90_EPILOGUE_ACT=1)
    options = ProgramOptions(
        arch=hopper.ARCH, std="c++17", define_macro=[(k, str(v)) for k, v in defines.items()]
    )
    with pytest.raises(Exception, match="needs SM90_BLOCK_N=256"):
        Program(src, code_type="c++", options=options).compile("cubin")


def test_tensor_maps_are_cached_per_key_and_bounded(monkeypatch):
    """A descriptor is built once per (device, pointer, shape, strides, dtype,
    box); any change builds a new one; the least recently used go first."""
    from collections import OrderedDict

    built = []

    def fake(ptr, shape, box, dtype, promotion):
        built.append((ptr, shape, box, np.dtype(dtype).name, promotion))
        return object()

    from cublas_grouped.gemm.backends import tma

    monkeypatch.setattr(tma, "tiled_map", fake)
    monkeypatch.setattr(tma, "_maps", OrderedDict())
    bf16 = ml_dtypes.bfloat16
    first = hopper.tensor_map(0x1000, (300, 512), (128, 64), bf16, 0)
    assert hopper.tensor_map(0x1000, [300, 512], (128, 64), bf16, 0) is first  # a hit builds nothing
    assert built == [(0x1000, (300, 512), (128, 64), "bfloat16", tma.L2_PROMOTION)]
    changed = [
        (0x2000, (300, 512), (128, 64), bf16, 0),  # another pointer
        (0x1000, (301, 512), (128, 64), bf16, 0),  # another shape (rows)
        (0x1000, (300, 520), (128, 64), bf16, 0),  # another shape (and strides)
        (0x1000, (300, 512), (256, 64), bf16, 0),  # another box
        (0x1000, (300, 512), (128, 64), np.float16, 0),  # another dtype
        (0x1000, (300, 512), (128, 64), bf16, 1),  # another device
        (0x1000, (1, 300, 512), (1, 64, 64), bf16, 0),  # another rank
    ]
    maps = [hopper.tensor_map(*args) for args in changed]
    # Another L2 promotion is another descriptor, built with it.
    default = tma.L2_PROMOTION
    other = next(p for p in tma.L2_PROMOTIONS if p != default)
    monkeypatch.setattr(tma, "L2_PROMOTION", other)
    maps.append(hopper.tensor_map(0x1000, (300, 512), (128, 64), bf16, 0))
    assert built[-1] == (0x1000, (300, 512), (128, 64), "bfloat16", other)
    monkeypatch.setattr(tma, "L2_PROMOTION", default)
    assert len(built) == 2 + len(changed)
    assert len({id(m) for m in [first, *maps]}) == 2 + len(changed)
    # The bound: filling the cache drops the least recently used entry first.
    monkeypatch.setattr(tma, "MAP_CACHE_SIZE", 3)
    monkeypatch.setattr(tma, "_maps", OrderedDict())
    a = hopper.tensor_map(1, (8, 8), (8, 8), bf16, 0)
    hopper.tensor_map(2, (8, 8), (8, 8), bf16, 0)
    hopper.tensor_map(3, (8, 8), (8, 8), bf16, 0)
    assert hopper.tensor_map(1, (8, 8), (8, 8), bf16, 0) is a  # 1 is now the most recent
    hopper.tensor_map(4, (8, 8), (8, 8), bf16, 0)  # drops 2
    assert len(tma._maps) == 3
    count = len(built)
    assert hopper.tensor_map(1, (8, 8), (8, 8), bf16, 0) is a and len(built) == count
    hopper.tensor_map(2, (8, 8), (8, 8), bf16, 0)
    assert len(built) == count + 1  # 2 was dropped: built again


def test_grid_per_schedule():
    """per_tile: one CTA per possible tile; persistent: at most CTAS_PER_SM per
    SM (or the test limit), never more CTAs than tiles, never zero."""
    assert hopper.SCHEDULE == "persistent" and hopper.GRID_LIMIT is None  # the default the library runs
    assert hopper.grid_size(1000, 132, "per_tile") == 1000
    assert hopper.grid_size(1000, 132, "persistent") == 132 * hopper.CTAS_PER_SM
    assert hopper.grid_size(40, 132, "persistent") == 40  # fewer tiles than SMs: no idle CTAs launched
    assert hopper.grid_size(1000, 132, "persistent", limit=3) == 3
    assert hopper.grid_size(2, 132, "persistent", limit=3) == 2
    assert hopper.grid_size(0, 132, "persistent") == 1 and hopper.grid_size(0, 132, "per_tile") == 1
    with pytest.raises(ValueError, match="schedule must be one of"):
        hopper.grid_size(10, 132, "stream_k")
    with pytest.raises(ValueError, match="at least one CTA"):
        hopper.grid_size(10, 132, "persistent", limit=0)
    # One CTA per SM: two would not fit the shared memory (227 KiB) or the
    # registers (65,536 per SM at 160 per thread of 384).
    assert hopper.CTAS_PER_SM == 1 and 2 * hopper.SHARED_BYTES > 227 * 1024


@pytest.mark.parametrize("grid", [1, 3, 7, 132])
def test_persistent_walk_covers_every_tile_once_in_order(grid):
    """The kernel's tile hand-out, modelled: CTA x takes tile x first, then
    grid + the counter's next value whenever it is free (CTAs free up in a
    random order here, as on the GPU). Every tile of the schedule (row tiles
    times column tiles) is taken by exactly one CTA, each CTA's tiles come in
    schedule order, and the counter ends at the number of tiles."""
    rng = np.random.default_rng(grid)
    sizes = rng.integers(0, 400, 37)
    n_tiles = 3
    total = len(hopper.tile_schedule(sizes)) * n_tiles
    ctas = hopper.grid_size(hopper.max_tiles(int(sizes.sum()), len(sizes)) * n_tiles, 132, limit=grid)
    taken = np.zeros(total, np.int64)
    mine = {cta: [cta] for cta in range(ctas) if cta < total}
    counter = 0
    running = list(mine)
    while running:
        cta = running[rng.integers(len(running))]  # whichever CTA frees up next
        tile, counter = ctas + counter, counter + 1
        if tile < total:
            mine[cta].append(tile)
        else:
            running.remove(cta)
    for tiles in mine.values():
        assert tiles == sorted(tiles)
        taken[tiles] += 1
    assert (taken == 1).all()
    # One draw per tile loaded (the first tiles included): the counter ends at
    # the tile count, what the GPU test checks after a launch.
    assert counter == total


def test_misaligned_names_the_operand():
    """TMA reads and the 16-byte epilogue stores need 16-byte aligned operands."""
    assert hopper.ALIGNMENT == 16
    assert hopper.misaligned(0, 256, 1 << 20) is None
    assert hopper.misaligned(2, 256, 1 << 20) == "needs a at a 16-byte aligned address"
    assert hopper.misaligned(0, 264, 0) == "needs b at a 16-byte aligned address"
    assert hopper.misaligned(16, 32, 8) == "needs out at a 16-byte aligned address"
    assert hopper.misaligned(1, 1, 1).startswith("needs a ")  # the first one named


def test_plan_misaligned_is_the_shared_rule():
    from cublas_grouped.gemm import executor
    from cublas_grouped.gemm.plan import misaligned

    assert misaligned(0, 16, 32, 16) is None
    assert misaligned(0, 16, 36, 4) is None
    assert misaligned(0, 16, 36, 16) == "needs out at a 16-byte aligned address"
    assert executor.POINTER_ARRAY_ALIGNMENT == 16
    assert executor._POINTER_ARRAY_ALGORITHMS == {cg.Algorithm.CUBLAS_GROUPED, cg.Algorithm.CHUNKED_BATCHED}


def test_the_streams_schedule_buffer_is_sized_once_for_1024_groups():
    """gmm's schedule buffer (per stream) is asked at the size of 1024 groups
    from the first call, so calls with up to 1024 groups never move it under a
    graph captured before; more groups ask more. A caller's own storage is used
    as given."""
    from cublas_grouped.moe.checks import MAX_EXPERTS

    asked = []

    class Buffer:
        def view(self, dtype):
            return np.zeros(10_000, np.int32)

    class Res:
        def buffer(self, name, nbytes):
            asked.append((name, nbytes))
            return Buffer()

    assert hopper.STREAM_SCHEDULE_GROUPS == MAX_EXPERTS
    for e in (1, 8, 1024):
        hopper.schedule_buffers(Res(), e)
    hopper.schedule_buffers(Res(), 2000)
    want = 4 * hopper.schedule_ints(1024)
    assert asked == [("sm90-offsets", want)] * 3 + [("sm90-offsets", 4 * hopper.schedule_ints(2000))]
    storage = np.zeros(hopper.schedule_ints(5), np.int32)
    views = hopper.schedule_buffers(Res(), 5, storage)
    assert [len(v) for v in views] == [6, 5, 6, 2] and len(asked) == 4
    assert hopper.schedule_ints(5) == 19 == sum(len(v) for v in views), "two tile counters at the end"
    base = 0x1000
    assert hopper.schedule_addresses(base, 5) == (base, base + 24, base + 44, base + 68)
    assert hopper.schedule_addresses(base, 5, 1)[3] == base + 72 == base + 4 * (hopper.schedule_ints(5) - 1)


@pytest.mark.parametrize("other", ["SM90_EPILOGUE_ACT", "SM90_GATHER_A"])
def test_row_scale_epilogue_refuses_the_first_gemms_variants(other):
    """SM90_EPILOGUE_ROW_SCALE (GEMM 2's weighting epilogue) does not compile
    with the gated epilogue or the row gather (GEMM 1's), with its message;
    alone it compiles."""
    from cuda.core import Program, ProgramOptions

    from cublas_grouped.moe.kernels import ACTIVATIONS
    from cublas_grouped.runtime import nvrtc

    src = nvrtc.load_source("grouped_gemm_sm90")
    acts = {f"ACT_{n.upper()}": c for n, c in ACTIVATIONS.items()}

    def compile_with(defines):
        macros = [(k, str(v)) for k, v in {**hopper.DEFINES, **acts, **defines}.items()]
        options = ProgramOptions(arch=hopper.ARCH, std="c++17", define_macro=macros)
        return Program(src, code_type="c++", options=options).compile("cubin")

    with pytest.raises(Exception, match="SM90_EPILOGUE_ROW_SCALE is GEMM 2's epilogue"):
        compile_with({"SM90_EPILOGUE_ROW_SCALE": 1, other: 1})
    assert compile_with({"SM90_EPILOGUE_ROW_SCALE": 1}) is not None


def test_l2_promotion_names_its_bytes():
    """The map builder takes only the promotions TMA has, and says which."""
    from cuda.core._tensor_map import TensorMapL2Promotion as P

    from cublas_grouped.gemm.backends import tma

    assert [tma._promotion(P, b) for b in tma.L2_PROMOTIONS] == [P.NONE, P.L2_64B, P.L2_128B, P.L2_256B]
    with pytest.raises(ValueError, match=r"L2 promotion must be one of \(0, 64, 128, 256\) bytes; got 512"):
        tma._promotion(P, 512)


@pytest.mark.parametrize("fast", [None, 1, 0])
def test_the_gated_epilogue_takes_silu_from_fast_intrinsics(fast):
    """The gated epilogue's SiLU uses ex2.approx and an approximate division by
    default (SM90_FAST_ACT unset or 1), the IEEE division only with
    SM90_FAST_ACT=0: in the bf16 kernel that division compiled to a guarded
    slow-path call per element and made GEMM 1 12-25% slower at prefill
    (docs/kernel-notes.md). Read from NVRTC's PTX of every GEMM entry."""
    pytest.importorskip("cuda.bindings")
    from test_overlapped_launches import _entries, _ptx

    from cublas_grouped.moe.kernels import ACTIVATIONS

    defines = {**hopper.DEFINES, **{f"ACT_{n.upper()}": c for n, c in ACTIVATIONS.items()}}
    defines["SM90_EPILOGUE_ACT"] = ACTIVATIONS["silu"]
    defines.pop("SM90_FAST_ACT", None)
    if fast is not None:
        defines["SM90_FAST_ACT"] = fast
    entries = _entries(_ptx("grouped_gemm_sm90", hopper.ARCH, defines))
    gemms = {name: "\n".join(lines) for name, lines in entries.items() if name.startswith("grouped_gemm_")}
    assert len(gemms) == 4
    for name, body in gemms.items():
        if fast == 0:
            assert "div.rn.f32" in body, name
        else:
            assert "div.rn.f32" not in body and "ex2.approx" in body and "div.approx.f32" in body, name
