"""fastgpt.accelerate(hf_model).generate(...) against hf_model.generate(...).

A parametrized matrix of supported argument combinations must give HF's tokens and HF's
output types (greedy and beam search exactly; sampling by distribution, shapes and types);
unsupported arguments must fall back to HF with one FallbackWarning (or raise when strict);
streamers must receive HF's calls.
"""

import contextlib
import io
import logging
import warnings

import pytest
import torch
from transformers import GenerationConfig, TextStreamer
from transformers.generation import GenerateDecoderOnlyOutput
from transformers.generation.logits_process import LogitsProcessor
from transformers.generation.stopping_criteria import StoppingCriteria

import fastgpt
from fastgpt import FallbackWarning, kernels_report, reset_kernels_report
from fastgpt import hf_compat
from fastgpt.hf_compat import _check_signature
from fastgpt.model import GPT
from tests.helpers import RecordingStreamer, assert_close
from tests.models import hf_gpt2
from tests.stats import chisquare_pvalue

_CACHE: dict = {}


def wrapped(name="tiny-503", device="cpu"):
    """(hf_model, accelerated) built once per module: accelerate() copies the weights."""
    key = (name, device)
    if key not in _CACHE:
        hf = hf_gpt2(name).to(device)
        _CACHE[key] = (hf, fastgpt.accelerate(hf))
    return _CACHE[key]


def prompts(device="cpu", name="tiny-503"):
    """A single prompt, a left-padded batch (pad id 1) and EOS ids greedy decoding hits midway."""
    if ("prompts", device, name) not in _CACHE:
        _CACHE["prompts", device, name] = _make_prompts(device, name)
    return _CACHE["prompts", device, name]


def _make_prompts(device, name):
    g = torch.Generator().manual_seed(0)
    single = torch.randint(2, 503, (1, 6), generator=g)
    batch = torch.randint(2, 503, (3, 7), generator=g)
    mask = torch.ones_like(batch)
    batch[0, :3], mask[0, :3] = 1, 0
    batch[2, :5], mask[2, :5] = 1, 0
    hf, _ = wrapped(name, device)
    single, batch, mask = single.to(device), batch.to(device), mask.to(device)
    free = hf.generate(single, max_new_tokens=12, do_sample=False, pad_token_id=0)
    eos, eos2 = int(free[0, 6 + 4]), int(free[0, 6 + 7])
    return single, batch, mask, eos, eos2


@contextlib.contextmanager
def hf_generate_forbidden(hf):
    """The accelerated call must not run hf_model.generate (no silent fallback)."""
    real = hf.generate
    hf.generate = lambda *a, **k: pytest.fail("fell back to Hugging Face's generate")
    try:
        yield
    finally:
        hf.generate = real


def assert_same_output(got, expected, atol=1e-4):
    assert type(got) is type(expected)
    if isinstance(expected, torch.Tensor):
        assert got.shape == expected.shape and got.dtype == expected.dtype
        assert torch.equal(got, expected)
        return
    for key in ("sequences", "sequences_scores", "scores", "logits", "beam_indices", "attentions", "hidden_states"):
        a, b = getattr(got, key, None), getattr(expected, key, None)
        assert (a is None) == (b is None), key
        if b is None:
            continue
        if key in ("sequences", "beam_indices"):
            assert a.dtype == b.dtype and torch.equal(a, b), key
        elif isinstance(b, tuple):
            assert len(a) == len(b), key
            for i, (x, y) in enumerate(zip(a, b)):
                assert_close(x, y, atol=atol, what=f"{key}[{i}]")
        else:
            assert_close(a, b, atol=atol, what=key)


def run_both(kwargs_fn, batch=False):
    hf, fast = wrapped()
    single, batch_ids, mask, eos, eos2 = prompts()
    kwargs = kwargs_fn(eos, eos2)
    if batch:
        if kwargs.pop("mask", True):
            kwargs["attention_mask"] = mask
        ids = batch_ids
    else:
        ids = single
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # HF's own advice warnings, emitted by both
        expected = hf.generate(ids, **kwargs)
        with hf_generate_forbidden(hf), warnings.catch_warnings():
            warnings.simplefilter("error", FallbackWarning)
            reset_kernels_report()
            got = fast.generate(ids, **kwargs)
    assert kernels_report(), "fastgpt's model did not run"
    return got, expected


