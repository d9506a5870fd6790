"""Beam search against transformers' generate(num_beams=...): token for token, float32.

Random-weight GPT-2 models with "sharp" weights (tests/models.py), so beams diverge and EOS
choices matter. EOS ids are taken from HF's own beam output without EOS, so that the best
hypothesis really ends early when that id is an EOS.
"""

import pytest
import torch

import fastgpt
import fastgpt.beam_search as beam_module
from fastgpt import KVCache, run_report
from fastgpt.model import GPT
from tests.helpers import HAS_CUDA, left_padded
from tests.models import hf_gpt2

_MODELS: dict = {}

def models(name, device="cpu"):
    key = (name, device)
    if key not in _MODELS:
        hf = hf_gpt2(name).to(device)
        _MODELS[key] = (hf, GPT.from_hf(hf))
    return _MODELS[key]


def first_greedy_tokens(model, ids, mask):
    """Each row's greedy first new token: beam 0's best candidate at step 1, so as an EOS id it
    always ends a hypothesis in the first step (and removes that continuation from the beams)."""
    return model.generate(ids, 1, attention_mask=mask)[:, -1].tolist()


def check_beam_parity(name, lengths, n_new, num_beams, eos, nrs, lp, es, seed=0, device="cpu"):
    """fastgpt vs HF beam search; ``eos``: None, "row0" (one id) or "list" (the ids of rows 0 and 1)."""
    hf, model = models(name, device)
    pad = 1
    ids, mask = left_padded(hf.config.vocab_size, lengths, pad, seed=seed)
    ids, mask = ids.to(device), mask.to(device)
    kwargs = dict(
        max_new_tokens=n_new,
        num_beams=num_beams,
        num_return_sequences=nrs,
        length_penalty=lp,
        early_stopping=es,
        pad_token_id=pad,
        attention_mask=mask,
    )
    if eos:
        firsts = first_greedy_tokens(model, ids, mask)
        kwargs["eos_token_id"] = firsts[:2] if eos == "list" else firsts[0]
    expected = hf.generate(ids, do_sample=False, **kwargs)
    got = model.generate(ids, **kwargs)
    assert got.shape == expected.shape, (got.shape, expected.shape)
    assert torch.equal(got, expected)
    T = ids.shape[1]
    if not eos:
        assert len(set(got[:, T:].flatten().tolist())) >= 3  # the beams do not repeat one token
    return got, T, kwargs


# (model, prompt lengths, new tokens, num_beams, eos, num_return_sequences, length_penalty, early_stopping, seed)
CASES = [
    ("tiny-503", [5], 12, 2, None, 1, 1.0, False, 0),
    ("tiny-503", [5], 20, 4, "row0", 2, 0.5, True, 2),
    ("tiny-503", [5], 10, 8, None, 2, 2.0, "never", 0),
    ("tiny-503", [5], 12, 8, "row0", 1, 1.0, False, 1),
    ("odd-1001", [4], 12, 4, "row0", 1, 2.0, "never", 0),
    # left-padded batches
    ("odd-1001", [7, 3, 5], 10, 2, "row0", 2, 1.0, True, 0),
    ("tiny-503", [6, 2], 10, 4, None, 1, 0.5, False, 3),
    ("tiny-503", [3, 6], 12, 8, "list", 2, 2.0, "never", 1),
]


@pytest.mark.parametrize("name, lengths, n_new, nb, eos, nrs, lp, es, seed", CASES)
def test_beam_search_matches_transformers(name, lengths, n_new, nb, eos, nrs, lp, es, seed):
    got, T, kwargs = check_beam_parity(name, lengths, n_new, nb, eos, nrs, lp, es, seed)
    if (name, nb, seed) == ("tiny-503", 4, 2):
        # This case returns an EOS-ended hypothesis, shorter than the other: filled after its EOS.
        e = kwargs["eos_token_id"]
        row = next(r for r in got[:, T:].tolist() if e in r)
        assert row.index(e) < n_new - 1 and set(row[row.index(e) + 1 :]) == {1}


