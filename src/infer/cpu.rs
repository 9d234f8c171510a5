//! Runs a [`Model`] on the CPU with the reference operators of [`crate::ops::nn`]: the
//! oracle the GPU executor is checked against, and what tests compare with onnxruntime.

use super::model::{axis_of, resize_target, slice_axes, widened, InferError, Model, Node, Op};
use crate::ops::nn::{self, NnError, Tensor};

/// The model's output for one input tensor (N, C, spatial...). Values are dropped after
/// their last reader.
pub fn run(model: &Model, input: Tensor) -> Result<Tensor, InferError> {
    run_with(
        model,
        input,
        |_, node, ins| execute(node, ins).map(Produced::Value),
        drop,
    )
}

/// What an engine's step gives for a node.
pub(super) enum Produced {
    /// The node's value, computed from its inputs.
    Value(Tensor),
    /// The value of this slot, taken over as it is: the node was fused into the one that
    /// made the slot, which nothing else reads.
    Taken(usize),
}

/// The model walked node by node, `step` giving each node's value (an engine's own operators
/// where it has them); a value is handed to `release` after its last reader (for an engine to
/// reuse its memory).
pub(super) fn run_with(
    model: &Model,
    input: Tensor,
    mut step: impl FnMut(usize, &Node, &[Option<&Tensor>]) -> Result<Produced, NnError>,
    mut release: impl FnMut(Tensor),
) -> Result<Tensor, InferError> {
    model.shapes(&input.shape)?;
    let half = model.precision == super::Precision::Float16;
    let rounded = |mut t: Tensor| {
        if half {
            crate::ops::nn::round_tensor_to_f16(&mut t);
        }
        t
    };
    let last_read = model.last_reads();
    let mut values: Vec<Option<Tensor>> = vec![None; model.slots];
    values[model.input_slot] = Some(rounded(input));
    for (i, node) in model.nodes.iter().enumerate() {
        let produced = {
            let ins: Vec<Option<&Tensor>> = node
                .inputs
                .iter()
                .map(|s| s.and_then(|s| values[s].as_ref().or(model.constants.get(&s))))
                .collect();
            step(i, node, &ins).map_err(|source| model.shape_error(node, source))?
        };
        let output = match produced {
            Produced::Value(v) => Some(rounded(v)),
            // Made (and rounded) by the node it was fused into.
            Produced::Taken(slot) => values[slot].take(),
        };
        for &slot in node.inputs.iter().flatten() {
            if last_read[slot] == i && slot != model.output_slot {
                if let Some(t) = values[slot].take() {
                    release(t);
                }
            }
        }
        values[node.output] = output;
    }
    values[model.output_slot]
        .take()
        .or_else(|| model.constants.get(&model.output_slot).cloned())
        .ok_or_else(|| InferError::Model {
            path: model.path.clone(),
            message: format!("output '{}' was not computed", model.output_name),
        })
}

/// One node by the reference operators.
pub(super) fn execute(node: &Node, ins: &[Option<&Tensor>]) -> Result<Tensor, NnError> {
    let input = |i: usize| {
        ins.get(i)
            .copied()
            .flatten()
            .ok_or_else(|| NnError::Shape(format!("input {i} is missing")))
    };
    let x = input(0)?;
    let spatial = x.shape.get(2..).unwrap_or(&[]);
    match &node.op {
        Op::Conv { window, group } => nn::conv(
            x,
            input(1)?,
            ins.get(2).copied().flatten(),
            &window.resolve(spatial)?,
            *group,
        ),
        Op::ConvTranspose {
            window,
            output_padding,
            group,
        } => nn::conv_transpose(
            x,
            input(1)?,
            ins.get(2).copied().flatten(),
            &window.resolve(spatial)?,
            widened(output_padding),
            *group,
        ),
        Op::Pool { kind, window, ceil } => nn::pool(x, *kind, &window.resolve(spatial)?, *ceil),
        Op::BatchNorm { epsilon } => nn::batch_norm(
            x,
            &input(1)?.data,
            &input(2)?.data,
            &input(3)?.data,
            &input(4)?.data,
            *epsilon,
        ),
        Op::InstanceNorm { epsilon } => {
            nn::instance_norm(x, &input(1)?.data, &input(2)?.data, *epsilon)
        }
        Op::Activation(a) => Ok(nn::activate(x, *a)),
        Op::Softmax { axis, coerced } => {
            let from = axis_of(*axis, x.shape.len())?;
            let to = if *coerced { x.shape.len() } else { from + 1 };
            nn::softmax(x, from, to)
        }
        Op::Binary(op) => nn::binary(x, input(1)?, *op),
        Op::Concat { axis } => {
            let all: Vec<&Tensor> = ins.iter().flatten().copied().collect();
            nn::concat(&all, axis_of(*axis, x.shape.len())?)
        }
        Op::Slice {
            starts,
            ends,
            axes,
            steps,
        } => Ok(nn::slice(
            x,
            &slice_axes(&x.shape, starts, ends, axes, steps)?,
        )),
        Op::Pad { pads, mode } => nn::pad(x, pads, *mode),
        Op::Resize {
            scales,
            sizes,
            mode,
            coordinates,
        } => {
            let (shape, scales) = resize_target(&x.shape, scales, sizes)?;
            nn::resize(x, &shape, &scales, *mode, *coordinates)
        }
        Op::Identity => Ok(x.clone()),
        Op::Reshape { shape, allow_zero } => {
            let to = super::model::reshape_target(&x.shape, shape, *allow_zero)?;
            Ok(x.clone().reshaped(to))
        }
    }
}
