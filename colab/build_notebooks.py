"""Source of the Colab notebooks: `python colab/build_notebooks.py` writes `colab/*.ipynb`.

The notebooks are committed without outputs, exactly as written here (tests/test_notebooks.py
checks that and executes each one on CPU). Edit the cells here, rerun, commit both.
Every notebook starts with the same setup cell (`SETUP`: finds the checkout it runs in and
installs it in Colab; never clones a URL the user has not set) and picks tiny CPU settings
unless `jax.default_backend() == "gpu"`.
"""

from __future__ import annotations

import pathlib

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = pathlib.Path(__file__).resolve().parent

SETUP = '''\
# Setup. Finds the sparse_jax checkout this notebook runs in (the working folder or one above
# it, or /content/sparse_jax), puts it on the path and makes it the working folder. In Colab it
# also installs the checkout (a minute or two); without one there, it clones the repository
# at SPARSE_JAX_GIT_URL (set it here or in the environment) or stops and says what to set.
import os, pathlib, sys

SPARSE_JAX_GIT_URL = os.environ.get("SPARSE_JAX_GIT_URL", "")   # e.g. "https://github.com/<you>/sparse_jax"


def find_checkout():
    here = pathlib.Path.cwd()
    for folder in [here, *here.parents, pathlib.Path("/content/sparse_jax")]:
        if (folder / "pyproject.toml").is_file() and (folder / "sparse_jax" / "__init__.py").is_file():
            return folder
    return None


checkout = find_checkout()
if "google.colab" in sys.modules:
    import shutil, subprocess
    if checkout is None:
        if not SPARSE_JAX_GIT_URL:
            raise RuntimeError(
                "No sparse_jax checkout found (looked in the working folder, the folders above it and "
                "/content/sparse_jax). Set SPARSE_JAX_GIT_URL at the top of this cell to the git URL of "
                "the sparse_jax repository (or put a checkout in /content/sparse_jax), then run it again.")
        subprocess.run(["git", "clone", "--depth=1", SPARSE_JAX_GIT_URL, "/content/sparse_jax"], check=True)
        checkout = pathlib.Path("/content/sparse_jax")
    gpu = shutil.which("nvidia-smi") is not None
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e",
                    str(checkout) + ("[gpu]" if gpu else "")], check=True)
    if gpu:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "jax[cuda13]==0.11.2"], check=True)
if checkout is not None:
    os.chdir(checkout)                       # experiments/ and docs/ live in the checkout
    sys.path.insert(0, str(checkout))'''


# ----------------------------------------------------------------------------- 01 quickstart

