"""NF4 decode matmul: y = x @ dequantize_nf4(W).T (+ b) reading the packed 4-bit weight once.

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
cuBLAS. At decode, with a few rows per step, the matmul is bound by reading the weights, so this
kernel reads the packed bytes once, dequantises them in registers and accumulates in fp32:

    per tile of BLOCK_N output features and BLOCK_K inputs (BLOCK_K divides blocksize, so a
    tile row lies in one quantisation block and its scale is one load per row):
        w_even = code[byte >> 4] * scale,  w_odd = code[byte & 15] * scale   [BLOCK_N, BLOCK_K/2]
        acc   += x[:, even k] @ w_even.T + x[:, odd k] @ w_odd.T             [BLOCK_M, BLOCK_N]

The dequantised values are rounded to x's dtype before the product, which is exactly what
bitsandbytes' dequantise-then-matmul multiplies, so the two differ only in summation order.
The nibbles are never interleaved: the even and odd halves of the tile meet the even and odd
columns of x (strided loads of x, which is small and stays in L1/L2).

All rows of x (at most BLOCK_M = 64 per program) share each weight tile, so the weight is read
once per call. Few output tiles (k_proj, v_proj: N = 512) would leave most SMs idle, so K is
split across programs; each split writes fp32 partial sums that a deterministic torch sum adds
up (no atomics: sampling stays reproducible), capped so that the partials never move more
bytes than the weight does. Up to `gemv_max_rows` rows the product is a broadcast-multiply-
reduce on CUDA cores (no padding of M to a tensor-core tile); above, tl.dot on tensor cores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .config import interpreting
from .logprob_kernel import _num_sms


@triton.jit
def _round_to_bf16_bits(value):
    """fp32 -> nearest-even bf16, kept in fp32, by integer arithmetic. The interpreter truncates
    its fp32 -> bf16 casts, while compiled kernels (and torch) round to nearest even."""
    bits = value.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _nf4_matmul_kernel(
    x_ptr,  # [M, K] activations (bf16 / fp16 / fp32)
    stride_xm,
    stride_xk,
    packed_ptr,  # [N*K/2] uint8, two NF4 indices per byte, even position in the high nibble
    absmax_ptr,  # [N*K/blocksize] fp32 scales, or uint8 indices into nested_code when NESTED
    nested_code_ptr,  # [256] fp32 table of the double quantisation (dummy when not NESTED)
    nested_absmax_ptr,  # [cdiv(N*K/blocksize, nested_blocksize)] fp32 (dummy when not NESTED)
    offset_ptr,  # [1] fp32 offset added to dequantised absmax (dummy when not NESTED)
    code_ptr,  # [16] fp32 NF4 levels
    bias_ptr,  # [N] bias or a dummy pointer when HAS_BIAS is false
    out_ptr,  # [M, N] output in x's dtype, or [splits, M, N] fp32 partial sums when SPLIT
    stride_os,
    stride_om,
    stride_on,
    M,
    N,
    K,
    k_per_split,
    nested_blocksize,
    BLOCKSIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    NESTED: tl.constexpr,
    SPLIT: tl.constexpr,
    USE_DOT: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter: bf16 dots are wrong there, fp32 ones are exact
    IEEE_FP32: tl.constexpr,  # fp32 inputs: full-precision dot instead of tf32
    W_DTYPE: tl.constexpr,  # dequantised weights are rounded to x's dtype, as bitsandbytes does
    BF16_BY_BITS: tl.constexpr,  # interpreter with bf16 x: round by integer arithmetic (see above)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    HALF_K: tl.constexpr = BLOCK_K // 2
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    cols64 = cols.to(tl.int64)
    pairs = tl.arange(0, HALF_K)
    blocks_per_row = K // BLOCKSIZE
    offset = tl.load(offset_ptr).to(tl.float32)  # read (from the dummy) even when unused

    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        # one quantisation block per tile row: BLOCK_K divides BLOCKSIZE and K % BLOCKSIZE == 0
        block = cols64 * blocks_per_row + k0 // BLOCKSIZE
        if NESTED:
            absmax_q = tl.load(absmax_ptr + block, mask=col_mask, other=0).to(tl.int32)
            scale = tl.load(nested_code_ptr + absmax_q) * tl.load(
                nested_absmax_ptr + block // nested_blocksize, mask=col_mask, other=0.0
            ) + offset
        else:
            scale = tl.load(absmax_ptr + block, mask=col_mask, other=0.0)
        packed = tl.load(
            packed_ptr + cols64[:, None] * (K // 2) + (k0 // 2 + pairs)[None, :],
            mask=col_mask[:, None],
            other=0,
        )
        w_even = tl.load(code_ptr + (packed >> 4)) * scale[:, None]
        w_odd = tl.load(code_ptr + (packed & 15)) * scale[:, None]
        if BF16_BY_BITS:
            w_even = _round_to_bf16_bits(w_even)
            w_odd = _round_to_bf16_bits(w_odd)
        else:
            w_even = w_even.to(W_DTYPE)
            w_odd = w_odd.to(W_DTYPE)
        x_cols = k0 + 2 * pairs
        x_even = tl.load(
            x_ptr + rows[:, None] * stride_xm + x_cols[None, :] * stride_xk, mask=row_mask[:, None], other=0.0
        )
        x_odd = tl.load(
            x_ptr + rows[:, None] * stride_xm + (x_cols + 1)[None, :] * stride_xk, mask=row_mask[:, None], other=0.0
        )
        if USE_DOT:
            if UPCAST:
                x_even = x_even.to(tl.float32)
                x_odd = x_odd.to(tl.float32)
                w_even = w_even.to(tl.float32)
                w_odd = w_odd.to(tl.float32)
            if IEEE_FP32:
                acc = tl.dot(x_even, tl.trans(w_even), acc, input_precision="ieee")
                acc = tl.dot(x_odd, tl.trans(w_odd), acc, input_precision="ieee")
            else:
                acc = tl.dot(x_even, tl.trans(w_even), acc)
                acc = tl.dot(x_odd, tl.trans(w_odd), acc)
        else:
            prod = x_even.to(tl.float32)[:, None, :] * w_even.to(tl.float32)[None, :, :]
            prod += x_odd.to(tl.float32)[:, None, :] * w_odd.to(tl.float32)[None, :, :]
            acc += tl.sum(prod, axis=2)

    out_offsets = rows[:, None] * stride_om + cols[None, :] * stride_on
    out_mask = row_mask[:, None] & col_mask[None, :]
    if SPLIT:
        tl.store(out_ptr + pid_k * stride_os + out_offsets, acc, mask=out_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        if BF16_BY_BITS:
            acc = _round_to_bf16_bits(acc)
        tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


# ----------------------------------------------------------------------------------------------
# the weight and the launch configuration
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


@dataclass(frozen=True)
class NF4MatmulConfig:
    """Fixed launch choices (reasoned, not yet measured on a GPU: see benchmarks/nf4.py).

    - up to `gemv_max_rows` rows: CUDA-core multiply-reduce. Tensor cores need M padded to 16,
      while an H100 streams ~6.7e12 NF4 weights/s against ~3.3e13 fp32 FMA/s, so plain FMAs keep
      up with the weight stream up to ~5 rows.
    - `block_k` = 64 (capped at the blocksize, of which it must be a divisor): a tile row is one
      quantisation block, 32 contiguous bytes (one memory sector).
    - splits over K until about `programs_per_sm` programs per SM are in flight."""

    gemv_max_rows: int = 4
    gemv_block_n: int = 32
    dot_block_n: int = 64
    max_block_m: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3
    programs_per_sm: int = 4


_INTERPRETER_NF4_CONFIG = NF4MatmulConfig(gemv_block_n=8, dot_block_n=16, max_block_m=16, block_k=32,
                                          num_warps=1, num_stages=1, programs_per_sm=2)


def default_nf4_config(device: torch.device) -> NF4MatmulConfig:
    if device.type != "cuda" and interpreting():
        return _INTERPRETER_NF4_CONFIG
    return NF4MatmulConfig()


_W_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


# ----------------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------------


def nf4_matmul(x: Tensor, weight: NF4Weight, bias: Optional[Tensor] = None,
               config: Optional[NF4MatmulConfig] = None) -> Tensor:
    """`x @ dequantize_nf4(weight).to(x.dtype).T + bias` for x [M, K]; returns [M, N] in x's dtype.

    With the default config the launch goes through the custom op ``torch.ops.grpo_fast.nf4_matmul``,
    which torch.compile treats as one opaque node: a compiled (CUDA-graph) decode step keeps the
    kernel inside its graph instead of breaking around every linear layer."""
    if x.dim() != 2:
        raise ValueError(f"x: expected a 2-D [rows, in_features] tensor, received shape {list(x.shape)}")
    m, k = x.shape
    n = weight.out_features
    if k != weight.in_features:
        raise ValueError(f"x: expected in_features={weight.in_features} columns, received {k}")
    if x.dtype not in _W_DTYPES:
        raise ValueError(f"x: expected dtype float32, float16 or bfloat16, received {x.dtype}")
    if x.device != weight.packed.device:
        raise ValueError(f"x: expected device {weight.packed.device} (the weight's), received {x.device}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != n):
        raise ValueError(f"bias: expected shape [{n}], received {list(bias.shape)}")
    if config is None:
        return torch.ops.grpo_fast.nf4_matmul(
            x, weight.packed, weight.absmax, weight.code, weight.nested_code, weight.nested_absmax,
            weight.nested_offset, bias, n, k, weight.blocksize, weight.nested_blocksize)
    return _launch(x, weight, bias, config)


@torch.library.custom_op("grpo_fast::nf4_matmul", mutates_args=())
def _nf4_matmul_op(x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, nested_code: Optional[Tensor],
                   nested_absmax: Optional[Tensor], nested_offset: Optional[Tensor], bias: Optional[Tensor],
                   out_features: int, in_features: int, blocksize: int, nested_blocksize: int) -> Tensor:
    weight = NF4Weight(packed=packed, absmax=absmax, code=code, out_features=out_features, in_features=in_features,
                       blocksize=blocksize, nested_code=nested_code, nested_absmax=nested_absmax,
                       nested_offset=nested_offset, nested_blocksize=nested_blocksize)
    return _launch(x, weight, bias, default_nf4_config(x.device))


@_nf4_matmul_op.register_fake
def _nf4_matmul_shape(x, packed, absmax, code, nested_code, nested_absmax, nested_offset, bias, out_features,
                      in_features, blocksize, nested_blocksize):
    return x.new_empty(x.shape[0], out_features)


def _launch(x: Tensor, weight: NF4Weight, bias: Optional[Tensor], cfg: NF4MatmulConfig) -> Tensor:
    """The kernel launch for checked inputs (see nf4_matmul)."""
    m, k = x.shape
    n = weight.out_features
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m == 0 or n == 0:
        return out

    use_dot = m > cfg.gemv_max_rows
    block_m = min(cfg.max_block_m, max(16 if use_dot else 1, triton.next_power_of_2(m)))
    block_n = cfg.dot_block_n if use_dot else cfg.gemv_block_n
    block_k = min(cfg.block_k, weight.blocksize)
    m_tiles, n_tiles = triton.cdiv(m, block_m), triton.cdiv(n, block_n)
    k_tiles = k // block_k
    # Split K for parallelism, but never so far that the fp32 partials (splits * M * N * 4 bytes)
    # outweigh the packed weight (N * K / 2 bytes).
    want = triton.cdiv(cfg.programs_per_sm * _num_sms(x.device), m_tiles * n_tiles)
    max_by_traffic = max(1, k // (8 * min(m, block_m)))
    splits = max(1, min(want, k_tiles, max_by_traffic))
    k_per_split = triton.cdiv(k_tiles, splits) * block_k
    splits = triton.cdiv(k, k_per_split)

    split = splits > 1
    target = torch.empty(splits, m, n, device=x.device, dtype=torch.float32) if split else out.unsqueeze(0)
    nested = weight.nested
    dummy = weight.absmax
    _nf4_matmul_kernel[(n_tiles, splits, m_tiles)](
        x,
        x.stride(0),
        x.stride(1),
        weight.packed,
        weight.absmax,
        weight.nested_code if nested else dummy,
        weight.nested_absmax if nested else dummy,
        weight.nested_offset if nested else dummy,
        weight.code,
        bias if bias is not None else dummy,
        target,
        target.stride(0),
        target.stride(1),
        target.stride(2),
        m,
        n,
        k,
        k_per_split,
        weight.nested_blocksize,
        BLOCKSIZE=weight.blocksize,
        HAS_BIAS=bias is not None,
        NESTED=nested,
        SPLIT=split,
        USE_DOT=use_dot,
        UPCAST=interpreting(),
        IEEE_FP32=x.dtype == torch.float32 and not interpreting(),
        W_DTYPE=_W_DTYPES[x.dtype],
        BF16_BY_BITS=interpreting() and x.dtype == torch.bfloat16,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if split:
        total = target.sum(0)
        if bias is not None:
            total += bias.float()
        out.copy_(total)
    return out


def nf4_matmul_reference(x: Tensor, weight: NF4Weight, bias: Optional[Tensor] = None) -> Tensor:
    """The same product in plain PyTorch (dequantise, round to x's dtype, matmul): the oracle."""
    codes = torch.stack([weight.packed >> 4, weight.packed & 15], dim=1).reshape(-1).long()
    absmax = weight.absmax
    if weight.nested:
        block = torch.arange(absmax.numel(), device=absmax.device) // weight.nested_blocksize
        absmax = weight.nested_code[absmax.long()] * weight.nested_absmax[block] + weight.nested_offset
    dense = (weight.code[codes].view(-1, weight.blocksize) * absmax.view(-1, 1)).view(
        weight.out_features, weight.in_features
    )
    return torch.nn.functional.linear(x, dense.to(x.dtype), None if bias is None else bias.to(x.dtype))
