//! A [`Model`] run on the GPU (`shaders/nn.wgsl` through [`crate::gpu::nn`]): weights are
//! uploaded once when the executor is made, each patch is one submission in which every node
//! is a kernel and activations stay on the device (a node's buffer is reused once its last
//! reader is recorded), and only the output is read back. The CPU reference
//! ([`super::cpu`]) is its oracle.

use super::model::{axis_of, resize_target, slice_axes, widened, InferError, Model, Op};
use super::region::Executor;
use crate::gpu::context::GpuContext;
use crate::gpu::nn::{self as kernels, Buffers, ConvKernel, GpuTensor, NnGpuError, Relaid};
use crate::gpu::work::Work;
use crate::ops::nn::Tensor;
use std::collections::HashMap;
use std::sync::Arc;
use wgpu::util::DeviceExt;

/// Weights on the device, and each BatchNormalization as a per-channel scale and shift.
pub struct GpuExecutor {
    ctx: Arc<GpuContext>,
    model: Model,
    constants: HashMap<usize, GpuTensor>,
    /// Node index → (scale, shift) of a BatchNormalization.
    affine: HashMap<usize, (wgpu::Buffer, wgpu::Buffer)>,
    /// Node index → a Conv's weights as its tiled kernel reads them (none: the direct kernel).
    tiled: HashMap<usize, Relaid>,
    /// The most patches run at once ([`MAX_BATCH`] on a GPU; 1 on a CPU adapter, whose
    /// "device" memory is the task's host memory, which the plan sized for one patch).
    max_batch: usize,
}

/// The most patches a GPU runs at once: enough to fill it with small patches, few enough that
/// a batch of large ones stays a small part of its memory.
pub const MAX_BATCH: usize = 8;

/// Host memory a batch's inputs and outputs may take beyond one patch's (the batch tensor, its
/// read-back), so that batching stays within the task's budget (not yet measured on a GPU).
pub const BATCH_HOST_BYTES: usize = 32 << 20;

fn device_buffer(ctx: &GpuContext, label: &str, data: &[f32]) -> Result<wgpu::Buffer, NnGpuError> {
    let bytes: &[u8] = if data.is_empty() {
        &[0; 4]
    } else {
        bytemuck::cast_slice(data)
    };
    Ok(ctx.scoped("uploading model weights", || {
        ctx.device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents: bytes,
                usage: wgpu::BufferUsages::STORAGE,
            })
    })?)
}

impl GpuExecutor {
    /// The executor with the convolution kernel that suits the adapter
    /// ([`ConvKernel::for_adapter`]).
    pub fn new(ctx: Arc<GpuContext>, model: Model) -> Result<GpuExecutor, InferError> {
        let kernel = ConvKernel::for_adapter(&ctx);
        GpuExecutor::with_conv_kernel(ctx, model, kernel)
    }

    /// The executor running its Conv nodes on `kernel` (tests hold each kernel to the
    /// reference on any adapter).
    pub fn with_conv_kernel(
        ctx: Arc<GpuContext>,
        model: Model,
        kernel: ConvKernel,
    ) -> Result<GpuExecutor, InferError> {
        let gpu = |e: NnGpuError| InferError::Gpu {
            path: model.path.clone(),
            source: e,
        };
        let mut constants = HashMap::new();
        for (&slot, tensor) in &model.constants {
            let bytes = tensor.len() as u64 * 4;
            if bytes > ctx.max_binding_bytes() {
                return Err(gpu(crate::gpu::GpuError::TooLarge {
                    what: format!("a weight tensor of shape {:?}", tensor.shape),
                    needed: bytes,
                    limit: ctx.max_binding_bytes(),
                }
                .into()));
            }
            let buffer = device_buffer(&ctx, "weights", &tensor.data).map_err(gpu)?;
            constants.insert(
                slot,
                GpuTensor {
                    buffer,
                    shape: tensor.shape.clone(),
                },
            );
        }
        let mut tiled = HashMap::new();
        for (i, node) in model.nodes.iter().enumerate() {
            let Op::Conv { group, .. } = node.op else {
                continue;
            };
            let weights = node.inputs[1].and_then(|s| model.constants.get(&s));
            if let Some(data) = weights.and_then(|w| kernel.relay(w, group)) {
                let buffer = device_buffer(&ctx, "tiled weights", &data).map_err(gpu)?;
                tiled.insert(i, Relaid { kernel, buffer });
            }
        }
        let mut affine = HashMap::new();
        for (i, node) in model.nodes.iter().enumerate() {
            let Op::BatchNorm { epsilon } = node.op else {
                continue;
            };
            let param = |k: usize| {
                node.inputs[k]
                    .and_then(|s| model.constants.get(&s))
                    .map(|t| t.data.clone())
                    .ok_or_else(|| InferError::Node {
                        path: model.path.clone(),
                        node: node.name.clone(),
                        op: node.op_type.clone(),
                        message: "its parameters must be constants".into(),
                    })
            };
            let (scale, bias, mean, var) = (param(1)?, param(2)?, param(3)?, param(4)?);
            let a: Vec<f32> = (0..scale.len())
                .map(|c| scale[c] / (var[c] + epsilon).sqrt())
                .collect();
            let b: Vec<f32> = (0..scale.len()).map(|c| bias[c] - mean[c] * a[c]).collect();
            affine.insert(
                i,
                (
                    device_buffer(&ctx, "batchnorm scale", &a).map_err(gpu)?,
                    device_buffer(&ctx, "batchnorm shift", &b).map_err(gpu)?,
                ),
            );
        }
        let max_batch = if ctx.is_software() { 1 } else { MAX_BATCH };
        Ok(GpuExecutor {
            ctx,
            model,
            constants,
            affine,
            tiled,
            max_batch,
        })
    }