MATRIX = {
    # greedy
    "max_new_tokens": (lambda e, e2: dict(max_new_tokens=10), False),
    "default_max_length_20": (lambda e, e2: dict(), False),
    "max_length": (lambda e, e2: dict(max_length=14), False),
    "repetition_penalty": (lambda e, e2: dict(max_new_tokens=12, repetition_penalty=1.5), False),
    "no_repeat_ngram_size": (lambda e, e2: dict(max_new_tokens=12, no_repeat_ngram_size=2), False),
    "eos_min_new_tokens": (lambda e, e2: dict(max_new_tokens=12, eos_token_id=e, min_new_tokens=6), False),
    "eos_list": (lambda e, e2: dict(max_new_tokens=12, eos_token_id=[e2, e]), False),
    "eos_min_length": (lambda e, e2: dict(max_new_tokens=12, eos_token_id=e, min_length=13), False),
    "batch_mask_eos_penalty": (
        lambda e, e2: dict(max_new_tokens=10, pad_token_id=1, eos_token_id=e, repetition_penalty=1.2),
        True,
    ),
    "batch_mask_inferred_from_pad": (lambda e, e2: dict(max_new_tokens=8, pad_token_id=1, mask=False), True),
    "generation_config": (
        lambda e, e2: dict(generation_config=GenerationConfig(max_new_tokens=9, repetition_penalty=1.3, no_repeat_ngram_size=3)),
        False,
    ),
    "greedy_ignores_sampling_args": (lambda e, e2: dict(max_new_tokens=8, temperature=0.3, top_k=3), False),
    # beam search
    "beam_processors": (lambda e, e2: dict(max_new_tokens=10, num_beams=3, repetition_penalty=1.3, no_repeat_ngram_size=2), False),
    "beam_eos_nrs_lp_es": (
        lambda e, e2: dict(max_new_tokens=10, num_beams=4, eos_token_id=e, min_new_tokens=3, num_return_sequences=2, length_penalty=0.7, early_stopping=True),
        False,
    ),
    "beam_batch": (lambda e, e2: dict(max_new_tokens=8, num_beams=2, eos_token_id=[e, e2], num_return_sequences=2, pad_token_id=1), True),
    # HF's output classes
    "dict_greedy_scores_logits": (
        lambda e, e2: dict(max_new_tokens=8, eos_token_id=e, repetition_penalty=1.2, return_dict_in_generate=True, output_scores=True, output_logits=True),
        False,
    ),
    "dict_greedy_no_scores": (lambda e, e2: dict(max_new_tokens=6, return_dict_in_generate=True), True),
    "dict_beam_scores_logits": (
        lambda e, e2: dict(max_new_tokens=8, num_beams=4, num_return_sequences=3, eos_token_id=e, return_dict_in_generate=True, output_scores=True, output_logits=True, pad_token_id=1),
        True,
    ),
    "dict_beam_no_scores": (lambda e, e2: dict(max_new_tokens=6, num_beams=2, return_dict_in_generate=True), False),
}


@pytest.mark.parametrize("case", list(MATRIX))
def test_accelerated_generate_equals_transformers(case):
    kwargs_fn, batch = MATRIX[case]
    got, expected = run_both(kwargs_fn, batch)
    assert_same_output(got, expected)


def test_the_processors_in_the_matrix_change_the_result():
    """Guard: the matrix would not notice a processor that does nothing."""
    hf, fast = wrapped()
    single, *_ = prompts()
    plain = fast.generate(single, max_new_tokens=12)
    assert not torch.equal(fast.generate(single, max_new_tokens=12, repetition_penalty=1.5), plain)
    assert not torch.equal(fast.generate(single, max_new_tokens=12, no_repeat_ngram_size=2), plain)


