"""The streaming loop (fastgpt/streaming.py): per-token host work on the shared Decoder.

It must give the fast loop's tokens (same decoder, same sampler stream), call the streamer as
transformers does, stop right after the step in which the last row finished, report sampler
failures at the step they happen, and leave a correct record in run_report().
"""

import pytest
import torch

import fastgpt
from fastgpt.decoder import Decoder
from fastgpt.settings import GenerationSettings
from fastgpt.streaming import stream_decode
from tests.helpers import RecordingStreamer, left_padded
from tests.models import pair

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.mark.parametrize("sampling", [{}, dict(do_sample=True, temperature=0.9, top_k=40, seed=7)], ids=["greedy", "sampling"])
def test_streamed_tokens_equal_the_fast_loop_and_reach_the_streamer(sampling):
    _, model = pair("odd-1001")
    ids, mask = left_padded(1001, [6, 3, 5], pad_id=1, seed=2)
    free = model.generate(ids, 14, attention_mask=mask, pad_token_id=1, **sampling)
    eos = int(free[1, 6 + 2])  # row 1 ends early; the others may not
    kwargs = dict(attention_mask=mask, pad_token_id=1, eos_token_id=eos, **sampling)
    fast = model.generate(ids, 14, **kwargs)
    assert fastgpt.last_generate_stats()["loop"] == "fast"
    streamer = RecordingStreamer()
    streamed = model.generate(ids, 14, streamer=streamer, **kwargs)
    assert torch.equal(streamed, fast)
    puts = [value for kind, value in streamer.calls if kind == "put"]
    assert streamer.calls[-1] == ("end", None) and torch.equal(puts[0], ids)
    assert torch.equal(torch.stack(puts[1:], dim=1), streamed[:, 6:])  # one (B,) put per step


def test_run_report_after_a_streamed_call():
    """Contract C2: last_generate_stats() is the streamed call's, inside the one run_report()."""
    _, model = pair("tiny-503")
    ids = torch.randint(1, 503, (2, 4))
    model.generate(ids, 9)  # a fast-loop call first: its record must be replaced
    out = model.generate(ids, 7, output_logits=True, return_dict_in_generate=True)
    report = fastgpt.run_report()
    assert set(report) == {"dispatch", "generate", "launches"}
    assert report["generate"] == fastgpt.last_generate_stats()
    assert report["generate"]["loop"] == "streaming" and report["generate"]["path"] == "eager"
    assert report["generate"]["decode_steps"] == 6 == len(out.logits) - 1
    assert report["dispatch"]["sample"] == "torch:greedy"


def test_stream_decode_stops_after_the_step_the_last_row_finished():
    _, model = pair("tiny-503")
    ids = torch.randint(1, 503, (2, 4))
    free = model.generate(ids, 12)
    eos = int(free[0, 4 + 5])
    settings = GenerationSettings.create(model.config, 4, 12, eos_token_id=eos)
    with torch.inference_mode():
        decoder = Decoder.create(model, settings, 2, 16)
        out = stream_decode(decoder, ids, 12)
    expected = model.generate(ids, 12, eos_token_id=eos)
    assert torch.equal(out.sequences, expected) and out.decode_steps == expected.shape[1] - 4 - 1
    assert out.scores is None and out.logits is None


def test_a_sampling_failure_is_raised_at_its_step_with_the_tokens_so_far_streamed():
    """Contract C1: the streaming loop reads the status every step."""
    model = fastgpt.GPT.from_config(fastgpt.GPTConfig(vocab_size=11, n_positions=32, n_embd=16, n_head=2, n_layer=1))
    streamer = RecordingStreamer()
    with pytest.raises(RuntimeError, match="row 0 at step 10: every token is banned"):
        model.generate(torch.tensor([[0]]), 20, do_sample=True, no_repeat_ngram_size=1, seed=3, streamer=streamer)
    puts = [value for kind, value in streamer.calls if kind == "put"]
    assert len(puts) == 1 + 11  # the prompt, the 10 good tokens and the failed step's
