#!/usr/bin/env python3
"""`cuboids infer` side by side with chunkflow + onnxruntime and onnxruntime alone, on the same
RSUNet-like ONNX model and the same uint8 EM-like image, in one run on one machine.

    python -m venv v && v/bin/pip install onnx==1.23.2 onnxruntime==1.32.0 chunkflow==1.2.0 numpy
    cargo build --release
    v/bin/python benches/infer_compare.py [--widths 16,32,64,128] [--patch 256,256,20]
        [--overlap 64,64,4] [--volume 256,256,20] [--engines gpu,native,reference] [--skip-chunkflow]

The net (built here with onnx.helper, random weights; inference cost does not depend on them):
an input conv (1,5,5), at each level a residual block of two BN-ReLU-conv 3x3x3, max-pool
(1,2,2) and a 1x1x1 conv to the next width on the way down, depthwise ConvTranspose (1,4,4)
stride (1,2,2) + 1x1x1 conv + add on the way up, a 1x1x1 conv to 3 channels and a sigmoid.
Prints MVx/s (output voxels per second) and effective GFLOP/s (2 per multiply-add of every Conv
and ConvTranspose, counted from the model) for each; the onnxruntime-alone line is the floor:
the net on the same patches with no blending, reading or writing. Axes are x,y,z here.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def vec3(text):
    return [int(v) for v in text.split(",")]


ap = argparse.ArgumentParser()
ap.add_argument("--widths", default="16,32,64,128")
ap.add_argument("--patch", default="256,256,20", type=vec3)
ap.add_argument("--overlap", default="64,64,4", type=vec3)
ap.add_argument("--volume", default="256,256,20", type=vec3)
ap.add_argument("--engines", default="gpu")
ap.add_argument("--skip-chunkflow", action="store_true")
ap.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: all)")
args = ap.parse_args()
widths = [int(w) for w in args.widths.split(",")]
rng = np.random.default_rng(1)


def rsunet(widths):
    nodes, inits = [], []
    count = [0]

    def fresh(prefix):
        count[0] += 1
        return f"{prefix}{count[0]}"

    def conv(x, cin, cout, k, pads, group=1):
        w, b, y = fresh("w"), fresh("b"), fresh("t")
        fan = cin // group * int(np.prod(k))
        inits.append(numpy_helper.from_array(
            (rng.standard_normal([cout, cin // group] + k) * (2.0 / fan) ** 0.5).astype(np.float32), w))
        inits.append(numpy_helper.from_array((rng.standard_normal(cout) * 0.05).astype(np.float32), b))
        nodes.append(helper.make_node("Conv", [x, w, b], [y], pads=pads, group=group))
        return y

    def bn_relu(x, c):
        p, y, r = fresh("bn"), fresh("t"), fresh("t")
        for name, v in [("s", rng.uniform(0.8, 1.2, c)), ("b", rng.standard_normal(c) * 0.05),
                        ("m", rng.standard_normal(c) * 0.05), ("v", rng.uniform(0.5, 1.5, c))]:
            inits.append(numpy_helper.from_array(v.astype(np.float32), p + name))
        nodes.append(helper.make_node("BatchNormalization", [x] + [p + n for n in "sbmv"], [y]))
        nodes.append(helper.make_node("Relu", [y], [r]))
        return r

    def block(x, c):
        y = conv(bn_relu(x, c), c, c, [3, 3, 3], [1] * 6)
        y = conv(bn_relu(y, c), c, c, [3, 3, 3], [1] * 6)
        out = fresh("t")
        nodes.append(helper.make_node("Add", [x, y], [out]))
        return out

    x = conv("x", 1, widths[0], [1, 5, 5], [0, 2, 2, 0, 2, 2])
    skips = []
    for level, width in enumerate(widths):
        if level > 0:
            pooled = fresh("t")
            nodes.append(helper.make_node("MaxPool", [x], [pooled], kernel_shape=[1, 2, 2],
                                          strides=[1, 2, 2]))
            x = conv(pooled, widths[level - 1], width, [1, 1, 1], [0] * 6)
        x = block(x, width)
        skips.append(x)
    for level in range(len(widths) - 2, -1, -1):
        w, up = fresh("w"), fresh("t")
        inits.append(numpy_helper.from_array(
            (rng.standard_normal([widths[level + 1], 1, 1, 4, 4]) * 0.25).astype(np.float32), w))
        nodes.append(helper.make_node("ConvTranspose", [x, w], [up], group=widths[level + 1],
                                      strides=[1, 2, 2], pads=[0, 1, 1, 0, 1, 1]))
        y = conv(up, widths[level + 1], widths[level], [1, 1, 1], [0] * 6)
        added = fresh("t")
        nodes.append(helper.make_node("Add", [y, skips[level]], [added]))
        x = block(added, widths[level])
    x = conv(bn_relu(x, widths[0]), widths[0], 3, [1, 1, 1], [0] * 6)
    nodes.append(helper.make_node("Sigmoid", [x], ["y"]))
    px, py, pz = args.patch
    graph = helper.make_graph(nodes, "rsunet",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, pz, py, px])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, pz, py, px])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def flops(model):
    """2 per multiply-add of every Conv and ConvTranspose, from onnx's shape inference."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(inferred.graph.value_info) + list(inferred.graph.input)
              + list(inferred.graph.output)}
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    total = 0
    for n in model.graph.node:
        if n.op_type == "Conv":
            w = weights[n.input[1]]
            total += 2 * int(np.prod(shapes[n.output[0]])) * int(np.prod(w[1:]))
        elif n.op_type == "ConvTranspose":
            w = weights[n.input[1]]
            total += 2 * int(np.prod(shapes[n.input[0]])) * int(np.prod(w[1:]))
    return total


