"""The conversion pipeline: read SRC, plan (config + key maps), map the tensors, write DST atomically,
verify."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from modeling_parallelflow import PFlowConfig
from modeling_parallelflow.training import atomic_dir

from . import fla_deltanet, fla_deltaproduct, llama, pflow_rank
from .formats import SOURCES, TARGETS
from .io import (
    cast,
    checkpoint_dtype,
    copy_side_files,
    load_state_dict,
    parse_dtype,
    read_config,
    save_pflow,
    save_raw,
)
from .keymap import ConversionError, KeyMap
from .shapes import fla_shapes, pflow_shapes
from .verify import max_logit_difference

MODEL_TYPES = {
    "fla-deltanet": (fla_deltanet.MODEL_TYPE,),
    "fla-deltaproduct": (fla_deltaproduct.MODEL_TYPE,),
    "llama": llama.MODEL_TYPES,
    "pflow": (PFlowConfig.model_type,),
}
LLAMA_INIT_NOISE = 1e-2


@dataclass
class Options:
    rank: int | None = None
    keep_attention_layers: tuple[int, ...] = ()
    dtype: str | None = None
    init_noise: float | None = None
    seed: int = 0
    max_shard_size: str = "5GB"
    progress: bool = True


@dataclass
class Plan:
    steps: list[tuple[KeyMap, dict]]  # key maps applied in order, each with its expected target shapes
    target: PFlowConfig | dict  # the target's config (a dict for fla)
    source_tied: bool  # lm_head tied to the embeddings in the source: a stored lm_head.weight is ignored


@dataclass
class Report:
    target_format: str
    dst: Path
    num_tensors: int
    created: list[str]
    dropped: list[str]
    copied_files: list[str]
    notes: list[str]
    max_logit_diff: float | None = None


def _check_options(source: str, target: str, options: Options) -> None:
    if source not in SOURCES:
        raise ConversionError(f"--from must be one of {SOURCES}, got {source!r}")
    if target not in TARGETS:
        raise ConversionError(f"--to must be one of {TARGETS}, got {target!r}")
    if target != "pflow" and source != "pflow":
        raise ConversionError(f"--to {target} takes a PFlow source (--from pflow), got --from {source}")
    if options.keep_attention_layers and source != "llama":
        raise ConversionError("--keep-attention-layers applies to --from llama only")
    if options.rank is not None and options.rank < 1:
        raise ConversionError(f"--rank must be >= 1, got {options.rank}")
    if options.init_noise is not None and options.init_noise < 0:
        raise ConversionError(f"--init-noise must be >= 0, got {options.init_noise}")


def _plan(source: str, target: str, src: Path, config: dict, keys: set[str], options: Options) -> Plan:
    noise = options.init_noise
    if source == "llama":
        from transformers import AutoConfig

        hf = AutoConfig.from_pretrained(src)
        pflow, keymap = llama.to_pflow(
            hf,
            keys,
            rank=options.rank or 1,
            keep_attention_layers=options.keep_attention_layers,
            init_noise=LLAMA_INIT_NOISE if noise is None else noise,
            seed=options.seed,
        )
        return Plan([(keymap, pflow_shapes(pflow))], pflow, pflow.tie_word_embeddings)
    if source == "fla-deltaproduct":
        pflow, keymap = fla_deltaproduct.to_pflow(config, keys)
        if options.rank not in (None, pflow.rank):
            raise ConversionError(
                f"--rank {options.rank}: a DeltaProduct converts at its num_householder={pflow.rank}"
            )
        return Plan([(keymap, pflow_shapes(pflow))], pflow, pflow.tie_word_embeddings)
    if source == "fla-deltanet":
        fla_deltanet.check_source_keys(keys)
        pflow, keymap = fla_deltanet.to_pflow(config)
        steps = [(keymap, pflow_shapes(pflow))]
        tied = pflow.tie_word_embeddings
    else:
        pflow = PFlowConfig.from_pretrained(src)
        steps, tied = [], pflow.tie_word_embeddings
        if target == "fla-deltanet":
            if options.rank not in (None, 1):
                raise ConversionError(f"--rank {options.rank}: fla DeltaNet is rank 1")
            fla, keymap = fla_deltanet.from_pflow(pflow)
            expected = fla_shapes(fla_deltanet.fla_config(fla), fla_deltanet.mixer_shapes)
            return Plan([(keymap, expected)], fla, tied)
    rank = options.rank or pflow.rank
    if rank != pflow.rank or not steps:  # pflow -> pflow always maps (a dtype change is also a conversion)
        pflow, keymap = pflow_rank.to_rank(pflow, rank, init_noise=noise or 0.0, seed=options.seed)
        steps.append((keymap, pflow_shapes(pflow)))
    return Plan(steps, pflow, tied)


def convert(
    source: str,
    src: str | Path,
    dst: str | Path,
    *,
    target: str = "pflow",
    options: Options | None = None,
    verify: bool = False,
    verify_tokens: int = 64,
) -> Report:
    """Convert the checkpoint folder `src` (format `source`) into a new folder `dst` (format `target`)."""
    options = options or Options()
    src, dst = Path(src), Path(dst)
    _check_options(source, target, options)
    if dst.exists():
        raise ConversionError(f"destination {dst} already exists; choose a new path")
    out_dtype = parse_dtype(options.dtype)
    config = read_config(src)
    if config.get("model_type") not in MODEL_TYPES[source]:
        raise ConversionError(
            f"{src}/config.json has model_type {config.get('model_type')!r}; --from {source} expects "
            f"{' or '.join(repr(t) for t in MODEL_TYPES[source])}"
        )
    state_dict = load_state_dict(src)
    plan = _plan(source, target, src, config, set(state_dict), options)
    notes = []
    if source == "llama" and (linearised := plan.target.layer_types.count("pflow")):
        notes.append(
            f"{linearised} of {plan.target.num_hidden_layers} layers linearised: the logits differ from the "
            "source's until fine-tuning; kept attention layers equal the source's"
        )
    if plan.source_tied and "lm_head.weight" in state_dict:
        state_dict.pop("lm_head.weight")
        notes.append("lm_head.weight ignored: tied to the embeddings")
    out_dtype = out_dtype or checkpoint_dtype(state_dict)
    tensors = state_dict
    for keymap, expected in plan.steps:
        tensors = keymap.apply(tensors, expected, progress=options.progress)
    tensors = cast(tensors, out_dtype)
    with atomic_dir(dst) as staging:
        if isinstance(plan.target, PFlowConfig):
            save_pflow(plan.target, tensors, staging, options.max_shard_size)
        else:
            save_raw(
                {**plan.target, "dtype": str(out_dtype).removeprefix("torch.")},
                tensors,
                staging,
                options.max_shard_size,
            )
        copied = copy_side_files(src, staging)
    report = Report(
        target_format=target,
        dst=dst,
        num_tensors=len(tensors),
        created=[rule.target for keymap, _ in plan.steps for rule in keymap.created],
        dropped=[f"{rule.source} ({rule.note})" for keymap, _ in plan.steps for rule in keymap.dropped],
        copied_files=copied,
        notes=notes,
    )
    if verify:
        vocab = plan.target.vocab_size if isinstance(plan.target, PFlowConfig) else plan.target["vocab_size"]
        report.max_logit_diff = max_logit_difference(
            source, src, target, dst, vocab, length=verify_tokens, seed=options.seed
        )
    return report
