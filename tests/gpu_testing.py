"""GPU detection shared by the kernel tests (`pytest -m gpu` on a GPU machine), and the
condition of the CPU tests that run Mosaic GPU kernels in JAX's GPU interpret mode."""

import os

import jax
import pytest

from conftest import GPU_INTERPRET_THREADS


def has_gpu() -> bool:
    """Whether JAX sees a GPU (the CPU-only CI and the conftest's `JAX_PLATFORMS=cpu`: no)."""
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


def hopper_device():
    """The first sm_90 (Hopper) GPU JAX sees, or None (the compiled Mosaic GPU tests' condition)."""
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        return None
    return next((d for d in gpus if getattr(d, "compute_capability", "") == "9.0"), None)


# Mosaic GPU's interpret mode (`plgpu.InterpretGPUParams`) runs each warpgroup of a CTA as its
# own CPU program blocked in barrier callbacks: with fewer XLA CPU pool threads than that
# (conftest sets PJRT_NPROC) it hangs.
needs_gpu_interpret_pool = pytest.mark.skipif(
    int(os.environ.get("PJRT_NPROC") or os.cpu_count() or 1) < GPU_INTERPRET_THREADS,
    reason=f"GPU interpret mode needs PJRT_NPROC >= {GPU_INTERPRET_THREADS}")


def lower_for_cuda(f, *args, device_kind="NVIDIA H100"):
    """`jax.jit(f)` lowered for CUDA from the CPU, on an abstract GPU (the Triton lowering
    asks the device's kind); compiles nothing."""
    from jax._src import mesh as mesh_lib  # noqa: PLC0415

    dev = mesh_lib.AbstractDevice(device_kind=device_kind, num_cores=132, platform="gpu")
    with jax.sharding.use_abstract_mesh(mesh_lib.AbstractMesh((1,), ("x",), abstract_device=dev)):
        return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))


def _ops(op):
    """`op` and every op nested in its regions, in program order."""
    yield op
    for region in op.regions:
        for block in region.blocks:
            for child in block.operations:
                yield from _ops(child.operation)


def triton_kernels(lowered, visit) -> list:
    """`visit(config, module)` over the Triton kernels of `lowered` (`lower_for_cuda`), in
    program order: `config` the kernel's `__gpu$xla.gpu.triton` custom call's
    `mhlo.backend_config` (its `name`, `num_warps`, ...), `module` the kernel (the MLIR
    bytecode of the config's `ir`) parsed in a context with the dialects Pallas' Triton
    lowering registers, valid only during the call; the results."""
    from jax._src.interpreters import mlir  # noqa: PLC0415
    from jax._src.lib import triton  # noqa: PLC0415
    from jax._src.lib.mlir import ir  # noqa: PLC0415

    configs = [op.attributes["mhlo.backend_config"] for op in _ops(lowered.compiler_ir("stablehlo").operation)
               if op.name == "stablehlo.custom_call"
               and ir.StringAttr(op.attributes["call_target_name"]).value == "__gpu$xla.gpu.triton"]
    with mlir.JaxIrContext() as ctx:
        ctx.append_dialect_registry(mlir.upstream_dialects)
        triton.dialect.register_dialect(ctx)
        ctx.load_all_available_dialects()
        return [visit(cfg, ir.Module.parse(ir.StringAttr(cfg["ir"]).value_bytes)) for cfg in configs]


def _triton_ops(lowered, visit) -> list:
    """`visit(op)` over every op of the Triton kernels of `lowered` (`lower_for_cuda`, see
    `triton_kernels`), in program order; its non-None results."""
    found = triton_kernels(lowered, lambda _, module: [r for r in map(visit, _ops(module.operation))
                                                       if r is not None])
    return [r for kernel in found for r in kernel]


def triton_atomic_shapes(lowered, with_semantics: bool = False) -> list[tuple]:
    """The tile shapes of the atomic read-modify-writes (`tt.atomic_rmw`) in the Triton
    kernels of `lowered` (`lower_for_cuda`), in program order; `with_semantics`: `(shape,
    memory semantic)` pairs, the semantic's `tt.MemSemantic` name ("RELAXED",
    "ACQUIRE_RELEASE", ...)."""
    from jax._src.lib import triton  # noqa: PLC0415
    from jax._src.lib.mlir import ir  # noqa: PLC0415

    def visit(op):
        if op.name != "tt.atomic_rmw":
            return None
        shape = tuple(ir.RankedTensorType(op.results[0].type).shape)
        sem = ir.IntegerAttr(op.attributes["sem"]).value
        sem = next(n for n in ("RELAXED", "ACQUIRE", "RELEASE", "ACQUIRE_RELEASE")
                   if int(getattr(triton.dialect.MemSemantic, n)) == sem)
        return (shape, sem) if with_semantics else shape

    return _triton_ops(lowered, visit)


def triton_reductions(lowered) -> list[tuple]:
    """`(operand shape, element type)` of each reduction (`tt.reduce`) in the Triton kernels
    of `lowered` (`lower_for_cuda`), in program order, e.g. `((1, 8192), "i64")`."""
    from jax._src.lib.mlir import ir  # noqa: PLC0415

    def visit(op):
        if op.name != "tt.reduce":
            return None
        ty = ir.RankedTensorType(op.operands[0].type)
        return tuple(ty.shape), str(ty.element_type)

    return _triton_ops(lowered, visit)
