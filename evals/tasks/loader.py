"""Datasets of the bundled offline suite, built on the fly (no downloads, same docs on every machine).

lm-eval calls `load` through `custom_dataset: !function loader.load` in each task YAML, with the task's
`dataset_kwargs` plus the run's metadata (model args such as `pretrained`, which are ignored). Every task
names its generator and parameters under the single key `pflow_spec`, so they cannot collide with metadata.

Generators are seeded from their parameters with `random.Random(str)` (stable across Python versions and
processes), so a task's docs depend only on its YAML. Shipped data sits in `data/` next to this file.
"""

from __future__ import annotations

import json
import random
import string
from itertools import product
from pathlib import Path

import datasets

DATA_DIR = Path(__file__).resolve().parent / "data"

_KEYS = ["".join(pair) for pair in product(string.ascii_lowercase, repeat=2)]  # 676 two-letter keys
_VALUES = [f"{n:02d}" for n in range(100)]  # 100 two-digit values
_MQAR_CHOICES = 4

_PASSKEY_INTRO = (
    "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the pass key.\n"
)
_PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
_PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"

_OPENERS = [("(", ")"), ("[", "]"), ("{", "}")]
_NAMES = ["x", "y", "data", "items", "value", "key", "node", "result", "self.cache", "args", "config"]


def _rng(*parts: object) -> random.Random:
    return random.Random("/".join(map(str, parts)))


def mqar_docs(kv_pairs: int, items: int, docs: int = 100, seed: int = 0) -> list[dict]:
    """Multi-query associative recall as text: `kv_pairs` pairs `ab:17`, filler words, then every key is
    queried once (`ab:17`, answers given) and the LAST query is scored.

    `items` counts whitespace-separated items of the whole doc (pairs + filler + queries). The scored key's
    pair sits at a uniformly random place among the pairs and was never queried before, so only recall of the
    binding from the pair section answers it. Choices: its value and 3 values of other pairs of the same doc
    (all present in the context, so copying any in-context value scores chance, 1/4).
    """
    if kv_pairs < _MQAR_CHOICES:
        raise ValueError(f"kv_pairs must be >= {_MQAR_CHOICES}, got {kv_pairs}")
    if kv_pairs > len(_VALUES):
        raise ValueError(f"kv_pairs must be <= {len(_VALUES)} (distinct two-digit values), got {kv_pairs}")
    if items < 2 * kv_pairs:
        raise ValueError(f"items must be >= 2 * kv_pairs = {2 * kv_pairs} (pairs + queries), got {items}")
    rng = _rng("mqar", kv_pairs, items, seed)
    out = []
    for _ in range(docs):
        keys = rng.sample(_KEYS, kv_pairs)
        values = rng.sample(_VALUES, kv_pairs)
        pairs = [f"{k}:{v}" for k, v in zip(keys, values, strict=True)]
        filler = ["".join(rng.choices(string.ascii_lowercase, k=4)) for _ in range(items - 2 * kv_pairs)]
        order = rng.sample(range(kv_pairs), kv_pairs)
        answered = [pairs[i] for i in order[:-1]]
        target = order[-1]
        distractors = rng.sample([values[i] for i in range(kv_pairs) if i != target], _MQAR_CHOICES - 1)
        choices = [values[target], *distractors]
        rng.shuffle(choices)
        lines = [" ".join(pairs), " ".join(filler), " ".join([*answered, f"{keys[target]}:"])]
        out.append(
            {
                "context": "\n".join(line for line in lines if line),
                "choices": choices,
                "gold": choices.index(values[target]),
                "key_position": target,
            }
        )
    return out


def passkey_docs(chars: int, docs: int = 20, seed: int = 0) -> list[dict]:
    """Passkey retrieval: a 5-digit key hidden in about `chars` characters of repeated filler.

    The key's depth (fraction of the filler before it) runs evenly over (0, 1) across the docs.
    """
    repeats = max(1, round((chars - len(_PASSKEY_INTRO) - len(_PASSKEY_QUESTION)) / len(_PASSKEY_FILLER)))
    rng = _rng("passkey", chars, seed)
    out = []
    for i in range(docs):
        depth = (i + 0.5) / docs
        key = str(rng.randint(10000, 99999))
        before = round(depth * repeats)
        needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
        text = (
            _PASSKEY_INTRO
            + _PASSKEY_FILLER * before
            + needle
            + _PASSKEY_FILLER * (repeats - before)
            + _PASSKEY_QUESTION
        )
        out.append({"context": text, "answer": key, "depth": depth})
    return out


def bracket_docs(docs: int = 200, seed: int = 0) -> list[dict]:
    """Close the brackets of a Python expression: 4 choices, same closers in different orders or kinds."""
    rng = _rng("brackets", seed)
    out = []
    for _ in range(docs):
        depth = rng.randint(2, 4)
        opened = [rng.choice(_OPENERS) for _ in range(depth)]
        parts = []
        for opener, _ in opened:
            name = rng.choice(_NAMES)
            if opener == "(":
                parts.append(f"{name}(")
            elif opener == "[":
                parts.append(f"{name}[" if rng.random() < 0.5 else "[")
            else:
                parts.append(f"{{'{name}': ")
        context = f"{rng.choice(_NAMES[:8])} = " + "".join(parts) + str(rng.randint(0, 99))
        correct = "".join(closer for _, closer in reversed(opened))
        # Hard distractors first (same closers, wrong order), then random closers of the same length.
        wrong = list(dict.fromkeys(c for c in (correct[::-1], correct[1:] + correct[0]) if c != correct))
        while len(wrong) < 3:
            candidate = "".join(rng.choice(")]}") for _ in correct)
            if candidate != correct and candidate not in wrong:
                wrong.append(candidate)
        choices = [correct, *wrong[:3]]
        rng.shuffle(choices)
        out.append({"context": context, "choices": choices, "gold": choices.index(correct)})
    return out


def heldout_docs(file: str) -> list[dict]:
    """The shipped JSONL `data/<file>` ({"source", "text"} per line)."""
    path = DATA_DIR / file
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


GENERATORS = {"mqar": mqar_docs, "passkey": passkey_docs, "brackets": bracket_docs, "heldout": heldout_docs}


def load(pflow_spec: dict | None = None, **_metadata) -> datasets.DatasetDict:
    """`custom_dataset` entry point: {"test": docs of GENERATORS[pflow_spec["kind"]](**rest)}."""
    if not pflow_spec or "kind" not in pflow_spec:
        raise ValueError(
            f"dataset_kwargs.pflow_spec must name a 'kind' of {sorted(GENERATORS)}, got {pflow_spec!r}"
        )
    params = dict(pflow_spec)
    kind = params.pop("kind")
    if kind not in GENERATORS:
        raise ValueError(f"pflow_spec kind must be one of {sorted(GENERATORS)}, got {kind!r}")
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(GENERATORS[kind](**params))})