def test_early_stopping_true_stops_when_num_beams_hypotheses_are_done():
    got, T, _ = check_beam_parity("tiny-503", [5], 12, 4, "row0", 2, 1.0, True, seed=1)
    assert got.shape[1] < T + 12
    got, T, _ = check_beam_parity("tiny-503", [5], 12, 4, "row0", 2, 1.0, False, seed=1)
    assert got.shape[1] == T + 12  # the heuristic kept searching


@pytest.mark.parametrize(
    "kwargs",
    [dict(repetition_penalty=1.5, min_new_tokens=4), dict(no_repeat_ngram_size=2, repetition_penalty=0.8)],
)
def test_beam_search_with_logits_processors_matches_transformers(kwargs):
    """The drop-in follows the installed transformers (5.17 penalises pad slots); the native
    generate gives each left-padded prompt the beams it gets alone (issue 11 item 1)."""
    hf, model = models("tiny-503")
    ids, mask = left_padded(503, [5, 3], 1, seed=4)
    eos = first_greedy_tokens(model, ids, mask)[0]
    common = dict(max_new_tokens=12, num_beams=3, num_return_sequences=2, pad_token_id=1, attention_mask=mask, eos_token_id=eos)
    expected = hf.generate(ids, do_sample=False, **common, **kwargs)
    got = fastgpt.accelerate(hf).generate(ids, do_sample=False, **common, **kwargs)
    assert torch.equal(got, expected)
    native = model.generate(ids, **common, **kwargs)
    assert not torch.equal(native, model.generate(ids, **common))  # the processors change the result
    assert_rows_alone(hf, native, ids, mask, do_sample=False, **common, **kwargs)


def assert_rows_alone(hf, got, ids, mask, **kwargs):
    """Each prompt's rows of a batched beam search equal HF's beams for that prompt alone
    (unpadded), filled with the pad id past their end."""
    nrs = kwargs["num_return_sequences"]
    pad = kwargs["pad_token_id"]
    kwargs = {k: v for k, v in kwargs.items() if k != "attention_mask"}
    for b in range(ids.shape[0]):
        start = int((mask[b] == 0).sum())
        alone = hf.generate(ids[b : b + 1, start:], **kwargs)  # (nrs, T_b + n_b)
        rows = got[b * nrs : (b + 1) * nrs, start:]
        assert torch.equal(rows[:, : alone.shape[1]], alone), f"prompt {b}"
        assert (rows[:, alone.shape[1] :] == pad).all(), f"prompt {b}: pad after the end"


def test_repetition_penalty_does_not_penalise_left_pad_slots_in_beam_search():
    """Issue 11 item 1's repro, beam search: the pad/EOS id in the pad slots is not penalised."""
    hf, model = models("tiny-503")
    free = model.generate(torch.tensor([[1, 2]]), 6)
    eos = int(free[0, 2 + 3])  # the 4th new token of the unpadded row
    ids = torch.tensor([[eos, eos, eos, eos, 1, 2], [4, 5, 6, 3, 1, 2]])
    mask = (ids != eos).long()
    common = dict(max_new_tokens=8, num_beams=2, num_return_sequences=1, pad_token_id=eos, eos_token_id=eos,
                  repetition_penalty=3.0)  # fmt: skip
    got = model.generate(ids, attention_mask=mask, **common)
    assert_rows_alone(hf, got, ids, mask, do_sample=False, **common)


def test_beam_candidates_go_through_the_top_k_op(monkeypatch):
    """Contract C3: every top-k of beam search is the top-k op, and run_report() shows it."""
    import fastgpt.kernels.topk as topk_op

    calls = []
    real = topk_op.topk

    def counting(x, k, **kwargs):
        calls.append((tuple(x.shape), k))
        return real(x, k, **kwargs)

    monkeypatch.setattr(topk_op, "topk", counting)
    fastgpt.reset_kernels_report()
    got, T, kwargs = check_beam_parity("tiny-503", [5, 3], 6, 3, None, 1, 1.0, False, seed=2)
    n_steps = got.shape[1] - T
    assert calls[0] == ((2, 3 * 503), 2 * 3)  # the candidates over (B, num_beams * V)
    assert len(calls) == 3 * n_steps  # candidates, running beams, kept hypotheses per step
    assert run_report()["dispatch"]["topk"] == topk_op.topk_backend("cpu")
    assert run_report()["generate"]["loop"] == "beam"


