"""Optional engines stay silent in runs that do not use them.

- DeepSpeed: with it installed, accelerate imports it on every `unwrap_model` (to recognise a DeepSpeedEngine;
  transformers' save_pretrained calls it too), and DeepSpeed's accelerator detection then logs "Setting
  accelerator to CPU ..." to stdout on a machine without a GPU, in plain runs and in `abba merge` alike
  (DeepSpeed runs name their accelerator with DS_ACCELERATOR and never reach that line).
- bitsandbytes: importing it on an avx512_bf16 CPU looks up an optional fused 4-bit kernel on the hub
  (`kernels-community/quantization-bitsandbytes`) and logs the failed lookup when offline or untrusted; it then
  uses its own CPU kernels, with the same results.
One filter per logger drops exactly those lines; every other message of either library still shows.
"""

from __future__ import annotations

import logging

# logger name -> the start of the one message dropped from it
_DROPPED = {
    "DeepSpeed": "Setting accelerator to CPU",  # deepspeed.utils.logging.logger
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
}


class _DropStartupNote(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def quiet_optional_engines() -> None:
    """Install the filters (idempotent; imports nothing: a library's logger is the same object once it loads)."""
    for name, prefix in _DROPPED.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropStartupNote) for f in logger.filters):
            logger.addFilter(_DropStartupNote(prefix))
