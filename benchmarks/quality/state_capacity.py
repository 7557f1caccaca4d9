"""How many key-value pairs one head's delta-rule state recalls, the keys and values given (not learned).

    python benchmarks/quality/state_capacity.py [--dim 64] [--pairs 16,64,128,256] [--trials 20]

An oracle for MQAR's cells: N random unit keys and values (values drawn from a table of 4,096 random unit
vectors, as MQAR's value tokens) are written into a [dim, dim] state with the delta rule
(S += beta (v - S k) k^T, beta = 1, float64). Each key is then read (S k) and decoded to the nearest table
entry. Recall is the fraction decoded right. A width-64 model of the MQAR harness has one head of 64, and
rank R does not enlarge that state (R updates per token write into the same [64, 64] matrix), so this bounds
what recall through one head's state can do with keys it cannot make orthogonal.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F


def recall(pairs: int, dim: int, values: int, trials: int, generator: torch.Generator) -> float:
    hits = 0.0
    for _ in range(trials):
        table = F.normalize(torch.randn(values, dim, dtype=torch.float64, generator=generator), dim=-1)
        chosen = torch.randperm(values, generator=generator)[:pairs]
        keys = F.normalize(torch.randn(pairs, dim, dtype=torch.float64, generator=generator), dim=-1)
        state = torch.zeros(dim, dim, dtype=torch.float64)
        for key, value in zip(keys, table[chosen], strict=True):
            state += torch.outer(value - state @ key, key)
        decoded = (keys @ state.T @ table.T).argmax(-1)
        hits += (decoded == chosen).double().mean().item()
    return hits / trials


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dim", type=int, default=64, help="head width: the state is [dim, dim]")
    parser.add_argument("--pairs", default="16,64,128,256")
    parser.add_argument("--values", type=int, default=4096, help="value table size (MQAR: vocabulary / 2)")
    parser.add_argument("--trials", type=int, default=20)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    for pairs in map(int, args.pairs.split(",")):
        rate = recall(pairs, args.dim, args.values, args.trials, generator)
        print(f"{pairs} pairs, state [{args.dim}, {args.dim}]: recall {100 * rate:.1f} %")


if __name__ == "__main__":
    main()
