"""`parallelflow demo`: the project's main job end to end, offline, in about two minutes on a 2-core CPU.

Builds a byte-level BPE tokenizer from the Python standard library's source, trains a small PFlow model on
that text with `transformers.Trainer` for a fixed number of steps, saves model + tokenizer (atomically) with a
loss plot, reloads them through `AutoModelForCausalLM` / `AutoTokenizer` (the installed package serves the
checkpoint: no remote code), checks the reloaded logits equal the trained model's, and generates samples.
The run is sized by steps, never by the clock: the same arguments give the same result on any machine, only
slower on a slow one. Arguments: `demo_cli.py`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ProgressCallback,
    Trainer,
    TrainingArguments,
    set_seed,
)

from . import PFlowConfig, register
from .corpus import load_corpus
from .hub import write_meta
from .tokenizer import build_tokenizer
from .training import LossPlotCallback, ProgressBarCallback, TokenBlockDataset, atomic_dir

# A small pure-PFlow model (rank 2, sum mode); vocab and special ids come from the tokenizer.
DEMO_MODEL = dict(
    hidden_size=128,
    num_hidden_layers=2,
    num_heads=2,
    conv_size=4,
    intermediate_size=384,
    chunk_size=64,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
)
EVAL_BLOCKS = 32
GREEDY_REPETITION_PENALTY = 1.3


def _check_args(args: argparse.Namespace) -> None:
    for name in ("max_steps", "batch_size", "seq_len", "max_new_tokens", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.seq_len > DEMO_MODEL["max_position_embeddings"]:
        raise ValueError(f"--seq-len must be <= {DEMO_MODEL['max_position_embeddings']}, got {args.seq_len}")


def _probe(dataset: TokenBlockDataset, count: int) -> torch.utils.data.Subset:
    """`count` blocks spread evenly over `dataset`: a fixed sample to measure the loss on."""
    step = max(1, len(dataset) // count)
    return torch.utils.data.Subset(dataset, list(range(0, len(dataset), step))[:count])


def _losses(trainer: Trainer) -> dict[str, float]:
    """Loss on each probe of the trainer's eval_dataset dict, e.g. {"train": 7.6, "val": 7.6}."""
    metrics = trainer.evaluate()
    return {name: metrics[f"eval_{name}_loss"] for name in trainer.eval_dataset}


