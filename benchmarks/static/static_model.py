"""The performance model of the static kernel report: what compiled code allows at best on a GPU.

Every figure here is an estimate (a ceiling), computed from the SASS instruction counts of a
compiled kernel (benchmarks/static/static_compile.py), the bytes and FLOPs of its launch, and a device's
published or assumed rates (DEVICES, each with its source). The GPU suite (`python -m
benchmarks.suite`) measures the truth; this says how far the code itself lets a kernel go.

Issue and pipe model. Each SM has 4 warp schedulers, each issuing at most one warp-instruction
per clock (NVIDIA's Hopper and Ampere architecture whitepapers: 4 SM sub-partitions, each with
one warp scheduler and dispatch unit), so an SM issues at most 4 warp-instructions per clock; and
a warp issues at most one instruction per clock, so an SM holding W warps issues at most
min(4, W) (``issue_rate``): one 2-warp program alone on an SM issues 2 per clock, not 4. Some
instructions also go through narrower pipes; the CUDA C++ Programming Guide's table "Throughput
of Native Arithmetic Instructions" gives results per clock per SM for compute capabilities 8.0 /
8.6 / 8.9 / 9.0: fp32 add, multiply, fma 64 / 128 / 128 / 128; 32-bit integer add, logic, shift,
compare, min/max and multiply 64; exp2, log2, reciprocal (MUFU) and type conversions 16. A warp-
instruction of a pipe with L lanes per SM takes 32 / L clocks of it. A program (thread block)
then needs, per SM,

    cycles = max(all warp-instructions / 4, fma / (lanes_fma / 32), alu / 2, imad / 2, xu / 0.5)

where each count is the SASS of the program's code weighted by its loops' trip counts, with all 4
sub-partitions busy. With W < 4 warps resident only W sub-partitions have work (a warp stays on
its sub-partition, and the pipes are per sub-partition), so every rate above is scaled by W / 4
(``ProgramCost.cycles(warps=W)``); imbalance between sub-partitions at W > 4 (e.g. 6 warps: 2, 2,
1, 1) is not modelled. The warps an SM holds come from the launch (``sm_cycles``): the busiest SM
runs ceil(P / S) of P programs, at most ``blocks_per_sm`` (registers, shared memory, warps) at
once, in waves. A warp's dependent-instruction latency (it waits for a result before issuing the
next instruction that reads it) is not modelled either: with few warps per sub-partition it is
what limits real issue rates, so few-warp launches are further from their ceilings. Memory
latency, barriers, bank conflicts, local-memory (spill) traffic and launch latency are not
modelled: they only lower the real figure below these ceilings. Which class an opcode belongs to (PIPES) is an
assumption read off Nsight Compute's pipe names; tensor-core instructions are charged their
issue slot here and their FLOPs separately.

Bandwidth-bound kernels (the NF4 matmul, the row kernel, decode attention, sampling): with P
programs on S SMs, the busiest SM runs n = ceil(P / S) of them, b = blocks_per_sm at a time, so
t_compute = sum over its waves of (programs in the wave x one program's cycles at the wave's warps)
/ clock (``sm_cycles``); t_memory = bytes / copy
bandwidth (a device-to-device copy's bytes read + written per second: assumed `copy_fraction` of
the DRAM peak). The kernel takes at least max(t_compute, t_memory), and kernels of PyTorch after
it (a split-K reduction) add their bytes at copy bandwidth. The ceiling is the fraction of copy
bandwidth the useful bytes reach in that time (for the NF4 matmul the packed weight bytes, as in
benchmarks/nf4.py's "of copy" column).

Matmul kernels (the forward-only log-prob kernel): per program, the tensor cores need
FLOPs / (dense FLOP per clock per SM) cycles; the innermost loop (the K loop) overlaps its
instructions with them, the code around it (the epilogue) does not, unless another program on the
same SM fills the tensor cores meanwhile (blocks per SM >= 2). Instructions issue at the rate of
the warps of the resident programs (``issue_rate``). The ceiling is the fraction of the
time the tensor cores are busy, i.e. of the matmul rate if the main loop runs as efficiently as
cuBLAS's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from grpo_fast.kernels import launch as launch_rules


@dataclass(frozen=True)
class Device:
    name: str
    capability: int  # compiled for: 90 -> sm_90a
    sms: int
    clock_ghz: float  # SM clock assumed under load
    dram_tbs: float  # peak DRAM bandwidth, TB/s
    copy_fraction: float  # a device-to-device copy's rate (read + write) as a fraction of dram_tbs (assumed)
    fma_lanes: int  # fp32 add / multiply / fma results per clock per SM
    tensor_flops_per_clock: int  # dense bf16 with fp32 accumulation, FLOP per clock per SM
    matmul_tflops: float  # a large bf16 cuBLAS matmul (the suite's "same-run bf16 matmul"), assumed
    smem_per_sm_kib: int
    smem_per_block_kib: int  # the most one block may use
    max_warps: int  # resident warps per SM
    max_blocks: int  # resident blocks per SM
    source: str
    regs_per_sm: int = 65536
    issue_per_clock: int = 4
    alu_lanes: int = 64
    imad_lanes: int = 64
    xu_lanes: int = 16

    @property
    def copy_bytes_per_s(self) -> float:
        return self.copy_fraction * self.dram_tbs * 1e12

    @property
    def clock_hz(self) -> float:
        return self.clock_ghz * 1e9


DEVICES = {
    "h200": Device(
        "NVIDIA H200 SXM (sm_90a)", 90, sms=132, clock_ghz=1.98, dram_tbs=4.8, copy_fraction=0.9, fma_lanes=128,
        tensor_flops_per_clock=4096, matmul_tflops=750.0, smem_per_sm_kib=228, smem_per_block_kib=227,
        max_warps=64, max_blocks=32,
        source="132 SMs and 4.8 TB/s HBM3e (NVIDIA H200 datasheet); 1.98 GHz: the H100/H200 SXM maximum SM clock "
               "(nvidia-smi); 4096 dense bf16 FLOP/clock/SM (989 TFLOP/s at 1.83 GHz, Hopper whitepaper); "
               "228 KiB shared memory per SM, 227 KiB per block, 64 warps and 32 blocks per SM (CUDA Programming "
               "Guide, compute capability 9.0); matmul 750 TFLOP/s: the same GH100 die's measured cuBLAS rate on "
               "an H100 (kernels/config.py); copy at 90% of peak: assumed (the suite measures it)"),
    "h100": Device(
        "NVIDIA H100 SXM 80GB (sm_90a)", 90, sms=132, clock_ghz=1.98, dram_tbs=3.35, copy_fraction=0.9, fma_lanes=128,
        tensor_flops_per_clock=4096, matmul_tflops=748.0, smem_per_sm_kib=228, smem_per_block_kib=227,
        max_warps=64, max_blocks=32,
        source="the H200's GH100 die with 3.35 TB/s HBM3 (H100 datasheet); matmul 748 TFLOP/s measured "
               "(benchmarks/results/nvidia-h100-80gb-hbm3/): the device the report's model is checked against"),
    "a100": Device(
        "NVIDIA A100 SXM4 80GB (sm_80)", 80, sms=108, clock_ghz=1.41, dram_tbs=2.039, copy_fraction=0.9, fma_lanes=64,
        tensor_flops_per_clock=2048, matmul_tflops=250.0, smem_per_sm_kib=164, smem_per_block_kib=163,
        max_warps=64, max_blocks=32,
        source="108 SMs, 1.41 GHz boost, 2,039 GB/s, 312 dense bf16 TFLOP/s = 2048 FLOP/clock/SM (A100 datasheet "
               "and Ampere whitepaper); 164 KiB shared memory per SM (CUDA Programming Guide, 8.0); matmul 250 "
               "TFLOP/s (80% of peak) and copy at 90%: assumed"),
    "rtx4090": Device(
        "NVIDIA GeForce RTX 4090 (sm_89)", 89, sms=128, clock_ghz=2.52, dram_tbs=1.008, copy_fraction=0.9,
        fma_lanes=128, tensor_flops_per_clock=512, matmul_tflops=140.0, smem_per_sm_kib=100, smem_per_block_kib=99,
        max_warps=48, max_blocks=24,
        source="128 SMs, 2.52 GHz boost, 1,008 GB/s, 165 dense fp16/bf16 TFLOP/s with fp32 accumulation = 512 "
               "FLOP/clock/SM (Ada whitepaper); 100 KiB shared memory, 48 warps, 24 blocks per SM (CUDA "
               "Programming Guide, 8.9); matmul 140 TFLOP/s (85% of peak) and copy at 90%: assumed"),
}

# SASS opcode (before the first ".") -> pipe; anything else costs its issue slot only
PIPES = {
    "fma": {"FFMA", "FADD", "FMUL", "FFMA2", "FADD2", "FMUL2", "HFMA2", "HADD2", "HMUL2", "FSWZADD"},
    "imad": {"IMAD", "IMUL", "IDP"},
    "alu": {"IADD3", "IADD", "VIADD", "LOP3", "LOP", "SHF", "SHL", "SHR", "LEA", "ISETP", "FSETP", "HSETP2",
            "FMNMX", "IMNMX", "VIMNMX", "HMNMX2", "FSEL", "SEL", "PRMT", "BMSK", "BREV", "FLO", "POPC", "IABS",
            "PLOP3", "P2R", "R2P", "I2FP", "F2FP"},
    "xu": {"MUFU", "F2F", "I2F", "F2I", "FRND"},
    "tensor": {"HGMMA", "QGMMA", "IGMMA", "HMMA", "IMMA", "BMMA"},
}
_PIPE_OF = {opcode: pipe for pipe, opcodes in PIPES.items() for opcode in opcodes}
_LDG_BYTES = {"128": 16, "64": 8, "U8": 1, "S8": 1, "U16": 2, "S16": 2}


def pipe_of(opcode_base: str) -> str:
    return _PIPE_OF.get(opcode_base, "other")


def issue_rate(device: Device, warps: int) -> int:
    """Warp-instructions per clock an SM holding ``warps`` warps issues at most: one per scheduler
    (4), and one per warp (a warp issues at most one instruction per clock); the rule the NF4 decode
    planner uses too (grpo_fast.kernels.launch.issue_rate)."""
    return launch_rules.issue_rate(warps, device.issue_per_clock)


def blocks_per_sm(device: Device, num_warps: int, registers: int, shared_bytes: int) -> int:
    """Resident blocks per SM (occupancy calculator rules: registers allocated per warp in units of
    256, 1 KiB of shared memory reserved per block); 0 when one block does not fit."""
    if shared_bytes > device.smem_per_block_kib * 1024:
        return 0
    by_warps = device.max_warps // num_warps
    regs_per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    by_registers = device.regs_per_sm // (regs_per_warp * num_warps)
    by_shared = (device.smem_per_sm_kib * 1024) // (shared_bytes + 1024) if shared_bytes else device.max_blocks
    return max(0, min(device.max_blocks, by_warps, by_registers, by_shared))


@dataclass
class ProgramCost:
    """Warp-instructions one program executes (all its warps), by pipe, and its cycles on one SM."""

    per_pipe: dict  # pipe -> warp-instructions (weighted by trip counts)
    total: float
    loop_total: float  # the part inside the innermost loops
    outer_total: float  # the rest (prologue, epilogue, outer loop bodies)
    loop_per_pipe: dict
    outer_per_pipe: dict
    modelled_depth: int  # loop depth the trip counts cover
    kernel_depth: int  # deepest loop in the SASS
    load_bytes_per_ldg: dict  # global load width (bytes) -> count in the innermost loops, per warp
    num_warps: int = 4  # warps per program

    def _bounds(self, device: Device, part: str, warps: Optional[int]) -> dict:
        """SM clocks of this program's instructions by what bounds them, with ``warps`` warps resident on
        the SM (default: the program's own): issue at issue_rate, each pipe at its lanes times the
        fraction of sub-partitions that hold a warp."""
        counts = {"all": self.per_pipe, "loop": self.loop_per_pipe, "outer": self.outer_per_pipe}[part]
        rate = issue_rate(device, self.num_warps if warps is None else warps)
        share = rate / device.issue_per_clock
        options = {"issue": sum(counts.values()) / rate}
        for pipe, lanes in (("fma", device.fma_lanes), ("imad", device.imad_lanes), ("alu", device.alu_lanes),
                            ("xu", device.xu_lanes)):
            options[pipe] = counts.get(pipe, 0.0) / (lanes / 32 * share)
        return options

    def cycles(self, device: Device, part: str = "all", warps: Optional[int] = None) -> float:
        return max(self._bounds(device, part, warps).values())

    def limiter(self, device: Device, warps: Optional[int] = None) -> str:
        options = self._bounds(device, "all", warps)
        return max(options, key=options.get)


def program_cost(compiled, trips: tuple[int, ...], later_trips: Optional[float] = None) -> ProgramCost:
    """Count a compiled kernel's SASS for one program: an instruction at loop depth d runs
    trips[0] * ... * trips[d-1] times per warp (deeper loops than `trips` covers run trips' product:
    the figure is then a lower bound, flagged by modelled_depth < kernel_depth). `later_trips`: the
    top-level loops after the first (in address order, e.g. a split-K reduction after the main loop)
    run that many times per program on average instead of trips[0], and count as outer code."""
    deepest = max((inst.depth for inst in compiled.instructions), default=0)
    top = sorted((loop for loop in compiled.loops if loop.depth == 1), key=lambda loop: loop.start)
    later = [loop for loop in top[1:]] if later_trips is not None else []
    per_pipe: dict = {}
    loop_pipe: dict = {}
    outer_pipe: dict = {}
    widths: dict = {}
    for inst in compiled.instructions:
        in_later = any(loop.start <= inst.address <= loop.end for loop in later)
        runs = (later_trips * math.prod(trips[1:inst.depth]) if in_later else math.prod(trips[:inst.depth])) * compiled.num_warps
        pipe = pipe_of(inst.base)
        per_pipe[pipe] = per_pipe.get(pipe, 0.0) + runs
        innermost = inst.depth == deepest and deepest > 0 and not in_later
        target = loop_pipe if innermost else outer_pipe
        target[pipe] = target.get(pipe, 0.0) + runs
        if inst.base == "LDG" and innermost:
            width = next((_LDG_BYTES[m] for m in inst.opcode.split(".")[1:] if m in _LDG_BYTES), 4)
            widths[width] = widths.get(width, 0) + 1
    return ProgramCost(per_pipe, sum(per_pipe.values()), sum(loop_pipe.values()), sum(outer_pipe.values()),
                       loop_pipe, outer_pipe, min(len(trips), deepest), deepest, widths, compiled.num_warps)


def sm_waves(device: Device, programs: int, resident: int) -> list[int]:
    """Programs per wave on the busiest SM: ceil(programs / SMs) of them, ``resident`` (blocks per SM)
    at a time (grpo_fast.kernels.launch.sm_waves, as the NF4 decode planner counts them)."""
    return launch_rules.sm_waves(programs, device.sms, resident)


def sm_cycles(device: Device, cost: ProgramCost, programs: int, resident: int) -> dict:
    """Clocks of the busiest SM's programs: each wave its programs' instructions at the issue and pipe
    rates of the warps it holds (the one place the model charges a launch's instructions)."""
    waves = sm_waves(device, programs, resident)
    # a program's clocks at the full issue rate, scaled per wave by the rate its warps allow: the
    # planner's rule (every bound in ProgramCost._bounds scales alike with the issue rate)
    cycles = launch_rules.busiest_sm_cycles(programs, device.sms, resident, cost.num_warps,
                                            cost.cycles(device, warps=device.issue_per_clock), device.issue_per_clock)
    warps = waves[0] * cost.num_warps if waves else cost.num_warps
    return {"cycles": cycles, "warps_per_sm": warps, "issue_per_clock": issue_rate(device, warps),
            "limiter": cost.limiter(device, warps=warps)}


def bandwidth_ceiling(device: Device, cost: ProgramCost, programs: int, kernel_bytes: float, useful_bytes: float,
                      extra_bytes: float = 0.0, resident: int = 1) -> dict:
    """Times (s) and the fraction of copy bandwidth the useful bytes reach, for a bandwidth-bound launch
    (``resident``: blocks per SM, occupancy())."""
    sm = sm_cycles(device, cost, programs, resident)
    t_compute = sm["cycles"] / device.clock_hz
    t_memory = kernel_bytes / device.copy_bytes_per_s
    t_extra = extra_bytes / device.copy_bytes_per_s
    t_total = max(t_compute, t_memory) + t_extra
    return {
        "t_compute_us": t_compute * 1e6, "t_memory_us": t_memory * 1e6, "t_extra_us": t_extra * 1e6,
        "t_total_us": t_total * 1e6, "bound": "compute" if t_compute > t_memory else "memory",
        "warps_per_sm": sm["warps_per_sm"], "issue_per_clock": sm["issue_per_clock"], "limiter": sm["limiter"],
        "fraction_of_copy": (useful_bytes / device.copy_bytes_per_s) / t_total,
    }


def matmul_ceiling(device: Device, cost: ProgramCost, flops_per_program: float, resident: int) -> dict:
    """Fraction of the time the tensor cores are busy (= of the matmul rate at cuBLAS's main-loop
    efficiency) for a tiled matmul with an epilogue, `resident` programs per SM."""
    tensor = flops_per_program / device.tensor_flops_per_clock
    warps = max(1, resident) * cost.num_warps
    main = max(tensor, cost.cycles(device, "loop", warps=cost.num_warps))  # a program's own warps issue its loop
    epilogue = cost.cycles(device, "outer", warps=cost.num_warps)
    if resident <= 1:
        per_program = main + epilogue
    else:  # other programs' main loops can fill the tensor cores during an epilogue
        per_program = max(tensor, cost.cycles(device, warps=warps), (main + epilogue) / resident)
    return {"tensor_cycles": tensor, "main_loop_cycles": main, "epilogue_cycles": epilogue,
            "fraction_of_matmul": tensor / per_program, "warps_per_sm": warps,
            "issue_per_clock": issue_rate(device, warps), "limiter": cost.limiter(device, warps=warps)}


def chunk_route(device: Device, flops: float, t_rows_s: float, gemm_fraction: float) -> float:
    """Fraction of the matmul rate of a cuBLAS GEMM with an fp32 result (at `gemm_fraction` of the
    matmul rate) followed by the row kernel's passes taking t_rows_s."""
    t_matmul = flops / (device.matmul_tflops * 1e12)
    return t_matmul / (t_matmul / gemm_fraction + t_rows_s)


def occupancy(device: Device, compiled) -> int:
    return blocks_per_sm(device, compiled.num_warps, compiled.registers, compiled.shared_bytes)


def goal_met(value: Optional[float], goal: Optional[float]) -> Optional[bool]:
    return None if value is None or goal is None else value >= goal
