"""8-bit weights for serving, quantized at load from a bf16/fp32 checkpoint.

Decoding at small batch reads every weight once per step, so halving the
bytes of the weights roughly halves a step's time and lets DBRX (132B) fit on
fewer devices. `quantize_model(model, "int8" | "fp8")` replaces, in place:
- the attention projections (Wqkv, out_proj) and the LM head by 8-bit linears;
- every layer's experts by `QuantExperts` (the bulk of DBRX's weights).
The router (tiny, and its top-k decisions are sensitive), the embedding (a
lookup) and the norms keep the checkpoint's precision.

Scales are symmetric per output channel: one per row of a [out, in] matrix,
and for the experts' w2, applied untransposed ([ffn, d_model] per expert),
one per (expert, d_model column).

int8 is weight-only: weights are stored int8 and dequantized into the
activation dtype inside the matmul; it runs anywhere, CPU included. fp8
(e4m3) linears multiply in fp8 with `torch._scaled_mm` (activations scaled per
token) and need a CUDA GPU of compute capability 9.0+; anywhere else asking
for fp8 raises instead of silently running something else. fp8 experts store
e4m3 weights and dequantize the slices a step reads.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from model.kernels import grouped_glu

FORMATS = ("fp32", "bf16", "int8", "fp8")
_QMAX = {"int8": 127.0, "fp8": 448.0}              # largest magnitude of int8 / float8_e4m3fn
_STORAGE = {"int8": torch.int8, "fp8": getattr(torch, "float8_e4m3fn", None)}


def fp8_supported(device: torch.device) -> Optional[str]:
    """None when fp8 matmuls run on `device`; otherwise why not."""
    device = torch.device(device)
    if _STORAGE["fp8"] is None or not hasattr(torch, "_scaled_mm"):
        return f"this torch {torch.__version__} has no float8 matmul (torch._scaled_mm)"
    if device.type != "cuda":
        return f"fp8 weights need a CUDA GPU of compute capability 9.0+ (Hopper), not {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (9, 0):
        return f"fp8 weights need compute capability 9.0+ (Hopper); this GPU has {major}.{minor}"
    return None


def quantize(w: torch.Tensor, fmt: str, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale): w ~= q * scale, symmetric, one scale per slice along every axis but `dim`.

    The scale keeps the reduced dim (size 1) so it broadcasts against q; float32.
    """
    w32 = w.detach().float()
    scale = w32.abs().amax(dim=dim, keepdim=True).clamp(min=1e-12) / _QMAX[fmt]
    scaled = w32 / scale
    if fmt == "int8":
        q = scaled.round().clamp(-127, 127).to(torch.int8)
    else:
        q = scaled.clamp(-_QMAX[fmt], _QMAX[fmt]).to(_STORAGE[fmt])
    return q, scale


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T with int8 q and one scale per output row: weight-only int8."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        q, scale = quantize(weight, "int8")
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale.squeeze(1).to(weight.dtype))
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Scaling the output rather than the weight: the same product, without a scaled weight copy.
        return F.linear(x, self.qweight.to(x.dtype)) * self.scale.to(x.dtype)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """(out, in) weight in `dtype`: for the chunked LM-head loss, which needs the matrix."""
        return self.qweight.to(dtype) * self.scale.to(dtype)[:, None]


