"""`parallelflow finetune`: LoRA (default) or full fine-tuning of a PFlow checkpoint on a local text file.

Data: a plain text file (one document), or JSONL with one object per line, either `{"text": ...}`
(documents, packed into blocks of --seq-len tokens) or `{"prompt": ..., "completion": ...}` (one padded
example per line, loss on the completion only). The last --eval-fraction of the blocks/examples is held out
for the evaluation loss unless --eval-file is given.

Arguments: `finetune_cli.py`. Output (--output-dir, written atomically at the end): the adapter
(adapter_config.json, adapter_model.safetensors) or, with --full, the whole model with its code files; the
tokenizer; `parallelflow_meta.json` (base model, data, hyperparameters, eval loss: the model card reads it);
`loss.png`. Trainer checkpoints go to --checkpoint-dir (default: OUTPUT_DIR-checkpoints) every
--save-steps steps and at the end; `--resume` continues from the newest complete one there (or a given
path).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainingArguments, set_seed
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .errors import require
from .hub import write_meta
from .loading import load_causal_lm
from .loading import load_tokenizer as load_any_tokenizer
from .training import LossPlotCallback, TokenBlockDataset, atomic_dir, concat_token_ids

TEXT, PROMPT_COMPLETION = "text", "prompt_completion"


# ----- data ------------------------------------------------------------------------------------------------


def read_records(path: str | Path) -> tuple[str, list]:
    """(kind, records) of a data file: TEXT with a list of documents, or PROMPT_COMPLETION with a list of
    (prompt, completion) pairs. `.jsonl` files hold one JSON object per line; any other file is one
    text document."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {str(path)!r} does not exist")
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"data file {str(path)!r} is not UTF-8 text ({err.reason} at byte {err.start}); convert it first"
        ) from None
    if path.suffix != ".jsonl":
        if not content.strip():
            raise ValueError(f"data file {str(path)!r} is empty")
        return TEXT, [content]
    kinds, records = set(), []
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not valid JSON ({err})") from None
        if isinstance(obj, dict) and isinstance(obj.get("text"), str):
            kinds.add(TEXT)
            records.append(obj["text"])
        elif (
            isinstance(obj, dict)
            and isinstance(obj.get("prompt"), str)
            and isinstance(obj.get("completion"), str)
        ):
            kinds.add(PROMPT_COMPLETION)
            records.append((obj["prompt"], obj["completion"]))
        else:
            raise ValueError(
                f'{path}:{number}: expected {{"text": str}} or {{"prompt": str, "completion": str}}, '
                f"got {line[:80]!r}"
            )
    if not records:
        raise ValueError(f"data file {str(path)!r} has no records")
    if len(kinds) > 1:
        raise ValueError(f"{path} mixes text and prompt/completion records; use one kind per file")
    return kinds.pop(), records


