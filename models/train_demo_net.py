"""Trains the demo's affinity net and writes it as ONNX: em_affinities.onnx.

A small RSUNet-like 3D U-Net (widths 8-16-32, two (2,2,1) poolings, residual additions across the
skips, same padding) learns the three nearest-neighbour affinities (x, y, z: channel c at v is
the edge between v and v - e_c, as `cuboids segment` reads them) from the project's synthetic
EM-like images (`src/runtime/synthetic.rs`, ported below) and their ground-truth cells.

It trains on a region far from the origin (x from 20000) and the demo runs it at the origin, so
the cells the demo segments were never seen in training. JAX on the CPU (no CUDA wheels), Adam,
binary cross-entropy; the graph is written from the trained weights with onnx.helper and checked
against onnxruntime before it is saved.

    python3 -m venv v && v/bin/pip install "jax[cpu]==0.10.2" optax==0.2.8 onnx==1.23.2 \
        onnxruntime==1.32.0 numpy==2.4.6
    v/bin/python models/train_demo_net.py          # ~10 minutes on 2 cores

Prints the held-out loss and affinity accuracy as it goes.
"""

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime
import optax
from onnx import TensorProto, helper, numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "em_affinities.onnx")
PATCH = (16, 64, 64)  # z, y, x: the model's static input shape
WIDTHS = (8, 16, 32)
STEPS = int(os.environ.get("STEPS", "1500"))
BATCH = 2
SEED = 0

# ---- the synthetic EM-like volume, as src/runtime/synthetic.rs makes it ----------------------

M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
CELL = 48


def hash64(x):
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(33))
        x = x * np.uint64(0xFF51AFD7ED558CCD)
        x = x ^ (x >> np.uint64(33))
        x = x * np.uint64(0xC4CEB9FE1A85EC53)
    return x ^ (x >> np.uint64(33))


def as_u64(i):
    return np.asarray(i, dtype=np.int64).astype(np.uint64)


def em_like(offset, shape):
    """(image uint8, labels uint64), arrays indexed [z, y, x], for voxels offset..offset+shape
    (x, y, z order)."""
    x, y, z = np.meshgrid(
        *[np.arange(o, o + s, dtype=np.int64) for o, s in zip(offset, shape)], indexing="ij"
    )
    p = [x.astype(np.float32), y.astype(np.float32), z.astype(np.float32) * np.float32(4)]
    cell = [np.floor(q / np.float32(CELL)).astype(np.int64) for q in p]
    best = np.full(x.shape, np.finfo(np.float32).max, np.float32)
    second = best.copy()
    best_id = np.zeros(x.shape, np.uint64)
    for dz in (-1, 0, 1):
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                c = [cell[0] + dx, cell[1] + dy, cell[2] + dz]
                h = hash64(as_u64(c[0]) ^ (as_u64(c[1]) << np.uint64(21)) ^ (as_u64(c[2]) << np.uint64(42)))
                d = np.zeros(x.shape, np.float32)
                for i in range(3):
                    frac = ((h >> np.uint64(i * 16)) & np.uint64(0xFFFF)).astype(np.float32) / np.float32(65536)
                    s = (c[i].astype(np.float32) + frac) * np.float32(CELL)
                    d += (s - p[i]) ** 2
                ident = hash64(as_u64(c[0]) ^ (as_u64(c[1]) << np.uint64(20)) ^ (as_u64(c[2]) << np.uint64(40))) >> np.uint64(24)
                closer = d < best
                second = np.where(closer, best, np.where(d < second, d, second))
                best = np.where(closer, d, best)
                best_id = np.where(closer, ident, best_id)
    edge = np.sqrt(second) - np.sqrt(best)
    membrane = np.maximum(np.float32(1) - edge / np.float32(3), 0)
    noise = (hash64(as_u64(x) | (as_u64(y) << np.uint64(20)) | (as_u64(z) << np.uint64(40))) & np.uint64(31)).astype(np.float32)
    image = np.clip(np.float32(170) - np.float32(120) * membrane + noise - np.float32(16), 0, 255).astype(np.uint8)
    # meshgrid gave [x, y, z]; the net reads [z, y, x].
    return image.transpose(2, 1, 0).copy(), (best_id + np.uint64(1)).transpose(2, 1, 0).copy()