@pytest.mark.cuda
def test_the_top_k_op_replays_in_a_cuda_graph():
    """Graph safety of the beam candidates' top-k (C3): captured once, replayed on new scores."""
    from fastgpt import backend

    x = torch.randn(4, 3 * 50257, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        backend.topk(x, 6)  # warm-up: builds/loads the op outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        values, indices = backend.topk(x, 6)
    for seed in range(3):
        x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).cuda())
        graph.replay()
        ref_values, ref_indices = torch.topk(x, 6)
        assert torch.equal(values, ref_values) and torch.equal(indices, ref_indices)


def test_stop_step_found_between_host_checks_gives_the_same_result(monkeypatch):
    """The host reads the stop flag every SYNC_EVERY steps; the output must not depend on it."""
    hf, model = models("tiny-503")
    ids, mask = left_padded(503, [5], 1, seed=1)  # stops after 3 of 12 steps (see the early-stopping test)
    eos = first_greedy_tokens(model, ids, mask)[0]
    kwargs = dict(max_new_tokens=12, num_beams=4, eos_token_id=eos, early_stopping=True, pad_token_id=1)
    outs = []
    for every in (1, 1000):
        monkeypatch.setattr(beam_module, "SYNC_EVERY", every)
        outs.append(model.generate(ids, return_dict_in_generate=True, output_scores=True, **kwargs))
    ref = hf.generate(ids, return_dict_in_generate=True, output_scores=True, do_sample=False, **kwargs)
    assert len(ref.scores) < 12  # HF stopped early
    for out in outs:
        assert torch.equal(out.sequences, ref.sequences)
        assert len(out.scores) == len(ref.scores)
        assert torch.equal(out.beam_indices, ref.beam_indices)


def test_beams_reorder_one_preallocated_cache_in_place(monkeypatch):
    """One cache for batch * num_beams rows; each step reorder_rows ping-pongs between the cache
    buffer pair and its one spare pair: no cache or KV buffer is allocated per step."""
    _, model = models("tiny-503")
    made, pointers, calls = [], set(), []
    real_new_cache, real_reorder = GPT.new_cache, KVCache.reorder_rows

    def new_cache(self, batch, max_len):
        cache = real_new_cache(self, batch, max_len)
        made.append((batch, max_len))
        return cache

    def reorder_rows(self, rows):
        real_reorder(self, rows)
        calls.append(rows.clone())
        pointers.add((self.k.data_ptr(), self.v.data_ptr()))

    monkeypatch.setattr(GPT, "new_cache", new_cache)
    monkeypatch.setattr(KVCache, "reorder_rows", reorder_rows)
    ids = torch.randint(1, 503, (2, 4), generator=torch.Generator().manual_seed(0))
    out = model.generate(ids, 9, num_beams=3)
    assert made == [(6, 4 + 9)]
    assert len(calls) == out.shape[1] - 4 == 9
    assert len(pointers) == 2  # the two buffer pairs, alternating
    for rows in calls:
        assert rows.dtype == torch.long and rows.shape == (6,)
        assert bool((rows // 3 == torch.arange(6) // 3).all())  # beams never cross prompts


def test_beam_search_return_dict_matches_transformers():
    hf, model = models("tiny-503")
    ids, mask = left_padded(503, [6, 4], 1, seed=7)
    eos = first_greedy_tokens(model, ids, mask)[0]
    kwargs = dict(
        max_new_tokens=10, num_beams=4, num_return_sequences=3, eos_token_id=eos, pad_token_id=1, attention_mask=mask,
        return_dict_in_generate=True, output_scores=True, output_logits=True, length_penalty=0.7,
    )
    ref = hf.generate(ids, do_sample=False, **kwargs)
    out = model.generate(ids, **kwargs)
    assert type(out) is type(ref)
    assert torch.equal(out.sequences, ref.sequences)
    assert out.beam_indices.dtype == ref.beam_indices.dtype and torch.equal(out.beam_indices, ref.beam_indices)
    assert out.sequences_scores.dtype == torch.float32
    torch.testing.assert_close(out.sequences_scores, ref.sequences_scores, rtol=0, atol=1e-4)
    assert len(out.scores) == len(ref.scores) and len(out.logits) == len(ref.logits)
    for a, b in zip(out.scores, ref.scores):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    for a, b in zip(out.logits, ref.logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(num_beams=2, num_return_sequences=3), ValueError, "num_return_sequences"),
        (dict(num_beams=2, do_sample=True), ValueError, "beam sampling"),
        (dict(num_beams=0), ValueError, "num_beams"),
        (dict(num_beams=2, early_stopping="sometimes"), ValueError, "early_stopping"),
        (dict(num_beams=2, length_penalty="long"), ValueError, "length_penalty"),
        (dict(num_beams=2, streamer=object()), ValueError, "streamer"),
        (dict(num_return_sequences=2), ValueError, "num_return_sequences"),
        (dict(repetition_penalty=0.0), ValueError, "repetition_penalty"),
        (dict(no_repeat_ngram_size=-1), ValueError, "no_repeat_ngram_size"),
        (dict(streamer=object()), TypeError, "put"),
    ],
)
def test_bad_beam_arguments_raise_before_any_work(kwargs, error, match, monkeypatch):
    _, model = models("tiny-503")
    monkeypatch.setattr(GPT, "forward", lambda *a, **k: pytest.fail("the model ran"))
    with pytest.raises(error, match=match):
        model.generate(torch.randint(0, 503, (1, 5)), 4, **kwargs)


