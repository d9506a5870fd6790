"""fastgpt.logits_processors against transformers' own processors, step by step.

Each processor keeps its state incrementally (seen mask, token history, device step counter);
transformers rebuilds it from the whole ``input_ids`` every step. Random scores and token rows
(small vocabularies, so tokens and n-grams repeat), stepped with ``update`` and shuffled with
``reorder`` as beam search does, must give exactly HF's scores.
"""

import pytest
import torch
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
)

from fastgpt.decoder import ban_early_eos
from fastgpt.logits_processors import (
    LogitsProcessor,
    NoRepeatNGram,
    ProcessorList,
    RepetitionPenalty,
    ScoresRecorder,
    build_processors,
    recorded_scores,
)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


class DecoderEosBan(LogitsProcessor):
    """The Decoder's min_new_tokens ban (fastgpt.decoder.ban_early_eos, the one implementation)
    in the processor protocol, so that it can be driven step by step against HF's processor."""

    def __init__(self, min_new_tokens, eos_token_ids):
        self.min_new_tokens, self.eos_ids = min_new_tokens, eos_token_ids

    def start(self, input_ids, max_len, vocab_size, row_start=None):
        device = input_ids.device
        self.eos = torch.tensor(self.eos_ids, device=device)
        self.min_new = torch.full((1,), self.min_new_tokens, device=device)
        self.n_generated = torch.zeros(1, dtype=torch.int64, device=device)

    def __call__(self, scores):
        ban_early_eos(scores, self.eos, self.n_generated, self.min_new)
        return scores

    def update(self, tokens):
        self.n_generated += 1


