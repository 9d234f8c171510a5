#!/usr/bin/env python3
"""Reading a sharded source against the same unsharded one, end to end, side by side.

    pip install cloud-volume==12.15.2 numpy
    python3 benches/sharded_read_compare.py --cuboids target/release/cuboids [--gzip-level 0]

Makes the 1024x1024x128 uint8 benchmark volume (`cuboids bench --keep`, chunks 64^3), a sharded
copy of it written with CloudVolume's shard writer (identity hash, one shard per 256x256x128
block of chunks, the layout igneous picks for images), then runs `cuboids downsample --num-mips
3` on fresh copies of each, alternating, and prints the times and their ratio; the mips must be
byte-identical.
"""
import argparse
import filecmp
import gzip
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections import defaultdict

import numpy as np
from cloudvolume import CloudVolume
from cloudvolume.datasource.precomputed.common import compressed_morton_code
from cloudvolume.datasource.precomputed.sharding import ShardingSpecification


def make_sharded_copy(src, dst, gzip_data):
    """Re-packs the chunk files of src's mip 0 into shard files (chunks gzipped by CloudVolume
    when the unsharded ones are)."""
    info = json.load(open(os.path.join(src, "info")))
    scale = info["scales"][0]
    size, chunk = np.array(scale["size"]), np.array(scale["chunk_sizes"][0])
    grid = (size + chunk - 1) // chunk
    # Preshift 3 and 2 minishard bits: 32 consecutive Morton codes (4x4x2 chunks) per shard;
    # shard bits for the rest of the code.
    total_bits = int(sum(int(np.ceil(np.log2(g))) for g in grid))
    spec_dict = {
        "@type": "neuroglancer_uint64_sharded_v1", "preshift_bits": 3, "hash": "identity",
        "minishard_bits": 2, "shard_bits": max(total_bits - 5, 0),
        "minishard_index_encoding": "gzip", "data_encoding": "gzip" if gzip_data else "raw",
    }
    spec = ShardingSpecification.from_dict(spec_dict)
    scale["sharding"] = spec_dict
    os.makedirs(os.path.join(dst, scale["key"]))
    json.dump(info, open(os.path.join(dst, "info"), "w"))
    shards = defaultdict(dict)
    for gx in range(grid[0]):
        for gy in range(grid[1]):
            for gz in range(grid[2]):
                start = np.array([gx, gy, gz]) * chunk
                stop = np.minimum(start + chunk, size)
                name = "_".join(f"{a}-{b}" for a, b in zip(start, stop))
                path = os.path.join(src, scale["key"], name)
                gzipped = path + ".gz"
                if os.path.exists(gzipped):
                    data = gzip.decompress(open(gzipped, "rb").read())
                else:
                    data = open(path, "rb").read()
                code = int(compressed_morton_code((gx, gy, gz), grid))
                shards[spec.compute_shard_location(code).shard_number][code] = data
    for number, chunks in shards.items():
        with open(os.path.join(dst, scale["key"], f"{number}.shard"), "wb") as f:
            f.write(spec.synthesize_shard(chunks))
    return len(shards)


def run(cuboids, vol, gzip_level):
    start = time.perf_counter()
    subprocess.run([cuboids, "downsample", vol, "--num-mips", "3", "--gzip-level", str(gzip_level)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cuboids", required=True)
    ap.add_argument("--gzip-level", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="sharded-bench-")
    try:
        subprocess.run([args.cuboids, "bench", "--dir", work, "--keep", "--num-mips", "1",
                        "--gzip-level", str(args.gzip_level)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        plain = os.path.join(work, "image")
        sharded = os.path.join(work, "image-sharded")
        n = make_sharded_copy(plain, sharded, args.gzip_level > 0)
        print(f"sharded copy: {n} shard files")
        times = {"unsharded": [], "sharded": []}
        outputs = {}
        for r in range(args.rounds):
            for name, src in [("unsharded", plain), ("sharded", sharded)]:
                vol = os.path.join(work, f"run-{name}")
                shutil.rmtree(vol, ignore_errors=True)
                shutil.copytree(src, vol)
                times[name].append(run(args.cuboids, vol, args.gzip_level))
                outputs[name] = vol
        info = json.load(open(os.path.join(outputs["unsharded"], "info")))
        for scale in info["scales"][1:]:
            a, b = (os.path.join(outputs[k], scale["key"]) for k in ("unsharded", "sharded"))
            cmp = filecmp.dircmp(a, b)
            assert not cmp.diff_files and not cmp.left_only and not cmp.right_only, scale["key"]
            assert all(filecmp.cmp(os.path.join(a, f), os.path.join(b, f), shallow=False)
                       for f in os.listdir(a)), scale["key"]
        u, s = min(times["unsharded"]), min(times["sharded"])
        print(f"downsample 3 mips, gzip {args.gzip_level}: unsharded {u:.2f} s, sharded {s:.2f} s "
              f"(best of {args.rounds}; all: {times}); sharded / unsharded = {s / u:.2f}x; mips identical")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
