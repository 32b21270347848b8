"""`warmstart predict --server URL IMAGE…`: the service's client (standard library only)."""

from __future__ import annotations

import json
import mimetypes
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import UserError
from ..files import not_a_file


def predict_remote(server: str, image: str | Path, top_k: int = 5, timeout: float = 60.0) -> dict:
    """POST one image to SERVER/predict; returns the JSON answer (or {'error': …} for a 4xx)."""
    path = Path(image)
    if not_a_file(path):
        return {"error": not_a_file(path)}
    content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    if not content_type.startswith("image/"):
        content_type = "application/octet-stream"
    request = urllib.request.Request(f"{server.rstrip('/')}/predict?top_k={top_k}", data=path.read_bytes(),
                                     headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            return {"error": json.loads(exc.read()).get("error", f"HTTP {exc.code}")}
        except ValueError:
            return {"error": f"HTTP {exc.code} {exc.reason}"}
    except urllib.error.URLError as exc:
        raise UserError(f"cannot reach the service at {server} ({exc.reason}): is 'warmstart serve' running?") from None
