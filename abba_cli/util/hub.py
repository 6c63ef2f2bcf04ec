"""Is the Hugging Face hub reachable? Asked once per process, so an offline machine skips the hub at once
instead of sitting through huggingface_hub's and datasets' ~25 s of retries for every model and dataset."""

from __future__ import annotations

import functools
import os
import sys

_noted: set[str] = set()


def offline_by_env() -> bool:
    """HF_HUB_OFFLINE read now (huggingface_hub reads it only at import, so a later setting would be missed)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@functools.cache
def _reachable(endpoint: str) -> bool:
    import socket
    from urllib.parse import urlparse

    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=3).close()
    except OSError:
        return False
    return True


def hub_reachable() -> bool:
    """A quick TCP probe of the hub endpoint; assumed reachable behind a proxy, where a direct connection says
    nothing about the hub."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    return _reachable(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")


def use_hub() -> bool:
    return not offline_by_env() and hub_reachable()


def note_once(message: str) -> None:
    """A note on stderr, once per process: offline, "hub unavailable" is said once, not for every task."""
    if message not in _noted:
        _noted.add(message)
        print(message, file=sys.stderr)
