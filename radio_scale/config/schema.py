"""Typed configuration of a distillation run: every section is a frozen dataclass."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union


@dataclass(frozen=True)
class StudentConfig:
    """The student backbone (a ViT with CPE, multiple CLS tokens and windowed-attention augmentation)."""

    arch: str = "vit_s16"  # ViT preset (radio_scale.models.presets), eradio_b/eradio_l (+ _noup), or timm:<name>
    patch_size: Optional[int] = None  # None: the preset's
    embed_dim: Optional[int] = None
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    cpe_grid: int = 128  # learned position grid side (paper: 128x128)
    cpe_scale: tuple[float, float] = (0.5, 1.0)  # area fraction of the grid cropped in training
    cpe_ratio: tuple[float, float] = (0.75, 1.3333)
    num_registers: int = 0
    window_sizes: tuple[int, ...] = (0,)  # 0 = global attention; one is sampled per step
    global_blocks: tuple[int, ...] = ()  # blocks that always attend globally
    spectral_reparam: bool = False
    activation_checkpointing: bool = False
    drop_path: float = 0.0
    timm_kwargs: dict = field(default_factory=dict)  # timm.create_model kwargs of a `timm:<name>` student


@dataclass(frozen=True)
class TeacherConfig:
    """A frozen teacher built from its own library and loaded from a local checkpoint."""

    name: str
    family: Literal["open_clip", "dinov2", "sam", "timm"]
    model: str  # the library's model name (open_clip name, timm name, SAM vit_b/l/h)
    checkpoint: Optional[str] = None  # local file in the library's format; None only with random_init
    random_init: bool = False  # tiny test/smoke teachers: random weights with a fixed seed
    init_seed: int = 0
    model_kwargs: dict = field(default_factory=dict)  # size overrides for tiny variants
    input_size: Optional[int] = None  # None: the model's own preprocessing size
    summary_weight: float = 1.0  # lambda_i (ignored when the teacher has no summary)
    spatial_weight: float = 1.0  # gamma_i
    sharding: Literal["auto", "replicate", "fsdp"] = "auto"


@dataclass(frozen=True)
class GroupConfig:
    """One teacher group: ranks that share (batch per rank, student resolution, teachers)."""

    name: str
    teachers: tuple[str, ...]
    batch_per_rank: int
    resolution: int  # student input side in pixels
    ranks: Union[int, float, str] = "auto"  # count, fraction of the world, or "auto"
    sampling_rate: float = 1.0  # fraction of steps on which this group contributes a batch
    allow_batch_tuning: bool = False  # auto planner may change batch_per_rank


@dataclass(frozen=True)
class StageConfig:
    """A training stage; the student and optimizer carry over between stages."""

    name: str
    steps: int
    groups: tuple[GroupConfig, ...]
    warmup_steps: int = 0
    lr: Optional[float] = None  # None: optim.lr


@dataclass(frozen=True)
class LossConfig:
    alpha: float = 0.9  # cosine share of the spatial loss
    beta: float = 0.1  # smooth-L1 share of the spatial loss
    balancer: Literal["naive", "uncertainty", "adaloss"] = "naive"
    adaloss_momentum: float = 0.99
    # per_teacher (the paper): each term is the mean over the samples that carried its teacher in the step
    # (all ranks), times its weight, so a teacher seen by few samples (SAM) keeps its full weight.
    # per_sample: every term summed over its samples and divided by the step's global sample count.
    reduction: Literal["per_teacher", "per_sample"] = "per_teacher"
    # phi_s: every teacher's summary and spatial features standardised (PHI-S: PCA rotation, Hadamard, one scale)
    # before the loss, estimated on `standardize_batches` batches per group when the teacher first appears.
    standardize: Literal["none", "phi_s"] = "none"
    standardize_batches: int = 8


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.02
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of the peak
    # run (the paper): one warm-up (stage 0's warmup_steps) and one cosine over all stages' steps, peak optim.lr.
    # per_stage: every stage warms up and decays on its own (its warmup_steps, its lr or optim.lr).
    schedule: Literal["run", "per_stage"] = "run"


@dataclass(frozen=True)
class DataConfig:
    shards: str = "bundled"  # "bundled", a brace pattern, a glob, a url, or a list file
    image_key: str = "jpg;jpeg;png;webp"
    label_key: str = "cls"
    shuffle_buffer: int = 1000
    # shards read together per chunk; a buffer at least as large as a chunk mixes their samples uniformly
    shards_per_chunk: int = 4
    num_workers: int = 2
    crop_scale: tuple[float, float] = (0.35, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 1.3333)
    bad_shard_warn_after: int = 3
    # `pipe:` lines inside a .txt list file run through a shell: refused unless this is set (a `pipe:` spec
    # written in data.shards itself, in the recipe or on the command line, is always allowed)
    allow_pipe_in_lists: bool = False


@dataclass(frozen=True)
class CheckpointConfig:
    dir: Optional[str] = None  # None: <run_dir>/checkpoints
    every: int = 1000
    keep: int = 3
    async_save: bool = True


@dataclass(frozen=True)
class TrackingConfig:
    uri: Optional[str] = None  # None: sqlite store inside the run directory
    experiment: str = "radio_scale"
    log_every: int = 10
    system_metrics: bool = True


@dataclass(frozen=True)
class MonitorConfig:
    # A heartbeat file is written every heartbeat_every_s seconds of wall time (and at every phase change);
    # heartbeat_every > 0 also writes one every that many steps (0: by time only). Shared-filesystem load.
    heartbeat_every: int = 0
    heartbeat_every_s: float = 5.0
    # Watchdog phase timeouts; each must be below collective_timeout_s (validated), so a hang ends in the
    # watchdog's stack dump, HANG marker and requeue rather than in NCCL aborting every rank first.
    hang_timeout_s: float = 600.0
    startup_timeout_s: float = 1800.0
    checkpoint_timeout_s: float = 1800.0
    straggler_ratio: float = 1.5
    nan_rollback_after: int = 3
    collective_timeout_s: float = 2400.0
    max_requeues: int = 20
    # Fault drills: make the loss non-finite on these steps (each once, so a rollback does not re-trigger it).
    inject_nan_steps: tuple[int, ...] = ()
    # Fault drill: rank 0 is killed (SIGKILL) while writing the checkpoint of this step, after every shard is
    # on disk and before the completion marker (a relaunch must skip it and resume the one before).
    inject_kill_in_checkpoint: Optional[int] = None


@dataclass(frozen=True)
class EvalConfig:
    every: int = 0  # 0: never during training
    knn_k: int = 20
    knn_temperature: float = 0.07
    datasets: tuple[str, ...] = ("digits",)


@dataclass(frozen=True)
class HardwareConfig:
    """What the planner plans against: one rank's device. radio-launch fills it from the cluster file."""

    gpu_memory_gb: float = 80.0  # memory limit per rank
    gpu_tflops: Optional[float] = None  # bf16 dense peak per rank; None: the planner's H100 figure (989)
    # bandwidth one rank all-gathers sharded teacher weights at (GB/s; NVLink within a node is ~ 300-450,
    # InfiniBand NDR across nodes ~ 50); the planner counts sharded teachers' communication with it
    interconnect_gbps: float = 50.0
    # ranks per node (the cluster file's tasks_per_node): hybrid student sharding shards within node-aligned
    # blocks of this many ranks (parallel.shard_group_size overrides it)
    ranks_per_node: int = 8


