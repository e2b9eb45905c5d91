"""DBRX attention: fused QKV with clipping, grouped-query heads, rotary positions.

One `Wqkv` projection produces queries, keys and values in a single matmul
(the released checkpoints store it that way); `clip_qkv` clamps its output,
which DBRX uses to keep attention logits bounded. Keys and values have
`n_kv_heads` heads shared by groups of query heads; SDPA's `enable_gqa`
broadcasts them without materialising repeated copies.

The rotary tables are computed on the fly from positions rather than cached in
a buffer: they cost O(tokens x head_dim) and keeping no buffer lets the model be
built on the meta device and loaded with `assign=True` (see DBRX.assign_state_dict).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from model.config import DBRXConfig


def rotary_tables(position_ids: torch.Tensor, head_dim: int, theta: float,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (batch, seq, head_dim) for `position_ids` (batch, seq).

    Frequencies and angles are computed in float32 whatever the model dtype, as
    bf16 angles lose whole radians at long positions.
    """
    exponents = torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    angles = position_ids[..., None].float() * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (batch, heads, seq, head_dim) by the half-split (GPT-NeoX) convention DBRX uses."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _kv_buffers(cfg: DBRXConfig, rows: int, max_len: int, device: torch.device, dtype: torch.dtype,
                hint: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed keys and values (layers, rows, kv_heads, max_len, head_dim) of a cache; `hint` says
    what to do when max_len exceeds the model's context."""
    if max_len > cfg.max_seq_len:
        raise ValueError(f"a cache of {max_len} positions exceeds the model context "
                         f"max_seq_len={cfg.max_seq_len}: {hint}")
    shape = (cfg.n_layers, rows, cfg.n_kv_heads, max_len, cfg.head_dim)
    return (torch.zeros(shape, device=device, dtype=dtype),
            torch.zeros(shape, device=device, dtype=dtype))


class KVCache:
    """Pre-allocated keys and values of every layer for incremental decoding.

    Sized once for the whole generation (prompt + new tokens) so decoding never
    reallocates. `valid` marks which cached positions hold real tokens (False
    for left padding); the model reads it to mask padded keys.
    """

    def __init__(self, cfg: DBRXConfig, batch_size: int, max_len: int,
                 device: torch.device, dtype: torch.dtype):
        self.k, self.v = _kv_buffers(cfg, batch_size, max_len, device, dtype,
                                     "shorten the prompt or max_new_tokens")
        self.valid = torch.ones(batch_size, max_len, device=device, dtype=torch.bool)
        self.max_len = max_len
        self.length = 0

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys/values for `layer`; return all keys/values so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions needed, {self.max_len} allocated")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        """Called once per forward, after every layer has written its `n` new positions."""
        self.length += n


class StaticKVCache:
    """Keys and values of `slots` independent sequences, each preallocated to `max_len` positions.

    The serving engine (model.decode) keeps one for its whole life: a sequence
    owns a slot from admission to release and each step writes its new key and
    value in place at the slot's own position (`scatter_`), so nothing is
    reallocated or concatenated and the shapes attention sees depend only on
    the slot count and the key-length bucket, never on the requests. Positions
    past a slot's length hold stale data that the decode mask hides.
    """

    def __init__(self, cfg: DBRXConfig, slots: int, max_len: int, device: torch.device,
                 dtype: torch.dtype):
        self.k, self.v = _kv_buffers(cfg, slots, max_len, device, dtype, "serve shorter requests")
        self.slots, self.max_len = slots, max_len

    @staticmethod
    def bytes_per_slot(cfg: DBRXConfig, max_len: int, dtype: torch.dtype) -> int:
        """Memory one slot of `max_len` positions takes (keys and values of every layer)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * cfg.n_layers * cfg.n_kv_heads * max_len * cfg.head_dim * itemsize

    def write_prompts(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store prompts' keys/values (n, kv_heads, T, hd) at positions [0, T) of `slots` (n,)."""
        t = k.shape[2]
        self.k[layer, :, :, :t].index_copy_(0, slots, k)
        self.v[layer, :, :, :t].index_copy_(0, slots, v)

    def write_step(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one new key/value (rows, kv_heads, 1, hd) per slot 0..rows-1 at its `positions` (rows,).

        Returns the layer's keys and values of those rows over the whole length (views).
        """
        rows = k.shape[0]
        index = positions.view(rows, 1, 1, 1).expand(rows, k.shape[1], 1, k.shape[3])
        keys, values = self.k[layer, :rows], self.v[layer, :rows]
        keys.scatter_(2, index, k)
        values.scatter_(2, index, v)
        return keys, values


# cuDNN's SDPA builds a new execution plan for every new key length: while decoding
# (one query, a cache one longer each step) that cost ~10 ms per attention call on
# an H200, 14 tokens/s against 68 with these kernels on a 4-layer d 2048 model.
DECODE_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class Attention(nn.Module):
    def __init__(self, cfg: DBRXConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.clip_qkv = cfg.clip_qkv
        self.Wqkv = nn.Linear(cfg.d_model, cfg.d_model + 2 * cfg.kv_dim, bias=False)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (batch, seq, d_model) -> rotated q (batch, heads, seq, hd), rotated k and v (batch, kv_heads, seq, hd)."""
        b, t, d = x.shape
        qkv = self.Wqkv(x)
        if self.clip_qkv is not None:
            qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
        kv_dim = self.n_kv_heads * self.head_dim
        q, k, v = qkv.split([d, kv_dim, kv_dim], dim=-1)
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        """Cached attention (the decode kernels, see DECODE_SDPA_BACKENDS) and the output projection.

        q (batch, heads, seq, hd); k, v (batch, kv_heads, keys, hd) -> (batch, seq, d_model).
        """
        b, _, t, _ = q.shape
        with sdpa_kernel(DECODE_SDPA_BACKENDS):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                                 enable_gqa=self.n_kv_heads != self.n_heads)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                cache: Optional[KVCache] = None) -> torch.Tensor:
        """x (batch, seq, d_model) -> (batch, seq, d_model).

        `attn_mask` is a boolean (batch, 1, seq, keys) mask (True = attend) or
        None; with `is_causal` SDPA applies the causal mask itself (no cache).
        """
        b, t, d = x.shape
        q, k, v = self.project(x, cos, sin)
        gqa = self.n_kv_heads != self.n_heads
        if cache is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                                 enable_gqa=gqa)
        else:
            k, v = cache.update(self.layer_idx, k, v)
            with sdpa_kernel(DECODE_SDPA_BACKENDS):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                                     is_causal=is_causal, enable_gqa=gqa)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))
