"""Write the golden checkpoints and logits that `tests/test_hf_import.py` reads.

For each family (Llama, Qwen2, Mistral) this builds a tiny randomly initialised
`transformers` model in float32, saves it with `save_pretrained` (config.json +
model.safetensors) to `tests/golden/hf/<family>/`, and writes the model's logits on fixed
token ids to `tests/golden/hf/<family>/logits.npz`:

* `tokens [2, T]` int32: token ids (row 1 is left-padded; its pad slots hold token 0),
* `positions [2, T]` int32: sparse_jax positions (-1 = padding, else 0, 1, ...),
* `logits [2, T, V]` float32: transformers' logits (PyTorch CPU, eager attention); rows
  at padding positions are whatever transformers computes there and are not compared.

Families: Llama with GQA, an explicit head_dim and a non-default rope_theta; Qwen2 with its
q/k/v biases and tied embeddings; Mistral with `sliding_window` (8) below the sequence
length (24), so the window changes the logits (checked below), and head_dim !=
hidden_size / heads. All three are float32, vocab 128, hidden 64, 2 layers; the whole
folder stays below 1 MB.

Rerun (needs torch + transformers, which sparse_jax itself does not; Python 3.11 here):

    python3 -m venv /tmp/hf_venv
    /tmp/hf_venv/bin/pip install torch==2.13.0 transformers safetensors numpy
    cd <repo root> && /tmp/hf_venv/bin/python tests/golden/make_hf_golden.py

Written with transformers 5.24.0 and torch 2.13.0+cpu (versions are stored in each npz).

RoPE scaling (`python tests/golden/make_hf_golden.py rope` writes only these, with
transformers 5.25.0): four smaller checkpoints `hf/rope_<type>/` (vocab 32, hidden 32,
head_dim 16, 2 layers, 40 tokens, ~60 KB each) whose `logits.npz` also holds
`decode_logits`, transformers' logits decoding one token at a time with its KV cache
(equal to the prefill logits except for dynamic NTK, whose frequencies follow each call's
length):

* `rope_llama3`: Llama, llama3 scaling (factor 8, low 1, high 4, original 64; head_dim 16
  puts frequencies in all three bands),
* `rope_linear`: Mistral with a sliding window of 12, linear scaling (factor 4),
* `rope_dynamic`: Llama, dynamic NTK (factor 2, max_position_embeddings 16 < 40 tokens),
* `rope_yarn`: Qwen2, YaRN (factor 4, original 16, theta 100: a ramp over five dims).

The script checks that each scaling changes the logits (> 1e-2 against the same weights
with plain RoPE). `hf/rope_frequencies.json` holds transformers' `inv_freq` and
`attention_scaling` after a forward of `seq_len` positions for more configs (Llama 3.1's
and Qwen2.5's real values, the 4.x `rope_scaling` / `type` form, YaRN options).
"""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
import torch
import transformers

OUT = pathlib.Path(__file__).resolve().parent / "hf"
SEED = 0
BATCH, SEQ, PAD = 2, 24, 5          # row 1 starts with PAD padding slots
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
              max_position_embeddings=64, rms_norm_eps=1e-5, hidden_act="silu",
              attn_implementation="eager", torch_dtype=torch.float32)


def family_configs():
    llama = transformers.LlamaConfig(num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                     rope_theta=50000.0, tie_word_embeddings=False, **COMMON)
    qwen2 = transformers.Qwen2Config(num_attention_heads=4, num_key_value_heads=2,
                                     rope_theta=20000.0, tie_word_embeddings=True,
                                     use_sliding_window=False, **COMMON)
    mistral = transformers.MistralConfig(num_attention_heads=4, num_key_value_heads=1, head_dim=8,
                                         rope_theta=10000.0, sliding_window=8,
                                         tie_word_embeddings=False, **COMMON)
    return {"llama": (transformers.LlamaForCausalLM, llama),
            "qwen2": (transformers.Qwen2ForCausalLM, qwen2),
            "mistral": (transformers.MistralForCausalLM, mistral)}


def inputs(vocab_size: int):
    """Token ids, transformers' attention mask / position ids, and sparse_jax positions."""
    rng = np.random.default_rng(SEED)
    tokens = rng.integers(1, vocab_size, size=(BATCH, SEQ)).astype(np.int32)
    mask = np.ones((BATCH, SEQ), np.int64)
    mask[1, :PAD] = 0
    tokens[1, :PAD] = 0
    positions = np.cumsum(mask, axis=1) - 1
    positions[mask == 0] = -1
    hf_position_ids = np.maximum(positions, 0)
    return tokens, mask, hf_position_ids, positions.astype(np.int32)