QUICKSTART = [
    new_markdown_cell("""\
# sparse_jax quickstart: a sparse attention layer in your own Flax model

Every attention layer of `sparse_jax.layers` is called the same way,

```python
y, cache = layer(x, positions, cache=None, shared=None)   # x [B, T, d_model], positions [B, T]
```

so swapping full attention for a sliding window, a static pattern (Longformer, BigBird,
Sparse Transformer), NSA or MoBA is a one-line change in *your* model. Positions are
explicit (`-1` marks padding), and decoding with a cache runs the same code as training.
This notebook: (1) a small Flax NNX model written here, with its attention swapped for
each layer; (2) decoding with a cache, checked against the full forward pass; (3) HySparse,
whose layers hand state to each other through `shared`; (4) a picture of every pattern.
On CPU it uses tiny sizes; on a GPU runtime larger ones."""),
    new_code_cell(SETUP),
    new_code_cell('''\
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

from sparse_jax import layers, patterns
from sparse_jax.layers.hysparse import HySparseConfig
from sparse_jax.ops.nsa import NSAConfig

ON_GPU = jax.default_backend() == "gpu"
print(f"jax {jax.__version__} on {jax.default_backend()}: {jax.devices()}")
# Tiny on CPU; the sequence length is not a multiple of the block sizes on purpose.
D_MODEL, HEADS, KV_HEADS, VOCAB = (256, 8, 2, 1000) if ON_GPU else (32, 4, 2, 50)
SEQ, WINDOW, BLOCK = (1000, 128, 64) if ON_GPU else (40, 8, 8)
NUM_LAYERS = 4 if ON_GPU else 1                 # one layer keeps CPU compile times short'''),
    new_markdown_cell("""\
## 1. Your model, any attention

A plain pre-norm transformer written with `flax.nnx`. The only thing it asks of its
attention is the interface above, so it takes a factory `make_attention(rngs)`."""),
    new_code_cell('''\
class MyBlock(nnx.Module):
    def __init__(self, attention, d_model: int, *, rngs: nnx.Rngs):
        self.norm1 = nnx.RMSNorm(d_model, rngs=rngs)
        self.attn = attention                                  # any sparse_jax layer
        self.norm2 = nnx.RMSNorm(d_model, rngs=rngs)
        self.up = nnx.Linear(d_model, 4 * d_model, rngs=rngs)
        self.down = nnx.Linear(4 * d_model, d_model, rngs=rngs)

    def __call__(self, x, positions, cache=None):
        h, cache = self.attn(self.norm1(x), positions, cache)
        x = x + h
        return x + self.down(jax.nn.gelu(self.up(self.norm2(x)))), cache


class MyModel(nnx.Module):
    """tokens [B, T], positions [B, T] -> logits [B, T, vocab] (and the new caches)."""

    def __init__(self, make_attention, *, num_layers: int = NUM_LAYERS, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, D_MODEL, rngs=rngs)
        self.blocks = nnx.List([MyBlock(make_attention(rngs), D_MODEL, rngs=rngs)
                                for _ in range(num_layers)])
        self.head = nnx.Linear(D_MODEL, VOCAB, rngs=rngs)

    def __call__(self, tokens, positions, caches=None):
        x, new_caches = self.embed(tokens), []
        for i, block in enumerate(self.blocks):
            x, cache = block(x, positions, None if caches is None else caches[i])
            new_caches.append(cache)
        return self.head(x), (None if caches is None else new_caches)

    def init_cache(self, batch: int, max_len: int):
        return [block.attn.init_cache(batch, max_len) for block in self.blocks]'''),
    new_code_cell('''\
cfg = layers.AttentionConfig(d_model=D_MODEL, num_heads=HEADS, num_kv_heads=KV_HEADS)
gated = layers.AttentionConfig(d_model=D_MODEL, num_heads=HEADS, num_kv_heads=KV_HEADS,
                               learned_sinks=True, output_gate=True)
# Exact per-token block selection (MoBA, HySparse) runs on the XLA path: the Triton
# block_sparse kernel needs query blocks of >= 16 rows (docs/methods/moba.md).
per_token = layers.AttentionConfig(d_model=D_MODEL, num_heads=HEADS, num_kv_heads=KV_HEADS, impl="xla")
nsa = NSAConfig(cmp_block=2 * BLOCK, cmp_stride=BLOCK, sel_block=BLOCK, num_selected=4, window=WINDOW)

ATTENTION = {
    "full": lambda rngs: layers.FullAttention(cfg, rngs=rngs),
    "gated + learned sinks": lambda rngs: layers.FullAttention(gated, rngs=rngs),
    "sliding window": lambda rngs: layers.SlidingWindowAttention(cfg, window=WINDOW, rngs=rngs),
    "StreamingLLM": lambda rngs: layers.StreamingLLMAttention(cfg, window=WINDOW, num_sinks=4, rngs=rngs),
    "Longformer": lambda rngs: layers.PatternAttention(
        cfg, pattern=patterns.longformer(WINDOW, num_global=2, dilation=2), block_size=BLOCK, rngs=rngs),
    "BigBird": lambda rngs: layers.PatternAttention(
        cfg, pattern=patterns.bigbird(block=BLOCK, num_random_blocks=1), block_size=BLOCK, rngs=rngs),
    "Sparse Transformer": lambda rngs: layers.PatternAttention(
        cfg, pattern=patterns.sparse_transformer_strided(WINDOW), block_size=BLOCK, rngs=rngs),
    "NSA": lambda rngs: layers.NSAAttention(cfg, nsa, rngs=rngs),
    "MoBA": lambda rngs: layers.MoBAAttention(per_token, block_size=BLOCK, top_k=2, rngs=rngs),
}

# A ragged batch: row 1 holds SEQ - 5 tokens and 5 padding slots (position -1) at the end.
tokens = jax.random.randint(jax.random.key(0), (2, SEQ), 0, VOCAB)
positions = np.broadcast_to(np.arange(SEQ, dtype=np.int32), (2, SEQ)).copy()
positions[1, SEQ - 5:] = -1

forward = nnx.jit(lambda model, tokens, positions: model(tokens, positions)[0])
models = {name: MyModel(make, rngs=nnx.Rngs(0)) for name, make in ATTENTION.items()}
logits = {}
NAME = max(len(name) for name in models) + 2     # the name column fits every name, yours too
for name, model in models.items():
    logits[name] = forward(model, tokens, positions)
    print(f"{name:<{NAME}}logits {logits[name].shape}, finite: {bool(jnp.isfinite(logits[name]).all())}")'''),
    new_markdown_cell("""\
## 2. Decoding with a cache

`model.init_cache(batch, max_len)` gives each layer its own cache: a full one, a rolling
buffer of `window` (+ sinks) slots for the local layers, NSA's branch caches. Feed the
tokens one at a time (a prompt can go in as one chunk the same way); each step must give
the logits of the full forward pass at that position. `cache.nbytes()` is the memory,
from code."""),
    new_code_cell('''\
step = nnx.jit(lambda model, tokens, positions, caches: model(tokens, positions, caches))
print(f"{'attention':<{NAME}}{'max |decode - forward|':>24}{'cache bytes':>14}")
for name, model in models.items():
    caches, steps = model.init_cache(batch=2, max_len=SEQ), []
    for t in range(SEQ):
        out, caches = step(model, tokens[:, t:t + 1], positions[:, t:t + 1], caches)
        steps.append(out)
    decoded = jnp.concatenate(steps, axis=1)
    valid = positions >= 0                                   # padded slots are not compared
    err = float(jnp.abs(jnp.where(valid[..., None], decoded - logits[name], 0)).max())
    nbytes = sum(c.nbytes() for c in caches)
    print(f"{name:<{NAME}}{err:>24.2e}{nbytes:>14,}")
    assert err < 1e-3, name'''),
    new_markdown_cell("""\
## 3. HySparse: layers that share state

A HySparse full layer selects the top-k KV blocks per query while it attends; the sparse
layers after it reuse its KV and its selection and add a small sliding-window branch. The
full layer's `forward` returns that state, and your model passes it as `shared` to the
next layers (`sparse_jax.models.SparseLM` does this for the layer spec `"HYY"`)."""),
    new_code_cell('''\
hs = HySparseConfig(block_size=BLOCK, top_k_tokens=2 * BLOCK, window=WINDOW)
full_layer = layers.HySparseFullAttention(per_token, hs, rngs=nnx.Rngs(1))
sparse_layer = layers.HySparseSparseAttention(per_token, hs, rngs=nnx.Rngs(2))

@nnx.jit
def two_layers(full_layer, sparse_layer, x, positions):
    y, _, shared = full_layer.forward(x, positions)        # y, cache, what the next layers reuse
    z, _ = sparse_layer(y, positions, None, shared)         # the interface's 4th argument
    return z, shared


x = jax.random.normal(jax.random.key(1), (2, SEQ, D_MODEL))
z, shared = two_layers(full_layer, sparse_layer, x, positions)
print("selected KV blocks per (batch, query, kv head):", shared.block_indices.shape)
print("query 30 of row 0, kv head 0 attends to blocks", np.asarray(shared.block_indices[0, min(30, SEQ - 1), 0]))
print("sparse layer output", z.shape)'''),
    new_markdown_cell("""\
## 4. Every pattern

`sparse_jax.patterns` builds attention patterns from composable predicates (`|`, `&`,
`~`) on query and key positions. Dark cells are visible keys; with `block_size` the blocks
the kernels visit are tinted: green when fully visible (no element mask), orange when
partial. Everything outside the tinted blocks is skipped."""),
    new_code_cell('''\
N, B = 64, 8
PRESETS = {
    "causal": patterns.causal_window(),
    "sliding window (16)": patterns.causal_window(16),
    "StreamingLLM (4 sinks + 12)": patterns.causal_window(12, num_sinks=4),
    "chunked (16)": patterns.Causal() & patterns.Chunked(16),
    "Longformer (dilation 2, 2 global)": patterns.longformer(8, num_global=2, dilation=2),
    "BigBird (block 8)": patterns.bigbird(block=8, num_random_blocks=2),
    "Sparse Transformer strided (8)": patterns.sparse_transformer_strided(8),
    "Sparse Transformer fixed (8, 2)": patterns.sparse_transformer_fixed(8, summary=2),
    "window 8 | sinks 4 | strided 16": patterns.Causal() & (
        patterns.SlidingWindow(8) | patterns.Sinks(4) | patterns.Strided(16)),
}
fig, axes = plt.subplots(3, 3, figsize=(11, 11))
for ax, (title, pattern) in zip(axes.flat, PRESETS.items()):
    patterns.plot_pattern(pattern, N, block_size=B, title=title, ax=ax)
    density = patterns.mask_array(pattern, N).mean() / np.tril(np.ones((N, N))).mean()
    ax.set_xlabel(f"key position  ({density:.0%} of causal)")
fig.tight_layout()
plt.show()'''),
    new_markdown_cell("""\
Next: `02_train_compare_hybrid.ipynb` trains full, sliding-window and hybrid models on
needle retrieval; `docs/methods/` has one page per method (paper, defaults, caveats)."""),
]



