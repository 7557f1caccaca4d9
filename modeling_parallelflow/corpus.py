"""Real text that every machine has offline: the Python standard library's own source files.

Files are read in sorted path order until a byte budget is spent, then split into train and validation
by file (every `val_every`-th file goes to validation), so the same Python build gives the same corpus.
"""

from __future__ import annotations

import inspect
import os
import sysconfig
from pathlib import Path

# Third-party code and the huge, deliberately odd test suites are not "the standard library's source".
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3"})


def stdlib_dir() -> Path:
    """The directory holding the standard library's `.py` sources (where `os.py` lives)."""
    candidates = [sysconfig.get_paths().get("stdlib"), os.path.dirname(inspect.getsourcefile(os) or "")]
    for candidate in candidates:
        if candidate and (Path(candidate) / "os.py").is_file():
            return Path(candidate)
    raise FileNotFoundError(
        f"cannot find the Python standard library sources (looked in {candidates}); "
        "this Python ships no .py files, pass `root=` a directory of text files instead"
    )


def stdlib_files(root: str | os.PathLike | None = None) -> list[Path]:
    """Every `*.py` file under `root` (default: the stdlib), sorted, skipping third-party and test dirs."""
    root = stdlib_dir() if root is None else Path(root)
    files = [
        path
        for path in sorted(root.rglob("*.py"))
        if path.is_file() and not _SKIP_DIRS.intersection(path.relative_to(root).parts[:-1])
    ]
    if not files:
        raise FileNotFoundError(f"no .py files found under {root}")
    return files


def read_texts(files: list[Path], max_bytes: int) -> list[str]:
    """The UTF-8 text of `files` in order, stopping before the total would pass `max_bytes`.

    Files that are not valid UTF-8 are skipped.
    """
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    texts, total = [], 0
    for path in files:
        try:
            data = path.read_bytes()
            text = data.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if total + len(data) > max_bytes:
            break
        texts.append(text)
        total += len(data)
    return texts


def load_corpus(
    max_bytes: int = 4_000_000, val_every: int = 10, root: str | os.PathLike | None = None
) -> tuple[list[str], list[str]]:
    """(train_texts, val_texts): one string per source file, at most `max_bytes` of UTF-8 in all.

    Every `val_every`-th file (the 10th, 20th, ... in sorted order) goes to validation.
    """
    if val_every < 2:
        raise ValueError(f"val_every must be >= 2 (one file in val_every is held out), got {val_every}")
    texts = [text for text in read_texts(stdlib_files(root), max_bytes) if text.strip()]
    train = [text for i, text in enumerate(texts) if (i + 1) % val_every]
    val = [text for i, text in enumerate(texts) if not (i + 1) % val_every]
    if not train or not val:
        raise ValueError(
            f"max_bytes={max_bytes} gives {len(texts)} non-empty files: too few for a train/validation "
            f"split with val_every={val_every}; raise max_bytes"
        )
    return train, val
