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
