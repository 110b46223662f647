"""Exact top-k selection of score rows on GPU: a radix select in Pallas (Triton lowering).

`topk_select(scores [R, S], k)` returns the very set `lax.top_k` picks (the `k' = min(k, S)`
largest scores of each row, the lower slot first among equal scores), but in ascending slot
order, -1 / -inf padded last where a row has fewer than `k'` candidates (-inf = not a
candidate). It is the selection step of the DSA lightning indexer (arXiv 2512.02556), where
`lax.top_k` (a sort) costs ~17x the score kernel itself at k=2048, S=64K.

Order-preserving key: the float32 bits `b` as int32, `key = b ^ ((b >> 31) & 0x7fffffff)`:
signed-int order of keys is the IEEE total order of the floats, the order `lax.top_k` uses
on the CPU (so -0.0 ranks below +0.0, and -inf below every other non-NaN; the GPU
`lax.top_k` was not checked for signed zeros). NaN scores are not supported (the indexer
never produces them).

Kernel (one program per `block_r` rows, looping over S in `block_s` tiles; one tile when
`block_s >= S`, the *whole-row* form below):
  1. Threshold: up to `32 / bits_per_pass` counting passes, each fixing the next
     `bits_per_pass` bits of `lo`, the key of the k'-th largest candidate: a pass counts,
     per row, the candidates with `key >= lo + d << shift` for each digit `d`
     (`2**bits` running per-element counters, reduced once per pass) and keeps the largest
     `d` whose count is still >= k'. Only counts live in registers. The first
     `full_passes` passes re-read the whole row from HBM; then one pass copies the keys
     still in play (`lo <= key < lo + 2**shift`: ~1% of the row after 12 bits in a numpy
     model at S=64K, k'=2048, N(0, 1) and indexer-like rows) to the front of a buffer row (an extra `[R, S]` int32 output), and the remaining
     passes read only those. The passes stop early once every row of the program has
     `count(key >= lo) <= k'` (its set is then decided: all of `key >= lo`), e.g. after the
     first pass for a row with fewer than k' candidates.
  2. Compaction: one more pass takes every candidate with `key > lo` plus the first
     `k' - count(key > lo)` with `key == lo` in slot order (the tie rule), and scatters
     their slots and values to output column `running count + in-tile exclusive cumsum`
     (a Triton scan). Columns past the number taken get -1 / -inf.

Cost at S = 64K, k' = 2048, with 4 bits per pass and 3 full passes: 3 counting passes + 1
narrowing pass + 1 compaction pass read the row (256 KiB in float32) 5 times (1.25 MiB per
row), with 16 compare-adds per element in each counting pass; 2 bits per pass (the
default) does 4 compare-adds per element but twice the passes (8 would need 256 counters
per element). Without the buffer a numpy model of the passes stops after 6 passes (4 bits)
for N(0, 1) rows and 7 for indexer-like rows (ReLU-weighted sums), 8 when the k'-th value
is tied. Defaults `block_r=1, block_s=512, num_warps=4`: one program per row, 4 elements
per thread. H200 (one sweep, R=2048 x S=32K, k=2048): `lax.top_k` 4.89 ms; 2 bits x 6 full
passes 1.44 ms (the default); 4 bits x 3 full passes 1.84 ms. The kernel is bound by the
compare-adds, not by the bytes. Not done: bf16 scores (half the bytes per pass, but the set
would then differ from float32 `lax.top_k` near the threshold); splitting long rows over
several programs when R is small.

Whole-row form (`block_s >= S`, `whole_row_config`; what few rows take, e.g. Quest's page top-k
at batch 1: 8 rows x 8192 pages, k 512): one launch, one program per row that loads its row
once and keeps the keys in registers (S / (32 num_warps) per thread); the counting passes and
the compaction run on them, with no re-read of the row, no narrowed-key buffer (no `[R, S]`
output) and no `d = 0` count (`count(key >= lo)` is carried from the previous pass, starting
from the number of candidates, so a row with fewer than k' candidates runs no pass). The
values written are decoded from the keys (the key map is an involution on candidates) rather
than kept live beside them. Why not a new kernel: the tiled kernel's passes, early stop, tie
rule, compaction and padding are the same; what made it slow for few rows was the structure
(each pass streaming the row again, `block_s`-wide, and the buffer round trip), which the
one-tile form removes. `WHOLE_ROW_MAX_COLUMNS` bounds the registers: wider rows with few rows
go to `lax.top_k` (`api.top_k_set`).

Packed counts (`packed_counts`, whole-row form, 2 or 4 bits per pass): the whole-row time
tracks the block-wide reductions (H100, Quest B1: 1 bit, 32 passes x 1 count, 29.9 us; 2 bits,
16 x 3, 36.3; 4 bits, 8 x 15, 58.8: ~0.9 us each, a cross-warp reduction and its barriers), so
a pass's counts are summed as 16-bit fields of int64 words (`packed_row_sums`: each count <=
S < 2**16), one reduction per 4 counts. Reductions per select at most: 2 bits 16 x 1 = 16 (the
fewest); 4 bits 8 x 4 = 32; 3 bits (not supported: 32 is no multiple of 3) would be 11 x 2 =
22; in int32 words two 16-bit fields (S <= 16K needs 15 bits) give 2 bits 16 x 2 = 32, no
better than 1 bit unpacked. The price: each element's flags shifted and added, its word in
int64 (two-instruction adds in the in-thread part of the reduction). Not timed yet.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

INT_MIN = -(2**31)


@dataclasses.dataclass(frozen=True)
class TopkSelectConfig:
    """block_r: rows per program; block_s: columns per tile (powers of two; `>= S`: the
    whole-row form, one tile held in registers, `full_passes` unused);
    bits_per_pass: key bits fixed per counting pass (1, 2 or 4: at most `32 / bits` passes,
    `2**bits` counters per element; 8 would need 256 counters, far past the registers);
    full_passes: counting passes over the whole row before the keys that can still be the
    k'-th are copied to a buffer and the remaining passes read only them (>= 32 / bits:
    never). Defaults from one H200 sweep at R=2048 rows x S=32K, k=2048 (`lax.top_k` 4.89
    ms): 2 bits x 6 full passes 1.44 ms; 4 bits x 3 full passes 1.84 ms; block_s 256 slower.
    packed_counts: the whole-row form only (`block_s >= S`, S < 2**16), bits_per_pass 2 or 4:
    a pass's `2**bits - 1` counts summed as 16-bit fields of int64 words (`packed_row_sums`),
    one block-wide reduction per 4 counts instead of one per count."""

    block_r: int = 1
    block_s: int = 512
    bits_per_pass: int = 2
    full_passes: int = 6
    num_warps: int = 4
    num_stages: int = 2
    packed_counts: bool = False

    def __post_init__(self):
        for name in ("block_r", "block_s"):
            val = getattr(self, name)
            if not (isinstance(val, int) and val >= 1 and val & (val - 1) == 0):
                raise ValueError(f"{name} must be a power of two, got {val!r}")
        if self.bits_per_pass not in (1, 2, 4):
            raise ValueError(f"bits_per_pass must be 1, 2 or 4, got {self.bits_per_pass!r}")
        if not (isinstance(self.full_passes, int) and self.full_passes >= 1):
            raise ValueError(f"full_passes must be an int >= 1, got {self.full_passes!r}")
        if self.num_warps < 1 or self.num_stages < 1:
            raise ValueError(f"num_warps and num_stages must be >= 1, got {self.num_warps}, {self.num_stages}")
        if not isinstance(self.packed_counts, bool):
            raise ValueError(f"packed_counts must be a bool, got {self.packed_counts!r}")
        if self.packed_counts and self.bits_per_pass == 1:
            raise ValueError("packed_counts needs bits_per_pass 2 or 4 (1 bit counts once per pass: nothing to pack)")


def float_keys(x):
    """float32 -> int32 keys whose signed order is the IEEE total order of `x`."""
    b = lax.bitcast_convert_type(x, jnp.int32)
    return b ^ (lax.shift_right_arithmetic(b, 31) & 0x7FFFFFFF)


def keys_to_floats(key):
    """The inverse of `float_keys` (the map is an involution: it keeps the sign bit)."""
    return lax.bitcast_convert_type(key ^ (lax.shift_right_arithmetic(key, 31) & 0x7FFFFFFF), jnp.float32)


NEG_INF_KEY = int(float_keys(np.float32(-np.inf)))

# Below this many rows the tiled passes (one program per row streaming its tiles) leave the GPU
# idle: H100, Quest decode at 128K, pages of 16, k 512: batch 1 (8 rows) 170 us a step with
# them, 110 us with `lax.top_k` (an earlier run); batch 16 (128 rows) 588 vs 627 us.
TILED_MIN_ROWS = 64
# Below this many rows of at most `WHOLE_ROW_MAX_COLUMNS` the whole-row form beats the tiled
# passes: H100, 8192 columns, k 512: 8 rows 29.9-35.1 us (tiled: 170 us a step, earlier);
# 128 rows (Quest batch 16, 2026-12-08) 38.1 us against 118.5 for the tiled
# `quest.PAGE_TOPK_CONFIG`. Not measured from 256 rows on (two waves of 132 SMs and more).
WHOLE_ROW_MAX_ROWS = 256
# The widest row the whole-row form takes by default: 16K keys = 32 int32 per thread at 16
# warps (the row, plus the compaction's cumsums of the same shape, in registers).
WHOLE_ROW_MAX_COLUMNS = 16384


def whole_row_config(size: int, bits_per_pass: int = 1, num_warps: int | None = None,
                     packed_counts: bool = False) -> TopkSelectConfig:
    """The whole-row form for rows of `size` columns: `block_s = next_pow2(size)` (one tile),
    by default 32 keys per thread (4 to 16 warps). bits_per_pass 1: 32 passes at most of one
    count (2: 16 of 3; 4: 8 of 15). H100, 8 rows x 8192, k 512 (2026-12-07): 1 bit 29.9 us,
    2 bits 36.3 (16 warps 35.9), 4 bits 58.8; `sorted_top_k` (XLA) 63.0: the time tracks the
    block-wide reductions, ~0.9 us each. packed_counts (bits 2 or 4): the counts of a pass
    packed four to an int64 reduction, 16 x 1 (2 bits) or 8 x 4 (4 bits) reductions at most,
    against 32 x 1 for 1 bit unpacked (not timed yet)."""
    block_s = max(16, pl.next_power_of_2(size))
    warps = num_warps or min(16, max(4, block_s // 1024))
    return TopkSelectConfig(block_s=block_s, bits_per_pass=bits_per_pass, full_passes=32, num_warps=warps,
                            packed_counts=packed_counts)


def takes_whole_row(rows: int, size: int) -> bool:
    """Whether `rows` rows of `size` columns take the whole-row form by default: fewer than
    `WHOLE_ROW_MAX_ROWS` rows (measured faster than the tiled passes there) of at most
    `WHOLE_ROW_MAX_COLUMNS` (the row must fit the registers)."""
    return rows < WHOLE_ROW_MAX_ROWS and size <= WHOLE_ROW_MAX_COLUMNS


def default_config(rows: int, size: int) -> TopkSelectConfig:
    """`topk_select`'s config when none is given: the whole-row form where `takes_whole_row`,
    else `TopkSelectConfig()`."""
    if takes_whole_row(rows, size):
        return whole_row_config(size)
    return TopkSelectConfig()


# `packed_row_sums`: one count per 16-bit field, four fields per int64 word (counts <= S <= 65535).
COUNT_FIELD_BITS = 16
FIELDS_PER_WORD = 64 // COUNT_FIELD_BITS


def packed_row_sums(flags):
    """Row sums of `flags` (a list of n `[br, bs]` bool arrays, `bs < 2**16`) as n `[br]` int32,
    with ceil(n / 4) block-wide reductions instead of n: flag i of a word adds 1 to its 16-bit
    field (bits `16 i .. 16 i + 15`), so a field's sum, <= bs, never carries into the next. A
    word's low and high halves are packed in int32 (two fields each, no carry per element),
    then joined into int64 for the reduction. int64 needs x64 while tracing (`jax.enable_x64`
    here only: the kernel's other arrays keep their dtypes); Pallas Triton lowers it to one
    `tt.reduce` of i64 (`tests/test_indexer_select.py`)."""
    def half(fs):                                                          # [br, bs] int32, <= 2 fields
        return sum(lax.shift_left(f.astype(jnp.int32), jnp.int32(COUNT_FIELD_BITS * i)) for i, f in enumerate(fs))

    sums = []
    with jax.enable_x64(True):
        for w in range(0, len(flags), FIELDS_PER_WORD):
            fs = flags[w:w + FIELDS_PER_WORD]
            word = half(fs[:2]).astype(jnp.int64)
            if fs[2:]:
                word = word + lax.shift_left(half(fs[2:]).astype(jnp.int64), jnp.int64(32))
            total = word.sum(axis=1)                                       # [br] int64: the one reduction
            sums += [(lax.shift_right_logical(total, jnp.int64(COUNT_FIELD_BITS * i)) & 0xFFFF).astype(jnp.int32)
                     for i in range(len(fs))]
    return sums


def _kernel(x_ref, *refs, rows, size, k, block_r, block_s, bits, full_passes, packed, barrier, has_lengths):
    len_ref, refs = (refs[0], refs[1:]) if has_lengths else (None, refs)
    slots_ref, vals_ref, *buf = refs                                       # buf: tiled form only
    whole_row = not buf                                                    # block_s >= size: one tile
    r0 = pl.program_id(0) * block_r
    row_ok = r0 + jnp.arange(block_r, dtype=jnp.int32) < rows             # [br]
    col = jnp.arange(block_s, dtype=jnp.int32)
    if len_ref is None:
        limit, n_tiles = size, pl.cdiv(size, block_s)
    else:                                                                  # columns read, [br]
        limit = jnp.clip(plgpu.load(len_ref.at[pl.ds(r0, block_r)], mask=row_ok, other=0), 0, size)
        n_tiles = 1 if whole_row else pl.cdiv(jnp.max(limit), block_s)
        limit = limit[:, None]
    ragged = len_ref is not None or rows % block_r != 0 or size % block_s != 0
    tile = lambda ref, j: ref.at[pl.ds(r0, block_r), pl.ds(j * block_s, block_s)]  # noqa: E731

    def load(j):
        """Scores `[br, bs]` of tile j (-inf past the ends) and their keys, non-candidates
        (-inf) mapped to INT_MIN so that no threshold above INT_MIN counts them."""
        if ragged:
            mask = row_ok[:, None] & (j * block_s + col[None, :] < limit)
            x = plgpu.load(tile(x_ref, j), mask=mask, other=-jnp.inf)
        else:
            x = tile(x_ref, j)[...]
        key = float_keys(x)
        return x, jnp.where(key > NEG_INF_KEY, key, INT_MIN)

    if whole_row:       # the row's keys, loaded once, stay in registers; values decoded from them
        row_keys = load(0)[1]
        load = lambda j: (keys_to_floats(row_keys), row_keys)              # noqa: E731

    # 1. Threshold: after pass p (shift = 32 - bits * p), `lo` has the top 32 - shift bits of
    # the k'-th largest key (INT_MIN when fewer than k' candidates), at = count(key >= lo),
    # above = count(key > lo + 2**shift - 1). Stops once every row has at <= k' (then all
    # of key >= lo is taken) or shift = 0 (then lo is the k'-th key). The whole-row form
    # starts from the exact at (the candidates) and carries it: no d = 0 count.
    def radix_pass(load_keys, n, base, carry):
        """One pass over tiles [0, n) of `load_keys`; `base` [br] = the candidates above
        the keys it holds."""
        p, lo, at, above = carry
        shift = 32 - bits * (p + 1)
        thresholds = [] if whole_row else [jnp.maximum(lo, INT_MIN + 1)]   # d = 0: count(key >= lo)
        thresholds += [lo + lax.shift_left(jnp.int32(d), shift) for d in range(1, 2**bits)]

        def count(j, accs):
            key = load_keys(j)
            return tuple(acc + (key >= t[:, None]).astype(jnp.int32) for acc, t in zip(accs, thresholds))

        if whole_row:                                                      # at = count(key >= lo)
            key = load_keys(0)
            flags = [key >= t[:, None] for t in thresholds]
            counts = [at] + (packed_row_sums(flags) if packed else
                             [f.astype(jnp.int32).sum(axis=1) for f in flags])
        else:
            zeros = tuple(jnp.zeros((block_r, block_s), jnp.int32) for _ in thresholds)
            counts = [base + acc.sum(axis=1) for acc in lax.fori_loop(0, n, count, zeros)]
        digit = sum((c >= k).astype(jnp.int32) for c in counts[1:])       # counts fall with d
        for d, c in enumerate(counts):
            at = jnp.where(digit == d, c, at)
            above = jnp.where(digit + 1 == d, c, above)
        return p + 1, lo + lax.shift_left(digit, shift), at, above

    def undecided(carry):
        p, _, at, _ = carry
        return (p < 32 // bits) & (jnp.max(at) > k)

    zero = jnp.zeros((block_r,), jnp.int32)
    at = (row_keys != INT_MIN).astype(jnp.int32).sum(axis=1) if whole_row else jnp.full((block_r,), k + 1, jnp.int32)
    start = (jnp.int32(0), jnp.full((block_r,), INT_MIN, jnp.int32), at, zero)
    full_pass = functools.partial(radix_pass, lambda j: load(j)[1], n_tiles, zero)
    state = lax.while_loop(undecided if whole_row else lambda c: undecided(c) & (c[0] < full_passes),
                           full_pass, start)

    def narrow(state):
        """The keys in [lo, lo + 2**shift) (the only ones the later passes can split) to
        the front of `buf` rows, then the remaining passes over them alone."""
        p, lo, _, above = state
        hi = lo + (lax.shift_left(jnp.int32(1), 32 - bits * p) - 1)

        def gather(j, n_kept):
            _, key = load(j)
            keep = (key >= lo[:, None]) & (key <= hi[:, None]) & (key != INT_MIN) & row_ok[:, None]
            keep_i = keep.astype(jnp.int32)
            pos = n_kept[:, None] + jnp.cumsum(keep_i, axis=1) - keep_i
            plgpu.store(buf[0].at[rows_idx, pos], key, mask=keep)
            return n_kept + keep_i.sum(axis=1)

        n_kept = lax.fori_loop(0, n_tiles, gather, zero)
        if barrier:                                                        # buf writes -> reads
            plgpu.debug_barrier()

        def load_kept(j):
            mask = row_ok[:, None] & (j * block_s + col[None, :] < n_kept[:, None])
            return plgpu.load(tile(buf[0], j), mask=mask, other=INT_MIN)

        kept = functools.partial(radix_pass, load_kept, pl.cdiv(jnp.max(n_kept), block_s), above)
        return lax.while_loop(undecided, kept, state)

    rows_idx = jnp.broadcast_to((r0 + jnp.arange(block_r, dtype=jnp.int32))[:, None], (block_r, block_s))
    _, lo, _, above = state if whole_row else lax.cond(undecided(state), narrow, lambda st: st, state)

    # 2. Compaction: key > lo always taken; key == lo taken in slot order while need > 0 (the
    # tie rule; after an early stop `need` covers every key >= lo).
    need = k - above                                                      # [br]

    def compact(j, carry):
        n_taken, n_ties = carry
        x, key = load(j)
        tie = (key == lo[:, None]) & (key != INT_MIN)
        tie_i = tie.astype(jnp.int32)
        rank = n_ties[:, None] + jnp.cumsum(tie_i, axis=1) - tie_i
        take = (key > lo[:, None]) | (tie & (rank < need[:, None]))
        take_i = take.astype(jnp.int32)
        pos = n_taken[:, None] + jnp.cumsum(take_i, axis=1) - take_i
        take = take & row_ok[:, None]
        plgpu.store(slots_ref.at[rows_idx, pos], j * block_s + col[None, :] + jnp.zeros_like(pos), mask=take)
        plgpu.store(vals_ref.at[rows_idx, pos], x, mask=take)
        return n_taken + take_i.sum(axis=1), n_ties + tie_i.sum(axis=1)

    n_taken, _ = lax.fori_loop(0, n_tiles, compact, (zero, zero))

    # Pads: columns [n_taken, k') of each row (disjoint from the columns written above).
    width = min(block_s, pl.next_power_of_2(k))

    def pad(i, carry):
        c0 = i * width
        cols = c0 + jnp.arange(width, dtype=jnp.int32)
        mask = row_ok[:, None] & (cols[None, :] >= n_taken[:, None]) & (cols < k)[None, :]
        sel = (pl.ds(r0, block_r), pl.ds(c0, width))
        plgpu.store(slots_ref.at[sel], jnp.full((block_r, width), -1, jnp.int32), mask=mask)
        plgpu.store(vals_ref.at[sel], jnp.full((block_r, width), -jnp.inf, jnp.float32), mask=mask)
        return carry

    lax.fori_loop(0, pl.cdiv(k, width), pad, 0)


@functools.partial(jax.jit, static_argnames=("k", "interpret", "config"))
def topk_select(scores, k: int, *, lengths=None, interpret=False, config: TopkSelectConfig | None = None):
    """The top-`min(k, S)` of each row, as a set in ascending slot order.

    Args:
      scores: `[R, S]` float32; -inf = not a candidate; no NaN.
      k: entries per row; the output has `k' = min(k, S)` columns.
      lengths: None, or int `[R]`: only the first `lengths[r]` columns of row r are read (the
        others are not candidates, whatever they hold; the passes stop at the block's longest).
      config: `TopkSelectConfig`; None: `default_config(R, S)` (the whole-row form for few
        rows). `block_s >= S` is the whole-row form (one tile held in registers).
    Returns:
      `(values [R, k'] float32, slots [R, k'] int32)`: the slots `lax.top_k(scores, k')`
      picks among the finite entries (largest first, lower slot first among equals),
      sorted ascending, then -1 slots / -inf values where the row has fewer than k'.
    """
    if getattr(scores, "ndim", None) != 2 or scores.dtype != jnp.float32:
        raise ValueError(f"scores must be float32 [R, S], got {getattr(scores, 'dtype', type(scores))}"
                         f"{list(getattr(scores, 'shape', ()))}")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    rows, size = scores.shape
    cfg = config or default_config(rows, size)
    if lengths is not None and (getattr(lengths, "shape", None) != (rows,)
                                or not jnp.issubdtype(lengths.dtype, jnp.integer)):
        raise ValueError(f"lengths must be int [{rows}], got {getattr(lengths, 'dtype', type(lengths))}"
                         f"{list(getattr(lengths, 'shape', ()))}")
    width = min(k, size)
    if rows == 0 or width == 0:
        return jnp.zeros((rows, width), jnp.float32), jnp.zeros((rows, width), jnp.int32)
    block_s = min(cfg.block_s, pl.next_power_of_2(size))
    if cfg.packed_counts and (block_s < size or size >= 2**COUNT_FIELD_BITS):
        raise ValueError(f"packed_counts is for the whole-row form with S < 2**{COUNT_FIELD_BITS} (one count per "
                         f"{COUNT_FIELD_BITS}-bit field), got S={size}, block_s={cfg.block_s}")
    kernel = functools.partial(_kernel, rows=rows, size=size, k=width, block_r=cfg.block_r,
                               block_s=block_s, bits=cfg.bits_per_pass, full_passes=cfg.full_passes,
                               packed=cfg.packed_counts,
                               barrier=not interpret, has_lengths=lengths is not None)
    out_shape = [jax.ShapeDtypeStruct((rows, width), jnp.int32), jax.ShapeDtypeStruct((rows, width), jnp.float32)]
    if block_s < size:                                                     # tiled: the narrowed keys
        out_shape.append(jax.ShapeDtypeStruct((rows, size), jnp.int32))
    slots, vals, *_ = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(rows, cfg.block_r),),
        out_shape=tuple(out_shape),
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name="topk_select",
    )(scores, *(() if lengths is None else (lengths.astype(jnp.int32),)))
    return vals, slots


TWO_STAGE_CHUNK = 2048


def two_stage_top_k(scores, k: int, chunk: int = TWO_STAGE_CHUNK):
    """`lax.top_k(scores [R, S], k)`'s values and slots, in two stages: the top
    `min(k, chunk)` of every `chunk` columns, then the top k of those candidates (exact: a
    row's k largest lie among its chunks' k largest; equal values keep the lower slot in both
    stages). More parallel work per row than one `lax.top_k`: H100, 8 rows of 8192 Quest
    pages, k 512: 66.8 us vs 108.1 (chunk 1024: 76.4; 2026-12-07)."""
    r, s = scores.shape
    scores = jnp.pad(scores, ((0, 0), (0, -s % chunk)), constant_values=-jnp.inf)
    v1, i1 = lax.top_k(scores.reshape(r, -1, chunk), min(k, chunk))            # [R, C, keep]
    i1 = i1 + chunk * jnp.arange(i1.shape[1], dtype=i1.dtype)[:, None]
    vals, j = lax.top_k(v1.reshape(r, -1), k)
    return vals, jnp.take_along_axis(i1.reshape(r, -1), j, axis=1)


def sorted_top_k(scores, k: int):
    """`topk_select`'s contract with `lax.top_k` (any backend): `(values, slots)`, the
    selected set in ascending slot order, -1 / -inf padded last. Rows `[R, S]` of at least
    two `TWO_STAGE_CHUNK`s with `k <= TWO_STAGE_CHUNK / 4` take `two_stage_top_k` (same
    arrays, faster on a GPU)."""
    width = min(k, scores.shape[-1])
    two_stage = scores.ndim == 2 and scores.shape[-1] >= 2 * TWO_STAGE_CHUNK and 4 * width <= TWO_STAGE_CHUNK
    vals, idx = (two_stage_top_k if two_stage else lax.top_k)(scores, width)
    found = vals > -jnp.inf
    order = jnp.where(found, idx, scores.shape[-1])
    _, idx, vals = lax.sort((order, jnp.where(found, idx, -1), jnp.where(found, vals, -jnp.inf)),
                            dimension=-1, num_keys=1)
    return vals, idx.astype(jnp.int32)
