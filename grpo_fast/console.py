"""No console line a user cannot act on: third-party import-time noise, avoided where it starts.

bitsandbytes (0.49+), when imported on a CPU with AVX512-BF16 (which includes the host CPUs of most
H100 machines), asks the Hugging Face Hub for an optional CPU inference kernel
(``kernels-community/quantization-bitsandbytes``, through the ``kernels`` package): a network round
trip on every import (seconds, or a timeout on an offline machine), and when it fails, as it does
offline or without ``trust_remote_code``, the warning "Failed to load CPU gemm_4bit_forward from
kernels-community ... pip install kernels" on every run. grpo-fast never runs that kernel (it is
bitsandbytes' CPU inference matmul; training and decoding run on the GPU), so its import of
bitsandbytes looks for the kernel in the local Hub cache only: ``huggingface_hub``'s offline switch
(``HF_HUB_OFFLINE``, which ``kernels`` reads) is on for the import alone, and the two log lines that
this lookup prints (bitsandbytes' and kernels' "skipping publisher trust check", each naming that one
repository) are filtered out by message. A kernel already in the cache still loads; nothing else in
the process runs offline.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from types import ModuleType
from typing import Iterator, Optional

BNB_HUB_KERNEL = "kernels-community/quantization-bitsandbytes"
# (logger, the message's start): exactly the lines bitsandbytes' optional hub lookup prints
_NOISE = (
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
    ("kernels._internals.hf_hub", f"Skipping publisher trust check for '{BNB_HUB_KERNEL}'"),
)


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def _install_filters() -> None:
    for logger_name, prefix in _NOISE:
        logger = logging.getLogger(logger_name)
        if not any(isinstance(f, _DropMessage) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropMessage(prefix))


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """huggingface_hub's offline mode (as HF_HUB_OFFLINE=1) for the duration of the block only."""
    try:
        from huggingface_hub import constants
    except ImportError:  # no hub client: nothing can go online
        yield
        return
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def import_bitsandbytes() -> Optional[ModuleType]:
    """``import bitsandbytes`` without its hub lookup's network round trip and warning (see the module
    docstring); None when bitsandbytes is not installed. Call it before peft or transformers import
    bitsandbytes (peft does on import); once imported, this returns the module."""
    _install_filters()
    if "bitsandbytes" in sys.modules:
        return sys.modules["bitsandbytes"]
    with _hub_offline():
        try:
            import bitsandbytes
        except ImportError:
            return None
    return bitsandbytes
