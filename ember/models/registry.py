"""Architecture name -> model class."""

from __future__ import annotations

from torch import nn

from ember.config import ModelConfig
from ember.errors import ModelFormatError


def model_class(cfg: ModelConfig) -> type[nn.Module]:
    from ember.models.bloom import BloomForCausalLM
    from ember.models.gemma3 import Gemma3ForCausalLM
    from ember.models.llama import LlamaForCausalLM

    table: dict[str, type[nn.Module]] = {"llama": LlamaForCausalLM, "mistral": LlamaForCausalLM,
                                         "qwen2": LlamaForCausalLM, "qwen3": LlamaForCausalLM, "phi3": LlamaForCausalLM,
                                         "gemma3": Gemma3ForCausalLM, "bloom": BloomForCausalLM}
    if cfg.architecture not in table:
        raise ModelFormatError(
            f"architecture {cfg.architecture!r} is not supported yet; supported: {', '.join(sorted(table))}")
    return table[cfg.architecture]
