//! The Boss resolution hierarchy's DownsampleChannel activity document (shared/DESIGN.md §3):
//! what one step computes and the document the state machine gets back. Pure functions on the
//! JSON, so unknown keys pass through untouched.

use crate::dtype::DataType;
use crate::formats::boss::CUBOID;
use crate::geometry::Vec3;
use serde_json::{Map, Value};
use thiserror::Error;

#[derive(Debug, Error, PartialEq)]
pub enum JobError {
    #[error("job document: field {field} is {found}; expected {expected}")]
    Field {
        field: String,
        expected: &'static str,
        /// What the document holds there (JSON), or "missing".
        found: String,
    },
    #[error("job document: msg.type is {0:?}; expected \"isotropic\" or \"anisotropic\"")]
    Type(String),
}

/// The fields of `msg` a step needs.
#[derive(Clone, Debug, PartialEq)]
pub struct StepInput {
    pub resolution: u32,
    pub resolution_max: u32,
    pub iso_resolution: u32,
    pub isotropic: bool,
    pub frame: (Vec3, Vec3),
    /// The isotropic frame, present once the hierarchy passed the iso level.
    pub iso_frame: Option<(Vec3, Vec3)>,
}

/// One downsampling pass of a step: factor, whether it reads/writes the `ISO&` key space, and
/// the output cuboid range (in cuboids of the source resolution, start aligned to the factor).
#[derive(Clone, Debug, PartialEq)]
pub struct Pass {
    pub factor: Vec3,
    pub reads_iso: bool,
    pub writes_iso: bool,
    pub cuboids: (Vec3, Vec3),
}

/// The error for field `name` of `msg`, naming what it holds.
fn bad(msg: &Map<String, Value>, name: &str, expected: &'static str) -> JobError {
    JobError::Field {
        field: format!("msg.{name}"),
        expected,
        found: msg
            .get(name)
            .map_or_else(|| "missing".to_string(), Value::to_string),
    }
}

fn field<'a>(msg: &'a Map<String, Value>, name: &str) -> Result<&'a Value, JobError> {
    msg.get(name).ok_or_else(|| bad(msg, name, "present"))
}

fn uint(msg: &Map<String, Value>, name: &str) -> Result<u64, JobError> {
    field(msg, name)?
        .as_u64()
        .ok_or_else(|| bad(msg, name, "a non-negative integer"))
}

fn text(msg: &Map<String, Value>, name: &str) -> Result<String, JobError> {
    field(msg, name)?
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| bad(msg, name, "a string"))
}

fn frame(msg: &Map<String, Value>, prefix: &str) -> Result<(Vec3, Vec3), JobError> {
    let get =
        |axis: &str, end: &str| uint(msg, &format!("{prefix}{axis}_{end}")).map(|v| v as usize);
    Ok((
        [get("x", "start")?, get("y", "start")?, get("z", "start")?],
        [get("x", "stop")?, get("y", "stop")?, get("z", "stop")?],
    ))
}

fn msg_of(doc: &Value) -> Result<&Map<String, Value>, JobError> {
    doc.get("msg")
        .and_then(Value::as_object)
        .ok_or_else(|| JobError::Field {
            field: "msg".into(),
            expected: "an object",
            found: doc
                .get("msg")
                .map_or_else(|| "missing".into(), Value::to_string),
        })
}

/// The channel a job document names, and where its cuboids and index live.
#[derive(Clone, Debug)]
pub struct Channel {
    pub collection: u64,
    pub experiment: u64,
    pub channel: u64,
    pub dtype: DataType,
    pub annotation: bool,
    pub bucket: String,
    pub index_table: String,
}

/// Reads the channel of a DownsampleChannel document; Boss cuboids are uint8, uint16 or uint64.
pub fn channel_of(doc: &Value) -> Result<Channel, JobError> {
    let msg = msg_of(doc)?;
    let dtype = match DataType::parse(&text(msg, "data_type")?) {
        Some(d @ (DataType::Uint8 | DataType::Uint16 | DataType::Uint64)) => d,
        _ => return Err(bad(msg, "data_type", "uint8, uint16 or uint64")),
    };
    Ok(Channel {
        collection: uint(msg, "collection_id")?,
        experiment: uint(msg, "experiment_id")?,
        channel: uint(msg, "channel_id")?,
        dtype,
        annotation: field(msg, "annotation_channel")?
            .as_bool()
            .ok_or_else(|| bad(msg, "annotation_channel", "a boolean"))?,
        bucket: text(msg, "s3_bucket")?,
        index_table: text(msg, "s3_index")?,
    })
}

