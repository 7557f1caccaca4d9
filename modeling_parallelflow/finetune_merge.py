"""`parallelflow merge BASE ADAPTER DST`: fold a LoRA adapter into its base model, as a standalone checkpoint.

Before anything is written the adapter is checked against the base: its tensors must be exactly the ones
its LoRA config makes on this base, with the same shapes, and its tokenizer (when it has one) must be the
base's and fit the base's vocabulary. DST gets the merged weights, the modeling code files (loadable with
`trust_remote_code=True` without this package), the tokenizer (the adapter's if it has one, else the base's)
and `parallelflow_meta.json` (the adapter's run metadata with kind "merged"). DST is written atomically.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import CheckpointError, require
from .hub import read_meta, write_meta
from .loading import add_trust_remote_code_argument

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _shapes(tensors: dict) -> dict[str, tuple[int, ...]]:
    return {key: tuple(tensor.shape) for key, tensor in tensors.items()}


def check_adapter_weights(adapter: Path, expected: dict[str, tuple[int, ...]], saved: dict) -> None:
    """CheckpointError naming every adapter tensor that is missing, unexpected or wrongly shaped."""
    saved_shapes = _shapes(saved)
    problems = []
    if missing := sorted(expected.keys() - saved_shapes.keys()):
        problems.append(f"missing {', '.join(missing[:10])}")
    if unexpected := sorted(saved_shapes.keys() - expected.keys()):
        problems.append(f"unexpected {', '.join(unexpected[:10])}")
    wrong = [
        f"{key} {saved_shapes[key]} (base needs {shape})"
        for key, shape in sorted(expected.items())
        if key in saved_shapes and saved_shapes[key] != shape
    ]
    if wrong:
        problems.append(f"wrongly shaped {', '.join(wrong[:10])}")
    if problems:
        raise CheckpointError(f"adapter {adapter} does not fit this base: " + "; ".join(problems))


def check_tokenizers(adapter_tokenizer, base_tokenizer, vocab_size: int, adapter: Path) -> None:
    """The adapter's tokenizer must fit the base's embedding rows and equal the base's own tokenizer."""
    if len(adapter_tokenizer) > vocab_size:
        raise CheckpointError(
            f"adapter {adapter} has a tokenizer of {len(adapter_tokenizer)} tokens but the base model's "
            f"vocabulary has {vocab_size} rows: it was trained on another base"
        )
    if base_tokenizer is not None and adapter_tokenizer.get_vocab() != base_tokenizer.get_vocab():
        raise CheckpointError(
            f"adapter {adapter} has a different tokenizer from the base's ({len(adapter_tokenizer)} vs "
            f"{len(base_tokenizer)} tokens): it was trained on another base"
        )


def merge_adapter(base: str | Path, adapter: str | Path, *, trust_remote_code: bool = False):
    """The base model (float32) with the LoRA adapter in `adapter` merged into its weights, after checking
    the adapter's tensors against the LoRA layers its config makes on this base."""
    import torch
    from safetensors.torch import load_file

    from .loading import check_source, load_causal_lm

    peft = require("peft", "merging LoRA adapters")
    check_source(base)
    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise CheckpointError(f"ADAPTER {str(adapter)!r} has no adapter_config.json")
    if not (adapter / ADAPTER_WEIGHTS).is_file():
        raise CheckpointError(f"ADAPTER {str(adapter)!r} has no {ADAPTER_WEIGHTS}")
    try:
        saved = load_file(adapter / ADAPTER_WEIGHTS)
    except Exception as err:  # a truncated or foreign file: name it
        raise CheckpointError(f"cannot read {adapter / ADAPTER_WEIGHTS}: {err}") from err
    config = peft.PeftConfig.from_pretrained(adapter)
    if config.peft_type != peft.PeftType.LORA:
        raise CheckpointError(f"adapter {adapter} is {config.peft_type}, not LoRA")
    config.inference_mode = True
    model = load_causal_lm(base, trust_remote_code=trust_remote_code, dtype=torch.float32)
    try:
        lora = peft.get_peft_model(model, config)
    except ValueError as err:  # target modules absent from this base
        raise CheckpointError(f"adapter {adapter} does not fit this base: {err}") from None
    expected = _shapes(peft.get_peft_model_state_dict(lora))
    check_adapter_weights(adapter, expected, saved)
    peft.set_peft_model_state_dict(lora, saved)
    return lora.merge_and_unload()


def merge_to_dir(
    base: str | Path,
    adapter: str | Path,
    dst: str | Path,
    *,
    overwrite: bool = False,
    trust_remote_code: bool = False,
) -> Path:
    """Merge `adapter` into `base` and save the standalone checkpoint to `dst` (atomically)."""
    from .loading import load_tokenizer
    from .training import atomic_dir

    merged = merge_adapter(base, adapter, trust_remote_code=trust_remote_code)
    base_tokenizer = (
        load_tokenizer(base, trust_remote_code=trust_remote_code) if _has_tokenizer(base) else None
    )
    tokenizer = base_tokenizer
    if _has_tokenizer(adapter):
        tokenizer = load_tokenizer(adapter)
        check_tokenizers(tokenizer, base_tokenizer, merged.config.vocab_size, Path(adapter))
    if tokenizer is None:
        raise CheckpointError(f"neither {adapter} nor {base} holds a tokenizer")
    meta = read_meta(adapter)
    meta.update(kind="merged", adapter=str(Path(adapter).resolve()))
    meta.setdefault("base_model", str(Path(base).resolve()) if Path(base).is_dir() else str(base))
    with atomic_dir(dst, overwrite=overwrite) as staging:
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        write_meta(staging, meta)
    return Path(dst)


def _has_tokenizer(path: str | Path) -> bool:
    """A local folder with tokenizer files, or a Hub id (whose tokenizer is looked up there)."""
    path = Path(path)
    return (path / "tokenizer_config.json").is_file() or not path.exists()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("base", help="base checkpoint the adapter was trained on (folder or repo id)")
    parser.add_argument("adapter", help="adapter folder (from `parallelflow finetune`)")
    parser.add_argument("dst", help="output folder for the merged checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    add_trust_remote_code_argument(parser, "BASE")


def run(args: argparse.Namespace) -> int:
    if Path(args.dst).exists() and not args.overwrite:
        print(f"parallelflow merge: {args.dst} exists; pass --overwrite or another DST", file=sys.stderr)
        return 2
    merge_to_dir(
        args.base, args.adapter, args.dst, overwrite=args.overwrite, trust_remote_code=args.trust_remote_code
    )
    print(f"merged {args.adapter} into {args.base} -> {args.dst}/")
    return 0
