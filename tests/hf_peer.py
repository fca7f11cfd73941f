"""Test helper: transformers' DeepseekV3ForCausalLM as the reference implementation (a test-only peer)."""
from __future__ import annotations

import torch

from nanok2.config import ModelArgs


def hf_model(args: ModelArgs, seed: int = 0, bias_scale: float = 0.05):
    """A random transformers DeepseekV3 model for `args`, with a non-zero e_score_correction_bias."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = DeepseekV3Config(**{k: v for k, v in args.to_hf_config("deepseek_v3", "float32").items()
                              if k not in ("architectures", "model_type", "torch_dtype", "scoring_func",
                                           "topk_method", "moe_layer_freq")})
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.05)    # transformers initialises experts to zero-mean noise: make every path matter
            elif "norm" in name:
                p.normal_(1.0, 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * bias_scale)
    return model
