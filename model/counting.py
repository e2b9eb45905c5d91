"""Exact parameter counts and training FLOPs of a DBRX config, without torch.

The plan, MFU metrics and benchmarks all read these numbers, so they are
computed from the architecture alone (no module instantiation) and match
`sum(p.numel() for p in DBRX(cfg).parameters())` exactly (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

from model.config import DBRXConfig


@dataclass(frozen=True)
class ParamCounts:
    embedding: int           # token embedding
    attention: int           # all layers: fused QKV + output projection
    norms: int               # all LayerNorm weights (no bias)
    router: int              # all layers
    experts: int             # all layers, all experts
    lm_head: int             # 0 when tied to the embedding

    @property
    def total(self) -> int:
        return self.embedding + self.attention + self.norms + self.router + self.experts + self.lm_head

    @property
    def dense(self) -> int:
        """Parameters every rank holds in full (everything but the experts)."""
        return self.total - self.experts


def _attention_per_layer(c: DBRXConfig) -> int:
    return c.d_model * (c.d_model + 2 * c.kv_dim) + c.d_model * c.d_model


def _expert_per_layer(c: DBRXConfig) -> int:
    """One expert of one layer: GLU w1, v1 (d->ffn) and w2 (ffn->d), no biases."""
    return 3 * c.d_model * c.ffn_hidden_size


def param_counts(c: DBRXConfig) -> ParamCounts:
    return ParamCounts(
        embedding=c.vocab_size * c.d_model,
        attention=c.n_layers * _attention_per_layer(c),
        norms=(2 * c.n_layers + 1) * c.d_model,
        router=c.n_layers * c.d_model * c.moe_num_experts,
        experts=c.n_layers * c.moe_num_experts * _expert_per_layer(c),
        lm_head=0 if c.tie_word_embeddings else c.vocab_size * c.d_model,
    )


def total_params(c: DBRXConfig) -> int:
    return param_counts(c).total


def active_params(c: DBRXConfig) -> int:
    """Parameters one token touches: all dense ones plus its top-k experts per layer."""
    p = param_counts(c)
    return p.dense + c.n_layers * c.moe_top_k * _expert_per_layer(c)


def expert_params_per_rank(c: DBRXConfig, expert_parallel: int) -> int:
    """Expert parameters held by one rank when experts are split `expert_parallel` ways."""
    return param_counts(c).experts // expert_parallel


def matmul_flops_per_token(c: DBRXConfig, seq_len: int) -> float:
    """Forward FLOPs per token (multiply-add = 2 FLOPs) of every matrix product.

    Counts the projections a token goes through (QKV, output, router, its
    top-k experts, LM head) and causal attention: the token at position i
    attends to i+1 keys, so the average over a sequence is (seq_len+1)/2
    keys, each costing 2*head_dim for QK^T and 2*head_dim for AV per head.
    The embedding lookup, norms and softmax are not matrix products and are
    left out, as in the usual MFU convention.
    """
    per_layer = (_attention_per_layer(c) + c.d_model * c.moe_num_experts
                 + c.moe_top_k * _expert_per_layer(c))
    proj = 2.0 * (c.n_layers * per_layer + c.vocab_size * c.d_model)
    attn = c.n_layers * 4.0 * c.d_model * (seq_len + 1) / 2.0
    return proj + attn


def training_flops_per_token(c: DBRXConfig, seq_len: int) -> float:
    """Forward + backward FLOPs per token (backward = 2x forward), without recomputation."""
    return 3.0 * matmul_flops_per_token(c, seq_len)
