"""The command line: `python -m fastgpt generate`."""

import subprocess
import sys

import pytest
import torch

from fastgpt import GPT
from fastgpt.cli import main
from tests.models import hf_gpt2


def test_cli_with_ids_on_a_local_checkpoint_matches_the_api(tmp_path, capsys):
    hf = hf_gpt2("tiny-503")
    hf.save_pretrained(tmp_path)
    assert main(["generate", "--model", str(tmp_path), "--ids", "5,17,300", "--max-new-tokens", "8", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    expected = GPT.from_pretrained(str(tmp_path)).generate(torch.tensor([[5, 17, 300]]), 8)
    assert printed == ",".join(map(str, expected[0].tolist()))


def test_cli_sampling_is_reproducible_with_seed(tmp_path, capsys):
    hf_gpt2("tiny-503").save_pretrained(tmp_path)
    args = ["generate", "--model", str(tmp_path), "--ids", "1,2", "--max-new-tokens", "6", "--temperature", "1.2",
            "--top-k", "20", "--seed", "5", "--device", "cpu"]
    main(args)
    first = capsys.readouterr().out
    main(args)
    assert capsys.readouterr().out == first


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "gpt5", "--random-init", "--ids", "1"], "preset"),
        (["--model", "gpt2", "--random-init", "--ids", "1,x"], "--ids"),
        (["--model", "gpt2", "--random-init"], "give a text prompt"),
        (["--model", "gpt2", "--random-init", "--ids", "1", "--top-p", "1.5", "--temperature", "1"], "top_p"),
        (["--model", "gpt2", "--random-init", "--ids", "1", "--dtype", "float64"], "dtype"),
    ],
)
def test_cli_bad_arguments_exit_with_a_message(args, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(["generate", "--device", "cpu", *args])
    assert message in str(info.value.code)


def test_cli_missing_weights_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(SystemExit) as info:
        main(["generate", "--model", str(tmp_path / "nothing"), "--ids", "1", "--device", "cpu"])
    assert "--random-init" in str(info.value.code)


def test_module_entry_point_runs():
    out = subprocess.run(
        [sys.executable, "-m", "fastgpt", "generate", "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and "--max-new-tokens" in out.stdout
