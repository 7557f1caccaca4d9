"""A tiny, untrained PFlow checkpoint with a local tokenizer: what the eval tests and the GPU smoke run score.

`python -m evals.tiny DIR` writes one (model from configs/tiny.json, vocab from a byte-level BPE trained on a
little stdlib text, remote code copied next to the weights). Scores are chance-level by construction; the
point is that every task runs end to end, offline.
"""

from __future__ import annotations

import argparse
from pathlib import Path

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.json"


def save_tiny_checkpoint(
    path: str | Path, *, vocab_size: int = 768, seed: int = 0, text_bytes: int = 200_000, **overrides
) -> Path:
    """Save tokenizer + PFlowForCausalLM(configs/tiny.json, vocab = len(tokenizer), **overrides) to `path`."""
    import torch

    from modeling_parallelflow import PFlowConfig, PFlowForCausalLM
    from modeling_parallelflow.corpus import read_texts, stdlib_files
    from modeling_parallelflow.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(read_texts(stdlib_files()[:20], text_bytes), vocab_size=vocab_size)
    config = PFlowConfig.from_json_file(str(CONFIG))
    settings = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **overrides,
    }
    for key, value in settings.items():
        setattr(config, key, value)
    config.validate_pflow()
    torch.manual_seed(seed)
    model = PFlowForCausalLM(config).eval()
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="output folder")
    parser.add_argument("--chunk-size", type=int, default=64)
    args = parser.parse_args()
    print(f"[tiny] saved {save_tiny_checkpoint(args.path, chunk_size=args.chunk_size)}")


if __name__ == "__main__":
    main()
