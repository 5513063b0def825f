"""Expert weights from checkpoint files: FP8 safetensors and GGUF ``Q8_0``.

- :func:`load_fp8_experts` reads the FP8 checkpoint layout of DeepSeek-V3 and
  Qwen3 FP8 models (per expert ``gate_proj`` / ``up_proj`` / ``down_proj``
  ``weight`` in float8_e4m3fn, ``[N, K]``, with ``weight_scale_inv`` fp32
  ``[ceil(N/128), ceil(K/128)]``, ``value = e4m3 * scale``) straight into
  :class:`~cublas_grouped.FP8ExpertWeights`: the bytes are copied to the GPU
  as they are, never dequantized. The safetensors format (an 8-byte header
  length, a JSON header, raw little-endian data) is read here directly,
  because the ``safetensors`` package's NumPy API cannot return float8
  tensors (NumPy has no float8 dtype); every header field is checked against
  the file before any byte is used.
- :func:`load_gguf_experts` reads the merged expert tensors of a GGUF file
  (``blk.{layer}.ffn_{gate,up,down}_exps.weight``) through the ``gguf``
  package, ``Q8_0`` (blocks of 32 int8 with one fp16 scale), F16 or F32,
  dequantized in NumPy to 16-bit :class:`~cublas_grouped.ExpertWeights`, or
  requantized on the GPU to FP8.

Both return ``(w1, w2)`` for :func:`~cublas_grouped.moe_forward`: ``w1`` the
gate and up projections packed (gate first), ``w2`` the down projection, in
the ``nn.Linear`` layout (``trans_b=True``) unless asked otherwise.
"""

from __future__ import annotations

import json
import math
import os

import ml_dtypes
import numpy as np

from ..gemm.fp8 import BLOCK, FP8ExpertWeights, quantize_fp8
from .modules import QUANTIZE_MODES, ExpertWeights

__all__ = [
    "DEFAULT_FP8_PATTERN",
    "DEFAULT_GGUF_PATTERN",
    "load_fp8_experts",
    "load_gguf_experts",
    "read_fp8_experts",
    "read_gguf_experts",
    "read_safetensors_header",
    "dequantize_q8_0",
]

#: Names of DeepSeek-V3 and Qwen3 FP8 expert tensors.
DEFAULT_FP8_PATTERN = "model.layers.{layer}.mlp.experts.{expert}.{proj}.{tensor}"
#: llama.cpp's merged expert tensors ([E, N, K] each).
DEFAULT_GGUF_PATTERN = "blk.{layer}.ffn_{proj}_exps.weight"

# The format's own limit on the JSON header (safetensors refuses larger ones).
_MAX_HEADER = 100 << 20
_ST_DTYPES = {
    "F8_E4M3": np.dtype(np.uint8),  # e4m3fn bit patterns
    "U8": np.dtype(np.uint8),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}