class Fp8Linear(nn.Module):
    """fp8 e4m3 weights (per output row) times fp8 activations (per token) with torch._scaled_mm."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        problem = fp8_supported(weight.device)
        if problem:
            raise ValueError(problem)
        q, scale = quantize(weight, "fp8")
        self.register_buffer("qweight", q)                          # (out, in), row-major
        self.register_buffer("scale", scale.view(1, -1).contiguous())  # (1, out) float32
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        n = rows.shape[0]
        pad = (-n) % 16                                   # _scaled_mm wants row counts in 16s
        if pad:
            rows = F.pad(rows, (0, 0, 0, pad))
        xq, xs = quantize(rows, "fp8")
        # Row-wise scales (per token x per output channel) need a bf16 result.
        out = torch._scaled_mm(xq, self.qweight.t(), scale_a=xs, scale_b=self.scale,
                               out_dtype=torch.bfloat16)
        return out[:n].view(*shape[:-1], self.out_features).to(x.dtype)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """(out, in) weight in `dtype`: for the chunked LM-head loss, which needs the matrix."""
        return self.qweight.to(dtype) * self.scale.view(-1, 1).to(dtype)


class QuantExperts(nn.Module):
    """An `Experts` module with 8-bit weights, the same interface (forward, stacked, gathered).

    w1, v1: [experts * ffn, d_model], a scale per row; w2: same storage, a scale
    per (expert, d_model column), w2 being used untransposed.
    """

    GATHER_PASSES = 1       # dequantized into new memory whether gathered or stacked

    def __init__(self, experts: nn.Module, fmt: str):
        super().__init__()
        self.fmt = fmt
        self.num_local_experts, self.ffn_hidden_size = experts.num_local_experts, experts.ffn_hidden_size
        self.dtype = experts.w1.dtype
        e, f = self.num_local_experts, self.ffn_hidden_size
        for name in ("w1", "v1"):
            q, s = quantize(getattr(experts, name), fmt)
            self.register_buffer(f"{name}_q", q)
            self.register_buffer(f"{name}_s", s.view(e, f, 1))
        w2 = experts.w2.view(e, f, -1)
        q, s = quantize(w2, fmt, dim=1)                    # (e, 1, d): one scale per output column
        self.register_buffer("w2_q", q.view(e * f, -1))
        self.register_buffer("w2_s", s)

    def _dequant(self, name: str, ids: Optional[torch.Tensor]) -> torch.Tensor:
        q = getattr(self, f"{name}_q")
        q = q.view(self.num_local_experts, self.ffn_hidden_size, -1)
        s = getattr(self, f"{name}_s")
        if ids is not None:
            q, s = q.index_select(0, ids), s.index_select(0, ids)
        if self.fmt == "int8":
            return q * s.to(self.dtype)         # type promotion: dequantized in one pass, no int->float copy
        return q.to(self.dtype) * s.to(self.dtype)

    def gathered(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Dequantized w1, v1, w2 slices (len(ids), ffn, d_model): only the routed experts are read."""
        return self._dequant("w1", ids), self._dequant("v1", ids), self._dequant("w2", ids)

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Dequantized w1, v1, w2 of every local expert (experts, ffn, d_model)."""
        return self._dequant("w1", None), self._dequant("v1", None), self._dequant("w2", None)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Rows sorted by expert (prefill, large decode batches): dequantize all, run the grouped GLU."""
        w1, v1, w2 = (self._dequant(n, None).view(-1, x.shape[-1]) for n in ("w1", "v1", "w2"))
        return grouped_glu(x, w1, v1, w2, counts)


@torch.no_grad()
def quantize_model(model: nn.Module, fmt: str, device: Optional[Union[str, torch.device]] = None) -> nn.Module:
    """Make `model` (a DBRX) serve with `fmt` weights, in place; returns it.

    fp32 / bf16 cast the whole model; int8 / fp8 replace the linears and
    experts listed in the module docstring. `device`: where the model will run
    (default: where it is). A model still on the host moves there one block
    at a time, each quantized on arrival, so the device never holds more than
    one block at the checkpoint's precision.
    """
    if fmt not in FORMATS:
        raise ValueError(f"weights must be one of {', '.join(FORMATS)}, got {fmt!r}")
    target = torch.device(device) if device is not None else model.wte.weight.device
    if fmt in ("fp32", "bf16"):
        return model.to(device=target, dtype=torch.float32 if fmt == "fp32" else torch.bfloat16)
    if fmt == "fp8":
        problem = fp8_supported(target)
        if problem:
            raise ValueError(problem)
    linear = Int8Linear if fmt == "int8" else Fp8Linear
    for block in model.blocks:
        block.to(target)
        block.attn.Wqkv = linear(block.attn.Wqkv.weight)
        block.attn.out_proj = linear(block.attn.out_proj.weight)
        block.ffn.experts = QuantExperts(block.ffn.experts, fmt)
    for module in (model.wte, model.norm_f, model.lm_head):
        module.to(target)
    model.lm_head = linear(model.lm_head.weight)
    model.weight_format = fmt
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model's parameters and buffers take (what a step reads, give or take the embedding)."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
