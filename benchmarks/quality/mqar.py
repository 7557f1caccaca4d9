"""Multi-query associative recall (MQAR), as in the Zoology and DeltaNet papers: does rank R help recall?

A sequence holds `kv_pairs` distinct key-value pairs (k1 v1 k2 v2 ...), then a query region of filler
token 0 in which every key appears once more, followed by its value. The model is scored on predicting the
value at each query key (loss and accuracy on those answer tokens only). Keys come from [1, vocab/2), values
from [vocab/2, vocab), both drawn without replacement per sequence. Query slots (pairs of positions after the
context) are drawn without replacement with probability proportional to slot^(a - 1), a = 0.01 (Zoology's
power law: most queries come soon after the context, a few much later), and the keys are assigned to the
chosen slots in a random order.

Training draws a fresh batch every step (seeded; the same stream for every model), cycling over the grid's
tasks with the same number of tokens per step; accuracy (exact match of the answer token, argmax) is measured
on a fixed held-out set per task, drawn from a separate seed. Models: PFlow variants and a softmax-attention
Llama (SDPA), 2 layers, every model's non-embedding parameter count matched to PFlow R = 1 at the same width
by its MLP width. One JSON file holds every run; it is rewritten atomically after each run, and a rerun skips
the runs it already holds, except those cut by --run-wall (trained again; tables leave them out).

    python benchmarks/quality/mqar.py --grid smoke --out mqar_smoke.json
    python benchmarks/quality/mqar.py --grid full --out mqar.json --models pflow-r1,llama --widths 64
    python benchmarks/quality/mqar.py --merge a.json b.json --out mqar.json  # shards -> one file
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks.bench_env import write_json  # noqa: E402
from benchmarks.quality.graph_step import GraphTrainStep  # noqa: E402
from benchmarks.quality.harness import (  # noqa: E402
    MODELS,
    Shape,
    adamw,
    build_model,
    git_commit,
    lr_lambda,
    non_embedding_params,
)
from benchmarks.quality.harness import matched_intermediate as _matched_intermediate  # noqa: E402

IGNORE = -100
POWER_A = 0.01
HEAD_DIM = 64  # heads = width // 64 (at least one head) for both PFlow and Llama
LAYERS = 2
SCHEMA = 1


@dataclasses.dataclass(frozen=True)
class Task:
    seq_len: int
    kv_pairs: int

    @property
    def name(self) -> str:
        return f"kv{self.kv_pairs}_t{self.seq_len}"

    @classmethod
    def from_name(cls, name: str) -> Task:
        """kvN_tM: N key-value pairs in M tokens (M + 1 >= 4 N: the pairs, then a query slot for each)."""
        match = re.fullmatch(r"kv(\d+)_t(\d+)", name)
        if not match:
            raise ValueError(f"task names read kvN_tM (N pairs in M tokens), got {name!r}")
        pairs, length = int(match[1]), int(match[2])
        if pairs < 1 or length + 1 < 4 * pairs:
            raise ValueError(f"{name}: needs seq_len + 1 >= 4 * kv_pairs >= 4")
        return cls(seq_len=length, kv_pairs=pairs)


@dataclasses.dataclass(frozen=True)
class Grid:
    tasks: tuple[Task, ...]
    widths: tuple[int, ...]
    lrs: tuple[float, ...]
    steps: int
    tokens_per_step: int
    eval_examples: int  # held-out sequences per task
    vocab_size: int = 8192
    seed: int = 0
    eval_every: int | None = None  # held-out accuracy every N steps (None: at the end only)
    stop_at: float | None = None  # stop a run once every task's held-out accuracy reaches this


GRIDS = {
    "full": Grid(
        tasks=(Task(256, 16), Task(512, 64), Task(1024, 256)),
        widths=(64, 128, 256),
        lrs=(5e-4, 1.5e-3, 5e-3),
        steps=2000,
        tokens_per_step=2**16,
        eval_examples=1000,
    ),
    # A CPU check of the machinery at toy scale, not a measurement: vocabulary 64, so 400 steps learn.
    "smoke": Grid(
        tasks=(Task(32, 4), Task(64, 8)),
        widths=(32,),
        lrs=(3e-3,),
        steps=400,
        tokens_per_step=1024,
        eval_examples=128,
        vocab_size=64,
    ),
}


# ---------------------------------------------------------------- data


def mqar_batch(
    task: Task, batch: int, generator: torch.Generator, vocab_size: int = 8192
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs [B, T], labels [B, T]) on the generator's device; labels are -100 except at query keys,
    where they hold the value paired with that key in the context."""
    n, length = task.kv_pairs, task.seq_len
    slots = (length + 1 - 2 * n) // 2  # the full sequence has T + 1 tokens: inputs are [:-1], targets [1:]
    if n < 1 or slots < n:
        raise ValueError(f"{task.name}: needs seq_len + 1 >= 4 * kv_pairs, got {length} and {n}")
    half = vocab_size // 2
    if half - 1 < n:
        raise ValueError(f"vocab_size {vocab_size} has fewer than {n} keys")
    device = generator.device

    def distinct(count: int, low: int, high: int) -> torch.Tensor:  # [B, count], distinct per row
        return (
            torch.rand(batch, high - low, generator=generator, device=device).topk(count, dim=1).indices + low
        )

    keys = distinct(n, 1, half)
    values = distinct(n, half, vocab_size)
    # Gumbel top-k: n slots without replacement, P(slot j) proportional to (j + 1)^(a - 1).
    log_w = (POWER_A - 1) * torch.log(torch.arange(1, slots + 1, device=device, dtype=torch.float32))
    uniform = torch.rand(batch, slots, generator=generator, device=device).clamp_min(1e-20)
    chosen = (log_w - torch.log(-torch.log(uniform))).topk(n, dim=1).indices
    order = torch.rand(batch, n, generator=generator, device=device).argsort(dim=1)  # key i -> slot order[i]
    query_pos = 2 * n + 2 * chosen.gather(1, order)
    seq = torch.zeros(batch, length + 1, dtype=torch.long, device=device)
    seq[:, 0 : 2 * n : 2] = keys
    seq[:, 1 : 2 * n : 2] = values
    seq.scatter_(1, query_pos, keys)
    seq.scatter_(1, query_pos + 1, values)
    labels = torch.full((batch, length), IGNORE, dtype=torch.long, device=device)
    labels.scatter_(1, query_pos, values)
    return seq[:, :-1], labels


