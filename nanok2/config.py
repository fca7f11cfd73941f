"""ModelArgs: the one description of a K2-architecture model, its named presets, and config.json in/out.

Every module reads the model's shape from here. The field names are transformers' DeepseekV3 names,
so `from_hf_config` / `to_hf_config` are a rename-free mapping and a config written by nanok2 loads
in transformers, vLLM and SGLang (`model_type` `kimi_k2` or `deepseek_v3`).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanok2.errors import ConfigError


@dataclass
class ModelArgs:
    # --- dims
    vocab_size: int = 163840
    hidden_size: int = 7168
    intermediate_size: int = 18432           # dense MLP of the first `first_k_dense_replace` layers
    num_hidden_layers: int = 61
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    # --- MLA (multi-head latent attention)
    num_attention_heads: int = 64
    q_lora_rank: int | None = 1536           # None: a single q_proj instead of q_a_proj -> norm -> q_b_proj
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    attention_bias: bool = False
    # --- MoE
    first_k_dense_replace: int = 1
    n_routed_experts: int = 384
    num_experts_per_tok: int = 8
    n_shared_experts: int = 1
    moe_intermediate_size: int = 2048
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.827
    # --- rope / YaRN
    rope_theta: float = 50000.0
    max_position_embeddings: int = 262144
    rope_scaling: dict | None = field(default_factory=lambda: dict(
        type="yarn", factor=64.0, beta_fast=1.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0,
        original_max_position_embeddings=4096))
    # --- tokens and format
    bos_token_id: int | None = 163584
    eos_token_id: int | None = 163586
    model_type: str = "kimi_k2"

    def __post_init__(self):
        self.validate()

    # ---- derived sizes
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Numbers cached per token per layer: the normed latent plus the shared rope key (576 for K2)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def n_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace and self.n_routed_experts > 0

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN (as transformers and DeepSeek-V3)."""
        scale = self.qk_head_dim ** -0.5
        rs = self.rope_scaling
        if rs and rs.get("type", rs.get("rope_type")) == "yarn" and rs.get("mscale_all_dim"):
            m = yarn_mscale(rs["factor"], rs["mscale_all_dim"])
            scale = scale * m * m
        return scale

    def validate(self) -> None:
        """Raise ConfigError naming the field when the shapes cannot form a model."""
        def need(cond: bool, msg: str):
            if not cond:
                raise ConfigError(f"invalid ModelArgs: {msg}")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                     "qk_nope_head_dim", "v_head_dim"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, f"{name} must be a positive int, got {getattr(self, name)!r}")
        need(self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0,
             f"qk_rope_head_dim must be positive and even (rope rotates pairs), got {self.qk_rope_head_dim}")
        need(self.q_lora_rank is None or self.q_lora_rank > 0, f"q_lora_rank must be null or > 0, got {self.q_lora_rank}")
        need(0 <= self.first_k_dense_replace <= self.num_hidden_layers,
             f"first_k_dense_replace={self.first_k_dense_replace} must be in [0, num_hidden_layers={self.num_hidden_layers}]")
        need(self.hidden_act == "silu", f"hidden_act must be 'silu' (K2's SwiGLU), got {self.hidden_act!r}")
        if self.n_moe_layers > 0 and self.n_routed_experts > 0:
            need(1 <= self.num_experts_per_tok <= self.n_routed_experts,
                 f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, n_routed_experts={self.n_routed_experts}]")
            need(self.n_group >= 1 and self.n_routed_experts % self.n_group == 0,
                 f"n_routed_experts={self.n_routed_experts} must be divisible by n_group={self.n_group}")
            need(1 <= self.topk_group <= self.n_group, f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
            if self.n_group > 1:
                per_group = self.n_routed_experts // self.n_group
                need(per_group >= 2, f"group-limited routing scores a group by its top-2 experts: "
                                     f"n_routed_experts/n_group = {per_group} must be >= 2")
                need(self.topk_group * per_group >= self.num_experts_per_tok,
                     f"topk_group={self.topk_group} groups of {per_group} experts cannot supply num_experts_per_tok={self.num_experts_per_tok}")
            need(self.moe_intermediate_size > 0, "moe_intermediate_size must be > 0")
        if self.rope_scaling:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            need(kind in ("yarn", "default", None), f"rope_scaling type {kind!r} is not supported (yarn only)")
            if kind == "yarn":
                for key in ("factor", "original_max_position_embeddings"):
                    need(key in self.rope_scaling, f"rope_scaling of type yarn needs {key!r}")

    # ---- presets
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelArgs":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
        kwargs = {**PRESETS[name], **overrides}
        return cls.from_dict(kwargs)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelArgs":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown ModelArgs field(s): {', '.join(unknown)}")
        return cls(**d)

    # ---- config.json
    @classmethod
    def from_hf_config(cls, source: str | Path | dict) -> "ModelArgs":
        """Read a transformers/vLLM `config.json` (a dict, a file, or a checkpoint folder)."""
        if isinstance(source, dict):
            cfg = dict(source)
            where = "config dict"
        else:
            path = Path(source)
            if path.is_dir():
                path = path / "config.json"
            where = str(path)
            try:
                cfg = json.loads(path.read_text())
            except FileNotFoundError:
                raise ConfigError(f"no config.json at {path}") from None
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path} is not valid JSON: {e}") from None
        model_type = cfg.get("model_type", "deepseek_v3")
        if model_type not in ("kimi_k2", "deepseek_v3"):
            raise ConfigError(f"{where}: model_type {model_type!r} is not a K2 / DeepSeek-V3 model "
                              "(expected 'kimi_k2' or 'deepseek_v3')")
        for key, expected in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc")):
            if key in cfg and cfg[key] != expected:
                raise ConfigError(f"{where}: {key}={cfg[key]!r} is not supported (K2 uses {expected!r})")
        if cfg.get("num_key_value_heads", cfg.get("num_attention_heads")) != cfg.get("num_attention_heads"):
            raise ConfigError(f"{where}: MLA needs num_key_value_heads == num_attention_heads")
        rope_scaling = cfg.get("rope_scaling")
        rope_theta = cfg.get("rope_theta")
        # transformers >= 5 writes `rope_parameters` (theta and scaling in one dict) instead
        rp = cfg.get("rope_parameters")
        if rp:
            rope_theta = rp.get("rope_theta", rope_theta)
            kind = rp.get("rope_type", rp.get("type", "default"))
            if kind != "default":
                rope_scaling = {k: v for k, v in rp.items() if k not in ("rope_theta", "rope_type")}
                rope_scaling["type"] = kind
        if rope_scaling and rope_scaling.get("type", rope_scaling.get("rope_type")) == "default":
            rope_scaling = None
        if rope_scaling and "rope_type" in rope_scaling:
            rope_scaling = {("type" if k == "rope_type" else k): v for k, v in rope_scaling.items()}
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in cfg.items() if k in known and k not in ("rope_scaling", "rope_theta")}
        kwargs["rope_scaling"] = rope_scaling
        kwargs["rope_theta"] = float(rope_theta if rope_theta is not None else 10000.0)
        kwargs["model_type"] = model_type
        for key in ("eos_token_id", "bos_token_id"):
            if isinstance(kwargs.get(key), list):
                kwargs[key] = kwargs[key][0] if kwargs[key] else None
        # fields that transformers' DeepseekV3Config defaults when absent
        defaults = dict(n_group=8, topk_group=4, first_k_dense_replace=3, n_shared_experts=1, norm_topk_prob=True,
                        routed_scaling_factor=2.5, n_routed_experts=256, rms_norm_eps=1e-6, q_lora_rank=1536,
                        max_position_embeddings=4096, tie_word_embeddings=False, num_experts_per_tok=8)
        for k, v in defaults.items():
            kwargs.setdefault(k, v)
        if cfg.get("n_group") is None:
            kwargs["n_group"] = 1
        if cfg.get("topk_group") is None:
            kwargs["topk_group"] = 1
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise ConfigError(f"{where}: {e}") from None
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    def to_hf_config(self, model_type: str | None = None, dtype: str = "bfloat16") -> dict:
        """The config.json dict transformers / vLLM / SGLang read, in K2's own layout."""
        model_type = model_type or self.model_type
        if model_type not in ("kimi_k2", "deepseek_v3"):
            raise ConfigError(f"model_type must be 'kimi_k2' or 'deepseek_v3', got {model_type!r}")
        d = dataclasses.asdict(self)
        d.update(
            architectures=["DeepseekV3ForCausalLM"],
            model_type=model_type,
            num_key_value_heads=self.num_attention_heads,
            scoring_func="sigmoid",
            topk_method="noaux_tc",
            moe_layer_freq=1,
            num_nextn_predict_layers=0,
            torch_dtype=dtype,
            use_cache=True,
            attention_dropout=0.0,
        )
        return dict(sorted(d.items()))

    def save_hf_config(self, folder: str | Path, **kw) -> Path:
        path = Path(folder) / "config.json"
        path.write_text(json.dumps(self.to_hf_config(**kw), indent=2) + "\n")
        return path


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1 * mscale * ln(factor) + 1 (≈ 1.4159 for factor 64, mscale 1)."""
    if factor <= 1:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


_K2_THINKING = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(ModelArgs)}

_TINY = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
    q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
    moe_intermediate_size=32, n_group=1, topk_group=1, routed_scaling_factor=2.5,
    rope_theta=10000.0, max_position_embeddings=4096, rope_scaling=None, bos_token_id=None, eos_token_id=None,
    model_type="deepseek_v3",   # nanok2's own models: the name transformers loads natively (kimi_k2 needs remote code)
)

# Named configurations. Values for the Kimi models are their published config.json; see k2-facts.md.
PRESETS: dict[str, dict[str, Any]] = {
    "kimi-k2-thinking": _K2_THINKING,
    "kimi-k2-instruct": {
        **_K2_THINKING,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-6,
        "eos_token_id": 163585,
        "rope_scaling": dict(type="yarn", factor=32.0, beta_fast=1.0, beta_slow=1.0, mscale=1.0,
                             mscale_all_dim=1.0, original_max_position_embeddings=4096),
    },
    # Moonlight-16B-A3B (Muon-trained, same architecture). Values from a copy of its config.json quoted
    # in public code (not the primary Hugging Face file): unverified against the original.
    "moonlight-16b-a3b": dict(
        vocab_size=163840, hidden_size=2048, intermediate_size=11264, num_hidden_layers=27, rms_norm_eps=1e-5,
        tie_word_embeddings=False, num_attention_heads=16, q_lora_rank=None, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, first_k_dense_replace=1,
        n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2, moe_intermediate_size=1408,
        n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.446, rope_theta=50000.0,
        max_position_embeddings=8192, rope_scaling=None, bos_token_id=163584, eos_token_id=163586,
        model_type="deepseek_v3",
    ),
    # Memory-bound on a CPU (≈0.75B parameters, ≈1.5 GB in bf16) with K2's proportions of the weight bytes
    # read per generated token (`nanok2 info --preset bench`): the 8 active routed experts ≈ 2/3 (K2 66.7%,
    # here 67.1%) and lm_head ≈ 3% (K2 3.7%, here 3.2%), so that both INT4 bounds are K2's: 1.92x for the
    # experts, 3.2x for all linear layers (lm_head stays bf16). The small vocabulary keeps lm_head's share
    # at K2's; a second shared expert holds the routed share at 2/3.
    "bench": dict(
        vocab_size=4096, hidden_size=1024, intermediate_size=2048, num_hidden_layers=8, rms_norm_eps=1e-5,
        num_attention_heads=8, q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32,
        v_head_dim=64, first_k_dense_replace=1, n_routed_experts=64, num_experts_per_tok=8, n_shared_experts=2,
        moe_intermediate_size=512, n_group=1, topk_group=1, routed_scaling_factor=2.827, rope_theta=50000.0,
        max_position_embeddings=8192, rope_scaling=None, bos_token_id=None, eos_token_id=None,
        model_type="deepseek_v3",
    ),
    # A few-MB model for tests; `tiny-yarn` / `tiny-grouped` / `tiny-noqlora` cover the other code paths.
    "tiny": _TINY,
    "tiny-noqlora": {**_TINY, "q_lora_rank": None, "n_shared_experts": 2, "first_k_dense_replace": 2},
    "tiny-grouped": {**_TINY, "n_routed_experts": 16, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2},
    "tiny-yarn": {**_TINY, "rope_scaling": dict(type="yarn", factor=8.0, beta_fast=32.0, beta_slow=1.0, mscale=0.707,
                                                 mscale_all_dim=0.707, original_max_position_embeddings=512)},
}
