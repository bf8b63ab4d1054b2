"""Support matrix: every kernel launch of grpo-fast compiled offline for each GPU architecture the
package supports, under several Triton versions, with whether it compiles (or the error's first
line), whether it fits the architecture (shared memory, registers, threads per block), its
registers and spill bytes. No GPU needed.

    PYTHONPATH=$PWD python -m benchmarks.static.support_matrix \\
        --pythons /tmp/tri33/bin/python,/tmp/tri36/bin/python,/tmp/tri39/bin/python

Each interpreter in ``--pythons`` has torch and one Triton version installed; the script runs itself
under each (``--worker``), one after the other, and merges what they compiled into
benchmarks/results/static/support-matrix.{json,md}. The launches are the static report's
(benchmarks/static/kernel_cases.py: the launchers recorded on meta tensors at Qwen2.5-7B's shapes, each
architecture's SM count), in bf16 and in fp16: the row kernel's every variant, the on-chip
log-prob kernel, NF4 decode at 1, 4, 16 and 64 rows for each 7B Linear alone and grouped with LoRA
(split-K and stream-K as the planner picks them), decode attention and sampling. sm_75 (T4) has
no bf16: its bf16 launches are not made (recorded as not launched). tests/test_support_matrix.py
holds pyproject's floors and kernels/config.py's rule to the committed matrix.
"""

from __future__ import annotations

import os

# The kernels are compiled, not interpreted: the switch is read when their modules are imported.
if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns without it (the default: on)

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OUT_DIR = ROOT / "benchmarks" / "results" / "static"
NAME = "support-matrix"


@dataclass(frozen=True)
class Arch:
    """What the launch planners and the fit check need of a GPU (the builders read .capability, .sms)."""

    name: str  # ptxas' name
    capability: int
    gpu: str  # the GPU whose SM count the launches are planned for
    sms: int
    max_shared_bytes: int  # dynamic shared memory one block may opt into (Triton's launch check)
    bf16: bool


# Shared memory per block: CUDA Programming Guide, "Technical Specifications per Compute
# Capability" (227, 163, 99, 99 and 64 KiB); SM counts: the GPUs' datasheets.
ARCHS = (
    Arch("sm_90a", 90, "H100 SXM", 132, 227 * 1024, True),
    Arch("sm_80", 80, "A100", 108, 163 * 1024, True),
    Arch("sm_86", 86, "RTX 3090", 82, 99 * 1024, True),
    Arch("sm_89", 89, "RTX 4090", 128, 99 * 1024, True),
    Arch("sm_75", 75, "T4", 40, 64 * 1024, False),
)
REGISTERS_PER_BLOCK = 65536  # every architecture above
THREADS_PER_BLOCK = 1024


def _half_dtype(launch) -> str:
    """The launch's 16-bit float dtype ("bf16", "fp16"), or "fp32" where it takes none."""
    import torch

    from .static_compile import bound_arguments

    values, _ = bound_arguments(launch)
    dtypes = {v.dtype for v in values.values() if isinstance(v, torch.Tensor)}
    return "bf16" if torch.bfloat16 in dtypes else "fp16" if torch.float16 in dtypes else "fp32"


def matrix_cases(arch: Arch) -> list:
    """(kernel id, Case) of every launch the matrix compiles for ``arch``: both 16-bit dtypes."""
    import torch

    from . import kernel_cases as kc

    halves = (torch.bfloat16, torch.float16)
    builders = {
        # full: the row kernel's every pass (bf16, fp16, no-grad, softcap, KL) and greedy sampling
        "grpo_fast.kernels.grpo_kernel:_grpo_row_kernel": lambda: kc.row_cases(True),
        "grpo_fast.kernels.logprob_kernel:_logprob_fwd_kernel": lambda: [
            c for d in halves for c in kc.logprob_cases(False, d)],
        "grpo_fast.kernels.nf4_decode:_nf4_decode_kernel": lambda: [
            c for d in halves for c in kc.nf4_cases(False, arch, d)],
        "grpo_fast.kernels.decode_attention:_decode_attention_kernel": lambda: [
            c for d in halves for c in kc.attention_cases(False, arch, d)],
        "grpo_fast.kernels.sampling:_sample_kernel": lambda: kc.sampling_cases(True, arch),
        "grpo_fast.kernels.nf4_dequant:_nf4_dequant_kernel": lambda: [
            c for d in halves for c in kc.nf4_dequant_cases(False, arch, d)],
    }
    # a kernel the static report covers and the matrix does not would leave the matrix silently
    if set(builders) != set(kc.CASE_BUILDERS):
        raise RuntimeError(f"support matrix: kernels {sorted(set(kc.CASE_BUILDERS) ^ set(builders))} "
                           "are in the static report's CASE_BUILDERS but not here, or the other way round")
    return [(kid, case) for kid, build in builders.items() for case in build()]


