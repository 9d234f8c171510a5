//! The host side of `shaders/nn.wgsl`: one function per ConvNet operator, each recording its
//! kernel into a [`Work`] on tensors that stay on the GPU. Shapes are checked by the CPU
//! reference's own shape functions ([`crate::ops::nn`]) before anything is recorded, so the
//! GPU and CPU paths accept exactly the same inputs.

use crate::gpu::context::{GpuContext, GpuError};
use crate::gpu::work::Work;
use crate::ops::nn::{
    self, Activation, Binary, CoordinateMode, NnError, PadMode, Pool, ResizeMode, SliceAxis, Window,
};
use thiserror::Error;

const SHADER: &str = "nn";

/// Output channels and x voxels per invocation of `conv_tiled`.
const TILE_CHANNELS: usize = 8;
const TILE_VOXELS: usize = 8;
/// Channels and voxels of one `conv_gemm` workgroup's output tile.
const GEMM_TILE: usize = 64;
/// Below this many output channels per group (depthwise convolutions, a last layer to a few
/// channels) most of a `conv_gemm` tile would idle: the direct kernel runs those.
const GEMM_MIN_CHANNELS: usize = 4;

/// The kernel that runs a Conv's bulk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvKernel {
    /// `conv_tiled`: register tiles of 8 channels by 8 voxels, no workgroup memory. The faster
    /// on a CPU adapter (lavapipe), where workgroup memory is ordinary memory and barriers cost.
    Registers,
    /// `conv_gemm`: an implicit GEMM in 64x64 workgroup-memory tiles, for GPUs.
    Workgroup,
}

impl ConvKernel {
    /// `Workgroup` on a GPU, `Registers` on a CPU adapter; `CUBOIDS_CONV_KERNEL=registers|
    /// workgroup` overrides it (to compare the two on one machine).
    pub fn for_adapter(ctx: &GpuContext) -> ConvKernel {
        match std::env::var("CUBOIDS_CONV_KERNEL").as_deref() {
            Ok("registers") => ConvKernel::Registers,
            Ok("workgroup") => ConvKernel::Workgroup,
            _ if ctx.is_software() => ConvKernel::Registers,
            _ => ConvKernel::Workgroup,
        }
    }

    /// A Conv's weights re-laid for this kernel, or None where the direct kernel runs it.
    pub(crate) fn relay(self, w: &nn::Tensor, group: usize) -> Option<Vec<f32>> {
        match self {
            ConvKernel::Registers => tiled_weights(w, group),
            ConvKernel::Workgroup => gemm_weights(w, group),
        }
    }
}

/// A Conv's weights as [`ConvKernel::relay`] laid them out.
pub(crate) struct Relaid {
    pub kernel: ConvKernel,
    pub buffer: wgpu::Buffer,
}

