"""The plan of a job: every number derived from its config, computed once.

`make_plan(cfg)` is what `platform.submit` prints before anything is
provisioned: the parallel layout at each allowed world size, parameters and
FLOPs from the architecture, memory per accelerator broken down, step time
and days to the token budget at a stated MFU, what the cluster costs, and
what a checkpoint costs and how often to take one (`checkpoint_every_steps`).
Memory is an estimate from first principles (documented per term below), so
that a config that cannot fit is refused before any node is paid for.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from model.counting import active_params, param_counts, training_flops_per_token
from platform.checkpoint.placement import (
    STATE_BYTES_PER_ELEMENT, ParamShape, assign_writers, bytes_per_rank, chunk_bytes_for, units_of,
)
from platform.config.build import Problem
from platform.config.schema import JobConfig, ModelConfig
from platform.layout import Layout, Skipped, allowed_layouts, workers_per_node

GB = 1024 ** 3
AUTO = "auto"            # checkpoint.every_steps: the plan's Young-Daly interval
# CUDA context, NCCL buffers, allocator fragmentation: a fixed reserve per GPU.
GPU_RUNTIME_RESERVE_GB = 3.0


@dataclass(frozen=True)
class Memory:
    """Bytes per worker (one GPU, or one CPU node) in GB."""

    weights: float
    gradients: float
    optimizer: float
    activations_checkpointed: float
    activations_full: float
    runtime_reserve: float
    activation_checkpointing: bool

    @property
    def total(self) -> float:
        act = self.activations_checkpointed if self.activation_checkpointing else self.activations_full
        return self.weights + self.gradients + self.optimizer + act + self.runtime_reserve


@dataclass(frozen=True)
class LayoutPlan:
    layout: Layout
    memory: Memory
    step_time_s: float | None        # None on CPU: no peak to scale by; MFU is measured instead
    days_to_budget: float | None
    cost_per_hour: float


@dataclass(frozen=True)
class Plan:
    job: str
    provider: str
    devices: str
    params_total: int
    params_active: int
    flops_per_token: float
    tokens_per_step: int
    total_steps: int
    precision: str
    layouts: list[LayoutPlan]
    checkpoint: CheckpointPlan       # at the largest layout
    skipped: Skipped = field(default_factory=lambda: Skipped(0, ()))
    memory_limit_gb: float | None = None
    memory_limit_key: str = ""       # the config key that sets memory_limit_gb

    @property
    def memory_per_gpu_gb(self) -> float:
        return max(l.memory.total for l in self.layouts)

    @property
    def fits(self) -> bool:
        return self.memory_limit_gb is None or self.memory_per_gpu_gb <= self.memory_limit_gb

    def to_json(self) -> dict:
        return {
            "job": self.job,
            "provider": self.provider,
            "devices": self.devices,
            "params_total": self.params_total,
            "params_active": self.params_active,
            "flops_per_token": self.flops_per_token,
            "tokens_per_step": self.tokens_per_step,
            "total_steps": self.total_steps,
            "precision": self.precision,
            "memory_per_gpu_gb": round(self.memory_per_gpu_gb, 3),
            "memory_limit_gb": self.memory_limit_gb,
            "fits": self.fits,
            "layouts": [
                {**asdict(l.layout), "data_parallel": l.layout.data_parallel,
                 "memory_gb": {**asdict(l.memory), "total": round(l.memory.total, 3)},
                 "step_time_s": l.step_time_s, "days_to_budget": l.days_to_budget,
                 "cost_per_hour": l.cost_per_hour}
                for l in self.layouts
            ],
            "skipped_world_sizes": [{"world_size": w, "reason": r} for w, r in self.skipped.examples],
            "skipped_world_sizes_count": self.skipped.count,
            "checkpoint": self.checkpoint.to_json(),
        }


def effective_precision(cfg: JobConfig) -> str:
    if cfg.train.precision != "auto":
        return cfg.train.precision
    return "bf16" if cfg.cluster.gpus_per_node > 0 else "fp32"


def _memory(cfg: JobConfig, layout: Layout, precision: str) -> Memory:
    m, t = cfg.model, cfg.train
    counts = param_counts(m)
    dense, experts = counts.dense, counts.experts // layout.expert_parallel
    # bf16 mixed precision: bf16 weights and grads, fp32 master copy + Adam m, v.
    # fp32: fp32 weights and grads, Adam m, v.
    w_b, g_b, o_b = (2, 2, 12) if precision == "bf16" else (4, 4, 8)
    # ZeRO partitions optimizer states (stage >= 1) and gradients (stage >= 2)
    # over each parameter's data-parallel group: all workers for dense
    # parameters, the replicas of the same experts for expert parameters.
    def sharded(n_dense: float, n_expert: float, stage_needed: int) -> float:
        if t.zero_stage >= stage_needed:
            return n_dense / layout.world_size + n_expert / layout.expert_data_parallel
        return n_dense + n_expert

    weights = (dense + experts) * w_b
    grads = sharded(dense, experts, 2) * g_b
    optim = sharded(dense, experts, 1) * o_b
    # Activations of one micro batch. Per token per block the backward pass keeps:
    # the two norm inputs and outputs, QKV, attention output, output projection
    # (~6 d + 2 kv_dim), router logits (E) and, for each of the k routed copies,
    # the permuted input and output (2 d) plus the GLU's w1, v1 and product (3 ffn).
    # SDPA's fused kernels keep O(seq) softmax statistics, ignored here.
    tokens = t.micro_batch_size * t.seq_len
    a_b = 2 if precision == "bf16" else 4
    per_block = (6 * m.d_model + 2 * m.kv_dim + m.moe_num_experts
                 + m.moe_top_k * (2 * m.d_model + 3 * m.ffn_hidden_size)) * tokens * a_b
    logits = tokens * m.vocab_size * (a_b + 4)   # logits plus fp32 log-softmax for the loss
    full = m.n_layers * per_block + logits
    # With checkpointing only each block's input is kept, plus one block recomputed.
    ckpt = m.n_layers * tokens * m.d_model * a_b + per_block + logits
    reserve = GPU_RUNTIME_RESERVE_GB if cfg.cluster.gpus_per_node > 0 else 0.0
    return Memory(weights / GB, grads / GB, optim / GB, ckpt / GB, full / GB, reserve,
                  m.activation_checkpointing)


def make_plan(cfg: JobConfig) -> Plan:
    m, t, c = cfg.model, cfg.train, cfg.cluster
    precision = effective_precision(cfg)
    flops_per_token = training_flops_per_token(m, t.seq_len)
    tokens_per_step = t.global_batch_size * t.seq_len
    total_steps = max(1, math.ceil(t.total_tokens / tokens_per_step))
    allowed, skipped = allowed_layouts(cfg)
    plans = []
    for layout in allowed:
        step_time = days = None
        if has_step_time(cfg):
            achieved = layout.world_size * c.peak_tflops_per_device * 1e12 * t.assumed_mfu
            step_time = tokens_per_step * flops_per_token / achieved
            days = step_time * total_steps / 86400
        plans.append(LayoutPlan(layout, _memory(cfg, layout, precision), step_time, days,
                                layout.nodes * c.price_per_node_hour))
    devices = (f"{c.gpus_per_node} x {c.gpu_type or 'GPU'} per node" if c.gpus_per_node
               else f"CPU, {workers_per_node(c)} worker per node")
    limit_key, limit_gb = memory_limit(cfg)
    return Plan(
        job=cfg.name, provider=c.provider, devices=devices,
        params_total=param_counts(m).total, params_active=active_params(m),
        flops_per_token=flops_per_token, tokens_per_step=tokens_per_step,
        total_steps=total_steps, precision=precision, layouts=plans,
        checkpoint=checkpoint_plan(cfg, max(plans, key=lambda lp: lp.layout.world_size)),
        skipped=skipped, memory_limit_gb=limit_gb, memory_limit_key=limit_key,
    )


def has_step_time(cfg: JobConfig) -> bool:
    """Whether the plan estimates step time: GPUs with a rated peak (CPU steps are measured)."""
    return cfg.cluster.gpus_per_node > 0 and cfg.cluster.peak_tflops_per_device > 0


@dataclass(frozen=True)
class CheckpointPlan:
    """One save at the largest allowed layout, and how often to save.

    The stall is what training waits for when saves run in the background: the
    most loaded rank copying its share of the state into host memory. Young and
    Daly's interval sqrt(2 x stall x MTBF) minimises the time lost to saving (one
    stall per interval) plus the work lost to failures (half an interval each).
    """

    world_size: int
    nodes: int
    size_bytes: int                  # every parameter with its Adam moments, fp32
    bytes_per_rank_mean: float
    bytes_per_rank_max: int          # also the host memory a rank keeps for saving
    copy_gb_per_s: float             # checkpoint.assumed_copy_gb_per_s
    async_save: bool                 # checkpoint.async_save: False also stalls for the write
    node_mtbf_hours: float           # cluster.node_mtbf_hours
    step_time_s: float | None        # the plan's estimate at this layout; None on CPU
    configured: int | str            # checkpoint.every_steps as written (a number or "auto")
    run_cost_usd: float | None       # the whole run at this layout; None without a step time

    @property
    def stall_s(self) -> float:
        return self.bytes_per_rank_max / (self.copy_gb_per_s * 1e9)

    @property
    def cluster_mtbf_s(self) -> float:
        """Any one of the nodes failing ends the interval: the node MTBF over the node count."""
        return self.node_mtbf_hours * 3600 / self.nodes

    @property
    def optimal_interval_s(self) -> float:
        return math.sqrt(2 * self.stall_s * self.cluster_mtbf_s)

    @property
    def optimal_every_steps(self) -> int | None:
        if self.step_time_s is None:
            return None
        return max(1, round(self.optimal_interval_s / self.step_time_s))

    @property
    def every_steps(self) -> int | None:
        """The interval the run uses: the configured one, or the optimal one for auto."""
        return self.optimal_every_steps if self.configured == AUTO else self.configured

    def overhead(self, interval_s: float) -> float:
        """Fraction of the run lost when saving every `interval_s`: stalls plus recomputed work."""
        return self.stall_s / interval_s + interval_s / (2 * self.cluster_mtbf_s)

    @property
    def interval_s(self) -> float | None:
        """Seconds between the run's saves; None where the step time is unknown."""
        if self.step_time_s is None or self.every_steps is None:
            return None
        return self.every_steps * self.step_time_s

    def to_json(self) -> dict:
        interval = self.interval_s
        return {
            "world_size": self.world_size, "nodes": self.nodes, "size_bytes": self.size_bytes,
            "bytes_per_rank_mean": round(self.bytes_per_rank_mean),
            "bytes_per_rank_max": self.bytes_per_rank_max,
            "host_memory_per_rank_bytes": self.bytes_per_rank_max,
            "assumed_copy_gb_per_s": self.copy_gb_per_s, "stall_s": self.stall_s,
            "node_mtbf_hours": self.node_mtbf_hours,
            "cluster_mtbf_hours": self.cluster_mtbf_s / 3600,
            "optimal_interval_s": self.optimal_interval_s,
            "optimal_every_steps": self.optimal_every_steps,
            "optimal_overhead_fraction": self.overhead(self.optimal_interval_s),
            "every_steps_config": self.configured, "every_steps": self.every_steps,
            "interval_s": interval,
            "overhead_fraction": None if interval is None else self.overhead(interval),
        }


