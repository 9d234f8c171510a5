//! Adapter selection, device creation and the error handling that turns wgpu's validation and
//! out-of-memory errors into `Result`s.

use crate::gpu::kernels::{KernelCache, KernelId};
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use thiserror::Error;
use tracing::{info, warn};

/// How to install a Vulkan driver: the first thing a user without one needs to read.
pub const INSTALL_HINT: &str = "install a Vulkan driver: on Debian/Ubuntu `sudo apt-get install \
mesa-vulkan-drivers libvulkan1` provides lavapipe (software, any CPU); on NVIDIA hosts install the \
driver's Vulkan ICD (nvidia_icd.json) and, in containers, set NVIDIA_DRIVER_CAPABILITIES=compute,utility,graphics";

#[derive(Debug, Error)]
pub enum GpuError {
    #[error("no Vulkan GPU adapter was found; {INSTALL_HINT}")]
    NoAdapter,
    #[error("no Vulkan adapter matches CUBOIDS_ADAPTER={wanted:?}; found: {found}")]
    NoMatchingAdapter { wanted: String, found: String },
    #[error("could not open GPU device {adapter}")]
    RequestDevice {
        adapter: String,
        #[source]
        source: wgpu::RequestDeviceError,
    },
    #[error("GPU error during {op}")]
    Device {
        op: String,
        #[source]
        source: wgpu::Error,
    },
    #[error("reading {op} results back from the GPU failed")]
    Map {
        op: String,
        #[source]
        source: wgpu::BufferAsyncError,
    },
    #[error("waiting for the GPU failed")]
    Poll(#[from] wgpu::PollError),
    #[error("{what} needs a {needed}-byte buffer, over this adapter's {limit}-byte storage binding limit")]
    TooLarge {
        what: String,
        needed: u64,
        limit: u64,
    },
}

/// Device, queue and pipelines, created once per process and shared by every compute call.
pub struct GpuContext {
    pub adapter_info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    /// Times each labelling kernel on its own and logs it (`CUBOIDS_PROFILE_KERNELS=1`): for
    /// tuning kernels, since it waits for the GPU after every dispatch.
    pub profile_kernels: bool,
    /// Encodes compressed_segmentation chunks on this adapter. By default only on a hardware
    /// GPU: on a CPU adapter (lavapipe) the CPU encoder does the same work about 30x faster
    /// (benches/RESULTS.md). `CUBOIDS_GPU_ENCODING=1` (or `0`) says otherwise.
    pub gpu_encoding: bool,
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    kernels: KernelCache,
    pool: BufferPool,
    uploads: UploadPool,
    /// Every buffer is host memory (a CPU adapter, with mappable storage buffers): kernels read
    /// uploads where the host wrote them, since a staging buffer would only add a copy. (Mapping
    /// the kernels' outputs for reading in place was measured slower on lavapipe than copying
    /// them to a read-back buffer: benches/RESULTS.md.)
    host_memory: bool,
    /// How large a region-graph table the next box is first given (a guess; never the result).
    pub(crate) pair_density: crate::gpu::labeling::PairDensity,
}

/// Buffers kept for reuse between calls. Slabs of one job have the same shapes, so after the
/// first slab every buffer comes from here: no allocation, no page faults (on lavapipe a fresh
/// buffer of 32 MiB or more is a fresh mmap that faults on every page).
#[derive(Default)]
struct BufferPool {
    free: Mutex<FreeBuffers>,
}

/// Buffers of one kind kept at most: enough for the levels of two slabs in flight.
const POOL_PER_KIND: usize = 8;

/// Bytes of upload staging kept mapped at most (host memory on every adapter).
const UPLOAD_POOL_BYTES: u64 = 1 << 30;

/// Bytes of storage and read-back buffers kept at most: a job's steady state (two slabs or
/// chunks in flight) fits, and a long-running worker that meets many sizes does not keep a set
/// of each until the device runs out of memory.
const POOL_BYTES: u64 = 4 << 30;

/// Keeps `value` (a buffer of kind `kind`, whose bytes `bytes` gives) in `free`: at most
/// [`POOL_PER_KIND`] of a kind, and at most `cap` bytes in all, making room by dropping
/// buffers of other kinds (the sizes a job used before), or else not keeping it.
fn keep_within<K, V>(
    free: &mut HashMap<K, Vec<V>>,
    kind: K,
    value: V,
    bytes: impl Fn(&K) -> u64,
    cap: u64,
) where
    K: std::hash::Hash + Eq + Copy,
{
    let size = bytes(&kind);
    if free.get(&kind).is_some_and(|l| l.len() >= POOL_PER_KIND) || size > cap {
        return;
    }
    let mut held: u64 = free.iter().map(|(k, l)| bytes(k) * l.len() as u64).sum();
    while held + size > cap {
        let Some(other) = free
            .iter_mut()
            .find(|(k, l)| **k != kind && !l.is_empty())
            .map(|(k, l)| {
                l.pop();
                *k
            })
        else {
            return;
        };
        held -= bytes(&other);
    }
    free.retain(|_, l| !l.is_empty());
    free.entry(kind).or_default().push(value);
}

/// Upload buffers by size and usage, each mapped and ready to write into: staging buffers
/// (MAP_WRITE | COPY_SRC), from which an upload records a copy to its destination, and on a CPU
/// adapter storage buffers that kernels read as written ([`GpuContext::upload_storage`]). Once
/// the GPU is done with one, it is mapped again and comes back here. `queue.write_buffer` and
/// `create_buffer_init` instead allocate, zero and fault in a fresh staging buffer per call
/// (per chunk, three 17 MB affinity channels). At most [`UPLOAD_POOL_BYTES`] are kept, so that a
/// long-running worker that meets many sizes does not hold a set of each.
#[derive(Clone, Default)]
struct UploadPool {
    free: Arc<Mutex<FreeBuffers>>,
}

/// Free buffers by kind: size and usage.
type FreeBuffers = HashMap<(u64, wgpu::BufferUsages), Vec<wgpu::Buffer>>;

impl GpuContext {
    /// Opens the best Vulkan adapter: a discrete GPU if there is one, else integrated, virtual,
    /// then CPU (lavapipe). `CUBOIDS_ADAPTER=<substring>` picks an adapter by name instead.
    pub fn new() -> Result<GpuContext, GpuError> {
        pollster::block_on(Self::new_async())
    }

