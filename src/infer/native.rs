//! A native CPU engine: the model walked node by node as the reference does, with the
//! convolutions, where nearly all the arithmetic is, as matrix products on this CPU's vector
//! units. A convolution's output is cut into tiles of about [`TILE_BYTES`] of unrolled input;
//! per tile its input is unrolled (im2col: a row per input channel and tap, a column per
//! output voxel, zeros where a tap falls in the padding) and multiplied by the weights
//! ([M, C/g·taps], as ONNX stores them) with the `gemm` crate (its AVX2+FMA or NEON kernels,
//! chosen at run time); where the stride and dilation along x are 1, only the z and y taps
//! are unrolled and the x taps are the same rows shifted (one product per x tap, summed).
//! Tiles run on rayon's threads. ConvTranspose, pooling, BatchNormalization, activations and
//! same-shape binaries run per channel or value on the threads, an activation fused into the
//! Conv or BatchNormalization before it; other operators are the reference's. Results equal
//! the reference to float rounding (products sum in another order), and a patch's bytes do
//! not depend on the thread count (each tile is its own products).

use super::cpu::{self, Produced};
use super::model::{InferError, Model, Node, Op};
use super::region::Executor;
use crate::ops::nn::{self, ncs, Activation, Binary, NnError, Pool, Tensor, Window};
use rayon::prelude::*;

/// Bytes of one tile's unrolled input: about what a core's L2 cache holds.
const TILE_BYTES: usize = 1 << 20;

/// Convolutions as matrix products on the CPU, the other operators on every core too, and an
/// activation fused into the Conv or BatchNormalization before it where it alone reads that
/// node's output (one pass and one tensor fewer, the same values).
pub struct NativeExecutor {
    model: Model,
    /// Per node: the activation applied to its output (a Conv's or BatchNormalization's).
    epilogue: Vec<Option<Activation>>,
    /// Per node: an activation fused into the node that makes this slot, which it takes over.
    taken_from: Vec<Option<usize>>,
}

impl NativeExecutor {
    pub fn new(model: Model) -> NativeExecutor {
        let readers = model.reader_counts();
        let maker = model.writers();
        let mut epilogue = vec![None; model.nodes.len()];
        let mut taken_from = vec![None; model.nodes.len()];
        for (j, node) in model.nodes.iter().enumerate() {
            let (Op::Activation(a), Some(Some(slot))) = (&node.op, node.inputs.first()) else {
                continue;
            };
            let Some(&i) = maker.get(slot) else { continue };
            let fusable = matches!(model.nodes[i].op, Op::Conv { .. } | Op::BatchNorm { .. });
            if fusable && readers[*slot] == 1 && epilogue[i].is_none() {
                epilogue[i] = Some(*a);
                taken_from[j] = Some(*slot);
            }
        }
        NativeExecutor {
            model,
            epilogue,
            taken_from,
        }
    }

    /// The model's output for one patch, walked as the reference walks it, each node's
    /// time handed to `timed`; released values' buffers are reused for later outputs.
    fn walk(
        &self,
        input: Tensor,
        mut timed: impl FnMut(&Node, &[Option<&Tensor>], std::time::Duration),
    ) -> Result<Tensor, InferError> {
        let buffers = std::cell::RefCell::new(Buffers::default());
        cpu::run_with(
            &self.model,
            input,
            |i, node, ins| {
                if let Some(slot) = self.taken_from[i] {
                    return Ok(Produced::Taken(slot));
                }
                let t = std::time::Instant::now();
                let out = self.node(node, ins, self.epilogue[i], &mut buffers.borrow_mut())?;
                timed(node, ins, t.elapsed());
                Ok(Produced::Value(out))
            },
            |t| buffers.borrow_mut().give(t.data),
        )
    }
}

impl Executor for NativeExecutor {
    fn run(&self, patch: Tensor) -> Result<Tensor, InferError> {
        if std::env::var_os("CUBOIDS_PROFILE_KERNELS").is_none() {
            return self.walk(patch, |_, _, _| {});
        }
        let mut times = std::collections::BTreeMap::<String, f64>::new();
        let out = self.walk(patch, |node, ins, took| {
            // Convolutions by their weights' and input's shapes; the rest by operator.
            let key = match (&node.op, ins.get(1).copied().flatten(), ins[0]) {
                (Op::Conv { .. } | Op::ConvTranspose { .. }, Some(w), Some(x)) => {
                    format!("{} {:?} on {:?}", node.op_type, w.shape, x.shape.get(2..))
                }
                _ => node.op_type.clone(),
            };
            *times.entry(key).or_default() += took.as_secs_f64();
        });
        tracing::info!(?times, "native node seconds by operator");
        out
    }

