"""Checkpoint import (`sparse_jax.models.hf`): logits equal transformers' on golden files.

The goldens in `tests/golden/hf/<family>/` (tiny random Llama / Qwen2 / Mistral written by
transformers, with its PyTorch-CPU logits) come from `tests/golden/make_hf_golden.py`; this
test needs neither torch nor transformers. Tolerance: float32, atol 1e-4 on logits of
magnitude ~3 (the measured difference is ~1e-6).
"""

import json
import pathlib
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from sparse_jax.layers import AttentionConfig, StreamingLLMAttention
from sparse_jax.models.hf import config_from_hf, load_pretrained, read_safetensors
from sparse_jax.models.lm import LMConfig
from sparse_jax.ops.rope import RopeScaling, apply_rope, rope_inv_freq

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "hf"
FAMILIES = ("llama", "qwen2", "mistral")
ATOL = 1e-4


def golden(family):
    g = np.load(GOLDEN / family / "logits.npz")
    return g["tokens"], g["positions"], g["logits"]


def max_error(model, family):
    tokens, positions, expected = golden(family)
    logits, _ = model(jnp.asarray(tokens), jnp.asarray(positions))
    valid = positions >= 0                      # transformers' logits at padding are not compared
    return float(np.abs(np.asarray(logits) - expected)[valid].max())


def hf_config(family):
    return json.loads((GOLDEN / family / "config.json").read_text())


def checkpoint_with_config(tmp_path, family, **changes):
    """A copy of the golden checkpoint whose config.json has `changes` (None deletes a key)."""
    folder = tmp_path / family
    folder.mkdir()
    shutil.copy(GOLDEN / family / "model.safetensors", folder)
    config = hf_config(family)
    config.update(changes)
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return folder


def write_safetensors(path, tensors: dict, metadata=None):
    """The format by hand: u64 header length, JSON header, concatenated little-endian data."""
    names = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
             np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.int64): "I64"}
    header, blobs, offset = {"__metadata__": metadata or {"format": "pt"}}, [], 0
    for name, array in tensors.items():
        data = np.ascontiguousarray(array).tobytes()
        header[name] = {"dtype": names[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header).encode()
    pathlib.Path(path).write_bytes(len(raw).to_bytes(8, "little") + raw + b"".join(blobs))


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_transformers(family):
    model = load_pretrained(GOLDEN / family)
    err = max_error(model, family)
    assert err < ATOL, f"{family}: max |logits - transformers| = {err}"


def test_config_mapping():
    llama, qwen2, mistral = (config_from_hf(hf_config(f)) for f in FAMILIES)
    assert (llama.layer_spec, llama.rope_theta, llama.num_kv_heads, llama.qkv_bias) == ("FF", 50000.0, 2, False)
    assert (llama.norm_eps, llama.mlp_dim, llama.head_dim) == (1e-5, 80, 16)
    assert (qwen2.layer_spec, qwen2.rope_theta, qwen2.qkv_bias) == ("FF", 20000.0, True)
    assert (mistral.layer_spec, mistral.window, mistral.head_dim, mistral.num_kv_heads) == ("WW", 8, 8, 1)
    v4 = dict(hf_config("llama"), rope_theta=1234.0, rope_scaling=None)     # transformers 4.x keys
    del v4["rope_parameters"]
    assert config_from_hf(v4).rope_theta == 1234.0
    mixed = dict(hf_config("qwen2"), layer_types=["sliding_attention", "full_attention"], sliding_window=5)
    assert (config_from_hf(mixed).layer_spec, config_from_hf(mixed).window) == ("WF", 5)
    # as in transformers: Llama ignores sliding keys, Mistral ignores layer_types
    assert config_from_hf(dict(mixed, model_type="llama")).layer_spec == "FF"
    assert config_from_hf(dict(mixed, model_type="mistral")).layer_spec == "WW"


@pytest.mark.parametrize("window", [None, 7, 9])
def test_mistral_window_is_what_matches(tmp_path, window):
    """Without the window, or with one off by one, the logits no longer match: the golden
    sequence (24) is longer than the window (8), so the mapping and its off-by-one matter."""
    model = load_pretrained(checkpoint_with_config(tmp_path, "mistral", sliding_window=window))
    assert model.config.layer_spec == ("FF" if window is None else "WW")
    assert max_error(model, "mistral") > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_token_by_token_equals_prefill(family):
    """Cached decoding (a rolling cache of 8 slots for Mistral) from the first token on,
    with row 1 left-padded, gives transformers' logits too."""
    model = load_pretrained(GOLDEN / family)
    tokens, positions, expected = golden(family)
    valid = positions >= 0
    err = float(np.abs(decode_token_by_token(model, tokens, positions) - expected)[valid].max())
    assert err < ATOL, f"{family}: decode max error {err}"


@pytest.mark.parametrize("change, match", [
    (dict(model_type="gpt2"), "model_type"),
    (dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4, "factor": 2.0}), "rope_type 'longrope'"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "both rope_scaling .* and rope_parameters"),
    (dict(rope_parameters={"rope_theta": 1e4, "partial_rotary_factor": 0.5}), "partial_rotary_factor"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(hidden_size=None), "hidden_size"),
    (dict(model_type="qwen2", layer_types=["full_attention", "chunked_attention"]), "layer_types"),
    (dict(model_type="qwen2", layer_types=["sliding_attention", "full_attention"], sliding_window=None),
     "sliding_window"),
    (dict(model_type="qwen2", use_sliding_window=True, sliding_window=4), "use_sliding_window"),
    (dict(model_type="mistral", sliding_window=0), "sliding_window"),
])
def test_unsupported_config_raises(change, match):
    config = dict(hf_config("llama"), **change)
    with pytest.raises(ValueError, match=match):
        config_from_hf({k: v for k, v in config.items() if v is not None})


