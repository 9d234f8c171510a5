//! An ONNX model as inference runs it: one float input, one output, and nodes in
//! topological order whose operators and attributes are checked when the model is loaded, so
//! a model inference cannot run fails before anything is read or written, naming the node.
//!
//! Loading also turns what ONNX passes as tensors but must be known in advance (Reshape's
//! shape, Slice's starts and ends, Pad's pads, Resize's scales or sizes, Constant nodes) into
//! attributes, and folds a BatchNormalization that only follows a Conv into the Conv's
//! weights and biases (as every inference engine does: one pass fewer over the activations).

use super::onnx::{self, data_type, AttributeProto, ModelProto, NodeProto, TensorProto};
use crate::ops::nn::{
    self, Activation, Binary, CoordinateMode, NearestMode, NnError, PadMode, Pool, ResizeMode,
    Tensor, Window,
};
use prost::Message;
use std::collections::HashMap;
use std::path::Path;
use thiserror::Error;

/// The operators inference runs, by their ONNX names.
pub const SUPPORTED: &[&str] = &[
    "Conv",
    "ConvTranspose",
    "MaxPool",
    "AveragePool",
    "BatchNormalization",
    "InstanceNormalization",
    "Relu",
    "LeakyRelu",
    "Elu",
    "Sigmoid",
    "Tanh",
    "Softmax",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Concat",
    "Slice",
    "Pad",
    "Resize",
    "Upsample",
    "Identity",
    "Constant",
    "Reshape",
];

#[derive(Debug, Error)]
pub enum InferError {
    #[error("cannot read the model {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not an ONNX model")]
    Decode {
        path: String,
        #[source]
        source: prost::DecodeError,
    },
    #[error("{path}: {message}")]
    Model { path: String, message: String },
    #[error(
        "{path}: node {node} uses operator {op}, which cuboids does not run (it runs {})",
        SUPPORTED.join(", ")
    )]
    Unsupported {
        path: String,
        node: String,
        op: String,
    },
    #[error("{path}: node {node} ({op}): {message}")]
    Node {
        path: String,
        node: String,
        op: String,
        message: String,
    },
    #[error("{path}: running the model on the GPU")]
    Gpu {
        path: String,
        #[source]
        source: crate::gpu::nn::NnGpuError,
    },
    #[error("{path}: node {node} ({op})")]
    Shape {
        path: String,
        node: String,
        op: String,
        #[source]
        source: NnError,
    },
}

/// How a convolution or pooling is padded: explicit pads or ONNX's `auto_pad`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Padding {
    Explicit(Vec<usize>),
    SameUpper,
    SameLower,
    Valid,
}

/// A window's attributes before the input's shape resolves `auto_pad`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WindowSpec {
    pub kernel: Vec<usize>,
    pub strides: Vec<usize>,
    pub dilations: Vec<usize>,
    pub padding: Padding,
}

impl WindowSpec {
    /// The window over an input whose spatial lengths are `spatial` (1 to 3 of them).
    pub fn resolve(&self, spatial: &[usize]) -> Result<Window, NnError> {
        let rank = self.kernel.len();
        let pads = match &self.padding {
            Padding::Explicit(pads) => pads.clone(),
            Padding::Valid => vec![0; 2 * rank],
            same => {
                if spatial.len() != rank {
                    return Err(NnError::Shape(format!(
                        "a {rank}-axis window over {} spatial axes",
                        spatial.len()
                    )));
                }
                let mut pads = vec![0; 2 * rank];
                for a in 0..rank {
                    let s = self.strides.get(a).copied().unwrap_or(1);
                    let d = self.dilations.get(a).copied().unwrap_or(1);
                    let extent = (self.kernel[a] - 1) * d + 1;
                    let out = spatial[a].div_ceil(s);
                    let total = ((out - 1) * s + extent).saturating_sub(spatial[a]);
                    let small = total / 2;
                    (pads[a], pads[a + rank]) = match same {
                        Padding::SameUpper => (small, total - small),
                        _ => (total - small, small),
                    };
                }
                pads
            }
        };
        Window::new(&self.kernel, &self.strides, &self.dilations, &pads)
    }
}

/// An operator with its attributes. Inputs (data, weights, biases, normalisation
/// parameters) are the node's inputs, in ONNX's order.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    Conv {
        window: WindowSpec,
        group: usize,
    },
    ConvTranspose {
        window: WindowSpec,
        output_padding: Vec<usize>,
        group: usize,
    },
    Pool {
        kind: Pool,
        window: WindowSpec,
        ceil: bool,
    },
    BatchNorm {
        epsilon: f32,
    },
    InstanceNorm {
        epsilon: f32,
    },
    Activation(Activation),
    /// Softmax over `axis` (with `coerced`, opset < 13: over every axis from `axis` on).
    Softmax {
        axis: i64,
        coerced: bool,
    },
    Binary(Binary),
    Concat {
        axis: i64,
    },
    Slice {
        starts: Vec<i64>,
        ends: Vec<i64>,
        axes: Vec<i64>,
        steps: Vec<i64>,
    },
    Pad {
        pads: Vec<i64>,
        mode: PadMode,
    },
    Resize {
        scales: Vec<f32>,
        sizes: Vec<usize>,
        mode: ResizeMode,
        coordinates: CoordinateMode,
    },
    Identity,
    Reshape {
        shape: Vec<i64>,
        allow_zero: bool,
    },
}

/// A node: its operator, the slots it reads (None for an omitted optional input) and the slot
/// it writes.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    /// The node's name in the model, or `#i (Op)` where it has none.
    pub name: String,
    pub op_type: String,
    pub op: Op,
    pub inputs: Vec<Option<usize>>,
    pub output: usize,
}

/// A loaded model.
#[derive(Clone, Debug)]
pub struct Model {
    /// The file it came from, for messages.
    pub path: String,
    pub opset: i64,
    pub input_name: String,
    /// The input's shape; a symbolic (named) dimension is `None`.
    pub input_shape: Vec<Option<usize>>,
    pub output_name: String,
    pub nodes: Vec<Node>,
    /// Slot count: graph input, constants and every node output.
    pub slots: usize,
    pub input_slot: usize,
    pub output_slot: usize,
    /// Weights and other float constants, by slot.
    pub constants: HashMap<usize, Tensor>,
    /// What the engines compute in; float16 constants are already rounded.
    pub precision: super::Precision,
}