def _variant(case) -> str:
    """How the launch is planned (NF4 decode: the dot's path, warps, split-K or stream-K, LoRA)."""
    p = case.params
    if "path" in p:
        parts = [p["path"]] + ([f"split-K {p['splits']}"] if p["splits"] > 1 else [])
        return ", ".join(parts + (["bias"] if p["bias"] else []) + ([f"LoRA r{p['lora_rank']}"] if p["lora_rank"] else []))
    return ""


def _fit(compiled: dict, arch: Arch) -> str:
    """'' where the compiled kernel can be launched on ``arch``, else why not."""
    threads = compiled["num_warps"] * 32
    if compiled["shared_bytes"] > arch.max_shared_bytes:
        return f"shared memory {compiled['shared_bytes']} B > {arch.max_shared_bytes} B per block"
    if compiled["registers"] * threads > REGISTERS_PER_BLOCK:
        return f"{compiled['registers']} registers x {threads} threads > {REGISTERS_PER_BLOCK} per block"
    if threads > THREADS_PER_BLOCK:
        return f"{threads} threads > {THREADS_PER_BLOCK} per block"
    return ""


def _compile_isolated(launch, capability: int):
    """compile_launch's figures in a forked child, or the failure's first line: older Tritons abort
    the process on some kernels (an LLVM assertion), which must not end the run."""
    from .static_compile import compile_launch

    read, write = os.pipe()
    with tempfile.TemporaryFile("w+") as stderr:
        pid = os.fork()
        if pid == 0:  # the child: report through the pipe, never return
            os.close(read)
            os.dup2(stderr.fileno(), 2)
            try:
                c = compile_launch(launch, capability)
                result = dict(registers=c.registers, spill_store_bytes=c.spill_store_bytes,
                              spill_load_bytes=c.spill_load_bytes, local_memory_instructions=c.local_memory_instructions,
                              shared_bytes=c.shared_bytes, num_warps=c.num_warps, num_stages=c.num_stages)
            except Exception as error:  # noqa: BLE001 - a failed compile is what the matrix records
                lines = [line.strip() for line in str(error).splitlines() if line.strip()]
                result = f"{type(error).__name__}: {lines[0] if lines else ''}"
            with os.fdopen(write, "w") as pipe:
                json.dump(result, pipe)
            os._exit(0)
        os.close(write)
        with os.fdopen(read) as pipe:
            text = pipe.read()
        _, status = os.waitpid(pid, 0)
        if text:
            result = json.loads(text)
            return result[:300] if isinstance(result, str) else result
        stderr.seek(0)
        lines = [line.strip() for line in stderr.read().splitlines() if line.strip()]
        first = next((line for line in lines if "Assertion" in line or "Error" in line), lines[-1] if lines else "")
        return f"crashed ({os.waitstatus_to_exitcode(status)}): {first}"[:300]


def compile_all(archs=ARCHS) -> dict:
    """This interpreter's Triton: {"triton": version, "torch": ..., "cells": [...]} (one per launch and arch)."""
    import torch
    import triton

    from .static_compile import specialization_key

    began = time.perf_counter()
    cells, by_key = [], {}
    for arch in archs:
        for kid, case in matrix_cases(arch):
            dtype = _half_dtype(case.launch)
            cell = dict(kernel=kid.split(":")[1], case=case.name, dtype=dtype, arch=arch.name,
                        variant=_variant(case))
            if dtype == "bf16" and not arch.bf16:
                cells.append(dict(cell, status="not launched", reason=f"no bf16 on {arch.name}"))
                continue
            key = specialization_key(case.launch, arch.capability)
            if key not in by_key:
                by_key[key] = _compile_isolated(case.launch, arch.capability)
            compiled = by_key[key]
            if isinstance(compiled, str):
                cells.append(dict(cell, status="compile error", reason=compiled))
                continue
            misfit = _fit(compiled, arch)
            cells.append(dict(cell, status="does not fit" if misfit else "ok", reason=misfit, **compiled))
        print(f"triton {triton.__version__}, {arch.name}: {len(by_key)} compiles, "
              f"{time.perf_counter() - began:.0f} s", file=sys.stderr, flush=True)
    return dict(triton=triton.__version__, torch=torch.__version__, python=sys.version.split()[0],
                distinct_compiles=len(by_key), seconds=round(time.perf_counter() - began, 1), cells=cells)


