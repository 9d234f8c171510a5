//! Helpers shared by the integration tests.
#![allow(dead_code)]

use cuboids::dtype::DataType;
use cuboids::geometry::{voxels, Vec3};
use cuboids::gpu::GpuContext;
use cuboids::volume::Volume;
use std::sync::OnceLock;

/// Fails the test, showing the process's stderr, unless it exited successfully.
pub fn assert_success(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One GPU context per test binary, like the program itself. Tests need a Vulkan driver
/// (lavapipe in CI) and fail, naming how to install one, when there is none.
pub fn gpu() -> &'static GpuContext {
    shared_gpu().as_ref()
}

/// The same context, for functions that keep it across blocking threads.
pub fn gpu_arc() -> std::sync::Arc<GpuContext> {
    shared_gpu().clone()
}

fn shared_gpu() -> &'static std::sync::Arc<GpuContext> {
    static CTX: OnceLock<std::sync::Arc<GpuContext>> = OnceLock::new();
    CTX.get_or_init(|| std::sync::Arc::new(GpuContext::new().unwrap_or_else(|e| panic!("{e}"))))
}

/// Deterministic xorshift64* generator: reproducible volumes without a rand dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Random voxels of any type. Labels come from a small set so that modes and ties happen;
/// floats have fractional parts so the summation order matters.
pub fn random_volume(rng: &mut Rng, dtype: DataType, shape: Vec3, channels: usize) -> Volume {
    let n = voxels(shape) * channels;
    let mut data = Vec::with_capacity(n * dtype.size());
    for _ in 0..n {
        match dtype {
            DataType::Uint8 | DataType::Int8 => data.push(rng.next() as u8),
            DataType::Uint16 | DataType::Int16 => data.extend((rng.next() as u16).to_le_bytes()),
            DataType::Uint32 => {
                // Mix small labels (ties for mode pooling) with full-range values (carries).
                let v = if rng.below(2) == 0 {
                    rng.below(4) as u32
                } else {
                    rng.next() as u32
                };
                data.extend(v.to_le_bytes())
            }
            DataType::Int32 => data.extend((rng.next() as i32).to_le_bytes()),
            DataType::Uint64 => {
                let v = if rng.below(2) == 0 {
                    rng.below(4)
                } else {
                    rng.next()
                };
                data.extend(v.to_le_bytes())
            }
            DataType::Float32 => {
                let v = (rng.next() >> 40) as f32 / 1024.0 - 4096.0;
                data.extend(v.to_le_bytes())
            }
        }
    }
    Volume::from_bytes(dtype, shape, channels, data).unwrap()
}

/// Segmentation-like labels: cells of a coarse grid (so many blocks hold one label and many hold
/// a few, with tables repeated across blocks), with stray labels in every other slab of 8 planes, a noisy corner
/// where a block may hold up to 512 labels, and labels whose high word or every bit is set.
pub fn segmentation_like(rng: &mut Rng, dtype: DataType, shape: Vec3, channels: usize) -> Volume {
    let cell = [
        8 + rng.below(16) as usize,
        8 + rng.below(16) as usize,
        4 + rng.below(8) as usize,
    ];
    let mut labels = Vec::with_capacity(voxels(shape) * channels);
    for c in 0..channels {
        for z in 0..shape[2] {
            for y in 0..shape[1] {
                for x in 0..shape[0] {
                    let cell_id = (x / cell[0] + 7 * (y / cell[1]) + 31 * (z / cell[2]) + c) as u64;
                    // Strays only in odd slabs of 8 planes: the even ones keep one-label blocks.
                    let stray = (z / 8) % 2 == 1;
                    let label = match rng.below(40) {
                        _ if x < 8 && y < 8 && z < 8 => rng.next(),
                        0 if stray => u64::MAX,
                        1 if stray => rng.below(3) << 32 | 5,
                        _ => cell_id * 0x1_0000_0001,
                    };
                    labels.push(label);
                }
            }
        }
    }
    let data = match dtype {
        DataType::Uint32 => labels
            .iter()
            .flat_map(|&l| (l as u32).to_le_bytes())
            .collect(),
        _ => labels.iter().flat_map(|&l| l.to_le_bytes()).collect(),
    };
    Volume::from_bytes(dtype, shape, channels, data).unwrap()
}

