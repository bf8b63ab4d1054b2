"""Markdown of the static kernel report (benchmarks/static/kernel_report.py's JSON payload)."""

from __future__ import annotations

import itertools
from typing import Optional


def _pct(value: Optional[float]) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def _num(value, spec: str = ".2f") -> str:
    return "–" if value is None else format(value, spec)


def _met(value: Optional[bool]) -> str:
    return {True: "met", False: "short", None: "–"}[value]


def _issue(case: dict) -> str:
    warps = case.get("warps_per_sm")
    return "–" if warps is None else f"{warps} ({case['issue_per_clock']})"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _goals(payload: dict) -> list[str]:
    lines = ["## Goals (issue 15), by these estimates", ""]
    rows = []
    for device in payload["devices"].values():
        nf4 = [c for c in payload["cases"] if c["group"] == "nf4" and c["device"] == device["name"]]
        decode_step = {c["params"]["shape"] for c in nf4 if c["params"].get("decode_step")}
        for (label, select), (which, launched) in itertools.product(
                (("NF4 decode matmul >= 60% of copy bandwidth, 1-16 rows", lambda r: r <= 16),
                 ("NF4 decode matmul >= 50% of copy bandwidth at 64 rows", lambda r: r == 64)),
                (("every 7B Linear alone", lambda params: "grouped" not in params["shape"]),
                 ("every launch of the decode step (" + ", ".join(sorted(decode_step)) + ")",
                  lambda params: params.get("decode_step", False)))):
            chosen = [c for c in nf4 if select(c["params"]["rows"]) and launched(c["params"])]
            if not chosen:
                continue
            label = f"{label}, {which}"
            worst = min(chosen, key=lambda c: (c["ceiling"] or 0.0) / c["goal"])
            best = max(c["ceiling"] or 0.0 for c in chosen)
            rows.append([label, device["name"], f"{_pct(worst['ceiling'])} at {worst['case']} (best {_pct(best)})",
                         _met(all(c["met"] for c in chosen))])
    for route in payload["routes"]:
        if route["goal"] is None:
            continue
        fractions = route["fraction_by_gemm_fraction"]
        rows.append([f"forward-only log-probs >= {_pct(route['goal'])} of the matmul rate: cuBLAS chunk + first pass",
                     route["device"], f"{_pct(fractions['0.95'])} (GEMM at 0.90-1.00 of the matmul rate: "
                     f"{_pct(fractions['0.90'])}-{_pct(fractions['1.00'])})", _met(route["met"])])
    measured = next((c for c in payload.get("calibration", []) if c["what"] == "logprob"), None)
    for case in payload["cases"]:
        if case["group"] == "logprob":
            note = f"; measured {_pct(measured['measured'])} on an H100, see the calibration" if measured else ""
            rows.append([f"forward-only log-probs >= {_pct(case['goal'])} of the matmul rate: on-chip kernel (opt-in)",
                         case["device"], _pct(case["ceiling"]) + note, _met(case["met"])])
    spilling = payload["hot_kernels_spilling"]
    rows.append(["no spills in a hot kernel", "all", "none" if not spilling else
                 "; ".join(f"{s['kernel']} sm_{s['capability']}" for s in spilling), _met(not spilling)])
    return lines + _table(["goal", "device", "ceiling (estimate)", "by the estimate"], rows) + [""]


def _calibration(payload: dict) -> list[str]:
    rows = []
    for c in payload["calibration"]:
        span = c.get("model_range")
        model = _pct(c["model"]) + (f" (GEMM at 0.90-1.00: {_pct(span[0])}-{_pct(span[1])})" if span else "")
        rows.append([c["device"], c["label"], model, _pct(c["measured"]), c["source"], c.get("left_out") or "–"])
    if not rows:
        return []
    return ["## The model against measurements (calibration)", "",
            "Every GPU measurement the project has, beside this model's figure for that device and code path, with "
            "what the model leaves out that explains the difference. A ceiling far above the measurement means the "
            "code is limited by what the model leaves out: read such a kernel's ceiling as an upper bound only; an "
            "estimate without a row here has not been checked on a GPU.", ""] + _table(
        ["device", "figure", "model (estimate)", "measured", "measurement", "what the model leaves out"], rows) + [""]