@dataclass(frozen=True)
class ParallelConfig:
    """How the student (with its heads and the balancer) is sharded.

    world: FSDP2 over every rank (least memory; every rank all-gathers every block together, so teacher groups
    wait for each other once per block). hybrid: FSDP2 within node-aligned shard groups, replicated across them
    (HSDP on a 2-D mesh): each teacher group owns whole shard groups, so groups meet only at the gradient
    all-reduce. auto: the planner picks the one with the higher utilisation that fits memory.
    """

    student_sharding: Literal["auto", "world", "hybrid"] = "auto"
    shard_group_size: int = 0  # ranks per shard group under hybrid; 0: hardware.ranks_per_node


@dataclass(frozen=True)
class DeepSpeedConfig:
    """The DeepSpeed backend (distributed_backend: deepspeed): ZeRO stage, offload, extra DeepSpeed config."""

    zero_stage: int = 2  # 1: optimizer states sharded; 2: + gradients; 3: + parameters
    offload_optimizer: Literal["none", "cpu"] = "none"  # ZeRO-Offload of optimizer states and step (stages 1-3)
    offload_param: Literal["none", "cpu"] = "none"  # ZeRO-Infinity parameter offload (stage 3 only)
    config: dict = field(default_factory=dict)  # merged over the generated DeepSpeed config (advanced keys)


@dataclass(frozen=True)
class RunConfig:
    """The whole resolved run."""

    name: str
    student: StudentConfig
    teachers: tuple[TeacherConfig, ...]
    stages: tuple[StageConfig, ...]
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    tracking: TrackingConfig = TrackingConfig()
    monitor: MonitorConfig = MonitorConfig()
    eval: EvalConfig = EvalConfig()
    hardware: HardwareConfig = HardwareConfig()
    parallel: ParallelConfig = ParallelConfig()
    seed: int = 0
    run_dir: Optional[str] = None  # None: runs/<name>
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    distributed_backend: Literal["fsdp2", "deepspeed"] = "fsdp2"
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()

    def teacher(self, name: str) -> TeacherConfig:
        """The teacher config called `name`."""
        for t in self.teachers:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)