def em_like(shape_xyz):
    x, y, z = shape_xyz
    noise = rng.uniform(0, 1, (z, y, x))
    for _ in range(2):
        for axis in (1, 2):
            noise = (noise + np.roll(noise, 1, axis) + np.roll(noise, -1, axis)) / 3
    return (1 + 254 * (noise - noise.min()) / (noise.max() - noise.min())).astype(np.uint8)


def patch_starts(n, patch, overlap):
    stride = patch - overlap
    return [min(s, n - patch) for s in range(0, n - overlap, stride)]


work = tempfile.mkdtemp(prefix="infer-cmp")
model = rsunet(widths)
model_path = os.path.join(work, "rsunet.onnx")
onnx.save(model, model_path)
per_patch = flops(model)
patch_voxels = int(np.prod(args.patch))
image = em_like(args.volume)
voxels = image.size
grid = [patch_starts(n, p, o) for n, p, o in zip(args.volume, args.patch, args.overlap)]
patches = len(grid[0]) * len(grid[1]) * len(grid[2])
total_flops = per_patch * patches
print(f"RSUNet widths {widths}: {per_patch / patch_voxels / 1e3:.0f} kFLOP per patch voxel; "
      f"volume {args.volume} (x,y,z), patch {args.patch}, overlap {args.overlap}: {patches} patches")


def report(name, seconds):
    print(f"{name:<34} {seconds:8.2f} s  {voxels / 1e6 / seconds:7.3f} MVx/s  "
          f"{total_flops / 1e9 / seconds:7.1f} GFLOP/s")


# The image as a precomputed layer.
layer = os.path.join(work, "image")
os.makedirs(os.path.join(layer, "8_8_40"))
cx, cy, cz = [min(64, n) for n in args.volume[:2]] + [min(16, args.volume[2])]
with open(os.path.join(layer, "info"), "w") as f:
    json.dump({"type": "image", "data_type": "uint8", "num_channels": 1, "scales": [{
        "key": "8_8_40", "size": args.volume, "resolution": [8, 8, 40], "voxel_offset": [0, 0, 0],
        "chunk_sizes": [[cx, cy, cz]], "encoding": "raw"}]}, f)
