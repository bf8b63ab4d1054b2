"""Shared benchmark machinery: environment, timing, peak memory, OOM rows, result files.

One helper (`measure`) times a callable and records its peak memory; each benchmark script only
says how to set up each provider and which rows to produce. Conventions:

- time: GPU `triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])` (milliseconds); where an
  untimed setup must run before every call (e.g. a forward before a timed backward), and on
  CPU, a loop of timed calls after warm-up (CUDA events on GPU, `time.perf_counter` on CPU)
  reporting the same quantiles.
- memory: peak bytes allocated during one call minus the bytes allocated just before it (the
  inputs, and whatever the setup left alive), from the CUDA caching allocator. On CPU there is no
  allocator to ask, so memory is reported as None (not estimated).
- a call that runs out of memory gives a row with status "oom" instead of being dropped.
- every run writes `<stem>.json` (env + rows), `<stem>.md` and `<stem>_*.png` into
  `benchmarks/results/<device-slug>/`; `python -m benchmarks.report` rebuilds the last two. The
  sweeps also write a partial checkpoint (JSON + markdown) after each group of rows, so a run
  stopped on a time limit (`benchmarks.suite`) keeps what it finished.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch

QUANTILES = [0.5, 0.2, 0.8]
RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------
# environment
# ----------------------------------------------------------------------------------------------


def comma_list(text: str) -> list[str]:
    """A command-line list: ``"a, b,c"`` -> ``["a", "b", "c"]``."""
    return [item.strip() for item in text.split(",") if item.strip()]


def pick_device(name: Optional[str] = None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _git(*args: str) -> Optional[str]:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(module: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001 - not installed, or installed without metadata
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.machine()} ({os.cpu_count()} threads)"


def env_info(device: torch.device, argv: Optional[Sequence[str]] = None) -> dict:
    """Everything a result needs to be reproduced and compared: device, versions, commit, command."""
    argv = list(sys.argv if argv is None else argv)
    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(device),
        "device_type": device.type,
        "device_slug": slugify(device_name(device)) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "liger_kernel": _version("liger-kernel"),
        "trl": _version("trl"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "bitsandbytes": _version("bitsandbytes"),
        "git_commit": commit,
        "git_dirty": bool(dirty) if dirty is not None else None,
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": "python -m " + _module_name(argv[0]) + " " + shlex.join(argv[1:]) if argv else "",
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,  # fp32 matmuls of peers (e.g. Liger's backward)
    }


def _module_name(path: str) -> str:
    p = Path(path)
    try:
        rel = p.resolve().relative_to(REPO_ROOT)
        return ".".join(rel.with_suffix("").parts)
    except ValueError:
        return p.stem


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


# ----------------------------------------------------------------------------------------------
# timing and memory
# ----------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clear_grads(tensors: Iterable[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


def _quantiles(samples_ms: list[float]) -> list[float]:
    t = torch.tensor(samples_ms, dtype=torch.float64)
    return [float(torch.quantile(t, q)) for q in QUANTILES]


def time_loop(fn: Callable[[], object], device: torch.device, *, setup: Optional[Callable[[], None]] = None,
              grad_to_none: Sequence[torch.Tensor] = (), warmup_ms: float = 25.0, rep_ms: float = 100.0,
              min_reps: int = 3, max_reps: int = 1000) -> tuple[list[float], int]:
    """Quantiles [0.5, 0.2, 0.8] in ms of `fn`, with `setup()` run untimed before each call."""

    def once() -> float:
        _clear_grads(grad_to_none)
        if setup is not None:
            setup()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    first = once()  # also the warm-up of lazily compiled code
    warm_reps = max(0, min(max_reps, int(warmup_ms / max(first, 1e-3))))
    for _ in range(warm_reps):
        first = once()
    reps = max(min_reps, min(max_reps, int(rep_ms / max(first, 1e-3))))
    samples = [once() for _ in range(reps)]
    return _quantiles(samples), reps


def time_fn(fn: Callable[[], object], device: torch.device, *, setup: Optional[Callable[[], None]] = None,
            grad_to_none: Sequence[torch.Tensor] = (), warmup_ms: float = 25.0, rep_ms: float = 100.0,
            min_reps: int = 3) -> tuple[list[float], Optional[int]]:
    """(quantiles [0.5, 0.2, 0.8] in ms, reps or None when do_bench chose them)."""
    if device.type == "cuda" and setup is None:
        from triton.testing import do_bench

        q = do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=list(grad_to_none) or None,
                     quantiles=QUANTILES)
        return [float(x) for x in q], None
    return time_loop(fn, device, setup=setup, grad_to_none=grad_to_none, warmup_ms=warmup_ms, rep_ms=rep_ms,
                     min_reps=min_reps)


def peak_memory_bytes(fn: Callable[[], object], device: torch.device, *,
                      setup: Optional[Callable[[], None]] = None,
                      grad_to_none: Sequence[torch.Tensor] = ()) -> Optional[int]:
    """Peak bytes allocated during one call of `fn` above what was allocated just before it
    (after `setup`). None on CPU (no allocator statistics there)."""
    if device.type != "cuda":
        return None
    _clear_grads(grad_to_none)
    if setup is not None:
        setup()
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del out
    _clear_grads(grad_to_none)
    return int(peak)


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc).lower()
    # cuBLAS / cuDNN report failed workspace allocations in their own words
    return isinstance(exc, RuntimeError) and any(
        sign in text for sign in ("out of memory", "cublas_status_alloc_failed", "cudnn_status_alloc_failed"))


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def measure(fn: Callable[[], object], device: torch.device, *, setup: Optional[Callable[[], None]] = None,
            grad_to_none: Sequence[torch.Tensor] = (), warmup_ms: float = 25.0, rep_ms: float = 100.0,
            min_reps: int = 3, check: Optional[Callable[[object], object]] = None) -> dict:
    """Warm up (one call), measure peak memory (one call), then time.

    Returns a dict: status "ok" | "oom" | "error", ms_median / ms_p20 / ms_p80, reps (None when
    do_bench chose them), peak_mib (None on CPU), check (`check` of the warm-up call's output, e.g.
    the loss value, so that providers can be compared), error."""
    result: dict = {"status": "ok", "ms_median": None, "ms_p20": None, "ms_p80": None, "reps": None,
                    "peak_mib": None, "check": None, "error": None}
    failure: Optional[BaseException] = None
    try:
        _clear_grads(grad_to_none)  # first call: compiles kernels (Triton JIT, torch.compile), untimed
        if setup is not None:
            setup()
        out = fn()
        _sync(device)
        result["check"] = None if check is None else check(out)
        del out
        peak = peak_memory_bytes(fn, device, setup=setup, grad_to_none=grad_to_none)
        result["peak_mib"] = None if peak is None else peak / 2**20
        (median, p20, p80), reps = time_fn(fn, device, setup=setup, grad_to_none=grad_to_none,
                                           warmup_ms=warmup_ms, rep_ms=rep_ms, min_reps=min_reps)
        result.update(ms_median=median, ms_p20=p20, ms_p80=p80, reps=reps)
    except Exception as exc:  # noqa: BLE001 - any failure becomes a row, the sweep goes on
        failure = exc
    if failure is not None:
        result["status"] = "oom" if is_oom(failure) else "error"
        result["error"] = f"{type(failure).__name__}: {str(failure).splitlines()[0][:300] if str(failure) else ''}"
        failure = None  # drop the traceback (and the tensors its frames hold) before freeing
    _clear_grads(grad_to_none)
    free_memory(device)
    return result


def copy_bandwidth(device: torch.device, mib: int, **timing) -> dict:
    """A same-run device-to-device copy of ``mib`` MiB: (read + written) bytes per second, the
    memory-bandwidth ceiling that bandwidth-bound kernels are compared with."""
    source = torch.empty(mib * 2**20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    (median, _, _), _ = time_fn(lambda: target.copy_(source), device, **timing)
    del source, target
    free_memory(device)
    return {"mib": mib, "ms_median": median, "gbps": 2 * mib * 2**20 / (median * 1e-3) / 1e9}


def matmul_tflops(device: torch.device, dtype: torch.dtype, size: int, *, warmup_ms: float = 25.0,
                  rep_ms: float = 100.0, min_reps: int = 3) -> dict:
    """Plain `a @ b` at size^3 in `dtype`: the same-run ceiling the FLOP rates are compared to."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    (median, p20, p80), _ = time_fn(lambda: a @ b, device, warmup_ms=warmup_ms, rep_ms=rep_ms, min_reps=min_reps)
    del a, b
    free_memory(device)
    return {"size": size, "dtype": str(dtype).replace("torch.", ""), "ms_median": median,
            "tflops": 2 * size**3 / (median * 1e-3) / 1e12}


