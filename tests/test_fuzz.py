"""Tier 1 (CPU) fuzz tests, seeded and time-bounded: the public op (torch backend) on random valid inputs
against the float64 token loop, random bad op arguments and random bad PFlowConfig fields.

Every case is tallied as a clear error (ValueError / TypeError whose message names the argument or field),
a correct result (matches the float64 loop), or other (anything else: must be none). Case i is drawn from
its own seed, so a failure names a case that can be rerun alone. `python -m pytest -s tests/test_fuzz.py`
prints the tallies.
"""

import math
import random
import re
import time
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F

from modeling_parallelflow import PFlowConfig, PFlowForCausalLM
from modeling_parallelflow import configuration_parallelflow as cfg
from modeling_parallelflow.ops import ALGORITHMS, MODES, delta_rule, delta_rule_drivers
from modeling_parallelflow.ops_reference import delta_rule_reference

SEED = 14
F64 = torch.float64
# Measured over 300 of these cases (outputs and states up to ~6): max error against the float64 loop 7e-6 in
# float32 (rounding of the inputs and of the chunked products), 3e-14 in float64.
TOLERANCES = {torch.float32: dict(atol=5e-5, rtol=5e-5), F64: dict(atol=1e-10, rtol=1e-10)}


@dataclass
class Tally:
    name: str
    tried: int = 0
    clear_error: int = 0
    correct: int = 0
    other: list[str] = field(default_factory=list)

    def check(self, minimum: int) -> None:
        print(
            f"\n[fuzz] {self.name}: tried {self.tried}, clear error {self.clear_error}, "
            f"correct result {self.correct}, other {len(self.other)}"
        )
        assert not self.other, "\n".join(self.other[:20])
        assert self.tried >= minimum, f"only {self.tried} cases ran before the deadline"
        assert self.tried == self.clear_error + self.correct


TALLIES: list[Tally] = []


@pytest.fixture(scope="module", autouse=True)
def _summary():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead (and stall on a loaded machine)
    yield
    torch.set_num_threads(threads)
    totals = [sum(getattr(t, k) for t in TALLIES) for k in ("tried", "clear_error", "correct")]
    print(
        f"\n[fuzz] total: tried {totals[0]}, clear error {totals[1]}, correct result {totals[2]}, "
        f"other {sum(len(t.other) for t in TALLIES)}"
    )


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    monkeypatch.delenv("PFLOW_KERNEL_BACKEND", raising=False)  # backend="auto" means torch on CPU tensors


def new_tally(name: str) -> Tally:
    TALLIES.append(Tally(name))
    return TALLIES[-1]


def cases(count: int, seconds: float):
    """(index, random.Random) for up to `count` cases, stopping once `seconds` have passed."""
    deadline = time.monotonic() + seconds
    for i in range(count):
        if time.monotonic() > deadline:
            return
        torch.manual_seed(SEED * 100_000 + i)
        yield i, random.Random(SEED * 100_000 + i)


def expect_correct(tally: Tally, label: str, fn) -> None:
    """fn() returns None when the result is correct, else what is wrong; raising counts as wrong too."""
    tally.tried += 1
    try:
        problem = fn()
    except Exception as err:  # noqa: BLE001 - any exception on a valid input is "other"
        problem = f"{type(err).__name__}: {err}"
    if problem is None:
        tally.correct += 1
    else:
        tally.other.append(f"{label}: {problem}")


def expect_clear_error(tally: Tally, label: str, fn, names: tuple[str, ...]) -> None:
    """fn() must raise ValueError or TypeError whose message names one of `names` (as a whole word)."""
    tally.tried += 1
    try:
        fn()
    except (ValueError, TypeError) as err:
        if any(re.search(rf"(?<![\w.]){re.escape(n)}\b", str(err)) for n in names):
            tally.clear_error += 1
        else:
            tally.other.append(f"{label}: {type(err).__name__} naming none of {names}: {err}")
    except Exception as err:  # noqa: BLE001 - any other exception is what the tally counts as "other"
        tally.other.append(f"{label}: {type(err).__name__}: {err}")
    else:
        tally.other.append(f"{label}: accepted, expected an error naming {names}")


