"""Dropless mixture-of-experts FFN of DBRX, with expert parallelism.

Routing: a bias-free linear router scores the experts, softmax (in float32)
gives probabilities, each token keeps its top-k, and the kept weights are
divided by their p-norm (`moe_normalize_expert_weights`, p=1 in DBRX so they
sum to one). While training, the router input (only) is jittered by a uniform
factor in [1-eps, 1+eps], as in the original DBRX router.

Dropless: the (token, expert) assignments are sorted by expert and each expert
multiplies exactly the contiguous slice of its tokens (model.kernels), so no
capacity factor exists and no token is ever dropped, however skewed the
routing. Outputs are un-sorted and combined as the weighted sum of each
token's top-k expert outputs.

Expert parallelism: with an expert-parallel group of size P each rank holds
experts [rank * E/P, (rank+1) * E/P). Sorted tokens are contiguous per
destination rank, so one differentiable all_to_all_single with uneven splits
sends them to their experts' owners and one brings the results back. The
expert weights are tagged the way DeepSpeed recognises expert parameters
(`allreduce = False`, `group_name = "ep_size_{P}"`) so their gradients are
reduced only across replicas of the same experts.

Auxiliary losses (returned unweighted; the model applies the config weights):
- load balancing, switch style with MegaBlocks'/DBRX's normalisation:
  E * sum_e f_e * P_e, f_e = fraction of the N*k assignments that go to e and
  P_e = mean router probability of e (1.0 for perfectly uniform routing);
- router z-loss (ST-MoE): mean over tokens of logsumexp(router logits)^2.
Both and the per-expert counts use only real tokens when a padding mask is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from model.config import DBRXConfig
from model.kernels import grouped_glu

# Decode batches of up to this many (token, expert) pairs per expert run every expert on
# every token (see DroplessMoE.decode); at 4 the wasted FLOPs are E/k = 4x the routed ones
# for DBRX, still under the time to read the experts' bytes on a GPU.
DENSE_PAIRS_PER_EXPERT = 4


def expert_group_name(ep_size: int) -> str:
    """DeepSpeed's name of the expert(-data)-parallel groups for `ep_size`.

    deepspeed.utils.groups._create_expert_and_data_parallel registers its groups
    under this key and the engine reduces an expert gradient with
    `expert_data_parallel_group[param.group_name]`.
    """
    return f"ep_size_{ep_size}"


def tag_expert_param(param: torch.nn.Parameter, ep_size: int) -> None:
    """Mark `param` as an expert parameter for DeepSpeed (deepspeed.moe.utils.is_moe_param)."""
    param.allreduce = False
    param.group_name = expert_group_name(ep_size)


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; its gradient is the reverse exchange."""

    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):
        ctx.group, ctx.output_splits, ctx.input_splits = group, output_splits, input_splits
        out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad_in = grad.new_empty((sum(ctx.input_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(grad_in, grad.contiguous(), ctx.input_splits, ctx.output_splits,
                               group=ctx.group)
        return grad_in, None, None, None


def all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int],
               group) -> torch.Tensor:
    """Differentiable uneven all-to-all over dim 0: rows input_splits[r] go to rank r."""
    return _AllToAll.apply(x, output_splits, input_splits, group)


def _inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


# The three row shuffles below are written as autograd Functions because their
# default backward (index_add / scatter-add of index_select) is much slower on
# CPU than the gathers that the inverse permutation allows.

class _Permute(torch.autograd.Function):
    """rows = x[perm]; the gradient is gathered back with the inverse permutation."""

    @staticmethod
    def forward(ctx, x, perm, inv):
        ctx.save_for_backward(inv)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad):
        (inv,) = ctx.saved_tensors
        return grad.index_select(0, inv), None, None