# ----------------------------------------------------------------------------------------------
# results: JSON, markdown, plots
# ----------------------------------------------------------------------------------------------


def results_dir(env: dict, out_dir: Optional[str | Path] = None) -> Path:
    """benchmarks/results/<device-slug>/, or `out_dir` with "{device}" replaced by the slug."""
    path = Path(str(out_dir).replace("{device}", env["device_slug"])) if out_dir else RESULTS_DIR / env["device_slug"]
    path.mkdir(parents=True, exist_ok=True)
    return path


def default_stem(benchmark: str, env: dict) -> str:
    stamp = env["date_utc"].replace("-", "").replace(":", "").replace("T", "-").rstrip("Z")
    return f"{benchmark}-{stamp}"


def write_results(payload: dict, out_dir: Path, stem: str, *, partial: bool = False) -> dict:
    """Write <stem>.json, then the markdown table and plots built from it. Returns the paths.

    ``partial=True``: a checkpoint of a run still going (called after each group of rows, so a run
    killed on a time limit keeps what it finished): the JSON says ``"partial": true`` and only the
    markdown is rebuilt (plots are drawn at the end, or by `benchmarks.report` from the JSON). The
    JSON is replaced atomically: a run killed mid-write leaves the previous checkpoint intact."""
    out_dir.mkdir(parents=True, exist_ok=True)
    payload["partial"] = partial  # in place: the caller returns the payload the file holds
    json_path = out_dir / f"{stem}.json"
    scratch = json_path.with_name(json_path.name + ".tmp")
    scratch.write_text(json.dumps(payload, indent=1, default=_json_default) + "\n")
    os.replace(scratch, json_path)
    if partial:
        md_path = json_path.with_name(json_path.stem + ".md")
        md_path.write_text(markdown(payload))
        return {"json": json_path, "markdown": md_path, "plots": []}
    return {"json": json_path, **render(json_path)}