# ---------------------------------------------------------------------------------------------- valid inputs


def random_inputs(rng: random.Random) -> tuple[dict, dict]:
    """Random valid arguments of `delta_rule` (or, for api="drivers", of `delta_rule_drivers`) and the case
    description. Unit keys and beta in (0, 1) (divided by R in sum mode) keep the state bounded."""
    dtype = rng.choice([torch.float32, F64])
    packed = rng.random() < 0.35
    batch = 1 if packed else rng.randint(1, 3)
    seq_len = rng.choice([1, 2, rng.randint(3, 40)])
    heads, rank = rng.randint(1, 3), rng.choice([1, 1, 2, 3, 4, rng.randint(5, 8)])
    k_dim, v_dim = rng.randint(1, 12), rng.randint(1, 12)
    mode = rng.choice(MODES)
    desc = dict(api=rng.choice(["delta_rule"] * 4 + ["drivers"]), B=batch, T=seq_len, H=heads, R=rank)
    desc |= dict(K=k_dim, V=v_dim, dtype=str(dtype)[6:], mode=mode)

    def make(*shape):
        """Normal samples in float64 [B, T, H, ...]; sometimes a non-contiguous view of [B, H, T, ...]."""
        if rng.random() < 0.15:
            return torch.randn(shape[0], shape[2], shape[1], *shape[3:], dtype=F64).transpose(1, 2)
        return torch.randn(*shape, dtype=F64)

    q = make(batch, seq_len, heads, k_dim)
    k = F.normalize(make(batch, seq_len, heads, rank, k_dim), dim=-1)
    v = make(batch, seq_len, heads, rank, v_dim)
    beta = torch.rand(batch, seq_len, heads, rank, dtype=F64) / (rank if mode == "sum" else 1)
    kwargs = dict(mode=mode, algorithm=rng.choice(ALGORITHMS), backend=rng.choice(["torch", "auto"]))
    # C * R rows per chunk: the torch path solves [C*R, C*R] systems, so large chunks only at small ranks
    kwargs["chunk_size"] = rng.choice([16, 16, 32, 64] + ([128, 256] if rank <= 2 else []))
    kwargs["output_final_state"] = rng.random() < 0.7
    kwargs["scale"] = rng.choice([None, None, 1, rng.uniform(0.1, 2.0)])
    n_seq = batch
    if packed:
        n_seq = rng.randint(1, 4)
        cuts = sorted(rng.randint(0, seq_len) for _ in range(n_seq - 1))  # empty sequences allowed
        int_type = rng.choice([torch.int32, torch.int64])
        kwargs["cu_seqlens"] = torch.tensor([0, *cuts, seq_len], dtype=int_type)
    if rng.random() < 0.5:
        kwargs["initial_state"] = 0.5 * torch.randn(n_seq, heads, k_dim, v_dim, dtype=F64)
    tensors = dict(q=q, k=k, v=v, beta=beta)
    if desc["api"] == "drivers":
        bcol = beta[..., None]
        tensors = dict(q=q, a=-bcol * k, b=k, u=bcol * v)
    desc |= {n: kwargs[n] for n in ("algorithm", "chunk_size", "scale")}
    desc |= dict(cu_seqlens=kwargs.get("cu_seqlens"), h0="initial_state" in kwargs)
    beta_dtype = rng.choice([dtype, dtype, torch.float32, F64, torch.bfloat16])
    state_dtype = rng.choice([dtype, torch.float32, F64, torch.float16])
    args = {n: x.to(beta_dtype if n == "beta" else dtype) for n, x in tensors.items()}
    if "initial_state" in kwargs:
        kwargs["initial_state"] = kwargs["initial_state"].to(state_dtype)
    return args | kwargs, desc


def as_f64(args: dict) -> dict:
    return {
        n: t.to(F64) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for n, t in args.items()
    }


