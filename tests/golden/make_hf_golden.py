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
"""

from __future__ import annotations

import pathlib

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


if __name__ == "__main__":
    main()