    async fn new_async() -> Result<GpuContext, GpuError> {
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
            backends: wgpu::Backends::VULKAN,
            ..wgpu::InstanceDescriptor::new_without_display_handle()
        });
        let adapters = instance.enumerate_adapters(wgpu::Backends::VULKAN).await;
        let adapter = choose_adapter(adapters, std::env::var("CUBOIDS_ADAPTER").ok())?;
        let adapter_info = adapter.get_info();
        // Ask for the adapter's real limits: lavapipe binds 128 MiB, NVIDIA far more.
        let limits = adapter.limits();
        let host_memory = adapter_info.device_type == wgpu::DeviceType::Cpu
            && adapter
                .features()
                .contains(wgpu::Features::MAPPABLE_PRIMARY_BUFFERS);
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("cuboids"),
                required_features: if host_memory {
                    wgpu::Features::MAPPABLE_PRIMARY_BUFFERS
                } else {
                    wgpu::Features::empty()
                },
                required_limits: limits.clone(),
                ..Default::default()
            })
            .await
            .map_err(|source| GpuError::RequestDevice {
                adapter: adapter_info.name.clone(),
                source,
            })?;
        // Every operation runs inside error scopes; anything escaping them is logged, not a panic.
        device.on_uncaptured_error(Arc::new(|e: wgpu::Error| {
            warn!("uncaptured GPU error: {e}")
        }));
        info!(adapter = %adapter_info.name, backend = ?adapter_info.backend, "GPU ready");
        let gpu_encoding = match std::env::var_os("CUBOIDS_GPU_ENCODING") {
            Some(v) => v != "0",
            None => adapter_info.device_type != wgpu::DeviceType::Cpu,
        };
        Ok(GpuContext {
            adapter_info,
            limits,
            profile_kernels: std::env::var_os("CUBOIDS_PROFILE_KERNELS").is_some_and(|v| v != "0"),
            gpu_encoding,
            device,
            queue,
            kernels: KernelCache::default(),
            pool: BufferPool::default(),
            uploads: UploadPool::default(),
            host_memory,
            pair_density: Default::default(),
        })
    }

    /// The largest buffer one kernel may bind: what the adapter reports, never an assumption.
    pub fn max_binding_bytes(&self) -> u64 {
        self.limits
            .max_storage_buffer_binding_size
            .min(self.limits.max_buffer_size)
    }

    /// Treats bindings above `bytes` as over the limit, as an adapter with a smaller limit would:
    /// tests use it to exercise how passes split their work on small data.
    pub fn limit_bindings(&mut self, bytes: u64) {
        self.limits.max_storage_buffer_binding_size =
            self.limits.max_storage_buffer_binding_size.min(bytes);
    }

    /// A few lines for `cuboids info` and logs.
    pub fn describe(&self) -> String {
        let i = &self.adapter_info;
        let l = &self.limits;
        format!(
            "adapter: {} ({:?}, {:?})\ndriver: {} {}\nmax storage buffer binding: {} MiB\nmax buffer size: {} MiB\nmax workgroups per dimension: {}\nmax invocations per workgroup: {}",
            i.name,
            i.device_type,
            i.backend,
            i.driver,
            i.driver_info,
            l.max_storage_buffer_binding_size >> 20,
            l.max_buffer_size >> 20,
            l.max_compute_workgroups_per_dimension,
            l.max_compute_invocations_per_workgroup,
        )
    }

    pub fn is_software(&self) -> bool {
        self.adapter_info.device_type == wgpu::DeviceType::Cpu
    }

    /// A buffer of exactly `size` bytes and `usage`, from the pool when one is free.
    pub(crate) fn buffer(&self, label: &str, size: u64, usage: wgpu::BufferUsages) -> wgpu::Buffer {
        if let Some(b) = self
            .pool
            .free
            .lock()
            .unwrap()
            .get_mut(&(size, usage))
            .and_then(Vec::pop)
        {
            return b;
        }
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage,
            mapped_at_creation: false,
        })
    }

    /// Records in `encoder` an upload of `len` bytes, which `write` puts into a mapped staging
    /// buffer of the pool (it must write each of them; the padding to a word is zeroed here),
    /// into `dst` from its start. The returned staging buffer goes to [`Self::reuse_uploads`]
    /// once the encoder is submitted.
    fn stage_upload_with(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        dst: &wgpu::Buffer,
        len: usize,
        write: impl FnOnce(&mut wgpu::WriteOnly<'_, [u8]>),
    ) -> wgpu::Buffer {
        let staging = self.filled_staging(len, write);
        encoder.copy_buffer_to_buffer(&staging, 0, dst, 0, staging.size());
        staging
    }

    /// An upload staging buffer from the pool (unmapped, COPY_SRC) holding the `len` bytes that
    /// `write` puts there, then zeros up to a whole word: a copy source for the caller's
    /// encoder; it goes to [`Self::reuse_uploads`] once that is submitted.
    pub(crate) fn filled_staging(
        &self,
        len: usize,
        write: impl FnOnce(&mut wgpu::WriteOnly<'_, [u8]>),
    ) -> wgpu::Buffer {
        let usage = wgpu::BufferUsages::MAP_WRITE | wgpu::BufferUsages::COPY_SRC;
        self.filled_upload("upload", usage, len, write)
    }

    /// A buffer of `usage` (MAP_WRITE among them) from the upload pool, or a new one, holding
    /// the `len` bytes `write` puts there and zeros up to a whole word; unmapped.
    fn filled_upload(
        &self,
        label: &str,
        usage: wgpu::BufferUsages,
        len: usize,
        write: impl FnOnce(&mut wgpu::WriteOnly<'_, [u8]>),
    ) -> wgpu::Buffer {
        let size = (len as u64).next_multiple_of(4).max(4);
        let kept = self
            .uploads
            .free
            .lock()
            .unwrap()
            .get_mut(&(size, usage))
            .and_then(Vec::pop);
        let buffer = kept.unwrap_or_else(|| {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage,
                mapped_at_creation: true,
            })
        });
        {
            let mut view = buffer
                .get_mapped_range_mut(..)
                .expect("pooled upload buffers are mapped");
            view.slice(len..).fill(0);
            write(&mut view.slice(..len));
        }
        buffer.unmap();
        buffer
    }

    /// A storage buffer (STORAGE, COPY_SRC and COPY_DST) holding the `len` bytes `write` puts
    /// there, zero-padded to a word, for kernels recorded after this in `encoder`. On a CPU
    /// adapter the host writes it in place; elsewhere through a staging buffer whose copy is
    /// recorded in `encoder`, returned second for [`Self::reuse_uploads`] once that is
    /// submitted. The storage buffer goes to [`Self::recycle`] when its user is done with it.
    pub(crate) fn upload_storage(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        label: &str,
        len: usize,
        write: impl FnOnce(&mut wgpu::WriteOnly<'_, [u8]>),
    ) -> (wgpu::Buffer, Option<wgpu::Buffer>) {
        let usage = wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_SRC
            | wgpu::BufferUsages::COPY_DST;
        if self.host_memory {
            let usage = usage | wgpu::BufferUsages::MAP_WRITE;
            return (self.filled_upload(label, usage, len, write), None);
        }
        let size = (len as u64).next_multiple_of(4).max(4);
        let buffer = self.buffer(label, size, usage);
        let staging = self.stage_upload_with(encoder, &buffer, len, write);
        (buffer, Some(staging))
    }

    /// Maps submitted upload staging buffers for writing again; each returns to the pool when
    /// the GPU is done with it (seen at a later poll). One that fails to map is dropped.
    pub(crate) fn reuse_uploads(&self, staging: impl IntoIterator<Item = wgpu::Buffer>) {
        for buffer in staging {
            let pool = self.uploads.clone();
            let kept = buffer.clone();
            buffer.map_async(wgpu::MapMode::Write, .., move |mapped| {
                if mapped.is_ok() {
                    let mut free = pool.free.lock().unwrap();
                    let kind = (kept.size(), kept.usage());
                    keep_within(&mut free, kind, kept, |&(size, _)| size, UPLOAD_POOL_BYTES);
                }
            });
        }
    }

    /// Returns buffers to the pool once the GPU is done with them (they must be unmapped);
    /// storage buffers written in place ([`Self::upload_storage`]) go back to the upload pool.
    pub(crate) fn recycle(&self, buffers: impl IntoIterator<Item = wgpu::Buffer>) {
        let (uploads, storage): (Vec<_>, Vec<_>) = buffers
            .into_iter()
            .partition(|b| b.usage().contains(wgpu::BufferUsages::MAP_WRITE));
        self.reuse_uploads(uploads);
        let mut free = self.pool.free.lock().unwrap();
        for b in storage {
            let kind = (b.size(), b.usage());
            keep_within(&mut free, kind, b, |&(size, _)| size, POOL_BYTES);
        }
    }

    /// The slab size kernels work on by default: the binding limit on a GPU (at most 256 MiB);
    /// 16 MiB on a CPU adapter (lavapipe), where small slabs stay in cache and in reused heap memory.
    pub fn default_slab_bytes(&self) -> u64 {
        let cap = if self.is_software() {
            16 << 20
        } else {
            256 << 20
        };
        self.max_binding_bytes().min(cap)
    }

    pub(crate) fn pipeline(&self, id: KernelId) -> Result<Arc<wgpu::ComputePipeline>, GpuError> {
        self.kernels.get(self, id)
    }

    /// Waits for `submission` and maps `buffers` (MAP_READ staging buffers) for reading; errors
    /// name `op`.
    pub(crate) fn map_for_reading(
        &self,
        submission: wgpu::SubmissionIndex,
        buffers: &[&wgpu::Buffer],
        op: &str,
    ) -> Result<(), GpuError> {
        let (tx, rx) = std::sync::mpsc::channel();
        for b in buffers {
            let tx = tx.clone();
            b.map_async(wgpu::MapMode::Read, .., move |r| {
                let _ = tx.send(r);
            });
        }
        drop(tx);
        self.device.poll(wgpu::PollType::Wait {
            submission_index: Some(submission),
            timeout: None,
        })?;
        for result in rx.iter() {
            result.map_err(|source| GpuError::Map {
                op: op.to_string(),
                source,
            })?;
        }
        Ok(())
    }

    /// Runs `f` inside validation and out-of-memory error scopes and returns their first error.
    pub(crate) fn scoped<T>(&self, op: &str, f: impl FnOnce() -> T) -> Result<T, GpuError> {
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let out = f();
        let errors = [block(validation.pop()), block(oom.pop())];
        match errors.into_iter().flatten().next() {
            Some(source) => Err(GpuError::Device {
                op: op.to_string(),
                source,
            }),
            None => Ok(out),
        }
    }
}

fn block<F: Future>(f: F) -> F::Output {
    pollster::block_on(f)
}

fn device_rank(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    }
}

