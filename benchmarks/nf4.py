"""NF4 decode matmul benchmark: the fused kernel against bitsandbytes and a bf16 matmul.

    python -m benchmarks.nf4                      # GPU: Qwen2.5-7B's block Linears, 1..64 rows
    python -m benchmarks.nf4 --rows 1,16 --no-graphs
    python -m benchmarks.nf4 --tiny               # CPU smoke run (Triton interpreter, tiny shapes)

For each distinct Linear shape of a Qwen2.5-7B decoder block (q/o 3584x3584, k/v 512x3584,
gate/up 18944x3584, down 3584x18944; NF4, blocksize 64, double quantisation, bf16 activations),
the engine's grouped launches (q/k/v with their biases, gate/up; each member with a LoRA of rank
16) and each number of rows M (decode: one row per live sequence), three providers on the same
weights and inputs:

  fused   grpo_fast.kernels.nf4_decode on the weight repacked once for it (as the engine's decode
          steps run it): packed weight read once, dequantised in registers
  bnb     bitsandbytes' Linear4bit forward (what a 4-bit model runs today: its gemv kernel for one
          row; for more rows bitsandbytes >= 0.50 picks per GPU between its own fused 4-bit GEMM
          and dequantising to bf16 followed by cuBLAS)
  bf16    F.linear on a weight dequantised to bf16 beforehand (2 bytes per weight read; the
          speed of light of "dequantise once, keep a bf16 copy", at 4x the memory)

For a grouped launch: fused is one LoRA-A matmul for the shared input and one kernel launch (LoRA-B
in its epilogue), as the engine's decode step runs it; bnb is each member's Linear4bit plus its
LoRA (x @ A.T @ B.T), as peft runs a 4-bit model; bf16 one F.linear on the members' weights
together plus the LoRA as two matmuls (B block-diagonal).

Figures: median time (CUDA graphs replay each call by default, so the kernels' time is measured
rather than Python's launch overhead, as in a graph-captured decode loop), the effective rate of
packed-weight bytes (N*K/2 per call, the same for every provider, so it orders them like time),
that rate as a fraction of a same-run device-to-device copy (bytes read + written per second),
beside it the static kernel report's ceiling for the fused kernel where the GPU is one the report
models (benchmarks/results/static/kernel-report.json: an estimate from the compiled code, an upper
bound the measurement falls below by what the model leaves out), and the time relative to bnb. Per M, the notes add the seven
Linears of one block, and the decode step's four launches of one block (x28 layers is the
per-token base-weight matmul time of the model). No timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Callable, Optional

import torch

from . import common

# name -> (out_features N, in_features K, Linears of this shape per decoder block)
QWEN_7B_SHAPES = {
    "q_proj,o_proj": (3584, 3584, 2),
    "k_proj,v_proj": (512, 3584, 2),
    "gate_proj,up_proj": (18944, 3584, 2),
    "down_proj": (3584, 18944, 1),
}
# the engine's grouped launches (grpo_fast/nf4.py): name -> (members' out_features, in_features,
# biases); each member with a LoRA of rank LORA_RANK, once per decoder block
QWEN_7B_GROUPED = {
    "qkv (grouped) + LoRA": ((3584, 512, 512), 3584, True),
    "gate_up (grouped) + LoRA": ((18944, 18944), 3584, False),
}
# the launches of one decoder block's decode step: the grouped ones, o_proj and down_proj
DECODE_STEP = ("qkv (grouped) + LoRA", "q_proj,o_proj", "gate_up (grouped) + LoRA", "down_proj")
LORA_RANK = 16
TINY_SHAPES = {"tiny_qo": (40, 128, 2), "tiny_down": (24, 256, 1)}
TINY_GROUPED = {"tiny_qkv (grouped) + LoRA": ((40, 24, 24), 128, True)}
PROVIDERS = ("fused", "bnb", "bf16")
STATIC_REPORT = common.RESULTS_DIR / "static" / "kernel-report.json"
# the part of a GPU's name (torch.cuda.get_device_name) -> the static report's model of that part
# (benchmarks/static/static_model.DEVICES); other variants (H100 PCIe, A100 40GB...) have other SM counts or
# bandwidths and get no ceiling
MODELLED_GPUS = (("H200", "h200"), ("H100 80GB HBM3", "h100"), ("A100-SXM4-80GB", "a100"), ("RTX 4090", "rtx4090"))
COLUMNS = [
    ["provider", "provider", "s"], ["status", "status", "s"], ["ms_median", "median ms", ".4f"],
    ["ms_p20", "p20 ms", ".4f"], ["ms_p80", "p80 ms", ".4f"], ["time_vs_bnb", "time ×bnb", ".2f"],
    ["packed_gbps", "packed GB/s", ".1f"], ["frac_copy", "of copy", ".2f"],
    ["static_ceiling", "report's ceiling", ".2f"], ["graph", "graph", "s"],
    ["check", "max rel. diff", ".2e"], ["error", "note", "s60"],
]



def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.nf4", description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=lambda s: [int(t) for t in common.comma_list(s)], default=None,
                   help="rows M per call (default 1,8,16,32,64; tiny 1,3)")
    p.add_argument("--shapes", type=common.comma_list, default=None,
                   help=f"from {', '.join([*QWEN_7B_SHAPES, *QWEN_7B_GROUPED])} (default all)")
    p.add_argument("--providers", type=common.comma_list, default=list(PROVIDERS))
    p.add_argument("--no-graphs", dest="graphs", action="store_false", help="time eager calls, not graph replays")
    p.add_argument("--copy-mib", type=int, default=None, help="size of the reference copy (1024 MiB on GPU)")
    p.add_argument("--warmup-ms", type=float, default=25.0)
    p.add_argument("--rep-ms", type=float, default=100.0)
    p.add_argument("--min-reps", type=int, default=3)
    p.add_argument("--device", default=None)
    p.add_argument("--out-dir", default=None, help='default benchmarks/results/<device>/; "{device}" in it becomes the device slug')
    p.add_argument("--name", default=None, help="file stem (default nf4-<date>-<time>)")
    p.add_argument("--commit", default=None, help="commit to record where the checkout has no .git")
    p.add_argument("--tiny", action="store_true", help="tiny shapes for a CPU smoke run (Triton interpreter)")
    args = p.parse_args(argv)
    shapes = shape_table(args.tiny)
    args.shapes = args.shapes or list(shapes)
    for name in args.shapes:
        if name not in shapes:
            p.error(f"--shapes: expected names from {', '.join(shapes)}, got {name!r}")
    args.rows = args.rows or ([1, 3] if args.tiny else [1, 8, 16, 32, 64])
    for name in args.providers:
        if name not in PROVIDERS:
            p.error(f"--providers: expected names from {', '.join(PROVIDERS)}, got {name!r}")
    return args


def _graphed(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[Callable[[], object], bool, Optional[str]]:
    """fn captured in a CUDA graph (replayed when timed), or fn itself when capture fails."""
    if device.type != "cuda":
        return fn, False, None
    try:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up on the side stream (lazy initialisation, Triton JIT)
                fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay, True, None
    except Exception as exc:  # noqa: BLE001 - e.g. a library call that cannot be captured
        torch.cuda.synchronize(device)
        return fn, False, f"eager (capture failed: {type(exc).__name__})"


def shape_table(tiny: bool) -> dict:
    """name -> (members' out_features, in_features, launches per decoder block, biases, LoRA): the
    single Linears (one member, no bias, no LoRA) and the grouped launches."""
    single, grouped = (TINY_SHAPES, TINY_GROUPED) if tiny else (QWEN_7B_SHAPES, QWEN_7B_GROUPED)
    table = {name: ((n,), k, per_block, False, False) for name, (n, k, per_block) in single.items()}
    table.update({name: (members, k, 1, bias, True) for name, (members, k, bias) in grouped.items()})
    # the decode step's launches first: a run stopped on a time limit keeps the goal's cases
    first = [name for name in DECODE_STEP if name in table]
    return {name: table[name] for name in [*first, *(name for name in table if name not in first)]}


def make_layer(n: int, k: int, device: torch.device, bias: bool = False):
    """An NF4 Linear4bit [n, k] (blocksize 64, double quantisation, bf16 compute) with random weights
    (and a random bias)."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(k, n, bias=bias, compute_dtype=torch.bfloat16, compress_statistics=True,
                              quant_type="nf4")
    dense = torch.randn(n, k, dtype=torch.bfloat16) * 0.02
    layer.weight = bnb.nn.Params4bit(dense, requires_grad=False, compress_statistics=True, quant_type="nf4")
    if bias:
        layer.bias = torch.nn.Parameter(torch.randn(n) * 0.02, requires_grad=False)
    return layer.to(device)


