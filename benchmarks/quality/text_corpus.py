"""A deduplicated English text corpus with a fixed held-out split, as token files for `parallelflow train`.

Inputs are local files or directories (nothing is fetched): .txt, .text, .md, .rst, .pod, .html/.htm (tags
stripped), each optionally gzip-compressed (.gz). One file is one document. Steps:

1. read and normalise each document (HTML tags and entities removed, line ends unified, runs of blank lines
   cut to one, trailing spaces dropped); documents under --min-chars are skipped;
2. deduplicate: a document whose normalised text was seen before is dropped, and so is every paragraph
   (blank-line separated, at least --min-paragraph-chars long) seen before in the corpus (licence headers,
   navigation text, repeated boilerplate); documents left under --min-chars are dropped;
3. split by content: a document goes to the held-out set when the SHA-256 of its text, read as a number, falls
   in the first --val-percent of the range. The split never depends on file order or on the other documents;
4. train the project's byte-level BPE tokenizer (modeling_parallelflow/tokenizer.py) on the training split
   only, save it, and write train.npy / val.npy (uint16 ids, eos after every document: the token-file format
   of modeling_parallelflow/pretrain_data.py) and manifest.json (sources, counts, bytes, tokens, checksums).

    python benchmarks/quality/text_corpus.py DIR_OR_FILE ... -o data/prose --vocab-size 16384
    parallelflow train data/prose/train.npy -o runs/r1 --config CONFIG.json ...
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import html
import json
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

SUFFIXES = {".txt", ".text", ".md", ".rst", ".pod", ".html", ".htm"}
_TAG = re.compile(r"<(script|style)\b.*?</\1\s*>|<!--.*?-->|<[^>]+>", re.S | re.I)
_BLANKS = re.compile(r"\n[ \t]*(\n[ \t]*)+")
_TRAILING = re.compile(r"[ \t]+\n")


def source_files(paths: list[Path]) -> list[Path]:
    """Every readable text file under `paths` (files taken as given), sorted, without repeats."""
    found: set[Path] = set()
    for path in paths:
        if path.is_dir():
            candidates = (p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            candidates = iter([path])
        else:
            raise FileNotFoundError(f"no such file or directory: {path}")
        for p in candidates:
            name = p.name[:-3] if p.name.endswith(".gz") else p.name
            if Path(name).suffix.lower() in SUFFIXES:
                found.add(p.resolve())
    return sorted(found)


def read_document(path: Path) -> str:
    """The normalised text of one file ('' when it is not UTF-8 or Latin-1 text)."""
    data = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
    if b"\0" in data:
        return ""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    if Path(path.name.removesuffix(".gz")).suffix.lower() in {".html", ".htm"}:
        text = html.unescape(_TAG.sub(" ", text))
        text = "\n".join(" ".join(line.split()) for line in text.splitlines())
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _TRAILING.sub("\n", text)
    return _BLANKS.sub("\n\n", text).strip()


def deduplicated(files: list[Path], min_chars: int, min_paragraph_chars: int) -> Iterator[tuple[Path, str]]:
    """(path, text) of the documents that survive document- and paragraph-level exact deduplication."""
    seen_docs: set[bytes] = set()
    seen_paragraphs: set[bytes] = set()
    for path in files:
        text = read_document(path)
        digest = hashlib.sha256(text.encode()).digest()
        if len(text) < min_chars or digest in seen_docs:
            continue
        seen_docs.add(digest)
        kept = []
        for paragraph in text.split("\n\n"):
            if len(paragraph) >= min_paragraph_chars:
                key = hashlib.sha256(" ".join(paragraph.split()).lower().encode()).digest()
                if key in seen_paragraphs:
                    continue
                seen_paragraphs.add(key)
            kept.append(paragraph)
        text = "\n\n".join(kept)
        if len(text) >= min_chars:
            yield path, text


def is_heldout(text: str, val_percent: float) -> bool:
    value = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
    return value < val_percent / 100 * 2**64


def build(args: argparse.Namespace) -> dict:
    import numpy as np

    from modeling_parallelflow.pretrain_data import tokenize_to_file
    from modeling_parallelflow.tokenizer import build_tokenizer

    start = time.perf_counter()
    files = source_files(args.inputs)
    if not files:
        raise SystemExit(f"no text files ({', '.join(sorted(SUFFIXES))}, optionally .gz) under {args.inputs}")
    train, val, sources = [], [], []
    for path, text in deduplicated(files, args.min_chars, args.min_paragraph_chars):
        (val if is_heldout(text, args.val_percent) else train).append(text)
        sources.append(str(path))
    if not train or not val:
        raise SystemExit(f"{len(train)} training and {len(val)} held-out documents: need both; add text")
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(train, vocab_size=args.vocab_size, model_max_length=args.max_len)
    tokenizer.save_pretrained(out / "tokenizer")
    counts = {}
    for split, texts in (("train", train), ("val", val)):
        path = out / f"{split}.npy"
        tokens = tokenize_to_file(tokenizer, texts, path)
        counts[split] = {
            "documents": len(texts),
            "chars": sum(map(len, texts)),
            "tokens": tokens,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        }
    ids = np.load(out / "val.npy", mmap_mode="r")
    manifest = {
        "inputs": [str(p) for p in args.inputs],
        "files_found": len(files),
        "documents_kept": len(sources),
        "val_percent": args.val_percent,
        "min_chars": args.min_chars,
        "min_paragraph_chars": args.min_paragraph_chars,
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "token_dtype": str(ids.dtype),
        "splits": counts,
        "seconds": round(time.perf_counter() - start, 1),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    (out / "sources.txt").write_text("\n".join(sources) + "\n")
    return manifest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", type=Path, help="text files or directories")
    p.add_argument("-o", "--output-dir", type=Path, required=True)
    p.add_argument(
        "--vocab-size", type=int, default=16384, help="BPE vocabulary, specials and bytes included"
    )
    p.add_argument("--val-percent", type=float, default=2.0, help="share of documents held out (default 2)")
    p.add_argument("--min-chars", type=int, default=200, help="drop documents shorter than this")
    p.add_argument(
        "--min-paragraph-chars", type=int, default=80, help="paragraphs this long are deduplicated"
    )
    p.add_argument("--max-len", type=int, default=2048, help="the tokenizer's model_max_length")
    args = p.parse_args(argv)
    if not 0 < args.val_percent < 100:
        p.error(f"--val-percent must lie in (0, 100), got {args.val_percent}")
    manifest = build(args)
    print(json.dumps(manifest["splits"], indent=1))
    print(
        f"{manifest['documents_kept']} of {manifest['files_found']} files kept; written to {args.output_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
