"""Packaging and imports: the kernels are ``grpo_fast.kernels``, and Hugging Face's ``kernels`` (which
transformers imports) wins every import made from the repository root, installed or not."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _ours(origin) -> bool:
    """Whether a module file is the repository's kernels/ folder (a venv inside the checkout is not)."""
    return origin is None or Path(origin).resolve().is_relative_to(REPO / "kernels")


HF_KERNELS = importlib.util.find_spec("kernels") is not None and not _ours(importlib.util.find_spec("kernels").origin)
needs_hf_kernels = pytest.mark.skipif(not HF_KERNELS, reason="Hugging Face's kernels package is not installed")

# What a user runs from the repository root imports: the hub-kernels integration of transformers,
# TRL's config (whose import failed when the repository's kernels/ shadowed Hugging Face's), the
# package and its kernels, and every module `python -m benchmarks.suite` runs as a step.
ROOT_IMPORTS = """
import importlib, pathlib, sys
import kernels
assert kernels.__file__ and not pathlib.Path(kernels.__file__).resolve().is_relative_to({repo!r}), kernels.__path__
from kernels import CUDAProperties
importlib.import_module("transformers.integrations.hub_kernels")
from trl import GRPOConfig
import grpo_fast.kernels as k
from grpo_fast.kernels.chunked import fused_grpo_loss
assert k.fused_grpo_loss is fused_grpo_loss
for path in sorted(pathlib.Path("benchmarks").rglob("*.py")):
    if not path.stem.startswith("test_"):
        parts = path.with_suffix("").parts
        importlib.import_module(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
print(pathlib.Path(k.chunked.__file__).resolve())
"""


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(extra)
    return env


def _python(code: str, cwd, env=None, args=("-c",)) -> str:
    result = subprocess.run([sys.executable, *args, code], cwd=cwd, env=env or _env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip()


def test_no_top_level_kernels_module_from_elsewhere(tmp_path):
    origin = _python(
        "import importlib.util; s = importlib.util.find_spec('kernels'); print(s.origin if s else 'NONE')", tmp_path)
    assert origin == "NONE" or not _ours(origin), origin


def test_the_kernels_folder_is_not_a_regular_package():
    """A ``kernels/__init__.py`` would make the folder a regular package, which shadows Hugging Face's
    from the repository root (``python -m`` puts the working directory first on ``sys.path``)."""
    assert (REPO / "kernels" / "chunked.py").is_file()
    assert not (REPO / "kernels" / "__init__.py").exists()


def test_kernels_imported_as_subpackage(tmp_path):
    path = _python("import grpo_fast.kernels.chunked as c; print(c.__file__)", tmp_path)
    assert Path(path).parent.name == "kernels", path


@needs_hf_kernels
def test_imports_from_the_repository_root_pick_hugging_faces_kernels():
    path = _python(ROOT_IMPORTS.format(repo=str(REPO / "kernels")), REPO)
    assert Path(path.splitlines()[-1]) == REPO / "kernels" / "chunked.py"


@needs_hf_kernels
def test_imports_from_a_checkout_on_pythonpath_use_the_checkout(tmp_path):
    """The documented GPU recipe (docs/benchmarks.md) runs a copied tree on PYTHONPATH with nothing of ours installed."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    copy = tmp_path / "checkout"
    for name in files:
        if (REPO / name).is_file() and not name.startswith(("tests/", "examples/")):
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            (copy / name).write_bytes((REPO / name).read_bytes())
    path = _python(ROOT_IMPORTS.format(repo=str(copy / "kernels")), copy, env=_env(PYTHONPATH=str(copy)))
    assert Path(path.splitlines()[-1]) == (copy / "kernels" / "chunked.py").resolve()


def test_cli_default_run_from_the_repository_root(tmp_path):
    """`grpo-fast train` puts the working directory first on sys.path (for module:function paths)."""
    cli = Path(sys.executable).with_name("grpo-fast")
    if not cli.exists():
        pytest.skip("the grpo-fast console script is not installed beside this Python")
    result = subprocess.run([str(cli), "train", "--max_steps", "2", "--output_dir", str(tmp_path / "runs")],
                            cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mean reward: step 1" in result.stdout


def test_wheel_carries_the_kernels_under_grpo_fast(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(REPO)], capture_output=True, text=True)
    if built.returncode != 0 and "No module named" in built.stderr:
        pytest.skip("setuptools is not installed in this environment: " + built.stderr.strip().splitlines()[-1])
    assert built.returncode == 0, built.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("grpo_fast-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "grpo_fast/kernels.py" in names and "grpo_fast/kernels/chunked.py" in names
    assert not [n for n in names if n.startswith("kernels/")], "a top-level kernels/ would shadow Hugging Face's"
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(target),
                    str(wheel)], check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    path = _python("import grpo_fast.kernels as k; import grpo_fast.kernels.nf4_decode as n; print(n.__file__)",
                   elsewhere, env=_env(PYTHONPATH=str(target)))
    assert Path(path) == target / "grpo_fast" / "kernels" / "nf4_decode.py"


def test_console_script_declared():
    import importlib.metadata as md

    scripts = {ep.name: ep.value for ep in md.entry_points(group="console_scripts")}
    assert scripts.get("grpo-fast") == "grpo_fast.cli:main"


def test_top_level_names_and_a_light_import():
    """``import grpo_fast`` loads the loss only; the trainer's names resolve on first use."""
    code = ("import sys, grpo_fast; assert 'transformers' not in sys.modules, 'eager trainer import'; "
            "from grpo_fast import GRPOConfig, load_config, train; import grpo_fast.trainer as t; "
            "assert train is t.train and GRPOConfig is t.GRPOConfig and load_config().max_steps == 80")
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def _relative_imports(path: Path) -> set[str]:
    """The sibling modules a file imports (``from .x import ...`` / ``from . import x``), anywhere in it."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("grpo_fast"):
            found.add("grpo_fast")
        if isinstance(node, ast.Import) and any(alias.name.startswith("grpo_fast") for alias in node.names):
            found.add("grpo_fast")
    return found


def test_the_loss_and_its_reference_do_not_import_each_other():
    loss = _relative_imports(REPO / "grpo_fast" / "loss.py")
    reference = _relative_imports(REPO / "grpo_fast" / "reference.py")
    assert "reference" in loss and "loss" not in reference, (loss, reference)


def test_the_kernels_import_nothing_from_grpo_fast():
    """kernels/ is pure tensor code: its modules import each other, never the package around them."""
    kernel_modules = {path.stem for path in (REPO / "kernels").glob("*.py")}
    for path in (REPO / "kernels").glob("*.py"):
        imported = _relative_imports(path)
        assert imported <= kernel_modules, (path.name, imported - kernel_modules)