def reference(args: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 token loop on the same (dtype-rounded) inputs; drivers built as the op builds them."""
    x = as_f64(args)
    if "beta" in x:
        dtype = args["k"].dtype  # the op forms a = -beta k and u = beta v in k's and v's dtypes
        bcol = args["beta"][..., None]
        a, b, u = (-bcol * args["k"]).to(dtype).to(F64), x["k"], (bcol * args["v"]).to(dtype).to(F64)
    else:
        a, b, u = x["a"], x["b"], x["u"]
    scale = x["scale"] if x["scale"] is not None else x["q"].shape[-1] ** -0.5
    return delta_rule_reference(
        x["q"],
        a,
        b,
        u,
        mode=x["mode"],
        scale=float(scale),
        initial_state=x.get("initial_state"),
        output_final_state=True,
        cu_seqlens=x.get("cu_seqlens"),
        dtype=F64,
    )


def run_op(args: dict):
    if "beta" in args:
        return delta_rule(**args)
    return delta_rule_drivers(**args)


def check_valid_case(args: dict) -> str | None:
    """None if the op's output and final state match the float64 loop (dtypes as documented), else why not."""
    o, final = run_op(args)
    o_ref, h_ref = reference(args)
    out_dtype = args["v" if "v" in args else "u"].dtype
    tol = TOLERANCES[out_dtype]
    if o.dtype != out_dtype or o.shape != o_ref.shape:
        return f"o is {o.dtype} {list(o.shape)}, expected {out_dtype} {list(o_ref.shape)}"
    err = (o.to(F64) - o_ref).abs().max().item()
    if not torch.allclose(o.to(F64), o_ref, **tol):
        return f"o differs from the float64 loop by {err:.3g}"
    if not args["output_final_state"]:
        return None if final is None else "final state returned although output_final_state=False"
    state_dtype = F64 if out_dtype == F64 else torch.float32
    if final is None or final.dtype != state_dtype or final.shape != h_ref.shape:
        return f"final state {None if final is None else (final.dtype, list(final.shape))}"
    if not torch.allclose(final.to(F64), h_ref, **tol):
        return f"final state differs by {(final.to(F64) - h_ref).abs().max().item():.3g}"
    return None


def test_fuzz_valid_inputs_match_the_float64_loop():
    tally = new_tally("op, valid inputs vs float64 loop")
    for i, rng in cases(400, seconds=5.0):
        args, desc = random_inputs(rng)
        expect_correct(tally, f"case {i} {desc}", lambda args=args: check_valid_case(args))
    tally.check(minimum=20)


def test_fuzz_gradients_match_the_float64_loop():
    """float64 gradients of every input (initial state included) against autograd through the token loop."""
    tally = new_tally("op, gradients vs float64 loop")

    def check(args: dict) -> str | None:
        leaves = [n for n in ("q", "k", "v", "beta", "a", "b", "u", "initial_state") if n in args]
        args = as_f64(args) | {n: args[n].to(F64).requires_grad_() for n in leaves}
        args["output_final_state"] = True
        o, h = run_op(args)
        o_ref, h_ref = reference(args)
        w_o, w_h = torch.randn_like(o_ref), torch.randn_like(h_ref)
        got = torch.autograd.grad((o * w_o).sum() + (h * w_h).sum(), [args[n] for n in leaves])
        ref = torch.autograd.grad((o_ref * w_o).sum() + (h_ref * w_h).sum(), [args[n] for n in leaves])
        close = [torch.allclose(g, r, **TOLERANCES[F64]) for g, r in zip(got, ref, strict=True)]
        bad = [n for n, ok in zip(leaves, close, strict=True) if not ok]
        return f"gradients of {bad} differ from the float64 loop's" if bad else None

    for i, rng in cases(60, seconds=4.0):
        args, desc = random_inputs(rng)
        expect_correct(tally, f"case {i} {desc}", lambda args=args: check(args))
    tally.check(minimum=5)


def test_fuzz_nan_stays_in_its_sequence():
    """NaN inputs are not rejected (that would cost a host sync per call); they must not leak into the
    other batch rows or packed sequences, which stay equal to the float64 loop."""
    tally = new_tally("op, NaN in one sequence")
    for i, rng in cases(80, seconds=2.0):
        args, desc = random_inputs(rng)
        n_seq = args["q"].shape[0] if args.get("cu_seqlens") is None else args["cu_seqlens"].numel() - 1
        if n_seq < 2:
            continue
        bounds = None if args.get("cu_seqlens") is None else args["cu_seqlens"].tolist()
        hit = rng.randrange(n_seq)
        names = [n for n in ("q", "k", "v", "beta", "a", "b", "u") if n in args]
        name = rng.choice(names + (["initial_state"] if "initial_state" in args else []))
        x = args[name].clone()
        if name == "initial_state":
            x[hit, ..., 0, 0] = math.nan
        elif bounds is None:
            x[hit, rng.randrange(x.shape[1])] = math.nan
        elif bounds[hit] == bounds[hit + 1]:
            continue  # an empty sequence has no token to poison
        else:
            x[0, rng.randrange(bounds[hit], bounds[hit + 1])] = math.nan
        o_ref, h_ref = reference(args)  # of the clean inputs
        args[name] = x
        keep = [n for n in range(n_seq) if n != hit]
        rows = None if bounds is None else [t for n in keep for t in range(bounds[n], bounds[n + 1])]

        def check(args=args, keep=keep, rows=rows, o_ref=o_ref, h_ref=h_ref) -> str | None:
            o, final = run_op(args)
            tol = TOLERANCES[o.dtype]
            o_kept, o_ref_kept = (o[keep], o_ref[keep]) if rows is None else (o[:, rows], o_ref[:, rows])
            ok = torch.allclose(o_kept.to(F64), o_ref_kept, **tol)
            if args["output_final_state"]:
                ok = ok and torch.allclose(final[keep].to(F64), h_ref[keep], **tol)
            return None if ok else "the NaN reached another sequence"

        expect_correct(tally, f"case {i} {desc}, NaN in {name} of sequence {hit}", check)
    tally.check(minimum=5)


# ------------------------------------------------------------------------------------------ bad op arguments

LETTERS = {"q": "BTHK", "k": "BTHRK", "v": "BTHRV", "beta": "BTHR", "a": "BTHRK", "b": "BTHRK", "u": "BTHRV"}
LETTERS["initial_state"] = "NHKV"


def random_bad_case(rng: random.Random, args: dict) -> tuple[str, dict, tuple[str, ...]]:
    """One mutation of valid arguments: (label, bad arguments, names an error may name)."""
    tensors = [n for n in ("q", "k", "v", "beta", "a", "b", "u") if n in args]
    if "initial_state" in args:
        tensors.append("initial_state")
    name = rng.choice(tensors)
    x = args[name]
    kind = rng.choice(
        ["dims", "size", "empty", "dtype", "mixed-dtype", "not-tensor", "device"] * 2
        + ["cu_seqlens", "initial_state", "choice", "scale", "chunk_size", "output_final_state", "triton-cpu"]
    )
    bad = dict(args)
    if kind == "dims":
        bad[name] = x[..., 0] if rng.random() < 0.5 else x[..., None]
        return f"{name} with {bad[name].dim()} dims", bad, (name,)
    if kind == "size":  # a size another argument also has (V is free without an initial state, say)
        shared = [
            d for d, c in enumerate(LETTERS[name]) if any(c in LETTERS[n] for n in tensors if n != name)
        ]
        dim = rng.choice(shared)
        letter = LETTERS[name][dim]
        grown = x.narrow(dim, 0, 1).expand(*x.shape[:dim], rng.randint(1, 3), *x.shape[dim + 1 :])
        bad[name] = torch.cat([x, grown], dim)
        sharing = tuple(n for n in LETTERS if n in args and letter in LETTERS[n])
        return f"{name} {letter} + {grown.shape[dim]}", bad, sharing  # which one is named depends on order
    if kind == "empty":
        dim = rng.randrange(x.dim())
        bad[name] = x.narrow(dim, 0, 0)
        sharing = tuple(n for n in LETTERS if n in args and LETTERS[name][dim] in LETTERS[n])
        return f"{name} empty dim {dim}", bad, sharing
    if kind == "dtype":
        dtype = rng.choice([torch.int64, torch.int32, torch.bool, torch.complex64, torch.uint8])
        bad[name] = x.to(dtype) if not dtype.is_complex else torch.complex(x.float(), x.float())
        return f"{name} {dtype}", bad, (name,)
    if kind == "mixed-dtype":
        same = [n for n in tensors if n not in ("beta", "initial_state")]
        name = rng.choice(same)
        other = {torch.float32: F64, F64: torch.float32}[args[name].dtype]
        bad[name] = args[name].to(rng.choice([other, torch.float16, torch.bfloat16]))
        return f"{name} {bad[name].dtype} vs the others", bad, (name,)
    if kind == "not-tensor":
        bad[name] = rng.choice(
            [x.tolist(), x.double().numpy(), 1.0, "q"] + ([None] if name != "initial_state" else [])
        )
        return f"{name} as {type(bad[name]).__name__}", bad, (name,)
    if kind == "device":
        bad[name] = x.to("meta")
        return f"{name} on meta", bad, (name, "q")
    if kind == "cu_seqlens":
        t_len = args["q"].shape[1]
        packed = args["q"].shape[0] == 1
        options = [
            torch.tensor([0, -1, t_len]),
            torch.tensor([-t_len, t_len]),
            torch.tensor([0, t_len, 0, t_len]),
            torch.tensor([0, t_len + 1]),
            torch.tensor([1, t_len]),
            torch.tensor([0.0, t_len]),
            torch.tensor([[0, t_len]]),
            torch.tensor([0]),
            torch.tensor([], dtype=torch.int64),
            [0, t_len],
            torch.tensor([0, t_len], device="meta"),
        ]
        if not packed:
            options.append(torch.tensor([0, t_len]))  # B > 1
        bad["cu_seqlens"] = rng.choice(options)
        return f"cu_seqlens={bad['cu_seqlens']!r}", bad, ("cu_seqlens",)
    if kind == "initial_state":
        cu_seqlens = args.get("cu_seqlens")
        n, h = args["q"].shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1, args["q"].shape[2]
        k, v = args["q"].shape[-1], args["v" if "v" in args else "u"].shape[-1]
        shapes = [
            (n + 1, h, k, v),
            (n, h + 1, k, v),
            (n, h, k + 1, v),
            (n, h, k, v + 2),
            (h, k, v),
            (1, n, h, k, v),
        ]
        bad["initial_state"] = rng.choice(
            [
                torch.zeros(*rng.choice(shapes)),
                torch.zeros(n, h, k, v, dtype=torch.int64),
                torch.zeros(n, h, k, v, device="meta"),
            ]
        )
        return f"initial_state {list(bad['initial_state'].shape)}", bad, ("initial_state",)
    if kind == "choice":
        option = rng.choice(["mode", "algorithm", "backend"])
        valid = {"mode": MODES, "algorithm": ALGORITHMS, "backend": ("auto", "triton", "torch")}[option]
        word = rng.choice(valid)
        bad[option] = rng.choice(
            [word.upper(), f" {word}", word[:-1], "", "".join(rng.sample("abcdefgh", 4)), None, 1, [word]]
        )
        return f"{option}={bad[option]!r}", bad, (option,)
    if kind == "scale":
        bad["scale"] = rng.choice(
            [0, -1, -0.5, math.nan, math.inf, -math.inf, "1", True, 1j, torch.tensor(1.0)]
        )
        return f"scale={bad['scale']!r}", bad, ("scale",)
    if kind == "chunk_size":
        bad["chunk_size"] = rng.choice(
            [0, -16, 1, 2, 4, 8, rng.randint(9, 15), 48, 100, 16.0, "64", True, None]
        )
        return f"chunk_size={bad['chunk_size']!r}", bad, ("chunk_size",)
    if kind == "output_final_state":
        bad["output_final_state"] = rng.choice([1, 0, "yes", None, torch.tensor(True)])
        return f"output_final_state={bad['output_final_state']!r}", bad, ("output_final_state",)
    bad["backend"] = "triton"
    return "backend='triton' with CPU tensors", bad, ("backend",)


def test_fuzz_bad_arguments_give_clear_errors(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors with backend="triton" must be refused
    tally = new_tally("op, bad arguments")
    for i, rng in cases(1500, seconds=2.5):
        args, desc = random_inputs(rng)
        label, bad, names = random_bad_case(rng, args)
        expect_clear_error(tally, f"case {i} {label}", lambda bad=bad: run_op(bad), names)
    args = random_inputs(random.Random(SEED))[0] | dict(backend="auto")
    for env in ("gpu", "Triton!", "1", "triton"):  # "triton" with CPU tensors
        monkeypatch.setenv("PFLOW_KERNEL_BACKEND", env)
        expect_clear_error(
            tally, f"PFLOW_KERNEL_BACKEND={env}", lambda: run_op(args), ("PFLOW_KERNEL_BACKEND",)
        )
    tally.check(minimum=100)


# ---------------------------------------------------------------------------------------- bad config fields

BASES = {
    "pflow": dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_heads=2),
    "hybrid": dict(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=3,
        num_heads=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        layer_types=["pflow", "attention", "sliding_attention"],
        sliding_window=4,
    ),
}


def random_bad_value(rng: random.Random, field_name: str, base: dict):
    """A bad value of `field_name` and the fields an error may name (divisibility names the other side)."""
    if field_name in cfg.SIZE_FIELDS:
        values = [
            0,
            -rng.randint(1, 100),
            str(rng.randint(1, 64)),
            float(rng.randint(1, 64)),
            True,
            [1],
            math.nan,
        ]
        if field_name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_heads",
            "max_position_embeddings",
        ):
            values.append(None)  # the other sizes take None as "the default"
        return rng.choice(values), (field_name,)
    if field_name in cfg.BOOL_FIELDS:
        return rng.choice([0, 1, "True", "false", None, 1.0, [True]]), (field_name,)
    if field_name in cfg.POSITIVE_REAL_FIELDS:
        return rng.choice([0, 0.0, -rng.random(), -1, math.nan, math.inf, -math.inf, "1e4", True, None]), (
            field_name,
        )
    if field_name in ("rank_mode", "flow", "algorithm", "kernel_backend", "hidden_act"):
        word = rng.choice(["sum", "euler", "auto", "torch", "silu"])
        return rng.choice([word.upper(), f"{word} ", "", "gelu", "cuda", None, 0, [word]]), (field_name,)
    if field_name == "rank":
        return rng.choice([0, -1, 9, rng.randint(10, 100), 2.0, "2", True, None]), (field_name,)
    if field_name == "conv_size":
        return rng.choice([0, -3, 17, 100, 4.0, "4", None]), (field_name,)
    if field_name == "chunk_size":
        non_pow2 = rng.choice([n for n in range(3, 300) if n & (n - 1)])
        return rng.choice([0, -16, 1, 2, 4, 8, non_pow2, 16.0, "64", None, True]), (field_name,)
    if field_name == "layer_types":
        n = base["num_hidden_layers"]
        options = [["pflow"] * (n + 1), ["pflow"] * (n - 1), ["pflow"] * (n - 1) + ["mamba"], "pflow"]
        options += [["pflow"] * (n - 1) + [None], ["Pflow"] * n, 3, {"pflow": n}]
        return rng.choice(options), (field_name,)
    if field_name == "sliding_window":
        values = [0, -4, 4.5, "4", True]
        if "sliding_attention" in base.get("layer_types", ()):
            values.append(None)
        return rng.choice(values), (field_name,)
    if field_name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        vocab = base["vocab_size"]
        values = [-1, -rng.randint(2, 10**6), vocab, vocab + rng.randint(1, 10**6), 1.0, "1", True]
        if field_name == "eos_token_id":
            values += [[], [1, vocab], [1, -1], [1, "2"], [None]]
        return rng.choice(values), (field_name,)
    if field_name == "head_dims_wide":
        return rng.randint(257, 4096), ("head_k_dim", "head_v_dim")
    if field_name == "hidden_not_divisible":
        return base["hidden_size"] + rng.choice([1, 3, 5]), ("num_heads", "num_attention_heads")
    raise AssertionError(field_name)


