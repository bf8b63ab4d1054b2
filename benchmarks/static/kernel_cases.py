"""What the static kernel report compiles: every Triton kernel of the project, found in its modules,
and the launches (goal shapes, launch options) each kernel is compiled and modelled at.

Kernels are discovered, not listed: every module of grpo_fast and grpo_fast.kernels whose source
has `@triton.jit` is imported and each JIT function defined there that calls `tl.program_id` is a
kernel (the others are helpers inlined into kernels). A kernel without a case here is reported as
not covered (and `--check` fails), so a new kernel cannot leave the report silently: add a
builder to CASE_BUILDERS.

Launches come from the launchers themselves: each launcher goes through kernels.launch.launch and
is called on meta tensors of the goal shape inside `recording()`, so the report compiles exactly the
arguments, constexprs and options production passes (launchers that size their launch by the SM
count take the modelled device's: the NF4 decode config's `num_sms`, the attention's `splits`).

Goal shapes: Qwen2.5-7B's lm_head (H=3584, V=152064) in chunks of the default budget (768 tokens
for the triton backend); its block Linears (benchmarks/nf4.py's shapes, and the engine's grouped
launches: q/k/v with biases and gate/up, LoRA r16 in the epilogue) at 1, 4, 16 and 64 rows (--full:
1-64); its decode attention (28 query heads, 4 KV heads of 128) over a bf16 cache.
"""

from __future__ import annotations

import importlib
import inspect
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from ..nf4 import DECODE_STEP, QWEN_7B_GROUPED, QWEN_7B_SHAPES
from .static_compile import bound_arguments

HEAD_7B = (3584, 152064)  # Qwen2.5-7B's lm_head (H, V), as benchmarks/loss.py's HEADS
ROWS_FULL = (1, 2, 4, 8, 16, 32, 64)
ROWS_QUICK = (1, 4, 16, 64)
LOSS_TOKENS_ON_CHIP = 16384  # the suite's loss case
META = torch.device("meta")


@dataclass
class Case:
    """One modelled launch of one kernel."""

    group: str  # report section: "nf4", "rows", "logprob"
    name: str
    launch: object  # kernels.launch.Launch
    hot: bool  # on a default training / decode path: spills fail the check
    kind: str  # "bandwidth" or "matmul"
    unit: str  # what "per unit" counts: "weight", "logit"
    units_per_program: float
    trips: tuple[int, ...]  # loop trip counts by nesting depth
    kernel_bytes: float = 0.0  # DRAM bytes the kernel moves
    useful_bytes: float = 0.0  # the bytes the copy-bandwidth fraction is of
    extra_bytes: float = 0.0  # PyTorch kernels after it (split-K reduction)
    extra_kernels: int = 0
    flops_per_program: float = 0.0
    goal: Optional[float] = None  # fraction of copy bandwidth (bandwidth) or of the matmul rate (matmul)
    later_trips: Optional[float] = None  # per program, of the top-level loops after the main one (split-K reduction)
    params: dict = field(default_factory=dict)

    @property
    def programs(self) -> int:
        return math.prod(self.launch.grid)

    @property
    def kernel(self) -> str:
        return self.launch.kernel.fn.__qualname__


# ----------------------------------------------------------------------------------------------
# discovery
# ----------------------------------------------------------------------------------------------


def _module_names() -> list[str]:
    import grpo_fast
    import grpo_fast.kernels

    names = []
    for package in (grpo_fast, grpo_fast.kernels):
        # __path__, not __file__'s folder: grpo_fast.kernels' __init__ (grpo_fast/kernels.py) sits apart
        # from its modules (the repository's kernels/ folder, or grpo_fast/kernels/ in a wheel)
        for path in sorted(p for folder in package.__path__ for p in Path(folder).glob("*.py")):
            if "@triton.jit" in path.read_text(encoding="utf-8"):
                names.append(f"{package.__name__}.{path.stem}")
    return names