X, Y, Z = args.volume
for z0 in range(0, Z, cz):
    for y0 in range(0, Y, cy):
        for x0 in range(0, X, cx):
            x1, y1, z1 = min(x0 + cx, X), min(y0 + cy, Y), min(z0 + cz, Z)
            block = image[z0:z1, y0:y1, x0:x1]
            name = f"{x0}-{x1}_{y0}-{y1}_{z0}-{z1}"
            block.tofile(os.path.join(layer, "8_8_40", name))

cuboids = os.path.join(ROOT, "target", "release", "cuboids")
results = {}
for run, engine in enumerate(args.engines.split(",")):
    out = os.path.join(work, f"aff-{engine}-{run}")
    cmd = [cuboids, "infer", "--image", layer, "--model", model_path, "--output", out,
           "--patch", ",".join(map(str, args.patch)), "--overlap", ",".join(map(str, args.overlap))]
    # gpu: the WGSL executor (lavapipe where there is no GPU); native: convolutions as matrix
    # products on the CPU's cores; reference (or cpu): the reference operators.
    cmd += ["--engine", "reference" if engine == "cpu" else engine]
    t = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.time() - t
    if done.returncode != 0:
        sys.exit(f"cuboids infer ({engine}) failed:\n{done.stderr}")
    engine_name = {"cpu": "CPU reference", "reference": "CPU reference", "gpu": "WGSL",
                   "native": "native CPU"}[engine]
    report(f"cuboids infer ({engine_name})", elapsed)
    results[engine] = out

options = ort.SessionOptions()
if args.threads:
    options.intra_op_num_threads = args.threads
session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
normalised = image.astype(np.float32) / 255
px, py, pz = args.patch
t = time.time()
for z in grid[2]:
    for y in grid[1]:
        for x in grid[0]:
            patch = normalised[z:z + pz, y:y + py, x:x + px][None, None]
            session.run(None, {"x": np.ascontiguousarray(patch)})
report("onnxruntime alone (same patches)", time.time() - t)

if not args.skip_chunkflow:
    from chunkflow.chunk import Chunk
    from chunkflow.flow.divid_conquer.inferencer import Inferencer
    net = os.path.join(work, "net.py")
    with open(net, "w") as f:
        f.write(
            "import numpy as np, onnxruntime\n"
            "class PatchInferencer:\n"
            "    def __init__(self, weights, mask):\n"
            f"        o = onnxruntime.SessionOptions()\n"
            f"        if {args.threads}: o.intra_op_num_threads = {args.threads}\n"
            "        self.s = onnxruntime.InferenceSession(weights, o, providers=['CPUExecutionProvider'])\n"
            "        self.mask = np.asarray(mask, np.float32)\n"
            "    def __call__(self, patch):\n"
            "        return self.s.run(None, {'x': np.ascontiguousarray(patch, np.float32)})[0] * self.mask\n")
    inferencer = Inferencer(net, model_path, input_patch_size=(pz, py, px),
                            output_patch_overlap=tuple(reversed(args.overlap)),
                            num_output_channels=3, framework="universal", batch_size=1,
                            bump="wu", mask_output_chunk=True)
    t = time.time()
    out = inferencer(Chunk(image, voxel_offset=(0, 0, 0)))
    report("chunkflow + onnxruntime", time.time() - t)
    # The same numbers: cuboids' layer against chunkflow's output.
    from cloudvolume import CloudVolume
    for engine, path in results.items():
        got = np.asarray(CloudVolume(f"file://{path}", progress=False)[:, :, :])  # x, y, z, c
        diff = np.abs(got.transpose(3, 2, 1, 0) - np.asarray(out.array)).max()
        print(f"largest difference, cuboids ({engine}) vs chunkflow: {float(diff):.2e}")