def _run_worker(python: str, out: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    done = subprocess.run([python, "-m", "benchmarks.static.support_matrix", "--worker", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"--pythons {python}: the worker failed ({done.returncode}): {done.stderr.strip()[-3000:]}")
    return json.loads(out.read_text())


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("+")[0].split(".")[:3] if part.isdigit())


def summarize(runs: list[dict]) -> dict:
    """Per Triton version: whether every launch that is made compiles and fits on every arch."""
    summary = {}
    for run in runs:
        made = [c for c in run["cells"] if c["status"] != "not launched"]
        failing = sorted({(c["kernel"], c["arch"], c["dtype"], c["status"]) for c in made if c["status"] != "ok"})
        spilling = sorted({(c["kernel"], c["arch"], c["dtype"], c["case"], c["spill_store_bytes"] or 0)
                           for c in made if c["status"] == "ok" and (c["spill_store_bytes"] or c["local_memory_instructions"])})
        summary[run["triton"]] = dict(every_launch_compiles=not any(c["status"] == "compile error" for c in made),
                                      failing=[list(f) for f in failing], spilling=[list(s) for s in spilling])
    return summary


# Triton version (major.minor) -> the oldest PyTorch whose CUDA wheels pin it
TORCH_FOR_TRITON = {"3.3": "2.7"}

# The dependency floors pyproject.toml states, and how each was established (tests/test_support_matrix.py
# holds pyproject to "floor" and the Triton / torch ones to the matrix).
FLOORS = {
    "triton": dict(floor="3.3", evidence=(
        "the oldest Triton in the matrix under which every launch kernels/config.py allows compiles and "
        "fits (3.3.1 does not compile the tensor-core kernels for sm_75, so there the rule needs Triton 3.6: "
        "MIN_TRITON_FOR_CAPABILITY); under 3.0.0 and 3.2.0 "
        "the NF4 decode kernel (kernels/nf4_decode.py, the `words` tuple given to a jitted helper) does not "
        "compile: ptxas is never reached, an LLVM assertion (ArrayRef 'Invalid index') aborts the process "
        "(sm_80, q_proj 1 row; the row, log-prob, attention and sampling kernels compile under 3.2.0)")),
    "torch": dict(floor="2.7", evidence=(
        "the first PyTorch whose CUDA wheels pair with Triton 3.3 (torch 2.7 pins triton 3.3); with "
        "torch 2.4-2.6 (Triton 3.0-3.2) NF4 decoding cannot compile")),
    "transformers": dict(floor="5.13", evidence=(
        "grpo_fast/engine.py subclasses cache_utils.CacheLayerMixin without get_max_cache_shape, which is "
        "abstract up to 5.12 (4.56.2, 4.57.6, 5.0.0: TypeError, can't instantiate _SlotLayer); 5.13.0 "
        "passes tests/test_engine.py and tests/test_trainer_e2e.py (CPU, floor venv)")),
    "accelerate": dict(floor="1.1", evidence=(
        "transformers 5.13 requires accelerate >= 1.1.0 for device_map (1.0.0: ValueError); 1.1.0 passes "
        "the floor venv's tests")),
    "peft": dict(floor="0.13", evidence=(
        "LoraConfig / get_peft_model / PeftModel only; peft 0.13.0 passes tests/test_trainer_e2e.py's "
        "LoRA runs with transformers 5.13.0")),
    "bitsandbytes": dict(floor="0.46.1", evidence=(
        "transformers 5.13 requires bitsandbytes >= 0.46.1 for 4-bit loading (0.46.0: ImportError); "
        "0.45.0 does not import with Triton >= 3.2 (triton.ops), 0.45.1 has no CPU NF4; 0.46.1 passes "
        "tests/test_trainer_e2e.py -k 4bit and tests/test_engine.py -k nf4 on CPU. Not established: the "
        "8-bit optimizer (test_8bit_optimizer_updates_lora) fails on CPU with 0.46.1 and 0.47.0")),
}


def _cell_text(cell: dict) -> str:
    if cell["status"] == "ok":
        spill = cell.get("spill_store_bytes") or 0
        return f"{cell['registers']} regs" + (f", **spills {spill} B**" if spill else "")
    if cell["status"] == "not launched":
        return "not launched"
    return f"**{cell['status']}**: {cell['reason']}"


def markdown(payload: dict) -> str:
    """The matrix: a table per Triton version (launch x arch), then the failures, spills and floors."""
    archs = [a["name"] for a in payload["archs"]]
    lines = ["# Support matrix: every kernel launch compiled offline", "",
             "Generated by `" + payload["command"] + "` (benchmarks/static/support_matrix.py; see its docstring; each "
             "--pythons entry a venv with torch and one Triton version) on " + payload.get("date_utc", "?")
             + " from commit `" + payload.get("commit", "?")[:12] + "`, on a CPU (nothing ran on a GPU). "
             "Each cell: registers per thread and spill bytes, or why the launch cannot run there "
             "(compile error, shared memory / registers beyond the architecture's per-block limit), or "
             "'not launched' (bf16 on sm_75). GPUs planned for: "
             + ", ".join(f"{a['name']} ({a['gpu']}, {a['sms']} SMs)" for a in payload["archs"]) + ".", ""]
    lines += ["## Summary", "", "| Triton | torch (worker) | every launch compiles | failing (kernel, arch, dtype) | spilling |",
              "|---|---|---|---|---|"]
    for run in payload["runs"]:
        summary = payload["summary"][run["triton"]]
        failing = "; ".join(f"{k} {a} {d}: {s}" for k, a, d, s in summary["failing"]) or "none"
        spilling = "; ".join(f"{k} {a} {d} ({c}): {b} B" for k, a, d, c, b in summary["spilling"]) or "none"
        lines.append(f"| {run['triton']} | {run['torch']} | {'yes' if summary['every_launch_compiles'] else 'no'} "
                     f"| {failing} | {spilling} |")
    lines += ["", "## Dependency floors (pyproject.toml)", "", "| package | floor | how it was established |",
              "|---|---|---|"]
    lines += [f"| {name} | >= {f['floor']} | {f['evidence']} |" for name, f in payload["floors"].items()]
    for run in payload["runs"]:
        lines += ["", f"## Triton {run['triton']}", "", "| kernel | launch | dtype | plan | " + " | ".join(archs) + " |",
                  "|---|---|---|---|" + "---|" * len(archs)]
        rows: dict = {}
        for cell in run["cells"]:
            rows.setdefault((cell["kernel"], cell["case"], cell["dtype"]), {})[cell["arch"]] = cell
        for (kernel, case, dtype), by_arch in rows.items():
            plan = next((c["variant"] for c in by_arch.values() if c["variant"]), "")
            lines.append(f"| {kernel} | {case} | {dtype} | {plan} | "
                         + " | ".join(_cell_text(by_arch[a]) if a in by_arch else "" for a in archs) + " |")
    return "\n".join(lines) + "\n"


def _head_commit() -> str:
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.static.support_matrix", description=__doc__.split("\n")[0])
    p.add_argument("--pythons", default=sys.executable,
                   help="comma-separated interpreters, each with torch and one Triton version (default: this one)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # compile under this interpreter, write JSON
    p.add_argument("--out-dir", default=str(OUT_DIR))
    p.add_argument("--merge", default=None, help="comma-separated --worker outputs to merge instead of running workers")
    p.add_argument("--commit", default=None, help="the commit the workers compiled (default: this checkout's HEAD)")
    args = p.parse_args(argv)
    if args.worker:
        Path(args.worker).write_text(json.dumps(compile_all(), indent=1))
        return 0
    runs = [json.loads(Path(part).read_text()) for part in args.merge.split(",")] if args.merge else []
    with tempfile.TemporaryDirectory() as folder:
        for index, python in enumerate([] if args.merge else args.pythons.split(",")):
            run = _run_worker(python.strip(), Path(folder) / f"{index}.json")
            print(f"triton {run['triton']}: {run['distinct_compiles']} compiles in {run['seconds']} s", flush=True)
            runs.append(run)
    runs.sort(key=lambda r: _version_key(r["triton"]))
    payload = dict(
        benchmark="support_matrix", command="PYTHONPATH=$PWD python -m benchmarks.static.support_matrix --pythons "
        "/tmp/tri33/bin/python,/tmp/tri36/bin/python,/tmp/tri39/bin/python",
        date_utc=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), commit=args.commit or _head_commit(),
        archs=[vars(a) for a in ARCHS], triton_versions=[r["triton"] for r in runs],
        summary=summarize(runs), floors=FLOORS, runs=runs)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{NAME}.json").write_text(json.dumps(payload, indent=1) + "\n")
    (out / f"{NAME}.md").write_text(markdown(payload))
    print(f"wrote {out / NAME}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