def checkpoint_shapes(m: ModelConfig) -> list[ParamShape]:
    """Every parameter as DBRX names and shapes it (an expert parameter as one expert's rows),
    from the config alone: the plan places the checkpoint of a model it never builds."""
    d, experts = m.d_model, m.moe_num_experts
    shapes = [ParamShape("wte.weight", m.vocab_size, d)]
    for i in range(m.n_layers):
        b = f"blocks.{i}"
        shapes += [ParamShape(f"{b}.norm_1.weight", d, 1),
                   ParamShape(f"{b}.attn.Wqkv.weight", d + 2 * m.kv_dim, d),
                   ParamShape(f"{b}.attn.out_proj.weight", d, d),
                   ParamShape(f"{b}.norm_2.weight", d, 1),
                   ParamShape(f"{b}.ffn.router.layer.weight", experts, d)]
        shapes += [ParamShape(f"{b}.ffn.experts.{w}", m.ffn_hidden_size, d, experts)
                   for w in ("w1", "v1", "w2")]
    shapes.append(ParamShape("norm_f.weight", d, 1))
    if not m.tie_word_embeddings:
        shapes.append(ParamShape("lm_head.weight", m.vocab_size, d))
    return shapes


def checkpoint_plan(cfg: JobConfig, lp: LayoutPlan) -> CheckpointPlan:
    """The checkpoint at layout `lp`, placed on its ranks as the writers place it."""
    layout, m = lp.layout, cfg.model
    shapes = checkpoint_shapes(m)
    total = STATE_BYTES_PER_ELEMENT * sum(p.rows * p.cols * max(1, p.experts) for p in shapes)
    units = units_of(shapes, chunk_bytes_for(total, layout.world_size))
    loads = bytes_per_rank(assign_writers(units, layout.world_size, layout.expert_parallel,
                                          m.moe_num_experts), layout.world_size)
    run_cost = (None if lp.days_to_budget is None
                else lp.days_to_budget * 24 * lp.cost_per_hour)
    return CheckpointPlan(
        world_size=layout.world_size, nodes=layout.nodes, size_bytes=sum(loads),
        bytes_per_rank_mean=sum(loads) / layout.world_size, bytes_per_rank_max=max(loads),
        copy_gb_per_s=cfg.checkpoint.assumed_copy_gb_per_s, async_save=cfg.checkpoint.async_save,
        node_mtbf_hours=cfg.cluster.node_mtbf_hours, step_time_s=lp.step_time_s,
        configured=cfg.checkpoint.every_steps, run_cost_usd=run_cost)


