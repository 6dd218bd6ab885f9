"""Rotary position embeddings (RoPE) and the context-extension rescalings real checkpoints use.

Each head's ``d`` channels are rotated in pairs (i, i + d/2), HF Llama's "rotate half"
convention, pair i by the angle ``position * inv_freq[i]``. Plain RoPE has
``inv_freq[i] = theta ** (-2i / d)``. Models trained to a short context and then extended
change only those frequencies (and, for YaRN, scale cos/sin), so one rotation serves all:

    linear   every frequency / factor: positions are interpolated (Llama 2 long-context)
    llama3   wavelengths longer than original_len / low_freq_factor are / factor, shorter than
             original_len / high_freq_factor kept, smoothly blended in between (Llama 3.1+)
    yarn     per-channel blend of the interpolated and the original frequency over a ramp set
             by beta_fast / beta_slow rotations in the original context, and cos/sin scaled
             by ``attention_factor`` (Qwen, DeepSeek long-context)

The frequencies are recomputed from the config on every call (``head_dim / 2`` values, cheap
next to attention): no buffer for meta-device initialization or pipeline cuts to rebuild.
"""

from __future__ import annotations

import math

import torch

ROPE_SCALINGS = ("none", "linear", "llama3", "yarn")


def check_rope(cfg) -> None:
    """ValueError naming the RoPE field of ``cfg`` (a LlamaConfig) that cannot be used."""
    if cfg.rope_scaling not in ROPE_SCALINGS:
        raise ValueError(f"rope_scaling={cfg.rope_scaling!r}: use one of {', '.join(ROPE_SCALINGS)}")
    if cfg.rope_scaling != "none" and cfg.rope_factor <= 0:
        raise ValueError(f"rope_factor={cfg.rope_factor} must be > 0 with rope_scaling={cfg.rope_scaling!r}")
    if cfg.rope_scaling in ("llama3", "yarn") and cfg.rope_original_max_seq_len < 1:
        raise ValueError(f"rope_scaling={cfg.rope_scaling!r} needs rope_original_max_seq_len (the context the "
                         f"model was pretrained at), e.g. 8192")
    if cfg.rope_scaling == "llama3" and cfg.rope_high_freq_factor <= cfg.rope_low_freq_factor:
        raise ValueError(f"rope_high_freq_factor={cfg.rope_high_freq_factor} must exceed rope_low_freq_factor="
                         f"{cfg.rope_low_freq_factor}")


def _plain(theta: float, d: int, device) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d)


def _llama3(cfg, inv_freq: torch.Tensor) -> torch.Tensor:
    original = cfg.rope_original_max_seq_len
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > original / cfg.rope_low_freq_factor, inv_freq / cfg.rope_factor, inv_freq)
    smooth = (original / wavelength - cfg.rope_low_freq_factor) / (cfg.rope_high_freq_factor -
                                                                   cfg.rope_low_freq_factor)
    blended = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
    medium = (wavelength >= original / cfg.rope_high_freq_factor) & (wavelength <= original / cfg.rope_low_freq_factor)
    return torch.where(medium, blended, scaled)


def _yarn(cfg, d: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Channels rotating fewer than beta_slow times over the original context are interpolated
    (/ factor), more than beta_fast times kept, a linear ramp in between (truncated to whole channels)."""

    def channel(rotations: float) -> float:  # the channel that rotates ``rotations`` times over the context
        return d * math.log(cfg.rope_original_max_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))

    low = max(math.floor(channel(cfg.rope_beta_fast)), 0)
    high = min(math.ceil(channel(cfg.rope_beta_slow)), d - 1)
    high = high + 0.001 if low == high else high
    ramp = ((torch.arange(d // 2, device=inv_freq.device, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    return inv_freq / cfg.rope_factor * ramp + inv_freq * (1 - ramp)


def attention_factor(cfg) -> float:
    """The factor cos and sin are scaled by: YaRN's (given, or 0.1 ln(factor) + 1), else 1."""
    if cfg.rope_scaling != "yarn":
        return 1.0
    if cfg.rope_attention_factor > 0:
        return cfg.rope_attention_factor
    return 1.0 if cfg.rope_factor <= 1 else 0.1 * math.log(cfg.rope_factor) + 1.0


def inverse_frequencies(cfg, d: int, device) -> torch.Tensor:
    """[d/2] float32 angle per position of each channel pair, for ``cfg``'s base and scaling."""
    inv_freq = _plain(cfg.rope_theta, d, device)
    if cfg.rope_scaling == "linear":
        return inv_freq / cfg.rope_factor
    if cfg.rope_scaling == "llama3":
        return _llama3(cfg, inv_freq)
    if cfg.rope_scaling == "yarn":
        return _yarn(cfg, d, inv_freq)
    return inv_freq


def rotary(x: torch.Tensor, positions: torch.Tensor, cfg) -> torch.Tensor:
    """Rotate ``x`` [b, s, h, d] by its positions, [s] or per row [b, s]; computed in float32."""
    d = x.shape[-1]
    angles = positions.to(torch.float32)[..., None] * inverse_frequencies(cfg, d, x.device)  # [(b,) s, d/2]
    scale = attention_factor(cfg)
    cos = (torch.cat([angles.cos(), angles.cos()], dim=-1) * scale)[..., None, :]  # [(b,) s, 1, d]
    sin = (torch.cat([angles.sin(), angles.sin()], dim=-1) * scale)[..., None, :]
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated_half = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated_half * sin).to(x.dtype)
