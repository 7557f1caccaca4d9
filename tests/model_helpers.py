"""Tiny models for the model tests (CPU, torch path), and a fresh interpreter without the package."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from modeling_parallelflow import PFlowConfig, PFlowForCausalLM

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def tiny_config(name: str = "tiny", **overrides) -> PFlowConfig:
    """configs/<name>.json with overrides, on the torch backend."""
    config = PFlowConfig.from_json_file(str(CONFIG_DIR / f"{name}.json"))
    for key, value in {"kernel_backend": "torch", **overrides}.items():
        setattr(config, key, value)
    config.validate_pflow()
    return config


def tiny_model(name: str = "tiny", seed: int = 0, **overrides) -> PFlowForCausalLM:
    torch.manual_seed(seed)
    model = PFlowForCausalLM(tiny_config(name, **overrides)).eval()
    # Random init leaves norms at 1 and biases at 0; perturb both so tests see every weight.
    with torch.no_grad():
        for name_, param in model.named_parameters():
            if name_.endswith(("norm.weight", ".bias")):
                param.add_(0.1 * torch.randn_like(param))
    return model


def random_ids(batch: int, length: int, vocab: int = 512, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=generator)


# A fresh interpreter in which `import modeling_parallelflow` fails even if the project is pip-installed.
BLOCK_PACKAGE = textwrap.dedent(
    """
    import importlib.abc, sys
    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("modeling_parallelflow", "conversion", "evals"):
                raise ImportError(f"{name} is blocked in this test")
    sys.meta_path.insert(0, _Block())
    sys.path = [p for p in sys.path if p not in ("", ".")]
    try:
        import modeling_parallelflow
        raise SystemExit("package still importable")
    except ImportError:
        pass
    """
)


def run_without_package(script: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """Run `script` (dedented) in a fresh offline Python where this project cannot be imported, so that
    checkpoints must load through their saved remote code."""
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": "", **env}  # fmt: skip
    return subprocess.run([sys.executable, "-c", BLOCK_PACKAGE + textwrap.dedent(script)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
