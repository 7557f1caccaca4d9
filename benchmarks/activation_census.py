"""Where a training step's activation memory goes: every tensor autograd saves for the backward, by module.

Runs one forward of a PFlow model (a config of `configs/`, reduced to one layer by default) under
`torch.autograd.graph.saved_tensors_hooks` and counts each saved storage once (parameters excluded), in
bytes per token, attributed to the innermost module running when it was saved. Needs no GPU: on the CPU the
Triton backend runs in Triton's interpreter (TRITON_INTERPRET=1; values there are not checked, only what is
kept), so the census of the GPU path can be taken anywhere.

    TRITON_INTERPRET=1 python benchmarks/activation_census.py --config configs/deltanet-340m-r1.json
    python benchmarks/activation_census.py --backend torch --tokens 256 --top 20

Per token and per layer, multiply by tokens per step x layers for a model's activation memory.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from modeling_parallelflow import PFlowConfig, PFlowForCausalLM  # noqa: E402


def census(model: torch.nn.Module, ids: torch.Tensor) -> list[dict]:
    """[{module, shape, dtype, bytes}] for every storage saved for backward by one forward with labels."""
    stack = ["(model)"]

    def enter(name):
        def hook(module, args):
            stack.append(name)

        return hook

    def leave(module, args, output):
        stack.pop()

    for name, module in model.named_modules():
        if name:
            module.register_forward_pre_hook(enter(name))
            module.register_forward_hook(leave)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, saved = set(), []

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in seen and key not in params:
            seen.add(key)
            saved.append(
                {
                    "module": stack[-1],
                    "shape": list(t.shape),
                    "dtype": str(t.dtype).removeprefix("torch."),
                    "bytes": t.untyped_storage().nbytes(),
                }
            )
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, labels=ids)
    return saved


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/deltanet-340m-r1.json")
    parser.add_argument("--layers", type=int, default=1, help="layers kept from the config")
    parser.add_argument("--tokens", type=int, default=128, help="sequence length (batch 1)")
    parser.add_argument("--backend", default="triton", choices=["triton", "torch"])
    parser.add_argument("--top", type=int, default=25, help="largest saved tensors listed")
    parser.add_argument("--out", help="JSON of the census")
    args = parser.parse_args()
    config = PFlowConfig.from_json_file(args.config)
    config.num_hidden_layers = args.layers
    config.layer_types = config.layer_types[: args.layers]
    config.kernel_backend = args.backend
    torch.manual_seed(0)
    model = PFlowForCausalLM(config).to(torch.bfloat16).train()
    ids = torch.randint(0, config.vocab_size, (1, args.tokens))
    saved = census(model, ids)
    by_module: dict[str, int] = collections.defaultdict(int)
    for s in saved:
        by_module[s["module"]] += s["bytes"]
    per_token = lambda b: b / args.tokens / 1024  # noqa: E731  KiB per token
    layer = sum(b for m, b in by_module.items() if m.startswith("model.layers."))
    print(
        f"{args.config}, {args.backend} backend, {args.layers} layer(s), {args.tokens} tokens: "
        f"saved for backward {per_token(layer) / args.layers:.1f} KiB per token per layer "
        f"({per_token(layer) / args.layers * 512 / config.hidden_size:.1f} x hidden size in bf16), "
        f"{per_token(sum(by_module.values())):.1f} KiB per token in all"
    )
    for module, b in sorted(by_module.items(), key=lambda kv: -kv[1]):
        print(f"  {per_token(b):7.2f} KiB/token  {module}")
    print(f"largest {args.top}:")
    for s in sorted(saved, key=lambda s: -s["bytes"])[: args.top]:
        print(f"  {per_token(s['bytes']):7.2f} KiB/token  {s['module']:45s} {s['shape']} {s['dtype']}")
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(
                {"config": args.config, "backend": args.backend, "tokens": args.tokens, "saved": saved}, f
            )
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