    fn engine(&self) -> &'static str {
        "native-cpu"
    }
}

impl NativeExecutor {
    fn node(
        &self,
        node: &Node,
        ins: &[Option<&Tensor>],
        epilogue: Option<Activation>,
        buffers: &mut Buffers,
    ) -> Result<Tensor, NnError> {
        match &node.op {
            Op::Conv { window, group } => {
                let x = input(ins, 0)?;
                let spatial = x.shape.get(2..).unwrap_or(&[]);
                conv(
                    x,
                    input(ins, 1)?,
                    ins.get(2).copied().flatten(),
                    &window.resolve(spatial)?,
                    *group,
                    epilogue,
                    buffers,
                )
            }
            Op::ConvTranspose {
                window,
                output_padding,
                group,
            } => {
                let x = input(ins, 0)?;
                let spatial = x.shape.get(2..).unwrap_or(&[]);
                conv_transpose(
                    x,
                    input(ins, 1)?,
                    ins.get(2).copied().flatten(),
                    &window.resolve(spatial)?,
                    super::model::widened(output_padding),
                    *group,
                    buffers,
                )
            }
            Op::Pool { kind, window, ceil } => {
                let x = input(ins, 0)?;
                let spatial = x.shape.get(2..).unwrap_or(&[]);
                pool(x, *kind, &window.resolve(spatial)?, *ceil, buffers)
            }
            Op::Activation(a) => {
                let x = input(ins, 0)?;
                let mut y = buffers.tensor(x.shape.clone());
                y.data
                    .par_iter_mut()
                    .zip(&x.data)
                    .for_each(|(o, &v)| *o = a.apply(v));
                Ok(y)
            }
            Op::BatchNorm { epsilon } => {
                let x = input(ins, 0)?;
                let p = |i: usize| input(ins, i).map(|t| t.data.as_slice());
                batch_norm(x, [p(1)?, p(2)?, p(3)?, p(4)?], *epsilon, epilogue, buffers)
            }
            Op::Binary(op) => {
                let (a, b) = (input(ins, 0)?, input(ins, 1)?);
                if a.shape != b.shape {
                    return cpu::execute(node, ins);
                }
                let f = |u: f32, v: f32| match op {
                    Binary::Add => u + v,
                    Binary::Sub => u - v,
                    Binary::Mul => u * v,
                    Binary::Div => u / v,
                };
                let mut y = buffers.tensor(a.shape.clone());
                y.data
                    .par_iter_mut()
                    .zip(a.data.par_iter().zip(&b.data))
                    .for_each(|(o, (&u, &v))| *o = f(u, v));
                Ok(y)
            }
            _ => cpu::execute(node, ins),
        }
    }
}

fn input<'a>(ins: &[Option<&'a Tensor>], i: usize) -> Result<&'a Tensor, NnError> {
    ins.get(i)
        .copied()
        .flatten()
        .ok_or_else(|| NnError::Shape(format!("input {i} is missing")))
}

/// Buffers of values no longer read, reused for later outputs: a fresh allocation of a large
/// tensor is mapped and faulted in page by page (measured: 6% of a patch of RSUNet).
#[derive(Default)]
struct Buffers(Vec<Vec<f32>>);

impl Buffers {
    fn give(&mut self, data: Vec<f32>) {
        self.0.push(data);
    }

    /// A tensor of `shape` whose values are left over from an earlier one: every operator
    /// here writes each of its outputs.
    fn tensor(&mut self, shape: Vec<usize>) -> Tensor {
        let len = shape.iter().product();
        let best = (0..self.0.len())
            .filter(|&i| self.0[i].capacity() >= len)
            .min_by_key(|&i| self.0[i].capacity());
        let data = match best {
            Some(i) => {
                let mut data = self.0.swap_remove(i);
                data.resize(len, 0.0);
                data
            }
            None => vec![0.0; len],
        };
        Tensor { shape, data }
    }
}

