"""Token files for `parallelflow train` and the packed micro-batches cut from them.

A token file is one flat stream of token ids in which every document is followed by the tokenizer's eos id:
- `.npy`: a 1-D numpy array of dtype uint16, uint32 or int32 (the header gives the dtype);
- `.bin` (any other suffix): the same ids as raw little-endian integers with no header, dtype given by the
  reader (uint16 by default, as nanoGPT writes them).
uint16 holds vocabularies up to 65,536 ids; `write_token_file` picks uint32 above that. Files are read through
a memory map, so they may be larger than RAM.

Make one from text with the project's tokenizer (a `save_pretrained` tokenizer folder):

    python -m modeling_parallelflow.pretrain_data TOKENIZER_DIR corpus.npy a.txt b.txt docs.jsonl

(a .txt file is one document; a .jsonl file holds one document per line in its "text" field).
"""

from __future__ import annotations

import argparse
import json
import os
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

TOKEN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32, "int32": np.int32}
IGNORE_INDEX = -100


def token_dtype_for(vocab_size: int) -> type[np.unsignedinteger]:
    """uint16 when every id of a `vocab_size` vocabulary fits, else uint32."""
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def write_token_file(path: str | os.PathLike, token_ids: np.ndarray | Sequence[int], vocab_size: int) -> Path:
    """Write `token_ids` as a token file (`.npy` with a header, anything else raw); atomic (temp, rename)."""
    path = Path(path)
    ids = np.asarray(token_ids)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError(f"token_ids must be a non-empty 1-D sequence, got shape {ids.shape}")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got [{ids.min()}, {ids.max()}]")
    ids = ids.astype(token_dtype_for(vocab_size))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            if path.suffix == ".npy":
                np.save(f, ids)
            else:
                f.write(ids.astype(ids.dtype.newbyteorder("<")).tobytes())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_token_file(path: str | os.PathLike, dtype: str = "uint16") -> np.ndarray:
    """Memory-map a token file: a 1-D integer array. `dtype` applies to raw files only."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such token file: {path}")
    if path.suffix == ".npy":
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
        if tokens.ndim != 1 or tokens.dtype not in [np.dtype(t) for t in TOKEN_DTYPES.values()]:
            raise ValueError(
                f"{path} must hold a 1-D array of {', '.join(TOKEN_DTYPES)}, "
                f"got {tokens.ndim}-D {tokens.dtype}"
            )
        return tokens
    if dtype not in TOKEN_DTYPES:
        raise ValueError(f"token dtype must be one of {', '.join(TOKEN_DTYPES)}, got {dtype!r}")
    item = np.dtype(TOKEN_DTYPES[dtype]).newbyteorder("<")
    size = path.stat().st_size
    if size == 0 or size % item.itemsize:
        raise ValueError(f"{path} has {size} bytes, not a whole number of {dtype} token ids")
    return np.memmap(path, dtype=item, mode="r")


def pack_boundaries(ids: np.ndarray, eos_token_id: int, max_doc_len: int) -> np.ndarray:
    """cu_seqlens [N + 1] for a chunk of the stream: a document ends after each eos, and documents longer
    than `max_doc_len` are cut into pieces of at most that many tokens."""
    length = len(ids)
    ends = np.flatnonzero(ids == eos_token_id) + 1
    bounds = np.unique(np.concatenate([[0], ends[ends < length], [length]]))
    sizes = np.diff(bounds)
    pieces = -(-sizes // max_doc_len)  # ceil
    offset_in_doc = np.arange(pieces.sum()) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    starts = np.repeat(bounds[:-1], pieces) + offset_in_doc * max_doc_len
    return np.append(starts, length)


class PackedBatches:
    """Micro-batch `i` (any i >= 0) of `tokens_per_batch` consecutive tokens of the stream, packed.

    The stream is cut into `num_chunks` chunks; epoch e = i // num_chunks visits them in a random order seeded
    by (seed, e) (or in file order without `shuffle`), so the batch of an index never depends on what ran
    before: resuming at step s only needs s. Items: input_ids [1, T] int64, labels [1, T] with the first
    token of every packed document set to -100 (its state is reset, so the previous document's last token
    does not predict it), cu_seqlens [N + 1] int32.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        tokens_per_batch: int,
        *,
        eos_token_id: int,
        max_doc_len: int,
        vocab_size: int,
        seed: int = 0,
        shuffle: bool = True,
    ):
        if tokens_per_batch < 2:
            raise ValueError(f"tokens per micro-batch must be >= 2, got {tokens_per_batch}")
        if max_doc_len < 1:
            raise ValueError(f"max_doc_len must be >= 1, got {max_doc_len}")
        self.num_chunks = len(tokens) // tokens_per_batch
        if self.num_chunks == 0:
            raise ValueError(
                f"the token file holds {len(tokens)} tokens, fewer than one micro-batch of {tokens_per_batch}"
            )
        self.tokens = tokens
        self.tokens_per_batch = tokens_per_batch
        self.eos_token_id = eos_token_id
        self.max_doc_len = max_doc_len
        self.vocab_size = vocab_size
        self.seed = seed
        self.shuffle = shuffle
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, chunk permutation)

    def chunk_of(self, index: int) -> int:
        epoch, position = divmod(index, self.num_chunks)
        if not self.shuffle:
            return position
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_chunks))
        return int(self._order[1][position])

    def __getitem__(self, index: int) -> dict:
        import torch

        if index < 0:
            raise IndexError(f"micro-batch index must be >= 0, got {index}")
        start = self.chunk_of(index) * self.tokens_per_batch
        ids = np.asarray(self.tokens[start : start + self.tokens_per_batch], dtype=np.int64)
        if ids.max() >= self.vocab_size:
            raise ValueError(
                f"token id {ids.max()} at tokens {start}..{start + len(ids)} of the token file is outside "
                f"the model's vocabulary of {self.vocab_size}"
            )
        cu_seqlens = pack_boundaries(ids, self.eos_token_id, self.max_doc_len)
        labels = ids.copy()
        labels[cu_seqlens[1:-1]] = IGNORE_INDEX
        return {
            "input_ids": torch.from_numpy(ids)[None],
            "labels": torch.from_numpy(labels)[None],
            "cu_seqlens": torch.from_numpy(cu_seqlens.astype(np.int32)),
        }


