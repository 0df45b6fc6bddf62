"""What a weights reader hands the model loader: named raw tensors that can stay packed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class RawTensor:
    """One checkpoint tensor as stored: `kind` names its encoding ('F32', 'Q4_1', 'Q8_0', ...).

    `shape` is in torch order ([out, in] for a linear weight). `data` is the stored array (often a
    memory map); for block-quantized kinds its rows are output rows, so reordering rows never needs
    a dequantize. Quant methods read `data` directly to keep blocks packed; `dequantize` is the
    reference path.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    data: np.ndarray
    _dequant: Callable[[np.ndarray], np.ndarray]
    # drops the stored bytes' file pages from memory once packed (read again from the file if needed later)
    release: Callable[[], None] = lambda: None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        arr = np.asarray(self._dequant(np.ascontiguousarray(self.data)), dtype=np.float32)  # copies off the map
        return torch.from_numpy(arr.reshape(self.shape).copy() if not arr.flags.writeable else arr.reshape(self.shape)).to(dtype)

    def permute_rows(self, perm: np.ndarray) -> RawTensor:
        """Reorder output rows (used to undo the GGUF Q/K rotary permutation) without dequantizing."""
        rows = self.data.reshape(self.shape[0], -1)
        return RawTensor(self.name, self.kind, self.shape, rows[perm], self._dequant, self.release)