def checkpoint_every_steps(cfg: JobConfig) -> int:
    """Steps between checkpoints for the training loop: `checkpoint.every_steps`, or for
    `auto` the plan's Young-Daly interval at the largest allowed layout (one value for
    every world size, so a resized run keeps saving at the same steps). Validation
    refuses `auto` where the plan has no step time."""
    if cfg.checkpoint.every_steps != AUTO:
        return cfg.checkpoint.every_steps
    every = make_plan(cfg).checkpoint.every_steps
    if every is None:
        raise ValueError("checkpoint.every_steps=auto needs the plan's step time (GPU nodes)")
    return every


def memory_limit(cfg: JobConfig) -> tuple[str, float | None]:
    """(config key, GB) of the memory one worker has: the GPU's, or a local CPU node's
    (one worker per node); None where the config does not say."""
    c = cfg.cluster
    if c.gpus_per_node > 0:
        return "cluster.gpu_memory_gb", c.gpu_memory_gb
    if c.provider == "local":
        return "cluster.node_memory_mb", c.node_memory_mb / 1024
    return "", None


def fit_problem(plan: Plan) -> Problem | None:
    """Why the plan's largest layout does not fit a worker's memory, or None."""
    if plan.fits:
        return None
    where = ("per GPU" if plan.memory_limit_key == "cluster.gpu_memory_gb"
             else "per worker (one per local node)")
    return Problem(plan.memory_limit_key,
                   f"the job needs {plan.memory_per_gpu_gb:.1f} GB {where} but "
                   f"{plan.memory_limit_key} allows {plan.memory_limit_gb:.1f} GB: turn on "
                   "model.activation_checkpointing, lower train.micro_batch_size or "
                   "train.seq_len, raise cluster.min_nodes (the fewest workers hold the most "
                   "each), or use a smaller model")


