"""What one serving device holds, before anything starts: `python -m platform.serve JOB --dry-run`.

Per device of a replica (serve.devices_per_replica = N):
- weights at serve.weights: the dense parameters (embedding, attention,
  router, norms, LM head) on every device, and 1/N of the experts. 8-bit
  formats store 1 byte per quantized weight plus their scales (model.quant:
  attention, LM head and experts; the rest keeps the 16/32-bit precision);
- the KV cache of serve.max_concurrent_sequences slots of
  serve.max_context_tokens (or the model's max_seq_len) positions, lowered to
  what serve.max_kv_cache_mb holds, exactly as the replica sizes it. Every
  device of a replica holds the whole batch, so the cache is not divided;
- on a GPU, the runtime reserve the training plan also keeps (CUDA context,
  allocator slack, prefill activations).
The limit is cluster.gpu_memory_gb per GPU; on CPU the N processes of a
replica share one node, whose cluster.node_memory_mb they must fit together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from model.config import DBRXConfig
from model.counting import param_counts
from platform.config.schema import JobConfig
from platform.plan import GB, GPU_RUNTIME_RESERVE_GB


@dataclass(frozen=True)
class ServeMemory:
    devices: int                   # per replica
    gpu: bool
    weights: str                   # the format served (auto resolved)
    dense_bytes: int               # on every device
    expert_bytes: int              # on each device (1/devices of them)
    kv_bytes: int                  # on every device
    reserve_bytes: int
    slots: int
    context: int
    limit_key: str                 # the config key of the limit ("" when unknown)
    limit_gb: Optional[float]      # per GPU, or per node on CPU (all the replica's processes)

    @property
    def per_device_bytes(self) -> int:
        return self.dense_bytes + self.expert_bytes + self.kv_bytes + self.reserve_bytes

    @property
    def need_gb(self) -> float:
        """What the limit is compared with: one GPU's bytes, or the whole replica's on a CPU node."""
        return self.per_device_bytes * (1 if self.gpu else self.devices) / GB

    @property
    def fits(self) -> bool:
        return self.limit_gb is None or self.need_gb <= self.limit_gb


def _bytes(fmt: str) -> int:
    return {"fp32": 4, "bf16": 2}[fmt]


def weight_bytes(cfg: DBRXConfig, weights: str, gpu: bool, devices: int) -> tuple[str, int, int]:
    """(format served, dense bytes per device, expert bytes per device) as ServerSettings load them."""
    if weights == "auto":
        weights = "bf16" if gpu else "fp32"
    # The precision of what is not quantized (model.quant) and of activations: bf16 on a GPU (and
    # for fp8, which is GPU-only), the checkpoint's (fp32 from training) on CPU.
    base = _bytes(weights) if weights in ("fp32", "bf16") else (2 if gpu or weights == "fp8" else 4)
    p = param_counts(cfg)
    if weights in ("fp32", "bf16"):
        return weights, p.dense * base, p.experts // devices * base
    scale = base if weights == "int8" else 4            # Int8Linear keeps its scales in the weights' dtype
    attn_rows = cfg.n_layers * (cfg.d_model + 2 * cfg.kv_dim + cfg.d_model)
    dense = (p.embedding + p.norms + p.router) * base + p.attention + attn_rows * scale
    dense += p.embedding + cfg.vocab_size * scale       # the LM head, quantized (tied: a copy of its own)
    experts_per_device = cfg.moe_num_experts // devices
    expert_scales = cfg.n_layers * experts_per_device * (2 * cfg.ffn_hidden_size + cfg.d_model) * 4
    return weights, dense, p.experts // devices + expert_scales


def serve_memory(cfg: JobConfig) -> ServeMemory:
    import torch

    from model.attention import StaticKVCache

    s, c, m = cfg.serve, cfg.cluster, cfg.model
    gpu = s.replica_gpus > 0 or c.gpus_per_node > 0
    fmt, dense, experts = weight_bytes(m, s.weights, gpu, s.devices_per_replica)
    act = torch.float32 if fmt == "fp32" or (not gpu and fmt == "int8") else torch.bfloat16
    context = min(m.max_seq_len, s.max_context_tokens) if s.max_context_tokens else m.max_seq_len
    per_slot = StaticKVCache.bytes_per_slot(m, context, act)
    slots = s.max_concurrent_sequences
    if s.max_kv_cache_mb:
        slots = min(slots, s.max_kv_cache_mb * 2 ** 20 // per_slot)
    if gpu:
        key, limit = "cluster.gpu_memory_gb", (c.gpu_memory_gb or None)
    elif c.provider == "local":
        key, limit = "cluster.node_memory_mb", c.node_memory_mb / 1024
    else:
        key, limit = "", None
    return ServeMemory(s.devices_per_replica, gpu, fmt, dense, experts, slots * per_slot,
                       int(GPU_RUNTIME_RESERVE_GB * GB) if gpu else 0, slots, context,
                       key if limit else "", limit)


def render(mem: ServeMemory) -> str:
    where = "GPU" if mem.gpu else "process (CPU)"
    lines = [
        f"Serving memory per {where}: {mem.devices} device(s) per replica, {mem.weights} weights",
        f"  dense weights    {mem.dense_bytes / GB:9.2f} GB   on every device",
        f"  expert weights   {mem.expert_bytes / GB:9.2f} GB   1/{mem.devices} of the experts",
        f"  KV cache         {mem.kv_bytes / GB:9.2f} GB   {mem.slots} sequences x {mem.context} positions",
    ]
    if mem.reserve_bytes:
        lines.append(f"  runtime reserve  {mem.reserve_bytes / GB:9.2f} GB")
    lines.append(f"  total            {mem.per_device_bytes / GB:9.2f} GB per device")
    if mem.limit_gb is None:
        lines.append("  limit            unknown (set cluster.gpu_memory_gb to check it)")
    elif mem.gpu:
        lines.append(f"  limit            {mem.limit_gb:9.2f} GB per GPU ({mem.limit_key})")
    else:
        lines.append(f"  limit            {mem.limit_gb:9.2f} GB per node ({mem.limit_key}) for "
                     f"{mem.devices} process(es): {mem.need_gb:.2f} GB")
    lines.append("  fits" if mem.fits else "  DOES NOT FIT")
    return "\n".join(lines)


def fit_problem(mem: ServeMemory, cfg: JobConfig) -> Optional[str]:
    """Why a replica does not fit, naming the key to change; None when it fits."""
    if mem.fits:
        return None
    scale = 1 if mem.gpu else mem.devices
    weights_gb = (mem.dense_bytes + mem.expert_bytes + mem.reserve_bytes) * scale / GB
    where = "per GPU" if mem.gpu else "on the node"
    head = (f"a replica needs {mem.need_gb:.1f} GB {where} but {mem.limit_key} allows "
            f"{mem.limit_gb:.1f} GB: ")
    if weights_gb > mem.limit_gb:
        experts = cfg.model.moe_num_experts
        enough = [n for n in range(mem.devices + 1, experts + 1) if experts % n == 0 and
                  (mem.dense_bytes + mem.expert_bytes * mem.devices // n + mem.reserve_bytes) / GB < mem.limit_gb]
        hints = []
        if enough and mem.gpu:
            hints.append(f"raise serve.devices_per_replica to {enough[0]} (a divisor of "
                         f"model.moe_num_experts={experts})")
        if mem.weights not in ("int8", "fp8"):
            hints.append("set serve.weights=int8 (1 byte per weight)")
        if not hints:
            hints.append("serve on devices with more memory, or a smaller model")
        return head + "the weights alone do not fit: " + ", or ".join(hints)
    return head + (f"the KV cache of {mem.slots} sequences x {mem.context} positions takes "
                   f"{mem.kv_bytes * scale / GB:.1f} GB: lower serve.max_concurrent_sequences, "
                   "serve.max_context_tokens or serve.max_kv_cache_mb")
