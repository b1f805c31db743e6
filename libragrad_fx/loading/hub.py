"""Pretrained weights through timm's and open_clip's own loading, failing fast when offline.

Unreachable, the Hugging Face client retries each file for about 45 seconds and logs every
attempt. A DNS probe of the hub decides first: when it fails, the client is put in offline
mode, so weights already in the local cache still load and missing ones fail at once with a
message that says how to pass a checkpoint instead (DESIGN.md §6: no internet here).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlparse

from ..errors import LibraError

_PROBE_SECONDS = 3.0
_CHECKPOINT_HINT = "pass --checkpoint FILE (a state_dict in .pt, .pth or .safetensors)"


def hub_reachable(timeout: float = _PROBE_SECONDS) -> bool:
    """Whether the hub's host name resolves within ``timeout`` seconds."""
    try:
        from huggingface_hub import constants

        host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    except ImportError:
        host = "huggingface.co"
    found: list[bool] = []

    def probe() -> None:
        try:
            socket.getaddrinfo(host, 443)
            found.append(True)
        except OSError:
            found.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(found and found[0])


def _go_offline() -> None:
    """Cache-only mode for this process: no requests, no retries."""
    from huggingface_hub import constants
    from huggingface_hub.utils import reset_sessions

    constants.HF_HUB_OFFLINE = True
    reset_sessions()


@contextmanager
def pretrained_weights(what: str) -> Iterator[None]:
    """Run a library's pretrained loading; any failure becomes one LibraError line.

    The libraries' own log lines (retries, "failed to download") are silenced meanwhile: the
    error says it once.
    """
    online = hub_reachable()
    if not online:
        _go_offline()
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        yield
    except LibraError:
        raise
    except Exception as exc:  # network, cache and file errors of two libraries and their deps
        reason = " ".join(str(exc).split())[:200]
        where = ("the hub is unreachable and they are not in the local cache" if not online
                 else f"{type(exc).__name__}: {reason}")
        raise LibraError(f"cannot load the pretrained weights of {what}: {where}; "
                         f"{_CHECKPOINT_HINT}") from exc
    finally:
        logging.disable(previous)