def _variants(payload: dict) -> list[str]:
    lines = ["## Compiled variants", "",
             "One row per distinct compiled kernel (constexprs and specialisation); `blocks/SM` from registers, "
             "shared memory and warps; the loop's global loads by width (bytes x count per warp per iteration).", ""]
    rows = []
    for index, v in enumerate(payload["variants"]):
        f = v["features"]
        paths = ", ".join(name for name, key in (("wgmma", "wgmma"), ("mma.sync", "mma_sync"), ("TMA", "tma"),
                                                 ("cp.async", "async_copy")) if f[key]) or "CUDA cores"
        spills = (f"{v['spill_store_bytes']} / {v['spill_load_bytes']} B" if v["spill_store_bytes"] is not None
                  else f"{v['local_memory_instructions']} STL/LDL")
        case = v["cases"][0] + (f" (+{len(v['cases']) - 1})" if len(v["cases"]) > 1 else "")
        rows.append([str(index), v["kernel"], f"sm_{v['capability']}", case, "yes" if v["hot"] else "no",
                     str(v["num_warps"]), str(v["num_stages"]), str(v["registers"]), spills, str(v["stack_bytes"]),
                     f"{v['shared_bytes'] / 1024:.1f}", str(v["blocks_per_sm"]), paths,
                     str(sum(l["instructions"] for l in v["loops"] if l["depth"] == max(x["depth"] for x in v["loops"])))
                     if v["loops"] else "0"])
    return lines + _table(["#", "kernel", "arch", "first case", "hot", "warps", "stages", "regs", "spills st/ld",
                           "stack B", "smem KiB", "blocks/SM", "paths", "innermost loop SASS"], rows) + [""]


def _nf4(payload: dict) -> list[str]:
    lines = []
    for device in payload["devices"].values():
        cases = [c for c in payload["cases"] if c["group"] == "nf4" and c["device"] == device["name"]]
        if not cases:
            continue
        lines += [f"## NF4 decode matmul on {device['name']} (estimates)", "",
                  "kernels/nf4_decode.py on the repacked layout. Per case: the launch plan (tensor-core path, warps "
                  "and features per program; programs; K splits, reduced in the kernel), warp-instructions per "
                  "weight (the K loop / the whole program), the warps the busiest SM holds at once and the "
                  "warp-instructions it can issue per clock (min(4, warps)), the pipe that bounds compute, times at the model's rates "
                  "(kernel compute, kernel memory: repacked weight and scales, x, output, split-K partials, LoRA) and "
                  "the ceiling: packed weight bytes (N*K/2) / copy bandwidth over that time (benchmarks/nf4.py's "
                  "\"of copy\"). The single Linears are the goal shapes; the grouped launches are the engine's.", ""]
        rows = []
        for c in cases:
            p = c["params"]
            widths = ", ".join(f"{w}Bx{n}" for w, n in sorted(c["loop_load_widths"].items())) or "–"
            rows.append([p["shape"], str(p["rows"]), p["path"], str(c["programs"]), str(p["splits"]),
                         _num(c["loop_warp_instructions_per_unit"], ".3f"), _num(c["warp_instructions_per_unit"], ".3f"),
                         _issue(c), c["limiter"], widths, _num(c.get("t_compute_us")), _num(c.get("t_memory_us")),
                         _num(c.get("t_extra_us")),
                         _pct(c["ceiling"]), _pct(c["goal"]), _met(c["met"])])
        lines += _table(["shape", "rows", "path", "programs", "splits", "loop instr/weight", "instr/weight",
                         "warps/SM (issue/clk)", "limiter",
                         "loop loads", "compute µs", "memory µs", "reduction µs", "ceiling", "goal", ""], rows) + [""]
    return lines


def _decode_others(payload: dict) -> list[str]:
    """Decode attention and sampling: fraction of copy bandwidth of the bytes they must read."""
    lines = []
    for device in payload["devices"].values():
        cases = [c for c in payload["cases"] if c["group"] in ("attention", "sampling") and c["device"] == device["name"]]
        if not cases:
            continue
        lines += [f"## Decode attention and sampling on {device['name']} (estimates)", "",
                  "Decode attention (kernels/decode_attention.py, Qwen2.5-7B's 28 query / 4 KV heads of 128, bf16 "
                  "cache in two segments): the useful bytes are the keys and values of each group's prompt, once, and of "
                  "each row's written completion columns (the rows of a group read their shared prompt from L2 after "
                  "the first: the modelled DRAM traffic assumes that locality); sampling "
                  "(kernels/sampling.py): the fp32 logits, read once. Ceiling: those bytes / copy bandwidth over the "
                  "modelled time.", ""]
        rows = [[c["group"], c["case"], str(c["programs"]), str(c["params"].get("splits", "–")),
                 _num(c["loop_warp_instructions_per_unit"], ".3f"), c["unit"], _issue(c), c["limiter"],
                 _num(c.get("t_compute_us")),
                 _num(c.get("t_memory_us")), _pct(c["ceiling"])] for c in cases]
        lines += _table(["kernel", "case", "programs", "splits", "loop instr/unit", "unit", "warps/SM (issue/clk)",
                         "limiter", "compute µs",
                         "memory µs", "ceiling"], rows) + [""]
    return lines


