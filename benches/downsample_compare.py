#!/usr/bin/env python3
"""Side by side: igneous and cuboids downsample the same volume on the same machine.

    python3 benches/downsample_compare.py --cuboids target/release/cuboids \
        [--dtype uint8|uint64] [--gzip-level 0|6] [--size 1024,1024,128] [--num-mips 3] \
        [--parallel N] [--runs 3] [--work DIR]

Needs cloud-volume and igneous-pipeline (`pip install igneous-pipeline`). Writes one source
volume with CloudVolume (raw encoding, chunks 64^3; uint8: a smooth image with noise, uint64:
blocky segmentation labels of ~16-voxel cells with large ids, so that mode pooling sees ties,
runs and 64-bit values), then, alternating, runs on fresh copies of it:
- igneous: `create_downsampling_tasks(num_mips, factor (2,2,1))` in a `LocalTaskQueue` with
  `parallel` processes (default: the machine's cores), chunks gzipped when the source is;
- cuboids: `cuboids downsample --num-mips N --gzip-level L`.
It checks that every mip of the two runs is equal voxel for voxel (read with CloudVolume), and
prints each tool's best time, MVx/s and the ratio. The source counts as the voxels of mip 0.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from cloudvolume import CloudVolume


def make_source(path, dtype, size, gzip):
    info = CloudVolume.create_new_info(
        num_channels=1,
        layer_type="image" if dtype == "uint8" else "segmentation",
        data_type=dtype,
        encoding="raw",
        resolution=[4, 4, 40],
        voxel_offset=[0, 0, 0],
        chunk_size=[64, 64, 64],
        volume_size=size,
    )
    vol = CloudVolume(f"file://{path}", info=info, compress="gzip" if gzip else False,
                      progress=False)
    vol.commit_info()
    rng = np.random.default_rng(7)
    x, y = np.meshgrid(np.arange(size[0]), np.arange(size[1]), indexing="ij")
    for z0 in range(0, size[2], 64):
        depth = min(64, size[2] - z0)
        if dtype == "uint8":
            base = (128 + 60 * np.sin(x / 37.0) * np.cos(y / 23.0)).astype(np.float32)
            slab = base[:, :, None] + rng.normal(0, 12, (size[0], size[1], depth))
            data = np.clip(slab, 0, 255).astype(np.uint8)
        else:
            # Cells of 16x16x8 voxels, each split along a jittered diagonal into two labels
            # with large ids: whole 2x2 blocks most of the time, ties along the boundaries.
            zz = np.arange(z0, z0 + depth)
            cell = ((x // 16)[:, :, None] * 7919 + (y // 16)[:, :, None] * 104729
                    + (zz // 8)[None, None, :] * 1299709).astype(np.uint64)
            side = ((x % 16)[:, :, None] + (y % 16)[:, :, None]
                    + rng.integers(0, 3, (size[0], size[1], depth))) > 16
            data = (cell * 2 + side + (1 << 40)).astype(np.uint64)
        vol[:, :, z0:z0 + depth] = data
    return vol


def timed(cmd_or_fn):
    t = time.time()
    if callable(cmd_or_fn):
        cmd_or_fn()
    else:
        out = subprocess.run(cmd_or_fn, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"{' '.join(cmd_or_fn)} failed:\n{out.stderr[-3000:]}")
    return time.time() - t


def igneous_run(path, num_mips, parallel, gzip):
    import igneous.task_creation as tc
    from taskqueue import LocalTaskQueue

    tasks = tc.create_downsampling_tasks(
        f"file://{path}", mip=0, num_mips=num_mips, factor=(2, 2, 1),
        compress="gzip" if gzip else None, fill_missing=False, delete_black_uploads=False)
    LocalTaskQueue(parallel=parallel, progress=False).insert_all(tasks)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cuboids", required=True)
    ap.add_argument("--dtype", choices=["uint8", "uint64"], default="uint8")
    ap.add_argument("--gzip-level", type=int, choices=[0, 6], default=6)
    ap.add_argument("--size", default="1024,1024,128")
    ap.add_argument("--num-mips", type=int, default=3)
    ap.add_argument("--parallel", type=int, default=os.cpu_count())
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    size = [int(v) for v in args.size.split(",")]
    gzip = args.gzip_level > 0
    work = tempfile.mkdtemp(prefix="downsample-compare", dir=args.work)
    try:
        source = os.path.join(work, "source")
        t = time.time()
        make_source(source, args.dtype, size, gzip)
        print(f"source {args.dtype} {size}, raw, gzip {args.gzip_level}: written in "
              f"{time.time() - t:.1f} s", flush=True)
        mvx = size[0] * size[1] * size[2] / 1e6
        best = {"igneous": float("inf"), "cuboids": float("inf")}
        outputs = {}
        for run in range(args.runs):
            for tool in ("igneous", "cuboids"):
                path = os.path.join(work, f"{tool}-{run}")
                shutil.copytree(source, path)
                if tool == "igneous":
                    seconds = timed(lambda: igneous_run(path, args.num_mips, args.parallel, gzip))
                else:
                    seconds = timed([args.cuboids, "downsample", path, "--num-mips",
                                     str(args.num_mips), "--gzip-level", str(args.gzip_level)])
                print(f"  run {run}: {tool} {seconds:.2f} s", flush=True)
                best[tool] = min(best[tool], seconds)
                if run == 0:
                    outputs[tool] = path
                else:
                    shutil.rmtree(path)
        a = CloudVolume(f"file://{outputs['igneous']}", progress=False)
        b = CloudVolume(f"file://{outputs['cuboids']}", progress=False)
        for mip in range(1, args.num_mips + 1):
            x = a.download(a.meta.bounds(mip), mip=mip)
            y = b.download(b.meta.bounds(mip), mip=mip)
            if x.shape != y.shape or not np.array_equal(x, y):
                sys.exit(f"mip {mip} differs between igneous and cuboids")
        print(f"mips 1-{args.num_mips} equal voxel for voxel")
        for tool in ("igneous", "cuboids"):
            extra = f" (parallel={args.parallel})" if tool == "igneous" else ""
            print(f"{tool}{extra}: {mvx:.1f} MVx in {best[tool]:.2f} s = "
                  f"{mvx / best[tool]:.1f} MVx/s")
        print(f"cuboids / igneous speed: {best['igneous'] / best['cuboids']:.2f}x")
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
