"""Import Llama, Qwen2 and Mistral checkpoints written by Hugging Face `transformers`.

    model = load_pretrained("path/to/checkpoint")     # config.json + *.safetensors
    logits, _ = model(tokens)                          # equals transformers' logits

The families are the pre-norm RMSNorm / SwiGLU / RoPE decoder that `SparseLM` already is:
Llama (GQA, any `rope_theta`, explicit `head_dim`), Qwen2 (q/k/v biases, tied embeddings)
and Mistral (`sliding_window` -> `W` layers; transformers' window "key > query - window"
is ours, "t - window < s <= t"). Every layer keeps dense attention (`F` / `W`); change
`layer_spec` afterwards only with weights that make sense for it.

RoPE: transformers' `rotate_half` pairs channel i with i + head_dim / 2 and uses
`inv_freq = theta ** (-2i / head_dim)`, exactly `sparse_jax.ops.rope.apply_rope`, so the q/k
weights are copied without permutation (the Meta-format interleaved layout is what the
transformers conversion script already permuted away). RoPE scaling (`rope_type` linear,
dynamic, yarn, llama3: Llama 3.x, Qwen2.5 long context) becomes `LMConfig.rope_scaling`
(`sparse_jax.ops.rope.RopeScaling`, transformers' formulas and defaults); dynamic NTK follows
transformers under a KV cache too (see `sparse_jax.ops.rope`). Not supported: longrope (Phi3),
per-layer-type RoPE (Gemma 3), partial rotary; both `rope_scaling` and `rope_parameters` in
one config.json is refused (transformers versions disagree on which wins).

Files: every file read (config.json, model.safetensors, the index and the shards it names)
must lie inside the checkpoint folder, symlinks followed (a Hugging Face cache snapshot may
link into its `blobs/`); safetensors files are read with the `safetensors` package, and a
missing, truncated or malformed file raises `ValueError` naming the file (and the tensor).

Weight layout: transformers' `nn.Linear` stores `[out, in]`; ours are `[in, ...]`:
`q_proj [H*D, d] -> wq [d, H, D]`, `o_proj [d, H*D] -> wo [H, D, d]`,
`gate_proj [I, d] -> w_gate [d, I]`, `lm_head [V, d] -> head [d, V]`. Tied embeddings
(Qwen2) copy `embed_tokens` into `head` (later training unties them).

Anything the model cannot express raises `ValueError` naming the config key or tensor:
RoPE types or keys other than the above, partial rotary, attention / MLP biases other than
Qwen2's q/k/v biases, activations other than SiLU, unknown `model_type`, missing, unexpected
or mis-shaped tensors.
"""

from __future__ import annotations

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy: safetensors' numpy reader needs it)
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open

from sparse_jax.models.lm import LMConfig, SparseLM
from sparse_jax.ops.rope import RopeScaling, yarn_mscale

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
_LAYER_LETTER = {"full_attention": "F", "sliding_attention": "W"}
_SAFETENSORS_DTYPES = ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL")
_ROPE_KEYS = {            # rope_type -> the keys transformers reads for it (besides rope_theta)
    "default": set(),
    "linear": {"factor"},
    "dynamic": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
    "yarn": {"factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
             "mscale", "mscale_all_dim", "truncate"},
}


def _rope_dict(config: dict) -> tuple[str, dict]:
    """(the config key, its RoPE dict): `rope_parameters` (transformers >= 5) or `rope_scaling` (4.x)."""
    params, legacy = config.get("rope_parameters"), config.get("rope_scaling")
    if params is not None and legacy is not None:
        raise ValueError(f"config has both rope_scaling {legacy} and rope_parameters {params}; transformers "
                         "versions differ on which one they read: keep one of the two keys")
    key, rope = ("rope_parameters", params) if params is not None else ("rope_scaling", legacy or {})
    if not isinstance(rope, dict):
        raise ValueError(f"{key} must be a dict, got {rope!r}")
    if any(isinstance(v, dict) for v in rope.values()):
        raise ValueError(f"{key} per layer type are not supported, got {rope}")
    return key, {k: v for k, v in rope.items() if v is not None}


