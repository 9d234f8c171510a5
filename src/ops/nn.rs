//! CPU reference implementations of the ConvNet operators inference runs (the oracle for the
//! GPU kernels, as every module in `ops` is): plain loops over NCDHW float32 tensors that
//! follow the ONNX operator definitions literally, written to be checked, not to be fast.
//!
//! Spatial operators (convolution, pooling) take 1 to 3 spatial axes; shapes, kernels,
//! strides, pads and dilations are widened to 3 axes by leading 1s (and 0 pads), so one loop
//! nest serves 1D, 2D and 3D. Pads are ONNX's: all begins, then all ends.

use thiserror::Error;

/// A dense float32 tensor in row-major (C) order, as ONNX stores them.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

#[derive(Debug, Error, PartialEq)]
pub enum NnError {
    #[error("{0}")]
    Shape(String),
}

fn shape_error<T>(message: impl Into<String>) -> Result<T, NnError> {
    Err(NnError::Shape(message.into()))
}

impl Tensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Tensor {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "{shape:?}");
        Tensor { shape, data }
    }

    pub fn zeros(shape: Vec<usize>) -> Tensor {
        let n = shape.iter().product();
        Tensor {
            shape,
            data: vec![0.0; n],
        }
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The same data under another shape of as many elements (`Reshape`).
    pub fn reshaped(self, shape: Vec<usize>) -> Tensor {
        Tensor::new(shape, self.data)
    }
}

/// Row-major strides of a shape.
pub fn strides_of(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for a in (0..shape.len().saturating_sub(1)).rev() {
        strides[a] = strides[a + 1] * shape[a + 1];
    }
    strides
}

/// The geometry of a convolution or pooling window over 3 spatial axes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Window {
    pub kernel: [usize; 3],
    pub strides: [usize; 3],
    pub dilations: [usize; 3],
    /// Padding before each axis.
    pub begin: [usize; 3],
    /// Padding after each axis.
    pub end: [usize; 3],
}

impl Window {
    /// A window over `rank` (1..=3) spatial axes from ONNX attribute lists (missing strides
    /// and dilations are 1, missing pads 0), widened to 3 axes.
    pub fn new(
        kernel: &[usize],
        strides: &[usize],
        dilations: &[usize],
        pads: &[usize],
    ) -> Result<Window, NnError> {
        let rank = kernel.len();
        if !(1..=3).contains(&rank) {
            return shape_error(format!("{rank} spatial axes (1 to 3 are supported)"));
        }
        let list = |v: &[usize], name: &str, default: usize| -> Result<[usize; 3], NnError> {
            let v = if v.is_empty() {
                vec![default; rank]
            } else {
                v.to_vec()
            };
            if v.len() != rank {
                return shape_error(format!("{name} has {} values for {rank} axes", v.len()));
            }
            let mut out = [default; 3];
            out[3 - rank..].copy_from_slice(&v);
            Ok(out)
        };
        let pads = if pads.is_empty() {
            vec![0; 2 * rank]
        } else {
            pads.to_vec()
        };
        if pads.len() != 2 * rank {
            return shape_error(format!("pads has {} values for {rank} axes", pads.len()));
        }
        let window = Window {
            kernel: list(kernel, "kernel", 1)?,
            strides: list(strides, "strides", 1)?,
            dilations: list(dilations, "dilations", 1)?,
            begin: list(&pads[..rank], "pads", 0)?,
            end: list(&pads[rank..], "pads", 0)?,
        };
        if window.strides.contains(&0) || window.dilations.contains(&0) {
            return shape_error("a stride or dilation of 0");
        }
        Ok(window)
    }

    /// The extent of the dilated kernel on axis `a`.
    pub fn extent(&self, a: usize) -> usize {
        (self.kernel[a] - 1) * self.dilations[a] + 1
    }

    /// Output length on axis `a` for an input of `n`, rounding down (or up with `ceil`, where
    /// a last window that would start in the end padding is dropped, as PyTorch and
    /// onnxruntime do).
    pub fn output_len(&self, a: usize, n: usize, ceil: bool) -> Result<usize, NnError> {
        let padded = n + self.begin[a] + self.end[a];
        if padded < self.extent(a) {
            return shape_error(format!(
                "a window of {} voxels over {padded} (input and pads)",
                self.extent(a)
            ));
        }
        let span = padded - self.extent(a);
        let s = self.strides[a];
        let mut out = if ceil { span.div_ceil(s) } else { span / s } + 1;
        if ceil && (out - 1) * s >= n + self.begin[a] {
            out -= 1;
        }
        Ok(out)
    }
}

/// The batch, channels and 3 spatial lengths of an N,C,spatial... tensor shape.
pub(crate) fn ncs(shape: &[usize]) -> Result<(usize, usize, [usize; 3]), NnError> {
    if !(3..=5).contains(&shape.len()) {
        return shape_error(format!(
            "a tensor of shape {shape:?} where N,C and 1 to 3 spatial axes were expected"
        ));
    }
    let mut spatial = [1; 3];
    spatial[5 - shape.len()..].copy_from_slice(&shape[2..]);
    Ok((shape[0], shape[1], spatial))
}

