"""Packed expert weights and the MoE MLP module that holds them."""

from __future__ import annotations

from dataclasses import dataclass

from ..gemm.fp8 import SCALINGS, FP8ExpertWeights, is_fp8, quantize_fp8
from ..runtime.arrays import as_cupy, view
from ..runtime.device import stream_resources
from . import gate_up
from .checks import W1_LAYOUTS, device_of
from .layer import moe_forward
from .mlp_backward import mlp_backward, mlp_forward_with_context
from .routing import route

__all__ = ["ExpertWeights", "ExpertWeightManager", "MoEMLP", "QUANTIZE_MODES"]

#: ``ExpertWeightManager.load(quantize=...)`` modes: FP8 (e4m3) with the named scaling.
QUANTIZE_MODES = tuple(f"fp8-{s}" for s in SCALINGS)


@dataclass
class ExpertWeights:
    """One projection of every expert, packed contiguously.

    Attributes
    ----------
    weight : GPU array [E, K, N] (``[E, N, K]``, the ``nn.Linear`` layout, when ``trans_b``),
        or :class:`~cublas_grouped.FP8ExpertWeights` in the ``trans_b`` layout
    bias : GPU array [E, N] or None (with FP8 weights: of the activations' dtype)
    trans_b : bool
    w1_layout : str
        How a gated first-GEMM weight orders its N = 2I output columns, as
        :func:`~cublas_grouped.moe_forward`'s ``w1_layout``: ``"gate_up"``
        (default; the gate's I columns, then the up projection's) or
        ``"gate_up_blocked"`` (packed in blocks of 128 by
        :func:`~cublas_grouped.pack_gate_up`; not FP8, N a multiple of 256),
        with which the Hopper kernel applies the activation in the first
        GEMM's epilogue (bfloat16/float16 layers). The bias stays in the
        plain gate|up order either way: the kernels read it so. Only a
        first-GEMM weight may be blocked, and only for the forward.
    """

    weight: object
    bias: object = None
    trans_b: bool = False
    w1_layout: str = "gate_up"

    def __post_init__(self):
        if is_fp8(self.weight):
            if self.weight.trans_b != self.trans_b:
                raise ValueError(
                    f"weight is FP8 with trans_b={self.weight.trans_b}; pass trans_b={self.weight.trans_b}"
                )
            dtype = None  # the activations' dtype: checked by the layer
        else:
            w = view(self.weight, "weight")
            if w.ndim != 3 or not w.is_c_contiguous():
                raise ValueError(f"weight must be a C-contiguous 3-D array [E, K, N]; got shape {w.shape}")
            dtype = w.dtype
        if self.bias is not None:
            b = view(self.bias, "bias")
            if b.shape != (self.num_experts, self.out_features) or b.dtype != (dtype or b.dtype):
                raise ValueError(
                    f"bias must be {dtype or 'a float array'} [{self.num_experts}, {self.out_features}]; "
                    f"got {b.dtype} {b.shape}"
                )
        if self.w1_layout not in W1_LAYOUTS:
            raise ValueError(f"w1_layout must be one of {W1_LAYOUTS}; got {self.w1_layout!r}")
        if self.w1_layout == "gate_up_blocked":
            if is_fp8(self.weight):
                raise ValueError(
                    "w1_layout='gate_up_blocked' needs a 16-bit weight; FP8 weights take only 'gate_up'"
                )
            error = gate_up.gate_up_width_error(self.out_features, "weight")
            if error:
                raise ValueError(f"w1_layout='gate_up_blocked': {error}")

    @property
    def shape(self) -> tuple[int, int, int]:
        """The weight's stored shape."""
        return self.weight.shape if is_fp8(self.weight) else view(self.weight, "weight").shape

    @property
    def num_experts(self) -> int:
        return self.shape[0]

    @property
    def out_features(self) -> int:
        return self.shape[1] if self.trans_b else self.shape[2]

    @property
    def in_features(self) -> int:
        return self.shape[2] if self.trans_b else self.shape[1]

    @property
    def nbytes(self) -> int:
        """GPU bytes of the weight (values and scales for FP8) and the bias."""
        weight = self.weight.nbytes if is_fp8(self.weight) else view(self.weight, "weight").nbytes
        return weight + (0 if self.bias is None else view(self.bias, "bias").nbytes)


