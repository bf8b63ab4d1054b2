"""Offline compilation of a recorded Triton launch for a GPU this machine does not have, and what
the compiled code says: registers, spills, shared memory, the SASS and its loops.

A launch (kernels/launch.py: the kernel, grid, arguments and options its launcher passes) is turned
into the signature Triton's runtime would build for it (pointer dtypes, integers specialised on
divisibility by 16 and on the value 1, constexprs), compiled by `triton.compile` for
`GPUTarget("cuda", capability, 32)`, then read with the tools Triton's wheel ships
(`backends/nvidia/bin`):

- `cuobjdump -res-usage` on the cubin Triton produced: registers per thread and stack bytes;
- `ptxas -v` run again on the same PTX with Triton's own flags: spill store / load bytes (the
  register count of that run is compared with the cubin's and the result says whether they agree);
- `nvdisasm` on the cubin: the SASS, from which loops are found as backward branches (ptxas lays a
  loop's blocks out contiguously, so a branch to an earlier label closes a loop spanning the
  addresses between them) and instructions are counted per loop nesting level.

Pointers are assumed 16-byte aligned (as torch allocations are): the kernels are compiled as the
runtime compiles them for aligned inputs. The process must not have TRITON_INTERPRET=1 set when the
kernels' modules are imported (the report's entry point removes it).
"""

from __future__ import annotations

import inspect
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

_TRITON_DTYPES = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
    torch.bool: "i1",
}


def arch_name(capability: int) -> str:
    """ptxas' name for a compute capability: sm_90a (wgmma and TMA need the 'a' variant), sm_80..."""
    return f"sm_{capability}a" if capability == 90 else f"sm_{capability}"


