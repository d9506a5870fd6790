"""Loading from transformers checkpoints written to a temporary folder (no weights exist offline)."""

import json

import pytest
import torch

from fastgpt import GPT
from fastgpt.loading import find_checkpoint, resolve_dtype
from tests.models import hf_gpt2


@pytest.fixture(scope="module")
def hf_model():
    return hf_gpt2("odd-1001")


@pytest.mark.parametrize("safe", [True, False])
def test_from_pretrained_directory_matches_hf_logits(tmp_path, hf_model, safe):
    hf_model.save_pretrained(tmp_path)
    if not safe:  # transformers 5 writes only safetensors; older checkpoints ship pytorch_model.bin
        (tmp_path / "model.safetensors").unlink()
        torch.save(hf_model.state_dict(), tmp_path / "pytorch_model.bin")
    model = GPT.from_pretrained(str(tmp_path))
    ids = torch.randint(0, 1001, (2, 7))
    with torch.no_grad():
        assert (model(ids) - hf_model(ids).logits).abs().max() < 1e-4


def test_sharded_safetensors_checkpoint(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    model = GPT.from_pretrained(str(tmp_path))
    ids = torch.randint(0, 1001, (1, 5))
    with torch.no_grad():
        assert (model(ids) - hf_model(ids).logits).abs().max() < 1e-4


def test_safetensors_preferred_over_bin(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a checkpoint")
    GPT.from_pretrained(str(tmp_path))  # would fail if it read the .bin


def test_from_pretrained_finds_the_hf_cache_layout(tmp_path, monkeypatch, hf_model):
    snapshot = tmp_path / "hub" / "models--someone--tiny-gpt2" / "snapshots" / "abc123"
    hf_model.save_pretrained(snapshot)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert find_checkpoint("someone/tiny-gpt2") == snapshot
    model = GPT.from_pretrained("someone/tiny-gpt2", dtype="bfloat16")
    assert model.dtype == torch.bfloat16


def test_missing_weights_say_where_we_looked_and_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    with pytest.raises(FileNotFoundError) as info:
        GPT.from_pretrained("gpt2-not-here")
    message = str(info.value)
    assert "empty-cache" in message and "from_config" in message and "never downloads" in message


def test_weights_that_do_not_fit_the_config_raise(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["n_embd"] = 80  # still divisible by n_head=5, but every weight is now the wrong shape
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"weight 'transformer\.wte\.weight' has shape"):
        GPT.from_pretrained(str(tmp_path))


def test_from_hf_dtype_and_copy_semantics(hf_model):
    model = GPT.from_hf(hf_model, dtype=torch.float16)
    assert model.dtype == torch.float16
    # Conv1D (in, out) -> Linear (out, in)
    hf_w = hf_model.transformer.h[0].attn.c_attn.weight
    assert torch.equal(model.h[0].attn.c_attn.weight.float(), hf_w.t().half().float())
    model32 = GPT.from_hf(hf_model)
    model32.wte.weight.data.zero_()
    assert hf_model.transformer.wte.weight.abs().sum() > 0  # weights were copied, not aliased


@pytest.mark.parametrize("bad", ["float64", "int8", torch.int32, 3])
def test_bad_dtype_raises(bad):
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype(bad)


# ---- errors name the file and what is wrong ---------------------------------------------------
def test_corrupt_safetensors_header_names_the_file(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\xff" * 8 + weights.read_bytes()[8:])  # header length now absurd
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors weight file"):
        GPT.from_pretrained(str(tmp_path))


def test_corrupt_pytorch_bin_names_the_file(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin is not a readable PyTorch weight file"):
        GPT.from_pretrained(str(tmp_path))


def test_config_without_n_embd_names_the_file(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["n_embd"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json: the GPT-2 config has no n_embd"):
        GPT.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("text", ['{"n_embd": 60,', "[1, 2]"])
def test_config_that_is_not_a_json_object_names_the_file(tmp_path, hf_model, text):
    hf_model.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError, match=r"config\.json (is not valid JSON|must hold a JSON object)"):
        GPT.from_pretrained(str(tmp_path))


def test_missing_shard_names_the_index_and_the_shard(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path, max_shard_size="100KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=rf"index\.json lists the shard {shard.name}"):
        GPT.from_pretrained(str(tmp_path))


def test_directory_without_config_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        GPT.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("path", ["/path/to/gpt2", "./gpt2-local", "a/b/c"])
def test_a_path_that_does_not_exist_says_so_without_cache_names(path):
    with pytest.raises(FileNotFoundError) as info:
        GPT.from_pretrained(path)
    assert "no such directory" in str(info.value) and "models--" not in str(info.value)


@pytest.mark.parametrize(
    "model_type, message",
    [
        ("gptj", r"config\.json: fastgpt cannot run this config: model_type='gptj'.*'llama'"),  # names the supported ones
        ("llama", r"config\.json: the llama config has no hidden_size"),  # a GPT-2 config.json relabelled
    ],
)
def test_a_config_of_another_model_type_names_the_file_and_the_type(tmp_path, hf_model, model_type, message):
    hf_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_type"] = model_type
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        GPT.from_pretrained(str(tmp_path))
