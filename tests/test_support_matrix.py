"""pyproject's dependency floors and kernels/config.py's architecture rule, held to the committed
support matrix (benchmarks/results/static/support-matrix.json, written by
`python -m benchmarks.static.support_matrix`). Nothing is compiled here: the matrix is read."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

tomllib = pytest.importorskip("tomllib")  # the standard library from Python 3.11

from benchmarks.static.support_matrix import ARCHS, FLOORS, TORCH_FOR_TRITON
from grpo_fast.kernels.config import capability_supports

ROOT = Path(__file__).resolve().parent.parent
MATRIX = json.loads((ROOT / "benchmarks" / "results" / "static" / "support-matrix.json").read_text())
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
ARCH_NAMES = {"sm_90a", "sm_80", "sm_86", "sm_89", "sm_75"}
GPU_IMAGE_TRITON, NEWEST_TRITON = "3.6.0", "3.9.0"


def _minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def _floor(package: str) -> str:
    """The version in pyproject's `package>=X` requirement (exactly one, a lower bound only)."""
    found = [re.fullmatch(rf"{re.escape(package)}>=([0-9.]+)(;.*)?", d.replace(" ", ""))
             for d in PYPROJECT["project"]["dependencies"]]
    found = [m.group(1) for m in found if m]
    assert len(found) == 1, f"pyproject: expected one '{package}>=X' dependency, received {found}"
    return found[0]


def _made(run: dict) -> list[dict]:
    return [c for c in run["cells"] if c["status"] != "not launched"]


def test_matrix_covers_every_architecture_triton_version_and_kernel():
    from benchmarks.static.kernel_cases import CASE_BUILDERS

    assert {a["name"] for a in MATRIX["archs"]} == ARCH_NAMES
    versions = [run["triton"] for run in MATRIX["runs"]]
    assert GPU_IMAGE_TRITON in versions and NEWEST_TRITON in versions, versions
    assert _minor(versions[0]) == _minor(_floor("triton")), f"the oldest Triton compiled is {versions[0]}"
    kernels = {kid.split(":")[1] for kid in CASE_BUILDERS}
    for run in MATRIX["runs"]:
        for arch in ARCH_NAMES:
            for dtype in ("fp16", "bf16"):
                have = {c["kernel"] for c in run["cells"] if c["arch"] == arch and c["dtype"] in (dtype, "fp32")}
                assert have == kernels, (run["triton"], arch, dtype, kernels - have)


def _allowed(run: dict) -> list[dict]:
    """The run's launches that kernels/config.py lets run under that Triton (capability_supports)."""
    archs = {a["name"]: divmod(a["capability"], 10) for a in MATRIX["archs"]}
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    return [c for c in _made(run) if capability_supports(archs[c["arch"]], dtypes[c["dtype"]], _minor(run["triton"]))]


def test_triton_and_torch_floors_are_the_oldest_under_which_every_launch_compiles():
    """Every launch the architecture rule allows under a Triton compiles and fits there, for the floor
    and every newer Triton in the matrix; an older one (if recorded) fails somewhere."""
    compiling = [run["triton"] for run in MATRIX["runs"] if all(c["status"] == "ok" for c in _allowed(run))]
    assert compiling, "no Triton version compiles every launch it is allowed"
    oldest = min(compiling, key=_minor)
    assert all(_minor(v) < _minor(oldest) for v in {r["triton"] for r in MATRIX["runs"]} - set(compiling))
    assert _minor(_floor("triton")) == _minor(oldest)
    assert _floor("torch") == TORCH_FOR_TRITON[".".join(map(str, _minor(oldest)))]
    # the rule keeps off exactly what failed: at the floor, a failing launch is one it does not allow
    for run in MATRIX["runs"]:
        if _minor(run["triton"]) >= _minor(oldest):
            allowed = {id(c) for c in _allowed(run)}
            failing = [c for c in _made(run) if c["status"] != "ok"]
            assert not [c for c in failing if id(c) in allowed], run["triton"]


def test_pyproject_states_the_floors_the_matrix_records():
    assert MATRIX["floors"] == FLOORS
    for package, floor in FLOORS.items():
        assert _floor(package) == floor["floor"], package
        assert floor["evidence"], f"{package}: a floor without its evidence"
    # the floors' version triples, not a prefix: ">=3.3" and not ">=3.3.1"
    assert _floor("triton") == FLOORS["triton"]["floor"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_config_refuses_exactly_the_architectures_the_matrix_does_not_run(dtype):
    """Under each Triton from the floor on, an architecture is allowed for a dtype exactly when all its
    launches of that dtype compiled there."""
    name = {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    floor = _minor(_floor("triton"))
    for run in MATRIX["runs"]:
        if _minor(run["triton"]) < floor:
            continue
        for arch in MATRIX["archs"]:
            capability = divmod(arch["capability"], 10)
            runs_there = all(c["status"] == "ok" for c in run["cells"]
                             if c["arch"] == arch["name"] and c["dtype"] in (name, "fp32"))
            assert capability_supports(capability, dtype, _minor(run["triton"])) == runs_there, (
                run["triton"], arch["name"], name)
    # older than anything the matrix covers: not launched
    assert not capability_supports((7, 0), torch.float16)
    assert {a.name for a in ARCHS} == ARCH_NAMES


@pytest.mark.parametrize("capability, dtype, expected", [
    ((7, 5), torch.bfloat16, "torch"), ((7, 5), torch.float16, "triton"), ((8, 0), torch.bfloat16, "triton"),
    ((7, 0), torch.float16, "torch"), ((9, 0), torch.bfloat16, "triton")])
def test_the_loss_picks_triton_only_where_the_matrix_runs_it(monkeypatch, capability, dtype, expected):
    """backend="auto" on a CUDA device (its capability stubbed: no GPU here) follows capability_supports;
    an explicit "triton" there is refused naming the backend."""
    from grpo_fast.loss import _resolve_backend

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    cuda = torch.device("cuda")
    assert _resolve_backend("auto", cuda, dtype) == expected
    if expected == "torch":
        with pytest.raises(ValueError, match="^backend: 'triton' needs"):
            _resolve_backend("triton", cuda, dtype)