/// A constant tensor as stored: float data, or integers (shapes, indices) kept exact.
#[derive(Clone, Debug)]
enum Constant {
    Float(Tensor),
    Int(Vec<usize>, Vec<i64>),
}

impl Model {
    /// The model computing in `precision`: for float16 its weights (BatchNorm folded) and other
    /// constants rounded to float16, and every engine rounds the input and each node's output.
    pub fn with_precision(mut self, precision: super::Precision) -> Model {
        if precision == super::Precision::Float16 && self.precision != precision {
            for t in self.constants.values_mut() {
                crate::ops::nn::round_tensor_to_f16(t);
            }
        }
        self.precision = precision;
        self
    }

    /// Reads and loads a model file.
    pub fn open(path: &Path) -> Result<Model, InferError> {
        let shown = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| InferError::Read {
            path: shown.clone(),
            source,
        })?;
        Model::from_bytes(&bytes, &shown)
    }

    /// Loads a serialized ModelProto; `path` names it in errors.
    pub fn from_bytes(bytes: &[u8], path: &str) -> Result<Model, InferError> {
        let proto = ModelProto::decode(bytes).map_err(|source| InferError::Decode {
            path: path.to_string(),
            source,
        })?;
        Loader::new(path).load(proto)
    }

    /// Whether patches can run several at once along N, each exactly as alone: no node
    /// reshapes, or concatenates, slices, pads, resizes to sizes or takes a softmax along the
    /// batch axis. A static batch of 1 in such a net is then only how it was exported.
    pub fn batchable(&self) -> bool {
        let rank = self.input_shape.len() as i64;
        let batch_axis = |a: i64| a == 0 || a == -rank;
        self.nodes.iter().all(|n| match &n.op {
            Op::Reshape { .. } => false,
            Op::Concat { axis } => !batch_axis(*axis),
            Op::Softmax { axis, .. } => !batch_axis(*axis),
            Op::Slice { axes, .. } => !axes.is_empty() && !axes.iter().any(|&a| batch_axis(a)),
            Op::Pad { pads, .. } => {
                pads.first().is_none_or(|&p| p == 0)
                    && pads.get(pads.len() / 2).is_none_or(|&p| p == 0)
            }
            Op::Resize { sizes, scales, .. } => {
                sizes.is_empty() && scales.first().is_none_or(|&s| s == 1.0)
            }
            _ => true,
        })
    }

    /// Every slot's shape for an input of `input` (N, C, spatial...), checked node by node. A
    /// [`Model::batchable`] net with a static batch of 1 takes any batch.
    pub fn shapes(&self, input: &[usize]) -> Result<Vec<Vec<usize>>, InferError> {
        let any_batch = self.batchable();
        if input.len() != self.input_shape.len()
            || input
                .iter()
                .zip(&self.input_shape)
                .enumerate()
                .any(|(axis, (&got, &want))| {
                    want.is_some_and(|w| w != got && !(axis == 0 && w == 1 && any_batch))
                })
        {
            return Err(InferError::Model {
                path: self.path.clone(),
                message: format!(
                    "input '{}' has shape {} and cannot take {input:?}",
                    self.input_name,
                    shown_shape(&self.input_shape)
                ),
            });
        }
        let mut shapes: Vec<Vec<usize>> = vec![Vec::new(); self.slots];
        shapes[self.input_slot] = input.to_vec();
        for (&slot, tensor) in &self.constants {
            shapes[slot] = tensor.shape.clone();
        }
        for node in &self.nodes {
            let ins: Vec<Option<&[usize]>> = node
                .inputs
                .iter()
                .map(|i| i.map(|s| shapes[s].as_slice()))
                .collect();
            shapes[node.output] =
                output_shape(&node.op, &ins).map_err(|source| self.shape_error(node, source))?;
        }
        Ok(shapes)
    }

    pub(super) fn shape_error(&self, node: &Node, source: NnError) -> InferError {
        InferError::Shape {
            path: self.path.clone(),
            node: node.name.clone(),
            op: node.op_type.clone(),
            source,
        }
    }

    /// Per slot, the index of the last node that reads it (`usize::MAX` for none): where an
    /// executor may drop or reuse the slot's value.
    pub fn last_reads(&self) -> Vec<usize> {
        let mut last = vec![usize::MAX; self.slots];
        for (i, node) in self.nodes.iter().enumerate() {
            for &slot in node.inputs.iter().flatten() {
                last[slot] = i;
            }
        }
        last
    }

    /// Per slot, how many node inputs read it, the model's output counting as one more: a
    /// value read once may be folded or fused into the node that makes it.
    pub fn reader_counts(&self) -> Vec<usize> {
        let mut readers = vec![0usize; self.slots];
        for node in &self.nodes {
            for &slot in node.inputs.iter().flatten() {
                readers[slot] += 1;
            }
        }
        readers[self.output_slot] += 1;
        readers
    }

    /// The node that writes each slot a node writes.
    pub fn writers(&self) -> HashMap<usize, usize> {
        self.nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.output, i))
            .collect()
    }

    /// The input's channel count, where the model fixes it.
    pub fn input_channels(&self) -> Option<usize> {
        self.input_shape.get(1).copied().flatten()
    }

    /// What one patch of `input` (N, C, spatial...) costs: its arithmetic and the memory an
    /// executor holds for it (what plans are sized and timed by).
    pub fn cost(&self, input: &[usize]) -> Result<PatchCost, InferError> {
        let shapes = self.shapes(input)?;
        let count = |slot: usize| shapes[slot].iter().product::<usize>() as u64;
        let mut flops = 0;
        for node in &self.nodes {
            let weights = node.inputs.get(1).copied().flatten();
            let per_output = weights.map_or(0, |w| shapes[w][1..].iter().product::<usize>() as u64);
            flops += match node.op {
                // A multiply-add per output value and weight of its group.
                Op::Conv { .. } => 2 * count(node.output) * per_output,
                // A multiply-add per input value and weight it spreads over.
                Op::ConvTranspose { .. } => node.inputs[0].map_or(0, |x| 2 * count(x) * per_output),
                _ => 0,
            };
        }
        // Values live from the node that makes them to their last reader, as both executors
        // keep them; the peak over the nodes is what a patch holds at once.
        let last_read = self.last_reads();
        let mut live = count(self.input_slot);
        let mut peak = live;
        for (i, node) in self.nodes.iter().enumerate() {
            live += count(node.output);
            peak = peak.max(live);
            let mut read: Vec<usize> = node.inputs.iter().flatten().copied().collect();
            read.sort_unstable();
            read.dedup();
            for slot in read {
                if last_read[slot] == i && !self.constants.contains_key(&slot) {
                    live -= count(slot);
                }
            }
        }
        let weights: u64 = self.constants.values().map(|t| t.data.len() as u64).sum();
        Ok(PatchCost {
            flops,
            peak_activation_bytes: peak * 4,
            weight_bytes: weights * 4,
        })
    }
}

