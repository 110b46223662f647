"""KV-cache bytes per token at 128K and 1M context, computed from the caches' `nbytes()`.

Every cache is built under `jax.eval_shape` (shapes only, no memory) at batch 1 and
`max_len` = the context, and divided by the context: so the figures include what
sparse_jax really stores, e.g. the int32 position of every slot and the tails / windows
that do not grow with the context. Writes `docs/KV_BYTES.md`.

    python experiments/kv_bytes_table.py [--out=docs/KV_BYTES.md]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import flags

from sparse_jax.cache.kv import FullKVCache, RollingKVCache
from sparse_jax.cache.csa import CSACache
from sparse_jax.cache.mla import DSACache, MLACache
from sparse_jax.ops.csa import HCA_V4, CSAConfig

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "docs/KV_BYTES.md", "Markdown file to write.")

CONTEXTS = {"128K": 128 * 1024, "1M": 1024 * 1024}
BF16, FP8 = jnp.bfloat16, jnp.float8_e4m3fn
LAYERS = 61                 # DeepSeek-V3 / V3.2 depth, used for every model row
D_MODEL = 7168              # V3 width (the CSA/HCA tail keeps the layer inputs of a few tokens)
CSA_V4 = CSAConfig()        # m=4, overlap, head 512, rope 64, indexer 64 x 128, top-512, window 128
SWA_WINDOW = 128


def csa_cache(cfg: CSAConfig, strategy: str = "none", every: int = 4096):
    return lambda n: CSACache.init(1, n, D_MODEL, ratio=cfg.ratio, record_window=cfg.record_window,
                                   head_dim=cfg.head_dim, index_head_dim=cfg.index_head_dim if cfg.top_k else 0,
                                   window=cfg.window, swa_cache=strategy, checkpoint_every=every, dtype=BF16)


LAYER_CACHES = {
    "MHA (128 heads x 128, K and V)": lambda n: FullKVCache.init(1, n, 128, 128, dtype=BF16),
    "GQA (8 KV heads x 128)": lambda n: FullKVCache.init(1, n, 8, 128, dtype=BF16),
    "MLA (latent 512 + RoPE key 64)": lambda n: MLACache.init(1, n, 512, 64, BF16),
    "DSA (MLA + indexer key 128, FP8)": lambda n: DSACache.init(1, n, 512, 64, 128, BF16, FP8),
    "SWA layer (window 128, 1 x 512)": lambda n: RollingKVCache.init(1, SWA_WINDOW, 1, 512, v_head_dim=0, dtype=BF16),
    "CSA (m=4, 512 + indexer 128; SWA none)": csa_cache(CSA_V4),
    "CSA, SWA cache 'periodic' (p=4096)": csa_cache(CSA_V4, "periodic"),
    "CSA, SWA cache 'full'": csa_cache(CSA_V4, "full"),
    "HCA (m=128, 512; SWA none)": csa_cache(HCA_V4),
}

# per-model layer mixes (LAYERS layers each)
V4_MIX = {"SWA layer (window 128, 1 x 512)": 2, "CSA (m=4, 512 + indexer 128; SWA none)": 30,
          "HCA (m=128, 512; SWA none)": 29}
MODELS = {
    "MHA": {"MHA (128 heads x 128, K and V)": LAYERS},
    "GQA": {"GQA (8 KV heads x 128)": LAYERS},
    "MLA (DeepSeek-V3)": {"MLA (latent 512 + RoPE key 64)": LAYERS},
    "DSA (DeepSeek-V3.2)": {"DSA (MLA + indexer key 128, FP8)": LAYERS},
    "CSA/HCA (V4-like: 2 SWA + 30 CSA + 29 HCA)": V4_MIX,
}


def bytes_per_token(make, n: int) -> float:
    return jax.eval_shape(lambda: make(n)).nbytes() / n


def main(argv):
    del argv
    per_layer = {name: {c: bytes_per_token(make, n) for c, n in CONTEXTS.items()}
                 for name, make in LAYER_CACHES.items()}
    lines = ["# KV-cache bytes per token", "",
             "Written by `experiments/kv_bytes_table.py` from the caches' `nbytes()` (built with",
             "`jax.eval_shape`, batch 1, `max_len` = context), divided by the context. Main caches in",
             "bfloat16; DSA's indexer keys in FP8 (e4m3), as in V3.2's production setting (check);",
             "CSA's compressed indexer keys share the record dtype (bf16) in `CSACache`. Every slot also",
             "carries its int32 position (4 bytes), which sparse_jax keeps for masking.", "",
             "## Per layer", "", "| layer cache | 128K | 1M |", "|---|---:|---:|"]
    for name, row in per_layer.items():
        lines.append(f"| {name} | {row['128K']:,.1f} | {row['1M']:,.1f} |")
    lines += ["", f"## Per model ({LAYERS} layers)", "", "| model | 128K | 1M | vs DSA at 1M |", "|---|---:|---:|---:|"]
    totals = {m: {c: sum(k * per_layer[l][c] for l, k in mix.items()) for c in CONTEXTS} for m, mix in MODELS.items()}
    ref = totals["DSA (DeepSeek-V3.2)"]["1M"]
    for m, row in totals.items():
        lines.append(f"| {m} | {row['128K']:,.0f} | {row['1M']:,.0f} | {row['1M'] / ref:.1%} |")
    lines += ["", "Assumed DeepSeek-V4-like configuration (our reading of the report, (check) against it):",
              f"{LAYERS} layers, the first two pure sliding-window layers (window {SWA_WINDOW}), then CSA and HCA",
              "interleaved; CSA: compression ratio m=4 with overlapping windows of 2m, records of 512",
              "(RoPE on the last 64), a lightning indexer with 64 heads over compressed keys of 128, top-512;",
              "HCA: m=128, dense over its records; each CSA/HCA layer has an SWA branch of 128 tokens whose",
              "cache strategy ('none' here) only changes the constant part, except 'full' which keeps every",
              "token's 512-wide SWA key. Tails (inputs of the last 2m tokens, d_model 7168) do not grow.",
              "MHA / GQA rows use 128-dim heads for K and V at V3's depth for comparison. The report gives",
              "V4-Pro at about 10% of V3.2's KV at 1M context."]
    text = "\n".join(lines) + "\n"
    with open(FLAGS.out, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    from script_io import run  # noqa: PLC0415 (experiments/script_io.py: --help exits 0)
    run(main)
