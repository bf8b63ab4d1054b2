"""NF4 decode matmul at the memory-bandwidth limit: y = x @ W.T (+ bias) (+ LoRA) for a few rows x.

Decoding reads every weight once per token for a handful of rows, so the matmul is bound by
reading the packed 4-bit weight, and what the kernel spends per weight on dequantisation decides
how close it gets. bitsandbytes' layout (row-major nibbles, double-quantised per-64 scales) is
kept for training; for decoding the weight is repacked once (``repack_nf4``) into a layout made
for this kernel (the idea of Marlin and torchao's int4 layouts):

- **Nibbles.** K is cut into chunks of ``CHUNK`` = 64 values (the quantisation block, or the block
  when it is 32). Byte b of a row's chunk holds the codes of k = b (high nibble) and k = CHUNK/2 + b
  (low nibble), so the two halves of a chunk meet two contiguous halves of x (no stride-2 loads),
  and the rows are stored in tiles of 16: tile (rows r..r+15, chunk c) is 16 x CHUNK/2 contiguous
  bytes, the tiles of a row block in chunk order. A program streams one contiguous region per row
  block, 16 contiguous bytes per thread per load.
- **Scales.** The double quantisation is resolved once into fp32 scales ``[K / CHUNK, N]``
  (bitsandbytes' own arithmetic: nested_code[q] * nested_absmax + offset), a chunk's scales for
  consecutive rows contiguous.
- **Members.** Linears that share an input (q/k/v, gate/up) are concatenated along N into one
  weight: one launch reads x once for all of them; ``segments`` records where each member starts.

The repacked copy takes N*K/2 + 4*N*K/CHUNK bytes (0.5625 bytes per weight at CHUNK = 64, against
bitsandbytes' 0.516): 3.7 GB for Qwen2.5-7B's decoder Linears. ``DecodeNF4Weight.nbytes`` states it.

Per program (BLOCK_N output features, one split of the chunks, BLOCK_MX rows of x):

    for each chunk:  hi, lo = T[byte >> 4], T[byte & 15]                 [BLOCK_N, CHUNK/2] each
                     part   = hi @ x[:, k0 : k0+CHUNK/2].T + lo @ x[:, k0+CHUNK/2 : k0+CHUNK].T
                     acc   += part * scale[chunk, rows]                   (fp32, per row)

The rows of x are the small (N) dimension of the tensor-core product: the weights are the 16-row
side of mma.m16n8k16 (or wgmma's 64-row side), so one row of x costs what 16 do. The scale
multiplies the fp32 partial sums of its chunk instead of every weight. The lookup T (the 16 NF4
levels in x's dtype) runs in registers on the GPU: ``_lut_asm`` builds a PTX sequence of byte
permutes (prmt) that turns 4 packed bytes into their 8 bf16 / fp16 values in 22 integer
instructions, with no memory access; under the Triton interpreter (no inline PTX) it is a load
from a 16-entry table. Both give exactly the levels rounded to x's dtype.

Numerics: the levels are rounded to x's dtype (exact for +-1 and 0, within 0.31% in bf16), the
products with x are exact in fp32 and the fp32 partial sums are scaled by fp32 scales; bitsandbytes
instead rounds code * scale to the dtype per weight. Both are within one rounding of the dtype per
weight of the exact product; they differ in which roundings, not in size (tests/test_nf4_decode.py).

Split-K: output tiles are few for small N (k/v: 512 features), so K is split over programs; each
writes its fp32 partial sums ([splits, M, N] workspace) and takes a ticket from a per-tile counter;
the program that takes the last ticket adds the partials in split order 0, 1, ... (a fixed order:
results do not depend on scheduling) and runs the epilogue (bias, LoRA, store), then resets the
counter for the next call. No atomics touch the results, no PyTorch kernel runs after the launch.

Stream-K: where the tiles are too few for the SMs even split (q/k/v at 16-64 rows: 72 tiles of 64
features), programs take equal shares of all tiles' chunks in a row instead (``StreamSchedule``);
a tile cut between programs is reduced the same way, by its last piece to finish, in program order.

LoRA (``lora_a``/``lora_b`` of ``nf4_decode_matmul``): the epilogue adds (x @ A.T) @ (s * B).T per
member, the first product computed beforehand once per shared input (``xa``), B (times the LoRA
scale, in x's dtype) read by the tile that owns the rows.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
import triton
import triton.language as tl
from torch import Tensor

from .config import interpreting
from .launch import SCHEDULERS_PER_SM, busiest_sm_cycles, launch
from .logprob_kernel import _num_sms
from .nf4_matmul import NF4Weight
from .tl_math import round_to_bf16_bits

ROW_TILE = 16  # rows per stored tile of the repacked layout
ROW_ALIGN = 128  # N is padded to a multiple of the largest BLOCK_N, so no program reads past the end
MAX_CHUNK = 64
STREAM_MARGIN = 0.9  # plan_launch takes stream-K over split-K below this fraction of split-K's estimated time

# bitsandbytes' NF4 levels (bitsandbytes.functional.get_4bit_type("nf4")); weights quantised with
# another table run through the table-load path instead of the in-register lookup.
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)


def _lut_asm(levels: Sequence[float], dtype: torch.dtype, pack: int, words_in_registers: bool = False) -> str:
    """PTX for ``tl.inline_asm_elementwise``: ``pack`` (2 or 4) packed bytes in the last operand; the
    first outputs receive the values of their high nibbles, the next ones those of their low nibbles
    (two 16-bit values per register, element 0 in the low half).

    prmt picks bytes from an 8-byte pair of registers by the 3-bit fields of a selector, 4 at a
    time, so the 16 levels are split in byte planes (low / high byte of each 16-bit value) and in
    halves (levels 0-7, 8-15): per plane, one prmt reads the first half with the nibbles as
    selectors (a nibble >= 8 has its sign-replicate bit set and yields junk there), one the second
    half with the nibbles XOR 8, and a third keeps, per byte, the half that the nibble's bit 3
    names (selector k + 4 * bit3). Two bytes hold nibbles l0 h0 l1 h1, so they are themselves the
    selector of their 4 values; two more prmts assemble the 16-bit values. 11 integer instructions
    per 4 values, 22 per 8 with pack 4.

    ``words_in_registers``: the 8 table words (``lut_words``: low-byte plane, then high-byte plane,
    4 words each) come as operands after the packed bytes (each word ``pack`` registers, as Triton
    passes a 32-bit operand; the first is read) instead of immediates. ptxas otherwise moves one
    immediate word of each prmt into a register before it, every time (the prmt's destination
    reuses that register): 4 moves per 2 bytes with wgmma's operands. Words loaded at run time
    stay in 8 registers for the whole loop."""
    bits = torch.tensor(levels, dtype=torch.float32).to(dtype).view(torch.int16).int().tolist()
    lo = [b & 0xFF for b in bits]
    hi = [(b >> 8) & 0xFF for b in bits]
    first_word = pack + 1  # operand index of word 0: after the outputs and the packed bytes

    def word(plane, quarter):
        if words_in_registers:
            return f"${first_word + pack * ((0 if plane is lo else 4) + quarter)}"
        return "0x%08X" % sum(plane[4 * quarter + i] << (8 * i) for i in range(4))

    src = f"${4 if pack == 4 else 2}"  # outputs first: pack / 2 registers of high-nibble values, then low ones
    lines = ["{", ".reg .b32 w, x8, u, keep, p0, p1, l, h, w1, x81, keep1;"]
    if pack == 4:  # bytes 2-3 use the upper halves, shifted down (prmt reads selector bits 0-15)
        lines += [f"xor.b32 x8, {src}, 0x88888888;", f"mul.hi.u32 u, {src}, 0x80000000;",
                  "lop3.b32 keep, u, 0x44444444, 0x32103210, 0xEA;",
                  f"mul.hi.u32 w1, {src}, 0x10000;", "mul.hi.u32 x81, x8, 0x10000;", "mul.hi.u32 keep1, keep, 0x10000;"]
        groups = ((src, "x8", "keep"), ("w1", "x81", "keep1"))
    else:
        lines += [f"cvt.u32.u16 w, {src};", "xor.b32 x8, w, 0x8888;", "mul.hi.u32 u, w, 0x80000000;",
                  "lop3.b32 keep, u, 0x4444, 0x3210, 0xEA;"]
        groups = (("w", "x8", "keep"),)
    # x8: selectors into levels 8-15; keep: (u & 0x44..) | 0x3210..: byte k of the first or (k + 4) of the second half
    for index, (sel, sel8, keep) in enumerate(groups):
        for plane, out in ((lo, "l"), (hi, "h")):
            lines += [f"prmt.b32 p0, {word(plane, 0)}, {word(plane, 1)}, {sel};",
                      f"prmt.b32 p1, {word(plane, 2)}, {word(plane, 3)}, {sel8};",
                      f"prmt.b32 {out}, p0, p1, {keep};"]
        # bytes of l / h: [l0, h0, l1, h1] (low / high byte of each value)
        lines += [f"prmt.b32 ${index}, l, h, 0x7351;", f"prmt.b32 ${len(groups) + index}, l, h, 0x6240;"]
    lines.append("}")
    return "\n".join(lines)


_ASM = {(dtype, pack, words): _lut_asm(NF4_LEVELS, dtype, pack, words_in_registers=words)
        for dtype in (torch.bfloat16, torch.float16) for pack in (2, 4) for words in (False, True)}


def lut_words(levels: Sequence[float], dtype: torch.dtype) -> list[int]:
    """The 8 words ``_lut_asm`` reads with ``words_in_registers``: bytes 0-3 of word q (q < 4) are
    the low bytes of levels 4q..4q+3 in ``dtype``, of word 4 + q their high bytes (``_lut_words``
    computes them on the GPU from the level table)."""
    bits = torch.tensor(levels, dtype=torch.float32).to(dtype).view(torch.int16).int().tolist()
    return [sum(((bits[4 * q + i] >> shift) & 0xFF) << (8 * i) for i in range(4))
            for shift in (0, 8) for q in range(4)]


@triton.jit
def _lut_words(lut_ptr, PER_THREAD: tl.constexpr = True):
    """``lut_words`` from the 16 levels at lut_ptr (2 bytes each), as 8 uint32 scalars: loaded, not
    constants, so that the compiler keeps them in registers."""
    words = lut_ptr.to(tl.pointer_type(tl.uint32), bitcast=True)  # word j: level 2j | level 2j+1 << 16
    a0, b0 = tl.load(words + 0), tl.load(words + 1)
    a1, b1 = tl.load(words + 2), tl.load(words + 3)
    a2, b2 = tl.load(words + 4), tl.load(words + 5)
    a3, b3 = tl.load(words + 6), tl.load(words + 7)
    # ptxas keeps a uniform value in a uniform register and copies it to a register before every use
    # (4 copies per 2 bytes): each word is ORed with lane id & level 7's bits, which are 0 (NF4's
    # level 7 is 0.0: the words are read with the standard levels only), unknown to ptxas
    if PER_THREAD:
        zero = tl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r,r", [b1], dtype=tl.uint32, is_pure=True,
                                         pack=1) & (b1 >> 16)
    else:  # the interpreter (no inline PTX)
        zero = b1 & 0
    return (_low_bytes(a0, b0) | zero, _low_bytes(a1, b1) | zero, _low_bytes(a2, b2) | zero,
            _low_bytes(a3, b3) | zero, _high_bytes(a0, b0) | zero, _high_bytes(a1, b1) | zero,
            _high_bytes(a2, b2) | zero, _high_bytes(a3, b3) | zero)


@triton.jit
def _low_bytes(a, b):
    return (a & 0xFF) | ((a >> 8) & 0xFF00) | ((b & 0xFF) << 16) | ((b << 8) & 0xFF000000)


@triton.jit
def _high_bytes(a, b):
    return ((a >> 8) & 0xFF) | ((a >> 16) & 0xFF00) | ((b << 8) & 0xFF0000) | (b & 0xFF000000)


_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _lookup(packed, lut_ptr, words, USE_ASM: tl.constexpr, ASM: tl.constexpr, PACK: tl.constexpr,
            REG_WORDS: tl.constexpr):
    """(T[packed >> 4], T[packed & 15]) for a uint8 tensor, in the table's dtype; ``words``: _lut_words
    (read by the asm with REG_WORDS)."""
    if USE_ASM:
        dtype = lut_ptr.dtype.element_ty
        if not REG_WORDS:
            if PACK == 4:
                hi, lo = tl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,r", [packed], dtype=(dtype, dtype), is_pure=True,
                                                   pack=4)
            else:
                hi, lo = tl.inline_asm_elementwise(ASM, "=r,=r,h", [packed], dtype=(dtype, dtype), is_pure=True,
                                                   pack=2)
        elif PACK == 4:
            w0, w1, w2, w3, w4, w5, w6, w7 = words
            hi, lo = tl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,r" + ",r,r,r,r" * 8,
                                               [packed, w0, w1, w2, w3, w4, w5, w6, w7], dtype=(dtype, dtype),
                                               is_pure=True, pack=4)
        else:
            w0, w1, w2, w3, w4, w5, w6, w7 = words
            hi, lo = tl.inline_asm_elementwise(ASM, "=r,=r,h" + ",r,r" * 8, [packed, w0, w1, w2, w3, w4, w5, w6, w7],
                                               dtype=(dtype, dtype), is_pure=True, pack=2)
    else:
        hi = tl.load(lut_ptr + (packed >> 4).to(tl.int32))
        lo = tl.load(lut_ptr + (packed & 15).to(tl.int32))
    return hi, lo


@triton.jit
def _epilogue(acc, row0, rows, xs, xmask, N, bias_ptr, xa_ptr, stride_xam, lb_ptr, seg1, seg2, out_ptr, stride_om,
              HAS_BIAS: tl.constexpr, LORA_R: tl.constexpr, LORA_G: tl.constexpr, LORA_ONE: tl.constexpr,
              UPCAST: tl.constexpr, BF16_BY_BITS: tl.constexpr, EVEN_N: tl.constexpr):
    """acc (fp32 [BLOCK_N, BLOCK_MX], out^T) + bias + LoRA, stored as out[xs, rows] in out's dtype.
    LORA_ONE: the members start at multiples of BLOCK_N, so the tile's rows (from row0) are one member's."""
    if EVEN_N:  # every tile's features exist: a constant mask, which the compiler drops
        row_mask = tl.full(rows.shape, 1, tl.int1)
    else:
        row_mask = rows < N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=row_mask, other=0.0)[:, None]
    if LORA_R > 0:
        r = tl.arange(0, LORA_R)
        lb = tl.load(lb_ptr + rows[:, None] * LORA_R + r[None, :])  # [BLOCK_N, R], zero past N
        if UPCAST:
            lb = lb.to(tl.float32)
        if LORA_ONE:
            g = (row0 >= seg1).to(tl.int32) + (row0 >= seg2).to(tl.int32)
            xa = tl.load(xa_ptr + xs[None, :] * stride_xam + (g * LORA_R + r)[:, None], mask=xmask[None, :],
                         other=0.0)  # [R, BLOCK_MX]
            if UPCAST:
                xa = xa.to(tl.float32)
            acc = tl.dot(lb, xa, acc)
        else:
            for g in tl.static_range(LORA_G):
                xa = tl.load(xa_ptr + xs[None, :] * stride_xam + (g * LORA_R + r)[:, None], mask=xmask[None, :],
                             other=0.0)  # [R, BLOCK_MX]
                if UPCAST:
                    xa = xa.to(tl.float32)
                delta = tl.dot(lb, xa)
                lo_row = 0 if g == 0 else (seg1 if g == 1 else seg2)
                hi_row = N if g == LORA_G - 1 else (seg1 if g == 0 else seg2)
                member = (rows >= lo_row) & (rows < hi_row)
                acc += tl.where(member[:, None], delta, 0.0)
    if BF16_BY_BITS:
        acc = round_to_bf16_bits(acc)
    tl.store(out_ptr + xs[None, :] * stride_om + rows[:, None], acc.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & xmask[None, :])


@triton.jit
def _tile_sum(q_ptr, x_ptr, stride_xm, scale_ptr, lut_ptr, words, rows, xs, xmask, n_chunks, N_pad, c0, chunks,
              HALF: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_MX: tl.constexpr, CPI: tl.constexpr,
              USE_ASM: tl.constexpr, ASM: tl.constexpr, REG_WORDS: tl.constexpr, PACK: tl.constexpr,
              UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """fp32 [BLOCK_N, BLOCK_MX]: the features ``rows`` times x's rows ``xs`` over chunks c0 .. c0+chunks."""
    byte = tl.arange(0, HALF)
    tile_bytes = 16 * HALF  # one stored tile: 16 rows of one chunk
    row_base = tl.multiple_of((rows // 16) * (n_chunks * tile_bytes) + (rows % 16) * HALF, HALF)
    q_ptrs = q_ptr + row_base[:, None] + byte[None, :] + c0 * tile_bytes
    x_ptrs = x_ptr + xs[None, :] * stride_xm + (c0 * 2 * HALF + byte)[:, None]
    s_ptrs = scale_ptr + c0 * N_pad + rows
    acc = tl.zeros([BLOCK_N, BLOCK_MX], tl.float32)
    for _ in range(0, chunks, CPI):
        for i in tl.static_range(CPI):
            hi, lo = _lookup(tl.load(q_ptrs + i * tile_bytes), lut_ptr, words, USE_ASM, ASM, PACK, REG_WORDS)
            x_hi = tl.load(x_ptrs + i * 2 * HALF, mask=xmask[None, :], other=0.0)
            x_lo = tl.load(x_ptrs + (i * 2 + 1) * HALF, mask=xmask[None, :], other=0.0)
            if UPCAST:
                hi, lo, x_hi, x_lo = hi.to(tl.float32), lo.to(tl.float32), x_hi.to(tl.float32), x_lo.to(tl.float32)
            if IEEE:
                part = tl.dot(hi, x_hi, input_precision="ieee")
                part = tl.dot(lo, x_lo, part, input_precision="ieee")
            else:
                part = tl.dot(hi, x_hi)
                part = tl.dot(lo, x_lo, part)
            acc += part * tl.load(s_ptrs + i * N_pad)[:, None]
        q_ptrs += CPI * tile_bytes
        x_ptrs += CPI * 2 * HALF
        s_ptrs += CPI * N_pad
    return acc


@triton.jit
def _nf4_decode_kernel(
    x_ptr, stride_xm,  # [M, K] activations, unit stride along K
    q_ptr,  # repacked nibbles (see the module docstring)
    scale_ptr,  # [K / CHUNK, N_pad] fp32
    lut_ptr,  # [16] levels in x's dtype (table-load lookup)
    bias_ptr,  # [N] fp32 (dummy without bias)
    xa_ptr, stride_xam,  # [M, LORA_G * LORA_R] x @ A.T per member (dummy without LoRA)
    lb_ptr,  # [N_pad, LORA_R] scale * B, each row its member's (dummy without LoRA)
    out_ptr, stride_om,  # [M, N]
    part_ptr,  # fp32 partial sums: [SPLITS, M, N_pad] (split-K), [programs, 2, m_tiles, BLOCK_N, BLOCK_MX] (STREAM)
    count_ptr,  # [m_tiles * n_tiles] int32 tickets, zero between calls
    M, N, N_pad, n_chunks, chunks_per_split, seg1, seg2,
    n_tiles,  # output tiles (STREAM)
    HALF: tl.constexpr,  # CHUNK // 2
    BLOCK_N: tl.constexpr, BLOCK_MX: tl.constexpr,
    CPI: tl.constexpr,  # chunks per loop iteration (divides chunks_per_split; with STREAM, n_chunks)
    SPLITS: tl.constexpr,
    STREAM: tl.constexpr,  # stream-K: program_id(0) takes an equal share of all tiles' chunks (see below)
    MAX_PIECES: tl.constexpr,  # STREAM: the most programs sharing one tile
    PROGRAMS: tl.constexpr, UNITS: tl.constexpr, N_TILES: tl.constexpr,  # STREAM: grid[0], n_chunks // CPI, n_tiles
    HAS_BIAS: tl.constexpr, LORA_R: tl.constexpr, LORA_G: tl.constexpr,
    LORA_ONE: tl.constexpr,  # every member starts at a multiple of BLOCK_N: one member per tile
    USE_ASM: tl.constexpr, ASM: tl.constexpr,
    REG_WORDS: tl.constexpr,  # the lookup's table words in registers (_lut_words), not immediates
    PACK: tl.constexpr,  # bytes per lookup: 4 (32-bit loads; on sm_90 wgmma with REG_WORDS too), or 2 (16-bit)
    UPCAST: tl.constexpr,  # interpreter: bf16 dots are wrong there, fp32 ones exact
    IEEE: tl.constexpr,  # fp32 x on a GPU: full-precision products, not tf32
    BF16_BY_BITS: tl.constexpr,  # interpreter with bf16 output: round to nearest even by integer arithmetic
    EVEN_M: tl.constexpr = False,  # M a multiple of BLOCK_MX: no masks on x's rows
    EVEN_N: tl.constexpr = False,  # N a multiple of BLOCK_N: no masks on the features
    REDUCE_GROUP: tl.constexpr = 1,  # split-K: the partials the reducing program loads at once
):
    pid_m = tl.program_id(2)
    xs = pid_m * BLOCK_MX + tl.arange(0, BLOCK_MX)
    if EVEN_M:  # every tile's rows of x exist: a constant mask, which the compiler drops
        xmask = tl.full([BLOCK_MX], 1, tl.int1)
    else:
        xmask = xs < M
    words = _lut_words(lut_ptr) if REG_WORDS and USE_ASM else None
    if STREAM:
        # The tiles' chunks in a row (tile 0's CPI-chunk units, then tile 1's...), cut in equal shares:
        # program p takes units [p * total // P, (p + 1) * total // P). A tile whose units one program
        # covers runs its epilogue there; the pieces of a tile cut between programs write their fp32
        # sums to the program's slot (0: its first tile, 1: its last), and the piece that takes the
        # tile's last ticket adds them in program order (fixed) and runs the epilogue.
        # (programs, units and tiles are constexprs: the divisions by them are multiplications)
        pid = tl.program_id(0)
        programs: tl.constexpr = PROGRAMS
        units: tl.constexpr = UNITS
        total_units: tl.constexpr = N_TILES * UNITS
        start = pid * total_units // programs
        end = (pid + 1) * total_units // programs
        t_first = start // units
        nl = tl.arange(0, BLOCK_N)
        for t in range(t_first, (end - 1) // units + 1):
            u_lo = tl.maximum(start - t * units, 0)
            u_hi = tl.minimum(end - t * units, units)
            rows = t * BLOCK_N + nl
            acc = _tile_sum(q_ptr, x_ptr, stride_xm, scale_ptr, lut_ptr, words, rows, xs, xmask, n_chunks, N_pad,
                            u_lo * CPI, (u_hi - u_lo) * CPI, HALF, BLOCK_N, BLOCK_MX, CPI, USE_ASM, ASM, REG_WORDS,
                            PACK, UPCAST, IEEE)
            total = acc
            last = u_hi - u_lo == units  # the whole tile here: no partials
            if u_hi - u_lo != units:
                xl = tl.arange(0, BLOCK_MX)  # slots [programs, 2, m_tiles, BLOCK_N, BLOCK_MX]: the accumulator's layout
                tile_offsets = nl[:, None] * BLOCK_MX + xl[None, :]
                slot = (pid * 2 + (t != t_first).to(tl.int32)) * tl.num_programs(2) + pid_m
                tl.store(part_ptr + slot * BLOCK_N * BLOCK_MX + tile_offsets, acc, mask=xmask[None, :])
                tl.debug_barrier()  # every thread's partial is written before the ticket (release) is taken
                p_first = ((t * units + 1) * programs - 1) // total_units  # the programs holding its units
                p_last = ((t * units + units) * programs - 1) // total_units
                # each program's slot 0 holds its first tile: p_first's is tile t only when it starts in t
                first_slot = (p_first * total_units // programs < t * units).to(tl.int32)
                ticket = tl.atomic_add(count_ptr + pid_m * n_tiles + t, 1, sem="acq_rel")
                last = ticket == p_last - p_first
                if last:  # the last piece of this tile to finish: reduce in program order
                    total = tl.load(part_ptr + ((p_first * 2 + first_slot) * tl.num_programs(2) + pid_m) * BLOCK_N
                                    * BLOCK_MX + tile_offsets, mask=xmask[None, :], other=0.0, cache_modifier=".cg")
                    for i in tl.static_range(1, MAX_PIECES):  # unrolled: the others' slots are slot 0
                        p = p_first + i
                        if p <= p_last:  # a branch, not a mask: no zeroed registers for pieces that are not there
                            total += tl.load(part_ptr + ((p * 2) * tl.num_programs(2) + pid_m) * BLOCK_N * BLOCK_MX
                                             + tile_offsets, mask=xmask[None, :], other=0.0, cache_modifier=".cg")
                    tl.atomic_xchg(count_ptr + pid_m * n_tiles + t, 0)
            if last:
                _epilogue(total, t * BLOCK_N, rows, xs, xmask, N, bias_ptr, xa_ptr, stride_xam, lb_ptr, seg1, seg2, out_ptr,
                          stride_om, HAS_BIAS, LORA_R, LORA_G, LORA_ONE, UPCAST, BF16_BY_BITS, EVEN_N)
    else:
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = _tile_sum(q_ptr, x_ptr, stride_xm, scale_ptr, lut_ptr, words, rows, xs, xmask, n_chunks, N_pad,
                        pid_k * chunks_per_split, chunks_per_split, HALF, BLOCK_N, BLOCK_MX, CPI, USE_ASM, ASM,
                        REG_WORDS, PACK, UPCAST, IEEE)
        if SPLITS == 1:
            _epilogue(acc, pid_n * BLOCK_N, rows, xs, xmask, N, bias_ptr, xa_ptr, stride_xam, lb_ptr, seg1, seg2, out_ptr, stride_om,
                      HAS_BIAS, LORA_R, LORA_G, LORA_ONE, UPCAST, BF16_BY_BITS, EVEN_N)
        else:
            parts = part_ptr + xs[None, :] * N_pad + rows[:, None]
            tl.store(parts + pid_k * M * N_pad, acc, mask=xmask[None, :])
            tl.debug_barrier()  # every thread's partial is written before the ticket (release) is taken
            tile = pid_m * tl.num_programs(0) + pid_n
            ticket = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel")
            if ticket == SPLITS - 1:  # the last split of this tile to finish: reduce in split order
                total = tl.zeros([BLOCK_N, BLOCK_MX], tl.float32)
                # REDUCE_GROUP splits' partials a group, unrolled: their loads do not depend on the
                # sum, so they are issued together (one round trip to L2 for each group, not one for
                # each split) and added in split order; the groups in a loop with run-time trips (all
                # SPLITS tiles in flight at once would spill). A group's loads past SPLITS are masked
                # to zeros, which leave the sum as it is.
                for s0 in range(0, SPLITS if SPLITS <= REDUCE_GROUP else tl.num_programs(1), REDUCE_GROUP):
                    for i in tl.static_range(REDUCE_GROUP):
                        if SPLITS % REDUCE_GROUP == 0:
                            keep = xmask[None, :]
                        else:
                            keep = xmask[None, :] & (s0 + i < SPLITS)
                        total += tl.load(parts + (s0 + i) * M * N_pad, mask=keep, other=0.0, cache_modifier=".cg")
                tl.atomic_xchg(count_ptr + tile, 0)
                _epilogue(total, pid_n * BLOCK_N, rows, xs, xmask, N, bias_ptr, xa_ptr, stride_xam, lb_ptr, seg1, seg2, out_ptr,
                          stride_om, HAS_BIAS, LORA_R, LORA_G, LORA_ONE, UPCAST, BF16_BY_BITS, EVEN_N)


# ----------------------------------------------------------------------------------------------
# the repacked weight
# ----------------------------------------------------------------------------------------------


@dataclass
class DecodeNF4Weight:
    """One or more NF4 weights sharing an input, repacked for the decode kernel (see the module docstring)."""

    qweight: Tensor  # [N_pad * K / 2] uint8
    scales: Tensor  # [K / chunk, N_pad] fp32
    levels: Tensor  # [16] fp32 NF4 levels
    in_features: int  # K
    segments: tuple[int, ...]  # member boundaries along N: (0, N_1, N_1 + N_2, ..., N)
    chunk: int
    bias: Optional[Tensor] = None  # [N] fp32 (zeros for members without bias)
    standard_levels: bool = True  # bitsandbytes' NF4 table: the in-register lookup applies
    counters: Optional[Tensor] = None  # [4 * N_pad / 16] int32 split-K tickets (zero between calls)
    tables: dict = field(default_factory=dict)  # dtype -> the 16 levels rounded to it

    @property
    def out_features(self) -> int:
        return self.segments[-1]

    @property
    def padded_rows(self) -> int:
        return self.scales.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes of the repacked copy (packed nibbles, scales, bias)."""
        extra = 0 if self.bias is None else self.bias.numel() * 4
        return self.qweight.numel() + self.scales.numel() * 4 + extra



def repack_nf4(weights: Sequence[NF4Weight], biases: Optional[Sequence[Optional[Tensor]]] = None) -> DecodeNF4Weight:
    """The decode layout of ``weights`` (one, or several sharing in_features, concatenated along N).

    Costs one pass over the packed bytes with a temporary of N*K bytes (the unpacked codes).
    Raises ValueError for weights the kernel cannot read together."""
    if not weights:
        raise ValueError("weights: expected at least one NF4Weight, received none")
    k = weights[0].in_features
    for index, weight in enumerate(weights):
        if weight.in_features != k:
            raise ValueError(f"weights[{index}]: expected in_features={k} (the first weight's), "
                             f"received {weight.in_features}")
        if not torch.equal(weight.code.cpu(), weights[0].code.cpu()):
            raise ValueError(f"weights[{index}]: expected the first weight's NF4 levels, received another table")
    chunk = min(MAX_CHUNK, min(weight.blocksize for weight in weights))
    if k % chunk:
        raise ValueError(f"weights: expected in_features divisible by {chunk}, received {k}")
    if biases is not None and len(biases) != len(weights):
        raise ValueError(f"biases: expected one per weight ({len(weights)}), received {len(biases)}")
    device = weights[0].packed.device
    n = sum(weight.out_features for weight in weights)
    n_pad = -(-n // ROW_ALIGN) * ROW_ALIGN
    chunks = k // chunk
    codes = torch.zeros(n_pad, k, dtype=torch.uint8, device=device)
    scales = torch.zeros(chunks, n_pad, dtype=torch.float32, device=device)
    segments, start = [0], 0
    for weight in weights:
        rows = weight.out_features
        packed = weight.packed
        codes[start:start + rows] = torch.stack([packed >> 4, packed & 15], dim=1).view(rows, k)
        absmax = weight.block_scales().view(rows, k // weight.blocksize)
        scales[:, start:start + rows] = absmax.repeat_interleave(weight.blocksize // chunk, dim=1).t()
        start += rows
        segments.append(start)
    halves = codes.view(n_pad // ROW_TILE, ROW_TILE, chunks, 2, chunk // 2)
    packed = (halves[:, :, :, 0] << 4) | halves[:, :, :, 1]  # [row tiles, 16, chunks, chunk / 2]
    qweight = packed.permute(0, 2, 1, 3).contiguous().view(-1)
    del codes, halves, packed
    bias = None
    if biases is not None and any(b is not None for b in biases):
        bias = torch.cat([(b.float() if b is not None else torch.zeros(w.out_features, device=device))
                          for w, b in zip(weights, biases)])
    levels = weights[0].code.float()
    standard = torch.allclose(levels.cpu(), torch.tensor(NF4_LEVELS), rtol=0, atol=1e-7)
    # made here, outside any compiled region: the kernel's level tables and split-K tickets
    tables = {dtype: levels.to(dtype) for dtype in _TL_DTYPES}
    counters = torch.zeros(4 * n_pad // ROW_TILE, dtype=torch.int32, device=device)
    return DecodeNF4Weight(qweight=qweight, scales=scales, levels=levels, in_features=k, segments=tuple(segments),
                           chunk=chunk, bias=bias, standard_levels=standard, counters=counters, tables=tables)


# ----------------------------------------------------------------------------------------------
# launch configuration
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodeConfig:
    """Launch choices for one row count. The costs are read off the kernel compiled for sm_90a (SASS
    warp-instructions of the main loop / 4 issue slots per SM clock, i.e. with 4 or more warps on the
    SM; plan_launch scales them by the warps an SM holds, as the static report's model does; not yet
    timed on a GPU: see benchmarks/nf4.py and the README's NF4 section)."""

    block_ns: tuple[int, ...]  # candidate output features per program
    block_mx: int  # rows of x per program (the tensor-core op's small side)
    num_warps: int
    num_stages: int
    chunks_per_iteration: Union[int, tuple[int, ...]]  # one for all block_ns, or one per block_n
    register_words: bool = False  # the lookup's table words in registers (see _lut_asm), not immediates
    pack: int = 4  # bytes per in-register lookup: 4 (32-bit loads), or 2 (16-bit: wgmma's operand layout, see _lut_asm)
    cycles_per_weight: tuple[float, ...] = (0.042,)  # SM clock cycles of the main loop per weight, per block_n
    # blocks per SM (registers, shared memory) per block_n, off the compiled kernels (the static report's
    # variants: sm_90a; elsewhere the smaller of sm_80's and sm_89's)
    resident: tuple[int, ...] = (4,)
    program_cycles: float = 300.0  # prologue and epilogue of one program
    bytes_per_sm_cycle: float = 14.0  # DRAM bytes per SM clock (H100 ~12, H200 ~16, A100 ~12)
    max_splits: int = 32
    stream_block_ns: tuple[int, ...] = ()  # block_ns for which plan_launch also considers stream-K launches
    splits: Optional[int] = None  # force (tests); None: plan_launch chooses
    programs: Optional[int] = None  # force a stream-K launch of this many programs (tests)
    reduce_group: Optional[int] = None  # force the split-K partials loaded at once (tests); None: reduce_group()
    num_sms: Optional[int] = None  # SMs to plan for; None: the device's (the static kernel report sets it)


@dataclass(frozen=True)
class LaunchPlan:
    block_n: int
    splits: int
    chunks_per_split: int
    chunks_per_iteration: int
    programs: int = 0  # > 0: stream-K over this many programs (splits 1), see StreamSchedule
    max_pieces: int = 1  # stream-K: the most programs sharing one tile


@dataclass(frozen=True)
class StreamSchedule:
    """Stream-K: the tiles' CPI-chunk units in a row (tile 0's, then tile 1's...), program p taking
    units [p * total // P, (p + 1) * total // P): every program the same share of the weights
    (within one unit) whatever the number of tiles. A tile cut between programs costs each of its
    pieces a partial sum written ([BLOCK_N, rows] fp32) and read once by the tile's reducer."""

    programs: int
    max_units: int  # the most units one program runs
    max_tiles: int  # the most tiles one program touches (its prologue / epilogue runs once per tile)
    max_pieces: int  # the most programs sharing one tile (its reducer's loop)
    partial_pieces: int  # pieces of tiles shared between programs: partial sums written and read

    @staticmethod
    def of(n_tiles: int, units: int, programs: int) -> "StreamSchedule":
        total = n_tiles * units
        pieces = [0] * n_tiles
        max_units = max_tiles = 0
        for p in range(programs):
            start, end = p * total // programs, (p + 1) * total // programs
            max_units = max(max_units, end - start)
            if end > start:
                first, last = start // units, (end - 1) // units
                max_tiles = max(max_tiles, last - first + 1)
                for t in range(first, last + 1):
                    pieces[t] += 1
        return StreamSchedule(programs, max_units, max_tiles, max(pieces),
                              sum(count for count in pieces if count > 1))


def default_decode_config(rows: int, device: torch.device,
                          capability: Optional[tuple[int, int]] = None) -> DecodeConfig:
    """Per row count: on sm_90, 4-warp programs on wgmma at every row count, with the weights from
    registers and x from shared memory: the lookup runs on 4 bytes at a time with its table words in
    registers (``register_words``), several chunks per loop iteration (fewer loop and pipeline
    instructions per weight); 4 warps, because the launches up to 16 rows have about one program per
    SM and a warp issues at most one instruction per clock (2 warps would leave 2 of the SM's 4
    schedulers idle). Elsewhere, up to 16 rows 2-warp programs on mma.sync (Triton keeps the
    mixed-precision operand in registers, read from shared memory 4 bytes at a time; plan_launch
    gives them 2 or more programs per SM), 17-64 rows 4-warp programs on mma.sync.
    ``capability``: the target's (major, minor); default the device's (the interpreter's small tiles
    for CPU tensors under TRITON_INTERPRET, sm_90 for other devices, e.g. meta)."""
    if capability is None and device.type != "cuda" and interpreting():
        return DecodeConfig(block_ns=(16,), block_mx=16, num_warps=1, num_stages=1, chunks_per_iteration=1,
                            max_splits=4)
    if capability is None:
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else (9, 0)
    if rows <= 16 and capability[0] != 9:
        return DecodeConfig(block_ns=(64, 128), block_mx=16, num_warps=2, num_stages=4, chunks_per_iteration=2,
                            cycles_per_weight=(0.042, 0.038), resident=(3, 2), program_cycles=300.0,
                            stream_block_ns=(64,))
    if capability[0] != 9:  # mma.sync (4-warp dots go to wgmma on sm_90 only)
        if rows <= 32:
            return DecodeConfig(block_ns=(64, 128), block_mx=32, num_warps=4, num_stages=4, chunks_per_iteration=1,
                                cycles_per_weight=(0.057, 0.050), resident=(3, 3), program_cycles=350.0,
                                stream_block_ns=(64,))
        # 64 features: 2 chunks per iteration (sm_80 SASS: 0.29 warp-instructions per weight in the
        # loop, against 0.32 with one; 225 registers, 2 blocks per SM); 128 features and 2 chunks
        # would take all 255 registers
        return DecodeConfig(block_ns=(64, 128), block_mx=64, num_warps=4, num_stages=3, chunks_per_iteration=(2, 1),
                            cycles_per_weight=(0.0585, 0.052), resident=(2, 2), program_cycles=400.0,
                            stream_block_ns=(64,))
    # sm_90, wgmma: the lookup 4 bytes at a time with its table words in registers, before the
    # weights go to the dot operand's layout through shared memory; several chunks per loop
    # iteration where registers allow (128 features and 2 chunks at 64 rows spill)
    # (up to 16 rows too: a 2-warp program alone on an SM issues 2 instructions per clock, not 4, and
    # the small launches have about one program per SM; 4 warps fill the 4 schedulers). Costs of the
    # loop with 16 rows of x (sm_90a SASS, warp-instructions per weight / 4): 64 features and 4 chunks
    # per iteration 0.158-0.160, 128 features and 2 chunks 0.143-0.144, and 4 chunks 0.134-0.136
    # (whose shared memory leaves 2 blocks per SM, not 4; listed first: it wins the planner's ties)
    if rows <= 16:
        return DecodeConfig(block_ns=(64, 128, 128), block_mx=16, num_warps=4, num_stages=4,
                            chunks_per_iteration=(4, 4, 2), register_words=True,
                            cycles_per_weight=(0.040, 0.034, 0.036), resident=(3, 2, 4), program_cycles=500.0,
                            stream_block_ns=(64,))
    if rows <= 32:
        return DecodeConfig(block_ns=(64, 128, 128), block_mx=32, num_warps=4, num_stages=4,
                            chunks_per_iteration=(4, 2, 4), register_words=True,
                            cycles_per_weight=(0.042, 0.038, 0.036), resident=(3, 2, 2), program_cycles=500.0,
                            stream_block_ns=(64,))
    return DecodeConfig(block_ns=(64, 128), block_mx=64, num_warps=4, num_stages=3, chunks_per_iteration=(4, 1),
                        register_words=True, cycles_per_weight=(0.0455, 0.044), resident=(1, 1), program_cycles=600.0,
                        stream_block_ns=(64,))


REDUCE_REGISTERS = 128  # registers per thread the split-K reducer gives to partials in flight


def reduce_group(splits: int, block_n: int, block_mx: int, num_warps: int) -> int:
    """Split-K partials the reducing program loads at once: as many as REDUCE_REGISTERS hold (its
    [block_n, block_mx] fp32 tile over the program's threads each), in as few rounds as that allows,
    split evenly between them (28 splits of 16 registers a thread: 4 rounds of 7, not 8 + 8 + 8 + 4)."""
    if splits <= 1:
        return 1
    per_thread = max(1, block_n * block_mx // (32 * num_warps))
    most = max(1, min(splits, REDUCE_REGISTERS // per_thread))
    rounds = -(-splits // most)
    return -(-splits // rounds)


REDUCE_CYCLES = 2.0  # SM clocks per split and partial element a thread holds: the reducer's loads and adds


def _reduce_cycles(splits: int, block_n: int, cfg: DecodeConfig) -> float:
    """The split-K reducer's loop (one program per tile runs it after its own share, so its SM is
    the launch's slowest): off sm_90a SASS, ~18-33 warp-instructions per split for each warp's 8-16
    partial elements a thread, at 4 warps' issue rate."""
    if splits <= 1:
        return 0.0
    return splits * block_n * cfg.block_mx / (32 * cfg.num_warps) * REDUCE_CYCLES


def _divisors(value: int) -> list[int]:
    return [d for d in range(1, value + 1) if value % d == 0]


@functools.lru_cache(maxsize=4096)
def plan_launch(out_features: int, in_features: int, chunk: int, rows: int, cfg: DecodeConfig,
                num_sms: int) -> LaunchPlan:
    """Features per program and how K is shared that minimise the estimated time: the busiest SM's
    share of programs (ceil(programs / SMs) of them, each its weights' main-loop cycles plus prologue
    and epilogue per tile it touches) against the DRAM traffic (packed weight and scales, plus the
    fp32 partials that pieces of a shared tile write and read). K is shared either by split-K
    (every split the same number of chunks) or, where the tiles are too few for the SMs, by
    stream-K (``cfg.stream_block_ns``: an equal share of all tiles' chunks per program, up to as many
    programs as give every SM scheduler a warp, or fewer with the same largest share where they cut
    fewer tiles)."""
    chunks = in_features // chunk
    cpis = cfg.chunks_per_iteration
    if isinstance(cpis, int):
        cpis = (cpis,) * len(cfg.block_ns)
    m_tiles = triton.cdiv(rows, cfg.block_mx)
    if cfg.programs:
        block_n, cpi = cfg.block_ns[0], cpis[0] if chunks % cpis[0] == 0 else 1
        n_tiles = triton.cdiv(out_features, block_n)
        programs = min(cfg.programs, n_tiles * (chunks // cpi))
        return LaunchPlan(block_n, 1, chunks, cpi, programs=programs,
                          max_pieces=StreamSchedule.of(n_tiles, chunks // cpi, programs).max_pieces)
    weight_bytes = out_features * in_features * (0.5 + 4 / chunk)
    bandwidth = num_sms * cfg.bytes_per_sm_cycle
    residents = cfg.resident if len(cfg.resident) == len(cfg.block_ns) else (cfg.resident[0],) * len(cfg.block_ns)
    best = None
    for block_n, cpi, per_weight, resident in zip(cfg.block_ns, cpis, cfg.cycles_per_weight, residents):
        if chunks % cpi or (cfg.splits and (chunks // cfg.splits) % cpi):
            cpi = 1
        n_tiles = triton.cdiv(out_features, block_n)
        options = [cfg.splits] if cfg.splits else [d for d in _divisors(chunks // cpi) if d <= cfg.max_splits]
        for splits in options:
            programs = n_tiles * m_tiles * splits
            # the busiest SM's programs, `resident` at a time, at the issue rate of the warps it holds
            busiest = busiest_sm_cycles(programs, num_sms, resident, cfg.num_warps,
                                        block_n * in_features / splits * per_weight + cfg.program_cycles
                                        + _reduce_cycles(splits, block_n, cfg))
            traffic = weight_bytes + (2 * 4 * splits * rows * out_features if splits > 1 else 0)
            cycles = max(busiest, traffic / bandwidth)
            if best is None or cycles < best[0]:
                best = (cycles, LaunchPlan(block_n, splits, chunks // splits, cpi))
        if block_n not in cfg.stream_block_ns or cfg.splits:
            continue
        units = chunks // cpi
        per_sm = max(1, SCHEDULERS_PER_SM // cfg.num_warps)  # programs per SM: a warp for each scheduler
        # as many programs as give every SM scheduler a warp (or twice that), or fewer down to the
        # fewest with the same largest share: where tiles and shares align better, fewer tiles are
        # cut (fewer partials); ties go to more programs
        full = min(n_tiles * units, num_sms * per_sm)
        fewest = -(-n_tiles * units // -(-n_tiles * units // full))
        options = []
        for programs in sorted({*range(fewest, full + 1), min(n_tiles * units, 2 * num_sms * per_sm)}, reverse=True):
            if programs <= n_tiles:
                continue
            plan = StreamSchedule.of(n_tiles, units, programs)
            busiest = busiest_sm_cycles(programs * m_tiles, num_sms, resident, cfg.num_warps,
                                        plan.max_units * cpi * chunk * block_n * per_weight
                                        + plan.max_tiles * cfg.program_cycles)
            traffic = weight_bytes + 2 * 4 * plan.partial_pieces * rows * block_n
            options.append((max(busiest, traffic / bandwidth), programs, plan.max_pieces))
        # the best of up to one program per scheduler, then twice that
        for cycles, programs, max_pieces in sorted(o for o in options if o[1] <= full)[:1] + [o for o in options
                                                                                              if o[1] > full]:
            if cycles < STREAM_MARGIN * best[0]:  # the estimate's error: stream-K only for a clear gain
                best = (cycles, LaunchPlan(block_n, 1, chunks, cpi, programs=programs, max_pieces=max_pieces))
    return best[1]


# ----------------------------------------------------------------------------------------------
# launcher
# ----------------------------------------------------------------------------------------------


def nf4_decode_matmul(x: Tensor, weight: DecodeNF4Weight, xa: Optional[Tensor] = None,
                      lora_b: Optional[Tensor] = None, config: Optional[DecodeConfig] = None) -> Tensor:
    """``x @ W.T + bias`` (+ per member ``xa[:, g*R:(g+1)*R] @ lora_b[rows of g].T``) for x [M, K];
    [M, N] in x's dtype, N the members' features together.

    ``xa`` [M, G*R] (x @ A_g.T for each of the G members, in x's dtype) and ``lora_b`` [N_pad, R]
    (each row its member's scale * B, R a multiple of 16, zeros past N) come together or not at all.
    With the default config the call goes through ``torch.ops.grpo_fast.nf4_decode``, one opaque node
    for torch.compile, so a compiled decode step keeps it inside its graph."""
    if x.dim() != 2:
        raise ValueError(f"x: expected a 2-D [rows, in_features] tensor, received shape {list(x.shape)}")
    if x.shape[1] != weight.in_features:
        raise ValueError(f"x: expected in_features={weight.in_features} columns, received {x.shape[1]}")
    if x.dtype not in _TL_DTYPES:
        raise ValueError(f"x: expected dtype float32, float16 or bfloat16, received {x.dtype}")
    if x.device != weight.qweight.device:
        raise ValueError(f"x: expected device {weight.qweight.device} (the weight's), received {x.device}")
    if (xa is None) != (lora_b is None):
        raise ValueError("xa, lora_b: expected both (LoRA) or neither, received one")
    if xa is not None:
        members = len(weight.segments) - 1
        if lora_b.dim() != 2 or lora_b.shape[0] != weight.padded_rows or lora_b.shape[1] % 16:
            raise ValueError(f"lora_b: expected [{weight.padded_rows}, R] with R a multiple of 16, "
                             f"received {list(lora_b.shape)}")
        if xa.shape != (x.shape[0], members * lora_b.shape[1]):
            raise ValueError(f"xa: expected shape [{x.shape[0]}, {members * lora_b.shape[1]}], received {list(xa.shape)}")
        if xa.dtype != x.dtype or lora_b.dtype != x.dtype:
            raise ValueError(f"xa, lora_b: expected dtype {x.dtype} (x's), received {xa.dtype}, {lora_b.dtype}")
    if config is not None:
        return _launch(x, weight, xa, lora_b, config)
    return torch.ops.grpo_fast.nf4_decode(x, weight.qweight, weight.scales, weight.tables[x.dtype], weight.bias,
                                          xa, lora_b, weight.counters, list(weight.segments),
                                          weight.in_features, weight.chunk, weight.standard_levels)


@torch.library.custom_op("grpo_fast::nf4_decode", mutates_args=())
def _nf4_decode_op(x: Tensor, qweight: Tensor, scales: Tensor, table: Tensor, bias: Optional[Tensor],
                   xa: Optional[Tensor], lora_b: Optional[Tensor], counters: Tensor, segments: list[int],
                   in_features: int, chunk: int, standard_levels: bool) -> Tensor:
    # The tickets are zero before and after every call (the last program resets them): no mutation
    # is visible, so the op is declared functional and compiled graphs need no copy of them.
    weight = DecodeNF4Weight(qweight=qweight, scales=scales, levels=table, in_features=in_features,
                             segments=tuple(segments), chunk=chunk, bias=bias, standard_levels=standard_levels,
                             counters=counters, tables={x.dtype: table})
    return _launch(x, weight, xa, lora_b, default_decode_config(x.shape[0], x.device))


@_nf4_decode_op.register_fake
def _nf4_decode_shape(x, qweight, scales, table, bias, xa, lora_b, counters, segments, in_features, chunk,
                      standard_levels):
    return x.new_empty(x.shape[0], segments[-1])


def _launch(x: Tensor, weight: DecodeNF4Weight, xa: Optional[Tensor], lora_b: Optional[Tensor],
            cfg: DecodeConfig) -> Tensor:
    m = x.shape[0]
    n = weight.out_features
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m == 0 or n == 0:
        return out
    if x.stride(1) != 1:
        x = x.contiguous()
    plan = plan_launch(n, weight.in_features, weight.chunk, m, cfg, cfg.num_sms or _num_sms(x.device))
    splits = plan.splits
    n_tiles = triton.cdiv(n, plan.block_n)
    m_tiles = triton.cdiv(m, cfg.block_mx)
    counters = weight.counters
    if (splits > 1 or plan.programs) and m_tiles * n_tiles > counters.numel():
        raise ValueError(f"x: expected at most {counters.numel() // n_tiles * cfg.block_mx} rows, received {m}")
    if plan.programs:  # stream-K: a slot per program for the pieces of its first and last tile
        part = torch.empty(plan.programs, 2, m_tiles, plan.block_n, cfg.block_mx, device=x.device,
                           dtype=torch.float32)
        grid = (plan.programs, 1, m_tiles)
    else:
        part = (torch.empty(splits, m, weight.padded_rows, device=x.device, dtype=torch.float32) if splits > 1
                else weight.scales)
        grid = (n_tiles, splits, m_tiles)
    lora = xa is not None
    members = len(weight.segments) - 1
    use_asm = weight.standard_levels and (x.dtype, cfg.pack, cfg.register_words) in _ASM and not interpreting()
    launch(
        _nf4_decode_kernel, grid,
        x, x.stride(0),
        weight.qweight, weight.scales, weight.tables[x.dtype],
        weight.bias if weight.bias is not None else weight.scales,
        xa if lora else x, xa.stride(0) if lora else 0,
        lora_b if lora else x,
        out, out.stride(0),
        part, counters,
        m, n, weight.padded_rows, weight.in_features // weight.chunk, plan.chunks_per_split,
        weight.segments[1] if members > 1 else n, weight.segments[2] if members > 2 else n, n_tiles,
        HALF=weight.chunk // 2, BLOCK_N=plan.block_n, BLOCK_MX=cfg.block_mx, CPI=plan.chunks_per_iteration,
        SPLITS=splits, STREAM=plan.programs > 0, MAX_PIECES=plan.max_pieces,
        PROGRAMS=max(plan.programs, 1), UNITS=plan.chunks_per_split // plan.chunks_per_iteration if plan.programs else 1,
        N_TILES=n_tiles if plan.programs else 1,
        HAS_BIAS=weight.bias is not None, LORA_R=lora_b.shape[1] if lora else 0, LORA_G=members if lora else 1,
        LORA_ONE=lora and all(start % plan.block_n == 0 for start in weight.segments[:-1]),
        USE_ASM=use_asm, ASM=_ASM[(x.dtype, cfg.pack, cfg.register_words)] if use_asm else "", PACK=cfg.pack,
        REG_WORDS=cfg.register_words,
        UPCAST=interpreting(), IEEE=x.dtype == torch.float32 and not interpreting(),
        BF16_BY_BITS=interpreting() and x.dtype == torch.bfloat16,
        EVEN_M=m % cfg.block_mx == 0, EVEN_N=n % plan.block_n == 0,
        REDUCE_GROUP=cfg.reduce_group or reduce_group(splits, plan.block_n, cfg.block_mx, cfg.num_warps),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


def nf4_decode_reference(x: Tensor, weight: DecodeNF4Weight, xa: Optional[Tensor] = None,
                         lora_b: Optional[Tensor] = None) -> Tensor:
    """The kernel's arithmetic in float64 from the repacked layout (unpacked back): the levels rounded
    to x's dtype, products and sums exact, scales per chunk; the LoRA term in float64."""
    k, chunk, n = weight.in_features, weight.chunk, weight.out_features
    rows = weight.padded_rows
    tiles = weight.qweight.view(rows // ROW_TILE, k // chunk, ROW_TILE, chunk // 2).permute(0, 2, 1, 3)
    codes = torch.stack([tiles >> 4, tiles & 15], dim=3).reshape(rows, k).long()
    levels = weight.levels.to(x.dtype).double()
    dense = levels[codes].view(rows, k // chunk, chunk) * weight.scales.t().double()[:, :, None]
    out = x.double() @ dense.view(rows, k)[:n].T
    if weight.bias is not None:
        out = out + weight.bias.double()
    if xa is not None:
        r = lora_b.shape[1]
        for g in range(len(weight.segments) - 1):
            lo, hi = weight.segments[g], weight.segments[g + 1]
            out[:, lo:hi] += xa[:, g * r:(g + 1) * r].double() @ lora_b[lo:hi].double().T
    return out