/// One patch's arithmetic and memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PatchCost {
    /// Floating-point operations of its convolutions (2 per multiply-add), as benchmarks count
    /// effective GFLOP/s.
    pub flops: u64,
    /// The most float32 activations held at once (input included).
    pub peak_activation_bytes: u64,
    /// The model's constants (weights, biases), float32.
    pub weight_bytes: u64,
}

fn shown_shape(shape: &[Option<usize>]) -> String {
    let dims: Vec<String> = shape
        .iter()
        .map(|d| d.map_or("?".to_string(), |d| d.to_string()))
        .collect();
    format!("[{}]", dims.join(", "))
}

/// Normalises a possibly negative axis of a rank-`rank` tensor.
pub fn axis_of(axis: i64, rank: usize) -> Result<usize, NnError> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    if (0..rank as i64).contains(&a) {
        Ok(a as usize)
    } else {
        Err(NnError::Shape(format!(
            "axis {axis} of a rank-{rank} tensor"
        )))
    }
}

fn missing(what: &str) -> NnError {
    NnError::Shape(format!("its {what} input is missing"))
}

fn spatial(shape: &[usize]) -> &[usize] {
    shape.get(2..).unwrap_or(&[])
}

/// One node's output shape from its inputs' shapes.
pub fn output_shape(op: &Op, ins: &[Option<&[usize]>]) -> Result<Vec<usize>, NnError> {
    let input = |i: usize, what: &str| ins.get(i).copied().flatten().ok_or_else(|| missing(what));
    let x = input(0, "first")?;
    match op {
        Op::Conv { window, group } => {
            nn::conv_shape(x, input(1, "weight")?, &window.resolve(spatial(x))?, *group)
        }
        Op::ConvTranspose {
            window,
            output_padding,
            group,
        } => {
            let w = window.resolve(spatial(x))?;
            let extra = widened(output_padding);
            nn::conv_transpose_shape(x, input(1, "weight")?, &w, extra, *group)
        }
        Op::Pool { window, ceil, .. } => nn::pool_shape(x, &window.resolve(spatial(x))?, *ceil),
        Op::BatchNorm { .. } | Op::InstanceNorm { .. } | Op::Activation(_) | Op::Identity => {
            Ok(x.to_vec())
        }
        Op::Softmax { axis, .. } => axis_of(*axis, x.len()).map(|_| x.to_vec()),
        Op::Binary(_) => nn::broadcast_shape(x, input(1, "second")?),
        Op::Concat { axis } => {
            let all: Vec<&[usize]> = ins.iter().flatten().copied().collect();
            nn::concat_shape(&all, axis_of(*axis, x.len())?)
        }
        Op::Slice {
            starts,
            ends,
            axes,
            steps,
        } => slice_axes(x, starts, ends, axes, steps).map(|a| a.iter().map(|a| a.len).collect()),
        Op::Pad { pads, .. } => {
            if pads.len() != 2 * x.len() {
                return Err(NnError::Shape(format!(
                    "{} pads for a rank-{} tensor",
                    pads.len(),
                    x.len()
                )));
            }
            (0..x.len())
                .map(|a| {
                    let len = x[a] as i64 + pads[a] + pads[a + x.len()];
                    usize::try_from(len)
                        .map_err(|_| NnError::Shape(format!("pads {pads:?} past {x:?}")))
                })
                .collect()
        }
        Op::Resize { scales, sizes, .. } => resize_target(x, scales, sizes).map(|(s, _)| s),
        Op::Reshape { shape, allow_zero } => reshape_target(x, shape, *allow_zero),
    }
}

pub(super) fn widened(values: &[usize]) -> [usize; 3] {
    let mut out = [0; 3];
    let n = values.len().min(3);
    out[3 - n..].copy_from_slice(&values[values.len() - n..]);
    out
}

/// A Slice's per-axis ranges over a tensor of shape `x`.
pub fn slice_axes(
    x: &[usize],
    starts: &[i64],
    ends: &[i64],
    axes: &[i64],
    steps: &[i64],
) -> Result<Vec<nn::SliceAxis>, NnError> {
    if starts.len() != ends.len()
        || (!axes.is_empty() && axes.len() != starts.len())
        || (!steps.is_empty() && steps.len() != starts.len())
    {
        return Err(NnError::Shape(
            "starts, ends, axes and steps of different lengths".into(),
        ));
    }
    let mut out: Vec<nn::SliceAxis> = x
        .iter()
        .map(|&n| nn::SliceAxis::new(0, n as i64, 1, n))
        .collect::<Result<_, _>>()?;
    let mut seen = vec![false; x.len()];
    for i in 0..starts.len() {
        let axis = axis_of(axes.get(i).copied().unwrap_or(i as i64), x.len())?;
        if std::mem::replace(&mut seen[axis], true) {
            return Err(NnError::Shape(format!("axis {axis} sliced twice")));
        }
        let step = steps.get(i).copied().unwrap_or(1);
        out[axis] = nn::SliceAxis::new(starts[i], ends[i], step, x[axis])?;
    }
    Ok(out)
}

/// A Resize's output shape and per-axis scales (from `scales`, or implied by `sizes`).
pub fn resize_target(
    x: &[usize],
    scales: &[f32],
    sizes: &[usize],
) -> Result<(Vec<usize>, Vec<f32>), NnError> {
    if !sizes.is_empty() {
        if sizes.len() != x.len() || x.contains(&0) {
            return Err(NnError::Shape(format!(
                "sizes {sizes:?} for a tensor {x:?}"
            )));
        }
        let scales = sizes
            .iter()
            .zip(x)
            .map(|(&o, &i)| o as f32 / i as f32)
            .collect();
        return Ok((sizes.to_vec(), scales));
    }
    if scales.len() != x.len()
        || scales
            .iter()
            .any(|&s| s.is_nan() || s <= 0.0 || !s.is_finite())
    {
        return Err(NnError::Shape(format!(
            "scales {scales:?} for a tensor {x:?}"
        )));
    }
    let shape = x
        .iter()
        .zip(scales)
        .map(|(&n, &s)| (n as f32 * s) as usize)
        .collect();
    Ok((shape, scales.to_vec()))
}

