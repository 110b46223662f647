"""Peer implementations timed beside ours in the same process (BENCHMARKING.md: every ratio
with its peer beside it). Each peer is optional: when its package does not import (not
installed; on the GPU machine carry the wheels, e.g. `pip install --no-deps wheels/*.whl`),
the function returns None and says why, and the benchmark goes on without the row.

* `tokamax_attention()`: tokamax's Mosaic GPU flash attention (JAX), causal.
* `fla_parallel_nsa_ms(...)`: fla-core's Triton NSA (`fla.ops.nsa.parallel_nsa`, PyTorch),
  forward and forward+backward times in ms over CUDA events (median of `iters`).
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

    def fwdbwd():
        torch.autograd.backward(fwd(), do)

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
            res = {"fla_fwd_ms": median_ms(fwd), "fla_window": window}
        if backward:
            res["fla_fwdbwd_ms"] = median_ms(fwdbwd)
    except Exception as e:  # noqa: BLE001 - e.g. out of memory at 128K: report, go on
        return _skip("fla-core", e)
    return res