def run_against_hf(ours, theirs, *, R, T, V, steps, device, reorder_every=3, seed=0):
    """Drive ``ours`` (a ProcessorList) and HF's list over ``steps`` steps; compare every step."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (R, T), generator=g).to(device)
    ours.start(ids, T + steps)
    for step in range(steps):
        scores = (torch.randn(R, V, generator=g) * 3).to(device)
        expected = scores.clone()
        for p in theirs:
            expected = p(ids, expected)
        got = ours(scores.clone())
        assert torch.equal(got, expected), f"step {step}"
        if step % reorder_every == reorder_every - 1:
            rows = torch.randint(0, R, (R,), generator=g).to(device)  # beams continue other rows
            ids = ids[rows]
            ours.reorder(rows)
        new = torch.randint(0, V, (R,), generator=g).to(device)
        ids = torch.cat([ids, new[:, None]], dim=1)
        ours.update(new)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_transformers(device, penalty):
    ours = ProcessorList([RepetitionPenalty(penalty)], vocab_size=23)
    run_against_hf(ours, [RepetitionPenaltyLogitsProcessor(penalty)], R=4, T=5, V=23, steps=12, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_no_repeat_ngram_matches_transformers(device, n):
    # vocab 5: n-grams repeat often, so bans happen at most steps; T=1 starts below n.
    ours = ProcessorList([NoRepeatNGram(n)], vocab_size=5)
    run_against_hf(ours, [NoRepeatNGramLogitsProcessor(n)], R=3, T=1, V=5, steps=14, device=device, seed=n)


def test_no_repeat_ngram_bans_exactly_the_completing_tokens():
    p = ProcessorList([NoRepeatNGram(2)], vocab_size=6)
    p.start(torch.tensor([[1, 2, 3, 1]]), 6)
    out = p(torch.zeros(1, 6))
    # last token 1 was followed by 2 before: only 2 is banned.
    assert out[0].tolist() == [0, 0, float("-inf"), 0, 0, 0]


def test_no_repeat_ngram_longer_than_the_history_never_bans():
    p = ProcessorList([NoRepeatNGram(5)], vocab_size=4)
    p.start(torch.tensor([[1, 1, 1]]), 4)  # max_len 4 < n: no window can ever exist
    assert torch.equal(p(torch.ones(1, 4)), torch.ones(1, 4))


@pytest.mark.parametrize("device", DEVICES)
def test_repetition_penalty_leaves_pad_slots_out_like_each_row_alone(device):
    """Issue 11.1: a left-padded row is penalised as the same row without its pads (newer HF)."""
    g = torch.Generator().manual_seed(3)
    V, T, pad = 9, 6, 7
    ids = torch.randint(0, V, (3, T), generator=g)
    row_start = torch.tensor([0, 2, 4], dtype=torch.int32)
    for b, n in enumerate(row_start.tolist()):
        ids[b, :n] = pad
    ids[0, 5] = 8  # row 0 has no pad: 7 may appear in it only as a real token
    ours = ProcessorList([RepetitionPenalty(3.0)], vocab_size=V)
    ours.start(ids.to(device), T + 1, row_start=row_start.to(device))
    scores = torch.randn(3, V, generator=g) * 3
    got = ours(scores.clone().to(device)).cpu()
    for b, n in enumerate(row_start.tolist()):
        alone = RepetitionPenaltyLogitsProcessor(3.0)(ids[b : b + 1, n:], scores[b : b + 1].clone())
        assert torch.equal(got[b : b + 1], alone), f"row {b}"
    with_pads = ProcessorList([RepetitionPenalty(3.0)], vocab_size=V)
    with_pads.start(ids.to(device), T + 1)  # no row_start: transformers 5.17's behaviour
    expected = RepetitionPenaltyLogitsProcessor(3.0)(ids, scores.clone())
    assert torch.equal(with_pads(scores.clone().to(device)).cpu(), expected)
    assert not torch.equal(expected[2], got[2])  # the pad id's score differs: the case matters


@pytest.mark.parametrize("device", DEVICES)
def test_decoder_eos_ban_matches_transformers_min_new_tokens(device):
    T, eos = 4, [3, 7]
    ours = ProcessorList([DecoderEosBan(5, eos)], vocab_size=11)
    theirs = [MinNewTokensLengthLogitsProcessor(T, 5, torch.tensor(eos, device=device))]
    run_against_hf(ours, theirs, R=2, T=T, V=11, steps=8, device=device)


@pytest.mark.parametrize("device", DEVICES)
def test_all_three_in_hf_order_match_transformers(device):
    T, V = 3, 7
    # The Decoder bans EOS before the processors run; HF after them: the same scores.
    ours = build_processors(vocab_size=V, repetition_penalty=1.5, no_repeat_ngram_size=2)
    ours.insert(0, DecoderEosBan(3, [2]))
    theirs = [
        RepetitionPenaltyLogitsProcessor(1.5),
        NoRepeatNGramLogitsProcessor(2),
        MinNewTokensLengthLogitsProcessor(T, 3, torch.tensor([2], device=device)),
    ]
    run_against_hf(ours, theirs, R=4, T=T, V=V, steps=10, device=device)


def test_build_processors_skips_inactive_settings_and_orders_recorder_last():
    assert build_processors(vocab_size=10) is None
    procs = build_processors(vocab_size=10, repetition_penalty=1.2, no_repeat_ngram_size=3, record_scores=True)
    assert [type(p) for p in procs] == [RepetitionPenalty, NoRepeatNGram, ScoresRecorder]
    assert not procs.graph_safe
    assert build_processors(vocab_size=10, repetition_penalty=1.2, no_repeat_ngram_size=3).graph_safe


def test_scores_recorder_keeps_copies_of_warped_scores():
    procs = build_processors(vocab_size=4, record_scores=True, warp=lambda s: s * 2)
    procs.start(torch.zeros(1, 1, dtype=torch.long), 3)
    x = torch.ones(1, 4)
    out = procs(x)
    x.fill_(5)  # later in-place changes must not reach the recorded copy
    assert out is x
    assert torch.equal(recorded_scores(procs)[0], torch.full((1, 4), 2.0))
    assert recorded_scores(None) is None


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: RepetitionPenalty(0.0), "repetition_penalty"),
        (lambda: RepetitionPenalty(-1.0), "repetition_penalty"),
        (lambda: NoRepeatNGram(0), "no_repeat_ngram_size"),
        (lambda: NoRepeatNGram(2.0), "no_repeat_ngram_size"),
    ],
)
def test_bad_settings_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.cuda
def test_processors_never_sync_with_the_host_and_replay_in_a_cuda_graph():
    """graph_safe processors: no host sync (sync debug mode errors on one), and a captured CUDA
    graph of process + update replays to the same scores as eager execution."""
    V, R, T, steps = 50, 4, 6, 6
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 8, (R, T), generator=g).cuda()
    all_scores = [(torch.randn(R, V, generator=g) * 3).cuda() for _ in range(steps)]
    all_tokens = [torch.randint(0, 8, (R,), generator=g).cuda() for _ in range(steps)]

    def make():
        p = build_processors(vocab_size=V, repetition_penalty=1.4, no_repeat_ngram_size=2)
        p.insert(0, DecoderEosBan(3, [1, 2]))
        p.start(ids, T + steps)
        return p

    eager = make()
    expected = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for s, t in zip(all_scores, all_tokens):
            expected.append(eager(s.clone()))
            eager.update(t)
    finally:
        torch.cuda.set_sync_debug_mode("default")

    graphed = make()
    static_scores = torch.zeros(R, V, device="cuda")
    static_tokens = torch.zeros(R, dtype=torch.long, device="cuda")
    # Warm up on a side stream (as torch.cuda.graph requires), on a throwaway copy of the state.
    warm = make()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        warm(static_scores.clone())
        warm.update(static_tokens)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = graphed(static_scores.clone())
        graphed.update(static_tokens)
    # Capture recorded the work but did not run it: reset the state the capture would have changed.
    fresh = make()
    for a, b in zip(graphed, fresh):
        for name in ("seen", "history", "length", "n_generated"):
            if getattr(a, name, None) is not None:
                getattr(a, name).copy_(getattr(b, name))
    for s, t, want in zip(all_scores, all_tokens, expected):
        static_scores.copy_(s)
        static_tokens.copy_(t)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_out, want)
