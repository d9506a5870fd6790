"""Rotary position embedding: the inverse frequencies of a LLaMA-family config.

The rotation itself is applied inside the attention kernels (to q and k, before k is written into
the cache; :func:`fastgpt.reference.apply_rope` is its definition). What differs between models is
only the ``(head_dim / 2,)`` vector of inverse frequencies computed here once per model, on the
host, in float32 as Hugging Face computes it:

* ``"default"``: ``inv_freq[i] = theta ** (-2i / head_dim)``.
* ``"llama3"`` (Llama 3.1 / 3.2): long wavelengths (beyond ``original_max_position_embeddings /
  low_freq_factor``) are divided by ``factor``, short ones (below ``... / high_freq_factor``) are
  kept, and the band between is interpolated linearly in ``original_max / wavelength``.
"""

from __future__ import annotations

import math

import torch

from .config import GPTConfig


def inverse_frequencies(config: GPTConfig) -> torch.Tensor:
    """The ``(head_dim / 2,)`` float32 CPU tensor of rotary inverse frequencies of ``config``."""
    if not config.is_llama:
        raise ValueError(f"model_type {config.model_type!r} has learned positions, not a rotary embedding")
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim  # (D/2,)
    inv_freq = 1.0 / (config.rope_theta**exponents)
    params = config.rope_parameters()
    if params is None:
        return inv_freq
    return _llama3_scaled(inv_freq, params)


def _llama3_scaled(inv_freq: torch.Tensor, params: dict) -> torch.Tensor:
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    original = params["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    low_freq_wavelength, high_freq_wavelength = original / low, original / high
    # Beyond the low-frequency wavelength: slowed down by `factor`; the rest unchanged for now.
    scaled = torch.where(wavelength > low_freq_wavelength, inv_freq / factor, inv_freq)
    # Between the two wavelengths: a linear blend of the slowed and the original frequency.
    blend = (original / wavelength - low) / (high - low)
    blended = (1 - blend) * scaled / factor + blend * scaled
    in_band = (wavelength >= high_freq_wavelength) & (wavelength <= low_freq_wavelength)
    return torch.where(in_band, blended, scaled)
