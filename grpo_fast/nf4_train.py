"""One copy of the 4-bit weights: NF4 Linears that train and decode from the repacked layout.

``single_copy_nf4(model)`` replaces every bitsandbytes NF4 ``Linear4bit`` of ``model`` (inside peft's
LoRA layers too: only their ``base_layer`` changes, the adapters stay as they are) by an
``NF4Linear`` reading the decode kernel's repacked layout (``kernels/nf4_decode.py``), and drops
bitsandbytes' tensors. Linears that share an input (q/k/v, gate/up) share one repacked weight
(``NF4Packed``), the one ``grpo_fast.nf4.fused_nf4_decode`` hands to the decode kernel: the rollout
engine keeps no second copy.

- **Forward** (more rows than decoding, or inputs that need gradients): x @ W.T + bias, with W
  dequantised (``kernels/nf4_dequant.py``: bitsandbytes' fp32 arithmetic, bit for bit) into the
  compute dtype and multiplied by cuBLAS (``torch.mm``), as bitsandbytes' own path does. The dense
  copy is made for at most ``max_tile_bytes`` (64 MiB) at a time: a weight larger than that is cut
  into blocks of output features (forward) or of input features (backward), each product written
  to its own columns of the output, so every output element is one full dot product, rounded once.
- **Backward**: the gradient to the input only (the base weight is frozen), grad_out @ W from the
  dequantised blocks again (nothing but the layer's identity is saved for it), and to the bias
  when that needs one.
- **The compute dtype** follows bitsandbytes' ``Linear4bit``: fp32 / bf16 inputs compute in their own
  dtype (the first call decides, as there), fp16 ones in the configured compute dtype.

The base weight cannot be merged into or exported from this layout as it is: ``NF4Linear.weight``
raises, naming ``restore_bitsandbytes(model)``, which converts every ``NF4Linear`` back to a
bitsandbytes ``Linear4bit`` holding the same values (NF4 codes and fp32 absmax per block: without
double quantisation, 0.5625 bytes per weight) on demand. peft's ``save_pretrained`` writes the
adapter alone and works as before.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .kernels.nf4_decode import ROW_TILE, DecodeNF4Weight, repack_nf4
from . import fallback
from .kernels.nf4_dequant import _codes, nf4_dequantize, nf4_dequantize_torch

MAX_TILE_BYTES = 64 * 1024 ** 2  # the largest dense block of a weight dequantised at once


# ----------------------------------------------------------------------------------------------
# the shared repacked weight
# ----------------------------------------------------------------------------------------------


class NF4Packed(torch.nn.Module):
    """The repacked weight of one group of Linears (``repack_nf4``'s tensors as non-persistent buffers,
    so ``.to(device)`` moves them and ``state_dict`` leaves them out); a submodule of each member.
    Dtype casts of the model leave them as they are (the fp32 scales and levels are the weights)."""

    def __init__(self, weight: DecodeNF4Weight):
        super().__init__()
        self.in_features, self.segments, self.chunk = weight.in_features, weight.segments, weight.chunk
        self.standard_levels = weight.standard_levels
        levels = weight.levels.float().clone()  # this group's own, not the quant state's shared table
        tensors = dict(qweight=weight.qweight, scales=weight.scales, counters=weight.counters, levels=levels,
                       bias=weight.bias, levels_float16=levels.half(), levels_bfloat16=levels.bfloat16())
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor, persistent=False)
        self._view: Optional[tuple[tuple, DecodeNF4Weight]] = None

    def _apply(self, fn, recurse=True):
        def device_only(tensor):
            moved = fn(tensor)
            return moved if moved.dtype == tensor.dtype else tensor.to(moved.device)

        return super()._apply(device_only, recurse)

    @property
    def weight(self) -> DecodeNF4Weight:
        """The ``DecodeNF4Weight`` over the current buffers (the same object while they stay in place)."""
        key = tuple(buffer.data_ptr() for buffer in self.buffers())
        if self._view is None or self._view[0] != key:
            tables = {torch.float32: self.levels, torch.float16: self.levels_float16,
                      torch.bfloat16: self.levels_bfloat16}
            self._view = (key, DecodeNF4Weight(qweight=self.qweight, scales=self.scales, levels=self.levels,
                                               in_features=self.in_features, segments=self.segments,
                                               chunk=self.chunk, bias=self.bias,
                                               standard_levels=self.standard_levels, counters=self.counters,
                                               tables=tables))
        return self._view[1]

    @property
    def nbytes(self) -> int:
        return sum(buffer.numel() * buffer.element_size() for buffer in self.buffers())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, segments={self.segments}, chunk={self.chunk}"


# ----------------------------------------------------------------------------------------------
# the product and its gradient
# ----------------------------------------------------------------------------------------------


def _row_blocks(rows: tuple[int, int], columns: int, dtype_bytes: int, max_tile_bytes: int) -> list[tuple[int, int]]:
    per_block = max(ROW_TILE, max_tile_bytes // (columns * dtype_bytes) // ROW_TILE * ROW_TILE)
    return [(start, min(start + per_block, rows[1])) for start in range(rows[0], rows[1], per_block)]


def _column_blocks(rows: int, in_features: int, chunk: int, dtype_bytes: int,
                   max_tile_bytes: int) -> list[tuple[int, int]]:
    per_block = max(chunk, max_tile_bytes // (rows * dtype_bytes) // chunk * chunk)
    return [(start, min(start + per_block, in_features)) for start in range(0, in_features, per_block)]


def _dense(weight: DecodeNF4Weight, rows: tuple[int, int], columns: Optional[tuple[int, int]],
           dtype: torch.dtype) -> Tensor:
    """The dequantised block: the Triton kernel on CUDA, its PyTorch twin (the same arithmetic, the same
    bits) if the kernel cannot compile or launch there (grpo_fast.fallback: one warning, or an error with
    GRPO_FAST_STRICT=1)."""
    columns = columns or (0, weight.in_features)
    return fallback.run("nf4_dequantize", weight.qweight.device,
                        lambda: nf4_dequantize(weight, rows, columns, dtype=dtype),
                        lambda: nf4_dequantize_torch(weight, rows, columns, dtype))


def nf4_linear_forward(x: Tensor, weight: DecodeNF4Weight, rows: tuple[int, int], bias: Optional[Tensor],
                       max_tile_bytes: int = MAX_TILE_BYTES) -> Tensor:
    """x [M, K] @ W[rows].T (+ bias) in x's dtype, W dequantised in blocks of output features."""
    blocks = _row_blocks(rows, weight.in_features, x.element_size(), max_tile_bytes)
    if len(blocks) == 1:  # bitsandbytes' call exactly: one linear on the dense weight
        return torch.nn.functional.linear(x, _dense(weight, rows, None, x.dtype), bias)
    out = x.new_empty(x.shape[0], rows[1] - rows[0])
    for start, stop in blocks:
        tile = _dense(weight, (start, stop), None, x.dtype)
        view = out[:, start - rows[0]: stop - rows[0]]
        if bias is None:
            torch.mm(x, tile.t(), out=view)
        else:
            torch.addmm(bias[start - rows[0]: stop - rows[0]], x, tile.t(), out=view)
        del tile  # free the block before the next one is made
    return out


