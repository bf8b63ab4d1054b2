"""The row kernel writes d_logits over the row it reads (kernels/grpo_kernel.py): in bf16 / fp16 a
tile's stores land on fp32 columns other warps read in the same tile, so every warp's loads must be
ordered before any warp's stores. No interpreter can see a missing order; the compiled code can.

The kernel is compiled offline (sm_90a and sm_80, the launcher's own arguments at Qwen2.5-7B's head,
recorded on meta tensors) in a subprocess (this one runs the interpreter), and its SASS is read: in
every loop that stores, walking back from each store (through the back edge into the previous trip),
a BAR.SYNC must come before any global load. A load between the barrier and the store could be a
read of bytes another warp is already overwriting.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.static.static_compile import parse_sass

ROOT = Path(__file__).resolve().parent.parent

CAPABILITIES = (90, 80)
GRAD_DTYPES = ("bfloat16", "float16", "float32")


def unordered_stores(instructions, loops) -> list[str]:
    """The stores inside loops that some global load reaches with no barrier in between, walking back
    from the store within its loop (a trip's first instructions follow the previous trip's last)."""
    found = []
    for loop in loops:
        body = [i for i in instructions if loop.start <= i.address <= loop.end]
        for index, inst in enumerate(body):
            if inst.base != "STG":
                continue
            for earlier in reversed(body[index + 1:] + body[:index]):
                if earlier.opcode.startswith("BAR.SYNC"):
                    break
                if earlier.base == "LDG":
                    found.append(f"{inst.address:#x} {inst.opcode} after {earlier.address:#x} {earlier.opcode}")
                    break
    return found


def pass2_launches(grad_dtype):
    """The launches of one training chunk's row pass whose PASS2 writes d_logits: the launcher
    (kernels.chunked._rows_triton) called on meta tensors at the 7B head with the default config."""
    import torch

    from benchmarks.static.kernel_cases import HEAD_7B, loss_chunk_tokens
    from grpo_fast.kernels.chunked import _rows_triton
    from grpo_fast.kernels.config import KernelConfig
    from grpo_fast.kernels.launch import recording
    from grpo_fast.kernels.token_math import LossSpec, TokenInputs

    n, V = loss_chunk_tokens(), HEAD_7B[1]

    def meta(*shape, dtype=torch.float32):
        return torch.empty(*shape, device="meta", dtype=dtype)

    inputs = TokenInputs(targets=meta(n, dtype=torch.int64), token_weight=meta(n), advantages=meta(n),
                         seq_index=meta(n, dtype=torch.int64), num_sequences=8, old_logps=meta(n), num_tokens=n)
    out = {k: meta(n) for k in ("logp", "entropy", "loss", "low", "high", "kl")}
    with recording() as launches:
        _rows_triton(meta(n, V), inputs, LossSpec(epsilon_low=0.2, epsilon_high=0.28), None, 0, out, KernelConfig(),
                     getattr(torch, grad_dtype))
    return [launch for launch in launches if launch.kwargs["PASS2"]]


def _compile_and_report() -> dict:
    """{"<dtype> sm_<cap>": {"unordered": [...], "storing_loops": [[opcodes]...], "stores_outside_loops": [...]}}
    (run as this file's __main__, without the interpreter)."""
    from benchmarks.static.static_compile import compile_launch

    report = {}
    for grad_dtype in GRAD_DTYPES:
        (launch,) = pass2_launches(grad_dtype)
        for capability in CAPABILITIES:
            kernel = compile_launch(launch, capability)
            storing = [[i.opcode for i in kernel.instructions if loop.start <= i.address <= loop.end]
                       for loop in kernel.loops
                       if any(i.base == "STG" for i in kernel.instructions if loop.start <= i.address <= loop.end)]
            report[f"{grad_dtype} sm_{capability}"] = {
                "unordered": unordered_stores(kernel.instructions, kernel.loops),
                "storing_loops": storing,
                "stores_outside_loops": sorted({i.opcode for i in kernel.instructions
                                                if i.base == "STG" and not i.depth}),
            }
    return report


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    done = subprocess.run([sys.executable, str(Path(__file__).resolve())], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# what ptxas made of the unfenced pass 2 (sm_90a, bf16): the loads, the conversion, the stores
RACY = """
.L_x_2:
        /*1ff0*/               @!P3 LDG.E.128 R24, desc[UR16][R4.64] ;
        /*2140*/               @!P2 LDG.E.128 R4, desc[UR16][R32.64] ;
        /*2e50*/                    F2FP.BF16.F32.PACK_AB R8, R7, R8 ;
        /*30e0*/               @!P3 STG.E.128 desc[UR16][R6.64], R8 ;
        /*3110*/               @!P2 STG.E.128 desc[UR16][R4.64+0x1000], R12 ;
        /*3120*/                @!P0 BRA `(.L_x_2) ;
        /*3130*/                    EXIT ;
"""


def test_checker_flags_a_store_after_an_unfenced_load_and_passes_a_fenced_one():
    assert len(unordered_stores(*parse_sass(RACY))) == 2
    barrier = "/*2150*/                    BAR.SYNC.DEFER_BLOCKING 0x0 ;\n        /*2e50*/"
    fenced = RACY.replace("/*2e50*/", barrier)
    assert unordered_stores(*parse_sass(fenced)) == []
    # the barrier must separate this trip's loads from its stores: one before the loads does not
    early = RACY.replace(".L_x_2:\n", ".L_x_2:\n        /*1fe0*/                    BAR.SYNC.DEFER_BLOCKING 0x0 ;\n")
    assert len(unordered_stores(*parse_sass(early))) == 2
    # a load after the stores is the next trip's: it reaches them through the back edge
    late = RACY.replace("/*3120*/", "/*3118*/               @!P2 LDG.E.128 R4, desc[UR16][R32.64] ;\n        /*3120*/")
    fenced_late = late.replace("/*2e50*/", barrier)
    assert unordered_stores(*parse_sass(fenced_late)) == []
    assert len(unordered_stores(*parse_sass(late))) == 2
    # a rotated loop (stores first, this trip's loads at its end): the walk wraps into the previous trip
    rotated = """
.L_x_3:
        /*0100*/                    STG.E.128 desc[UR16][R6.64], R8 ;
        /*0110*/                    LDG.E.128 R8, desc[UR16][R4.64] ;
        /*0120*/                @!P0 BRA `(.L_x_3) ;
"""
    assert len(unordered_stores(*parse_sass(rotated))) == 1
    fenced_rotated = rotated.replace("/*0120*/", "/*0118*/                    BAR.SYNC 0x0 ;\n        /*0120*/")
    assert unordered_stores(*parse_sass(fenced_rotated)) == []


@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES)
def test_each_row_stores_within_its_own_bytes(grad_dtype):
    """The other half of the argument: a program writes only its own row's bytes (d_logits row r is
    the start of fp32 row r), so only the warps of one program can meet, and the barrier orders them."""
    (launch,) = pass2_launches(grad_dtype)
    logits, stride_row, d_logits, stride_drow = launch.args[:4]
    V = logits.shape[1]
    assert logits.dtype.itemsize == 4 and logits.stride(1) == 1 and d_logits.stride(1) == 1
    assert stride_drow * d_logits.dtype.itemsize == stride_row * logits.dtype.itemsize
    assert V * d_logits.dtype.itemsize <= stride_row * logits.dtype.itemsize


@pytest.mark.parametrize("capability", CAPABILITIES)
@pytest.mark.parametrize("grad_dtype", GRAD_DTYPES)
def test_every_warp_reads_a_tile_before_any_warp_overwrites_it(compiled, grad_dtype, capability):
    found = compiled[f"{grad_dtype} sm_{capability}"]
    # the d_logits tile is stored in a loop that also reads the row (else there is nothing to check)
    assert found["storing_loops"], "no loop stores: the pass-2 loop was not found"
    assert all(any(op.startswith("LDG") for op in loop) for loop in found["storing_loops"])
    # outside loops only the per-token 4-byte results are stored (no peeled d_logits tile escapes the check)
    assert set(found["stores_outside_loops"]) <= {"STG.E"}
    assert found["unordered"] == [], f"d_logits stores with no barrier after the row's loads: {found['unordered']}"


if __name__ == "__main__":
    print(json.dumps(_compile_and_report()))