/// Every file below `dir` with its bytes, by its path relative to `dir`, sorted.
pub fn tree_contents(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let prefix = dir.display().to_string();
    files_under(dir)
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p.strip_prefix(&prefix).unwrap().to_string(), bytes)
        })
        .collect()
}

/// Two [`tree_contents`] hold the same files with the same bytes (`what` names the comparison).
pub fn assert_same_contents(a: &[(String, Vec<u8>)], b: &[(String, Vec<u8>)], what: &str) {
    let names = |t: &[(String, Vec<u8>)]| t.iter().map(|f| f.0.clone()).collect::<Vec<_>>();
    assert_eq!(names(a), names(b), "{what}: the files");
    for ((name, x), (_, y)) in a.iter().zip(b) {
        assert!(x == y, "{what}: {name} differs");
    }
}

/// The uint64 labels of scale 0 of the segmentation layer at `dir`, Fortran order.
pub async fn read_labels(dir: &std::path::Path) -> Vec<u64> {
    read_labels_with(dir, false).await
}

/// [`read_labels`], with chunks never written (outside a run's bounds) read as zeros or not.
pub async fn read_labels_with(dir: &std::path::Path, fill_missing: bool) -> Vec<u64> {
    let (_, v) = read_scale0(dir, fill_missing).await;
    bytemuck::pod_collect_to_vec(&v.data)
}

/// The layer at `dir` and the whole of its scale 0.
async fn read_scale0(
    dir: &std::path::Path,
    fill_missing: bool,
) -> (cuboids::formats::precomputed::Precomputed, Volume) {
    use cuboids::formats::precomputed::Precomputed;
    let layer = Precomputed::open(std::sync::Arc::new(cuboids::store::LocalStore::new(dir)))
        .await
        .unwrap();
    let size = layer.scale(0).size;
    let (v, _) = layer
        .read_region(0, cuboids::geometry::Box3::from_shape(size), fill_missing)
        .await
        .unwrap();
    (layer, v)
}

/// A float32 layer's channels, z, y, x and its values (channel after channel, x fastest).
pub async fn read_f32_layer(dir: &std::path::Path) -> (Vec<usize>, Vec<f32>) {
    let (layer, vol) = read_scale0(dir, false).await;
    let size = layer.scale(0).size;
    (
        vec![layer.info.num_channels, size[2], size[1], size[0]],
        bytemuck::pod_collect_to_vec(&vol.data),
    )
}

/// A uint8 image layer of `shape` in chunks of `chunk` under `dir`, of seeded random values
/// 1..=255 (no patch of it is all zero); returns its values (x fastest).
pub async fn random_uint8_layer(
    dir: &std::path::Path,
    shape: Vec3,
    chunk: Vec3,
    seed: u64,
) -> Vec<u8> {
    use cuboids::formats::precomputed::info::Info;
    use cuboids::formats::precomputed::{Precomputed, WriteOptions};
    let mut state = seed;
    let bytes: Vec<u8> = (0..voxels(shape))
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            1 + (state >> 56) as u8 % 255
        })
        .collect();
    let info: Info = serde_json::from_value(serde_json::json!({
        "type": "image", "data_type": "uint8", "num_channels": 1,
        "scales": [{"key": "4_4_40", "size": shape, "resolution": [4, 4, 40],
                    "voxel_offset": [0, 0, 0], "chunk_sizes": [chunk], "encoding": "raw"}]
    }))
    .unwrap();
    let store = std::sync::Arc::new(cuboids::store::LocalStore::new(dir));
    let layer = Precomputed::create(store, info).await.unwrap();
    let image = Volume::from_bytes(DataType::Uint8, shape, 1, bytes.clone()).unwrap();
    layer
        .write_region(0, [0; 3], &image, WriteOptions::default())
        .await
        .unwrap();
    bytes
}

/// Every file below `dir` (none if it does not exist), sorted.
pub fn files_under(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p.display().to_string());
            }
        }
    }
    out.sort();
    out
}

