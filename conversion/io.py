"""Reading and writing checkpoint folders in the `save_pretrained` layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from .keymap import ConversionError

# Copied verbatim from SRC to DST when present (tokenizer and generation settings).
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None or name == "auto":
        return None
    if name not in DTYPES:
        raise ConversionError(f"--dtype must be one of {['auto', *DTYPES]}, got {name!r}")
    return DTYPES[name]


def read_config(src: Path) -> dict:
    path = Path(src) / "config.json"
    if not Path(src).is_dir():
        raise ConversionError(f"source {src} is not a directory")
    if not path.is_file():
        raise ConversionError(f"source {src} has no config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConversionError(f"{path} is not valid JSON: {error}") from error


def _shard_files(src: Path, index_name: str) -> list[Path]:
    index = json.loads((src / index_name).read_text())
    files = sorted(set(index.get("weight_map", {}).values()))
    if not files:
        raise ConversionError(f"{src / index_name} lists no weight files")
    if missing := [name for name in files if not (src / name).is_file()]:
        raise ConversionError(f"{src / index_name} names shard files that do not exist: {missing}")
    return [src / name for name in files]


def load_state_dict(src: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (sharded) safetensors or legacy pytorch_model.bin checkpoint, on CPU."""
    src = Path(src)
    if (src / "model.safetensors.index.json").is_file():
        files, loader = _shard_files(src, "model.safetensors.index.json"), load_file
    elif (src / "model.safetensors").is_file():
        files, loader = [src / "model.safetensors"], load_file
    elif (src / "pytorch_model.bin.index.json").is_file():
        files, loader = _shard_files(src, "pytorch_model.bin.index.json"), _load_bin
    elif (src / "pytorch_model.bin").is_file():
        files, loader = [src / "pytorch_model.bin"], _load_bin
    else:
        raise ConversionError(
            f"source {src} has no weights (model.safetensors[.index.json] or pytorch_model.bin[.index.json])"
        )
    state_dict: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            part = loader(file)
        except Exception as error:  # a truncated or foreign file: name it
            raise ConversionError(f"cannot read weights from {file}: {error}") from error
        if overlap := set(part) & set(state_dict):
            raise ConversionError(f"{file} repeats keys of another shard: {sorted(overlap)[:10]}")
        state_dict.update(part)
    return state_dict


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def checkpoint_dtype(state_dict: dict[str, torch.Tensor]) -> torch.dtype:
    """The floating dtype most tensors of the checkpoint are stored in."""
    counts: dict[torch.dtype, int] = {}
    for tensor in state_dict.values():
        if tensor.is_floating_point():
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {key: t.to(dtype) if t.is_floating_point() else t for key, t in tensors.items()}


def copy_side_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in SIDE_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def save_pflow(config, tensors: dict[str, torch.Tensor], dst: Path, max_shard_size: str) -> None:
    """A PFlowForCausalLM with these weights, saved by `save_pretrained` (code files, auto_map, shards)."""
    from modeling_parallelflow import PFlowForCausalLM

    with torch.device("meta"):
        model = PFlowForCausalLM(config)
    result = model.load_state_dict(tensors, strict=False, assign=True)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(result.missing_keys) != tied or result.unexpected_keys:
        raise ConversionError(
            f"weights do not fit PFlowForCausalLM: missing {result.missing_keys}, "
            f"unexpected {result.unexpected_keys}"
        )
    model.tie_weights()
    model.save_pretrained(dst, max_shard_size=max_shard_size)


def save_raw(config: dict, tensors: dict[str, torch.Tensor], dst: Path, max_shard_size: str) -> None:
    """config.json and sharded safetensors for a model class not installed here (fla)."""
    from huggingface_hub import save_torch_state_dict

    (Path(dst) / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_torch_state_dict(tensors, dst, max_shard_size=max_shard_size, metadata={"format": "pt"})