/// A Reshape's output shape (0 copies the input's length unless `allow_zero`; one -1 is
/// inferred).
pub fn reshape_target(x: &[usize], shape: &[i64], allow_zero: bool) -> Result<Vec<usize>, NnError> {
    let total: usize = x.iter().product();
    let mut out = Vec::with_capacity(shape.len());
    let mut infer = None;
    for (i, &d) in shape.iter().enumerate() {
        match d {
            -1 if infer.is_none() => {
                infer = Some(i);
                out.push(1);
            }
            0 if !allow_zero => out.push(*x.get(i).ok_or_else(|| {
                NnError::Shape(format!("shape {shape:?} copies axis {i} of {x:?}"))
            })?),
            d if d >= 0 => out.push(d as usize),
            _ => return Err(NnError::Shape(format!("shape {shape:?}"))),
        }
    }
    let known: usize = out.iter().product();
    if let Some(i) = infer {
        if known == 0 || !total.is_multiple_of(known) {
            return Err(NnError::Shape(format!("shape {shape:?} for {x:?}")));
        }
        out[i] = total / known;
    }
    if out.iter().product::<usize>() != total {
        return Err(NnError::Shape(format!("shape {shape:?} for {x:?}")));
    }
    Ok(out)
}

/// Builds a [`Model`] from its proto.
struct Loader {
    path: String,
    slots: HashMap<String, usize>,
    constants: HashMap<usize, Constant>,
    count: usize,
}

impl Loader {
    fn new(path: &str) -> Loader {
        Loader {
            path: path.to_string(),
            slots: HashMap::new(),
            constants: HashMap::new(),
            count: 0,
        }
    }

    fn model_error(&self, message: impl Into<String>) -> InferError {
        InferError::Model {
            path: self.path.clone(),
            message: message.into(),
        }
    }

    fn slot(&mut self, name: &str) -> usize {
        if let Some(&s) = self.slots.get(name) {
            return s;
        }
        self.count += 1;
        self.slots.insert(name.to_string(), self.count - 1);
        self.count - 1
    }

    fn load(mut self, proto: ModelProto) -> Result<Model, InferError> {
        let opset = proto
            .opset_import
            .iter()
            .filter(|o| o.domain.is_empty() || o.domain == "ai.onnx")
            .map(|o| o.version)
            .max()
            .ok_or_else(|| self.model_error("no opset_import for the ONNX domain"))?;
        let graph = proto
            .graph
            .ok_or_else(|| self.model_error("no graph in the model"))?;
        if !graph.sparse_initializer.is_empty() {
            return Err(self.model_error("sparse initializers are not supported"));
        }
        for tensor in &graph.initializer {
            let constant = self.tensor(tensor, &tensor.name)?;
            let slot = self.slot(&tensor.name);
            self.constants.insert(slot, constant);
        }
        // The graph's one input: those not given by an initializer (older models list
        // weights as inputs too).
        let inputs: Vec<_> = graph
            .input
            .iter()
            .filter(|v| !self.slots.contains_key(&v.name))
            .collect();
        let [input] = inputs.as_slice() else {
            return Err(self.model_error(format!(
                "{} graph inputs; inference feeds one image",
                inputs.len()
            )));
        };
        let input_shape = value_shape(input).map_err(|m| self.model_error(m))?;
        let input_name = input.name.clone();
        let input_slot = self.slot(&input_name);
        let [output] = graph.output.as_slice() else {
            return Err(self.model_error(format!(
                "{} graph outputs; inference writes one",
                graph.output.len()
            )));
        };
        let mut nodes = Vec::with_capacity(graph.node.len());
        for (index, proto) in graph.node.iter().enumerate() {
            if let Some(node) = self.node(index, proto, opset)? {
                nodes.push(node);
            }
        }
        let output_slot = *self
            .slots
            .get(&output.name)
            .ok_or_else(|| self.model_error(format!("no node writes output '{}'", output.name)))?;
        let mut model = Model {
            path: self.path.clone(),
            opset,
            input_name,
            input_shape,
            output_name: output.name.clone(),
            nodes,
            slots: self.count,
            input_slot,
            output_slot,
            constants: HashMap::new(),
            precision: super::Precision::Float32,
        };
        for (slot, constant) in self.constants {
            if let Constant::Float(t) = constant {
                model.constants.insert(slot, t);
            }
        }
        check_dataflow(&model)?;
        fold_batch_norms(&mut model);
        Ok(model)
    }

    /// A node as an [`Op`], or None for a Constant (its value becomes a constant slot).
    fn node(
        &mut self,
        index: usize,
        proto: &NodeProto,
        opset: i64,
    ) -> Result<Option<Node>, InferError> {
        let name = if proto.name.is_empty() {
            format!("#{index} ({})", proto.op_type)
        } else {
            format!("'{}'", proto.name)
        };
        let unsupported = || InferError::Unsupported {
            path: self.path.clone(),
            node: name.clone(),
            op: match proto.domain.as_str() {
                "" | "ai.onnx" => proto.op_type.clone(),
                domain => format!("{domain}.{}", proto.op_type),
            },
        };
        if !(proto.domain.is_empty() || proto.domain == "ai.onnx")
            || !SUPPORTED.contains(&proto.op_type.as_str())
        {
            return Err(unsupported());
        }
        let node_error = |message: String| InferError::Node {
            path: self.path.clone(),
            node: name.clone(),
            op: proto.op_type.clone(),
            message,
        };
        let [output] = proto.output.as_slice() else {
            return Err(node_error(format!(
                "{} outputs (inference runs nodes with one)",
                proto.output.len()
            )));
        };
        let attrs = Attributes {
            list: &proto.attribute,
        };
        if proto.op_type == "Constant" {
            let constant = self.constant_node(&attrs).map_err(node_error)?;
            let slot = self.slot(output);
            self.constants.insert(slot, constant);
            return Ok(None);
        }
        // Inputs must be written before they are read (nodes are in topological order).
        let mut inputs = Vec::with_capacity(proto.input.len());
        for input in &proto.input {
            if input.is_empty() {
                inputs.push(None);
            } else {
                let slot = *self.slots.get(input).ok_or_else(|| {
                    node_error(format!(
                        "input '{input}' is not written by any node before it"
                    ))
                })?;
                inputs.push(Some(slot));
            }
        }
        let op = self
            .op(&proto.op_type, &attrs, &inputs, opset)
            .map_err(node_error)?;
        // What was read into the operator's attributes is no longer an input.
        if matches!(
            op,
            Op::Slice { .. } | Op::Pad { .. } | Op::Resize { .. } | Op::Reshape { .. }
        ) {
            inputs.truncate(1);
        }
        if self.slots.contains_key(output) {
            return Err(node_error(format!("output '{output}' is written twice")));
        }
        let output = self.slot(output);
        Ok(Some(Node {
            name,
            op_type: proto.op_type.clone(),
            op,
            inputs,
            output,
        }))
    }

