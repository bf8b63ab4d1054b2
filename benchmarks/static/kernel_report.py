"""Static kernel report: every Triton kernel of grpo-fast compiled offline for GPUs (no GPU needed),
with its registers, spills, shared memory, occupancy, hardware paths, SASS instruction counts per
weight or logit, and the ceilings those counts imply (estimates, see benchmarks/static/static_model.py).

    python -m benchmarks.static.kernel_report              # H200 (sm_90a), the goal shapes in brief (~20 s)
    python -m benchmarks.static.kernel_report --full       # + A100 (sm_80), RTX 4090 (sm_89), every variant and row count
    python -m benchmarks.static.kernel_report --check      # exit 1 on a spilling hot kernel, a failed compile or an uncovered kernel
    python -m benchmarks.static.kernel_report --sass-dir /tmp/sass   # also write each variant's SASS

Writes `<name>.json` (environment, device assumptions, every figure) and `<name>.md` into
benchmarks/results/static/ (`--out-dir`). Kernels and their launches: benchmarks/static/kernel_cases.py;
compilation and SASS reading: benchmarks/static/static_compile.py; the model: benchmarks/static/static_model.py.
The GPU suite (`python -m benchmarks.suite`) measures what these ceilings bound.
"""

from __future__ import annotations

import os

# A run of the report compiles the kernels, so they must not be interpreted: the switch is read when
# their modules are imported. Imported as a library (the tests' parsers), the process is left alone:
# kernels defined later in a process that interprets would no longer be callable from interpreted ones.
if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional  # noqa: E402

import torch  # noqa: E402

from .. import common  # noqa: E402
from . import static_model as model  # noqa: E402
from .kernel_cases import CASE_BUILDERS, discover_kernels, kernel_id, loss_chunk_tokens, HEAD_7B  # noqa: E402
from .kernel_report_render import markdown  # noqa: E402
from .static_compile import compile_launch, specialization_key  # noqa: E402

OUT_DIR = common.RESULTS_DIR / "static"
GEMM_FRACTIONS = (0.90, 0.95, 1.00)  # the fp32-result chunk GEMM's rate / the bf16 matmul rate (assumed range)
# Every GPU measurement the project has, held against the model's figure for the same device and code
# path: (device key, figure: "route:<pass>" or a case group, its label, the measured fraction of the matmul
# rate, where it comes from, what the model leaves out that explains the difference). The H100 file's
# times without a TFLOP/s figure are turned into one here, with its useful FLOPs and its 748 TFLOP/s matmul.
H100_RESULTS = "benchmarks/results/nvidia-h100-80gb-hbm3/2026-11-23-first-loss-measurements.md"
_H100_MATMUL = 748e12
_HV = HEAD_7B[0] * HEAD_7B[1]
_OLD_CODE = ("measured on earlier code (an ad-hoc harness; chunks of bf16 logits, half the bytes of today's fp32 "
             "chunk, a bf16 d_hidden)")
