//! The binary as a user runs it.

mod common;
use std::io::BufRead;
use std::process::{Command, Stdio};

#[test]
fn demo_writes_and_downsamples_both_volumes() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("demo-data");
    let out = Command::new(env!("CARGO_BIN_EXE_cuboids"))
        .args([
            "demo",
            "--dir",
            dir.to_str().unwrap(),
            "--size",
            "160,96,20",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    common::assert_success(&out);
    assert!(
        text.contains("MVx/s") && text.matches("downsampled").count() == 2,
        "{text}"
    );
    // The trained net's affinities, segmented, scored against the ground truth: it was
    // trained on other cells (models/train_demo_net.py), and segments these well (measured at
    // this size: adapted Rand error 0.014, VOI 0.13 + 0.08 bits).
    let scores = text
        .lines()
        .find_map(|l| l.strip_prefix("affinity-segmentation against the ground truth: "))
        .unwrap_or_else(|| panic!("no scores: {text}"));
    let number_after = |label: &str| -> f64 {
        let rest = &scores[scores
            .find(label)
            .unwrap_or_else(|| panic!("{label}: {scores}"))
            + label.len()..];
        rest.split([' ', ',']).next().unwrap().parse().unwrap()
    };
    let (split, merge) = (number_after("VOI split "), number_after("merge "));
    let rand = number_after("adapted Rand error ");
    assert!(rand < 0.1 && split + merge < 0.5, "{scores}");
    // Each step's report, as the task the demo ran through the executor reports it.
    for step in ["infer ", "segment ", "connected-components "] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(step) && l.contains("MVx/s")),
            "{step}: {text}"
        );
    }
    for layer in ["affinity-segmentation", "cells"] {
        let info: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join(layer).join("info")).unwrap()).unwrap();
        assert_eq!(info["type"], "segmentation", "{layer}");
        assert_eq!(
            info["scales"][0]["encoding"], "compressed_segmentation",
            "{layer}"
        );
    }
    for layer in ["image", "segmentation"] {
        let info: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join(layer).join("info")).unwrap()).unwrap();
        let scales = info["scales"].as_array().unwrap();
        assert_eq!(scales.len(), 5, "{layer}: mip 0 plus 4 new mips");
        assert_eq!(scales[4]["size"], serde_json::json!([10, 6, 20]));
        for s in scales {
            let key = s["key"].as_str().unwrap();
            assert!(
                std::fs::read_dir(dir.join(layer).join(key))
                    .unwrap()
                    .count()
                    > 0,
                "{layer}/{key} has chunks"
            );
        }
    }
    // Previews of the middle section: real PNGs of the volume's (or mip 3's) size, and
    // segmentations that show their segments.
    let previews: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("preview: "))
        .collect();
    assert_eq!(previews.len(), 5, "{text}");
    assert!(
        text.contains("run: cuboids view ") && text.contains("cells"),
        "the demo ends with a view command: {text}"
    );
    for path in previews {
        let (width, height, _) = png_summary(std::path::Path::new(path));
        let expected = if path.contains("mip3") {
            (20, 12)
        } else {
            (160, 96)
        };
        assert_eq!((width, height), expected, "{path}");
    }
    // Without the image under them, a segmentation's colours are its segments: the demo's
    // segmentations show many cells, not one merged blob.
    for layer in ["segmentation", "affinity-segmentation", "cells"] {
        let png = temp.path().join(format!("{layer}.png"));
        let out = Command::new(env!("CARGO_BIN_EXE_cuboids"))
            .arg("preview")
            .arg(dir.join(layer))
            .args(["--z", "10", "--out"])
            .arg(&png)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        let (_, _, colours) = png_summary(&png);
        assert!(colours > 8, "{layer}: {colours} colours");
    }
    // Bad requests are named.
    for (args, named) in [
        (vec!["--z", "20"], "--z 20"),
        (vec!["--z", "3", "--mip", "7"], "--mip 7"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_cuboids"))
            .arg("preview")
            .arg(dir.join("image"))
            .args(&args)
            .arg("--out")
            .arg(temp.path().join("bad.png"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(named), "{stderr}");
        assert!(!temp.path().join("bad.png").exists());
    }
}

/// Off a terminal, long passes log `progress` lines (JSON, as Batch and CloudWatch get them)
/// with the pass, the share done, the rate and the time left; one ends each pass at 100%.
#[test]
fn long_passes_log_progress_lines_off_a_terminal() {
    let (_temp, dir) = small_demo();
    let segment = [
        "segment",
        "--affinity",
        "affinities",
        "--output",
        "seg",
        "--threshold",
        "0.3",
    ];
    let downsample = ["downsample", "image", "--mip", "4", "--num-mips", "1"];
    for (args, passes) in [
        (&segment[..], &["watershed", "write"][..]),
        (&downsample[..], &["downsample"][..]),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_cuboids"))
            .current_dir(&dir)
            .args(args)
            .env("CUBOIDS_PROGRESS_SECONDS", "0")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        let lines: Vec<serde_json::Value> = stderr
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .filter(|l: &serde_json::Value| l["fields"]["message"] == "progress")
            .collect();
        for pass in passes {
            let of_pass: Vec<&serde_json::Value> = lines
                .iter()
                .filter(|l| l["fields"]["pass"] == *pass)
                .collect();
            let last = of_pass.last().unwrap_or_else(|| panic!("{pass}: {stderr}"));
            assert_eq!(last["fields"]["percent"], 100.0, "{pass}: {last}");
            assert!(
                last["fields"]["mvx_per_s"].as_f64().unwrap() > 0.0,
                "{last}"
            );
            assert!(
                last["fields"]["total_mvx"].as_f64().unwrap() > 0.0,
                "{last}"
            );
        }
    }
}

/// `CUBOIDS_GPU_ENCODING=1` encodes a segmentation's new mips on the GPU (the report says so)
/// into the same bytes as the CPU encoder (`=0`) writes.
#[test]
fn gpu_encoding_is_switched_by_its_variable_and_changes_no_byte() {
    let (temp, dir) = small_demo();
    let mut outputs = Vec::new();
    for setting in ["1", "0"] {
        let copy = temp.path().join(format!("segmentation-{setting}"));
        cuboids::runtime::local::copy_tree(&dir.join("segmentation"), &copy).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_cuboids"))
            .arg("downsample")
            .arg(&copy)
            .args(["--mip", "2", "--num-mips", "2"])
            .env("CUBOIDS_GPU_ENCODING", setting)
            .output()
            .unwrap();
        common::assert_success(&out);
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            text.contains("compressed_segmentation encoded on the GPU"),
            setting == "1",
            "CUBOIDS_GPU_ENCODING={setting}: {text}"
        );
        outputs.push(common::tree_contents(&copy));
    }
    assert!(outputs[0].len() > 4);
    common::assert_same_contents(&outputs[0], &outputs[1], "the GPU and CPU encoders");
}

