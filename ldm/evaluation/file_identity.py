"""Which file a result came from: size and a hash of the head, cheap enough for multi-GB checkpoints."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from ldm.checkpoints import resolve_path

FINGERPRINT_BYTES = 64 * 2**20  # files are identified by size + sha256 of their first 64 MiB


def file_fingerprint(path: str | Path) -> dict[str, Any]:
    """{"path", "size", "sha256_first_64MiB"} of a file: enough to tell model files apart, quickly."""
    path = resolve_path(path)
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        remaining = FINGERPRINT_BYTES
        while remaining > 0 and (chunk := file.read(min(remaining, 2**20))):
            digest.update(chunk)
            remaining -= len(chunk)
    return {"path": str(path.resolve()), "size": path.stat().st_size, "sha256_first_64MiB": digest.hexdigest()}
