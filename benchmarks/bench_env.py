"""What every benchmark result records about where it ran, and how results are written.

`environment()`: the GPU, library versions (torch, transformers, triton, fla, liger-kernel where installed),
the commit and the time. The commit is $PFLOW_COMMIT when set: on the device machine the working tree is a
copy whose git metadata may be older than the code, so pass the commit you measure there. Without it, `git
rev-parse` here, with "+dirty" when tracked files differ from it.

`write_json(path, data)`: written to a temporary file, then renamed, so no half-written result is left when a
run is stopped by a time limit; scripts call it after every row, so a stopped run keeps what it measured.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from importlib.metadata import PackageNotFoundError, version

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def commit() -> str:
    """$PFLOW_COMMIT, else the short HEAD of this checkout (+dirty with tracked changes), else "unknown"."""
    if os.environ.get("PFLOW_COMMIT"):
        return os.environ["PFLOW_COMMIT"]

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT).stdout.strip()

    head = git("rev-parse", "--short", "HEAD")
    if not head:
        return "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def environment() -> dict:
    env = {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "commit": commit(),
        "time": time.strftime("%Y-%m-%d %H:%M"),
    }
    for package in ("transformers", "triton", "flash-linear-attention", "liger-kernel"):
        try:
            env[package] = version(package)
        except PackageNotFoundError:
            env[package] = None
    return env


def write_json(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)
