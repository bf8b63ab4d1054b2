"""The README's loss example runs as written (with a smaller vocabulary, to stay fast on CPU)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_loss_example_runs():
    text = README.read_text()
    code = re.search(r"## The fused loss\n\n```python\n(.*?)```", text, re.S).group(1)
    assert "151936" in code
    namespace = {}
    exec(compile(code.replace("151936", "1517"), "README.md", "exec"), namespace)
    out, hidden = namespace["out"], namespace["hidden"]
    assert out.loss.dim() == 0 and hidden.grad is not None and hidden.grad.abs().sum() > 0


def test_every_config_key_is_in_the_readme_table():
    import dataclasses

    from grpo_fast.config import GRPOConfig

    table = README.read_text().split("### Configuration keys", 1)[1]
    documented = set(re.findall(r"^\| ([^|]+) \|", table, re.M))
    keys = {key.strip("` ") for cell in documented for key in cell.split(",")}
    missing = [field.name for field in dataclasses.fields(GRPOConfig) if field.name not in keys]
    assert not missing, f"config keys missing from the README's table: {missing}"