def nf4_linear_input_grad(grad_out: Tensor, weight: DecodeNF4Weight, rows: tuple[int, int],
                          max_tile_bytes: int = MAX_TILE_BYTES) -> Tensor:
    """grad_out [M, N] @ W[rows] in grad_out's dtype, W dequantised in blocks of input features."""
    blocks = _column_blocks(rows[1] - rows[0], weight.in_features, weight.chunk, grad_out.element_size(),
                            max_tile_bytes)
    if len(blocks) == 1:
        return torch.mm(grad_out, _dense(weight, rows, None, grad_out.dtype))
    grad = grad_out.new_empty(grad_out.shape[0], weight.in_features)
    for start, stop in blocks:
        tile = _dense(weight, rows, (start, stop), grad_out.dtype)
        torch.mm(grad_out, tile, out=grad[:, start:stop])
        del tile
    return grad


class _NF4LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, weight, rows, max_tile_bytes):
        ctx.weight, ctx.rows, ctx.max_tile_bytes = weight, rows, max_tile_bytes
        ctx.bias_dtype = None if bias is None else bias.dtype
        return nf4_linear_forward(x, weight, rows, bias, max_tile_bytes)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = nf4_linear_input_grad(grad_out.contiguous(), ctx.weight, ctx.rows, ctx.max_tile_bytes)
        if ctx.needs_input_grad[1]:
            grad_bias = grad_out.sum(0, dtype=ctx.bias_dtype)
        return grad_x, grad_bias, None, None, None


def nf4_linear(x: Tensor, weight: DecodeNF4Weight, rows: Optional[tuple[int, int]] = None,
               bias: Optional[Tensor] = None, max_tile_bytes: int = MAX_TILE_BYTES) -> Tensor:
    """x [..., K] @ W[rows].T + bias for a repacked weight (rows: a member's features, default all),
    differentiable in x and bias; bias in x's dtype."""
    rows = rows or (0, weight.out_features)
    if x.shape[-1] != weight.in_features:
        raise ValueError(f"x: expected in_features={weight.in_features} in the last dimension, received {x.shape[-1]}")
    flat = x.reshape(-1, x.shape[-1])
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))
    if needs_grad:
        out = _NF4LinearFunction.apply(flat, bias, weight, rows, max_tile_bytes)
    else:
        out = nf4_linear_forward(flat, weight, rows, bias, max_tile_bytes)
    return out.view(*x.shape[:-1], rows[1] - rows[0])


# ----------------------------------------------------------------------------------------------
# the module
# ----------------------------------------------------------------------------------------------


