"""Hugging Face transformers MoE blocks with their experts run by this library.

transformers (5.x) stores each MoE block's experts as two fused tensors,
``gate_up_proj`` [E, 2I, H] (gate rows first) and ``down_proj`` [E, H, I]:
the ``nn.Linear`` layout, so they go to :func:`cublas_grouped.moe_forward`
with ``trans_b=True`` as they are, with no copy. Two ways in:

- :func:`register` adds ``"cublas_grouped"`` to transformers' experts
  implementations (``ExpertsInterface``); then
  ``model.set_experts_implementation("cublas_grouped")`` (or
  ``from_pretrained(..., experts_implementation="cublas_grouped")``) makes every
  experts module call :func:`experts_forward`, with the model's own router.
- :func:`moe_block_forward` runs a whole sparse-MoE block (Qwen2-MoE,
  Qwen3-MoE, Mixtral and blocks shaped like them): the router's logits with
  torch, top-k with :func:`cublas_grouped.route` (softmax, then renormalized
  when the router's ``norm_topk_prob`` says so; Mixtral always does), the
  experts here, and the shared expert (with its sigmoid gate) with the
  block's own modules.

Forward only (inference); torch and transformers are imported lazily.
"""

from __future__ import annotations

from . import torch as _cg_torch

__all__ = ["IMPLEMENTATION", "experts_forward", "moe_block_forward", "register", "activation_of"]

IMPLEMENTATION = "cublas_grouped"

# transformers' activation names (config.hidden_act) and the layer's own.
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "relu": "relu"}


def activation_of(experts) -> str:
    """The layer activation matching ``experts``' ``config.hidden_act``, or ``NotImplementedError``."""
    config = getattr(experts, "config", None)
    name = getattr(config, "hidden_act", None)
    if name is None:
        raise NotImplementedError(
            f"{type(experts).__name__} has no config.hidden_act; pass the experts module of a transformers model"
        )
    if name not in _ACTIVATIONS:
        raise NotImplementedError(f"hidden_act {name!r} is not supported; supported: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def _check_experts(experts) -> None:
    """Refuse layouts the fused call cannot read as they are (named, before any GPU work)."""
    if not getattr(experts, "has_gate", True) or not hasattr(experts, "gate_up_proj"):
        raise NotImplementedError(f"{type(experts).__name__} has no fused gate_up_proj (ungated experts)")
    if not getattr(experts, "is_concatenated", True):
        raise NotImplementedError(
            f"{type(experts).__name__} interleaves gate and up rows; the layer needs [gate; up]"
        )
    if getattr(experts, "has_post_expert_norm", False):
        raise NotImplementedError(f"{type(experts).__name__} normalizes after each expert")
    gate = getattr(type(experts), "_apply_gate", None)
    if gate is not None and getattr(gate, "__name__", "") != "_default_apply_gate":
        raise NotImplementedError(f"{type(experts).__name__} has its own gating ({gate.__name__})")
    if getattr(experts, "_is_expert_parallel", False):
        raise NotImplementedError("expert-parallel transformers experts are not supported")


def experts_forward(experts, hidden_states, top_k_index, top_k_weights):
    """A transformers experts module's forward, run by :func:`cublas_grouped.moe_forward`.

    Same signature as the ``ExpertsInterface`` functions: ``hidden_states``
    [T, H], ``top_k_index`` [T, k] and ``top_k_weights`` [T, k] from the
    model's router. Weights are read as stored (``is_transposed=False``:
    ``trans_b=True``), biases (``has_bias``) included. Returns [T, H] in the
    hidden states' dtype.
    """
    _check_experts(experts)
    bias = getattr(experts, "has_bias", False)
    return _cg_torch.moe_forward(
        hidden_states,
        top_k_index,
        top_k_weights,
        experts.gate_up_proj,
        experts.down_proj,
        b1=experts.gate_up_proj_bias if bias else None,
        b2=experts.down_proj_bias if bias else None,
        trans_b=not getattr(experts, "is_transposed", False),
        activation=activation_of(experts),
    )


def register() -> str:
    """Add :func:`experts_forward` to transformers' experts implementations under
    ``"cublas_grouped"`` (returned). Idempotent."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, experts_forward)
    return IMPLEMENTATION


def _renormalize(gate) -> bool:
    # Qwen2/Qwen3-MoE routers say norm_topk_prob; Mixtral's always renormalizes.
    return bool(getattr(gate, "norm_topk_prob", True))


def moe_block_forward(block, hidden_states):
    """A transformers sparse-MoE block's forward with routing and experts run here.

    ``block`` has ``gate`` (a top-k router with ``weight`` [E, H] and
    ``top_k``), ``experts`` (fused experts) and optionally ``shared_expert``
    and ``shared_expert_gate`` (Qwen2-MoE), whose output, scaled by the sigmoid
    of the gate, is added. ``hidden_states`` is [..., H]; the result has its
    shape and dtype. Routing: softmax over the logits in float32, top-k, then
    renormalized if the router does (its ``norm_topk_prob``; Mixtral's always
    does); the routing weights stay float32 (the block casts them to the
    hidden dtype first, so bfloat16 results differ in the last bits).
    Training-time router jitter is not applied: use it for inference.
    """
    import torch
    import torch.nn.functional as F

    gate = block.gate
    shape = hidden_states.shape
    x = hidden_states.reshape(-1, shape[-1])
    x = x if x.is_contiguous() else x.contiguous()
    logits = F.linear(x, gate.weight)
    weights, ids = _cg_torch.route(logits.contiguous(), int(gate.top_k), renormalize=_renormalize(gate))
    out = experts_forward(block.experts, x, ids, weights)
    shared = getattr(block, "shared_expert", None)
    if shared is not None:
        shared_out = shared(x)
        shared_gate = getattr(block, "shared_expert_gate", None)
        if shared_gate is not None:
            shared_out = torch.sigmoid(shared_gate(x)) * shared_out
        out = out + shared_out
    return out.reshape(shape)
