"""The `parallelflow` command: fast start, one clear line for every failure a user can cause, no code from a
checkpoint unless asked, strict loading, and crash leftovers cleaned up."""

import errno
import json
import os
import runpy
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from modeling_parallelflow import cli
from modeling_parallelflow.errors import CheckpointError, MissingExtraError
from modeling_parallelflow.loading import load_causal_lm
from modeling_parallelflow.training import atomic_dir, remove_stale_staging
from tests.model_helpers import tiny_model
from tests.test_finetune import TEXT, make_base_checkpoint

REPO = Path(__file__).resolve().parents[1]
HELP_LIMIT_S = 3.0  # measured 0.07-0.09 s on an idle core; generous for a loaded CI machine
COMMANDS = ["", *cli.COMMANDS]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_base_checkpoint(tmp_path_factory.mktemp("cli") / "tiny")


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "modeling_parallelflow", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)  # fmt: skip


def python(script: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    """Exit status 1, no traceback, and stderr (progress bars aside) ending in one error line that names every
    fragment."""
    lines = err.strip().splitlines()
    last = lines[-1]
    assert code == 1, err
    assert "Traceback" not in err and sum(line.startswith("parallelflow ") for line in lines) == 1, err
    assert last.startswith("parallelflow ") and ": error: " in last, err
    for fragment in fragments:
        assert fragment in last, (fragment, last)


# fast start


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c or "top")
def test_help_is_fast_and_imports_neither_torch_nor_transformers(command):
    probe = (
        "import sys, time; start = time.perf_counter()\n"
        "from modeling_parallelflow import cli\n"
        f"try:\n    cli.main([*{[command] if command else []!r}, '--help'])\n"
        "except SystemExit:\n    pass\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'lm_eval', 'peft') if m in sys.modules)\n"
        "print('SECONDS', time.perf_counter() - start, 'HEAVY', heavy)\n"
    )
    result = python(probe)
    seconds, heavy = result.stdout.split("SECONDS ")[1].split(" HEAVY ")
    assert heavy.strip() == "[]", result.stdout
    assert float(seconds) < HELP_LIMIT_S, seconds


def test_console_script_help_is_fast():
    start = time.perf_counter()
    result = run_cli("--help")
    assert result.returncode == 0 and "finetune" in result.stdout
    assert time.perf_counter() - start < HELP_LIMIT_S


@pytest.mark.slow  # a fresh interpreter: ~12 s
def test_importing_the_package_is_light_and_model_names_register_the_auto_classes():
    probe = (
        "import sys, modeling_parallelflow as m\n"
        "assert 'torch' not in sys.modules\n"
        "from transformers import CONFIG_MAPPING\n"
        "assert 'parallelflow' not in CONFIG_MAPPING\n"
        "m.PFlowForCausalLM\n"
        "assert CONFIG_MAPPING['parallelflow'] is m.PFlowConfig\n"
        "assert set(m.__all__) <= set(dir(m))\n"
        "print('LAZY-OK')\n"
    )
    result = python(probe)
    assert "LAZY-OK" in result.stdout, result.stderr[-2000:]


# one clear line for every failure a user can cause


@pytest.mark.parametrize(
    ("argv", "module", "extra"),
    [
        (["eval", "{ckpt}"], "lm_eval", "eval"),
        (["finetune", "{ckpt}", "{data}", "-o", "{out}"], "peft", "peft"),
        (["merge", "{ckpt}", "{ckpt}", "{out}"], "peft", "peft"),
    ],
    ids=["eval-lm_eval", "finetune-peft", "merge-peft"],
)
def test_missing_extra_names_both_install_commands(
    checkpoint, tmp_path, monkeypatch, capsys, argv, module, extra
):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails as if it were not installed
    (tmp_path / "data.txt").write_text(TEXT)
    values = {"ckpt": str(checkpoint), "data": str(tmp_path / "data.txt"), "out": str(tmp_path / "out")}
    code = cli.main([arg.format(**values) for arg in argv])
    assert_one_line_error(
        code, capsys.readouterr().err, f'pip install -e ".[{extra}]"', f'pip install "parallelflow[{extra}]"'
    )
    assert not (tmp_path / "out").exists()