@pytest.mark.parametrize("family, change, match", [
    ("llama", dict(num_hidden_layers=3), "missing tensor 'model.layers.2"),
    ("llama", dict(num_hidden_layers=1), "cannot hold.*model.layers.1"),
    ("llama", dict(intermediate_size=96), "mlp.gate_proj.weight' has shape"),
    ("qwen2", dict(model_type="llama"), "cannot hold.*q_proj.bias"),   # Llama has no q/k/v biases
    ("qwen2", dict(tie_word_embeddings=False), "missing tensor 'lm_head.weight'"),
    ("mistral", dict(head_dim=16), "q_proj.weight' has shape"),
])
def test_checkpoint_mismatch_raises(tmp_path, family, change, match):
    with pytest.raises(ValueError, match=match):
        load_pretrained(checkpoint_with_config(tmp_path, family, **change))


def test_safetensors_reader_dtypes_and_sharded_index(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"a": rng.normal(size=(3, 4)).astype(np.float32),
              "b": rng.normal(size=(5,)).astype(ml_dtypes.bfloat16),
              "c": rng.normal(size=(2, 1, 2)).astype(np.float16), "d": np.arange(3, dtype=np.int64)}
    write_safetensors(tmp_path / "x.safetensors", arrays)
    back = read_safetensors(tmp_path / "x.safetensors")
    assert sorted(back) == sorted(arrays)
    for k, a in arrays.items():
        assert back[k].dtype == a.dtype and back[k].shape == a.shape and (back[k] == a).all()
    # The golden Llama split into two shards with an index loads to the same logits.
    tensors = read_safetensors(GOLDEN / "llama" / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    folder = tmp_path / "sharded"
    folder.mkdir()
    for shard, keys in shards.items():
        write_safetensors(folder / shard, {k: tensors[k] for k in keys})
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}))
    shutil.copy(GOLDEN / "llama" / "config.json", folder)
    assert max_error(load_pretrained(folder), "llama") < ATOL
    # bfloat16 weights load (into float32 parameters) and stay close.
    bf16 = tmp_path / "bf16"
    bf16.mkdir()
    write_safetensors(bf16 / "model.safetensors", {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()})
    shutil.copy(GOLDEN / "llama" / "config.json", bf16)
    assert 1e-4 < max_error(load_pretrained(bf16), "llama") < 0.1
    with pytest.raises(ValueError, match="config.json"):
        load_pretrained(tmp_path)


