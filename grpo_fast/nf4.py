"""Decode-time NF4 (+ LoRA) matmuls for bitsandbytes 4-bit layers, swapped in through the module API.

``fused_nf4_decode(model)`` is a ``with`` block inside which every NF4 ``Linear4bit`` of ``model``
runs through ``grpo_fast.kernels.nf4_decode`` for inputs of at most ``max_rows`` rows on CUDA:

- **Repacked once.** On entry each weight is repacked into the kernel's layout (a copy: 0.5625
  bytes per weight, ``NF4DecodeCache.nbytes``); bitsandbytes' own tensors stay as they are for
  training. Without a ``cache`` the copies are freed on exit; with one they are kept and reused by
  the next entry while the bitsandbytes weights are unchanged (a CUDA-graph decode step reads them
  at fixed addresses, so the engine keeps them).
- **Grouped.** Linears of one module that share their input (``q_proj``/``k_proj``/``v_proj``,
  ``gate_proj``/``up_proj``) are concatenated into one weight: the first member called computes all
  of them in one launch, the others return their slice of it (for the same input tensor; any other
  input is computed anew, so a model that calls them differently stays correct).
- **LoRA inside.** A peft LoRA layer around an NF4 layer is replaced as a whole when its adapters
  are plain LoRA (no DoRA / variants, no LoRA bias, dropout inactive, not merged): the adapters are
  snapshotted on entry in the compute dtype (A of all members stacked, B times the LoRA scale per
  output row, copied in place so their addresses stay), one matmul computes x @ A.T for the group
  and the NF4 kernel adds its product with B in its epilogue. Other peft layers keep their forward;
  only their base layer is swapped.

Anything else (more rows: prefill and the training forward; inputs that need gradients; CPU; a
compute dtype other than the snapshot's) goes to the original module unchanged. The original
modules are put back on exit, also when the block raises::

    with torch.no_grad(), fused_nf4_decode(model, cache=cache):
        for step in range(max_new_tokens):
            logits = model(next_tokens, past_key_values=kv_cache, ...).logits
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

from . import fallback
from .kernels.config import triton_available, triton_usable_on
from .kernels.nf4_decode import DecodeConfig, DecodeNF4Weight, nf4_decode_matmul, repack_nf4
from .kernels.nf4_matmul import NF4Weight

# Sibling Linears that transformers' decoder blocks call on the same input (Llama, Qwen2/3, Mistral, Gemma...)
SHARED_INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
KERNEL = "nf4_decode"  # its name for grpo_fast.fallback
LORA_RANK_MULTIPLE = 16  # the epilogue's product with B is a tensor-core op over the (padded) rank


def _linear4bit_class():
    from .console import import_bitsandbytes

    bnb = import_bitsandbytes()
    return None if bnb is None else bnb.nn.Linear4bit


def nf4_weight_of(layer: torch.nn.Module) -> NF4Weight:
    """The NF4 tensors of a bitsandbytes 4-bit layer; ValueError when the kernel cannot read them."""
    weight = getattr(layer, "weight", None)
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None:
        raise ValueError(f"layer: expected a quantised bitsandbytes Linear4bit, received {type(layer).__name__} "
                         "without weight.quant_state")
    return NF4Weight.from_bnb(weight.data, quant_state)


def _layer_device(layer: torch.nn.Module) -> torch.device:
    """Where a 4-bit layer's weight lives: a single-copy layer's repacked tensors, else bitsandbytes'."""
    packed = getattr(layer, "nf4_packed", None)  # a single-copy layer (grpo_fast.nf4_train.NF4Linear)
    return packed.qweight.device if packed is not None else layer.weight.device


def _source_of(layer: torch.nn.Module) -> tuple[int, int]:
    """Identifies a 4-bit layer's current tensors: a repacked copy is valid while this is unchanged."""
    packed = getattr(layer, "nf4_packed", None)  # a single-copy layer (grpo_fast.nf4_train.NF4Linear)
    if packed is not None:
        return packed.qweight.data_ptr(), id(packed)
    weight = layer.weight
    return weight.data_ptr(), id(getattr(weight, "quant_state", None))


def _plain_lora(module: torch.nn.Module) -> Optional[list[tuple[torch.nn.Module, torch.nn.Module, float]]]:
    """The active adapters (lora_A, lora_B, scale) of a peft LoRA layer when the NF4 kernel can apply them
    ([] for no active adapter), None when only peft's own forward can (variants, LoRA bias, active dropout)."""
    if getattr(module, "disable_adapters", False) or getattr(module, "merged", False):
        return []
    adapters = []
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        dropout = module.lora_dropout[name]
        if name in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(name, False):
            return None
        if module.lora_B[name].bias is not None or not isinstance(module.lora_A[name], torch.nn.Linear):
            return None
        if isinstance(dropout, torch.nn.Dropout) and dropout.training and dropout.p > 0:
            return None
        adapters.append((module.lora_A[name], module.lora_B[name], float(module.scaling[name])))
    return adapters


