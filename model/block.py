"""One DBRX transformer block: pre-norm attention and pre-norm MoE, each residual.

    h   = x + Attention(LayerNorm_1(x))
    out = h + MoE(LayerNorm_2(h))

LayerNorms have a weight and no bias, as in DBRX.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from model.attention import Attention, KVCache
from model.config import DBRXConfig
from model.moe import DroplessMoE, RoutingStats


class DBRXBlock(nn.Module):
    def __init__(self, cfg: DBRXConfig, layer_idx: int, ep_group: Optional[dist.ProcessGroup] = None):
        super().__init__()
        self.norm_1 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=False)
        self.attn = Attention(cfg, layer_idx)
        self.norm_2 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=False)
        self.ffn = DroplessMoE(cfg, ep_group)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                cache: Optional[KVCache] = None, valid: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, RoutingStats]:
        h = x + self.attn(self.norm_1(x), cos, sin, attn_mask, is_causal, cache)
        out, stats = self.ffn(self.norm_2(h), valid)
        return h + out, stats