def _json_default(value):
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def render(json_path: Path) -> dict:
    """(Re)build <stem>.md and <stem>_*.png next to a result JSON."""
    payload = json.loads(Path(json_path).read_text())
    stem = Path(json_path).with_suffix("")
    md_path = stem.with_name(stem.name + ".md")  # not with_suffix: a stem may hold a dot ("train-0.5b")
    md_path.write_text(markdown(payload))
    return {"markdown": md_path, "plots": plots(payload, stem)}


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if spec.startswith("s"):  # "s" or "s<width>": text, truncated to width
        text = str(value).replace("|", "/").replace("\n", " ")
        width = int(spec[1:]) if spec[1:] else 0
        return text if not width or len(text) <= width else text[: width - 1] + "…"
    return format(value, spec)


def markdown(payload: dict) -> str:
    """A header naming device, date, commit and command, then one table per group of rows.

    The payload says how: `columns` [[key, header, format], ...], `group_by` [key, ...]."""
    env = payload["env"]
    lines = [f"# {payload.get('title', payload['benchmark'])}", ""]
    lines.append(f"- device: **{env['device']}**; torch {env['torch']}, triton {env['triton']}, "
                 f"CUDA {env['cuda']}, Python {env['python']}")
    peers = ", ".join(f"{k} {env[k]}" for k in ("liger_kernel", "trl") if env.get(k))
    if peers:
        lines.append(f"- peers installed: {peers}")
    libraries = ", ".join(f"{k} {env[k]}" for k in ("transformers", "peft", "bitsandbytes") if env.get(k))
    if libraries:
        lines.append(f"- libraries: {libraries}")
    dirty = " (uncommitted changes)" if env.get("git_dirty") else ""
    lines.append(f"- date {env['date_utc']}, commit `{(env.get('git_commit') or 'unknown')[:12]}`{dirty}")
    lines.append(f"- command: `{env['command']}`")
    if payload.get("partial"):
        lines.append("- **partial**: a checkpoint of a run that had not finished (stopped on a time limit?)")
    for note in payload.get("notes", []):
        lines.append(f"- {note}")
    lines.append("")
    lines += _tables(payload["rows"], payload["columns"], payload.get("group_by", []), "##")
    for table in payload.get("tables", []):  # further tables, each {"title", "columns", "group_by", "rows"}
        lines += [f"## {table['title']}", ""]
        lines += _tables(table["rows"], table["columns"], table.get("group_by", []), "###")
    return "\n".join(lines)