def _rope(config: dict) -> tuple[float, RopeScaling | None]:
    """(RoPE base, frequency scaling) as transformers reads config.json for Llama / Qwen2 /
    Mistral (`modeling_rope_utils`): `rope_type` (or 4.x `type`) default, linear, dynamic,
    yarn or llama3, its keys and defaults; any other type or key raises ValueError."""
    key, rope = _rope_dict(config)
    kind, legacy_kind = rope.pop("rope_type", None), rope.pop("type", None)
    if kind is not None and legacy_kind is not None and kind != legacy_kind:
        raise ValueError(f"{key}: rope_type {kind!r} and type {legacy_kind!r} disagree")
    kind = kind or legacy_kind or "default"
    theta = float(rope.pop("rope_theta", config.get("rope_theta", 10000.0)))
    partial = rope.pop("partial_rotary_factor", config.get("partial_rotary_factor"))
    if partial not in (None, 1.0):
        raise ValueError(f"partial_rotary_factor {partial} is not supported")
    if kind not in _ROPE_KEYS:
        raise ValueError(f"{key}: rope_type {kind!r} is not supported; supported: {sorted(_ROPE_KEYS)}")
    unknown = sorted(set(rope) - _ROPE_KEYS[kind])
    if unknown:
        raise ValueError(f"{key}: keys {unknown} are not supported with rope_type {kind!r} "
                         f"(it reads {sorted(_ROPE_KEYS[kind])})")
    if kind == "default":
        return theta, None
    max_len = config.get("max_position_embeddings")
    original = max_len if kind == "dynamic" else rope.get("original_max_position_embeddings", max_len)
    top_level = config.get("original_max_position_embeddings")
    if kind != "dynamic" and top_level is not None and top_level != original:
        raise ValueError(f"original_max_position_embeddings {top_level} (top level) differs from {original} "
                         f"used by {key}: state it once, inside {key}")
    if kind != "linear" and not isinstance(original, int):
        raise ValueError(f"{key}: rope_type {kind!r} needs an int original_max_position_embeddings "
                         f"(or max_position_embeddings), got {original!r}")
    required = {"factor"} | ({"low_freq_factor", "high_freq_factor"} if kind == "llama3" else set())
    missing = sorted(required - set(rope))
    if missing:
        raise ValueError(f"{key}: rope_type {kind!r} needs keys {missing}, got {rope}")
    factor = rope["factor"]
    extra = {}
    if kind == "llama3":
        extra = dict(low_freq_factor=rope["low_freq_factor"], high_freq_factor=rope["high_freq_factor"])
    elif kind == "yarn":
        attention_factor = rope.get("attention_factor")
        if attention_factor is None and rope.get("mscale") and rope.get("mscale_all_dim"):
            attention_factor = yarn_mscale(factor, rope["mscale"]) / yarn_mscale(factor, rope["mscale_all_dim"])
        extra = dict(beta_fast=rope.get("beta_fast") or 32.0, beta_slow=rope.get("beta_slow") or 1.0,
                     truncate=bool(rope.get("truncate", True)), attention_factor=attention_factor)
    try:
        return theta, RopeScaling(kind, factor, None if kind == "linear" else original, **extra)
    except ValueError as e:
        raise ValueError(f"{key} {rope}: {e}") from e


def _layer_spec(config: dict) -> tuple[str, int | None]:
    """(`layer_spec` of F / W letters, window or None), as transformers reads each family:
    Mistral slides every layer when `sliding_window` is set, Qwen2 follows `layer_types`,
    Llama never slides."""
    n, model_type = config["num_hidden_layers"], config["model_type"]
    window = config.get("sliding_window")
    spec = "F" * n
    if model_type == "mistral" and window is not None:
        spec = "W" * n
    elif model_type == "qwen2" and config.get("layer_types") is not None:
        types = list(config["layer_types"])
        if len(types) != n or set(types) - set(_LAYER_LETTER):
            raise ValueError(f"layer_types must be {n} of {sorted(_LAYER_LETTER)}, got {types}")
        spec = "".join(_LAYER_LETTER[t] for t in types)
    elif model_type == "qwen2" and config.get("use_sliding_window"):
        raise ValueError("use_sliding_window without layer_types is not supported (which layers slide "
                         "depends on the transformers version)")
    if "W" not in spec:
        return spec, None
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"sliding_window must be an int >= 1 for sliding layers, got {window!r}")
    return spec, window