    /// At most `n` patches at once (tests batch on lavapipe too).
    pub fn with_max_batch(mut self, n: usize) -> GpuExecutor {
        self.max_batch = n.max(1);
        self
    }

    fn execute(&self, patch: Tensor) -> Result<Tensor, NnGpuError> {
        let model = &self.model;
        let mut work = Work::new(&self.ctx, "inference");
        let mut buffers = Buffers::new();
        let last_read = model.last_reads();
        let mut values: Vec<Option<GpuTensor>> = vec![None; model.slots];
        let half = model.precision == super::Precision::Float16;
        let mut patch = patch;
        if half {
            crate::ops::nn::round_tensor_to_f16(&mut patch);
        }
        let input = work.upload("patch", bytemuck::cast_slice(&patch.data))?;
        values[model.input_slot] = Some(GpuTensor {
            buffer: input,
            shape: patch.shape.clone(),
        });
        for (i, node) in model.nodes.iter().enumerate() {
            let ins: Vec<Option<&GpuTensor>> = node
                .inputs
                .iter()
                .map(|s| s.and_then(|s| values[s].as_ref().or(self.constants.get(&s))))
                .collect();
            let mut output = self.node(&mut work, &mut buffers, i, &ins)?;
            if half {
                let rounded = kernels::round_to_f16(&mut work, &mut buffers, &output)?;
                buffers.give(std::mem::replace(&mut output, rounded).buffer);
            }
            let mut read: Vec<usize> = node.inputs.iter().flatten().copied().collect();
            read.sort_unstable();
            read.dedup();
            for slot in read {
                if last_read[slot] == i && slot != model.output_slot {
                    if let Some(t) = values[slot].take() {
                        buffers.give(t.buffer);
                    }
                }
            }
            values[node.output] = Some(output);
        }
        let out = values[model.output_slot]
            .take()
            .expect("the model's output is a node's (checked at load)");
        let bytes = out.len() as u64 * 4;
        let words = work.finish_prefixes(&[(&out.buffer, bytes.max(4))])?;
        let data: Vec<f32> = bytemuck::cast_slice(&words[0])[..out.len()].to_vec();
        Ok(Tensor::new(out.shape, data))
    }