CONFIG_FIELDS = (
    *cfg.SIZE_FIELDS,
    *cfg.BOOL_FIELDS,
    *cfg.POSITIVE_REAL_FIELDS,
    "rank_mode",
    "flow",
    "algorithm",
    "kernel_backend",
    "hidden_act",
    "rank",
    "conv_size",
    "chunk_size",
    "layer_types",
    "sliding_window",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "head_dims_wide",
    "hidden_not_divisible",
)


def test_fuzz_bad_config_fields_give_clear_errors():
    tally = new_tally("PFlowConfig, bad fields")
    for i, rng in cases(1500, seconds=2.5):
        base_name = rng.choice(list(BASES))
        base = BASES[base_name]
        field_name = rng.choice(CONFIG_FIELDS)
        value, names = random_bad_value(rng, field_name, base)
        kwargs = dict(base)
        if field_name == "head_dims_wide":
            kwargs[rng.choice(["head_k_dim", "head_v_dim"])] = value
        elif field_name == "hidden_not_divisible":
            kwargs["hidden_size"] = value
        else:  # attention fields of a config without attention layers too: unused, but a bad value is refused
            kwargs[field_name] = value
        prefixed = tuple(f"PFlowConfig.{n}" for n in names)
        expect_clear_error(
            tally, f"case {i} {base_name} {field_name}={value!r}", lambda k=kwargs: PFlowConfig(**k), prefixed
        )
    tally.check(minimum=100)