/// Reads what a step needs from a DownsampleChannel document.
pub fn step_input(doc: &Value) -> Result<StepInput, JobError> {
    let msg = msg_of(doc)?;
    let isotropic = match field(msg, "type")?.as_str() {
        Some("isotropic") => true,
        Some("anisotropic") => false,
        other => return Err(JobError::Type(other.unwrap_or("").to_string())),
    };
    let has_iso = msg.contains_key("iso_x_start");
    Ok(StepInput {
        resolution: uint(msg, "resolution")? as u32,
        resolution_max: uint(msg, "resolution_max")? as u32,
        iso_resolution: uint(msg, "iso_resolution")? as u32,
        isotropic,
        frame: frame(msg, "")?,
        iso_frame: if has_iso {
            Some(frame(msg, "iso_")?)
        } else {
            None
        },
    })
}

/// Output cuboids of a pass: `start = frame_start // dim`, minus one where that is not a
/// multiple of the factor; `stop = ceil(frame_stop / dim)`.
pub fn cuboid_range((start, stop): (Vec3, Vec3), factor: Vec3) -> (Vec3, Vec3) {
    let first = [0, 1, 2].map(|i| {
        let c = start[i] / CUBOID[i];
        if !c.is_multiple_of(factor[i]) {
            c - 1
        } else {
            c
        }
    });
    (first, [0, 1, 2].map(|i| stop[i].div_ceil(CUBOID[i])))
}

/// The passes of one step: (2,2,2) for isotropic channels; (2,2,1) for anisotropic ones, plus a
/// (2,2,2) pass into the `ISO&` key space at and above the iso level (reading the anisotropic
/// data at the iso level itself, the previous ISO level above it).
pub fn passes(input: &StepInput) -> Vec<Pass> {
    if input.isotropic {
        return vec![Pass {
            factor: [2, 2, 2],
            reads_iso: false,
            writes_iso: false,
            cuboids: cuboid_range(input.frame, [2, 2, 2]),
        }];
    }
    let mut out = vec![Pass {
        factor: [2, 2, 1],
        reads_iso: false,
        writes_iso: false,
        cuboids: cuboid_range(input.frame, [2, 2, 1]),
    }];
    if input.resolution >= input.iso_resolution {
        let at_iso = input.resolution == input.iso_resolution;
        let frame = if at_iso {
            input.frame
        } else {
            input.iso_frame.unwrap_or(input.frame)
        };
        out.push(Pass {
            factor: [2, 2, 2],
            reads_iso: !at_iso,
            writes_iso: true,
            cuboids: cuboid_range(frame, [2, 2, 2]),
        });
    }
    out
}

fn shrink((start, stop): (Vec3, Vec3), f: Vec3) -> (Vec3, Vec3) {
    (
        [0, 1, 2].map(|i| start[i] / f[i]),
        [0, 1, 2].map(|i| stop[i].div_ceil(f[i])),
    )
}

fn set_frame(msg: &mut Map<String, Value>, prefix: &str, (start, stop): (Vec3, Vec3)) {
    for (i, axis) in ["x", "y", "z"].iter().enumerate() {
        msg.insert(format!("{prefix}{axis}_start"), start[i].into());
        msg.insert(format!("{prefix}{axis}_stop"), stop[i].into());
    }
}