    fn node(
        &self,
        work: &mut Work,
        buffers: &mut Buffers,
        index: usize,
        ins: &[Option<&GpuTensor>],
    ) -> Result<GpuTensor, NnGpuError> {
        let node = &self.model.nodes[index];
        let input = |i: usize| {
            ins.get(i).copied().flatten().ok_or_else(|| {
                NnGpuError::Shape(crate::ops::nn::NnError::Shape(format!(
                    "input {i} is missing"
                )))
            })
        };
        let x = input(0)?;
        let spatial = x.shape.get(2..).unwrap_or(&[]).to_vec();
        Ok(match &node.op {
            Op::Conv { window, group } => {
                let w = input(1)?;
                let b = ins.get(2).copied().flatten().map(|b| &b.buffer);
                let window = window.resolve(&spatial)?;
                kernels::conv(
                    work,
                    buffers,
                    x,
                    (&w.buffer, &w.shape),
                    b,
                    &window,
                    *group,
                    None,
                    self.tiled.get(&index),
                )?
            }
            Op::ConvTranspose {
                window,
                output_padding,
                group,
            } => {
                let w = input(1)?;
                let b = ins.get(2).copied().flatten().map(|b| &b.buffer);
                let window = window.resolve(&spatial)?;
                let extra = Some(widened(output_padding));
                kernels::conv(
                    work,
                    buffers,
                    x,
                    (&w.buffer, &w.shape),
                    b,
                    &window,
                    *group,
                    extra,
                    None,
                )?
            }
            Op::Pool { kind, window, ceil } => {
                kernels::pool(work, buffers, x, *kind, &window.resolve(&spatial)?, *ceil)?
            }
            Op::BatchNorm { .. } => {
                let (a, b) = &self.affine[&index];
                kernels::affine(work, buffers, x, a, b)?
            }
            Op::InstanceNorm { epsilon } => kernels::instance_norm(
                work,
                buffers,
                x,
                &input(1)?.buffer,
                &input(2)?.buffer,
                *epsilon,
            )?,
            Op::Activation(a) => kernels::activation(work, buffers, x, *a)?,
            Op::Softmax { axis, coerced } => {
                let from = axis_of(*axis, x.shape.len())?;
                let to = if *coerced { x.shape.len() } else { from + 1 };
                kernels::softmax(work, buffers, x, from, to)?
            }
            Op::Binary(op) => kernels::binary(work, buffers, x, input(1)?, *op)?,
            Op::Concat { axis } => {
                let all: Vec<&GpuTensor> = ins.iter().flatten().copied().collect();
                kernels::concat(work, buffers, &all, axis_of(*axis, x.shape.len())?)?
            }
            Op::Slice {
                starts,
                ends,
                axes,
                steps,
            } => {
                let axes = slice_axes(&x.shape, starts, ends, axes, steps)?;
                kernels::slice(work, buffers, x, &axes)?
            }
            Op::Pad { pads, mode } => kernels::pad(work, buffers, x, pads, *mode)?,
            Op::Resize {
                scales,
                sizes,
                mode,
                coordinates,
            } => {
                let (shape, scales) = resize_target(&x.shape, scales, sizes)?;
                let (y, freed) =
                    kernels::resize(work, buffers, x, &shape, &scales, *mode, *coordinates)?;
                for b in freed {
                    buffers.give(b);
                }
                y
            }
            Op::Identity => kernels::copy(work, buffers, x, x.shape.clone())?,
            Op::Reshape { shape, allow_zero } => {
                let to = super::model::reshape_target(&x.shape, shape, *allow_zero)?;
                kernels::copy(work, buffers, x, to)?
            }
        })
    }
}

impl Executor for GpuExecutor {
    /// Every tensor of a patch must fit one storage binding of this adapter (128 MiB on
    /// lavapipe): the largest is named with the node that makes it.
    fn check(&self, shape: &[usize]) -> Result<(), InferError> {
        let shapes = self.model.shapes(shape)?;
        let limit = self.ctx.max_binding_bytes();
        for node in &self.model.nodes {
            let bytes = shapes[node.output].iter().product::<usize>() as u64 * 4;
            if bytes > limit {
                return Err(InferError::Node {
                    path: self.model.path.clone(),
                    node: node.name.clone(),
                    op: node.op_type.clone(),
                    message: format!(
                        "for a patch of {:?} (x,y,z) its output {:?} takes {bytes} bytes, over this GPU's {limit}-byte storage binding limit: give a smaller --patch",
                        [shape[4], shape[3], shape[2]],
                        shapes[node.output]
                    ),
                });
            }
        }
        Ok(())
    }

    /// As many patches as fit one storage binding at once (every tensor of the batch must),
    /// up to the executor's most; 1 for a net that cannot batch.
    fn batch(&self, shape: &[usize]) -> usize {
        if self.max_batch == 1 || !self.model.batchable() {
            return 1;
        }
        let Ok(shapes) = self.model.shapes(shape) else {
            return 1;
        };
        let bytes = |slot: usize| shapes[slot].iter().product::<usize>() * 4;
        let largest = (0..shapes.len()).map(bytes).max().unwrap_or(0).max(4);
        // The batch tensor and the read-back output, each held twice (built, then copied).
        let host = 2 * (bytes(self.model.input_slot) + bytes(self.model.output_slot)).max(1);
        let by_host = 1 + BATCH_HOST_BYTES / host;
        (self.ctx.max_binding_bytes() as usize / largest)
            .min(by_host)
            .clamp(1, self.max_batch)
    }

    fn run(&self, patch: Tensor) -> Result<Tensor, InferError> {
        self.model.shapes(&patch.shape)?;
        self.execute(patch).map_err(|source| InferError::Gpu {
            path: self.model.path.clone(),
            source,
        })
    }

    fn engine(&self) -> &'static str {
        if self.ctx.is_software() {
            "wgsl-lavapipe"
        } else {
            "wgsl-gpu"
        }
    }
}