def static_ceilings(device_name: str, path: Path = STATIC_REPORT) -> tuple[Optional[str], dict]:
    """The committed static kernel report's NF4 ceilings {(shape, rows): fraction of copy} for the
    modelled GPU whose name ``device_name`` contains (with that model's name), or (None, {})."""
    from .static.static_model import DEVICES

    key = next((key for tag, key in MODELLED_GPUS if tag in device_name), None)
    if key is None or not path.exists():
        return None, {}
    model_name = DEVICES[key].name
    payload = json.loads(path.read_text())
    return model_name, {(c["params"]["shape"], c["params"]["rows"]): c["ceiling"] for c in payload["cases"]
                        if c["group"] == "nf4" and c["device"] == model_name and c.get("ceiling") is not None}


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = common.pick_device(args.device)
    if device.type != "cuda":
        if not args.tiny:
            raise SystemExit("benchmarks.nf4: the NF4 decode matmul benchmark needs a CUDA device; "
                             "use --tiny for a CPU smoke run")
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel module is first imported
    from grpo_fast.kernels.nf4_decode import nf4_decode_matmul, repack_nf4
    from grpo_fast.nf4 import nf4_weight_of

    env = common.env_info(device, None if argv is None else [__file__, *argv])
    if env["git_commit"] is None and args.commit:
        env["git_commit"] = args.commit
    timing = {"warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms, "min_reps": args.min_reps}
    copy = common.copy_bandwidth(device, args.copy_mib or (1024 if device.type == "cuda" else 8), **timing)
    print(f"{env['device']}: device-to-device copy {copy['gbps']:.1f} GB/s", flush=True)

    shapes = shape_table(args.tiny)
    model_name, ceilings = static_ceilings(env["device"]) if device.type == "cuda" else (None, {})
    rows: list[dict] = []
    out_dir = common.results_dir(env, args.out_dir)
    stem = args.name or common.default_stem("nf4", env)

    def save(partial: bool) -> tuple[dict, dict]:
        add_derived(rows, copy["gbps"])
        payload = {
            "benchmark": "nf4",
            "title": "NF4 decode matmul: fused kernel vs bitsandbytes vs bf16",
            "env": env,
            "settings": dict(vars(args)),
            "copy": copy,
            "static_report": {"device_model": model_name, "path": str(STATIC_REPORT.relative_to(common.REPO_ROOT))}
            if model_name else None,
            "notes": notes(args, rows, copy, model_name),
            "group_by": ["shape", "rows"],
            "columns": COLUMNS,
            "plot": {"group_by": ["shape"], "x": "rows", "series": "provider",
                     "panels": [["ms_median", "median time (ms)"], ["packed_gbps", "packed-weight GB/s"]]},
            "rows": rows,
        }
        return payload, common.write_results(payload, out_dir, stem, partial=partial)

    for shape in args.shapes:
        members, k, per_block, has_bias, has_lora = shapes[shape]
        n = sum(members)
        layers = [make_layer(n_i, k, device, has_bias) for n_i in members]
        # read before bnb runs: on CPU it may repack its own copy
        weight = repack_nf4([nf4_weight_of(layer) for layer in layers],
                            [layer.bias for layer in layers] if has_bias else None)
        dense = torch.cat([_dequantize(layer) for layer in layers])  # bf16 [n, k]: bf16's weight, the check's reference
        bias = torch.cat([layer.bias.to(torch.bfloat16) for layer in layers]) if has_bias else None
        lora = make_lora(members, k, weight.padded_rows, device) if has_lora else None
        for m in args.rows:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            expected = reference(x, dense, bias, lora)
            calls = provider_calls(x, layers, weight, dense, bias, lora, nf4_decode_matmul)
            for name in args.providers:
                case = {"shape": shape, "N": n, "K": k, "per_block": per_block, "rows": m, "provider": name}
                with torch.no_grad():
                    fn, graphed, note = _graphed(calls[name], device) if args.graphs else (calls[name], False, None)
                    check_out = calls[name]()
                    check = float((check_out.float() - expected).abs().max() / expected.abs().max().clamp_min(1e-30))
                    result = common.measure(fn, device, **timing)
                result.update(check=check, graph="yes" if graphed else "no", error=result["error"] or note)
                if name == "fused":
                    result["static_ceiling"] = ceilings.get((shape, m))
                row = {**case, **result}
                rows.append(row)
                print(f"{shape:>24} M={m:<3} {name:>6}: {row['status']:>6} "
                      f"{row['ms_median'] if row['ms_median'] is not None else float('nan'):9.4f} ms "
                      f"{row.get('error') or ''}", flush=True)
            del x, expected
        del layers, weight, dense, bias, lora
        common.free_memory(device)
        save(partial=True)  # each finished shape survives a run stopped on a time limit
    payload, paths = save(partial=False)
    print(f"wrote {paths['json']}, {paths['markdown']} and {len(paths['plots'])} plot(s)")
    return payload


def make_lora(members: tuple[int, ...], k: int, padded_rows: int, device: torch.device) -> dict:
    """A LoRA of rank LORA_RANK per member (bf16, the scale folded into B), in the three forms the
    providers take: per member (A_g [R, k], B_g [n_g, R]), A stacked [G*R, k] with B block-diagonal
    [n, G*R], and the kernel's B rows [padded_rows, R] (each row its member's, zeros past n)."""
    gen = torch.Generator().manual_seed(len(members) * 1000 + k)
    a = [(torch.randn(LORA_RANK, k, generator=gen) * 0.02).to(device, torch.bfloat16) for _ in members]
    b = [(torch.randn(n_g, LORA_RANK, generator=gen) * 0.02).to(device, torch.bfloat16) for n_g in members]
    b_block = torch.block_diag(*b)  # [n, G*R]
    b_rows = torch.zeros(padded_rows, LORA_RANK, device=device, dtype=torch.bfloat16)
    b_rows[:sum(members)] = torch.cat(b)
    return {"a": a, "b": b, "a_stacked": torch.cat(a), "b_block": b_block, "b_rows": b_rows}


def reference(x, dense, bias, lora) -> torch.Tensor:
    """fp32 x @ W.T (+ bias) (+ each member's LoRA) from the bf16 operands every provider reads."""
    out = x.float() @ dense.float().T
    if bias is not None:
        out += bias.float()
    if lora is not None:
        out += (x.float() @ lora["a_stacked"].float().T) @ lora["b_block"].float().T
    return out


def provider_calls(x, layers, weight, dense, bias, lora, nf4_decode_matmul) -> dict:
    """Each provider's call on x: fused (the decode kernel on the repacked weight: for a LoRA, one A
    matmul for the shared input and B in the kernel's epilogue), bnb (each member's Linear4bit and
    its LoRA, as peft runs them) and bf16 (one F.linear on the dequantised members, the LoRA as two
    matmuls)."""
    linear = torch.nn.functional.linear
    if lora is None:
        return {
            "fused": lambda: nf4_decode_matmul(x, weight),
            "bnb": lambda: torch.cat([layer(x) for layer in layers], dim=1) if len(layers) > 1 else layers[0](x),
            "bf16": lambda: linear(x, dense, bias),
        }
    return {
        "fused": lambda: nf4_decode_matmul(x, weight, linear(x, lora["a_stacked"]), lora["b_rows"]),
        "bnb": lambda: torch.cat([layer(x) + linear(linear(x, a), b) for layer, a, b in zip(layers, lora["a"], lora["b"])],
                                 dim=1),
        "bf16": lambda: linear(x, dense, bias) + linear(linear(x, lora["a_stacked"]), lora["b_block"]),
    }


def _dequantize(layer) -> torch.Tensor:
    import bitsandbytes.functional as bnb_functional

    return bnb_functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.bfloat16)