def read_safetensors_header(path) -> tuple[dict, int]:
    """``({name: (dtype, shape, start, end)}, data_offset)`` of a safetensors file,
    byte ranges relative to ``data_offset``, each checked against the file size
    and against its dtype and shape. Raises ``ValueError`` naming the file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        length = int.from_bytes(head, "little")
        if length > min(_MAX_HEADER, size - 8):
            raise ValueError(f"{path}: safetensors header of {length} bytes does not fit the file")
        try:
            header = json.loads(f.read(length))
        except ValueError as exc:
            raise ValueError(f"{path}: the safetensors header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the safetensors header is not a JSON object")
    data_size = size - 8 - length
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise ValueError(f"{path}: tensor {name!r} has a malformed header entry") from None
        ok = all(isinstance(v, int) and v >= 0 for v in (*shape, start, end))
        width = _ST_DTYPES[dtype].itemsize if dtype in _ST_DTYPES else None
        if (
            not ok
            or width is None
            or not start <= end <= data_size
            or end - start != math.prod(shape) * width
        ):
            raise ValueError(
                f"{path}: tensor {name!r} ({dtype} {list(shape)}, bytes {start}-{end}) does not fit the file "
                f"or is of an unsupported dtype (supported: {sorted(_ST_DTYPES)})"
            )
        entries[name] = (dtype, shape, start, end)
    return entries, 8 + length


class _SafetensorsFiles:
    """Tensors by name across the files of one (possibly sharded) checkpoint."""

    def __init__(self, files):
        paths = [files] if isinstance(files, (str, os.PathLike)) else list(files)
        if not paths:
            raise ValueError("files must name at least one safetensors file")
        self.where = {}
        for path in paths:
            entries, offset = read_safetensors_header(path)
            for name, entry in entries.items():
                self.where[name] = (path, offset, entry)
        self.paths = paths

    def get(self, name: str, dtypes: tuple[str, ...]) -> np.ndarray:
        if name not in self.where:
            raise KeyError(f"tensor {name!r} is not in {[str(p) for p in self.paths]}")
        path, offset, (dtype, shape, start, _) = self.where[name]
        if dtype not in dtypes:
            raise ValueError(f"tensor {name!r} in {path} is {dtype}; expected {' or '.join(dtypes)}")
        if math.prod(shape) == 0:
            return np.empty(shape, dtype=_ST_DTYPES[dtype])  # nothing to map (mmap refuses zero bytes)
        return np.memmap(path, dtype=_ST_DTYPES[dtype], mode="r", offset=offset + start, shape=shape)


def _to_device(host: np.ndarray, device: int | None):
    import cupy

    with cupy.cuda.Device(device if device is not None else cupy.cuda.runtime.getDevice()):
        return cupy.asarray(np.ascontiguousarray(host))


def _fp8_projection(files, names, num_experts: int, trans_b: bool) -> tuple[np.ndarray, np.ndarray]:
    """Experts' ``[N, K]`` FP8 weights and scales of one or more projections,
    each stacked along N (gate then up): host ``(values, scales)``."""
    values, scales = [], []
    for e in range(num_experts):
        parts = [(files.get(w, ("F8_E4M3",)), files.get(s, ("F32", "BF16"))) for w, s in names(e)]
        for (w, s), (wname, sname) in zip(parts, names(e)):
            want = (-(-w.shape[0] // BLOCK), -(-w.shape[1] // BLOCK)) if w.ndim == 2 else None
            if want is None or s.shape != want:
                raise ValueError(f"{sname} must be [ceil(N/128), ceil(K/128)] = {want} for {wname} {w.shape}")
        if len(parts) > 1 and any(w.shape[0] % BLOCK for w, _ in parts[:-1]):
            raise ValueError(
                f"packing {[n for n, _ in names(e)]}: each but the last must have N a multiple of {BLOCK}, "
                "so that their 128-row scale blocks stay whole"
            )
        values.append(np.concatenate([w for w, _ in parts], axis=0))
        scales.append(np.concatenate([s.astype(np.float32) for _, s in parts], axis=0))
        if values[-1].shape != values[0].shape:
            raise ValueError(
                f"expert {e}'s {names(e)[0][0]} is {values[-1].shape}; expert 0's is {values[0].shape}"
            )
    v, s = np.stack(values), np.stack(scales)
    if not trans_b:  # [E, N, K] -> [E, K, N]: blocks transpose with the values
        v, s = v.transpose(0, 2, 1), s.transpose(0, 2, 1)
    return np.ascontiguousarray(v), np.ascontiguousarray(s)


def read_fp8_experts(
    files,
    num_experts: int,
    *,
    layer: int = 0,
    pattern: str = DEFAULT_FP8_PATTERN,
    projections: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
    scale_name: str = "weight_scale_inv",
    trans_b: bool = True,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """What :func:`load_fp8_experts` puts on the GPU, on the host:
    ``((w1_values, w1_scales), (w2_values, w2_scales))`` (uint8 e4m3fn codes,
    float32 block scales). Same arguments, less ``device``."""
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int; got {num_experts!r}")
    if len(projections) != 3:
        raise ValueError(f"projections must name gate, up and down; got {projections!r}")
    store = _SafetensorsFiles(files)

    def names(*projs):
        fill = lambda e, p, t: pattern.format(layer=layer, expert=e, proj=p, tensor=t)
        return lambda e: [(fill(e, p, "weight"), fill(e, p, scale_name)) for p in projs]

    w1 = _fp8_projection(store, names(projections[0], projections[1]), num_experts, trans_b)
    w2 = _fp8_projection(store, names(projections[2]), num_experts, trans_b)
    (n1, k1), (n2, k2) = (v.shape[1:] if trans_b else v.shape[:0:-1] for v, _ in (w1, w2))
    if k1 != n2 or n1 != 2 * k2:
        raise ValueError(f"gate|up [N, K] = {[n1, k1]} and down [N, K] = {[n2, k2]} do not form one layer")
    return w1, w2


def load_fp8_experts(
    files,
    num_experts: int,
    *,
    layer: int = 0,
    pattern: str = DEFAULT_FP8_PATTERN,
    projections: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
    scale_name: str = "weight_scale_inv",
    trans_b: bool = True,
    device: int | None = None,
) -> tuple[FP8ExpertWeights, FP8ExpertWeights]:
    """One layer's experts from FP8 safetensors files, without dequantizing.

    Parameters
    ----------
    files : path or list of paths (the shards of a checkpoint; names are looked up in all)
    num_experts : E (experts ``0 .. E-1`` must all be there)
    layer : the ``{layer}`` of ``pattern``
    pattern : tensor names, with ``{layer}``, ``{expert}``, ``{proj}`` and ``{tensor}``
        (``"weight"`` or ``scale_name``)
    projections : the names of the gate, up and down projections
    trans_b : True (default) keeps the checkpoint's ``nn.Linear`` layout
        (``w1`` ``[E, 2I, H]``, ``w2`` ``[E, H, I]``); False transposes on the host
    device : the GPU to load onto (default: the current one)

    Returns
    -------
    ``(w1, w2)``: FP8ExpertWeights with ``"block128"`` scaling, ``w1`` gate then
    up (I must be a multiple of 128 for their blocks to stay whole).
    """
    opts = {"layer": layer, "pattern": pattern, "projections": projections, "scale_name": scale_name}
    host = read_fp8_experts(files, num_experts, trans_b=trans_b, **opts)
    w1, w2 = (
        FP8ExpertWeights(_to_device(v, device), _to_device(s, device), "block128", trans_b) for v, s in host
    )
    return w1, w2


def dequantize_q8_0(data: np.ndarray, shape) -> np.ndarray:
    """float32 ``shape`` from GGUF ``Q8_0`` bytes: blocks of 34 bytes, an fp16
    scale ``d`` then 32 int8 ``q``, each value ``d * q`` (exact in float32)."""
    if shape[-1] % 32:
        raise ValueError(f"Q8_0 rows must hold whole blocks of 32; got shape {tuple(shape)}")
    blocks = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, 34)
    if blocks.shape[0] * 32 != math.prod(shape):
        raise ValueError(f"Q8_0 data of {blocks.shape[0]} blocks does not hold shape {tuple(shape)}")
    d = blocks[:, :2].copy().view("<f2").astype(np.float32)
    q = blocks[:, 2:].view(np.int8).astype(np.float32)
    return (d * q).reshape(shape)


def _gguf_tensor(reader, name: str, path) -> np.ndarray:
    from gguf import GGMLQuantizationType as Q

    found = [t for t in reader.tensors if t.name == name]
    if not found:
        raise KeyError(f"tensor {name!r} is not in {path}")
    t = found[0]
    shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists ne0 (the contiguous axis) first
    if t.tensor_type == Q.Q8_0:
        return dequantize_q8_0(t.data, shape)
    if t.tensor_type in (Q.F32, Q.F16):
        return np.asarray(t.data, dtype=np.float32).reshape(shape)
    raise ValueError(f"tensor {name!r} in {path} is {t.tensor_type.name}; supported: Q8_0, F16, F32")


def _import_gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError(
            "reading GGUF files needs the gguf package: pip install gguf (or cublas_grouped[formats])"
        ) from None
    return gguf


def read_gguf_experts(
    path,
    *,
    layer: int = 0,
    pattern: str = DEFAULT_GGUF_PATTERN,
    projections: tuple[str, str, str] = ("gate", "up", "down"),
    trans_b: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """One layer's merged expert tensors as host float32 ``(w1, w2)``: gate|up
    ``[E, 2I, H]`` and down ``[E, H, I]`` (transposed when not ``trans_b``).
    ``pattern`` has ``{layer}`` and ``{proj}``. Needs the ``gguf`` package."""
    reader = _import_gguf().GGUFReader(path)
    gate, up, down = (_gguf_tensor(reader, pattern.format(layer=layer, proj=p), path) for p in projections)
    if (
        gate.ndim != 3
        or gate.shape != up.shape
        or down.shape != (gate.shape[0], gate.shape[2], gate.shape[1])
    ):
        raise ValueError(f"gate {gate.shape}, up {up.shape} and down {down.shape} do not form one layer")
    w1, w2 = np.concatenate([gate, up], axis=1), down
    if not trans_b:
        w1, w2 = (np.ascontiguousarray(w.transpose(0, 2, 1)) for w in (w1, w2))
    return w1, w2


def load_gguf_experts(
    path,
    *,
    layer: int = 0,
    pattern: str = DEFAULT_GGUF_PATTERN,
    projections: tuple[str, str, str] = ("gate", "up", "down"),
    dtype="bfloat16",
    quantize: str | None = None,
    trans_b: bool = True,
    device: int | None = None,
) -> tuple[ExpertWeights, ExpertWeights]:
    """One layer's merged expert tensors from a GGUF file (needs the ``gguf`` package).

    ``Q8_0``, F16 and F32 tensors ``[E, N, K]`` are read by :func:`read_gguf_experts`, then
    either cast to ``dtype`` (float32, float16 or bfloat16) or, with
    ``quantize="fp8-block128"`` / ``"fp8-channel"``, uploaded as float32 and
    requantized to FP8 on the GPU. ``pattern`` has ``{layer}`` and ``{proj}``.
    Returns ``(w1, w2)`` ExpertWeights, ``w1`` gate then up.
    """
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be None or one of {QUANTIZE_MODES}; got {quantize!r}")
    dtype = np.dtype(dtype)
    if dtype.name not in ("float32", "float16", "bfloat16"):
        raise TypeError(f"dtype must be float32, float16 or bfloat16; got {dtype}")
    result = []
    for host in read_gguf_experts(
        path, layer=layer, pattern=pattern, projections=projections, trans_b=trans_b
    ):
        if quantize is None:
            result.append(ExpertWeights(_to_device(host.astype(dtype), device), trans_b=trans_b))
        else:
            scaling = quantize.removeprefix("fp8-")
            fp8 = quantize_fp8(_to_device(host, device), scaling=scaling, trans_b=trans_b)
            result.append(ExpertWeights(fp8, trans_b=trans_b))
    return result[0], result[1]
