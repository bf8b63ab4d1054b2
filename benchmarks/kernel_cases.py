"""What the static kernel report compiles: every Triton kernel of the project, found in its modules,
and the launches (goal shapes, launch options) each kernel is compiled and modelled at.

Kernels are discovered, not listed: every module of grpo_fast and grpo_fast.kernels whose source
has `@triton.jit` is imported and each JIT function defined there that calls `tl.program_id` is a
kernel (the others are helpers inlined into kernels). A kernel without a case here is reported as
not covered (and `--check` fails), so a new kernel cannot leave the report silently: add a
builder to CASE_BUILDERS.

Launches come from the launchers themselves wherever they go through kernels.launch.launch: the
launcher is called on meta tensors of the goal shape inside `recording()`, so the report compiles
exactly the arguments, constexprs and options production passes. The NF4 matmul's launcher
(kernels/nf4_matmul._launch) calls its kernel directly, so its case rebuilds the launch by the same
rules (`_nf4_launch`); switching that launcher to `launch` would let the case record it instead.

Goal shapes: Qwen2.5-7B's lm_head (H=3584, V=152064) in chunks of the default budget (768 tokens
for the triton backend) and its block Linears (benchmarks/nf4.py's shapes, plus q/k/v and gate/up
grouped into one weight as a grouped launch would read them) at 1-64 rows.
"""

from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from .nf4 import QWEN_7B_SHAPES
from .static_compile import bound_arguments

HEAD_7B = (3584, 152064)  # Qwen2.5-7B's lm_head (H, V), as benchmarks/loss.py's HEADS
GROUPED_7B_SHAPES = {"qkv (grouped)": (3584 + 2 * 512, 3584), "gate_up (grouped)": (2 * 18944, 3584)}
ROWS_FULL = (1, 2, 4, 8, 16, 32, 64)
ROWS_QUICK = (1, 16, 64)
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
        for path in sorted(Path(package.__file__).parent.glob("*.py")):
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


def logprob_cases(full: bool) -> list[Case]:
    from grpo_fast.kernels.config import KernelConfig
    from grpo_fast.kernels.launch import recording
    from grpo_fast.kernels.logprob_kernel import logprobs_triton

    H, V = HEAD_7B
    n = LOSS_TOKENS_ON_CHIP
    with recording() as launches:
        logprobs_triton(_meta(n, H, dtype=torch.bfloat16), _meta(V, H, dtype=torch.bfloat16),
                        _meta(n, dtype=torch.int64), None, 1.0, KernelConfig())
    launch = launches[0]
    args, _ = bound_arguments(launch)
    v_per_split, block_n = args["v_per_split"], args["BLOCK_N"]
    trips = (math.ceil(v_per_split / args["BLOCK_V"]), math.ceil(H / args["BLOCK_H"]))
    return [Case("logprob", "forward-only log-probs on chip (on_chip=True)", launch, False, "matmul", "logit",
                 block_n * v_per_split, trips, flops_per_program=2.0 * block_n * v_per_split * H, goal=0.8,
                 params=dict(tokens=n, H=H, V=V))]


# ----------------------------------------------------------------------------------------------
# the NF4 decode matmul
# ----------------------------------------------------------------------------------------------


def _nf4_launch(n: int, k: int, m: int, sms: int, blocksize: int = 64):
    """The launch kernels/nf4_matmul._launch makes for bf16 x [m, k] and a double-quantised NF4 weight
    [n, k] on a GPU with `sms` SMs (its rules, restated: that launcher does not go through launch())."""
    from grpo_fast.kernels.launch import Launch
    from grpo_fast.kernels.nf4_matmul import NF4MatmulConfig, _nf4_matmul_kernel
    import triton
    import triton.language as tl

    cfg = NF4MatmulConfig()
    use_dot = m > cfg.gemv_max_rows
    block_m = min(cfg.max_block_m, max(16 if use_dot else 1, triton.next_power_of_2(m)))
    block_n = cfg.dot_block_n if use_dot else cfg.gemv_block_n
    block_k = min(cfg.block_k, blocksize)
    m_tiles, n_tiles = triton.cdiv(m, block_m), triton.cdiv(n, block_n)
    k_tiles = k // block_k
    want = triton.cdiv(cfg.programs_per_sm * sms, m_tiles * n_tiles)
    splits = max(1, min(want, k_tiles, max(1, k // (8 * min(m, block_m)))))
    k_per_split = triton.cdiv(k_tiles, splits) * block_k
    splits = triton.cdiv(k, k_per_split)
    blocks = n * k // blocksize
    absmax = _meta(blocks, dtype=torch.uint8)
    target = _meta(splits, m, n) if splits > 1 else _meta(1, m, n, dtype=torch.bfloat16)
    args = (_meta(m, k, dtype=torch.bfloat16), k, 1, _meta(n * k // 2, dtype=torch.uint8), absmax, _meta(256),
            _meta(math.ceil(blocks / 256)), _meta(1), _meta(16), absmax, target, m * n, n, 1, m, n, k, k_per_split, 256)
    kwargs = dict(BLOCKSIZE=blocksize, HAS_BIAS=False, NESTED=True, SPLIT=splits > 1, USE_DOT=use_dot, UPCAST=False,
                  IEEE_FP32=False, W_DTYPE=tl.bfloat16, BF16_BY_BITS=False, BLOCK_M=block_m, BLOCK_N=block_n,
                  BLOCK_K=block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return Launch(_nf4_matmul_kernel, (n_tiles, splits, m_tiles), args, kwargs), dict(
        splits=splits, k_per_split=k_per_split, block_n=block_n, block_k=block_k, path="tl.dot" if use_dot else "FMA")


def nf4_cases(full: bool, sms: int) -> list[Case]:
    shapes = {name: (n, k) for name, (n, k, _) in QWEN_7B_SHAPES.items()}
    shapes.update(GROUPED_7B_SHAPES)
    cases = []
    for name, (n, k) in shapes.items():
        for m in ROWS_FULL if full else ROWS_QUICK:
            launch, plan = _nf4_launch(n, k, m, sms)
            splits = plan["splits"]
            weight_bytes = n * k / 2 + n * k / 64 + 4 * math.ceil(n * k / 64 / 256)  # packed, absmax, nested absmax
            out_bytes = splits * m * n * 4 if splits > 1 else m * n * 2
            # split: target.sum(0) reads the partials and writes fp32; out.copy_ reads it and writes bf16
            extra = (splits * m * n * 4 + m * n * 4 + m * n * 4 + m * n * 2) if splits > 1 else 0.0
            cases.append(Case(
                "nf4", f"{name} {n}x{k}, {m} rows", launch, True, "bandwidth", "weight",
                plan["block_n"] * plan["k_per_split"], (plan["k_per_split"] // plan["block_k"],),
                kernel_bytes=weight_bytes + m * k * 2 + out_bytes, useful_bytes=n * k / 2, extra_bytes=extra,
                extra_kernels=2 if splits > 1 else 0, goal=0.6 if m <= 16 else 0.5,  # issue 15's goals
                params=dict(shape=name, N=n, K=k, rows=m, **plan)))
    return cases


# "module:qualname" -> builder(full, device) returning its cases
CASE_BUILDERS: dict[str, Callable] = {
    "grpo_fast.kernels.grpo_kernel:_grpo_row_kernel": lambda full, device: row_cases(full),
    "grpo_fast.kernels.logprob_kernel:_logprob_fwd_kernel": lambda full, device: logprob_cases(full),
    "grpo_fast.kernels.nf4_matmul:_nf4_matmul_kernel": lambda full, device: nf4_cases(full, device.sms),
}