def test_generation_config_of_the_model_is_used_and_pad_defaults_to_eos(caplog):
    hf = hf_gpt2("tiny-503")
    single, _, _, eos, _ = prompts()
    hf.generation_config.eos_token_id = eos
    hf.generation_config.max_new_tokens = 9
    hf.generation_config.num_beams = 2
    fast = fastgpt.accelerate(hf)
    expected = hf.generate(single)
    with caplog.at_level(logging.WARNING, logger="fastgpt"), hf_generate_forbidden(hf):
        got = fast.generate(single)
        fast.generate(single)
    assert torch.equal(got, expected)
    pad_warnings = [r for r in caplog.records if "pad_token_id" in r.getMessage()]
    assert len(pad_warnings) == 1  # once per wrapper, as HF's own warning


def test_input_ids_as_keyword():
    hf, fast = wrapped()
    single, *_ = prompts()
    with hf_generate_forbidden(hf):
        got = fast.generate(input_ids=single, max_new_tokens=5)
    assert torch.equal(got, hf.generate(input_ids=single, max_new_tokens=5, pad_token_id=0))


# ---------------------------------------------------------------------------------------------
# Sampling: distributions, shapes, types, seeds
# ---------------------------------------------------------------------------------------------
def test_sampling_shapes_and_types_match_transformers():
    hf, fast = wrapped()
    _, batch, mask, eos, _ = prompts()
    kwargs = dict(do_sample=True, max_new_tokens=6, num_return_sequences=3, attention_mask=mask, pad_token_id=1)
    expected = hf.generate(batch, **kwargs)
    with hf_generate_forbidden(hf):
        got = fast.generate(batch, **kwargs)
        got_dict = fast.generate(batch, **kwargs, return_dict_in_generate=True, output_scores=True)
    assert got.shape == expected.shape == (9, 7 + 6) and got.dtype == expected.dtype
    assert torch.equal(got[:, :7], expected[:, :7])
    assert type(got_dict) is GenerateDecoderOnlyOutput and len(got_dict.scores) == 6
    assert got_dict.scores[0].shape == (9, 503) and got_dict.scores[0].dtype == torch.float32


def test_top_k_1_sampling_equals_greedy():
    hf, fast = wrapped()
    _, batch, mask, *_ = prompts()
    with hf_generate_forbidden(hf):
        got = fast.generate(batch, attention_mask=mask, do_sample=True, top_k=1, max_new_tokens=10, pad_token_id=1)
    expected = hf.generate(batch, attention_mask=mask, do_sample=False, max_new_tokens=10, pad_token_id=1)
    assert torch.equal(got, expected)


def test_sampling_is_reproducible_with_torch_manual_seed():
    _, fast = wrapped()
    single, *_ = prompts()
    runs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        runs.append(fast.generate(single, do_sample=True, max_new_tokens=20, temperature=1.5))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("kwargs", [dict(temperature=1.7), dict(temperature=0.9, top_p=0.9, min_p=0.02, top_k=20)])
def test_sampled_first_tokens_follow_transformers_distribution(kwargs):
    """HF's defaults (top_k=50) and warpers: first-token frequencies of 3000 sampled sequences
    against the distribution HF's own output_scores give for that step (chi-square, fixed seed).
    The scores fastgpt returns for that step equal HF's."""
    hf, fast = wrapped()
    single, *_ = prompts()
    ref = hf.generate(single, do_sample=True, max_new_tokens=1, return_dict_in_generate=True, output_scores=True, **kwargs)
    probs = torch.softmax(ref.scores[0][0].double(), dim=-1)
    torch.manual_seed(1234)
    with hf_generate_forbidden(hf):
        out = fast.generate(
            single, do_sample=True, max_new_tokens=1, num_return_sequences=3000,
            return_dict_in_generate=True, output_scores=True, **kwargs,
        )
    torch.testing.assert_close(out.scores[0], ref.scores[0].expand(3000, -1), rtol=0, atol=1e-4)
    counts = torch.bincount(out.sequences[:, -1], minlength=503).double()
    support = probs > 0
    if "top_k" not in kwargs:
        assert int(support.sum()) == 50  # HF's default top_k=50 is in force
    assert counts[~support].sum() == 0
    assert chisquare_pvalue(counts[support], probs[support] * 3000) > 1e-3