def discover_kernels() -> dict[str, object]:
    """{"module:qualname": JITFunction} of every kernel defined in the project's modules."""
    from triton.runtime.jit import JITFunction

    kernels = {}
    for name in _module_names():
        module = importlib.import_module(name)
        for value in vars(module).values():
            if isinstance(value, JITFunction) and value.fn.__module__ == name and "program_id" in inspect.getsource(value.fn):
                kernels[f"{name}:{value.fn.__qualname__}"] = value
    return kernels


def kernel_id(jit_function) -> str:
    return f"{jit_function.fn.__module__}:{jit_function.fn.__qualname__}"


# ----------------------------------------------------------------------------------------------
# the loss: row kernel (no-grad and training chunk) and the forward-only on-chip kernel
# ----------------------------------------------------------------------------------------------


def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, device=META, dtype=dtype)


def loss_chunk_tokens() -> int:
    """Tokens per chunk at Qwen2.5-7B's head with the default budget (triton backend: fp32 logits)."""
    from grpo_fast.kernels.chunked import _bytes_per_logit, chunk_tokens
    from grpo_fast.kernels.config import KernelConfig

    return chunk_tokens(10 ** 9, HEAD_7B[1], _bytes_per_logit("triton"), KernelConfig(), None)


def _row_case(name, launch, n, V, read_passes, written_bytes_per_logit, **params) -> Case:
    """A row-kernel launch over n rows of V fp32 logits, read `read_passes` times, writing d_logits of
    `written_bytes_per_logit` (0: none): all of its traffic is useful (nothing else reads it)."""
    traffic = n * V * (4 * read_passes + written_bytes_per_logit)
    return Case("rows", name, launch, True, "bandwidth", "logit", V, (math.ceil(V / launch.kwargs["BLOCK_V"]),),
                kernel_bytes=traffic, useful_bytes=traffic, params=dict(tokens=n, V=V, **params))


def row_cases(full: bool) -> list[Case]:
    from grpo_fast.kernels.chunked import _rows_triton
    from grpo_fast.kernels.config import KernelConfig
    from grpo_fast.kernels.grpo_kernel import logprob_rows_triton
    from grpo_fast.kernels.launch import recording
    from grpo_fast.kernels.token_math import LossSpec, TokenInputs

    n, V = loss_chunk_tokens(), HEAD_7B[1]
    cfg = KernelConfig()

    def no_grad(softcap=None):
        with recording() as launches:
            logprob_rows_triton(_meta(n, V), _meta(n, dtype=torch.int64), _meta(n), _meta(n), temperature=1.0,
                                logit_scale=1.0, logit_softcap=softcap, cfg=cfg)
        return launches

    def training(spec, dtype, ref=False):
        inputs = TokenInputs(targets=_meta(n, dtype=torch.int64), token_weight=_meta(n), advantages=_meta(n),
                             seq_index=_meta(n, dtype=torch.int64), num_sequences=8, old_logps=_meta(n),
                             ref_logps=_meta(n) if ref else None, num_tokens=n)
        out = {k: _meta(n) for k in ("logp", "entropy", "loss", "low", "high", "kl")}
        with recording() as launches:
            _rows_triton(_meta(n, V), inputs, spec, None, 0, out, cfg, dtype)
        return launches

    dapo = LossSpec(epsilon_low=0.2, epsilon_high=0.28)
    cases = [
        _row_case("no-grad log-probs (first pass)", no_grad()[0], n, V, 1, 0, route="no-grad"),
        _row_case("training, dapo, bf16 (both passes)", training(dapo, torch.bfloat16)[0], n, V, 2, 2, route="training"),
    ]
    if full:
        kl = LossSpec(beta=0.04, epsilon_low=0.2, epsilon_high=0.28)
        first, second = training(dapo, torch.float16)
        cases += [
            _row_case("no-grad log-probs, logit softcap", no_grad(30.0)[0], n, V, 1, 0),
            _row_case("training, dapo + KL (beta 0.04), bf16", training(kl, torch.bfloat16, ref=True)[0], n, V, 2, 2),
            _row_case("training, dapo, fp16: pass 1", first, n, V, 1, 0),
            _row_case("training, dapo, fp16: pass 2 (scaled)", second, n, V, 1, 2),
        ]
    return cases