def _si(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def render(plan: Plan, cfg: JobConfig) -> str:
    """The plan as a human-readable block of text."""
    t, c = cfg.train, cfg.cluster
    lines = [
        f"Plan for job '{plan.job}' on {plan.provider} ({c.instance_type}, {plan.devices})",
        f"  nodes           {c.min_nodes}..{c.max_nodes} (elastic)",
        f"  model           {_si(plan.params_total)} parameters total, {_si(plan.params_active)} "
        f"active per token ({cfg.model.moe_top_k} of {cfg.model.moe_num_experts} experts)",
        f"  compute         {_si(plan.flops_per_token)} training FLOPs per token at seq_len "
        f"{t.seq_len}; precision {plan.precision}, ZeRO stage {t.zero_stage}",
        f"  batch           {t.global_batch_size} sequences x {t.seq_len} tokens = "
        f"{_si(plan.tokens_per_step)} tokens per step, {plan.total_steps:,} steps for "
        f"{_si(t.total_tokens)} tokens",
        "",
        "  workers  nodes  EP  expert-DP  micro x accum   weights  grads  optim  act(ckpt/full)"
        "   total GB   step s   days   $/hour",
    ]
    for lp in plan.layouts:
        l, mem = lp.layout, lp.memory
        step = f"{lp.step_time_s:8.2f}" if lp.step_time_s is not None else "     n/a"
        days = f"{lp.days_to_budget:6.1f}" if lp.days_to_budget is not None else "   n/a"
        lines.append(
            f"  {l.world_size:7d}  {l.nodes:5d}  {l.expert_parallel:2d}  {l.expert_data_parallel:9d}"
            f"  {l.micro_batch_size:5d} x {l.grad_accum:<5d}  {mem.weights:8.2f}  {mem.gradients:5.2f}"
            f"  {mem.optimizer:5.2f}  {mem.activations_checkpointed:6.2f}/{mem.activations_full:<7.2f}"
            f"  {mem.total:9.2f}  {step}  {days}  {lp.cost_per_hour:7.2f}")
    skipped = plan.skipped
    if skipped.count:
        sizes = ", ".join(str(w) for w, _ in skipped.examples)
        more = f", ... ({skipped.count} in all)" if skipped.count > len(skipped.examples) else ""
        lines.append(f"  skipped world sizes: {sizes}{more}; {skipped.examples[0][1]}. An elastic "
                     "run uses the largest allowed size that the live nodes can hold.")
    ckpt = "on" if cfg.model.activation_checkpointing else "off"
    lines.append(f"  memory per worker: up to {plan.memory_per_gpu_gb:.2f} GB with activation "
                 f"checkpointing {ckpt}" + (f" (limit {plan.memory_limit_gb:.0f} GB: "
                                            f"{'fits' if plan.fits else 'DOES NOT FIT'})"
                                            if plan.memory_limit_gb else ""))
    if any(lp.step_time_s for lp in plan.layouts):
        lines.append(f"  step time and days assume {t.assumed_mfu:.0%} MFU of "
                     f"{c.peak_tflops_per_device:.0f} TFLOP/s per GPU")
    else:
        lines.append("  step time: measured during training (CPU workers have no rated peak)")
    return "\n".join(lines + _render_checkpoint(plan.checkpoint))


def _bytes(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _cost(ck: CheckpointPlan, interval_s: float) -> str:
    """`interval_s` in steps and its overhead (and dollars, where the run's cost is known)."""
    steps = f" = {round(interval_s / ck.step_time_s)} steps" if ck.step_time_s else ""
    fraction = ck.overhead(interval_s)
    usd = f" (~${fraction * ck.run_cost_usd:,.0f} of the run)" if ck.run_cost_usd else ""
    return f"{interval_s:.0f} s{steps}, overhead {fraction * 100:.2g}%{usd}"


def _render_checkpoint(ck: CheckpointPlan) -> list[str]:
    used = (_cost(ck, ck.interval_s) if ck.interval_s is not None
            else "its cost needs a step time (n/a on CPU)")
    sync = ([] if ck.async_save else
            ["                  checkpoint.async_save=false: training also waits for the write, "
             "which this stall leaves out"])
    return [
        f"  checkpoint      {_bytes(ck.size_bytes)} per save ({STATE_BYTES_PER_ELEMENT} bytes per "
        f"parameter); at "
        f"{ck.world_size} workers {_bytes(ck.bytes_per_rank_mean)} per rank mean, "
        f"{_bytes(ck.bytes_per_rank_max)} max ({ck.bytes_per_rank_max / ck.bytes_per_rank_mean:.2f}x)",
        "                  each rank writes its share, copied first into host buffers it keeps",
        f"  save stall      {ck.stall_s:.3g} s: the largest share copied to host at "
        f"{ck.copy_gb_per_s:g} GB/s (checkpoint.assumed_copy_gb_per_s)",
        f"  save interval   Young-Daly sqrt(2 x stall x cluster MTBF {ck.cluster_mtbf_s / 3600:,.1f} h) "
        f"= {_cost(ck, ck.optimal_interval_s)}",
        f"                  cluster MTBF = cluster.node_mtbf_hours {ck.node_mtbf_hours:,.0f} / "
        f"{ck.nodes} nodes",
        f"                  checkpoint.every_steps={ck.configured}: {used}",
    ] + sync