def test_a_parameter_left_unset_raises(monkeypatch):
    """The guard against a weight map that forgets a parameter of the model."""
    from sparse_jax.models import hf
    full_map = hf._weight_map

    def forgetful(config, tie):
        m = full_map(config, tie)
        m["model.norm.weight"] = (m["model.norm.weight"][0], [])
        return m

    monkeypatch.setattr(hf, "_weight_map", forgetful)
    with pytest.raises(ValueError, match="final_norm"):
        load_pretrained(GOLDEN / "llama")


# --- RoPE scaling (linear, dynamic NTK, YaRN, llama3) ---------------------------------------

ROPE_GOLDENS = ("rope_llama3", "rope_linear", "rope_dynamic", "rope_yarn")


def decode_token_by_token(model, tokens, positions):
    step = nnx.jit(lambda m, t, p, c: m(t, p, c))
    caches = model.init_cache(tokens.shape[0], tokens.shape[1])
    out = []
    for t in range(tokens.shape[1]):
        logits, caches = step(model, jnp.asarray(tokens[:, t:t + 1]), jnp.asarray(positions[:, t:t + 1]), caches)
        out.append(np.asarray(logits))
    return np.concatenate(out, axis=1)


@pytest.mark.parametrize("name", ROPE_GOLDENS)
def test_rope_scaling_logits_equal_transformers(name):
    """Prefill and token-by-token decoding both equal transformers' (which, for dynamic NTK,
    differ from each other: each call's frequencies follow its own length)."""
    model = load_pretrained(GOLDEN / name)
    assert model.config.rope_scaling.kind == name.removeprefix("rope_")
    g = np.load(GOLDEN / name / "logits.npz")
    tokens, positions, valid = g["tokens"], g["positions"], g["positions"] >= 0
    prefill, _ = model(jnp.asarray(tokens), jnp.asarray(positions))
    err = float(np.abs(np.asarray(prefill) - g["logits"])[valid].max())
    assert err < ATOL, f"{name}: prefill max |logits - transformers| = {err}"
    err = float(np.abs(decode_token_by_token(model, tokens, positions) - g["decode_logits"])[valid].max())
    assert err < ATOL, f"{name}: decode max |logits - transformers| = {err}"


@pytest.mark.parametrize("name", ROPE_GOLDENS)
def test_rope_scaling_is_what_matches(tmp_path, name):
    """The goldens tell scaled from plain RoPE; the 4.x form (`rope_scaling` with `type`, top-level
    `rope_theta`) loads to the same logits as the 5.x `rope_parameters`."""
    g = np.load(GOLDEN / name / "logits.npz")
    rope = hf_config(name)["rope_parameters"]
    plain = load_pretrained(checkpoint_with_config(
        tmp_path, name, rope_parameters={"rope_type": "default", "rope_theta": rope["rope_theta"]}))
    logits, _ = plain(jnp.asarray(g["tokens"]), jnp.asarray(g["positions"]))
    assert float(np.abs(np.asarray(logits) - g["logits"])[g["positions"] >= 0].max()) > 1e-3
    legacy = {k: v for k, v in rope.items() if k not in ("rope_type", "rope_theta")}
    (tmp_path / "v4").mkdir()
    model = load_pretrained(checkpoint_with_config(tmp_path / "v4", name, rope_parameters=None,
                                                   rope_theta=rope["rope_theta"],
                                                   rope_scaling=dict(legacy, type=rope["rope_type"])))
    assert model.config.rope_scaling == load_pretrained(GOLDEN / name).config.rope_scaling
    logits, _ = model(jnp.asarray(g["tokens"]), jnp.asarray(g["positions"]))
    assert float(np.abs(np.asarray(logits) - g["logits"])[g["positions"] >= 0].max()) < ATOL


def rope_frequency_cases():
    table = json.loads((GOLDEN / "rope_frequencies.json").read_text())
    return [pytest.param(c, id=f"{c['config']['model_type']}-{i}") for i, c in enumerate(table["cases"])]


