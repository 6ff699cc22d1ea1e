"""Tiny random transformers models (PyTorch, f32), one per supported family, configured so that
what differs between families is exercised: Llama 3.1 rope scaling, a Mistral sliding window
shorter than the test sequences, Phi-3 LongRoPE with positions past its original context,
Qwen2 biases with tied embeddings, Qwen3 q/k norms."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from latro_jax.checkpoint import load_model
from latro_jax.convert.hf import convert_hf

VOCAB = 128
BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
FAMILIES = {
    "llama": dict(
        model_type="llama",
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=16,
        ),
    ),
    "mistral": dict(model_type="mistral", sliding_window=5),
    "phi3": dict(
        model_type="phi3",
        original_max_position_embeddings=8,
        rope_parameters=dict(
            rope_type="longrope",
            rope_theta=10000.0,
            short_factor=[1.0 + 0.1 * i for i in range(8)],
            long_factor=[1.5 + 0.3 * i for i in range(8)],
            original_max_position_embeddings=8,
        ),
    ),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", head_dim=32),
}


def within_original_context(family: str) -> dict:
    """Overrides keeping a test's contexts inside Phi-3 LongRoPE's original length (32 here).
    Past it, the long factors apply to the whole sequence (as in transformers, whose generate
    then re-prefills), so a KV cache built before the switch differs by design."""
    if family != "phi3":
        return {}
    rope = dict(FAMILIES["phi3"]["rope_parameters"], original_max_position_embeddings=32)
    return dict(rope_parameters=rope, original_max_position_embeddings=32)


def make_hf_model(family: str, seed: int = 0, dtype=torch.float32, **overrides):
    """A tiny random `*ForCausalLM` in eval mode. Weights are perturbed away from their
    initialisation (norm scales of exactly 1, biases of exactly 0 would hide layout bugs)."""
    kwargs = {**BASE, **FAMILIES[family], **overrides}
    model_type = kwargs.pop("model_type")
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def mixed_batch(seed: int = 0, batch: int = 4, length: int = 12):
    """ids [B, T], attention mask and positions for a batch with a left-padded row, a
    right-padded row and full rows. Positions count real tokens only; transformers gets 1 on
    padding, as its generate does."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :4] = 0
    mask[1, length - 3 :] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0) * mask
    return ids, mask, positions


def convert(model, tmp_path):
    """Save a transformers model, convert it, and load it: (ModelConfig, params)."""
    model.save_pretrained(tmp_path / "hf")
    convert_hf(str(tmp_path / "hf"), tmp_path / "ckpt")
    return load_model(tmp_path / "ckpt")


def hf_logits(model, ids, mask, positions):
    """transformers' logits with positions given explicitly (1 on padding, as its generate does)."""
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions.masked_fill(mask == 0, 1)).logits.numpy()


def assert_exported_logits(config, params, exported):
    """transformers' logits of the exported HF directory `exported` equal latro-jax's of `params`
    on a mixed batch (float32: 1e-4, for the two libraries' different summation orders)."""
    import jax.numpy as jnp
    import numpy as np

    from latro_jax.model import forward

    model = AutoModelForCausalLM.from_pretrained(exported, attn_implementation="eager", dtype=torch.float32).eval()
    ids, mask, positions = mixed_batch(length=10)
    ids = ids % config.vocab_size
    ours, _ = forward(config, params, jnp.asarray(ids.numpy()), jnp.asarray(positions.numpy()),
                      jnp.asarray(mask.numpy().astype(bool)))
    real = mask.numpy().astype(bool)
    np.testing.assert_allclose(hf_logits(model, ids, mask, positions)[real], np.asarray(ours)[real], atol=1e-4)