class ExpertWeightManager:
    """Packs per-expert arrays into :class:`ExpertWeights`, optionally quantized to FP8."""

    @staticmethod
    def load(
        weights,
        biases=None,
        *,
        trans_b: bool = False,
        quantize: str | None = None,
        w1_layout: str = "gate_up",
    ) -> ExpertWeights:
        """Stack a list of per-expert ``[K, N]`` GPU arrays (``[N, K]`` with ``trans_b``)
        and optional ``[N]`` biases into one contiguous ``[E, K, N]`` array.

        ``quantize``: None (keep the dtype), ``"fp8-block128"`` (e4m3, one scale
        per 128 x 128 block) or ``"fp8-channel"`` (one scale per output channel):
        the weight is then :class:`~cublas_grouped.FP8ExpertWeights`, whose
        ``memory_report()`` gives the bytes before and after (docs/fp8.md).

        ``w1_layout``: for a gated first-GEMM weight, whose N = 2I columns are
        the gate's then the up projection's. ``"gate_up"`` (default) keeps
        that order; ``"gate_up_blocked"`` stores them packed in blocks of 128
        (:func:`~cublas_grouped.pack_gate_up`; N a multiple of 256, not with
        ``quantize``), which lets the Hopper kernel apply the activation in
        the first GEMM's epilogue. The biases keep the plain order.
        """
        import cupy

        if quantize is not None and quantize not in QUANTIZE_MODES:
            raise ValueError(f"quantize must be None or one of {QUANTIZE_MODES}; got {quantize!r}")
        if w1_layout not in W1_LAYOUTS:
            raise ValueError(f"w1_layout must be one of {W1_LAYOUTS}; got {w1_layout!r}")
        blocked = w1_layout == "gate_up_blocked"
        if blocked and quantize is not None:
            raise ValueError(
                f"w1_layout='gate_up_blocked' does not go with quantize={quantize!r}: "
                "FP8 weights take only w1_layout='gate_up'"
            )

        if not weights:
            raise ValueError("weights must hold at least one expert")
        # Shapes are checked on views, so that a bad list is refused before any GPU work.
        views = [view(w, f"weights[{i}]") for i, w in enumerate(weights)]
        first = views[0]
        for i, v in enumerate(views):
            if v.shape != first.shape or v.dtype != first.dtype or v.ndim != 2:
                raise ValueError(
                    f"weights[{i}] is {v.dtype} {v.shape}; expected 2-D {first.dtype} {first.shape}"
                )
        if blocked:
            error = gate_up.gate_up_width_error(first.shape[0 if trans_b else 1], "weights[i]")
            if error:
                raise ValueError(f"w1_layout='gate_up_blocked': {error}")
        mats = [as_cupy(v, f"weights[{i}]") for i, v in enumerate(views)]
        bias = None
        if biases is not None:
            if len(biases) != len(mats):
                raise ValueError(f"biases has {len(biases)} entries for {len(mats)} experts")
            bias = cupy.stack([as_cupy(b, f"biases[{i}]") for i, b in enumerate(biases)])
        with cupy.cuda.Device(mats[0].device.id):
            if blocked:
                # Each expert is packed on its own, by pack_gate_up itself (one
                # definition of the order), straight into its slot: one
                # expert-sized temporary at a time rather than a stacked plain
                # copy alive next to its packed copy (twice the layer's size).
                packed = cupy.empty((len(mats), *mats[0].shape), dtype=mats[0].dtype)
                for e, m in enumerate(mats):
                    packed[e] = gate_up.pack_gate_up(cupy.ascontiguousarray(m)[None], trans_b=trans_b)[0]
            else:
                packed = cupy.ascontiguousarray(cupy.stack(mats))
            if quantize is not None:
                packed = quantize_fp8(packed, scaling=quantize.removeprefix("fp8-"), trans_b=trans_b)
        return ExpertWeights(packed, bias, trans_b, w1_layout)

    @staticmethod
    def quantize(weights: ExpertWeights, mode: str = "fp8-block128") -> ExpertWeights:
        """``weights`` with their weight quantized (``mode`` as in :meth:`load`'s
        ``quantize``); the bias is kept. The 16-bit input is left as it was."""
        if mode not in QUANTIZE_MODES:
            raise ValueError(f"mode must be one of {QUANTIZE_MODES}; got {mode!r}")
        if is_fp8(weights.weight):
            raise ValueError("weights are FP8 already")
        if weights.w1_layout != "gate_up":
            raise ValueError(
                f"weights have w1_layout={weights.w1_layout!r}; FP8 weights take only 'gate_up': "
                "quantize ExpertWeightManager.unpack_gate_up(weights)"
            )
        fp8 = quantize_fp8(weights.weight, scaling=mode.removeprefix("fp8-"), trans_b=weights.trans_b)
        return ExpertWeights(fp8, weights.bias, weights.trans_b)

    @staticmethod
    def pack_gate_up(weights: ExpertWeights) -> ExpertWeights:
        """``weights`` (a gated first-GEMM weight in the ``"gate_up"`` layout)
        with ``w1_layout="gate_up_blocked"``: a new array packed by
        :func:`~cublas_grouped.pack_gate_up`; the input is left as it was.
        The bias is the same array: the kernels read it in the plain gate|up
        order whatever the weight's layout."""
        if weights.w1_layout != "gate_up":
            raise ValueError(f"weights have w1_layout={weights.w1_layout!r} already")
        if is_fp8(weights.weight):
            raise ValueError("w1_layout='gate_up_blocked' needs a 16-bit weight; these weights are FP8")
        error = gate_up.gate_up_width_error(weights.out_features, "weights")
        if error:
            raise ValueError(f"w1_layout='gate_up_blocked': {error}")
        packed = gate_up.pack_gate_up(weights.weight, trans_b=weights.trans_b)
        return ExpertWeights(packed, weights.bias, weights.trans_b, "gate_up_blocked")

    @staticmethod
    def unpack_gate_up(weights: ExpertWeights) -> ExpertWeights:
        """The inverse of :meth:`pack_gate_up`: ``weights`` (``"gate_up_blocked"``)
        as a new array in the ``"gate_up"`` layout, the bias the same array.
        What training (``MoEMLP(..., return_context=True)``) and FP8 need."""
        if weights.w1_layout != "gate_up_blocked":
            raise ValueError(f"weights have w1_layout={weights.w1_layout!r}; only 'gate_up_blocked' unpacks")
        plain = gate_up.unpack_gate_up(weights.weight, trans_b=weights.trans_b)
        return ExpertWeights(plain, weights.bias, weights.trans_b)