def test_missing_extra_error_is_an_import_error():
    error = MissingExtraError("peft", "LoRA")
    assert isinstance(error, ImportError) and error.name == "peft" and "parallelflow[peft]" in str(error)


def test_push_without_network_is_one_line(checkpoint, monkeypatch, capsys):
    try:  # huggingface_hub's HTTP client: httpx2 for huggingface_hub 2.x, httpx for 1.x
        from httpx2 import ConnectError
    except ImportError:
        from httpx import ConnectError

    class Offline:
        def create_repo(self, *args, **kwargs):
            raise ConnectError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("huggingface_hub.HfApi", Offline)
    code = cli.main(["push", str(checkpoint), "me/tiny"])
    err = capsys.readouterr().err
    assert_one_line_error(code, err, "cannot upload to the Hugging Face Hub", "name resolution")


@pytest.mark.parametrize(
    ("argv", "named", "needs"),
    [
        (["push", "{tmp}/no-such-dir", "me/x"], "no-such-dir", None),
        (["eval", "{tmp}/no/such/checkpoint"], "no/such/checkpoint", "lm_eval"),
        (["finetune", "{tmp}/no/such/base", "{tmp}/data.txt", "-o", "{tmp}/out"], "no/such/base", None),
        (["merge", "{ckpt}", "{tmp}/no-adapter", "{tmp}/out"], "no-adapter", "peft"),
        (["merge", "{tmp}/no/such/base", "{adapter}", "{tmp}/out"], "no/such/base", "peft"),
        (["convert", "--from", "pflow", "{tmp}/no-such-src", "{tmp}/out"], "no-such-src", None),
    ],
    ids=["push", "eval", "finetune", "merge-adapter", "merge-base", "convert"],
)
def test_nonexistent_paths(checkpoint, tmp_path, capsys, argv, named, needs):
    if needs:
        pytest.importorskip(needs)
    (tmp_path / "data.txt").write_text(TEXT)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    values = {"tmp": tmp_path, "ckpt": checkpoint, "adapter": tmp_path / "adapter"}
    code = cli.main([arg.format(**values) for arg in argv])
    assert_one_line_error(code, capsys.readouterr().err, named)
    assert not (tmp_path / "out").exists()


def test_nonexistent_path_through_the_command_ends_in_one_line(tmp_path):
    result = run_cli("push", str(tmp_path / "missing"), "me/x")
    assert_one_line_error(result.returncode, result.stderr, "no such checkpoint folder", "missing")
    assert "Traceback" not in result.stderr


def test_finetune_data_file_problems(checkpoint, tmp_path, capsys, monkeypatch):
    out = ["-o", str(tmp_path / "out"), "--full", "--max-steps", "1"]
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    assert_one_line_error(
        cli.main(["finetune", str(checkpoint), str(tmp_path / "latin1.txt"), *out]),
        capsys.readouterr().err,
        "latin1.txt",
        "not UTF-8",
    )
    assert_one_line_error(
        cli.main(["finetune", str(checkpoint), str(tmp_path / "absent.jsonl"), *out]),
        capsys.readouterr().err,
        "absent.jsonl",
        "does not exist",
    )
    (tmp_path / "locked.txt").write_text(TEXT)
    real_read_text = Path.read_text

    def read_text(self, *args, **kwargs):  # chmod 000 does not stop root, so refuse the read here
        if self.name == "locked.txt":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    assert_one_line_error(
        cli.main(["finetune", str(checkpoint), str(tmp_path / "locked.txt"), *out]),
        capsys.readouterr().err,
        "Permission denied",
        "locked.txt",
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("where", "code", "message"),
    [("conversion.pipeline.save_pflow", errno.ENOSPC, "No space left on device"),
     ("modeling_parallelflow.training.tempfile.mkdtemp", errno.EROFS, "Read-only file system")],
    ids=["full", "read-only"],
)  # fmt: skip
def test_full_or_read_only_destination(checkpoint, tmp_path, monkeypatch, capsys, where, code, message):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(tmp_path / "dst"))

    monkeypatch.setattr(where, fail)
    argv = ["convert", "--from", "pflow", str(checkpoint), str(tmp_path / "dst"), "--no-progress"]
    assert_one_line_error(cli.main(argv), capsys.readouterr().err, message, "dst")
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "partial output left behind"


