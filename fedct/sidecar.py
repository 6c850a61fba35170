"""A checkpoint's JSON sidecar: every field checked on read, and bound to its weights.

The sidecar says how to use the weights (classes, positive class, input size, mean/std, the
operating threshold). An edited or damaged field would give silently wrong answers, so each
is checked for type, range and finiteness, and the two files vouch for each other: the
weights file's header holds a digest of the sidecar (`SIDECAR_DIGEST`), and the sidecar holds
a digest of the weights file (`WEIGHTS_DIGEST`). A checkpoint written before the binding
existed carries neither and is read with its fields checked.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from fedct.data.volumes import VolumeOptions
from fedct.errors import FedctError

SIDECAR_DIGEST = "fedct_sidecar_sha256"  # in the safetensors header metadata
WEIGHTS_DIGEST = "weights_sha256"  # in the sidecar
MAX_INPUT_SIZE = 4096  # a side in pixels; larger is a damaged field, not a CT slice
MIN_INPUT_SIZE = 8


def meta_digest(meta: dict) -> str:
    """A digest of the sidecar's content, its weights digest left out (that is written after)."""
    from fedct.files import json_safe

    body = {k: v for k, v in meta.items() if k != WEIGHTS_DIGEST}
    text = json.dumps(json_safe(body), sort_keys=True, separators=(",", ":"), default=str,
                      allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_fields(meta, sidecar: Path) -> dict:
    """Every field a command uses, checked; returns the sidecar or raises naming the key."""
    if not isinstance(meta, dict):
        raise FedctError(f"{sidecar}: not a checkpoint sidecar (expected a JSON object)")

    def bad(key: str, expected: str):
        return FedctError(f"{sidecar}: key '{key}' is {meta.get(key)!r}, expected {expected}")

    for key in ("architecture", "classes", "input_size", "mean", "std"):
        if key not in meta:
            raise FedctError(f"{sidecar}: missing key '{key}'")
    if not isinstance(meta["architecture"], str) or not meta["architecture"]:
        raise bad("architecture", "a timm architecture name")
    classes = meta["classes"]
    if not (isinstance(classes, list) and len(classes) >= 2
            and all(isinstance(c, str) and c for c in classes) and len(set(classes)) == len(classes)):
        raise bad("classes", "a list of two or more distinct class names")
    if meta.get("positive") is not None and meta["positive"] not in classes:
        raise bad("positive", f"one of the classes {classes}")
    if meta.get("positive") is not None and len(classes) > 2:
        raise bad("positive", f"null: {len(classes)} classes are decided by the highest "
                              "probability")
    size = meta["input_size"]
    if not (isinstance(size, list) and len(size) == 3 and size[0] == 3
            and all(isinstance(s, int) and not isinstance(s, bool) for s in size)
            and all(MIN_INPUT_SIZE <= s <= MAX_INPUT_SIZE for s in size[1:])):
        raise bad("input_size", f"[3, height, width] with sides from {MIN_INPUT_SIZE} to "
                                f"{MAX_INPUT_SIZE}")
    for key in ("mean", "std"):
        values = meta[key]
        if not (isinstance(values, list) and len(values) == 3 and all(_number(v) for v in values)
                and all(abs(v) <= 1e3 for v in values)):
            raise bad(key, "three finite numbers, one per channel")
    if not all(v > 0 for v in meta["std"]):
        raise bad("std", "three numbers > 0")
    if meta.get("interpolation") is not None and meta["interpolation"] not in (
            "bicubic", "bilinear", "nearest"):
        raise bad("interpolation", "bicubic, bilinear or nearest")
    for flag in ("dp_safe", "tta"):
        if flag in meta and not isinstance(meta[flag], bool):
            raise bad(flag, "true or false")
    if meta.get("volumes") is not None:
        volumes = meta["volumes"]
        try:
            VolumeOptions(slices=str(volumes["slices"]), window=str(volumes["window"]),
                          rescale=str(volumes.get("rescale", "")))
        except (TypeError, KeyError, FedctError):
            raise bad("volumes", "the slice rule and window its training split used") from None
    point = meta.get("operating_point")
    if point is not None and len(classes) > 2:
        if not (isinstance(point, dict) and point.get("rule") == "argmax"
                and point.get("threshold") is None):
            raise FedctError(f"{sidecar}: key 'operating_point' must be the argmax rule without "
                             f"a threshold: the model has {len(classes)} classes")
    elif point is not None:
        _check_point(sidecar, "operating_point", point)
    patient = meta.get("patient_operating_point")
    if patient is not None:
        _check_point(sidecar, "patient_operating_point", patient)
        if len(classes) > 2 or patient.get("aggregate") not in ("mean", "max") and not str(
                patient.get("aggregate")).startswith("top:"):
            raise FedctError(f"{sidecar}: key 'patient_operating_point' has aggregate "
                             f"{patient.get('aggregate')!r}, expected mean, max or top:K of a "
                             "two-class model")
    if "metrics" in meta and not isinstance(meta["metrics"], dict):
        raise bad("metrics", "a mapping")
    if WEIGHTS_DIGEST in meta and not (isinstance(meta[WEIGHTS_DIGEST], str)
                                       and len(meta[WEIGHTS_DIGEST]) == 64):
        raise bad(WEIGHTS_DIGEST, "a SHA-256 hex digest")
    return meta


def _check_point(sidecar, key: str, point) -> None:
    """An operating point: a threshold in (0, 1), its rule and source as text."""
    if not isinstance(point, dict) or not _number(point.get("threshold")) \
            or not 0 < point["threshold"] < 1:
        raise FedctError(f"{sidecar}: key '{key}' has threshold "
                         f"{point.get('threshold') if isinstance(point, dict) else point!r}, "
                         "expected a number in (0, 1)")
    for name in ("rule", "source"):
        if not isinstance(point.get(name, ""), str):
            raise FedctError(f"{sidecar}: key '{key}.{name}' is not text")


def header_digest(weights: Path) -> str | None:
    """The sidecar digest a fedct weights file carries in its header (None: none there)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), framework="pt") as handle:
            return (handle.metadata() or {}).get(SIDECAR_DIGEST)
    except (SafetensorError, OSError, ValueError) as exc:
        raise FedctError(f"{weights}: unreadable checkpoint ({exc.__class__.__name__})") from None


def check_binding(meta: dict, weights: Path, sidecar: Path, *, whole_file: bool) -> None:
    """Refuse weights and a sidecar that were not saved together. `whole_file` also hashes
    the weights (done where they are loaded; the header alone is read otherwise)."""
    recorded = header_digest(weights)
    if recorded is None and WEIGHTS_DIGEST not in meta:
        return  # written before fedct bound the two files
    if recorded is None or WEIGHTS_DIGEST not in meta:
        raise FedctError(f"{weights}: the weights and {sidecar.name} were not saved together "
                         "(one carries a digest of the other, the other none)")
    if recorded != meta_digest(meta):
        raise FedctError(f"{sidecar}: edited or damaged since it was saved with "
                         f"{weights.name} (its digest differs); fedct refuses to guess which "
                         "field is right")
    if whole_file and file_digest(weights) != meta[WEIGHTS_DIGEST]:
        raise FedctError(f"{weights}: not the weights {sidecar.name} was saved with (their "
                         "digest differs)")
