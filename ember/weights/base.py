"""What a weights reader hands the model loader: named raw tensors that can stay packed."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


def _as_torch(arr: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    with warnings.catch_warnings():  # a read-only file map: torch only reads it (every caller copies)
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.ascontiguousarray(arr)).view(dtype)


def float_to_f32(dtype: torch.dtype) -> Callable[[np.ndarray], np.ndarray]:
    """A dequantizer for stored floats (raw bytes or an integer view of them): torch converts on every thread,
    where numpy's astype takes one (a 1B-parameter F16 GGUF: 9 s of a 17 s load). RawTensor.dequantize
    converts such tensors straight to the dtype asked for (no fp32 copy of an F16 model in between)."""

    def dequant(arr: np.ndarray) -> np.ndarray:
        return _as_torch(arr, dtype).float().numpy()

    dequant.stored = dtype  # type: ignore[attr-defined]
    return dequant


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
        stored = getattr(self._dequant, "stored", None)
        if stored is not None:  # plain floats: one conversion (f16 -> bf16 rounds as via fp32: f16 -> f32 is exact)
            return _as_torch(self.data, stored).reshape(self.shape).to(dtype, copy=True)
        arr = np.asarray(self._dequant(np.ascontiguousarray(self.data)), dtype=np.float32)  # copies off the map
        return torch.from_numpy(arr.reshape(self.shape).copy() if not arr.flags.writeable else arr.reshape(self.shape)).to(dtype)

    def permute_rows(self, perm: np.ndarray) -> RawTensor:
        """Reorder output rows (used to undo the GGUF Q/K rotary permutation) without dequantizing."""
        rows = self.data.reshape(self.shape[0], -1)
        return RawTensor(self.name, self.kind, self.shape, rows[perm], self._dequant, self.release)
