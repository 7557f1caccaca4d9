"""Data parallelism for `parallelflow train`, built on torch.distributed: process setup from the launcher's
environment (torchrun or `accelerate launch`), FSDP2 or DDP wrapping with mixed precision and activation
checkpointing, and sharded checkpoints (torch.distributed.checkpoint) that export to `save_pretrained`
folders.

Strategies: "fsdp2" (`fully_shard` on every decoder layer, then on the root, which holds the embeddings,
final norm and lm_head, so tied embeddings stay in one group), "ddp" (DistributedDataParallel), "none" (one
process). Precisions: "fp32"; "bf16-mixed" (fp32 master weights and optimizer state, bf16 compute: FSDP2's
MixedPrecisionPolicy, fp32 gradient reduction; autocast under DDP and one process); "bf16" (bf16 weights and
optimizer state).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

STRATEGIES = ("fsdp2", "ddp", "none")
PRECISIONS = ("fp32", "bf16-mixed", "bf16")
CHECKPOINT_PREFIX = "step-"
TRAINER_STATE = "trainer_state.json"


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    launcher: str  # "single", "torchrun" or "accelerate"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def init_distributed(device: str | None = None) -> DistEnv:
    """Join the process group that torchrun / `accelerate launch` describe in RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR and MASTER_PORT (nccl on CUDA, gloo on CPU); without them, one process and no group.
    `device`: "cuda" or "cpu" (default: cuda when available)."""
    device_type = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type not in ("cuda", "cpu"):
        raise ValueError(f"device must be cuda or cpu, got {device_type!r}")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for but torch sees no CUDA GPU")
    launcher = "accelerate" if "ACCELERATE_MIXED_PRECISION" in os.environ else "torchrun"
    if "WORLD_SIZE" not in os.environ and not dist.is_initialized():
        return DistEnv(
            0, 1, 0, torch.device(device_type, 0) if device_type == "cuda" else torch.device("cpu"), "single"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device_type == "cuda" else "gloo", device_id=dev if device_type == "cuda" else None
        )
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, dev, launcher)


def resolve_strategy(requested: str | None, env: DistEnv) -> str:
    """The strategy asked for, else the accelerate config's (ACCELERATE_USE_FSDP: fsdp2, other multi-process
    configs: ddp), else fsdp2 for several processes and none for one."""
    if requested is None:
        if _env_flag("ACCELERATE_USE_FSDP"):
            version = os.environ.get("FSDP_VERSION", "1")
            if version != "2":
                raise ValueError(
                    f"the accelerate config asks for FSDP version {version}; set fsdp_version: 2"
                )
            requested = "fsdp2"
        elif env.world_size == 1:
            requested = "none"
        else:
            requested = "ddp" if env.launcher == "accelerate" else "fsdp2"
    if requested not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {requested!r}")
    if requested == "none" and env.world_size > 1:
        raise ValueError(f"strategy none runs one process, but {env.world_size} were launched")
    return requested


def resolve_precision(requested: str | None, env: DistEnv) -> str:
    """The precision asked for, else accelerate's mixed_precision (bf16 -> bf16-mixed, no -> fp32), else
    bf16-mixed on CUDA and fp32 on CPU."""
    if requested is None:
        mixed = os.environ.get("ACCELERATE_MIXED_PRECISION")
        if mixed is not None:
            if mixed not in ("bf16", "no"):
                raise ValueError(f"accelerate mixed_precision {mixed!r} is not supported: use bf16 or no")
            requested = "bf16-mixed" if mixed == "bf16" else "fp32"
        else:
            requested = "bf16-mixed" if env.device.type == "cuda" else "fp32"
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    return requested


def resolve_activation_checkpointing(requested: bool | None) -> bool:
    return _env_flag("FSDP_ACTIVATION_CHECKPOINTING") if requested is None else requested


def resolve_reshard_after_forward() -> bool:
    return os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").strip().lower() not in ("false", "0")


def wrap_model(
    model: nn.Module,
    env: DistEnv,
    strategy: str,
    precision: str,
    *,
    activation_checkpointing: bool = False,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Prepare a PFlowForCausalLM built identically on every rank (same seed) for training: dtype,
    activation checkpointing (per decoder layer, non-reentrant), then the strategy's wrapper on env.device."""
    if precision == "bf16":
        model.to(torch.bfloat16)
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    if strategy == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(env.device.type, (env.world_size,))
        policy = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if precision == "bf16-mixed"
            else MixedPrecisionPolicy()
        )
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
        # The root keeps its parameters gathered after forward: backward needs the lm_head first.
        fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
        return model
    model.to(env.device)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [env.device.index] if env.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    return model


