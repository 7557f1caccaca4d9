"""`parallelflow train`: pretrain a PFlow model on a token file with packed variable-length batches, in one
process or data-parallel (FSDP2 or DDP) under torchrun or `accelerate launch`. Commands: TRAINING.md.

Every optimizer step sees world_size x grad_accum micro-batches of --micro-tokens tokens (one packed
sequence each, documents separated by cu_seqlens). The loss is the mean over the step's predicted tokens of
all ranks, so any split of a global batch over ranks and micro-steps gives the same gradients.
Writes to OUTPUT_DIR: metrics.jsonl (one line per logged step), loss.png, summary.json, checkpoints/step-N
(sharded, resumable with --resume) and model/ (a save_pretrained folder).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import time
import uuid
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "data", nargs="?", help="token file: .npy (uint16/uint32/int32) or raw .bin (see --token-dtype)"
    )
    parser.add_argument("--output-dir", "-o", required=True, help="metrics, plot, checkpoints and model/")
    model = parser.add_mutually_exclusive_group()
    model.add_argument(
        "--config", help="model config JSON for a new model (e.g. configs/deltanet-340m-r2.json)"
    )
    model.add_argument("--init-from", help="start from the weights of a save_pretrained folder")
    parser.add_argument("--tokenizer", help="tokenizer folder saved with the exported model (optional)")
    parser.add_argument(
        "--token-dtype", default="uint16", help="dtype of a raw .bin token file (default uint16)"
    )
    parser.add_argument(
        "--eos-token-id", type=int, help="document separator (default: the config's eos_token_id)"
    )
    parser.add_argument(
        "--max-doc-len", type=int, help="cut longer documents (default: max_position_embeddings)"
    )
    parser.add_argument(
        "--val-data", help="held-out token file (same format as DATA): held-out loss in metrics and plot"
    )
    parser.add_argument(
        "--eval-every",
        type=int,
        default=0,
        help="with --val-data: held-out loss every N steps (0: at the end)",
    )
    parser.add_argument(
        "--val-tokens", type=int, default=2**20, help="held-out tokens per evaluation, at most (default 2^20)"
    )
    parser.add_argument("--micro-tokens", type=int, default=8192, help="tokens per micro-batch per process")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per process per step")
    parser.add_argument("--max-steps", type=int, help="optimizer steps (required to train)")
    parser.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (default 3e-4)")
    parser.add_argument("--lr-scheduler", choices=("cosine", "linear", "constant"), default="cosine")
    parser.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor as a share of --lr")
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decay of matrices (not norms)")
    parser.add_argument("--adam-betas", type=float, nargs=2, default=(0.9, 0.95), metavar=("B1", "B2"))
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="clip; 0: measure only")
    parser.add_argument(
        "--strategy",
        choices=("fsdp2", "ddp", "none"),
        help="default: the accelerate config's, else fsdp2 with several processes, none with one",
    )
    parser.add_argument(
        "--precision",
        choices=("fp32", "bf16-mixed", "bf16"),
        help="bf16-mixed: fp32 master weights (default on CUDA, or accelerate's mixed_precision); "
        "bf16: bf16 weights and optimizer state; fp32 (default on CPU)",
    )
    parser.add_argument(
        "--activation-checkpointing",
        action=argparse.BooleanOptionalAction,
        help="recompute each decoder layer in backward (default: the accelerate FSDP config's, else off)",
    )
    parser.add_argument("--kernel-backend", choices=("auto", "triton", "torch"), help="override the config's")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    parser.add_argument("--no-shuffle", action="store_true", help="read the token file in order")
    parser.add_argument("--seed", type=int, default=0, help="model init and batch order")
    parser.add_argument("--log-every", type=int, default=10, help="steps per metrics line (default 10)")
    parser.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: at the end)")
    parser.add_argument("--keep-checkpoints", type=int, default=2, help="newest checkpoints kept (0: all)")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        help="continue from the newest checkpoint in OUTPUT_DIR, or PATH",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="start over in an OUTPUT_DIR with a past run"
    )
    parser.add_argument("--no-export", action="store_true", help="skip writing OUTPUT_DIR/model at the end")
    parser.add_argument(
        "--export-from",
        metavar="CHECKPOINT",
        help="only export CHECKPOINT (a checkpoints/step-N dir) to OUTPUT_DIR as a save_pretrained folder",
    )


def run(args: argparse.Namespace) -> int:
    if args.export_from:
        return _export_only(args)
    from .pretrain_dist import init_distributed

    env = init_distributed(args.device)
    try:
        return PretrainRun(args, env).train()
    finally:
        import torch.distributed as dist

        if env.launcher != "single" and dist.is_initialized():
            dist.destroy_process_group()


def _export_only(args: argparse.Namespace) -> int:
    from .pretrain_dist import export_checkpoint

    out = export_checkpoint(
        args.export_from, args.output_dir, _load_tokenizer(args.tokenizer), args.overwrite
    )
    print(f"exported {args.export_from} to {out}")
    return 0


def _load_tokenizer(path: str | None):
    if path is None:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _check_positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")


def build_model(args: argparse.Namespace):
    """A new model from --config (seeded) or the weights of --init-from, in fp32 on the CPU."""
    import torch

    from .configuration_parallelflow import PFlowConfig
    from .modeling_parallelflow import PFlowForCausalLM

    overrides = {"kernel_backend": args.kernel_backend} if args.kernel_backend else {}
    torch.manual_seed(args.seed)
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"no such config file: {path}")
        return PFlowForCausalLM(PFlowConfig.from_dict(json.loads(path.read_text()), **overrides))
    if not Path(args.init_from, "config.json").is_file():
        raise FileNotFoundError(
            f"--init-from needs a save_pretrained folder with config.json: {args.init_from}"
        )
    model, info = PFlowForCausalLM.from_pretrained(
        args.init_from, dtype=torch.float32, output_loading_info=True, **overrides
    )
    problems = {
        k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")
    }
    if problems:
        raise ValueError(f"{args.init_from} does not fit its config: {problems}")
    return model


class PretrainRun:
    """One training run on this rank: model, optimizer, data, and the loop."""

    def __init__(self, args: argparse.Namespace, env):
        import torch
        from transformers import get_scheduler

        from . import pretrain_dist as pd
        from .pretrain_data import PackedBatches, read_token_file

        if args.data is None or args.max_steps is None or not (args.config or args.init_from):
            raise ValueError("training needs DATA, --max-steps and a model (--config or --init-from)")
        _check_positive(args, "micro_tokens", "grad_accum", "max_steps", "log_every", "val_tokens")
        if args.eval_every < 0:
            raise ValueError(f"--eval-every must be >= 0, got {args.eval_every}")
        self.args, self.env = args, env
        self.out = Path(args.output_dir)
        self.strategy = pd.resolve_strategy(args.strategy, env)
        self.precision = pd.resolve_precision(args.precision, env)
        self.activation_checkpointing = pd.resolve_activation_checkpointing(args.activation_checkpointing)
        self._prepare_output_dir()

        model = build_model(args)
        self.config = model.config
        self.num_params = sum(p.numel() for p in model.parameters())
        eos = args.eos_token_id if args.eos_token_id is not None else self.config.eos_token_id
        if isinstance(eos, list):
            eos = eos[0]
        if eos is None:
            raise ValueError("the config has no eos_token_id to separate documents: pass --eos-token-id")

        def packed(path: str, shuffle: bool) -> PackedBatches:
            return PackedBatches(
                read_token_file(path, args.token_dtype),
                args.micro_tokens,
                eos_token_id=eos,
                max_doc_len=args.max_doc_len or self.config.max_position_embeddings,
                vocab_size=self.config.vocab_size,
                seed=args.seed,
                shuffle=shuffle,
            )

        self.data = packed(args.data, not args.no_shuffle)
        self.val_batches = []  # this rank's held-out micro-batch indices
        if args.val_data:
            self.val = packed(args.val_data, False)
            count = min(self.val.num_chunks, max(1, args.val_tokens // args.micro_tokens))
            count -= count % env.world_size
            if count == 0:
                raise ValueError(
                    f"--val-data {args.val_data} holds {self.val.num_chunks} micro-batch(es) of "
                    f"{args.micro_tokens} tokens, fewer than the {env.world_size} processes"
                )
            self.val_batches = list(range(env.rank, count, env.world_size))
        self.model = pd.wrap_model(
            model,
            env,
            self.strategy,
            self.precision,
            activation_checkpointing=self.activation_checkpointing,
            reshard_after_forward=pd.resolve_reshard_after_forward(),
        )
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=args.lr,
            betas=tuple(args.adam_betas),
        )
        name = {"cosine": "cosine_with_min_lr", "linear": "linear", "constant": "constant_with_warmup"}
        extra = {"min_lr_rate": args.min_lr_ratio} if args.lr_scheduler == "cosine" else None
        self.scheduler = get_scheduler(
            name[args.lr_scheduler],
            self.optimizer,
            num_warmup_steps=args.warmup_steps,
            num_training_steps=args.max_steps,
            scheduler_specific_kwargs=extra,
        )
        self.step = 0
        self.tokens_per_step = args.micro_tokens * args.grad_accum * env.world_size
        if args.resume:
            self._resume(args.resume)

    @property
    def checkpoint_root(self) -> Path:
        return self.out / "checkpoints"

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    def _prepare_output_dir(self) -> None:
        from .pretrain_dist import barrier

        past = [self.metrics_path, self.checkpoint_root, self.out / "model"]
        if not self.args.resume and any(p.exists() for p in past) and not self.args.overwrite:
            raise FileExistsError(
                f"{self.out} holds a past run: pass --resume to continue it or --overwrite to start over"
            )
        if self.env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            if not self.args.resume:
                self.metrics_path.unlink(missing_ok=True)
        barrier()

    def _resume(self, where: str) -> None:
        from .pretrain_dist import checkpoint_steps, load_checkpoint

        if where == "latest":
            found = checkpoint_steps(self.checkpoint_root)
            if not found:
                raise FileNotFoundError(f"--resume: no complete checkpoint under {self.checkpoint_root}")
            path = found[max(found)]
        else:
            path = Path(where)
        state = load_checkpoint(path, self.model, self.optimizer, self.scheduler)
        self.step = state["step"]
        if state.get("tokens_per_step") != self.tokens_per_step and self.env.is_main:
            print(
                f"note: {path} was trained with {state.get('tokens_per_step')} tokens per step, "
                f"now {self.tokens_per_step}"
            )
        if self.env.is_main:
            self._truncate_metrics(self.step)

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric lines past `step` (written by the run that died after the checkpoint); atomic."""
        if not self.metrics_path.exists():
            return
        kept = [
            line
            for line in self.metrics_path.read_text().splitlines()
            if line and json.loads(line)["step"] <= step
        ]
        tmp = self.metrics_path.with_name(f".{self.metrics_path.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.metrics_path)

    def micro_batches(self, step: int) -> list[dict]:
        """This rank's micro-batches of optimizer step `step` (0-based): global micro index
        (step * grad_accum + a) * world_size + rank."""
        accum, world = self.args.grad_accum, self.env.world_size
        return [self.data[(step * accum + a) * world + self.env.rank] for a in range(accum)]

    def forward_backward(self, step: int):
        """Gradients of step `step` accumulated into the parameters; returns the step's global mean loss
        as a 0-d tensor on the device (reduced over ranks)."""
        import torch
        import torch.distributed as dist

        from .pretrain_dist import compute_context, gradient_sync

        batches = self.micro_batches(step)
        counts = torch.tensor(
            [float((b["labels"][:, 1:] != -100).sum()) for b in batches], dtype=torch.float64
        ).sum()
        if self.env.world_size > 1:
            counts = counts.to(self.env.device)
            dist.all_reduce(counts)
        # Each rank's loss is its summed token losses over (global count / world): the gradient average
        # over ranks (DDP, FSDP2) then gives the global mean.
        scale = float(counts) / self.env.world_size
        if scale == 0:
            raise ValueError(f"step {step} has no token to predict: raise --micro-tokens or --max-doc-len")
        total = torch.zeros((), device=self.env.device)
        for index, batch in enumerate(batches):
            batch = {k: v.to(self.env.device, non_blocking=True) for k, v in batch.items()}
            with gradient_sync(self.model, self.strategy, index == len(batches) - 1):
                with compute_context(self.strategy, self.precision, self.env.device):
                    loss = self.model(**batch, num_items_in_batch=scale).loss
                loss.backward()
            total += loss.detach().float()
        if self.env.world_size > 1:
            dist.all_reduce(total)
            total /= self.env.world_size
        return total

    def heldout_loss(self) -> tuple[float, int]:
        """(mean next-token loss, tokens) over the held-out micro-batches of every rank. The model stays in
        training mode (it has no dropout), so PFlow keeps its chunked loss and no full logits are built."""
        import torch
        import torch.distributed as dist

        from .pretrain_dist import compute_context

        sums = torch.zeros(2, dtype=torch.float64, device=self.env.device)  # loss x tokens, tokens
        with torch.no_grad():
            for index in self.val_batches:
                batch = {k: v.to(self.env.device, non_blocking=True) for k, v in self.val[index].items()}
                tokens = (batch["labels"][:, 1:] != -100).sum()
                with compute_context(self.strategy, self.precision, self.env.device):
                    loss = self.model(**batch).loss
                weighted = torch.where(tokens > 0, loss.double() * tokens, 0.0)  # no NaN from an empty batch
                sums += torch.stack([weighted, tokens.double()])
        if self.env.world_size > 1:
            dist.all_reduce(sums)
        return float(sums[0] / sums[1].clamp_min(1)), int(sums[1])

    def _log_heldout(self, bar) -> dict:
        loss, tokens = self.heldout_loss()
        record = {"step": self.step, "val_loss": loss, "val_perplexity": math.exp(min(loss, 700.0))}
        record["val_tokens"] = tokens
        if self.env.is_main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            bar.write(
                f"step {self.step}: held-out loss {loss:.4f}, perplexity {record['val_perplexity']:.2f}"
            )
        return record

    def optimizer_step(self) -> float:
        from .pretrain_dist import clip_grad_norm

        norm = clip_grad_norm(self.model, self.args.max_grad_norm or math.inf)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return norm

    def train(self) -> int:
        import torch
        from tqdm.auto import tqdm

        from .pretrain_dist import export_pretrained

        args, env = self.args, self.env
        cuda = env.device.type == "cuda"
        if env.is_main:
            print(
                f"training {self.num_params / 1e6:.1f}M parameters on {env.world_size} process(es) "
                f"({env.launcher}, {self.strategy}, {self.precision}"
                f"{', activation checkpointing' if self.activation_checkpointing else ''}, "
                f"{env.device.type}), "
                f"{self.tokens_per_step} tokens per step, steps {self.step}..{args.max_steps}"
            )
        bar = tqdm(
            total=args.max_steps, initial=self.step, unit="step", dynamic_ncols=True, disable=not env.is_main
        )
        clock = _Clock(self.step, cuda)
        losses, last_loss, heldout = [], float("nan"), None
        while self.step < args.max_steps:
            losses.append(self.forward_backward(self.step))
            grad_norm = self.optimizer_step()
            clock.step_done(self.step)
            if self.step % args.log_every == 0 or self.step == args.max_steps:
                last_loss = float(torch.stack(losses).mean())  # syncs the device
                losses = []
                self._log(last_loss, grad_norm, clock.interval_rate() * self.tokens_per_step, bar)
            bar.update(1)
            if self.val_batches and args.eval_every and self.step % args.eval_every == 0:
                if self.step < args.max_steps:
                    with clock.paused():  # evaluation time is not training throughput
                        self._log_heldout(bar)
            if args.save_every and self.step % args.save_every == 0 and self.step < args.max_steps:
                with clock.paused():  # checkpoint time is not training throughput
                    self.save()
        steady_rate = clock.steady_rate()
        if self.val_batches:
            heldout = self._log_heldout(bar)
        bar.close()
        if self.step > clock.first_step:
            self.save()
        if not args.no_export:
            export_pretrained(
                self.model, env, self.out / "model", _load_tokenizer(args.tokenizer), overwrite=True
            )
        if env.is_main:
            self._write_summary(
                last_loss, steady_rate and steady_rate * self.tokens_per_step / env.world_size, heldout
            )
            self._plot()
        return 0

    def _log(self, loss: float, grad_norm: float, tokens_per_s: float, bar) -> None:
        import torch

        record = {
            "step": self.step,
            "loss": loss,
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
            "tokens": self.step * self.tokens_per_step,
            "tokens_per_s_per_gpu": tokens_per_s / self.env.world_size,
        }
        if self.env.device.type == "cuda":
            record["peak_memory_gb"] = torch.cuda.max_memory_allocated(self.env.device) / 2**30
        if self.env.is_main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{loss:.3f}", tok_s_gpu=f"{record['tokens_per_s_per_gpu']:.0f}")

    def save(self) -> None:
        from .pretrain_dist import save_checkpoint

        save_checkpoint(
            self.checkpoint_root,
            self.step,
            self.model,
            self.optimizer,
            self.scheduler,
            {
                "tokens_per_step": self.tokens_per_step,
                "world_size": self.env.world_size,
                "seed": self.args.seed,
            },
            self.env,
            keep=self.args.keep_checkpoints,
        )
        if self.env.is_main:
            self._plot()

    def _write_summary(self, loss: float, throughput: float | None, heldout: dict | None) -> None:
        import torch

        summary = {
            "steps": self.step,
            "final_loss": loss,
            "tokens_per_s_per_gpu": throughput,  # after the first step of this process (warm-up excluded)
            "world_size": self.env.world_size,
            "launcher": self.env.launcher,
            "strategy": self.strategy,
            "precision": self.precision,
            "activation_checkpointing": self.activation_checkpointing,
            "tokens_per_step": self.tokens_per_step,
            "micro_tokens": self.args.micro_tokens,
            "grad_accum": self.args.grad_accum,
            "parameters": self.num_params,
            "config": {
                k: getattr(self.config, k)
                for k in ("hidden_size", "num_hidden_layers", "num_heads", "rank", "rank_mode", "vocab_size")
            },
            "device": torch.cuda.get_device_name(self.env.device)
            if self.env.device.type == "cuda"
            else "cpu",
            "torch": torch.__version__,
        }
        if heldout:
            summary.update({k: heldout[k] for k in ("val_loss", "val_perplexity", "val_tokens")})
        if self.env.device.type == "cuda":
            summary["peak_memory_gb"] = torch.cuda.max_memory_allocated(self.env.device) / 2**30
        tmp = self.out / f".summary.json.{uuid.uuid4().hex}.tmp"
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(tmp, self.out / "summary.json")

    def _plot(self) -> None:
        from .training import LossPlotCallback

        plot = LossPlotCallback(
            self.out / "loss.png", title=f"parallelflow train ({self.env.world_size} x {self.strategy})"
        )
        if self.metrics_path.exists():
            records = [json.loads(line) for line in self.metrics_path.read_text().splitlines()]
            plot.train = [(r["step"], r["loss"]) for r in records if "loss" in r]
            heldout = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
            if heldout:
                plot.evals["held-out loss"] = heldout
        plot.save()


class _Clock:
    """Steps per second between log lines, and over the run after its first step (kernel autotuning and
    allocator warm-up excluded); time spent in `paused()` (checkpoints) is not counted."""

    def __init__(self, first_step: int, cuda: bool):
        self.first_step, self.cuda = first_step, cuda
        self.interval = (first_step, time.perf_counter())
        self.steady: tuple[int, float] | None = None
        self.last_step = first_step

    def _now(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def step_done(self, step: int) -> None:
        self.last_step = step
        if step == self.first_step + 1:
            self.steady = (step, self._now())

    def interval_rate(self) -> float:
        now = self._now()
        rate = (self.last_step - self.interval[0]) / (now - self.interval[1])
        self.interval = (self.last_step, now)
        return rate

    def steady_rate(self) -> float | None:
        if self.steady is None or self.last_step == self.steady[0]:
            return None
        return (self.last_step - self.steady[0]) / (self._now() - self.steady[1])

    @contextlib.contextmanager
    def paused(self):
        start = time.perf_counter()
        yield
        spent = time.perf_counter() - start
        self.interval = (self.interval[0], self.interval[1] + spent)
        if self.steady is not None:
            self.steady = (self.steady[0], self.steady[1] + spent)


if (
    __name__ == "__main__"
):  # `torchrun -m modeling_parallelflow.pretrain ...` runs what `parallelflow train` runs
    _parser = argparse.ArgumentParser(prog="parallelflow train", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    raise SystemExit(run(_parser.parse_args()))