def _loss(payload: dict) -> list[str]:
    lines = [f"## Loss chunk: row kernel and the cuBLAS chunk route ({payload['loss_chunk_tokens']} tokens, "
             "Qwen2.5-7B head; estimates)", ""]
    rows = []
    for c in payload["cases"]:
        if c["group"] != "rows":
            continue
        rows.append([c["case"], c["device"], _num(c["warp_instructions_per_unit"], ".3f"), c["limiter"],
                     _num(c.get("t_compute_us"), ".1f"), _num(c.get("t_memory_us"), ".1f"), _pct(c["ceiling"]),
                     "yes" if c["spills"] else "no"])
    lines += _table(["row kernel", "device", "warp-instr/logit", "limiter", "compute µs", "memory µs",
                     "of copy bandwidth", "spills"], rows) + [""]
    rows = []
    for r in payload["routes"]:
        f = r["fraction_by_gemm_fraction"]
        rows.append([r["route"], r["device"], str(r["gemms"]), _num(r["t_matmul_us"], ".0f"), _num(r["t_rows_us"], ".0f"),
                     " / ".join(_pct(f[k]) for k in sorted(f)), _pct(r["goal"]), _met(r["met"])])
    lines += ["The chunk route: cuBLAS GEMM(s) with an fp32 result (their FLOPs at the matmul rate times an assumed "
              "fraction 0.90 / 0.95 / 1.00; the fp32 store is part of the GEMM) followed by the row kernel at its "
              "ceiling; the fraction of the matmul rate over both.", ""]
    lines += _table(["pass", "device", "GEMMs", "matmul µs", "row kernel µs", "of matmul rate (GEMM 0.90 / 0.95 / 1.00)",
                     "goal", ""], rows) + [""]
    rows = []
    for c in payload["cases"]:
        if c["group"] == "logprob":
            rows.append([c["device"], str(c["programs"]), _num(c.get("tensor_cycles"), ".0f"),
                         _num(c.get("main_loop_cycles"), ".0f"), _num(c.get("epilogue_cycles"), ".0f"),
                         _pct(c["ceiling"]), "yes" if c["spills"] else "no"])
    if rows:
        lines += ["The forward-only on-chip kernel (`token_logprobs(..., on_chip=True)`), per program: tensor-core "
                  "cycles, main-loop cycles (the larger of tensor and its instructions), epilogue cycles (the "
                  "online log-sum-exp of each tile, not overlapped with one block per SM).", ""]
        lines += _table(["device", "programs", "tensor cycles", "main loop cycles", "epilogue cycles",
                         "of matmul rate", "spills"], rows) + [""]
    return lines


def markdown(payload: dict) -> str:
    env = payload["env"]
    lines = [
        "# Static kernel report (estimates, not measurements)", "",
        f"Commit {env.get('git_commit')}{' (dirty)' if env.get('git_dirty') else ''}, {env.get('date_utc')}, "
        f"`{env.get('command')}`, {payload['seconds']} s on {env.get('device')}. Triton {env.get('triton')} "
        f"(the GPU image runs Triton 3.6: its code, registers and spills differ), "
        + ", ".join(f"{k}: {v}" for k, v in env.items() if k.startswith("ptxas")) + ".", "",
        "Every Triton kernel compiled offline (`triton.compile` for each GPU target) at the goal shapes and read "
        "with the wheel's ptxas / cuobjdump / nvdisasm. Ceilings assume each SM issues at most min(4, warps it "
        "holds) warp-instructions per clock (4 schedulers, one instruction per warp per clock; the warps from each "
        "launch's programs per SM and blocks per SM), narrower pipes (fp32 FMA, integer/logic ALU 64 lanes, MUFU/conversions 16 lanes per SM per "
        "clock) at the CUDA Programming Guide's rates, DRAM traffic at an assumed copy bandwidth, and tensor cores at "
        "their dense rate; latency (a warp's wait for its previous results, memory latency), barriers and launch "
        "overhead are not modelled, so real kernels reach less, few-warp launches most. "
        "The GPU suite (`python -m benchmarks.suite`) measures the truth. Model: benchmarks/static/static_model.py.", "",
    ]
    lines += ["Devices assumed:", ""] + [f"- {d['name']}: {d['sms']} SMs at {d['clock_ghz']} GHz, "
                                         f"{d['dram_tbs']} TB/s (copy {_pct(d['copy_fraction'])}), "
                                         f"matmul {d['matmul_tflops']:.0f} TFLOP/s. {d['source']}."
                                         for d in payload["devices"].values()] + [""]
    lines += (_goals(payload) + _calibration(payload) + _nf4(payload) + _decode_others(payload) + _loss(payload)
              + _variants(payload))
    if payload["uncovered_kernels"] or payload["compile_failures"]:
        lines += ["## Not covered", ""]
        lines += [f"- {k}: no launch case (benchmarks/static/kernel_cases.py)" for k in payload["uncovered_kernels"]]
        lines += [f"- {f['kernel']} ({f['case']}, {f['device']}): compile failed: {f['error'][:200]}"
                  for f in payload["compile_failures"]]
        lines.append("")
    return "\n".join(lines)