class _Dispatch(torch.autograd.Function):
    """Copy each of N tokens to its k sorted slots: out = x[order // k].

    Backward sums each token's k slot gradients, gathering them in token order.
    """

    @staticmethod
    def forward(ctx, x, order, inv, top_k):
        ctx.save_for_backward(inv)
        ctx.top_k = top_k
        return x.index_select(0, order // top_k)

    @staticmethod
    def backward(ctx, grad):
        (inv,) = ctx.saved_tensors
        n = inv.numel() // ctx.top_k
        return grad.index_select(0, inv).view(n, ctx.top_k, grad.shape[-1]).sum(1), None, None, None


class _Combine(torch.autograd.Function):
    """out[t] = sum_j weights[t, j] * y_sorted[inv[t * k + j]]: un-sort and mix the top-k outputs."""

    @staticmethod
    def forward(ctx, y_sorted, weights, order, inv):
        n, k = weights.shape
        y = y_sorted.index_select(0, inv).view(n, k, y_sorted.shape[-1])
        ctx.save_for_backward(y, weights, order)
        return torch.bmm(weights.unsqueeze(1), y).squeeze(1)

    @staticmethod
    def backward(ctx, grad):
        y, weights, order = ctx.saved_tensors
        grad = grad.contiguous()
        grad_y = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_y = (weights.unsqueeze(-1) * grad.unsqueeze(1)).view(-1, grad.shape[-1])
            grad_y = grad_y.index_select(0, order)
        if ctx.needs_input_grad[1]:
            grad_w = torch.bmm(y, grad.unsqueeze(-1)).squeeze(-1)
        return grad_y, grad_w, None, None


@dataclass
class RoutingStats:
    lb_loss: torch.Tensor        # scalar, unweighted load-balancing loss
    z_loss: torch.Tensor         # scalar, unweighted router z-loss
    expert_counts: torch.Tensor  # (E,) int64, token assignments per expert (real tokens only)


class Router(nn.Module):
    def __init__(self, d_model: int, num_experts: int, jitter_eps: Optional[float]):
        super().__init__()
        self.jitter_eps = jitter_eps
        self.layer = nn.Linear(d_model, num_experts, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Router logits (N, E) for tokens x (N, d_model)."""
        if self.training and self.jitter_eps:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
        return self.layer(x)


class Experts(nn.Module):
    """The GLU experts this rank holds, in DBRX's stacked [experts * ffn, d_model] layout."""

    GATHER_PASSES = 3       # a gathered slice is read, written and read again (DroplessMoE.decode)

    def __init__(self, d_model: int, ffn_hidden_size: int, num_local_experts: int):
        super().__init__()
        self.num_local_experts = num_local_experts
        self.ffn_hidden_size = ffn_hidden_size
        rows = num_local_experts * ffn_hidden_size
        self.w1 = nn.Parameter(torch.empty(rows, d_model))
        self.v1 = nn.Parameter(torch.empty(rows, d_model))
        self.w2 = nn.Parameter(torch.empty(rows, d_model))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x: rows sorted by local expert, counts[e] rows for expert e."""
        return grouped_glu(x, self.w1, self.v1, self.w2, counts)

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """w1, v1, w2 as (experts, ffn, d_model) views, no copy (decode path)."""
        shape = (self.num_local_experts, self.ffn_hidden_size, self.w1.shape[1])
        return tuple(w.view(shape) for w in (self.w1, self.v1, self.w2))

    def gathered(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """w1, v1, w2 slices (len(ids), ffn, d_model) of the local experts `ids` (decode path)."""
        return tuple(w.index_select(0, ids) for w in self.stacked())


class DroplessMoE(nn.Module):
    """Router + dropless experts; optionally sharded over an expert-parallel process group."""

    def __init__(self, cfg: DBRXConfig, ep_group: Optional[dist.ProcessGroup] = None):
        super().__init__()
        self.num_experts, self.top_k = cfg.moe_num_experts, cfg.moe_top_k
        self.normalize_p = cfg.moe_normalize_expert_weights
        self.ep_group = ep_group
        if ep_group is not None:
            if not dist.is_initialized():
                raise RuntimeError("an expert-parallel group was given but torch.distributed "
                                   "is not initialised")
            self.ep_size, self.ep_rank = dist.get_world_size(ep_group), dist.get_rank(ep_group)
            if self.ep_rank < 0:
                raise ValueError("this rank is not a member of the expert-parallel group it was given")
        else:
            self.ep_size, self.ep_rank = 1, 0
        if self.num_experts % self.ep_size:
            raise ValueError(f"expert-parallel degree {self.ep_size} does not divide "
                             f"moe_num_experts={self.num_experts}")
        self.num_local_experts = self.num_experts // self.ep_size
        self.router = Router(cfg.d_model, self.num_experts, cfg.moe_jitter_eps)
        self.experts = Experts(cfg.d_model, cfg.ffn_hidden_size, self.num_local_experts)
        self.tag_expert_params()

    def tag_expert_params(self) -> None:
        """(Re)apply DeepSpeed's expert tags; needed again after load_state_dict(assign=True).

        Untagged without a group: the experts are then ordinary data-parallel weights.
        """
        if self.ep_group is not None:
            for p in self.experts.parameters():
                tag_expert_param(p, self.ep_size)

    @property
    def local_experts(self) -> range:
        """Global ids of the experts this rank holds."""
        start = self.ep_rank * self.num_local_experts
        return range(start, start + self.num_local_experts)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(router logits (N,E), probabilities (N,E) fp32, top-k weights (N,k) fp32, top-k ids (N,k))."""
        logits = self.router(x)
        probs = torch.softmax(logits.float(), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.normalize_p is not None:
            weights = weights / weights.norm(p=self.normalize_p, dim=-1, keepdim=True)
        return logits, probs, weights, ids

    def forward(self, x: torch.Tensor, valid: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, RoutingStats]:
        """x (..., d_model) -> same shape, plus routing statistics.

        `valid` (x.shape[:-1], bool) excludes padding from the statistics; padded
        tokens are still computed (their outputs are simply never used).
        """
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits, probs, weights, ids = self.route(x)
        flat_ids = ids.reshape(-1)
        counts = torch.bincount(flat_ids, minlength=self.num_experts)
        if valid is None:
            stats = self._stats(logits, probs, counts)
        else:
            real = valid.reshape(-1)
            real_counts = torch.bincount(ids[real].reshape(-1), minlength=self.num_experts)
            stats = self._stats(logits[real], probs[real], real_counts)

        order = torch.argsort(flat_ids, stable=True)       # slots sorted by expert
        inv = _inverse_permutation(order)
        y_sorted = self._experts(_Dispatch.apply(x, order, inv, self.top_k), counts)
        out = _Combine.apply(y_sorted, weights.to(y_sorted.dtype), order, inv)
        return out.view(shape), stats

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Inference for a few tokens x (N, d_model) -> (N, d_model), without host syncs.

        Same routing and GLU as `forward`, but nothing is read back to the host
        (no bincount, no statistics, no per-expert counts on the CPU), so a
        decode step can run ahead of the host or be captured in a CUDA graph.
        Which weights a step reads decides the path, by the N*k (token, expert)
        pairs against the E local experts:
        - GATHER_PASSES*N*k < E (batch 1): each pair gathers its expert's slices
          and one bmm per projection does them all; only the routed experts are
          read. The gather copies the slices (float weights: 3 passes over their
          bytes against 1 for reading every expert in place; 8-bit weights are
          dequantized into new memory on either path), so beyond that it costs
          more than reading every expert once.
        - N*k <= DENSE_PAIRS_PER_EXPERT * E: every expert runs every token in
          three batched GEMMs over the stacked weights, and the routing weights
          (0 for unrouted pairs) combine them. All experts are read once, as a
          batch this size touches nearly all of them anyway; the wasted FLOPs
          (E/k times the routed ones) stay below the cost of reading the bytes,
          and there are no tiny per-expert GEMMs: batch 8 of local_tiny on two
          CPU threads, 0.52 ms per layer against 1.47 for the sorted loop.
        - beyond: rows sorted by expert through the grouped kernels, with the
          counts computed on the device (CUDA's grouped_mm keeps them there; the
          CPU loop kernel reads them, a sync that costs nothing on a CPU).
        Training keeps using `forward`.
        Under expert parallelism the tokens must travel: `forward` is used.
        """
        if self.ep_size > 1:
            return self.forward(x)[0]
        _, _, weights, ids = self.route(x)
        n, k = ids.shape
        flat = ids.reshape(-1)
        experts = self.num_local_experts
        if self.experts.GATHER_PASSES * n * k < experts:
            w1, v1, w2 = self.experts.gathered(flat)
            rows = x.repeat_interleave(k, dim=0).unsqueeze(1)                    # (n*k, 1, d)
            h = torch.nn.functional.silu(torch.bmm(rows, w1.transpose(1, 2))) * torch.bmm(rows, v1.transpose(1, 2))
            y = torch.bmm(h, w2).view(n, k, x.shape[-1])
        elif n * k <= DENSE_PAIRS_PER_EXPERT * experts:
            w1, v1, w2 = self.experts.stacked()                                  # (E, ffn, d)
            h = torch.nn.functional.silu(torch.matmul(x, w1.transpose(1, 2))) * torch.matmul(x, v1.transpose(1, 2))
            y_all = torch.bmm(h, w2).transpose(0, 1)                             # (n, E, d)
            dense = torch.zeros(n, experts, dtype=y_all.dtype, device=x.device)
            dense.scatter_(1, ids, weights.to(y_all.dtype))                      # 0 off the routed pairs
            return torch.bmm(dense.unsqueeze(1), y_all).squeeze(1)
        else:
            counts = torch.zeros(self.num_experts, dtype=torch.long, device=x.device)
            counts.scatter_add_(0, flat, torch.ones_like(flat))
            order = torch.argsort(flat, stable=True)
            y_sorted = self.experts(x.index_select(0, order // k), counts)
            y = y_sorted.index_select(0, _inverse_permutation(order)).view(n, k, x.shape[-1])
        return torch.bmm(weights.to(y.dtype).unsqueeze(1), y).squeeze(1)

    def _experts(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Run rows sorted by global expert (counts per expert) through their experts."""
        if self.ep_size == 1:
            return self.experts(x_sorted, counts)
        p, n_local, group = self.ep_size, self.num_local_experts, self.ep_group
        # Exchange counts: block r of `recv` = rows rank r sends to each of my experts.
        recv = torch.empty_like(counts)
        dist.all_to_all_single(recv, counts, group=group)
        send_splits = counts.view(p, n_local).sum(1).tolist()
        recv_by_rank = recv.view(p, n_local)
        recv_splits = recv_by_rank.sum(1).tolist()
        x_recv = all_to_all(x_sorted, recv_splits, send_splits, group)
        # Received rows are ordered (source rank, local expert): regroup by local expert.
        row_expert = torch.repeat_interleave(
            torch.arange(n_local, device=counts.device).repeat(p), recv)
        perm = torch.argsort(row_expert, stable=True)
        inv = _inverse_permutation(perm)
        y_local = self.experts(_Permute.apply(x_recv, perm, inv), recv_by_rank.sum(0))
        y_recv = _Permute.apply(y_local, inv, perm)
        return all_to_all(y_recv, send_splits, recv_splits, group)

    def _stats(self, logits: torch.Tensor, probs: torch.Tensor, counts: torch.Tensor) -> RoutingStats:
        """Aux losses over the tokens of `logits`/`probs` (N, E); counts: their assignments per expert."""
        n = probs.shape[0]
        if n == 0:
            zero = probs.sum() * 0.0
            return RoutingStats(zero, zero, counts)
        frac = counts.to(probs.dtype) / (n * self.top_k)
        lb = self.num_experts * torch.dot(frac, probs.mean(0))
        z = torch.logsumexp(logits.float(), dim=-1).square().mean()
        return RoutingStats(lb, z, counts)