def config_from_hf(config: dict, dtype=jnp.float32) -> LMConfig:
    """`LMConfig` (dense `F` / `W` layers) from a transformers `config.json` dict."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(config.get(key), int):
            raise ValueError(f"config key {key!r} must be an int, got {config.get(key)!r}")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act {act!r} is not supported (SwiGLU with SiLU only)")
    for key in ("attention_bias", "mlp_bias"):       # Llama options; Qwen2 has fixed q/k/v biases
        if config.get(key):
            raise ValueError(f"config key {key!r} = True is not supported")
    if config.get("quantization_config") is not None:
        raise ValueError("quantization_config: quantized checkpoints are not supported")
    spec, window = _layer_spec(config)
    theta, scaling = _rope(config)
    heads = config["num_attention_heads"]
    return LMConfig(
        vocab_size=config["vocab_size"], layer_spec=spec, d_model=config["hidden_size"],
        num_heads=heads, num_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        mlp_dim=config["intermediate_size"], window=window or LMConfig.window,
        rope_theta=theta, rope_scaling=scaling, qkv_bias=model_type == "qwen2",
        norm_eps=float(config.get("rms_norm_eps", 1e-6)), dtype=dtype)


def _inside(folder: pathlib.Path, name) -> pathlib.Path:
    """`folder / name`, refused (ValueError) unless `name` is a relative path that stays in
    `folder` once symlinks are followed. A Hugging Face cache snapshot (`.../snapshots/<rev>/`)
    may link into its repository's `blobs/` folder (`../../blobs/<hash>`), as the hub writes it."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"checkpoint file name must be a non-empty string, got {name!r}")
    relative = pathlib.PurePosixPath(name)
    if relative.is_absolute() or ".." in relative.parts:
        raise ValueError(f"checkpoint file {name!r} is outside the checkpoint folder {str(folder)!r} "
                         "(absolute or with '..'): refused")
    root = folder.resolve()
    allowed = [root] + ([root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [])
    target = (folder / relative).resolve()
    if not any(target.is_relative_to(a) for a in allowed):
        raise ValueError(f"checkpoint file {name!r} links to {str(target)!r}, outside the checkpoint folder "
                         f"{str(folder)!r}: refused")
    return folder / relative


_READ_ERRORS = (SafetensorError, OSError)        # what the safetensors package raises for a bad file


def safetensors_names(path) -> list[str]:
    """Tensor names in one `.safetensors` file's header; ValueError naming the file if the
    file is missing, truncated or malformed (the package checks the header, offsets and sizes)."""
    try:
        with safe_open(path, framework="numpy") as f:
            return list(f.keys())
    except _READ_ERRORS as e:
        raise ValueError(f"safetensors file {str(path)!r} cannot be read: {e}") from e


def read_safetensors(path, names=None) -> dict[str, np.ndarray]:
    """Tensors of one `.safetensors` file (all, or those in `names`), read with the
    `safetensors` package; bfloat16 arrives as `ml_dtypes.bfloat16`. A bad file, an absent
    name or an unsupported dtype raises ValueError naming the file and the tensor."""
    try:
        with safe_open(path, framework="numpy") as f:
            available = set(f.keys())
            out = {}
            for name in sorted(available) if names is None else names:
                if name not in available:
                    raise ValueError(f"safetensors file {str(path)!r} has no tensor {name!r}")
                dtype = f.get_slice(name).get_dtype()
                if dtype not in _SAFETENSORS_DTYPES:
                    raise ValueError(f"safetensors file {str(path)!r}: tensor {name!r} has unsupported dtype "
                                     f"{dtype} (supported: {_SAFETENSORS_DTYPES})")
                try:
                    out[name] = f.get_tensor(name)
                except _READ_ERRORS as e:
                    raise ValueError(f"safetensors file {str(path)!r}: tensor {name!r} cannot be read: {e}") from e
            return out
    except _READ_ERRORS as e:
        raise ValueError(f"safetensors file {str(path)!r} cannot be read: {e}") from e


def _read_json(path: pathlib.Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{str(path)!r} is not readable JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object, got {type(data).__name__}")
    return data


def checkpoint_files(path) -> dict[str, pathlib.Path]:
    """Tensor name -> the `.safetensors` file holding it: `model.safetensors`, or the shards
    that `model.safetensors.index.json` names (each confined to the folder, see `_inside`)."""
    path = pathlib.Path(os.fspath(path))
    if os.path.lexists(path / "model.safetensors"):
        single = _inside(path, "model.safetensors")
        return {name: single for name in safetensors_names(single)}
    if not os.path.lexists(path / "model.safetensors.index.json"):
        raise ValueError(f"path {str(path)!r} has neither model.safetensors nor model.safetensors.index.json")
    index = _inside(path, "model.safetensors.index.json")
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) for k in weight_map):
        raise ValueError(f"{str(index)!r}: weight_map must map tensor names to shard files, got {weight_map!r}")
    shards = {shard: _inside(path, shard) for shard in set(weight_map.values())}
    return {name: shards[shard] for name, shard in weight_map.items()}


