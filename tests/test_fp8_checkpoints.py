"""Checkpoint loaders on small files written by the formats' own writers
(safetensors.numpy.save_file, gguf.GGUFWriter), read back on the host and
compared with NumPy. CPU only; the GPU upload is in tests/test_fp8_gpu.py."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest

from cublas_grouped.moe import checkpoints as ck
from cublas_grouped.testing_fp8 import quantize_ref

E4M3 = ml_dtypes.float8_e4m3fn
NAME = "model.layers.3.mlp.experts.{e}.{p}.{t}"


def fp8_expert_tensors(rng, num_experts, hidden, inter):
    """Per-expert e4m3 weights [N, K] and scales [ceil(N/128), ceil(K/128)], as in an FP8 checkpoint."""
    tensors = {}
    for e in range(num_experts):
        for proj, (n, k) in (
            ("gate_proj", (inter, hidden)),
            ("up_proj", (inter, hidden)),
            ("down_proj", (hidden, inter)),
        ):
            codes, scales = quantize_ref(rng.standard_normal((n, k)).astype(np.float32), 128, 128)
            tensors[NAME.format(e=e, p=proj, t="weight")] = codes.view(E4M3)
            tensors[NAME.format(e=e, p=proj, t="weight_scale_inv")] = scales
    return tensors


@pytest.fixture
def save_file():
    return pytest.importorskip("safetensors.numpy").save_file


def test_fp8_safetensors_pack_gate_up_without_dequantizing(tmp_path, save_file):
    rng = np.random.default_rng(0)
    e, h, i = 3, 200, 256  # H not a multiple of 128: partial scale blocks along K
    tensors = fp8_expert_tensors(rng, e, h, i)
    # Two shards, experts split between them, as large checkpoints are.
    names = sorted(tensors)
    save_file({n: tensors[n] for n in names[: len(names) // 2]}, str(tmp_path / "a.safetensors"))
    save_file({n: tensors[n] for n in names[len(names) // 2 :]}, str(tmp_path / "b.safetensors"))
    files = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    (v1, s1), (v2, s2) = ck.read_fp8_experts(files, e, layer=3)
    assert (
        v1.shape == (e, 2 * i, h)
        and v1.dtype == np.uint8
        and s1.shape == (e, 4, 2)
        and s1.dtype == np.float32
    )
    assert v2.shape == (e, h, i) and s2.shape == (e, 2, 2)
    for x in range(e):
        t = lambda p, kind, x=x: tensors[NAME.format(e=x, p=p, t=kind)]
        assert np.array_equal(v1[x, :i], t("gate_proj", "weight").view(np.uint8))
        assert np.array_equal(v1[x, i:], t("up_proj", "weight").view(np.uint8))
        assert np.array_equal(
            s1[x], np.concatenate([t("gate_proj", "weight_scale_inv"), t("up_proj", "weight_scale_inv")])
        )
        assert np.array_equal(v2[x], t("down_proj", "weight").view(np.uint8))
        assert np.array_equal(s2[x], t("down_proj", "weight_scale_inv"))
    # The [E, K, N] layout: values and blocks transposed together.
    (u1, r1), _ = ck.read_fp8_experts(files, e, layer=3, trans_b=False)
    assert np.array_equal(u1, v1.transpose(0, 2, 1)) and np.array_equal(r1, s1.transpose(0, 2, 1))


def test_fp8_safetensors_custom_names(tmp_path, save_file):
    rng = np.random.default_rng(1)
    tensors = {
        k.replace("model.layers.3.mlp.experts.", "blocks.0.moe.").replace("_proj", ""): v
        for k, v in fp8_expert_tensors(rng, 2, 128, 128).items()
    }
    save_file(tensors, str(tmp_path / "m.safetensors"))
    (v1, _), (v2, _) = ck.read_fp8_experts(
        tmp_path / "m.safetensors",
        2,
        pattern="blocks.{layer}.moe.{expert}.{proj}.{tensor}",
        projections=("gate", "up", "down"),
    )
    assert v1.shape == (2, 256, 128) and v2.shape == (2, 128, 128)


def test_fp8_safetensors_errors(tmp_path, save_file):
    rng = np.random.default_rng(2)
    tensors = fp8_expert_tensors(rng, 2, 128, 192)  # I = 192: gate's last block would mix with up's
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match="N a multiple of 128"):
        ck.read_fp8_experts(path, 2, layer=3)
    with pytest.raises(ValueError, match="num_experts must be a positive int"):
        ck.read_fp8_experts(path, 0, layer=3)
    good = fp8_expert_tensors(rng, 2, 128, 128)
    save_file(good, str(path))
    with pytest.raises(KeyError, match=r"experts\.2\.gate_proj\.weight' is not in"):
        ck.read_fp8_experts(path, 3, layer=3)
    bad = dict(good)
    bad[NAME.format(e=0, p="up_proj", t="weight_scale_inv")] = np.ones((2, 1), np.float32)
    save_file(bad, str(path))
    with pytest.raises(
        ValueError, match=r"weight_scale_inv must be \[ceil\(N/128\), ceil\(K/128\)\] = \(1, 1\)"
    ):
        ck.read_fp8_experts(path, 2, layer=3)
    bad = dict(good)
    bad[NAME.format(e=0, p="down_proj", t="weight")] = np.zeros((128, 128), ml_dtypes.bfloat16)
    save_file(bad, str(path))
    with pytest.raises(ValueError, match="down_proj.weight' in .* is BF16; expected F8_E4M3"):
        ck.read_fp8_experts(path, 2, layer=3)


def _raw_safetensors(path, header: dict, data: bytes, length: int | None = None):
    text = json.dumps(header).encode()
    path.write_bytes((len(text) if length is None else length).to_bytes(8, "little") + text + data)


@pytest.mark.parametrize(
    "header,data,length,match",
    [
        (
            {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}},
            b"\0" * 8,
            None,
            "does not fit the file",
        ),
        (
            {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}},
            b"\0" * 16,
            None,
            "does not fit the file",
        ),
        (
            {"a": {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]}},
            b"\0" * 16,
            None,
            "unsupported dtype",
        ),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, None, "does not fit"),
        ({"a": {"dtype": "F32"}}, b"", None, "malformed header entry"),
        ({"a": 1}, b"", None, "malformed header entry"),
        ({}, b"", 1 << 40, "header of .* bytes does not fit the file"),
    ],
)
def test_safetensors_header_is_checked(tmp_path, header, data, length, match):
    path = tmp_path / "bad.safetensors"
    _raw_safetensors(path, header, data, length)
    with pytest.raises(ValueError, match=match):
        ck.read_safetensors_header(path)


def test_safetensors_header_not_json_or_too_short(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes((5).to_bytes(8, "little") + b"{nope")
    with pytest.raises(ValueError, match="not JSON"):
        ck.read_safetensors_header(path)
    path.write_bytes(b"\1\2")
    with pytest.raises(ValueError, match="shorter than 8 bytes"):
        ck.read_safetensors_header(path)
    path.write_bytes((2).to_bytes(8, "little") + b"[]")
    with pytest.raises(ValueError, match="not a JSON object"):
        ck.read_safetensors_header(path)


# -- GGUF --------------------------------------------------------------------------


def write_gguf(path, tensors: dict, quant):
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "llama")
    for name, value in tensors.items():
        if quant is None:
            writer.add_tensor(name, value)
        else:
            q = gguf.quants.quantize(value, quant)
            writer.add_tensor(name, q, raw_shape=q.shape, raw_dtype=quant)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def gguf_layer(rng, e=4, h=96, i=64, layer=1):
    return {
        f"blk.{layer}.ffn_gate_exps.weight": rng.standard_normal((e, i, h)).astype(np.float32),
        f"blk.{layer}.ffn_up_exps.weight": rng.standard_normal((e, i, h)).astype(np.float32),
        f"blk.{layer}.ffn_down_exps.weight": rng.standard_normal((e, h, i)).astype(np.float32),
    }


def test_q8_0_dequantize_matches_gguf():
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((5, 7, 96)) * 3).astype(np.float32)
    q = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)
    ref = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)
    mine = ck.dequantize_q8_0(q, x.shape)
    assert mine.dtype == np.float32 and np.array_equal(mine, ref)
    assert np.abs(mine - x).max() <= np.abs(x).max() / 127  # half a step of the largest block, with room
    with pytest.raises(ValueError, match="whole blocks of 32"):
        ck.dequantize_q8_0(q, (5, 7, 95))
    with pytest.raises(ValueError, match="does not hold shape"):
        ck.dequantize_q8_0(q, (5, 6, 96))


@pytest.mark.parametrize("trans_b", [True, False])
def test_gguf_q8_0_experts(tmp_path, trans_b):
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(4)
    tensors = gguf_layer(rng)
    write_gguf(tmp_path / "m.gguf", tensors, gguf.GGMLQuantizationType.Q8_0)
    w1, w2 = ck.read_gguf_experts(tmp_path / "m.gguf", layer=1, trans_b=trans_b)
    deq = {
        k: gguf.quants.dequantize(
            gguf.quants.quantize(v, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
        )
        for k, v in tensors.items()
    }
    want1 = np.concatenate([deq["blk.1.ffn_gate_exps.weight"], deq["blk.1.ffn_up_exps.weight"]], axis=1)
    want2 = deq["blk.1.ffn_down_exps.weight"]
    if not trans_b:
        want1, want2 = want1.transpose(0, 2, 1), want2.transpose(0, 2, 1)
    assert np.array_equal(w1, want1) and np.array_equal(w2, want2)
    assert w1.flags.c_contiguous and w2.flags.c_contiguous


def test_gguf_f32_experts_and_errors(tmp_path):
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(5)
    tensors = gguf_layer(rng, layer=0)
    write_gguf(tmp_path / "f.gguf", tensors, None)
    w1, w2 = ck.read_gguf_experts(tmp_path / "f.gguf")
    assert np.array_equal(w1[:, :64], tensors["blk.0.ffn_gate_exps.weight"])
    assert np.array_equal(w2, tensors["blk.0.ffn_down_exps.weight"])
    with pytest.raises(KeyError, match="blk.2.ffn_gate_exps.weight' is not in"):
        ck.read_gguf_experts(tmp_path / "f.gguf", layer=2)
    write_gguf(tmp_path / "q4.gguf", tensors, gguf.GGMLQuantizationType.Q4_0)
    with pytest.raises(ValueError, match="is Q4_0; supported: Q8_0, F16, F32"):
        ck.read_gguf_experts(tmp_path / "q4.gguf")
    bad = dict(tensors)
    bad["blk.0.ffn_down_exps.weight"] = rng.standard_normal((4, 96, 32)).astype(np.float32)
    write_gguf(tmp_path / "bad.gguf", bad, None)
    with pytest.raises(ValueError, match="do not form one layer"):
        ck.read_gguf_experts(tmp_path / "bad.gguf")


def test_gguf_load_arguments_checked_first(tmp_path):
    with pytest.raises(ValueError, match="quantize must be None or one of"):
        ck.load_gguf_experts(tmp_path / "none.gguf", quantize="fp8")
    with pytest.raises(TypeError, match="dtype must be float32, float16 or bfloat16"):
        ck.load_gguf_experts(tmp_path / "none.gguf", dtype=np.int8)


def test_safetensors_empty_and_bf16_tensors_read(tmp_path, save_file):
    from cublas_grouped.moe.checkpoints import _SafetensorsFiles

    bf = np.arange(6, dtype=np.float32).reshape(2, 3).astype(ml_dtypes.bfloat16)
    save_file({"empty": np.zeros((0, 4), np.float32), "bf": bf}, str(tmp_path / "m.safetensors"))
    files = _SafetensorsFiles(tmp_path / "m.safetensors")
    assert files.get("empty", ("F32",)).shape == (0, 4)
    assert np.array_equal(files.get("bf", ("BF16",)), bf)
    with pytest.raises(ValueError, match="'bf' in .* is BF16; expected F32"):
        files.get("bf", ("F32",))
