"""README.md and the documentation site: the site builds in strict mode, the configuration page is the
one generated from GRPOConfig, links resolve, and every code block that can run on CPU runs.

A code block that cannot run here says why on the line above it: ``<!-- no-run: reason -->``.
Blocks that name a hub model run against a stand-in: a tiny model saved in a temporary Hugging Face
cache under that name, with ``HF_HUB_OFFLINE=1`` (the tests have no network)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
STAND_IN_MODELS = ("Qwen/Qwen2.5-0.5B-Instruct",)
NO_RUN = re.compile(r"<!-- no-run: (.+?) -->\s*$")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    language: str
    code: str
    no_run: str | None  # the reason, when the block is marked not to run

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def code_blocks(page: Path) -> list[Block]:
    lines = page.read_text().split("\n")
    blocks, index = [], 0
    while index < len(lines):
        opening = re.match(r"^```(\w*)\s*$", lines[index])
        if not opening:
            index += 1
            continue
        end = next(i for i in range(index + 1, len(lines)) if lines[i].startswith("```"))
        marker = None
        for i in range(index - 1, -1, -1):  # the HTML comments right above the fence
            if not lines[i].strip():
                continue
            if not lines[i].strip().startswith("<!--"):
                break
            marker = marker or NO_RUN.search(lines[i])
        blocks.append(Block(page, index + 1, opening.group(1), "\n".join(lines[index + 1:end]) + "\n",
                            marker.group(1) if marker else None))
        index = end + 1
    return blocks


ALL_BLOCKS = [block for page in PAGES for block in code_blocks(page)]
RUNNABLE = [block for block in ALL_BLOCKS if block.no_run is None and block.language in ("python", "bash")]


def test_every_block_runs_or_says_why_not():
    for block in ALL_BLOCKS:
        assert block.language in ("python", "bash", "yaml", "text"), f"{block.id}: a block of {block.language!r}"
        if block.no_run is not None:
            assert len(block.no_run.split()) >= 3, f"{block.id}: say why it cannot run, received {block.no_run!r}"
    assert len(RUNNABLE) >= 6


def test_readme_opens_with_the_two_commands_and_stays_short():
    text = (ROOT / "README.md").read_text()
    assert len(text.encode()) <= 12 * 1024, len(text.encode())
    first, second = [block.code.strip() for block in code_blocks(ROOT / "README.md")[:2]]
    assert first.endswith("grpo-fast train") and "pip install" in first
    assert second.endswith("python -m pytest -q") and '".[dev]"' in second
    assert text.index("<!-- test-command -->") < text.index(second)
    # .ci/run reads the command after the marker
    ci = subprocess.run(["awk", '/<!-- test-command -->/{getline; while ($0 ~ /^```/) getline; print; exit}',
                         str(ROOT / "README.md")], capture_output=True, text=True, check=True).stdout.strip()
    assert ci == second


def test_relative_links_resolve():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if re.match(r"^[a-z]+://", target):
                continue
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)}: a link to {target} that does not exist"


def test_configuration_page_is_generated_from_the_config():
    from grpo_fast.config_reference import markdown

    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == markdown(), "docs/configuration.md is stale: python -m grpo_fast.config_reference > docs/configuration.md"


def test_every_config_key_has_a_meaning_and_a_group():
    import dataclasses

    from grpo_fast.config import GRPOConfig
    from grpo_fast.config_reference import help_text, reference

    keys = [key for group in reference() for key in group.keys]
    assert [key.name for key in keys] == [field.name for field in dataclasses.fields(GRPOConfig)]
    assert all(key.meaning for key in keys)
    text = help_text()
    for key in keys:
        assert f"--{key.name} (default {key.default})" in text


def test_train_help_lists_the_keys_by_group(capsys):
    from grpo_fast.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "\nloss:\n" in out and "--loss_type (default \"dapo\")" in out and "--learning_rate (default 0.003)" in out
    assert out.index("\nmodel:\n") < out.index("--load_in_4bit") < out.index("\nloss:\n")


def test_yaml_blocks_are_valid_configs():
    from grpo_fast.config import GRPOConfig

    blocks = [block for block in ALL_BLOCKS if block.language == "yaml"]
    assert blocks
    for block in blocks:
        GRPOConfig(**yaml.safe_load(block.code))  # every key known, every value valid


@pytest.mark.skipif(shutil.which("mkdocs") is None and not (Path(sys.executable).parent / "mkdocs").exists(),
                    reason="mkdocs is not installed (pip install -e '.[docs]')")
def test_the_site_builds_in_strict_mode(tmp_path):
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "index.html").read_text().count("grpo_loss") > 1


@pytest.fixture(scope="module")
def offline_hub(tmp_path_factory) -> Path:
    """A Hugging Face home whose cache holds a tiny model under each stand-in name."""
    from tiny_lm import save_tiny_model

    home = tmp_path_factory.mktemp("hf_home")
    revision = "0" * 40
    for name in STAND_IN_MODELS:
        repo = home / "hub" / ("models--" + name.replace("/", "--"))
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(revision)
        save_tiny_model(repo / "snapshots" / revision)
    return home


def _environment(offline_hub: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(HF_HOME=str(offline_hub), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=str(ROOT), PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               OMP_NUM_THREADS="2")
    return env


def _check_printed_output(block: Block, printed: str) -> None:
    """A ``text`` block right after the code ("prints ...") is its expected output: the numbers agree."""
    blocks = code_blocks(block.page)
    following = next((b for b in blocks if b.line > block.line), None)
    gap = block.page.read_text().split("\n")[block.line + block.code.count("\n"):following.line - 1] if following else []
    if following is None or following.language != "text" or not any("prints" in line for line in gap):
        return
    number = r"-?\d+(?:\.\d+)?(?:e[+-]\d+)?"
    expected = [float(x) for x in re.findall(number, following.code)]
    received = [float(x) for x in re.findall(number, printed)]
    assert len(received) == len(expected), (printed, following.code)
    for want, got in zip(expected, received):
        assert abs(got - want) <= 0.02 * abs(want) + 1e-6, (block.id, printed, following.code)


@pytest.mark.parametrize("block", RUNNABLE, ids=[block.id for block in RUNNABLE])
def test_code_block_runs(block, offline_hub, tmp_path):
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    if block.language == "python":
        command = [sys.executable, "-c", block.code]
    else:
        command = ["bash", "-euo", "pipefail", "-c", block.code]
    result = subprocess.run(command, cwd=tmp_path, env=_environment(offline_hub), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, f"{block.id}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    _check_printed_output(block, result.stdout)
