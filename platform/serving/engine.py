"""Decoding a batch of requests in lock step, one token per step, each with its own sampling.

`model.generate` takes one temperature/top-p/seed for the whole batch and
returns only at the end; a server batches requests that differ in all of
those and streams every token as it comes. This decoder runs the same
computation as `model.generate` (left-padded prefill with the attention
mask, then one cached step per token, `sample_next` per row), so a request
decoded alone gives exactly what `generate` gives for its prompt and seed.

Rows finish on their own stop tokens or max_tokens, or when their consumer
cancels (a stop sequence matched, the client went away); the batch ends when
every row has finished. A KV cache holds the longest prompt plus the largest
max_tokens, so `plan_groups` splits requests whose sum would not fit the
model's context into separate decoders.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch

from model.attention import KVCache
from model.generate import left_pad, sample_next

if TYPE_CHECKING:
    from model import DBRX


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0            # 0: greedy
    top_p: float = 1.0
    seed: Optional[int] = None
    stop_token_ids: frozenset[int] = frozenset()

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0 or self.top_p <= 0.0


@dataclass(eq=False)
class GenerationRequest:
    """One prompt to decode, pinned to the model version that admitted it."""

    prompt_ids: list[int]
    params: SamplingParams
    model: Any                          # platform.serving.loader.LoadedModel
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)

    def cancel(self) -> None:
        """Stop decoding this row at the next step (thread-safe)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


@dataclass(frozen=True)
class TokenEvent:
    """A row's output of one step: a new token and/or why the row finished."""

    token: Optional[int]                # None when the row stopped on a stop token
    finish_reason: Optional[str] = None  # "stop" | "length" | None (more to come)


class BatchDecoder:
    """Decodes `requests` (same model) together; call `step()` until `finished`."""

    def __init__(self, model: "DBRX", requests: Sequence[GenerationRequest]):
        self.model, self.requests = model, list(requests)
        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        self._input_ids, self._mask = left_pad([r.prompt_ids for r in self.requests], 0, device)
        steps = max(r.params.max_tokens for r in self.requests)
        self._cache = KVCache(model.cfg, len(self.requests), self._input_ids.shape[1] + steps, device, dtype)
        self._generators = [
            torch.Generator(device=device).manual_seed(r.params.seed)
            if r.params.seed is not None and not r.params.greedy else None
            for r in self.requests]
        self._produced = [0] * len(self.requests)
        self._done = [False] * len(self.requests)
        self._last: Optional[torch.Tensor] = None

    @property
    def finished(self) -> bool:
        return all(self._done)

    @torch.no_grad()
    def step(self) -> list[Optional[TokenEvent]]:
        """Advance every row one token. Rows already finished get None."""
        if self._last is None:
            logits = self.model(self._input_ids, attention_mask=self._mask, kv_cache=self._cache,
                                last_logits_only=True).logits[:, -1]
        else:
            logits = self.model(self._last[:, None], kv_cache=self._cache, last_logits_only=True).logits[:, -1]
        tokens = self._sample(logits)
        self._last = tokens
        events: list[Optional[TokenEvent]] = []
        for i, (request, token) in enumerate(zip(self.requests, tokens.tolist())):
            if self._done[i]:
                events.append(None)
            elif request.cancelled:
                self._done[i] = True
                events.append(None)
            elif token in request.params.stop_token_ids:
                self._done[i] = True
                events.append(TokenEvent(None, "stop"))
            else:
                self._produced[i] += 1
                full = self._produced[i] >= request.params.max_tokens
                self._done[i] = full
                events.append(TokenEvent(token, "length" if full else None))
        return events

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        tokens = logits.argmax(dim=-1)
        for i, request in enumerate(self.requests):
            p = request.params
            if not p.greedy and not self._done[i]:
                tokens[i] = sample_next(logits[i:i + 1], p.temperature, None, p.top_p, self._generators[i])[0]
        return tokens


def plan_groups(requests: Sequence[GenerationRequest]) -> list[list[int]]:
    """Indices of `requests` split into decoders: one model each, and a KV cache
    (longest prompt + largest max_tokens) within that model's context.

    Each request alone fits (the server checks prompt + max_tokens against the
    context), so every request lands in some group.
    """
    by_model: dict[int, list[int]] = {}
    for i, r in enumerate(requests):
        by_model.setdefault(id(r.model), []).append(i)
    groups: list[list[int]] = []
    for indices in by_model.values():
        max_seq_len = requests[indices[0]].model.max_seq_len
        order = sorted(indices, key=lambda i: len(requests[i].prompt_ids), reverse=True)
        current: list[int] = []
        width = steps = 0
        for i in order:
            r = requests[i]
            w, s = max(width, len(r.prompt_ids)), max(steps, r.params.max_tokens)
            if current and w + s > max_seq_len:
                groups.append(current)
                current, w, s = [], len(r.prompt_ids), r.params.max_tokens
            current.append(i)
            width, steps = w, s
        if current:
            groups.append(current)
    return groups
