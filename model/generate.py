"""Autoregressive generation: greedy, temperature, top-k, top-p, stop tokens.

`generate` runs on model.decode.DecodeEngine, the engine the server uses: the
prompts are prefilled into slots of a static KV cache, then every
unfinished sequence decodes one token per step; a sequence leaves the batch
(frees its slot) as soon as it stops. So every sequence gets the tokens it
would get alone, and a server request with the same prompt, sampling
parameters and seed gets the same tokens as `generate`.

Under expert parallelism every rank of the group runs the model together, so
a lock-step loop over left-padded prompts is used, the ranks agreeing
(all-reduce) on when to stop; each rank must call `generate` with the same
`max_new_tokens`. `left_pad` and `sample_next` serve that path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Optional, Sequence, Union

import torch
import torch.distributed as dist

from model.attention import KVCache

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


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: Optional[int] = None,
                top_p: float = 1.0, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token ids (batch,) from last-position logits (batch, vocab); temperature 0 is greedy."""
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, sorted_ids = torch.sort(probs, dim=-1, descending=True)
        # Drop a token when the tokens ranked above it already reach top_p (the first always stays).
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, sorted_ids, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: "DBRX", prompts: Union[torch.Tensor, Sequence[Sequence[int]]], *,
             max_new_tokens: int, temperature: float = 0.0, top_k: Optional[int] = None,
             top_p: float = 1.0, stop_tokens: Iterable[int] = (), seed: Optional[int] = None,
             generator: Optional[torch.Generator] = None,
             attention_mask: Optional[torch.Tensor] = None,
             pad_token_id: int = 0) -> GenerationOutput:
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
    Runs on model.decode.DecodeEngine (the server's engine); under expert
    parallelism, where every rank must run each forward together, the
    lock-step loop below is used instead.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if model.ep_size > 1:
        return _generate_lockstep(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                  top_k=top_k, top_p=top_p, stop_tokens=stop_tokens, seed=seed,
                                  generator=generator, attention_mask=attention_mask,
                                  pad_token_id=pad_token_id)
    from model.decode import DecodeEngine, Sampling, draw_seed

    rows = _unpadded(prompts, attention_mask)
    need = max(len(r) for r in rows) + max_new_tokens
    if need > model.cfg.max_seq_len:
        raise ValueError(f"{need} positions (prompt + max_new_tokens) exceed the model context "
                         f"max_seq_len={model.cfg.max_seq_len}: shorten the prompt or max_new_tokens")
    if temperature > 0 and seed is None:
        seed = draw_seed(generator)
    stop = set(stop_tokens)
    was_training = model.training
    model.eval()
    try:
        engine = DecodeEngine(model, len(rows), need)
        samplings = [Sampling(temperature, top_p, top_k or 0, None if seed is None else seed + i)
                     for i in range(len(rows))]
        row_of = {slot: i for i, slot in enumerate(engine.admit_many(rows, samplings))}
        tokens: list[list[int]] = [[] for _ in rows]
        reasons = ["length"] * len(rows)
        while engine.active:
            for slot, token in engine.step().items():
                i = row_of[slot]
                if token in stop:
                    reasons[i] = "stop"
                else:
                    tokens[i].append(token)
                if reasons[i] == "stop" or len(tokens[i]) == max_new_tokens:
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


def _generate_lockstep(model: "DBRX", prompts, *, max_new_tokens, temperature, top_k, top_p, stop_tokens,
                       seed, generator, attention_mask, pad_token_id) -> GenerationOutput:
    """Left-padded lock-step decoding with a dynamic KVCache, for expert-parallel models: each
    rank decodes its own prompts while the ranks run every forward together."""
    device = next(model.parameters()).device
    if isinstance(prompts, torch.Tensor):
        input_ids = prompts.to(device)
        mask = (torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device))
    else:
        input_ids, mask = left_pad(prompts, pad_token_id, device)
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    stop = torch.tensor(sorted(set(stop_tokens)), dtype=torch.long, device=device)

    batch, prompt_len = input_ids.shape
    dtype = next(model.parameters()).dtype
    cache = KVCache(model.cfg, batch, prompt_len + max_new_tokens, device, dtype)
    was_training = model.training
    model.eval()
    try:
        logits = model(input_ids, attention_mask=mask, kv_cache=cache, last_logits_only=True).logits
        new = torch.empty(batch, 0, dtype=torch.long, device=device)
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        stopped_at = torch.full((batch,), -1, dtype=torch.long, device=device)
        for step in range(max_new_tokens):
            token = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
            hit = torch.isin(token, stop) & ~done
            stopped_at[hit] = step
            done |= hit
            new = torch.cat([new, token[:, None]], dim=1)
            if step == max_new_tokens - 1 or _all_done(done, model):
                break
            logits = model(token[:, None], kv_cache=cache, last_logits_only=True).logits
    finally:
        model.train(was_training)

    tokens, reasons = [], []
    for row, at in zip(new.tolist(), stopped_at.tolist()):
        tokens.append(row[:at] if at >= 0 else row)
        reasons.append("stop" if at >= 0 else "length")
    return GenerationOutput(tokens=tokens, finish_reasons=reasons,
                            prompt_lengths=mask.sum(-1).tolist())


def _all_done(done: torch.Tensor, model: "DBRX") -> bool:
    flag = done.all().to(torch.int32)
    if model.ep_group is not None and model.ep_size > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=model.ep_group)
    return bool(flag.item())