# ----------------------------------------------------------------------------- 02 train and compare

TRAIN_COMPARE = [
    new_markdown_cell("""\
# Train and compare: full vs sliding window vs hybrid on needle retrieval

`sparse_jax.data.NeedleTask` hides one `KEY v` pair in a haystack of noise tokens; the
sequence ends with `KEY` and the model must answer `v`. Finding the needle needs
attention that reaches back as far as the needle is. A stack of `L` sliding-window layers
of window `w` sees at most `L * (w - 1)` tokens back, so it must fail beyond that,
whatever the training; a *hybrid* that keeps one full layer among the local ones does not,
at a fraction of the KV memory. This is the experiment of `make demo`
(`experiments/retrieval_demo.py`), with the models trained through `sparse_jax.train` and
accuracy plotted against the needle's distance. CPU: tiny models, under a minute."""),
    new_code_cell(SETUP),
    new_code_cell('''\
import time

import jax
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

from sparse_jax.data import NeedleTask
from sparse_jax.models.lm import LMConfig, SparseLM, hybrid_spec
from sparse_jax.train import count_params, eval_step, make_optimizer, train_step

ON_GPU = jax.default_backend() == "gpu"
print(f"jax {jax.__version__} on {jax.default_backend()}")
if ON_GPU:   # the settings of `make demo` (README table), plus an NSA model
    SEQ, WINDOW, LAYERS, D_MODEL, HEADS, STEPS, BATCH = 128, 16, 2, 64, 4, 300, 32
    MODELS = {"full": "FF", "sliding window": "WW", "hybrid": hybrid_spec(2, 2), "NSA": "NN"}
else:        # tiny: trains in seconds per model on one CPU core
    SEQ, WINDOW, LAYERS, D_MODEL, HEADS, STEPS, BATCH = 64, 8, 2, 32, 2, 300, 32
    MODELS = {"full": "FF", "sliding window": "WW", "hybrid": hybrid_spec(2, 2)}
task = NeedleTask(seq_len=SEQ)
RECEPTIVE = LAYERS * (WINDOW - 1)
print(f"T={SEQ}, window {WINDOW}, {LAYERS} layers: a pure sliding-window stack sees {RECEPTIVE} tokens back; "
      f"chance = 1/{task.num_values}")'''),
    new_markdown_cell("""\
## Train

One `LMConfig` per model; only `layer_spec` differs (`F` full, `W` sliding window, `N`
NSA; `hybrid_spec(2, 2)` is `"WF"`). Same data stream, same seed, same optimizer."""),
    new_code_cell('''\
def train(spec: str):
    config = LMConfig(vocab_size=task.vocab_size, layer_spec=spec, d_model=D_MODEL, num_heads=HEADS,
                      window=WINDOW)
    model = SparseLM(config, rngs=nnx.Rngs(0))
    optimizer = make_optimizer(model, 3e-3, warmup=STEPS // 10, total_steps=STEPS)
    rng, losses = np.random.default_rng(0), []
    for _ in range(STEPS):
        tokens, targets, mask, _ = task.batch(rng, BATCH)
        loss, _ = train_step(model, optimizer, tokens, targets, mask)
        losses.append(loss)                       # stays on device: no sync per step
    return model, np.asarray(jax.device_get(losses))


trained, curves = {}, {}
for name, spec in MODELS.items():
    start = time.perf_counter()
    trained[name], curves[name] = train(spec)
    print(f"{name:>15} [{spec}]: final loss {curves[name][-20:].mean():.3f}, "
          f"{count_params(trained[name]):,} parameters, {time.perf_counter() - start:.1f} s")'''),
    new_markdown_cell("""\
## Accuracy against the needle's distance

Evaluated on fresh sequences, bucketed by how far back the needle sits. The dotted line
is the window, the dashed one the receptive field of the pure sliding-window stack."""),
    new_code_cell('''\
edges = np.unique(np.geomspace(2, SEQ - 1, 9).astype(int))
buckets = [(lo, hi - 1) for lo, hi in zip(edges[:-1], edges[1:])]
eval_rng = np.random.default_rng(1)
accuracy = {name: [] for name in trained}
for lo, hi in buckets:
    batches = [task.batch(eval_rng, 64, lo, hi)[:3] for _ in range(2)]   # the same needles for every model
    for name, model in trained.items():
        accuracy[name].append(np.mean([float(eval_step(model, *b)) for b in batches]))

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
mid = [(lo + hi) / 2 for lo, hi in buckets]
for name, style in zip(trained, ["o-", "s--", "^-.", "d:"]):      # full and hybrid may overlap
    ax1.plot(mid, accuracy[name], style, label=f"{name} [{MODELS[name]}]")
    ax2.plot(np.convolve(curves[name], np.ones(10) / 10, mode="valid"), label=name)
ax1.axvline(WINDOW, color="gray", ls=":")
ax1.axvline(RECEPTIVE, color="gray", ls="--")
ax1.axhline(1 / task.num_values, color="gray", lw=0.5)
ax1.set(xscale="log", xlabel="needle distance (tokens back)", ylabel="accuracy", ylim=(-0.05, 1.05),
        title="needle retrieval")
ax1.minorticks_off()
ax1.set_xticks(edges, [str(e) for e in edges])
ax2.set(xlabel="step", ylabel="training loss (10-step mean)", yscale="log", title="training")
ax1.legend()
ax2.legend()
plt.show()'''),
    new_code_cell('''\
near = [i for i, (lo, hi) in enumerate(buckets) if hi < WINDOW - 1]
far = [i for i, (lo, hi) in enumerate(buckets) if lo > RECEPTIVE]
print(f"{'model':>15} {'layers':>7} {'acc near':>9} {'acc far':>8} {'KV bytes/token':>15}")
for name, model in trained.items():
    acc = np.asarray(accuracy[name])
    print(f"{name:>15} {MODELS[name]:>7} {acc[near].mean():>9.2f} {acc[far].mean():>8.2f} "
          f"{model.kv_bytes_per_token(SEQ):>15.0f}")
# What the experiment shows (checked so the notebook fails if it stops showing it):
assert np.asarray(accuracy["sliding window"])[far].mean() < 0.3, "a window cannot see far needles"
assert np.asarray(accuracy["hybrid"])[far].mean() > 0.5, "the hybrid's full layer should find them"'''),
    new_markdown_cell("""\
The sliding-window model is at chance beyond its receptive field; the hybrid's single
full layer restores retrieval while the window layer keeps a cache of `window` slots
(KV bytes per token from `SparseLM.kv_bytes_per_token`, i.e. from the caches' `nbytes()`).
Larger runs: `python experiments/retrieval_demo.py --help`."""),
]


