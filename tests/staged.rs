//! Connected components past one machine: a staged plan run task by task through the Batch
//! entrypoint (`AWS_BATCH_JOB_ARRAY_INDEX`), in shuffled order within each stage, equals the
//! single-process run voxel for voxel; stages are idempotent; missing, corrupt and foreign
//! intermediates fail with their key named.

mod common;

use common::{gpu_arc, read_labels, Rng};
use cuboids::formats::precomputed::WriteOptions;
use cuboids::geometry::Vec3;
use cuboids::ops::connected_components::Connectivity;
use cuboids::runtime::segmentation::write_float_volume;
use cuboids::runtime::synthetic::probability_like;
use cuboids::store::LocalStore;
use cuboids::task::segment::{connected_components, ChunkOptions, ComponentsOptions};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

const WRITE: WriteOptions = WriteOptions { gzip_level: 0 };
const OUT_CHUNK: Vec3 = [8, 8, 4];
const GPU_CHUNK: Vec3 = [8, 8, 4];

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

fn cuboids(args: &[&str], index: Option<usize>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cuboids"));
    cmd.args(args).env("CUBOIDS_LOG_FORMAT", "text");
    if let Some(i) = index {
        cmd.env("AWS_BATCH_JOB_ARRAY_INDEX", i.to_string());
    }
    cmd.output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Writes the connected-components plan's manifests under `dir` and returns their paths, stage
/// by stage.
fn plan(dir: &Path, input: &Path, output: &Path, dust: u64, connectivity: &str) -> Vec<PathBuf> {
    let args = [
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
        "--threshold",
        "0.55",
        "--connectivity",
        connectivity,
        "--dust",
        &dust.to_string(),
    ];
    plan_of(dir, "connected-components", &args)
}

/// Plans `kind` with `args` in blocks of one 16x16x8 GPU chunk, output chunks of 8x8x4,
/// manifests under `dir`; returns their paths, stage by stage.
fn plan_of(dir: &Path, kind: &str, args: &[&str]) -> Vec<PathBuf> {
    plan_in_blocks_of(dir, kind, args, "16,16,8")
}

/// [`plan_of`] with blocks of one GPU chunk of `chunk` voxels.
fn plan_in_blocks_of(dir: &Path, kind: &str, args: &[&str], chunk: &str) -> Vec<PathBuf> {
    plan_stages(dir, kind, args, chunk)["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| PathBuf::from(s["manifest"].as_str().unwrap()))
        .collect()
}

/// [`plan_in_blocks_of`], returning the stages document the plan command prints (manifests under
/// `dir/plan/`).
fn plan_stages(dir: &Path, kind: &str, args: &[&str], chunk: &str) -> serde_json::Value {
    let prefix = format!("{}/", dir.join("plan").display());
    let mut all = vec!["plan", kind];
    all.extend_from_slice(args);
    // Blocks of one GPU chunk, scans of fan-in 2: the most stages and levels a small volume
    // can have.
    all.extend([
        "--chunk-size",
        chunk,
        "--block-size",
        chunk,
        "--scan-fan-in",
        "2",
        "--output-chunk-size",
        "8,8,4",
        "--gzip-level",
        "0",
        "--task-mib",
        "64",
        "--manifests",
        &prefix,
    ]);
    let o = cuboids(&all, None);
    assert!(o.status.success(), "{}", text(&o));
    let stages: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    // What segment.asl.json reads: each stage's manifest and array jobs.
    for s in stages["stages"].as_array().unwrap() {
        let tasks = s["tasks"].as_u64().unwrap();
        assert_eq!(s["jobs"][0]["offset"], 0, "{s}");
        assert_eq!(s["jobs"][0]["size"].as_u64(), Some(tasks), "{s}");
    }
    stages
}

fn tasks_in(manifest: &Path) -> usize {
    std::fs::read_to_string(manifest).unwrap().lines().count()
}

/// Runs one task of a manifest as a Batch array child would.
fn batch(manifest: &Path, index: usize) -> Output {
    cuboids(
        &["batch", "--manifest", manifest.to_str().unwrap()],
        Some(index),
    )
}

/// Runs every task of a manifest, in shuffled order; returns their output documents.
fn run_stage_shuffled(manifest: &Path, rng: &mut Rng) -> Vec<serde_json::Value> {
    let n = tasks_in(manifest);
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    order
        .into_iter()
        .map(|i| {
            let o = batch(manifest, i);
            assert!(
                o.status.success(),
                "{} task {i}: {}",
                manifest.display(),
                text(&o)
            );
            serde_json::from_slice(&o.stdout).unwrap()
        })
        .collect()
}

fn single_process(input: &Path, output: &Path, dust: u64, connectivity: Connectivity) {
    rt().block_on(async {
        let input =
            cuboids::formats::precomputed::Precomputed::open(Arc::new(LocalStore::new(input)))
                .await
                .unwrap();
        let opts = ComponentsOptions {
            chunks: ChunkOptions {
                output_chunk_size: Some(OUT_CHUNK),
                chunk_size: Some(GPU_CHUNK),
                write: WRITE,
                ..Default::default()
            },
            threshold: 0.55,
            connectivity,
            dust,
        };
        connected_components(gpu_arc(), &input, Arc::new(LocalStore::new(output)), &opts)
            .await
            .unwrap();
    });
}

fn random_probabilities(shape: Vec3, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..shape[0] * shape[1] * shape[2])
        .map(|_| rng.below(1000) as f32 / 1000.0)
        .collect()
}

#[test]
fn staged_plan_run_task_by_task_equals_single_process() {
    let shape = [40, 36, 20];
    let mut rng = Rng::new(5);
    for (name, values, connectivity, dust) in [
        ("random", random_probabilities(shape, 3), "6", 0),
        // Sparse (about 10% foreground): near 26-connectivity's percolation threshold, so many
        // components cross blocks.
        (
            "sparse",
            random_probabilities(shape, 4)
                .iter()
                .map(|v| v.powi(6))
                .collect(),
            "26",
            3,
        ),
        // Smooth blobs (the EM-like map's dark side): objects spanning several blocks.
        (
            "blobs",
            probability_like(shape).iter().map(|v| 1.0 - v).collect(),
            "18",
            20,
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("prob");
        rt().block_on(write_float_volume(&input, &[&values], shape, WRITE))
            .unwrap();
        let conn = match connectivity {
            "6" => Connectivity::Six,
            "18" => Connectivity::Eighteen,
            _ => Connectivity::TwentySix,
        };
        let whole = dir.path().join("whole");
        single_process(&input, &whole, dust, conn);

        let staged = dir.path().join("staged");
        let manifests = plan(dir.path(), &input, &staged, dust, connectivity);
        let names: Vec<String> = manifests
            .iter()
            .map(|m| m.file_stem().unwrap().to_string_lossy().into_owned())
            .collect();
        // No merge task: 3 blocks a side make union levels 1 and 2, and scans of fan-in 2 two
        // levels along each axis.
        assert_eq!(
            names,
            [
                "block", "link", "union-1", "union-2", "down-1", "down-0", "scan-x-0", "scan-x-1",
                "scan-y-0", "scan-y-1", "scan-z-0", "scan-z-1", "rank", "relabel", "finalize"
            ],
            "{name}"
        );
        // 40x36x20 in blocks of 16x16x8: 3 x 3 x 3.
        assert_eq!(tasks_in(&manifests[0]), 27, "{name}");
        for (stage, manifest) in manifests.iter().enumerate() {
            assert!(
                !staged.join("info").exists(),
                "{name}: the info exists before stage {stage} ran"
            );
            run_stage_shuffled(manifest, &mut rng);
        }
        let expected = rt().block_on(read_labels(&whole));
        let got = rt().block_on(read_labels(&staged));
        let max = expected.iter().max().copied().unwrap_or(0);
        let fg = expected.iter().filter(|&&l| l > 0).count();
        assert!(
            max > 1,
            "{name}: a trivial volume ({max} labels, {fg} voxels)"
        );
        assert_eq!(
            got, expected,
            "{name} connectivity {connectivity} dust {dust}"
        );
    }
}

/// Affinities with only 4 levels: ties everywhere, so plateaus cross chunk and block faces.
fn tied_affinities(shape: Vec3, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = Rng::new(seed);
    let n = shape[0] * shape[1] * shape[2];
    (0..3)
        .map(|_| (0..n).map(|_| rng.below(4) as f32 / 3.0).collect())
        .collect()
}

#[test]
fn staged_segment_run_task_by_task_equals_single_process() {
    let shape = [40, 36, 20];
    let mut rng = Rng::new(11);
    let smooth = cuboids::runtime::synthetic::affinities_like(shape);
    let larger = [64, 64, 32];
    for (name, shape, channels, threshold, blocks_of, blocks) in [
        (
            "tied",
            shape,
            tied_affinities(shape, 7),
            "0.5",
            "16,16,8",
            27,
        ),
        // Continuous values with objects larger than a block: fragments and segments cross
        // block faces.
        (
            "smooth",
            shape,
            smooth.channels.to_vec(),
            "0.3",
            "16,16,8",
            27,
        ),
        // Blocks large enough to hold many fragments and segments wholly inside them.
        (
            "tied, larger blocks",
            larger,
            tied_affinities(larger, 3),
            "0.5",
            "32,32,16",
            8,
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("aff");
        let refs: Vec<&[f32]> = channels.iter().map(Vec::as_slice).collect();
        rt().block_on(write_float_volume(&input, &refs, shape, WRITE))
            .unwrap();
        let whole = dir.path().join("whole");
        let single = rt().block_on(async {
            let input =
                cuboids::formats::precomputed::Precomputed::open(Arc::new(LocalStore::new(&input)))
                    .await
                    .unwrap();
            let opts = cuboids::task::segment::SegmentOptions {
                chunks: ChunkOptions {
                    output_chunk_size: Some(OUT_CHUNK),
                    chunk_size: Some([32, 32, 16]),
                    write: WRITE,
                    ..Default::default()
                },
                watershed: Default::default(),
                threshold: threshold.parse().unwrap(),
            };
            cuboids::task::segment::segment(
                gpu_arc(),
                &input,
                Arc::new(LocalStore::new(&whole)),
                &opts,
            )
            .await
            .unwrap()
        });

        let expected = rt().block_on(read_labels(&whole));
        let segments: std::collections::HashSet<u64> = expected.iter().copied().collect();
        assert!(segments.len() > 2, "{name}: a trivial volume");
        let staged = dir.path().join("staged");
        let args = [
            "--affinity",
            input.to_str().unwrap(),
            "--output",
            staged.to_str().unwrap(),
            "--threshold",
            threshold,
        ];
        let manifests = plan_in_blocks_of(dir.path(), "segment", &args, blocks_of);
        assert_eq!(tasks_in(&manifests[0]), blocks, "{name}");
        let names: Vec<String> = manifests
            .iter()
            .map(|m| m.file_stem().unwrap().to_string_lossy().into_owned())
            .collect();
        // Groups of 1, 2, 4 blocks per axis for 27 blocks, of 1 and 2 for 8; scans of fan-in
        // 2 two levels deep along 3 blocks, one along 2.
        let expected_names: Vec<&str> = match blocks {
            27 => vec![
                "block",
                "link",
                "union-1",
                "union-2",
                "down-1",
                "down-0",
                "round-0",
                "round-1",
                "round-2",
                "resolve-1",
                "resolve-0",
                "scan-x-0",
                "scan-x-1",
                "scan-y-0",
                "scan-y-1",
                "scan-z-0",
                "scan-z-1",
                "rank",
                "relabel",
                "finalize",
            ],
            _ => vec![
                "block",
                "link",
                "union-1",
                "down-0",
                "round-0",
                "round-1",
                "resolve-0",
                "scan-x-0",
                "scan-y-0",
                "scan-z-0",
                "rank",
                "relabel",
                "finalize",
            ],
        };
        assert_eq!(names, expected_names, "{name}");
        let stage = |n: &str| names.iter().position(|m| m == n).unwrap();
        let mut outputs = Vec::new();
        for (i, manifest) in manifests.iter().enumerate() {
            assert!(
                !staged.join("info").exists(),
                "{name}: the info exists before stage {} ran",
                names[i]
            );
            outputs.push(run_stage_shuffled(manifest, &mut rng));
        }
        let sum = |stage: usize, field: &str| -> u64 {
            outputs[stage]
                .iter()
                .map(|d| d[field].as_u64().unwrap())
                .sum()
        };
        if name.starts_with("tied") {
            assert!(
                sum(stage("link"), "deferred") > 0,
                "{name}: tied data must leave plateaus open across blocks"
            );
        }
        let got = rt().block_on(read_labels(&staged));
        assert!(
            got == expected,
            "{name}: staged and single-process labels differ"
        );
        // The rounds make the single process's merges between them, each once.
        let per_round: Vec<u64> = names
            .iter()
            .enumerate()
            .filter(|(_, n)| n.starts_with("round-"))
            .map(|(i, _)| sum(i, "merges"))
            .collect();
        eprintln!(
            "{name}: merges per round {per_round:?} of {}",
            single.merges
        );
        assert!(single.merges > 0, "{name}");
        assert_eq!(
            per_round.iter().sum::<u64>(),
            single.merges as u64,
            "{name}"
        );
        assert_eq!(
            outputs[stage("finalize")][0]["segments"].as_u64(),
            Some(segments.len() as u64 - segments.contains(&0) as u64),
            "{name}: the segments finalize counts"
        );
        if name == "tied, larger blocks" {
            // Blocks of 32x32x16 hold segments whole: the first round decides some merges.
            assert!(per_round[0] > 0, "{name}: {per_round:?}");
        }
        // Tasks of several stages run again rewrite identical bytes; a damaged part a round
        // left is named by the round that reads it.
        if name == "tied" {
            check_reruns_and_damage(
                &staged,
                &manifests,
                &[
                    (stage("round-0"), 5),
                    (stage("link"), 13),
                    (stage("union-2"), 0),
                    (stage("down-0"), 4),
                    (stage("round-1"), 1),
                    (stage("resolve-0"), 7),
                    (stage("rank"), 3),
                ],
                "round-0-3.left",
            );
        }
    }
}

/// Re-runs the tasks `(stage, task)` and checks that they rewrote identical bytes; then cuts 3
/// bytes off the intermediate `damaged` and checks that the stage after the one that wrote it
/// (the first stage listed, plus one) fails permanently, naming it.
fn check_reruns_and_damage(
    staged: &Path,
    manifests: &[PathBuf],
    tasks: &[(usize, usize)],
    damaged: &str,
) {
    let before = snapshot(staged);
    for &(stage, i) in tasks {
        let o = batch(&manifests[stage], i.min(tasks_in(&manifests[stage]) - 1));
        assert!(o.status.success(), "{}", text(&o));
    }
    assert!(snapshot(staged) == before, "a re-run changed bytes");
    let staging = std::fs::read_dir(staged.join(".cuboids-staging"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let object = staging.join(damaged);
    let bytes = std::fs::read(&object).unwrap();
    std::fs::write(&object, &bytes[..bytes.len() - 3]).unwrap();
    let reader = &manifests[tasks[0].0 + 1];
    let failures: Vec<Output> = (0..tasks_in(reader))
        .map(|i| batch(reader, i))
        .filter(|o| !o.status.success())
        .collect();
    assert!(!failures.is_empty(), "no task read the damaged {damaged}");
    for o in failures {
        assert_eq!(o.status.code(), Some(65), "{}", text(&o));
        assert!(text(&o).contains(damaged), "{}", text(&o));
    }
}

/// Every file under `dir` with its bytes, for comparing runs.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn stages_are_idempotent_and_bad_intermediates_are_named() {
    let shape = [32, 32, 16];
    let values = random_probabilities(shape, 8);
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("prob");
    rt().block_on(write_float_volume(&input, &[&values], shape, WRITE))
        .unwrap();
    let staged = dir.path().join("staged");
    let manifests = plan(dir.path(), &input, &staged, 0, "26");
    let stage = |name: &str| {
        manifests
            .iter()
            .find(|m| m.file_stem().unwrap() == name)
            .unwrap_or_else(|| panic!("no stage {name} in {manifests:?}"))
            .clone()
    };

    // A stage run before its inputs exist: the missing object is named, permanently.
    let o = batch(&stage("relabel"), 1);
    assert_eq!(o.status.code(), Some(65), "{}", text(&o));
    assert!(text(&o).contains("block-1.summary"), "{}", text(&o));
    let o = batch(&stage("down-0"), 1);
    assert_eq!(o.status.code(), Some(65), "{}", text(&o));
    assert!(text(&o).contains("does not exist"), "{}", text(&o));

    let mut rng = Rng::new(9);
    for m in &manifests[..manifests.len() - 2] {
        run_stage_shuffled(m, &mut rng);
    }
    let before = snapshot(&staged);
    // Re-running tasks of every stage so far rewrites identical bytes.
    for m in &manifests[..manifests.len() - 2] {
        let o = batch(m, 3.min(tasks_in(m) - 1));
        assert!(o.status.success(), "{}", text(&o));
    }
    assert_eq!(snapshot(&staged), before);

    let staging = std::fs::read_dir(staged.join(".cuboids-staging"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    // Truncated intermediates: the stage that reads each names it.
    for (object, reader, task) in [
        ("block-2.summary", "link", 2),
        ("block-2.border", "link", 3),
        ("block-5.links", "union-1", 0),
        ("union-0-5.final", "down-0", 5),
        ("block-5.rows", "scan-x-0", 2),
        ("block-0.ranks", "relabel", 6),
    ] {
        let path = staging.join(object);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 5]).unwrap();
        let o = batch(&stage(reader), task);
        assert_eq!(o.status.code(), Some(65), "{object}: {}", text(&o));
        assert!(
            text(&o).contains(object) && text(&o).contains("corrupt"),
            "{object}: {}",
            text(&o)
        );
        std::fs::write(&path, &bytes).unwrap();
    }
    let summary = staging.join("block-0.summary");

    // An intermediate of another plan (another threshold) in this plan's place.
    let other = dir.path().join("other");
    let other_manifests = plan(dir.path().join("o").as_path(), &input, &other, 5, "26");
    let o = batch(&other_manifests[0], 0);
    assert!(o.status.success(), "{}", text(&o));
    let other_staging = std::fs::read_dir(other.join(".cuboids-staging"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::copy(other_staging.join("block-0.summary"), &summary).unwrap();
    let o = batch(&stage("link"), 0);
    assert_eq!(o.status.code(), Some(65), "{}", text(&o));
    assert!(text(&o).contains("another plan"), "{}", text(&o));

    let manifest = std::fs::read_to_string(stage("link")).unwrap();
    let line = manifest.lines().next().unwrap();
    // A plan (with a consistent id) whose blocks do not tile the volume in whole GPU chunks.
    let mut task: cuboids::task::spec::Task = serde_json::from_str(line.trim()).unwrap();
    if let cuboids::task::spec::Task::ConnectedComponentsStage(t) = &mut task {
        t.plan = cuboids::task::spec::ComponentsPlan::new(
            [12, 16, 8],
            t.plan.blocks,
            [2, 2, 2],
            t.plan.work.clone(),
        );
    }
    let o = cuboids(
        &["batch", "--task", &serde_json::to_string(&task).unwrap()],
        None,
    );
    assert_eq!(o.status.code(), Some(65), "{}", text(&o));
    assert!(text(&o).contains("do not tile"), "{}", text(&o));

    // A task document whose plan was edited after planning.
    let mut doc: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    doc["plan"]["work"]["threshold"] = serde_json::json!(0.9);
    let o = cuboids(&["batch", "--task", &doc.to_string()], None);
    assert_eq!(o.status.code(), Some(65), "{}", text(&o));
    assert!(text(&o).contains("edited"), "{}", text(&o));

    // An output layer that exists with other parameters (a float32 image where uint64 labels
    // go): the block task names the layer and the field, and leaves the layer as it was.
    let taken = dir.path().join("taken");
    rt().block_on(write_float_volume(&taken, &[&values], shape, WRITE))
        .unwrap();
    let before = snapshot(&taken);
    let taken_manifests = plan(dir.path().join("t").as_path(), &input, &taken, 0, "26");
    let o = batch(&taken_manifests[0], 0);
    assert_eq!(o.status.code(), Some(65), "{}", text(&o));
    assert!(
        text(&o).contains("exists and does not match")
            && text(&o).contains("data_type")
            && text(&o).contains(taken.to_str().unwrap()),
        "{}",
        text(&o)
    );
    assert_eq!(snapshot(&taken), before, "the existing layer changed");
}

/// Peak resident memory of one task, from its output document.
fn peak_rss(o: &Output) -> u64 {
    assert!(o.status.success(), "{}", text(o));
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    doc["peak_rss_bytes"]
        .as_u64()
        .expect("peak_rss_bytes on Linux")
}

/// Peak RSS of the largest task of each stage of a plan, every task run as a Batch child.
fn stage_peaks(manifests: &[PathBuf]) -> Vec<(String, u64)> {
    manifests
        .iter()
        .map(|m| {
            let peak = (0..tasks_in(m))
                .map(|i| peak_rss(&batch(m, i)))
                .max()
                .unwrap();
            (m.file_stem().unwrap().to_string_lossy().into_owned(), peak)
        })
        .collect()
}

/// A single-process run of a task document; returns its peak RSS.
fn single_peak(dir: &Path, doc: serde_json::Value) -> u64 {
    let task = dir.join("whole.json");
    std::fs::write(&task, doc.to_string()).unwrap();
    peak_rss(&cuboids(&["run-task", task.to_str().unwrap()], None))
}

/// Every task of a plan stays within --task-mib plus the fixed part, on volumes of two sizes
/// 4x apart; the per-block stages do not grow with the volume, where a single-process run does.
fn check_budget_and_flatness(kind: &str, task_mib: u64, shapes: [Vec3; 2]) {
    let mut peaks = Vec::new();
    let mut singles = Vec::new();
    for shape in shapes {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in");
        let (flag, doc_input, threshold) = if kind == "segment" {
            let aff = cuboids::runtime::synthetic::affinities_like(shape);
            let channels: Vec<&[f32]> = aff.channels.iter().map(Vec::as_slice).collect();
            rt().block_on(write_float_volume(&input, &channels, shape, WRITE))
                .unwrap();
            ("--affinity", "affinity", "0.7")
        } else {
            let values: Vec<f32> = probability_like(shape).iter().map(|v| 1.0 - v).collect();
            rt().block_on(write_float_volume(&input, &[&values], shape, WRITE))
                .unwrap();
            ("--input", "input", "0.55")
        };
        let staged = dir.path().join("staged");
        let prefix = format!("{}/", dir.path().join("plan").display());
        let o = cuboids(
            &[
                "plan",
                kind,
                flag,
                input.to_str().unwrap(),
                "--output",
                staged.to_str().unwrap(),
                "--threshold",
                threshold,
                "--output-chunk-size",
                "32,32,32",
                "--task-mib",
                &task_mib.to_string(),
                "--manifests",
                &prefix,
            ],
            None,
        );
        assert!(o.status.success(), "{}", text(&o));
        let stages: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let manifests: Vec<PathBuf> = stages["stages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| PathBuf::from(s["manifest"].as_str().unwrap()))
            .collect();
        peaks.push(stage_peaks(&manifests));
        let mut doc = serde_json::json!({
            "kind": kind, "output": dir.path().join("whole"), "threshold": threshold.parse::<f64>().unwrap(),
            "output_chunk_size": [32, 32, 32],
        });
        doc[doc_input] = serde_json::json!(input);
        singles.push(single_peak(dir.path(), doc));
    }
    eprintln!("{kind}: single process {singles:?}, stages {peaks:?}");
    let budget = task_mib << 20;
    let (fixed, fixed_gpu) = (
        (cuboids::task::staged::budget::FIXED_MIB as u64) << 20,
        (cuboids::task::staged::budget::FIXED_GPU_MIB as u64) << 20,
    );
    for (stage, peak) in peaks.iter().flatten() {
        let limit = budget + if stage == "block" { fixed_gpu } else { fixed };
        assert!(
            *peak <= limit,
            "{kind} {stage}: {} MiB, over --task-mib {task_mib} and the fixed part",
            peak >> 20
        );
    }
    // The control grows with the volume (so the measurement sees growth) ...
    assert!(
        singles[1] > singles[0] + (48 << 20),
        "{kind} single process: {} -> {} MiB",
        singles[0] >> 20,
        singles[1] >> 20
    );
    // ... and a per-block stage's largest task does not.
    let per_block = [
        "block",
        "link",
        "down-0",
        "round-0",
        "resolve-0",
        "rank",
        "relabel",
    ];
    for (stage, small) in &peaks[0] {
        if !per_block.contains(&stage.as_str()) {
            continue;
        }
        let large = peaks[1].iter().find(|p| &p.0 == stage).unwrap().1;
        assert!(
            large * 4 <= small * 5,
            "{kind} {stage}: {} -> {} MiB",
            small >> 20,
            large >> 20
        );
    }
}

#[test]
fn connected_components_tasks_stay_within_the_budget_and_per_block_stages_do_not_grow() {
    check_budget_and_flatness("connected-components", 24, [[256, 256, 64], [512, 512, 64]]);
}

#[test]
fn segment_tasks_stay_within_the_budget_and_per_block_stages_do_not_grow() {
    check_budget_and_flatness("segment", 160, [[128, 128, 64], [256, 256, 64]]);
}

/// The `plan` task (how the segmentation machine plans a POST /segment request on a worker)
/// writes the same manifests as `cuboids plan --manifests`, merge rounds included, and returns
/// the same stages; work that is not staged, and a missing input, are refused by name.
#[test]
fn a_plan_task_writes_what_the_plan_command_writes() {
    let shape = [40, 36, 20];
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("aff");
    let channels = tied_affinities(shape, 5);
    let refs: Vec<&[f32]> = channels.iter().map(Vec::as_slice).collect();
    rt().block_on(write_float_volume(&input, &refs, shape, WRITE))
        .unwrap();
    let output = dir.path().join("seg");
    let (input, output) = (input.to_str().unwrap(), output.to_str().unwrap());
    // The CLI's manifests go to dir/plan/ (chunks and blocks 16,16,8, output chunks 8,8,4,
    // gzip 0, task-mib 64, fan-in 2).
    let cli_stages = plan_stages(
        dir.path(),
        "segment",
        &[
            "--affinity",
            input,
            "--output",
            output,
            "--threshold",
            "0.5",
        ],
        "16,16,8",
    );

    let by_task = format!("{}/", dir.path().join("task").display());
    let work = serde_json::json!({
        "kind": "segment", "affinity": input, "output": output, "threshold": 0.5,
        "chunk_size": [16, 16, 8], "output_chunk_size": [8, 8, 4], "gzip_level": 0,
    });
    let run_plan = |work: &serde_json::Value| {
        let task = dir.path().join("plan-task.json");
        let doc = serde_json::json!({
            "kind": "plan", "work": work, "manifests": by_task, "task_mib": 64,
            "block_size": [16, 16, 8], "scan_fan_in": 2,
        });
        std::fs::write(&task, doc.to_string()).unwrap();
        cuboids(&["run-task", task.to_str().unwrap()], None)
    };
    let o = run_plan(&work);
    assert!(o.status.success(), "{}", text(&o));
    let task_stages: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(task_stages["kind"], "plan");
    assert_eq!(task_stages["plan"], cli_stages["plan"]);
    assert_eq!(task_stages["blocks"], cli_stages["blocks"]);
    let names: Vec<&str> = cli_stages["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"round-0"), "rounds planned: {names:?}");
    for (cli, task) in cli_stages["stages"]
        .as_array()
        .unwrap()
        .iter()
        .zip(task_stages["stages"].as_array().unwrap())
    {
        assert_eq!(cli["stage"], task["stage"]);
        assert_eq!(cli["tasks"], task["tasks"]);
        assert_eq!(cli["jobs"], task["jobs"]);
        let name = format!("{}.jsonl", cli["stage"].as_str().unwrap());
        assert_eq!(
            task["manifest"].as_str().unwrap(),
            format!("{by_task}{name}")
        );
        assert_eq!(
            std::fs::read(dir.path().join("plan").join(&name)).unwrap(),
            std::fs::read(dir.path().join("task").join(&name)).unwrap(),
            "{name}"
        );
    }
    assert_eq!(task_stages["stages"].as_array().unwrap().len(), names.len());

    // Refused, with exit code 65 (permanent) and the field or volume named.
    let downsample = serde_json::json!({"kind": "downsample", "location": input});
    let o = run_plan(&downsample);
    assert_eq!(o.status.code(), Some(65), "{}", text(&o));
    assert!(
        text(&o).contains("field work is a downsample task"),
        "{}",
        text(&o)
    );
    let mut missing = work.clone();
    missing["affinity"] = serde_json::json!(dir.path().join("nowhere").to_str().unwrap());
    let o = run_plan(&missing);
    assert_eq!(o.status.code(), Some(65), "{}", text(&o));
    assert!(text(&o).contains("nowhere"), "{}", text(&o));
}