/// The demo's volumes at 128x96x16 in a temporary directory (kept alive by the first value).
fn small_demo() -> (tempfile::TempDir, std::path::PathBuf) {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("demo-data");
    let demo = Command::new(env!("CARGO_BIN_EXE_cuboids"))
        .args([
            "demo",
            "--dir",
            dir.to_str().unwrap(),
            "--size",
            "128,96,16",
        ])
        .output()
        .unwrap();
    common::assert_success(&demo);
    (temp, dir)
}

/// A PNG's width, height and number of distinct colours.
fn png_summary(path: &std::path::Path) -> (u32, u32, usize) {
    let file = std::io::BufReader::new(std::fs::File::open(path).unwrap());
    let mut reader = png::Decoder::new(file).read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb, "{}", path.display());
    let colours: std::collections::HashSet<&[u8]> =
        buf[..info.buffer_size()].chunks_exact(3).collect();
    (info.width, info.height, colours.len())
}

/// Headless machines, containers and Batch have no XDG_RUNTIME_DIR; Mesa's Vulkan drivers then
/// printed "error: XDG_RUNTIME_DIR is invalid" on every command, though nothing was wrong.
#[test]
fn a_healthy_machine_without_a_runtime_dir_prints_no_error() {
    for runtime_dir in [None, Some("/nonexistent/cuboids-xdg")] {
        let mut command = Command::new(env!("CARGO_BIN_EXE_cuboids"));
        command.arg("info");
        match runtime_dir {
            None => command.env_remove("XDG_RUNTIME_DIR"),
            Some(dir) => command.env("XDG_RUNTIME_DIR", dir),
        };
        let out = command.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("adapter:"),
            "{stderr}"
        );
        assert!(
            !stderr.to_lowercase().contains("error"),
            "XDG_RUNTIME_DIR {runtime_dir:?}: {stderr}"
        );
    }
}