/// Output channel by output channel on the threads (`volume` values each, every one written
/// by `f`): what the per-channel operators below share.
fn per_channel(y: Tensor, volume: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) -> Tensor {
    let mut y = y;
    if volume > 0 {
        y.data
            .par_chunks_mut(volume)
            .enumerate()
            .for_each(|(channel, out)| f(channel, out));
    }
    y
}

/// BatchNormalization per channel, as the reference computes it.
fn batch_norm(
    x: &Tensor,
    [scale, bias, mean, var]: [&[f32]; 4],
    epsilon: f32,
    epilogue: Option<Activation>,
    buffers: &mut Buffers,
) -> Result<Tensor, NnError> {
    let (_, c, spatial) = ncs(&x.shape)?;
    if [scale.len(), bias.len(), mean.len(), var.len()] != [c; 4] {
        return Err(NnError::Shape(format!(
            "batch normalization parameters for {c} channels"
        )));
    }
    let volume: usize = spatial.iter().product();
    Ok(per_channel(
        buffers.tensor(x.shape.clone()),
        volume,
        |i, out| {
            let ch = i % c;
            let a = scale[ch] / (var[ch] + epsilon).sqrt();
            for (o, &v) in out.iter_mut().zip(&x.data[i * volume..][..volume]) {
                let y = (v - mean[ch]) * a + bias[ch];
                *o = epilogue.map_or(y, |f| f.apply(y));
            }
        },
    ))
}

/// The outputs `o0..o1` along one axis whose tap (at `offset` = k·dilation − pad) lands
/// inside the input: 0 <= o·stride + offset < `i_len`.
fn window_span(o_len: usize, i_len: usize, stride: usize, offset: isize) -> (usize, usize) {
    let lo = if offset >= 0 {
        0
    } else {
        ((-offset) as usize).div_ceil(stride)
    };
    let hi = if (i_len as isize) <= offset {
        0
    } else {
        ((i_len as isize - offset) as usize)
            .div_ceil(stride)
            .min(o_len)
    };
    (lo, hi.max(lo))
}

/// MaxPool and AveragePool per channel, taps in the reference's order.
fn pool(
    x: &Tensor,
    kind: Pool,
    window: &Window,
    ceil: bool,
    buffers: &mut Buffers,
) -> Result<Tensor, NnError> {
    let shape = nn::pool_shape(&x.shape, window, ceil)?;
    let (_, _, xs) = ncs(&x.shape)?;
    let (_, _, os) = ncs(&shape)?;
    let (x_volume, o_volume) = (xs.iter().product::<usize>(), os.iter().product::<usize>());
    let k = window.kernel;
    let offset =
        |a: usize, kk: usize| (kk * window.dilations[a]) as isize - window.begin[a] as isize;
    Ok(per_channel(
        buffers.tensor(shape),
        o_volume,
        |channel, out| {
            let input = &x.data[channel * x_volume..][..x_volume];
            let mut max = vec![f32::NEG_INFINITY; o_volume];
            let mut sum = vec![0.0f32; o_volume];
            let mut inside = vec![0u32; o_volume];
            for kz in 0..k[0] {
                let (z0, z1) = window_span(os[0], xs[0], window.strides[0], offset(0, kz));
                for ky in 0..k[1] {
                    let (y0, y1) = window_span(os[1], xs[1], window.strides[1], offset(1, ky));
                    for kx in 0..k[2] {
                        let (x0, x1) = window_span(os[2], xs[2], window.strides[2], offset(2, kx));
                        for oz in z0..z1 {
                            let iz = (oz * window.strides[0]) as isize + offset(0, kz);
                            for oy in y0..y1 {
                                let iy = (oy * window.strides[1]) as isize + offset(1, ky);
                                let row = (iz as usize * xs[1] + iy as usize) * xs[2];
                                let at = (oz * os[1] + oy) * os[2];
                                for ox in x0..x1 {
                                    let ix = (ox * window.strides[2]) as isize + offset(2, kx);
                                    let v = input[row + ix as usize];
                                    max[at + ox] = max[at + ox].max(v);
                                    sum[at + ox] += v;
                                    inside[at + ox] += 1;
                                }
                            }
                        }
                    }
                }
            }
            for (i, o) in out.iter_mut().enumerate() {
                *o = match kind {
                    Pool::Max => max[i],
                    Pool::Average { count_include_pad } => {
                        let divisor = if count_include_pad {
                            let o = [i / (os[1] * os[2]), i / os[2] % os[1], i % os[2]];
                            nn::padded_taps(window, o, xs)
                        } else {
                            (inside[i] as usize).max(1)
                        };
                        sum[i] / divisor as f32
                    }
                };
            }
        },
    ))
}

