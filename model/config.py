"""Architecture hyper-parameters of a DBRX model.

This dataclass is the `model` group of a job config (platform.config) and the
only input of the model, the parameter counts and the plan, so every number
about the architecture lives here once. It imports nothing heavy: the plan
reads it without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class DBRXConfig:
    """DBRX architecture. Defaults are the released DBRX (132B total, 36B active).

    Names follow the DBRX paper and `transformers.DbrxConfig` (flattened: the
    attention and FFN sub-configs of the HF config are plain fields here).
    """

    d_model: int = 6144
    n_layers: int = 40
    n_heads: int = 48
    n_kv_heads: int = 8
    ffn_hidden_size: int = 10752
    moe_num_experts: int = 16
    moe_top_k: int = 4
    vocab_size: int = 100352
    max_seq_len: int = 32768
    rope_theta: float = 500000.0
    # Clamp of the fused QKV projection output to [-clip_qkv, clip_qkv]; None disables.
    clip_qkv: Optional[float] = 8.0
    # p of the p-norm that normalises the top-k routing weights; None disables.
    moe_normalize_expert_weights: Optional[float] = 1.0
    # Weight of the switch-style load-balancing loss added to the LM loss.
    moe_loss_weight: float = 0.05
    # Weight of the router z-loss (ST-MoE); 0 disables.
    moe_z_loss_weight: float = 0.0
    # Multiplicative uniform jitter on router inputs while training; None/0 disables.
    moe_jitter_eps: Optional[float] = 0.01
    tie_word_embeddings: bool = False
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    # Recompute each block in the backward pass instead of storing its activations.
    activation_checkpointing: bool = False

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def problems(self) -> list[tuple[str, str]]:
        """(field, message) for every impossible combination; empty when valid."""
        out: list[tuple[str, str]] = []
        for name in ("d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden_size",
                     "moe_num_experts", "moe_top_k", "vocab_size", "max_seq_len"):
            if getattr(self, name) <= 0:
                out.append((name, f"must be a positive integer, got {getattr(self, name)}"))
        if out:
            return out
        if self.moe_top_k > self.moe_num_experts:
            out.append(("moe_top_k", f"top_k {self.moe_top_k} exceeds moe_num_experts "
                                     f"{self.moe_num_experts}: lower moe_top_k or add experts"))
        if self.d_model % self.n_heads:
            out.append(("n_heads", f"d_model {self.d_model} is not divisible by n_heads "
                                   f"{self.n_heads}: pick n_heads dividing d_model"))
        elif self.head_dim % 2:
            out.append(("n_heads", f"head_dim {self.head_dim} is odd; rotary embeddings need "
                                   "an even head_dim"))
        if self.n_heads % self.n_kv_heads:
            out.append(("n_kv_heads", f"n_heads {self.n_heads} is not divisible by n_kv_heads "
                                      f"{self.n_kv_heads}: grouped-query attention needs "
                                      "n_kv_heads to divide n_heads"))
        if self.rope_theta <= 0:
            out.append(("rope_theta", f"must be positive, got {self.rope_theta}"))
        if self.clip_qkv is not None and self.clip_qkv <= 0:
            out.append(("clip_qkv", f"must be positive or null, got {self.clip_qkv}"))
        if self.moe_normalize_expert_weights is not None and self.moe_normalize_expert_weights <= 0:
            out.append(("moe_normalize_expert_weights",
                        f"must be positive or null, got {self.moe_normalize_expert_weights}"))
        for name in ("moe_loss_weight", "moe_z_loss_weight"):
            if getattr(self, name) < 0:
                out.append((name, f"must be >= 0, got {getattr(self, name)}"))
        if self.moe_jitter_eps is not None and not 0 <= self.moe_jitter_eps < 1:
            out.append(("moe_jitter_eps", f"must be in [0, 1) or null, got {self.moe_jitter_eps}"))
        return out
