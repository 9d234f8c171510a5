#!/usr/bin/env python3
"""Times igneous on the same volume as `cuboids bench`, for an honest MVx/s comparison.

    cargo run --release -- bench --dir /tmp/cmp --keep      # writes /tmp/cmp/image-mip0
    pip install igneous-pipeline
    python3 benches/igneous_compare.py /tmp/cmp/image-mip0 [--parallel 2] [--num-mips 4]

igneous reads mip 0, computes num_mips (2,2,1) mips per task with tinybrain and writes gzipped
chunks, exactly the work `cuboids downsample --num-mips 4` does.
"""
import argparse
import shutil
import tempfile
import time

from cloudvolume import CloudVolume
import igneous.task_creation as tc
from taskqueue import LocalTaskQueue

ap = argparse.ArgumentParser()
ap.add_argument("volume")
ap.add_argument("--parallel", type=int, default=2)
ap.add_argument("--num-mips", type=int, default=4)
args = ap.parse_args()

work = tempfile.mkdtemp(prefix="igneous-cmp")
path = f"{work}/image"
shutil.copytree(args.volume, path)
vol = CloudVolume(f"file://{path}")
voxels = int(vol.meta.bounds(0).volume())
tasks = tc.create_downsampling_tasks(f"file://{path}", mip=0, num_mips=args.num_mips, factor=(2, 2, 1),
                                     compress="gzip", fill_missing=False, delete_black_uploads=False)
tq = LocalTaskQueue(parallel=args.parallel, progress=False)
t = time.time()
tq.insert_all(tasks)
elapsed = time.time() - t
print(f"igneous (parallel={args.parallel}): {voxels / 1e6:.1f} MVx in {elapsed:.2f} s = {voxels / 1e6 / elapsed:.1f} MVx/s")
shutil.rmtree(work)