/// ConvTranspose (weights [C, M/group, k...]) output channel by output channel, each output
/// gathering the inputs that reach it: per input channel of its group, in the order of the
/// input positions, which is the order the reference spreads them in (the same sums).
fn conv_transpose(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    window: &Window,
    output_padding: [usize; 3],
    group: usize,
    buffers: &mut Buffers,
) -> Result<Tensor, NnError> {
    let shape = nn::conv_transpose_shape(&x.shape, &w.shape, window, output_padding, group)?;
    let (_, c, xs) = ncs(&x.shape)?;
    let (_, m, os) = ncs(&shape)?;
    nn::check_bias(b, m)?;
    let (in_per_group, out_per_group) = (c / group, m / group);
    let k = window.kernel;
    let taps = k[0] * k[1] * k[2];
    let (x_volume, o_volume) = (xs.iter().product::<usize>(), os.iter().product::<usize>());
    // Per output position along z and y: the (tap, input) pairs that reach it, inputs
    // ascending.
    let reach = |a: usize| -> Vec<Vec<(usize, usize)>> {
        (0..os[a])
            .map(|o| {
                let mut pairs: Vec<(usize, usize)> = (0..k[a])
                    .filter_map(|kk| {
                        let at = o as isize + window.begin[a] as isize
                            - (kk * window.dilations[a]) as isize;
                        let s = window.strides[a] as isize;
                        (at >= 0 && at % s == 0 && ((at / s) as usize) < xs[a])
                            .then_some((kk, (at / s) as usize))
                    })
                    .collect();
                pairs.sort_by_key(|&(_, i)| i);
                pairs
            })
            .collect()
    };
    let (reach_z, reach_y) = (reach(0), reach(1));
    // Along x, per tap: the inputs that land inside the output (output = i·s + shift).
    let (sx, kx_n) = (window.strides[2], k[2]);
    let x_taps: Vec<(usize, isize, std::ops::Range<usize>)> = (0..kx_n)
        .rev()
        .map(|kx| {
            let shift = (kx * window.dilations[2]) as isize - window.begin[2] as isize;
            // Inputs i with 0 <= i·s + shift < os.
            let (first, last) = window_span(xs[2], os[2], sx, shift);
            (kx, shift, first..last)
        })
        .collect();
    Ok(per_channel(
        buffers.tensor(shape),
        o_volume,
        |channel, out| {
            let (batch, oc) = (channel / m, channel % m);
            let (g, ocg) = (oc / out_per_group, oc % out_per_group);
            out.fill(b.map_or(0.0, |b| b.data[oc]));
            for ic in g * in_per_group..(g + 1) * in_per_group {
                let input = &x.data[(batch * c + ic) * x_volume..][..x_volume];
                let weights = &w.data[(ic * out_per_group + ocg) * taps..][..taps];
                for (oz, zs) in reach_z.iter().enumerate() {
                    for &(kz, iz) in zs {
                        for (oy, ys) in reach_y.iter().enumerate() {
                            let row = &mut out[(oz * os[1] + oy) * os[2]..][..os[2]];
                            for &(ky, iy) in ys {
                                let line = &input[(iz * xs[1] + iy) * xs[2]..][..xs[2]];
                                let wrow = &weights[(kz * k[1] + ky) * kx_n..][..kx_n];
                                // Taps from the last: each output's inputs then come ascending.
                                for (kx, shift, inputs) in &x_taps {
                                    let wv = wrow[*kx];
                                    for i in inputs.clone() {
                                        row[(i as isize * sx as isize + shift) as usize] +=
                                            line[i] * wv;
                                    }
                                }
                            }
                        }
                    }
                }
            }
        },
    ))
}