def test_beam_search_on_the_kernel_path_matches_transformers(monkeypatch):
    """FASTGPT_BACKEND=triton: the Triton kernels (interpreted on the CPU) serve the reordered
    beam rows of the cache, left padding included."""
    from fastgpt.kernels.utils import interpreting

    device = "cuda" if HAS_CUDA else "cpu"
    if device == "cpu" and not interpreting():
        pytest.skip("the Triton kernels need CUDA or TRITON_INTERPRET=1")
    from fastgpt import kernels_report, reset_kernels_report

    monkeypatch.setenv("FASTGPT_BACKEND", "triton")
    reset_kernels_report()
    check_beam_parity("hd64-257", [5, 3], 3, 2, None, 2, 1.0, False, device=device)
    report = kernels_report()
    assert report["attention.decode"] == "triton" and report["attention.prefill"] == "triton"


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize(
    "name, lengths, n_new, nb, eos, nrs, lp, es, seed",
    [
        ("hd64-1001", [5], 14, 4, "row0", 2, 0.5, True, 0),
        ("hd64-1001", [7, 3, 5], 12, 2, "row0", 2, 1.0, False, 1),
        ("hd64-50257", [9, 4], 16, 8, None, 2, 2.0, "never", 0),
        ("hd64-50257", [6], 20, 4, "list", 1, 1.0, False, 2),
        ("tiny-503", [5, 2], 12, 4, "row0", 2, 1.0, True, 0),  # head_dim 16: no kernel, torch attention
    ],
)
def test_beam_search_matches_transformers_on_cuda(monkeypatch, backend, name, lengths, n_new, nb, eos, nrs, lp, es, seed):
    from fastgpt import kernels_report, reset_kernels_report
    from fastgpt.backend import resolve_backend

    if name == "tiny-503" and backend == "auto":
        pytest.skip("head_dim 16 is not a Triton attention size")
    monkeypatch.setenv("FASTGPT_BACKEND", backend)
    reset_kernels_report()
    check_beam_parity(name, lengths, n_new, nb, eos, nrs, lp, es, seed=seed, device="cuda")
    assert kernels_report()["attention.decode"] == resolve_backend("cuda")  # the kernel path ran when available
