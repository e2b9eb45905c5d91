"""Grouped GLU expert compute over tokens already sorted by expert.

Input rows are contiguous per expert (`counts[e]` rows for local expert e, in
expert order), so every expert multiplies exactly its own tokens: this is what
makes the MoE dropless. Weights keep DBRX's stacked layout, each of w1, v1, w2
being [experts * ffn, d_model]: expert e computes
    silu(x @ w1_e.T) * (x @ v1_e.T) @ w2_e        with w_e = w.view(E, ffn, d)[e]
(w2 is applied untransposed, as in the released checkpoints and MegaBlocks).

Backends, chosen per call by `select_backend`:
- "megablocks": CUDA bf16 with the `gpu` extra installed; MegaBlocks' grouped
  GEMM (`megablocks.grouped_gemm_util.ops.gmm`, the kernel of its dMoE, bf16
  only), on the same weight layout.
- "grouped_mm": torch.nn.functional.grouped_mm, one call per projection; the
  CUDA default without MegaBlocks (no host sync, one launch per projection).
  Needs 16-byte-aligned row strides.
- "batched": the CPU default; runs anywhere, any dtype and shape. Rows go into a
  packed layout (PackedLayout): the experts are cut into contiguous runs, each run
  padded to its largest count, so that a run is one torch.bmm per projection;
  `plan_layout` picks the runs with a cost model (padded rows vs GEMM calls,
  batched GEMMs one matrix per thread), so balanced routing gives one or two runs
  and very unbalanced routing falls back to per-expert GEMMs without padding.
  Padding rows are zeros that only even out GEMM shapes: every token is computed,
  no capacity factor exists. Elementwise steps are one op per run, the only
  transcendental (sigmoid) is computed once, the backward is hand-written, and
  the large intermediates are recycled through a buffer pool. Without expert
  parallelism DroplessMoE runs dispatch + experts + combine as one op on this
  layout (`packed_moe`); through `grouped_glu` sorted rows are packed and unpacked.
  On 2 cores a batched GEMM over 16 experts padded by 25% still runs 15-20%
  faster than torch 2.13's CPU grouped_mm (itself a loop of per-expert matmuls)
  or a per-expert loop on the unpadded rows.
- "loop": the same kernel with one run per expert and no padding (per-expert
  GEMMs).
Set DBRX_MOE_KERNEL to one of those names to force a backend.
"""

from __future__ import annotations

import bisect
import functools
import math
import os
import threading
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

BACKENDS = ("megablocks", "grouped_mm", "batched", "loop")


@functools.lru_cache(maxsize=None)
def _megablocks_gmm():
    """MegaBlocks' grouped GEMM op, or None when the `gpu` extra is not installed."""
    try:
        from megablocks import grouped_gemm_util as gg
    except Exception:  # ImportError, or a broken CUDA extension build
        return None
    return gg.ops.gmm if gg.grouped_gemm_is_available() else None


@functools.lru_cache(maxsize=None)
def _grouped_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    """Probe torch's grouped_mm once per device type and dtype (support varies by build and GPU)."""
    if not hasattr(F, "grouped_mm"):
        return False
    try:
        a = torch.ones(4, 8, device=device_type, dtype=dtype, requires_grad=True)
        b = torch.ones(2, 8, 8, device=device_type, dtype=dtype, requires_grad=True)
        offs = torch.tensor([1, 4], device=device_type, dtype=torch.int32)
        out = F.grouped_mm(a, b, offs=offs)
        out.backward(torch.ones_like(out))
        return bool(torch.all(out == 8).item())
    except Exception:
        return False


def _grouped_mm_ok(x: torch.Tensor, ffn: int) -> bool:
    """grouped_mm works for this device/dtype and every row stride is a multiple of 16 bytes."""
    return (x.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and (x.shape[-1] * x.element_size()) % 16 == 0
            and (ffn * x.element_size()) % 16 == 0
            and _grouped_mm_works(x.device.type, x.dtype))