def logprob_cases(full: bool, dtype: torch.dtype = torch.bfloat16) -> list[Case]:
    from grpo_fast.kernels.config import KernelConfig
    from grpo_fast.kernels.launch import recording
    from grpo_fast.kernels.logprob_kernel import logprobs_triton

    H, V = HEAD_7B
    n = LOSS_TOKENS_ON_CHIP
    with recording() as launches:
        logprobs_triton(_meta(n, H, dtype=dtype), _meta(V, H, dtype=dtype),
                        _meta(n, dtype=torch.int64), None, 1.0, KernelConfig())
    launch = launches[0]
    args, _ = bound_arguments(launch)
    v_per_split, block_n = args["v_per_split"], args["BLOCK_N"]
    trips = (math.ceil(v_per_split / args["BLOCK_V"]), math.ceil(H / args["BLOCK_H"]))
    return [Case("logprob", "forward-only log-probs on chip (on_chip=True)", launch, False, "matmul", "logit",
                 block_n * v_per_split, trips, flops_per_program=2.0 * block_n * v_per_split * H, goal=0.8,
                 params=dict(tokens=n, H=H, V=V))]


# ----------------------------------------------------------------------------------------------
# the NF4 decode matmul (kernels/nf4_decode.py, on the repacked layout)
# ----------------------------------------------------------------------------------------------


LORA_RANK = 16  # the engine's LoRA cases: r16, B in the kernel's epilogue


