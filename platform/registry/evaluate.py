"""Held-out loss of a single-process DBRX, for the promotion gate.

Both sides of the comparison must see the very same tokens, so the held-out
micro batches are materialised once (`heldout_batches`) and handed to each
model in turn. The loss is the one training logs as `eval_loss`: mean
next-token cross entropy over micro batches, without the MoE auxiliary losses
(they measure routing balance, not the model's predictions).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from platform.errors import UserError

if TYPE_CHECKING:
    import torch

    from model import DBRX
    from platform.config.schema import JobConfig


def heldout_batches(cfg: "JobConfig") -> list["torch.Tensor"]:
    """The job's held-out micro batches ([micro, seq_len + 1] each), as one process reads them."""
    from platform.data import DataError, TrainingData, ensure_prepared

    try:
        data = TrainingData(cfg, ensure_prepared(cfg, progress=False))
        batches = [mb for micro_batches in data.eval_batches(0, 1) for mb in micro_batches]
    except DataError as exc:
        raise UserError(f"the promotion gate needs the job's held-out data: {exc}") from exc
    if not batches:
        raise UserError("the promotion gate has no held-out data to compare on: set "
                        "data.eval_fraction > 0 (and prepare the data again), or promote without "
                        "the gate (--no-gate / promote.gate=false)")
    return batches


def gate_weights(cfg: "JobConfig") -> str:
    """The weight format the gate evaluates at: promote.gate_weights, "serve" meaning what the
    endpoint will run (serve.weights; its "auto" serves a CPU checkpoint as stored, fp32)."""
    chosen = cfg.promote.gate_weights
    if chosen == "serve":
        chosen = cfg.serve.weights
    return "fp32" if chosen == "auto" else chosen


def as_served(model: "DBRX", weights: str) -> "DBRX":
    """`model` with `weights` (fp32, bf16, int8, fp8) as the endpoint quantizes them at load."""
    from model.quant import quantize_model

    try:
        return quantize_model(model, weights)
    except ValueError as exc:      # fp8 off a Hopper GPU
        raise UserError(f"the promotion gate cannot evaluate {weights} weights here ({exc}); set "
                        "promote.gate_weights to fp32, bf16 or int8") from None


def heldout_loss(model: "DBRX", batches: list["torch.Tensor"]) -> float:
    """Mean next-token cross entropy of `model` over `batches`."""
    import torch

    model.eval()
    total = 0.0
    with torch.no_grad():
        for mb in batches:
            if int(mb.max()) >= model.cfg.vocab_size:
                raise UserError(f"held-out tokens reach id {int(mb.max())} but the model's vocab_size is "
                                f"{model.cfg.vocab_size}: the data was tokenized for another model")
            total += model(mb[:, :-1], shift_labels=mb[:, 1:], return_logits=False).lm_loss.item()
    return total / len(batches)
