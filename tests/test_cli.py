"""The command line: `python -m fastgpt generate` (tiny models and tokenizers saved to tmp)."""

import io
import json
import random
import subprocess
import sys

import pytest
import torch

from fastgpt import GPT
from fastgpt.cli import main
from tests.models import hf_gpt2

VOCAB = 503  # tests.models' "tiny-503"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny GPT-2 checkpoint directory (weights + config, no tokenizer)."""
    directory = tmp_path_factory.mktemp("tiny-gpt2")
    hf_gpt2("tiny-503").save_pretrained(directory)
    return directory


def save_tokenizer(directory, eos_id: int = 0):
    """A byte-level BPE tokenizer of exactly VOCAB tokens whose EOS is token ``eos_id``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(2, 7))) for _ in range(3000)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    bpe.train_from_iterator([" ".join(words)], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=bpe.id_to_token(eos_id))
    assert len(tokenizer) == VOCAB and tokenizer.eos_token_id == eos_id
    tokenizer.save_pretrained(directory)
    return tokenizer


def run(args, capsys) -> list[str]:
    assert main(["generate", "--device", "cpu", *args]) == 0
    return capsys.readouterr().out.strip().splitlines()


def fails(args, capsys=None) -> str:
    """The one-line message of a CLI call that must fail."""
    with pytest.raises(SystemExit) as info:
        main(["generate", "--device", "cpu", *args])
    code = info.value.code
    if isinstance(code, int):  # argparse: message on stderr, exit status 2
        assert code == 2
        message = capsys.readouterr().err
    else:
        message = code
    assert message.startswith("fastgpt: ") and len(message.strip().splitlines()) == 1, message
    return message


def api(directory, ids, n, **kwargs):
    return GPT.from_pretrained(str(directory)).generate(torch.tensor([ids]), n, **kwargs)[0].tolist()


# ---- tokens --------------------------------------------------------------------------------------
def test_cli_with_ids_on_a_local_checkpoint_matches_the_api(checkpoint, capsys):
    printed = run(["--model", str(checkpoint), "--ids", "5,17,300", "--max-new-tokens", "8"], capsys)[-1]
    assert printed == ",".join(map(str, api(checkpoint, [5, 17, 300], 8)))


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--top-k", "40", "--seed", "3"], dict(top_k=40, seed=3)),
        (["--top-p", "0.9", "--seed", "4"], dict(top_p=0.9, seed=4)),
        (["--min-p", "0.05", "--seed", "5"], dict(min_p=0.05, seed=5)),
        (["--seed", "6"], dict(seed=6)),
        (["--temperature", "1.5", "--top-k", "20", "--seed", "7"], dict(temperature=1.5, top_k=20, seed=7)),
    ],
)
def test_sampling_flags_mean_sampling_at_temperature_one(checkpoint, capsys, flags, expected):
    printed = run(["--model", str(checkpoint), "--ids", "1,2", "--max-new-tokens", "12", *flags], capsys)[-1]
    sampled = api(checkpoint, [1, 2], 12, do_sample=True, **{"temperature": 1.0, **expected})
    assert printed == ",".join(map(str, sampled))
    assert sampled != api(checkpoint, [1, 2], 12)  # really sampled: greedy differs on this model


def test_sampling_is_reproducible_with_seed(checkpoint, capsys):
    args = ["--model", str(checkpoint), "--ids", "1,2", "--max-new-tokens", "6", "--temperature", "1.2",
            "--top-k", "20", "--seed", "5"]  # fmt: skip
    assert run(args, capsys) == run(args, capsys)


def test_stops_at_the_checkpoints_eos_unless_told_otherwise(tmp_path, capsys):
    hf_gpt2("tiny-503").save_pretrained(tmp_path)
    greedy = api(tmp_path, [5, 17], 10)
    eos = greedy[2 + 3]  # the 4th new token
    first = greedy.index(eos, 2)
    for name in ("config.json", "generation_config.json"):
        fields = json.loads((tmp_path / name).read_text())
        fields["eos_token_id"] = eos
        (tmp_path / name).write_text(json.dumps(fields))
    args = ["--model", str(tmp_path), "--ids", "5,17", "--max-new-tokens", "10"]
    assert run(args, capsys)[-1] == ",".join(map(str, greedy[: first + 1]))
    assert run([*args, "--ignore-eos"], capsys)[-1] == ",".join(map(str, greedy))


# ---- text ----------------------------------------------------------------------------------------
class _Writes(io.StringIO):
    def __init__(self):
        super().__init__()
        self.chunks = []

    def write(self, text):
        self.chunks.append(text)
        return super().write(text)


def test_text_streams_token_by_token_and_stops_at_the_tokenizers_eos(tmp_path, monkeypatch):
    hf_gpt2("tiny-503").save_pretrained(tmp_path)
    tokenizer = save_tokenizer(tmp_path)
    prompt_ids = tokenizer.encode("abc def")
    greedy = api(tmp_path, prompt_ids, 12)
    new = greedy[len(prompt_ids) :]
    first_seen = [i for i in range(1, len(new)) if new[i] not in new[:i]]
    eos = new[first_seen[-1]]  # the last token that is new when it appears: stop there
    tokenizer = save_tokenizer(tmp_path, eos_id=eos)
    stopped = greedy[: greedy.index(eos, len(prompt_ids)) + 1]

    out = _Writes()
    monkeypatch.setattr(sys, "stdout", out)
    assert main(["generate", "abc def", "--model", str(tmp_path), "--max-new-tokens", "12", "--device", "cpu"]) == 0
    # The EOS token is a special token: printed as nothing, as HF's TextStreamer(skip_special_tokens=True).
    assert out.getvalue() == tokenizer.decode(stopped[:-1]) + "\n"
    assert len([c for c in out.chunks if c]) >= len(stopped) - len(prompt_ids)  # one write per new token


def test_text_prompt_without_tokenizer_files_fails_before_building_the_model(checkpoint, monkeypatch):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was built before the tokenizer was checked")

    monkeypatch.setattr(GPT, "from_pretrained", must_not_load)
    message = fails(["hello", "--model", str(checkpoint)])
    assert "has no tokenizer files" in message and "--ids" in message


# ---- one line, non-zero exit ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "gpt5", "--random-init", "--ids", "1"], "--random-init needs a preset"),
        (["--model", "gpt2", "--random-init", "--ids", "1,x"], "--ids must be comma-separated integers"),
        (["--model", "gpt2", "--random-init"], "give a text prompt or --ids"),
        (["--model", "gpt2", "--random-init", "--ids", "1", "--dtype", "float64"], "dtype must be one of"),
        (["--ids", "1", "--temperature", "-1"], "--temperature must be a finite number >= 0 (0: greedy), got -1.0"),
        (["--ids", "1", "--temperature", "nan"], "--temperature must be a finite number >= 0 (0: greedy), got nan"),
        (["--ids", "1", "--temperature", "0", "--top-k", "5"], "--temperature 0 means greedy decoding"),
        (["--ids", "1", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
        (["--ids", "1", "--seed", str(2**64)], "--seed must be in [0, 2**63 - 1], got 18446744073709551616"),
        (["--ids", "1", "--seed", "-1"], "--seed must be in [0, 2**63 - 1], got -1"),
        (["--ids", "1", "--model", "/path/to/gpt2"], "no such directory: /path/to/gpt2"),
        (["some text", "--model", "/path/to/gpt2"], "no such directory: /path/to/gpt2"),
    ],
)
def test_bad_arguments_exit_with_one_line(args, message, capsys):
    got = fails(args, capsys)
    assert message in got and "models--" not in got


def test_generate_errors_surface_as_one_line(checkpoint):
    assert "top_p" in fails(["--model", str(checkpoint), "--ids", "1", "--top-p", "1.5"])


@pytest.mark.parametrize("ids, bad", [("5,503", 503), ("-1,2", -1)])
def test_token_ids_outside_the_vocabulary_are_named(checkpoint, ids, bad):
    message = fails(["--model", str(checkpoint), f"--ids={ids}"])
    assert f"token id {bad} is outside this model's vocabulary [0, 502]" in message


def test_devices(capsys):
    assert "--device must be cpu, cuda or cuda:N, got 'foo'" in fails(["--ids", "1", "--device", "foo"])
    if not torch.cuda.is_available():
        assert "no CUDA GPU is available" in fails(["--ids", "1", "--device", "cuda"])


def test_corrupt_checkpoint_is_one_line_and_no_traceback(tmp_path):
    hf_gpt2("tiny-503").save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64)
    out = subprocess.run(
        [sys.executable, "-m", "fastgpt", "generate", "--model", str(tmp_path), "--ids", "1", "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode != 0 and "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastgpt: ") and "model.safetensors is not a readable" in lines[0]


def test_module_entry_point_runs():
    out = subprocess.run(
        [sys.executable, "-m", "fastgpt", "generate", "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "--max-new-tokens" in out.stdout