def _weight_map(config: LMConfig, tie_embeddings: bool) -> dict[str, tuple[tuple, list]]:
    """transformers tensor name -> (its shape, [(our parameter path, transposed?), ...]).

    A parameter is `(w.T if transposed else w).reshape(parameter shape)`: `nn.Linear`
    weights `[out, in]` are transposed, embeddings, norms and biases are not.
    """
    d, v, inner = config.d_model, config.vocab_size, config.mlp_dim
    a = config.attention
    q, kv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
    embed_targets = [(("embed",), False)] + ([(("head",), True)] if tie_embeddings else [])
    m = {"model.embed_tokens.weight": ((v, d), embed_targets),
         "model.norm.weight": ((d,), [(("final_norm", "scale"), False)])}
    if not tie_embeddings:
        m["lm_head.weight"] = ((v, d), [(("head",), True)])
    for i in range(len(config.layer_spec)):
        p, b = f"model.layers.{i}.", ("blocks", i)
        layer = {"input_layernorm.weight": ((d,), "attn_norm.scale", False),
                 "post_attention_layernorm.weight": ((d,), "mlp_norm.scale", False),
                 "self_attn.q_proj.weight": ((q, d), "attn.wq", True),
                 "self_attn.k_proj.weight": ((kv, d), "attn.wk", True),
                 "self_attn.v_proj.weight": ((kv, d), "attn.wv", True),
                 "self_attn.o_proj.weight": ((d, q), "attn.wo", True),
                 "mlp.gate_proj.weight": ((inner, d), "mlp.w_gate", True),
                 "mlp.up_proj.weight": ((inner, d), "mlp.w_up", True),
                 "mlp.down_proj.weight": ((d, inner), "mlp.w_down", True)}
        if config.qkv_bias:
            layer.update({"self_attn.q_proj.bias": ((q,), "attn.bq", False),
                          "self_attn.k_proj.bias": ((kv,), "attn.bk", False),
                          "self_attn.v_proj.bias": ((kv,), "attn.bv", False)})
        for name, (shape, ours, transposed) in layer.items():
            m[p + name] = (shape, [(b + tuple(ours.split(".")), transposed)])
    return m


def _variable(model, path):
    node = model
    for part in path:
        node = node[part] if isinstance(part, int) else getattr(node, part)
    return node


def load_pretrained(path, dtype=jnp.float32) -> SparseLM:
    """`SparseLM` with the weights of a transformers Llama / Qwen2 / Mistral checkpoint.

    path: folder with `config.json` and `model.safetensors` (or a sharded index). dtype:
    compute dtype (parameters are stored in float32 whatever the checkpoint's dtype). Files
    are read one shard at a time; every file must lie inside `path` (see `_inside`).
    """
    path = pathlib.Path(os.fspath(path))
    if not os.path.lexists(path / "config.json"):
        raise ValueError(f"path {str(path)!r} has no config.json")
    hf_config = _read_json(_inside(path, "config.json"))
    config = config_from_hf(hf_config, dtype)
    files = checkpoint_files(path)
    tie = bool(hf_config.get("tie_word_embeddings", False))
    if tie:
        files.pop("lm_head.weight", None)            # some writers store the tied copy too
    weight_map = _weight_map(config, tie)
    for name in weight_map:
        if name not in files:
            raise ValueError(f"checkpoint {str(path)!r} is missing tensor {name!r}")
    unexpected = sorted(k for k in files if k not in weight_map and not k.endswith("rotary_emb.inv_freq"))
    if unexpected:
        raise ValueError(f"checkpoint {str(path)!r} has tensors the model cannot hold: {unexpected[:8]}")
    model = nnx.eval_shape(lambda: SparseLM(config, rngs=nnx.Rngs(0)))     # shapes only, no init
    for file in sorted(set(files[name] for name in weight_map)):
        tensors = read_safetensors(file, [name for name in weight_map if files[name] == file])
        for name, w in tensors.items():
            shape, targets = weight_map[name]
            if tuple(w.shape) != shape:
                raise ValueError(f"tensor {name!r} has shape {tuple(w.shape)}, the config implies {shape}")
            for target, transposed in targets:
                var = _variable(model, target)
                value = np.asarray(w.T if transposed else w, np.float32).reshape(var.get_value().shape)
                var.set_value(jnp.asarray(value, var.get_value().dtype))
    unset = [p for p, var in nnx.to_flat_state(nnx.state(model))
             if isinstance(var.get_value(), jax.ShapeDtypeStruct)]
    if unset:                                        # a variable the map forgot: a bug here
        raise ValueError(f"model variables not set from the checkpoint: {unset}")
    return model
