"""The chunk's matrix products with fp32 results: logits, d_hidden and the d_weight accumulator.

bf16 / fp16 products accumulate in fp32 on the tensor cores anyway; what decides the numerics is
whether the result is rounded back to the input dtype. grpo-fast keeps it in fp32:

- **logits** (`head_logits`): rounding a logit of 32 to bf16 moves it by up to 0.125, so a log-prob
  read from bf16 logits differs from one computed with fp32 tiles on chip (the forward-only
  kernel) by up to ~0.1. With fp32 logits in every pass, the training pass's log-probs equal the
  no-grad pass's, and the first iteration's importance ratio is 1.
- **d_hidden** (`d_hidden_into`): written in fp32 and scaled by the upstream gradient in fp32
  before its one rounding to the input dtype (a GradScaler scale of 65536 does not fit in fp16).
- **d_weight** (`accumulate_d_weight`): each chunk adds into one fp32 [V, H] accumulator, with no
  [V, H] temporary per chunk and no rounding of a chunk's share before the sum.

On CUDA this is cuBLAS with an fp32 output (`torch.mm(..., out_dtype=torch.float32)`, PyTorch 2.8+).
Elsewhere (CPU, older PyTorch) the inputs are upcast to fp32 first, which computes the same thing
(bf16 and fp16 are exact in fp32) at fp32-GEMM speed and with an fp32 copy of the head.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

_FP32_OUT_GEMM = hasattr(torch.ops.aten.mm, "dtype")  # aten::mm.dtype exists from PyTorch 2.8
# addmm into an fp32 accumulator with bf16/fp16 factors: newer PyTorch only; probed on first use
_ADDMM_FP32_ACC: Optional[bool] = None


def fp32_out_gemm(device: torch.device) -> bool:
    """cuBLAS can multiply bf16/fp16 matrices into an fp32 result on this device."""
    return device.type == "cuda" and _FP32_OUT_GEMM


class Head:
    """The lm_head weight [V, H] (and bias [V]) of one call, with its fp32-result products."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor]):
        self.weight = weight
        self.bias = None if bias is None else bias.float()
        self.low_precision = weight.dtype != torch.float32
        self.upcast = self.low_precision and not fp32_out_gemm(weight.device)
        if self.upcast and weight.device.type == "cuda":
            warnings.warn("PyTorch < 2.8 has no fp32-output cuBLAS product: the loss upcasts the lm_head weight "
                          "to fp32 (slower, one fp32 copy of the head); upgrade PyTorch to avoid it", stacklevel=3)
        self._weight_f32 = None

    def _w32(self) -> Tensor:
        if self._weight_f32 is None:
            self._weight_f32 = self.weight.float()
        return self._weight_f32

    def _mm(self, a: Tensor, b: Tensor, out: Optional[Tensor] = None) -> Tensor:
        if not self.low_precision:
            return torch.mm(a, b, out=out)
        if self.upcast:
            return torch.mm(a.float(), b.float(), out=out)
        if out is None:
            return torch.mm(a, b, out_dtype=torch.float32)
        return torch.mm(a, b, out_dtype=torch.float32, out=out)

    def logits(self, hidden: Tensor) -> Tensor:
        """[n, V] fp32 raw logits `hidden @ W.T + b` (no transform, no temperature)."""
        if self.upcast:
            logits = torch.mm(hidden.float(), self._w32().T)
        else:
            logits = self._mm(hidden, self.weight.T)
        if self.bias is not None:
            logits += self.bias
        return logits

    def d_hidden_into(self, d_logits: Tensor, out: Tensor) -> None:
        """out [n, H] fp32 = d_logits [n, V] @ W (d_logits in the weight's dtype, rows may be strided)."""
        if self.upcast:
            torch.mm(d_logits.float(), self._w32(), out=out)
        else:
            self._mm(d_logits, self.weight, out=out)

    def accumulate_d_weight(self, acc: Tensor, d_logits: Tensor, hidden: Tensor, alpha: float = 1.0,
                            slice_bytes: int = 256 * 1024 * 1024) -> None:
        """acc [V, H] fp32 += alpha * d_logits.T @ hidden, without a [V, H] temporary."""
        global _ADDMM_FP32_ACC
        if not self.low_precision:
            acc.addmm_(d_logits.T, hidden, alpha=alpha)
            return
        if self.upcast:
            acc.addmm_(d_logits.float().T, hidden.float(), alpha=alpha)
            return
        if _ADDMM_FP32_ACC is not False:
            try:
                torch.addmm(acc, d_logits.T, hidden, out_dtype=torch.float32, alpha=alpha, out=acc)
                _ADDMM_FP32_ACC = True
                return
            except RuntimeError as error:  # this PyTorch wants the addend in the factors' dtype
                if _ADDMM_FP32_ACC or "dtype" not in str(error) or isinstance(error, torch.cuda.OutOfMemoryError):
                    raise
                _ADDMM_FP32_ACC = False
        accumulate_in_slices(acc, d_logits, hidden, alpha, slice_bytes)


def accumulate_in_slices(acc: Tensor, d_logits: Tensor, hidden: Tensor, alpha: float, slice_bytes: int) -> None:
    """acc += alpha * d_logits.T @ hidden through fp32 products of a few vocabulary rows at a time
    (temporaries of `slice_bytes`, not [V, H])."""
    V, H = acc.shape
    rows = max(1, slice_bytes // (4 * H))
    low = d_logits.dtype != torch.float32 and fp32_out_gemm(acc.device)
    for start in range(0, V, rows):
        part = d_logits[:, start:start + rows].T
        if low:
            product = torch.mm(part, hidden, out_dtype=torch.float32)
        else:
            product = torch.mm(part.float(), hidden.float())
        acc[start:start + rows].add_(product, alpha=alpha)