# ---------------------------------------------------------------------------------------------
# Streamers
# ---------------------------------------------------------------------------------------------
def assert_same_calls(a, b):
    assert [k for k, _ in a] == [k for k, _ in b]
    for (_, x), (_, y) in zip(a, b):
        if x is not None:
            assert x.device.type == "cpu" and torch.equal(x, y)


@pytest.mark.parametrize("batch", [False, True])
def test_streamer_receives_transformers_calls(batch):
    hf, fast = wrapped()
    single, batch_ids, mask, eos, _ = prompts()
    ids = batch_ids if batch else single
    kwargs = dict(max_new_tokens=12, eos_token_id=eos, pad_token_id=1)
    if batch:
        kwargs["attention_mask"] = mask
    theirs, ours = RecordingStreamer(), RecordingStreamer()
    expected = hf.generate(ids, streamer=theirs, **kwargs)
    with hf_generate_forbidden(hf):
        got = fast.generate(ids, streamer=ours, **kwargs)
    assert torch.equal(got, expected)
    assert_same_calls(ours.calls, theirs.calls)
    assert len(ours.calls) == 1 + (got.shape[1] - ids.shape[1]) + 1  # prompt, each step, end


class ToyTokenizer:
    """What TextStreamer needs of a tokenizer: decode()."""

    def decode(self, ids, **kwargs):
        return "".join(f"<{i}>" + (" " if i % 3 == 0 else "") for i in ids)


def test_text_streamer_prints_what_transformers_prints():
    hf, fast = wrapped()
    single, _, _, eos, _ = prompts()
    outputs = []
    for gen in (hf.generate, fast.generate):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            gen(single, max_new_tokens=10, eos_token_id=eos, streamer=TextStreamer(ToyTokenizer()), pad_token_id=0)
        outputs.append(buf.getvalue())
    assert outputs[0] == outputs[1] and len(outputs[0]) > 20


def test_streamer_with_sampling_gets_the_returned_tokens():
    _, fast = wrapped()
    single, *_ = prompts()
    rec = RecordingStreamer()
    out = fast.generate(single, do_sample=True, max_new_tokens=7, streamer=rec)
    steps = torch.stack([v for k, v in rec.calls[1:-1]], dim=1)  # (1, 7)
    assert torch.equal(rec.calls[0][1], single) and torch.equal(steps, out[:, 6:])


def test_streamer_with_beam_search_raises_like_transformers():
    hf, fast = wrapped()
    single, *_ = prompts()
    with pytest.raises(ValueError, match="streamer"):
        hf.generate(single, num_beams=2, streamer=RecordingStreamer(), max_new_tokens=3)
    with pytest.raises(ValueError, match="streamer"):
        fast.generate(single, num_beams=2, streamer=RecordingStreamer(), max_new_tokens=3)


# ---------------------------------------------------------------------------------------------
# Fallback and strict mode
# ---------------------------------------------------------------------------------------------
class BanToken(LogitsProcessor):
    def __call__(self, input_ids, scores):
        scores[:, 5] = -float("inf")
        return scores


class StopAtLength(StoppingCriteria):
    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 9, dtype=torch.bool)


FALLBACKS = {
    "output_attentions": dict(output_attentions=True, return_dict_in_generate=True),
    "logits_processor": dict(logits_processor=[BanToken()]),
    "stopping_criteria": dict(stopping_criteria=[StopAtLength()]),
    "suppress_tokens": dict(suppress_tokens=[3, 4]),
    "beam sampling": dict(num_beams=2, do_sample=True),
    "attention_mask": dict(attention_mask=torch.tensor([[1, 1, 1, 1, 1, 0]])),  # right padding
    "prefix_allowed_tokens_fn": dict(prefix_allowed_tokens_fn=lambda b, ids: [7, 8, 9]),
}