def _tools_dir() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def _ptxas_path(capability: int) -> str:
    """The ptxas Triton itself runs for this capability (3.9 uses its newer 'ptxas-blackwell' from sm_90)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(capability).path
    except (ImportError, AttributeError):  # older Triton: one ptxas
        return str(_tools_dir() / "ptxas")


def _run(*command: str) -> str:
    done = subprocess.run(list(command), capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"{Path(command[0]).name} failed ({done.returncode}): {done.stderr.strip()[:2000]}")
    return done.stdout + done.stderr


# ----------------------------------------------------------------------------------------------
# a launch -> triton.compile
# ----------------------------------------------------------------------------------------------


def _specialize(name: str, value: Any) -> tuple[str, Any]:
    """(signature type, attribute or constexpr value) of one non-constexpr argument, by the runtime's
    rules: tensors are aligned pointers, an int 1 becomes a constexpr, ints divisible by 16 say so."""
    if isinstance(value, torch.Tensor):
        if value.dtype not in _TRITON_DTYPES:
            raise ValueError(f"{name}: expected a tensor of {sorted(map(str, _TRITON_DTYPES))}, received {value.dtype}")
        return "*" + _TRITON_DTYPES[value.dtype], "D"
    if isinstance(value, bool):
        return "u1", None
    if isinstance(value, int):
        if value == 1:
            return "constexpr", 1
        kind = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
        return kind, "D" if value % 16 == 0 else ""
    if isinstance(value, float):
        return "fp32", None
    if value is None:
        return "constexpr", None
    raise ValueError(f"{name}: expected a tensor, int, float, bool or None, received {type(value).__name__}")


def bound_arguments(launch) -> tuple[dict, dict]:
    """({parameter: value} with defaults applied, {launch option: value}) of a kernels.launch.Launch."""
    names = [p.name for p in launch.kernel.params]
    options = {k: v for k, v in launch.kwargs.items() if k not in names}
    bound = inspect.signature(launch.kernel.fn).bind(*launch.args, **{k: v for k, v in launch.kwargs.items() if k in names})
    bound.apply_defaults()
    return dict(bound.arguments), options


def launch_signature(launch) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) for triton.compile, from a kernels.launch.Launch."""
    values, options = bound_arguments(launch)
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(launch.kernel.params):
        value = values[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[(index,)] = value
            continue
        kind, extra = _specialize(param.name, value)
        if param.do_not_specialize and kind == "constexpr":
            kind, extra = "i32", ""
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[(index,)] = extra
        elif extra == "D":
            attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs, options


def _triton_before(major: int, minor: int) -> bool:
    import triton

    return tuple(int(part) for part in triton.__version__.split(".")[:2]) < (major, minor)


def ast_source(launch, capability: int):
    """The ASTSource of a recorded launch in the running Triton's convention: from 3.3 index paths
    and attribute lists (launch_signature), before it names and an AttrsDescriptor built as that
    version's runtime builds them (ints equal to 1 and None are constants there too, typed i32 and
    *i8 in the signature). The support matrix compiles under Triton 3.0 and 3.2 with it."""
    from triton.compiler import ASTSource

    signature, constexprs, attrs, _ = launch_signature(launch)
    if not _triton_before(3, 3):
        return ASTSource(launch.kernel, signature, constexprs, attrs)
    old_signature, constants, hints = {}, {}, {}
    for index, param in enumerate(launch.kernel.params):
        kind = signature[param.name]
        if param.is_constexpr or kind == "constexpr":
            constants[param.name] = value = constexprs[(index,)]
            if param.is_constexpr:
                continue
            kind = "*i8" if value is None else "i32"
            hints[index] = 16 if value is None else 1
        elif (index,) in attrs:
            hints[index] = 16
        old_signature[param.name] = kind
    if _triton_before(3, 2):
        from triton.compiler.compiler import AttrsDescriptor

        descriptor = AttrsDescriptor(divisible_by_16={i for i, h in hints.items() if h == 16},
                                     equal_to_1={i for i, h in hints.items() if h == 1})
    else:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        # the runtime's deduction, from stand-in values: 16 (divisible by 16), 1, or 3 (neither)
        descriptor = make_backend(GPUTarget("cuda", capability, 32)).get_attrs_descriptor(
            launch.kernel.params, [hints.get(i, 3) for i in range(len(launch.kernel.params))])
    return ASTSource(launch.kernel, old_signature, constants, descriptor)


def specialization_key(launch, capability: int) -> str:
    """Launches with equal keys compile to the same code."""
    signature, constexprs, attrs, options = launch_signature(launch)
    return repr((launch.kernel.fn.__qualname__, capability, sorted(signature.items()), sorted(constexprs.items()),
                 sorted(attrs), sorted(options.items())))


# ----------------------------------------------------------------------------------------------
# the compiled kernel
# ----------------------------------------------------------------------------------------------


@dataclass
class Instruction:
    address: int
    opcode: str  # with modifiers, e.g. "LDG.E.128"
    predicate: str  # "@!P0" or ""
    operands: str
    depth: int = 0  # loops enclosing it

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]


@dataclass
class Loop:
    start: int  # address of the first instruction (the branch target)
    end: int  # address of the backward branch
    instructions: int = 0  # all instructions in [start, end], inner loops included
    depth: int = 1


@dataclass
class CompiledKernel:
    name: str
    capability: int
    num_warps: int
    num_stages: int
    shared_bytes: int  # dynamic shared memory Triton launches with
    registers: int  # per thread, from the cubin
    stack_bytes: int
    spill_store_bytes: Optional[int]  # from the ptxas -v rerun (None when its registers differ from the cubin's)
    spill_load_bytes: Optional[int]
    ptxas_rerun_matches: bool
    instructions: list[Instruction] = field(default_factory=list)
    loops: list[Loop] = field(default_factory=list)
    compile_seconds: float = 0.0

    @property
    def local_memory_instructions(self) -> int:
        """STL / LDL in the SASS: register spills (Triton kernels use no local arrays)."""
        return sum(1 for i in self.instructions if i.base in ("STL", "LDL"))

    @property
    def spills(self) -> bool:
        return bool(self.spill_store_bytes or self.spill_load_bytes or self.local_memory_instructions)

    def features(self) -> dict[str, int]:
        """Instruction counts that say which hardware paths the code uses."""
        ops = Counter(i.base for i in self.instructions)
        return {
            "wgmma": ops["HGMMA"] + ops["QGMMA"] + ops["IGMMA"],
            "mma_sync": ops["HMMA"] + ops["IMMA"],
            "tma": ops["UTMALDG"] + ops["UTMASTG"] + ops["UBLKCP"],
            "async_copy": ops["LDGSTS"],
            "local_memory": ops["STL"] + ops["LDL"],
        }


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_BRANCH_TARGET = re.compile(r"`\((\.L_x_\d+)\)")


