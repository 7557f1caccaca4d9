"""`parallelflow convert`: checkpoints to and from the PFlow layout. Imports torch only when it runs."""

from __future__ import annotations

import argparse

from .formats import SOURCES, TARGETS

EPILOG = """\
formats (SRC and DST are local folders in the save_pretrained layout; DST must not exist):
  fla-deltanet      fla DeltaNet (model_type delta_net) -> PFlow R=1, exact (same logits). Add --rank R'
                    to expand in the same run (sum form, exact). Refused: qk_activation != silu,
                    qk_norm != l2, use_beta=False, conv biases, attn layers with qkv_bias.
  fla-deltaproduct  fla gated DeltaProduct without forget gate -> PFlow rank_mode=product,
                    R = num_householder, exact. Refused: use_forget_gate, num_v_heads != num_heads.
  llama             Llama / Mistral / Qwen2 / Qwen3 -> PFlow (linearised: an initialisation for
                    fine-tuning). --keep-attention-layers keeps layers as softmax attention, exactly equal
                    to the source layers (refused with q/k/v biases, q/k norms or non-default RoPE).
  pflow             PFlow -> PFlow: --rank R' (a multiple of R, sum form: exact) and/or --dtype.
                    With --to fla-deltanet: PFlow R=1 -> fla DeltaNet (the exact inverse).

examples:
  parallelflow convert --from fla-deltanet fla-ckpt pflow-ckpt --verify
  parallelflow convert --from llama llama-ckpt pflow-ckpt --rank 2 --keep-attention-layers 0,11
  parallelflow convert --from pflow pflow-r2 pflow-r4 --rank 4 --dtype bfloat16
  parallelflow convert --from pflow --to fla-deltanet pflow-r1 fla-ckpt
"""


def _layer_list(text: str) -> tuple[int, ...]:
    try:
        layers = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer indices like 0,5, got {text!r}"
        ) from error
    if len(set(layers)) != len(layers):
        raise argparse.ArgumentTypeError(f"layer indices repeat: {text!r}")
    return tuple(sorted(layers))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("--from", dest="source", required=True, choices=SOURCES, help="format of SRC")
    parser.add_argument(
        "--to",
        dest="target",
        default="pflow",
        choices=TARGETS,
        help="format of DST (default: %(default)s); fla-deltanet needs --from pflow and a rank-1 checkpoint",
    )
    parser.add_argument("src", metavar="SRC", help="source checkpoint folder")
    parser.add_argument("dst", metavar="DST", help="new folder to write (must not exist)")
    parser.add_argument(
        "--rank",
        type=int,
        help="target rank R (llama: default 1; pflow/fla-deltanet: a multiple "
        "of the source rank, exact in sum form)",
    )
    parser.add_argument(
        "--keep-attention-layers",
        type=_layer_list,
        default=(),
        metavar="I,J",
        help="llama only: layers kept as softmax attention (exactly the source's)",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16", "float64"],
        help="dtype of the written weights (default: the source's)",
    )
    parser.add_argument(
        "--init-noise",
        type=float,
        help="relative std of the noise on duplicated key/value components when R grows "
        "(default: 0 for pflow, exact; 1e-2 for llama)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of that noise and of the --verify tokens")
    parser.add_argument(
        "--max-shard-size", default="5GB", help="largest safetensors shard (default: %(default)s)"
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="run source and target (float64, CPU) on sample tokens; print the max logit difference",
    )
    parser.add_argument("--verify-tokens", type=int, default=64, help="tokens per sample row for --verify")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (transformers' too)")


def run(args: argparse.Namespace) -> int:
    from .pipeline import Options, convert

    if args.no_progress:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    options = Options(
        rank=args.rank,
        keep_attention_layers=args.keep_attention_layers,
        dtype=args.dtype,
        init_noise=args.init_noise,
        seed=args.seed,
        max_shard_size=args.max_shard_size,
        progress=not args.no_progress,
    )
    report = convert(  # a ConversionError (a ValueError) is printed as one line by the `parallelflow` command
        args.source,
        args.src,
        args.dst,
        target=args.target,
        options=options,
        verify=args.verify,
        verify_tokens=args.verify_tokens,
    )
    print(f"wrote {report.dst} ({report.target_format}, {report.num_tensors} tensors)")
    if report.created:
        print(f"  new tensors ({len(report.created)}), initialised: e.g. {', '.join(report.created[:3])}")
    for line in report.dropped:
        print(f"  dropped {line}")
    if report.copied_files:
        print(f"  copied {', '.join(report.copied_files)}")
    for note in report.notes:
        print(f"  note: {note}")
    if report.max_logit_diff is not None:
        print(
            f"verify: max |logit difference| (float64, {args.verify_tokens} tokens x 2 rows) = "
            f"{report.max_logit_diff:.3e}"
        )
    return 0
