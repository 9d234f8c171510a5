//! WGSL sources and the pipeline cache: each pipeline is compiled on first use and reused for the
//! life of the context (compiling is expensive, especially on lavapipe).

use crate::gpu::context::{GpuContext, GpuError};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The runtime checks naga compiles into the kernels: no bounds clamps and no loop counters (see
/// [`KernelCache::module`] for why that is sound here); division keeps its guards.
const KERNEL_CHECKS: wgpu::ShaderRuntimeChecks = wgpu::ShaderRuntimeChecks {
    bounds_checks: false,
    force_loop_bounding: false,
    ..wgpu::ShaderRuntimeChecks::checked()
};

const COMMON: &str = include_str!("../../shaders/common.wgsl");

/// Every shader, as the (name, source) pairs the device compiles: WGSL has no includes, so the
/// downsampling kernels get `common.wgsl` prepended; the labelling and encoding shaders stand
/// alone.
/// The naga validation test walks this list.
pub fn shader_sources() -> Vec<(&'static str, String)> {
    let labelling = [
        (
            "watershed",
            include_str!("../../shaders/watershed.wgsl").to_string(),
        ),
        (
            "region_graph",
            include_str!("../../shaders/region_graph.wgsl").to_string(),
        ),
        (
            "connected_components",
            include_str!("../../shaders/connected_components.wgsl").to_string(),
        ),
        (
            "compressed_segmentation",
            include_str!("../../shaders/compressed_segmentation.wgsl").to_string(),
        ),
        ("nn", include_str!("../../shaders/nn.wgsl").to_string()),
    ];
    let downsampling = [
        (
            "average_int",
            include_str!("../../shaders/average_int.wgsl"),
        ),
        (
            "average_f32",
            include_str!("../../shaders/average_f32.wgsl"),
        ),
        (
            "average_u32",
            include_str!("../../shaders/average_u32.wgsl"),
        ),
        ("mode", include_str!("../../shaders/mode.wgsl")),
    ]
    .into_iter()
    .map(|(name, body)| (name, format!("{COMMON}\n{body}")));
    downsampling.chain(labelling).collect()
}

/// One pipeline: shader, entry point and pipeline-overridable constants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelId {
    /// Level 1 of uint8/uint16 averaging, from packed voxels (`bytes` = 1 or 2).
    AverageIntFromPacked {
        bytes: u32,
    },
    /// Levels 2.. of uint8/uint16 averaging, from the previous level's sums.
    AverageIntFromSums {
        bytes: u32,
    },
    AverageF32,
    AverageU32,
    /// Mode pooling; `words` = 1 for uint32 labels, 2 for uint64; `fz` = 1 for (2,2,1) (countless),
    /// 2 for (2,2,2). A constant of the pipeline, not a uniform: lavapipe runs both sides of a
    /// branch on a uniform for every group of eight invocations, and the (2,2,2) rule's 64
    /// comparisons cost the (2,2,1) level a third of its time.
    Mode {
        words: u32,
        fz: u32,
    },
    /// An entry point of a labelling shader (no overridable constants).
    Entry {
        shader: &'static str,
        entry: &'static str,
    },
}

impl KernelId {
    fn shader(self) -> &'static str {
        match self {
            KernelId::AverageIntFromPacked { .. } | KernelId::AverageIntFromSums { .. } => {
                "average_int"
            }
            KernelId::AverageF32 => "average_f32",
            KernelId::AverageU32 => "average_u32",
            KernelId::Mode { .. } => "mode",
            KernelId::Entry { shader, .. } => shader,
        }
    }

    fn entry_point(self) -> &'static str {
        match self {
            KernelId::AverageIntFromPacked { .. } => "level_from_packed",
            KernelId::AverageIntFromSums { .. } => "level_from_sums",
            KernelId::Entry { entry, .. } => entry,
            _ => "level",
        }
    }

    fn constants(self) -> Vec<(&'static str, f64)> {
        match self {
            KernelId::AverageIntFromPacked { bytes } | KernelId::AverageIntFromSums { bytes } => {
                vec![("BYTES", bytes as f64)]
            }
            KernelId::Mode { words, fz } => vec![("WORDS", words as f64), ("FZ", fz as f64)],
            _ => vec![],
        }
    }
}

#[derive(Default)]
pub(crate) struct KernelCache {
    modules: Mutex<HashMap<&'static str, Arc<wgpu::ShaderModule>>>,
    pipelines: Mutex<HashMap<KernelId, Arc<wgpu::ComputePipeline>>>,
}

impl KernelCache {
    pub(crate) fn get(
        &self,
        ctx: &GpuContext,
        id: KernelId,
    ) -> Result<Arc<wgpu::ComputePipeline>, GpuError> {
        if let Some(p) = self.pipelines.lock().unwrap().get(&id) {
            return Ok(p.clone());
        }
        let module = self.module(ctx, id.shader())?;
        let constants = id.constants();
        let pipeline = ctx.scoped(&format!("building pipeline {id:?}"), || {
            ctx.device
                .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(id.shader()),
                    layout: None,
                    module: &module,
                    entry_point: Some(id.entry_point()),
                    compilation_options: wgpu::PipelineCompilationOptions {
                        constants: &constants,
                        ..Default::default()
                    },
                    cache: None,
                })
        })?;
        let pipeline = Arc::new(pipeline);
        self.pipelines.lock().unwrap().insert(id, pipeline.clone());
        Ok(pipeline)
    }

    fn module(
        &self,
        ctx: &GpuContext,
        name: &'static str,
    ) -> Result<Arc<wgpu::ShaderModule>, GpuError> {
        if let Some(m) = self.modules.lock().unwrap().get(name) {
            return Ok(m.clone());
        }
        let source = shader_sources()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, s)| s)
            .expect("every KernelId names a shader in shader_sources");
        let module = ctx.scoped(&format!("compiling shader {name}"), || {
            let desc = wgpu::ShaderModuleDescriptor {
                label: Some(name),
                source: wgpu::ShaderSource::Wgsl(source.into()),
            };
            // SAFETY: every kernel guards each index it computes (neighbours of edge voxels,
            // table slots masked to the capacity, list positions below their counts), which the
            // CPU-reference tests exercise on every shader; and every loop ends (pointer walks
            // go down a forest, probes stop at the capacity). On Vulkan, wgpu enables the
            // device's robust buffer access besides. So naga's own checks (a clamp on each index,
            // a counter in each loop) only cost time: about a fifth of the segment kernels' on
            // lavapipe. Integer division keeps its checks.
            unsafe { ctx.device.create_shader_module_trusted(desc, KERNEL_CHECKS) }
        })?;
        let module = Arc::new(module);
        self.modules.lock().unwrap().insert(name, module.clone());
        Ok(module)
    }
}