def random_valid_config(rng: random.Random) -> PFlowConfig:
    layers = rng.randint(1, 3)
    heads = rng.randint(1, 4)
    attn_heads = rng.choice([1, 2, 4])
    kv_heads = rng.choice([d for d in (1, 2, 4) if attn_heads % d == 0])
    types = [rng.choice(cfg.LAYER_TYPES) for _ in range(layers)]
    vocab = rng.randint(8, 96)
    return PFlowConfig(
        vocab_size=vocab,
        hidden_size=heads * rng.choice([4, 8]),
        num_hidden_layers=layers,
        num_heads=heads,
        rank=rng.randint(1, 8),
        rank_mode=rng.choice(cfg.RANK_MODES),
        flow=rng.choice(cfg.FLOWS),
        allow_neg_eigval=rng.random() < 0.5,
        use_short_conv=rng.random() < 0.7,
        conv_size=rng.randint(1, 5),
        use_gate=rng.random() < 0.5,
        layer_types=types,
        num_attention_heads=attn_heads,
        num_key_value_heads=kv_heads,
        attention_head_dim=rng.choice([2, 4, 8]),
        sliding_window=rng.randint(1, 6) if "sliding_attention" in types or rng.random() < 0.3 else None,
        rope_theta=rng.choice([1.0, 100.0, 10000, 5e5]),
        attention_bias=rng.random() < 0.5,
        attention_output_bias=rng.random() < 0.5,
        attention_qk_norm=rng.random() < 0.5,
        intermediate_size=rng.randint(1, 40),
        chunk_size=rng.choice([16, 32, 64]),
        algorithm=rng.choice(ALGORITHMS),
        kernel_backend=rng.choice(["auto", "torch"]),
        norm_eps=rng.choice([1e-6, 1e-5, 0.1]),
        tie_word_embeddings=rng.random() < 0.5,
        pad_token_id=rng.choice([None, 0, vocab - 1]),
        bos_token_id=rng.choice([None, 1]),
        eos_token_id=rng.choice([None, 2, [2, vocab - 1]]),
    )


def test_fuzz_valid_configs_build_and_run():
    """Every config the validation accepts builds a model whose forward gives finite logits."""
    tally = new_tally("PFlowConfig, random valid configs run")

    def check(rng: random.Random) -> str | None:
        config = random_valid_config(rng)
        if PFlowConfig.from_dict(config.to_dict()).to_dict() != config.to_dict():
            return f"{config} does not round-trip through to_dict / from_dict"
        model = PFlowForCausalLM(config).eval()
        ids = torch.randint(0, config.vocab_size, (rng.randint(1, 2), rng.randint(1, 20)))
        with torch.no_grad():
            logits = model(ids).logits
        return None if torch.isfinite(logits).all() else f"non-finite logits from {config}"

    for i, rng in cases(60, seconds=3.0):
        expect_correct(tally, f"case {i}", lambda rng=rng: check(rng))
    tally.check(minimum=5)
