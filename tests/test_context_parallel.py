"""Context parallelism (`sparse_jax.context_parallel`) on 8 fake CPU devices.

Each variant's shard_map version (sequence over `context` = 4, and context = 2 with data=2
x tensor=2 on the other axes) equals the single-device op, forward and gradients, with
chunks (T / context = 6, 12) that are not multiples of the kernels' blocks, a ragged row
and windows longer than one chunk (window 9 over chunks of 6: the halo spans two shards);
the SWA version's compiled HLO moves K/V by collective-permutes only (no float
all-gather); every model layer kind (F, W, N, H, Y) routes to the new path under a
context mesh, and the HySparse model's sharded train step with data=2 x context=2 equals
the unsharded step (the "WF" and "NF" ones with context=2: tests/test_sharding.py).

Tolerances (float32): outputs atol 2e-5 / rtol 1e-5, gradients atol 1e-4 / rtol 1e-4
(sums over shards in a different order), selections exactly equal; train step: loss rtol
1e-5, parameters after one clip + AdamW step rtol 1e-5 / atol 1e-6.
"""

import ast
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as Spec

import sparse_jax
from sparse_jax import context_parallel as cp
from sparse_jax.models.lm import LMConfig, SparseLM
from sparse_jax.ops import attention as attn_ops
from sparse_jax.ops import hysparse as hs_ops
from sparse_jax.ops import moba as moba_ops
from sparse_jax.ops import nsa as nsa_ops
from sparse_jax.ops import selection
from sparse_jax.sharding import LOGICAL_AXIS_RULES, make_mesh, use_axis_rules
from sparse_jax.train import make_sharded_train_step, train_step

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (fake) devices, see conftest")

B, T, H, HKV, D = 2, 24, 4, 2, 8
# context=4 (chunks of 6: a window of 9 needs two shards' halos) and context=2 under data=2 x
# tensor=2 (batch and heads split too); plain context=2 is the model test's mesh
MESHES = {"c4": dict(context=4), "d2t2c2": dict(data=2, tensor=2, context=2)}
FWD, GRAD = dict(atol=2e-5, rtol=1e-5), dict(atol=1e-4, rtol=1e-4)


def _rand(seed, *shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _positions():
    # row 1 ragged: its last 5 slots are padding
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    return pos.at[1, -5:].set(-1)


def _check(fn, args, mesh_name):
    """fn(*args) -> pytree; compares forward and the gradient of a random projection of
    its float leaves, single device vs under the mesh."""
    def scalar(*a):
        leaves = [x for x in jax.tree.leaves(fn(*a)) if jnp.issubdtype(x.dtype, jnp.floating)]
        return sum((x * _rand(7, *x.shape)).sum() for x in leaves)

    ref_out = jax.jit(fn)(*args)
    ref_grad = jax.jit(jax.grad(scalar, argnums=tuple(range(len(args)))))(*args)
    with jax.set_mesh(make_mesh(**MESHES[mesh_name])):
        assert cp.active()
        out = jax.jit(fn)(*args)
        grad = jax.jit(jax.grad(scalar, argnums=tuple(range(len(args)))))(*args)
    for o, r in zip(jax.tree.leaves(out), jax.tree.leaves(ref_out), strict=True):
        if jnp.issubdtype(r.dtype, jnp.integer):
            np.testing.assert_array_equal(o, r)
        else:
            np.testing.assert_allclose(o, r, **FWD)
    for g, r in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad), strict=True):
        np.testing.assert_allclose(g, r, **GRAD)


@pytest.mark.parametrize("mesh_name", MESHES)
def test_local_attention(mesh_name):
    """Full causal (all-gather) and sliding windows (halo; window 9 > chunk 6 with c4)."""
    pos = _positions()
    sinks = _rand(3, H)

    def fn(q, k, v, sinks):
        return [attn_ops.local_attention(q, k, v, pos, pos, window=w, sink_logits=sinks) for w in (None, 5, 9)]

    _check(fn, (_rand(0, B, T, H, D), _rand(1, B, T, HKV, D), _rand(2, B, T, HKV, D), sinks), mesh_name)


def _swa_hlo(window):
    with jax.set_mesh(make_mesh(context=4)):
        f = jax.jit(lambda q, k, v, pos: attn_ops.local_attention(q, k, v, pos, pos, window=window))
        k = _rand(1, B, T, HKV, D)
        return f.lower(_rand(0, B, T, H, D), k, k, _positions()).compile().as_text()


def _float_all_gathers(hlo):
    return re.findall(r"= f32\[[^\]]*\]\S* all-gather\(", hlo)


def test_swa_exchanges_only_halos():
    """The compiled SWA program moves K/V by collective-permutes only (window 9 > chunk 6:
    two hops); the full variant's all-gathers of K/V are found by the same check."""
    hlo = _swa_hlo(9)
    assert hlo.count("collective-permute-start") + hlo.count("collective-permute(") >= 4
    assert not _float_all_gathers(hlo), _float_all_gathers(hlo)
    assert len(_float_all_gathers(_swa_hlo(None))) >= 2