class PromptCompletionDataset(torch.utils.data.Dataset):
    """One example per (prompt, completion): ids = prompt + completion + eos cut to `seq_len`, labels -100
    on the prompt. Examples whose completion is cut off entirely are dropped (`dropped` counts them)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]], seq_len: int):
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer has no eos_token_id to end completions")
        self.examples: list[tuple[list[int], list[int]]] = []
        prompts = tokenizer([p for p, _ in pairs], add_special_tokens=False, verbose=False)["input_ids"]
        completions = tokenizer([c for _, c in pairs], add_special_tokens=False, verbose=False)["input_ids"]
        for prompt, completion in zip(prompts, completions, strict=True):
            ids = (prompt + completion + [tokenizer.eos_token_id])[:seq_len]
            if len(ids) > len(prompt):
                self.examples.append((ids, [-100] * len(prompt) + ids[len(prompt) :]))
        self.dropped = len(pairs) - len(self.examples)
        if not self.examples:
            raise ValueError(f"every prompt fills --seq-len={seq_len} tokens: no completion token is left")

    @property
    def num_tokens(self) -> int:
        return sum(len(ids) for ids, _ in self.examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        ids, labels = self.examples[index]
        return {"input_ids": ids, "labels": labels}


def pad_collator(pad_token_id: int):
    """Right-pad a batch of PromptCompletionDataset items: input_ids, labels (-100), attention_mask [B, T]."""

    def collate(items: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        length = max(len(item["input_ids"]) for item in items)
        batch = {"input_ids": [], "labels": [], "attention_mask": []}
        for item in items:
            pad = length - len(item["input_ids"])
            batch["input_ids"].append(item["input_ids"] + [pad_token_id] * pad)
            batch["labels"].append(item["labels"] + [-100] * pad)
            batch["attention_mask"].append([1] * len(item["input_ids"]) + [0] * pad)
        return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}

    return collate


def _held_out_count(total: int, fraction: float, what: str) -> int:
    count = math.ceil(total * fraction)
    if count >= total:
        raise ValueError(f"--eval-fraction={fraction} leaves no training {what} out of {total}; lower it")
    return count


def build_datasets(
    tokenizer: PreTrainedTokenizerBase,
    data: str | Path,
    seq_len: int,
    *,
    eval_fraction: float = 0.1,
    eval_data: str | Path | None = None,
) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset | None, dict]:
    """(train, eval or None, data summary for the metadata). Text is packed into TokenBlockDataset blocks;
    without `eval_data` the last `eval_fraction` of the blocks (or examples) is held out."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"--eval-fraction must be in [0, 1), got {eval_fraction}")
    kind, records = read_records(data)
    if kind == TEXT:
        ids = concat_token_ids(tokenizer, records)
        num_blocks = ids.numel() // seq_len
        held_out = 0 if eval_data is not None else _held_out_count(num_blocks, eval_fraction, "blocks")
        train = TokenBlockDataset(ids[: (num_blocks - held_out) * seq_len], seq_len)
        evaluation = (
            TokenBlockDataset(ids[(num_blocks - held_out) * seq_len :], seq_len) if held_out else None
        )
    else:
        held_out = 0 if eval_data is not None else _held_out_count(len(records), eval_fraction, "examples")
        train = PromptCompletionDataset(tokenizer, records[: len(records) - held_out], seq_len)
        evaluation = (
            PromptCompletionDataset(tokenizer, records[len(records) - held_out :], seq_len)
            if held_out
            else None
        )
    if eval_data is not None:
        eval_kind, _ = read_records(eval_data)
        if eval_kind != kind:
            raise ValueError(f"--eval-file holds {eval_kind} records but the data file holds {kind} records")
        evaluation, _, _ = build_datasets(tokenizer, eval_data, seq_len, eval_fraction=0.0)
    summary = {
        "path": str(Path(data).resolve()),
        "format": kind,
        "records": len(records),
        "train_tokens": train.num_tokens,
        "eval_tokens": evaluation.num_tokens if evaluation is not None else 0,
        "eval_source": str(Path(eval_data).resolve()) if eval_data is not None else f"last {eval_fraction:g}",
    }
    return train, evaluation, summary


# ----- model -----------------------------------------------------------------------------------------------


