#!/usr/bin/env python3
"""Peak host memory and time of every stage of staged segment and connected-components plans,
each task run as a Batch array child would run it (`cuboids batch` with AWS_BATCH_JOB_ARRAY_INDEX,
its own process), on synthetic volumes of two sizes 4x apart, next to a single-process run of the
same volume. Checks that every staged output equals the single run, and reports per stage the
largest task's peak RSS at each size and their ratio (a stage whose tasks do not grow with the
volume stays near 1).

    benches/staged_memory.py --cuboids target/release/cuboids --work DIR \\
        [--task-mib 40] [--sizes 192,192,64 384,384,64] [--affinities em-like noisy-cells]

The volumes come from `cuboids bench-segment --keep` (its EM-like or noisy-cells affinities and
the probability map it derives). --plans-only plans without running (for --estimate checks).
"""

import argparse
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time


def run(cmd, env=None):
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return out.stdout


def digests(path):
    """The md5 of every output chunk file under path (staging and info left out)."""
    out = {}
    for root, _, files in os.walk(path):
        if ".cuboids-staging" in root:
            continue
        for f in files:
            if f in ("info", "provenance"):
                continue
            full = os.path.join(root, f)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, path)] = hashlib.md5(fh.read()).hexdigest()
    return out


def volumes(args, kind, size, work):
    """Makes (or reuses) the bench volumes of one kind and size: (affinities, probability)."""
    folder = os.path.join(work, f"{kind}-{size.replace(',', 'x')}")
    found = glob.glob(os.path.join(folder, "cuboids-bench-segment*"))
    if not found:
        os.makedirs(folder, exist_ok=True)
        run([args.cuboids, "bench-segment", "--size", size, "--affinities", kind, "--keep",
             "--dir", folder])
        found = glob.glob(os.path.join(folder, "cuboids-bench-segment*"))
    data = found[0]
    return os.path.join(data, "affinities"), os.path.join(data, "probability")


def task_doc(kind, source, output, out_chunk):
    chunk = [int(v) for v in out_chunk.split(",")]
    if kind == "segment":
        return {"kind": "segment", "affinity": source, "output": output, "threshold": 0.7,
                "gzip_level": 0, "output_chunk_size": chunk}
    return {"kind": "connected-components", "input": source, "output": output,
            "threshold": 0.5, "connectivity": 26, "dust": 10, "gzip_level": 0,
            "output_chunk_size": chunk}


def single(args, kind, source, out, work):
    """A single-process run: (seconds, peak RSS MiB)."""
    path = os.path.join(work, f"single-{kind}.json")
    with open(path, "w") as f:
        json.dump(task_doc(kind, source, out, args.output_chunk_size), f)
    t = time.time()
    doc = json.loads(run([args.cuboids, "run-task", path]))
    return time.time() - t, doc.get("peak_rss_bytes", 0) / 2**20


def staged(args, kind, source, out, plan_dir):
    """Every stage's tasks as Batch children: [(stage, tasks, largest peak MiB, seconds)]."""
    flag = "--affinity" if kind == "segment" else "--input"
    doc = task_doc(kind, source, out, args.output_chunk_size)
    task_mib = args.task_mib if kind == "segment" else args.components_task_mib
    cmd = [args.cuboids, "plan", kind, flag, source, "--output", out,
           "--threshold", str(doc["threshold"]), "--gzip-level", "0",
           "--output-chunk-size", args.output_chunk_size,
           "--task-mib", str(task_mib), "--manifests", plan_dir + "/"]
    if kind != "segment":
        cmd += ["--connectivity", "26", "--dust", "10"]
    stages = json.loads(run(cmd))["stages"]
    estimate = {}
    for line in run(cmd[:-2] + ["--estimate"]).splitlines()[2:-1]:
        fields = line.split()
        estimate[fields[0]] = int(fields[2])
    rows = []
    for s in stages:
        peak, seconds = 0, 0.0
        for i in range(s["tasks"]):
            env = dict(os.environ, AWS_BATCH_JOB_ARRAY_INDEX=str(i))
            t = time.time()
            doc = json.loads(run([args.cuboids, "batch", "--manifest", s["manifest"]], env))
            seconds += time.time() - t
            peak = max(peak, doc["peak_rss_bytes"])
        rows.append((s["stage"], s["tasks"], peak / 2**20, seconds, estimate.get(s["stage"])))
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cuboids", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--task-mib", type=int, default=400, help="segment plans")
    p.add_argument("--components-task-mib", type=int, default=40)
    p.add_argument("--output-chunk-size", default="64,64,64")
    p.add_argument("--sizes", nargs=2, default=["192,192,64", "384,384,64"])
    p.add_argument("--affinities", nargs="+", default=["em-like", "noisy-cells"])
    p.add_argument("--pipelines", nargs="+", default=["segment", "connected-components"])
    args = p.parse_args()
    os.makedirs(args.work, exist_ok=True)
    worst = 1.0
    for data in args.affinities:
        for kind in args.pipelines:
            if kind != "segment" and data != args.affinities[0]:
                continue  # the probability map is the same for both affinity kinds
            results = []
            for size in args.sizes:
                aff, prob = volumes(args, data, size, args.work)
                source = aff if kind == "segment" else prob
                tag = f"{kind}-{data}-{size.replace(',', 'x')}"
                whole = os.path.join(args.work, tag, "single")
                out = os.path.join(args.work, tag, "staged")
                for d in (whole, out):
                    shutil.rmtree(d, ignore_errors=True)
                os.makedirs(os.path.join(args.work, tag), exist_ok=True)
                seconds, rss = single(args, kind, source, whole, os.path.join(args.work, tag))
                rows = staged(args, kind, source, out, os.path.join(args.work, tag, "plan"))
                if digests(out) != digests(whole):
                    sys.exit(f"{tag}: the staged output differs from the single process's")
                total = sum(r[3] for r in rows)
                print(f"{tag}: single process {seconds:.2f} s, {rss:.0f} MiB; staged "
                      f"{total:.2f} s in tasks = "
                      f"{total / seconds:.2f}x; output equal", flush=True)
                results.append((size, rss, rows))
            (small, rss_small, a), (large, rss_large, b) = results
            print(f"\n{kind}, {data}: largest task per stage, MiB ({small} -> {large}), "
                  f"and the plan's estimate")
            print(f"  {'single process':14} {rss_small:7.0f} {rss_large:7.0f}  "
                  f"{rss_large / rss_small:5.2f}x")
            by_name = {r[0]: r for r in b}
            for stage, tasks, mib, _, est in a:
                if stage not in by_name:
                    print(f"  {stage:14} {mib:7.0f}       -         est {est}  ({tasks} tasks; "
                          f"not at {large})")
                    continue
                other = by_name[stage]
                ratio = other[2] / mib
                worst = max(worst, ratio)
                print(f"  {stage:14} {mib:7.0f} {other[2]:7.0f}  {ratio:5.2f}x  est {est} "
                      f"{other[4]}  ({tasks} -> {other[1]} tasks)")
            for stage, tasks, mib, _, est in b:
                if stage not in {r[0] for r in a}:
                    print(f"  {stage:14}       - {mib:7.0f}         est {est}  ({tasks} tasks; "
                          f"only at {large})")
            print(flush=True)
    print(f"largest growth of a stage's largest task: {worst:.2f}x")


if __name__ == "__main__":
    main()