def select_backend(x: torch.Tensor, w1: torch.Tensor, ffn: int) -> str:
    forced = os.environ.get("DBRX_MOE_KERNEL", "").strip()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"DBRX_MOE_KERNEL={forced!r}: expected one of {', '.join(BACKENDS)}")
        if forced == "megablocks" and (not x.is_cuda or _megablocks_gmm() is None):
            raise RuntimeError("DBRX_MOE_KERNEL=megablocks needs CUDA tensors and the `gpu` extra "
                               "(pip install 'dbrx-platform[gpu]')")
        if forced == "grouped_mm" and not _grouped_mm_ok(x, ffn):
            raise RuntimeError(f"DBRX_MOE_KERNEL=grouped_mm: torch.nn.functional.grouped_mm does not "
                               f"support {x.dtype} on {x.device.type} with d_model={x.shape[-1]}, "
                               f"ffn={ffn} (rows must be 16-byte aligned); unset it")
        return forced
    if not x.is_cuda:
        return "batched"
    if x.dtype == torch.bfloat16 and _megablocks_gmm() is not None:
        return "megablocks"
    return "grouped_mm" if _grouped_mm_ok(x, ffn) else "loop"


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
    offs = torch.cumsum(counts, 0).to(torch.int32)
    h = F.silu(_ContiguousGrad.apply(F.grouped_mm(x, w1.transpose(1, 2), offs=offs)))
    h = h * _ContiguousGrad.apply(F.grouped_mm(x, v1.transpose(1, 2), offs=offs))
    return _ContiguousGrad.apply(F.grouped_mm(h, w2, offs=offs))


# --- Packed layout: batched GEMMs over padded runs of experts -------------------

# Cost model of the planner (measured on 2 CPU cores, AMD EPYC, MKL, fp32):
# - a batched GEMM (torch.bmm) runs its matrices in parallel, one per thread, so a
#   block of n > 1 experts at `cap` rows each takes as long as ceil(n / threads)
#   rounds of cap-row GEMMs: 3 experts cost as much as 4 on 2 threads;
# - a single-expert block is one torch.mm threaded inside the GEMM, ~17% slower
#   per row than the batched GEMMs;
# - a block costs ~9 GEMM calls of ~22 us beyond their flops plus a few elementwise
#   calls, while a row costs ~1.2e-5 us per (d_model * ffn) and GEMM: a block's
#   overhead is _BLOCK_OVERHEAD / (d_model * ffn) rows (~56 rows at d_model 128 /
#   ffn 256, ~3.5 rows at 512 / 1024).
_BLOCK_OVERHEAD = 1.8e6
_SINGLE_EXPERT_ROW_COST = 1.17
_MAX_PLANNED_EXPERTS = 64      # beyond this the O(E^2) planner gives way to a linear scan


@dataclass(frozen=True)
class PackedLayout:
    """Where the rows of each local expert live in a packed buffer.

    The experts are cut into contiguous runs ("blocks"); block (first, n, cap, start)
    holds experts first..first+n-1, each in `cap` consecutive rows from packed row
    `start + i * cap`: the expert's own rows first, then padding up to `cap`. A
    block of n > 1 experts is one batched GEMM per projection ([n, cap, d] x
    [n, d, ffn]); padding only evens out the GEMM shapes, every row of every
    expert is computed (dropless). Experts without rows that are in no block get
    zero weight gradients.

    shift[e] = packed row - sorted row for the rows of expert e (rows sorted by
    expert, counts[e] per expert); None when the packed layout is the sorted one.
    """

    blocks: tuple[tuple[int, int, int, int], ...]
    rows: int
    n_experts: int
    shift: Optional[torch.Tensor]

    def positions(self, row_expert: torch.Tensor) -> torch.Tensor:
        """Packed row of each sorted row, given the expert of each sorted row."""
        if self.shift is None:
            return torch.arange(row_expert.numel(), device=row_expert.device)
        return self.shift[row_expert] + torch.arange(row_expert.numel(), device=row_expert.device)


