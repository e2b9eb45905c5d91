"""The typed job config: one frozen dataclass per Hydra config group.

A job YAML composes these groups (conf/<group>/*.yaml); `platform.config.load`
turns the composed tree into a `JobConfig`, reporting every unknown key,
wrong type and impossible combination at once. Derived numbers (world sizes,
parallel degrees, gradient accumulation) are not stored here: `platform.plan`
computes them from these fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

from model.config import DBRXConfig

ModelConfig = DBRXConfig


@dataclass(frozen=True)
class ClusterConfig:
    """Where the job runs and how many nodes it may use."""

    provider: str = "local"            # "local" (infra/local) or "aws" (infra/aws)
    min_nodes: int = 1                 # the run keeps going down to this many nodes
    max_nodes: int = 2                 # and grows back up to this many
    gpus_per_node: int = 0             # 0: CPU nodes, one training worker per node
    cpus_per_worker: int = 1
    gpu_type: str = ""                 # e.g. "H100-SXM-80GB"; informs the plan only
    gpu_memory_gb: float = 0.0         # usable memory per accelerator, for the fit check
    peak_tflops_per_device: float = 0.0  # dense bf16 peak per GPU (0 on CPU: measured instead)
    instance_type: str = "local"
    price_per_node_hour: float = 0.0   # USD, for the plan's cost line
    region: str = ""
    spot: bool = False
    ami: str = ""
    subnet_id: str = ""
    ray_address: str = ""              # "" starts/uses a local head; else an existing cluster
    head_port: int = 6379              # the local head's GCS port (ray_address "")
    dashboard_port: int = 8265         # the local head's dashboard, on 127.0.0.1
    node_memory_mb: int = 3072         # local nodes only: memory cap per Ray node
    node_object_store_mb: int = 300    # local nodes only: object store cap per Ray node
    node_join_timeout_s: float = 180.0
    resize_check_interval_s: float = 60.0   # how often a healthy run looks for nodes to grow onto
    # How long Ray Train waits to place a (re)started worker group before it decides the
    # size again. After a node loss its first decision may still count the lost node; this
    # bounds how long the run waits for it before continuing on the survivors.
    worker_start_timeout_s: float = 120.0
    # Hours between unexpected failures of one node, for the plan's checkpoint interval. Default
    # from Llama 3's 54-day pretraining run: 419 unexpected interruptions on 16,384 H100s, i.e.
    # 2,048 nodes of 8 GPUs, so one node fails every 54 x 24 x 2048 / 419 = 6,335 hours; a
    # cluster of N nodes fails every 6,335 / N hours.
    node_mtbf_hours: float = 54 * 24 * 2048 / 419
    keep_cluster: bool = False         # skip teardown at the end of the job
    tags: Dict[str, str] = field(default_factory=dict)
    package_ref: str = ""              # aws: pip requirement nodes install ("": dbrx-platform==<version>)
    terraform_vars: Dict[str, str] = field(default_factory=dict)  # more infra/<provider> variables


@dataclass(frozen=True)
class DataSource:
    """One named source of a data mixture."""

    name: str
    path: str                          # directory, file, glob, or s3://bucket/prefix
    format: str = "auto"               # auto | text | jsonl | parquet
    text_field: str = "text"           # column/field holding the text (jsonl, parquet)
    weight: float = 1.0
    include: List[str] = field(default_factory=list)   # glob patterns kept inside a directory
    exclude: List[str] = field(default_factory=list)   # glob patterns dropped inside a directory


@dataclass(frozen=True)
class CurriculumStage:
    """From `start_step` on, sample sources with these weights (names -> weight)."""

    start_step: int
    weights: Dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class DataConfig:
    sources: List[DataSource] = field(default_factory=list)
    curriculum: List[CurriculumStage] = field(default_factory=list)
    cache_dir: str = "~/.cache/dbrx-platform/data"
    eval_fraction: float = 0.01        # fraction of documents held out for eval loss
    num_tokenize_workers: int = 2
    s3_endpoint_url: Optional[str] = None


@dataclass(frozen=True)
class TrainConfig:
    global_batch_size: int = 8         # sequences per optimizer step, whatever the world size
    micro_batch_size: int = 1          # sequences per worker per forward/backward
    seq_len: int = 256
    total_tokens: int = 0              # token budget; the number of steps follows from it
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 10
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    zero_stage: int = 1
    precision: str = "auto"            # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    expert_parallel_size: int = 0      # 0: the largest allowed for each world size
    max_expert_parallel_size: int = 0  # 0: no cap (up to the number of experts)
    seed: int = 1234
    max_failures: int = 3              # worker failures Ray Train restarts from
    max_job_restarts: int = 3          # control-plane deaths (Train controller, driver actors,
                                       # the Ray head) the job restarts its training run from
    log_every_steps: int = 1
    eval_every_steps: int = 50
    eval_batches: int = 4
    assumed_mfu: float = 0.4           # for the plan's step time on GPUs


@dataclass(frozen=True)
class CheckpointConfig:
    uri: str = "~/.dbrx-platform/checkpoints"   # local directory or s3://bucket/prefix
    # Steps between saves, or "auto": the plan's Young-Daly interval from the expected stall and
    # cluster.node_mtbf_hours (platform.plan.checkpoint_every_steps resolves both).
    every_steps: Union[int, str] = 50
    keep_last: int = 3
    s3_endpoint_url: Optional[str] = None
    resume: bool = True                # autoresume from the job's latest committed checkpoint
    async_save: bool = True            # training blocks only while state is copied to host memory
    # Plan only: the rate a rank copies its share of the state out of the device into host
    # memory (GB/s, 1e9 bytes), which sets the expected stall per save. ~50 GB/s is a pinned
    # device-to-host copy on one H100 (PCIe Gen5 x16) alone; 10 leaves room for eight GPUs
    # sharing a host and for gathering full values out of ZeRO partitions. Calibrate it with
    # the stall a run measures.
    assumed_copy_gb_per_s: float = 10.0


@dataclass(frozen=True)
class TrackingConfig:
    tracking_uri: str = "sqlite:///~/.dbrx-platform/mlflow.db"
    artifact_location: str = "~/.dbrx-platform/mlartifacts"
    experiment: str = "dbrx"
    ui_host: str = "127.0.0.1"
    ui_port: int = 5000
    # While MLflow is unreachable, deliveries retry with exponential backoff up to this wait:
    # the longest a returned server waits for the buffered metrics.
    max_retry_s: float = 30.0


@dataclass(frozen=True)
class PromoteConfig:
    registered_model: str = "dbrx"
    alias: str = "staging"
    auto: bool = False                 # promote the final checkpoint when training ends
    gate: bool = True                  # refuse a version whose held-out loss is worse
    gate_tolerance: float = 0.0        # held-out loss increase (nats) the gate still accepts
    # Weights the gate evaluates both models at: "serve" (serve.weights: what the endpoint will run;
    # auto = the checkpoint's fp32), or fp32 / bf16 / int8 / fp8 (fp8 needs a Hopper GPU).
    gate_weights: str = "serve"


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: Optional[str] = None      # secret: never logged nor written to MLflow
    model_alias: str = "staging"
    num_replicas: int = 1
    max_replicas: int = 1
    max_tokens_limit: int = 512
    # Continuous batching per replica: sequences decoding at once (more get 429), the KV cache memory
    # they may take (0: no cap beyond the count), the positions a request may use (0: model context).
    max_concurrent_sequences: int = 16
    max_kv_cache_mb: int = 0
    max_context_tokens: int = 0
    # Weights as served, quantized at load: auto (bf16 on GPU, checkpoint dtype on CPU), fp32, bf16,
    # int8 (weight-only, any device) or fp8 (e4m3, CUDA compute capability 9.0+ only).
    weights: str = "auto"
    # Devices one replica spans: its experts split this many ways (expert parallelism, one process
    # per device, lock-step decoding); must divide model.moe_num_experts.
    devices_per_replica: int = 1
    start_after_training: bool = False
    alias_poll_s: float = 5.0          # how often replicas re-resolve model_alias (rolling update)
    replica_cpus: float = 1.0          # Ray resources reserved per replica
    replica_gpus: float = 0.0          # > 0: replicas run on a GPU in bfloat16
    # Browsers (platform.serving.origin): Host names answered besides loopback names and the bound
    # address on serve.port ("name" any port, "name:port", "*" any), and the web origins whose pages
    # may call the API (CORS, e.g. "https://app.example.com"; "*" any). Empty: no other name, no page.
    allowed_hosts: List[str] = field(default_factory=list)
    allowed_origins: List[str] = field(default_factory=list)


@dataclass(frozen=True)
class JobConfig:
    name: str
    model: ModelConfig = field(default_factory=ModelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    promote: PromoteConfig = field(default_factory=PromoteConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)


# Keys whose values are secrets: redacted wherever a config is printed or logged.
SECRET_KEYS = frozenset({"serve.api_key"})
