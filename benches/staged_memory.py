#!/usr/bin/env python3
"""Peak host memory and time of every stage of a staged segment plan, run task by task as Batch
array children would (`cuboids batch` with AWS_BATCH_JOB_ARRAY_INDEX), with one merge task and
with merge rounds, next to a single-process `cuboids segment` of the same affinity map.

    benches/staged_memory.py --cuboids target/release/cuboids --affinity DIR --work DIR \
        [--task-mib 200] [--threshold 0.7]

DIR of --affinity: a precomputed affinity map, e.g. what `cuboids bench-segment --keep` leaves
(`<folder>/affinities`). Prints, per plan and stage, the tasks, the largest peak RSS of a task
(MiB) and the stage's summed seconds; checks that every staged output equals the single run.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time


def run(cmd, env=None):
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return out.stdout


def labels(cuboids, path):
    """The md5 of every output chunk file under path (the layers are written alike)."""
    import hashlib

    digest = {}
    for root, _, files in os.walk(path):
        if ".cuboids-staging" in root:
            continue
        for f in files:
            if f == "info" or f == "provenance":
                continue
            full = os.path.join(root, f)
            with open(full, "rb") as fh:
                digest[os.path.relpath(full, path)] = hashlib.md5(fh.read()).hexdigest()
    return digest


def single(args, out):
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.time()
    run([args.cuboids, "segment", "--affinity", args.affinity, "--output", out,
         "--threshold", str(args.threshold), "--gzip-level", "0"])
    seconds = time.time() - t
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # ru_maxrss of children is the largest child so far: valid when this run is the first.
    return seconds, peak / 1024 if peak > before else float("nan")


def staged(args, out, plan_dir, merge_mib):
    prefix = plan_dir + "/"
    printed = run([args.cuboids, "plan", "segment", "--affinity", args.affinity, "--output", out,
                   "--threshold", str(args.threshold), "--gzip-level", "0",
                   "--task-mib", str(args.task_mib), "--merge-mib", str(merge_mib),
                   "--manifests", prefix])
    stages = json.loads(printed)["stages"]
    rows = []
    for s in stages:
        peak, seconds = 0, 0.0
        for i in range(s["tasks"]):
            env = dict(os.environ, AWS_BATCH_JOB_ARRAY_INDEX=str(i))
            doc = json.loads(run([args.cuboids, "batch", "--manifest", s["manifest"]], env))
            peak = max(peak, doc["peak_rss_bytes"])
            seconds += doc["seconds"]
        rows.append((s["stage"], s["tasks"], peak / 2**20, seconds))
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cuboids", required=True)
    p.add_argument("--affinity", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--task-mib", type=int, default=200)
    p.add_argument("--threshold", type=float, default=0.7)
    args = p.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    whole = os.path.join(args.work, "single")
    seconds, peak = single(args, whole)
    print(f"single process: {seconds:.2f} s, peak RSS {peak:.0f} MiB")
    expected = labels(args.cuboids, whole)
    for name, merge_mib in [("one merge task", 1 << 20), ("merge rounds", 0)]:
        out = os.path.join(args.work, f"staged-{merge_mib}")
        rows = staged(args, out, os.path.join(args.work, f"plan-{merge_mib}"), merge_mib)
        if labels(args.cuboids, out) != expected:
            sys.exit(f"{name}: the staged output differs from the single process's")
        total = sum(r[3] for r in rows)
        print(f"{name} (--task-mib {args.task_mib}): {total:.2f} s in tasks, "
              f"{total / seconds:.2f}x the single process; output equal")
        for stage, tasks, mib, secs in rows:
            print(f"  {stage:10} {tasks:4} tasks  peak {mib:7.0f} MiB  {secs:7.2f} s")


if __name__ == "__main__":
    main()
