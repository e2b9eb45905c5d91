"""DeepSpeed engine around the DBRX model, with expert parallelism.

DeepSpeed reduces an expert gradient over the replicas of that expert (the
expert-data-parallel group) and partitions ZeRO state per parameter group,
but it only switches that logic on when the model contains one of its own
`deepspeed.moe.layer.MoE` modules. Our dropless layer is not one (DeepSpeed's
MoE has a capacity factor), so a parameter-free marker subclass is attached:
the engine then builds its expert groups, and the optimizer's parameter
groups are split with DeepSpeed's own `split_params_into_different_moe_groups_for_optimizer`.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # type names only: the engine itself needs no job config (bench/gpu_check.py)
    from platform.config.schema import JobConfig
    from platform.layout import Layout


def import_deepspeed():
    """`import deepspeed`, without the MLflow import its autotuner makes whenever MLflow is
    installed (2.2 of the 4.6 CPU-seconds `import deepspeed` takes; every worker and every rank
    pays it at start). The autotuner is not used here, and a rank that reports no metrics never
    needs MLflow. Until this returns, `import mlflow` fails: call it before the process starts
    threads that may import MLflow (the engine is built before the metrics sink)."""
    if "deepspeed" not in sys.modules and "mlflow" not in sys.modules:
        sys.modules["mlflow"] = None  # type: ignore[assignment]  # the autotuner's import fails; it copes
        try:
            import deepspeed  # noqa: F401
        finally:
            if sys.modules.get("mlflow", False) is None:
                del sys.modules["mlflow"]
    import deepspeed

    return deepspeed


def lr_at(cfg: "JobConfig", step: int, total_steps: int) -> float:
    """Linear warmup to train.lr, then cosine decay to train.min_lr at the last step.

    A pure function of the step, so a resumed run needs no scheduler state.
    """
    t = cfg.train
    if t.warmup_steps and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    span = max(1, total_steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class EngineSpec:
    """Everything the DeepSpeed engine is built from, as plain values.

    Built from a job config by `from_job`; built directly where no job exists
    (bench/gpu_check.py runs the same engine on a bare GPU machine with torch
    and deepspeed alone, without Hydra).
    """

    global_batch_size: int
    micro_batch_size: int
    grad_accum: int
    zero_stage: int
    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    grad_clip: float
    bf16: bool = False
    # "fp32" keeps DeepSpeed's fp32 master weights and Adam states (16 bytes per parameter
    # beside the bf16 weights and gradients); "bf16" keeps them in bf16, as plain bf16
    # training does (8 bytes), with ZeRO 1-3 only.
    master_weights: str = "fp32"

    @classmethod
    def from_job(cls, cfg: "JobConfig", layout: "Layout", bf16: bool) -> "EngineSpec":
        t = cfg.train
        return cls(global_batch_size=t.global_batch_size, micro_batch_size=layout.micro_batch_size,
                   grad_accum=layout.grad_accum, zero_stage=t.zero_stage, lr=t.lr,
                   betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                   weight_decay=t.weight_decay, grad_clip=t.grad_clip, bf16=bf16)


def ds_config(spec: EngineSpec) -> dict[str, Any]:
    bf16: dict[str, Any] = {"enabled": spec.bf16}
    if spec.bf16 and spec.master_weights == "bf16":
        bf16.update(bf16_master_weights_and_grads=True, bf16_optimizer_states=True)
    return {
        "train_batch_size": spec.global_batch_size,
        "train_micro_batch_size_per_gpu": spec.micro_batch_size,
        "gradient_accumulation_steps": spec.grad_accum,
        "gradient_clipping": spec.grad_clip,
        "bf16": bf16,
        "zero_optimization": {
            "stage": spec.zero_stage,
            # Required by DeepSpeed for MoE parameter groups under ZeRO-2.
            "contiguous_gradients": True,
            "overlap_comm": False,
            "reduce_scatter": True,
        },
        "steps_per_print": 2 ** 31,
        "wall_clock_breakdown": False,
    }


def make_optimizer(params: list[dict], spec: EngineSpec, device: torch.device) -> torch.optim.Optimizer:
    """AdamW, fused into one kernel per step on CUDA.

    On CPU the single-tensor loop (`foreach=False`) is the fastest here: it
    walks one flat parameter at a time and keeps its temporaries in cache. On
    a GPU the same loop launches about a dozen elementwise kernels per tensor,
    each a full pass over fp32 state; the fused kernel makes one pass.
    """
    fused = device.type == "cuda"
    return torch.optim.AdamW(params, lr=spec.lr, betas=spec.betas, eps=spec.eps,
                             fused=fused or None, foreach=False if not fused else None)


def _expert_marker(num_experts: int, ep_size: int) -> torch.nn.Module:
    from deepspeed.moe.layer import MoE

    class DroplessExpertsMarker(MoE):
        """Tells the DeepSpeed engine that this model has expert-parallel layers."""

        def __init__(self) -> None:
            torch.nn.Module.__init__(self)  # no DeepSpeed MoE internals, no parameters
            self.num_experts = num_experts
            self.ep_size = ep_size
            self.num_local_experts = num_experts // ep_size
            self.expert_group_name = f"ep_size_{ep_size}"

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            pass  # the groups were made by expert_parallel_group() before the model

        def forward(self, *args, **kwargs):
            raise RuntimeError("marker module; not callable")

    return DroplessExpertsMarker()


def _skip_shm_inference_kernel() -> None:
    """Keep DeepSpeed from compiling its CPU shared-memory all-reduce kernel.

    On the CPU accelerator, DeepSpeed's comm init JIT-builds `deepspeed_shm_comm` with g++
    (~35 s on 2 cores, on the first run of every fresh install) for its inference all-reduce,
    which training never calls: its all_reduce is torch.distributed's. DeepSpeed reads the op's
    availability from `deepspeed.ops.__compatible_ops__`, a dict kept for edits like this one;
    on GPU accelerators there is no such op and this changes nothing.
    """
    import_deepspeed()
    import deepspeed.ops

    compatible = deepspeed.ops.__compatible_ops__
    if "deepspeed_shm_comm" in compatible:
        compatible["deepspeed_shm_comm"] = False


def expert_parallel_group(ep_size: int):
    """Create DeepSpeed's expert and expert-data-parallel groups; the model's EP group.

    With DeepSpeed's default ordering, ranks [0..ep) split one copy of the
    experts, [ep..2ep) the next copy, and so on.
    """
    import torch.distributed as dist

    deepspeed = import_deepspeed()
    from deepspeed.utils import groups

    if not deepspeed.comm.is_initialized():  # adopt the process group Ray Train made
        _skip_shm_inference_kernel()
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
    groups._create_expert_and_data_parallel(ep_size)
    return groups._get_expert_parallel_group(f"ep_size_{ep_size}") if ep_size > 1 else None


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices, not norms; then split expert parameters into their own groups."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    groups = [g for g in groups if g["params"]]
    return split_params_into_different_moe_groups_for_optimizer(groups)


@dataclass
class Engine:
    """The DeepSpeed engine and what the loop needs beside it."""

    engine: Any
    model: torch.nn.Module
    expert_parallel: int

    @property
    def basic_optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer under DeepSpeed's wrappers (it holds Adam's state)."""
        opt = self.engine.optimizer
        return getattr(opt, "optimizer", opt)

    def set_lr(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr


def build_engine(spec: EngineSpec, model: torch.nn.Module, *, num_experts: int,
                 expert_parallel: int) -> Engine:
    """DeepSpeed around `model` (already on its device), experts split `expert_parallel` ways."""
    deepspeed = import_deepspeed()

    if expert_parallel > 1:  # at degree 1 experts are ordinary replicated weights
        model.add_module("_deepspeed_experts_marker", _expert_marker(num_experts, expert_parallel))
    device = next(model.parameters()).device
    optimizer = make_optimizer(_param_groups(model, spec.weight_decay), spec, device)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(spec),
                                           dist_init_required=False)
    return Engine(engine=engine, model=model, expert_parallel=expert_parallel)


def build_job_engine(cfg: "JobConfig", layout: "Layout", model: torch.nn.Module,
                     bf16: bool = False) -> Engine:
    """The engine of a job at this layout."""
    return build_engine(EngineSpec.from_job(cfg, layout, bf16), model,
                        num_experts=cfg.model.moe_num_experts,
                        expert_parallel=layout.expert_parallel)
