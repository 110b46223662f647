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
transformers conversion script already permuted away).

Weight layout: transformers' `nn.Linear` stores `[out, in]`; ours are `[in, ...]`:
`q_proj [H*D, d] -> wq [d, H, D]`, `o_proj [d, H*D] -> wo [H, D, d]`,
`gate_proj [I, d] -> w_gate [d, I]`, `lm_head [V, d] -> head [d, V]`. Tied embeddings
(Qwen2) copy `embed_tokens` into `head` (later training unties them).

Anything the model cannot express raises `ValueError` naming the config key or tensor:
RoPE scaling, partial rotary, attention / MLP biases other than Qwen2's q/k/v biases,
activations other than SiLU, unknown `model_type`, missing, unexpected or mis-shaped tensors.
"""

from __future__ import annotations

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from sparse_jax.models.lm import LMConfig, SparseLM

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
_LAYER_LETTER = {"full_attention": "F", "sliding_attention": "W"}
_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
                       "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32,
                       "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def _rope_theta(config: dict) -> float:
    """RoPE base from `rope_parameters` (transformers >= 5) or `rope_theta` / `rope_scaling` (4.x)."""
    params = config.get("rope_parameters")
    if params is not None:
        if any(isinstance(v, dict) for v in params.values()):
            raise ValueError(f"rope_parameters per layer type are not supported, got {params}")
        if params.get("rope_type", "default") != "default":
            raise ValueError(f"rope_parameters: rope_type {params.get('rope_type')!r} is not supported "
                             "(only 'default', no RoPE scaling)")
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"rope_parameters: partial_rotary_factor {params['partial_rotary_factor']} "
                             "is not supported")
        return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    if config.get("rope_scaling") is not None:
        raise ValueError(f"rope_scaling {config['rope_scaling']} is not supported (only plain RoPE)")
    if config.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"partial_rotary_factor {config['partial_rotary_factor']} is not supported")
    return float(config.get("rope_theta", 10000.0))


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
    heads = config["num_attention_heads"]
    return LMConfig(
        vocab_size=config["vocab_size"], layer_spec=spec, d_model=config["hidden_size"],
        num_heads=heads, num_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        mlp_dim=config["intermediate_size"], window=window or LMConfig.window,
        rope_theta=_rope_theta(config), qkv_bias=model_type == "qwen2",
        norm_eps=float(config.get("rms_norm_eps", 1e-6)), dtype=dtype)


def read_safetensors(path) -> dict[str, np.ndarray]:
    """All tensors of one `.safetensors` file as read-only numpy views of a memory map (the
    format: an 8-byte little-endian header length, a JSON header `{name: {dtype, shape,
    data_offsets}}`, then the little-endian data; a little-endian host is assumed)."""
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    n = int.from_bytes(raw[:8].tobytes(), "little")
    header = json.loads(raw[8:8 + n].tobytes())
    header.pop("__metadata__", None)
    out = {}
    for name, info in header.items():
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        out[name] = raw[8 + n + begin:8 + n + end].view(_SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out


def read_checkpoint_tensors(path) -> dict[str, np.ndarray]:
    """Tensors of `model.safetensors` or of the shards named by `model.safetensors.index.json`."""
    path = pathlib.Path(path)
    if (path / "model.safetensors").exists():
        return read_safetensors(path / "model.safetensors")
    index = path / "model.safetensors.index.json"
    if not index.exists():
        raise ValueError(f"path {str(path)!r} has neither model.safetensors nor model.safetensors.index.json")
    tensors = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        tensors.update(read_safetensors(path / shard))
    return tensors


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
    compute dtype (parameters are stored in float32 whatever the checkpoint's dtype).
    """
    path = pathlib.Path(os.fspath(path))
    if not (path / "config.json").exists():
        raise ValueError(f"path {str(path)!r} has no config.json")
    hf_config = json.loads((path / "config.json").read_text())
    config = config_from_hf(hf_config, dtype)
    tensors = read_checkpoint_tensors(path)
    tie = bool(hf_config.get("tie_word_embeddings", False))
    if tie:
        tensors.pop("lm_head.weight", None)          # some writers store the tied copy too
    model = nnx.eval_shape(lambda: SparseLM(config, rngs=nnx.Rngs(0)))     # shapes only, no init
    for name, (shape, targets) in _weight_map(config, tie).items():
        if name not in tensors:
            raise ValueError(f"checkpoint {str(path)!r} is missing tensor {name!r}")
        w = tensors.pop(name)
        if tuple(w.shape) != shape:
            raise ValueError(f"tensor {name!r} has shape {tuple(w.shape)}, the config implies {shape}")
        for target, transposed in targets:
            var = _variable(model, target)
            value = np.asarray(w.T if transposed else w, np.float32).reshape(var.get_value().shape)
            var.set_value(jnp.asarray(value, var.get_value().dtype))
    unexpected = sorted(k for k in tensors if not k.endswith("rotary_emb.inv_freq"))
    if unexpected:
        raise ValueError(f"checkpoint {str(path)!r} has tensors the model cannot hold: {unexpected[:8]}")
    unset = [p for p, var in nnx.to_flat_state(nnx.state(model))
             if isinstance(var.get_value(), jax.ShapeDtypeStruct)]
    if unset:                                        # a variable the map forgot: a bug here
        raise ValueError(f"model variables not set from the checkpoint: {unset}")
    return model
