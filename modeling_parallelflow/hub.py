"""Share a PFlow checkpoint on the Hugging Face Hub: `parallelflow push DIR REPO_ID` and its Python API.

    from modeling_parallelflow.hub import push_to_hub
    push_to_hub("runs/ft-merged", "me/pflow-small", private=True)

`prepare_folder` writes what is uploaded: config.json, the weights (safetensors), the modeling code files
(so `trust_remote_code=True` loads the model without this package), generation_config.json, the tokenizer
and a README.md model card; `push_to_hub` writes it to a temporary folder and uploads it with
`HfApi.create_repo` + `HfApi.upload_folder` (pass `api=` any object with those two methods, e.g. a recorder
in tests). Load it back with `AutoModelForCausalLM.from_pretrained(REPO_ID, trust_remote_code=True)`.

The card (`model_card`) describes the architecture from the config, and, when DIR has them, the training
run from `parallelflow_meta.json` (written by `parallelflow finetune`/`merge`; `write_meta`) and lm-eval
results from JSON files with a `"results"` table (DIR/*.json, DIR/evals/**/*.json, or the files given as
`eval_results=` / `--eval-results`, e.g. the results.json of `parallelflow eval`).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from .errors import CheckpointError, HubError, one_line
from .loading import REPO_ID, add_trust_remote_code_argument

META_FILE = "parallelflow_meta.json"
DEFAULT_COMMIT_MESSAGE = "Upload ParallelFlow model"


def write_meta(directory: str | Path, meta: dict[str, Any]) -> Path:
    """Write the run metadata the model card reads: `kind` ("lora" | "full" | "merged" | ...),
    `base_model`, `training_data` (path, format, records, train_tokens, eval_tokens, ...), `training`
    (steps, hyperparameters) and `eval` (eval_loss, eval_loss_before on held-out fine-tuning data)."""
    path = Path(directory) / META_FILE
    path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return path


def read_meta(directory: str | Path) -> dict[str, Any]:
    """The metadata written by `write_meta` in `directory`, or {} when there is none."""
    path = Path(directory) / META_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def read_eval_results(paths: list[str | Path]) -> dict[str, dict[str, float]]:
    """task -> {metric: value} from lm-eval style JSON files (a top-level "results" object, as lm-eval and
    `parallelflow eval`'s results.json write); files without one are skipped; later files win a task."""
    results: dict[str, dict[str, float]] = {}
    for path in paths:
        try:
            table = json.loads(Path(path).read_text()).get("results")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            continue
        if not isinstance(table, dict):
            continue
        for task, metrics in table.items():
            if isinstance(metrics, dict):
                numbers = {
                    k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and k != "alias"
                }
                if numbers:
                    results[task] = numbers
    return results


def find_eval_results(directory: str | Path) -> dict[str, dict[str, float]]:
    """`read_eval_results` of DIR/*.json and DIR/evals/**/*.json (sorted by path)."""
    directory = Path(directory)
    return read_eval_results(sorted([*directory.glob("*.json"), *directory.glob("evals/**/*.json")]))


def _display_source(name: str) -> str:
    """A repo id as is; a local path by its folder name only (no user paths in a public card)."""
    return name if REPO_ID.match(name) and not Path(name).exists() else Path(name).name


def _eval_rows(evals: dict[str, dict[str, float]]) -> list[str]:
    rows = []
    for task, metrics in sorted(evals.items()):
        for key, value in sorted(metrics.items()):
            if "_stderr" in key:
                continue
            metric, _, kind = key.partition(",")
            stderr = metrics.get(f"{metric}_stderr,{kind}" if kind else f"{metric}_stderr")
            shown = metric if kind in ("", "none") else f"{metric} ({kind})"
            rows.append(f"| {task} | {shown} | {value:.4f} | {'' if stderr is None else f'{stderr:.4f}'} |")
    return rows


def _data_line(data: dict[str, Any]) -> str:
    """`- data: NAME (format, records, files, tokens)` with whichever of these the metadata records."""
    source = Path(data["path"]).name if data.get("path") else data.get("source", "not recorded")
    details = [data["format"]] if "format" in data else []
    for key, unit in (("records", "records"), ("train_files", "files"), ("train_tokens", "training tokens")):
        if key in data:
            details.append(f"{data[key]:,} {unit}")
    return f"- data: {source}" + (f" ({', '.join(details)})" if details else "")


def _training_line(training: dict[str, Any]) -> str:
    """`- N steps, batch B x T tokens, learning rate LR, precision` with whichever of these are recorded."""
    parts = [f"{training['steps']} steps"] if "steps" in training else []
    if "batch_size" in training and "seq_len" in training:
        parts.append(f"batch {training['batch_size']} x {training['seq_len']} tokens")
    if "learning_rate" in training:
        parts.append(f"learning rate {training['learning_rate']:g}")
    if "precision" in training:
        parts.append(training["precision"])
    return "- " + (", ".join(parts) or "training settings not recorded")


def model_card(
    config,
    *,
    repo_id: str,
    num_parameters: int,
    meta: dict[str, Any] | None = None,
    evals: dict[str, dict[str, float]] | None = None,
) -> str:
    """README.md text: YAML metadata, architecture (from the PFlowConfig), usage, training data and
    evaluation results when known."""
    from huggingface_hub import ModelCardData

    meta, evals = meta or {}, evals or {}
    base = meta.get("base_model")
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["parallelflow", "delta-rule", "linear-attention", "custom_code"],
        base_model=base if base and _display_source(base) == base else None,
    )
    layer_counts = Counter(config.layer_types)
    layers = ", ".join(f"{count} x {kind}" for kind, count in layer_counts.items())
    lines = [
        "---",
        card_data.to_yaml(),
        "---",
        "",
        f"# {repo_id.split('/')[-1]}",
        "",
        "A ParallelFlow causal language model: DeltaNet-style linear attention whose state follows the "
        f"rank-{config.rank} delta rule (each token writes {config.rank} key/value pairs per head).",
        "",
        "## Architecture",
        "",
        "| | |",
        "|---|---|",
        f"| parameters | {num_parameters:,} |",
        f"| layers | {config.num_hidden_layers} ({layers}) |",
        f"| layer types | {', '.join(config.layer_types)} |",
        f"| hidden size | {config.hidden_size} |",
        f"| delta-rule heads | {config.num_heads} |",
        f"| key / value head dims | {config.head_k_dim} / {config.head_v_dim} |",
        f"| rank R | {config.rank} |",
        f"| rank mode | {config.rank_mode} |",
        f"| flow | {config.flow} |",
        f"| algorithm | {config.algorithm} |",
        f"| negative eigenvalues | {config.allow_neg_eigval} |",
        f"| short conv | {f'kernel {config.conv_size}' if config.use_short_conv else 'no'} |",
        f"| output gate | {config.use_gate} |",
        f"| vocabulary | {config.vocab_size} |",
        f"| max positions | {config.max_position_embeddings} |",
    ]
    if any(kind != "pflow" for kind in config.layer_types):
        window = f", window {config.sliding_window}" if "sliding_attention" in layer_counts else ""
        kv_heads = config.num_key_value_heads
        lines.append(f"| attention heads | {config.num_attention_heads} ({kv_heads} KV heads{window}) |")
    lines += [
        "",
        "## Usage",
        "",
        "The modeling code ships with the weights, so no extra package is needed:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}", trust_remote_code=True)',
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", trust_remote_code=True)',
        'inputs = tokenizer("def ", return_tensors="pt")',
        "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=32)[0]))",
        "```",
        "",
        "On a CUDA GPU with `triton` installed the chunked Triton kernels run; elsewhere a PyTorch path.",
        "",
        "## Training",
        "",
    ]
    data, training = meta.get("training_data"), meta.get("training")
    if base:
        lines.append(f"- base model: {_display_source(base)} ({meta.get('kind', 'fine-tuned')})")
    if data:
        lines.append(_data_line(data))
    if training:
        lines.append(_training_line(training))
        if "lora" in training:
            lora = training["lora"]
            lines.append(
                f"- LoRA r={lora['r']}, alpha={lora['alpha']:g} on {', '.join(lora['target_modules'])}"
            )
    if not (base or data or training):
        lines.append("Training data: not recorded.")
    lines += ["", "## Evaluation", ""]
    held_out = meta.get("eval", {}).get("eval_loss")
    if held_out is not None:
        lines += [f"Held-out loss on the fine-tuning data: {held_out:.4f} nats/token.", ""]
    if evals:
        lines += ["| task | metric | value | stderr |", "|---|---|---|---|", *_eval_rows(evals)]
    elif held_out is None:
        lines.append("No evaluation results recorded.")
    return "\n".join(lines).rstrip() + "\n"