@dataclass
class _Member:
    name: str  # path in the model of the module that is replaced
    module: torch.nn.Module  # that module: a peft LoRA layer or a bitsandbytes Linear4bit
    base: torch.nn.Module  # the Linear4bit
    adapters: list = field(default_factory=list)  # (lora_A, lora_B, scale) read at every refresh


class NF4DecodeGroup:
    """Linears that share an input, repacked into one weight, with their LoRA adapters' snapshot."""

    def __init__(self, members: list[_Member], dtype: torch.dtype, config: Optional[DecodeConfig] = None):
        self.members = members
        self.dtype = dtype
        self.config = config
        self.sources = [_source_of(member.base) for member in members]
        # single-copy layers (grpo_fast.nf4_train): their shared repacked weight itself, no copy
        self.shared = getattr(members[0].base, "nf4_packed", None) is not None
        self.weight: DecodeNF4Weight = (members[0].base.nf4_packed.weight if self.shared else
                                        repack_nf4([nf4_weight_of(member.base) for member in members],
                                                   [member.base.bias for member in members]))
        ranks = [sum(a.weight.shape[0] for a, _, _ in member.adapters) for member in members]
        self.rank = -(-max(ranks) // LORA_RANK_MULTIPLE) * LORA_RANK_MULTIPLE if max(ranks) else 0
        device = self.weight.qweight.device
        self.lora_a = self.lora_b = None
        if self.rank:
            k = self.weight.in_features
            self.lora_a = torch.zeros(len(members) * self.rank, k, device=device, dtype=dtype)
            self.lora_b = torch.zeros(self.weight.padded_rows, self.rank, device=device, dtype=dtype)
        if device.type == "cuda":  # graph replays read these in place (no copy of them per replay)
            for tensor in self.tensors():
                torch._dynamo.mark_static_address(tensor)
        self._pending: Optional[tuple[torch.Tensor, dict[int, torch.Tensor]]] = None

    def tensors(self) -> list[torch.Tensor]:
        weight = self.weight
        tensors = [weight.qweight, weight.scales, weight.counters, *weight.tables.values(), self.lora_a, self.lora_b]
        return [tensor for tensor in tensors + [weight.bias] if tensor is not None]

    @property
    def nbytes(self) -> int:
        """Bytes this group holds: its repacked copy (none when shared with single-copy layers) and LoRA snapshot."""
        owned = [self.lora_a, self.lora_b] if self.shared else self.tensors()
        return sum(tensor.numel() * tensor.element_size() for tensor in owned if tensor is not None)

    def matches(self, members: list[_Member], dtype: torch.dtype) -> bool:
        """Still valid for these modules: same layers, same bitsandbytes tensors, same rank and dtype."""
        ranks = [sum(a.weight.shape[0] for a, _, _ in member.adapters) for member in members]
        rank = -(-max(ranks) // LORA_RANK_MULTIPLE) * LORA_RANK_MULTIPLE if max(ranks) else 0
        return (dtype == self.dtype and rank == self.rank
                and [m.base for m in members] == [m.base for m in self.members]
                and [_source_of(m.base) for m in members] == self.sources)

    @torch.no_grad()
    def refresh(self, members: list[_Member]) -> None:
        """Copy the adapters' current weights into the snapshot (in place: the addresses stay)."""
        self.members = members
        if not self.rank:
            return
        self.lora_a.zero_()
        self.lora_b.zero_()
        for index, member in enumerate(members):
            row, col = self.weight.segments[index], 0
            for lora_a, lora_b, scale in member.adapters:
                r = lora_a.weight.shape[0]
                self.lora_a[index * self.rank + col: index * self.rank + col + r] = lora_a.weight
                self.lora_b[row: row + lora_b.weight.shape[0], col: col + r] = lora_b.weight * scale
                col += r

    def output(self, index: int, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Member ``index``'s product for the input ``x`` (``rows``: x as [M, K] in the dtype): from the
        launch an earlier member made for the same ``x``, else from a new launch for all members."""
        pending = self._pending
        if pending is not None and pending[0] is x and index in pending[1]:
            out = pending[1].pop(index)
            if not pending[1]:
                self._pending = None
            return out
        xa = torch.mm(rows, self.lora_a.t()) if self.rank else None
        full = nf4_decode_matmul(rows, self.weight, xa, self.lora_b, self.config)
        segments = self.weight.segments
        outs = {i: full[:, segments[i]: segments[i + 1]] for i in range(len(segments) - 1)}
        mine = outs.pop(index)
        self._pending = (x, outs) if outs else None
        return mine


class FusedNF4Linear(torch.nn.Module):
    """One member of an ``NF4DecodeGroup`` in place of its module (a bitsandbytes NF4 ``Linear4bit``, or
    a peft LoRA layer around one), through the decode kernel for few rows, else the original module.

    ``FusedNF4Linear(layer)`` wraps a single Linear4bit (a group of one, no LoRA). ``max_rows``: inputs
    with more rows (all leading dimensions flattened) use the original module. ``force``: also run the
    kernel off CUDA (the Triton interpreter on CPU: tests only)."""

    def __init__(self, layer: torch.nn.Module, *, max_rows: int = 64, force: bool = False,
                 config: Optional[DecodeConfig] = None, group: Optional[NF4DecodeGroup] = None, index: int = 0):
        super().__init__()
        if max_rows < 1:
            raise ValueError(f"max_rows: expected a positive number of rows, received {max_rows}")
        if group is None:
            nf4_weight_of(layer)  # fails here, at construction, for layers the kernel cannot read
            group = NF4DecodeGroup([_Member("", layer, layer)], layer.compute_dtype or torch.float32, config)
        self.original = layer  # a submodule: .to(), parameters() and state_dict see the weights
        self.group = group
        self.index = index
        self.max_rows = max_rows
        self.force = force

    @property
    def base_layer(self) -> torch.nn.Module:
        return self.group.members[self.index].base

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

    def _kernel_applies(self, x: torch.Tensor) -> bool:
        if x.dim() == 0 or x.shape[-1] == 0 or x.numel() // x.shape[-1] > self.max_rows:
            return False
        if torch.is_grad_enabled() and x.requires_grad:
            return False  # the kernel has no backward: training forwards stay on bitsandbytes / peft
        if not torch.compiler.is_compiling() and self.group.sources[self.index] != _source_of(self.base_layer):
            return False  # the layer's tensors were replaced since they were repacked
        if x.device.type == "cuda":  # the GPU and dtype were checked eagerly when the layer was put in
            return triton_available()
        return self.force and triton_usable_on(x.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        # The compute dtype as Linear4bit.forward settles it (fp32/bf16 inputs compute in their own
        # dtype, fp16 ones in the configured bnb_4bit_compute_dtype).
        dtype = base.compute_dtype if base.compute_dtype is not None else x.dtype
        if not self._kernel_applies(x) or dtype != self.group.dtype:
            return self.original(x)
        rows = x.reshape(-1, x.shape[-1]).to(dtype)
        if torch.compiler.is_compiling():  # a failure here fails the compiled step (the engine decodes eagerly)
            out = self.group.output(self.index, x, rows)
        else:
            out = fallback.run(KERNEL, x.device, lambda: self.group.output(self.index, x, rows), lambda: None)
            if out is None:  # the kernel cannot compile or launch here: bitsandbytes' path (and peft's)
                return self.original(x)
        return out.to(x.dtype).reshape(*x.shape[:-1], out.shape[-1])

    def extra_repr(self) -> str:
        members = len(self.group.members)
        return (f"max_rows={self.max_rows}, force={self.force}, member={self.index + 1}/{members}, "
                f"lora_rank={self.group.rank}")


class NF4DecodeCache:
    """Repacked groups kept between ``fused_nf4_decode`` blocks (by the rollout engine: its CUDA graphs
    read them at fixed addresses). ``nbytes``: their memory; ``clear()`` frees them."""

    def __init__(self):
        self.groups: dict[tuple[str, ...], NF4DecodeGroup] = {}

    @property
    def nbytes(self) -> int:
        return sum(group.nbytes for group in self.groups.values())

    def clear(self) -> None:
        self.groups.clear()

    def group(self, members: list[_Member], dtype: torch.dtype, config: Optional[DecodeConfig]) -> NF4DecodeGroup:
        key = tuple(member.name for member in members)
        group = self.groups.get(key)
        if group is None or not group.matches(members, dtype) or group.config != config:
            self.groups.pop(key, None)  # release the stale copy before making the new one
            group = self.groups[key] = NF4DecodeGroup(members, dtype, config)
        return group


def _members(model: torch.nn.Module) -> list[list[_Member]]:
    """The NF4 layers of ``model`` the kernel can read, as groups (shared-input siblings together)."""
    linear4bit = _linear4bit_class()
    if linear4bit is None:
        return []

    def nf4_layer(module) -> bool:  # bitsandbytes' own, or a single-copy layer (grpo_fast.nf4_train)
        return isinstance(module, linear4bit) or hasattr(module, "nf4_packed")

    candidates: dict[str, _Member] = {}
    wrapped = set()  # NF4 layers inside a peft LoRA layer: swapped with (or under) it
    for name, module in model.named_modules():
        base = getattr(module, "base_layer", None)
        if name and nf4_layer(base) and hasattr(module, "lora_A"):
            wrapped.add(id(base))
            adapters = _plain_lora(module)
            candidates[name] = (_Member(name, module, base, adapters) if adapters is not None
                                else _Member(f"{name}.base_layer", base, base))
    for name, module in model.named_modules():
        if name and nf4_layer(module) and id(module) not in wrapped:
            candidates[name] = _Member(name, module, module)
    fused = [name for name, module in model.named_modules() if isinstance(module, FusedNF4Linear)]
    members, shared = {}, {}
    for name, member in candidates.items():
        if any(name.startswith(f"{other}.") for other in fused):
            continue  # already swapped by an enclosing block
        packed = getattr(member.base, "nf4_packed", None)
        if packed is not None:  # grouped as they were converted: the members of one shared weight
            shared.setdefault(id(packed), {})[member.base.index] = member
            continue
        try:
            nf4_weight_of(member.base)
        except ValueError:
            continue  # e.g. FP4 layers, or odd block sizes: they keep bitsandbytes' path
        members[name] = member
    # a shared weight whose members are not all here (some swapped, some not) keeps their own forward
    complete = []
    for group in shared.values():
        size = len(next(iter(group.values())).base.nf4_packed.segments) - 1
        if sorted(group) == list(range(size)):
            complete.append([group[i] for i in range(size)])
    groups, taken = [], set()
    for name in members:
        parent, _, leaf = name.rpartition(".")
        for names in SHARED_INPUT_GROUPS:
            siblings = [members.get(f"{parent}.{other}" if parent else other) for other in names]
            if (leaf in names and all(s is not None and s.name not in taken for s in siblings)
                    and len({s.base.in_features for s in siblings}) == 1):
                groups.append(siblings)
                taken.update(s.name for s in siblings)
    groups += [[member] for name, member in members.items() if name not in taken]
    return groups + complete


@contextlib.contextmanager
def fused_nf4_decode(model: torch.nn.Module, max_rows: int = 64, *, force: bool = False,
                     config: Optional[DecodeConfig] = None, cache: Optional[NF4DecodeCache] = None,
                     dtype: Optional[torch.dtype] = None) -> Iterator[list[str]]:
    """Inside: the NF4 layers of ``model`` (and their plain LoRA adapters) run through the decode kernel
    (yields the names of the replaced modules). ``dtype``: the compute dtype of the LoRA snapshot
    (default: each layer's bnb compute dtype). Without CUDA this is a no-op (yields []) unless
    ``force`` (interpreter tests). The original modules are put back on exit, exceptions included."""
    if max_rows < 1:
        raise ValueError(f"max_rows: expected a positive number of rows, received {max_rows}")
    if not force and not (torch.cuda.is_available() and triton_available()):
        yield []
        return
    swapped: list[tuple[str, torch.nn.Module]] = []
    try:
        for members in _members(model):
            group_dtype = dtype or members[0].base.compute_dtype or torch.float32
            device = _layer_device(members[0].base)
            if device.type == "cuda" and not triton_usable_on(device, group_dtype):
                continue  # an architecture (or bf16 before sm_80) the kernel is not built for: bitsandbytes
            group = (cache.group(members, group_dtype, config) if cache is not None
                     else NF4DecodeGroup(members, group_dtype, config))
            group.refresh(members)
            for index, member in enumerate(members):
                fused = FusedNF4Linear(member.module, max_rows=max_rows, force=force, group=group, index=index)
                model.set_submodule(member.name, fused)
                swapped.append((member.name, member.module))
        yield [name for name, _ in swapped]
    finally:
        for name, original in reversed(swapped):
            model.set_submodule(name, original)


def kernel_works(model: torch.nn.Module, dtype: Optional[torch.dtype] = None) -> bool:
    """Whether the decode kernel compiles and launches for ``model``'s NF4 layers on their device, decided
    once per process (``fallback.probe``) by one eager launch on a one-row input: the rollout engine
    asks before its decode step is compiled, since inside a CUDA-graph capture a failure could not fall
    back. (Outside graphs each ``FusedNF4Linear`` call falls back by itself.) True without NF4 layers."""
    groups = _members(model)
    if not groups:
        return True
    base = groups[0][0].base
    device = _layer_device(base)
    compute_dtype = dtype or base.compute_dtype or torch.float32

    def launch():  # a single-copy layer's group reads the model's own repacked weight, as decoding does
        group = NF4DecodeGroup([_Member("", base, base)], compute_dtype)
        nf4_decode_matmul(torch.zeros(1, group.weight.in_features, device=device, dtype=group.dtype), group.weight,
                          config=group.config)

    return fallback.probe(KERNEL, device, launch)