@pytest.mark.parametrize("case", rope_frequency_cases())
def test_rope_frequencies_equal_transformers(case):
    """`apply_rope` with the imported scaling rotates as transformers' rotary embedding after a
    forward of `seq_len` positions (its `inv_freq` and `attention_scaling`): Llama 3.1's and
    Qwen2.5's real settings, YaRN options, the 4.x form, dynamic NTK below and above its length."""
    config = config_from_hf(case["config"])
    inv_freq, scaling = np.asarray(case["inv_freq"], np.float64), case["attention_scaling"]
    d, n = config.attention.head_dim, case["seq_len"]
    x = np.random.default_rng(0).normal(size=(1, n, 1, d)).astype(np.float32)
    angles = np.arange(n)[:, None] * inv_freq                                  # [n, d/2]
    cos, sin = (np.cos(angles) * scaling)[None, :, None], (np.sin(angles) * scaling)[None, :, None]
    x1, x2 = x[..., :d // 2], x[..., d // 2:]
    expected = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    got = apply_rope(jnp.asarray(x), jnp.arange(n)[None], config.rope_theta, config.rope_scaling)
    np.testing.assert_allclose(np.asarray(got), expected, atol=2e-5, rtol=0)
    ours, ours_scaling = rope_inv_freq(d, config.rope_theta, config.rope_scaling, n)
    np.testing.assert_allclose(np.asarray(ours), inv_freq, rtol=2e-6)
    assert abs(ours_scaling - scaling) < 1e-6


@pytest.mark.parametrize("change, match", [
    (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}),
     r"needs keys \['high_freq_factor'\]"),
    (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "mrope_section": [2, 2]}), r"keys \['mrope_section'\] are not supported"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "original_max_position_embeddings": 8}),
     "original_max_position_embeddings"),
    (dict(rope_parameters={"rope_type": "linear", "type": "dynamic", "factor": 2.0}), "disagree"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 0.0}), "factor must be a number > 0"),
    (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0}),
     "low_freq_factor < high_freq_factor"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
          original_max_position_embeddings=32), "original_max_position_embeddings 32 .top level."),
    (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=None),
     "max_position_embeddings"),
    (dict(rope_parameters={"full_attention": {"rope_type": "default"}}), "per layer type"),
])
def test_unsupported_rope_config_raises(change, match):
    config = dict(hf_config("llama"), **change)
    with pytest.raises(ValueError, match=match):
        config_from_hf({k: v for k, v in config.items() if v is not None})


def test_rope_scaling_only_where_applied():
    """Layers with their own RoPE (NSA, MLA, ...) would ignore the scaling: refused."""
    scaling = RopeScaling("linear", 2.0)
    with pytest.raises(ValueError, match="rope_scaling is supported by layers F, W, S, P, M, E, A only"):
        LMConfig(vocab_size=32, layer_spec="FN", rope_scaling=scaling)
    with pytest.raises(ValueError, match="rope_scaling must be a RopeScaling with rope_theta set"):
        AttentionConfig(d_model=32, num_heads=2, rope_theta=None, rope_scaling=scaling)
    with pytest.raises(ValueError, match="rope_mode='cache' does not support rope_scaling"):
        StreamingLLMAttention(AttentionConfig(d_model=32, num_heads=2, rope_scaling=scaling), window=4,
                              num_sinks=1, rope_mode="cache", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="kind must be one of"):
        RopeScaling("longrope", 2.0)
    with pytest.raises(ValueError, match="needs original_max_len"):
        RopeScaling("llama3", 8.0)


# --- file safety: paths confined to the folder, bad safetensors files named ------------------

def sharded_llama(folder, weight_map_names=None):
    """The golden Llama as two shards + index in `folder`; `weight_map_names` renames shards in
    the index (shard file -> name written in weight_map). Returns {shard file: tensor names}."""
    tensors = read_safetensors(GOLDEN / "llama" / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    folder.mkdir(parents=True, exist_ok=True)
    for shard, keys in shards.items():
        write_safetensors(folder / shard, {k: tensors[k] for k in keys})
    renamed = weight_map_names or {}
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: renamed.get(s, s) for s, keys in shards.items() for k in keys}}))
    shutil.copy(GOLDEN / "llama" / "config.json", folder)
    return shards


