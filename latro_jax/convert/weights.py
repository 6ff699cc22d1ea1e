"""The one table that relates Hugging Face tensor names to latro-jax parameters, both directions.

Each HF tensor is one or more `Piece`s stacked along its first dimension (Phi-3 fuses q/k/v into
`qkv_proj` and gate/up into `gate_up_proj`). A piece is either a linear layer (HF `[out, in]`,
transposed and reshaped to ours) or a plain array (reshaped). Transposes and reshapes only, so
import followed by export reproduces every tensor bit for bit.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
from flax import nnx

from latro_jax.config import ModelConfig

Path = tuple  # a key path into the params state, e.g. ("layers", 0, "attn", "q_proj")


class WeightError(ValueError):
    """Weights that cannot be read or written as asked: missing, unexpected or misshapen tensors, a
    damaged safetensors file, a bad shard size."""


@dataclasses.dataclass(frozen=True)
class Piece:
    path: Path
    shape: tuple[int, ...]  # ours
    hf_shape: tuple[int, ...]  # this piece's rows of the HF tensor
    linear: bool  # HF [out, in] -> ours [in, ...]: transpose

    def to_ours(self, hf: np.ndarray) -> np.ndarray:
        return (hf.T if self.linear else hf).reshape(self.shape)

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        if self.linear:
            return np.ascontiguousarray(ours.reshape(self.hf_shape[::-1]).T)
        return ours.reshape(self.hf_shape)


def weight_map(cfg: ModelConfig) -> dict[str, list[Piece]]:
    """HF tensor name -> the pieces of our params it holds, in row order."""
    d, h, kv, hd, m = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size

    def linear(path, shape, in_dims=1):
        """Ours: the first `in_dims` axes are the input features; HF: [out, in] flattened."""
        return Piece(path, shape, (math.prod(shape[in_dims:]), math.prod(shape[:in_dims])), linear=True)

    def vector(path, shape):
        return Piece(path, shape, (math.prod(shape),), linear=False)

    table: dict[str, list[Piece]] = {
        "model.embed_tokens.weight": [Piece(("embed",), (cfg.vocab_size, d), (cfg.vocab_size, d), linear=False)],
        "model.norm.weight": [vector(("final_norm", "scale"), (d,))],
    }
    if not cfg.tie_word_embeddings:
        table["lm_head.weight"] = [Piece(("lm_head",), (d, cfg.vocab_size), (cfg.vocab_size, d), linear=True)]
    fused = cfg.model_type == "phi3"
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}.", ("layers", i)
        attn, mlp = ours + ("attn",), ours + ("mlp",)
        table[hf + "input_layernorm.weight"] = [vector(ours + ("input_norm", "scale"), (d,))]
        table[hf + "post_attention_layernorm.weight"] = [vector(ours + ("post_attn_norm", "scale"), (d,))]
        q = linear(attn + ("q_proj",), (d, h, hd))
        k = linear(attn + ("k_proj",), (d, kv, hd))
        v = linear(attn + ("v_proj",), (d, kv, hd))
        gate = linear(mlp + ("gate_proj",), (d, m))
        up = linear(mlp + ("up_proj",), (d, m))
        if fused:
            table[hf + "self_attn.qkv_proj.weight"] = [q, k, v]
            table[hf + "mlp.gate_up_proj.weight"] = [gate, up]
        else:
            table[hf + "self_attn.q_proj.weight"] = [q]
            table[hf + "self_attn.k_proj.weight"] = [k]
            table[hf + "self_attn.v_proj.weight"] = [v]
            table[hf + "mlp.gate_proj.weight"] = [gate]
            table[hf + "mlp.up_proj.weight"] = [up]
        table[hf + "self_attn.o_proj.weight"] = [linear(attn + ("o_proj",), (h, hd, d), in_dims=2)]
        table[hf + "mlp.down_proj.weight"] = [linear(mlp + ("down_proj",), (m, d))]
        if cfg.qkv_bias:
            table[hf + "self_attn.q_proj.bias"] = [vector(attn + ("q_bias",), (h, hd))]
            table[hf + "self_attn.k_proj.bias"] = [vector(attn + ("k_bias",), (kv, hd))]
            table[hf + "self_attn.v_proj.bias"] = [vector(attn + ("v_bias",), (kv, hd))]
        if cfg.o_bias:
            table[hf + "self_attn.o_proj.bias"] = [vector(attn + ("o_bias",), (d,))]
        if cfg.qk_norm:
            table[hf + "self_attn.q_norm.weight"] = [vector(attn + ("q_norm", "scale"), (hd,))]
            table[hf + "self_attn.k_norm.weight"] = [vector(attn + ("k_norm", "scale"), (hd,))]
    return table


def hf_shape(pieces: list[Piece]) -> tuple[int, ...]:
    first = pieces[0].hf_shape
    return (sum(p.hf_shape[0] for p in pieces),) + first[1:]


# Tensors some checkpoints carry that hold no parameters of the model.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def check_names(cfg: ModelConfig, available: set[str], where: str) -> None:
    """Raise WeightError naming the first missing tensor, or any tensor this model has no place for."""
    table = weight_map(cfg)
    missing = [name for name in table if name not in available]
    if missing:
        raise WeightError(f"{where}: tensor {missing[0]!r} is missing ({len(missing)} missing in all)")
    allowed = set(table) | ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    unexpected = sorted(n for n in available - allowed if not n.endswith(IGNORED_SUFFIXES))
    if unexpected:
        raise WeightError(
            f"{where}: tensor(s) {unexpected[:3]} have no place in a {cfg.model_type} model with this config"
            f" ({len(unexpected)} unexpected in all)"
        )


def params_from_tensors(
    cfg: ModelConfig,
    abstract: nnx.State,
    read: Callable[[str], tuple[np.ndarray, str]],
) -> nnx.State:
    """Fill `abstract` (from `model.abstract_params`) with HF tensors.

    `read(name)` returns the tensor and the file it came from (for error messages). Tensors are
    read one at a time and cast to each param's dtype immediately.
    """
    import jax.numpy as jnp

    flat = flat_params(abstract)
    for name, pieces in weight_map(cfg).items():
        tensor, where = read(name)
        expected = hf_shape(pieces)
        if tuple(tensor.shape) != expected:
            raise WeightError(f"{where}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {expected}")
        row = 0
        for piece in pieces:
            part = tensor[row : row + piece.hf_shape[0]]
            row += piece.hf_shape[0]
            var = flat[piece.path]
            flat[piece.path] = var.replace(jnp.asarray(piece.to_ours(part), dtype=var.dtype))
        del tensor
    return nnx.from_flat_state(flat)


def flat_params(params: nnx.State) -> dict[Path, nnx.Variable]:
    return dict(nnx.to_flat_state(params))


def hf_tensor(cfg: ModelConfig, flat: dict[Path, nnx.Variable], name: str, dtype=None) -> np.ndarray:
    """The HF tensor `name` built from our params (`flat_params` form), optionally cast to `dtype`."""
    parts = [piece.to_hf(np.asarray(flat[piece.path][...])) for piece in weight_map(cfg)[name]]
    tensor = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
    return tensor if dtype is None else tensor.astype(dtype)