/// A raw pointer to the output that tiles write disjoint columns of.
#[derive(Clone, Copy)]
struct Output(*mut f32);
// SAFETY: each tile writes only its own columns of the output (see `conv`).
unsafe impl Send for Output {}
unsafe impl Sync for Output {}

impl Output {
    /// The output `offset` values in (a method, so that closures take the whole wrapper).
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// ONNX Conv (weights [M, C/group, k...]) as im2col tiles times the weights.
fn conv(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    window: &Window,
    group: usize,
    epilogue: Option<Activation>,
    buffers: &mut Buffers,
) -> Result<Tensor, NnError> {
    let shape = nn::conv_shape(&x.shape, &w.shape, window, group)?;
    let (n, c, xs) = ncs(&x.shape)?;
    let (_, m, os) = ncs(&shape)?;
    nn::check_bias(b, m)?;
    let (cg, mg) = (c / group, m / group);
    let taps: usize = window.kernel.iter().product();
    let k = cg * taps;
    let (x_volume, voxels) = (xs.iter().product::<usize>(), os.iter().product::<usize>());
    if voxels == 0 || m == 0 {
        return Ok(Tensor::zeros(shape));
    }
    // Every value is written: each tile's product overwrites its columns of every row.
    let mut y = buffers.tensor(shape);
    let tile = (TILE_BYTES / (4 * k.max(1))).max(64).min(voxels);
    let out = Output(y.data.as_mut_ptr());
    for batch in 0..n {
        for g in 0..group {
            let input = &x.data[(batch * c + g * cg) * x_volume..][..cg * x_volume];
            let weights = &w.data[g * mg * k..][..mg * k];
            let first = (batch * m + g * mg) * voxels;
            let biases = b.map(|b| &b.data[g * mg..(g + 1) * mg]);
            if window.strides[2] == 1 && window.dilations[2] == 1 && window.kernel[2] > 1 {
                let group = Group {
                    input,
                    channels: cg,
                    xs,
                    os,
                    weights,
                    rows: mg,
                    out,
                    first,
                    biases,
                    epilogue,
                };
                group.folded(window);
                continue;
            }
            (0..voxels.div_ceil(tile)).into_par_iter().for_each_init(
                || vec![0.0f32; k * tile],
                |col, t| {
                    let start = t * tile;
                    let width = tile.min(voxels - start);
                    unroll(input, cg, xs, window, os, start, width, col);
                    // SAFETY: the destination is rows g·mg.. of the output, columns
                    // start..start+width of each (row stride `voxels`): this tile's alone, and
                    // inside `y`; the operands are `weights` (mg x k, row stride k) and the
                    // unrolled tile (k x width, row stride width), both fully initialised.
                    unsafe {
                        product(
                            mg,
                            width,
                            k,
                            (out.at(first + start), voxels as isize, 1),
                            false,
                            Operand(weights.as_ptr(), k as isize, 1),
                            Operand(col.as_ptr(), width as isize, 1),
                        );
                    }
                },
            );
            if b.is_some() || epilogue.is_some() {
                y.data[first..first + mg * voxels]
                    .par_chunks_mut(voxels)
                    .enumerate()
                    .for_each(|(row, values)| {
                        let bias = biases.map_or(0.0, |b| b[row]);
                        match epilogue {
                            Some(f) => values.iter_mut().for_each(|v| *v = f.apply(*v + bias)),
                            None => values.iter_mut().for_each(|v| *v += bias),
                        }
                    });
            }
        }
    }
    Ok(y)
}

/// A matrix operand: its first value, row stride and column stride.
#[derive(Clone, Copy)]
struct Operand(*const f32, isize, isize);

/// `dst` (rows x cols; pointer, row and column strides) = (or, with `accumulate`, +=)
/// `lhs` (rows x depth) · `rhs` (depth x cols), on this thread. The gemm crate's kernels fill
/// 16 rows at a time, so a product of fewer rows (a narrow layer's few channels) is computed
/// transposed, cols x rows = rhsᵀ · lhsᵀ, the same sums over the same strides.
///
/// # Safety
/// Every operand must be valid for its shape and strides, and `dst` written by no one else.
unsafe fn product(
    rows: usize,
    cols: usize,
    depth: usize,
    (dst, dst_rs, dst_cs): (*mut f32, isize, isize),
    accumulate: bool,
    lhs: Operand,
    rhs: Operand,
) {
    let alpha = if accumulate { 1.0 } else { 0.0 };
    let none = gemm::Parallelism::None;
    if rows < 16 && cols > rows {
        gemm::gemm(
            cols, rows, depth, dst, dst_rs, dst_cs, accumulate, rhs.0, rhs.1, rhs.2, lhs.0, lhs.1,
            lhs.2, alpha, 1.0, false, false, false, none,
        );
    } else {
        gemm::gemm(
            rows, cols, depth, dst, dst_cs, dst_rs, accumulate, lhs.0, lhs.2, lhs.1, rhs.0, rhs.2,
            rhs.1, alpha, 1.0, false, false, false, none,
        );
    }
}

/// One group of a convolution's output channels: its input channels, weights and where its
/// output rows go.
struct Group<'a> {
    input: &'a [f32],
    channels: usize,
    xs: [usize; 3],
    os: [usize; 3],
    /// [rows, channels·taps], row-major.
    weights: &'a [f32],
    rows: usize,
    out: Output,
    /// The group's first output value.
    first: usize,
    biases: Option<&'a [f32]>,
    epilogue: Option<Activation>,
}