def affinities(labels):
    """[3, z, y, x] float32: channel c (x, y, z) at v is 1 where v and v - e_c are in one cell,
    0 across cells and on the volume's low faces."""
    aff = np.zeros((3,) + labels.shape, np.float32)
    aff[0, :, :, 1:] = labels[:, :, 1:] == labels[:, :, :-1]
    aff[1, :, 1:, :] = labels[:, 1:, :] == labels[:, :-1, :]
    aff[2, 1:, :, :] = labels[1:, :, :] == labels[:-1, :, :]
    return aff


# ---- the net ------------------------------------------------------------------------------

def conv_params(key, cin, cout, k):
    fan_in = cin * k[0] * k[1] * k[2]
    w = jax.random.normal(key, (cout, cin) + k) * np.sqrt(2.0 / fan_in)
    return {"w": w, "b": jnp.zeros((cout,))}


def init(key):
    keys = iter(jax.random.split(key, 32))
    k3 = (3, 3, 3)
    a, b, c = WIDTHS
    params = {
        "d0a": conv_params(next(keys), 1, a, k3), "d0b": conv_params(next(keys), a, a, k3),
        "d1a": conv_params(next(keys), a, b, k3), "d1b": conv_params(next(keys), b, b, k3),
        "d2a": conv_params(next(keys), b, c, k3), "d2b": conv_params(next(keys), c, c, k3),
        "u1c": conv_params(next(keys), b, b, k3), "u0c": conv_params(next(keys), a, a, k3),
        "out": conv_params(next(keys), a, 3, (1, 1, 1)),
    }
    for name, cin, cout in (("up1", c, b), ("up0", b, a)):
        # ConvTranspose weights as ONNX keeps them: (C_in, C_out, kz, ky, kx).
        w = jax.random.normal(next(keys), (cin, cout, 1, 2, 2)) * np.sqrt(1.0 / cin)
        params[name] = {"w": w, "b": jnp.zeros((cout,))}
    return params


def conv(p, x):
    y = jax.lax.conv_general_dilated(
        x, p["w"], (1, 1, 1), "SAME", dimension_numbers=("NCDHW", "OIDHW", "NCDHW"))
    return y + p["b"][None, :, None, None, None]


def pool(x):
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 1, 1, 2, 2), (1, 1, 1, 2, 2), "VALID")


def up(p, x):
    # ConvTranspose with kernel = stride = (1, 2, 2): each voxel spreads to a 2x2 block.
    n, _, d, h, w = x.shape
    y = jnp.einsum("nidhw,ioab->nodhawb", x, p["w"][:, :, 0])
    return y.reshape(n, -1, d, 2 * h, 2 * w) + p["b"][None, :, None, None, None]


def forward(params, x):
    relu = jax.nn.relu
    s0 = relu(conv(params["d0b"], relu(conv(params["d0a"], x))))
    s1 = relu(conv(params["d1b"], relu(conv(params["d1a"], pool(s0)))))
    s2 = relu(conv(params["d2b"], relu(conv(params["d2a"], pool(s1)))))
    u1 = relu(conv(params["u1c"], up(params["up1"], s2) + s1))
    u0 = relu(conv(params["u0c"], up(params["up0"], u1) + s0))
    return conv(params["out"], u0)  # logits; the ONNX graph ends in a Sigmoid


def loss_fn(params, x, y):
    logits = forward(params, x)
    return optax.sigmoid_binary_cross_entropy(logits, y).mean()


# ---- ONNX ---------------------------------------------------------------------------------