def _training_args(args: argparse.Namespace, output_dir: str) -> TrainingArguments:
    return TrainingArguments(
        output_dir=output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.max_steps // 10),
        weight_decay=0.01,
        adam_beta2=0.98,
        logging_steps=max(1, min(10, args.max_steps // 20)),
        logging_first_step=True,
        eval_strategy="steps",
        eval_steps=max(1, args.max_steps // 10),
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        dataloader_pin_memory=False,
    )


@torch.no_grad()
def _check_reload(model: PreTrainedModel, path: Path, sample: torch.Tensor) -> PreTrainedModel:
    """Reload `path` through the Auto classes; raise unless its logits on `sample` [1, T] equal `model`'s."""
    register()
    reloaded = AutoModelForCausalLM.from_pretrained(path).to(model.device).eval()
    model.eval()
    expected = model(sample.to(model.device)).logits
    actual = reloaded(sample.to(model.device)).logits
    if not torch.equal(expected, actual):
        diff = (expected - actual).abs().max().item()
        raise RuntimeError(f"reloaded logits differ from the trained model's (max abs diff {diff:.3g})")
    return reloaded


def _samples(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, args) -> dict[str, str]:
    inputs = tokenizer(args.prompt, return_tensors="pt").to(model.device)
    common = dict(max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    # a model this small loops under plain greedy decoding; the penalty keeps the greedy sample readable
    greedy = model.generate(**inputs, do_sample=False, repetition_penalty=GREEDY_REPETITION_PENALTY, **common)
    set_seed(args.seed)
    sampled = model.generate(**inputs, do_sample=True, temperature=0.8, top_k=40, **common)
    return {
        f"greedy (repetition penalty {GREEDY_REPETITION_PENALTY:g})": tokenizer.decode(
            greedy[0], skip_special_tokens=True
        ),
        "sampled": tokenizer.decode(sampled[0], skip_special_tokens=True),
    }


def run_demo(args: argparse.Namespace) -> int:
    """The demo with `demo_cli.add_arguments`' arguments; 0 on success, 2 when --output-dir exists."""
    _check_args(args)
    start = time.monotonic()
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not args.overwrite:
        print(
            f"parallelflow demo: {output_dir} exists; pass --overwrite or another --output-dir",
            file=sys.stderr,
        )
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    set_seed(args.seed)

    train_texts, val_texts = load_corpus(max_bytes=args.corpus_bytes)
    max_length = DEMO_MODEL["max_position_embeddings"]
    tokenizer = build_tokenizer(train_texts, vocab_size=args.vocab_size, model_max_length=max_length)
    train_data = TokenBlockDataset.from_texts(tokenizer, train_texts, args.seq_len)
    val_data = TokenBlockDataset.from_texts(tokenizer, val_texts, args.seq_len)
    probes = {"train": _probe(train_data, EVAL_BLOCKS), "val": _probe(val_data, EVAL_BLOCKS)}
    print(
        f"corpus: {len(train_texts)} + {len(val_texts)} stdlib files -> {train_data.num_tokens:,} train / "
        f"{val_data.num_tokens:,} val tokens (vocab {len(tokenizer)})"
    )

    config = PFlowConfig(
        vocab_size=len(tokenizer),
        rank=args.rank,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **DEMO_MODEL,
    )
    model = AutoModelForCausalLM.from_config(config)
    print(
        f"model: {model.num_parameters():,} parameters, {config.num_hidden_layers} layers, rank {args.rank}"
    )

    with atomic_dir(output_dir, overwrite=args.overwrite) as staging, tempfile.TemporaryDirectory() as tmp:
        plot = LossPlotCallback(staging / "loss.png", title=f"PFlow demo (rank {args.rank}) on stdlib source")
        trainer = Trainer(
            model=model,
            args=_training_args(args, tmp),
            train_dataset=train_data,
            eval_dataset=probes,
            callbacks=[plot],
        )
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(ProgressBarCallback())
        before = _losses(trainer)
        seconds = trainer.train().metrics["train_runtime"]
        after = _losses(trainer)
        steps = trainer.state.global_step
        tokens_per_second = steps * args.batch_size * args.seq_len / seconds
        print(f"trained {steps} steps in {seconds:.1f} s, {tokens_per_second:,.0f} tokens/s")
        for name in probes:
            ppl = math.exp(after[name])
            print(f"{name} loss: {before[name]:.3f} -> {after[name]:.3f} nats/token (perplexity {ppl:.1f})")

        model.config.use_cache = True  # Trainer (transformers >= 5.2x) switches it off for training
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        write_meta(
            staging,
            {
                "kind": "demo",
                "training_data": {
                    "source": "Python standard library source files",
                    "train_files": len(train_texts),
                },
                "training": {
                    "steps": steps,
                    "seq_len": args.seq_len,
                    "batch_size": args.batch_size,
                    "learning_rate": args.learning_rate,
                    "seed": args.seed,
                },
            },
        )
        plot.save()
        metrics = {
            "steps": steps,
            "train_seconds": seconds,
            "tokens_per_second": tokens_per_second,
            "loss_before": before,
            "loss_after": after,
            "args": {k: v for k, v in vars(args).items() if k != "run"},
        }
        (staging / "demo_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    reloaded = _check_reload(model, output_dir, val_data[0]["input_ids"][None])
    reloaded_tokenizer = AutoTokenizer.from_pretrained(output_dir)
    print(f"saved to {output_dir}/ with loss.png; reloaded logits equal the trained model's")
    for kind, text in _samples(reloaded, reloaded_tokenizer, args).items():
        print(f"--- {kind} sample ---\n{text}")
    print(f"demo done in {time.monotonic() - start:.0f} s")
    return 0
