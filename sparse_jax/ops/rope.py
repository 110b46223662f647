"""Rotary position embedding (RoFormer, arXiv 2104.09864), half-split (GPT-NeoX / Llama) form,
with the frequency scalings of long-context checkpoints (`RopeScaling`):

* `linear`: position interpolation (arXiv 2306.15595), every frequency divided by `factor`.
* `dynamic`: dynamic NTK, the base grows with the sequence length past `original_max_len`:
  `theta' = theta (factor L / L0 - (factor - 1)) ** (D / (D - 2))`, `L` = largest position
  of the call + 1, `L0 = original_max_len` (no change while `L <= L0`).
* `yarn`: YaRN (arXiv 2309.00071), a linear ramp between interpolated (`/ factor`) and
  original frequencies over the dimensions between the `beta_fast` and `beta_slow`
  rotation counts, and cos / sin multiplied by `attention_factor` (default
  `0.1 ln(factor) + 1`).
* `llama3`: Llama 3.1, frequencies with wavelength above `L0 / low_freq_factor` divided by
  `factor`, below `L0 / high_freq_factor` kept, a smooth blend between.

The formulas are those of transformers' `modeling_rope_utils` (its `rope_type`s of the same
names), so imported checkpoints rotate as they were trained; `sparse_jax.models.hf` maps
config.json onto `RopeScaling`.

Dynamic NTK under a KV cache: each call's frequencies come from that call's largest position,
so keys cached by earlier calls keep the frequencies they were rotated with. This is what
transformers does (its rotary module recomputes `inv_freq` from `max(position_ids) + 1` on
every forward); prefill of a whole sequence and token-by-token decoding therefore give
different logits once positions pass `original_max_len`, in transformers and here alike.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

ROPE_SCALING_KINDS = ("linear", "dynamic", "yarn", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """How RoPE frequencies are scaled (see the module docstring for each `kind`).

    kind: one of `ROPE_SCALING_KINDS`. factor: context extension factor (> 0).
    original_max_len: pre-training context `L0` (dynamic, yarn, llama3; transformers'
    `original_max_position_embeddings`, or `max_position_embeddings` for dynamic).
    low_freq_factor / high_freq_factor: llama3 band edges (`L0 / factor` wavelengths).
    beta_fast / beta_slow: yarn rotation counts bounding the ramp; truncate: round the ramp's
    ends to whole dimensions (floor / ceil). attention_factor: yarn's cos / sin multiplier
    (None: `0.1 ln(factor) + 1`, or 1 when factor <= 1).
    """

    kind: str
    factor: float
    original_max_len: int | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float | None = None

    def __post_init__(self):
        if self.kind not in ROPE_SCALING_KINDS:
            raise ValueError(f"RopeScaling kind must be one of {ROPE_SCALING_KINDS}, got {self.kind!r}")
        if not isinstance(self.factor, (int, float)) or not self.factor > 0:
            raise ValueError(f"RopeScaling factor must be a number > 0, got {self.factor!r}")
        if self.kind != "linear" and (not isinstance(self.original_max_len, int) or self.original_max_len < 1):
            raise ValueError(f"RopeScaling {self.kind!r} needs original_max_len, an int >= 1, "
                             f"got {self.original_max_len!r}")
        if self.kind == "llama3" and not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ValueError(f"llama3 RoPE scaling needs 0 < low_freq_factor < high_freq_factor, got "
                             f"{self.low_freq_factor}, {self.high_freq_factor}")
        if self.kind == "yarn" and not (self.beta_fast > 0 and self.beta_slow > 0):
            raise ValueError(f"yarn RoPE scaling needs beta_fast, beta_slow > 0, got "
                             f"{self.beta_fast}, {self.beta_slow}")
        if self.attention_factor is not None and not self.attention_factor > 0:
            raise ValueError(f"RopeScaling attention_factor must be > 0 or None, got {self.attention_factor}")


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature `0.1 mscale ln(factor) + 1` (1 for factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_inv_freq(head_dim: int, theta: float, s: RopeScaling):
    half = head_dim // 2
    base_freq = theta ** (jnp.arange(half, dtype=jnp.float32) / half)        # wavelength / 2 pi

    def dim_of(rotations):            # the dimension that turns `rotations` times over L0
        return head_dim * math.log(s.original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(s.beta_fast), dim_of(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = jnp.clip((jnp.arange(half, dtype=jnp.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp                   # 1: the original frequency, 0: interpolated by `factor`
    return (1 / (s.factor * base_freq)) * (1 - keep) + (1 / base_freq) * keep


def _llama3_inv_freq(inv_freq, s: RopeScaling):
    wavelen = 2 * math.pi / inv_freq
    long_edge, short_edge = s.original_max_len / s.low_freq_factor, s.original_max_len / s.high_freq_factor
    scaled = jnp.where(wavelen > long_edge, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    between = (wavelen >= short_edge) & (wavelen <= long_edge)
    return jnp.where(between, blended, scaled)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None, seq_len=None):
    """(`inv_freq [head_dim // 2]` float32, cos / sin multiplier) for `apply_rope`.

    seq_len: int scalar (may be traced), the call's largest position + 1; read by
    `dynamic` scaling only.
    """
    half = head_dim // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    if scaling is None:
        return inv_freq, 1.0
    s = scaling
    if s.kind == "linear":
        return inv_freq / s.factor, 1.0
    if s.kind == "llama3":
        return _llama3_inv_freq(inv_freq, s), 1.0
    if s.kind == "yarn":
        mscale = yarn_mscale(s.factor) if s.attention_factor is None else s.attention_factor
        return _yarn_inv_freq(head_dim, theta, s), mscale
    # dynamic NTK
    if head_dim <= 2:
        raise ValueError(f"dynamic RoPE scaling needs head_dim > 2, got {head_dim}")
    if seq_len is None:
        raise ValueError("dynamic RoPE scaling needs seq_len (the largest position + 1)")
    length = jnp.asarray(seq_len, jnp.float32)
    grown = theta * (s.factor * length / s.original_max_len - (s.factor - 1)) ** (head_dim / (head_dim - 2))
    new_theta = jnp.where(length > s.original_max_len, grown, theta)
    return new_theta ** (-jnp.arange(half, dtype=jnp.float32) / half), 1.0


def apply_rope(x, positions, theta: float = 10000.0, scaling: RopeScaling | None = None):
    """Rotate `x [B, T, H, D]` by `positions [B, T]` (D even). Float32 inside, x's dtype out.

    Padding positions (< 0) are rotated by 0 (their values are masked elsewhere).
    scaling: frequency scaling (None: plain RoPE); `dynamic` reads `max(positions) + 1`.
    """
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {d}")
    if scaling is not None and not isinstance(scaling, RopeScaling):
        raise ValueError(f"scaling must be a RopeScaling or None, got {scaling!r}")
    seq_len = jnp.max(positions) + 1 if scaling is not None and scaling.kind == "dynamic" else None
    freqs, mscale = rope_inv_freq(d, theta, scaling, seq_len)
    angles = jnp.maximum(positions, 0).astype(jnp.float32)[..., None, None] * freqs   # [B,T,1,half]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if scaling is not None:
        cos, sin = cos * mscale, sin * mscale
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
