"""Development probe (GPU machine): where the time of one sync-free layer step
goes, stage by stage (``moe_forward(fixed_capacity=True)``; on SM 9.0 the
kernel step).

Each launch of the step is wrapped with a CUDA event pair on its stream; the
per-stage medians over ``--rounds`` calls are printed beside the whole step.
The events sit between launches, so a stage's time is its kernel's (the GPU
runs behind the host at these sizes; at decode sizes the gaps are host time).

    PYTHONPATH=. python3 tools/step_profile.py [--models qwen3-30b-a3b] [--tokens 4096]
"""

from __future__ import annotations

import argparse
import collections

import cupy
import ml_dtypes
import numpy as np

import cublas_grouped as cg
from cublas_grouped.moe import fixed_capacity as fc
from cublas_grouped.tools.bench import workloads as W

_records: list[tuple[str, object, object]] = []


def _wrap(name, fn, stream_of):
    def wrapped(*args, **kwargs):
        handle = stream_of(args)
        stream = cupy.cuda.ExternalStream(int(getattr(handle, "handle", handle)))
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record(stream)
        out = fn(*args, **kwargs)
        end.record(stream)
        _records.append((name, start, end))
        return out

    return wrapped


class _Proxy:
    """A module stand-in whose named functions are wrapped (the rest pass through)."""

    def __init__(self, module, names, stream_of):
        self._module = module
        self._wrapped = {n: _wrap(n, getattr(module, n), stream_of) for n in names}

    def __getattr__(self, name):
        return self._wrapped.get(name) or getattr(self._module, name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="qwen3-30b-a3b,deepseek-v3")
    p.add_argument("--tokens", default="4096,16384")
    p.add_argument("--rounds", type=int, default=10)
    args = p.parse_args()
    stages = [
        "block_histogram",
        "column_scan",
        "assign_rows",
        "gather_rows",
        "expert_activation",
        "combine_rows",
    ]
    fc.K = _Proxy(fc.K, stages, lambda a: a[0])
    fc.hopper = _Proxy(fc.hopper, ["schedule_offsets", "grouped_rows"], lambda a: a[0].launch_stream)
    print(f"GPU: {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}")
    bf16 = ml_dtypes.bfloat16
    for model in args.models.split(","):
        s = W.MODELS[model]
        w1 = (cupy.random.standard_normal((s.experts, s.hidden, 2 * s.inter), cupy.float32) * 0.02).astype(
            bf16
        )
        w2 = (cupy.random.standard_normal((s.experts, s.inter, s.hidden), cupy.float32) * 0.02).astype(bf16)
        for tokens in map(int, args.tokens.split(",")):
            case = W.Case(model, tokens, s.experts, s.top_k, s.hidden, s.inter, "uniform")
            weights, ids = W.make_routing(case, seed=0)
            x = cupy.random.standard_normal((tokens, s.hidden), cupy.float32).astype(bf16)
            ids_d, w_d = cupy.asarray(ids, dtype=cupy.int32), cupy.asarray(weights, dtype=cupy.float32)
            cupy.cuda.Device().synchronize()
            per_stage = collections.defaultdict(list)
            whole = []
            for r in range(args.rounds + 2):
                _records.clear()
                start, end = cupy.cuda.Event(), cupy.cuda.Event()
                start.record()
                cg.moe_forward(x, ids_d, w_d, w1, w2, fixed_capacity=True)
                end.record()
                end.synchronize()
                if r < 2:
                    continue
                whole.append(cupy.cuda.get_elapsed_time(start, end))
                seen = collections.Counter()
                for name, a, b in _records:
                    seen[name] += 1
                    per_stage[f"{name}#{seen[name]}"].append(cupy.cuda.get_elapsed_time(a, b))
            total = float(np.median(whole))
            print(f"\n{case.name}: whole step {total * 1e3:.1f} us (median of {args.rounds})")
            for name, times in per_stage.items():
                t = float(np.median(times))
                print(f"  {name:24s} {t * 1e3:9.1f} us  {100 * t / total:5.1f}%")
        del w1, w2
        cupy.get_default_memory_pool().free_all_blocks()


if __name__ == "__main__":
    main()