fn with_spatial(rank: usize, n: usize, c: usize, spatial: [usize; 3]) -> Vec<usize> {
    let mut shape = vec![n, c];
    shape.extend_from_slice(&spatial[3 - rank..]);
    shape
}

fn index3(p: [usize; 3], size: [usize; 3]) -> usize {
    (p[0] * size[1] + p[1]) * size[2] + p[2]
}

/// Where output `o` of a window's tap `k` lands in the input on axis `a`, if inside.
fn tap(w: &Window, a: usize, o: usize, k: usize, n: usize) -> Option<usize> {
    let at = (o * w.strides[a] + k * w.dilations[a]) as isize - w.begin[a] as isize;
    (at >= 0 && (at as usize) < n).then_some(at as usize)
}

/// Every position of a 3-axis box of `size`, in row-major order (z outermost).
fn positions(size: [usize; 3]) -> impl Iterator<Item = [usize; 3]> {
    (0..size[0])
        .flat_map(move |z| (0..size[1]).flat_map(move |y| (0..size[2]).map(move |x| [z, y, x])))
}

/// The taps of `window` at output `o` that land inside an input of `xs`, as (tap, input
/// position), kz outermost.
fn taps_inside(
    window: &Window,
    o: [usize; 3],
    xs: [usize; 3],
) -> impl Iterator<Item = ([usize; 3], [usize; 3])> + '_ {
    positions(window.kernel).filter_map(move |k| {
        let [z, y, x] = [0, 1, 2].map(|a| tap(window, a, o[a], k[a], xs[a]));
        Some((k, [z?, y?, x?]))
    })
}

/// Steps a row-major multi-index one element on (the last axis fastest).
fn advance(index: &mut [usize], shape: &[usize]) {
    for axis in (0..shape.len()).rev() {
        index[axis] += 1;
        if index[axis] < shape[axis] {
            return;
        }
        index[axis] = 0;
    }
}

/// The shape of `Conv` (weights `[M, C/group, k...]`).
pub fn conv_shape(
    x: &[usize],
    w: &[usize],
    window: &Window,
    group: usize,
) -> Result<Vec<usize>, NnError> {
    let (n, c, spatial) = ncs(x)?;
    if w.len() != x.len() {
        return shape_error(format!(
            "weights of shape {w:?} for an input of shape {x:?}"
        ));
    }
    if group == 0 || !w[0].is_multiple_of(group) || w[1] * group != c {
        return shape_error(format!(
            "weights of shape {w:?} and group {group} for an input of {c} channels"
        ));
    }
    let mut out = [1; 3];
    for a in 0..3 {
        out[a] = window.output_len(a, spatial[a], false)?;
    }
    Ok(with_spatial(x.len() - 2, n, w[0], out))
}

/// `Conv`: `y[n, m, o] = b[m] + Σ x[n, g·C/group + c, o·s − pad + k·d] · w[m, c, k]`, zeros
/// outside the input.
pub fn conv(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    window: &Window,
    group: usize,
) -> Result<Tensor, NnError> {
    let shape = conv_shape(&x.shape, &w.shape, window, group)?;
    let (n, c, xs) = ncs(&x.shape)?;
    let (_, m, os) = ncs(&shape)?;
    check_bias(b, m)?;
    let (in_per_group, out_per_group) = (c / group, m / group);
    let k = window.kernel;
    let mut y = Tensor::zeros(shape);
    let taps = k[0] * k[1] * k[2];
    let (x_volume, o_volume) = (xs.iter().product::<usize>(), os.iter().product::<usize>());
    for batch in 0..n {
        for oc in 0..m {
            let g = oc / out_per_group;
            let bias = b.map_or(0.0, |b| b.data[oc]);
            for (at, o) in positions(os).enumerate() {
                let mut sum = 0.0f32;
                for ic in 0..in_per_group {
                    let channel = batch * c + g * in_per_group + ic;
                    let weights = &w.data[(oc * in_per_group + ic) * taps..][..taps];
                    for (kk, i) in taps_inside(window, o, xs) {
                        sum += x.data[channel * x_volume + index3(i, xs)] * weights[index3(kk, k)];
                    }
                }
                y.data[(batch * m + oc) * o_volume + at] = sum + bias;
            }
        }
    }
    Ok(y)
}

/// A bias, where given, has one value per output channel.
pub(crate) fn check_bias(b: Option<&Tensor>, m: usize) -> Result<(), NnError> {
    match b {
        Some(b) if b.len() != m => shape_error(format!("{} biases for {m} channels", b.len())),
        _ => Ok(()),
    }
}