def randomize_(model, seed: int):
    """Non-trivial values for every parameter (transformers inits biases and norms to 0 / 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=gen))


def logits_of(model, tokens, mask, position_ids):
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                    attention_mask=torch.as_tensor(mask),
                    position_ids=torch.as_tensor(position_ids, dtype=torch.long))
    return out.logits.float().numpy()


def main():
    torch.manual_seed(SEED)
    for i, (family, (cls, config)) in enumerate(family_configs().items()):
        model = cls(config).eval()
        randomize_(model, SEED + i)
        tokens, mask, hf_position_ids, positions = inputs(config.vocab_size)
        logits = logits_of(model, tokens, mask, hf_position_ids)
        if family == "mistral":       # the window must matter at this length
            model.config.sliding_window = None        # read by the mask and the attention
            unwindowed = logits_of(model, tokens, mask, hf_position_ids)
            model.config.sliding_window = 8
            diff = float(np.abs(unwindowed - logits)[0, 8:].max())
            assert diff > 1e-2, f"sliding window does not change the logits ({diff})"
            assert np.allclose(logits_of(model, tokens, mask, hf_position_ids), logits)
        folder = OUT / family
        model.save_pretrained(folder, safe_serialization=True)
        np.savez(folder / "logits.npz", tokens=tokens, positions=positions, logits=logits,
                 versions=np.array(f"transformers {transformers.__version__}, torch {torch.__version__}"))
        print(family, "logits", logits.shape, "max |logit|", float(np.abs(logits).max()))
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"total golden size {total / 1e6:.3f} MB")
    assert total < 1e6, total


ROPE_SEQ = 40
ROPE_COMMON = dict(vocab_size=32, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=2, num_key_value_heads=1, head_dim=16, rms_norm_eps=1e-5,
                   hidden_act="silu", attn_implementation="eager", torch_dtype=torch.float32)


def rope_configs():
    """Checkpoint name -> (model class, config) of the RoPE-scaling goldens."""
    llama3 = transformers.LlamaConfig(
        max_position_embeddings=512, tie_word_embeddings=False, **ROPE_COMMON,
        rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=64))
    linear = transformers.MistralConfig(
        max_position_embeddings=64, sliding_window=12, tie_word_embeddings=False, **ROPE_COMMON,
        rope_parameters=dict(rope_type="linear", rope_theta=1000.0, factor=4.0))
    dynamic = transformers.LlamaConfig(
        max_position_embeddings=16, tie_word_embeddings=False, **ROPE_COMMON,
        rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0))
    yarn = transformers.Qwen2Config(
        max_position_embeddings=64, tie_word_embeddings=True, use_sliding_window=False, **ROPE_COMMON,
        rope_parameters=dict(rope_type="yarn", rope_theta=100.0, factor=4.0, original_max_position_embeddings=16))
    return {"rope_llama3": (transformers.LlamaForCausalLM, llama3),
            "rope_linear": (transformers.MistralForCausalLM, linear),
            "rope_dynamic": (transformers.LlamaForCausalLM, dynamic),
            "rope_yarn": (transformers.Qwen2ForCausalLM, yarn)}


def rope_inputs(vocab_size: int):
    rng = np.random.default_rng(SEED + 1)
    tokens = rng.integers(1, vocab_size, size=(BATCH, ROPE_SEQ)).astype(np.int32)
    mask = np.ones((BATCH, ROPE_SEQ), np.int64)
    mask[1, :PAD] = 0
    tokens[1, :PAD] = 0
    positions = np.cumsum(mask, axis=1) - 1
    positions[mask == 0] = -1
    return tokens, mask, np.maximum(positions, 0), positions.astype(np.int32)


def decode_logits_of(model, tokens, mask, position_ids):
    """transformers' logits feeding one token per forward, with its KV cache."""
    cache, out = transformers.DynamicCache(config=model.config), []
    with torch.no_grad():
        for t in range(tokens.shape[1]):
            step = model(input_ids=torch.as_tensor(tokens[:, t:t + 1], dtype=torch.long),
                         attention_mask=torch.as_tensor(mask[:, :t + 1]),
                         position_ids=torch.as_tensor(position_ids[:, t:t + 1], dtype=torch.long),
                         past_key_values=cache, use_cache=True)
            cache = step.past_key_values
            out.append(step.logits.float().numpy())
    return np.concatenate(out, axis=1)


