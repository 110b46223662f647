"""A relaxed float atomic add for Pallas Triton kernels that only accumulate.

`jax.experimental.pallas.triton.atomic_add` lowers every element to an acquire-release,
GPU-scope `tt.atomic_rmw` (jax 0.11.2, `lowering._atomic_rmw`'s default): each add is also a
memory fence, which a counter that orders other loads needs (`nsa_decode`'s arrival counter)
but a scatter-add of gradients does not: its sums are read only after the kernel ends.
`relaxed_add` is the same operation with `MemSemantic.RELAXED` (Triton's
`tl.atomic_add(..., sem="relaxed")`), which the GPU may issue back to back.

It is its own primitive that reuses `atomic_rmw_p`'s abstract evaluation and state discharge
(so interpret mode runs it as a plain add) and lowers like its ADD case with the other memory
semantic. This reaches into `jax._src.pallas.triton` (pinned jax 0.11.2): if those names move,
the import below fails loudly rather than the kernels silently changing.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax._src import core as jax_core
from jax._src import state
from jax._src import tree_util
from jax._src.lib.triton import dialect as tt_dialect
from jax._src.pallas.triton import lowering
from jax._src.pallas.triton import primitives as triton_primitives
from jax._src.state import discharge as state_discharge
from jax._src.state import indexing
from jax._src.state import primitives as state_primitives

relaxed_add_p = jax_core.Primitive("relaxed_atomic_add")
relaxed_add_p.def_effectful_abstract_eval(triton_primitives._atomic_abstract_eval)  # noqa: SLF001
state_discharge.register_discharge_rule(relaxed_add_p)(triton_primitives._atomic_rmw_discharge_rule)  # noqa: SLF001


def relaxed_add(ref, idx, val, *, mask=None):
    """`ref[idx] += val`, atomically per element with relaxed memory order (float or int refs,
    as `plgpu.atomic_add`; `mask` False elements are skipped; interpret mode needs
    `mask=None`). Nothing is returned: use `plgpu.atomic_add` where the old value or an
    ordering with other memory operations matters."""
    x_ref, transforms = state_primitives.get_ref_and_transforms(ref, idx, "relaxed_atomic_add")
    args_flat, args_tree = tree_util.tree_flatten((x_ref, transforms, val, mask))
    relaxed_add_p.bind(*args_flat, args_tree=args_tree, atomic_type=triton_primitives.AtomicOpType.ADD)


@lowering.register_lowering(relaxed_add_p)
def _relaxed_add_lowering(ctx: lowering.LoweringRuleContext, *args_flat, args_tree, atomic_type):
    del atomic_type                                    # always ADD
    block_info, *_ = ctx.block_infos
    ptr, indexers, val, mask = args_tree.unflatten(args_flat)
    *_, value_aval, mask_aval = args_tree.unflatten(ctx.avals_in)
    indexers = list(indexers)
    if not indexers or not isinstance(indexers[-1], indexing.NDIndexer):
        ref_aval = state.transform_type(indexers, ctx.avals_in[0])
        indexers.append(indexing.NDIndexer.make_trivial_indexer(ref_aval.shape))
    if len(indexers) != 1:
        raise NotImplementedError("relaxed_add supports a single indexer")
    ptr = lowering._compute_pointers_from_indices(ptr, block_info, indexers[0])  # noqa: SLF001
    val = lowering._ensure_ir_value(val, value_aval)  # noqa: SLF001
    if mask is not None:
        mask = lowering._ensure_ir_value(mask, mask_aval)  # noqa: SLF001
    op = tt_dialect.RMWOp.ADD if jnp.issubdtype(value_aval.dtype, jnp.integer) else tt_dialect.RMWOp.FADD
    return lowering._atomic_rmw(op, ptr, val, mask=mask, semantic=tt_dialect.MemSemantic.RELAXED)  # noqa: SLF001
