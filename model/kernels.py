"""Grouped GLU expert compute over tokens already sorted by expert.

Input rows are contiguous per expert (`counts[e]` rows for local expert e, in
expert order), so every expert multiplies exactly its own tokens: this is what
makes the MoE dropless. Weights keep DBRX's stacked layout, each of w1, v1, w2
being [experts * ffn, d_model]: expert e computes
    silu(x @ w1_e.T) * (x @ v1_e.T) @ w2_e        with w_e = w.view(E, ffn, d)[e]
(w2 is applied untransposed, as in the released checkpoints and MegaBlocks).

Backends, chosen per call by `select_backend` (a pure function of device,
dtype and shapes; DBRX_MOE_KERNEL=<name> forces one):
- "grouped_mm": torch.nn.functional.grouped_mm, one launch per projection
  (autograd derives the backward). The CUDA default: no host sync, and on an
  H200 the whole layer runs at 94% of the bench's GEMM floor (bench/gpu_check.py).
  Needs 16-byte-aligned rows.
- "loop": a loop over the local experts on contiguous row slices with a
  hand-written backward (_LoopGLU); runs anywhere, any dtype and shape. The CPU
  default: torch 2.13's CPU grouped_mm is itself a loop of per-expert matmuls,
  and measured on 2 cores this path is 5-15% faster per fwd+bwd (per-expert
  intermediates stay in cache and are recycled by the allocator instead of
  faulting in fresh pages for rows x ffn tensors every step). It reads the
  per-expert counts on the host (one sync per layer).
- "megablocks": MegaBlocks' grouped GEMM (`megablocks.grouped_gemm_util.ops.gmm`,
  the kernel of its dMoE; CUDA, bf16), on the same weight layout. Opt-in only:
  MegaBlocks installs only beside the torch it pins, and its op takes the
  counts on the host (a sync per layer), so it is never chosen by default.
Under torch.autocast every backend computes in autocast's dtype (grouped_glu).
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

BACKENDS = ("megablocks", "grouped_mm", "loop")


@functools.lru_cache(maxsize=None)
def _megablocks_gmm():
    """MegaBlocks' grouped GEMM op, or None when MegaBlocks is not installed."""
    try:
        from megablocks import grouped_gemm_util as gg
    except Exception:  # ImportError, or a broken CUDA extension build
        return None
    return gg.ops.gmm if gg.grouped_gemm_is_available() else None


@functools.lru_cache(maxsize=None)
def _grouped_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    """Probe torch's grouped_mm once per device type and dtype (support varies by build and GPU).

    The answer must not depend on the caller's context: the probe runs with
    gradients on, outside inference mode and autocast, whatever the first
    caller had (an eval forward under no_grad once cached False here for good).
    """
    if not hasattr(F, "grouped_mm"):
        return False
    try:
        with _neutral_grad_mode(device_type):
            return _probe_grouped_mm(device_type, dtype)
    except Exception:
        return False


@contextlib.contextmanager
def _neutral_grad_mode(device_type: str):
    with torch.inference_mode(False), torch.enable_grad(), \
            torch.autocast(device_type, enabled=False):
        yield


def _probe_grouped_mm(device_type: str, dtype: torch.dtype) -> bool:
    """Forward and both weight layouts of the backward on a tiny problem, one empty group."""
    a = torch.ones(4, 8, device=device_type, dtype=dtype, requires_grad=True)
    b = torch.ones(3, 8, 8, device=device_type, dtype=dtype, requires_grad=True)
    offs = torch.tensor([1, 1, 4], device=device_type, dtype=torch.int32)
    out = F.grouped_mm(a, b.transpose(1, 2), offs=offs)
    out.backward(torch.ones_like(out))
    weight_grad = F.grouped_mm(a.detach().t(), a.detach(), offs=offs)
    return bool(torch.all(out == 8).item() and torch.all(b.grad[0] == 1).item()
                and torch.all(b.grad[1] == 0).item() and torch.all(weight_grad[2] == 3).item())


def _grouped_mm_ok(device: torch.device, dtype: torch.dtype, d_model: int, ffn: int) -> bool:
    """grouped_mm works for this device/dtype and every row stride is a multiple of 16 bytes."""
    size = torch.empty((), dtype=dtype).element_size()
    return (dtype in (torch.float32, torch.bfloat16, torch.float16)
            and (d_model * size) % 16 == 0 and (ffn * size) % 16 == 0
            and _grouped_mm_works(torch.device(device).type, dtype))


def select_backend(device: torch.device, dtype: torch.dtype, d_model: int, ffn: int) -> str:
    """The backend for experts of this shape on this device and dtype (DBRX_MOE_KERNEL forces one).

    A pure function of its arguments and the installed packages: never of the
    grad mode or of what ran before in the process.
    """
    device = torch.device(device)
    forced = os.environ.get("DBRX_MOE_KERNEL", "").strip()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"DBRX_MOE_KERNEL={forced!r}: expected one of {', '.join(BACKENDS)}")
        if forced == "megablocks" and (device.type != "cuda" or dtype != torch.bfloat16
                                       or _megablocks_gmm() is None):
            raise RuntimeError("DBRX_MOE_KERNEL=megablocks needs bf16 CUDA tensors and MegaBlocks "
                               "installed (see the README's MoE kernels section); unset it")
        if forced == "grouped_mm" and not _grouped_mm_ok(device, dtype, d_model, ffn):
            raise RuntimeError(f"DBRX_MOE_KERNEL=grouped_mm: torch.nn.functional.grouped_mm does not "
                               f"support {dtype} on {device.type} with d_model={d_model}, "
                               f"ffn={ffn} (rows must be 16-byte aligned); unset it")
        return forced
    if device.type != "cuda":
        return "loop"
    return "grouped_mm" if _grouped_mm_ok(device, dtype, d_model, ffn) else "loop"