# ----------------------------------------------------------------------------- 03 kernels

KERNELS = [
    new_markdown_cell("""\
# The kernels: correctness on CPU, speed against cuDNN on a GPU

Three Pallas ops, each behind one function with `impl="auto" | "xla" | "triton" |
"mosaic_tpu"` (and `"mosaic_gpu"` for `flash` on Hopper): `flash` (dense attention with
any element mask: causal, window, sinks, segments), `block_sparse` (per query block, a
list of KV blocks from `sparse_jax.patterns`) and `decode` (split-K over a cache).
`impl="xla"` is the plain-jnp reference; `interpret=True` runs the Triton kernel in
Pallas interpret mode, which works on a CPU. On a GPU runtime (Runtime > Change runtime
type; an Ampere or newer GPU: the timings use bf16) the same cells compile the real
kernels and time them against cuDNN, as
`experiments/bench_kernels.py` does (that script covers every shape of
`docs/BENCHMARKS.md`)."""),
    new_code_cell(SETUP),
    new_code_cell('''\
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from pallas_kernels.block_sparse import block_sparse_attention
from pallas_kernels.decode import decode_attention
from pallas_kernels.flash import flash_attention
from sparse_jax import patterns

ON_GPU = jax.default_backend() == "gpu"
print(f"jax {jax.__version__} on {jax.default_backend()}: {jax.devices()}")
# (impl, interpret) pairs to check against a plain-jnp softmax: the compiled kernels on a
# GPU, the Triton kernels in interpret mode on CPU.
IMPLS = [("xla", False), ("triton", False)] if ON_GPU else [("xla", False), ("triton", True)]'''),
    new_markdown_cell("""\
## Correctness against plain jnp

A ragged batch (row 1 ends in 17 padding positions, `-1`), GQA (4 query heads on 2 KV
heads), a length that is not a multiple of any block size. The reference is a dense
softmax under `patterns.dense_mask`, written here in a few lines."""),
    new_code_cell('''\
B, T, H, HKV, D = 2, 100, 4, 2, 32
kq, kk, kv, kd = jax.random.split(jax.random.key(0), 4)
q = jax.random.normal(kq, (B, T, H, D))
k = jax.random.normal(kk, (B, T, HKV, D))
v = jax.random.normal(kv, (B, T, HKV, D))
pos = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()
pos[1, T - 17:] = -1


def dense_reference(q, k, v, pattern, q_pos, kv_pos):
    """softmax(q k^T / sqrt(D)) v under the pattern's mask; rows that see nothing give 0."""
    b, tq, h, d = q.shape
    qg = q.reshape(b, tq, k.shape[2], h // k.shape[2], d)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k) / np.sqrt(d)
    m = patterns.dense_mask(pattern, q_pos, kv_pos)[:, None, None]
    p = jnp.where(m, jax.nn.softmax(jnp.where(m, s, -jnp.inf), axis=-1), 0.0)
    return jnp.einsum("bhgqk,bkhd->bqhgd", p, v).reshape(b, tq, h, v.shape[-1])


window = patterns.causal_window(32, num_sinks=4)           # StreamingLLM-style: sinks + window
bigbird = patterns.bigbird(block=16, num_random_blocks=1)
meta = patterns.static_block_metadata(bigbird, T, T, 16, 16)  # which 16x16 blocks to visit
lengths = jnp.asarray((pos >= 0).sum(1))                  # decode: cache slot j holds position j
dq = q[:, :1]                                             # one new token per row, at lengths - 1
dq_pos = (lengths - 1)[:, None]

rows = []
for impl, interpret in IMPLS:
    kw = dict(impl=impl, interpret=interpret)
    flash = jax.jit(lambda q, k, v: flash_attention(q, k, v, mask_fn=window, q_positions=pos,
                                                    kv_positions=pos, **kw))
    sparse = jax.jit(lambda q, k, v: block_sparse_attention(q, k, v, meta, mask_fn=bigbird,
                                                            q_positions=pos, kv_positions=pos, **kw))
    decode = jax.jit(lambda q, k, v: decode_attention(q, k, v, lengths=lengths, **kw))
    grad = jax.jit(jax.grad(lambda q, k, v: (flash(q, k, v) ** 2).sum(), argnums=(0, 1, 2)))
    ref_grad = jax.grad(lambda q, k, v: (dense_reference(q, k, v, window, pos, pos) ** 2).sum(),
                        argnums=(0, 1, 2))(q, k, v)
    errors = {
        "flash (window + sinks)": jnp.abs(flash(q, k, v) - dense_reference(q, k, v, window, pos, pos)).max(),
        "flash gradients": max(jnp.abs(a - b).max() for a, b in zip(grad(q, k, v), ref_grad)),
        "block_sparse (BigBird)": jnp.abs(sparse(q, k, v) - dense_reference(q, k, v, bigbird, pos, pos)).max(),
        "decode (ragged cache)": jnp.abs(decode(dq, k, v) - dense_reference(
            dq, k, v, patterns.Causal(), np.asarray(dq_pos), np.where(pos >= 0, pos, -1))).max(),
    }
    for op, err in errors.items():
        rows.append((op, impl + (" (interpret)" if interpret else ""), float(err)))

print(f"{'op':>24} {'impl':>20} {'max abs error':>14}")
for op, impl, err in rows:
    print(f"{op:>24} {impl:>20} {err:>14.2e}")
# float32 on CPU; on a GPU float32 matmuls may run in TF32 (about 1e-3 relative).
assert max(err for _, _, err in rows) < (2e-2 if ON_GPU else 1e-4)'''),
    new_markdown_cell("""\
## Speed against cuDNN (GPU runtime)

bf16, random normal inputs, warm-up first, the median of 10 timed calls with
`jax.block_until_ready` around each, every figure next to cuDNN's
(`jax.nn.dot_product_attention(..., implementation="cudnn")`) measured in the same
process on the same inputs (`docs/BENCHMARKS.md` explains why only ratios travel between
machines). The helpers come from `experiments/bench_kernels.py`. On CPU the cell times
the XLA path against `jax.nn.dot_product_attention` at a toy size instead, which only
shows the mechanics."""),
    new_code_cell('''\
from experiments.bench_kernels import cudnn, fwd_bwd, make, median_time

flash_causal = lambda q, k, v: flash_attention(q, k, v, mask_fn=patterns.Causal())  # impl="auto"
if ON_GPU:
    SHAPES, ITERS = [(16, 16, 4096), (16, 16, 16384), (16, 4, 16384)], 10
    baseline = cudnn
else:
    SHAPES, ITERS = [(4, 4, 256)], 3
    baseline = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)  # XLA

results = []
for h, hkv, t in SHAPES:
    q, k, v, do = make(h, hkv, t, 128 if ON_GPU else 32)
    row = dict(shape=f"H={h}/{hkv} T={t}")
    row["fwd"] = median_time(jax.jit(baseline), q, k, v, iters=ITERS) / median_time(
        jax.jit(flash_causal), q, k, v, iters=ITERS)
    row["fwd+bwd"] = median_time(fwd_bwd(baseline), q, k, v, do, iters=ITERS) / median_time(
        fwd_bwd(flash_causal), q, k, v, do, iters=ITERS)
    if ON_GPU:   # sliding window 1024 through block_sparse: visits ~1/8 of the causal blocks at 16K
        sw = patterns.causal_window(1024)
        sw_meta = patterns.static_block_metadata(sw, t, t, 128, 128)
        sparse = lambda q, k, v: block_sparse_attention(q, k, v, sw_meta, mask_fn=sw)
        row["window 1024 fwd"] = median_time(jax.jit(baseline), q, k, v, iters=ITERS) / median_time(
            jax.jit(sparse), q, k, v, iters=ITERS)
    results.append(row)
    print(row, flush=True)

labels = [k for k in results[0] if k != "shape"]
fig, ax = plt.subplots(figsize=(8, 3.5))
width = 0.8 / len(results)
for i, row in enumerate(results):
    ax.bar(np.arange(len(labels)) + i * width, [row[l] for l in labels], width, label=row["shape"])
ax.axhline(1.0, color="gray", lw=0.8)
ax.set_xticks(np.arange(len(labels)) + 0.4 - width / 2, labels)
ax.set_ylabel("speed-up over " + ("cuDNN causal" if ON_GPU else "jax.nn attention (CPU: no meaning)"))
ax.legend()
plt.show()'''),
    new_markdown_cell("""\
The full benchmark tables (and the TFLOP/s of each kernel) come from the scripts, on a GPU:

```bash
python experiments/bench_kernels.py --out /tmp/bench.json            # flash vs cuDNN
python experiments/bench_kernels.py --block_sparse --heads 16:16,16:4 --seq_lens 16384,65536
python experiments/bench_decode.py --out /tmp/bench_decode.json      # decode vs copy bandwidth
bash experiments/bench_all.sh                                        # everything, one run
```"""),
]



