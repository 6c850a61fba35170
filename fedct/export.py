"""`fedct export`: a checkpoint as ONNX or TorchScript, checked against fedct's own output.

The exported graph takes the normalised image batch [B, 3, S, S] and returns the class
probabilities (softmax inside). How to make that batch from a scan (decode, window, resize,
channels, mean, std) and the operating threshold go into a JSON file beside the model: a
runtime that reads it needs nothing of fedct.
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from fedct import __version__
from fedct.data.decode import LUNG_WINDOW
from fedct.errors import FedctError
from fedct.evaluation import chosen_threshold, load_model
from fedct.files import atomic_write
from fedct.metrics import positive_class
from fedct.runs import checkpoint_paths, refuse_overwriting_inputs

FORMATS = ("onnx", "torchscript")
TOLERANCE = 1e-4  # largest difference in any probability the export may show
OPSET = 18


class Probabilities(torch.nn.Module):
    """The classifier followed by softmax: what fedct reports is what the export returns."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(image), dim=1)


def _export_onnx(module: Probabilities, example: torch.Tensor, target: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.onnx.export(module, (example,), dynamo=True, opset_version=OPSET,
                                input_names=["image"], output_names=["probabilities"],
                                dynamic_shapes={"image": {0: batch}}, verbose=False)
    program.save(str(target))


def _run_onnx(target: Path, images: torch.Tensor) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    return session.run(["probabilities"], {"image": images.numpy()})[0]


def _export_torchscript(module: Probabilities, example: torch.Tensor, target: Path) -> None:
    with warnings.catch_warnings():  # TorchScript is deprecated in favour of torch.export
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.trace(module, example, check_trace=False), str(target))


def _run_torchscript(target: Path, images: torch.Tensor) -> np.ndarray:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(target)).eval()(images).numpy()


def probe_batch(meta: dict, count: int, generator: torch.Generator) -> torch.Tensor:
    """Smooth random images in the pixel range, normalised as fedct does: inputs like a
    scan's, so the probabilities compared are not all saturated at 0 or 1."""
    size = [int(s) for s in meta["input_size"][-2:]]
    coarse = torch.rand(count, 1, 8, 8, generator=generator)
    pixels = torch.nn.functional.interpolate(coarse, size=size, mode="bicubic").clamp(0, 1)
    mean = torch.tensor(meta["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(meta["std"]).view(1, 3, 1, 1)
    return (pixels.expand(-1, 3, -1, -1) - mean) / std


def difference(got: np.ndarray, expected: np.ndarray) -> tuple[float, float]:
    """Largest difference in a probability, and in a log-probability where both are above
    1e-6 (it sees a changed logit that saturated probabilities would hide)."""
    shown = (got > 1e-6) & (expected > 1e-6)
    log_gap = np.abs(np.log(np.where(shown, got, 1.0)) - np.log(np.where(shown, expected, 1.0)))
    return float(np.max(np.abs(got - expected))), float(np.max(log_gap))


EXPORTERS = {"onnx": (_export_onnx, _run_onnx), "torchscript": (_export_torchscript, _run_torchscript)}


def preprocessing(meta: dict) -> dict:
    """What turns a scan into the model's input, in words a runtime can follow."""
    size = [int(s) for s in meta["input_size"][-2:]]
    volumes = meta.get("volumes") or {}  # the window and slice rule the model trained with
    level, width = (volumes["level"], volumes["width"]) if volumes else LUNG_WINDOW
    rescale = volumes.get("rescale")
    return {"layout": "NCHW float32", "height_width": size, "channels": 3,
            "decode": "grayscale uint8: PNG/JPEG of any mode converted to luminance"
                      + (f" (16-bit: HU = value x slope + intercept, {rescale}, then windowed)"
                         if rescale else "")
                      + "; DICOM rescaled to Hounsfield units and windowed at level "
                      f"{level:g}, width {width:g}; a multi-frame file's middle frame"
                      + (f"; volumes cut into axial slices by the rule {volumes['slices']} "
                         "and windowed alike" if volumes else ""),
            "resize": "bicubic to height x width (Pillow, reducing_gap 3)",
            "scale": "pixel / 255", "replicate_gray_to_channels": True,
            "mean": list(meta["mean"]), "std": list(meta["std"]),
            "normalise": "(x - mean[c]) / std[c] per channel"}


def run_export(checkpoint: str | Path, *, fmt: str, out: str | Path, force: bool = False,
               seed: int = 0) -> dict:
    """Export, reload with the target runtime, compare probabilities on a test batch, and
    only then put the model and its JSON in place."""
    if fmt not in FORMATS:
        raise FedctError(f"--format {fmt!r}: choose from {', '.join(FORMATS)}")
    needed = ("onnx", "onnxscript", "onnxruntime") if fmt == "onnx" else ()
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise FedctError(f"--format onnx needs {', '.join(missing)}: pip install 'fedct[export]'")
    out = Path(out)
    sidecar = out.with_name(out.name + ".json")
    refuse_overwriting_inputs({"--out": out, "--out's description": sidecar},
                              checkpoint_paths(checkpoint))
    for target in (out, sidecar):
        if target.is_dir():
            raise FedctError(f"--out {out}: {target} is a folder; give a file path")
        if target.exists() and not force:
            raise FedctError(f"{target}: exists (use --force to replace it)")
    model, meta = load_model(checkpoint)
    model.eval()
    module = Probabilities(model).eval()
    generator = torch.Generator().manual_seed(seed)
    example = probe_batch(meta, 2, generator)
    inputs = probe_batch(meta, 5, generator)  # another batch size on purpose
    with torch.no_grad():
        expected = module(inputs).numpy()
    export, run = EXPORTERS[fmt]
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as scratch:
        staged = Path(scratch) / out.name
        try:
            export(module, example, staged)
        except Exception as exc:  # exporters raise many types for an unsupported model
            raise FedctError(f"{checkpoint}: {fmt} export failed ({exc.__class__.__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        gap, log_gap = difference(run(staged, inputs), expected)
        if not (gap <= TOLERANCE and log_gap <= 10 * TOLERANCE):
            raise FedctError(f"{checkpoint}: the {fmt} export differs from fedct by "
                             f"{gap:.2e} in a probability, {log_gap:.2e} in a log-probability "
                             f"(limits {TOLERANCE:g}, {10 * TOLERANCE:g}); not written")
        classes = list(meta["classes"])
        positive = positive_class(classes, meta.get("positive"))
        threshold, source = chosen_threshold(meta, None) if positive else (None, "argmax")
        description = {
            "format": fmt, "file": out.name, "architecture": meta["architecture"],
            "classes": classes, "positive": positive,
            "output": "softmax probabilities per class, in the order of `classes`",
            "decision": (f"{positive} if its probability >= threshold" if positive else
                         "the class of highest probability (no threshold)"),
            "threshold": threshold, "threshold_source": source, "preprocessing": preprocessing(meta),
            "checked": {"batch": int(inputs.shape[0]), "max_abs_difference": gap,
                        "max_log_probability_difference": log_gap, "tolerance": TOLERANCE,
                        "runtime": "onnxruntime" if fmt == "onnx" else "torch.jit"},
            "source_checkpoint": str(checkpoint_paths(checkpoint)[0]),
            "fedct": __version__, "torch": torch.__version__,
            **({"opset": OPSET} if fmt == "onnx" else {})}
        staged.replace(out)
    atomic_write(sidecar, lambda p: p.write_text(json.dumps(description, indent=2)))
    return {**description, "out": str(out), "sidecar": str(sidecar)}