class NF4Linear(torch.nn.Module):
    """A frozen NF4 Linear: member ``index`` of a shared ``NF4Packed`` weight (and its bias, as
    bitsandbytes' layer had it), in place of a bitsandbytes ``Linear4bit``."""

    def __init__(self, packed: NF4Packed, index: int, bias: Optional[Tensor] = None,
                 compute_dtype: Optional[torch.dtype] = None, compute_type_is_set: bool = False,
                 max_tile_bytes: int = MAX_TILE_BYTES):
        super().__init__()
        self.nf4_packed = packed
        self.index = index
        self.in_features = packed.in_features
        self.out_features = packed.segments[index + 1] - packed.segments[index]
        self.bias = bias if bias is None or isinstance(bias, torch.nn.Parameter) else torch.nn.Parameter(
            bias, requires_grad=False)
        self.compute_dtype, self.compute_type_is_set = compute_dtype, compute_type_is_set
        self.max_tile_bytes = max_tile_bytes

    @property
    def rows(self) -> tuple[int, int]:
        return self.nf4_packed.segments[self.index], self.nf4_packed.segments[self.index + 1]

    def __getattr__(self, name: str):
        if name == "weight":  # what peft's merge and exports read: say how to get it
            raise AttributeError("NF4Linear keeps its weight once, in the repacked layout (nf4_single_copy): it has "
                                 "no bitsandbytes weight to merge or export; call "
                                 "grpo_fast.nf4_train.restore_bitsandbytes(model) first")
        return super().__getattr__(name)

    def forward(self, x: Tensor) -> Tensor:
        if not self.compute_type_is_set:  # bitsandbytes' rule (Linear4bit.set_compute_type)
            if x.dtype in (torch.float32, torch.bfloat16):
                self.compute_dtype = x.dtype
            self.compute_type_is_set = True
        dtype = x.dtype
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nf4_linear(x, self.nf4_packed.weight, self.rows, bias, self.max_tile_bytes).to(dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"member={self.index + 1}/{len(self.nf4_packed.segments) - 1}")


# ----------------------------------------------------------------------------------------------
# conversion, both ways
# ----------------------------------------------------------------------------------------------


def _paths(model: torch.nn.Module) -> dict[int, str]:
    return {id(module): name for name, module in model.named_modules(remove_duplicate=False) if name}


@torch.no_grad()
def single_copy_nf4(model: torch.nn.Module) -> int:
    """Replace each NF4 ``Linear4bit`` the decode kernel can read by an ``NF4Linear`` (grouped as
    ``fused_nf4_decode`` groups them), releasing bitsandbytes' tensors; returns the layers replaced.
    FP4 layers and block sizes the kernel cannot read keep bitsandbytes' modules."""
    from .nf4 import _members, nf4_weight_of

    paths = _paths(model)
    groups = [members for members in _members(model) if not isinstance(members[0].base, NF4Linear)]
    count = 0
    while groups:
        bases = [member.base for member in groups.pop(0)]  # popped: its bitsandbytes layers go with it
        packed = NF4Packed(repack_nf4([nf4_weight_of(base) for base in bases], [base.bias for base in bases]))
        for index, base in enumerate(bases):
            layer = NF4Linear(packed, index, base.bias, base.compute_dtype, getattr(base, "compute_type_is_set", False))
            model.set_submodule(paths[id(base)], layer.train(base.training))
            count += 1
        del bases
    return count


def _to_bitsandbytes(layer: NF4Linear):
    """A bitsandbytes ``Linear4bit`` with ``layer``'s values: its codes in bitsandbytes' packing, one
    fp32 absmax per chunk (no double quantisation)."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import QuantState

    weight = layer.nf4_packed.weight
    rows = layer.rows
    n, k, chunk = layer.out_features, layer.in_features, weight.chunk
    codes = _codes(weight, rows, (0, k)).to(torch.uint8).view(-1, 2)
    packed = ((codes[:, 0] << 4) | codes[:, 1]).view(-1, 1)
    absmax = weight.scales[:, rows[0]: rows[1]].t().contiguous().view(-1)
    dtype = layer.compute_dtype or torch.float32
    state = QuantState(absmax=absmax, shape=torch.Size([n, k]), code=weight.levels.clone(), blocksize=chunk,
                       quant_type="nf4", dtype=dtype)
    module = bnb.nn.Linear4bit(k, n, bias=layer.bias is not None, compute_dtype=layer.compute_dtype,
                               quant_type="nf4", device="meta")
    module.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=chunk,
                                      compress_statistics=False, quant_type="nf4", bnb_quantized=True, module=module)
    module.bias = layer.bias
    module.compute_type_is_set = layer.compute_type_is_set
    return module.train(layer.training)


@torch.no_grad()
def restore_bitsandbytes(model: torch.nn.Module) -> int:
    """Convert every ``NF4Linear`` of ``model`` back to a bitsandbytes ``Linear4bit`` holding the same
    values (for peft's merge_and_unload, or saving the base); returns the layers converted."""
    paths = _paths(model)
    layers = [module for module in model.modules() if isinstance(module, NF4Linear)]
    for layer in layers:
        model.set_submodule(paths[id(layer)], _to_bitsandbytes(layer))
    return len(layers)


def single_copy_nf4_bytes(model: torch.nn.Module) -> int:
    """Bytes of the repacked weights of ``model``'s ``NF4Linear`` layers (each shared weight once)."""
    return sum(module.nbytes for module in model.modules() if isinstance(module, NF4Packed))
