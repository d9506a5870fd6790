"""Fused next-token sampler: temperature, top-k, top-p, min-p and the draw in two Triton launches.

Semantics (the oracle is :func:`fastgpt.reference.filter_logits` / ``sampling_probs``)
--------------------------------------------------------------------------------------
For row ``b`` with logits ``l`` (``V`` tokens), temperature ``T``, ``top_k``, ``top_p``, ``min_p``:

* ``T == 0``: greedy, the argmax of the raw logits, lowest index among ties.
* otherwise ``x = l / T`` in float32 (IEEE division, exactly as the reference), then the kept set
  ``K = K_k ∩ K_p ∩ K_m``:

  - top-k (active when ``0 < top_k < V``): ``K_k = {i : x_i >= v_k}``, ``v_k`` the k-th largest
    value (ties at the boundary all kept).
  - top-p (active when ``top_p < 1``): sort ``K_k`` by (value descending, index ascending); token
    ``j`` is kept when the mass strictly before it is ``< top_p``. With ``e_i = exp(x_i - M)``
    (``M`` the row max) and ``Z = sum_{K_k} e_i`` this is ``F_j < top_p * Z``. Because ties at the
    cut are ordered by index, ``K_p = {x_i > t_v} ∪ {x_i == t_v, i <= t_i}``: a *lexicographic*
    threshold ``(t_v, t_i)``, not just a value (bf16/fp16 logits tie often).
  - min-p (active when ``min_p > 0``): ``p_i >= min_p * p_max`` with ``p_max`` the top token's
    probability, i.e. ``e_i >= min_p`` (the normaliser cancels).

* The draw is the Gumbel-max / exponential race over ``K``: ``argmax_{i in K} x_i - log(E_i)``
  with ``E_i ~ Exp(1)`` i.i.d., which picks ``i`` with probability ``e_i / sum_K e`` -- exact
  sampling from the renormalised distribution, with no normaliser, no prefix sum and no host sync.

Randomness
----------
Counter-based Philox Gumbel noise, one stream per (seed, step, row) and token, independent of the
kernel configuration: see :mod:`fastgpt.kernels.sampling_noise` (:func:`gumbel_noise` returns it,
so tests can recompute the race exactly).

Kernels and shapes
------------------
Pass 1, ``_chunk_kernel``, grid ``(B, C)``, ``C = ceil(V / CHUNK)``, so batch 1 fills the GPU.
Chunk ``c`` reads the tiles ``c, c + C, c + 2C, ...`` of ``TILE`` contiguous tokens
(``CHUNK = TILE * TILES``): interleaving spreads tokens whose ids cluster (frequent tokens have
low ids) over all chunks. Per chunk it writes: the max ``m_c``, ``s_c = sum exp(x - m_c)``, the
lowest-index argmax (greedy rows), and

* for keep-all rows (no top-k/p/min-p: plain temperature sampling), the chunk's race winner;
* otherwise its candidates: every token with key ``> theta_c``, at most ``K_C`` of them, where
  ``theta_c`` (a few halvings of the chunk's value range) is at least the
  chunk's ``(K_C + 1)``-th largest value (``INT_MIN`` when the chunk has ``<= K_C`` tokens).

Pass 2, ``_row_kernel``, grid ``(B,)``, one program per row:

* greedy / keep-all rows combine the chunk winners (ties -> lowest index);
* otherwise it loads the union of candidates, ``C_PAD * K_C`` entries. With
  ``tau = max_c theta_c`` the union holds *every* token with key ``> tau`` (a token outside it is
  ``<= theta_c <= tau`` of its own chunk), so whatever lies above ``tau`` is decided exactly:

  - *head* (the fast path): the ``<= HEAD`` largest union tokens (all tokens above a value
    ``h >= tau`` found by 10 halvings). For each head token its top-k rank (#tokens with a larger
    value) and top-p mass-before (mass of the tokens before it in (value desc, index asc) order)
    are exact pairwise sums over the head (a ``(HEAD, HEAD)`` comparison) -- which is the
    reference's definition itself, tie order included. Used when ``K`` provably lies in the head
    (``top_k <= #head``, or the top-p cut or the min-p threshold above ``h``).
  - *union*: otherwise thresholds above ``tau`` come from bisections on the key over the union
    (count for top-k, mass for top-p, then a bisection on the index to split a tie group at the
    top-p cut). Top-k is resolved when ``v_k > tau``; the row is resolved when some active filter
    confines ``K`` above ``tau`` (top-k resolved, or the top-p cut above ``tau``, or
    ``exp(tau - M) < min_p``). Then the race runs over the kept candidates.
* *exact fallback* (e.g. ``top_k`` larger than the union holds, or a top-p nucleus reaching below
  ``tau`` -- a flat distribution): the same program bisects on the key over the whole row (one
  pass over the row per step, the bracket starting at ``tau``) until at most ``CAP`` tokens remain
  in the bracket, gathers those into a per-row scratch and finishes in registers (or, for a single
  tie group larger than ``CAP``, bisects on the index over the row); then the race runs over the
  row, skipping tiles without kept tokens. Exact, just slower (tens of passes over the row by one
  program). ``workspace["path"][b]`` records which path each row took (``PATH_*`` bits).

Dtypes: logits fp32/fp16/bf16 ``(B, V)`` with a contiguous last dim (``V <= MAX_VOCAB``); settings
``(B,)`` (any stride, e.g. expanded scalars): temperature/top_p/min_p fp32, top_k int32; ``seed``
``(1,)`` int64, ``step`` ``(1,)`` int32/int64; output ``(B,)`` int64. Every input is a device
tensor, so one captured CUDA graph serves any settings.

Numerics: values, keys and the top-k threshold are exact (IEEE division, integer keys; ``-0.0`` is
mapped to ``+0.0`` so equal values get equal keys). Masses are float32 sums in a different order
than the reference's float32 softmax/cumsum, so a token whose mass-before lies within ~1e-6
(relative) of ``top_p`` -- or with ``e_i`` within float rounding of ``min_p`` -- may be decided
either way. ``top_p >= 1`` disables top-p (the reference may drop a tail whose float32 cumulative
mass rounds to 1, total mass < 1e-6). Negative temperatures are undefined (the token is still in
``[0, V)``).

Bad scores (contract C1): pass 1 records per chunk whether the scaled scores hold NaN or +inf (an
overflowing ``l / T`` included) and replaces NaN by ``-inf`` before any comparison, and every
candidate / scratch write is bounded by its slot count, so no pattern of NaN / inf writes out of
bounds. Pass 2 flags a sampling row with NaN (``STATUS_NAN``), +inf (``STATUS_POS_INF``) or only
``-inf`` scores (``STATUS_NO_TOKEN``) in ``status`` (the step of its first bad step beside it) and
returns its argmax instead of sampling. Greedy rows follow ``torch.argmax``: the first NaN wins.

Value ranges cannot be checked on the device without a host sync: the caller (``generate``)
validates host-side settings with :func:`check_sampling_settings` before filling the tensors;
:func:`sample` checks them itself only when the tensors are on the CPU.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from fastgpt.reference import STATUS_NAN, STATUS_NO_TOKEN, STATUS_POS_INF

from .sampling_noise import MAX_NOISE_VOCAB, NOISE_BLOCK, _noise_at, _noise_x4, _step_words, gumbel_noise
from .utils import check_tensor, interpreting, note_launch, pdl_enabled, triton_usable_on

__all__ = [
    "sample",
    "sampling_workspace",
    "check_sampling_settings",
    "gumbel_noise",
    "SamplerConfig",
    "SAMPLER_CONFIGS",
    "select_config",
    "interpreter_config",
    "MAX_VOCAB",
    "PATH_GREEDY",
    "PATH_KEEP_ALL",
    "PATH_UNION",
    "PATH_FALLBACK",
    "PATH_ROW_TOPK",
    "PATH_ROW_TOPP",
    "PATH_ROW_COMPACT",
    "PATH_TIE_SPLIT",
    "PATH_TIE_ROW",
    "PATH_SMALL_DRAW",
    "PATH_HEAD",
    "PATH_FLAGGED",
    "STATUS_NAN",
    "STATUS_POS_INF",
    "STATUS_NO_TOKEN",
]

#: Largest vocabulary the launcher accepts (256k tokens).
MAX_VOCAB = MAX_NOISE_VOCAB

# Bits of workspace["path"][b]: how row b was sampled.
PATH_GREEDY = 1  # temperature 0: argmax
PATH_KEEP_ALL = 2  # no filter: chunk race winners combined
PATH_UNION = 4  # kept set resolved from the chunk candidates
PATH_FALLBACK = 8  # kept set needed passes over the whole row
PATH_ROW_TOPK = 16  # ... the top-k threshold searched over the row
PATH_ROW_TOPP = 32  # ... the top-p cut searched over the row
PATH_ROW_COMPACT = 64  # ... a row search finished on <= CAP gathered tokens
PATH_TIE_SPLIT = 128  # the top-p cut split a tie group (index threshold needed)
PATH_TIE_ROW = 256  # ... and that tie group was searched over the row (more than CAP ties)
PATH_SMALL_DRAW = 512  # union race over <= DRAW tokens gathered first (the cheap draw)
PATH_HEAD = 1024  # kept set decided in the <= HEAD largest tokens (the fast path)
PATH_FLAGGED = 2048  # a sampling row with NaN / +inf / no possible token: flagged in status, argmax returned

# The bits of status[b, 0] (contract C1) are the oracle's: STATUS_NAN (the scaled scores contain
# NaN), STATUS_POS_INF (+inf, also from an overflowing logits / temperature), STATUS_NO_TOKEN
# (every score -inf: no token has a non-zero probability).

# Kernels may only read constexpr globals.
_P_GREEDY = tl.constexpr(PATH_GREEDY)
_P_KEEP_ALL = tl.constexpr(PATH_KEEP_ALL)
_P_UNION = tl.constexpr(PATH_UNION)
_P_FALLBACK = tl.constexpr(PATH_FALLBACK)
_P_ROW_TOPK = tl.constexpr(PATH_ROW_TOPK)
_P_ROW_TOPP = tl.constexpr(PATH_ROW_TOPP)
_P_ROW_COMPACT = tl.constexpr(PATH_ROW_COMPACT)
_P_TIE_SPLIT = tl.constexpr(PATH_TIE_SPLIT)
_P_TIE_ROW = tl.constexpr(PATH_TIE_ROW)
_P_SMALL_DRAW = tl.constexpr(PATH_SMALL_DRAW)
_P_HEAD = tl.constexpr(PATH_HEAD)
_P_FLAGGED = tl.constexpr(PATH_FLAGGED)
_F_NAN = tl.constexpr(STATUS_NAN)
_F_POS_INF = tl.constexpr(STATUS_POS_INF)
_F_NO_TOKEN = tl.constexpr(STATUS_NO_TOKEN)



# --------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Block sizes of one sampler configuration (all powers of two).

    ``tile * tiles`` tokens per pass-1 program, ``cands`` (``K_C``) candidates per chunk, pass 2
    loads ``chunk_pad * cands`` candidates (so ``C = ceil(V / (tile * tiles)) <= chunk_pad``),
    ``cap``: tokens gathered by the fallback, ``block``: fallback tile, ``draw``: the union race
    runs on at most ``draw`` gathered tokens when that many suffice, ``head``: size of the exact
    pairwise fast path (``head <= cap``), ``sel_iters``: bisection steps
    for ``theta_c`` (fewer only makes ``theta_c`` coarser, never wrong).
    """

    tile: int
    tiles: int
    cands: int
    chunk_pad: int
    cap: int
    block: int
    draw: int
    head: int
    sel_iters: int
    warps1: int
    warps2: int

    @property
    def chunk(self) -> int:
        return self.tile * self.tiles

    @property
    def max_vocab(self) -> int:
        return self.chunk * self.chunk_pad

    def n_chunks(self, vocab: int) -> int:
        return -(-vocab // self.chunk)


#: GPU configurations, by vocabulary size: (largest vocab, config).
_GPU_CONFIGS = (
    (65536, SamplerConfig(tile=128, tiles=32, cands=256, chunk_pad=16, cap=2048, block=2048, draw=256, head=64,
                          sel_iters=12, warps1=8, warps2=8)),
    (MAX_VOCAB, SamplerConfig(tile=128, tiles=32, cands=64, chunk_pad=64, cap=2048, block=2048, draw=256, head=64,
                              sel_iters=12, warps1=8, warps2=8)),
)


def interpreter_config(vocab: int, *, tile: int = 16, tiles: int = 16, cands: int = 16, cap: int = 64,
                       block: int = 512, draw: int = 16, head: int = 8) -> SamplerConfig:
    """A small configuration for the CPU interpreter (tests pick their own to reach each path).

    Small blocks so CPU tests cross several chunks and reach every path on small vocabularies;
    the interpreter costs ~0.5 ms per op whatever the block size, so not too many programs.
    """
    n = -(-vocab // (tile * tiles))
    return SamplerConfig(tile=tile, tiles=tiles, cands=cands, chunk_pad=max(1, 1 << (n - 1).bit_length()), cap=cap,
                         block=block, draw=draw, head=head, sel_iters=10, warps1=1, warps2=1)


def select_config(vocab: int) -> SamplerConfig:
    """The configuration :func:`sample` uses for ``vocab`` tokens on this process's backend."""
    if not 1 <= vocab <= MAX_VOCAB:
        raise ValueError(f"vocab must be in [1, {MAX_VOCAB}], got {vocab}")
    if interpreting():
        return interpreter_config(vocab)
    for limit, cfg in _GPU_CONFIGS:
        if vocab <= limit:
            return cfg
    raise AssertionError("unreachable")


def _kernel_constexprs(cfg: SamplerConfig) -> tuple[dict, dict]:
    k1 = {"TILE": cfg.tile, "TILES": cfg.tiles, "K_C": cfg.cands, "SEL_ITERS": cfg.sel_iters}
    k2 = {"C_PAD": cfg.chunk_pad, "K_C": cfg.cands, "CAP": cfg.cap, "BLOCK": cfg.block, "DRAW": cfg.draw,
          "HEAD": cfg.head}
    return k1, k2




def _sampler_configs() -> list[tuple[str, dict, int]]:
    out = []
    for _, cfg in _GPU_CONFIGS:
        k1, k2 = _kernel_constexprs(cfg)
        out.append(("_chunk_kernel", k1, cfg.warps1))
        out.append(("_row_kernel", k2, cfg.warps2))
    for per_token in (False, True):
        out.append(("_noise_kernel", {"BLOCK": NOISE_BLOCK, "PER_TOKEN": per_token}, 4))
    return out


#: Every (kernel name, constexprs, num_warps) the launcher can use on a GPU.
SAMPLER_CONFIGS: list[tuple[str, dict, int]] = _sampler_configs()


# --------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------
@triton.jit
def _scaled(raw, t_div):
    """Logits -> float32 ``raw / t_div`` (IEEE division, as the reference), ``-0.0`` -> ``+0.0``."""
    x = tl.math.div_rn(raw.to(tl.float32), t_div)
    return tl.where(x == 0.0, 0.0, x)


@triton.jit
def _float_key(x):
    """Order-preserving int32 key of a float32 (signed compare of keys == float compare)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _key_float(key):
    """Inverse of :func:`_float_key`."""
    bits = tl.where(key < 0, key ^ 0x7FFFFFFF, key)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _row_flags(temp, k, top_p, min_p, V):
    """Which filters row settings switch on; both passes must agree, so one definition."""
    greedy = temp == 0.0
    k_active = (k > 0) & (k < V)
    p_active = top_p < 1.0
    m_active = min_p > 0.0
    keep_all = (temp != 0.0) & (k_active == 0) & (p_active == 0) & (m_active == 0)
    return greedy, k_active, p_active, m_active, keep_all


@triton.jit
def _argmax_lowest(score, idx, mask):
    """(max score, lowest idx attaining it) over ``mask``; (-inf, INT_MAX) when nothing is masked in."""
    s = tl.where(mask, score, float("-inf"))
    best = tl.max(s, 0)
    best_i = tl.min(tl.where(mask & (s == best), idx, 2147483647), 0)
    return best, best_i


@triton.jit
def _search_regs(keys, w, valid, lo, hi, base, L):
    """Smallest key ``t`` in ``(lo, hi]`` with ``H(t) = base + sum(w[valid & keys > t]) < L``.

    ``lo, hi``: int64 scalars with ``H(hi) < L <= H(lo)``; every token with a key in ``(lo, hi]``
    must be among the ``valid`` entries, and no valid entry may have a key above ``hi``. ``H`` only
    changes at present keys, so the answer is the key of a token. Returns ``(t, H(t))``.
    """
    h_hi = base + tl.sum(tl.where(valid & (keys > hi.to(tl.int32)), w, 0.0), 0)
    while hi - lo > 1:
        mid = lo + ((hi - lo) >> 1)
        h = base + tl.sum(tl.where(valid & (keys > mid.to(tl.int32)), w, 0.0), 0)
        go_down = h < L
        hi = tl.where(go_down, mid, hi)
        h_hi = tl.where(go_down, h, h_hi)
        lo = tl.where(go_down, lo, mid)
    return hi, h_hi


@triton.jit
def _nth_index_regs(keys, idx, valid, t, n, V):
    """The ``n``-th smallest index (1-based) among valid entries with key ``t`` (needs >= n of them)."""
    group = valid & (keys == t)
    lo = tl.full([], -1, tl.int32)
    hi = tl.zeros([], tl.int32) + (V - 1)  # (V may be a constexpr 1: no .to())
    while hi - lo > 1:
        mid = lo + ((hi - lo) >> 1)
        c = tl.sum((group & (idx <= mid)).to(tl.int32), 0)
        go_down = c >= n
        hi = tl.where(go_down, mid, hi)
        lo = tl.where(go_down, lo, mid)
    return hi


@triton.jit
def _tie_keep(L, F, pv, g):
    """How many of the ``g`` tied tokens at the top-p cut are kept: ``#{r : F + r * pv < L}`` (>= 1)."""
    q = tl.math.div_rn(L - F, tl.maximum(pv, 1e-30))
    q = tl.minimum(q, g.to(tl.float32))
    n = tl.math.ceil(q).to(tl.int32)
    n = tl.maximum(n, 1)
    n = tl.minimum(n, g)
    return tl.where(pv > 0.0, n, g)


@triton.jit
def _row_tile(row_ptr, start, end, t_div, BLOCK: tl.constexpr):
    """Tokens ``[start, start + BLOCK)`` of a row, cut at ``end``: ``(ids, mask, scaled values, keys)``.

    The body every pass over a row starts with (masked tokens read as ``-inf``).
    """
    offs = start + tl.arange(0, BLOCK)
    msk = offs < end
    x = _scaled(tl.load(row_ptr + offs, mask=msk, other=float("-inf")), t_div)
    return offs, msk, x, _float_key(x)


@triton.jit
def _row_agg(row_ptr, V, t_div, M, ta, tb, BLOCK: tl.constexpr, USE_MASS: tl.constexpr):
    """One pass over the row: (count, H) of keys ``> ta`` and of keys ``> tb``.

    ``H`` is the mass ``sum exp(x - M)`` when ``USE_MASS``, else the count (as float32).
    """
    ta32 = ta.to(tl.int32)
    tb32 = tb.to(tl.int32)
    cnt_a = tl.zeros([], tl.int32)
    cnt_b = tl.zeros([], tl.int32)
    h_a = tl.zeros([], tl.float32)
    h_b = tl.zeros([], tl.float32)
    # (a while loop: the interpreter cannot range() over a runtime bound)
    start = tl.zeros([], tl.int32)
    while start < V:
        offs, msk, x, key = _row_tile(row_ptr, start, V, t_div, BLOCK)
        above_a = msk & (key > ta32)
        above_b = msk & (key > tb32)
        cnt_a += tl.sum(above_a.to(tl.int32), 0)
        cnt_b += tl.sum(above_b.to(tl.int32), 0)
        if USE_MASS:
            e = tl.where(x > float("-inf"), tl.exp(x - M), 0.0)
            h_a += tl.sum(tl.where(above_a, e, 0.0), 0)
            h_b += tl.sum(tl.where(above_b, e, 0.0), 0)
        start += BLOCK
    if not USE_MASS:
        h_a = cnt_a.to(tl.float32)
        h_b = cnt_b.to(tl.float32)
    return cnt_a, h_a, cnt_b, h_b


@triton.jit
def _row_search(row_ptr, V, t_div, M, lo, hi, L, sval_ptr, sidx_ptr,
                CAP: tl.constexpr, BLOCK: tl.constexpr, USE_MASS: tl.constexpr):
    """:func:`_search_regs` over the whole row (``H(t)`` = count or mass of keys ``> t``).

    Bisects ``(lo, hi]`` with one pass per step until at most ``CAP`` tokens are left in it,
    gathers them into the row's scratch and finishes in registers. If the bracket shrinks to a
    single key first, that key is the answer (a tie group of more than ``CAP`` tokens).
    Returns ``(t, H(t), g = #tokens with key t, w of one of them, compacted, n_c)``; when
    ``compacted``, the scratch holds every token with a key in ``(lo_final, hi_final]``, so the
    whole tie group at ``t``, in its first ``n_c`` slots.
    """
    cnt_lo, _h_lo, cnt_hi, h_hi = _row_agg(row_ptr, V, t_div, M, lo, hi, BLOCK, USE_MASS)
    while (cnt_lo - cnt_hi > CAP) & (hi - lo > 1):
        mid = lo + ((hi - lo) >> 1)
        c_mid, h_mid, _c, _h = _row_agg(row_ptr, V, t_div, M, mid, mid, BLOCK, USE_MASS)
        go_down = h_mid < L
        hi = tl.where(go_down, mid, hi)
        cnt_hi = tl.where(go_down, c_mid, cnt_hi)
        h_hi = tl.where(go_down, h_mid, h_hi)
        lo = tl.where(go_down, lo, mid)
        cnt_lo = tl.where(go_down, cnt_lo, c_mid)

    compacted = cnt_lo - cnt_hi <= CAP
    t = hi
    F = h_hi
    g = cnt_lo - cnt_hi
    if USE_MASS:
        pv = tl.exp(_key_float(hi.to(tl.int32)) - M)
    else:
        pv = tl.full([], 1.0, tl.float32)
    n_c = tl.zeros([], tl.int32)
    if compacted:
        # Gather the <= CAP tokens with lo < key <= hi (positions from a running prefix count).
        lo32 = lo.to(tl.int32)
        hi32 = hi.to(tl.int32)
        # Earlier reads of the scratch (a previous search, by other threads) must be done.
        tl.debug_barrier()
        # (a while loop: the interpreter cannot range() over a runtime bound)
        start = tl.zeros([], tl.int32)
        while start < V:
            offs, msk, x, key = _row_tile(row_ptr, start, V, t_div, BLOCK)
            sel = msk & (key > lo32) & (key <= hi32)
            pos = n_c + tl.cumsum(sel.to(tl.int32), 0) - 1
            # (pos < CAP always holds here; the mask keeps any input from writing past the scratch)
            tl.store(sval_ptr + pos, x, mask=sel & (pos < CAP))
            tl.store(sidx_ptr + pos, offs, mask=sel & (pos < CAP))
            n_c += tl.sum(sel.to(tl.int32), 0)
            start += BLOCK
        # The scratch was written by other threads of this program: a CTA barrier orders it.
        tl.debug_barrier()
        j = tl.arange(0, CAP)
        sm = j < n_c
        sv = tl.load(sval_ptr + j, mask=sm, other=float("-inf"), cache_modifier=".cg")
        sk = tl.where(sm, _float_key(sv), -2147483648)
        if USE_MASS:
            sw = tl.where(sm & (sv > float("-inf")), tl.exp(sv - M), 0.0)
        else:
            sw = sm.to(tl.float32)
        t, F = _search_regs(sk, sw, sm, lo, hi, h_hi, L)
        group = sm & (sk == t.to(tl.int32))
        g = tl.sum(group.to(tl.int32), 0)
        pv = tl.max(tl.where(group, sw, 0.0), 0)
    return t, F, g, pv, compacted, n_c


@triton.jit
def _nth_index_row(row_ptr, V, t_div, t, n, BLOCK: tl.constexpr):
    """:func:`_nth_index_regs` over the whole row: the n-th smallest index with key ``t``."""
    t32 = t.to(tl.int32)
    lo = tl.full([], -1, tl.int32)
    hi = tl.zeros([], tl.int32) + (V - 1)  # (V may be a constexpr 1: no .to())
    while hi - lo > 1:
        mid = lo + ((hi - lo) >> 1)
        c = tl.zeros([], tl.int32)
        # (a while loop: the interpreter cannot range() over a runtime bound)
        start = tl.zeros([], tl.int32)
        while start <= mid:
            _offs, msk, _x, key = _row_tile(row_ptr, start, mid + 1, t_div, BLOCK)
            c += tl.sum((msk & (key == t32)).to(tl.int32), 0)
            start += BLOCK
        go_down = c >= n
        hi = tl.where(go_down, mid, hi)
        lo = tl.where(go_down, lo, mid)
    return hi


@triton.jit
def _load_union(cval_ptr, cidx_ptr, ccount_ptr, b, n_chunks, C_PAD: tl.constexpr, K_C: tl.constexpr):
    """The union of row b's candidates, ``(C_PAD * K_C,)``: entry u = chunk u // K_C, slot u % K_C."""
    u = tl.arange(0, C_PAD * K_C)
    uch = u // K_C
    ucnt = tl.load(ccount_ptr + b * n_chunks + uch, mask=uch < n_chunks, other=0)
    uvalid = (uch < n_chunks) & ((u % K_C) < ucnt)
    uoff = (b * n_chunks + uch).to(tl.int64) * K_C + (u % K_C)
    uv = tl.load(cval_ptr + uoff, mask=uvalid, other=float("-inf"))
    ui = tl.load(cidx_ptr + uoff, mask=uvalid, other=2147483647)
    return uv, ui, uvalid


@triton.jit
def _head_sample(uv, ui, uvalid, tau, M, S, k, top_p, min_p, k_active, p_active, m_active,
                 sval_row, sidx_row, seed, row, step_lo, step_hi, HEAD: tl.constexpr, H_ITERS: tl.constexpr):
    """The fast path: decide the kept set exactly among the <= HEAD largest tokens, draw there.

    The head is every union token with value ``> h``, ``h >= tau`` chosen by a few halvings so
    that it holds at most ``HEAD`` tokens; all tokens above ``h`` are in the union, so for a head
    token both its top-k rank (tokens with a larger value) and its top-p mass-before (tokens
    before it in (value desc, index asc) order) are exact pairwise sums over the head. Returns
    ``(ok, token)``: ``ok`` when the kept set provably lies in the head (top-k inside it, or the
    top-p cut, or the min-p threshold above ``h``) and top-p's normaliser is known.
    """
    finite = uvalid & (uv > float("-inf"))
    lo = tl.where(tau == -2147483648, float("-inf"), _key_float(tau))
    h = lo
    if tl.sum((finite & (uv > lo)).to(tl.int32), 0) > HEAD:
        # count(x > M) = 0 fits; halve [max(tau, min), M] keeping count(x > hi) <= HEAD.
        lo = tl.maximum(lo, tl.min(tl.where(finite, uv, float("inf")), 0))
        hi = tl.max(tl.where(finite, uv, float("-inf")), 0)
        for _ in range(H_ITERS):
            mid = lo + (hi - lo) * 0.5
            fits = tl.sum((finite & (uv > mid)).to(tl.int32), 0) <= HEAD
            hi = tl.where(fits, mid, hi)
            lo = tl.where(fits, lo, mid)
        h = hi
    sel = finite & (uv > h)
    n_head = tl.sum(sel.to(tl.int32), 0)
    pos = tl.cumsum(sel.to(tl.int32), 0) - 1
    # (n_head <= HEAD <= CAP by construction; the mask keeps any input inside the scratch)
    tl.store(sval_row + pos, uv, mask=sel & (pos < HEAD))
    tl.store(sidx_row + pos, ui, mask=sel & (pos < HEAD))
    tl.debug_barrier()  # the head was scattered by other threads of this program
    j = tl.arange(0, HEAD)
    hm = j < n_head
    hv = tl.load(sval_row + j, mask=hm, other=float("-inf"), cache_modifier=".cg")
    hidx = tl.load(sidx_row + j, mask=hm, other=2147483647, cache_modifier=".cg")
    hk = tl.where(hm, _float_key(hv), -2147483648)
    he = tl.where(hm, tl.exp(hv - M), 0.0)

    # [i, j]: does head token j have a larger value than token i / come before it?
    larger = hm[None, :] & (hk[None, :] > hk[:, None])  # (HEAD, HEAD)
    before = larger | (hm[None, :] & (hk[None, :] == hk[:, None]) & (hidx[None, :] < hidx[:, None]))
    rank = tl.sum(larger.to(tl.int32), 1)  # (HEAD,)
    in_k = hm & ((k_active == 0) | (rank < k))
    mass_k = tl.sum(tl.where(in_k, he, 0.0), 0)
    k_in_head = k_active & (n_head >= k)  # v_k > h: K_k inside the head
    P = top_p * tl.where(k_active, mass_k, S)
    mass_before = tl.sum(tl.where(before & in_k[None, :], he[None, :], 0.0), 1)  # (HEAD,)

    norm_known = (p_active == 0) | (k_active == 0) | k_in_head
    inside = k_in_head | (p_active & (mass_k >= P)) | (m_active & (tl.exp(h - M) < min_p)) | (h == float("-inf"))
    kept = in_k & ((p_active == 0) | (mass_before < P)) & (he >= min_p)
    _best, tok = _argmax_lowest(hv + _noise_at(hidx, seed, row, step_lo, step_hi), hidx, kept)
    return norm_known & inside, tok


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _chunk_theta(x, valid, m, K_C: tl.constexpr, SEL_ITERS: tl.constexpr):
    """The chunk's candidate threshold (a key): at most ``K_C`` of its (NaN-free) values lie above.

    ``INT_MIN`` when the chunk has ``<= K_C`` tokens (complete), the key of ``-inf`` when its
    finite tokens fit, else a value found by ``SEL_ITERS`` halvings of ``[min, max]`` (``m`` the
    max) with ``count(x > theta) <= K_C``: not necessarily a token's value nor the exact
    ``(K_C + 1)``-th largest; fewer halvings only trade a few candidates for speed.
    """
    finite = valid & (x > float("-inf"))
    n_valid = tl.sum(valid.to(tl.int32), 0)
    n_finite = tl.sum(finite.to(tl.int32), 0)
    theta = tl.full([], -2147483648, tl.int32)  # the chunk is complete
    if n_valid > K_C:
        theta = _float_key(tl.full([], float("-inf"), tl.float32))  # all finite tokens fit
    if n_finite > K_C:
        hi = m  # count(x > max) = 0 fits
        lo = tl.min(tl.where(finite, x, float("inf")), 0)
        for _ in range(SEL_ITERS):
            mid = lo + (hi - lo) * 0.5
            fits = tl.sum((x > mid).to(tl.int32), 0) <= K_C
            hi = tl.where(fits, mid, hi)
            lo = tl.where(fits, lo, mid)
        # As a key (-0.0 -> +0.0 first, so that key > theta <=> x > theta).
        theta = _float_key(tl.where(hi == 0.0, 0.0, hi))
    return theta


# V and n_chunks are never specialised: Triton 3.6 fails to compile the row kernel for a constexpr
# V == 1 and spills registers for a constexpr n_chunks == 1 (nothing to gain from either).
@triton.jit(do_not_specialize=["V", "n_chunks"])
def _chunk_kernel(
    logits_ptr, stride_row, V, n_chunks,
    temp_ptr, stride_temp, topk_ptr, stride_topk, topp_ptr, stride_topp, minp_ptr, stride_minp,
    seed_ptr, step_ptr,
    cmax_ptr, csum_ptr, carg_ptr, ctheta_ptr, ccount_ptr, cgum_ptr, cgidx_ptr, cval_ptr, cidx_ptr, cflag_ptr,
    eos_ptr, n_eos, n_gen_ptr, min_new_ptr,
    TILE: tl.constexpr, TILES: tl.constexpr, K_C: tl.constexpr, SEL_ITERS: tl.constexpr,
    BAN_EOS: tl.constexpr, USE_PDL: tl.constexpr,
):
    """Pass 1 for chunk ``c`` of row ``b``: the EOS ban, chunk statistics, race winner or candidates."""
    b = tl.program_id(0)
    c = tl.program_id(1)
    CHUNK: tl.constexpr = TILE * TILES
    j = tl.arange(0, CHUNK)
    # Position j of the chunk is token (c + C * (j // TILE)) * TILE + j % TILE: interleaved tiles.
    idx = (c + n_chunks * (j // TILE)) * TILE + (j % TILE)
    valid = idx < V
    row_ptr = logits_ptr + b.to(tl.int64) * stride_row
    if USE_PDL:
        tl.extra.cuda.gdc_wait()  # the logits are the LM head's output
    raw = tl.load(row_ptr + idx, mask=valid, other=float("-inf"))
    if BAN_EOS:
        raw = _ban_early_eos(raw, idx, row_ptr, c, n_chunks, V, eos_ptr, n_eos, n_gen_ptr, min_new_ptr, TILE)

    temp = tl.load(temp_ptr + b * stride_temp)
    k = tl.load(topk_ptr + b * stride_topk)
    top_p = tl.load(topp_ptr + b * stride_topp)
    min_p = tl.load(minp_ptr + b * stride_minp)
    greedy, _k_active, _p_active, _m_active, keep_all = _row_flags(temp, k, top_p, min_p, V)
    x = _scaled(raw, tl.where(greedy, 1.0, temp))  # greedy rows: the raw logits

    # NaN and +inf (also from an overflowing l / T) are reported, and NaN is taken out of every
    # comparison below: a NaN compares false with everything, so no bisection could count it.
    is_nan = valid & (x != x)
    flags = tl.where(tl.max(is_nan.to(tl.int32), 0) > 0, _F_NAN, 0)
    flags |= tl.where(tl.max((valid & (x == float("inf"))).to(tl.int32), 0) > 0, _F_POS_INF, 0)
    x = tl.where(is_nan, float("-inf"), x)

    m = tl.max(x, 0)
    am = tl.min(tl.where(valid & (x == m), idx, 2147483647), 0)
    # torch.argmax semantics: a NaN is the maximum, the first NaN wins.
    am = tl.where((flags & _F_NAN) != 0, tl.min(tl.where(is_nan, idx, 2147483647), 0), am)
    e = tl.where(x > float("-inf"), tl.exp(x - m), 0.0)  # no NaN when the chunk is all -inf
    s = tl.sum(e, 0)
    slot = b * n_chunks + c
    tl.store(cmax_ptr + slot, m)
    tl.store(csum_ptr + slot, s)
    tl.store(carg_ptr + slot, am)
    tl.store(cflag_ptr + slot, flags)

    if keep_all:
        seed = tl.load(seed_ptr)
        step_lo, step_hi = _step_words(step_ptr)
        # Counters of the 4-token groups of this chunk, in chunk order (TILE is a multiple of 4).
        j4 = tl.arange(0, CHUNK // 4)
        c0 = (c + n_chunks * (j4 // (TILE // 4))) * (TILE // 4) + (j4 % (TILE // 4))
        noise = _noise_x4(c0, seed, b, step_lo, step_hi, CHUNK)
        best, best_i = _argmax_lowest(x + noise, idx, valid)
        tl.store(cgum_ptr + slot, best)
        tl.store(cgidx_ptr + slot, best_i)
    elif temp != 0.0:
        theta = _chunk_theta(x, valid, m, K_C, SEL_ITERS)
        key = tl.where(valid, _float_key(x), -2147483648)  # INT_MIN: below every real key
        sel = key > theta
        pos = tl.cumsum(sel.to(tl.int32), 0) - 1
        # The bisection bounds the count for NaN-free finite values; the slot bound holds the
        # writes inside the chunk's K_C slots for every input (a row with +inf is flagged and
        # never reads its candidates).
        sel &= pos < K_C
        base = slot.to(tl.int64) * K_C
        tl.store(cval_ptr + base + pos, x, mask=sel)
        tl.store(cidx_ptr + base + pos, idx, mask=sel)
        tl.store(ctheta_ptr + slot, theta)
        tl.store(ccount_ptr + slot, tl.sum(sel.to(tl.int32), 0))


@triton.jit
def _ban_early_eos(raw, idx, row_ptr, c, n_chunks, V, eos_ptr, n_eos, n_gen_ptr, min_new_ptr, TILE: tl.constexpr):
    """HF's ``min_new_tokens``: while ``n_generated < min_new`` every EOS id scores ``-inf``.

    In the chunk's registers, and written back to the logits row by the chunk that owns the token
    (each token belongs to one chunk, which reads it before writing), so pass 2's passes over the
    row see the ban too -- as the reference bans in place.
    """
    if tl.load(n_gen_ptr) < tl.load(min_new_ptr):
        i = 0
        while i < n_eos:  # (a while loop: the interpreter cannot range() over a runtime bound)
            e = tl.load(eos_ptr + i).to(tl.int32)
            raw = tl.where(idx == e, float("-inf"), raw)
            owner = (e >= 0) & (e < V) & ((e // TILE) % n_chunks == c)
            tl.store(row_ptr + e, tl.full([], float("-inf"), tl.float32).to(row_ptr.dtype.element_ty), mask=owner)
            i += 1
    return raw


@triton.jit
def _finish_step(tok, b, n_rows, eos_ptr, n_eos, pad_ptr, finished_ptr, step_ptr, n_gen_ptr, pos_ptr, pos_advance,
                 arrive_ptr, HAS_EOS: tl.constexpr, ADVANCE: tl.constexpr):
    """The step's bookkeeping after row ``b`` chose ``tok`` (int64); returns the token to store.

    EOS: a finished row emits ``pad``; a row whose token is an EOS id is finished from now on.
    ADVANCE: the last program to arrive (an atomic count: every program has read ``step`` before
    it arrives) advances the RNG step and the token count by 1 and the cache position by
    ``pos_advance``, then clears the count for the next launch.
    """
    if HAS_EOS:
        done = tl.load(finished_ptr + b) != 0
        tok = tl.where(done, tl.load(pad_ptr), tok)
        i = 0
        while i < n_eos:
            done |= tl.load(eos_ptr + i) == tok
            i += 1
        tl.store(finished_ptr + b, done.to(finished_ptr.dtype.element_ty))
    if ADVANCE:
        arrived = tl.atomic_add(arrive_ptr, 1)
        if arrived == n_rows - 1:
            tl.store(step_ptr, tl.load(step_ptr) + 1)
            tl.store(n_gen_ptr, tl.load(n_gen_ptr) + 1)
            tl.store(pos_ptr, tl.load(pos_ptr) + pos_advance)
            tl.store(arrive_ptr, 0)
    return tok


@triton.jit
def _greedy_token(cm, M, ca, cflags, cmask):
    """The row's argmax from the chunks' with ``torch.argmax`` semantics (NaN is the max, lowest index)."""
    nan_chunk = cmask & ((cflags & _F_NAN) != 0)
    top_chunk = tl.where(tl.max(nan_chunk.to(tl.int32), 0) > 0, nan_chunk, cmask & (cm == M))
    return tl.min(tl.where(top_chunk, ca, 2147483647), 0)


@triton.jit
def _record_bad_row(status_ptr, b, bad, step_lo):
    """``status[b, 0] |= bad``; ``status[b, 1] = step`` when the row had no flag before (first bad step)."""
    before = tl.load(status_ptr + 2 * b)
    if before == 0:
        tl.store(status_ptr + 2 * b + 1, step_lo)
    tl.store(status_ptr + 2 * b, before | bad)


@triton.jit
def _union_cut(uv, ui, uvalid, tau, M, S, k, top_p, k_active, p_active, V):
    """The top-k floor and top-p cut, where the union of candidates decides them.

    Returns ``(kth, known_k, t_p, t_i, p_resolved, tie_split)``: keep keys ``>= kth``; ``known_k``
    is 0 when ``v_k <= tau`` (the union cannot decide top-k); keep keys ``> t_p`` and key
    ``== t_p`` with index ``<= t_i`` when ``p_resolved`` (the cut lies above ``tau``).
    """
    uk = tl.where(uvalid, _float_key(uv), -2147483648)
    ue = tl.where(uvalid & (uv > float("-inf")), tl.exp(uv - M), 0.0)
    ones = uvalid.to(tl.float32)
    tau64 = tau.to(tl.int64)
    int_min = tl.full([], -2147483648, tl.int64)
    # The searches start from the largest key (H = 0 above it): fewer bisection steps.
    ukmax = tl.max(uk, 0).to(tl.int64)

    # top-k: v_k is exact from the union when count(key > tau) >= k.
    kth = int_min  # keep keys >= kth (int_min: no top-k floor)
    known_k = tl.full([], 1, tl.int32)
    if k_active:
        if tl.sum(tl.where(uk > tau, ones, 0.0), 0) >= k.to(tl.float32):
            kth, _hk = _search_regs(uk, ones, uvalid, tau64, ukmax, 0.0, k.to(tl.float32))
        else:
            known_k = tl.zeros([], tl.int32)
    Z = S
    if k_active:
        Z = tl.sum(tl.where(uk >= kth.to(tl.int32), ue, 0.0), 0)
    P = top_p * Z

    # top-p from the union when the cut lies above tau.
    t_p = int_min  # keep keys > t_p, and key == t_p with index <= t_i
    t_i = tl.full([], 2147483647, tl.int32)
    p_resolved = tl.zeros([], tl.int32)
    tie_split = tl.zeros([], tl.int32)
    if p_active & (known_k != 0):
        lo = tl.maximum(tau64, kth - 1)
        if tl.sum(tl.where(uk > lo.to(tl.int32), ue, 0.0), 0) >= P:
            t_p, F = _search_regs(uk, ue, uvalid, lo, ukmax, 0.0, P)
            group = uvalid & (uk == t_p.to(tl.int32))
            g = tl.sum(group.to(tl.int32), 0)
            pv = tl.max(tl.where(group, ue, 0.0), 0)
            n = _tie_keep(P, F, pv, g)
            if n < g:
                t_i = _nth_index_regs(uk, ui, uvalid, t_p.to(tl.int32), n, V)
                tie_split = tl.full([], 1, tl.int32)
            p_resolved = tl.full([], 1, tl.int32)
    return kth, known_k, t_p, t_i, p_resolved, tie_split


@triton.jit
def _union_draw(uv, ui, uvalid, M, kth, t_p, t_i, min_p, sval_row, sidx_row, seed, row, step_lo, step_hi,
                DRAW: tl.constexpr):
    """The race over the union's kept tokens; returns ``(token, PATH_* bits)``."""
    uk = tl.where(uvalid, _float_key(uv), -2147483648)
    ue = tl.where(uvalid & (uv > float("-inf")), tl.exp(uv - M), 0.0)
    kept = uvalid & (uk >= kth.to(tl.int32)) & (ue >= min_p)
    kept &= (uk > t_p.to(tl.int32)) | ((uk == t_p.to(tl.int32)) & (ui <= t_i))
    n_kept = tl.sum(kept.to(tl.int32), 0)
    path = tl.zeros([], tl.int32) + _P_UNION
    if n_kept <= DRAW:
        # Few kept tokens (the usual top-k / peaked top-p case): gather them so the Philox rounds
        # run on DRAW lanes instead of on the whole union.
        pos = tl.cumsum(kept.to(tl.int32), 0) - 1
        tl.store(sval_row + pos, uv, mask=kept)
        tl.store(sidx_row + pos, ui, mask=kept)
        tl.debug_barrier()
        d = tl.arange(0, DRAW)
        dm = d < n_kept
        dv = tl.load(sval_row + d, mask=dm, other=float("-inf"), cache_modifier=".cg")
        di = tl.load(sidx_row + d, mask=dm, other=0, cache_modifier=".cg")
        _best, tok = _argmax_lowest(dv + _noise_at(di, seed, row, step_lo, step_hi), di, dm)
        path |= _P_SMALL_DRAW
    else:
        _best, tok = _argmax_lowest(uv + _noise_at(ui, seed, row, step_lo, step_hi), ui, kept)
    return tok, path


@triton.jit
def _fallback_draw(row_ptr, V, t_div, M, S, tau, kth, known_k, k, top_p, min_p, k_active, p_active,
                   sval_row, sidx_row, seed, row, step_lo, step_hi, CAP: tl.constexpr, BLOCK: tl.constexpr):
    """The exact fallback: thresholds searched over the whole row, then the race over the row.

    Returns ``(token, PATH_* bits)``.
    """
    path = tl.zeros([], tl.int32) + _P_FALLBACK
    tau64 = tau.to(tl.int64)
    int_min = tl.full([], -2147483648, tl.int64)
    int_max = tl.full([], 2147483647, tl.int64)
    if k_active & (known_k == 0):
        # count(key > tau) < k: the k-th value is <= tau; search the row below tau.
        kth, _f, _g, _pv, k_comp, _nc = _row_search(row_ptr, V, t_div, M, int_min, tau64, k.to(tl.float32),
                                                    sval_row, sidx_row, CAP, BLOCK, False)
        path |= _P_ROW_TOPK
        if k_comp:
            path |= _P_ROW_COMPACT
    Z = S
    if k_active:
        _c, Z, _c2, _z2 = _row_agg(row_ptr, V, t_div, M, kth - 1, kth - 1, BLOCK, True)
    P = top_p * Z
    t_p = int_min  # keep keys > t_p, and key == t_p with index <= t_i
    t_i = tl.full([], 2147483647, tl.int32)
    if p_active:
        # known_k here means the union saw mass(key > tau) < P: the cut is <= tau.
        hi = tl.where(known_k != 0, tau64, int_max)
        lo = tl.where(k_active, kth - 1, int_min)
        t_p, F, g, pv, p_comp, n_gathered = _row_search(row_ptr, V, t_div, M, lo, hi, P, sval_row, sidx_row,
                                                        CAP, BLOCK, True)
        path |= _P_ROW_TOPP
        n = _tie_keep(P, F, pv, g)
        if p_comp:
            path |= _P_ROW_COMPACT
        if n < g:
            path |= _P_TIE_SPLIT
            if p_comp:
                # The gathered bracket holds the whole tie group at t_p.
                j = tl.arange(0, CAP)
                jm = j < n_gathered
                sv = tl.load(sval_row + j, mask=jm, other=float("-inf"), cache_modifier=".cg")
                si = tl.load(sidx_row + j, mask=jm, other=2147483647, cache_modifier=".cg")
                t_i = _nth_index_regs(_float_key(sv), si, jm, t_p.to(tl.int32), n, V)
            else:
                t_i = _nth_index_row(row_ptr, V, t_div, t_p, n, BLOCK)
                path |= _P_TIE_ROW

    # The race over the row, one tile at a time (ties between tiles keep the lower index).
    kth32 = kth.to(tl.int32)
    tp32 = t_p.to(tl.int32)
    best = tl.full([], float("-inf"), tl.float32)
    best_i = tl.zeros([], tl.int32)
    # (a while loop: the interpreter cannot range() over a runtime bound)
    start = tl.zeros([], tl.int32)
    while start < V:
        offs, msk, x, key = _row_tile(row_ptr, start, V, t_div, BLOCK)
        e = tl.where(x > float("-inf"), tl.exp(x - M), 0.0)
        kept = msk & (key >= kth32) & (e >= min_p)
        kept &= (key > tp32) | ((key == tp32) & (offs <= t_i))
        if tl.max(kept.to(tl.int32), 0) > 0:
            c0 = (start >> 2) + tl.arange(0, BLOCK // 4)
            tile_best, tile_i = _argmax_lowest(x + _noise_x4(c0, seed, row, step_lo, step_hi, BLOCK), offs, kept)
            take = tile_best > best
            best = tl.where(take, tile_best, best)
            best_i = tl.where(take, tile_i, best_i)
        start += BLOCK
    return best_i, path


@triton.jit
def _filtered_draw(row_ptr, V, temp, k, top_p, min_p, k_active, p_active, m_active, M, S, tau,
                   uv, ui, uvalid, sval_row, sidx_row, seed, row, step_lo, step_hi,
                   CAP: tl.constexpr, BLOCK: tl.constexpr, DRAW: tl.constexpr, HEAD: tl.constexpr):
    """A row with top-k / top-p / min-p: head, else union, else the exact fallback.

    Returns ``(token, PATH_* bits)``.
    """
    head_ok, tok = _head_sample(uv, ui, uvalid, tau, M, S, k, top_p, min_p, k_active, p_active, m_active,
                                sval_row, sidx_row, seed, row, step_lo, step_hi, HEAD, 10)
    path = tl.zeros([], tl.int32) + _P_HEAD
    if head_ok == 0:
        kth, known_k, t_p, t_i, p_resolved, tie_split = _union_cut(uv, ui, uvalid, tau, M, S, k, top_p,
                                                                   k_active, p_active, V)
        complete = tau == -2147483648
        m_resolved = complete | (tl.exp(_key_float(tau) - M) < min_p)
        resolved = (known_k != 0) & (k_active | (p_resolved != 0) | (m_active & m_resolved) | complete)
        if resolved:
            tok, path = _union_draw(uv, ui, uvalid, M, kth, t_p, t_i, min_p, sval_row, sidx_row, seed, row,
                                    step_lo, step_hi, DRAW)
        else:
            tok, path = _fallback_draw(row_ptr, V, temp, M, S, tau, kth, known_k, k, top_p, min_p, k_active,
                                       p_active, sval_row, sidx_row, seed, row, step_lo, step_hi, CAP, BLOCK)
        path |= tl.where(tie_split != 0, _P_TIE_SPLIT, 0)
    return tok, path


# V and n_chunks are never specialised: Triton 3.6 fails to compile the row kernel for a constexpr
# V == 1 and spills registers for a constexpr n_chunks == 1 (nothing to gain from either).
@triton.jit(do_not_specialize=["V", "n_chunks"])
def _row_kernel(
    logits_ptr, stride_row, V, n_chunks,
    temp_ptr, stride_temp, topk_ptr, stride_topk, topp_ptr, stride_topp, minp_ptr, stride_minp,
    seed_ptr, step_ptr,
    cmax_ptr, csum_ptr, carg_ptr, ctheta_ptr, ccount_ptr, cgum_ptr, cgidx_ptr, cval_ptr, cidx_ptr, cflag_ptr,
    sval_ptr, sidx_ptr, path_ptr, status_ptr, out_ptr, stride_out,
    eos_ptr, n_eos, pad_ptr, finished_ptr, n_gen_ptr, pos_ptr, pos_advance, arrive_ptr, n_rows,
    C_PAD: tl.constexpr, K_C: tl.constexpr, CAP: tl.constexpr, BLOCK: tl.constexpr, DRAW: tl.constexpr,
    HEAD: tl.constexpr, HAS_EOS: tl.constexpr, ADVANCE: tl.constexpr, USE_PDL: tl.constexpr,
):
    """Pass 2 for row ``b``: combine the chunks, flag a bad row, resolve the kept set, draw; then
    the step's bookkeeping (:func:`_finish_step`)."""
    b = tl.program_id(0)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()  # the chunk statistics are pass 1's output
    temp = tl.load(temp_ptr + b * stride_temp)
    k = tl.load(topk_ptr + b * stride_topk)
    top_p = tl.load(topp_ptr + b * stride_topp)
    min_p = tl.load(minp_ptr + b * stride_minp)
    greedy, k_active, p_active, m_active, keep_all = _row_flags(temp, k, top_p, min_p, V)

    cs = tl.arange(0, C_PAD)
    cmask = cs < n_chunks
    cslot = b * n_chunks + cs
    cm = tl.load(cmax_ptr + cslot, mask=cmask, other=float("-inf"))
    M = tl.max(cm, 0)  # the row max (NaN excluded by pass 1)
    cflags = tl.load(cflag_ptr + cslot, mask=cmask, other=0)
    bad = tl.max(cflags & _F_NAN, 0) | tl.max(cflags & _F_POS_INF, 0)
    bad |= tl.where((bad == 0) & (M == float("-inf")), _F_NO_TOKEN, 0)
    ca = tl.load(carg_ptr + cslot, mask=cmask, other=2147483647)
    tok = _greedy_token(cm, M, ca, cflags, cmask)

    path = tl.zeros([], tl.int32)
    if greedy:
        path = _P_GREEDY
    elif bad != 0:
        # Nothing to sample from: report it (the caller raises), return the argmax (in range).
        step_lo, _step_hi = _step_words(step_ptr)
        _record_bad_row(status_ptr, b, bad, step_lo)
        path = _P_FLAGGED
    elif keep_all:
        gs = tl.load(cgum_ptr + cslot, mask=cmask, other=float("-inf"))
        gi = tl.load(cgidx_ptr + cslot, mask=cmask, other=2147483647)
        _best, tok = _argmax_lowest(gs, gi, cmask)
        path = _P_KEEP_ALL
    else:
        seed = tl.load(seed_ptr)
        step_lo, step_hi = _step_words(step_ptr)
        cs_sum = tl.load(csum_ptr + cslot, mask=cmask, other=0.0)
        S = tl.sum(tl.where(cm > float("-inf"), cs_sum * tl.exp(cm - M), 0.0), 0)
        tau = tl.max(tl.load(ctheta_ptr + cslot, mask=cmask, other=-2147483648), 0)
        uv, ui, uvalid = _load_union(cval_ptr, cidx_ptr, ccount_ptr, b, n_chunks, C_PAD, K_C)
        tok, path = _filtered_draw(logits_ptr + b.to(tl.int64) * stride_row, V, temp, k, top_p, min_p,
                                   k_active, p_active, m_active, M, S, tau, uv, ui, uvalid,
                                   sval_ptr + b.to(tl.int64) * CAP, sidx_ptr + b.to(tl.int64) * CAP,
                                   seed, b, step_lo, step_hi, CAP, BLOCK, DRAW, HEAD)

    tok = tl.minimum(tl.maximum(tok, 0), V - 1).to(tl.int64)  # the token is in range whatever the input
    tok = _finish_step(tok, b, n_rows, eos_ptr, n_eos, pad_ptr, finished_ptr, step_ptr, n_gen_ptr, pos_ptr,
                       pos_advance, arrive_ptr, HAS_EOS, ADVANCE)
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    tl.store(out_ptr + b * stride_out, tok)
    tl.store(path_ptr + b, path)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
_LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_sampling_settings(temperature, top_k, top_p, min_p) -> None:
    """Raise ``ValueError`` naming the setting whose value is out of range.

    Allowed: ``temperature >= 0`` and finite (0 = greedy), ``top_k >= 0`` (0 or >= V keeps all),
    ``0 < top_p <= 1``, ``0 <= min_p <= 1``. Each argument is a number or a tensor of values; call
    it on host-side values (on a CUDA tensor it synchronises).
    """

    def values(v, name):
        t = torch.as_tensor(v).detach()
        if t.is_floating_point() and torch.isnan(t).any():
            raise ValueError(f"{name} must not be NaN")
        return t

    t = values(temperature, "temperature")
    if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
        raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {t.tolist()}")
    k = values(top_k, "top_k")
    if k.is_floating_point() or k.dtype == torch.bool:
        raise ValueError(f"top_k must be an integer, got dtype {k.dtype}")
    if bool((k < 0).any()):
        raise ValueError(f"top_k must be >= 0 (0 keeps all tokens), got {k.tolist()}")
    p = values(top_p, "top_p")
    if bool(((p <= 0) | (p > 1)).any()):
        raise ValueError(f"top_p must be in (0, 1], got {p.tolist()}")
    m = values(min_p, "min_p")
    if bool(((m < 0) | (m > 1)).any()):
        raise ValueError(f"min_p must be in [0, 1], got {m.tolist()}")


def sampling_workspace(
    batch: int, vocab: int, device: torch.device | str, *, config: SamplerConfig | None = None
) -> dict:
    """Preallocate the scratch :func:`sample` needs for up to ``batch`` rows of ``vocab`` tokens.

    Pass it as ``workspace=`` so a call allocates nothing (CUDA graphs: allocate it before the
    capture). It is tied to ``vocab`` and the configuration; rows are independent, so one
    workspace serves any batch ``<= batch``. ``workspace["path"][b]`` holds the ``PATH_*`` bits
    of row ``b`` after a call.
    """
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an int >= 1, got {batch!r}")
    cfg = config if config is not None else select_config(vocab)
    if not 1 <= vocab <= min(MAX_VOCAB, cfg.max_vocab):
        raise ValueError(f"vocab must be in [1, {min(MAX_VOCAB, cfg.max_vocab)}] for this config, got {vocab}")
    device = torch.device(device)
    n = cfg.n_chunks(vocab)
    f32, i32 = torch.float32, torch.int32

    def buf(shape, dtype):
        return torch.empty(shape, dtype=dtype, device=device)

    path = torch.zeros(batch, dtype=i32, device=device)
    return {
        "batch": batch,
        "vocab": vocab,
        "device": path.device,  # with its index ("cuda" -> "cuda:0"), as logits.device has it
        "config": cfg,
        "n_chunks": n,
        # Pass 1 -> pass 2, per (row, chunk).
        "chunk_max": buf((batch, n), f32),
        "chunk_sum": buf((batch, n), f32),
        "chunk_argmax": buf((batch, n), i32),
        "chunk_theta": buf((batch, n), i32),
        "chunk_count": buf((batch, n), i32),
        "chunk_race": buf((batch, n), f32),
        "chunk_race_idx": buf((batch, n), i32),
        "cand_val": buf((batch, n, cfg.cands), f32),
        "cand_idx": buf((batch, n, cfg.cands), i32),
        "chunk_flags": buf((batch, n), i32),  # STATUS_* bits of each chunk (NaN / +inf seen)
        # Pass 2 per-row scratch (gathered tokens) and the path bits.
        "scratch_val": buf((batch, cfg.cap), f32),
        "scratch_idx": buf((batch, cfg.cap), i32),
        "path": path,
        # Where the flags of a call without ``status=`` go (written, never read).
        "status_sink": torch.zeros((batch, 2), dtype=i32, device=device),
        # Row programs of pass 2 that finished this launch (the last one advances the counters
        # and clears it): zero between launches.
        "arrivals": torch.zeros(1, dtype=i32, device=device),
        "constexprs": _kernel_constexprs(cfg),
    }


_USABLE: dict[torch.device, bool] = {}  # triton_usable_on per device (fixed once kernels are imported)


def _usable(device: torch.device) -> bool:
    ok = _USABLE.get(device)
    if ok is None:
        ok = _USABLE[device] = triton_usable_on(device)
    return ok


def _check_row_setting(t, name, batch, dtypes, device) -> None:
    check_tensor(t, name, ndim=1, dtypes=dtypes, device=device)
    if t.shape[0] != batch:
        raise ValueError(f"{name} must have shape ({batch},), got {tuple(t.shape)}")


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    seed: torch.Tensor,
    step: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    workspace: dict | None = None,
    config: SamplerConfig | None = None,
    status: torch.Tensor | None = None,
    eos: torch.Tensor | None = None,
    pad: torch.Tensor | None = None,
    finished: torch.Tensor | None = None,
    n_generated: torch.Tensor | None = None,
    min_new_tokens: torch.Tensor | None = None,
    cache_pos: torch.Tensor | None = None,
    cache_advance: int = 0,
    check_values: bool = True,
) -> torch.Tensor:
    """Draw the next token of every row: temperature, top-k, top-p, min-p and the draw, fused.

    Parameters
    ----------
    logits : (B, V) float32/float16/bfloat16, last dim contiguous, ``1 <= V <= MAX_VOCAB``.
    temperature : (B,) float32, 0 = greedy (argmax, lowest index among ties).
    top_k : (B,) int32, 0 (or >= V) keeps every token.
    top_p : (B,) float32 in (0, 1], 1 disables it.
    min_p : (B,) float32 in [0, 1], 0 disables it.
    seed : (1,) int64, the Philox key.
    step : (1,) int32 or int64, the decode step (the RNG stream is keyed on seed, step, row).
    out : optional (B,) int64 destination.
    workspace : optional dict from :func:`sampling_workspace` (no allocation per call).
    config : optional :class:`SamplerConfig` (tests and benchmarks; default
        :func:`select_config`).
    status : optional (B', 2) int32, ``B' >= B``, zeroed by the caller and kept across steps
        (contract C1). For a sampling row (temperature > 0) whose scaled scores contain NaN,
        ``status[b, 0] |= STATUS_NAN``; +inf: ``|= STATUS_POS_INF``; every score -inf:
        ``|= STATUS_NO_TOKEN``; ``status[b, 1]`` gets ``step`` when ``status[b, 0]`` was 0 before.
        Such a row returns its argmax. Greedy rows are never flagged (``torch.argmax`` semantics:
        NaN is the maximum).
    eos, pad, finished : the decode step's EOS bookkeeping, all or none: ``(n_eos,)`` int64 EOS
        ids (``n_eos >= 1``), ``(1,)`` int64 pad id, ``(B,)`` bool finished flags. A finished row
        emits ``pad``; a row that emits an EOS id is marked finished (in the last kernel).
    n_generated : (1,) int64 tokens generated so far. Given: the last kernel adds 1 to it, 1 to
        ``step`` and ``cache_advance`` to ``cache_pos`` ((1,) int32, required then) once every
        row has read them -- the whole step's counters, no extra launch.
    min_new_tokens : (1,) int64; with ``eos`` and ``n_generated``: every EOS id scores ``-inf``
        (also written into ``logits``, as the reference bans in place) while
        ``n_generated < min_new_tokens``.
    check_values : check the settings' values when the tensors are on the CPU (a caller that
        validated them host-side passes False: the check reads tensors back).

    All tensors on one device: CUDA, or the CPU under ``TRITON_INTERPRET=1``. Values are checked
    only for CPU tensors (a check on the GPU would need a sync): the caller validates host-side
    values with :func:`check_sampling_settings`.

    Returns
    -------
    (B,) int64 tokens (``out`` when given). Two kernel launches, no host sync, no allocation
    beyond the caching allocator's (none with ``workspace`` and ``out``): CUDA-graph capturable.
    """
    check_tensor(logits, "logits", ndim=2, dtypes=_LOGIT_DTYPES, last_dim_contiguous=True)
    B, V = logits.shape
    if B < 1:
        raise ValueError(f"logits must have at least one row, got shape {tuple(logits.shape)}")
    if not 1 <= V <= MAX_VOCAB:
        raise ValueError(f"logits must have a vocabulary size in [1, {MAX_VOCAB}], got {V}")
    dev = logits.device
    if not _usable(dev):
        raise RuntimeError(
            f"kernels.sampling.sample needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {dev}; "
            "use fastgpt.reference.sample on this device"
        )
    _check_row_setting(temperature, "temperature", B, (torch.float32,), dev)
    _check_row_setting(top_k, "top_k", B, (torch.int32,), dev)
    _check_row_setting(top_p, "top_p", B, (torch.float32,), dev)
    _check_row_setting(min_p, "min_p", B, (torch.float32,), dev)
    check_tensor(seed, "seed", ndim=1, dtypes=(torch.int64,), device=dev)
    if seed.shape[0] != 1:
        raise ValueError(f"seed must have shape (1,), got {tuple(seed.shape)}")
    check_tensor(step, "step", ndim=1, dtypes=(torch.int32, torch.int64), device=dev)
    if step.shape[0] != 1:
        raise ValueError(f"step must have shape (1,), got {tuple(step.shape)}")
    if out is not None:
        check_tensor(out, "out", ndim=1, dtypes=(torch.int64,), device=dev)
        if out.shape[0] != B:
            raise ValueError(f"out must have shape ({B},), got {tuple(out.shape)}")
    if status is not None:
        check_tensor(status, "status", ndim=2, dtypes=(torch.int32,), device=dev)
        if status.shape[0] < B or status.shape[1] != 2 or not status.is_contiguous():
            raise ValueError(f"status must be a contiguous ({B}, 2) int32 tensor, got shape {tuple(status.shape)}")
    has_eos, advance, ban = _check_step_bookkeeping(
        B, dev, eos, pad, finished, n_generated, min_new_tokens, cache_pos, cache_advance
    )
    if dev.type == "cpu" and check_values:
        check_sampling_settings(temperature, top_k, top_p, min_p)

    if workspace is not None:
        if not isinstance(workspace, dict) or "config" not in workspace:
            raise TypeError("workspace must be a dict made by sampling_workspace()")
        if workspace["vocab"] != V or workspace["batch"] < B or workspace["device"] != dev:
            raise ValueError(
                f"workspace was made for batch <= {workspace['batch']}, vocab {workspace['vocab']} on "
                f"{workspace['device']}; got batch {B}, vocab {V} on {dev}"
            )
        if config is not None and config != workspace["config"]:
            raise ValueError("config differs from the workspace's config")
        ws = workspace
    else:
        ws = sampling_workspace(B, V, dev, config=config)
    cfg = ws["config"]
    if max(cfg.draw, cfg.head) > cfg.cap or cfg.tile % 4 or cfg.block % 4:
        raise ValueError(f"invalid SamplerConfig {cfg}: needs draw, head <= cap and tile, block multiples of 4")
    n_chunks = ws["n_chunks"]
    if out is None:
        out = torch.empty(B, dtype=torch.int64, device=dev)

    settings = (
        temperature, temperature.stride(0), top_k, top_k.stride(0),
        top_p, top_p.stride(0), min_p, min_p.stride(0), seed, step,
    )
    chunk_bufs = (
        ws["chunk_max"], ws["chunk_sum"], ws["chunk_argmax"], ws["chunk_theta"], ws["chunk_count"],
        ws["chunk_race"], ws["chunk_race_idx"], ws["cand_val"], ws["cand_idx"], ws["chunk_flags"],
    )
    k1, k2 = ws["constexprs"]
    # Absent bookkeeping tensors: any int tensor of the workspace stands in (never read).
    stand_in = ws["arrivals"]
    eos_args = (eos, eos.shape[0]) if has_eos else (stand_in, 0)
    counter_args = (n_generated, cache_pos) if advance else (stand_in, stand_in)
    use_pdl = pdl_enabled(dev)
    pdl = {"launch_pdl": True} if use_pdl else {}
    _chunk_kernel[(B, n_chunks)](
        logits, logits.stride(0), V, n_chunks, *settings, *chunk_bufs,
        *eos_args, counter_args[0], min_new_tokens if ban else stand_in,
        **k1, BAN_EOS=ban, USE_PDL=use_pdl, num_warps=cfg.warps1, **pdl,
    )  # fmt: skip
    _row_kernel[(B,)](
        logits, logits.stride(0), V, n_chunks, *settings, *chunk_bufs,
        ws["scratch_val"], ws["scratch_idx"], ws["path"], status if status is not None else ws["status_sink"],
        out, out.stride(0),
        *eos_args, pad if has_eos else stand_in, finished if has_eos else stand_in,
        *counter_args, cache_advance, ws["arrivals"], B,
        **k2, HAS_EOS=has_eos, ADVANCE=advance, USE_PDL=use_pdl, num_warps=cfg.warps2, **pdl,
    )  # fmt: skip
    # What ran (contract C2): the path bits stay on the device until someone reads them.
    note_launch(
        "sample", "triton", interpreter=interpreting(), launches=2, config=cfg, path=ws["path"][:B],
        eos=has_eos, ban_eos=ban, advance=advance, pdl=use_pdl,
    )  # fmt: skip
    return out


def _check_step_bookkeeping(B, dev, eos, pad, finished, n_generated, min_new_tokens, cache_pos, cache_advance):
    """Validate :func:`sample`'s step-bookkeeping arguments; ``(has_eos, advance, ban)``."""
    given = [t is not None for t in (eos, pad, finished)]
    if any(given) and not all(given):
        raise ValueError("eos, pad and finished must be given together (or none of them)")
    has_eos = all(given)
    if has_eos:
        check_tensor(eos, "eos", ndim=1, dtypes=(torch.int64,), device=dev)
        if eos.shape[0] < 1:
            raise ValueError("eos must hold at least one id, got shape (0,)")
        check_tensor(pad, "pad", dtypes=(torch.int64,), device=dev)
        if pad.numel() != 1:
            raise ValueError(f"pad must hold one id, got shape {tuple(pad.shape)}")
        check_tensor(finished, "finished", ndim=1, dtypes=(torch.bool,), device=dev)
        if finished.shape[0] != B:
            raise ValueError(f"finished must have shape ({B},), got {tuple(finished.shape)}")
    advance = n_generated is not None
    if advance:
        check_tensor(n_generated, "n_generated", ndim=1, dtypes=(torch.int64,), device=dev)
        if n_generated.shape[0] != 1:
            raise ValueError(f"n_generated must have shape (1,), got {tuple(n_generated.shape)}")
        if cache_pos is None:
            raise ValueError("cache_pos must be given with n_generated (the step's counters advance together)")
        check_tensor(cache_pos, "cache_pos", ndim=1, dtypes=(torch.int32,), device=dev)
        if cache_pos.shape[0] != 1:
            raise ValueError(f"cache_pos must have shape (1,), got {tuple(cache_pos.shape)}")
    elif cache_pos is not None:
        raise ValueError("cache_pos is advanced only together with n_generated; give both")
    if not isinstance(cache_advance, int) or cache_advance < 0:
        raise ValueError(f"cache_advance must be an int >= 0, got {cache_advance!r}")
    ban = min_new_tokens is not None
    if ban:
        if not (has_eos and advance):
            raise ValueError("min_new_tokens needs eos, pad, finished and n_generated")
        check_tensor(min_new_tokens, "min_new_tokens", ndim=1, dtypes=(torch.int64,), device=dev)
        if min_new_tokens.shape[0] != 1:
            raise ValueError(f"min_new_tokens must have shape (1,), got {tuple(min_new_tokens.shape)}")
    return has_eos, advance, ban