    fn constant_node(&self, attrs: &Attributes) -> Result<Constant, String> {
        if let Some(t) = attrs.get("value").and_then(|a| a.t.as_ref()) {
            return self.tensor(t, "value").map_err(|e| e.to_string());
        }
        if let Some(a) = attrs.get("value_float") {
            return Ok(Constant::Float(Tensor::new(vec![], vec![a.f])));
        }
        if let Some(a) = attrs.get("value_floats") {
            return Ok(Constant::Float(Tensor::new(
                vec![a.floats.len()],
                a.floats.clone(),
            )));
        }
        if let Some(a) = attrs.get("value_int") {
            return Ok(Constant::Int(vec![], vec![a.i]));
        }
        if let Some(a) = attrs.get("value_ints") {
            return Ok(Constant::Int(vec![a.ints.len()], a.ints.clone()));
        }
        Err("a Constant without a value, value_float(s) or value_int(s)".into())
    }

    /// Integers from a constant input (a Reshape's shape, a Slice's starts...).
    /// The constant at input `i`: None where the input is omitted, an error naming `what`
    /// where it is not a constant.
    fn constant(
        &self,
        inputs: &[Option<usize>],
        i: usize,
        what: &str,
    ) -> Result<Option<&Constant>, String> {
        match inputs.get(i).copied().flatten() {
            None => Ok(None),
            Some(slot) => self.constants.get(&slot).map(Some).ok_or_else(|| {
                format!("its {what} must be a constant (an initializer or a Constant node)")
            }),
        }
    }

    fn ints(&self, inputs: &[Option<usize>], i: usize, what: &str) -> Result<Vec<i64>, String> {
        Ok(match self.constant(inputs, i, what)? {
            None => Vec::new(),
            Some(Constant::Int(_, v)) => v.clone(),
            Some(Constant::Float(t)) => t.data.iter().map(|&v| v as i64).collect(),
        })
    }

    fn floats(&self, inputs: &[Option<usize>], i: usize, what: &str) -> Result<Vec<f32>, String> {
        Ok(match self.constant(inputs, i, what)? {
            None => Vec::new(),
            Some(Constant::Float(t)) => t.data.clone(),
            Some(Constant::Int(_, v)) => v.iter().map(|&v| v as f32).collect(),
        })
    }

    fn constant_shape(&self, inputs: &[Option<usize>], i: usize) -> Option<Vec<usize>> {
        match self.constants.get(&inputs.get(i).copied().flatten()?)? {
            Constant::Float(t) => Some(t.shape.clone()),
            Constant::Int(shape, _) => Some(shape.clone()),
        }
    }

    fn op(
        &self,
        op_type: &str,
        attrs: &Attributes,
        inputs: &[Option<usize>],
        opset: i64,
    ) -> Result<Op, String> {
        attrs.only(allowed_attributes(op_type))?;
        let needs = |n: usize| -> Result<(), String> {
            if inputs.len() < n || inputs[..n].iter().any(Option::is_none) {
                Err(format!("{n} inputs needed, {} given", inputs.len()))
            } else {
                Ok(())
            }
        };
        Ok(match op_type {
            "Conv" | "ConvTranspose" => {
                needs(2)?;
                let weights = self
                    .constant_shape(inputs, 1)
                    .ok_or("its weights must be a constant (an initializer or a Constant node)")?;
                if weights.len() < 3 {
                    return Err(format!("weights of shape {weights:?}"));
                }
                let kernel = weights[2..].to_vec();
                if let Some(k) = attrs.usizes("kernel_shape")? {
                    if k != kernel {
                        return Err(format!("kernel_shape {k:?} but weights {weights:?}"));
                    }
                }
                let window = window_spec(attrs, kernel)?;
                let group = attrs.int("group", 1)?;
                if group < 1 {
                    return Err(format!("group {group}"));
                }
                if op_type == "Conv" {
                    Op::Conv {
                        window,
                        group: group as usize,
                    }
                } else {
                    if attrs.get("output_shape").is_some() {
                        return Err("output_shape is not supported: export with pads".into());
                    }
                    Op::ConvTranspose {
                        output_padding: attrs.usizes("output_padding")?.unwrap_or_default(),
                        window,
                        group: group as usize,
                    }
                }
            }
            "MaxPool" | "AveragePool" => {
                needs(1)?;
                let kernel = attrs
                    .usizes("kernel_shape")?
                    .ok_or("kernel_shape is required")?;
                if attrs.int("storage_order", 0)? != 0 {
                    return Err("storage_order 1 is not supported".into());
                }
                let kind = if op_type == "MaxPool" {
                    Pool::Max
                } else {
                    Pool::Average {
                        count_include_pad: attrs.int("count_include_pad", 0)? != 0,
                    }
                };
                Op::Pool {
                    kind,
                    window: window_spec(attrs, kernel)?,
                    ceil: attrs.int("ceil_mode", 0)? != 0,
                }
            }
            "BatchNormalization" => {
                needs(5)?;
                if attrs.int("training_mode", 0)? != 0 {
                    return Err("training_mode 1 (inference runs trained models)".into());
                }
                for i in 1..5 {
                    self.floats(inputs, i, "normalisation parameters")?;
                }
                Op::BatchNorm {
                    epsilon: attrs.float("epsilon", 1e-5)?,
                }
            }
            "InstanceNormalization" => {
                needs(3)?;
                for i in 1..3 {
                    self.floats(inputs, i, "scale and bias")?;
                }
                Op::InstanceNorm {
                    epsilon: attrs.float("epsilon", 1e-5)?,
                }
            }
            "Relu" => Op::Activation(Activation::Relu),
            "LeakyRelu" => Op::Activation(Activation::LeakyRelu(attrs.float("alpha", 0.01)?)),
            "Elu" => Op::Activation(Activation::Elu(attrs.float("alpha", 1.0)?)),
            "Sigmoid" => Op::Activation(Activation::Sigmoid),
            "Tanh" => Op::Activation(Activation::Tanh),
            "Softmax" => Op::Softmax {
                axis: attrs.int("axis", if opset >= 13 { -1 } else { 1 })?,
                coerced: opset < 13,
            },
            "Add" | "Sub" | "Mul" | "Div" => {
                needs(2)?;
                if opset < 7 && attrs.int("broadcast", 0)? != 0 {
                    return Err("legacy broadcast attributes (opset < 7)".into());
                }
                Op::Binary(match op_type {
                    "Add" => Binary::Add,
                    "Sub" => Binary::Sub,
                    "Mul" => Binary::Mul,
                    _ => Binary::Div,
                })
            }
            "Concat" => {
                needs(1)?;
                Op::Concat {
                    axis: attrs.int_required("axis")?,
                }
            }
            "Slice" => {
                needs(1)?;
                if opset < 10 {
                    Op::Slice {
                        starts: attrs.ints("starts")?.unwrap_or_default(),
                        ends: attrs.ints("ends")?.unwrap_or_default(),
                        axes: attrs.ints("axes")?.unwrap_or_default(),
                        steps: Vec::new(),
                    }
                } else {
                    needs(3)?;
                    Op::Slice {
                        starts: self.ints(inputs, 1, "starts")?,
                        ends: self.ints(inputs, 2, "ends")?,
                        axes: self.ints(inputs, 3, "axes")?,
                        steps: self.ints(inputs, 4, "steps")?,
                    }
                }
            }
            "Pad" => {
                needs(1)?;
                let (pads, value) = if opset < 11 {
                    let pads = attrs.ints("pads")?.ok_or("pads is required")?;
                    (pads, attrs.float("value", 0.0)?)
                } else {
                    needs(2)?;
                    if inputs.get(3).copied().flatten().is_some() {
                        return Err("the axes input (opset 18) is not supported".into());
                    }
                    let value = self.floats(inputs, 2, "constant_value")?;
                    (
                        self.ints(inputs, 1, "pads")?,
                        value.first().copied().unwrap_or(0.0),
                    )
                };
                let mode = match attrs.string("mode", "constant")?.as_str() {
                    "constant" => PadMode::Constant(value),
                    "reflect" => PadMode::Reflect,
                    "edge" => PadMode::Edge,
                    other => return Err(format!("mode '{other}' is not supported")),
                };
                Op::Pad { pads, mode }
            }
            "Resize" | "Upsample" => self.resize(op_type, attrs, inputs, opset)?,
            "Identity" => {
                needs(1)?;
                Op::Identity
            }
            "Reshape" => {
                needs(2)?;
                Op::Reshape {
                    shape: self.ints(inputs, 1, "shape")?,
                    allow_zero: attrs.int("allowzero", 0)? != 0,
                }
            }
            other => unreachable!("{other} is in SUPPORTED but has no case"),
        })
    }

