"""llama2.c checkpoints (Karpathy's "legacy v0" `.bin` export) -> latro-jax model checkpoints.

The file is a header of 7 little-endian int32

    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, max_seq_len

(vocab_size < 0: the classifier is not tied to the embedding and follows at the end), then float32
tensors in PyTorch [out, in] layout, each stacked over layers where it has one per layer:

    tok_embeddings [vocab, dim], attention_norm [L, dim], wq [L, dim, dim], wk [L, kv_dim, dim],
    wv [L, kv_dim, dim], wo [L, dim, dim], ffn_norm [L, dim], w1 [L, hidden, dim],
    w2 [L, dim, hidden], w3 [L, hidden, dim], norm [dim], freq_cis_real [max_seq_len, head_dim/2],
    freq_cis_imag [max_seq_len, head_dim/2], wcls [vocab, dim] (only when untied)

Each tensor is handed to `params_from_tensors` under its HF Llama name, so the one weight table in
latro_jax.convert.weights places it. llama2.c rotates interleaved pairs (x[2i], x[2i+1]); our
model, like HF, rotates the half-split pairs (x[i], x[i + head_dim/2]), so the rows of wq and wk
are permuted per head as transformers' `convert_llama_weights_to_hf` does. The RoPE tables are
skipped: run.c ignores them too and always uses theta 10000.
"""

from __future__ import annotations

import math
import os

import numpy as np

from latro_jax.checkpoint import save_model
from latro_jax.config import ModelConfig
from latro_jax.convert.weights import WeightError, check_names, params_from_tensors
from latro_jax.model import abstract_params

HEADER = np.dtype("<i4")
FLOAT = np.dtype("<f4")
HEADER_FIELDS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len")
HEADER_BYTES = len(HEADER_FIELDS) * HEADER.itemsize
# The first int32 of llama2.c's later export versions (v1, v2): "ak42".
VERSIONED_MAGIC = 0x616B3432

# HF name within layer i -> (llama2.c tensor, for RoPE projections the ModelConfig field giving
# the number of heads whose rows are permuted).
LAYER_TENSORS = {
    "input_layernorm.weight": ("attention_norm", None),
    "self_attn.q_proj.weight": ("wq", "num_heads"),
    "self_attn.k_proj.weight": ("wk", "num_kv_heads"),
    "self_attn.v_proj.weight": ("wv", None),
    "self_attn.o_proj.weight": ("wo", None),
    "post_attention_layernorm.weight": ("ffn_norm", None),
    "mlp.gate_proj.weight": ("w1", None),
    "mlp.down_proj.weight": ("w2", None),
    "mlp.up_proj.weight": ("w3", None),
}


