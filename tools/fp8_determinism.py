"""Development probe: is the FP8 decode layer bitwise deterministic across its variants?

Qwen3-30B-A3B at 16 and 64 tokens, uniform routing: thin tiles on and off
(``hopper_fp8.THIN``) times the fused and separate quantization
(``fp8_step.FUSE_QUANTIZE``), two layer instances each, 20 eager steps each;
prints how many steps equal the instance's first and how many elements
differ from the first configuration's output (all must be 20/20 and 0).

    PYTHONPATH=. python3 tools/fp8_determinism.py
"""

import cupy
import ml_dtypes

import cublas_grouped as cg
from cublas_grouped.gemm.backends import hopper_fp8
from cublas_grouped.moe import fp8_step
from cublas_grouped.tools.bench import workloads as W

BF16 = ml_dtypes.bfloat16
for name, tokens in (("qwen3-30b-a3b", 16), ("qwen3-30b-a3b", 64)):
    s = W.MODELS[name]
    w1 = (
        cupy.random.standard_normal((s.experts, 2 * s.inter, s.hidden), dtype=cupy.float32) * s.hidden**-0.5
    ).astype(BF16)
    w2 = (
        cupy.random.standard_normal((s.experts, s.hidden, s.inter), dtype=cupy.float32) * s.inter**-0.5
    ).astype(BF16)
    q1, q2 = cg.quantize_fp8(w1, trans_b=True), cg.quantize_fp8(w2, trans_b=True)
    case = W.Case(name, tokens, s.experts, s.top_k, s.hidden, s.inter, "uniform")
    weights, ids = W.make_routing(case, seed=0)
    x = cupy.random.standard_normal((tokens, s.hidden), cupy.float32).astype(BF16)
    ids_d, w_d = cupy.asarray(ids, dtype=cupy.int32), cupy.asarray(weights, dtype=cupy.float32)
    ref = None
    for thin in (True, False):
        for fused in (True, False):
            hopper_fp8.THIN, fp8_step.FUSE_QUANTIZE = thin, fused
            for inst in range(2):
                layer = cg.FixedCapacityMoE(q1, q2, s.top_k, tokens, trans_b=True, graphs=False)
                outs = [layer.forward(x, ids_d, w_d).copy() for _ in range(20)]
                cupy.cuda.Device().synchronize()
                first = outs[0].view(cupy.uint16)
                if ref is None:
                    ref = first.copy()
                same_runs = sum(bool(cupy.all(o.view(cupy.uint16) == first)) for o in outs)
                diff = int(cupy.count_nonzero(first != ref))
                print(
                    f"{name} T={tokens} thin={thin} fused={fused} inst={inst}: {same_runs}/20 runs equal to its first; "
                    f"{diff} elements differ from thin+fused inst 0",
                    flush=True,
                )
    hopper_fp8.THIN, fp8_step.FUSE_QUANTIZE = True, True