def test_falls_back_to_the_plain_op():
    """T=26 over context=4, or StreamingLLM sinks: no shard_map, the plain op, same result."""
    t = 26
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (B, t))
    q, k = _rand(0, B, t, H, D), _rand(1, B, t, HKV, D)
    for tt, sinks in ((t, 0), (T, 2)):
        f = lambda q, k: attn_ops.local_attention(q, k, k, pos[:, :tt], pos[:, :tt], window=5, num_sinks=sinks)
        args = (q[:, :tt], k[:, :tt])
        with jax.set_mesh(make_mesh(context=4)):
            assert "shard_map" not in str(jax.make_jaxpr(f)(*args))
            out = jax.jit(f)(*args)
        np.testing.assert_allclose(out, f(*args), **FWD)


NSA_CFG = nsa_ops.NSAConfig(cmp_block=4, cmp_stride=2, sel_block=4, num_selected=3, window=9)


@pytest.mark.parametrize("mesh_name", MESHES)
def test_nsa_branches(mesh_name):
    n_cmp = nsa_ops.num_cmp_blocks(T, NSA_CFG)
    pos = _positions()
    cmp_pos = jnp.broadcast_to(nsa_ops.cmp_block_end(jnp.arange(n_cmp), NSA_CFG), (B, n_cmp))
    cmp_pos = cmp_pos.at[1].set(jnp.where(cmp_pos[1] < T - 5, cmp_pos[1], -1))

    def fn(q, kc, vc, ks, vs, kw, vw):
        return nsa_ops.nsa_branches(q, pos, k_cmp=kc, v_cmp=vc, cmp_positions=cmp_pos, k_slc=ks, v_slc=vs,
                                    slc_positions=pos, k_win=kw, v_win=vw, win_positions=pos, cfg=NSA_CFG)

    args = (_rand(0, B, T, H, D), _rand(1, B, n_cmp, HKV, D), _rand(2, B, n_cmp, HKV, D),
            *(_rand(i, B, T, HKV, D) for i in range(3, 7)))
    _check(fn, args, mesh_name)


HS_BLOCK = 4


@pytest.mark.parametrize("mesh_name", MESHES)
def test_hysparse_full_and_sparse(mesh_name):
    pos = _positions()

    def fn(q, k, v, q2, sinks):
        out, idx = hs_ops.hysparse_full_attention(q, k, v, pos, pos, block_size=HS_BLOCK, top_k_blocks=3,
                                                  sink_logits=sinks)
        o2 = selection.selected_block_attention(q2, k, v, pos, pos, idx, block_size=HS_BLOCK, sink_logits=sinks)
        return out, idx, o2

    args = (_rand(0, B, T, H, D), _rand(1, B, T, HKV, D), _rand(2, B, T, HKV, D), _rand(3, B, T, H, D),
            _rand(4, H))
    _check(fn, args, mesh_name)
    assert not cp.active()                  # off again outside the mesh context


def test_moba_takes_the_selected_block_path():
    """MoBA attends through `selected_block_attention`, so it is split too (one entry in the
    op, not per layer): sharded == single device (c4: chunks of 6 over blocks of 4)."""
    pos = _positions()

    def fn(q, k, v, sinks):
        return moba_ops.moba_attention(q, k, v, pos, pos, block_size=HS_BLOCK, top_k=2, sink_logits=sinks)

    args = (_rand(0, B, T, H, D), _rand(1, B, T, HKV, D), _rand(2, B, T, HKV, D), _rand(4, H))
    with jax.set_mesh(make_mesh(**MESHES["c4"])):
        assert len(_shard_map_specs(fn, *args)) == 1
    _check(fn, args, "c4")


# ----------------------------------------------------------------------------- whole model

VOCAB, DM, BM, TM = 64, 32, 4, 32


def _model(spec):
    config = LMConfig(vocab_size=VOCAB, layer_spec=spec, d_model=DM, num_heads=4, num_kv_heads=2, window=12)
    model = SparseLM(config, rngs=nnx.Rngs(0))
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, eps=1e-3, weight_decay=0.01))
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


def _spy_calls(monkeypatch):
    """Records which ops enter context parallelism (`cp.attention`, the one entry) with the
    axis active."""
    calls, real = [], cp.attention

    def wrapped(op, *a, **k):
        if cp.active():
            calls.append(op.__name__)
        return real(op, *a, **k)

    monkeypatch.setattr(cp, "attention", wrapped)
    return calls


def test_model_layers_take_the_context_parallel_path(monkeypatch):
    """F, W, N, H, Y layers all route to shard_map under a context mesh (trace only; the
    train steps of "WF" and "NF" with context=2 are checked in tests/test_sharding.py)."""
    calls = _spy_calls(monkeypatch)
    model, _ = _model("FWNHY")
    tokens = jnp.zeros((BM, TM), jnp.int32)
    jax.make_jaxpr(lambda t: model(t)[0])(tokens)
    assert not calls                                   # no mesh: the plain ops
    with jax.set_mesh(make_mesh(data=2, context=2)):
        jaxpr = str(jax.make_jaxpr(lambda t: model(t)[0])(tokens))
    assert calls == ["local_attention", "local_attention", "nsa_branches", "hysparse_full_attention",
                     "selected_block_attention", "local_attention"], calls
    assert jaxpr.count("shard_map") >= 6


