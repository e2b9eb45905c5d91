"""Autoregressive generation: greedy, temperature, top-k, top-p, stop tokens.

`generate` runs on model.decode.DecodeEngine, the engine the server uses: the
prompts are prefilled into slots of a static KV cache, then every
unfinished sequence decodes one token per step; a sequence leaves the batch
(frees its slot) as soon as it stops. So every sequence gets the tokens it
would get alone, and a server request with the same prompt, sampling
parameters and seed gets the same tokens as `generate`.

Under expert parallelism every rank of the group runs each forward together
(the MoE layers exchange tokens), while each rank decodes its own prompts:
the same engine, but a finished sequence stays in its rank's batch until
every rank is done (the ranks agree by an all-reduce each step), so no rank
skips a forward that the others wait on. Each rank must call `generate` with
the same `max_new_tokens`.
`left_pad` builds the left-padded (input_ids, attention_mask) form `generate` also takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Optional, Sequence, Union

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from model.dbrx import DBRX


@dataclass
class GenerationOutput:
    tokens: list[list[int]]      # new tokens per prompt, the stop token excluded
    finish_reasons: list[str]    # "stop" (a stop token was produced) or "length"
    prompt_lengths: list[int]    # real (unpadded) prompt tokens per prompt


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int = 0,
             device: Optional[torch.device] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged prompts -> (input_ids, attention_mask), both (batch, longest), padding on the left."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def generate(model: "DBRX", prompts: Union[torch.Tensor, Sequence[Sequence[int]]], *,
             max_new_tokens: int, temperature: float = 0.0, top_k: Optional[int] = None,
             top_p: float = 1.0, stop_tokens: Iterable[int] = (), seed: Optional[int] = None,
             generator: Optional[torch.Generator] = None,
             attention_mask: Optional[torch.Tensor] = None) -> GenerationOutput:
    """Generate up to `max_new_tokens` per prompt.

    prompts: list of token-id lists (any lengths), or an input_ids tensor
        (batch, seq) already left-padded, with its `attention_mask`.
    temperature: 0 = greedy (deterministic); > 0 samples, optionally restricted
        to the `top_k` most likely tokens and the `top_p` nucleus.
    seed / generator: make sampling reproducible; prompt i samples with seed
        `seed + i` (a `generator` draws `seed`; neither: torch's default one does),
        exactly what the server gives a request with that seed.
    stop_tokens: a sequence finishes when it produces one of them.
    The model runs in eval mode (no router jitter) and is restored afterwards.
    Runs on model.decode.DecodeEngine (the server's engine), under expert
    parallelism too (see the module docstring).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    from model.decode import DecodeEngine, Sampling, draw_seed

    rows = _unpadded(prompts, attention_mask)
    need = max(len(r) for r in rows) + max_new_tokens
    if need > model.cfg.max_seq_len:
        raise ValueError(f"{need} positions (prompt + max_new_tokens) exceed the model context "
                         f"max_seq_len={model.cfg.max_seq_len}: shorten the prompt or max_new_tokens")
    if temperature > 0 and seed is None:
        seed = draw_seed(generator)
    stop = set(stop_tokens)
    lock_step = model.ep_size > 1
    was_training = model.training
    model.eval()
    try:
        engine = DecodeEngine(model, len(rows), need)
        samplings = [Sampling(temperature, top_p, top_k or 0, None if seed is None else seed + i)
                     for i in range(len(rows))]
        row_of = {slot: i for i, slot in enumerate(engine.admit_many(rows, samplings))}
        tokens: list[list[int]] = [[] for _ in rows]
        reasons = ["length"] * len(rows)
        finished: set[int] = set()
        while (not _everyone_done(len(finished) == len(rows), model)) if lock_step else engine.active:
            for slot, token in engine.step().items():
                i = row_of[slot]
                if i in finished:               # expert parallel: decoded only to keep the ranks in step
                    continue
                if token in stop:
                    reasons[i] = "stop"
                else:
                    tokens[i].append(token)
                if reasons[i] == "stop" or len(tokens[i]) == max_new_tokens:
                    finished.add(i)
                    if not lock_step:
                        engine.release(slot)
    finally:
        model.train(was_training)
    return GenerationOutput(tokens=tokens, finish_reasons=reasons, prompt_lengths=[len(r) for r in rows])


def _unpadded(prompts: Union[torch.Tensor, Sequence[Sequence[int]]],
              attention_mask: Optional[torch.Tensor]) -> list[list[int]]:
    """Each prompt's real tokens: a left-padded tensor loses its padding (attention_mask 0)."""
    if isinstance(prompts, torch.Tensor):
        ids = prompts.tolist()
        keep = [[1] * len(r) for r in ids] if attention_mask is None else attention_mask.tolist()
        rows = [[t for t, m in zip(r, k) if m] for r, k in zip(ids, keep)]
    else:
        rows = [list(p) for p in prompts]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("every prompt needs at least one token")
    return rows


def _everyone_done(done: bool, model: "DBRX") -> bool:
    """True once `done` holds on every rank of the model's expert-parallel group (one all-reduce)."""
    flag = torch.tensor(int(done), dtype=torch.int32, device=next(model.parameters()).device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=model.ep_group)
    return bool(flag.item())