def interleaved_to_half_split(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a q or k projection [heads*head_dim, in] for interleaved-pair RoPE, reordered for
    half-split RoPE: within each head, rows 0,2,4,.. then 1,3,5,.. (transformers' `permute`)."""
    rows, cols = weight.shape
    return weight.reshape(heads, rows // heads // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def read_header(path: str) -> dict[str, int]:
    """The 7 header fields, validated; raises WeightError naming `path`."""
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise WeightError(f"{path}: {size} bytes, too short for a llama2.c header ({HEADER_BYTES} bytes)")
    values = np.fromfile(path, dtype=HEADER, count=len(HEADER_FIELDS))
    if values[0] == VERSIONED_MAGIC:
        raise WeightError(
            f"{path}: a llama2.c versioned export (magic 'ak42'); only the legacy v0 format is read "
            "(export with llama2.c's `export.py --version 0`)"
        )
    header = dict(zip(HEADER_FIELDS, (int(v) for v in values)))
    vocab = abs(header["vocab_size"])
    fields = {**header, "vocab_size": vocab}
    if any(v <= 0 for v in fields.values()):
        raise WeightError(f"{path}: not a llama2.c checkpoint (header {header})")
    dim, heads, kv_heads = header["dim"], header["n_heads"], header["n_kv_heads"]
    if dim % heads or (dim // heads) % 2 or heads % kv_heads:
        raise WeightError(
            f"{path}: not a llama2.c checkpoint (header {header}: dim must split into n_heads heads of "
            "even size, n_heads must be a multiple of n_kv_heads)"
        )
    return header


def tensor_layout(header: dict[str, int]) -> tuple[dict[str, tuple[int, tuple[int, ...]]], int]:
    """llama2.c tensor name -> (byte offset in the file, shape), in file order; and the file size."""
    dim, hidden, layers = header["dim"], header["hidden_dim"], header["n_layers"]
    heads, kv_heads, seq = header["n_heads"], header["n_kv_heads"], header["max_seq_len"]
    vocab, head_dim = abs(header["vocab_size"]), dim // header["n_heads"]
    shapes = {
        "tok_embeddings": (vocab, dim),
        "attention_norm": (layers, dim),
        "wq": (layers, heads * head_dim, dim),
        "wk": (layers, kv_heads * head_dim, dim),
        "wv": (layers, kv_heads * head_dim, dim),
        "wo": (layers, dim, heads * head_dim),
        "ffn_norm": (layers, dim),
        "w1": (layers, hidden, dim),
        "w2": (layers, dim, hidden),
        "w3": (layers, hidden, dim),
        "norm": (dim,),
        "freq_cis_real": (seq, head_dim // 2),
        "freq_cis_imag": (seq, head_dim // 2),
    }
    if header["vocab_size"] < 0:
        shapes["wcls"] = (vocab, dim)
    layout, offset = {}, HEADER_BYTES
    for name, shape in shapes.items():
        layout[name] = (offset, shape)
        offset += math.prod(shape) * FLOAT.itemsize
    return layout, offset


def config_from_header(header: dict[str, int], param_dtype: str = "float32") -> ModelConfig:
    return ModelConfig(
        model_type="llama",
        vocab_size=abs(header["vocab_size"]),
        hidden_size=header["dim"],
        intermediate_size=header["hidden_dim"],
        num_layers=header["n_layers"],
        num_heads=header["n_heads"],
        num_kv_heads=header["n_kv_heads"],
        head_dim=header["dim"] // header["n_heads"],
        rms_norm_eps=1e-5,
        max_position_embeddings=header["max_seq_len"],
        tie_word_embeddings=header["vocab_size"] > 0,
        bos_token_id=1,
        eos_token_ids=(2,),
        param_dtype=param_dtype,
    )


def load_llama2c(path: str | os.PathLike, param_dtype: str = "float32"):
    """Read a llama2.c legacy checkpoint. Returns (ModelConfig, params), params in `param_dtype`."""
    path = os.fspath(path)
    header = read_header(path)
    config = config_from_header(header, param_dtype)
    layout, expected = tensor_layout(header)
    actual = os.path.getsize(path)
    if actual != expected:
        raise WeightError(
            f"{path}: {actual} bytes, expected {expected} for a llama2.c legacy checkpoint with header "
            f"{header} (truncated, or not this format)"
        )

    # HF name -> (llama2.c tensor, layer or None, heads to permute the rows of or None)
    sources = {"model.embed_tokens.weight": ("tok_embeddings", None, None), "model.norm.weight": ("norm", None, None)}
    if not config.tie_word_embeddings:
        sources["lm_head.weight"] = ("wcls", None, None)
    for i in range(config.num_layers):
        for suffix, (tensor, heads_field) in LAYER_TENSORS.items():
            heads = getattr(config, heads_field) if heads_field else None
            sources[f"model.layers.{i}.{suffix}"] = (tensor, i, heads)
    check_names(config, set(sources), path)

    def read(name: str) -> tuple[np.ndarray, str]:
        tensor, layer, heads = sources[name]
        offset, shape = layout[tensor]
        if layer is not None:
            shape = shape[1:]
            offset += layer * math.prod(shape) * FLOAT.itemsize
        weight = np.fromfile(path, dtype=FLOAT, count=math.prod(shape), offset=offset).reshape(shape)
        return (weight if heads is None else interleaved_to_half_split(weight, heads)), path

    params = params_from_tensors(config, abstract_params(config), read)
    return config, params


def convert_llama2c(
    path: str | os.PathLike,
    output: str | os.PathLike,
    tokenizer_model: str | os.PathLike | None = None,
    param_dtype: str = "float32",
) -> ModelConfig:
    """llama2.c legacy checkpoint -> latro-jax checkpoint at `output`. Returns its config.

    `tokenizer_model`, the sentencepiece model the checkpoint was trained with, is stored as
    hf/tokenizer.model.
    """
    hf_files = {}
    if tokenizer_model is not None:
        if not os.path.isfile(tokenizer_model):
            raise FileNotFoundError(f"{os.fspath(tokenizer_model)}: no such tokenizer file")
        hf_files["tokenizer.model"] = os.fspath(tokenizer_model)
    config, params = load_llama2c(path, param_dtype)
    save_model(output, config, params, hf_files)
    return config