def test_hysparse_model_train_step_context2(monkeypatch):
    """HySparse model: the sharded step on data=2 x context=2 equals the unsharded one."""
    calls = _spy_calls(monkeypatch)
    spec = "HY"
    tok = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (BM, TM + 1)), jnp.int32)
    mask = jnp.asarray(np.random.default_rng(1).random((BM, TM)) < 0.9, jnp.float32)
    x, y = tok[:, :-1], tok[:, 1:]

    model, opt = _model(spec)
    ref_loss = float(train_step(model, opt, x, y, mask)[0])
    ref_params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert not calls                                   # no mesh: the plain ops

    mesh = make_mesh(data=2, context=2)
    model, opt = _model(spec)
    loss = float(make_sharded_train_step(model, opt, mesh)(model, opt, x, y, mask)[0])
    assert set(calls) == {"hysparse_full_attention", "selected_block_attention", "local_attention"}
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for p, r in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), ref_params, strict=True):
        np.testing.assert_allclose(np.asarray(p), np.asarray(r), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- one entry, rule table


def _shard_map_specs(fn, *args):
    """in_specs of every shard_map in `fn`'s jaxpr (top level)."""
    return [e.params["in_specs"] for e in jax.make_jaxpr(fn)(*args).jaxpr.eqns if e.primitive.name == "shard_map"]


def test_axes_come_from_the_rule_table():
    """The sequence, heads and batch mesh axes are the rule table's (`sharding.axis_rules`):
    with `seq` -> "sp", `heads` -> "tp" and `batch` replicated on a mesh of those names,
    local attention splits over "sp" (heads over "tp") and equals the single-device op;
    under the default rules the same mesh has no sequence axis (plain op, no shard_map)."""
    mesh = jax.make_mesh((4, 2), ("sp", "tp"), axis_types=(AxisType.Auto,) * 2)
    rules = tuple((dict(LOGICAL_AXIS_RULES) | {"seq": "sp", "heads": "tp", "batch": None}).items())
    pos = _positions()
    q, k, v = _rand(0, B, T, H, D), _rand(1, B, T, HKV, D), _rand(2, B, T, HKV, D)
    f = lambda q, k, v: attn_ops.local_attention(q, k, v, pos, pos, window=9)
    g = lambda q, k, v: attn_ops.local_attention(q, k, v, pos, pos, window=9)   # traces are cached per function
    with jax.set_mesh(mesh):
        assert cp.context_size() == 1 and not _shard_map_specs(g, q, k, v)
        with use_axis_rules(rules):
            assert cp.seq_axis() == "sp" and cp.context_size() == 4
            specs = _shard_map_specs(f, q, k, v)
            out = jax.jit(f)(q, k, v)
    assert len(specs) == 1 and specs[0][0] == Spec(None, "sp", "tp", None) and specs[0][3] == Spec(None, "sp")
    np.testing.assert_allclose(out, f(q, k, v), **FWD)
    with jax.set_mesh(make_mesh(data=2, tensor=2, context=2)):      # the default table
        assert _shard_map_specs(f, q, k, v)[0][0] == Spec("data", "context", "tensor", None)


def _import_names(tree):
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
    return names


def _sparse_jax_imports():
    """({module: sparse_jax modules it imports anywhere in its file},
    {module: those imported inside a function})."""
    root = pathlib.Path(sparse_jax.__file__).parent
    graph, lazy = {}, {}
    for path in root.rglob("*.py"):
        module = ".".join(path.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")
        tree = ast.parse(path.read_text())
        graph[module] = _import_names(tree)
        lazy[module] = set().union(*(_import_names(f) for f in ast.walk(tree)
                                     if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))))
    known = lambda names, m: {n for n in names if n in graph and n != m}
    return {m: known(n, m) for m, n in graph.items()}, {m: known(n, m) for m, n in lazy.items()}


def test_no_import_cycle_between_ops_and_context_parallel():
    """context_parallel imports no op or layer (nor anything that does); the ops import it
    at module level, and no function imports it lazily (the old way round the cycle)."""
    graph, lazy = _sparse_jax_imports()
    seen, todo = set(), ["sparse_jax.context_parallel"]
    while todo:
        for dep in graph[todo.pop()] - seen:
            seen.add(dep)
            todo.append(dep)
    assert "sparse_jax.context_parallel" not in seen
    assert not {m for m in seen if m.startswith(("sparse_jax.ops", "sparse_jax.layers"))}, seen
    for op in ("attention", "nsa", "hysparse"):
        assert "sparse_jax.context_parallel" in graph[f"sparse_jax.ops.{op}"] - lazy[f"sparse_jax.ops.{op}"]
    assert not [m for m, names in lazy.items() if "sparse_jax.context_parallel" in names]