fn choose_adapter(
    adapters: Vec<wgpu::Adapter>,
    wanted: Option<String>,
) -> Result<wgpu::Adapter, GpuError> {
    if adapters.is_empty() {
        return Err(GpuError::NoAdapter);
    }
    match wanted.filter(|w| !w.is_empty()) {
        Some(w) => {
            let found: Vec<String> = adapters.iter().map(|a| a.get_info().name).collect();
            adapters
                .into_iter()
                .find(|a| a.get_info().name.to_lowercase().contains(&w.to_lowercase()))
                .ok_or(GpuError::NoMatchingAdapter {
                    wanted: w,
                    found: found.join(", "),
                })
        }
        None => Ok(adapters
            .into_iter()
            .min_by_key(|a| device_rank(a.get_info().device_type))
            .expect("not empty")),
    }
}

/// Gives the Vulkan loader a runtime directory when the environment has none.
///
/// Mesa's Vulkan drivers (lavapipe included) print `error: XDG_RUNTIME_DIR is invalid or not set
/// in the environment.` twice when the variable is unset, as it is on headless machines, in
/// containers and on Batch. Nothing is wrong then, and a user who reads "error" stops. A private
/// directory (mode 0700, under the temporary directory) silences it. Call before any thread
/// starts: it sets a process environment variable.
pub fn give_vulkan_a_runtime_dir() {
    let usable = std::env::var_os("XDG_RUNTIME_DIR")
        .map(std::path::PathBuf::from)
        .is_some_and(|dir| dir.is_absolute() && dir.is_dir());
    if usable {
        return;
    }
    let dir = std::env::temp_dir().join(format!("cuboids-xdg-{}", user_id()));
    if std::fs::create_dir_all(&dir).is_ok() && restrict_to_owner(&dir) {
        std::env::set_var("XDG_RUNTIME_DIR", &dir);
    }
}

