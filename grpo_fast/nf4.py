"""Decode-time NF4 matmul for bitsandbytes 4-bit layers, swapped in through the module API.

``FusedNF4Linear`` wraps a bitsandbytes ``Linear4bit`` by reference (no weight copy) and, for
inputs of at most ``max_rows`` rows on CUDA, computes ``layer(x)`` with the Triton kernel of
``grpo_fast.kernels.nf4_matmul``: the packed 4-bit weight is read once and dequantised on chip
instead of being written out as a bf16 copy first. Anything else (more rows: prefill and the
training forward; inputs that need gradients; CPU) goes to the wrapped layer unchanged.

``fused_nf4_decode(model)`` swaps every NF4 ``Linear4bit`` under ``model`` for a
``FusedNF4Linear`` for the duration of a ``with`` block and puts the very same modules back on
exit, also when the block raises. Under peft the 4-bit layers are the ``base_layer`` of
``lora.Linear4bit``: those are swapped, so the LoRA A/B products still run in peft's forward,
beside the base product (two small matmuls per layer; fusing them into the kernel's epilogue is
not done yet). Typical use, around a rollout engine's decode loop::

    with torch.no_grad(), fused_nf4_decode(model):
        for step in range(max_new_tokens):
            logits = model(next_tokens, past_key_values=cache, ...).logits
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

from .kernels.config import triton_available, triton_usable_on
from .kernels.nf4_matmul import NF4MatmulConfig, NF4Weight, nf4_matmul


def _linear4bit_class():
    try:
        import bitsandbytes as bnb
    except ImportError:  # pragma: no cover - bitsandbytes is a dependency
        return None
    return bnb.nn.Linear4bit


def nf4_weight_of(layer: torch.nn.Module) -> NF4Weight:
    """The NF4 tensors of a bitsandbytes 4-bit layer; ValueError when the kernel cannot read them."""
    weight = getattr(layer, "weight", None)
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None:
        raise ValueError(f"layer: expected a quantised bitsandbytes Linear4bit, received {type(layer).__name__} "
                         "without weight.quant_state")
    return NF4Weight.from_bnb(weight.data, quant_state)


class FusedNF4Linear(torch.nn.Module):
    """``layer(x)`` for a bitsandbytes NF4 ``Linear4bit``, through the fused kernel for few rows.

    ``max_rows``: inputs with more rows (all leading dimensions flattened) use the wrapped layer.
    ``force``: also run the kernel off CUDA (the Triton interpreter on CPU: tests only)."""

    def __init__(self, layer: torch.nn.Module, *, max_rows: int = 64, force: bool = False,
                 config: Optional[NF4MatmulConfig] = None) -> None:
        super().__init__()
        if max_rows < 1:
            raise ValueError(f"max_rows: expected a positive number of rows, received {max_rows}")
        self.base_layer = layer  # a submodule: .to(), parameters() and state_dict see the weights
        self.max_rows = max_rows
        self.force = force
        self.config = config
        # Read once here (fails at construction, not at the first decode step), outside any
        # torch.compile trace; forward re-reads it only if the layer's tensors were replaced.
        self._source, self._nf4 = self._read_weight()

    def _read_weight(self) -> tuple[tuple[int, object], NF4Weight]:
        weight = self.base_layer.weight
        return (weight.data_ptr(), getattr(weight, "quant_state", None)), nf4_weight_of(self.base_layer)

    @property
    def weight(self) -> torch.nn.Parameter:
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def _nf4_weight(self) -> Optional[NF4Weight]:
        """The wrapped layer's NF4 tensors (None where only the layer itself can read them)."""
        if torch.compiler.is_compiling():
            return self._nf4  # a decode step being traced: the weights are fixed for its lifetime
        weight = self.base_layer.weight
        quant_state = getattr(weight, "quant_state", None)
        if quant_state is None or getattr(quant_state, "packing_format_for_cpu", False):
            return None  # the wrapped layer knows how to restore / read these
        if self._source != (weight.data_ptr(), quant_state):  # moved or re-quantised since
            self._source, self._nf4 = self._read_weight()
        return self._nf4

    def _kernel_applies(self, x: torch.Tensor) -> bool:
        if x.dim() == 0 or x.shape[-1] == 0 or x.numel() // x.shape[-1] > self.max_rows:
            return False
        if torch.is_grad_enabled() and x.requires_grad:
            return False  # the kernel has no backward: training forwards stay on bitsandbytes
        if x.device.type == "cuda":
            return triton_available()
        return self.force and triton_usable_on(x.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.base_layer
        weight = self._nf4_weight() if self._kernel_applies(x) else None
        if weight is None:
            return layer(x)
        # The compute dtype exactly as Linear4bit.forward settles it (fp32/bf16 inputs compute in
        # their own dtype, fp16 ones in the configured bnb_4bit_compute_dtype).
        if not layer.compute_type_is_set:
            layer.set_compute_type(x)
            layer.compute_type_is_set = True
        rows = x.reshape(-1, x.shape[-1])
        if layer.compute_dtype is not None:
            rows = rows.to(layer.compute_dtype)
        out = nf4_matmul(rows, weight, layer.bias, self.config)
        return out.to(x.dtype).reshape(*x.shape[:-1], weight.out_features)

    def extra_repr(self) -> str:
        return f"max_rows={self.max_rows}, force={self.force}"


def _swappable(model: torch.nn.Module) -> list[str]:
    """Names of the NF4 Linear4bit modules under ``model`` that the kernel can read."""
    linear4bit = _linear4bit_class()
    if linear4bit is None:
        return []
    wrapped = [name for name, module in model.named_modules() if isinstance(module, FusedNF4Linear)]
    names = []
    for name, module in model.named_modules():
        if not name or not isinstance(module, linear4bit) or any(name.startswith(w + ".") for w in wrapped):
            continue
        try:
            nf4_weight_of(module)
        except ValueError:
            continue  # e.g. FP4 layers, or odd block sizes: they keep bitsandbytes' path
        names.append(name)
    return names


@contextlib.contextmanager
def fused_nf4_decode(model: torch.nn.Module, max_rows: int = 64, *, force: bool = False,
                     config: Optional[NF4MatmulConfig] = None) -> Iterator[list[str]]:
    """Inside: every NF4 ``Linear4bit`` under ``model`` is a ``FusedNF4Linear`` (yields their names).

    Without CUDA this is a no-op (yields []) unless ``force`` (interpreter tests). The original
    modules are put back on exit, exceptions included."""
    if max_rows < 1:
        raise ValueError(f"max_rows: expected a positive number of rows, received {max_rows}")
    if not force and not (torch.cuda.is_available() and triton_available()):
        yield []
        return
    names = _swappable(model)
    swapped: list[tuple[str, torch.nn.Module]] = []
    try:
        for name in names:
            original = model.get_submodule(name)
            model.set_submodule(name, FusedNF4Linear(original, max_rows=max_rows, force=force, config=config))
            swapped.append((name, original))
        yield [name for name, _ in swapped]
    finally:
        for name, original in reversed(swapped):
            model.set_submodule(name, original)
