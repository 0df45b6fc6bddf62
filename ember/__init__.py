"""ember: a local LLM runtime — GGUF and HF checkpoints, one fast PyTorch engine, CLI, API and server."""

from __future__ import annotations

from ember.engine.outputs import CompletionOutput, RequestOutput, Usage
from ember.errors import EmberError
from ember.llm import LLM, load
from ember.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "EmberError", "RequestOutput", "SamplingParams", "Usage", "load"]
__version__ = "0.1.0"
