"""Hugging Face MoE blocks (Qwen3-MoE, Mixtral, Qwen2-MoE with its shared expert)
with their experts run by cublas_grouped, checked against the blocks themselves.

Builds small random blocks with transformers, then runs each two ways:
the block with ``experts_implementation="cublas_grouped"`` (its own router,
our experts) and :func:`cublas_grouped.hf.moe_block_forward` (our routing and
experts). Exits non-zero unless both agree with the block (relative error
float32 <= 1e-5, bfloat16 <= 2e-2).

    python examples/hf_moe_block.py [--tokens 256]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import require_gpu  # noqa: E402

TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}


def build_block(kind: str, dtype, torch):
    """A small random block of ``kind``, weights scaled like a trained layer (std 1/sqrt(fan_in))."""
    import transformers as tf

    common = dict(hidden_size=256, num_experts_per_tok=2, hidden_act="silu")
    if kind == "qwen3_moe":
        config = tf.Qwen3MoeConfig(num_experts=8, moe_intermediate_size=128, norm_topk_prob=True, **common)
        block = tf.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock(config)
    elif kind == "mixtral":
        config = tf.MixtralConfig(num_local_experts=8, intermediate_size=128, **common)
        block = tf.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock(config)
    else:  # Qwen2-MoE: a shared expert with a sigmoid gate, no renormalization
        config = tf.Qwen2MoeConfig(
            num_experts=8,
            moe_intermediate_size=128,
            shared_expert_intermediate_size=192,
            norm_topk_prob=False,
            **common,
        )
        block = tf.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeSparseMoeBlock(config)
    config._experts_implementation = "eager"
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    return block.to(device="cuda", dtype=dtype).eval()


def relative_error(ours, ref) -> float:
    diff = (ours.double() - ref.double()).norm()
    return float(diff / ref.double().norm())


def routing_differs_only_at_ties(block, x, torch) -> tuple[object, int]:
    """Rows where our top-k set matches the block's router, and how many rows
    differ. A differing row must be an exact tie at the k-th score (then
    either choice is right); anything else is a routing bug."""
    from cublas_grouped import torch as cgt

    x2 = x.reshape(-1, x.shape[-1])
    logits, _, ref_ids = block.gate(x2)
    _, ids = cgt.route(logits.contiguous(), block.gate.top_k)
    same = (ref_ids.sort(dim=1).values == ids.long().sort(dim=1).values).all(dim=1)
    if not bool(same.all()):
        probs = torch.softmax(logits.float(), dim=-1).sort(dim=-1, descending=True).values
        k = block.gate.top_k
        tied = probs[:, k - 1] == probs[:, k]
        if not bool(tied[~same].all()):
            raise SystemExit("routing differs from the block's router on rows without a tie")
    return same, int((~same).sum())


def check(kind: str, dtype_name: str, tokens: int, torch) -> bool:
    import cublas_grouped.hf as cghf

    dtype = getattr(torch, dtype_name)
    block = build_block(kind, dtype, torch)
    x = torch.randn(2, tokens // 2, block.gate.weight.shape[1], device="cuda").to(dtype)
    with torch.no_grad():
        ref = block(x)
        block.experts.config._experts_implementation = cghf.register()
        swapped = block(x)
        block.experts.config._experts_implementation = "eager"
        ours = cghf.moe_block_forward(block, x)
        same, ties = routing_differs_only_at_ties(block, x, torch)
    torch.cuda.synchronize()
    err_swap = relative_error(swapped, ref)
    rows = same.reshape(x.shape[:-1])
    err_block = relative_error(ours[rows], ref[rows])
    limit = TOLERANCE[dtype_name]
    ok = err_swap <= limit and err_block <= limit and swapped.dtype == dtype and ours.shape == ref.shape
    print(
        f"{kind:10s} {dtype_name:9s} experts swapped: {err_swap:.2e}   block (our routing): {err_block:.2e}"
        f"   tie rows skipped: {ties}   limit {limit:.0e}   {'ok' if ok else 'FAILED'}"
    )
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError as exc:
        print(f"skipped: this example needs torch and transformers ({exc})")
        return
    require_gpu()
    if not torch.cuda.is_available():
        sys.exit("This example needs torch with CUDA.")
    results = [
        check(kind, dtype, args.tokens, torch)
        for kind in ("qwen3_moe", "mixtral", "qwen2_moe")
        for dtype in ("float32", "bfloat16")
    ]
    if not all(results):
        sys.exit("cublas_grouped disagrees with the Hugging Face block")
    print("all blocks agree")


if __name__ == "__main__":
    main()
