"""save_pretrained -> Auto* load: in-process, sharded, bf16, and remote code in a fresh process without the
package importable."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from modeling_parallelflow import PFlowForCausalLM, PFlowModel
from tests.model_helpers import random_ids, run_without_package, tiny_model


@pytest.mark.parametrize("name", ["tiny", "tiny-hybrid"])
def test_save_and_reload_in_process(tmp_path, name):
    model = tiny_model(name)
    ids = random_ids(2, 11)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "parallelflow"
    assert config["auto_map"]["AutoModel"] == "modeling_parallelflow.PFlowModel"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_parallelflow.PFlowForCausalLM"
    assert (tmp_path / "model.safetensors").exists()
    for code in (
        "modeling_parallelflow.py",
        "configuration_parallelflow.py",
        "cache_parallelflow.py",
        "ops.py",
        "triton_dispatch.py",
    ):
        assert (tmp_path / code).exists(), code
    assert AutoConfig.from_pretrained(tmp_path).rank == model.config.rank
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(reloaded, PFlowForCausalLM)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    base = AutoModel.from_pretrained(tmp_path)
    assert isinstance(base, PFlowModel)
    with torch.no_grad():
        assert torch.equal(base(ids).last_hidden_state, model.model(ids).last_hidden_state)


def test_sharded_and_bf16_round_trip(tmp_path):
    model = tiny_model("tiny", tie_word_embeddings=False)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    ids = random_ids(1, 9)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded")
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)

    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    bf16 = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    assert bf16.lm_head.weight.dtype == torch.bfloat16
    for (name, a), b in zip(model.state_dict().items(), bf16.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    with torch.no_grad():
        assert torch.isfinite(bf16(ids).logits).all()


def test_tied_embeddings_stay_tied(tmp_path):
    model = tiny_model("tiny", tie_word_embeddings=True)
    assert model.get_input_embeddings() is model.model.embed_tokens
    assert model.get_output_embeddings() is model.lm_head
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny", "tiny-hybrid"])
def test_remote_code_loads_in_fresh_process_without_package(tmp_path, name):
    model = tiny_model(name)
    ids = random_ids(2, 10)
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    with torch.no_grad():
        expected = model(ids).logits
        generated = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    torch.save({"ids": ids, "logits": expected, "generated": generated}, tmp_path / "expected.pt")
    script = f"""
        import torch
        from transformers import AutoModelForCausalLM
        ref = torch.load({str(tmp_path / "expected.pt")!r})
        model = AutoModelForCausalLM.from_pretrained({str(ckpt)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        with torch.no_grad():
            logits = model(ref["ids"]).logits
        assert torch.equal(logits, ref["logits"]), (logits - ref["logits"]).abs().max()
        out = model.generate(ref["ids"], max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert torch.equal(out, ref["generated"])
        print("REMOTE-OK")
    """
    result = run_without_package(script, tmp_path)
    assert "REMOTE-OK" in result.stdout, result.stderr[-3000:]


def test_loading_mismatched_checkpoint_fails_clearly(tmp_path):
    tiny_model("tiny").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rank"] = 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    # transformers prints a report of the mismatched keys and raises
    with pytest.raises((RuntimeError, ValueError), match="mismatched"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
