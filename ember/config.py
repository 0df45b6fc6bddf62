"""ModelConfig (architecture hyper-parameters) and EngineConfig (runtime knobs), checked on construction."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ember.errors import ParameterError

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_dim: int | None = None  # rotated dims per head (None = all of head_dim)
    rope_scaling: dict[str, Any] | None = None  # {"type": "llama3" | "linear", "factor": ..., ...}
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2-style q/k/v bias
    extra: dict[str, Any] = field(default_factory=dict)  # architecture-specific values (e.g. sliding window)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ParameterError(f"ModelConfig.{name}={v!r} is invalid: it must be a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise ParameterError(
                f"ModelConfig.num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.rope_dim is None:
            self.rope_dim = self.head_dim

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """KV-cache bytes one token takes: k and v, every layer."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * torch.finfo(dtype).bits // 8


def cpu_has_fast_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str | torch.dtype, device: torch.device, quantized: bool = False,
                  checkpoint: torch.dtype | None = None) -> torch.dtype:
    """'auto': bf16 on accelerators, and on CPU for quantized checkpoints (the packed int4 kernel takes
    bf16 activations); fp32 on CPU for full-precision weights. A half-precision checkpoint (HF
    `torch_dtype`) keeps its dtype on accelerators (bf16 only where supported), and runs in bf16 on a
    CPU with fast bf16 (AVX512-BF16 / AMX), fp32 on other CPUs."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if checkpoint in (torch.bfloat16, torch.float16) and not quantized:
            if device.type == "cpu":
                return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
            if checkpoint == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
                return torch.float16
            return checkpoint
        return torch.float32 if device.type == "cpu" and not quantized else torch.bfloat16
    if dtype not in _DTYPES:
        raise ParameterError(f"dtype={dtype!r} is invalid: use one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' picks cuda, then npu (when torch_npu imports), then cpu."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        try:
            import torch_npu  # noqa: F401

            if torch.npu.is_available():  # type: ignore[attr-defined]
                return torch.device("npu")
        except ImportError:
            pass
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ParameterError(f"device={device!r} is invalid: use auto, cpu, cuda, cuda:N or npu ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ParameterError("device='cuda' was asked for but this torch build sees no CUDA GPU; use --device cpu")
    return dev


def default_kv_bytes(device: torch.device | None = None) -> int:
    """A fifth of the available memory (free VRAM on a GPU, else RAM), capped at 2 GiB: room for many
    requests, little risk of swapping or running the GPU out of memory."""
    try:
        if device is not None and device.type == "cuda":
            avail = torch.cuda.mem_get_info(device)[0]
        else:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, RuntimeError):
        avail = 8 << 30
    return int(min(2 << 30, max(256 << 20, avail // 5)))


def gpu_kv_bytes(device: torch.device, cfg: ModelConfig, dtype: torch.dtype, engine: EngineConfig,
                 fraction: float = 0.6) -> int:
    """KV cache on a CUDA GPU, sized after the weights are loaded: `fraction` of the free memory (the rest holds
    activations, the CUDA graphs' pool and other processes' growth) — continuous batching lives on thousands of
    cached tokens, and the CPU default's 2 GiB cap would starve it — but no more than every running request at
    full context can use (a small model with a short context would otherwise take 80 GB)."""
    most = cfg.kv_bytes_per_token(dtype) * (engine.max_num_seqs * engine.context(cfg) + engine.block_size)
    return max(256 << 20, min(most, int(torch.cuda.mem_get_info(device)[0] * fraction)))


def default_step_tokens(device: torch.device | None = None) -> int:
    """Token budget of one engine step. On a CPU a step's cost grows with its tokens while prefill speed
    does not (SmolLM2 on 2 cores: the same tok/s with chunks of 64 to 1024), so a small budget bounds how
    long running streams wait behind a long prompt (their largest gap: 1060 ms at 512, 500 ms at 256,
    benchmarks/README.md) at no cost to the prompt's own TTFT. Accelerators keep larger steps."""
    return 512 if device is not None and device.type != "cpu" else 256


@dataclass
class EngineConfig:
    max_model_len: int | None = None  # None: the model's context length
    kv_cache_memory: int | None = None  # bytes for the KV cache; None: a fifth of free RAM, <= 2 GiB
    block_size: int = 16  # tokens per KV-cache block
    max_num_seqs: int = 64  # requests running at once
    max_num_batched_tokens: int = 256  # token budget per engine step (chunked prefill beyond it); see
    # default_step_tokens
    prefix_caching: bool = True  # reuse the KV of full blocks shared with earlier requests
    attention: str = "auto"  # "torch", "triton" (GPU kernels), "auto": triton on a CUDA GPU; runner.resolve_attention

    def __post_init__(self) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ParameterError(f"{name}={v!r} is invalid: it must be a positive integer")
        if self.max_num_batched_tokens < self.max_num_seqs:  # else some running requests would skip steps
            raise ParameterError(
                f"max_num_batched_tokens={self.max_num_batched_tokens} is below max_num_seqs={self.max_num_seqs}: "
                "every running request needs a token of each step; raise the first or lower the second")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise ParameterError(f"max_model_len={self.max_model_len!r} is invalid: it must be an integer >= 2")
        if self.kv_cache_memory is None:
            self.kv_cache_memory = default_kv_bytes()
        elif not isinstance(self.kv_cache_memory, int) or self.kv_cache_memory <= 0:
            raise ParameterError(f"EngineConfig.kv_cache_memory={self.kv_cache_memory!r} must be a positive byte count")

    def context(self, model: ModelConfig) -> int:
        """Tokens one sequence may hold: max_model_len, within the model's own context."""
        return min(self.max_model_len or model.max_position_embeddings, model.max_position_embeddings)
