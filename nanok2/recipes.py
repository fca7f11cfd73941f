"""Training recipes: one `TrainConfig` dataclass and the named configurations built from it.

A recipe is a sequence of stages, each a TrainConfig (today every recipe has one stage; a pipeline such
as tokenizer → pretrain → SFT → INT4 is a recipe with several). The command line overrides any field
with `key=value` (and the model shape with `model.key=value`); unknown recipes and keys are errors that
list the known ones.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from nanok2.config import ModelArgs
from nanok2.errors import NanoK2Error


@dataclass
class TrainConfig:
    # --- model
    preset: str = "tiny"
    model: dict = field(default_factory=dict)    # ModelArgs overrides on top of the preset
    init_from: str | None = None                 # start from these weights (an HF checkpoint folder), e.g. for SFT
    # --- data
    data: str | None = None                      # dataset directory (`nanok2 data tokenize`)
    tokenizer: str | None = None                 # when set, the data must have been made with this tokenizer
    seq_len: int = 128
    batch_size: int = 8                          # sequences per micro-batch, all ranks together
    grad_accum: int = 1                          # micro-batches per optimizer step
    eval_sequences: int = 16                     # held out from the data for the eval loss
    # pre-training curriculum for copying (curriculum.py): shorter windows first, at the same tokens per step,
    # [[seq_len, until_step], ...] (seq_len after the last), and spans copied forward once per copy_every tokens
    window_schedule: list = field(default_factory=list)
    copy_every: int = 0                          # 0 = no copies
    copy_span: list = field(default_factory=lambda: [4, 10])   # shortest, longest copied span (tokens)
    # --- optimization
    steps: int = 200
    optimizer: str = "muonclip"                  # muonclip | adamw
    lr: float = 2e-3
    weight_decay: float = 0.1
    momentum: float = 0.95                       # Muon
    ns_dtype: str = "fp32"                       # Muon's Newton–Schulz: fp32 | bf16
    betas: tuple = (0.9, 0.95)                   # AdamW
    schedule: str = "wsd"                        # constant | wsd | cosine
    warmup: int = 20
    decay_frac: float = 0.2                      # WSD: the final fraction of the run that decays
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0                       # 0 = off
    qk_clip_tau: float | None = 100.0            # None = no QK-Clip (max logits are still logged)
    bias_update_speed: float = 1e-3              # aux-loss-free balancing γ; 0 = off
    seq_aux_alpha: float = 0.0                   # sequence-wise balance loss; DeepSeek-V3: 1e-4
    dtype: str = "fp32"                          # fp32 | bf16 (autocast; weights and optimizer stay fp32)
    qat: str | None = None                       # int4: fake-quantize the routed experts (nanok2.quant)
    seed: int = 0
    # --- bookkeeping
    out: str = "runs/train"
    eval_every: int = 50
    ckpt_every: int = 50
    keep_last: int = 2
    peak_flops: float | None = None              # per device, for MFU; None = train.default_peak_flops()
    progress: bool = True

    def model_args(self) -> ModelArgs:
        return ModelArgs.from_preset(self.preset, **self.model)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Recipe:
    name: str
    description: str
    stages: list[TrainConfig]


_TINY_MODEL = dict(hidden_size=128, num_hidden_layers=4, intermediate_size=256, moe_intermediate_size=64,
                   n_routed_experts=8, num_experts_per_tok=2, num_attention_heads=4)

RECIPES: dict[str, Recipe] = {
    r.name: r for r in [
        Recipe("tiny-pretrain", "a ~1M-parameter K2 (MLA + 8 experts) pre-trained with MuonClip on token shards",
               [TrainConfig(preset="tiny", model=dict(_TINY_MODEL), steps=300, lr=3e-3, out="runs/tiny-pretrain")]),
        Recipe("tiny-sft", "fine-tune tiny-pretrain's weights on chat data (loss on assistant tokens only)",
               [TrainConfig(preset="tiny", model=dict(_TINY_MODEL), steps=200, lr=1e-3, warmup=10, schedule="cosine",
                            init_from="runs/tiny-pretrain/final", out="runs/tiny-sft")]),
    ]
}


# Recipes that are whole pipelines (data, tokenizer, several training stages, quantization), each run by
# its own module; `key=value` overrides apply to that pipeline's config.
PIPELINES: dict[str, str] = {
    "agent-tiny": "nanok2-agent-tiny end to end: worlds -> tokenizer -> pre-train -> agent SFT with INT4 QAT "
                  "(MuonClip) -> INT4 K2 checkpoint (nanok2/agent_recipe.py)",
}


def _parse_value(text: str, current: Any, key: str) -> Any:
    """'3e-4' for a float field, 'none' for an optional one, JSON for dicts and tuples."""
    if text.lower() in ("none", "null"):
        return None
    if isinstance(current, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise NanoK2Error(f"{key}: expected true or false, got {text!r}")
        return text.lower() in ("true", "1")
    try:
        if isinstance(current, int):
            return int(float(text)) if float(text).is_integer() else float(text)
        if isinstance(current, float) or current is None:
            try:
                return float(text)
            except ValueError:
                return text
        if isinstance(current, (dict, list, tuple)):
            value = json.loads(text)
            return tuple(value) if isinstance(current, tuple) else value
    except (ValueError, json.JSONDecodeError):
        raise NanoK2Error(f"{key}: cannot read {text!r} as {type(current).__name__}") from None
    return text


def apply_overrides(cfg, overrides: list[str], what: str = "training"):
    """`key=value` and `model.key=value` strings -> a new config. Unknown keys raise, listing the known.

    `cfg` is any config dataclass with a `model` dict of ModelArgs overrides (TrainConfig, or a pipeline's
    config); `model.key=value` applies on top of its `preset` (default "tiny") and that dict.
    """
    known = {f.name for f in dataclasses.fields(cfg)}
    model_known = {f.name for f in dataclasses.fields(ModelArgs)}
    changes: dict[str, Any] = {}
    model_items: list[tuple[str, str]] = []
    for item in overrides:
        if "=" not in item:
            raise NanoK2Error(f"override {item!r} is not key=value")
        key, text = item.split("=", 1)
        key = key.strip().lstrip("-").replace("-", "_")
        if key.startswith("model."):
            model_items.append((key, text))
        elif key in known:
            changes[key] = _parse_value(text, getattr(cfg, key), key)
        else:
            raise NanoK2Error(f"unknown {what} key {key!r}; known: {', '.join(sorted(known))} "
                              "(and model.<ModelArgs field>)")
    cfg = dataclasses.replace(cfg, **changes)
    # model.key=value applies on top of the (possibly overridden) preset and model dict
    model = dict(cfg.model)
    for key, text in model_items:
        name = key[len("model."):]
        if name not in model_known:
            raise NanoK2Error(f"unknown model key {name!r}; known: {', '.join(sorted(model_known))}")
        current = model.get(name, getattr(ModelArgs.from_preset(getattr(cfg, "preset", "tiny")), name))
        model[name] = _parse_value(text, current, key)
    return dataclasses.replace(cfg, model=model)


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise NanoK2Error(f"unknown recipe {name!r}; known recipes: {', '.join([*RECIPES, *PIPELINES])}")
    return RECIPES[name]
