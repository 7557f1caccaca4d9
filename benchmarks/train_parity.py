"""A tiny ParallelFlow LM trained 20 steps with the Triton kernels and with the torch path: same losses?

    python benchmarks/train_parity.py --out benchmarks/results/train_parity_h100.json

Same seed, weights and batches for both backends (config.kernel_backend), fp32 weights and inputs, so
both paths compute the same function; the loss curves must agree to well under the step-to-step change.
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from modeling_parallelflow import PFlowConfig, PFlowForCausalLM  # noqa: E402


def train(backend: str, rank: int, mode: str, steps: int = 20) -> list[float]:
    torch.manual_seed(0)
    config = PFlowConfig(
        vocab_size=256,
        hidden_size=128,
        num_hidden_layers=2,
        num_heads=2,
        rank=rank,
        rank_mode=mode,
        kernel_backend=backend,
        algorithm="tensor_inv",
        chunk_size=64,
    )
    model = PFlowForCausalLM(config).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator(device="cuda").manual_seed(1)
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, 256, (4, 200), device="cuda", generator=gen)
        ids[:, 1::2] = ids[:, ::2]  # a learnable pattern: every odd token repeats the previous one
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": {}}
    for rank, mode in [(1, "sum"), (2, "sum"), (2, "product")]:
        curves = {backend: train(backend, rank, mode) for backend in ("triton", "torch")}
        diff = max(abs(x - y) for x, y in zip(curves["triton"], curves["torch"], strict=True))
        result["runs"][f"R{rank}_{mode}"] = dict(curves, max_abs_loss_diff=diff)
        print(f"R{rank} {mode}: max |loss diff| {diff:.2e}; triton {curves['triton'][::5]}", flush=True)
    json.dump(result, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