def batch_size(task: Task, tokens_per_step: int) -> int:
    return max(1, tokens_per_step // task.seq_len)


def heldout_set(grid: Grid, task: Task) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed evaluation set of a task (CPU, seeded apart from the training stream)."""
    generator = torch.Generator().manual_seed(
        1_000_003 + 7919 * grid.seed + task.seq_len * 4099 + task.kv_pairs
    )
    return mqar_batch(task, grid.eval_examples, generator, grid.vocab_size)


# ---------------------------------------------------------------- models


def shape_at(width: int, grid: Grid) -> Shape:
    return Shape(grid.vocab_size, width, LAYERS, max(t.seq_len for t in grid.tasks), HEAD_DIM)


def _build(name: str, width: int, intermediate: int | None, grid: Grid) -> torch.nn.Module:
    return build_model(name, shape_at(width, grid), intermediate)


def matched_intermediate(name: str, width: int, grid: Grid) -> int:
    return _matched_intermediate(name, shape_at(width, grid))


# ---------------------------------------------------------------- one run


def answers(labels: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, values) [B, count] of the answer tokens of each row of `labels` [B, T], in order; every row
    of a task holds `count` = kv_pairs answers. Fixed shapes and no host synchronisation (unlike a mask)."""
    positions = torch.sort((labels == IGNORE).to(torch.uint8), dim=1, stable=True).indices[:, :count]
    return positions, labels.gather(1, positions)


def answer_loss_and_hits(model, inputs, positions, targets) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy over the answer tokens (the LM head runs there only) and a bool per answer [B * N].
    inputs [B, T]; positions and targets [B, N] (`answers`). A training step of it can be a CUDA graph."""
    hidden = model.model(
        input_ids=inputs, use_cache=False
    ).last_hidden_state  # [B, T, D]; no KV cache (Llama)
    picked = hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))  # [B, N, D]
    logits = model.lm_head(picked).float().flatten(0, 1)  # [B * N, V]
    targets = targets.flatten()
    return F.cross_entropy(logits, targets), logits.argmax(-1) == targets


@torch.no_grad()
def evaluate(model, grid: Grid, heldout: dict[str, tuple], device: torch.device, autocast) -> dict:
    model.eval()
    accuracy, sequence_accuracy = {}, {}
    for task in grid.tasks:
        inputs, labels = heldout[task.name]
        hits, seq_hits = [], []
        step = batch_size(task, grid.tokens_per_step)
        for start in range(0, len(inputs), step):
            x, y = inputs[start : start + step].to(device), labels[start : start + step].to(device)
            with autocast():
                _, hit = answer_loss_and_hits(model, x, *answers(y, task.kv_pairs))
            hits.append(hit.cpu())
            per_row = torch.zeros_like(y, dtype=torch.bool)
            per_row[y != IGNORE] = hit
            seq_hits.append((per_row.sum(1) == (y != IGNORE).sum(1)).cpu())
        accuracy[task.name] = torch.cat(hits).float().mean().item()
        sequence_accuracy[task.name] = torch.cat(seq_hits).float().mean().item()
    model.train()
    return {"accuracy": accuracy, "sequence_accuracy": sequence_accuracy}


def train_one(
    name: str,
    width: int,
    lr: float,
    grid: Grid,
    heldout: dict,
    device: torch.device,
    run_wall: float | None = None,
    cuda_graph: bool = False,
) -> dict:
    """Train and evaluate one run. It ends at `grid.steps`, at `grid.stop_at` accuracy, on a non-finite loss,
    or after `run_wall` seconds (the lr schedule still spans `grid.steps`); `ended_by` says which. With
    `cuda_graph`, training steps replay CUDA graphs (graph_step.py): the same steps on the same batches."""
    from tqdm import tqdm

    cuda = device.type == "cuda"
    intermediate = matched_intermediate(name, width, grid)
    torch.manual_seed(grid.seed)
    model = _build(name, width, intermediate, grid).to(device)
    params = sum(p.numel() for p in model.parameters())
    optimizer = adamw(model, lr, cuda, capturable=cuda_graph)
    schedule = lr_lambda(grid.steps, max(1, grid.steps // 10))

    def autocast():  # no cast cache: a captured graph must not keep casts made outside it
        if not cuda:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=not cuda_graph)

    def answer_loss(inputs, positions, targets):
        with autocast():
            return answer_loss_and_hits(model, inputs, positions, targets)[0]

    if cuda_graph:  # one graph per task shape, after its warm-up steps
        graphed = GraphTrainStep(answer_loss, model.parameters(), optimizer, lr=lr, device=device)
        first_steady = (graphed.warmup + 1) * len(grid.tasks)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        first_steady = 1  # the first step compiles kernels

    def train_step(step: int, task: Task, inputs, labels) -> torch.Tensor:
        positions, targets = answers(labels, task.kv_pairs)
        if cuda_graph:
            return graphed(lr * schedule(step), inputs, positions, targets)
        loss = answer_loss(inputs, positions, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        return loss.detach()

    generator = torch.Generator(device=device).manual_seed(grid.seed)
    log_every = max(1, grid.steps // 50)
    curve, window, tokens, eval_curve, stopped, ended_by = [], [], 0, [], False, "steps"
    steady_tokens, steady_start = 0, None
    start = time.perf_counter()
    bar = tqdm(range(grid.steps), desc=f"{name} w{width} lr{lr:g}", leave=False, dynamic_ncols=True)
    for step in bar:
        task = grid.tasks[step % len(grid.tasks)]
        inputs, labels = mqar_batch(task, batch_size(task, grid.tokens_per_step), generator, grid.vocab_size)
        window.append(train_step(step, task, inputs, labels))
        tokens += inputs.numel()
        if step + 1 == first_steady:  # throughput counts from here: kernels compiled, graphs captured
            if cuda:
                torch.cuda.synchronize()
            steady_start = time.perf_counter()
        elif step + 1 > first_steady:
            steady_tokens += inputs.numel()
        if (step + 1) % log_every == 0 or step + 1 == grid.steps:
            mean = torch.stack(window).mean().item()
            curve.append([step + 1, round(mean, 5)])
            window.clear()
            bar.set_postfix(loss=f"{mean:.3f}")
            if not math.isfinite(mean):
                ended_by = "non-finite loss"
                break
        if grid.eval_every and (step + 1) % grid.eval_every == 0 and step + 1 < grid.steps:
            accuracy = evaluate(model, grid, heldout, device, autocast)["accuracy"]
            eval_curve.append([step + 1, accuracy])
            if grid.stop_at is not None and min(accuracy.values()) >= grid.stop_at:
                if not curve or curve[-1][0] != step + 1:
                    curve.append([step + 1, round(torch.stack(window).mean().item(), 5)])
                    window.clear()
                stopped, ended_by = True, "stop_at"
                break
        if run_wall is not None and time.perf_counter() - start > run_wall and step + 1 < grid.steps:
            if not curve or curve[-1][0] != step + 1:
                curve.append([step + 1, round(torch.stack(window).mean().item(), 5)])
                window.clear()
            ended_by = "run_wall"
            break
    if cuda:
        torch.cuda.synchronize()
    train_s = time.perf_counter() - start
    steady_s = time.perf_counter() - steady_start if steady_start is not None else None
    bar.close()
    result = evaluate(model, grid, heldout, device, autocast)
    return {
        "model": name,
        "width": width,
        "lr": lr,
        "heads": max(1, width // HEAD_DIM),
        "intermediate_size": intermediate,
        "params": params,
        "non_embedding_params": non_embedding_params(model),
        "steps_done": curve[-1][0] if curve else 0,
        "ended_by": ended_by,
        "cuda_graph": cuda_graph and graphed.failed is None,
        **({"cuda_graph_error": graphed.failed} if cuda_graph and graphed.failed else {}),
        "tokens": tokens,
        **result,
        "final_loss": curve[-1][1] if curve else None,
        "loss_curve": curve,
        "eval_curve": eval_curve if stopped else eval_curve + [[step + 1, result["accuracy"]]],
        "tokens_per_s": round(steady_tokens / steady_s, 1) if steady_tokens else None,
        "train_s": round(train_s, 2),
        "wall_s": round(time.perf_counter() - start, 2),
        "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
    }


# ---------------------------------------------------------------- results file, table, plot


def run_key(name: str, width: int, lr: float) -> str:
    return f"{name}/w{width}/lr{lr:g}"


def grid_dict(grid: Grid) -> dict:
    """The grid as it reads back from JSON (lists, not tuples), so a resumed file compares equal."""
    out = {k: v for k, v in dataclasses.asdict(grid).items() if v is not None}  # files from before the
    # optional fields (eval_every, stop_at) existed still resume
    out["tasks"] = [dataclasses.asdict(t) | {"name": t.name} for t in grid.tasks]
    return json.loads(json.dumps(out))


def load_results(path: Path, header: dict) -> dict:
    """The results file at `path` (a new one from `header` if absent); its grid must equal this run's."""
    if not path.exists():
        return {**header, "runs": {}}
    data = json.loads(path.read_text())
    if data.get("schema") != SCHEMA or data.get("grid") != header["grid"]:
        raise SystemExit(f"{path} holds runs of another grid or schema: pass another --out")
    return data


def finished(run: dict | None) -> bool:
    """A run that reached its end: the schedule, --stop-at, or a non-finite loss; not one cut by --run-wall
    (a call's time running out), which a rerun trains again."""
    return run is not None and run["ended_by"] != "run_wall"


def best_cells(runs: dict) -> dict:
    """{(model, width, task): best finished run over learning rates by that task's accuracy}."""
    best: dict = {}
    for run in filter(finished, runs.values()):
        for task, acc in run["accuracy"].items():
            key = (run["model"], run["width"], task)
            if key not in best or acc > best[key]["accuracy"][task]:
                best[key] = run
    return best


def table(data: dict) -> str:
    runs = data["runs"]
    if not runs:
        return "no runs"
    best = best_cells(runs)
    tasks = [t["name"] for t in data["config"]["tasks"]]
    widths = sorted({r["width"] for r in runs.values()})
    models = [m for m in MODELS if any(r["model"] == m for r in runs.values())]
    cut = [f"{key} ({r['steps_done']} steps)" for key, r in runs.items() if not finished(r)]
    head = ["model", "width", "params (non-emb)", "MLP", *tasks, "best lr per task", "tokens/s"]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for model in models:
        for width in widths:
            cells = [best.get((model, width, t)) for t in tasks]
            if not any(cells):
                continue
            any_run = next(c for c in cells if c)
            lines.append(
                " | ".join(
                    [
                        model,
                        str(width),
                        f"{any_run['params']:,} ({any_run['non_embedding_params']:,})",
                        str(any_run["intermediate_size"]),
                        *(
                            f"{100 * c['accuracy'][t]:.1f}" if c else "-"
                            for c, t in zip(cells, tasks, strict=True)
                        ),
                        "/".join(f"{c['lr']:g}" if c else "-" for c in cells),
                        f"{any_run['tokens_per_s']:,.0f}" if any_run["tokens_per_s"] else "-",
                    ]
                )
            )
    if cut:
        lines.append(f"left out, cut by --run-wall before the schedule's end: {', '.join(cut)}")
    return "\n".join(lines)


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = best_cells(data["runs"])
    tasks = [t["name"] for t in data["config"]["tasks"]]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for model in MODELS:
            points = sorted(
                (w, r["accuracy"][task]) for (m, w, t), r in best.items() if m == model and t == task
            )
            if points:
                ax.plot([w for w, _ in points], [100 * a for _, a in points], marker="o", label=model)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("model width")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(-2, 102)
        ax.set_title(task)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"MQAR, {LAYERS} layers, best of the learning-rate sweep ({data['config']['steps']} steps)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(data: dict, out: Path) -> None:
    print(table(data))
    if data["runs"]:
        plot(data, out.with_suffix(".png"))
        print(f"results: {out}  plot: {out.with_suffix('.png')}")


# ---------------------------------------------------------------- CLI


def _list(text: str, kind=str) -> list:
    return [kind(x) for x in text.replace(",", " ").split()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--grid", choices=sorted(GRIDS), default="smoke")
    p.add_argument(
        "--out", required=True, type=Path, help="results JSON (resumed if present); plot beside it"
    )
    p.add_argument("--models", type=_list, help=f"comma-separated subset of: {', '.join(MODELS)}")
    p.add_argument("--widths", type=lambda s: _list(s, int), help="subset of the grid's widths")
    p.add_argument("--lrs", type=lambda s: _list(s, float), help="override the grid's learning rates")
    p.add_argument("--steps", type=int, help="override the grid's training steps")
    p.add_argument("--tokens-per-step", type=int, help="override the grid's tokens per step")
    p.add_argument("--vocab-size", type=int, help="override the grid's vocabulary (keys and values halves)")
    p.add_argument(
        "--tasks",
        type=_list,
        help="tasks trained together, kvN_tM (N pairs in M tokens); default: the grid's",
    )
    p.add_argument("--eval-every", type=int, help="held-out accuracy every N steps (an accuracy curve)")
    p.add_argument(
        "--seed", type=int, help="override the grid's seed (init, training stream, held-out draw); own --out"
    )
    p.add_argument(
        "--stop-at", type=float, help="with --eval-every: stop a run once every task reaches this accuracy"
    )
    p.add_argument(
        "--shard", default="0/1", help="K/N: run only the runs whose index %% N == K (default 0/1)"
    )
    p.add_argument("--max-wall", type=float, help="start no new run after this many seconds")
    p.add_argument(
        "--run-wall",
        type=float,
        help="end a run after this many seconds, evaluated and kept (its lr schedule still spans --steps)",
    )
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="replay each training step as a CUDA graph (graph_step.py): same steps, far less launch time",
    )
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--merge", nargs="+", type=Path, help="merge these results files into --out (no training)")
    args = p.parse_args(argv)
    if args.models and set(args.models) - set(MODELS):
        p.error(f"unknown models {sorted(set(args.models) - set(MODELS))}; choose from {', '.join(MODELS)}")
    try:
        k, n = map(int, args.shard.split("/"))
        assert 0 <= k < n
    except (ValueError, AssertionError):
        p.error(f"--shard must be K/N with 0 <= K < N, got {args.shard!r}")
    args.shard_k, args.shard_n = k, n
    if args.stop_at is not None and not args.eval_every:
        p.error("--stop-at needs --eval-every")
    try:
        args.tasks = [Task.from_name(name) for name in args.tasks or []]
    except ValueError as err:
        p.error(str(err))
    return args


def merge(paths: list[Path], out: Path) -> dict:
    """One results file from several of one grid: configurations equal but for the learning rates (each run
    keeps its own; the merged list is their union)."""

    def without_lrs(config: dict) -> dict:
        return {k: v for k, v in config.items() if k != "lrs"}

    merged = None
    for path in paths:
        data = json.loads(path.read_text())
        if merged is None:
            merged = {**data, "runs": dict(data["runs"]), "merged_from": [str(p) for p in paths]}
        elif without_lrs(data["config"]) != without_lrs(merged["config"]):
            raise SystemExit(f"{path} was run with another configuration than {paths[0]}")
        else:
            merged["runs"].update(data["runs"])
            merged["config"]["lrs"] = sorted({*merged["config"]["lrs"], *data["config"]["lrs"]})
    write_json(out, merged)
    return merged


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.merge:
        report(merge(args.merge, args.out), args.out)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    grid = GRIDS[args.grid]
    overrides = {
        "lrs": tuple(args.lrs) if args.lrs else None,
        "steps": args.steps,
        "tokens_per_step": args.tokens_per_step,
        "vocab_size": args.vocab_size,
        "tasks": tuple(args.tasks) or None,
        "eval_every": args.eval_every,
        "stop_at": args.stop_at,
        "seed": args.seed,
    }
    grid = dataclasses.replace(grid, **{k: v for k, v in overrides.items() if v is not None})
    widths = args.widths or list(grid.widths)
    models = args.models or list(MODELS)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.cuda_graph and device.type != "cuda":
        raise SystemExit(f"--cuda-graph needs a CUDA device; this run is on {device}")
    import transformers

    header = {
        "schema": SCHEMA,
        "benchmark": "mqar",
        "grid": args.grid,
        "config": grid_dict(grid)
        | {
            "layers": LAYERS,
            "head_dim": HEAD_DIM,
            "power_a": POWER_A,
            "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        },
        **git_commit(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    data = load_results(args.out, header)
    if data["config"] != header["config"]:
        raise SystemExit(
            f"{args.out} was run with another configuration (steps, lrs, ...): pass another --out"
        )
    plan = [(m, w, lr) for m in models for w in widths for lr in grid.lrs]
    plan = [run for i, run in enumerate(plan) if i % args.shard_n == args.shard_k]
    todo = [run for run in plan if not finished(data["runs"].get(run_key(*run)))]
    print(
        f"{len(plan)} runs in this call, {len(plan) - len(todo)} finished in {args.out}; "
        f"device {header['device']}"
    )
    heldout = {t.name: heldout_set(grid, t) for t in grid.tasks}
    started = time.perf_counter()
    for i, (name, width, lr) in enumerate(todo, 1):
        if args.max_wall is not None and time.perf_counter() - started > args.max_wall:
            print(f"--max-wall {args.max_wall:g}s reached: {len(todo) - i + 1} runs left for the next call")
            break
        result = train_one(name, width, lr, grid, heldout, device, args.run_wall, args.cuda_graph)
        data["runs"][run_key(name, width, lr)] = result | {
            "commit": header["commit"],
            "dirty": header["dirty"],
        }
        write_json(args.out, data)
        accs = " ".join(f"{t}={100 * a:.1f}" for t, a in result["accuracy"].items())
        print(
            f"[{i}/{len(todo)}] {run_key(name, width, lr)}: {accs} loss={result['final_loss']} "
            f"{result['tokens_per_s']} tok/s {result['wall_s']}s, "
            f"{result['steps_done']} steps ({result['ended_by']})",
            flush=True,
        )
    report(data, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