def add_derived(rows: list[dict], copy_rate: float) -> None:
    bnb_ms = {(r["shape"], r["rows"]): r["ms_median"] for r in rows if r["provider"] == "bnb" and r["status"] == "ok"}
    for row in rows:
        ms = row.get("ms_median")
        if row["status"] != "ok" or not ms:
            continue
        row["packed_gbps"] = row["N"] * row["K"] / 2 / (ms * 1e-3) / 1e9
        row["frac_copy"] = row["packed_gbps"] / copy_rate
        reference = bnb_ms.get((row["shape"], row["rows"]))
        row["time_vs_bnb"] = ms / reference if reference else None


def notes(args, rows: list[dict], copy: dict, model_name: Optional[str] = None) -> list[str]:
    lines = [
        f"same-run device-to-device copy of {copy['mib']} MiB: {copy['gbps']:.1f} GB/s (read + written); "
        "'of copy' divides the packed-weight rate by it",
        "packed GB/s: N*K/2 bytes per call over the median time for every provider (bf16 reads 4x more "
        "bytes; bnb may also write and read a bf16 copy)",
        "timed as CUDA graph replays (rows with graph 'no': eager calls, Python launch overhead included)"
        if any(row.get("graph") == "yes" for row in rows) else "timed as eager calls (Python launch overhead included)",
        "check: max |out - fp32 product of the bf16 operands| / max |that product|",
        f"report's ceiling: the fused kernel's ceiling by {STATIC_REPORT.relative_to(common.REPO_ROOT)} for its "
        f"model of this GPU ({model_name}): an estimate from the compiled code (issue rate, copy bandwidth; "
        "latency and launch overhead left out), which the measured 'of copy' meets or falls below"
        if model_name else "report's ceiling: none (the static kernel report does not model this device)",
    ]
    if not args.tiny:
        for label, names in (("the seven Linears of one decoder block", tuple(QWEN_7B_SHAPES)),
                             ("the decode step's four launches of one decoder block (q/k/v and gate/up grouped, "
                              "with LoRA r16)", DECODE_STEP)):
            if not set(names) <= set(args.shapes):
                continue
            for m in args.rows:
                per_provider = {}
                for row in rows:
                    if row["rows"] == m and row["status"] == "ok" and row["shape"] in names:
                        per_provider.setdefault(row["provider"], []).append(row["ms_median"] * row["per_block"])
                summary = ", ".join(f"{name} {sum(v) * 1e3:.1f} µs" for name, v in per_provider.items()
                                    if len(v) == len(names))
                if summary:
                    lines.append(f"M={m}: {label}: {summary} (x28 layers per token)")
    return lines


if __name__ == "__main__":
    main()
