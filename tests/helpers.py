"""Helpers shared by the tests: the one place for HAS_CUDA, left-padded batches, assert_close, a
recording streamer, host-read counting, the CPU stand-in for a CUDA-graph replay and a test
double of the contract-C1 sampler status."""

from __future__ import annotations

from collections import Counter

import torch

HAS_CUDA = torch.cuda.is_available()

#: Tensor methods that read a value back to the host (a device sync on a GPU).
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


def left_padded(vocab: int, lengths, pad_id: int = 1, *, seed: int | None = None, low: int = 1, device="cpu"):
    """A ``(B, max(lengths))`` left-padded batch of random ids in ``[low, vocab)`` and its 0/1 mask.

    ``seed`` None draws from torch's global RNG; an int from a private generator.
    """
    g = None if seed is None else torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.full((len(lengths), T), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, T - n :] = torch.randint(low, vocab, (n,), generator=g)
        mask[b, T - n :] = 1
    return ids.to(device), mask.to(device)


def assert_close(got: torch.Tensor, ref: torch.Tensor, *, atol: float, rtol: float = 0.0, what: str = "") -> None:
    """``torch.testing.assert_close`` that also names ``what`` and prints the worst mismatches."""
    try:
        torch.testing.assert_close(got, ref, atol=atol, rtol=rtol, equal_nan=False)
    except AssertionError as exc:
        diff = (got.double() - ref.double()).abs().flatten()
        worst = diff.nan_to_num(float("inf")).topk(min(5, diff.numel())).indices.tolist()
        rows = [f"  [{i}] got {got.flatten()[i].item()!r} expected {ref.flatten()[i].item()!r}" for i in worst]
        raise AssertionError(f"{what}: {exc}\nworst mismatches:\n" + "\n".join(rows)) from None


class RecordingStreamer:
    """A streamer (HF's ``put``/``end`` interface) that records its calls: ``("put", tensor)`` and
    ``("end", None)``."""

    def __init__(self) -> None:
        self.calls: list = []

    def put(self, value: torch.Tensor) -> None:
        self.calls.append(("put", value.clone()))

    def end(self) -> None:
        self.calls.append(("end", None))


class HostReadCounter:
    """Counts host reads of tensors (``HOST_READS``, patched with ``monkeypatch``) inside :meth:`run`."""

    def __init__(self, monkeypatch) -> None:
        self.counts: Counter = Counter()
        self.on = False
        for name in HOST_READS:
            original = getattr(torch.Tensor, name)

            def counting(tensor, *args, __original=original, __name=name, **kwargs):
                if self.on:
                    self.counts[__name] += 1
                return __original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counting)

    def run(self, fn):
        """``(fn(), Counter of host reads during it)``."""
        self.counts.clear()
        self.on = True
        try:
            result = fn()
        finally:
            self.on = False
        return result, Counter(self.counts)


def emulate_graph_replay(monkeypatch) -> None:
    """Run the CUDA-graph path on any device and backend: the same persistent state per shape,
    keys, reuse, load/reset and host bookkeeping as a real graph, with each "replay" an eager
    call of the captured step (the warm-up steps a real capture runs included, so that
    ``DecodeGraph.load`` must undo them)."""
    from fastgpt import cuda_graph

    def capture(graph, n_warmup: int = cuda_graph.N_WARMUP) -> None:
        for _ in range(n_warmup):
            graph.park_at_last_slot()
            graph.decoder.step(graph.tokens)

        def replay() -> None:
            cache = graph.decoder.cache
            pos = cache.pos
            graph.decoder.step_into(graph.tokens)  # what a real capture records
            cache.pos = pos  # like a real replay: the host position is left to DecodeGraph.step

        graph._replay = replay
        graph.capture_s = 0.0

    monkeypatch.setattr(cuda_graph.DecodeGraph, "capture", capture)
    real_reason = cuda_graph.unavailable_reason

    def reason(device, backend):
        why = real_reason(device, backend)
        return why if why is not None and why.startswith("disabled") else None

    monkeypatch.setattr(cuda_graph, "unavailable_reason", reason)