@pytest.mark.parametrize("where", ["parent", "absolute", "symlink"])
def test_shard_outside_the_folder_is_refused(tmp_path, where):
    """A weight_map shard name that leaves the folder ('../x', an absolute path, or a symlink
    to a file outside) is refused, although the file it names is a valid shard."""
    outside = tmp_path / "x"
    sharded_llama(outside)                                 # valid shards outside the checkpoint
    folder = tmp_path / "ckpt"
    shard = "model-00002-of-00002.safetensors"
    name = {"parent": f"../x/{shard}", "absolute": str(outside / shard), "symlink": shard}[where]
    sharded_llama(folder, {shard: name})
    if where == "symlink":
        (folder / shard).unlink()
        (folder / shard).symlink_to(outside / shard)
    else:
        (folder / shard).unlink()
    match = "links to .* outside the checkpoint folder" if where == "symlink" else "outside the checkpoint folder"
    with pytest.raises(ValueError, match=match):
        load_pretrained(folder)


def test_model_file_symlinked_outside_is_refused_but_hub_cache_loads(tmp_path):
    """model.safetensors / config.json linking out of the folder are refused; the Hugging Face
    cache layout (snapshots/<rev>/x -> ../../blobs/<hash>) loads."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(GOLDEN / "llama" / "model.safetensors", outside / "model.safetensors")
    folder = tmp_path / "ckpt"
    folder.mkdir()
    shutil.copy(GOLDEN / "llama" / "config.json", folder)
    (folder / "model.safetensors").symlink_to(outside / "model.safetensors")
    with pytest.raises(ValueError, match="'model.safetensors' links to .* outside the checkpoint folder"):
        load_pretrained(folder)
    repo = tmp_path / "hub" / "models--x--tiny-llama"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    for i, file in enumerate(("config.json", "model.safetensors")):
        shutil.copy(GOLDEN / "llama" / file, repo / "blobs" / f"blob{i}")
        (snapshot / file).symlink_to(f"../../blobs/blob{i}")
    assert max_error(load_pretrained(snapshot), "llama") < ATOL


def golden_copy(tmp_path, data: bytes):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    shutil.copy(GOLDEN / "llama" / "config.json", folder)
    (folder / "model.safetensors").write_bytes(data)
    return folder


def test_truncated_safetensors_names_the_file(tmp_path):
    raw = (GOLDEN / "llama" / "model.safetensors").read_bytes()
    folder = golden_copy(tmp_path, raw[:-100])
    with pytest.raises(ValueError, match=r"safetensors file '.*ckpt/model.safetensors' cannot be read: .*"):
        load_pretrained(folder)


@pytest.mark.parametrize("garble", ["json", "length"])
def test_garbled_header_names_the_file(tmp_path, garble):
    raw = (GOLDEN / "llama" / "model.safetensors").read_bytes()
    if garble == "json":
        data = raw[:8] + b"{garbage" + raw[16:]
    else:
        data = (len(raw) * 2).to_bytes(8, "little") + raw[8:]           # header longer than the file
    folder = golden_copy(tmp_path, data)
    with pytest.raises(ValueError, match=r"safetensors file '.*ckpt/model.safetensors' cannot be read"):
        load_pretrained(folder)


def test_missing_tensor_or_shard_names_the_file(tmp_path):
    """The index lists a tensor in a shard that lacks it, or a shard that does not exist."""
    folder = tmp_path / "ckpt"
    shards = sharded_llama(folder)
    second = "model-00002-of-00002.safetensors"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    moved = shards["model-00001-of-00002.safetensors"][0]
    index["weight_map"][moved] = second                     # listed in the wrong shard
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"safetensors file '.*{second}' has no tensor '{moved}'"):
        load_pretrained(folder)
    index["weight_map"][moved] = "model-00003-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"safetensors file '.*model-00003-of-00002.safetensors' cannot be read"):
        load_pretrained(folder)
    (folder / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ValueError, match="model.safetensors.index.json' is not readable JSON"):
        load_pretrained(folder)


def test_unsupported_dtype_names_file_and_tensor(tmp_path):
    raw = json.dumps({"a": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}).encode()
    (tmp_path / "f8.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0\0")
    with pytest.raises(ValueError, match=r"f8.safetensors': tensor 'a' has unsupported dtype F8_E4M3"):
        read_safetensors(tmp_path / "f8.safetensors")