def parse_sass(text: str) -> tuple[list[Instruction], list[Loop]]:
    """Instructions of `nvdisasm -c` output and its loops (backward branches), with nesting depths."""
    instructions: list[Instruction] = []
    labels: dict[str, int] = {}
    pending: list[str] = []
    for line in text.splitlines():
        label = _LABEL.match(line)
        if label:
            pending.append(label.group(1))
            continue
        match = _SASS_LINE.search(line)
        if not match:
            continue
        address = int(match.group(1), 16)
        for name in pending:
            labels[name] = address
        pending = []
        instructions.append(Instruction(address, match.group(3), (match.group(2) or "").strip(), match.group(4).strip()))
    loops = []
    for inst in instructions:
        target = _BRANCH_TARGET.search(inst.operands) if inst.base in ("BRA", "JMP") else None
        if target and target.group(1) in labels and labels[target.group(1)] < inst.address:
            loops.append(Loop(labels[target.group(1)], inst.address))
    for loop in loops:
        loop.instructions = sum(1 for i in instructions if loop.start <= i.address <= loop.end)
        loop.depth = sum(1 for other in loops if other.start <= loop.start and loop.end <= other.end)
    for inst in instructions:
        inst.depth = sum(1 for loop in loops if loop.start <= inst.address <= loop.end)
    return instructions, loops


def _res_usage(cubin: Path) -> tuple[int, int]:
    text = _run(str(_tools_dir() / "cuobjdump"), "-res-usage", str(cubin))
    match = re.search(r"REG:(\d+)\s+STACK:(\d+)", text)
    if not match:
        raise RuntimeError(f"cuobjdump -res-usage: no REG/STACK line in {text[:500]!r}")
    return int(match.group(1)), int(match.group(2))


def _ptxas_verbose(ptx: Path, capability: int) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from `ptxas -v` with Triton 3.9's flags."""
    out = Path(str(ptx) + ".o")
    text = _run(_ptxas_path(capability), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch_name(capability)}",
                str(ptx), "-o", str(out))
    registers = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if not registers or not spills:
        raise RuntimeError(f"ptxas -v: no register / spill lines in {text[:1000]!r}")
    return int(registers.group(1)), int(spills.group(1)), int(spills.group(2))


def compile_launch(launch, capability: int) -> CompiledKernel:
    """Compile a recorded launch for `capability` (90: sm_90a, 80, 89, ...) and read the result."""
    import time

    import triton
    from triton.backends.compiler import GPUTarget

    options = launch_signature(launch)[3]
    began = time.perf_counter()
    compiled = triton.compile(ast_source(launch, capability), target=GPUTarget("cuda", capability, 32),
                              options=options)
    seconds = time.perf_counter() - began
    with tempfile.TemporaryDirectory() as folder:
        cubin, ptx = Path(folder) / "kernel.cubin", Path(folder) / "kernel.ptx"
        cubin.write_bytes(compiled.asm["cubin"])
        ptx.write_text(compiled.asm["ptx"])
        registers, stack = _res_usage(cubin)
        rerun_registers, spill_stores, spill_loads = _ptxas_verbose(ptx, capability)
        sass = _run(str(_tools_dir() / "nvdisasm"), "-c", str(cubin))
    instructions, loops = parse_sass(sass)
    matches = rerun_registers == registers
    metadata = compiled.metadata
    return CompiledKernel(
        name=launch.kernel.fn.__qualname__, capability=capability, num_warps=metadata.num_warps,
        num_stages=metadata.num_stages, shared_bytes=metadata.shared, registers=registers, stack_bytes=stack,
        spill_store_bytes=spill_stores if matches else None, spill_load_bytes=spill_loads if matches else None,
        ptxas_rerun_matches=matches, instructions=instructions, loops=loops, compile_seconds=seconds)