def to_onnx(params):
    nodes, inits = [], []

    def weights(name, p):
        inits.append(numpy_helper.from_array(np.asarray(p["w"], np.float32), name + ".w"))
        inits.append(numpy_helper.from_array(np.asarray(p["b"], np.float32), name + ".b"))
        return [name + ".w", name + ".b"]

    def conv_node(name, x, k, relu=True):
        pads = [k // 2] * 3 * 2 if k > 1 else [0] * 6
        nodes.append(helper.make_node("Conv", [x] + weights(name, params[name]), [name],
                                      kernel_shape=[k] * 3, pads=pads))
        if not relu:
            return name
        nodes.append(helper.make_node("Relu", [name], [name + ".relu"]))
        return name + ".relu"

    def pool_node(name, x):
        nodes.append(helper.make_node("MaxPool", [x], [name], kernel_shape=[1, 2, 2], strides=[1, 2, 2]))
        return name

    def up_node(name, x, skip):
        nodes.append(helper.make_node("ConvTranspose", [x] + weights(name, params[name]), [name],
                                      kernel_shape=[1, 2, 2], strides=[1, 2, 2]))
        nodes.append(helper.make_node("Add", [name, skip], [name + ".add"]))
        return name + ".add"

    s0 = conv_node("d0b", conv_node("d0a", "input", 3), 3)
    s1 = conv_node("d1b", conv_node("d1a", pool_node("pool0", s0), 3), 3)
    s2 = conv_node("d2b", conv_node("d2a", pool_node("pool1", s1), 3), 3)
    u1 = conv_node("u1c", up_node("up1", s2, s1), 3)
    u0 = conv_node("u0c", up_node("up0", u1, s0), 3)
    logits = conv_node("out", u0, 1, relu=False)
    nodes.append(helper.make_node("Sigmoid", [logits], ["affinities"]))
    graph = helper.make_graph(
        nodes, "em_affinities",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, *PATCH])],
        [helper.make_tensor_value_info("affinities", TensorProto.FLOAT, [1, 3, *PATCH])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                              producer_name="cuboids models/train_demo_net.py")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


# ---- training -----------------------------------------------------------------------------

def main():
    t0 = time.time()
    train_img, train_lab = em_like((20000, 0, 0), (384, 384, 96))
    val_img, val_lab = em_like((40000, 0, 0), (128, 128, 32))
    train_aff, val_aff = affinities(train_lab), affinities(val_lab)
    print(f"data made in {time.time() - t0:.1f} s", flush=True)

    key = jax.random.PRNGKey(SEED)
    params = init(key)
    schedule = optax.cosine_decay_schedule(2e-3, STEPS, alpha=0.05)
    opt = optax.adam(schedule)
    state = opt.init(params)

    @jax.jit
    def step(params, state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    @jax.jit
    def evaluate(params, x, y):
        logits = forward(params, x)
        loss = optax.sigmoid_binary_cross_entropy(logits, y).mean()
        return loss, ((logits > 0) == (y > 0.5)).mean()

    rng = np.random.default_rng(SEED)

    def crop(img, aff, at):
        z, y, x = at
        sl = (slice(z, z + PATCH[0]), slice(y, y + PATCH[1]), slice(x, x + PATCH[2]))
        return img[sl].astype(np.float32) / 255.0, aff[(slice(None),) + sl]

    def batch():
        xs, ys = [], []
        for _ in range(BATCH):
            at = [rng.integers(0, s - p + 1) for s, p in zip(train_img.shape, PATCH)]
            x, y = crop(train_img, train_aff, at)
            xs.append(x[None])
            ys.append(y)
        return jnp.asarray(np.stack(xs)), jnp.asarray(np.stack(ys))

    val = [crop(val_img, val_aff, (z, y, x)) for z in (0, 16) for y in (0, 64) for x in (0, 64)]
    val_x = jnp.asarray(np.stack([v[0][None] for v in val]))
    val_y = jnp.asarray(np.stack([v[1] for v in val]))
    for i in range(STEPS + 1):
        if i % 100 == 0:
            loss, acc = evaluate(params, val_x, val_y)
            print(f"step {i}: held-out loss {float(loss):.4f}, affinity accuracy {float(acc):.4f}"
                  f" ({time.time() - t0:.0f} s)", flush=True)
        if i < STEPS:
            x, y = batch()
            params, state, _ = step(params, state, x, y)

    model = to_onnx(params)
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.asarray(val_x[:1])
    (ours,) = session.run(None, {"input": x})
    theirs = np.asarray(jax.nn.sigmoid(forward(params, jnp.asarray(x))))
    err = float(np.abs(ours - theirs).max())
    print(f"onnxruntime vs JAX: max |diff| {err:.2e}")
    if err > 1e-4:
        sys.exit("the ONNX graph does not compute what was trained")
    onnx.save(model, OUT)
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes) in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
