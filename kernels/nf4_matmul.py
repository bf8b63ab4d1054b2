"""bitsandbytes' NF4 weight format, read by reference (``NF4Weight``), and the plain PyTorch product.

bitsandbytes stores an NF4 weight W [N, K] (Params4bit) as its row-major flattening W.view(-1)
cut into blocks of `blocksize` consecutive values (64 by default), each block scaled by its
absolute maximum, every value replaced by the index of the nearest of 16 NF4 levels
(`quant_state.code`), and two indices packed per byte, the even position in the high nibble:

    byte[i] = code_index[2 i] << 4 | code_index[2 i + 1]        (shape [N*K/2, 1], uint8)
    W[n, k] = code[nibble(n*K + k)] * absmax[(n*K + k) // blocksize]

With double quantisation (`compress_statistics=True`, the QLoRA default) absmax itself is
stored as uint8 indices into a 256-entry table, one fp32 scale per `nested_blocksize` (256)
absmax values, plus a scalar offset:

    absmax[b] = nested_code[absmax_q[b]] * nested_absmax[b // nested_blocksize] + offset

bitsandbytes' matmul for a batch of rows dequantises W to the compute dtype (writing and reading
a [N, K] bf16 copy: 4.5 bytes of traffic per weight against the 0.5 it stores) and then calls
cuBLAS. The decode kernel (kernels/nf4_decode.py) reads a repacked copy of this format instead;
``nf4_matmul_reference`` is the dequantise-then-matmul oracle of the tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor


# ----------------------------------------------------------------------------------------------
# the weight
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NF4Weight:
    """The tensors of one bitsandbytes NF4 weight [out_features, in_features], by reference."""

    packed: Tensor  # [N*K/2] uint8 (a view of Params4bit.data, whichever way it is shaped)
    absmax: Tensor  # [N*K/blocksize] fp32 scales, or uint8 indices when nested
    code: Tensor  # [16] fp32 NF4 levels
    out_features: int  # N
    in_features: int  # K
    blocksize: int
    nested_code: Optional[Tensor] = None  # [256] fp32
    nested_absmax: Optional[Tensor] = None  # [cdiv(N*K/blocksize, nested_blocksize)] fp32
    nested_offset: Optional[Tensor] = None  # [1] fp32
    nested_blocksize: int = 256

    @property
    def nested(self) -> bool:
        return self.nested_code is not None

    def block_scales(self) -> Tensor:
        """fp32 absmax per quantisation block, double quantisation resolved with bitsandbytes' arithmetic."""
        if not self.nested:
            return self.absmax.float()
        block = torch.arange(self.absmax.numel(), device=self.absmax.device) // self.nested_blocksize
        return self.nested_code[self.absmax.long()] * self.nested_absmax[block] + self.nested_offset

    @classmethod
    def from_bnb(cls, packed: Tensor, quant_state: Any) -> "NF4Weight":
        """From a Params4bit's data and its QuantState (read by attribute: no bitsandbytes import).

        `packed` may be shaped [N*K/2, 1] (Params4bit), its transpose [1, N*K/2] or flat; a
        non-uint8 quant_storage is viewed as bytes. Raises ValueError for anything else."""
        quant_type = getattr(quant_state, "quant_type", None)
        if quant_type != "nf4":
            raise ValueError(f"quant_state.quant_type: expected 'nf4', received {quant_type!r}")
        if getattr(quant_state, "packing_format_for_cpu", False):
            raise ValueError("quant_state: expected bitsandbytes' standard packing, received the CPU (AVX512) repacking")
        shape = tuple(quant_state.shape or ())
        if len(shape) != 2:
            raise ValueError(f"quant_state.shape: expected [out_features, in_features], received {list(shape)}")
        n, k = shape
        blocksize = int(quant_state.blocksize)
        if blocksize < 32 or blocksize & (blocksize - 1):
            # the tensor-core path multiplies half a tile row (BLOCK_K / 2 >= 16 values) per tl.dot
            raise ValueError(f"quant_state.blocksize: expected a power of two >= 32, received {blocksize}")
        if k % blocksize:
            raise ValueError(f"quant_state.blocksize: expected a divisor of in_features={k}, received {blocksize}")
        if packed.dtype != torch.uint8:
            packed = packed.view(torch.uint8)
        if not packed.is_contiguous() and not packed.t().is_contiguous():
            raise ValueError("packed: expected contiguous storage (Params4bit.data or its transpose), received strided")
        packed = packed.reshape(-1)
        if packed.numel() != n * k // 2:
            raise ValueError(f"packed: expected {n * k // 2} bytes for shape {[n, k]}, received {packed.numel()}")
        code = quant_state.code
        if code is None or code.numel() != 16:
            raise ValueError(f"quant_state.code: expected the 16 NF4 levels, received {None if code is None else code.numel()} values")
        blocks = n * k // blocksize
        absmax = quant_state.absmax.reshape(-1)
        if absmax.numel() != blocks:
            raise ValueError(f"quant_state.absmax: expected {blocks} scales, received {absmax.numel()}")
        common = dict(packed=packed, code=code.float(), out_features=n, in_features=k, blocksize=blocksize)
        state2 = getattr(quant_state, "state2", None)
        if state2 is None:
            return cls(absmax=absmax.float(), **common)
        if absmax.dtype != torch.uint8:
            raise ValueError(f"quant_state.absmax: expected uint8 indices with double quantisation, received {absmax.dtype}")
        offset = quant_state.offset
        offset = offset if isinstance(offset, Tensor) else torch.tensor(float(offset))
        return cls(
            absmax=absmax,
            nested_code=state2.code.float(),
            nested_absmax=state2.absmax.float().reshape(-1),
            nested_offset=offset.to(device=packed.device, dtype=torch.float32).reshape(1),
            nested_blocksize=int(state2.blocksize),
            **common,
        )


def nf4_matmul_reference(x: Tensor, weight: NF4Weight, bias: Optional[Tensor] = None) -> Tensor:
    """The same product in plain PyTorch (dequantise, round to x's dtype, matmul): the oracle."""
    codes = torch.stack([weight.packed >> 4, weight.packed & 15], dim=1).reshape(-1).long()
    dense = (weight.code[codes].view(-1, weight.blocksize) * weight.block_scales().view(-1, 1)).view(
        weight.out_features, weight.in_features
    )
    return torch.nn.functional.linear(x, dense.to(x.dtype), None if bias is None else bias.to(x.dtype))
