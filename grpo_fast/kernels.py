"""Fused GRPO kernels: pure tensor code (torch + Triton), no transformers/peft, nothing else from grpo_fast.

The kernels' source is the repository's top-level ``kernels/`` folder; this module makes it the
package ``grpo_fast.kernels``. The public, checked API lives in ``grpo_fast.loss``; the entry points
here assume validated, flattened inputs (active tokens only).

Why a module and a folder, not ``kernels/__init__.py``: Hugging Face's ``kernels`` package, which
transformers imports, has the same name. ``python -m pytest``, ``python -m benchmarks.*`` and the CLI
put the working directory first on ``sys.path``; from the repository root a *regular* package
``kernels/`` would shadow Hugging Face's there. A folder without ``__init__.py`` is only a namespace
portion, and any regular ``kernels`` package later on ``sys.path`` wins over it (PEP 420).

A module that has ``__path__`` is a package: the import system reads its submodules from there.
It points at ``grpo_fast/kernels/`` in an installed wheel (setuptools' ``package-dir`` copies the folder
there) and at ``kernels/`` beside ``grpo_fast/`` in a checkout, so an editable install and a checkout
on ``PYTHONPATH`` import the same files.
"""

import os as _os

_HERE = _os.path.dirname(_os.path.abspath(__file__))
_SOURCES = [_os.path.join(_HERE, "kernels"), _os.path.join(_os.path.dirname(_HERE), "kernels")]
__path__ = [next((p for p in _SOURCES if _os.path.isfile(_os.path.join(p, "chunked.py"))), _SOURCES[-1])]

from .kernels.chunked import LossSpec, TokenInputs, forward_logprobs, fused_grpo_loss  # noqa: E402
from .kernels.config import KernelConfig, default_kernel_config, triton_available, triton_usable_on  # noqa: E402

__all__ = [
    "LossSpec",
    "TokenInputs",
    "fused_grpo_loss",
    "forward_logprobs",
    "KernelConfig",
    "default_kernel_config",
    "triton_available",
    "triton_usable_on",
]