fn user_id() -> u32 {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata("/proc/self").map_or(0, |m| m.uid())
    }
    #[cfg(not(unix))]
    {
        0
    }
}

/// Mode 0700, as the XDG spec asks of a runtime directory; false where that fails (someone
/// else's directory of that name).
fn restrict_to_owner(dir: &std::path::Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).is_ok()
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(free: &HashMap<u64, Vec<u32>>) -> u64 {
        free.iter().map(|(size, l)| size * l.len() as u64).sum()
    }

    #[test]
    fn pools_keep_at_most_their_bytes_and_make_room_from_other_sizes() {
        let mut free: HashMap<u64, Vec<u32>> = HashMap::new();
        let keep = |free: &mut HashMap<u64, Vec<u32>>, size: u64, id: u32| {
            keep_within(free, size, id, |&s| s, 100)
        };
        // A kind holds at most POOL_PER_KIND buffers.
        for id in 0..(POOL_PER_KIND as u32 + 3) {
            keep(&mut free, 10, id);
        }
        assert_eq!(free[&10].len(), POOL_PER_KIND);
        assert_eq!(held(&free), 80);
        // A new size makes room by dropping buffers of the old one.
        keep(&mut free, 40, 100);
        keep(&mut free, 40, 101);
        assert_eq!(free[&40], vec![100, 101]);
        assert_eq!(free[&10].len(), 2);
        assert_eq!(held(&free), 100);
        // A buffer over the cap, or one that only its own kind could make room for, is not kept.
        keep(&mut free, 200, 7);
        assert!(!free.contains_key(&200));
        let mut only: HashMap<u64, Vec<u32>> = HashMap::new();
        for id in 0..3 {
            keep(&mut only, 40, id);
        }
        assert_eq!(only[&40], vec![0, 1]);
    }
}
