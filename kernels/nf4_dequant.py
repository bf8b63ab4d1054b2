"""NF4 dequantisation from the decode kernel's repacked layout: a dense [rows, columns] block of W.

Training multiplies many rows at once, where cuBLAS on a dense weight wins, so it dequantises the
weight (a block of it at a time) into the compute dtype and multiplies that, as bitsandbytes does
from its own layout. This reads the repacked layout of ``kernels/nf4_decode.py`` (``repack_nf4``:
16-row tiles of CHUNK-value chunks, byte b of a row's chunk holding k = b in its high nibble and
k = CHUNK/2 + b in its low one; fp32 scales [K / CHUNK, N_pad]), so one copy of the 4-bit weights
serves decoding and training.

Numerics: W[n, k] = fp32(level[code] * scale[k // CHUNK, n]) rounded to the output dtype, the
arithmetic of bitsandbytes' dequantisation (an fp32 product of the fp32 level and the fp32 absmax
it resolves the same way, ``NF4Weight.block_scales``): bit for bit the float64 product rounded to
fp32, then to the dtype (``nf4_dequantize_reference``).

Per program: BLOCK_R rows x BLOCK_C chunks; each chunk of a row is two contiguous runs of CHUNK/2
values in the output (its high and its low nibbles). The kernel reads 0.5625 bytes and writes
2 (bf16 / fp16) per weight: it is bound by the write, as bitsandbytes' dequantisation (0.516 read,
2 written) is.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .config import interpreting, triton_usable_on
from .launch import launch
from .nf4_decode import ROW_TILE, DecodeNF4Weight
from .tl_math import round_to_bf16_bits

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _nf4_dequant_kernel(
    q_ptr,  # repacked nibbles
    scale_ptr,  # [n_chunks, N_pad] fp32
    lut_ptr,  # [16] fp32 levels
    out_ptr, stride_out,  # [rows, chunks * 2 * HALF] in the output dtype, unit stride along columns
    row0, rows, c0, chunks, n_chunks, N_pad,
    HALF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BF16_BY_BITS: tl.constexpr,
):
    local = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = local < rows
    r = row0 + local
    byte = tl.arange(0, HALF)
    tile_bytes = 16 * HALF  # one stored tile: 16 rows of one chunk
    row_base = (r // 16) * (n_chunks * tile_bytes) + (r % 16) * HALF
    mask = row_mask[:, None] & (byte[None, :] < HALF)  # [BLOCK_R, HALF]
    first = tl.program_id(1) * BLOCK_C
    for c_local in range(first, tl.minimum(first + BLOCK_C, chunks)):
        c = c0 + c_local
        packed = tl.load(q_ptr + row_base[:, None] + c * tile_bytes + byte[None, :], mask=mask, other=0)
        scale = tl.load(scale_ptr + c * N_pad + r, mask=row_mask, other=0.0)[:, None]
        hi = tl.load(lut_ptr + (packed >> 4).to(tl.int32)) * scale
        lo = tl.load(lut_ptr + (packed & 15).to(tl.int32)) * scale
        if BF16_BY_BITS:  # the interpreter truncates fp32 -> bf16; round to nearest even as a GPU does
            hi, lo = round_to_bf16_bits(hi), round_to_bf16_bits(lo)
        offsets = local[:, None] * stride_out + (c_local * 2 * HALF + byte)[None, :]
        tl.store(out_ptr + offsets, hi.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out_ptr + offsets + HALF, lo.to(out_ptr.dtype.element_ty), mask=mask)


def _check(weight: DecodeNF4Weight, rows: tuple[int, int], columns: tuple[int, int], dtype: torch.dtype):
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected float32, float16 or bfloat16, received {dtype}")
    start, stop = rows
    if not 0 <= start <= stop <= weight.out_features:
        raise ValueError(f"rows: expected 0 <= start <= stop <= {weight.out_features}, received {rows}")
    k0, k1 = columns
    if not (0 <= k0 <= k1 <= weight.in_features and k0 % weight.chunk == 0 and k1 % weight.chunk == 0):
        raise ValueError(f"columns: expected multiples of {weight.chunk} within [0, {weight.in_features}], "
                         f"received {columns}")


def nf4_dequantize(weight: DecodeNF4Weight, rows: Optional[tuple[int, int]] = None,
                   columns: Optional[tuple[int, int]] = None, dtype: torch.dtype = torch.bfloat16, *,
                   out: Optional[Tensor] = None, force_triton: bool = False) -> Tensor:
    """W[rows[0]:rows[1], columns[0]:columns[1]] of a repacked weight, dense in ``dtype`` (default the
    whole weight); columns in multiples of the weight's chunk. ``out``: a contiguous tensor of that
    shape and dtype to write into. Triton on CUDA (``force_triton``: also under the interpreter, for
    tests); elsewhere the same arithmetic in PyTorch."""
    rows = rows or (0, weight.out_features)
    columns = columns or (0, weight.in_features)
    _check(weight, rows, columns, dtype)
    shape = (rows[1] - rows[0], columns[1] - columns[0])
    if out is None:
        out = torch.empty(shape, device=weight.qweight.device, dtype=dtype)
    elif out.shape != shape or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out: expected a contiguous {list(shape)} {dtype} tensor, received "
                         f"{list(out.shape)} {out.dtype}{'' if out.is_contiguous() else ' strided'}")
    if out.numel() == 0:
        return out
    device = weight.qweight.device
    if device.type == "cuda" or (force_triton and triton_usable_on(device)):
        return _launch(weight, rows, columns, out)
    out.copy_(nf4_dequantize_torch(weight, rows, columns, dtype))
    return out


def _launch(weight: DecodeNF4Weight, rows, columns, out: Tensor) -> Tensor:
    chunk = weight.chunk
    chunks = (columns[1] - columns[0]) // chunk
    block_r, block_c, warps = (16, 2, 1) if interpreting() else (64, 4, 4)
    grid = (triton.cdiv(rows[1] - rows[0], block_r), triton.cdiv(chunks, block_c))
    levels = weight.tables.get(torch.float32)
    if levels is None or levels.device != weight.qweight.device:
        levels = weight.levels.to(device=weight.qweight.device, dtype=torch.float32)
    launch(_nf4_dequant_kernel, grid, weight.qweight, weight.scales, levels, out, out.stride(0),
           rows[0], rows[1] - rows[0], columns[0] // chunk, chunks, weight.in_features // chunk, weight.padded_rows,
           HALF=chunk // 2, BLOCK_R=block_r, BLOCK_C=block_c,
           BF16_BY_BITS=interpreting() and out.dtype == torch.bfloat16, num_warps=warps)
    return out


def _codes(weight: DecodeNF4Weight, rows, columns) -> Tensor:
    """The 4-bit codes of the block, [rows, columns] int64, unpacked from the repacked layout."""
    k, chunk = weight.in_features, weight.chunk
    t0, t1 = rows[0] // ROW_TILE, -(-rows[1] // ROW_TILE)
    c0, c1 = columns[0] // chunk, columns[1] // chunk
    tiles = weight.qweight.view(-1, k // chunk, ROW_TILE, chunk // 2)[t0:t1, c0:c1]
    codes = torch.stack([tiles >> 4, tiles & 15], dim=3)  # [tiles, chunks, 16, 2, chunk / 2]
    codes = codes.permute(0, 2, 1, 3, 4).reshape((t1 - t0) * ROW_TILE, (c1 - c0) * chunk)
    offset = rows[0] - t0 * ROW_TILE
    return codes[offset: offset + rows[1] - rows[0]].long()


def nf4_dequantize_torch(weight: DecodeNF4Weight, rows, columns, dtype: torch.dtype) -> Tensor:
    """The kernel's arithmetic in PyTorch (the same bits): the path off CUDA, and the fallback where the
    kernel cannot compile or launch."""
    k, chunk = weight.in_features, weight.chunk
    levels = weight.levels.to(device=weight.qweight.device, dtype=torch.float32)
    pairs = torch.stack([levels.repeat_interleave(16), levels.repeat(16)], dim=1)  # byte -> (high, low) levels
    t0, t1 = rows[0] // ROW_TILE, -(-rows[1] // ROW_TILE)
    c0, c1 = columns[0] // chunk, columns[1] // chunk
    tiles = weight.qweight.view(-1, k // chunk, ROW_TILE, chunk // 2)[t0:t1, c0:c1]
    values = torch.index_select(pairs, 0, tiles.reshape(-1).int()).view(*tiles.shape, 2)
    # [tiles, chunks, 16, chunk / 2, (high, low)] -> [rows, chunks, (high, low), chunk / 2]
    values = values.permute(0, 2, 1, 4, 3).reshape((t1 - t0) * ROW_TILE, c1 - c0, chunk)
    offset = rows[0] - t0 * ROW_TILE
    values = values[offset: offset + rows[1] - rows[0]]
    scales = weight.scales[c0:c1, rows[0]: rows[1]].t()  # [rows, chunks]
    return (values * scales[:, :, None]).view(rows[1] - rows[0], -1).to(dtype)


def nf4_dequantize_reference(weight: DecodeNF4Weight, dtype: torch.dtype,
                             rows: Optional[tuple[int, int]] = None) -> Tensor:
    """The oracle: level x scale in float64 (exact), rounded to fp32 (bitsandbytes' fp32 product), then
    to ``dtype``."""
    rows = rows or (0, weight.out_features)
    chunk = weight.chunk
    codes = _codes(weight, rows, (0, weight.in_features))
    scales = weight.scales[:, rows[0]: rows[1]].t().double()
    values = weight.levels.double()[codes].view(rows[1] - rows[0], -1, chunk) * scales[:, :, None]
    return values.view(rows[1] - rows[0], -1).float().to(dtype)