    fn resize(
        &self,
        op_type: &str,
        attrs: &Attributes,
        inputs: &[Option<usize>],
        opset: i64,
    ) -> Result<Op, String> {
        let legacy = op_type == "Upsample" || opset < 11;
        let (scales, sizes) = if op_type == "Upsample" && opset < 9 {
            (attrs.floats("scales")?.ok_or("scales is required")?, vec![])
        } else if legacy {
            (self.floats(inputs, 1, "scales")?, vec![])
        } else {
            let sizes = self.ints(inputs, 3, "sizes")?;
            let sizes = sizes
                .into_iter()
                .map(|s| usize::try_from(s).map_err(|_| format!("a size of {s}")))
                .collect::<Result<Vec<_>, _>>()?;
            (self.floats(inputs, 2, "scales")?, sizes)
        };
        if scales.is_empty() == sizes.is_empty() {
            return Err("exactly one of scales and sizes is needed".into());
        }
        for (name, default) in [("antialias", 0), ("exclude_outside", 0)] {
            if attrs.int(name, default)? != default {
                return Err(format!("{name} is not supported"));
            }
        }
        if attrs.get("axes").is_some() {
            return Err("the axes attribute is not supported".into());
        }
        let policy = attrs.string("keep_aspect_ratio_policy", "stretch")?;
        if policy != "stretch" {
            return Err(format!(
                "keep_aspect_ratio_policy '{policy}' is not supported"
            ));
        }
        let coordinates = if legacy {
            CoordinateMode::Asymmetric
        } else {
            match attrs
                .string("coordinate_transformation_mode", "half_pixel")?
                .as_str()
            {
                "half_pixel" => CoordinateMode::HalfPixel,
                "pytorch_half_pixel" => CoordinateMode::PytorchHalfPixel,
                "asymmetric" => CoordinateMode::Asymmetric,
                "align_corners" => CoordinateMode::AlignCorners,
                other => {
                    return Err(format!(
                        "coordinate_transformation_mode '{other}' is not supported"
                    ))
                }
            }
        };
        let nearest = if legacy {
            NearestMode::Floor
        } else {
            match attrs.string("nearest_mode", "round_prefer_floor")?.as_str() {
                "round_prefer_floor" => NearestMode::RoundPreferFloor,
                "round_prefer_ceil" => NearestMode::RoundPreferCeil,
                "floor" => NearestMode::Floor,
                "ceil" => NearestMode::Ceil,
                other => return Err(format!("nearest_mode '{other}' is not supported")),
            }
        };
        let mode = match attrs.string("mode", "nearest")?.as_str() {
            "nearest" => ResizeMode::Nearest(nearest),
            "linear" | "bilinear" | "trilinear" => ResizeMode::Linear,
            other => return Err(format!("mode '{other}' is not supported")),
        };
        Ok(Op::Resize {
            scales,
            sizes,
            mode,
            coordinates,
        })
    }