def _tables(rows: list[dict], columns: list, group_by: list[str], heading: str) -> list[str]:
    """One markdown table per group of rows (a heading naming the group when grouped)."""
    lines: list[str] = []
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(k) for k in group_by), []).append(row)
    for key, group in groups.items():
        if key:
            lines.append(f"{heading} " + ", ".join(f"{k} {v}" for k, v in zip(group_by, key)))
            lines.append("")
        lines.append("| " + " | ".join(c[1] for c in columns) + " |")
        lines.append("|" + "|".join("---" for _ in columns) + "|")
        for row in group:
            lines.append("| " + " | ".join(_fmt(row.get(c[0]), c[2]) for c in columns) + " |")
        lines.append("")
    return lines


def plots(payload: dict, stem: Path) -> list[Path]:
    """One PNG per plot group: a panel per metric against `x`, one line per `series`
    (`"kind": "bar"`: one PNG, a panel per metric, bars grouped by the categories `x`)."""
    spec = payload.get("plot")
    if not spec:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if spec.get("kind") == "bar":
        return [_bar_plot(payload, spec, stem, plt)]
    groups: dict[tuple, list[dict]] = {}
    for row in payload["rows"]:
        groups.setdefault(tuple(row.get(k) for k in spec["group_by"]), []).append(row)
    paths = []
    for key, rows in groups.items():
        fig, axes = plt.subplots(1, len(spec["panels"]), figsize=(5.5 * len(spec["panels"]), 4), squeeze=False)
        for ax, (metric, label) in zip(axes[0], spec["panels"]):
            series: dict[str, list[tuple]] = {}
            for row in rows:
                if row.get("status") == "ok" and row.get(metric) is not None:
                    series.setdefault(row[spec["series"]], []).append((row[spec["x"]], row[metric]))
            for name, points in series.items():
                points.sort()
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
            ax.set_xlabel(spec["x"])
            ax.set_ylabel(label)
            if series:
                xs = sorted({p[0] for points in series.values() for p in points})
                ax.set_xscale("log", base=2)
                ax.set_xticks(xs, [str(x) for x in xs])
                ax.legend(fontsize=8)
            else:
                ax.text(0.5, 0.5, "not measured here", ha="center", va="center", transform=ax.transAxes)
            ax.grid(True, alpha=0.3)
        title = ", ".join(f"{k}={v}" for k, v in zip(spec["group_by"], key))
        fig.suptitle(f"{title} ({payload['env']['device']})", fontsize=10)
        fig.tight_layout()
        path = Path(f"{stem}_{slugify(title)}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def _bar_plot(payload: dict, spec: dict, stem: Path, plt) -> Path:
    """A panel per metric: for each category `x`, one bar per `series`; missing figures are left out."""
    rows = payload["rows"]
    categories = list(dict.fromkeys(row[spec["x"]] for row in rows))
    names = list(dict.fromkeys(row[spec["series"]] for row in rows))
    fig, axes = plt.subplots(1, len(spec["panels"]), figsize=(5.5 * len(spec["panels"]), 4), squeeze=False)
    width = 0.8 / max(len(names), 1)
    for ax, (metric, label) in zip(axes[0], spec["panels"]):
        drawn = False
        for index, name in enumerate(names):
            points = [(categories.index(row[spec["x"]]), row[metric]) for row in rows
                      if row[spec["series"]] == name and row.get("status") == "ok" and row.get(metric) is not None]
            if points:
                ax.bar([x + (index - (len(names) - 1) / 2) * width for x, _ in points], [y for _, y in points],
                       width=width, label=name)
                drawn = True
        ax.set_xticks(range(len(categories)), [str(c) for c in categories])
        ax.set_ylabel(label)
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not measured here", ha="center", va="center", transform=ax.transAxes)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"{payload.get('title', payload['benchmark'])} ({payload['env']['device']})", fontsize=10)
    fig.tight_layout()
    path = Path(f"{stem}_{slugify(spec['x'])}.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