def _load(src: Path, tokenizer: str | Path | None, trust_remote_code: bool):
    from .loading import load_causal_lm, load_tokenizer

    if not src.is_dir():
        raise FileNotFoundError(f"no such checkpoint folder: {src}")
    if (src / "adapter_config.json").is_file():
        raise CheckpointError(
            f"{src} holds a LoRA adapter; merge it first (parallelflow merge BASE {src} MERGED_DIR) "
            "and push MERGED_DIR"
        )
    if not (src / "config.json").is_file():
        raise CheckpointError(f"{src} is not a checkpoint folder (no config.json)")
    model = load_causal_lm(src, trust_remote_code=trust_remote_code, dtype="auto")
    try:
        tok = load_tokenizer(tokenizer or src, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise CheckpointError(
            f"no tokenizer in {tokenizer or src} ({one_line(err)}); pass tokenizer= (--tokenizer)"
        ) from err
    return model, tok


def prepare_folder(
    src: str | Path,
    dst: str | Path,
    *,
    repo_id: str,
    tokenizer: str | Path | None = None,
    eval_results: list[str | Path] | None = None,
    trust_remote_code: bool = False,
) -> list[str]:
    """Write the Hub folder for checkpoint `src` into the empty/new folder `dst`; the file names written.

    The model is loaded and re-saved (so the code files and `auto_map` come from this installation), the
    tokenizer comes from `tokenizer` (default `src`), and README.md is `model_card(...)` with the metadata
    of `src` and the evaluation results of the `eval_results` files (default: those found in `src`).
    """
    src, dst = Path(src), Path(dst)
    if not REPO_ID.match(repo_id):
        raise ValueError(f"repo_id must look like 'owner/name', got {repo_id!r}")
    model, tok = _load(src, tokenizer, trust_remote_code)
    generation = model.generation_config
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(generation, name, None) is None and getattr(tok, name) is not None:
            setattr(generation, name, getattr(tok, name))
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    card = model_card(
        model.config,
        repo_id=repo_id,
        num_parameters=model.num_parameters(),
        meta=read_meta(src),
        evals=find_eval_results(src) if eval_results is None else read_eval_results(eval_results),
    )
    (dst / "README.md").write_text(card)
    return sorted(str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file())


def push_to_hub(
    src: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    tokenizer: str | Path | None = None,
    eval_results: list[str | Path] | None = None,
    trust_remote_code: bool = False,
    api=None,
):
    """Upload checkpoint `src` (model, code files, generation config, tokenizer, model card) to `repo_id`,
    creating the repo if needed. `api` defaults to `huggingface_hub.HfApi()` (token from `hf auth login`
    or HF_TOKEN). Returns `upload_folder`'s result (a CommitInfo). HubError when the Hub cannot be reached
    or refuses the upload."""
    from huggingface_hub import HfApi

    api = HfApi() if api is None else api
    with tempfile.TemporaryDirectory(prefix="parallelflow-push-") as tmp:
        prepare_folder(
            src,
            tmp,
            repo_id=repo_id,
            tokenizer=tokenizer,
            eval_results=eval_results,
            trust_remote_code=trust_remote_code,
        )
        try:
            api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
            return api.upload_folder(
                repo_id=repo_id, folder_path=tmp, repo_type="model", commit_message=commit_message
            )
        except _network_errors() as err:
            raise HubError(
                f"cannot upload to the Hugging Face Hub ({one_line(err)}); check the network and your login "
                "(hf auth login, or HF_TOKEN)"
            ) from err


def _network_errors() -> tuple[type[Exception], ...]:
    """What an unreachable or refusing Hub raises: OSError (offline mode, no token) and the errors of
    huggingface_hub's HTTP client (httpx2 for huggingface_hub 2.x, httpx for 1.x), HfHubHTTPError included."""
    try:
        from httpx2 import HTTPError
    except ImportError:
        from httpx import HTTPError
    return OSError, HTTPError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="checkpoint folder (a full model, e.g. from `parallelflow merge`)")
    parser.add_argument("repo_id", help="target repo on the Hub, owner/name")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--commit-message", default=DEFAULT_COMMIT_MESSAGE)
    parser.add_argument("--tokenizer", help="tokenizer folder (default: DIR)")
    parser.add_argument(
        "--eval-results",
        nargs="+",
        metavar="JSON",
        help="lm-eval results files for the card, e.g. `parallelflow eval`'s results.json "
        "(default: *.json with a results table in DIR or DIR/evals)",
    )
    add_trust_remote_code_argument(parser, "DIR")


def run(args: argparse.Namespace) -> int:
    commit = push_to_hub(
        args.dir,
        args.repo_id,
        private=args.private,
        commit_message=args.commit_message,
        tokenizer=args.tokenizer,
        eval_results=args.eval_results,
        trust_remote_code=args.trust_remote_code,
    )
    print(f"pushed {args.dir} to {getattr(commit, 'commit_url', None) or args.repo_id}")
    return 0