def write_rope_checkpoints():
    for i, (name, (cls, config)) in enumerate(rope_configs().items()):
        torch.manual_seed(SEED)
        model = cls(config).eval()
        randomize_(model, SEED + 10 + i)
        tokens, mask, hf_position_ids, positions = rope_inputs(config.vocab_size)
        logits = logits_of(model, tokens, mask, hf_position_ids)
        decode = decode_logits_of(model, tokens, mask, hf_position_ids)
        valid = positions >= 0
        gap = float(np.abs(decode - logits)[valid].max())
        if name == "rope_dynamic":
            assert gap > 1e-3, f"dynamic NTK: decode equals prefill ({gap})"
        else:
            assert gap < 1e-4, f"{name}: decode differs from prefill ({gap})"
        plain = config.to_dict()
        plain["rope_parameters"] = dict(rope_type="default", rope_theta=config.rope_parameters["rope_theta"])
        unscaled = cls(type(config).from_dict(plain)).eval()
        unscaled.load_state_dict(model.state_dict())
        diff = float(np.abs(logits_of(unscaled, tokens, mask, hf_position_ids) - logits)[valid].max())
        assert diff > 1e-2, f"{name}: the scaling does not change the logits ({diff})"
        folder = OUT / name
        model.save_pretrained(folder, safe_serialization=True)
        (folder / "generation_config.json").unlink(missing_ok=True)
        np.savez(folder / "logits.npz", tokens=tokens, positions=positions, logits=logits, decode_logits=decode,
                 versions=np.array(f"transformers {transformers.__version__}, torch {torch.__version__}"))
        print(name, "logits", logits.shape, "decode - prefill", gap, "scaled - plain", diff)


ROPE_BASE = dict(vocab_size=32, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=4, num_key_value_heads=4)


def frequency_cases():
    """(model_type, config.json dict, seq_len) of the frequency table."""
    llama31 = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=8192)
    big = dict(ROPE_BASE, hidden_size=512, head_dim=128)
    yarn = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16)
    return [
        ("llama", dict(big, max_position_embeddings=131072, rope_parameters=llama31), 10),
        ("llama", dict(big, max_position_embeddings=131072, rope_scaling=dict(llama31, rope_theta=None),
                       rope_theta=500000.0), 10),                                        # 4.x form
        ("llama", dict(ROPE_BASE, max_position_embeddings=256, rope_scaling={
            "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0}), 10),
        ("qwen2", dict(big, max_position_embeddings=131072, rope_theta=1e6, rope_scaling={
            "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}), 10),   # Qwen2.5
        ("qwen2", dict(ROPE_BASE, max_position_embeddings=64, rope_parameters=yarn), 10),
        ("qwen2", dict(ROPE_BASE, max_position_embeddings=64, rope_parameters=dict(yarn, truncate=False)), 10),
        ("llama", dict(ROPE_BASE, max_position_embeddings=64, rope_parameters=dict(
            yarn, beta_fast=8.0, beta_slow=2.0, mscale=1.0, mscale_all_dim=0.5)), 10),
        ("mistral", dict(ROPE_BASE, max_position_embeddings=64, rope_parameters=dict(
            yarn, attention_factor=1.25)), 10),
        ("mistral", dict(ROPE_BASE, max_position_embeddings=64, rope_theta=1000.0,
                         rope_scaling={"type": "linear", "factor": 2.5}), 10),
    ] + [("llama", dict(ROPE_BASE, max_position_embeddings=16, rope_parameters=dict(
        rope_type="dynamic", rope_theta=10000.0, factor=3.0)), n) for n in (5, 16, 17, 100)]


def write_frequency_table():
    rotary = {"llama": transformers.models.llama.modeling_llama.LlamaRotaryEmbedding,
              "qwen2": transformers.models.qwen2.modeling_qwen2.Qwen2RotaryEmbedding,
              "mistral": transformers.models.mistral.modeling_mistral.MistralRotaryEmbedding}
    classes = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
               "mistral": transformers.MistralConfig}
    cases = []
    for model_type, config_json, seq_len in frequency_cases():
        config_json = dict(config_json, model_type=model_type)
        for key in ("rope_parameters", "rope_scaling"):       # None values mean "absent" in the file
            if key in config_json:
                config_json[key] = {k: v for k, v in config_json[key].items() if v is not None}
        emb = rotary[model_type](classes[model_type].from_dict(dict(config_json)))
        x = torch.zeros(1, seq_len, 1)
        emb(x, torch.arange(seq_len)[None])
        cases.append(dict(config=config_json, seq_len=seq_len, inv_freq=emb.inv_freq.tolist(),
                          attention_scaling=float(emb.attention_scaling)))
    (OUT / "rope_frequencies.json").write_text(json.dumps(dict(
        versions=f"transformers {transformers.__version__}, torch {torch.__version__}", cases=cases), indent=0))
    print("frequency cases", len(cases))


if __name__ == "__main__":
    if sys.argv[1:] == ["rope"]:
        write_rope_checkpoints()
        write_frequency_table()
    else:
        main()
        write_rope_checkpoints()
        write_frequency_table()
