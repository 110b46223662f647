"""Host-offloaded KV cache with block retrieval: InfLLM (arXiv 2402.04617) over HiCache-style
tiers (device memory for what every step reads, host memory for the rest).

`OffloadKVCache` (one layer) holds

* on the device: the `num_sinks` first tokens (`sink_*`); a ring of the most recent
  tokens (`ring_*`, `R = window + (ceil(DECODE_MAX_QUERIES / block_size) + 1) * block_size`
  slots, position p >= num_sinks in slot `(p - num_sinks) % R`) with each token's
  accumulated representative score (`ring_score`); the representative key of every memory
  block (`rep_k [B, NB, H, D]`); the newest position of each row;
* in host memory (`memory_kind`, "pinned_host"; see `host_memory_kind`): every memory
  block's keys and values, `host_k [B, NB + 1, block, Hkv, D]` (the last block is a
  scratch target for writes that must not land, so every step writes the same number of
  bytes without a branch).

Block j covers positions `num_sinks + j * block .. + block - 1`. It becomes a *memory block*
(final) once `window` tokens follow its last one (InfLLM's rule: a block leaves the
remainder when at least `n_local` tokens come after it); by then every query of its local
window has scored its keys (`sparse_jax.ops.infllm.local_window_scores`), and its
representative key is taken (`representative_keys`). Each call attends:

    sinks  +  the `top_blocks` memory blocks of best `block_scores`  +  every token of a
    block not yet final (the window and InfLLM's "remainder"; they are all in the ring)

so no token is ever out of reach and none is counted twice; with `top_blocks >= NB`
this is dense attention exactly. Selection is per batch row (all heads read the same
blocks) and uses the blocks final *before* the call.

Calls:
* a call of more than `DECODE_MAX_QUERIES` tokens is the prompt (one prefill call on an
  empty cache): attended densely as without a cache (`Selection(prefill=True)`), its keys
  scored, its blocks written to host memory in one transfer;
* a decode call (at most `DECODE_MAX_QUERIES` tokens): writes its tokens into the ring,
  adds their queries' window attention to the ring scores, retrieves the top blocks from
  host memory (`B * top_blocks` block copies host -> device, `lax.dynamic_slice` of the
  host array), and writes the blocks that became final (`ceil(DECODE_MAX_QUERIES / block)`
  block copies device -> host per row; `lax.dynamic_update_slice`). `transfer_bytes()`
  gives both counts.

XLA and host memory: the host store is read (retrieval) and written (finalised blocks) in
one program; a `lax.optimization_barrier` orders the reads before the writes (a previous
attempt saw XLA copy the whole host store twice per step without it) and the step should
donate the cache (`jax.jit(..., donate_argnums=...)`), else the write copies the store, and
may pin its outputs where its inputs live (`out_shardings=jax.tree.map(lambda x: x.sharding,
cache)`, as `experiments/offload_decode.py` does). XLA's `HostMemoryTransferAsyncifier` makes
a dynamic-slice from host into device memory and a dynamic-update-slice of device data into
a host buffer async copies of the slice alone. Checked on CPU only.

Platforms: on GPU the store is "pinned_host" (page-locked host RAM, DMA by the copy
engines). On CPU jax 0.11.2 also offers "pinned_host", which is the same RAM as "device":
the code path is the same, nothing is saved. Where a device has no host memory kind the
store stays in device memory (`memory_kind="device"`; `nbytes("host")` then counts bytes
that are in fact on the device).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import checkify

from sparse_jax.cache.base import Cache, Queries, Selection, batch_index, check_new_kv, nbytes_of
from sparse_jax.ops.attention import DECODE_MAX_QUERIES
from sparse_jax.ops.infllm import block_scores, local_window_scores, representative_keys, top_blocks

MEMORY_KINDS = ("pinned_host", "device")


def host_memory_kind(device=None) -> str:
    """"pinned_host" where `device` (default: the first) has it, else "device" (no offload)."""
    device = jax.devices()[0] if device is None else device
    kinds = {m.kind for m in device.addressable_memories()}
    return "pinned_host" if "pinned_host" in kinds else "device"


def _to_host(x, kind):
    return x if kind == "device" else jax.device_put(x, jax.memory.Space.Host)


def _to_device(x, kind):
    return x if kind == "device" else jax.device_put(x, jax.memory.Space.Device)


def _concrete(x):
    return not isinstance(x, jax.core.Tracer)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class OffloadKVCache(Cache):
    """InfLLM's cache over device + host memory (see the module docstring).

    Device: `sink_k [B, S0, Hkv, D]`, `sink_v`, `sink_pos [B, S0]`; `ring_k [B, R, Hkv, D]`,
    `ring_v`, `ring_pos [B, R]`, `ring_score [B, R, H]` float32; `rep_k [B, NB, H, D]`;
    `newest [B]` int32 (-1: empty). Host (`memory_kind`): `host_k [B, NB + 1, block, Hkv, D]`,
    `host_v [B, NB + 1, block, Hkv, Dv]`. Static: `window`, `block_size`, `num_repr`,
    `top_blocks`, `memory_kind`, `score_chunk` (queries per pass when scoring a prompt).
    """

    sink_k: jax.Array
    sink_v: jax.Array
    sink_pos: jax.Array
    ring_k: jax.Array
    ring_v: jax.Array
    ring_pos: jax.Array
    ring_score: jax.Array
    rep_k: jax.Array
    newest: jax.Array
    host_k: jax.Array
    host_v: jax.Array
    window: int = dataclasses.field(metadata=dict(static=True))
    block_size: int = dataclasses.field(metadata=dict(static=True))
    num_repr: int = dataclasses.field(metadata=dict(static=True))
    top_blocks: int = dataclasses.field(metadata=dict(static=True))
    memory_kind: str = dataclasses.field(metadata=dict(static=True))
    score_chunk: int = dataclasses.field(default=512, metadata=dict(static=True))

    # ---------------------------------------------------------------- construction

    @staticmethod
    def ring_size(window: int, block_size: int) -> int:
        """Ring slots: every token of a block not yet final plus one call's tokens."""
        return window + (-(-DECODE_MAX_QUERIES // block_size) + 1) * block_size

    @classmethod
    def init(cls, batch: int, max_len: int, num_kv_heads: int, head_dim: int, *, num_heads: int,
             window: int = 4096, block_size: int = 128, num_sinks: int = 128, num_repr: int = 4,
             top_blocks: int = 16, v_head_dim: int | None = None, dtype=jnp.float32,
             memory_kind: str | None = None, score_chunk: int = 512) -> "OffloadKVCache":
        """Empty cache for positions `0 .. max_len - 1`. `memory_kind`: "pinned_host",
        "device" (no offload), None: `host_memory_kind()`. The host arrays are made on the
        host (numpy zeros put in host memory), never on the device first."""
        for name, x, lo in (("batch", batch, 1), ("max_len", max_len, 1), ("num_kv_heads", num_kv_heads, 1),
                            ("head_dim", head_dim, 1), ("window", window, 1), ("block_size", block_size, 1),
                            ("num_sinks", num_sinks, 0), ("num_repr", num_repr, 1), ("top_blocks", top_blocks, 1),
                            ("score_chunk", score_chunk, 1)):
            if not isinstance(x, int) or isinstance(x, bool) or x < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {x!r}")
        if not isinstance(num_heads, int) or num_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads must be a positive multiple of num_kv_heads={num_kv_heads}, got {num_heads!r}")
        if max_len <= num_sinks:
            raise ValueError(f"max_len ({max_len}) must exceed num_sinks ({num_sinks})")
        memory_kind = host_memory_kind() if memory_kind is None else memory_kind
        if memory_kind not in MEMORY_KINDS:
            raise ValueError(f"memory_kind must be one of {MEMORY_KINDS} or None, got {memory_kind!r}")
        dv = head_dim if v_head_dim is None else v_head_dim
        nb = -(-(max_len - num_sinks) // block_size)
        r = cls.ring_size(window, block_size)
        dtype = jnp.dtype(dtype)
        host = lambda shape: (jnp.zeros(shape, dtype) if memory_kind == "device" else jax.device_put(
            np.zeros(shape, dtype), jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind=memory_kind)))
        return cls(
            sink_k=jnp.zeros((batch, num_sinks, num_kv_heads, head_dim), dtype),
            sink_v=jnp.zeros((batch, num_sinks, num_kv_heads, dv), dtype),
            sink_pos=jnp.full((batch, num_sinks), -1, jnp.int32),
            ring_k=jnp.zeros((batch, r, num_kv_heads, head_dim), dtype),
            ring_v=jnp.zeros((batch, r, num_kv_heads, dv), dtype),
            ring_pos=jnp.full((batch, r), -1, jnp.int32),
            ring_score=jnp.zeros((batch, r, num_heads), jnp.float32),
            rep_k=jnp.zeros((batch, nb, num_heads, head_dim), dtype),
            newest=jnp.full((batch,), -1, jnp.int32),
            host_k=host((batch, nb + 1, block_size, num_kv_heads, head_dim)),
            host_v=host((batch, nb + 1, block_size, num_kv_heads, dv)),
            window=window, block_size=block_size, num_repr=num_repr, top_blocks=top_blocks,
            memory_kind=memory_kind, score_chunk=score_chunk)

    # ---------------------------------------------------------------- sizes

    @property
    def num_sinks(self) -> int:
        return self.sink_k.shape[1]

    @property
    def num_blocks(self) -> int:
        """NB: memory blocks the cache can hold."""
        return self.rep_k.shape[1]

    @property
    def max_len(self) -> int:
        return self.num_sinks + self.num_blocks * self.block_size

    @property
    def num_retrieved(self) -> int:
        """Blocks fetched per decode call and row: `min(top_blocks, NB)`."""
        return min(self.top_blocks, self.num_blocks)

    def nbytes(self, memory: str | None = None) -> int:
        """Bytes held: `memory=None` all, "device" the device-resident arrays, "host" the
        block store (in host memory unless `memory_kind == "device"`)."""
        dev = nbytes_of(self.sink_k, self.sink_v, self.sink_pos, self.ring_k, self.ring_v, self.ring_pos,
                        self.ring_score, self.rep_k, self.newest)
        host = nbytes_of(self.host_k, self.host_v)
        if memory not in (None, "device", "host"):
            raise ValueError(f"memory must be None, 'device' or 'host', got {memory!r}")
        return {None: dev + host, "device": dev, "host": host}[memory]

    def transfer_bytes(self) -> dict:
        """Bytes copied per decode call between host and device memory (0 both ways when
        `memory_kind == "device"`): `host_to_device` the `B * num_retrieved` blocks of keys
        and values retrieved, `device_to_host` the `B * ceil(DECODE_MAX_QUERIES / block)`
        blocks written back (finalised ones, or the scratch block)."""
        if self.memory_kind == "device":
            return dict(host_to_device=0, device_to_host=0)
        b = self.host_k.shape[0]
        per_block = nbytes_of(self.host_k[0, 0], self.host_v[0, 0])
        return dict(host_to_device=b * self.num_retrieved * per_block,
                    device_to_host=b * self._num_flush() * per_block)

    def _num_flush(self) -> int:
        return -(-DECODE_MAX_QUERIES // self.block_size)

    def num_final(self, newest=None):
        """int32 `[B]`: memory blocks (final) of each row when its newest position is `newest`."""
        newest = self.newest if newest is None else newest
        n = (newest + 1 - self.num_sinks - self.window) // self.block_size
        return jnp.clip(n, 0, self.num_blocks).astype(jnp.int32)

    # ---------------------------------------------------------------- update

    def update(self, k, v, positions, *, queries=None):
        """Write `k, v [B, T, Hkv, ...]` at `positions [B, T]` (-1: padding) and return what
        the queries attend over (see the module docstring):

        * prefill (T > DECODE_MAX_QUERIES, empty cache): `(k, v, positions,
          Selection(prefill=True), new cache)`;
        * decode: `(keys, values, kv_positions, new cache)` with keys `[B, S0 + top * block
          + R, Hkv, D]`: sinks, retrieved blocks, ring (hidden slots at position -1).

        `queries` (`Queries`, the rotated queries) is required: it scores the keys and the
        blocks. A position >= max_len raises ValueError when concrete; under `jit` it is
        dropped and a `checkify.debug_check` reports it.
        """
        check_new_kv("OffloadKVCache.update", self.ring_k, k, v, positions)
        if not isinstance(queries, Queries):
            raise ValueError(f"OffloadKVCache.update needs queries=Queries(...) (the call's rotated queries), "
                             f"got {type(queries).__name__}")
        h = self.rep_k.shape[2]
        if queries.q.shape[:3] != (k.shape[0], k.shape[1], h) or queries.q.shape[3] != k.shape[3]:
            raise ValueError(f"queries.q must be [B, T, H={h}, D={k.shape[3]}] = "
                             f"{[k.shape[0], k.shape[1], h, k.shape[3]]}, got {list(queries.q.shape)}")
        if v.shape[3] != self.ring_v.shape[3]:
            raise ValueError(f"OffloadKVCache.update: values must have head dim {self.ring_v.shape[3]}, got {v.shape}")
        if _concrete(positions) and positions.size and int(np.max(positions)) >= self.max_len:
            raise ValueError(f"positions: position {int(np.max(positions))} is beyond the cache "
                             f"(max_len={self.max_len})")
        checkify.debug_check((positions < self.max_len).all(),
                             f"positions: a position is beyond the cache (max_len={self.max_len})")
        if k.shape[1] > DECODE_MAX_QUERIES:
            if _concrete(self.newest) and bool((self.newest >= 0).any()):
                raise ValueError("OffloadKVCache: a call of more than DECODE_MAX_QUERIES tokens is a prompt and "
                                 "needs an empty cache (one prefill call, then decode calls)")
            if _concrete(positions) and int(np.max(positions)) >= k.shape[1]:
                raise ValueError(f"positions: a prompt of {k.shape[1]} tokens on an empty cache holds positions "
                                 f"0 .. {k.shape[1] - 1}, got {int(np.max(positions))}")
            checkify.debug_check((self.newest < 0).all(), "OffloadKVCache: a prompt call needs an empty cache")
            return _prefill(self, k, v, positions, queries.q)
        return _decode(self, k, v, positions, queries.q)

    def _write_local(self, k, v, positions, scores=None):
        """Sinks and ring after writing `k, v, positions [B, T]` (ring scores reset, or set to
        `scores [B, T, H]`)."""
        s0, r = self.num_sinks, self.ring_pos.shape[1]
        rows = batch_index(positions)
        newest = jnp.maximum(self.newest, positions.max(axis=1))
        sink_slot = jnp.where((positions >= 0) & (positions < s0), positions, s0)
        keep = (positions >= s0) & (positions > newest[:, None] - r)
        ring_slot = jnp.where(keep, (positions - s0) % r, r)
        sc = jnp.zeros(positions.shape + self.ring_score.shape[2:], jnp.float32) if scores is None else scores
        return dataclasses.replace(
            self,
            sink_k=self.sink_k.at[rows, sink_slot].set(k, mode="drop"),
            sink_v=self.sink_v.at[rows, sink_slot].set(v, mode="drop"),
            sink_pos=self.sink_pos.at[rows, sink_slot].set(positions, mode="drop"),
            ring_k=self.ring_k.at[rows, ring_slot].set(k, mode="drop"),
            ring_v=self.ring_v.at[rows, ring_slot].set(v, mode="drop"),
            ring_pos=self.ring_pos.at[rows, ring_slot].set(positions, mode="drop"),
            ring_score=self.ring_score.at[rows, ring_slot].set(sc, mode="drop"),
            newest=newest)

    def _prefill(self, k, v, positions, q):
        positions = jnp.where(positions < self.max_len, positions, -1)
        b, t, hkv, d = k.shape
        s0, bs, h = self.num_sinks, self.block_size, self.rep_k.shape[2]
        # the prompt by position (its positions are 0 .. n - 1 of each row; slot = position)
        rows = batch_index(positions)
        slot = jnp.where((positions >= 0) & (positions < t), positions, t)          # t: dropped
        pos_full = jnp.full((b, t), -1, jnp.int32).at[rows, slot].set(positions, mode="drop")
        k_full = jnp.zeros_like(k).at[rows, slot].set(k, mode="drop")
        v_full = jnp.zeros_like(v).at[rows, slot].set(v, mode="drop")
        q_full = jnp.zeros_like(q).at[rows, slot].set(q, mode="drop")
        scores = local_window_scores(q_full, k_full, pos_full, pos_full, window=self.window, num_sinks=s0,
                                     chunk=self.score_chunk)                                 # [B, t, H]
        new = self._write_local(k_full, v_full, pos_full, scores)
        # blocks of the prompt -> host memory (one transfer), their representative keys
        nbp = min(-(-max(t - s0, 0) // bs), self.num_blocks)
        if nbp:
            span = nbp * bs
            grab = lambda x, fill: jnp.pad(x[:, s0:s0 + span], ((0, 0), (0, max(0, span - (t - s0))))
                                           + ((0, 0),) * (x.ndim - 2), constant_values=fill)
            kb = grab(k_full, 0).reshape(b, nbp, bs, hkv, d)
            vb = grab(v_full, 0).reshape(b, nbp, bs, hkv, v.shape[3])
            pb = grab(pos_full, -1).reshape(b, nbp, bs)
            sb = grab(scores, 0).reshape(b, nbp, bs, h)
            rep = representative_keys(kb, sb, pb >= 0, num_repr=self.num_repr, num_heads=h)
            host_k = lax.dynamic_update_slice(self.host_k, _to_host(kb, self.memory_kind), (0,) * 5)
            host_v = lax.dynamic_update_slice(self.host_v, _to_host(vb, self.memory_kind), (0,) * 5)
            new = dataclasses.replace(new, rep_k=new.rep_k.at[:, :nbp].set(rep), host_k=host_k, host_v=host_v)
        return k, v, positions, Selection(prefill=True), new

    def _decode(self, k, v, positions, q):
        positions = jnp.where(positions < self.max_len, positions, -1)
        b = k.shape[0]
        s0, bs, h = self.num_sinks, self.block_size, self.rep_k.shape[2]
        r, nb, top = self.ring_pos.shape[1], self.num_blocks, self.num_retrieved
        final_old = self.num_final()
        new = self._write_local(k, v, positions)
        # the queries' window attention joins the ring's scores
        add = local_window_scores(q, new.ring_k, positions, new.ring_pos, window=self.window, num_sinks=s0)
        ring_score = new.ring_score + add
        # retrieval: the top blocks among those final before this call
        valid = jnp.arange(nb)[None] < final_old[:, None]                                    # [B, NB]
        idx = top_blocks(block_scores(q, self.rep_k, valid, positions), valid, top)          # [B, top]
        src = jnp.maximum(idx, 0)
        got_k, got_v = [], []
        for row in range(b):                 # one host -> device block copy each (slice, then move)
            for i in range(top):
                at = (row, src[row, i], 0, 0, 0)
                got_k.append(_to_device(lax.dynamic_slice(self.host_k, at, (1, 1) + self.host_k.shape[2:]),
                                        self.memory_kind))
                got_v.append(_to_device(lax.dynamic_slice(self.host_v, at, (1, 1) + self.host_v.shape[2:]),
                                        self.memory_kind))
        ret_k = jnp.concatenate(got_k, 1).reshape((b, top * bs) + self.host_k.shape[3:])
        ret_v = jnp.concatenate(got_v, 1).reshape((b, top * bs) + self.host_v.shape[3:])
        ret_pos = jnp.where(idx[..., None] >= 0, s0 + idx[..., None] * bs + jnp.arange(bs), -1).reshape(b, top * bs)
        # reads before writes: the store is updated in place after the blocks are fetched
        ret_k, ret_v, host_k, host_v = lax.optimization_barrier((ret_k, ret_v, self.host_k, self.host_v))
        # blocks that became final: representative keys, and their KV to host memory
        final_new = self.num_final(new.newest)
        rep_k = self.rep_k
        for f in range(self._num_flush()):
            j = final_new - 1 - f                                                            # [B]
            fresh = (j >= final_old) & (j >= 0)
            pos = s0 + jnp.maximum(j, 0)[:, None] * bs + jnp.arange(bs)                       # [B, bs]
            slots = (pos - s0) % r
            rows = jnp.arange(b)[:, None]
            kb, vb = new.ring_k[rows, slots], new.ring_v[rows, slots]                        # [B, bs, Hkv, D]
            ok = new.ring_pos[rows, slots] == pos
            rep = representative_keys(kb[:, None], ring_score[rows, slots][:, None], ok[:, None],
                                      num_repr=self.num_repr, num_heads=h)[:, 0]
            target = jnp.where(fresh, j, nb)                                                 # nb: scratch
            rep_k = rep_k.at[jnp.arange(b), target].set(rep, mode="drop")
            for row in range(b):             # one device -> host block copy each (move, then write)
                at = (row, target[row], 0, 0, 0)
                host_k = lax.dynamic_update_slice(host_k, _to_host(kb[row][None, None], self.memory_kind), at)
                host_v = lax.dynamic_update_slice(host_v, _to_host(vb[row][None, None], self.memory_kind), at)
        new = dataclasses.replace(new, ring_score=ring_score, rep_k=rep_k, host_k=host_k, host_v=host_v)
        # what the queries read: sinks, retrieved blocks, ring tokens of blocks not final before the call
        ring_vis = jnp.where(new.ring_pos >= s0 + final_old[:, None] * bs, new.ring_pos, -1)
        keys = jnp.concatenate([new.sink_k, ret_k, new.ring_k], axis=1)
        values = jnp.concatenate([new.sink_v, ret_v, new.ring_v], axis=1)
        kv_pos = jnp.concatenate([new.sink_pos, ret_pos, ring_vis], axis=1)
        return keys, values, kv_pos, new


# One program per call shape, also when `update` runs eagerly (inlined under an outer jit).
_prefill = jax.jit(OffloadKVCache._prefill)
_decode = jax.jit(OffloadKVCache._decode)
