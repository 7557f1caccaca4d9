"""Bar chart of fwd+bwd ms (ours vs fla vs SDPA) from bench JSON files -> benchmarks/results/h100.png.

python benchmarks/plot_results.py benchmarks/results/h100_bench_*.json
"""

import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

GROUPS = [
    ("R=1", ["ours_R1_sum", "fla_delta_rule_R1"]),
    ("R=2", ["ours_R2_sum", "ours_R2_product", "fla_delta_product_R2"]),
    ("R=4", ["ours_R4_sum", "ours_R4_product", "fla_delta_product_R4"]),
    ("attention", ["sdpa_causal"]),
]


def main():
    bench = {}
    for path in sys.argv[1:]:
        bench.update(json.load(open(path))["bench"])
    shapes = sorted({k.split("/")[0] for k in bench}, key=lambda s: int(s.split("x")[0]))
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes, strict=True):
        names, values, colors = [], [], []
        for _, providers in GROUPS:
            for name in providers:
                row = bench.get(f"{shape}/{name}/fwdbwd", {})
                if isinstance(row.get("ms"), float):
                    names.append(name.replace("_delta_product", "_DP").replace("_delta_rule", ""))
                    values.append(row["ms"])
                    colors.append("tab:blue" if name.startswith("ours") else "tab:gray")
        ax.barh(names, values, color=colors)
        ax.set_title(f"fwd+bwd, T x B = {shape}, H=16, K=V=128, bf16 (H100)")
        ax.set_xlabel("ms (lower is better)")
        ax.invert_yaxis()
    fig.tight_layout()
    out = os.path.join(os.path.dirname(__file__), "results", "h100.png")
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main()