def _nf4_decode_launch(members: tuple[int, ...], k: int, m: int, device, bias: bool = False, lora: bool = False,
                       dtype: torch.dtype = torch.bfloat16):
    """The launch kernels/nf4_decode._launch makes for x [m, k] of ``dtype`` and a repacked weight of
    Linears of ``members`` features each (together n), recorded on meta tensors with the device's SM count."""
    import dataclasses

    from grpo_fast.kernels.launch import recording
    from grpo_fast.kernels.nf4_decode import (MAX_CHUNK, ROW_ALIGN, ROW_TILE, DecodeNF4Weight, StreamSchedule,
                                              _launch, default_decode_config)

    n = sum(members)
    n_pad = -(-n // ROW_ALIGN) * ROW_ALIGN
    chunk = MAX_CHUNK  # bitsandbytes' default blocksize 64
    weight = DecodeNF4Weight(
        qweight=_meta(n_pad * k // 2, dtype=torch.uint8), scales=_meta(k // chunk, n_pad), levels=_meta(16),
        in_features=k, segments=(0, *itertools.accumulate(members)), chunk=chunk,
        bias=_meta(n) if bias else None, counters=_meta(4 * n_pad // ROW_TILE, dtype=torch.int32),
        tables={dtype: _meta(16, dtype=dtype)})
    cfg = default_decode_config(m, META, capability=divmod(device.capability, 10))
    cfg = dataclasses.replace(cfg, num_sms=device.sms)
    xa = _meta(m, len(members) * LORA_RANK, dtype=dtype) if lora else None
    lora_b = _meta(n_pad, LORA_RANK, dtype=dtype) if lora else None
    with recording() as launches:
        _launch(_meta(m, k, dtype=dtype), weight, xa, lora_b, cfg)
    (record,) = launches
    args, _ = bound_arguments(record)
    block_n, cpi, splits = args["BLOCK_N"], args["CPI"], args["SPLITS"]
    chunks_per_split = args["chunks_per_split"]
    # DRAM: the repacked weight (nibbles and fp32 scales of the padded rows), x, the output, the fp32
    # partials of split-K or of stream-K's shared tiles (written and read once), LoRA's x @ A.T and B
    traffic = n_pad * k * (0.5 + 4 / chunk) + m * k * 2 + m * n * 2
    path = "wgmma" if device.capability == 90 and cfg.num_warps >= 4 else "mma.sync"  # Triton's choice for the dot
    if args["STREAM"]:
        # stream-K: the busiest program's units over the most tiles a program touches (the loop over
        # tiles: its prologue, epilogue and the reduction of the pieces, unrolled, run once per tile)
        sched = StreamSchedule.of(args["n_tiles"], k // chunk // cpi, record.grid[0])
        traffic += 2 * 4 * sched.partial_pieces * m * block_n * record.grid[2]
        trips = (sched.max_tiles, sched.max_units / sched.max_tiles)
        weights_per_program = block_n * sched.max_units * cpi * chunk
        path += f", {cfg.num_warps} warps, BLOCK_N {block_n}, stream-K"
        later = None
    else:
        if splits > 1:
            traffic += 2 * 4 * splits * m * n_pad
        trips = (chunks_per_split // cpi,)
        weights_per_program = block_n * chunks_per_split * chunk
        path += f", {cfg.num_warps} warps, BLOCK_N {block_n}"
        # the split-K reduction: the program of a tile that takes the last ticket loads its partials
        # REDUCE_GROUP at a time, a loop of ceil(SPLITS / REDUCE_GROUP) trips (where it is a loop: with
        # one trip it is straight-line code). That program's SM is the launch's slowest: charged the
        # reducer's trips, not an average over the tile's programs
        later = float(-(-splits // args["REDUCE_GROUP"])) if splits > 1 else None
    if lora:
        traffic += m * len(members) * LORA_RANK * 2 + n_pad * LORA_RANK * 2
    plan = dict(path=path, splits=splits, block_n=block_n, programs=record.grid[0] if args["STREAM"] else 0,
                block_mx=cfg.block_mx, chunks_per_split=chunks_per_split, lora_rank=LORA_RANK if lora else 0,
                bias=bias)
    return record, plan, traffic, trips, weights_per_program, later


def nf4_cases(full: bool, device, dtype: torch.dtype = torch.bfloat16) -> list[Case]:
    """Each 7B Linear alone (the goal shapes: no bias, no LoRA), and the engine's grouped launches
    (q/k/v with their biases, gate/up) with LoRA r16 in the epilogue."""
    # the launches the decode step makes (benchmarks.nf4.DECODE_STEP: grpo_fast/nf4.py groups shared-input
    # siblings): q/k/v and gate/up grouped with their LoRA, o_proj (q_proj's shape) and down_proj; k_proj /
    # v_proj run alone only where their siblings cannot be grouped (e.g. a LoRA variant peft's plain path lacks)
    shapes = {name: ((n,), k, False, False) for name, (n, k, _) in QWEN_7B_SHAPES.items()}
    shapes.update({name: (members, k, bias, True) for name, (members, k, bias) in QWEN_7B_GROUPED.items()})
    assert set(DECODE_STEP) <= set(shapes), DECODE_STEP
    cases = []
    for name, (members, k, bias, lora) in shapes.items():
        n = sum(members)
        for m in ROWS_FULL if full else ROWS_QUICK:
            launch, plan, traffic, trips, weights_per_program, later = _nf4_decode_launch(
                members, k, m, device, bias, lora, dtype)
            cases.append(Case(
                "nf4", f"{name} {n}x{k}, {m} rows", launch, True, "bandwidth", "weight", weights_per_program, trips,
                kernel_bytes=traffic, useful_bytes=n * k / 2, goal=0.6 if m <= 16 else 0.5,  # issue 15's goals
                later_trips=later,
                params=dict(shape=name, N=n, K=k, rows=m, decode_step=name in DECODE_STEP, **plan)))
    return cases


def nf4_dequant_cases(full: bool, device, dtype: torch.dtype = torch.bfloat16) -> list[Case]:
    """The training path's dequantisation (nf4_single_copy: kernels/nf4_dequant.py): a whole 7B Linear
    from the repacked layout into bf16, as grpo_fast.nf4_train makes it for cuBLAS (a weight of at most
    its 64 MiB tile in one launch: q/o and k/v whole, gate/up and down in blocks of features)."""
    from grpo_fast.kernels.launch import recording
    from grpo_fast.kernels.nf4_decode import MAX_CHUNK, ROW_ALIGN, ROW_TILE, DecodeNF4Weight
    from grpo_fast.kernels.nf4_dequant import _launch

    cases = []
    names = list(QWEN_7B_SHAPES) if full else list(QWEN_7B_SHAPES)[:1]
    for name in names:
        n, k, _ = QWEN_7B_SHAPES[name]
        n_pad = -(-n // ROW_ALIGN) * ROW_ALIGN
        chunk = MAX_CHUNK
        rows = min(n, max(ROW_TILE, (64 * 2**20) // (k * 2) // ROW_TILE * ROW_TILE))  # one 64 MiB bf16 tile
        weight = DecodeNF4Weight(
            qweight=_meta(n_pad * k // 2, dtype=torch.uint8), scales=_meta(k // chunk, n_pad), levels=_meta(16),
            in_features=k, segments=(0, n), chunk=chunk, bias=None,
            counters=_meta(4 * n_pad // ROW_TILE, dtype=torch.int32), tables={torch.float32: _meta(16)})
        with recording() as launches:
            _launch(weight, (0, rows), (0, k), _meta(rows, k, dtype=dtype))
        (record,) = launches
        args, _ = bound_arguments(record)
        traffic = rows * k * (0.5 + 4 / chunk) + rows * k * 2  # nibbles and scales read, bf16 written
        cases.append(Case(
            "nf4_dequant", f"{name} {rows}x{k} -> {str(dtype).removeprefix('torch.')}", record, True, "bandwidth", "weight",
            args["BLOCK_R"] * args["BLOCK_C"] * chunk, (args["BLOCK_C"],), kernel_bytes=traffic, useful_bytes=traffic,
            params=dict(shape=name, N=rows, K=k)))
    return cases


# ----------------------------------------------------------------------------------------------
# decode attention (kernels/decode_attention.py)
# ----------------------------------------------------------------------------------------------

QWEN_7B_ATTENTION = (28, 4, 128)  # query heads, KV heads, head_dim
# (rows decoded, rows per group, prompt columns, completion columns, completion columns each row has
# written): a GRPO decode batch mid-completion, and a few long rows
ATTENTION_CASES = ((64, 8, 512, 1536, 512), (8, 8, 2048, 6144, 4096))


def attention_cases(full: bool, device, dtype: torch.dtype = torch.bfloat16) -> list[Case]:
    """A decode step's attention over the two-segment cache (bf16 unless ``dtype``): the useful bytes
    are each group's prompt keys and values once and each row's written completion columns (each
    read once per KV head), the ceiling their fraction of copy bandwidth. Rows of a group read their shared prompt
    from L2 after the first (neighbouring programs): the DRAM traffic assumes that locality."""
    from grpo_fast.kernels.decode_attention import _launch, attention_splits
    from grpo_fast.kernels.launch import recording

    heads, kv_heads, d = QWEN_7B_ATTENTION
    cases = []
    for rows, group, prompt, completion, written in ATTENTION_CASES:
        block = 64
        slots = rows // group
        splits = attention_splits(rows, kv_heads, prompt + completion, block, device.sms)
        cache = dict(dtype=dtype)
        with recording() as launches:
            _launch(_meta(rows, heads, d, **cache), _meta(rows, kv_heads, d, **cache),
                    _meta(rows, kv_heads, d, **cache),
                    _meta(slots, kv_heads, prompt, d, **cache), _meta(slots, kv_heads, prompt, d, **cache),
                    _meta(rows, kv_heads, completion, d, **cache), _meta(rows, kv_heads, completion, d, **cache),
                    _meta(rows, dtype=torch.int32), _meta(rows, dtype=torch.int32), _meta(rows, dtype=torch.int32),
                    _meta(rows * kv_heads, dtype=torch.int32), d ** -0.5, splits=splits)
        (record,) = launches
        args, _ = bound_arguments(record)
        per_split = math.ceil(math.ceil((prompt + written) / splits) / args["BLOCK_C"]) * args["BLOCK_C"]
        # two top-level loops per program: the prompt's columns, then the completion's (its own trips)
        spans = [(s * per_split, min((s + 1) * per_split, prompt + written)) for s in range(splits)]
        prompt_trips = sum(math.ceil(max(0, min(hi, prompt) - lo) / args["BLOCK_C"]) for lo, hi in spans) / splits
        completion_trips = sum(math.ceil(max(0, hi - max(lo, prompt)) / args["BLOCK_C"]) for lo, hi in spans) / splits
        cache_bytes = (slots * prompt + rows * written) * kv_heads * d * 2 * 2  # K and V, bf16: each prompt once
        traffic = cache_bytes + rows * heads * d * 2 * 2 + rows * kv_heads * d * 2 * 2 * 2  # + q, out, new K/V in and out
        if splits > 1:
            traffic += 2 * rows * kv_heads * splits * args["GQ_PAD"] * (d + 2) * 4
        cases.append(Case(
            "attention", f"{rows} rows in groups of {group}, {prompt}-token prompts, {written} of {completion} "
            "completion columns written", record, True, "bandwidth", "KV value",
            per_split * d * 2, (prompt_trips,), later_trips=completion_trips, kernel_bytes=traffic,
            useful_bytes=cache_bytes,
            params=dict(rows=rows, group=group, prompt=prompt, completion=completion, written=written, heads=heads,
                        kv_heads=kv_heads, head_dim=d, splits=splits, block_c=args["BLOCK_C"])))
    return cases


# ----------------------------------------------------------------------------------------------
# sampling (kernels/sampling.py): one pass over a decode step's logits
# ----------------------------------------------------------------------------------------------


def sampling_cases(full: bool, device) -> list[Case]:
    """A decode step's categorical draw (and greedy, --full) over fp32 logits of Qwen2.5-7B's vocabulary."""
    from grpo_fast.kernels.launch import recording
    from grpo_fast.kernels.sampling import sample_block, sample_fused, sample_splits

    rows, vocab = 64, HEAD_7B[1]
    cases = []
    for greedy in (False, True) if full else (False,):
        splits = sample_splits(rows, vocab, sample_block(), device.sms)
        with recording() as launches:
            # as the engine samples: each row at its own step, keyed by its output row
            sample_fused(_meta(rows, vocab), 1.0, _meta(1, dtype=torch.int64), False, greedy, 0, 0,
                         _meta(rows, dtype=torch.int32), splits=splits, rows=_meta(rows, dtype=torch.int64),
                         steps=_meta(rows, dtype=torch.int64))
        (record,) = launches
        args, _ = bound_arguments(record)
        per_split = args["v_per_split"]
        traffic = rows * vocab * 4
        cases.append(Case("sampling", f"{'greedy' if greedy else 'categorical draw'}, {rows} rows x {vocab} logits",
                          record, True, "bandwidth", "logit", per_split, (math.ceil(per_split / args["BLOCK_V"]),),
                          kernel_bytes=traffic, useful_bytes=traffic,
                          params=dict(rows=rows, V=vocab, greedy=greedy, splits=record.grid[1])))
    return cases


# "module:qualname" -> builder(full, device) returning its cases
CASE_BUILDERS: dict[str, Callable] = {
    "grpo_fast.kernels.grpo_kernel:_grpo_row_kernel": lambda full, device: row_cases(full),
    "grpo_fast.kernels.logprob_kernel:_logprob_fwd_kernel": lambda full, device: logprob_cases(full),
    "grpo_fast.kernels.nf4_decode:_nf4_decode_kernel": lambda full, device: nf4_cases(full, device),
    "grpo_fast.kernels.decode_attention:_decode_attention_kernel": lambda full, device: attention_cases(full, device),
    "grpo_fast.kernels.sampling:_sample_kernel": lambda full, device: sampling_cases(full, device),
    "grpo_fast.kernels.nf4_dequant:_nf4_dequant_kernel": lambda full, device: nf4_dequant_cases(full, device),
}
