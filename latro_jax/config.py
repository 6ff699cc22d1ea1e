"""Model configuration: one frozen dataclass for every supported decoder family.

`ModelConfig` is hashable so it can be a static argument of `jax.jit`. `ModelConfig.from_hf`
reads a Hugging Face `config.json` (transformers v4 layout with `rope_theta`/`rope_scaling`,
or v5 layout with `rope_parameters`) and refuses anything this model does not implement, naming
the key, so that a config never loads into a model that silently computes something else.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

# model_type -> how its HF weights are laid out (see latro_jax/convert/hf.py).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "phi3", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope")
DTYPES = ("float32", "bfloat16", "float16")
# What the backward pass of a training forward recomputes (ModelConfig.remat):
#   none         nothing: every layer's activations are kept
#   full         each layer, from its input (the least memory; about one more forward pass)
#   projections  keeps each layer's q, k, v, o, gate and up projections and recomputes only the
#                attention scores and elementwise work (at Llama-3.1-8B's shape ~78 KB per token
#                per layer in bfloat16; nearly the compute of `none`)
REMAT_MODES = ("none", "full", "projections")
# How attention over a whole sequence (the prefill, scoring, the training forward) is computed
# (ModelConfig.attention); a decode step attends over the KV cache with the einsums either way:
#   xla    this project's einsums, the same on every backend
#   cudnn  jax.nn.dot_product_attention's cuDNN flash attention (NVIDIA GPUs; bfloat16 or float16,
#          head_dim a multiple of 8 up to 128). Not yet checked on a GPU: hence not the default.
ATTENTION_MODES = ("xla", "cudnn")


def remat_mode(value: bool | str) -> str:
    """A remat setting as one of REMAT_MODES, in any case; true/yes/1 read as full and false/no/0
    as none (the setting was a flag in a run's config.json of an earlier version). ValueError
    naming the allowed modes otherwise."""
    if isinstance(value, str):
        value = value.strip().lower()
        value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(value, value)
    mode = ("full" if value else "none") if isinstance(value, bool) else value
    if mode not in REMAT_MODES:
        raise ValueError(f"allowed: {', '.join(REMAT_MODES)}")
    return mode


def attention_mode(value: str) -> str:
    """`value` if it is one of ATTENTION_MODES; ValueError naming the allowed modes otherwise."""
    if value not in ATTENTION_MODES:
        raise ValueError(f"allowed: {', '.join(ATTENTION_MODES)}")
    return value


class ConfigError(ValueError):
    """A model config that latro-jax cannot represent exactly."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters. Factors are tuples so the config stays hashable."""

    theta: float = 10000.0
    type: str = "default"
    factor: float | None = None
    # llama3
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None
    # longrope (Phi-3 "su"/"longrope")
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    attention_factor: float | None = None
    partial_rotary_factor: float = 1.0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer of the Llama family.

    `sliding_windows` has one entry per layer: the window in tokens, or None for full attention.
    `dtype` is the compute dtype, `param_dtype` the dtype parameters are stored in. `remat`
    trades compute for memory in gradients: what the backward pass recomputes (REMAT_MODES).
    `attention`: which kernel computes attention over a whole sequence (ATTENTION_MODES).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope: RopeConfig = RopeConfig()
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False
    sliding_windows: tuple[int | None, ...] = ()
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"  # none | full | projections: see REMAT_MODES
    attention: str = "xla"  # xla | cudnn: see ATTENTION_MODES

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type={self.model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.rope.type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"rope type {self.rope.type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        try:
            object.__setattr__(self, "remat", remat_mode(self.remat))
        except ValueError as e:
            raise ConfigError(f"remat={self.remat!r}; {e}") from None
        try:
            attention_mode(self.attention)
        except ValueError as e:
            raise ConfigError(f"attention={self.attention!r}; {e}") from None
        for field in ("dtype", "param_dtype"):
            if getattr(self, field) not in DTYPES:
                raise ConfigError(f"{field}={getattr(self, field)!r}; allowed: {', '.join(DTYPES)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}"
            )
        if not self.sliding_windows:
            object.__setattr__(self, "sliding_windows", (None,) * self.num_layers)
        if len(self.sliding_windows) != self.num_layers:
            raise ConfigError(
                f"sliding_windows has {len(self.sliding_windows)} entries for {self.num_layers} layers"
            )
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise ConfigError(f"rotary dimension {self.rotary_dim} must be even and <= head_dim={self.head_dim}")
        if self.rope.type == "longrope":
            for name in ("short_factor", "long_factor"):
                factors = getattr(self.rope, name)
                if factors is None or len(factors) != self.rotary_dim // 2:
                    raise ConfigError(
                        f"rope {name} must have {self.rotary_dim // 2} entries (rotary_dim/2), got "
                        f"{None if factors is None else len(factors)}"
                    )

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rope.partial_rotary_factor)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf(cls, source: str | os.PathLike | dict[str, Any], **overrides) -> "ModelConfig":
        """Build from an HF `config.json` (a path to the file or its directory) or its parsed dict."""
        origin = "config dict"
        if not isinstance(source, dict):
            path = os.fspath(source)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.isfile(path):
                raise ConfigError(f"{path}: no such config file")
            origin = path
            with open(path, "rb") as f:
                try:
                    source = json.loads(f.read())
                except ValueError as e:  # not JSON, or not text at all
                    raise ConfigError(f"{path}: not valid JSON ({e})") from None
            if not isinstance(source, dict):
                raise ConfigError(f"{path}: not an HF config (a JSON object), but a {type(source).__name__}")
        try:
            return cls(**{**_fields_from_hf(source), **overrides})
        except ConfigError as e:
            raise ConfigError(f"{origin}: {e}") from None
        except KeyError as e:
            raise ConfigError(f"{origin}: required key {e.args[0]!r} is missing") from None

    def to_hf(self) -> dict[str, Any]:
        """An HF `config.json` dict (transformers v5 layout) describing this architecture."""
        family = _HF_FAMILY[self.model_type]
        cfg: dict[str, Any] = {
            "architectures": [family["architecture"]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos_for_hf(self.eos_token_ids),
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.param_dtype,
            "rope_parameters": _rope_to_hf(self.rope),
        }
        if self.model_type in ("llama", "qwen3"):
            cfg["attention_bias"] = self.qkv_bias
        if self.model_type == "llama":
            cfg["mlp_bias"] = False
        windows = {w for w in self.sliding_windows}
        if self.model_type in ("mistral", "phi3"):
            if len(windows) > 1:
                raise ConfigError(f"{self.model_type} has one sliding window for all layers, got {windows}")
            cfg["sliding_window"] = windows.pop()
        elif self.model_type in ("qwen2", "qwen3"):
            sliding = [w for w in self.sliding_windows if w is not None]
            cfg["use_sliding_window"] = bool(sliding)
            cfg["sliding_window"] = sliding[0] if sliding else None
            cfg["layer_types"] = ["full_attention" if w is None else "sliding_attention" for w in self.sliding_windows]
        elif windows != {None}:
            raise ConfigError(f"{self.model_type} has no sliding window attention")
        if self.rope.type == "longrope" and self.model_type == "phi3":
            cfg["original_max_position_embeddings"] = self.rope.original_max_position_embeddings
        return cfg


_HF_FAMILY = {
    "llama": {"architecture": "LlamaForCausalLM"},
    "mistral": {"architecture": "MistralForCausalLM"},
    "phi3": {"architecture": "Phi3ForCausalLM"},
    "qwen2": {"architecture": "Qwen2ForCausalLM"},
    "qwen3": {"architecture": "Qwen3ForCausalLM"},
}


def eos_for_hf(ids: tuple[int, ...]) -> int | list[int] | None:
    """HF writes one EOS id as an int, several as a list, none as null."""
    return None if not ids else ids[0] if len(ids) == 1 else list(ids)


def _as_tuple(ids) -> tuple[int, ...]:
    if ids is None:
        return ()
    return tuple(ids) if isinstance(ids, (list, tuple)) else (int(ids),)


def _rope_from_hf(hf: dict[str, Any]) -> RopeConfig:
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise ConfigError("per-layer-type rope_parameters are not supported")
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type == "su":  # Phi-3 checkpoints from before "longrope" was the name
        rope_type = "longrope"
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    partial = params.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    original_max = params.pop("original_max_position_embeddings", hf.get("original_max_position_embeddings"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    known = {
        "default": set(),
        "linear": {"factor"},
        "llama3": {"factor", "low_freq_factor", "high_freq_factor"},
        "longrope": {"factor", "short_factor", "long_factor", "attention_factor"},
    }[rope_type]
    unknown = set(params) - known
    if unknown:
        raise ConfigError(f"rope option(s) {sorted(unknown)} are not supported for rope type {rope_type!r}")
    if rope_type == "linear" and "factor" not in params:
        raise ConfigError("rope type 'linear' needs rope_parameters['factor']")
    if rope_type == "llama3":
        for key in ("factor", "low_freq_factor", "high_freq_factor"):
            if key not in params:
                raise ConfigError(f"rope type 'llama3' needs rope_parameters[{key!r}]")
        if original_max is None:
            raise ConfigError("rope type 'llama3' needs original_max_position_embeddings")
    if rope_type == "longrope":
        original_max = original_max or hf.get("max_position_embeddings")
        factor = params.get("factor")
        if factor is None:
            factor = hf["max_position_embeddings"] / original_max
        params["factor"] = factor
    tuples = {k: tuple(float(x) for x in v) for k, v in params.items() if isinstance(v, list)}
    return RopeConfig(
        theta=float(theta),
        type=rope_type,
        partial_rotary_factor=float(partial),
        original_max_position_embeddings=original_max,
        **{**params, **tuples},
    )


def _rope_to_hf(rope: RopeConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"rope_type": rope.type, "rope_theta": rope.theta}
    if rope.partial_rotary_factor != 1.0:
        out["partial_rotary_factor"] = rope.partial_rotary_factor
    for key in ("factor", "low_freq_factor", "high_freq_factor", "attention_factor", "original_max_position_embeddings"):
        value = getattr(rope, key)
        if value is not None:
            out[key] = value
    for key in ("short_factor", "long_factor"):
        value = getattr(rope, key)
        if value is not None:
            out[key] = list(value)
    return out


def _fields_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"model_type={model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"hidden_act={act!r} is not supported (only 'silu')")
    if hf.get("mlp_bias"):
        raise ConfigError("mlp_bias=true is not supported")
    num_heads = hf["num_attention_heads"]
    num_layers = hf["num_hidden_layers"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
    window = hf.get("sliding_window")
    if model_type in ("qwen2", "qwen3"):
        if hf.get("use_sliding_window"):
            layer_types = hf.get("layer_types") or [
                "sliding_attention" if i >= hf.get("max_window_layers", 28) else "full_attention"
                for i in range(num_layers)
            ]
            windows = tuple(window if t == "sliding_attention" else None for t in layer_types)
        else:
            windows = (None,) * num_layers
    elif model_type in ("mistral", "phi3"):
        windows = (window,) * num_layers
    else:
        windows = (None,) * num_layers
    bias = bool(hf.get("attention_bias", False))
    return dict(
        model_type=model_type,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=head_dim,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope=_rope_from_hf(hf),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or bias,
        o_bias=model_type in ("llama", "qwen3") and bias,
        qk_norm=model_type == "qwen3",
        sliding_windows=windows,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_as_tuple(hf.get("eos_token_id")),
        pad_token_id=hf.get("pad_token_id"),
    )
