"""The experiment schema. Each section belongs to one module and rejects
unknown keys; `load_config(path, overrides)` reads YAML and applies
`--set a.b=value` overrides (values parsed as YAML scalars)."""
from __future__ import annotations

import dataclasses
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml

from .model import ModelConfig
from .model_section import DEFAULT_MODEL, create_kwargs, finetune_changes, model_section, resolve_model
from .routing import RoutingConfig, check_group_size
from .typed import ConfigError, from_dict, to_dict


@dataclass
class ModelSection:
    """The model: `name`, a catalogue name (`vmoe models`) or a paper
    description to start from, and `changes` to it written in
    `ModelConfig`'s own shape. In a file the changes stand beside the name:

        model:
          name: vmoe_mi4_every1_e8_k2
          patch_size: 8                  # a ModelConfig field
          moe:
            group_size: 800              # a MoeConfig field
            routing: {capacity_factor: 1.05, batch_priority: true}   # RoutingConfig

    Each value reaches the model through one path (`resolve`): the
    catalogue's override rules (`config.catalogue.override_config`), then
    the typed loader and `ModelConfig.validate`, which check it once. With
    finetune.init the architecture is the checkpoint's, and the changes may
    set only routing (`moe.routing`), `moe.group_size` and `head_bias_init`.
    """

    name: str = DEFAULT_MODEL
    changes: dict[str, Any] = field(default_factory=dict)

    def resolve(self, image_size: Optional[int] = None, num_classes: Optional[int] = None) -> ModelConfig:
        """The ModelConfig of a fresh model at `image_size` with `num_classes`
        (each None: the catalogue entry's)."""
        return resolve_model(self.name, self.changes, image_size, num_classes)

    def create_kwargs(self) -> dict[str, Any]:
        """The changes as `create_model` keywords (every section named)."""
        return create_kwargs(self.changes)

    def finetune_changes(self) -> tuple[dict[str, Any], Optional[float]]:
        """(routing changes incl. group_size for `set_routing`, head_bias_init)
        of a fine-tuning run; anything else is refused."""
        return finetune_changes(self.changes)


@dataclass
class DataConfig:
    """`name`: "digits" (bundled cluttered digits), "imagefolder", "cifar10",
    "cifar100" or "hf" (Hugging Face datasets from local disk).
    `path`: the dataset directory (not used by "digits")."""

    name: Literal["digits", "imagefolder", "cifar10", "cifar100", "hf"] = "digits"
    path: Optional[str] = None
    image_size: int = 32
    batch_size: int = 64
    eval_batch_size: int = 128
    num_workers: int = 0
    randaugment: Optional[tuple[int, int]] = None     # (num_ops, magnitude)
    mixup_alpha: float = 0.0
    hflip: bool = False
    seed: int = 0
    # digits only: renders per training / test source digit and canvas options.
    train_renders: int = 6
    test_renders: int = 5
    clutter: int = 3
    test_fraction: float = 0.3
    # hf only: split names and column names.
    train_split: str = "train"
    test_split: str = "test"
    image_key: str = "image"
    label_key: str = "label"


@dataclass
class OptimConfig:
    """Adam/AdamW (decoupled weight decay on kernels only) or SGD+momentum."""

    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3
    b1: float = 0.9
    b2: float = 0.999
    momentum: float = 0.9
    weight_decay: float = 0.1
    grad_clip_norm: Optional[float] = 1.0


@dataclass
class ScheduleConfig:
    """Linear warm-up, then linear decay to `end_lr` or cosine."""

    name: Literal["warmup_linear_decay", "warmup_cosine_decay", "constant"] = "warmup_linear_decay"
    warmup_steps: int = 100
    end_lr: float = 1e-5