impl Group<'_> {
    /// A convolution of stride and dilation 1 along x, in tiles of whole output lines (x):
    /// the input is unrolled for the z and y taps only, each line padded to `os[2] + kx - 1`
    /// inputs, so that the x taps are the same rows shifted by one value: one product per x
    /// tap, accumulated (a third of im2col's copying for 3-wide kernels), then the lines are
    /// copied out with their bias and activation.
    fn folded(&self, window: &Window) {
        let (xs, os, k) = (self.xs, self.os, window.kernel);
        let (kn, zy_taps) = (k[2], k[0] * k[1]);
        let taps = zy_taps * kn;
        let reduced = self.channels * zy_taps;
        let line = os[2] + kn - 1;
        let lines = os[0] * os[1];
        let per_tile = (TILE_BYTES / (4 * reduced.max(1) * line)).clamp(1, lines);
        let voxels = lines * os[2];
        let pad_x = window.begin[2] as isize;
        (0..lines.div_ceil(per_tile)).into_par_iter().for_each_init(
            || (Vec::new(), Vec::new()),
            |(unrolled, products), t| {
                let (l0, n) = (t * per_tile, per_tile.min(lines - t * per_tile));
                let width = n * line;
                // Each row is `width` values and `kn - 1` zeros, for the last shifted read.
                let stride = width + kn - 1;
                // Every value is written below (zeros where a tap falls in the padding).
                unrolled.resize(reduced * stride, 0.0);
                products.resize(self.rows * width, 0.0);
                for ic in 0..self.channels {
                    let channel = &self.input[ic * xs.iter().product::<usize>()..];
                    for zy in 0..zy_taps {
                        let (kz, ky) = (zy / k[1], zy % k[1]);
                        let row = &mut unrolled[(ic * zy_taps + zy) * stride..][..stride];
                        row[width..].fill(0.0);
                        for j in 0..n {
                            let (oz, oy) = ((l0 + j) / os[1], (l0 + j) % os[1]);
                            let iz = (oz * window.strides[0] + kz * window.dilations[0]) as isize
                                - window.begin[0] as isize;
                            let iy = (oy * window.strides[1] + ky * window.dilations[1]) as isize
                                - window.begin[1] as isize;
                            let dst = &mut row[j * line..][..line];
                            if iz < 0 || iz as usize >= xs[0] || iy < 0 || iy as usize >= xs[1] {
                                dst.fill(0.0);
                                continue;
                            }
                            let src =
                                &channel[(iz as usize * xs[1] + iy as usize) * xs[2]..][..xs[2]];
                            // Value e of the line is input x = e - pad.
                            let lo = pad_x.clamp(0, line as isize) as usize;
                            let hi =
                                (xs[2] as isize + pad_x).clamp(lo as isize, line as isize) as usize;
                            dst[..lo].fill(0.0);
                            dst[hi..].fill(0.0);
                            dst[lo..hi]
                                .copy_from_slice(&src[(lo as isize - pad_x) as usize..][..hi - lo]);
                        }
                    }
                }
                for kx in 0..kn {
                    // SAFETY: `products` is rows x width (row stride width); the weights of
                    // tap kx are every kn-th of a row (row stride channels·taps, from kx); the
                    // unrolled rows shifted by kx stay inside their row of `stride` values.
                    unsafe {
                        product(
                            self.rows,
                            width,
                            reduced,
                            (products.as_mut_ptr(), width as isize, 1),
                            kx > 0,
                            Operand(
                                self.weights.as_ptr().add(kx),
                                (self.channels * taps) as isize,
                                kn as isize,
                            ),
                            Operand(unrolled.as_ptr().add(kx), stride as isize, 1),
                        );
                    }
                }
                for r in 0..self.rows {
                    let bias = self.biases.map_or(0.0, |b| b[r]);
                    for j in 0..n {
                        let from = &products[r * width + j * line..][..os[2]];
                        // SAFETY: output row r's line l0 + j: this tile's lines alone.
                        let to = unsafe {
                            std::slice::from_raw_parts_mut(
                                self.out.at(self.first + r * voxels + (l0 + j) * os[2]),
                                os[2],
                            )
                        };
                        match self.epilogue {
                            Some(f) => {
                                for (o, &v) in to.iter_mut().zip(from) {
                                    *o = f.apply(v + bias);
                                }
                            }
                            None => {
                                for (o, &v) in to.iter_mut().zip(from) {
                                    *o = v + bias;
                                }
                            }
                        }
                    }
                }
            },
        );
    }
}