def _offsets(counts: torch.Tensor) -> torch.Tensor:
    """grouped_mm's group ends (int32, on the device: no host sync)."""
    return torch.cumsum(counts, 0).to(torch.int32)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient dense.

    grouped_mm's backward rejects stride-0 gradients (e.g. from `out.sum()`).
    """

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _glu_grouped_mm(x, w1, v1, w2, counts):
    """Three grouped_mm calls; torch derives the backward (six more). On an H200 at DBRX
    width this ran at 94% of the bench's GEMM floor, a hand-written backward (weight
    gradients in the K-grouped form, silu(h1) * h2 recomputed) at 89%: kept as is."""
    offs = _offsets(counts)
    h = F.silu(_ContiguousGrad.apply(F.grouped_mm(x, w1.transpose(1, 2), offs=offs)))
    h = h * _ContiguousGrad.apply(F.grouped_mm(x, v1.transpose(1, 2), offs=offs))
    return _ContiguousGrad.apply(F.grouped_mm(h, w2, offs=offs))


class _LoopGLU(torch.autograd.Function):
    """GLU experts one expert at a time, forward and a hand-written backward.

    Every intermediate is per expert (rows_e x ffn): it stays in cache and is
    small enough for the allocator to recycle, where full-size (rows x ffn)
    intermediates are fresh pages on every step. Outputs and gradients are
    written in place into their final tensors (no cat, no stack, no copies),
    and the weight gradients come out directly in the stacked layout.
    """

    @staticmethod
    def forward(ctx, x, w1, v1, w2, counts):
        ctx.counts = counts.tolist()
        y = x.new_empty(x.shape)
        saved = []
        for e, (xe, ye) in enumerate(zip(x.split(ctx.counts), y.split(ctx.counts))):
            h1, h2 = xe @ w1[e].t(), xe @ v1[e].t()
            torch.mm(F.silu(h1).mul_(h2), w2[e], out=ye)
            saved += [h1, h2]
        ctx.save_for_backward(x, w1, v1, w2, *saved)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, w1, v1, w2, *saved = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], any(ctx.needs_input_grad[1:4])
        dy = dy.contiguous()
        dx = torch.empty_like(x) if need_x else None
        dw1, dv1, dw2 = ((torch.empty_like(w1), torch.empty_like(v1), torch.empty_like(w2))
                         if need_w else (None, None, None))
        start = 0
        for e, rows in enumerate(ctx.counts):
            xe, dye = x.narrow(0, start, rows), dy.narrow(0, start, rows)
            h1, h2 = saved[2 * e], saved[2 * e + 1]
            sig = torch.sigmoid(h1)
            act = h1 * sig                                   # silu(h1)
            if need_w:
                torch.mm((act * h2).t(), dye, out=dw2[e])
            da = dye @ w2[e].t()
            dh2 = da * act
            # silu'(h) = sig * (1 + h * (1 - sig)) = sig + act * (1 - sig)
            dh1 = da.mul_(h2).mul_(act.mul_(1.0 - sig).add_(sig))
            if need_w:
                torch.mm(dh1.t(), xe, out=dw1[e])
                torch.mm(dh2.t(), xe, out=dv1[e])
            if need_x:
                dxe = dx.narrow(0, start, rows)
                torch.mm(dh1, w1[e], out=dxe)
                dxe.addmm_(dh2, v1[e])
            start += rows
        return dx, dw1, dv1, dw2, None


def _glu_loop(x, w1, v1, w2, counts):
    return _LoopGLU.apply(x, w1, v1, w2, counts)


def _glu_megablocks(x, w1, v1, w2, counts):
    gmm = _megablocks_gmm()
    batch_sizes = counts.to(device="cpu", dtype=torch.long)
    h = F.silu(gmm(x, w1, batch_sizes, trans_b=True)) * gmm(x, v1, batch_sizes, trans_b=True)
    return gmm(h, w2, batch_sizes)


_IMPLS = {"grouped_mm": _glu_grouped_mm, "loop": _glu_loop, "megablocks": _glu_megablocks}


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast computes matrix products in on `device_type`, or None when it is off."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def grouped_glu(x: torch.Tensor, w1: torch.Tensor, v1: torch.Tensor, w2: torch.Tensor,
                counts: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
    """GLU experts on sorted rows.

    x: (sum(counts), d_model), rows grouped by local expert in order.
    w1, v1, w2: (num_local_experts * ffn, d_model), DBRX's stacked layout.
    counts: (num_local_experts,) integer tensor of rows per expert.
    Returns (sum(counts), d_model).

    Under torch.autocast the experts compute in autocast's dtype, as a plain
    matmul would: inputs and weights are cast once here (gradients flow back
    to the original dtypes) and the kernels run with autocast off, so every
    backend sees one dtype throughout, forward and backward.
    """
    compute = autocast_dtype(x.device.type)
    if compute is not None:
        with torch.autocast(x.device.type, enabled=False):
            return grouped_glu(x.to(compute), w1.to(compute), v1.to(compute), w2.to(compute),
                               counts, backend)
    n_local = counts.shape[0]
    d_model = x.shape[-1]
    ffn = w1.shape[0] // n_local
    backend = backend or select_backend(x.device, x.dtype, d_model, ffn)
    shape = (n_local, ffn, d_model)
    return _IMPLS[backend](x, w1.view(shape), v1.view(shape), w2.view(shape), counts)
