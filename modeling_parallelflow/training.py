"""Reusable training pieces for the demo and fine-tuning: token blocks, Trainer callbacks, atomic dirs."""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, TrainerCallback


def concat_token_ids(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> torch.Tensor:
    """All `texts` tokenized without special tokens and joined, each followed by eos: int64 [L]."""
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos_token_id to separate documents")
    ids: list[int] = []
    for doc in tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]:
        ids.extend(doc)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


class TokenBlockDataset(torch.utils.data.Dataset):
    """A token stream cut into non-overlapping blocks of `seq_len` (the tail is dropped).

    Items are `{"input_ids": [T], "labels": [T]}` with labels = input_ids (the model shifts them).
    """

    def __init__(self, token_ids: torch.Tensor | Sequence[int], seq_len: int):
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len}")
        ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
        num_blocks = ids.numel() // seq_len
        if num_blocks == 0:
            raise ValueError(f"{ids.numel()} tokens do not fill one block of seq_len={seq_len}")
        self.blocks = ids[: num_blocks * seq_len].view(num_blocks, seq_len)

    @classmethod
    def from_texts(
        cls, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], seq_len: int
    ) -> TokenBlockDataset:
        return cls(concat_token_ids(tokenizer, texts), seq_len)

    @property
    def num_tokens(self) -> int:
        return self.blocks.numel()

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        block = self.blocks[index]
        return {"input_ids": block, "labels": block.clone()}


class LossPlotCallback(TrainerCallback):
    """Records logged losses and writes them as a PNG plot after training and after each evaluation.

    `train` holds (step, loss) for the Trainer's `loss`; `evals[name]` holds (step, value) for every other
    logged key ending in `loss` (`eval_loss`, `val_loss`, ...). The PNG is written to a temporary file
    and renamed, so a reader never sees half an image.
    """

    def __init__(self, path: str | os.PathLike, title: str = "training loss"):
        self.path = Path(path)
        self.title = title
        self.train: list[tuple[int, float]] = []
        self.evals: dict[str, list[tuple[int, float]]] = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key, value in (logs or {}).items():
            if key == "loss":
                self.train.append((state.global_step, float(value)))
            elif key.endswith("loss") and key != "train_loss":
                self.evals.setdefault(key, []).append((state.global_step, float(value)))

    def on_evaluate(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.save()

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.save()

    def save(self, path: str | os.PathLike | None = None) -> Path:
        # Figure + Agg canvas directly: no pyplot, so the caller's matplotlib backend is left alone.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        path = self.path if path is None else Path(path)
        fig = Figure(figsize=(7, 4), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        if self.train:
            ax.plot(*zip(*self.train, strict=True), label="train loss", linewidth=1.2)
        for name, points in self.evals.items():
            ax.plot(*zip(*points, strict=True), marker="o", linestyle="--", label=name.replace("_", " "))
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.set_title(self.title)
        ax.grid(alpha=0.3)
        if self.train or self.evals:
            ax.legend()
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            fig.savefig(tmp, format="png")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path


class ProgressBarCallback(TrainerCallback):
    """One tqdm bar over the optimizer steps with the latest logged losses as its postfix.

    A quiet replacement for Trainer's ProgressCallback (which prints every log dict and draws a bar per
    evaluation): `trainer.remove_callback(ProgressCallback); trainer.add_callback(ProgressBarCallback())`.
    """

    def __init__(self, desc: str = "training"):
        self.desc = desc
        self.bar = None
        self.postfix: dict[str, str] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, desc=self.desc, unit="step", dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None:
            return
        for key, value in (logs or {}).items():
            if key.endswith("loss") and key != "train_loss":
                self.postfix[key.removeprefix("eval_").removesuffix("_loss")] = f"{value:.3f}"
        self.bar.set_postfix(self.postfix)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


def remove_stale_staging(target: str | os.PathLike) -> list[Path]:
    """Remove the staging dirs `atomic_dir(target)` left behind when its process died (kill -9, power loss):
    those made on this host by a process that no longer runs. A live writer's staging dir is kept."""
    target = Path(target)
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(?P<host>.+)-(?P<pid>\d+)\.[^.]+\.tmp$")
    removed = []
    for path in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        match = pattern.match(path.name)
        if match and match["host"] == socket.gethostname() and not _process_alive(int(match["pid"])):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh staging dir next to `path`; on success rename it to `path`, on error remove it.

    Refuses (FileExistsError) when `path` exists, unless `overwrite`, in which case the old `path` is
    replaced only once the new one is complete. Staging dirs of earlier writers of `path` that died are
    removed first (`remove_stale_staging`).
    """
    target = Path(path)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; remove it or choose another path")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    owner = f"{socket.gethostname()}-{os.getpid()}"
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.{owner}.", suffix=".tmp", dir=target.parent))
    os.chmod(staging, 0o755)
    try:
        yield staging
        if not target.exists():
            os.rename(staging, target)
        elif overwrite:
            old = target.with_name(f".{target.name}.{uuid.uuid4().hex}.old")
            os.rename(target, old)
            try:
                os.rename(staging, target)
            except OSError:
                os.rename(old, target)
                raise
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            raise FileExistsError(f"{target} appeared while it was being written; the new copy is discarded")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