@pytest.mark.parametrize("name", list(FALLBACKS))
def test_unsupported_argument_falls_back_to_transformers_with_one_warning(name):
    hf, fast = wrapped()
    single, *_ = prompts()
    kwargs = dict(FALLBACKS[name], max_new_tokens=6, pad_token_id=0)
    torch.manual_seed(3)
    expected = hf.generate(single, **kwargs)
    torch.manual_seed(3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = fast.generate(single, **kwargs)
    ours = [w for w in caught if issubclass(w.category, FallbackWarning)]
    assert len(ours) == 1
    assert name in str(ours[0].message)
    assert ours[0].filename == __file__  # points at the caller
    assert_same_output(got, expected)


def test_training_mode_falls_back():
    hf = hf_gpt2("tiny-503")
    fast = fastgpt.accelerate(hf)
    hf.train()
    single, *_ = prompts()
    with pytest.warns(FallbackWarning, match="training"):
        fast.generate(single, max_new_tokens=3, pad_token_id=0)


def test_strict_mode_raises_naming_the_argument_and_never_runs_transformers():
    hf = hf_gpt2("tiny-503")
    fast = fastgpt.accelerate(hf, strict=True)
    single, *_ = prompts()
    with hf_generate_forbidden(hf):
        with pytest.raises(ValueError, match="output_attentions"):
            fast.generate(single, max_new_tokens=4, output_attentions=True, return_dict_in_generate=True)
        with pytest.raises(ValueError, match="logits_processor"):
            fast.generate(single, max_new_tokens=4, logits_processor=[BanToken()])
        assert fast.generate(single, max_new_tokens=4, num_beams=2).shape == (1, 10)  # supported: fine


def test_transformers_validation_errors_are_transformers_errors():
    _, fast = wrapped()
    single, *_ = prompts()
    with pytest.raises(ValueError, match="num_return_sequences"):
        fast.generate(single, max_new_tokens=4, num_return_sequences=2)  # greedy: HF rejects it
    with pytest.raises(ValueError, match="early_stopping"):
        fast.generate(single, max_new_tokens=4, num_beams=2, early_stopping="sometimes")


# ---------------------------------------------------------------------------------------------
# The wrapper itself
# ---------------------------------------------------------------------------------------------
def test_wrapper_exposes_models_and_forwards_attributes():
    hf, fast = wrapped()
    assert fast.hf_model is hf and isinstance(fast.model, GPT)
    assert fast.config is hf.config and fast.generation_config is hf.generation_config
    assert fast.device == hf.device
    ids = torch.tensor([[3, 4, 5]])
    torch.testing.assert_close(fast(ids).logits, hf(ids).logits)  # __call__ is the HF forward
    assert "AcceleratedModel" in repr(fast)


def test_generate_signature_is_transformers_signature():
    _check_signature()


def test_accelerate_rejects_other_models():
    with pytest.raises(TypeError, match="GPT2LMHeadModel"):
        fastgpt.accelerate(torch.nn.Linear(2, 2))


def test_weights_changed_in_place_are_copied_again():
    hf = hf_gpt2("tiny-503")
    fast = fastgpt.accelerate(hf)
    single, *_ = prompts()
    before = fast.generate(single, max_new_tokens=10, pad_token_id=0)
    with torch.no_grad():
        hf.transformer.wte.weight.mul_(-1.0)
    expected = hf.generate(single, max_new_tokens=10, pad_token_id=0)
    assert not torch.equal(expected, before)
    assert torch.equal(fast.generate(single, max_new_tokens=10, pad_token_id=0), expected)


@pytest.mark.parametrize(
    "change",
    [lambda p: p.data.mul_(1.5), lambda p: p.data.copy_(torch.randn_like(p) * 0.08)],
    ids=["data.mul_", "data.copy_"],
)
def test_weights_changed_through_data_are_copied_again(change):
    """Issue 11 item 2: ``.data`` bypasses the version counter; the fingerprint still sees it."""
    hf = hf_gpt2("tiny-503")
    fast = fastgpt.accelerate(hf)
    single, *_ = prompts()
    before = fast.generate(single, max_new_tokens=10, pad_token_id=0)
    torch.manual_seed(0)
    for p in hf.parameters():
        change(p)
    expected = hf.generate(single, max_new_tokens=10, pad_token_id=0)
    assert not torch.equal(expected, before)
    assert torch.equal(fast.generate(single, max_new_tokens=10, pad_token_id=0), expected)


def test_repetition_penalty_follows_the_installed_transformers(monkeypatch):
    """Issue 11 item 1: the drop-in penalises left-pad slots exactly when the installed
    transformers does (5.17 does; releases passing ``prompt_ignore_length`` do not)."""
    import inspect

    from transformers.generation.utils import GenerationMixin

    hf = hf_gpt2("tiny-503")
    fast = fastgpt.accelerate(hf)
    installed = "prompt_ignore_length" not in inspect.getsource(GenerationMixin._get_logits_processor)
    assert hf_compat.hf_penalizes_pad_slots() is installed
    eos = int(fast.generate(torch.tensor([[1, 2]]), max_new_tokens=6, repetition_penalty=3.0, pad_token_id=0)[0, 5])
    ids = torch.tensor([[eos, eos, eos, eos, 1, 2], [4, 5, 6, 3, 1, 2]])
    kwargs = dict(max_new_tokens=10, do_sample=False, repetition_penalty=3.0, eos_token_id=eos, pad_token_id=eos,
                  attention_mask=(ids != eos).long())  # fmt: skip
    assert torch.equal(fast.generate(ids, **kwargs), hf.generate(ids, **kwargs))  # the installed HF
    hf_compat.hf_penalizes_pad_slots.cache_clear()
    monkeypatch.setattr(hf_compat, "hf_penalizes_pad_slots", lambda: not installed)  # the other semantics
    other = fast.generate(ids, **kwargs)
    alone = hf.generate(ids[:1, 4:], **{k: v for k, v in kwargs.items() if k != "attention_mask"})
    with_pads = hf.generate(ids, **kwargs)
    if installed:  # the other semantics leave pads out: row 0 as if alone
        assert torch.equal(other[0, 4 : 4 + alone.shape[1]], alone[0]) and not torch.equal(other, with_pads)
    else:
        assert not torch.equal(other[0, 4 : 4 + alone.shape[1]], alone[0])


# ---------------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------------
CUDA_CASES = ["eos_min_new_tokens", "batch_mask_eos_penalty", "beam_eos_nrs_lp_es", "beam_batch", "dict_beam_scores_logits", "dict_greedy_scores_logits"]


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["hd64-1001", "tiny-503"])
@pytest.mark.parametrize("case", CUDA_CASES)
def test_accelerated_generate_equals_transformers_on_cuda(monkeypatch, name, case):
    from fastgpt.backend import resolve_backend

    if name == "tiny-503":
        monkeypatch.setenv("FASTGPT_BACKEND", "torch")  # head_dim 16: not a Triton attention size
    hf, fast = wrapped(name, "cuda")
    single, batch_ids, mask, eos, eos2 = prompts("cuda", name)
    kwargs_fn, batch = MATRIX[case]
    kwargs = kwargs_fn(eos, eos2)
    if batch:
        kwargs["attention_mask"] = mask
    ids = batch_ids if batch else single
    expected = hf.generate(ids, **kwargs)
    reset_kernels_report()
    with hf_generate_forbidden(hf), warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        got = fast.generate(ids, **kwargs)
    assert_same_output(got, expected)
    assert kernels_report()["attention.decode"] == resolve_backend("cuda")  # the kernels ran when available


