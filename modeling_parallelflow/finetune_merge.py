"""`parallelflow merge BASE ADAPTER DST`: fold a LoRA adapter into its base model, as a standalone checkpoint.

DST gets the merged weights, the modeling code files (loadable with `trust_remote_code=True` without this
package), the tokenizer (the adapter's if it has one, else the base's) and `parallelflow_meta.json` (the
adapter's run metadata with kind "merged"). DST is written atomically.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .hub import read_meta, write_meta
from .training import atomic_dir


def merge_adapter(base: str | Path, adapter: str | Path) -> PreTrainedModel:
    """The base model (float32) with the LoRA adapter in `adapter` merged into its weights."""
    try:
        from peft import PeftModel
    except ImportError as err:
        raise ImportError("merging adapters needs peft: pip install 'parallelflow[peft]'") from err
    if not (Path(adapter) / "adapter_config.json").is_file():
        raise ValueError(f"ADAPTER {str(adapter)!r} has no adapter_config.json")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter).merge_and_unload()


def merge_to_dir(base: str | Path, adapter: str | Path, dst: str | Path, *, overwrite: bool = False) -> Path:
    """Merge `adapter` into `base` and save the standalone checkpoint to `dst` (atomically)."""
    merged = merge_adapter(base, adapter)
    tokenizer_source = adapter if (Path(adapter) / "tokenizer_config.json").is_file() else base
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    meta = read_meta(adapter)
    meta.update(kind="merged", adapter=str(Path(adapter).resolve()))
    meta.setdefault("base_model", str(Path(base).resolve()) if Path(base).is_dir() else str(base))
    with atomic_dir(dst, overwrite=overwrite) as staging:
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        write_meta(staging, meta)
    return Path(dst)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base", help="base checkpoint the adapter was trained on (folder or repo id)")
    parser.add_argument("adapter", help="adapter folder (from `parallelflow finetune`)")
    parser.add_argument("dst", help="output folder for the merged checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")


def run(args: argparse.Namespace) -> int:
    if Path(args.dst).exists() and not args.overwrite:
        print(f"parallelflow merge: {args.dst} exists; pass --overwrite or another DST", file=sys.stderr)
        return 2
    merge_to_dir(args.base, args.adapter, args.dst, overwrite=args.overwrite)
    print(f"merged {args.adapter} into {args.base} -> {args.dst}/")
    return 0
