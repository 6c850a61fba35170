"""Writing files so that a crash never leaves half of one, and JSON that parses anywhere.

Every file fedct writes goes through `atomic_write` (a temporary file in the same folder,
renamed over the target) or is a CSV append that a resume truncates; every JSON file is
strict (no NaN or Infinity: `json_safe`).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename over the target. A
    failure (a full disk, a read-only folder, a folder where the file should be) names the
    target, never the temporary file, and leaves the target as it was."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it private; honour the umask
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_tensors(value, path: Path) -> None:
    """torch.save through a Python file, so that a full disk is an OSError (torch's own
    writer reports it as an opaque RuntimeError)."""
    import torch  # here: the CLI and `fedct split` import this module without torch

    with Path(path).open("wb") as handle:
        torch.save(value, handle)


def json_safe(value):
    """NaN becomes null (strict JSON: every file fedct calls JSON parses anywhere), numpy
    scalars become Python numbers, tuples lists."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return None if np.isnan(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def to_json(value) -> str:
    return json.dumps(json_safe(value), indent=2, default=str, allow_nan=False)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def staging_dir(target: Path) -> Path:
    """A temporary folder beside `target`, to fill and rename into place; made with the
    permissions a plain mkdir would have (mkdtemp's are private)."""
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    os.chmod(staging, 0o777 & ~current_umask())
    return staging