/// The shape of `ConvTranspose` (weights `[C, M/group, k...]`), with `output_padding` added
/// at the end of each axis.
pub fn conv_transpose_shape(
    x: &[usize],
    w: &[usize],
    window: &Window,
    output_padding: [usize; 3],
    group: usize,
) -> Result<Vec<usize>, NnError> {
    let (n, c, spatial) = ncs(x)?;
    if w.len() != x.len() || group == 0 || w[0] != c || c % group != 0 {
        return shape_error(format!(
            "weights of shape {w:?} and group {group} for an input of shape {x:?}"
        ));
    }
    let mut out = [1; 3];
    for a in 0..3 {
        let full = window.strides[a] * (spatial[a] - 1) + output_padding[a] + window.extent(a);
        let pads = window.begin[a] + window.end[a];
        if full <= pads {
            return shape_error(format!("pads {pads} remove the whole output of {full}"));
        }
        out[a] = full - pads;
    }
    Ok(with_spatial(x.len() - 2, n, w[1] * group, out))
}

/// `ConvTranspose`: every input voxel `i` scatters `x · w[c, m, k]` to output `i·s + k·d − pad`.
pub fn conv_transpose(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    window: &Window,
    output_padding: [usize; 3],
    group: usize,
) -> Result<Tensor, NnError> {
    let shape = conv_transpose_shape(&x.shape, &w.shape, window, output_padding, group)?;
    let (n, c, xs) = ncs(&x.shape)?;
    let (_, m, os) = ncs(&shape)?;
    check_bias(b, m)?;
    let (in_per_group, out_per_group) = (c / group, m / group);
    let k = window.kernel;
    let taps = k[0] * k[1] * k[2];
    let (x_volume, o_volume) = (xs.iter().product::<usize>(), os.iter().product::<usize>());
    let mut y = Tensor::zeros(shape);
    for batch in 0..n {
        for oc in 0..m {
            let bias = b.map_or(0.0, |b| b.data[oc]);
            y.data[(batch * m + oc) * o_volume..][..o_volume].fill(bias);
        }
        for ic in 0..c {
            let g = ic / in_per_group;
            for ocg in 0..out_per_group {
                let oc = g * out_per_group + ocg;
                let weights = &w.data[(ic * out_per_group + ocg) * taps..][..taps];
                for iz in 0..xs[0] {
                    for iy in 0..xs[1] {
                        for ix in 0..xs[2] {
                            let v = x.data[(batch * c + ic) * x_volume + index3([iz, iy, ix], xs)];
                            for kz in 0..k[0] {
                                for ky in 0..k[1] {
                                    for kx in 0..k[2] {
                                        let at = |a: usize, i: usize, kk: usize| {
                                            let o = (i * window.strides[a]
                                                + kk * window.dilations[a])
                                                as isize
                                                - window.begin[a] as isize;
                                            (o >= 0 && (o as usize) < os[a]).then_some(o as usize)
                                        };
                                        let (Some(oz), Some(oy), Some(ox)) =
                                            (at(0, iz, kz), at(1, iy, ky), at(2, ix, kx))
                                        else {
                                            continue;
                                        };
                                        let yi =
                                            (batch * m + oc) * o_volume + index3([oz, oy, ox], os);
                                        y.data[yi] += v * weights[index3([kz, ky, kx], k)];
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(y)
}

/// Max or average pooling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pool {
    Max,
    /// Average; with `count_include_pad`, padding voxels count in the divisor.
    Average {
        count_include_pad: bool,
    },
}

/// The shape of a pooling.
pub fn pool_shape(x: &[usize], window: &Window, ceil: bool) -> Result<Vec<usize>, NnError> {
    let (n, c, spatial) = ncs(x)?;
    let mut out = [1; 3];
    for a in 0..3 {
        out[a] = window.output_len(a, spatial[a], ceil)?;
    }
    Ok(with_spatial(x.len() - 2, n, c, out))
}

/// `MaxPool` (padding never wins) and `AveragePool` (the divisor counts the window's voxels
/// inside the input, or, with `count_include_pad`, inside the input and its pads).
pub fn pool(x: &Tensor, kind: Pool, window: &Window, ceil: bool) -> Result<Tensor, NnError> {
    let shape = pool_shape(&x.shape, window, ceil)?;
    let (n, c, xs) = ncs(&x.shape)?;
    let (_, _, os) = ncs(&shape)?;
    let (x_volume, o_volume) = (xs.iter().product::<usize>(), os.iter().product::<usize>());
    let mut y = Tensor::zeros(shape);
    for channel in 0..n * c {
        for (at, o) in positions(os).enumerate() {
            let (mut max, mut sum, mut inside) = (f32::NEG_INFINITY, 0.0f32, 0usize);
            for (_, i) in taps_inside(window, o, xs) {
                let v = x.data[channel * x_volume + index3(i, xs)];
                max = max.max(v);
                sum += v;
                inside += 1;
            }
            y.data[channel * o_volume + at] = match kind {
                Pool::Max => max,
                Pool::Average {
                    count_include_pad: false,
                } => sum / inside.max(1) as f32,
                Pool::Average {
                    count_include_pad: true,
                } => sum / padded_taps(window, o, xs) as f32,
            };
        }
    }
    Ok(y)
}

/// The window's taps that fall inside the input or its pads (not past the end pads, where a
/// ceil-mode window may reach).
pub(crate) fn padded_taps(window: &Window, o: [usize; 3], xs: [usize; 3]) -> usize {
    (0..3)
        .map(|a| {
            (0..window.kernel[a])
                .filter(|&k| {
                    let at = o[a] * window.strides[a] + k * window.dilations[a];
                    at < xs[a] + window.begin[a] + window.end[a]
                })
                .count()
        })
        .product()
}

/// Per-channel `scale · (x − mean) / sqrt(var + epsilon) + bias` (BatchNormalization in
/// inference mode).
pub fn batch_norm(
    x: &Tensor,
    scale: &[f32],
    bias: &[f32],
    mean: &[f32],
    var: &[f32],
    epsilon: f32,
) -> Result<Tensor, NnError> {
    let (n, c, spatial) = ncs(&x.shape)?;
    if [scale.len(), bias.len(), mean.len(), var.len()] != [c; 4] {
        return shape_error(format!("batch normalization parameters for {c} channels"));
    }
    let volume: usize = spatial.iter().product();
    let mut y = x.clone();
    for (i, chunk) in y.data.chunks_mut(volume).enumerate().take(n * c) {
        let ch = i % c;
        let a = scale[ch] / (var[ch] + epsilon).sqrt();
        for v in chunk {
            *v = (*v - mean[ch]) * a + bias[ch];
        }
    }
    Ok(y)
}

/// `InstanceNormalization`: each (batch, channel)'s spatial voxels normalised by their own
/// mean and (biased) variance, then scaled and shifted per channel.
pub fn instance_norm(
    x: &Tensor,
    scale: &[f32],
    bias: &[f32],
    epsilon: f32,
) -> Result<Tensor, NnError> {
    let (_, c, spatial) = ncs(&x.shape)?;
    if scale.len() != c || bias.len() != c {
        return shape_error(format!(
            "instance normalization parameters for {c} channels"
        ));
    }
    let volume: usize = spatial.iter().product();
    let mut y = x.clone();
    for (i, chunk) in y.data.chunks_mut(volume).enumerate() {
        let ch = i % c;
        let mean = chunk.iter().map(|&v| v as f64).sum::<f64>() / volume as f64;
        let var = chunk
            .iter()
            .map(|&v| (v as f64 - mean).powi(2))
            .sum::<f64>()
            / volume as f64;
        let a = scale[ch] as f64 / (var + epsilon as f64).sqrt();
        for v in chunk {
            *v = ((*v as f64 - mean) * a + bias[ch] as f64) as f32;
        }
    }
    Ok(y)
}

/// Elementwise activations.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Activation {
    Relu,
    LeakyRelu(f32),
    Elu(f32),
    Sigmoid,
    Tanh,
}

impl Activation {
    pub fn apply(self, v: f32) -> f32 {
        match self {
            Activation::Relu => v.max(0.0),
            Activation::LeakyRelu(alpha) => {
                if v < 0.0 {
                    alpha * v
                } else {
                    v
                }
            }
            Activation::Elu(alpha) => {
                if v < 0.0 {
                    alpha * (v.exp() - 1.0)
                } else {
                    v
                }
            }
            Activation::Sigmoid => 1.0 / (1.0 + (-v).exp()),
            Activation::Tanh => v.tanh(),
        }
    }
}

/// `v` rounded to the nearest float16 (ties to even, subnormals kept, from 65520 on infinite)
/// and widened back: the storage of a half-precision net. Bit arithmetic on the float32, as
/// `shaders/nn.wgsl`'s `round_f16` does, and as fast (a conversion through the `half` crate's
/// software path doubled the native engine's time); tests hold it to `half` bit for bit.
pub fn round_to_f16(v: f32) -> f32 {
    let bits = v.to_bits();
    let sign = bits & 0x8000_0000;
    let magnitude = bits & 0x7fff_ffff;
    if magnitude >= 0x7f80_0000 {
        return v; // infinity, NaN
    }
    if magnitude >= 0x477f_f000 {
        return f32::from_bits(sign | 0x7f80_0000);
    }
    if magnitude < 0x3880_0000 {
        // Below float16's smallest normal: a grid of 2^-24 (the scaling is exact).
        let scaled = (f32::from_bits(magnitude) * 16_777_216.0).round_ties_even();
        return f32::from_bits(sign | (scaled / 16_777_216.0).to_bits());
    }
    // Keep 10 of the 23 mantissa bits, ties to even; a carry steps the exponent, as it should.
    let odd = (magnitude >> 13) & 1;
    f32::from_bits(sign | ((magnitude + 0xfff + odd) & 0xffff_e000))
}

/// Every value of `x` rounded by [`round_to_f16`], in place, on every core (it runs after
/// each node of a float16 net, between the engines' parallel operators).
pub fn round_tensor_to_f16(x: &mut Tensor) {
    use rayon::prelude::*;
    x.data.par_chunks_mut(1 << 14).for_each(|part| {
        for v in part {
            *v = round_to_f16(*v);
        }
    });
}

pub fn activate(x: &Tensor, activation: Activation) -> Tensor {
    Tensor {
        shape: x.shape.clone(),
        data: x.data.iter().map(|&v| activation.apply(v)).collect(),
    }
}

/// Softmax over the axes `from..to` taken together (one axis from opset 13; every axis from
/// `axis` on before it).
pub fn softmax(x: &Tensor, from: usize, to: usize) -> Result<Tensor, NnError> {
    if from >= to || to > x.shape.len() {
        return shape_error(format!("softmax over axes {from}..{to} of {:?}", x.shape));
    }
    let block: usize = x.shape[from..to].iter().product();
    let inner: usize = x.shape[to..].iter().product();
    let mut y = x.clone();
    for outer in y.data.chunks_mut(block * inner) {
        for i in 0..inner {
            let max = (0..block)
                .map(|b| outer[b * inner + i])
                .fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0f32;
            for b in 0..block {
                let e = (outer[b * inner + i] - max).exp();
                outer[b * inner + i] = e;
                sum += e;
            }
            for b in 0..block {
                outer[b * inner + i] /= sum;
            }
        }
    }
    Ok(y)
}

/// Binary elementwise operators, with numpy (multidirectional) broadcasting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Binary {
    Add,
    Sub,
    Mul,
    Div,
}

/// The broadcast shape of two shapes (numpy rules, aligned at the last axis).
pub fn broadcast_shape(a: &[usize], b: &[usize]) -> Result<Vec<usize>, NnError> {
    let rank = a.len().max(b.len());
    let dim = |s: &[usize], i: usize| (i + s.len()).checked_sub(rank).map_or(1, |j| s[j]);
    (0..rank)
        .map(|i| match (dim(a, i), dim(b, i)) {
            (x, y) if x == y => Ok(x),
            (1, y) => Ok(y),
            (x, 1) => Ok(x),
            _ => shape_error(format!("shapes {a:?} and {b:?} do not broadcast")),
        })
        .collect()
}

/// Strides that read `shape` as if broadcast to `to` (0 along broadcast axes).
fn broadcast_strides(shape: &[usize], to: &[usize]) -> Vec<usize> {
    let own = strides_of(shape);
    let skip = to.len() - shape.len();
    (0..to.len())
        .map(|i| match i.checked_sub(skip) {
            Some(j) if shape[j] != 1 => own[j],
            _ => 0,
        })
        .collect()
}

pub fn binary(a: &Tensor, b: &Tensor, op: Binary) -> Result<Tensor, NnError> {
    let shape = broadcast_shape(&a.shape, &b.shape)?;
    let (sa, sb) = (
        broadcast_strides(&a.shape, &shape),
        broadcast_strides(&b.shape, &shape),
    );
    let mut y = Tensor::zeros(shape.clone());
    let mut index = vec![0usize; shape.len()];
    for out in y.data.iter_mut() {
        let ia: usize = index.iter().zip(&sa).map(|(i, s)| i * s).sum();
        let ib: usize = index.iter().zip(&sb).map(|(i, s)| i * s).sum();
        let (u, v) = (a.data[ia], b.data[ib]);
        *out = match op {
            Binary::Add => u + v,
            Binary::Sub => u - v,
            Binary::Mul => u * v,
            Binary::Div => u / v,
        };
        advance(&mut index, &shape);
    }
    Ok(y)
}

/// The shape of a concatenation along `axis`.
pub fn concat_shape(shapes: &[&[usize]], axis: usize) -> Result<Vec<usize>, NnError> {
    let first = shapes
        .first()
        .ok_or_else(|| NnError::Shape("nothing to concatenate".into()))?;
    if axis >= first.len() {
        return shape_error(format!("axis {axis} of a rank-{} tensor", first.len()));
    }
    let mut out = first.to_vec();
    for s in &shapes[1..] {
        let same = s.len() == first.len() && (0..s.len()).all(|a| a == axis || s[a] == first[a]);
        if !same {
            return shape_error(format!("shapes {first:?} and {s:?} along axis {axis}"));
        }
        out[axis] += s[axis];
    }
    Ok(out)
}

pub fn concat(xs: &[&Tensor], axis: usize) -> Result<Tensor, NnError> {
    let shapes: Vec<&[usize]> = xs.iter().map(|x| x.shape.as_slice()).collect();
    let shape = concat_shape(&shapes, axis)?;
    let outer: usize = shape[..axis].iter().product();
    let mut data = Vec::with_capacity(shape.iter().product());
    for o in 0..outer {
        for x in xs {
            let run: usize = x.shape[axis..].iter().product();
            data.extend_from_slice(&x.data[o * run..][..run]);
        }
    }
    Ok(Tensor::new(shape, data))
}

/// One axis of a `Slice`, normalised: start, step (non-zero) and the output length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SliceAxis {
    pub start: i64,
    pub step: i64,
    pub len: usize,
}

impl SliceAxis {
    /// ONNX's rules: negative starts and ends count from the end; both are clamped to
    /// [0, n] (to [-1, n-1] for negative steps).
    pub fn new(start: i64, end: i64, step: i64, n: usize) -> Result<SliceAxis, NnError> {
        if step == 0 {
            return shape_error("a slice step of 0");
        }
        let n = n as i64;
        let wrap = |v: i64| if v < 0 { v.saturating_add(n) } else { v };
        let (start, end) = (wrap(start), wrap(end));
        let (start, end) = if step > 0 {
            (start.clamp(0, n), end.clamp(0, n))
        } else {
            (start.clamp(-1, n - 1), end.clamp(-1, n - 1))
        };
        let len = if step > 0 {
            ((end - start).max(0) + step - 1) / step
        } else {
            ((start - end).max(0) - step - 1) / -step
        };
        Ok(SliceAxis {
            start,
            step,
            len: len as usize,
        })
    }
}

/// `Slice` with one [`SliceAxis`] per axis (a full axis where not sliced).
pub fn slice(x: &Tensor, axes: &[SliceAxis]) -> Tensor {
    let shape: Vec<usize> = axes.iter().map(|a| a.len).collect();
    let strides = strides_of(&x.shape);
    let mut y = Tensor::zeros(shape.clone());
    let mut index = vec![0usize; shape.len()];
    for out in y.data.iter_mut() {
        let at: i64 = (0..shape.len())
            .map(|a| (axes[a].start + index[a] as i64 * axes[a].step) * strides[a] as i64)
            .sum();
        *out = x.data[at as usize];
        advance(&mut index, &shape);
    }
    y
}

/// `Pad` modes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PadMode {
    Constant(f32),
    Reflect,
    Edge,
}

/// `Pad` with ONNX's pads (all begins, then all ends; negative pads crop).
pub fn pad(x: &Tensor, pads: &[i64], mode: PadMode) -> Result<Tensor, NnError> {
    let rank = x.shape.len();
    if pads.len() != 2 * rank {
        return shape_error(format!("{} pads for a rank-{rank} tensor", pads.len()));
    }
    let mut shape = Vec::with_capacity(rank);
    for a in 0..rank {
        let len = x.shape[a] as i64 + pads[a] + pads[a + rank];
        if len < 0 {
            return shape_error(format!("pads {pads:?} past the tensor's {:?}", x.shape));
        }
        if mode == PadMode::Reflect && x.shape[a] < 2 && len as usize != x.shape[a] {
            return shape_error("reflect padding of an axis shorter than 2");
        }
        shape.push(len as usize);
    }
    let strides = strides_of(&x.shape);
    let mut y = Tensor::zeros(shape.clone());
    let mut index = vec![0usize; rank];
    for out in y.data.iter_mut() {
        let mut at = Some(0usize);
        for a in 0..rank {
            let n = x.shape[a] as i64;
            let mut i = index[a] as i64 - pads[a];
            if !(0..n).contains(&i) {
                match mode {
                    PadMode::Constant(_) => {
                        at = None;
                        break;
                    }
                    PadMode::Edge => i = i.clamp(0, n - 1),
                    PadMode::Reflect => {
                        let period = 2 * (n - 1);
                        i = i.rem_euclid(period);
                        if i >= n {
                            i = period - i;
                        }
                    }
                }
            }
            at = at.map(|s| s + i as usize * strides[a]);
        }
        *out = match (at, mode) {
            (Some(at), _) => x.data[at],
            (None, PadMode::Constant(v)) => v,
            (None, _) => unreachable!("only constant padding leaves the input"),
        };
        advance(&mut index, &shape);
    }
    Ok(y)
}

/// How `Resize` maps an output coordinate to the input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CoordinateMode {
    HalfPixel,
    PytorchHalfPixel,
    Asymmetric,
    AlignCorners,
}

/// How `Resize` rounds a coordinate to the nearest voxel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NearestMode {
    RoundPreferFloor,
    RoundPreferCeil,
    Floor,
    Ceil,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResizeMode {
    Nearest(NearestMode),
    /// Linear along each resized axis (bilinear, trilinear).
    Linear,
}

fn original_coordinate(
    mode: CoordinateMode,
    o: usize,
    n_in: usize,
    n_out: usize,
    scale: f32,
) -> f32 {
    let o = o as f32;
    match mode {
        CoordinateMode::HalfPixel => (o + 0.5) / scale - 0.5,
        CoordinateMode::PytorchHalfPixel if n_out > 1 => (o + 0.5) / scale - 0.5,
        CoordinateMode::PytorchHalfPixel => 0.0,
        CoordinateMode::Asymmetric => o / scale,
        CoordinateMode::AlignCorners if n_out == 1 => 0.0,
        CoordinateMode::AlignCorners => o * (n_in as f32 - 1.0) / (n_out as f32 - 1.0),
    }
}

/// `Resize` to `shape` with per-axis `scales` (output / input, as given or implied by sizes),
/// one axis at a time (nearest and linear are separable).
pub fn resize(
    x: &Tensor,
    shape: &[usize],
    scales: &[f32],
    mode: ResizeMode,
    coordinates: CoordinateMode,
) -> Result<Tensor, NnError> {
    if shape.len() != x.shape.len() || scales.len() != x.shape.len() {
        return shape_error(format!("resizing {:?} to {shape:?}", x.shape));
    }
    let mut y = x.clone();
    for axis in 0..shape.len() {
        if shape[axis] == y.shape[axis] && scales[axis] == 1.0 {
            continue;
        }
        y = resize_axis(&y, axis, shape[axis], scales[axis], mode, coordinates);
    }
    Ok(y)
}

/// Per output index of one resized axis: up to two input indices and their weights.
pub fn resize_taps(
    n_in: usize,
    n_out: usize,
    scale: f32,
    mode: ResizeMode,
    coordinates: CoordinateMode,
) -> Vec<[(usize, f32); 2]> {
    (0..n_out)
        .map(|o| {
            let c = original_coordinate(coordinates, o, n_in, n_out, scale);
            let last = n_in as f32 - 1.0;
            match mode {
                ResizeMode::Nearest(rounding) => {
                    let r = match rounding {
                        NearestMode::RoundPreferFloor if c.fract() == 0.5 => c.floor(),
                        NearestMode::RoundPreferCeil if c.fract() == 0.5 => c.ceil(),
                        NearestMode::RoundPreferFloor | NearestMode::RoundPreferCeil => c.round(),
                        NearestMode::Floor => c.floor(),
                        NearestMode::Ceil => c.ceil(),
                    };
                    [(r.clamp(0.0, last) as usize, 1.0), (0, 0.0)]
                }
                ResizeMode::Linear => {
                    let c = c.clamp(0.0, last);
                    let low = c.floor() as usize;
                    let high = (low + 1).min(n_in - 1);
                    let t = c - low as f32;
                    [(low, 1.0 - t), (high, t)]
                }
            }
        })
        .collect()
}

fn resize_axis(
    x: &Tensor,
    axis: usize,
    n_out: usize,
    scale: f32,
    mode: ResizeMode,
    coordinates: CoordinateMode,
) -> Tensor {
    let n_in = x.shape[axis];
    let outer: usize = x.shape[..axis].iter().product();
    let inner: usize = x.shape[axis + 1..].iter().product();
    let taps = resize_taps(n_in, n_out, scale, mode, coordinates);
    let mut shape = x.shape.clone();
    shape[axis] = n_out;
    let mut y = Tensor::zeros(shape);
    for o in 0..outer {
        for (i, pair) in taps.iter().enumerate() {
            let out = &mut y.data[(o * n_out + i) * inner..][..inner];
            for &(at, weight) in pair {
                if weight == 0.0 {
                    continue;
                }
                let src = &x.data[(o * n_in + at) * inner..][..inner];
                for (d, s) in out.iter_mut().zip(src) {
                    *d += weight * s;
                }
            }
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `half` crate's conversion (f32 -> f16, round to nearest even, and back) is the
    /// independent reference: every float32 with the top 16 bits of its patterns walked and
    /// the low bits varied (ties, carries, subnormals, overflow), NaNs aside.
    #[test]
    fn float16_rounding_equals_the_half_crates() {
        for high in 0..=0xffffu32 {
            for low in [
                0u32, 1, 0xfff, 0x1000, 0x1001, 0x1fff, 0x2000, 0x3000, 0xe001, 0xffff,
            ] {
                let v = f32::from_bits((high << 16) | low);
                if v.is_nan() {
                    continue;
                }
                let want = half::f16::from_f32(v).to_f32();
                assert_eq!(
                    round_to_f16(v).to_bits(),
                    want.to_bits(),
                    "{v:e} ({:#010x})",
                    v.to_bits()
                );
            }
        }
    }

    fn ramp(shape: Vec<usize>) -> Tensor {
        let n = shape.iter().product::<usize>();
        Tensor::new(shape, (0..n).map(|i| i as f32).collect())
    }

    #[test]
    fn a_one_tap_convolution_scales_and_a_strided_one_subsamples() {
        let x = ramp(vec![1, 1, 2, 3, 4]);
        let w = Tensor::new(vec![1, 1, 1, 1, 1], vec![2.0]);
        let window = Window::new(&[1, 1, 1], &[], &[], &[]).unwrap();
        let y = conv(&x, &w, Some(&Tensor::new(vec![1], vec![1.0])), &window, 1).unwrap();
        assert_eq!(
            y.data,
            x.data.iter().map(|v| 2.0 * v + 1.0).collect::<Vec<_>>()
        );
        let strided = Window::new(&[1, 1, 1], &[1, 2, 2], &[], &[]).unwrap();
        let y = conv(&x, &w, None, &strided, 1).unwrap();
        assert_eq!(y.shape, vec![1, 1, 2, 2, 2]);
        assert_eq!(&y.data[..4], &[0.0, 4.0, 16.0, 20.0]);
    }

    #[test]
    fn transposed_convolution_is_the_adjoint_of_convolution() {
        // <conv(x), y> == <x, conv_transpose(y)> for the same weights and window.
        let window = Window::new(&[2, 3, 3], &[1, 2, 2], &[1, 1, 1], &[0, 1, 1, 1, 0, 1]).unwrap();
        let x = Tensor::new(
            vec![1, 2, 3, 7, 6],
            (0..252).map(|i| ((i * 37) % 11) as f32 - 5.0).collect(),
        );
        let w = Tensor::new(
            vec![3, 2, 2, 3, 3],
            (0..108).map(|i| ((i * 13) % 7) as f32 - 3.0).collect(),
        );
        let cx = conv(&x, &w, None, &window, 1).unwrap();
        let y = Tensor::new(
            cx.shape.clone(),
            (0..cx.len()).map(|i| ((i * 5) % 9) as f32 - 4.0).collect(),
        );
        let extra = [0, 0, 0];
        let ty = conv_transpose(&y, &w, None, &window, extra, 1).unwrap();
        // Output padding restores what the conv's stride dropped.
        let padding: [usize; 3] = std::array::from_fn(|a| x.shape[2 + a] - ty.shape[2 + a]);
        let ty = conv_transpose(&y, &w, None, &window, padding, 1).unwrap();
        assert_eq!(ty.shape, x.shape);
        let dot =
            |a: &Tensor, b: &Tensor| a.data.iter().zip(&b.data).map(|(u, v)| u * v).sum::<f32>();
        assert_eq!(dot(&cx, &y), dot(&x, &ty));
    }

    #[test]
    fn pooling_ignores_padding_as_onnx_says() {
        let x = Tensor::new(vec![1, 1, 5], vec![1.0, 2.0, 3.0, 4.0, 5.0]);
        let window = Window::new(&[2], &[2], &[], &[1, 1]).unwrap();
        assert_eq!(
            pool(&x, Pool::Max, &window, false).unwrap().data,
            vec![1.0, 3.0, 5.0]
        );
        let average = |count_include_pad| {
            let kind = Pool::Average { count_include_pad };
            pool(&x, kind, &window, false).unwrap().data
        };
        assert_eq!(average(false), vec![1.0, 2.5, 4.5]);
        assert_eq!(average(true), vec![0.5, 2.5, 4.5]);
        // Ceil mode adds the window that starts inside the input, not one in the end pads.
        let ceil = Window::new(&[2], &[2], &[], &[0, 0]).unwrap();
        assert_eq!(
            pool(&x, Pool::Max, &ceil, true).unwrap().data,
            vec![2.0, 4.0, 5.0]
        );
        let late = Window::new(&[2], &[2], &[], &[0, 1]).unwrap();
        assert_eq!(pool_shape(&[1, 1, 4], &late, true).unwrap(), vec![1, 1, 2]);
    }

    #[test]
    fn slices_pads_and_broadcasts_follow_numpy() {
        let x = ramp(vec![2, 5]);
        let axes = [
            SliceAxis::new(0, i64::MAX, 1, 2).unwrap(),
            SliceAxis::new(-1, -6, -2, 5).unwrap(),
        ];
        assert_eq!(slice(&x, &axes).data, vec![4.0, 2.0, 0.0, 9.0, 7.0, 5.0]);
        let p = pad(&ramp(vec![3]), &[2, 2], PadMode::Reflect).unwrap();
        assert_eq!(p.data, vec![2.0, 1.0, 0.0, 1.0, 2.0, 1.0, 0.0]);
        let p = pad(&ramp(vec![3]), &[1, -1], PadMode::Edge).unwrap();
        assert_eq!(p.data, vec![0.0, 0.0, 1.0]);
        let b = binary(&ramp(vec![2, 1]), &ramp(vec![3]), Binary::Sub).unwrap();
        assert_eq!(b.data, vec![0.0, -1.0, -2.0, 1.0, 0.0, -1.0]);
        assert!(broadcast_shape(&[2, 3], &[2]).is_err());
    }

    #[test]
    fn resize_by_two_repeats_or_interpolates() {
        let x = ramp(vec![1, 1, 3]);
        let nearest = ResizeMode::Nearest(NearestMode::Floor);
        let y = resize(
            &x,
            &[1, 1, 6],
            &[1.0, 1.0, 2.0],
            nearest,
            CoordinateMode::Asymmetric,
        )
        .unwrap();
        assert_eq!(y.data, vec![0.0, 0.0, 1.0, 1.0, 2.0, 2.0]);
        let y = resize(
            &x,
            &[1, 1, 6],
            &[1.0, 1.0, 2.0],
            ResizeMode::Linear,
            CoordinateMode::HalfPixel,
        )
        .unwrap();
        assert_eq!(y.data, vec![0.0, 0.25, 0.75, 1.25, 1.75, 2.0]);
    }
}