    /// A TensorProto's values: floats (float32, float16, float64) or integers (int64,
    /// int32, int8, uint8).
    fn tensor(&self, t: &TensorProto, what: &str) -> Result<Constant, InferError> {
        let error = |message: String| self.model_error(format!("tensor '{what}': {message}"));
        if !t.external_data.is_empty() || t.data_location == 1 {
            return Err(error(
                "its data is in an external file; save the model with its weights inside".into(),
            ));
        }
        let shape = t
            .dims
            .iter()
            .map(|&d| usize::try_from(d).map_err(|_| error(format!("dimension {d}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let n: usize = shape.iter().product();
        let raw = &t.raw_data;
        let from_raw = |width: usize| -> Result<Vec<&[u8]>, InferError> {
            if raw.len() != n * width {
                return Err(error(format!("{} bytes for {n} values", raw.len())));
            }
            Ok(raw.chunks_exact(width).collect())
        };
        let floats: Option<Vec<f32>> = match t.data_type {
            data_type::FLOAT if raw.is_empty() => Some(t.float_data.clone()),
            data_type::FLOAT => Some(
                from_raw(4)?
                    .into_iter()
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                    .collect(),
            ),
            data_type::DOUBLE if raw.is_empty() => {
                Some(t.double_data.iter().map(|&v| v as f32).collect())
            }
            data_type::DOUBLE => Some(
                from_raw(8)?
                    .into_iter()
                    .map(|b| f64::from_le_bytes(b.try_into().unwrap()) as f32)
                    .collect(),
            ),
            data_type::FLOAT16 if raw.is_empty() => {
                Some(t.int32_data.iter().map(|&v| f16_to_f32(v as u16)).collect())
            }
            data_type::FLOAT16 => Some(
                from_raw(2)?
                    .into_iter()
                    .map(|b| f16_to_f32(u16::from_le_bytes(b.try_into().unwrap())))
                    .collect(),
            ),
            _ => None,
        };
        if let Some(data) = floats {
            if data.len() != n {
                return Err(error(format!("{} values for shape {shape:?}", data.len())));
            }
            return Ok(Constant::Float(Tensor::new(shape, data)));
        }
        let ints: Vec<i64> = match t.data_type {
            data_type::INT64 if raw.is_empty() => t.int64_data.clone(),
            data_type::INT64 => from_raw(8)?
                .into_iter()
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                .collect(),
            data_type::INT32 | data_type::INT8 | data_type::UINT8 if raw.is_empty() => {
                t.int32_data.iter().map(|&v| v as i64).collect()
            }
            data_type::INT32 => from_raw(4)?
                .into_iter()
                .map(|b| i32::from_le_bytes(b.try_into().unwrap()) as i64)
                .collect(),
            data_type::INT8 => from_raw(1)?
                .into_iter()
                .map(|b| b[0] as i8 as i64)
                .collect(),
            data_type::UINT8 => from_raw(1)?.into_iter().map(|b| b[0] as i64).collect(),
            other => return Err(error(format!("data type {other} is not supported"))),
        };
        if ints.len() != n {
            return Err(error(format!("{} values for shape {shape:?}", ints.len())));
        }
        Ok(Constant::Int(shape, ints))
    }
}

fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let mantissa = (h & 0x3ff) as u32;
    let bits = match exp {
        0 if mantissa == 0 => sign,
        0 => {
            // Subnormal: normalise.
            let shift = mantissa.leading_zeros() - 21;
            sign | ((127 - 15 + 1 - shift) << 23) | ((mantissa << shift) & 0x3ff) << 13
        }
        0x1f => sign | 0x7f80_0000 | (mantissa << 13),
        _ => sign | ((exp + 127 - 15) << 23) | (mantissa << 13),
    };
    f32::from_bits(bits)
}

/// The shape of a graph input: numbers, or None for a named (symbolic) dimension.
fn value_shape(value: &onnx::ValueInfoProto) -> Result<Vec<Option<usize>>, String> {
    let tensor = value
        .r#type
        .as_ref()
        .and_then(|t| t.tensor_type.as_ref())
        .ok_or_else(|| format!("input '{}' is not a tensor", value.name))?;
    if tensor.elem_type != data_type::FLOAT {
        return Err(format!(
            "input '{}' has element type {} (inference feeds float32, type 1)",
            value.name, tensor.elem_type
        ));
    }
    let shape = tensor
        .shape
        .as_ref()
        .ok_or_else(|| format!("input '{}' has no shape", value.name))?;
    Ok(shape
        .dim
        .iter()
        .map(|d| d.dim_value.filter(|&v| v > 0).map(|v| v as usize))
        .collect())
}

/// Every node's inputs are the graph input, a constant or an earlier node's output (the
/// loader checked that names resolve; this checks a node does not read a slot no one writes).
fn check_dataflow(model: &Model) -> Result<(), InferError> {
    let mut written = vec![false; model.slots];
    written[model.input_slot] = true;
    for &slot in model.constants.keys() {
        written[slot] = true;
    }
    for node in &model.nodes {
        if let Some(slot) = node.inputs.iter().flatten().find(|&&s| !written[s]) {
            let name = slot_name(model, *slot);
            return Err(InferError::Node {
                path: model.path.clone(),
                node: node.name.clone(),
                op: node.op_type.clone(),
                message: format!("input {name} is an integer constant where a float is needed"),
            });
        }
        written[node.output] = true;
    }
    if !written[model.output_slot] {
        return Err(InferError::Model {
            path: model.path.clone(),
            message: format!("output '{}' is never written", model.output_name),
        });
    }
    Ok(())
}

fn slot_name(model: &Model, slot: usize) -> String {
    format!(
        "#{slot}{}",
        if slot == model.input_slot {
            " (the input)"
        } else {
            ""
        }
    )
}

/// Folds each BatchNormalization whose input is a Conv's output read by nothing else into
/// that Conv: `w' = w · a`, `b' = (b − mean) · a + beta` per output channel, with
/// `a = scale / sqrt(var + epsilon)`.
fn fold_batch_norms(model: &mut Model) {
    let readers = model.reader_counts();
    let writer = model.writers();
    let mut removed = vec![false; model.nodes.len()];
    #[allow(clippy::needless_range_loop)] // `bn` indexes nodes that are rewritten in place.
    for bn in 0..model.nodes.len() {
        let Op::BatchNorm { epsilon } = model.nodes[bn].op else {
            continue;
        };
        let Some(x) = model.nodes[bn].inputs[0] else {
            continue;
        };
        let Some(&conv) = writer.get(&x) else {
            continue;
        };
        if readers[x] != 1 || !matches!(model.nodes[conv].op, Op::Conv { .. }) {
            continue;
        }
        let params: Option<Vec<&Tensor>> = model.nodes[bn].inputs[1..5]
            .iter()
            .map(|s| s.and_then(|s| model.constants.get(&s)))
            .collect();
        let Some(params) = params else { continue };
        let Some(w) = model.nodes[conv].inputs[1].and_then(|s| model.constants.get(&s)) else {
            continue;
        };
        let m = w.shape[0];
        if params.iter().any(|p| p.len() != m) {
            continue;
        }
        let bias = model.nodes[conv]
            .inputs
            .get(2)
            .copied()
            .flatten()
            .and_then(|s| model.constants.get(&s))
            .map_or(vec![0.0; m], |b| b.data.clone());
        let (scale, beta, mean, var) = (params[0], params[1], params[2], params[3]);
        let a: Vec<f32> = (0..m)
            .map(|c| scale.data[c] / (var.data[c] + epsilon).sqrt())
            .collect();
        let per_channel = w.len() / m;
        let mut folded = w.clone();
        for (i, v) in folded.data.iter_mut().enumerate() {
            *v *= a[i / per_channel];
        }
        let folded_bias: Vec<f32> = (0..m)
            .map(|c| (bias[c] - mean.data[c]) * a[c] + beta.data[c])
            .collect();
        let (w_slot, b_slot) = (model.slots, model.slots + 1);
        model.slots += 2;
        model.constants.insert(w_slot, folded);
        model
            .constants
            .insert(b_slot, Tensor::new(vec![m], folded_bias));
        let output = model.nodes[bn].output;
        let node = &mut model.nodes[conv];
        node.inputs.truncate(1);
        node.inputs.extend([Some(w_slot), Some(b_slot)]);
        node.output = output;
        removed[bn] = true;
    }
    let mut i = 0;
    model.nodes.retain(|_| {
        i += 1;
        !removed[i - 1]
    });
    // Drop constants no node reads any more (the unfolded weights).
    let mut read = vec![false; model.slots];
    for node in &model.nodes {
        for &slot in node.inputs.iter().flatten() {
            read[slot] = true;
        }
    }
    model.constants.retain(|&slot, _| read[slot]);
}

fn window_spec(attrs: &Attributes, kernel: Vec<usize>) -> Result<WindowSpec, String> {
    let padding = match attrs.string("auto_pad", "NOTSET")?.as_str() {
        "NOTSET" => Padding::Explicit(attrs.usizes("pads")?.unwrap_or_default()),
        "SAME_UPPER" => Padding::SameUpper,
        "SAME_LOWER" => Padding::SameLower,
        "VALID" => Padding::Valid,
        other => return Err(format!("auto_pad '{other}'")),
    };
    let spec = WindowSpec {
        strides: attrs.usizes("strides")?.unwrap_or_default(),
        dilations: attrs.usizes("dilations")?.unwrap_or_default(),
        kernel,
        padding,
    };
    // Check the lists' lengths now (any spatial size will do for explicit pads).
    if let Padding::Explicit(_) = spec.padding {
        spec.resolve(&[]).map_err(|e| e.to_string())?;
    } else if !(1..=3).contains(&spec.kernel.len()) {
        return Err(format!(
            "{} spatial axes (1 to 3 are supported)",
            spec.kernel.len()
        ));
    }
    Ok(spec)
}

/// The attributes each operator may have; any other is refused by name (an attribute
/// inference ignored could change the result).
fn allowed_attributes(op_type: &str) -> &'static [&'static str] {
    match op_type {
        "Conv" => &[
            "auto_pad",
            "dilations",
            "group",
            "kernel_shape",
            "pads",
            "strides",
        ],
        "ConvTranspose" => &[
            "auto_pad",
            "dilations",
            "group",
            "kernel_shape",
            "output_padding",
            "output_shape",
            "pads",
            "strides",
        ],
        "MaxPool" => &[
            "auto_pad",
            "ceil_mode",
            "dilations",
            "kernel_shape",
            "pads",
            "storage_order",
            "strides",
        ],
        "AveragePool" => &[
            "auto_pad",
            "ceil_mode",
            "count_include_pad",
            "dilations",
            "kernel_shape",
            "pads",
            "strides",
        ],
        "BatchNormalization" => &["epsilon", "momentum", "training_mode", "spatial"],
        "InstanceNormalization" => &["epsilon"],
        "LeakyRelu" | "Elu" => &["alpha"],
        "Softmax" | "Concat" => &["axis"],
        "Add" | "Sub" | "Mul" | "Div" => &["broadcast"],
        "Slice" => &["starts", "ends", "axes"],
        "Pad" => &["mode", "pads", "value"],
        "Resize" | "Upsample" => &[
            "antialias",
            "axes",
            "coordinate_transformation_mode",
            "cubic_coeff_a",
            "exclude_outside",
            "extrapolation_value",
            "keep_aspect_ratio_policy",
            "mode",
            "nearest_mode",
            "scales",
        ],
        "Reshape" => &["allowzero"],
        _ => &[],
    }
}

/// A node's attributes, read by name with ONNX's defaults.
struct Attributes<'a> {
    list: &'a [AttributeProto],
}

impl Attributes<'_> {
    fn get(&self, name: &str) -> Option<&AttributeProto> {
        self.list.iter().find(|a| a.name == name)
    }