/// Unrolls output voxels `start..start+width` (row-major over `os`) of a convolution: row
/// `ic·taps + tap` of `col` (row stride `width`) holds, per voxel, the input under that tap
/// (0 in the padding).
#[allow(clippy::too_many_arguments)]
fn unroll(
    input: &[f32],
    channels: usize,
    xs: [usize; 3],
    window: &Window,
    os: [usize; 3],
    start: usize,
    width: usize,
    col: &mut [f32],
) {
    let kernel = window.kernel;
    let taps: usize = kernel.iter().product();
    let x_volume: usize = xs.iter().product();
    let (s, d, p) = (window.strides, window.dilations, window.begin);
    // Where output `o` of tap `k` lands on axis `a`, if inside the input.
    let at = |a: usize, o: usize, k: usize| -> Option<usize> {
        let i = (o * s[a] + k * d[a]) as isize - p[a] as isize;
        (i >= 0 && (i as usize) < xs[a]).then_some(i as usize)
    };
    for ic in 0..channels {
        let channel = &input[ic * x_volume..][..x_volume];
        for tap in 0..taps {
            let kk = [
                tap / (kernel[1] * kernel[2]),
                tap / kernel[2] % kernel[1],
                tap % kernel[2],
            ];
            let row = &mut col[(ic * taps + tap) * width..][..width];
            let mut v = start;
            while v < start + width {
                // One run along x: the rest of this output row inside the tile.
                let (oz, oy, ox) = (v / (os[1] * os[2]), v / os[2] % os[1], v % os[2]);
                let run = (os[2] - ox).min(start + width - v);
                let dst = &mut row[v - start..][..run];
                match (at(0, oz, kk[0]), at(1, oy, kk[1])) {
                    (Some(iz), Some(iy)) => {
                        let line = &channel[(iz * xs[1] + iy) * xs[2]..][..xs[2]];
                        if s[2] == 1 {
                            // Input x = ox + j + shift: zeros, a copied run, zeros.
                            let shift = (kk[2] * d[2]) as isize - p[2] as isize;
                            let first = ox as isize + shift;
                            let lo = (-first).clamp(0, run as isize) as usize;
                            let hi =
                                (xs[2] as isize - first).clamp(lo as isize, run as isize) as usize;
                            dst[..lo].fill(0.0);
                            if hi > lo {
                                let from = (first + lo as isize) as usize;
                                dst[lo..hi].copy_from_slice(&line[from..from + hi - lo]);
                            }
                            dst[hi..].fill(0.0);
                        } else {
                            for (j, out) in dst.iter_mut().enumerate() {
                                *out = at(2, ox + j, kk[2]).map_or(0.0, |ix| line[ix]);
                            }
                        }
                    }
                    _ => dst.fill(0.0),
                }
                v += run;
            }
        }
    }
}