CALIBRATION = (
    ("h100", "route:training", "loss fwd+bwd, 16,384 tokens: cuBLAS chunks + row kernel", 612 / 748,
     f"612 of 748 TFLOP/s ({H100_RESULTS})",
     f"agrees at the assumed GEMM rate (0.95 of the matmul rate), but {_OLD_CODE}: the model of that code, with less "
     "traffic in the row pass, would sit higher. Left out: the GEMMs' real rate with an fp32 result (the 0.90-1.00 "
     "range), launch gaps between a chunk's GEMMs and its row pass (they run one after the other), and the row pass "
     "below its modelled copy bandwidth"),
    ("h100", "route:training", "loss fwd+bwd, 4,096 tokens: cuBLAS chunks + row kernel",
     4 * 4096 * _HV / 15.4e-3 / _H100_MATMUL,
     f"15.4 ms ({H100_RESULTS}): 4·N·H·V / 15.4 ms / 748 TFLOP/s",
     f"{_OLD_CODE}. The model is one full chunk in steady state; at 4,096 tokens a pass is five full chunks and a "
     "partial one, so the partial chunk's smaller GEMM and each call's fixed costs (launches, allocation, the "
     "loss's reductions), left out, weigh four times as much as at 16,384"),
    ("h100", "logprob", "no-grad log-probs, 16,384 tokens: the on-chip kernel", 470 / 748,
     f"~470 of 748 TFLOP/s ({H100_RESULTS}); 470-515 of 750 in kernels/config.py",
     "the model charges the epilogue's instructions (not overlapped: one block per SM) but not its latency: the "
     "spills' local-memory round trips (564 / 532 B per thread under Triton 3.9; 296 B under the measured 3.6), a "
     "warp's wait on its previous result in the online log-sum-exp (max, exp2, sum) with few warps per scheduler, "
     "the wgmma pipeline refilling at each vocabulary tile, and the last partial wave of programs; it also assumes "
     "the main loop runs at cuBLAS's efficiency, which a Triton loop alone on its SM need not reach"),
    ("h100", "logprob", "no-grad log-probs, 4,096 tokens: the on-chip kernel", 2 * 4096 * _HV / 8.7e-3 / _H100_MATMUL,
     f"8.7 ms ({H100_RESULTS}): 2·N·H·V / 8.7 ms / 748 TFLOP/s",
     "as at 16,384 tokens (epilogue latency, spills, pipeline refills); closer to the model here, plausibly because "
     "the hidden states of 4,096 tokens stay in L2 across the vocabulary slices (L2 is not modelled)"),
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.static.kernel_report", description=__doc__.split("\n")[0])
    p.add_argument("--full", action="store_true", help="every device, variant and row count (default: H200, goal shapes)")
    p.add_argument("--devices", type=common.comma_list, default=None, help=f"from {', '.join(model.DEVICES)}")
    p.add_argument("--check", action="store_true", help="exit 1 on spills in a hot kernel, a failed compile or an uncovered kernel")
    p.add_argument("--out-dir", default=str(OUT_DIR))
    p.add_argument("--name", default=None, help="file stem (default kernel-report, or kernel-report-quick without --full)")
    p.add_argument("--sass-dir", default=None, help="also write each compiled variant's SASS here")
    p.add_argument("--commit", default=None, help="commit to record where the checkout has no .git")
    args = p.parse_args(argv)
    args.devices = args.devices or (list(model.DEVICES) if args.full else ["h200"])
    for name in args.devices:
        if name not in model.DEVICES:
            p.error(f"--devices: expected names from {', '.join(model.DEVICES)}, got {name!r}")
    args.name = args.name or ("kernel-report" if args.full else "kernel-report-quick")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def _tool_versions() -> dict:
    from .static_compile import _ptxas_path, _run

    versions = {}
    for capability in (80, 90):
        text = _run(_ptxas_path(capability), "--version")
        versions[f"ptxas for sm_{capability}"] = text.strip().splitlines()[-1]
    return versions


def _variant_row(compiled, device, sass_dir: Optional[Path], key: str) -> dict:
    """The compiled kernel's resources and code features (per variant, independent of the case's shape)."""
    deepest = max((i.depth for i in compiled.instructions), default=0)
    loop_ops = Counter(i.opcode for i in compiled.instructions if deepest and i.depth == deepest)
    row = dict(
        kernel=compiled.name, capability=compiled.capability, num_warps=compiled.num_warps,
        num_stages=compiled.num_stages, registers=compiled.registers, stack_bytes=compiled.stack_bytes,
        spill_store_bytes=compiled.spill_store_bytes, spill_load_bytes=compiled.spill_load_bytes,
        ptxas_rerun_matches=compiled.ptxas_rerun_matches, local_memory_instructions=compiled.local_memory_instructions,
        spills=compiled.spills, shared_bytes=compiled.shared_bytes, blocks_per_sm=model.occupancy(device, compiled),
        sass_instructions=len(compiled.instructions), features=compiled.features(),
        loops=[dict(start=hex(l.start), end=hex(l.end), instructions=l.instructions, depth=l.depth) for l in compiled.loops],
        innermost_loop_opcodes=dict(loop_ops.most_common(16)), compile_seconds=round(compiled.compile_seconds, 2))
    if sass_dir is not None:
        sass_dir.mkdir(parents=True, exist_ok=True)
        path = sass_dir / f"{compiled.name}-sm{compiled.capability}-{hashlib.sha1(key.encode()).hexdigest()[:8]}.sass"
        path.write_text("\n".join(f"/*{i.address:04x}*/ {'  ' * i.depth}{i.predicate} {i.opcode} {i.operands};"
                                  for i in compiled.instructions))
        row["sass_file"] = str(path)
    return row


def _case_row(case, compiled, device) -> dict:
    cost = model.program_cost(compiled, case.trips, case.later_trips)
    resident = model.occupancy(device, compiled)
    row = dict(group=case.group, case=case.name, kernel=case.kernel, device=device.name, hot=case.hot, kind=case.kind,
               params=case.params, programs=case.programs, unit=case.unit, trips=list(case.trips),
               later_trips=case.later_trips,
               warp_instructions_per_unit=cost.total / case.units_per_program,
               loop_warp_instructions_per_unit=cost.loop_total / case.units_per_program,
               per_pipe_per_unit={k: v / case.units_per_program for k, v in sorted(cost.per_pipe.items())},
               limiter=cost.limiter(device), loop_load_widths=cost.load_bytes_per_ldg,
               trips_cover_loops=cost.modelled_depth >= cost.kernel_depth, goal=case.goal)
    if resident == 0:  # one block needs more shared memory / registers than an SM has: the launch fails
        row.update(ceiling=None, note="does not fit on one SM: the launch fails on this device")
    elif case.kind == "bandwidth":
        ceiling = model.bandwidth_ceiling(device, cost, case.programs, case.kernel_bytes, case.useful_bytes,
                                          case.extra_bytes, resident=resident)
        row.update(ceiling, extra_kernels=case.extra_kernels, kernel_bytes=case.kernel_bytes,
                   useful_bytes=case.useful_bytes, ceiling=ceiling["fraction_of_copy"])
    else:
        ceiling = model.matmul_ceiling(device, cost, case.flops_per_program, resident)
        row.update(ceiling, ceiling=ceiling["fraction_of_matmul"])
    row["met"] = model.goal_met(row["ceiling"], case.goal)
    return row


def _routes(rows: list[dict], device) -> list[dict]:
    """The loss chunk as cuBLAS GEMM(s) with an fp32 result plus the row kernel (item: forward-only
    log-probs >= 80% of the matmul rate; the training pass's figure beside it)."""
    H, V = HEAD_7B
    routes = []
    for route, gemms, goal in (("no-grad", 1, 0.8), ("training", 2, None)):
        row = next((r for r in rows if r["group"] == "rows" and r["params"].get("route") == route
                    and r["device"] == device.name and r.get("t_total_us") is not None), None)
        if row is None:
            continue
        n = row["params"]["tokens"]
        flops = 2.0 * gemms * n * H * V
        t_rows = row["t_total_us"] * 1e-6
        fractions = {f"{g:.2f}": model.chunk_route(device, flops, t_rows, g) for g in GEMM_FRACTIONS}
        routes.append(dict(route=route, device=device.name, tokens=n, gemms=gemms, flops=flops, t_rows_us=t_rows * 1e6,
                           t_matmul_us=flops / (device.matmul_tflops * 1e12) * 1e6, row_kernel_spills=row["spills"],
                           fraction_by_gemm_fraction=fractions, goal=goal,
                           met=model.goal_met(fractions[f"{0.95:.2f}"], goal)))
    return routes


def run(args) -> dict:
    began = time.perf_counter()
    kernels = discover_kernels()
    uncovered = sorted(set(kernels) - set(CASE_BUILDERS))
    compiled_by_key: dict = {}
    variants, rows, failures = {}, [], []
    sass_dir = Path(args.sass_dir) if args.sass_dir else None
    for device_key in args.devices:
        device = model.DEVICES[device_key]
        for kid in sorted(set(kernels) & set(CASE_BUILDERS)):
            for case in CASE_BUILDERS[kid](args.full, device):
                key = specialization_key(case.launch, device.capability)
                if key not in compiled_by_key:
                    try:
                        compiled_by_key[key] = compile_launch(case.launch, device.capability)
                    except Exception as error:  # noqa: BLE001 - a failed compile is a finding of the report
                        compiled_by_key[key] = error
                compiled = compiled_by_key[key]
                if isinstance(compiled, Exception):
                    failures.append(dict(kernel=kid, case=case.name, device=device.name, error=str(compiled)[:2000]))
                    continue
                variant = variants.setdefault(key, _variant_row(compiled, device, sass_dir, key))
                variant.setdefault("hot", False)
                variant["hot"] = variant["hot"] or case.hot
                variant.setdefault("cases", []).append(case.name)
                row = _case_row(case, compiled, device)
                row["spills"] = compiled.spills
                row["variant"] = list(variants).index(key)
                rows.append(row)
    routes = [r for key in args.devices for r in _routes(rows, model.DEVICES[key])]
    calibration = _calibration(args.devices, rows, routes)
    hot_spills = [v for v in variants.values() if v["hot"] and v["spills"]]
    env = common.env_info(torch.device("cpu"), [str(Path(__file__)), *args.argv])
    if args.commit:
        env["git_commit"] = args.commit
    env.update(_tool_versions())
    return dict(
        benchmark="kernel_report", env=env, full=args.full, seconds=round(time.perf_counter() - began, 1),
        devices={k: vars(model.DEVICES[k]) for k in args.devices}, loss_chunk_tokens=loss_chunk_tokens(),
        gemm_fractions=list(GEMM_FRACTIONS), kernels=sorted(kernels), uncovered_kernels=uncovered,
        compile_failures=failures, hot_kernels_spilling=[dict(kernel=v["kernel"], capability=v["capability"],
                                                              cases=v["cases"]) for v in hot_spills],
        variants=list(variants.values()), cases=rows, routes=routes, calibration=calibration)


def _calibration(devices: list[str], rows: list[dict], routes: list[dict]) -> list[dict]:
    """The model's figure beside each CALIBRATION measurement on a device the report modelled (for a
    chunk route also its range over the assumed GEMM rates)."""
    found = []
    for key, what, label, measured, source, left_out in CALIBRATION:
        if key not in devices:
            continue
        name = model.DEVICES[key].name
        model_range = None
        if what.startswith("route:"):
            route = next((r for r in routes if r["device"] == name and r["route"] == what.split(":")[1]), None)
            figure = None if route is None else route["fraction_by_gemm_fraction"]["0.95"]
            if route is not None:
                fractions = route["fraction_by_gemm_fraction"]
                model_range = [fractions[f"{g:.2f}"] for g in (GEMM_FRACTIONS[0], GEMM_FRACTIONS[-1])]
        else:
            figure = next((r["ceiling"] for r in rows if r["device"] == name and r["group"] == what), None)
        found.append(dict(device=name, what=what, label=label, model=figure, model_range=model_range,
                          measured=measured, source=source, left_out=left_out))
    return found


def check_failures(payload: dict) -> list[str]:
    """What `--check` fails on: spills in a hot kernel, failed compiles, kernels without cases."""
    problems = [f"hot kernel {v['kernel']} (sm_{v['capability']}, {', '.join(v['cases'][:3])}) spills"
                for v in payload["hot_kernels_spilling"]]
    problems += [f"compile failed: {f['kernel']} ({f['case']}, {f['device']}): {f['error'][:300]}"
                 for f in payload["compile_failures"]]
    problems += [f"kernel {k} has no launch case in benchmarks/static/kernel_cases.py (CASE_BUILDERS)"
                 for k in payload["uncovered_kernels"]]
    return problems


def main(argv=None) -> int:
    args = parse_args(argv)
    payload = run(args)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{args.name}.json").write_text(json.dumps(payload, indent=1, default=str))
    (out_dir / f"{args.name}.md").write_text(markdown(payload))
    print(f"wrote {out_dir / args.name}.json and .md ({payload['seconds']} s)")
    problems = check_failures(payload)
    for problem in problems:
        print("CHECK:", problem)
    return 1 if (args.check and problems) else 0


if __name__ == "__main__":
    raise SystemExit(main())
