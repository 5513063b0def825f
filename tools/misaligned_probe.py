"""Experiment: does each cuBLAS algorithm take bf16 operands 2 bytes past a 16-byte boundary?"""

import subprocess
import sys

CHILD = r"""
import sys, numpy as np, cupy, ml_dtypes, cublas_grouped as cg
alg, which = sys.argv[1], sys.argv[2]
sizes, n, k = [40, 0, 90, 3], 264, 136
m = sum(sizes)
def shifted(shape):
    c = int(np.prod(shape)); buf = cupy.zeros(c + 16, dtype=ml_dtypes.bfloat16); return buf[1:1 + c].reshape(shape)
a = cupy.random.standard_normal((m, k), dtype=cupy.float32).astype(ml_dtypes.bfloat16)
b = cupy.random.standard_normal((4, k, n), dtype=cupy.float32).astype(ml_dtypes.bfloat16)
out = cupy.empty((m, n), dtype=ml_dtypes.bfloat16)
x = {"a": a, "b": b, "out": out}[which]
v = shifted(x.shape); v[...] = x
args = dict(a=a, b=b, out=out); args[which] = v
cg.gmm(args["a"], args["b"], sizes, out=args["out"], algorithm=alg)
cupy.cuda.runtime.deviceSynchronize()
ref = np.concatenate([cupy.asnumpy(args["a"][o:o+s]).astype(np.float64) @ cupy.asnumpy(args["b"][g]).astype(np.float64) for g, (o, s) in enumerate(zip(np.cumsum([0]+sizes[:-1]), sizes))])
err = np.abs(cupy.asnumpy(args["out"]).astype(np.float64) - ref).max()
print(f"ok max_err={err:.3g}")
"""
for alg in ("cublas_grouped", "sequential", "chunked_batched"):
    for which in ("a", "b", "out"):
        r = subprocess.run([sys.executable, "-c", CHILD, alg, which], capture_output=True, text=True)
        last = (r.stdout.strip().splitlines() or r.stderr.strip().splitlines() or ["?"])[-1]
        print(f"{alg:16} misaligned {which:4} rc={r.returncode} {last[:150]}")
