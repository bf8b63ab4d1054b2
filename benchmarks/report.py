"""Rebuild the markdown tables and PNG plots of benchmark results from their JSON files.

    python -m benchmarks.report                      # every JSON under benchmarks/results/
    python -m benchmarks.report path/to/dir a.json   # the given files / directories

Each JSON says how it is drawn (its columns, groups and plots), so one command serves every
benchmark: the loss sweeps (`benchmarks.loss`) and the training steps (`benchmarks.train`, with
its memory-budget table). The JSON files are the record (device, versions, commit, command,
every figure); the tables and plots next to them are derived and can always be regenerated with
this command.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import common


def result_files(paths: list[str]) -> list[Path]:
    found: list[Path] = []
    for p in map(Path, paths or [common.RESULTS_DIR]):
        candidates = sorted(p.rglob("*.json")) if p.is_dir() else [p]
        for c in candidates:
            try:
                payload = json.loads(c.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if isinstance(payload, dict) and {"benchmark", "env", "rows", "columns"} <= payload.keys():
                found.append(c)
    return found


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="*", help="result JSON files or directories (default benchmarks/results/)")
    args = parser.parse_args(argv)
    written = []
    for path in result_files(args.paths):
        out = common.render(path)
        written.append({"json": path, **out})
        print(f"{path}: {out['markdown'].name} and {len(out['plots'])} plot(s)")
    if not written:
        print("no result JSON files found")
    return written


if __name__ == "__main__":
    main()