@pytest.mark.parametrize(
    "argv",
    [["convert", "--from", "pflow", "a", "b", "--dtype", "float8"], ["eval", "ckpt", "--dtype", "float8"]],
    ids=["convert", "eval"],
)
def test_unknown_dtype_is_a_usage_error(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and "invalid choice: 'float8'" in err[-1]


# remote code only when asked; strict loading


def foreign_code_checkpoint(path: Path, model_type: str) -> Path:
    """config.json mapping the Auto classes to evil.py, which writes a marker file when it is imported."""
    if model_type == "parallelflow":
        tiny_model("tiny").save_pretrained(path)
        config = json.loads((path / "config.json").read_text())
    else:
        path.mkdir(parents=True)
        config = {"model_type": model_type, "architectures": ["EvilForCausalLM"]}
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM"}
    (path / "config.json").write_text(json.dumps(config))
    marker = path.parent / f"{model_type}-code-ran"
    (path / "evil.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n")
    return marker


@pytest.mark.parametrize("model_type", ["parallelflow", "evil_arch"])
def test_checkpoint_code_runs_only_when_asked(tmp_path, capsys, model_type):
    marker = foreign_code_checkpoint(tmp_path / "ckpt", model_type)
    if model_type == "parallelflow":  # the installed package serves it; the shipped code is never imported
        model = load_causal_lm(tmp_path / "ckpt")
        assert type(model).__module__ == "modeling_parallelflow.modeling_parallelflow"
    else:
        with pytest.raises(ValueError, match="trust_remote_code"):
            load_causal_lm(tmp_path / "ckpt")
        assert cli.main(["push", str(tmp_path / "ckpt"), "me/x"]) == 1
        assert "trust_remote_code" in capsys.readouterr().err
    assert not marker.exists()
    runpy.run_path(str(tmp_path / "ckpt" / "evil.py"))  # the control: running the shipped file writes it
    assert marker.exists()


@pytest.mark.parametrize("command", ["eval", "finetune", "merge", "push"])
def test_commands_that_load_checkpoints_run_no_checkpoint_code_by_default(capsys, command):
    from evals.runner import model_args

    assert model_args("ckpt")["trust_remote_code"] is False
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    assert "--trust-remote-code" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["missing", "unexpected", "shape"])
def test_strict_loading_names_the_keys(checkpoint, tmp_path, capsys, case):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    weights = load_file(broken / "model.safetensors")
    key = "model.layers.0.mlp.up_proj.weight"
    if case == "missing":
        weights.pop(key)
    elif case == "unexpected":
        weights[key := "model.extra.weight"] = torch.zeros(3)
    else:
        weights[key] = torch.zeros(5, 5)
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        load_causal_lm(broken)
    assert_one_line_error(cli.main(["push", str(broken), "me/x"]), capsys.readouterr().err, case, key)


# crash leftovers


def test_stale_staging_of_a_dead_writer_is_removed_and_a_live_one_kept(tmp_path):
    import socket

    dead = python("import os; print(os.getpid())")  # a pid that has exited
    host = socket.gethostname()
    stale = tmp_path / f".ckpt.{host}-{dead.stdout.strip()}.abc123.tmp"
    live = tmp_path / f".ckpt.{host}-{os.getpid()}.def456.tmp"
    other = tmp_path / ".other.x-1.ghi789.tmp"
    for path in (stale, live, other):
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"partial")
    assert remove_stale_staging(tmp_path / "ckpt") == [stale]
    with atomic_dir(tmp_path / "ckpt") as staging:
        (staging / "a").write_text("1")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ckpt", live.name, other.name])