# ----------------------------------------------------------------------------- 04 KV cache

COMPRESS = [
    new_markdown_cell("""\
# Compress the KV cache of a trained model

Training-free KV-cache policies (`sparse_jax.kv_policies`) decide, after the prompt's
dense prefill, which keys and values each KV head keeps: StreamingLLM (sinks + recent),
H2O (heavy hitters by accumulated attention + recent), SnapKV (what the prompt's last
queries attend to), PyramidKV (SnapKV with budgets falling with depth), Ada-KV (budgets
moved between heads), and Quest (keeps everything but reads only the top pages per step).
The model code is unchanged: a policy is a list of caches handed to the model.

Here: train a tiny full-attention model on needle retrieval, then answer the same needle
questions with each policy at one budget (a quarter of the prompt per KV head and layer),
and compare accuracy for needles near the end and far back, and the cache's bytes."""),
    new_code_cell(SETUP),
    new_code_cell('''\
import time

import jax
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

from sparse_jax import kv_policies as kvp
from sparse_jax.data import NeedleTask
from sparse_jax.models.lm import LMConfig, SparseLM
from sparse_jax.train import make_optimizer, train_step

ON_GPU = jax.default_backend() == "gpu"
print(f"jax {jax.__version__} on {jax.default_backend()}")
SEQ, D_MODEL, HEADS, STEPS, BATCH = (128, 64, 4, 300, 32) if ON_GPU else (64, 32, 2, 300, 32)
task = NeedleTask(seq_len=SEQ)
PROMPT = SEQ - 1                 # the prompt ends just before the final KEY, the question
BUDGET = PROMPT // 4             # kept tokens per KV head per layer
NEAR = 16                        # needles closer than this to the end count as "near"'''),
    new_markdown_cell("""\
## A trained model

Two full-attention layers (`layer_spec="FF"`), trained with `sparse_jax.train` until it
retrieves needles at any distance (as in notebook 02)."""),
    new_code_cell('''\
start = time.perf_counter()
model = SparseLM(LMConfig(vocab_size=task.vocab_size, layer_spec="FF", d_model=D_MODEL, num_heads=HEADS),
                 rngs=nnx.Rngs(0))
optimizer = make_optimizer(model, 3e-3, warmup=STEPS // 10, total_steps=STEPS)
rng = np.random.default_rng(0)
for _ in range(STEPS):
    loss, _ = train_step(model, optimizer, *task.batch(rng, BATCH)[:3])
print(f"trained in {time.perf_counter() - start:.1f} s, final loss {float(loss):.3f}")'''),
    new_markdown_cell("""\
## Answer with a compressed cache

`kvp.policy_caches(model, policy, batch=, prompt_len=, max_new=)` gives the list of
per-layer caches: the prompt is prefilled densely, the policy compresses each layer's
cache, then the question token is decoded over what was kept. `None` is the dense cache."""),
    new_code_cell('''\
tokens, targets, _, distance = task.batch(np.random.default_rng(1), 128)
positions = np.broadcast_to(np.arange(SEQ, dtype=np.int32), tokens.shape)


@nnx.jit
def answer(model, tokens, positions, caches):
    """Prefill the prompt, decode the question token: the predicted value and the caches."""
    _, caches = model(tokens[:, :PROMPT], positions[:, :PROMPT], caches)
    logits, caches = model(tokens[:, PROMPT:], positions[:, PROMPT:], caches)
    return logits[:, -1].argmax(-1), caches


POLICIES = {
    "dense": None,
    "StreamingLLM": kvp.StreamingLLM(BUDGET, num_sinks=4),
    "H2O": kvp.H2O(BUDGET),
    "SnapKV": kvp.SnapKV(BUDGET, window=8),
    "PyramidKV": kvp.PyramidKV(BUDGET, window=8),
    "Ada-SnapKV": kvp.AdaKV(kvp.SnapKV(BUDGET, window=8)),
    "Quest": kvp.Quest(BUDGET, page_size=4),
}
results = {}
for name, policy in POLICIES.items():
    caches = (model.init_cache(len(tokens), SEQ) if policy is None else
              kvp.policy_caches(model, policy, batch=len(tokens), prompt_len=PROMPT, max_new=1))
    predicted, caches = answer(model, tokens, positions, caches)
    hit = np.asarray(predicted) == targets[:, -1]
    results[name] = dict(near=hit[distance < NEAR].mean(), far=hit[distance >= NEAR].mean(),
                         kib=sum(c.nbytes() for c in caches) / len(tokens) / 1024)

print(f"budget {BUDGET} of {PROMPT} prompt tokens per KV head and layer")
print(f"{'policy':>13} {'acc near':>9} {'acc far':>8} {'KiB / sequence':>15}")
for name, r in results.items():
    print(f"{name:>13} {r['near']:>9.2f} {r['far']:>8.2f} {r['kib']:>15.1f}")'''),
    new_code_cell('''\
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 3.8))
x = np.arange(len(results))
ax1.bar(x - 0.2, [r["near"] for r in results.values()], 0.4, label=f"needle < {NEAR} tokens back")
ax1.bar(x + 0.2, [r["far"] for r in results.values()], 0.4, label="farther")
ax1.axhline(1 / task.num_values, color="gray", lw=0.8)
ax1.set(xticks=x, ylabel="accuracy", ylim=(0, 1.3), title=f"budget {BUDGET} / {PROMPT} tokens")
ax1.set_xticklabels(results, rotation=30, ha="right")
ax1.legend(ncol=2, loc="upper center")
ax2.bar(x, [r["kib"] for r in results.values()], color="gray")
ax2.set(xticks=x, ylabel="KiB per sequence", title="cache after decoding (nbytes)")
ax2.set_xticklabels(results, rotation=30, ha="right")
plt.show()

# What this shows, checked so the notebook fails if it stops showing it:
assert results["dense"]["near"] > 0.9 and results["dense"]["far"] > 0.9, "the model should be trained"
assert results["StreamingLLM"]["far"] < 0.5, "sinks + recent tokens evict far needles"'''),
    new_markdown_cell("""\
Reading the figure: StreamingLLM keeps only sinks and recent tokens, so far needles are
gone; the attention-guided policies keep what the prompt's queries looked at, which may or
may not be the needle (the question token is not part of the prompt). Quest keeps the
whole cache (its bytes do not shrink) and saves *reads*: each decode step attends to the
top pages by an upper bound of their scores. Other policies and knobs: DuoAttention
(`kvp.DuoAttention` with retrieval heads from `sparse_jax.kv_policies.duo.calibrate`),
`kvp.TopP`; budgets per layer and head in `sparse_jax/kv_policies/policies.py`."""),
]


def _notebook(cells, stem: str, gpu: bool = False):
    nb = new_notebook(cells=cells)
    for i, cell in enumerate(nb.cells):
        cell.id = f"{stem}-{i:02d}"                 # stable ids: rebuilding gives the same file
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
        "colab": {"provenance": []},
    }
    if gpu:
        nb.metadata["accelerator"] = "GPU"
    return nb


def build_all() -> dict:
    """{file name: notebook} for every notebook."""
    return {
        "01_quickstart.ipynb": _notebook(QUICKSTART, "quickstart"),
        "02_train_compare_hybrid.ipynb": _notebook(TRAIN_COMPARE, "train-compare"),
        "03_kernels_and_benchmark.ipynb": _notebook(KERNELS, "kernels", gpu=True),
        "04_compress_kv_cache.ipynb": _notebook(COMPRESS, "compress-kv"),
    }


def dumps(nb) -> str:
    return nbformat.writes(nb) + "\n"


def main():
    for name, nb in build_all().items():
        nbformat.validate(nb)
        (HERE / name).write_text(dumps(nb))
        print("wrote", HERE / name)


if __name__ == "__main__":
    main()
