"""Next-token cross entropy through the LM head without materialising the logits.

With a 100k vocabulary the (tokens x vocab) logits dominate a small model's step:
for local_tiny's micro batch (512 tokens) they are 205 MB (13 GB for one 32k-token
sequence of DBRX), and their log-softmax and its backward, passes over all of that
memory, were a fifth of a CPU training step. Here the
tokens are taken in chunks of at most `chunk_elements` logits: each chunk's
logits are computed, turned into its loss and, when a gradient is wanted, into
its gradients right away (d logits = softmax - one_hot, scaled by 1/valid
tokens), so only one chunk of logits is ever alive. The gradients of the hidden
states and of the head weight are kept and scaled by the incoming gradient in
backward: three GEMMs per chunk, the same as a plain forward + backward, and
no recomputation.

The logits GEMM runs in the inputs' dtype (bf16 on GPU, like a plain LM head);
softmax, the loss and its gradient are computed in float32.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 24     # 64 MB of float32 logits per chunk


def _row_chunks(n: int, vocab: int, chunk_elements: int):
    """Slices of at most chunk_elements // vocab rows (at least one) covering n rows."""
    rows = max(1, chunk_elements // max(1, vocab))
    return [slice(start, min(n, start + rows)) for start in range(0, n, rows)]


def _chunk_softmax(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor):
    """For one chunk of rows: (unnormalised softmax exp(logits - max) in float32 (in the logits'
    buffer), per-row sum of it, per-row loss (0 on ignored rows), valid mask, safe labels).

    One exp pass: loss = log(sum) - (logit[label] - max)."""
    logits = (h @ weight.t()).float()
    valid = labels != IGNORE_INDEX
    safe = labels.masked_fill(~valid, 0)
    top = logits.amax(dim=1, keepdim=True)
    picked = logits.gather(1, safe.unsqueeze(1)).sub_(top).squeeze(1)
    e = logits.sub_(top).exp_()
    total = e.sum(dim=1)
    return e, total, (total.log() - picked).masked_fill_(~valid, 0.0), valid, safe


class _LinearCrossEntropy(torch.autograd.Function):
    """Loss in forward, with both gradients computed chunk by chunk on the way."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_elements):
        scale = 1.0 / max(1, int((labels != IGNORE_INDEX).sum()))
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for rows in _row_chunks(hidden.shape[0], weight.shape[0], chunk_elements):
            h = hidden[rows]
            e, total, chunk_loss, valid, safe = _chunk_softmax(h, weight, labels[rows])
            loss += chunk_loss.sum()
            # d loss / d logits = (softmax - one_hot) / n_valid on valid rows, 0 on ignored ones
            row_scale = valid.to(e.dtype) * scale
            d = e.mul_((row_scale / total).unsqueeze(1))
            d[torch.arange(d.shape[0], device=d.device), safe] -= row_scale
            d = d.to(hidden.dtype)
            torch.mm(d, weight, out=grad_h[rows])
            if grad_w is not None:
                grad_w.addmm_(d.t(), h)
        ctx.has_grad_w = grad_w is not None
        ctx.save_for_backward(grad_h, *([grad_w] if grad_w is not None else []))
        return loss * scale

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        grad_h, *grad_w = ctx.saved_tensors
        g = grad_out.to(grad_h.dtype)
        return grad_h * g, (grad_w[0] * g if ctx.has_grad_w else None), None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """mean over labels != -100 of cross_entropy(hidden @ weight.T, labels), chunked.

    hidden: (..., d_model); weight: (vocab, d_model), the LM head; labels: hidden.shape[:-1]
    integer targets. Equal to F.cross_entropy(F.linear(hidden, weight).float(), labels) up to
    float rounding, with the same gradients, in one chunk of logits of memory. 0 when every
    label is ignored.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    if labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for {hidden.shape[0]} positions")
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, labels, chunk_elements)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    n_valid = 0
    for rows in _row_chunks(hidden.shape[0], weight.shape[0], chunk_elements):
        _, _, loss, valid, _ = _chunk_softmax(hidden[rows], weight, labels[rows])
        total += loss.sum()
        n_valid += int(valid.sum())
    return total / max(1, n_valid)