/// `cuboids run-task -` with `task` on its stdin and `env` added to its environment: its output
/// (stdout holds the output document on success).
pub fn run_task_on_stdin(
    task: &serde_json::Value,
    env: Vec<(&'static str, String)>,
) -> std::process::Output {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_cuboids"))
        .args(["run-task", "-"])
        .envs(env)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(
        &mut child.stdin.take().unwrap(),
        task.to_string().as_bytes(),
    )
    .unwrap();
    child.wait_with_output().unwrap()
}

/// A real S3-compatible server (moto's `moto_server`, installed by scripts/setup) on a free
/// loopback port, stopped when dropped.
pub struct S3Server {
    child: std::process::Child,
    pub endpoint: String,
}

impl S3Server {
    pub fn start() -> S3Server {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let exe = std::env::var("CUBOIDS_MOTO_SERVER").unwrap_or_else(|_| "moto_server".into());
        let child = std::process::Command::new(&exe)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("starting {exe} (pip install 'moto[server]'; scripts/setup does it): {e}")
            });
        let server = S3Server {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "{exe} did not start listening on port {port}"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        server
    }

    /// The standard AWS environment pointing a child process (the CLI) at this server through
    /// `endpoint_var` (`AWS_ENDPOINT_URL` or a service-specific one).
    pub fn aws_env(&self, endpoint_var: &'static str) -> Vec<(&'static str, String)> {
        vec![
            (endpoint_var, self.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID", "testing".into()),
            ("AWS_SECRET_ACCESS_KEY", "testing".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ]
    }

    /// SDK configuration with static test credentials, as the AWS environment would give.
    pub async fn sdk_config(&self) -> aws_config::SdkConfig {
        aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_sdk_s3::config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_s3::config::Credentials::new(
                "testing", "testing", None, None, "tests",
            ))
            .load()
            .await
    }

    /// Creates a bucket and returns a store on `s3://bucket/prefix`.
    pub async fn store(&self, bucket: &str, prefix: &str) -> cuboids::store::S3Store {
        let sdk = self.sdk_config().await;
        let conf = aws_sdk_s3::config::Builder::from(&sdk)
            .endpoint_url(&self.endpoint)
            .force_path_style(true)
            .build();
        let client = aws_sdk_s3::Client::from_conf(conf);
        client.create_bucket().bucket(bucket).send().await.unwrap();
        cuboids::store::S3Store::with_config(
            &format!("s3://{bucket}/{prefix}"),
            &sdk,
            Some(self.endpoint.clone()),
        )
        .unwrap()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, GlobalSecondaryIndex, KeySchemaElement, KeyType, Projection,
    ProjectionType, ScalarAttributeType,
};

fn key(name: &str, kind: KeyType) -> KeySchemaElement {
    KeySchemaElement::builder()
        .attribute_name(name)
        .key_type(kind)
        .build()
        .unwrap()
}

fn attr(name: &str, kind: ScalarAttributeType) -> AttributeDefinition {
    AttributeDefinition::builder()
        .attribute_name(name)
        .attribute_type(kind)
        .build()
        .unwrap()
}

/// The Boss's s3index table: HASH object-key, RANGE version-node, GSI lookup-key-index.
pub async fn create_s3_index(client: &aws_sdk_dynamodb::Client, table: &str) {
    client
        .create_table()
        .table_name(table)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(attr("object-key", ScalarAttributeType::S))
        .attribute_definitions(attr("version-node", ScalarAttributeType::N))
        .attribute_definitions(attr("lookup-key", ScalarAttributeType::S))
        .key_schema(key("object-key", KeyType::Hash))
        .key_schema(key("version-node", KeyType::Range))
        .global_secondary_indexes(
            GlobalSecondaryIndex::builder()
                .index_name("lookup-key-index")
                .key_schema(key("lookup-key", KeyType::Hash))
                .projection(
                    Projection::builder()
                        .projection_type(ProjectionType::KeysOnly)
                        .build(),
                )
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
}

/// LocalStack's Step Functions (localstack-core from PyPI, in the Python that
/// `CUBOIDS_LOCALSTACK_PYTHON` names; `scripts/test` makes that venv with Python 3.13), started
/// on a free loopback port with its files under a temporary folder; killed when dropped.
pub struct LocalStack {
    child: std::process::Child,
    pub endpoint: String,
    _dir: tempfile::TempDir,
}

impl LocalStack {
    pub fn start() -> LocalStack {
        LocalStack::start_with(None)
    }

    /// LocalStack with its Lambda service too, functions run as host processes by
    /// batch/localstack_host (LAMBDA_RUNTIME_EXECUTOR=host) with `command` (the function's
    /// image command, e.g. `cuboids lambda`).
    pub fn start_with_lambda(command: &str) -> LocalStack {
        LocalStack::start_with(Some(command))
    }

    fn start_with(lambda_command: Option<&str>) -> LocalStack {
        let python = std::env::var("CUBOIDS_LOCALSTACK_PYTHON").unwrap_or_else(|_| {
            panic!(
                "CUBOIDS_LOCALSTACK_PYTHON is not set: a Python >= 3.12 with \
                 localstack-core[runtime] (scripts/test makes target/localstack-venv)"
            )
        });
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join("tmp");
        std::fs::create_dir_all(&tmp).unwrap();
        let mut command = std::process::Command::new(&python);
        let services = match lambda_command {
            None => "stepfunctions,sts,events,apigateway",
            Some(function) => {
                command
                    .env("LAMBDA_RUNTIME_EXECUTOR", "host")
                    .env("CUBOIDS_LAMBDA_HOST_COMMAND", function);
                "stepfunctions,sts,events,apigateway,lambda,s3,iam"
            }
        };
        let child = command
            .args(["-m", "localstack.runtime.main"])
            .env("RUNTIME_COMPONENTS", "aws")
            .env("SERVICES", services)
            .env("GATEWAY_LISTEN", format!("127.0.0.1:{port}"))
            .env("HOME", dir.path())
            .env("TMPDIR", &tmp)
            .env("FILESYSTEM_ROOT", dir.path().join("fs"))
            .env("SKIP_SSL_CERT_DOWNLOAD", "1")
            .env("DISABLE_EVENTS", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting LocalStack with {python}: {e}"));
        let stack = LocalStack {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            let ready = std::process::Command::new("curl")
                .args(["-sf", &format!("{}/_localstack/health", stack.endpoint)])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
                .is_some_and(|h| {
                    matches!(
                        h["services"]["stepfunctions"].as_str(),
                        Some("available" | "running")
                    )
                });
            if ready {
                return stack;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "LocalStack did not come up on port {port}"
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
}

impl Drop for LocalStack {
    fn drop(&mut self) {
        // It may hang on SIGTERM after long polls: SIGKILL.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every object of a bucket of the test server, by key (all pages of the listing).
impl S3Server {
    pub async fn objects(&self, bucket: &str) -> std::collections::BTreeMap<String, Vec<u8>> {
        let sdk = self.sdk_config().await;
        let s3 = aws_sdk_s3::Client::from_conf(
            aws_sdk_s3::config::Builder::from(&sdk)
                .endpoint_url(&self.endpoint)
                .force_path_style(true)
                .build(),
        );
        let mut out = std::collections::BTreeMap::new();
        let mut token = None;
        loop {
            let page = s3
                .list_objects_v2()
                .bucket(bucket)
                .set_continuation_token(token)
                .send()
                .await
                .unwrap();
            for o in page.contents() {
                let key = o.key().unwrap().to_string();
                let body = s3
                    .get_object()
                    .bucket(bucket)
                    .key(&key)
                    .send()
                    .await
                    .unwrap();
                out.insert(key, body.body.collect().await.unwrap().to_vec());
            }
            match page.next_continuation_token() {
                Some(t) => token = Some(t.to_string()),
                None => return out,
            }
        }
    }
}

/// The Boss test channel: collection 51, experiment 134, channel 1024.
pub fn boss_cuboid_id(
    resolution: u32,
    index: [usize; 3],
    iso: bool,
) -> cuboids::formats::boss::CuboidId {
    cuboids::formats::boss::CuboidId {
        collection: 51,
        experiment: 134,
        channel: 1024,
        resolution,
        time: 0,
        index,
        iso,
    }
}

/// A uint8 channel of `shape` with gradients and a little hashed noise (ties and carries for
/// the average pooling).
pub fn boss_channel_volume(shape: Vec3) -> Volume {
    let mut data = Vec::with_capacity(shape.iter().product());
    for z in 0..shape[2] {
        for y in 0..shape[1] {
            for x in 0..shape[0] {
                let h = (x * 7919 + y * 104729 + z * 1299709) % 13;
                data.push(((x / 3 + y / 5 + z * 7) % 200 + h) as u8);
            }
        }
    }
    Volume::from_bytes(DataType::Uint8, shape, 1, data).unwrap()
}

/// A DownsampleChannel document for the test channel of `shape` (uint8, anisotropic, up to
/// resolution 4) at `resolution`, its cuboids in `bucket` and their index in `table`.
pub fn boss_job(shape: Vec3, resolution: u32, bucket: &str, table: &str) -> serde_json::Value {
    serde_json::json!({"lookup_key": "51&134&1024", "channel_id": 1024, "msg": {
        "lookup_key": "51&134&1024", "collection_id": 51, "experiment_id": 134, "channel_id": 1024,
        "annotation_channel": false, "data_type": "uint8", "s3_bucket": bucket,
        "s3_index": table, "x_start": 0, "y_start": 0, "z_start": 0,
        "x_stop": shape[0], "y_stop": shape[1], "z_stop": shape[2], "resolution": resolution,
        "resolution_max": 4, "res_lt_max": true, "type": "anisotropic", "iso_resolution": 0,
        "aws_region": "us-east-1"}})
}

/// Writes the resolution-0 cuboids of `vol` (whole cuboids) into `store`, but those at
/// the indices `missing` accepts.
pub async fn put_boss_cuboids(
    store: &dyn cuboids::store::Store,
    vol: &Volume,
    missing: impl Fn([usize; 3]) -> bool,
) {
    use cuboids::formats::boss::{encode_cuboid, CUBOID};
    let counts = [0, 1, 2].map(|a| vol.shape[a].div_ceil(CUBOID[a]));
    for z in 0..counts[2] {
        for y in 0..counts[1] {
            for x in 0..counts[0] {
                if missing([x, y, z]) {
                    continue;
                }
                let origin = cuboids::geometry::mul3([x, y, z], CUBOID);
                let frame = encode_cuboid(&vol.crop(origin, CUBOID)).unwrap();
                store
                    .put(
                        &boss_cuboid_id(0, [x, y, z], false).s3_key(),
                        frame,
                        cuboids::store::ContentEncoding::Identity,
                    )
                    .await
                    .unwrap();
            }
        }
    }
}

/// The Python with aws-cdk-lib: CUBOIDS_CDK_PYTHON, or the venv scripts/test makes.
pub fn cdk_python() -> std::path::PathBuf {
    std::env::var("CUBOIDS_CDK_PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/cdk-venv/bin/python")
        })
}

/// The context a lab gives the CDK app: an image and a data bucket (and a Boss index table),
/// every other setting its default.
pub const CDK_CONTEXT: &str = r#"{"image_uri": "123456789012.dkr.ecr.us-east-1.amazonaws.com/cuboids:gpu", "lambda_image_uri": "123456789012.dkr.ecr.us-east-1.amazonaws.com/cuboids:cpu", "data_bucket": "my-volumes", "boss_index_table": "s3index.example.boss"}"#;

/// Runs the CDK app (batch/app.py) with `context` into `out`: no AWS credentials, no network.
pub fn run_cdk_app(context: &str, out: &std::path::Path) -> std::process::Output {
    std::process::Command::new(cdk_python())
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("batch/app.py"))
        .env("CDK_CONTEXT_JSON", context)
        .env("CDK_OUTDIR", out)
        .env_remove("AWS_PROFILE")
        .output()
        .expect("running batch/app.py (scripts/test makes target/cdk-venv)")
}

/// The cloud assembly of the app with [`CDK_CONTEXT`], synthesised once per test binary, under
/// target/tmp and replaced on each run (no temporary directory is left behind).
pub fn cdk_assembly() -> &'static std::path::Path {
    static DIR: OnceLock<std::path::PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("cdk-assembly-{}", env!("CARGO_CRATE_NAME")));
        let _ = std::fs::remove_dir_all(&dir);
        let o = run_cdk_app(CDK_CONTEXT, &dir);
        assert!(
            o.status.success(),
            "batch/app.py: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        dir
    })
}
