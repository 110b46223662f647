"""Peer implementations timed beside ours in the same process (BENCHMARKING.md: every ratio
with its peer beside it). Each peer is optional: when its package does not import (not
installed; on the GPU machine carry the wheels, e.g. `pip install --no-deps wheels/*.whl`),
the function returns None and says why, and the benchmark goes on without the row.

* `tokamax_attention()`: tokamax's Mosaic GPU flash attention (JAX), causal.
* `fla_parallel_nsa_ms(...)`: fla-core's Triton NSA (`fla.ops.nsa.parallel_nsa`, PyTorch),
  forward and forward+backward times in ms over CUDA events (median of `iters`).
* `adasplash_ms(...)`: AdaSplash's alpha-entmax attention (Triton, PyTorch), the same.
"""

from __future__ import annotations

import statistics


def _skip(name: str, e: Exception):
    print(f"{name} peer skipped: {type(e).__name__}: {str(e)[:200]}", flush=True)
    return None


def _stub_xprof():
    """tokamax 0.0.17 imports `xprof.cli.tools.get_kernel_stats_tool` at import time, for its
    own benchmarking helpers only (not its kernels). Where xprof is not installed (the GPU
    machine), register an empty stand-in so the kernels import; nothing here calls it."""
    import importlib.util  # noqa: PLC0415
    import sys  # noqa: PLC0415
    import types  # noqa: PLC0415
    if importlib.util.find_spec("xprof") is not None:
        return
    for name in ("xprof", "xprof.cli", "xprof.cli.tools"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["xprof.cli.tools"].get_kernel_stats_tool = None


def tokamax_attention():
    """`f(q, k, v) -> out` (causal, `[B, T, H, D]`) of tokamax's Mosaic GPU kernel, or None."""
    try:
        _stub_xprof()
        import tokamax  # noqa: PLC0415 - optional peer
    except Exception as e:  # noqa: BLE001 - any import failure means "no peer row"
        return _skip("tokamax", e)
    return lambda q, k, v: tokamax.dot_product_attention(q, k, v, is_causal=True,
                                                         implementation="mosaic")


def fla_parallel_nsa_ms(t: int, hq: int, hkv: int, d: int, *, block_size: int,
                        block_counts: int, window: int, iters: int, backward: bool):
    """fla-core's `parallel_nsa` (compressed + selected + window branches, gated) at B=1,
    bf16: `{"fla_fwd_ms": ..., "fla_fwdbwd_ms": ...}`, or None when torch / fla / CUDA are
    missing. Random inputs; fla computes its own block selection from the compressed keys.
    fla runs its window branch through the `flash_attn` package: without it (the GPU
    machine) the row is fla's compressed + selected branches only (`fla_window` = 0 in the
    result), as the issue's anchor row was."""
    try:
        import torch  # noqa: PLC0415 - optional peer
        from fla.ops.nsa import parallel_nsa  # noqa: PLC0415
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device for torch")
    except Exception as e:  # noqa: BLE001
        return _skip("fla-core", e)
    try:
        from flash_attn import flash_attn_func  # noqa: PLC0415, F401
    except Exception:  # noqa: BLE001
        window = 0
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, t, hq, d, device=dev, dtype=dt, generator=g, requires_grad=True)
    k = torch.randn(1, t, hkv, d, device=dev, dtype=dt, generator=g, requires_grad=True)
    v = torch.randn(1, t, hkv, d, device=dev, dtype=dt, generator=g, requires_grad=True)
    gates = [torch.rand(1, t, hq, device=dev, dtype=dt, generator=g, requires_grad=True)
             for _ in range(3)]
    do = torch.randn(1, t, hq, d, device=dev, dtype=dt, generator=g)

    def fwd():
        return parallel_nsa(q, k, v, *gates, block_counts=block_counts, block_size=block_size,
                            window_size=window)

    res = torch_times_ms("fla", "fla-core", fwd, do, iters=iters, backward=backward)
    return None if res is None else {**res, "fla_window": window}


def adasplash_ms(q, k, v, *, alpha: float, iters: int, backward: bool):
    """AdaSplash (Triton, PyTorch; block-mask version, `niter=10`, causal) on the same
    `q [B, T, H, D]`, `k, v [B, T, Hkv, D]` (jax arrays; kv heads repeated for it):
    `{"adasplash_fwd_ms": ..., "adasplash_fwdbwd_ms": ...}`, or None when torch /
    adasplash / CUDA are missing."""
    try:
        import torch  # noqa: PLC0415 - optional peer
        from adasplash import adasplash  # noqa: PLC0415
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device for torch")
    except Exception as e:  # noqa: BLE001 - any import failure: no peer row
        return _skip("adasplash", e)
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    g = q.shape[2] // k.shape[2]
    conv = lambda x: torch.from_numpy(np.array(x.astype(jnp.float32))).cuda().to(torch.bfloat16)  # noqa: E731
    tq, tk, tv = (conv(x).transpose(1, 2).contiguous() for x in (q, jnp.repeat(k, g, 2), jnp.repeat(v, g, 2)))
    tq.requires_grad_(), tk.requires_grad_(), tv.requires_grad_()

    def fwd():
        return adasplash(tq, tk, tv, alpha=alpha, niter=10, is_causal=True, varlen=None)

    return torch_times_ms("adasplash", "adasplash", fwd, torch.randn_like(tq), iters=iters, backward=backward)


def torch_times_ms(prefix: str, name: str, fwd, out_grad, *, iters: int, backward: bool):
    """Median over `iters` CUDA-event timings (after two warm-up calls) of `fwd()` under
    `no_grad` and, with `backward`, of `fwd()` + its backward from `out_grad`:
    `{prefix_fwd_ms, prefix_fwdbwd_ms}`, or None (and why) when a call fails (e.g. out of
    memory at long lengths)."""
    import torch  # noqa: PLC0415 - optional peer

    def median_ms(fn):
        fn(), fn()
        times = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    try:
        with torch.no_grad():
            res = {f"{prefix}_fwd_ms": median_ms(fwd)}
        if backward:
            res[f"{prefix}_fwdbwd_ms"] = median_ms(lambda: torch.autograd.backward(fwd(), out_grad))
    except Exception as e:  # noqa: BLE001 - report, go on without the row
        return _skip(name, e)
    return res
