"""One model configuration, whatever file it came from (GGUF metadata or HF config.json)."""
from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, field

ARCHITECTURES = ("llama", "qwen2")
ACTIVATIONS = ("silu", "relu", "gelu")
KV_DTYPES = {"f32": 4, "f16": 2}  # KV-cache element types (`--kv`) and their bytes per value
DEFAULT_KV = "f32"


@dataclass
class RopeScaling:
    """Llama-3 style frequency scaling (`rope_type: llama3`); None on the config means plain RoPE."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass
class ModelConfig:
    arch: str  # "llama" (Llama 2/3, Mistral, SmolLM) or "qwen2" (q/k/v biases)
    n_layers: int
    d_model: int
    n_ff: int  # FFN intermediate size: the neurons hetinfer places and skips
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    activation: str = "silu"  # gated: act(gate(x)) * up(x)
    tied_embeddings: bool = False
    attn_bias: bool = False  # q/k/v biases (qwen2)
    rope_scaling: RopeScaling | None = None
    name: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        sizes = ("n_layers", "d_model", "n_ff", "n_heads", "n_kv_heads", "head_dim", "vocab_size", "context_length")
        for name in sizes:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"architecture {self.arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} is not supported (supported: {', '.join(ACTIVATIONS)})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        return cls(**d)

    def kv_cache_bytes(self, n_ctx: int, dtype: str = DEFAULT_KV) -> int:
        """Bytes of the keys and values of every layer for `n_ctx` tokens in a cache of `dtype` ("f32", "f16")."""
        return 2 * self.n_layers * n_ctx * self.n_kv_heads * self.head_dim * KV_DTYPES[dtype]


def config_from_manifest(d, where: str, fix: str) -> ModelConfig:
    """The ModelConfig an artefact's manifest records (`model.config`), checked field by field: a hand-edited
    or foreign one is an ArtifactError naming the field, never a KeyError or TypeError."""
    from hetinfer.errors import ArtifactError
    from hetinfer.schema import dataclass_schema, mismatch

    bad = mismatch(d, dataclass_schema(ModelConfig), "model.config")
    if bad:
        raise ArtifactError(f"{where}: {bad}; {fix}")
    try:
        return ModelConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"{where}: `model.config` is not a usable model config ({e}); {fix}") from None