/// `cuboids view` serves the demo's volumes to a real HTTP client (curl) with CORS, prints a
/// neuroglancer link holding both layers, and stops cleanly on Ctrl-C (SIGINT).
#[test]
fn view_serves_volumes_with_cors_and_a_neuroglancer_link() {
    use std::io::BufRead;
    let (_temp, dir) = small_demo();
    let mut child = Command::new(env!("CARGO_BIN_EXE_cuboids"))
        .arg("view")
        .arg(dir.join("image"))
        .arg(dir.join("cells"))
        .args(["--port", "0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut printed = Vec::new();
    let base = loop {
        let line = lines.next().expect("a line").unwrap();
        printed.push(line.clone());
        if let Some(rest) = line.strip_prefix("serving ") {
            break rest.rsplit(' ').next().unwrap().to_string();
        }
    };
    let link = loop {
        let line = lines.next().expect("a line").unwrap();
        if let Some(link) = line.strip_prefix("open with neuroglancer: ") {
            break link.to_string();
        }
    };
    let curl = |args: &[&str]| {
        let out = Command::new("curl")
            .args(["-s", "-S"])
            .args(args)
            .output()
            .unwrap();
        common::assert_success(&out);
        out.stdout
    };
    // The info, as JSON, and a chunk byte for byte (curl inflates gzip as a browser does).
    let info: serde_json::Value =
        serde_json::from_slice(&curl(&[&format!("{base}/image/info")])).unwrap();
    assert_eq!(info["type"], "image");
    let scale = info["scales"][0]["key"].as_str().unwrap().to_string();
    let chunk_dir = dir.join("image").join(&scale);
    let chunk = std::fs::read_dir(&chunk_dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    let name = chunk
        .file_name()
        .to_string_lossy()
        .trim_end_matches(".gz")
        .to_string();
    let served = curl(&["--compressed", &format!("{base}/image/{scale}/{name}")]);
    let on_disk = std::fs::read(chunk.path()).unwrap();
    let expected = if chunk.path().extension().is_some_and(|e| e == "gz") {
        cuboids::formats::precomputed::gunzip(&on_disk, 1 << 30).unwrap()
    } else {
        on_disk
    };
    assert!(served == expected, "{scale}/{name} differs");
    // CORS on answers and preflights; a missing object is a 404.
    let headers = String::from_utf8(curl(&["-i", &format!("{base}/cells/info")])).unwrap();
    assert!(
        headers.contains("Access-Control-Allow-Origin: *"),
        "{headers}"
    );
    let preflight = String::from_utf8(curl(&[
        "-i",
        "-X",
        "OPTIONS",
        &format!("{base}/cells/info"),
    ]))
    .unwrap();
    assert!(preflight.starts_with("HTTP/1.1 204"), "{preflight}");
    let missing = String::from_utf8(curl(&["-i", &format!("{base}/cells/no/such/key")])).unwrap();
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
    // The link holds both layers, each with its type.
    let state = percent_decode(link.split("#!").nth(1).unwrap());
    let state: serde_json::Value = serde_json::from_str(&state).unwrap();
    let layers = state["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2, "{state}");
    assert_eq!(layers[0]["source"], format!("precomputed://{base}/image"));
    assert_eq!(layers[0]["type"], "image");
    assert_eq!(layers[1]["type"], "segmentation");
    // Ctrl-C: it stops and exits 0.
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}: {printed:?}");
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
            out.push(u8::from_str_radix(hex, 16).unwrap());
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

/// A CLI command runs as the task Batch runs it: Ctrl-C (SIGINT) stops a segment as SIGTERM
/// stops a Batch job, with `cuboids.Interrupted` and the retryable exit code 75, and leaves
/// nothing in the output layer it was creating.
#[test]
fn ctrl_c_stops_a_cli_segment_as_a_batch_task_stops() {
    let temp = tempfile::tempdir().unwrap();
    let size = [256, 256, 48];
    let aff = cuboids::runtime::synthetic::affinities_like(size);
    let channels: Vec<&[f32]> = aff.channels.iter().map(|c| c.as_slice()).collect();
    let affinity = temp.path().join("affinities");
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(cuboids::runtime::segmentation::write_float_volume(
            &affinity,
            &channels,
            size,
            Default::default(),
        ))
        .unwrap();
    let output = temp.path().join("segmentation");
    let mut child = Command::new(env!("CARGO_BIN_EXE_cuboids"))
        .arg("segment")
        .arg("--affinity")
        .arg(&affinity)
        .arg("--output")
        .arg(&output)
        .env("CUBOIDS_LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    // The GPU opens after the signal handlers are in place and before the first chunk, so the
    // signal lands within the run (16 chunks: seconds on lavapipe).
    let mut log = Vec::new();
    for line in &mut lines {
        let line = line.unwrap();
        let ready = line.contains("GPU ready");
        log.push(line);
        if ready {
            break;
        }
    }
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    log.extend(lines.map(|l| l.unwrap()));
    let status = child.wait().unwrap();
    let log = log.join("\n");
    assert_eq!(status.code(), Some(75), "{log}");
    assert!(log.contains("cuboids.Interrupted"), "{log}");
    let left: Vec<_> = walk(&output);
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// A failing CLI command fails as its task document does under `run-task`: the same
/// `cuboids.*` name, cause and exit code.
#[test]
fn a_cli_command_fails_as_its_task_document_does() {
    let temp = tempfile::tempdir().unwrap();
    let missing = temp.path().join("no-such-volume");
    let cli = Command::new(env!("CARGO_BIN_EXE_cuboids"))
        .arg("connected-components")
        .arg("--input")
        .arg(&missing)
        .arg("--output")
        .arg(temp.path().join("cc"))
        .args(["--threshold", "0.5"])
        .output()
        .unwrap();
    let document = serde_json::json!({
        "kind": "connected-components", "input": missing, "output": temp.path().join("cc"),
        "threshold": 0.5,
    });
    let task = temp.path().join("task.json");
    std::fs::write(&task, document.to_string()).unwrap();
    let run_task = Command::new(env!("CARGO_BIN_EXE_cuboids"))
        .arg("run-task")
        .arg(&task)
        .output()
        .unwrap();
    let error_line = |out: &std::process::Output| {
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .find(|l| l.starts_with("error: "))
            .map(str::to_string)
    };
    let line = error_line(&cli).expect("the CLI prints an error line");
    assert!(
        line.contains("cuboids.InvalidTask") && line.contains(missing.to_str().unwrap()),
        "{line}"
    );
    assert_eq!(Some(line), error_line(&run_task));
    assert_eq!(cli.status.code(), Some(65));
    assert_eq!(run_task.status.code(), cli.status.code());
    assert!(!temp.path().join("cc").exists());
}

/// Every file under `dir` (none when it does not exist).
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flat_map(|e| {
            let path = e.unwrap().path();
            if path.is_dir() {
                walk(&path)
            } else {
                vec![path]
            }
        })
        .collect()
}

/// `plan downsample --manifests` writes one manifest per stage of a pyramid too deep for one
/// task within --task-mib; running the stages in order, each task as a Batch child, writes what
/// one `downsample` writes. `--output` refuses such a plan, naming its stages; `--estimate`
/// prints them.
#[test]
fn a_pyramid_planned_in_stages_runs_as_batch_children_and_equals_one_run() {
    use cuboids::dtype::DataType;
    use cuboids::formats::precomputed::info::LayerType;
    use cuboids::formats::precomputed::WriteOptions;
    use cuboids::runtime::local::{new_info, write_new_volume};
    let cuboids = |args: &[&str], index: Option<usize>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cuboids"));
        cmd.args(args).env("CUBOIDS_LOG_FORMAT", "text");
        if let Some(i) = index {
            cmd.env("AWS_BATCH_JOB_ARRAY_INDEX", i.to_string());
        }
        cmd.output().unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    // 8 mips of (2,2,1) over 16³ chunks need whole 512x512x16 tiles (4 MiB), 4 mips 1 MiB.
    let shape = [512, 512, 16];
    let data = common::random_volume(&mut common::Rng::new(7), DataType::Uint8, shape, 1);
    let info = new_info(
        LayerType::Image,
        DataType::Uint8,
        shape,
        [16, 16, 16],
        [8.0, 8.0, 40.0],
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    for name in ["one", "staged"] {
        rt.block_on(write_new_volume(
            &dir.path().join(name),
            info.clone(),
            &data,
            WriteOptions::default(),
        ))
        .unwrap();
    }
    let (one, staged) = (dir.path().join("one"), dir.path().join("staged"));
    common::assert_success(&cuboids(
        &["downsample", one.to_str().unwrap(), "--num-mips", "8"],
        None,
    ));
    let plan_args = |extra: &[&str]| {
        let mut a = vec![
            "plan",
            "downsample",
            staged.to_str().unwrap(),
            "--num-mips",
            "8",
            "--task-mib",
            "4",
        ];
        a.extend_from_slice(extra);
        a.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let run = |extra: &[&str]| {
        let args = plan_args(extra);
        cuboids(&args.iter().map(String::as_str).collect::<Vec<_>>(), None)
    };
    let refused = run(&["--output", dir.path().join("m.jsonl").to_str().unwrap()]);
    let text = String::from_utf8_lossy(&refused.stderr).into_owned();
    assert!(
        !refused.status.success() && text.contains("mips-1-4, mips-5-8"),
        "{text}"
    );
    let estimate = run(&["--estimate"]);
    common::assert_success(&estimate);
    let printed = String::from_utf8_lossy(&estimate.stdout).into_owned();
    assert!(
        printed.contains("mips-1-4") && printed.contains("mips-5-8"),
        "{printed}"
    );

    let prefix = format!("{}/", dir.path().join("plan").display());
    let planned = run(&["--manifests", &prefix]);
    common::assert_success(&planned);
    let doc: serde_json::Value = serde_json::from_slice(&planned.stdout).unwrap();
    let stages = doc["stages"].as_array().unwrap();
    assert_eq!(stages.len(), 2, "{doc}");
    for s in stages {
        let manifest = s["manifest"].as_str().unwrap();
        for i in 0..s["tasks"].as_u64().unwrap() as usize {
            common::assert_success(&cuboids(&["batch", "--manifest", manifest], Some(i)));
        }
    }
    common::assert_same_contents(
        &common::tree_contents(&one),
        &common::tree_contents(&staged),
        "the staged pyramid",
    );
}

/// `cuboids evaluate`: a segmentation against itself scores 0, the demo's against its ground
/// truth what the demo printed; a layer that is not labels and a missing one are named.
#[test]
fn evaluate_scores_a_segmentation_and_names_bad_layers() {
    let (_temp, dir) = small_demo();
    let evaluate = |seg: &str, truth: &str| {
        Command::new(env!("CARGO_BIN_EXE_cuboids"))
            .arg("evaluate")
            .arg(dir.join(seg))
            .arg("--truth")
            .arg(dir.join(truth))
            .output()
            .unwrap()
    };
    let same = evaluate("segmentation", "segmentation");
    common::assert_success(&same);
    let text = String::from_utf8_lossy(&same.stdout);
    assert!(
        text.contains("VOI split 0.0000, merge 0.0000 (bits); adapted Rand error 0.0000"),
        "{text}"
    );
    let scored = evaluate("affinity-segmentation", "segmentation");
    common::assert_success(&scored);
    let text = String::from_utf8_lossy(&scored.stdout);
    assert!(
        text.contains("over 196608 voxels") && !text.contains("error 0.0000"),
        "{text}"
    );
    for (seg, words) in [
        ("affinities", "float32 x 3 channels"),
        ("nothing", "nothing"),
    ] {
        let failed = evaluate(seg, "segmentation");
        let stderr = String::from_utf8_lossy(&failed.stderr);
        assert!(
            !failed.status.success() && stderr.contains(words),
            "{seg}: {stderr}"
        );
    }
}