#[derive(Debug, Error)]
pub enum NnGpuError {
    #[error(transparent)]
    Gpu(#[from] GpuError),
    #[error(transparent)]
    Shape(#[from] NnError),
    #[error("{0} needs more than 6 axes")]
    Rank(&'static str),
}

/// A float32 tensor in a storage buffer (the buffer may be longer than the tensor).
#[derive(Clone, Debug)]
pub struct GpuTensor {
    pub buffer: wgpu::Buffer,
    pub shape: Vec<usize>,
}

impl GpuTensor {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where output tensors come from: buffers freed by earlier nodes, else new ones. Reusing a
/// buffer inside one command encoder is safe: wgpu orders the passes that touch it.
pub struct Buffers {
    free: Vec<wgpu::Buffer>,
}

impl Default for Buffers {
    fn default() -> Self {
        Buffers::new()
    }
}

impl Buffers {
    pub fn new() -> Buffers {
        Buffers { free: Vec::new() }
    }

    /// A buffer of at least `elements` floats: the smallest free one that holds them.
    pub(crate) fn take(
        &mut self,
        work: &mut Work,
        elements: usize,
    ) -> Result<wgpu::Buffer, GpuError> {
        let bytes = (elements.max(1) * 4) as u64;
        let best = (0..self.free.len())
            .filter(|&i| self.free[i].size() >= bytes)
            .min_by_key(|&i| self.free[i].size());
        match best {
            Some(i) => Ok(self.free.swap_remove(i)),
            None => work.scratch("inference tensor", elements),
        }
    }

    pub fn give(&mut self, buffer: wgpu::Buffer) {
        self.free.push(buffer);
    }
}

fn params(words: &[u32]) -> [u32; 32] {
    let mut p = [0u32; 32];
    p[..words.len()].copy_from_slice(words);
    p
}

/// Records `entry` over `invocations` outputs with the x, w, b inputs and the y output.
fn run(
    work: &mut Work,
    entry: &'static str,
    words: &[u32],
    inputs: [Option<&wgpu::Buffer>; 3],
    y: &wgpu::Buffer,
    invocations: usize,
) -> Result<(), GpuError> {
    let uniform = work.uniform(&params(words));
    let mut bindings = vec![(0, &uniform)];
    for (slot, buffer) in (1u32..).zip(inputs) {
        if let Some(buffer) = buffer {
            bindings.push((slot, buffer));
        }
    }
    bindings.push((4, y));
    work.dispatch(SHADER, entry, &bindings, invocations)
}

/// Records a kernel that reads only `x`, into a new tensor of `shape` (`invocations` threads).
fn unary(
    work: &mut Work,
    buffers: &mut Buffers,
    entry: &'static str,
    words: &[u32],
    x: &GpuTensor,
    shape: Vec<usize>,
    invocations: usize,
) -> Result<GpuTensor, NnGpuError> {
    let y = buffers.take(work, shape.iter().product())?;
    run(
        work,
        entry,
        words,
        [Some(&x.buffer), None, None],
        &y,
        invocations,
    )?;
    Ok(GpuTensor { buffer: y, shape })
}

/// A window's kernel, strides, dilations and begin pads: 12 of the conv and pool kernels'
/// parameter words.
fn window_words(window: &Window) -> Vec<u32> {
    [
        window.kernel,
        window.strides,
        window.dilations,
        window.begin,
    ]
    .iter()
    .flat_map(|v| u32s(v))
    .collect()
}

fn u32s(values: &[usize]) -> Vec<u32> {
    values.iter().map(|&v| v as u32).collect()
}

/// Conv weights `[M, C/group, taps...]` re-laid for `conv_gemm` as `[group, C/group · taps,
/// M/group]` (a k's channels side by side), or None for fewer than [`GEMM_MIN_CHANNELS`] output
/// channels per group.
pub(crate) fn gemm_weights(w: &nn::Tensor, group: usize) -> Option<Vec<f32>> {
    let m = *w.shape.first()?;
    if group == 0 || m == 0 || !m.is_multiple_of(group) || m / group < GEMM_MIN_CHANNELS {
        return None;
    }
    let per_group = m / group;
    let depth = w.len() / m;
    let mut out = vec![0.0; w.len()];
    for (i, v) in w.data.iter().enumerate() {
        let (oc, k) = (i / depth, i % depth);
        let (g, j) = (oc / per_group, oc % per_group);
        out[(g * depth + k) * per_group + j] = *v;
    }
    Some(out)
}

/// Conv weights `[M, C/group, taps...]` re-laid for `conv_tiled` as `[M/8, C/group, taps, 8]`
/// (a tap's 8 output channels side by side), or None where a group's output channels do not
/// come in eights (the direct kernel runs those).
pub(crate) fn tiled_weights(w: &nn::Tensor, group: usize) -> Option<Vec<f32>> {
    let m = *w.shape.first()?;
    if group == 0 || !(m / group).is_multiple_of(TILE_CHANNELS) || m == 0 {
        return None;
    }
    let per_channel = w.len() / m;
    let in_per_group = *w.shape.get(1)?;
    let taps = per_channel / in_per_group.max(1);
    let mut out = vec![0.0; w.len()];
    for (i, v) in w.data.iter().enumerate() {
        let (oc, rest) = (i / per_channel, i % per_channel);
        let (ic, t) = (rest / taps, rest % taps);
        let (block, j) = (oc / TILE_CHANNELS, oc % TILE_CHANNELS);
        out[((block * in_per_group + ic) * taps + t) * TILE_CHANNELS + j] = *v;
    }
    Some(out)
}

/// Conv or ConvTranspose (`output_padding` only for the latter). A Conv with `relaid` weights
/// runs their tiled kernel.
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv(
    work: &mut Work,
    buffers: &mut Buffers,
    x: &GpuTensor,
    w: (&wgpu::Buffer, &[usize]),
    b: Option<&wgpu::Buffer>,
    window: &Window,
    group: usize,
    transpose: Option<[usize; 3]>,
    relaid: Option<&Relaid>,
) -> Result<GpuTensor, NnGpuError> {
    let shape = match transpose {
        None => nn::conv_shape(&x.shape, w.1, window, group)?,
        Some(extra) => nn::conv_transpose_shape(&x.shape, w.1, window, extra, group)?,
    };
    let (_, c, spatial) = nn::ncs(&x.shape)?;
    let (_, m, out) = nn::ncs(&shape)?;
    let total: usize = shape.iter().product();
    let y = buffers.take(work, total)?;
    let mut words = u32s(&[total, c, m, group]);
    words.extend(u32s(&spatial));
    words.extend(u32s(&out));
    words.extend(window_words(window));
    words.push(b.is_some() as u32);
    let relaid = relaid.filter(|_| transpose.is_none());
    // An absent bias still needs a binding: the weights stand in (never read).
    let weights = relaid.map_or(w.0, |r| &r.buffer);
    let inputs = [Some(&x.buffer), Some(weights), b.or(Some(weights))];
    let (entry, invocations) = match (transpose, relaid.map(|r| r.kernel)) {
        (Some(_), _) => ("conv_transpose", total),
        (None, None) => ("conv", total),
        (None, Some(ConvKernel::Registers)) => {
            let blocks = out[2].div_ceil(TILE_VOXELS);
            let invocations = total / out[2] / TILE_CHANNELS * blocks;
            words.extend([invocations as u32, blocks as u32]);
            ("conv_tiled", invocations)
        }
        (None, Some(ConvKernel::Workgroup)) => {
            let n = shape[0];
            let voxels: usize = out.iter().product();
            let voxel_tiles = voxels.div_ceil(GEMM_TILE);
            let channel_tiles = (m / group).div_ceil(GEMM_TILE);
            words.extend([voxel_tiles as u32, channel_tiles as u32]);
            let groups = gemm_groups(work, voxel_tiles, channel_tiles * n * group)?;
            let uniform = work.uniform(&params(&words));
            let mut bindings = vec![(0, &uniform)];
            bindings.extend((1u32..).zip(inputs.iter().map(|b| b.expect("bound"))));
            bindings.push((4, &y));
            work.record(SHADER, "conv_gemm", &bindings, groups)?;
            return Ok(GpuTensor { buffer: y, shape });
        }
    };
    run(work, entry, &words, inputs, &y, invocations)?;
    Ok(GpuTensor { buffer: y, shape })
}

/// `conv_gemm`'s workgroup grid: the voxel tiles along x (spilling into y past the adapter's
/// per-dimension limit), and (batch, group, channel tile) along z.
fn gemm_groups(work: &Work, voxel_tiles: usize, z: usize) -> Result<[u32; 3], GpuError> {
    let max = work.ctx.limits.max_compute_workgroups_per_dimension as usize;
    let x = voxel_tiles.clamp(1, max);
    let y = voxel_tiles.div_ceil(x);
    if y > max || z > max {
        return Err(GpuError::TooLarge {
            what: format!("a convolution of {voxel_tiles} voxel tiles by {z} channel tiles"),
            needed: y.max(z) as u64,
            limit: max as u64,
        });
    }
    Ok([x as u32, y as u32, z as u32])
}

pub(crate) fn pool(
    work: &mut Work,
    buffers: &mut Buffers,
    x: &GpuTensor,
    kind: Pool,
    window: &Window,
    ceil: bool,
) -> Result<GpuTensor, NnGpuError> {
    let shape = nn::pool_shape(&x.shape, window, ceil)?;
    let (_, _, spatial) = nn::ncs(&x.shape)?;
    let (_, _, out) = nn::ncs(&shape)?;
    let total: usize = shape.iter().product();
    let mut words = vec![total as u32];
    words.extend(u32s(&spatial));
    words.extend(u32s(&out));
    words.extend(window_words(window));
    words.push(match kind {
        Pool::Max => 0,
        Pool::Average {
            count_include_pad: false,
        } => 1,
        Pool::Average {
            count_include_pad: true,
        } => 2,
    });
    words.extend(u32s(&window.end));
    unary(work, buffers, "pool", &words, x, shape, total)
}

/// `x · a[c] + b[c]` per channel (a BatchNormalization, as a scale and a shift).
pub(crate) fn affine(
    work: &mut Work,
    buffers: &mut Buffers,
    x: &GpuTensor,
    a: &wgpu::Buffer,
    b: &wgpu::Buffer,
) -> Result<GpuTensor, NnGpuError> {
    let (_, c, spatial) = nn::ncs(&x.shape)?;
    let total = x.len();
    let y = buffers.take(work, total)?;
    let volume: usize = spatial.iter().product();
    let words = u32s(&[total, volume, c]);
    run(
        work,
        "affine",
        &words,
        [Some(&x.buffer), Some(a), Some(b)],
        &y,
        total,
    )?;
    Ok(GpuTensor {
        buffer: y,
        shape: x.shape.clone(),
    })
}

pub(crate) fn instance_norm(
    work: &mut Work,
    buffers: &mut Buffers,
    x: &GpuTensor,
    scale: &wgpu::Buffer,
    bias: &wgpu::Buffer,
    epsilon: f32,
) -> Result<GpuTensor, NnGpuError> {
    let (n, c, spatial) = nn::ncs(&x.shape)?;
    let y = buffers.take(work, x.len())?;
    let pairs = n * c;
    let words = [
        pairs as u32,
        spatial.iter().product::<usize>() as u32,
        c as u32,
        epsilon.to_bits(),
    ];
    let uniform = work.uniform(&params(&words));
    let max = work.ctx.limits.max_compute_workgroups_per_dimension as usize;
    let groups = [pairs.min(max) as u32, pairs.div_ceil(max) as u32, 1];
    let bindings = [
        (0, &uniform),
        (1, &x.buffer),
        (2, scale),
        (3, bias),
        (4, &y),
    ];
    work.record(SHADER, "instance_norm", &bindings, groups)?;
    Ok(GpuTensor {
        buffer: y,
        shape: x.shape.clone(),
    })
}

pub(crate) fn activation(
    work: &mut Work,
    buffers: &mut Buffers,
    x: &GpuTensor,
    activation: Activation,
) -> Result<GpuTensor, NnGpuError> {
    let (op, alpha) = match activation {
        Activation::Relu => (0, 0.0f32),
        Activation::LeakyRelu(a) => (1, a),
        Activation::Elu(a) => (2, a),
        Activation::Sigmoid => (3, 0.0),
        Activation::Tanh => (4, 0.0),
    };
    elementwise(work, buffers, x, op, alpha)
}

/// `x` rounded to float16 and widened back (a half-precision net's storage), as
/// [`crate::ops::nn::round_to_f16`] rounds.
pub(crate) fn round_to_f16(
    work: &mut Work,
    buffers: &mut Buffers,
    x: &GpuTensor,
) -> Result<GpuTensor, NnGpuError> {
    elementwise(work, buffers, x, 5, 0.0)
}

/// `values` rounded to float16 on the GPU by the kernel a half-precision net uses: the kernel
/// alone, for the test that holds it to [`crate::ops::nn::round_to_f16`] bit for bit.
pub fn round_values_to_f16(ctx: &GpuContext, values: &[f32]) -> Result<Vec<f32>, NnGpuError> {
    let mut work = Work::new(ctx, "float16 rounding");
    let mut buffers = Buffers::new();
    let x = GpuTensor {
        buffer: work.upload("values", bytemuck::cast_slice(values))?,
        shape: vec![values.len()],
    };
    let y = round_to_f16(&mut work, &mut buffers, &x)?;
    let bytes = (values.len() as u64 * 4).max(4);
    let words = work.finish_prefixes(&[(&y.buffer, bytes)])?;
    Ok(bytemuck::cast_slice(&words[0])[..values.len()].to_vec())
}

/// The `activation` entry point's operation `op` on every element.
fn elementwise(
    work: &mut Work,
    buffers: &mut Buffers,
    x: &GpuTensor,
    op: u32,
    alpha: f32,
) -> Result<GpuTensor, NnGpuError> {
    let total = x.len();
    let words = [total as u32, op, alpha.to_bits()];
    unary(
        work,
        buffers,
        "activation",
        &words,
        x,
        x.shape.clone(),
        total,
    )
}

/// A shape widened to 6 axes by leading 1s.
fn six(shape: &[usize], what: &'static str) -> Result<[usize; 6], NnGpuError> {
    if shape.len() > 6 {
        return Err(NnGpuError::Rank(what));
    }
    let mut out = [1; 6];
    out[6 - shape.len()..].copy_from_slice(shape);
    Ok(out)
}

/// Strides reading `shape` as broadcast to the 6-axis `to` (0 along broadcast axes).
fn broadcast_strides6(shape: &[usize], to: &[usize; 6]) -> Result<[usize; 6], NnGpuError> {
    let own = six(shape, "broadcasting")?;
    let strides = nn::strides_of(&own);
    Ok(std::array::from_fn(|a| {
        if own[a] == 1 && to[a] != 1 {
            0
        } else {
            strides[a]
        }
    }))
}

pub(crate) fn binary(
    work: &mut Work,
    buffers: &mut Buffers,
    a: &GpuTensor,
    b: &GpuTensor,
    op: Binary,
) -> Result<GpuTensor, NnGpuError> {
    let shape = nn::broadcast_shape(&a.shape, &b.shape)?;
    let total: usize = shape.iter().product();
    let out6 = six(&shape, "broadcasting")?;
    let y = buffers.take(work, total)?;
    let mut words = vec![
        total as u32,
        match op {
            Binary::Add => 0,
            Binary::Sub => 1,
            Binary::Mul => 2,
            Binary::Div => 3,
        },
    ];
    words.extend(u32s(&out6));
    words.extend(u32s(&broadcast_strides6(&a.shape, &out6)?));
    words.extend(u32s(&broadcast_strides6(&b.shape, &out6)?));
    let inputs = [Some(&a.buffer), Some(&b.buffer), None];
    run(work, "binary", &words, inputs, &y, total)?;
    Ok(GpuTensor { buffer: y, shape })
}

/// Softmax over axes `from..to` taken together.
pub(crate) fn softmax(
    work: &mut Work,
    buffers: &mut Buffers,
    x: &GpuTensor,
    from: usize,
    to: usize,
) -> Result<GpuTensor, NnGpuError> {
    if from >= to || to > x.shape.len() {
        return Err(
            NnError::Shape(format!("softmax over axes {from}..{to} of {:?}", x.shape)).into(),
        );
    }
    let block: usize = x.shape[from..to].iter().product();
    let inner: usize = x.shape[to..].iter().product();
    let columns = x.len() / block.max(1);
    let words = u32s(&[columns, block, inner]);
    unary(
        work,
        buffers,
        "softmax",
        &words,
        x,
        x.shape.clone(),
        columns,
    )
}

pub(crate) fn concat(
    work: &mut Work,
    buffers: &mut Buffers,
    xs: &[&GpuTensor],
    axis: usize,
) -> Result<GpuTensor, NnGpuError> {
    let shapes: Vec<&[usize]> = xs.iter().map(|x| x.shape.as_slice()).collect();
    let shape = nn::concat_shape(&shapes, axis)?;
    let total: usize = shape.iter().product();
    let y = buffers.take(work, total)?;
    let out_run: usize = shape[axis..].iter().product();
    let mut offset = 0;
    for x in xs {
        let run_len: usize = x.shape[axis..].iter().product();
        let words = u32s(&[x.len(), run_len, out_run, offset]);
        run(
            work,
            "concat",
            &words,
            [Some(&x.buffer), None, None],
            &y,
            x.len(),
        )?;
        offset += run_len;
    }
    Ok(GpuTensor { buffer: y, shape })
}

pub(crate) fn slice(
    work: &mut Work,
    buffers: &mut Buffers,
    x: &GpuTensor,
    axes: &[SliceAxis],
) -> Result<GpuTensor, NnGpuError> {
    let shape: Vec<usize> = axes.iter().map(|a| a.len).collect();
    let total: usize = shape.iter().product();
    let strides = nn::strides_of(&x.shape);
    six(&shape, "Slice")?;
    let lead = 6 - shape.len();
    let mut dims = [1u32; 6];
    let mut steps = [0i32; 6];
    let mut first = 0i64;
    for (a, axis) in axes.iter().enumerate() {
        dims[lead + a] = axis.len as u32;
        steps[lead + a] = (axis.step * strides[a] as i64) as i32;
        first += axis.start * strides[a] as i64;
    }
    let mut words = vec![total as u32];
    words.extend(dims);
    words.extend(steps.map(|s| s as u32));
    words.push(first as u32);
    unary(work, buffers, "slice", &words, x, shape, total)
}

pub(crate) fn pad(
    work: &mut Work,
    buffers: &mut Buffers,
    x: &GpuTensor,
    pads: &[i64],
    mode: PadMode,
) -> Result<GpuTensor, NnGpuError> {
    // The CPU reference's checks (pads per axis, reflect on short axes) and shape.
    let rank = x.shape.len();
    if pads.len() != 2 * rank {
        return Err(NnError::Shape(format!("{} pads for a rank-{rank} tensor", pads.len())).into());
    }
    let shape: Vec<usize> = (0..rank)
        .map(|a| (x.shape[a] as i64 + pads[a] + pads[a + rank]).max(0) as usize)
        .collect();
    if mode == PadMode::Reflect && (0..rank).any(|a| x.shape[a] < 2 && shape[a] != x.shape[a]) {
        return Err(NnError::Shape("reflect padding of an axis shorter than 2".into()).into());
    }
    let total: usize = shape.iter().product();
    let out6 = six(&shape, "Pad")?;
    let in6 = six(&x.shape, "Pad")?;
    let mut begins = [0i32; 6];
    for a in 0..rank {
        begins[6 - rank + a] = pads[a] as i32;
    }
    let (code, value) = match mode {
        PadMode::Constant(v) => (0, v),
        PadMode::Reflect => (1, 0.0),
        PadMode::Edge => (2, 0.0),
    };
    let mut words = vec![total as u32];
    words.extend(u32s(&out6));
    words.extend(u32s(&in6));
    words.extend(begins.map(|b| b as u32));
    words.push(code);
    words.push(f32::to_bits(value));
    unary(work, buffers, "pad", &words, x, shape, total)
}

/// Resize, one axis at a time; the taps are the CPU reference's ([`nn::resize_taps`]).
pub(crate) fn resize(
    work: &mut Work,
    buffers: &mut Buffers,
    x: &GpuTensor,
    shape: &[usize],
    scales: &[f32],
    mode: ResizeMode,
    coordinates: CoordinateMode,
) -> Result<(GpuTensor, Vec<wgpu::Buffer>), NnGpuError> {
    if shape.len() != x.shape.len() || scales.len() != x.shape.len() {
        return Err(NnError::Shape(format!("resizing {:?} to {shape:?}", x.shape)).into());
    }
    let mut current = x.clone();
    let mut freed = Vec::new();
    for axis in 0..shape.len() {
        if shape[axis] == current.shape[axis] && scales[axis] == 1.0 {
            continue;
        }
        let taps = nn::resize_taps(
            current.shape[axis],
            shape[axis],
            scales[axis],
            mode,
            coordinates,
        );
        let table: Vec<u8> = taps
            .iter()
            .flat_map(|[(t0, w0), (t1, w1)]| [*t0 as u32, *t1 as u32, w0.to_bits(), w1.to_bits()])
            .flat_map(u32::to_le_bytes)
            .collect();
        let table = work.upload("resize taps", &table)?;
        let mut out_shape = current.shape.clone();
        out_shape[axis] = shape[axis];
        let total: usize = out_shape.iter().product();
        let y = buffers.take(work, total)?;
        let inner: usize = current.shape[axis + 1..].iter().product();
        let words = u32s(&[total, current.shape[axis], shape[axis], inner]);
        run(
            work,
            "resize_axis",
            &words,
            [Some(&current.buffer), Some(&table), None],
            &y,
            total,
        )?;
        if axis_is_intermediate(&current, x) {
            freed.push(current.buffer.clone());
        }
        current = GpuTensor {
            buffer: y,
            shape: out_shape,
        };
    }
    if !axis_is_intermediate(&current, x) {
        // Nothing to resize: a copy, so the output is a buffer of its own.
        current = copy(work, buffers, x, x.shape.clone())?;
    }
    Ok((current, freed))
}

/// The same elements in a buffer of their own, under `shape` (Identity, Reshape).
pub(crate) fn copy(
    work: &mut Work,
    buffers: &mut Buffers,
    x: &GpuTensor,
    shape: Vec<usize>,
) -> Result<GpuTensor, NnGpuError> {
    let n = x.len();
    let words = u32s(&[n, n.max(1), n, 0]);
    unary(work, buffers, "concat", &words, x, shape, n)
}

fn axis_is_intermediate(t: &GpuTensor, input: &GpuTensor) -> bool {
    t.buffer != input.buffer
}
