"""The static kernel report: SASS parsing and the performance model on inputs worked out by hand
(fast), launch recording, and the report itself: every kernel compiled for sm_90a in a subprocess
(the CI check: no spills in a hot kernel, no kernel without a launch case, no failed compile)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.static import static_model as model
from benchmarks.static.kernel_report import check_failures
from benchmarks.static.kernel_report_render import markdown
from benchmarks.nf4 import QWEN_7B_SHAPES
from benchmarks.static.static_compile import CompiledKernel, parse_sass
from grpo_fast.kernels.launch import launch, recording

ROOT = Path(__file__).resolve().parent.parent
H200 = model.DEVICES["h200"]

# an outer loop (0x20-0x70) holding an inner one (0x30-0x50), a forward branch, and the trailing
# self-branch ptxas pads kernels with (not a loop: it never runs)
SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/              @!P0 BRA `(.L_x_0) ;
.L_x_1:
        /*0020*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
.L_x_2:
        /*0030*/                   FFMA R0, R4, R5, R0 ;
        /*0040*/                   MUFU.EX2 R6, R0 ;
        /*0050*/               @P1 BRA `(.L_x_2) ;
        /*0060*/                   IADD3 R2, R2, 0x10, RZ ;
        /*0070*/               @P2 BRA `(.L_x_1) ;
.L_x_0:
        /*0080*/                   EXIT ;
.L_x_3:
        /*0090*/                   BRA `(.L_x_3);
"""


def _kernel(num_warps=2) -> CompiledKernel:
    instructions, loops = parse_sass(SASS)
    return CompiledKernel("k", 90, num_warps, 3, 0, 32, 0, 0, 0, True, instructions, loops)


def test_parse_sass_finds_nested_loops():
    instructions, loops = parse_sass(SASS)
    assert [i.opcode for i in instructions] == ["MOV", "BRA", "LDG.E.128", "FFMA", "MUFU.EX2", "BRA", "IADD3", "BRA",
                                                 "EXIT", "BRA"]
    assert sorted((loop.start, loop.end, loop.instructions, loop.depth) for loop in loops) == [
        (0x20, 0x70, 6, 1), (0x30, 0x50, 3, 2)]
    assert [i.depth for i in instructions] == [0, 0, 1, 2, 2, 2, 1, 1, 0, 0]
    assert instructions[4].predicate == "" and instructions[5].predicate == "@P1"


def test_program_cost_weights_loops_by_their_trips():
    cost = model.program_cost(_kernel(num_warps=2), trips=(10, 4))
    # per warp: 4 instructions once, 3 in the outer loop x 10, 3 in the inner loop x 40; two warps
    assert cost.total == 2 * (4 + 3 * 10 + 3 * 40)
    assert cost.loop_total == 2 * 3 * 40 and cost.outer_total == cost.total - cost.loop_total
    assert cost.per_pipe["fma"] == 80 and cost.per_pipe["xu"] == 80 and cost.per_pipe["alu"] == 20
    # on Hopper with 4 warps on the SM: issue 308 / 4 = 77 clocks, but 80 MUFU at 16 lanes (2 clocks each) take 160
    assert cost.cycles(H200, warps=4) == 160 and cost.limiter(H200, warps=4) == "xu"
    # its own 2 warps alone: 2 of the 4 sub-partitions, half of each pipe
    assert cost.cycles(H200) == 320 and cost.limiter(H200) == "xu"
    assert cost.load_bytes_per_ldg == {}  # the 16-byte load is in the outer loop, not the innermost
    assert model.program_cost(_kernel(), trips=(10,)).modelled_depth == 1  # deeper loops: flagged


# a main loop (0x10-0x30), then a second top-level loop (0x50-0x60): a split-K reduction
SASS_TWO_LOOPS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_1:
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   FFMA R0, R4, R5, R0 ;
        /*0030*/               @P2 BRA `(.L_x_1) ;
        /*0040*/                   IADD3 R2, R2, 0x10, RZ ;
.L_x_2:
        /*0050*/                   FADD R0, R4, R0 ;
        /*0060*/               @P1 BRA `(.L_x_2) ;
        /*0070*/                   EXIT ;