@dataclass
class TrainConfig:
    steps: int = 1000
    loss: Literal["softmax_xent", "sigmoid_xent"] = "softmax_xent"
    grad_accum: int = 1
    bf16: bool = False
    seed: int = 0
    threads: Optional[int] = None
    device: str = "auto"          # "auto" (cuda when available), "cpu", "cuda", "cuda:1", ...
    expert_parallel: bool = False  # under torchrun: shard experts over the ranks (else data parallel)
    fsdp: bool = False             # under torchrun: FSDP2 over all ranks (+ expert parallelism, see expert_shards)
    expert_shards: Optional[int] = None  # with fsdp: ranks per expert group P (None: W with expert_parallel, else 1)
    compile: bool = False          # torch.compile(dynamic=True, fullgraph=True) of the training forward
    compile_backend: str = "inductor"  # torch.compile backend ("aot_eager": capture only, for debugging)
    log_every: int = 10
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    eval_every: int = 0
    progress: bool = True


@dataclass
class EvalConfig:
    """Evaluation capacity (the reference evaluates at 4.0) and the routing grid."""

    capacity_factor: Optional[float] = 4.0
    grid_capacity_factors: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)
    grid_num_selected_experts: tuple[int, ...] = ()      # empty: trained K and 1
    grid_batch_priority: tuple[bool, ...] = (False, True)


@dataclass
class FewshotConfig:
    shots: tuple[int, ...] = (1, 5, 10, 25)
    seeds: int = 3
    l2_grid: tuple[float, ...] = (2.0 ** -10, 2.0 ** -6, 2.0 ** -2, 1.0, 4.0, 16.0, 64.0, 256.0, 1024.0)


@dataclass
class FinetuneConfig:
    """Start from a checkpoint: a training work dir or a from_pretrained dir."""

    init: Optional[str] = None
    new_head: bool = True
    keep_representation: bool = True
    freeze: tuple[str, ...] = ()         # parameter-name prefixes to freeze