@pytest.mark.cuda
def test_accelerate_half_precision_on_cuda_runs_and_agrees_on_the_first_token():
    hf = hf_gpt2("hd64-50257").to("cuda", torch.float16)
    fast = fastgpt.accelerate(hf)
    assert fast.model.dtype == torch.float16 and fast.model.device.type == "cuda"
    ids = torch.randint(0, 50257, (2, 8), generator=torch.Generator().manual_seed(0)).cuda()
    got = fast.generate(ids, max_new_tokens=16, num_beams=4, num_return_sequences=2, pad_token_id=0)
    assert got.shape == (4, 8 + 16) and got.dtype == torch.long and int(got.min()) >= 0 and int(got.max()) < 50257
    # fp16 logits differ between implementations in the last bits: compare only the first greedy
    # token, whose margin the sharp random weights make large.
    first = fast.generate(ids, max_new_tokens=1, pad_token_id=0)
    assert torch.equal(first, hf.generate(ids, max_new_tokens=1, pad_token_id=0))


@pytest.mark.cuda
def test_top_k_1_sampling_with_processors_and_streamer_on_cuda_equals_greedy():
    """The sampler kernel (top-k 1) after the device-side processors, streamed like HF."""
    hf, fast = wrapped("hd64-1001", "cuda")
    _, batch_ids, mask, eos, _ = prompts("cuda", "hd64-1001")
    kwargs = dict(attention_mask=mask, max_new_tokens=12, pad_token_id=1, eos_token_id=eos, repetition_penalty=1.3, no_repeat_ngram_size=2)
    theirs, ours = RecordingStreamer(), RecordingStreamer()
    expected = hf.generate(batch_ids, do_sample=False, streamer=theirs, **kwargs)
    with hf_generate_forbidden(hf):
        got = fast.generate(batch_ids, do_sample=True, top_k=1, streamer=ours, **kwargs)
        fast_path = fast.generate(batch_ids, do_sample=True, top_k=1, **kwargs)  # no streamer: the decode loop
    assert torch.equal(got, expected) and torch.equal(fast_path, expected)
    assert_same_calls(ours.calls, theirs.calls)


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), 1e-39])
def test_non_finite_or_vanishing_temperatures_are_left_to_transformers(temperature):
    """Issue 11 item 5, drop-in side: HF's own behaviour (its error, or its sampling), with one
    FallbackWarning; never fastgpt's token 0."""
    hf, fast = wrapped()
    single, *_ = prompts()
    kwargs = dict(max_new_tokens=3, do_sample=True, temperature=temperature, pad_token_id=0)
    try:
        torch.manual_seed(0)
        expected = hf.generate(single, **kwargs)
    except Exception as exc:  # noqa: BLE001 - whatever HF raises, the drop-in raises the same
        with pytest.warns(FallbackWarning, match="temperature"), pytest.raises(type(exc)):
            fast.generate(single, **kwargs)
        return
    torch.manual_seed(0)
    with pytest.warns(FallbackWarning, match="temperature"):
        assert torch.equal(fast.generate(single, **kwargs), expected)


