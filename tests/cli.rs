//! The binary as a user runs it.

use std::process::Command;

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
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("MVx/s") && text.matches("downsampled").count() == 2,
        "{text}"
    );
    assert!(
        text.contains("segmented") && text.contains("labelled cells"),
        "{text}"
    );
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
    assert!(demo.status.success());
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