def load_model(
    base: str,
    *,
    full: bool = False,
    lora_r: int = 16,
    lora_alpha: float = 32.0,
    lora_dropout: float = 0.0,
    target_modules: list[str] | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """The base causal LM in float32 (mixed precision is the Trainer's job), loaded strictly, wrapped in a
    LoRA PeftModel unless `full`. `target_modules=None` takes the "parallelflow" defaults."""
    peft = None if full else require("peft", "LoRA fine-tuning (or pass --full)")
    model = load_causal_lm(base, trust_remote_code=trust_remote_code, dtype=torch.float32)
    if full:
        return model
    config = peft.LoraConfig(
        task_type="CAUSAL_LM",
        r=lora_r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=target_modules,
    )
    return peft.get_peft_model(model, config)


def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    tokenizer = load_any_tokenizer(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ----- training --------------------------------------------------------------------------------------------


class ResumableLossPlot(LossPlotCallback):
    """LossPlotCallback that, on resume, first replays the logs restored from the checkpoint."""

    def on_train_begin(self, args, state, control, **kwargs):
        for logs in state.log_history:
            step_state = SimpleNamespace(global_step=logs.get("step", 0))
            super().on_log(args, step_state, control, logs={k: v for k, v in logs.items() if k != "step"})


def resolve_precision(precision: str) -> str:
    """ "auto" -> "bf16" on a CUDA GPU that supports it, else "fp32"; "bf16" needs such a GPU."""
    gpu_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if precision == "auto":
        return "bf16" if gpu_bf16 else "fp32"
    if precision == "bf16" and not gpu_bf16:
        raise ValueError("--precision bf16 needs a CUDA GPU with bf16 support; use fp32 on this machine")
    return precision


def is_complete_checkpoint(path: Path) -> bool:
    """A Trainer checkpoint folder a run can resume from: its trainer state and its weights (or adapter)."""
    weights = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")
    return (path / TRAINER_STATE_NAME).is_file() and any((path / name).is_file() for name in weights)


def newest_complete_checkpoint(folder: Path) -> Path | None:
    """The complete checkpoint-N in `folder` with the largest N; None when there is none."""
    steps = {}
    for path in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if folder.is_dir() else ():
        suffix = path.name.removeprefix(f"{PREFIX_CHECKPOINT_DIR}-")
        if suffix.isdigit() and is_complete_checkpoint(path):
            steps[int(suffix)] = path
    return steps[max(steps)] if steps else None


def resolve_resume(resume: str | None, checkpoint_dir: Path) -> str | None:
    """`--resume` alone ("latest") -> the newest complete checkpoint-N in `checkpoint_dir`; a path -> itself
    or, when a crash left it without its trainer state or weights, the newest complete one next to it."""
    if resume is None:
        return None
    if resume != "latest":
        path = Path(resume)
        if not path.is_dir():
            raise ValueError(f"--resume checkpoint {resume!r} does not exist")
        if is_complete_checkpoint(path):
            return resume
        checkpoint_dir = path.parent
        print(
            f"--resume: {resume} is incomplete (no {TRAINER_STATE_NAME} or weights); "
            "taking the newest complete checkpoint next to it"
        )
    last = newest_complete_checkpoint(checkpoint_dir)
    if last is None:
        raise ValueError(f"--resume: no complete {PREFIX_CHECKPOINT_DIR}-N folder in {checkpoint_dir}")
    return str(last)


def training_arguments(args: argparse.Namespace, checkpoint_dir: Path, has_eval: bool) -> TrainingArguments:
    precision = resolve_precision(args.precision)
    return TrainingArguments(
        output_dir=str(checkpoint_dir),
        max_steps=args.max_steps if args.max_steps else -1,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.learning_rate,
        lr_scheduler_type=args.lr_scheduler,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        logging_steps=args.logging_steps,
        eval_strategy="steps" if has_eval and args.eval_steps else "no",
        eval_steps=args.eval_steps or None,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or None,
        save_total_limit=args.save_total_limit,
        bf16=precision == "bf16",
        gradient_checkpointing=args.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if args.gradient_checkpointing else None,
        report_to="none",
        seed=args.seed,
        dataloader_pin_memory=False,
    )


def _check_args(args: argparse.Namespace) -> None:
    for name in ("batch_size", "grad_accum", "lora_r", "logging_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("max_steps", "eval_steps", "save_steps", "warmup_steps"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.seq_len < 2:
        raise ValueError(f"--seq-len must be >= 2, got {args.seq_len}")
    if args.full and args.target_modules:
        raise ValueError("--target-modules is a LoRA option; it cannot be combined with --full")
    if args.learning_rate is None:
        args.learning_rate = 2e-5 if args.full else 2e-4


def run_finetune(args: argparse.Namespace) -> int:
    """Fine-tuning with `finetune_cli.add_arguments`' arguments; 0 on success, 2 when --output-dir exists."""
    _check_args(args)
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not args.overwrite:
        print(
            f"parallelflow finetune: {output_dir} exists; pass --overwrite or another --output-dir",
            file=sys.stderr,
        )
        return 2
    checkpoint_dir = Path(args.checkpoint_dir or f"{output_dir}-checkpoints")
    resume = resolve_resume(args.resume, checkpoint_dir)
    base = str(Path(args.base).resolve()) if Path(args.base).is_dir() else args.base
    set_seed(args.seed)

    tokenizer = load_tokenizer(args.tokenizer or base, trust_remote_code=args.trust_remote_code)
    train, evaluation, data_summary = build_datasets(
        tokenizer, args.data, args.seq_len, eval_fraction=args.eval_fraction, eval_data=args.eval_file
    )
    print(
        f"data: {data_summary['format']} from {args.data}: {data_summary['train_tokens']:,} train / "
        f"{data_summary['eval_tokens']:,} eval tokens"
    )
    model = load_model(
        base,
        full=args.full,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=args.target_modules,
        trust_remote_code=args.trust_remote_code,
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    kind = "full" if args.full else "LoRA"
    print(f"model: {model.num_parameters():,} parameters, {trainable:,} trainable ({kind})")

    plot = ResumableLossPlot(checkpoint_dir / "loss.png", title=f"fine-tuning {Path(args.base).name}")
    collator = pad_collator(tokenizer.pad_token_id) if data_summary["format"] == PROMPT_COMPLETION else None
    trainer = Trainer(
        model=model,
        args=training_arguments(args, checkpoint_dir, evaluation is not None),
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=collator,
        callbacks=[plot],
    )
    eval_before = trainer.evaluate()["eval_loss"] if evaluation is not None and resume is None else None
    result = trainer.train(resume_from_checkpoint=resume)
    eval_after = trainer.evaluate()["eval_loss"] if evaluation is not None else None
    if eval_after is not None:
        before = f"{eval_before:.4f} -> " if eval_before is not None else ""
        print(f"eval loss: {before}{eval_after:.4f} nats/token")

    meta = {
        "kind": "full" if args.full else "lora",
        "base_model": base,
        "training_data": data_summary,
        "training": {
            "steps": trainer.state.global_step,
            "train_loss": result.training_loss,
            "seq_len": args.seq_len,
            "batch_size": args.batch_size * args.grad_accum,
            "learning_rate": args.learning_rate,
            "precision": resolve_precision(args.precision),
            "seed": args.seed,
            **({} if args.full else {"lora": _lora_summary(model)}),
        },
        "eval": {"eval_loss": eval_after, "eval_loss_before": eval_before} if eval_after is not None else {},
    }
    model.config.use_cache = True  # Trainer switches it off for training; saved models decode with the cache
    # Every rank takes part in gathering the weights (FSDP shards them); rank 0 alone writes the folder.
    state_dict = trainer.accelerator.get_state_dict(trainer.model)
    if trainer.is_world_process_zero():
        with atomic_dir(output_dir, overwrite=args.overwrite) as staging:
            trainer.accelerator.unwrap_model(trainer.model).save_pretrained(staging, state_dict=state_dict)
            tokenizer.save_pretrained(staging)
            write_meta(staging, meta)
            plot.save(staging / "loss.png")
    trainer.accelerator.wait_for_everyone()
    print(f"saved {'model' if args.full else 'adapter'} to {output_dir}/ (checkpoints in {checkpoint_dir}/)")
    return 0


def _lora_summary(model) -> dict:
    config = model.peft_config["default"]
    return {
        "r": config.r,
        "alpha": config.lora_alpha,
        "dropout": config.lora_dropout,
        "target_modules": sorted(config.target_modules),
    }