"""


def test_program_cost_runs_later_top_level_loops_their_own_trips():
    instructions, loops = parse_sass(SASS_TWO_LOOPS)
    kernel = CompiledKernel("k", 90, 1, 3, 0, 32, 0, 0, 0, True, instructions, loops)
    plain = model.program_cost(kernel, trips=(10,))
    assert plain.total == 3 + 3 * 10 + 2 * 10 and plain.loop_total == 5 * 10  # both loops at the main trips
    later = model.program_cost(kernel, trips=(10,), later_trips=1.0)
    assert later.total == 3 + 3 * 10 + 2 * 1  # the reduction once per program
    assert later.loop_total == 3 * 10 and later.outer_total == 3 + 2  # and counted with the outer code
    assert later.load_bytes_per_ldg == {16: 1}


def test_blocks_per_sm_from_registers_shared_memory_and_warps():
    # 16 warps x 128 registers fill the register file; 144 KiB of shared memory leave room for one block
    assert model.blocks_per_sm(H200, 16, 128, 147456) == 1
    assert model.blocks_per_sm(model.DEVICES["rtx4090"], 16, 128, 147456) == 0  # more than 99 KiB per block
    # 52 registers round to 56 (whole 256-register warp allocations): 65536 // (56 * 32 * 8) = 4 blocks
    assert model.blocks_per_sm(H200, 8, 52, 0) == 4
    assert model.blocks_per_sm(H200, 4, 32, 0) == 16  # 64 warps per SM / 4


def test_bandwidth_ceiling_is_useful_bytes_over_the_slower_of_compute_and_memory():
    cost = model.program_cost(_kernel(num_warps=2), trips=(10, 4))  # 160 clocks per program
    copy = H200.copy_bytes_per_s
    programs = 2 * H200.sms  # two per SM, resident together (4 warps): 320 clocks
    t_compute = 320 / H200.clock_hz
    memory_bound = model.bandwidth_ceiling(H200, cost, programs, kernel_bytes=4 * t_compute * copy,
                                           useful_bytes=2 * t_compute * copy, extra_bytes=4 * t_compute * copy,
                                           resident=2)
    assert memory_bound["bound"] == "memory"
    assert memory_bound["fraction_of_copy"] == pytest.approx(2 / (4 + 4))
    compute_bound = model.bandwidth_ceiling(H200, cost, programs, kernel_bytes=t_compute * copy / 2,
                                            useful_bytes=t_compute * copy / 4, resident=2)
    assert compute_bound["bound"] == "compute" and compute_bound["fraction_of_copy"] == pytest.approx(0.25)


# 100 integer adds in a loop: issue-bound (100 / 4 per SM clock) with every sub-partition busy
SASS_ISSUE = """
.L_x_1:
        /*0000*/                   MOV R0, R1 ;
        /*0010*/               @P2 BRA `(.L_x_1) ;
        /*0020*/                   EXIT ;
"""


def test_one_two_warp_program_per_sm_issues_two_instructions_per_clock():
    instructions, loops = parse_sass(SASS_ISSUE)
    kernel = CompiledKernel("k", 90, 2, 3, 0, 32, 0, 0, 0, True, instructions, loops)
    cost = model.program_cost(kernel, trips=(50,))  # 2 warps x (2 x 50 + 1) = 202 warp-instructions
    assert cost.total == 202 and cost.num_warps == 2
    assert model.issue_rate(H200, 2) == 2 and model.issue_rate(H200, 6) == 4
    # alone on its SM, the program's 2 warps issue 2 per clock (a warp at most one), not the SM's 4
    assert cost.cycles(H200) == pytest.approx(202 / 2)
    assert cost.cycles(H200, warps=4) == pytest.approx(202 / 4)
    one_per_sm = model.bandwidth_ceiling(H200, cost, H200.sms, kernel_bytes=1.0, useful_bytes=1.0, resident=4)
    assert one_per_sm["warps_per_sm"] == 2 and one_per_sm["issue_per_clock"] == 2
    assert one_per_sm["t_compute_us"] == pytest.approx(202 / 2 / H200.clock_hz * 1e6)
    # two programs per SM resident together: 4 warps, 4 per clock, the same time for twice the work
    two_per_sm = model.bandwidth_ceiling(H200, cost, 2 * H200.sms, kernel_bytes=1.0, useful_bytes=1.0, resident=4)
    assert two_per_sm["issue_per_clock"] == 4 and two_per_sm["t_compute_us"] == pytest.approx(one_per_sm["t_compute_us"])
    # ... but one at a time (one block per SM fits): two waves at 2 per clock
    serial = model.bandwidth_ceiling(H200, cost, 2 * H200.sms, kernel_bytes=1.0, useful_bytes=1.0, resident=1)
    assert serial["t_compute_us"] == pytest.approx(2 * one_per_sm["t_compute_us"])
    # 5 programs per SM, 2 resident: waves of 2, 2, 1 -> (2 + 2) x 202 / 4 + 202 / 2
    assert model.sm_waves(H200, 5 * H200.sms, 2) == [2, 2, 1]
    assert model.sm_cycles(H200, cost, 5 * H200.sms, 2)["cycles"] == pytest.approx(4 * 202 / 4 + 202 / 2)


def test_matmul_ceiling_and_chunk_route():
    cost = model.program_cost(_kernel(num_warps=2), trips=(10, 4))
    # the inner loop's 240 warp-instructions (120 MUFU: 240 clocks) hide under 4096 tensor clocks;
    # the rest (68 warp-instructions at the 2 warps' 2 per clock: 34 clocks) does not with one block per SM
    flops = 4096 * H200.tensor_flops_per_clock
    one = model.matmul_ceiling(H200, cost, flops, resident=1)
    assert one["main_loop_cycles"] == 4096 and one["epilogue_cycles"] == pytest.approx(68 / 2)
    assert one["fraction_of_matmul"] == pytest.approx(4096 / (4096 + 34)) and one["issue_per_clock"] == 2
    assert model.matmul_ceiling(H200, cost, flops, resident=2)["fraction_of_matmul"] == pytest.approx(1.0)
    # a GEMM of 1 ms at the matmul rate, run at 95% of it, then 0.1 ms of row kernel
    flops_1ms = H200.matmul_tflops * 1e12 * 1e-3
    assert model.chunk_route(H200, flops_1ms, 1e-4, 0.95) == pytest.approx(1 / (1 / 0.95 + 0.1))


def test_launch_records_inside_recording_and_runs_outside():
    calls = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((grid, args, kwargs))

    kernel = Kernel()
    with recording() as launches:
        launch(kernel, (3, 2), 1, "a", num_warps=4)
        with pytest.raises(RuntimeError, match="already recording"):
            with recording():
                pass
    assert calls == [] and len(launches) == 1
    assert launches[0].grid == (3, 2) and launches[0].args == (1, "a") and launches[0].kwargs == {"num_warps": 4}
    launch(kernel, (5,), 7)
    assert calls == [((5,), (7,), {})]


def test_launchers_record_on_meta_tensors():
    from grpo_fast.kernels.config import KernelConfig
    from grpo_fast.kernels.grpo_kernel import _grpo_row_kernel, logprob_rows_triton

    meta = dict(device="meta")
    with recording() as launches:
        logprob_rows_triton(torch.empty(5, 3000, **meta), torch.empty(5, dtype=torch.int64, **meta),
                            torch.empty(5, **meta), torch.empty(5, **meta), temperature=0.7, logit_scale=1.0,
                            logit_softcap=None, cfg=KernelConfig())
    assert len(launches) == 1 and launches[0].grid == (5,)
    record = launches[0]
    assert record.kernel is _grpo_row_kernel and record.kwargs["TERMS"] is False and record.kwargs["PASS2"] is False
    assert record.kwargs["BLOCK_V"] == 4096  # the GPU configuration's 4096-wide tiles (3000 rounds up)
    assert any(isinstance(a, float) and a == 1 / 0.7 for a in record.args)  # 1 / temperature


def test_check_fails_on_hot_spills_failed_compiles_and_uncovered_kernels():
    clean = dict(hot_kernels_spilling=[], compile_failures=[], uncovered_kernels=[])
    assert check_failures(clean) == []
    problems = check_failures(dict(
        hot_kernels_spilling=[dict(kernel="_k", capability=90, cases=["c"])],
        compile_failures=[dict(kernel="m:_j", case="c", device="d", error="boom")], uncovered_kernels=["m:_new"]))
    assert len(problems) == 3 and "spills" in problems[0] and "boom" in problems[1] and "m:_new" in problems[2]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The default (H200) report, compiled in a process without the interpreter, with --check."""
    out = tmp_path_factory.mktemp("static")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.static.kernel_report", "--check", "--out-dir", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    payload = json.loads((out / "kernel-report-quick.json").read_text()) if done.returncode in (0, 1) else None
    return done, payload, out


def test_calibration_sets_every_h100_measurement_beside_the_model_with_what_it_leaves_out():
    """Each measurement (from the committed H100 file: 612 TFLOP/s, 15.4 ms, ~470 TFLOP/s, 8.7 ms) beside the
    model's figure for its code path; times turned into fractions with the useful FLOPs worked out here."""
    from benchmarks.static.kernel_report import _calibration

    h100 = model.DEVICES["h100"].name
    routes = [dict(route="training", device=h100, fraction_by_gemm_fraction={"0.90": 0.78, "0.95": 0.82, "1.00": 0.85})]
    rows = [dict(group="logprob", device=h100, ceiling=0.89)]
    found = _calibration(["h100"], rows, routes)
    assert not _calibration(["h200"], rows, routes)  # no measurement on an H200
    flops_4096 = 4096 * 3584 * 152064  # N·H·V at Qwen2.5-7B's head
    expected = [(0.82, 612 / 748), (0.82, 4 * flops_4096 / 15.4e-3 / 748e12), (0.89, 470 / 748),
                (0.89, 2 * flops_4096 / 8.7e-3 / 748e12)]
    assert [c["model"] for c in found] == [m for m, _ in expected]
    assert [c["measured"] for c in found] == pytest.approx([m for _, m in expected])
    assert found[1]["measured"] == pytest.approx(0.775, abs=5e-4)  # 580 TFLOP/s
    assert found[3]["measured"] == pytest.approx(0.686, abs=5e-4)  # 513 TFLOP/s
    assert found[0]["model_range"] == [0.78, 0.85] and found[2]["model_range"] is None
    assert all(c["left_out"] and "nvidia-h100-80gb-hbm3" in c["source"] for c in found)
    payload = dict(env={}, seconds=0, devices={}, cases=[], routes=[], hot_kernels_spilling=[], variants=[],
                   uncovered_kernels=[], compile_failures=[], loss_chunk_tokens=768, calibration=found)
    text = markdown(payload)
    assert "| what the model leaves out |" in text
    assert "| 82% (GEMM at 0.90-1.00: 78%-85%) | 82% |" in text and "| 89% | 63% |" in text and "| 89% | 69% |" in text


def test_report_compiles_every_kernel_without_hot_spills(report):
    done, payload, out = report
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (out / "kernel-report-quick.md").read_text().startswith("# Static kernel report")
    # discovery found the project's kernels, and each has compiled cases
    for name in ("grpo_kernel:_grpo_row_kernel", "logprob_kernel:_logprob_fwd_kernel", "nf4_decode:_nf4_decode_kernel",
                 "decode_attention:_decode_attention_kernel", "sampling:_sample_kernel"):
        assert any(k.endswith(name) for k in payload["kernels"])
        assert any(c["kernel"] == name.split(":")[1] for c in payload["cases"])
    assert payload["uncovered_kernels"] == [] and payload["compile_failures"] == []
    assert not any(v["spills"] for v in payload["variants"] if v["hot"])
    # compiled for sm_90a: the tensor-core kernel uses wgmma, which only sm_90a has
    on_chip = next(v for v in payload["variants"] if v["kernel"] == "_logprob_fwd_kernel")
    assert on_chip["capability"] == 90 and on_chip["features"]["wgmma"] > 0 and on_chip["registers"] > 0


def test_report_figures_follow_from_the_compiled_loops(report):
    _, payload, _ = report
    nf4 = {(c["params"]["shape"], c["params"]["rows"]) for c in payload["cases"] if c["group"] == "nf4"}
    assert {(shape, rows) for shape in QWEN_7B_SHAPES for rows in (1, 16, 64)} <= nf4
    row = next(c for c in payload["cases"] if c["params"].get("route") == "no-grad")
    variant = payload["variants"][row["variant"]]
    loop = max(variant["loops"], key=lambda l: l["depth"])
    # the first pass is one loop over the vocabulary: its SASS, once per tile per warp, per logit
    expected = loop["instructions"] * variant["num_warps"] * row["trips"][0] / row["params"]["V"]
    assert row["loop_warp_instructions_per_unit"] == pytest.approx(expected)
    assert row["trips"] == [math.ceil(row["params"]["V"] / 4096)]
    for case in payload["cases"]:
        assert 0 < case["ceiling"] <= 1.0
    # the goal table judges the NF4 goals over every Linear alone and over the decode step's launches
    step = {c["params"]["shape"] for c in payload["cases"] if c["group"] == "nf4" and c["params"]["decode_step"]}
    assert step == {"qkv (grouped) + LoRA", "q_proj,o_proj", "gate_up (grouped) + LoRA", "down_proj"}
    goals = [line for line in markdown(payload).splitlines() if line.startswith("| NF4 decode matmul")]
    assert len(goals) == 4 and sum("every launch of the decode step" in line for line in goals) == 2
    route = next(r for r in payload["routes"] if r["route"] == "no-grad")
    assert 0.5 < route["fraction_by_gemm_fraction"]["0.95"] < route["fraction_by_gemm_fraction"]["1.00"] <= 1.0
