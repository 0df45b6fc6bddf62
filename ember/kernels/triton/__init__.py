"""GPU kernels in Triton: paged attention over ember's KV layout and the fused RoPE + cache store.

They run on CUDA (the GPU runner's attention) and, for tests, on the CPU under Triton's interpreter
(`TRITON_INTERPRET=1`, set before this package's kernel modules are imported). Import the kernel
modules lazily: a CPU-only install never needs triton.
"""

from __future__ import annotations

import importlib.util
import os


def available() -> bool:
    """triton is importable (the CUDA image ships it; on the CPU only the test extra installs it)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Kernels run on the CPU in Triton's interpreter (tests); on a GPU they compile."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
