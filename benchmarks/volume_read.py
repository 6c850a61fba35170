"""How fast NIfTI volumes become training slices, and how much memory one volume takes.

Writes a synthetic chest CT volume of the size hospitals export (512 x 512 x 300 by
default, int16, as .nii and .nii.gz), then, each in a fresh process: the lung rule over the
volume (what `fedct split` does), and reading, windowing and resizing the kept slices to
the training size (what the decoded-slice cache does once). Prints slices per second and
the process's peak resident memory above its imports, against the volume's size as float32.

    python benchmarks/volume_read.py [--size 512] [--depth 300] [--image-size 224]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHILD = """
import sys, time
from pathlib import Path
def high_water():  # this process's peak resident MiB (VmHWM: unlike ru_maxrss, not the parent's)
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
    return int(line.split()[1]) / 1024
import numpy as np
from PIL import Image
from fedct.data.volumes import VolumeOptions, volume_slices, decode_slices
def resized(pixels, size):  # fedct.data.loading.resized, without importing torch
    image = Image.fromarray(pixels)
    return np.asarray(image.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0))
path, size = Path(sys.argv[1]), int(sys.argv[2])
base = high_water()
start = time.perf_counter()
kept = volume_slices(path, VolumeOptions())
chosen = time.perf_counter() - start
start = time.perf_counter()
images = [resized(s, size) for s in decode_slices(path, kept, (-600.0, 1500.0))]
decoded = time.perf_counter() - start
peak = high_water()
print(len(kept), chosen, decoded, peak, base)
"""


def write_volume(folder: Path, size: int, depth: int) -> list[Path]:
    from fedct.data.synthetic_volumes import synth_volume
    from fedct.data.volumes import write_volume as write

    volume = synth_volume(np.random.default_rng(0), size=size, depth=depth, lesion="ggo",
                          noise=20.0, offset=0.0)
    paths = [folder / "chest.nii", folder / "chest.nii.gz"]
    for path in paths:
        write(path, volume, (0.7, 0.7, 1.0))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--depth", type=int, default=300)
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        paths = write_volume(Path(tmp), args.size, args.depth)
        print(f"volume {args.size} x {args.size} x {args.depth} (float32 in memory: "
              f"{args.size * args.size * args.depth * 4 / 2**20:.0f} MiB), written in "
              f"{time.perf_counter() - started:.0f} s; slices resized to {args.image_size} px\n")
        print("| file | size on disk | lung slices | lung rule s | read + window + resize s "
              "| slices/s | peak memory |")
        print("|---|---|---|---|---|---|---|")
        for path in paths:
            out = subprocess.run([sys.executable, "-c", CHILD, str(path), str(args.image_size)],
                                 check=True, capture_output=True, text=True).stdout.split()
            kept, chosen, decoded, peak, base = int(out[0]), *map(float, out[1:])
            print(f"| {path.name} | {path.stat().st_size / 2**20:.0f} MiB | {kept} | "
                  f"{chosen:.1f} | {decoded:.1f} | {kept / decoded:.0f} | "
                  f"{peak - base:.0f} MiB |")
    print("\npeak memory: the process's peak resident size less what it held after its imports "
          "(Python, numpy, scipy, Pillow, nibabel; torch is not imported here)")


if __name__ == "__main__":
    main()