/// The document returned after a successful step: the frame shrunk by the step's factor, the iso
/// frame copied at the iso level and shrunk by (2,2,2), `resolution + 1`, `res_lt_max`
/// recomputed, top-level `lookup_key = msg.lookup_key`; every other key untouched.
pub fn next_document(doc: &Value) -> Result<Value, JobError> {
    let input = step_input(doc)?;
    let mut out = doc.clone();
    let msg = out
        .get_mut("msg")
        .and_then(Value::as_object_mut)
        .expect("checked by step_input");
    let factor = if input.isotropic {
        [2, 2, 2]
    } else {
        [2, 2, 1]
    };
    if !input.isotropic && input.resolution >= input.iso_resolution {
        let iso = if input.resolution == input.iso_resolution {
            input.frame
        } else {
            input.iso_frame.unwrap_or(input.frame)
        };
        set_frame(msg, "iso_", shrink(iso, [2, 2, 2]));
    }
    set_frame(msg, "", shrink(input.frame, factor));
    let resolution = input.resolution + 1;
    msg.insert("resolution".into(), resolution.into());
    msg.insert(
        "res_lt_max".into(),
        (resolution + 1 < input.resolution_max).into(),
    );
    let lookup = msg.get("lookup_key").cloned();
    if let (Some(lookup), Some(top)) = (lookup, out.as_object_mut()) {
        top.insert("lookup_key".into(), lookup);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn example() -> Value {
        json!({"lookup_key": "stale", "channel_id": 1024, "db_host": "db", "sfn_arn": "arn:sfn",
               "queue_url": "q", "job_receipt_handle": "h", "exe_sfn_arn": "arn:exe",
               "msg": {"lookup_key": "51&134&1024", "collection_id": 51, "experiment_id": 134,
                       "channel_id": 1024, "annotation_channel": false, "data_type": "uint8",
                       "s3_bucket": "cuboids.production.boss", "s3_index": "s3index.production.boss",
                       "x_start": 0, "y_start": 0, "z_start": 0, "x_stop": 10000, "y_stop": 8000,
                       "z_stop": 300, "resolution": 0, "resolution_max": 7, "res_lt_max": true,
                       "type": "anisotropic", "iso_resolution": 3, "aws_region": "us-east-1",
                       "something_new": {"kept": [1, 2]}}})
    }

    #[test]
    fn steps_shrink_the_frame_and_start_the_iso_frame_at_the_iso_level() {
        let mut doc = example();
        let mut history = vec![];
        for _ in 0..6 {
            let input = step_input(&doc).unwrap();
            history.push((input.resolution, passes(&input).len()));
            doc = next_document(&doc).unwrap();
        }
        // One (2,2,1) pass per step, plus the ISO pass from resolution 3 on.
        assert_eq!(
            history,
            vec![(0, 1), (1, 1), (2, 1), (3, 2), (4, 2), (5, 2)]
        );
        let msg = &doc["msg"];
        assert_eq!(msg["resolution"], 6);
        assert_eq!(
            msg["res_lt_max"], false,
            "6 < 7 - 1 is false: the hierarchy ends at resolution 6"
        );
        // 10000 -> ceil(10000 / 2^6) = 157; z untouched by (2,2,1).
        assert_eq!(
            (
                msg["x_stop"].clone(),
                msg["y_stop"].clone(),
                msg["z_stop"].clone()
            ),
            (json!(157), json!(125), json!(300))
        );
        // The iso frame was the frame at resolution 3 (1250 x 1000 x 300), then halved 3 times.
        assert_eq!(
            (
                msg["iso_x_stop"].clone(),
                msg["iso_y_stop"].clone(),
                msg["iso_z_stop"].clone()
            ),
            (json!(157), json!(125), json!(38))
        );
        assert_eq!(doc["lookup_key"], "51&134&1024");
        assert_eq!(msg["something_new"], json!({"kept": [1, 2]}));
        assert_eq!(doc["exe_sfn_arn"], "arn:exe");
    }

    #[test]
    fn res_lt_max_counts_the_last_step() {
        let mut doc = example();
        doc["msg"]["resolution"] = json!(4);
        doc["msg"]["type"] = json!("isotropic");
        let next = next_document(&doc).unwrap();
        assert_eq!(next["msg"]["resolution"], 5);
        assert_eq!(next["msg"]["res_lt_max"], true);
        assert_eq!(next["msg"]["z_stop"], 150, "isotropic steps halve z too");
        assert!(
            next["msg"].get("iso_x_start").is_none(),
            "isotropic channels have no ISO frame"
        );
    }

    #[test]
    fn output_cuboids_start_on_the_factor_grid() {
        // Frame starting in cuboid 3 along x (odd): the pass starts at cuboid 2.
        let range = cuboid_range(([3 * 512 + 5, 0, 17], [4000, 600, 40]), [2, 2, 1]);
        assert_eq!(range, ([2, 0, 1], [8, 2, 3]));
        let range = cuboid_range(([0, 1024, 16], [512, 2048, 48]), [2, 2, 2]);
        assert_eq!(range, ([0, 2, 0], [1, 4, 3]));
    }

    #[test]
    fn bad_documents_name_the_field() {
        let mut doc = example();
        doc["msg"].as_object_mut().unwrap().remove("z_stop");
        assert_eq!(
            next_document(&doc).unwrap_err().to_string(),
            "job document: field msg.z_stop is missing; expected present"
        );
        let mut doc = example();
        doc["msg"]["data_type"] = json!("complex128");
        assert_eq!(
            channel_of(&doc).unwrap_err().to_string(),
            "job document: field msg.data_type is \"complex128\"; expected uint8, uint16 or uint64"
        );
        let mut doc = example();
        doc["msg"]["x_stop"] = json!(-3);
        assert!(next_document(&doc)
            .unwrap_err()
            .to_string()
            .contains("field msg.x_stop is -3; expected a non-negative integer"));
        let mut doc = example();
        doc["msg"]["type"] = json!("slice");
        assert!(next_document(&doc)
            .unwrap_err()
            .to_string()
            .contains("\"slice\""));
        assert!(next_document(&json!({"lookup_key": 1}))
            .unwrap_err()
            .to_string()
            .contains("field msg"));
    }
}
