"""The DBRX decoder: embedding, blocks, final LayerNorm, LM head.

`DBRX(cfg, ep_group=...)` is the whole model; the training code passes the
expert-parallel process group it got from DeepSpeed (or None for no expert
parallelism), and each rank then holds only its slice of every layer's experts.

Loss convention (the Hugging Face one): `labels` are aligned with `input_ids`
and shifted inside, so `model(ids, labels=ids)` trains next-token prediction;
`shift_labels` are already shifted (target of position i at i, as packed
training data comes); positions labelled -100 are ignored. The returned `loss`
adds the auxiliary MoE losses weighted by the config (`moe_loss_weight`,
`moe_z_loss_weight`). The LM loss never materialises the (tokens x vocab)
logits (model.loss); pass `return_logits=False` to skip them altogether.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from model import hf
from model.attention import KVCache, rotary_tables
from model.block import DBRXBlock
from model.config import DBRXConfig
from model.generate import GenerationOutput
from model.generate import generate as generate_tokens
from model.loss import IGNORE_INDEX, linear_cross_entropy
from model.moe import Experts, expert_group_name


def objective(cfg: DBRXConfig, lm_loss: torch.Tensor, lb_loss: torch.Tensor,
              z_loss: torch.Tensor) -> torch.Tensor:
    """The training loss: LM loss plus the config-weighted load-balancing and z-losses."""
    loss = lm_loss + cfg.moe_loss_weight * lb_loss
    if cfg.moe_z_loss_weight:
        loss = loss + cfg.moe_z_loss_weight * z_loss
    return loss


@dataclass
class DBRXOutput:
    logits: Optional[torch.Tensor]         # (batch, seq, vocab); (batch, 1, vocab) with last_logits_only;
                                           # None with return_logits=False
    loss: Optional[torch.Tensor]           # lm_loss + weighted aux losses, when labels are given
    lm_loss: Optional[torch.Tensor]        # next-token cross entropy, when labels are given
    lb_loss: torch.Tensor                  # load-balancing loss, mean over layers, unweighted
    z_loss: torch.Tensor                   # router z-loss, mean over layers, unweighted
    expert_counts: torch.Tensor            # (n_layers, experts) int64 token assignments (real tokens)
    kv_cache: Optional[KVCache] = None     # the cache passed in, advanced past this call's tokens


class DBRX(nn.Module):
    """DBRX causal language model.

    ep_group: the expert-parallel process group, e.g. DeepSpeed's
        `groups._get_expert_parallel_group("ep_size_P")` after
        `groups._create_expert_and_data_parallel(P)`; None keeps every expert on
        this rank. With a group of size P, group rank r holds experts
        [r*E/P, (r+1)*E/P) of every layer, tokens travel by all-to-all, and the
        expert weights are tagged for DeepSpeed (`allreduce=False`,
        `group_name="ep_size_P"`, see `expert_group_name`).
    Build on the meta device (`with torch.device("meta")`) to size a model
    without memory; `from_hf` loads onto it directly.
    """

    def __init__(self, cfg: DBRXConfig, *, ep_group: Optional[dist.ProcessGroup] = None):
        super().__init__()
        problems = cfg.problems()
        if problems:
            raise ValueError("invalid DBRXConfig: " + "; ".join(f"{f}: {m}" for f, m in problems))
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(DBRXBlock(cfg, i, ep_group) for i in range(cfg.n_layers))
        self.norm_f = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, bias=False)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.reset_parameters()

    # ----------------------------------------------------------------- setup

    def tie_weights(self) -> None:
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.wte.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, initializer_range) for every matrix, ones for norms (as DBRX/HF)."""
        std = self.cfg.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, Experts):
                for p in module.parameters():
                    nn.init.normal_(p, mean=0.0, std=std)

    def assign_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Take `state`'s tensors as the parameters, without copying them.

        Loaders build the model on the meta device and assign, so nothing is
        initialised only to be overwritten. A tied model's lm_head may be
        absent: checkpoints store the shared tensor once.
        """
        state = dict(state)
        if self.cfg.tie_word_embeddings and "lm_head.weight" not in state and "wte.weight" in state:
            state["lm_head.weight"] = state["wte.weight"]
        self.load_state_dict(state, strict=True, assign=True)
        self._relink_parameters()               # assign replaced the parameter objects

    def materialize(self, device: Union[str, torch.device]) -> "DBRX":
        """Give a model built on the meta device uninitialised memory on `device`.

        For callers that initialise the weights themselves (the training worker's
        seeded init): nothing is initialised only to be overwritten.
        """
        self.to_empty(device=device)
        self._relink_parameters()               # to_empty made new parameter objects
        return self

    def _relink_parameters(self) -> None:
        """Restore what new parameter objects lose: the tied head and DeepSpeed's expert tags."""
        self.tie_weights()
        for block in self.blocks:
            block.ffn.tag_expert_params()

    # -------------------------------------------------------- parallel layout

    @property
    def ep_group(self) -> Optional[dist.ProcessGroup]:
        return self.blocks[0].ffn.ep_group

    @property
    def ep_size(self) -> int:
        return self.blocks[0].ffn.ep_size

    @property
    def ep_rank(self) -> int:
        return self.blocks[0].ffn.ep_rank

    @property
    def expert_group_name(self) -> Optional[str]:
        """The DeepSpeed group name the expert parameters are tagged with (None: untagged)."""
        return expert_group_name(self.ep_size) if self.ep_group is not None else None

    @property
    def local_experts(self) -> range:
        return self.blocks[0].ffn.local_experts

    def expert_parameters(self) -> Iterator[nn.Parameter]:
        for block in self.blocks:
            yield from block.ffn.experts.parameters()

    def dense_parameters(self) -> Iterator[nn.Parameter]:
        expert_ids = {id(p) for p in self.expert_parameters()}
        return (p for p in self.parameters() if id(p) not in expert_ids)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict with every expert; under expert parallelism a collective of the EP group."""
        state = dict(self.state_dict())
        if self.ep_size == 1:
            return state
        expert_ids = {id(p) for p in self.expert_parameters()}
        for name, p in self.named_parameters():
            if id(p) in expert_ids:
                parts = [torch.empty_like(state[name]) for _ in range(self.ep_size)]
                dist.all_gather(parts, state[name].contiguous(), group=self.ep_group)
                state[name] = torch.cat(parts)
        return state

    # ---------------------------------------------------------------- forward

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None, *,
                shift_labels: Optional[torch.Tensor] = None,
                return_logits: bool = True,
                attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None,
                kv_cache: Optional[KVCache] = None,
                last_logits_only: bool = False) -> DBRXOutput:
        """input_ids (batch, seq) -> DBRXOutput.

        attention_mask: (batch, past + seq), 1 for real tokens and 0 for (left)
            padding, covering the cached positions too. With a cache it may be
            given once (at prefill): the cache remembers it and later steps'
            tokens count as real.
        position_ids: default arange, or (mask cumsum - 1) when padded, so a
            left-padded prompt sees the same positions as an unpadded one.
        kv_cache: a KVCache to read and extend (model.generate); its length
            advances by seq.
        last_logits_only: compute logits for the last position only (decoding).
        labels / shift_labels: targets aligned with input_ids (shifted here) or
            already shifted (shift_labels[:, i] follows position i); give at most one.
        return_logits: False leaves `logits` None (training: only the loss is needed).
        """
        b, t = input_ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        if past + t > self.cfg.max_seq_len:
            raise ValueError(f"{past + t} positions exceed the model context "
                             f"max_seq_len={self.cfg.max_seq_len}")
        if labels is not None and shift_labels is not None:
            raise ValueError("give labels (shifted inside) or shift_labels (already shifted), not both")
        if labels is not None:
            shift_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        if shift_labels is not None and last_logits_only:
            raise ValueError("labels need the hidden states of every position; drop last_logits_only")
        mask = self._padding_mask(b, t, past, input_ids.device, attention_mask, kv_cache)
        if position_ids is None:
            position_ids = self._positions(b, t, past, input_ids.device, mask)
        attn_mask, is_causal = self._attention_mask(t, past, mask)
        valid = None if mask is None else mask[:, past:]

        x = self.wte(input_ids)
        cos, sin = rotary_tables(position_ids, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        use_ckpt = self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled()
        lb, z, counts = [], [], []
        for block in self.blocks:
            if use_ckpt and kv_cache is None:
                x, stats = checkpoint(block, x, cos, sin, attn_mask, is_causal, None, valid,
                                      use_reentrant=False)
            else:
                x, stats = block(x, cos, sin, attn_mask, is_causal, kv_cache, valid)
            lb.append(stats.lb_loss)
            z.append(stats.z_loss)
            counts.append(stats.expert_counts)
        if kv_cache is not None:
            kv_cache.advance(t)

        x = self.norm_f(x)
        if last_logits_only:
            x = x[:, -1:]
        logits = self.lm_head(x) if return_logits else None
        lb_loss, z_loss = torch.stack(lb).mean(), torch.stack(z).mean()

        loss = lm_loss = None
        if shift_labels is not None:
            head = self.lm_head
            weight = head.weight if isinstance(head, nn.Linear) else head.dequantized_weight(x.dtype)
            lm_loss = linear_cross_entropy(x, weight, shift_labels)
            loss = objective(self.cfg, lm_loss, lb_loss, z_loss)
        return DBRXOutput(logits=logits, loss=loss, lm_loss=lm_loss, lb_loss=lb_loss, z_loss=z_loss,
                          expert_counts=torch.stack(counts), kv_cache=kv_cache)

    @staticmethod
    def _padding_mask(b, t, past, device, attention_mask, cache) -> Optional[torch.Tensor]:
        """Boolean (batch, past + seq) mask of real tokens, or None when nothing is padded."""
        total = past + t
        if attention_mask is not None:
            mask = attention_mask.to(device=device, dtype=torch.bool)
            if mask.shape != (b, total):
                raise ValueError(f"attention_mask has shape {tuple(mask.shape)}, expected "
                                 f"(batch, past + seq) = {(b, total)}")
            if cache is not None:
                cache.valid[:, :total] = mask
        elif cache is not None:
            cache.valid[:, past:total] = True
            mask = cache.valid[:, :total]
        else:
            return None
        return None if bool(mask.all()) else mask

    @staticmethod
    def _positions(b, t, past, device, mask) -> torch.Tensor:
        if mask is None:
            return torch.arange(past, past + t, device=device).expand(b, t)
        return (mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]

    @staticmethod
    def _attention_mask(t, past, mask) -> tuple[Optional[torch.Tensor], bool]:
        """(boolean (batch, 1, seq, past + seq) mask or None, is_causal) for SDPA."""
        if mask is None:
            if past == 0:
                return None, True           # plain causal: SDPA's fast path
            if t == 1:
                return None, False          # one new token sees the whole cache
        q = torch.arange(past, past + t, device=mask.device if mask is not None else None)
        k = torch.arange(past + t, device=q.device)
        causal = k[None, :] <= q[:, None]
        if mask is None:
            return causal[None, None], False
        # Every query also sees itself, so a padding query never has an empty row
        # (SDPA would return NaN); real queries never see padding keys.
        allowed = (causal[None] & mask[:, None, :]) | (k[None, :] == q[:, None])[None]
        return allowed[:, None], False

    # -------------------------------------------------- generation and interop

    def generate(self, prompts: Union[torch.Tensor, list[list[int]]], **kwargs: Any) -> GenerationOutput:
        """See model.generate.generate."""
        return generate_tokens(self, prompts, **kwargs)

    @classmethod
    def from_hf(cls, source: Any, *, config: Optional[Union[DBRXConfig, Mapping, Any]] = None,
                ep_group: Optional[dist.ProcessGroup] = None, dtype: Optional[torch.dtype] = None,
                device: Optional[Union[str, torch.device]] = None) -> "DBRX":
        """A DBRX holding the weights of a Hugging Face DbrxForCausalLM.

        source / config: see model.hf.open_weights (a directory, a transformers
            model, or an HF-named state dict with its config).
        ep_group: expert-parallel group; each rank reads only its experts' rows
            (from safetensors without loading the others).
        dtype: cast weights to it (default: keep the checkpoint's dtype).
        """
        cfg, weights = hf.open_weights(source, config)
        with torch.device("meta"):
            model = cls(cfg, ep_group=ep_group)
        model.assign_state_dict(hf.state_from_hf(weights, model.state_dict(), cfg, model.local_experts,
                                                 dtype))
        if device is not None:
            model.to(device)
        return model

    def to_hf(self, path: str, *, dtype: Optional[torch.dtype] = None,
              max_shard_bytes: int = hf.MAX_SHARD_BYTES) -> None:
        """Write config.json + safetensors (sharded above `max_shard_bytes`) that
        transformers' DbrxForCausalLM.from_pretrained loads.

        Under expert parallelism every rank of the EP group must call this (the
        experts are gathered); only EP rank 0 writes.
        """
        state = self.full_state_dict()
        if self.ep_rank == 0:
            hf.write_hf(path, state, self.cfg, dtype=dtype, max_shard_bytes=max_shard_bytes)