@dataclass
class ExperimentConfig:
    description: str = ""
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    fewshot: FewshotConfig = field(default_factory=FewshotConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"Override {key!r}: {p!r} is not a section.")
    node[parts[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Applies ["optim.lr=1e-3", "model.moe.num_experts=4"]."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"Override {item!r} must look like section.key=value.")
        key, raw = item.split("=", 1)
        _set_dotted(data, key.strip(), yaml.safe_load(raw))
    return data


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> ExperimentConfig:
    """Reads a YAML config (or the defaults) and applies dotted overrides.
    Unknown keys anywhere raise ValueError naming them."""
    data: dict[str, Any] = {}
    if path is not None:
        with open(path) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{path!r} is not valid YAML: {e}") from e
        if not data:
            warnings.warn(f"{path!r} is empty: every setting is a default of vmoe_torch.config.experiment "
                          f"(model {DEFAULT_MODEL} on the bundled digits, {TrainConfig.steps} steps).")
        if not isinstance(data, dict):
            raise ConfigError(f"{path!r} must hold a YAML mapping.")
    data = apply_overrides(data, overrides or [])
    try:
        model = model_section(data.pop("model", None))
    except ValueError as e:
        raise ConfigError(str(e)) from e
    cfg = from_dict(ExperimentConfig, data)
    cfg.model = ModelSection(*model)
    validate(cfg)
    return cfg


def validate(cfg: ExperimentConfig) -> None:
    """Checks that need no data, including the model the config describes;
    raises ConfigError naming the problem, before anything is built."""
    checks = [
        (cfg.train.steps >= 1, f"train.steps must be >= 1, got {cfg.train.steps}."),
        (cfg.train.grad_accum >= 1, f"train.grad_accum must be >= 1, got {cfg.train.grad_accum}."),
        (cfg.data.batch_size >= 1 and cfg.data.batch_size % max(cfg.train.grad_accum, 1) == 0,
         f"data.batch_size={cfg.data.batch_size} must be a positive multiple of "
         f"train.grad_accum={cfg.train.grad_accum}."),
        (cfg.data.eval_batch_size >= 1, f"data.eval_batch_size must be >= 1, got {cfg.data.eval_batch_size}."),
        (cfg.data.image_size >= 1, f"data.image_size must be >= 1, got {cfg.data.image_size}."),
        (cfg.optim.lr > 0, f"optim.lr must be > 0, got {cfg.optim.lr}."),
        (cfg.optim.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {cfg.optim.weight_decay}."),
        (cfg.schedule.warmup_steps >= 0, "schedule.warmup_steps must be >= 0."),
        (cfg.train.log_every >= 1 and cfg.train.checkpoint_every >= 1,
         "train.log_every and train.checkpoint_every must be >= 1."),
        (cfg.train.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1."),
        (cfg.data.mixup_alpha >= 0, "data.mixup_alpha must be >= 0."),
        (cfg.data.name == "digits" or bool(cfg.data.path),
         f"data.path is required for data.name={cfg.data.name!r}."),
        (cfg.train.expert_shards is None or cfg.train.fsdp,
         "train.expert_shards applies with train.fsdp=true only."),
        (cfg.data.randaugment is None or (cfg.data.randaugment[0] >= 0 and 0 <= cfg.data.randaugment[1] <= 30),
         f"data.randaugment is [num_ops >= 0, magnitude in 0..30] (RandAugment's 31 magnitude bins), "
         f"got {cfg.data.randaugment}."),
        (0 <= cfg.optim.b1 < 1 and 0 <= cfg.optim.b2 < 1, "optim.b1 and optim.b2 must be in [0, 1)."),
        (cfg.optim.grad_clip_norm is None or cfg.optim.grad_clip_norm > 0,
         "optim.grad_clip_norm must be > 0, or null for no clipping."),
        (cfg.schedule.end_lr >= 0, "schedule.end_lr must be >= 0."),
        (cfg.eval.capacity_factor is None or cfg.eval.capacity_factor > 0,
         f"eval.capacity_factor must be > 0 (or null: as trained), got {cfg.eval.capacity_factor}."),
        (all(c > 0 for c in cfg.eval.grid_capacity_factors),
         f"eval.grid_capacity_factors must all be > 0, got {list(cfg.eval.grid_capacity_factors)}."),
        (all(k >= 1 for k in cfg.eval.grid_num_selected_experts),
         "eval.grid_num_selected_experts must all be >= 1."),
        (all(n >= 1 for n in cfg.fewshot.shots) and cfg.fewshot.seeds >= 1 and all(x > 0 for x in cfg.fewshot.l2_grid),
         "fewshot.shots and fewshot.seeds must be >= 1 and fewshot.l2_grid > 0."),
    ]
    if cfg.finetune.init is not None and not os.path.exists(cfg.finetune.init):
        raise ConfigError(f"finetune.init {cfg.finetune.init!r} does not exist: give a training work dir or a "
                          "from_pretrained directory.")
    nonfinite = _nonfinite_numbers(cfg)
    if nonfinite:
        raise ConfigError(f"{nonfinite[0]} must be a finite number (not inf or nan).")
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    _validate_model(cfg)


def _nonfinite_numbers(cfg: ExperimentConfig) -> list[str]:
    """The dotted names of every inf / nan setting outside the model section
    (whose own validation rejects them where each is defined)."""
    found = []
    for section in dataclasses.fields(cfg):
        value = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(value) or section.name == "model":
            continue
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            items = v if isinstance(v, tuple) else (v,)
            if any(isinstance(x, float) and not math.isfinite(x) for x in items):
                found.append(f"{section.name}.{f.name}")
    return found


def _validate_model(cfg: ExperimentConfig) -> None:
    """The model section must build: a catalogue name or description with
    valid changes, or (fine-tuning) valid routing changes."""
    try:
        if cfg.finetune.init is None:
            cfg.model.resolve(image_size=cfg.data.image_size)
        else:
            routing, _ = cfg.model.finetune_changes()
            check_group_size(routing.pop("group_size", None))
            checked = RoutingConfig().updated(**routing)
            # E is the checkpoint's, unknown here: the K <= E check runs when it is loaded.
            k = checked.num_selected_experts
            checked.validate(k if isinstance(k, int) and k >= 1 else 1)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model (name {cfg.model.name!r}, changes {cfg.model.changes}): {e}") from e


def config_to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """The config as a file holds it (the model's changes beside its name)."""
    data = to_dict(cfg)
    data["model"] = {"name": cfg.model.name, **cfg.model.changes}
    return data