def _plan_blocks(counts: list[int], overhead_rows: float, threads: int) -> list[tuple[int, int, int]]:
    """Cut experts into runs [(first, end, cap)] of least modelled time (see the cost model).

    A run of n experts padded to cap rows costs overhead_rows + cap * width(n), width(n) =
    ceil(n / threads) * threads (1.17 for n = 1). Exact dynamic programme over contiguous
    runs (O(E^2), some 30 us for 16 experts; a linear greedy scan beyond
    _MAX_PLANNED_EXPERTS); a run whose experts all have no rows costs nothing and is dropped.
    """
    n = len(counts)
    threads = max(1, threads)
    width = [0.0, _SINGLE_EXPERT_ROW_COST] + [float(-(-m // threads) * threads) for m in range(2, n + 1)]
    if n > _MAX_PLANNED_EXPERTS:      # greedy: extend a run while that is cheaper than a new one
        runs, first, cap = [], 0, counts[0] if counts else 0
        for e in range(1, n + 1):
            if e < n:
                new_cap = max(cap, counts[e])
                joined = new_cap * width[e + 1 - first]
                split = cap * width[e - first] + counts[e] * width[1] + (overhead_rows if counts[e] else 0.0)
                if joined <= split:
                    cap = new_cap
                    continue
            if cap:
                runs.append((first, e, cap))
            if e < n:
                first, cap = e, counts[e]
        return runs
    best = [0.0] * (n + 1)
    arg = [0] * (n + 1)
    for end in range(1, n + 1):
        cap, best_cost, best_first = 0, float("inf"), 0
        for first in range(end - 1, -1, -1):
            c = counts[first]
            if c > cap:
                cap = c
            cost = best[first] + (cap * width[end - first] + overhead_rows if cap else 0.0)
            if cost < best_cost:
                best_cost, best_first = cost, first
        best[end], arg[end] = best_cost, best_first
    runs, end = [], n
    while end:
        first = arg[end]
        cap = max(counts[first:end])
        if cap:
            runs.append((first, end, cap))
        end = first
    return runs[::-1]


def plan_layout(counts: torch.Tensor, d_model: int, ffn: int, batched: bool = True) -> PackedLayout:
    """The packed layout for `counts` rows per local expert (rows sorted by expert).

    batched=False: one block per expert with rows, no padding (a plain per-expert loop).
    """
    c = counts.tolist()
    if batched:
        runs = _plan_blocks(c, _BLOCK_OVERHEAD / max(1, d_model * ffn), torch.get_num_threads())
    else:
        runs = [(e, e + 1, n) for e, n in enumerate(c) if n]
    blocks, rows, padded = [], 0, False
    for first, end, cap in runs:
        blocks.append((first, end - first, cap, rows))
        padded = padded or any(c[e] != cap for e in range(first, end))
        rows += (end - first) * cap
    shift = None
    if padded:
        shift, sorted_start = [0] * len(c), 0
        for first, n, cap, start in blocks:
            for e in range(first, first + n):
                shift[e] = start + (e - first) * cap
        for e, n in enumerate(c):
            shift[e] -= sorted_start
            sorted_start += n
        shift = torch.tensor(shift, device=counts.device)
    return PackedLayout(tuple(blocks), rows, len(c), shift)


def _block_views(layout: PackedLayout):
    """(experts, view) per block; view(t) is the block's rows of a packed (rows, w) tensor:
    [n, cap, w] for a batched block (experts a slice), [cap, w] for one expert (an index)."""
    out = []
    for first, n, cap, start in layout.blocks:
        if n > 1:
            out.append((slice(first, first + n),
                        lambda t, s=start, n=n, c=cap: t.narrow(0, s, n * c).view(n, c, t.shape[-1])))
        else:
            out.append((first, lambda t, s=start, c=cap: t.narrow(0, s, c)))
    return out


def _mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    (torch.bmm if a.dim() == 3 else torch.mm)(a, b, out=out)


def _mm_add(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    (out.baddbmm_ if a.dim() == 3 else out.addmm_)(a, b)


class _BufferPool:
    """Free CPU buffers for the packed kernels' large intermediates, reused across calls.

    The kernels' intermediates are (rows x ffn) and (rows x d_model) tensors of
    megabytes. Fresh from the C allocator they are mostly fresh pages (glibc maps
    and trims large blocks), and faulting them in costs as much as the elementwise
    math on them: reusing them saves 5-7% of a fwd+bwd (measured on 2 cores). A
    buffer goes back to the pool only when nothing will read it again: transients
    at the end of the call that made them, saved activations at the end of the
    backward that used them (a second backward through a retained graph raises
    instead of reading buffers that may have been reused). Other devices have
    caching allocators already: there take() is new_empty() and give() does
    nothing. At most _POOL_BUFFERS buffers and _POOL_BYTES are kept.
    """

    def __init__(self, max_buffers: int, max_bytes: int):
        self._free: list[torch.Tensor] = []          # ascending numel
        self._sizes: list[int] = []                  # their numel
        self._bytes = 0
        self._lock = threading.Lock()
        self.max_buffers, self.max_bytes = max_buffers, max_bytes

    def take(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        n = math.prod(shape)
        if like.device.type != "cpu" or n == 0:
            return like.new_empty(shape)
        buf = None
        with self._lock:     # the smallest that fits, at most twice the request
            i = bisect.bisect_left(self._sizes, n)
            while i < len(self._sizes) and self._sizes[i] <= 2 * n:
                if self._free[i].dtype == like.dtype:
                    buf = self._free.pop(i)
                    del self._sizes[i]
                    self._bytes -= buf.numel() * buf.element_size()
                    break
                i += 1
        if buf is None:     # headroom: the next call's expert counts differ a little
            buf = torch.empty(n + n // 8, dtype=like.dtype)
        return buf[:n].view(shape)

    def give(self, *tensors: Optional[torch.Tensor]) -> None:
        with self._lock:
            for t in tensors:
                if t is None or t.device.type != "cpu":
                    continue
                buf = t if t._base is None else t._base
                i = bisect.bisect_right(self._sizes, buf.numel())
                self._free.insert(i, buf)
                self._sizes.insert(i, buf.numel())
                self._bytes += buf.numel() * buf.element_size()
            while self._free and (len(self._free) > self.max_buffers or self._bytes > self.max_bytes):
                dropped = self._free.pop(0)             # the smallest
                del self._sizes[0]
                self._bytes -= dropped.numel() * dropped.element_size()


_POOL_BUFFERS = 64
_POOL_BYTES = 1 << 30
_POOL = _BufferPool(_POOL_BUFFERS, _POOL_BYTES)


def _glu_forward(xp, w1, v1, w2, layout, yp, alloc):
    """Forward GEMMs and activations on packed rows into yp; returns (act, g, q) for the backward.

    Block by block (while its rows are in cache): one GEMM per projection, batched
    over the block's experts and writing straight into full packed buffers, and each
    elementwise step one op over the block. The one transcendental (sigmoid) is
    computed once: the backward needs
        act = silu(h1),  g = act * h2,  q = h2 * silu'(h1)
    (silu'(h1) = act + sig * (1 - act), so q = g + sig * (h2 - g)).
    alloc(shape, like) makes the three saved buffers.
    """
    rows, f = xp.shape[0], w1.shape[1]
    act, g, q = alloc((rows, f), xp), alloc((rows, f), xp), alloc((rows, f), xp)
    h2 = _POOL.take((rows, f), xp)
    for e, v in _block_views(layout):
        x_b, h1_b, h2_b, g_b, sig_b = v(xp), v(act), v(h2), v(g), v(q)
        _mm(x_b, w1[e].transpose(-1, -2), h1_b)
        _mm(x_b, v1[e].transpose(-1, -2), h2_b)
        torch.sigmoid(h1_b, out=sig_b)
        h1_b.mul_(sig_b)                                  # act = silu(h1), in h1's buffer
        torch.mul(h2_b, h1_b, out=g_b)
        torch.addcmul(g_b, sig_b, h2_b.sub_(g_b), out=sig_b)   # q, in sig's buffer
        _mm(g_b, w2[e], v(yp))
    _POOL.give(h2)
    return act, g, q


def _glu_backward(xp, dyp, w1, v1, w2, act, g, q, layout, dxp, need_w):
    """Backward of _glu_forward: fills dxp (unless None); returns (dw1, dv1, dw2) or Nones.

    With da = dy @ w2.T: dh2 = da * act and dh1 = da * q; weight gradients come out
    directly in the stacked layout (experts without rows get zeros).
    """
    dw1 = dv1 = dw2 = None
    if need_w:
        dw1, dv1, dw2 = torch.empty_like(w1), torch.empty_like(v1), torch.empty_like(w2)
        covered = [False] * w1.shape[0]
        for first, n, _, _ in layout.blocks:
            covered[first:first + n] = [True] * n
        for e in (e for e, c in enumerate(covered) if not c):   # experts without rows
            for t in (dw1, dv1, dw2):
                t[e].zero_()
    dh1, dh2 = _POOL.take(act.shape, act), _POOL.take(act.shape, act)
    for e, v in _block_views(layout):
        dy_b, g1, g2 = v(dyp), v(dh1), v(dh2)
        _mm(dy_b, w2[e].transpose(-1, -2), g1)           # da = dy @ w2.T
        torch.mul(g1, v(act), out=g2)
        g1.mul_(v(q))
        if need_w:
            x_b = v(xp)
            _mm(v(g).transpose(-1, -2), dy_b, dw2[e])
            _mm(g1.transpose(-1, -2), x_b, dw1[e])
            _mm(g2.transpose(-1, -2), x_b, dv1[e])
        if dxp is not None:
            dx_b = v(dxp)
            _mm(g1, w1[e], dx_b)
            _mm_add(dx_b, g2, v1[e])
    _POOL.give(dh1, dh2)
    return dw1, dv1, dw2


def _new_empty(shape, like):
    return like.new_empty(shape)


class _PackedGLU(torch.autograd.Function):
    """GLU experts on a packed layout (see _glu_forward), with a hand-written backward.

    Padding rows of the input must be zero; the gradient arriving for them may be
    anything finite (zero activations make them contribute nothing to any gradient).
    """

    @staticmethod
    def forward(ctx, xp, w1, v1, w2, layout):
        yp = xp.new_empty(xp.shape)
        act, g, q = _glu_forward(xp, w1, v1, w2, layout, yp, _new_empty)
        ctx.layout = layout
        ctx.save_for_backward(xp, w1, v1, w2, act, g, q)
        return yp

    @staticmethod
    @once_differentiable
    def backward(ctx, dyp):
        xp, w1, v1, w2, act, g, q = ctx.saved_tensors
        dxp = torch.empty_like(xp) if ctx.needs_input_grad[0] else None
        dw1, dv1, dw2 = _glu_backward(xp, dyp.contiguous(), w1, v1, w2, act, g, q, ctx.layout,
                                      dxp, any(ctx.needs_input_grad[1:4]))
        return dxp, dw1, dv1, dw2, None


def _stacked(w: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    return w.view(layout.n_experts, w.shape[0] // layout.n_experts, w.shape[1])


def packed_glu(xp: torch.Tensor, w1: torch.Tensor, v1: torch.Tensor, w2: torch.Tensor,
               layout: PackedLayout) -> torch.Tensor:
    """GLU experts on rows already in `layout` (see PackedLayout): (layout.rows, d_model) in and out.

    w1, v1, w2: (num_local_experts * ffn, d_model), DBRX's stacked layout. Padding
    rows of xp must be zero; padding rows of the output are unspecified and their
    incoming gradient may be anything finite.
    """
    return _PackedGLU.apply(xp, _stacked(w1, layout), _stacked(v1, layout), _stacked(w2, layout), layout)


class _PackedMoE(torch.autograd.Function):
    """Dispatch tokens into a packed layout, run the GLU experts, combine: one autograd node.

        out[t] = sum_j weights[t, j] * GLU_{expert of slot t*k+j}(x[t])

    Row r of the packed layout holds slot row_slot[r] (token row_slot[r] // k);
    padding rows have row_slot >= N*k and gather a zero row. slot_row is the
    inverse map (slot -> row). One node instead of three keeps every rows x d_model
    and rows x ffn intermediate inside the op, so all of them come from the buffer
    pool; the backward gathers gradients with the index maps (no scatter).
    """

    @staticmethod
    def forward(ctx, x, weights, w1, v1, w2, layout, row_slot, slot_row, keep):
        n, k = weights.shape
        d, rows = x.shape[-1], layout.rows
        src = torch.div(row_slot, k, rounding_mode="floor")
        if rows > n * k:                                 # padding rows gather token n: zeros
            x = torch.cat([x, x.new_zeros(1, d)])
        xp = torch.index_select(x, 0, src, out=_POOL.take((rows, d), x))
        yp = _POOL.take((rows, d), x)
        act, g, q = _glu_forward(xp, w1, v1, w2, layout, yp, _POOL.take)
        y = torch.index_select(yp, 0, slot_row, out=_POOL.take((n * k, d), x)).view(n, k, d)
        _POOL.give(yp)
        out = torch.bmm(weights.unsqueeze(1), y).squeeze(1)
        ctx.released = False
        if keep:
            ctx.layout = layout
            ctx.save_for_backward(weights, w1, v1, w2, row_slot, slot_row, xp, act, g, q, y)
        else:                                            # no backward will come
            _POOL.give(xp, act, g, q, y)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        if ctx.released:
            raise RuntimeError("backward through the packed MoE experts ran twice (retain_graph=True): "
                               "its saved activations went back to the buffer pool after the first; "
                               "set DBRX_MOE_KERNEL=loop for graphs that are backpropagated twice")
        weights, w1, v1, w2, row_slot, slot_row, xp, act, g, q, y = ctx.saved_tensors
        need_x, need_wts, need_w = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                                    any(ctx.needs_input_grad[2:5]))
        grad = grad.contiguous()
        n, k, d = y.shape
        rows = xp.shape[0]
        grad_x = grad_wts = None
        prod = _POOL.take((n, k, d), grad)
        if need_wts:       # a batch of dot products (faster than bmm on CPU)
            grad_wts = torch.mul(y, grad.unsqueeze(1), out=prod).sum(-1)
        slots = torch.mul(weights.unsqueeze(-1), grad.unsqueeze(1), out=prod).view(n * k, d)
        if rows > n * k:      # padding rows take any slot's gradient: their inputs are zero
            row_slot = row_slot.clamp(max=max(n * k - 1, 0))
        dyp = torch.index_select(slots, 0, row_slot, out=_POOL.take((rows, d), grad))
        dxp = _POOL.take((rows, d), grad) if need_x else None
        dw1, dv1, dw2 = _glu_backward(xp, dyp, w1, v1, w2, act, g, q, ctx.layout, dxp, need_w)
        if need_x:
            per_slot = torch.index_select(dxp, 0, slot_row, out=prod.view(n * k, d))
            grad_x = per_slot.view(n, k, d).sum(1)
        ctx.released = True
        _POOL.give(prod, dyp, dxp, xp, act, g, q, y)
        return grad_x, grad_wts, dw1, dv1, dw2, None, None, None, None


def packed_moe(x: torch.Tensor, weights: torch.Tensor, w1: torch.Tensor, v1: torch.Tensor,
               w2: torch.Tensor, layout: PackedLayout, row_slot: torch.Tensor,
               slot_row: torch.Tensor) -> torch.Tensor:
    """Top-k mixture of GLU experts for tokens x (N, d_model) in one op (see _PackedMoE).

    weights (N, k): the tokens' expert weights (x's dtype). w1, v1, w2: DBRX's stacked
    (num_local_experts * ffn, d_model). layout: plan_layout of the per-expert counts;
    row_slot (layout.rows,) and slot_row (N*k,): the maps between packed rows and
    (token, j) slots, padding rows having row_slot >= N*k.
    """
    keep = torch.is_grad_enabled() and any(t.requires_grad for t in (x, weights, w1, v1, w2))
    return _PackedMoE.apply(x, weights, _stacked(w1, layout), _stacked(v1, layout),
                            _stacked(w2, layout), layout, row_slot, slot_row, keep)


def _glu_megablocks(x, w1, v1, w2, counts):
    gmm = _megablocks_gmm()
    batch_sizes = counts.to(device="cpu", dtype=torch.long)
    h = F.silu(gmm(x, w1, batch_sizes, trans_b=True)) * gmm(x, v1, batch_sizes, trans_b=True)
    return gmm(h, w2, batch_sizes)


_IMPLS = {"grouped_mm": _glu_grouped_mm, "megablocks": _glu_megablocks}
PACKED_BACKENDS = ("batched", "loop")


class _Pack(torch.autograd.Function):
    """Sorted rows -> packed rows (zero padding); the gradient gathers them back."""

    @staticmethod
    def forward(ctx, x, pos, rows):
        ctx.save_for_backward(pos)
        return x.new_zeros(rows, x.shape[-1]).index_copy_(0, pos, x)

    @staticmethod
    def backward(ctx, grad):
        (pos,) = ctx.saved_tensors
        return grad.index_select(0, pos), None, None


class _Unpack(torch.autograd.Function):
    """Packed rows -> sorted rows; the gradient is zero on padding rows."""

    @staticmethod
    def forward(ctx, yp, pos):
        ctx.save_for_backward(pos)
        ctx.rows = yp.shape[0]
        return yp.index_select(0, pos)

    @staticmethod
    def backward(ctx, grad):
        (pos,) = ctx.saved_tensors
        return grad.new_zeros(ctx.rows, grad.shape[-1]).index_copy_(0, pos, grad), None


def grouped_glu(x: torch.Tensor, w1: torch.Tensor, v1: torch.Tensor, w2: torch.Tensor,
                counts: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
    """GLU experts on sorted rows.

    x: (sum(counts), d_model), rows grouped by local expert in order.
    w1, v1, w2: (num_local_experts * ffn, d_model), DBRX's stacked layout.
    counts: (num_local_experts,) integer tensor of rows per expert.
    Returns (sum(counts), d_model).
    """
    n_local = counts.shape[0]
    d_model = x.shape[-1]
    ffn = w1.shape[0] // n_local
    backend = backend or select_backend(x, w1, ffn)
    if backend in PACKED_BACKENDS:
        layout = plan_layout(counts, d_model, ffn, batched=backend == "batched")
        if layout.shift is None:
            return packed_glu(x, w1, v1, w2, layout)
        row_expert = torch.repeat_interleave(torch.arange(n_local, device=counts.device), counts,
                                             output_size=x.shape[0])
        pos = layout.positions(row_expert.to(x.device))
        yp = packed_glu(_Pack.apply(x, pos, layout.rows), w1, v1, w2, layout)
        return _Unpack.apply(yp, pos)
    shape = (n_local, ffn, d_model)
    return _IMPLS[backend](x, w1.view(shape), v1.view(shape), w2.view(shape), counts)
