"""The MQAR harness (benchmarks/quality/mqar.py): its data generator, and a CPU run of the smoke grid."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality" / "mqar.py"


def _load():
    spec = importlib.util.spec_from_file_location("mqar", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["mqar"] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


mqar = _load()
from benchmarks.quality import harness, mqar_curves  # noqa: E402  (importable once mqar.py put the repository on sys.path)


@pytest.mark.parametrize(("length", "pairs", "vocab"), [(64, 4, 64), (256, 16, 8192), (1024, 256, 8192)])
def test_answers_are_the_values_of_the_queried_keys_and_never_leak(length, pairs, vocab):
    inputs, labels = mqar.mqar_batch(mqar.Task(length, pairs), 8, torch.Generator().manual_seed(1), vocab)
    assert inputs.shape == labels.shape == (8, length)
    half = vocab // 2
    for x, y in zip(inputs.tolist(), labels.tolist(), strict=True):
        keys, values = x[0 : 2 * pairs : 2], x[1 : 2 * pairs : 2]
        assert len(set(keys)) == pairs and all(1 <= k < half for k in keys)
        assert len(set(values)) == pairs and all(half <= v < vocab for v in values)
        answers = [p for p, label in enumerate(y) if label != mqar.IGNORE]
        assert len(answers) == pairs and min(answers) >= 2 * pairs  # one query per key, after the context
        assert sorted(x[p] for p in answers) == sorted(keys)  # every key is queried once
        for p in answers:
            i = keys.index(x[p])
            assert y[p] == values[i]  # the answer is the value paired with the queried key
            assert x[: p + 1].count(y[p]) == 1  # and is in the input only at its pair, until it is predicted
            assert p + 1 == length or x[p + 1] == y[p]  # the value follows its query (teacher forcing)
        filler = set(range(2 * pairs, length)) - set(answers) - {p + 1 for p in answers}
        assert all(x[p] == 0 for p in filler)


def test_generator_is_seeded_and_heldout_is_apart_from_training():
    task = mqar.Task(64, 8)
    a = mqar.mqar_batch(task, 4, torch.Generator().manual_seed(0), 64)
    b = mqar.mqar_batch(task, 4, torch.Generator().manual_seed(0), 64)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    grid = mqar.GRIDS["smoke"]
    held = mqar.heldout_set(grid, task)
    assert torch.equal(held[0], mqar.heldout_set(grid, task)[0])
    assert len(held[0]) == grid.eval_examples
    first_train = mqar.mqar_batch(task, 4, torch.Generator().manual_seed(grid.seed), grid.vocab_size)[0]
    assert not any(torch.equal(row, h) for row in first_train for h in held[0])
    with pytest.raises(ValueError, match="seq_len"):
        mqar.mqar_batch(mqar.Task(32, 16), 1, torch.Generator(), 64)


def test_tasks_are_named_on_the_command_line_in_any_mix():
    """--tasks takes any kvN_tM (a Zoology-style mix of easier tasks, not only the grid's); bad names are
    refused with the expected form."""
    args = mqar.parse_args(["--grid", "full", "--tasks", "kv4_t64,kv16_t256", "--out", "r.json"])
    assert args.tasks == [mqar.Task(64, 4), mqar.Task(256, 16)]
    assert [mqar.Task.from_name(t.name) for t in mqar.GRIDS["full"].tasks] == list(mqar.GRIDS["full"].tasks)
    with pytest.raises(SystemExit):
        mqar.parse_args(["--grid", "full", "--tasks", "kv4-t64", "--out", "r.json"])


def test_llama_with_learned_positions_ties_its_head_and_reads_positions():
    """llama-abspos (Zoology's attention baseline): LM head tied to the token embeddings, a learned position
    table added to them; the table is an embedding, outside the matched non-embedding count."""
    shape = harness.Shape(vocab_size=64, width=32, layers=1, max_len=16, head_dim=16)
    torch.manual_seed(0)
    model = harness.build_model("llama-abspos", shape, 48)
    plain = harness.build_model("llama", shape, 48)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert harness.non_embedding_params(model) == harness.non_embedding_params(plain)
    ids = torch.randint(0, 64, (2, 12))
    hidden = model.model(input_ids=ids).last_hidden_state
    hidden.sum().backward()
    grad = model.model.embed_positions.weight.grad
    assert grad[:12].abs().sum(-1).min() > 0 and grad[12:].abs().sum() == 0  # positions 0..11 used, no more
    with torch.no_grad():
        model.model.embed_positions.weight.zero_()
    assert not torch.allclose(model.model(input_ids=ids).last_hidden_state, hidden)


@pytest.mark.slow  # builds 8 models (on the meta device): about 10 s with the imports
def test_models_are_matched_in_non_embedding_parameters():
    grid = mqar.GRIDS["full"]
    with torch.device("meta"):
        counts = {
            name: mqar.non_embedding_params(
                mqar._build(name, 64, mqar.matched_intermediate(name, 64, grid), grid)
            )
            for name in mqar.MODELS
        }
    reference = counts[harness.REFERENCE_MODEL]
    assert all(abs(c - reference) / reference < 0.02 for c in counts.values()), counts


@pytest.mark.slow
def test_smoke_grid_runs_on_cpu_and_resumes(tmp_path):
    out = tmp_path / "mqar.json"
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--grid",
        "smoke",
        "--models",
        "pflow-r1,llama",
        "--steps",
        "10",
        "--out",
        str(out),
        "--threads",
        "2",
    ]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["schema"] == mqar.SCHEMA and data["grid"] == "smoke" and "commit" in data
    assert data["config"]["steps"] == 10 and [t["name"] for t in data["config"]["tasks"]] == [
        "kv4_t32",
        "kv8_t64",
    ]
    assert sorted(data["runs"]) == ["llama/w32/lr0.003", "pflow-r1/w32/lr0.003"]
    for run in data["runs"].values():
        assert set(run["accuracy"]) == {"kv4_t32", "kv8_t64"}
        assert all(isinstance(a, float) and 0.0 <= a <= 1.0 for a in run["accuracy"].values())
        assert run["steps_done"] == 10 and run["loss_curve"][-1][0] == 10
        assert run["tokens_per_s"] > 0 and run["wall_s"] > 0 and run["non_embedding_params"] > 0
    assert out.with_suffix(".png").stat().st_size > 0
    assert "llama | 32 |" in first.stdout
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "2 finished in" in again.stdout
    assert json.loads(out.read_text())["runs"] == data["runs"]


@pytest.mark.slow  # trains small models (~4-8 s)
def test_task_subset_accuracy_curve_and_early_stop(tmp_path):
    """--tasks trains on a subset, --eval-every records held-out accuracy along the run, --stop-at ends a run
    once every task reaches it (at 0.0: the first evaluation)."""
    out = tmp_path / "mqar.json"
    base = ["--grid", "smoke", "--models", "pflow-r1", "--tasks", "kv4_t32", "--threads", "2"]
    assert mqar.main(base + ["--steps", "12", "--eval-every", "4", "--out", str(out)]) == 0
    run = json.loads(out.read_text())["runs"]["pflow-r1/w32/lr0.003"]
    assert set(run["accuracy"]) == {"kv4_t32"} and run["steps_done"] == 12
    assert [step for step, _ in run["eval_curve"]] == [4, 8, 12]
    assert run["eval_curve"][-1][1] == run["accuracy"]
    stop = tmp_path / "stop.json"
    assert mqar.main(base + ["--steps", "12", "--eval-every", "4", "--stop-at", "0", "--out", str(stop)]) == 0
    run = json.loads(stop.read_text())["runs"]["pflow-r1/w32/lr0.003"]
    assert run["steps_done"] == 4 and [step for step, _ in run["eval_curve"]] == [4]
    assert run["ended_by"] == "stop_at"
    wall = tmp_path / "wall.json"  # --run-wall 0: the run ends after its first step, evaluated and kept
    assert mqar.main(base + ["--steps", "12", "--run-wall", "0", "--out", str(wall)]) == 0
    run = json.loads(wall.read_text())["runs"]["pflow-r1/w32/lr0.003"]
    assert run["steps_done"] == 1 and run["ended_by"] == "run_wall" and len(run["eval_curve"]) == 1
    plot = tmp_path / "curves.png"  # mqar_curves.py: one line per run of several files, and a table
    assert mqar_curves.main([str(out), str(wall), "--out", str(plot)]) == 0 and plot.stat().st_size > 0
    assert len(mqar_curves.table(mqar_curves.load_runs([out, wall])).splitlines()) == 4
    with pytest.raises(SystemExit, match="not an mqar.py results file"):
        mqar_curves.load_runs([SCRIPT.parent / "results" / "text_30m_h200" / "text_30m.json"])
    vocab = tmp_path / "vocab.json"  # --vocab-size: the embeddings and the token ranges follow it
    assert mqar.main(base + ["--steps", "2", "--vocab-size", "128", "--out", str(vocab)]) == 0
    data = json.loads(vocab.read_text())
    assert data["config"]["vocab_size"] == 128
    assert data["runs"]["pflow-r1/w32/lr0.003"]["params"] - run["params"] == 2 * 64 * 32  # embed + head rows
    with pytest.raises(SystemExit):
        mqar.main(base + ["--stop-at", "0.9", "--out", str(tmp_path / "x.json")])  # needs --eval-every
    for bad in ("kv9-t99", "kv40_t99"):  # not kvN_tM; 40 pairs and their queries do not fit in 99 tokens
        with pytest.raises(SystemExit):
            mqar.main(["--grid", "smoke", "--tasks", bad, "--out", str(tmp_path / "y.json")])


def test_seed_override_is_recorded_changes_the_run_and_keeps_its_own_file(tmp_path):
    base = ["--grid", "smoke", "--models", "pflow-r1", "--tasks", "kv4_t32", "--threads", "2", "--steps", "3"]
    first, second = tmp_path / "seed0.json", tmp_path / "seed1.json"
    assert mqar.main(base + ["--out", str(first)]) == 0
    assert mqar.main(base + ["--seed", "1", "--out", str(second)]) == 0
    runs = [json.loads(path.read_text()) for path in (first, second)]
    assert (runs[0]["config"]["seed"], runs[1]["config"]["seed"]) == (0, 1)
    key = "pflow-r1/w32/lr0.003"
    assert runs[0]["runs"][key]["loss_curve"] != runs[1]["runs"][key]["loss_curve"]
    with pytest.raises(SystemExit, match="another configuration"):
        mqar.main(base + ["--seed", "1", "--out", str(first)])


def test_merge_joins_runs_of_other_learning_rates_not_of_other_grids(tmp_path):
    base = ["--grid", "smoke", "--models", "pflow-r1", "--tasks", "kv4_t32", "--threads", "2", "--steps", "2"]
    paths = [tmp_path / f"{name}.json" for name in ("lr1", "lr3", "seed1")]
    for path, extra in zip(paths, (["--lrs", "1e-3"], ["--lrs", "3e-3"], ["--seed", "1"]), strict=True):
        assert mqar.main(base + extra + ["--out", str(path)]) == 0
    merged = mqar.merge(paths[:2], tmp_path / "merged.json")
    assert sorted(merged["runs"]) == ["pflow-r1/w32/lr0.001", "pflow-r1/w32/lr0.003"]
    assert merged["config"]["lrs"] == [0.001, 0.003]
    with pytest.raises(SystemExit, match="another configuration"):
        mqar.merge([paths[0], paths[2]], tmp_path / "bad.json")


def test_a_run_cut_by_run_wall_is_left_out_of_the_table_and_trained_again(tmp_path, capsys):
    out = tmp_path / "r.json"
    base = ["--grid", "smoke", "--models", "pflow-r1", "--tasks", "kv4_t32", "--threads", "2", "--steps", "3"]
    assert mqar.main(base + ["--run-wall", "0", "--out", str(out)]) == 0
    cut = json.loads(out.read_text())
    run = cut["runs"]["pflow-r1/w32/lr0.003"]
    assert run["ended_by"] == "run_wall" and run["steps_done"] < 3 and not mqar.finished(run)
    assert mqar.best_cells(cut["runs"]) == {}
    assert "cut by --run-wall before the schedule's end: pflow-r1/w32/lr0.003" in mqar.table(cut)
    capsys.readouterr()
    assert mqar.main(base + ["--out", str(out)]) == 0
    assert "0 finished in" in capsys.readouterr().out
    run = json.loads(out.read_text())["runs"]["pflow-r1/w32/lr0.003"]
    assert run["ended_by"] == "steps" and run["steps_done"] == 3 and mqar.finished(run)


def test_results_from_before_the_optional_fields_still_resume():
    grid = mqar.GRIDS["full"]
    committed = json.loads((SCRIPT.parent / "results" / "mqar_lr1.5e-3_w64-128.json").read_text())
    import dataclasses

    assert mqar.grid_dict(dataclasses.replace(grid, lrs=(1.5e-3,))) == {
        k: v for k, v in committed["config"].items() if k in mqar.grid_dict(grid)
    }


def test_answers_are_the_masked_labels_in_order_at_fixed_shapes():
    """`answers` (what a CUDA-graph step needs: fixed shapes, no host sync) selects what labels[mask] does."""
    task = mqar.Task(seq_len=64, kv_pairs=8)
    _, labels = mqar.mqar_batch(task, 5, torch.Generator().manual_seed(3), 128)
    positions, values = mqar.answers(labels, task.kv_pairs)
    mask = labels != mqar.IGNORE
    assert positions.shape == values.shape == (5, 8)
    assert torch.equal(values.flatten(), labels[mask])
    assert torch.equal(positions, mask.nonzero()[:, 1].view(5, 8))


def test_cuda_graph_step_refuses_what_it_cannot_capture():
    from benchmarks.quality.graph_step import GraphTrainStep

    model = torch.nn.Linear(4, 4)
    plain = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="CUDA device"):
        GraphTrainStep(
            lambda x: model(x).sum(), model.parameters(), plain, lr=1e-3, device=torch.device("cpu")
        )
    with pytest.raises(SystemExit, match="--cuda-graph needs a CUDA device"):
        mqar.main(["--grid", "smoke", "--cuda-graph", "--device", "cpu", "--out", "unused.json"])


def test_state_capacity_oracle_recalls_what_fits_and_loses_what_does_not():
    """The oracle of `state_capacity.py`: a 64-dim state recalls every one of 16 pairs, and well under half of
    256 (four times its width)."""
    from benchmarks.quality import state_capacity

    generator = torch.Generator().manual_seed(0)
    assert state_capacity.recall(16, 64, 4096, 4, generator) == 1.0
    assert state_capacity.recall(256, 64, 4096, 4, generator) < 0.4