def iter_documents(paths: Iterable[str | os.PathLike]) -> Iterator[str]:
    """Documents of text files: a .jsonl file gives the "text" field of each line, any other file itself."""
    for path in map(Path, paths):
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if line.strip():
                        record = json.loads(line)
                        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                            raise ValueError(f'{path}:{number}: expected an object with a "text" string')
                        yield record["text"]
        else:
            yield path.read_text(encoding="utf-8")


def tokenize_to_file(tokenizer, texts: Iterable[str], path: str | os.PathLike, batch_size: int = 256) -> int:
    """Tokenize `texts` (no special tokens; eos after each document) into the token file `path`.
    Returns the number of tokens. The stream is built in memory: shard corpora larger than RAM."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token to end documents with")
    parts: list[np.ndarray] = []
    batch: list[str] = []

    def flush() -> None:
        for ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
            parts.append(np.asarray([*ids, tokenizer.eos_token_id], dtype=np.int64))
        batch.clear()

    for text in texts:
        batch.append(text)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if not parts:
        raise ValueError("no documents to tokenize")
    tokens = np.concatenate(parts)
    write_token_file(path, tokens, len(tokenizer))
    return len(tokens)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m modeling_parallelflow.pretrain_data",
        description="Tokenize text files into a token file for `parallelflow train`.",
    )
    parser.add_argument("tokenizer", help="tokenizer folder (save_pretrained) or Hub id")
    parser.add_argument("output", help="token file to write: .npy (with header) or .bin (raw)")
    parser.add_argument("texts", nargs="+", help=".txt files (one document each) or .jsonl (one per line)")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    count = tokenize_to_file(tokenizer, iter_documents(args.texts), args.output)
    dtype = np.dtype(token_dtype_for(len(tokenizer))).name
    print(f"wrote {count} tokens ({dtype}) to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
