"""Tier 1 (CPU): PFlowConfig validation. Every field is checked on construction, on `from_pretrained`
overrides and on save, with a ValueError naming the field; chunk sizes and head widths are the ones both
kernel backends take."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from modeling_parallelflow import PFlowConfig
from modeling_parallelflow import configuration_parallelflow as cfg
from modeling_parallelflow.ops import delta_rule, valid_chunk_size

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.json"))
SMALL = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_heads=2)
HYBRID = SMALL | dict(layer_types=["pflow", "attention"])
SLIDING = SMALL | dict(layer_types=["pflow", "sliding_attention"], sliding_window=4)


def fields(config: PFlowConfig) -> dict:
    return {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}


# (base config, field, bad value); the error must start with "PFlowConfig.<field> must".
BAD = [
    *[(SMALL, f, v) for f in cfg.SIZE_FIELDS for v in (0, -1, "64", 64.0, True)],
    *[(SMALL, f, None) for f in ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads")],
    (SMALL, "max_position_embeddings", None),  # the other sizes take None as "the default"
    *[(SMALL, f, v) for f in cfg.BOOL_FIELDS for v in (1, 0, "true", None)],
    *[
        (SMALL, f, v)
        for f in cfg.POSITIVE_REAL_FIELDS
        for v in (0, -1.0, float("nan"), float("inf"), "1", True)
    ],
    *[(SMALL, "rank", v) for v in (0, 9, 2.0, "2", True)],
    *[
        (SMALL, f, v)
        for f in ("rank_mode", "flow", "algorithm", "kernel_backend", "hidden_act")
        for v in ("", "x")
    ],
    (SMALL, "rank_mode", "Sum"),
    (SMALL, "kernel_backend", ["torch"]),
    *[(SMALL, "conv_size", v) for v in (0, 17, 4.0)],
    *[(SMALL, "chunk_size", v) for v in (0, 1, 2, 4, 8, 12, 24, 48, 100, 16.0, "64", True, None)],
    *[(SMALL, "layer_types", v) for v in ("pflow", ["pflow"], ["pflow", "mamba"], ["pflow", None], 2)],
    *[(SMALL, "sliding_window", v) for v in (0, -4, 4.5, "4")],
    (SLIDING, "sliding_window", None),
    (HYBRID, "num_key_value_heads", 3),
    (HYBRID | dict(num_attention_heads=4), "num_key_value_heads", 3),
    (HYBRID | dict(attention_head_dim=15), "attention_head_dim", 15),
    (SMALL | dict(hidden_size=33), "num_heads", 2),  # head_k_dim not given: num_heads must divide hidden_size
    (HYBRID | dict(hidden_size=36, num_heads=2, head_k_dim=16), "num_attention_heads", 8),
    (SMALL, "head_k_dim", 512),  # wider than the Triton kernels take
    (SMALL, "head_v_dim", 257),
    *[
        (SMALL, f, v)
        for f in ("pad_token_id", "bos_token_id", "eos_token_id")
        for v in (-1, 64, 1000, "1", 1.0, True)
    ],
    *[(SMALL, "eos_token_id", v) for v in ([], [1, 64], [1, -1], [1, "2"])],
]


@pytest.mark.parametrize("base, field, value", BAD, ids=[f"{f}={v!r}" for _, f, v in BAD])
def test_bad_field_raises_naming_it(base, field, value):
    with pytest.raises(ValueError, match=rf"^PFlowConfig\.{field} must"):
        PFlowConfig(**(base | {field: value}))


def test_issue_14_cases():
    """The four fields the issue found accepted (or failing without a name)."""
    for field, value in [
        ("hidden_size", "64"),
        ("rope_theta", -1),
        ("pad_token_id", -1),
        ("pad_token_id", 64),
    ]:
        with pytest.raises(ValueError, match=rf"^PFlowConfig\.{field} must"):
            PFlowConfig(**(SMALL | {field: value}))


GOOD = {
    "defaults": {},
    "small": SMALL,
    "hybrid": HYBRID,
    "sliding": SLIDING,
    "odd-hidden-explicit-heads": SMALL | dict(hidden_size=33, head_k_dim=16, head_v_dim=8),
    "attention-only-wide-heads": dict(
        hidden_size=2048, num_heads=4, num_hidden_layers=1, layer_types=["attention"]
    ),
    "eos-list": SMALL | dict(eos_token_id=[1, 63], pad_token_id=0, bos_token_id=None),
    "int-reals": SMALL | dict(rope_theta=500000, norm_eps=1, initializer_range=1),
    "extremes": SMALL | dict(rank=8, conv_size=16, chunk_size=1024, head_k_dim=256, head_v_dim=1),
    "tuple-layers": SMALL | dict(layer_types=("pflow", "pflow")),
}


@pytest.mark.parametrize("kwargs", GOOD.values(), ids=GOOD.keys())
def test_good_configs_round_trip(kwargs, tmp_path):
    config = PFlowConfig(**kwargs)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, PFlowConfig) and fields(loaded) == fields(config)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_are_valid(path, tmp_path):
    config = PFlowConfig.from_json_file(str(path))
    config.validate()
    config.save_pretrained(tmp_path)
    assert fields(AutoConfig.from_pretrained(tmp_path)) == fields(config)


def test_changes_after_construction_are_validated(tmp_path):
    config = PFlowConfig(**SMALL)
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"^PFlowConfig\.chunk_size must"):
        AutoConfig.from_pretrained(tmp_path, chunk_size=8)  # overrides are set after __init__
    config.rope_theta = -1.0
    with pytest.raises(ValueError, match=r"^PFlowConfig\.rope_theta must"):
        config.save_pretrained(tmp_path / "bad")  # save runs validate()
    saved = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(saved | {"pad_token_id": 64}))
    with pytest.raises(ValueError, match=r"^PFlowConfig\.pad_token_id must"):
        AutoConfig.from_pretrained(tmp_path)


def test_chunk_sizes_config_and_op_accept_agree():
    """A chunk size the config takes runs on the torch backend; one it refuses, the op refuses too."""
    x = dict(q=torch.randn(1, 3, 1, 4), k=torch.randn(1, 3, 1, 1, 4), v=torch.randn(1, 3, 1, 1, 2))
    for chunk_size in range(0, 300):
        try:
            PFlowConfig(**SMALL, chunk_size=chunk_size)
            config_ok = True
        except ValueError:
            config_ok = False
        try:
            delta_rule(**x, beta=torch.rand(1, 3, 1, 1), chunk_size=chunk_size, backend="torch")
            op_ok = True
        except ValueError as err:
            assert str(err).startswith("chunk_size must be a power of two >= 16")
            op_ok = False
        expected = chunk_size >= 16 and chunk_size.bit_count() == 1
        assert config_ok == op_ok == valid_chunk_size(chunk_size) == expected, chunk_size


def test_limits_match_the_triton_kernels():
    triton_utils = pytest.importorskip("modeling_parallelflow.triton_utils")
    assert (cfg.MAX_RANK, cfg.MAX_HEAD_DIM) == (triton_utils.MAX_RANK, triton_utils.MAX_HEAD_DIM)
    for chunk_size in range(1, 300):
        for rank in (1, 3, 8):
            if valid_chunk_size(chunk_size):
                assert 1 <= triton_utils.pick_chunk(chunk_size, rank) <= chunk_size
            else:
                with pytest.raises(ValueError, match="chunk_size"):
                    triton_utils.pick_chunk(chunk_size, rank)


def test_scan_launch_follows_shared_memory_and_occupancy(monkeypatch):
    """The sequential scans' launch settings (triton_utils.scan_launch: pipeline stages, Q tiles ahead),
    K = 128 and rows = C * R padded to 64 unless named: 3 stages where they fit and do not lower the programs
    resident per multiprocessor on a grid that would use them (the H200 measurements in its docstring); 2 past
    180 KB; 1 for large fp32 tiles; the forward scan's Q loaded ahead, at 2 stages, only where that fits more
    programs on a grid larger than the GPU holds. The shared memory model against Triton 3.6's sm_90 layout
    (`benchmarks/compile_report.py --scan-model`)."""
    triton_utils = pytest.importorskip("modeling_parallelflow.triton_utils")

    def launch(
        chunk,
        reads_q=True,
        v_rows=0,
        rows=64,
        dtype=torch.bfloat16,
        k_block=128,
        bv=64,
        programs=128,
        from_t=False,
    ):
        query_rows = max(16, chunk) if reads_q else 0
        ahead = v_rows == 0 and triton_utils.TUNE["scan_ahead"]  # the forward scan's, as launched
        tiles = triton_utils.ScanTiles(rows, query_rows, v_rows, k_block, bv, dtype, from_t)
        return triton_utils.scan_launch(tiles, programs, 132, ahead)

    # X from T (tensorInv up to 64 rows): R = 1, 2048 x 16, 112 KB at 2 stages fit twice, Q ahead fits no more
    assert launch(64, programs=512, from_t=True) == (2, False)
    assert launch(64, reads_q=False, programs=512, from_t=True) == (3, False)  # its rerun: 112 KB at 3
    assert launch(64, from_t=True) == launch(16, from_t=True) == (3, False)  # 16384 x 2, R = 1 and R = 4

    r4_grid = dict(programs=512)  # R = 4, 2048 x 16
    assert launch(64) == (3, False)  # R = 1, 16384 x 2: 128 programs
    assert launch(64, programs=512) == (2, True)  # R = 1, 2048 x 16, the scan with o: 123 -> 105 KB, 2 per SM
    assert launch(64, reads_q=False, programs=512) == (2, False)  # its states-only rerun: 90 KB fit twice
    assert launch(64, reads_q=False) == (3, False)  # the same at 16384 x 2: fewer programs than SMs
    assert launch(64, v_rows=64, programs=512) == (3, False)  # R = 1, 2048 x 16, dh: 137 KB at 2 stages
    assert launch(64, bv=32, programs=1024) == (2, False)  # V blocks of 32: 110 KB at 2 stages fit twice
    assert launch(16) == (3, False)  # R = 4, 16384 x 2: fewer programs than SMs
    assert launch(16, **r4_grid) == (2, False)  # 3 stages would halve the resident programs; ahead: no more
    assert launch(64, k_block=256, bv=32) == (2, False)  # 3 x 96 KB does not fit
    assert launch(16, rows=128) == (2, False)  # R = 8: 3 x 68 KB passes 180 KB
    assert launch(64, dtype=torch.float32) == (1, False)  # fp32, K = 128, R = 1: one 96 KB stage
    assert launch(16, rows=16, dtype=torch.float32, k_block=32, bv=32) == (3, False)
    monkeypatch.setitem(triton_utils.TUNE, "scan_stages", 2)
    assert launch(64) == launch(16, **r4_grid) == (2, False)
    assert launch(64, programs=512) == (2, True)
    monkeypatch.setitem(triton_utils.TUNE, "scan_ahead", 0)
    assert launch(64, programs=512) == (2, False)
    bf16 = torch.bfloat16  # bytes as compiled by Triton 3.6 for sm_90 (R = 1, K = 128, V blocks of 64)
    with_o, states_only = (
        triton_utils.ScanTiles(64, 64, 0, 128, 64, bf16),
        triton_utils.ScanTiles(64, 0, 0, 128, 64, bf16),
    )
    assert with_o.shared(2, ahead=True) == 106496
    assert with_o.shared(3) == 172032
    assert states_only.shared(2) == 90112
    assert triton_utils.ScanTiles(64, 64, 0, 128, 64, bf16, from_t=True).shared(2) == 114688
    assert triton_utils.ScanTiles(64, 64, 0, 128, 64, bf16, from_t=True).shared(3) == 163840
    assert triton_utils.ScanTiles(64, 0, 0, 128, 64, bf16, from_t=True).shared(3) == 114688
    assert triton_utils.ScanTiles(64, 64, 64, 128, 64, bf16, from_t=True).shared(3) == 172032  # dh