    fn only(&self, allowed: &[&str]) -> Result<(), String> {
        match self
            .list
            .iter()
            .find(|a| !allowed.contains(&a.name.as_str()))
        {
            Some(a) => Err(format!("attribute '{}' is not supported", a.name)),
            None => Ok(()),
        }
    }

    fn int(&self, name: &str, default: i64) -> Result<i64, String> {
        Ok(self.get(name).map_or(default, |a| a.i))
    }

    fn int_required(&self, name: &str) -> Result<i64, String> {
        self.get(name)
            .map(|a| a.i)
            .ok_or_else(|| format!("attribute '{name}' is required"))
    }

    fn float(&self, name: &str, default: f32) -> Result<f32, String> {
        Ok(self.get(name).map_or(default, |a| a.f))
    }

    fn floats(&self, name: &str) -> Result<Option<Vec<f32>>, String> {
        Ok(self.get(name).map(|a| a.floats.clone()))
    }

    fn ints(&self, name: &str) -> Result<Option<Vec<i64>>, String> {
        Ok(self.get(name).map(|a| a.ints.clone()))
    }

    fn usizes(&self, name: &str) -> Result<Option<Vec<usize>>, String> {
        self.ints(name)?
            .map(|v| {
                v.into_iter()
                    .map(|i| usize::try_from(i).map_err(|_| format!("attribute '{name}' has {i}")))
                    .collect()
            })
            .transpose()
    }

    fn string(&self, name: &str, default: &str) -> Result<String, String> {
        match self.get(name) {
            None => Ok(default.to_string()),
            Some(a) => String::from_utf8(a.s.clone())
                .map_err(|_| format!("attribute '{name}' is not UTF-8")),
        }
    }
}