def _as_expert_weights(w) -> ExpertWeights:
    if isinstance(w, ExpertWeights):
        return w
    return ExpertWeights(w, trans_b=w.trans_b) if isinstance(w, FP8ExpertWeights) else ExpertWeights(w)


class MoEMLP:
    """A complete MoE block: router, routed experts, optional shared experts.

    Parameters
    ----------
    router_weight : GPU array [H, E]; logits = x @ router_weight
    w1 : ExpertWeights, FP8ExpertWeights or array [E, H, 2I] (gate|up when gated)
        An :class:`ExpertWeights` with ``w1_layout="gate_up_blocked"`` (see
        :meth:`ExpertWeightManager.load`) makes the Hopper kernel apply the
        activation in the first GEMM's epilogue; it is forward-only
        (``return_context`` refuses it).
    w2 : ExpertWeights, FP8ExpertWeights or array [E, I, H]
        FP8 weights run through the dequantizing fallback (docs/fp8.md).
    top_k : experts per token
    shared_w1, shared_w2 : optional dense MLP every token goes through
        ([H, 2Is] gate|up and [Is, H]); its output is added to the experts'.
    scoring, renormalize : passed to :func:`route`
    activation, gated : as in :func:`moe_forward`
    """

    def __init__(
        self,
        router_weight,
        w1,
        w2,
        top_k: int,
        *,
        shared_w1=None,
        shared_w2=None,
        scoring: str = "softmax",
        renormalize: bool = True,
        activation: str = "silu",
        gated: bool = True,
    ):
        self.w1, self.w2 = (_as_expert_weights(w) for w in (w1, w2))
        if self.w1.trans_b != self.w2.trans_b:
            raise ValueError("w1 and w2 must use the same layout (trans_b)")
        if self.w2.w1_layout != "gate_up":
            raise ValueError(
                f"w2 has w1_layout={self.w2.w1_layout!r}; only the first GEMM's weight (w1) may be blocked"
            )
        if self.w1.w1_layout == "gate_up_blocked" and not gated:
            raise ValueError("w1_layout='gate_up_blocked' needs gated=True (it packs gate and up columns)")
        r = view(router_weight, "router_weight")
        if r.ndim != 2 or r.shape[1] != self.w1.num_experts:
            raise ValueError(f"router_weight must be [H, {self.w1.num_experts}]; got {r.shape}")
        if (shared_w1 is None) != (shared_w2 is None):
            raise ValueError("shared_w1 and shared_w2 go together")
        self.router_weight = router_weight
        self.top_k = top_k
        self.shared = None
        if shared_w1 is not None:
            # The shared MLP is a one-expert MoE that every token picks with weight 1.
            self.shared = (as_cupy(shared_w1)[None], as_cupy(shared_w2)[None])
        self.scoring, self.renormalize = scoring, renormalize
        self.activation, self.gated = activation, gated

    def __call__(self, x, *, stream=None, algorithm="auto", return_context=False, recompute=False):
        """Forward ``x`` [T, H] -> [T, H].

        All of the call's work (router matmul, routing, experts, shared
        experts and their sum) runs on ``stream`` (``None``: CuPy's current
        stream of x's device), so the result is ready in that stream's order.
        ``return_context=True`` returns ``(out, ctx)`` for :meth:`backward`
        (``recompute``: as in :func:`moe_forward`); it needs ``w1`` in the
        ``"gate_up"`` layout.
        """
        if return_context or recompute:
            if not return_context:
                raise ValueError("recompute applies only with return_context=True")
            if self.w1.w1_layout != "gate_up":
                raise ValueError(
                    f"return_context=True needs w1 in the 'gate_up' layout (the backward reads gate|up); "
                    f"this MoEMLP's w1 has w1_layout={self.w1.w1_layout!r}: train a MoEMLP built with "
                    "ExpertWeightManager.unpack_gate_up(w1) (or cublas_grouped.unpack_gate_up of its weight)"
                )
            return mlp_forward_with_context(self, x, stream=stream, algorithm=algorithm, recompute=recompute)
        import cupy

        device = device_of(view(x, "x"))
        res = stream_resources(device, stream)
        # CuPy's own operations (matmul, zeros, +=) go to its current stream:
        # make that the call's stream, or they would race with the kernels on it.
        with cupy.cuda.Device(device), res.cupy_stream:
            logits = cupy.matmul(as_cupy(x, "x"), as_cupy(self.router_weight))
            weights, ids = route(
                logits, self.top_k, scoring=self.scoring, renormalize=self.renormalize, stream=res.stream
            )
            out = moe_forward(
                x,
                ids,
                weights,
                self.w1.weight,
                self.w2.weight,
                b1=self.w1.bias,
                b2=self.w2.bias,
                activation=self.activation,
                gated=self.gated,
                trans_b=self.w1.trans_b,
                algorithm=algorithm,
                stream=res.stream,
                w1_layout=self.w1.w1_layout,
            )
            if self.shared is not None:
                tokens = out.shape[0]
                ones = cupy.zeros((tokens, 1), dtype=cupy.int32)
                out += moe_forward(
                    x,
                    ones,
                    None,
                    self.shared[0],
                    self.shared[1],
                    activation=self.activation,
                    gated=self.gated,
                    stream=res.stream,
                )
        return out

    def backward(self, ctx, dy, *, stream=None):
        """Gradients of one ``self(x, return_context=True)`` call for dLoss/dout ``dy``:
        an :class:`~cublas_grouped.moe.mlp_backward.MLPGradients` (x, router,
        experts with their biases, shared experts). Deterministic."""
        return mlp_backward(self, ctx, dy, stream=stream)