def compute_context(strategy: str, precision: str, device: torch.device):
    """Autocast for bf16-mixed where no FSDP2 policy casts the weights; otherwise nothing."""
    if precision == "bf16-mixed" and strategy != "fsdp2":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def gradient_sync(model: nn.Module, strategy: str, sync: bool):
    """DDP skips its all-reduce on accumulation micro-steps; FSDP2 reduce-scatters every micro-step, which
    keeps gradients sharded (less memory, more communication)."""
    if strategy == "ddp" and not sync:
        return model.no_sync()
    return contextlib.nullcontext()


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm (over all shards) to `max_norm` (inf: measure only); returns the norm."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
        norm = norm.full_tensor()
    return float(norm)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(value, env: DistEnv):
    """`value` of rank 0 on every rank."""
    if env.world_size == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def _dcp(function, state: dict, path: Path) -> None:
    """dcp.save or dcp.load; without a process group it runs as one process, without DCP's warning."""
    no_dist = not dist.is_initialized()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        function(state, checkpoint_id=path, no_dist=no_dist)


def checkpoint_steps(checkpoint_root: str | os.PathLike) -> dict[int, Path]:
    """Complete checkpoints under `checkpoint_root` by step (a staging dir never matches)."""
    found = {}
    root = Path(checkpoint_root)
    for path in root.glob(f"{CHECKPOINT_PREFIX}*") if root.is_dir() else []:
        suffix = path.name[len(CHECKPOINT_PREFIX) :]
        if suffix.isdigit() and (path / ".metadata").is_file() and (path / TRAINER_STATE).is_file():
            found[int(suffix)] = path
    return found


def save_checkpoint(
    checkpoint_root: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    trainer_state: dict,
    env: DistEnv,
    keep: int = 0,
) -> Path:
    """Every rank writes its shards of model and optimizer into a staging dir; rank 0 adds config.json and
    trainer_state.json and renames it to CHECKPOINT_ROOT/step-N, then removes all but the newest `keep`
    (0: keep all). A crash leaves only a hidden staging dir, never a half checkpoint under a step name."""
    root = Path(checkpoint_root)
    target = root / f"{CHECKPOINT_PREFIX}{step:08d}"
    staging = broadcast_object(root / f".{target.name}.{uuid.uuid4().hex}.tmp", env)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd, "scheduler": scheduler.state_dict()}
    _dcp(dcp.save, state, staging)
    if env.is_main:
        unwrap(model).config.to_json_file(staging / "config.json")
        (staging / TRAINER_STATE).write_text(json.dumps({**trainer_state, "step": step}, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.rename(staging, target)
        if keep > 0:
            for path in [p for _, p in sorted(checkpoint_steps(root).items())][:-keep]:
                shutil.rmtree(path, ignore_errors=True)
    barrier()
    return target


def load_checkpoint(
    path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler
) -> dict:
    """Load a checkpoint written by `save_checkpoint` (by any number of ranks, any strategy) into the wrapped
    model, its optimizer and scheduler; returns its trainer state."""
    path = Path(path)
    if not (path / ".metadata").is_file() or not (path / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no .metadata or {TRAINER_STATE})")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd, "scheduler": scheduler.state_dict()}
    _dcp(dcp.load, state, path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    scheduler.load_state_dict(state["scheduler"])
    return json.loads((path / TRAINER_STATE).read_text())


def _model_on_meta(config):
    from .modeling_parallelflow import PFlowForCausalLM

    with torch.device("meta"):
        return PFlowForCausalLM(config)


def _save_pretrained(
    model: nn.Module, out_dir: str | os.PathLike, tokenizer=None, overwrite: bool = False
) -> Path:
    from .training import atomic_dir

    with atomic_dir(out_dir, overwrite=overwrite) as staging:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    return Path(out_dir)


def export_pretrained(
    model: nn.Module, env: DistEnv, out_dir: str | os.PathLike, tokenizer=None, overwrite: bool = False
) -> Path:
    """Gather the full weights of a wrapped model on rank 0 (on the CPU) and `save_pretrained` them, with
    the code files and `tokenizer`, atomically into `out_dir`. Every rank must call it."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if env.is_main:
        plain = _model_on_meta(unwrap(model).config)
        plain.load_state_dict(full, assign=True)
        plain.tie_weights()
        _save_pretrained(plain, out_dir, tokenizer, overwrite)
    barrier()
    return Path(out_dir)


def export_checkpoint(
    checkpoint: str | os.PathLike, out_dir: str | os.PathLike, tokenizer=None, overwrite: bool = False
) -> Path:
    """Turn a sharded checkpoint into a `save_pretrained` folder, in one process (no process group)."""
    from .configuration_parallelflow import PFlowConfig

    checkpoint = Path(checkpoint)
    if not (checkpoint / ".metadata").is_file() or not (checkpoint / "config.json").is_file():
        raise FileNotFoundError(
            f"{checkpoint} is not a checkpoint of `parallelflow train` (no .metadata or config.json)"
        )
    model = _model_on_meta(PFlowConfig.from_json_file(checkpoint / "config.json"))
    model.to_empty(device="cpu")
    model.tie_weights()
    state = {"model": model.state_dict()}
    _dcp(dcp.load, state, checkpoint)
    return _save_pretrained(model, out_dir, tokenizer, overwrite)