# ---- model settings (issue 11 items 3, 4): followed, or the call falls back -------------------
@pytest.mark.parametrize(
    "flags",
    [dict(scale_attn_weights=False, scale_attn_by_inverse_layer_idx=True), dict(n_inner=100, reorder_and_upcast_attn=True)],
    ids=["attention-scales", "n_inner-upcast"],
)
def test_accelerate_follows_gpt2_config_flags(flags):
    hf = hf_gpt2("odd-1001", attn_implementation="eager", **flags)
    ids = torch.randint(0, 1001, (2, 9))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)  # fastgpt runs it: no fallback
        got = fastgpt.accelerate(hf).generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    want = hf.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    assert torch.equal(got, want)


def test_accelerate_uses_an_untied_lm_head():
    hf = hf_gpt2("odd-1001")
    torch.manual_seed(7)
    hf.lm_head.weight = torch.nn.Parameter(torch.randn_like(hf.lm_head.weight) * 0.08)  # as a user unties it
    ids = torch.randint(0, 1001, (1, 7))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        got = fastgpt.accelerate(hf).generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(got, hf.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0))


def test_an_unsupported_activation_falls_back_to_transformers_or_raises_when_strict():
    hf = hf_gpt2("tiny-503", activation_function="relu")
    ids = torch.randint(0, 503, (1, 5))
    fast = fastgpt.accelerate(hf)
    assert fast.model is None and "relu" in repr(fast)  # nothing copied: every call goes to HF
    with pytest.warns(FallbackWarning, match="activation_function='relu'"):
        got = fast.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(got, hf.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0))
    with pytest.raises(ValueError, match="activation_function='relu'"):
        fastgpt.accelerate(hf, strict=True).generate(ids, max_new_tokens=4, pad_token_id=0)
