"""Fingerprints that key the caches: what the images are, and what the network computes."""

from __future__ import annotations

import hashlib
import json
import os

import torch

from .images import item_key


def _stat(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    except OSError:
        return -1, -1


def fingerprint_items(items) -> str:
    """Paths with their sizes and modification times (and crop boxes); array contents for
    in-memory images. A file that changes, appears or disappears changes the fingerprint."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(item_key(item, _stat).encode())
    return digest.hexdigest()


def fingerprint_tensors(state: dict[str, torch.Tensor]) -> str:
    """The exact values of a set of tensors (the frozen weights a feature depends on)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}\n".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def fingerprint_json(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()
