//! The Boss S3 index (a DynamoDB table, e.g. `s3index.<domain>`): a cuboid without an entry reads
//! as zeros in the Boss, so every cuboid written gets one, exactly as the Boss writes it:
//! HASH `object-key` (the S3 key without `&version`), RANGE `version-node` (0), plus
//! `ingest-job-hash` (collection id), `ingest-job-range` `{exp}&{chan}&{res}&{job}` and
//! `lookup-key` `{col}&{exp}&{chan}&{res}#{0..99}` for the `lookup-key-index` GSI.

use crate::formats::boss::CuboidId;
use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata};
use aws_sdk_dynamodb::types::AttributeValue;
use std::collections::HashMap;
use thiserror::Error;

#[derive(Debug, Error)]
#[error("writing the S3 index entry for {object_key} to DynamoDB table {table} failed: {message}")]
pub struct IndexError {
    pub table: String,
    pub object_key: String,
    /// DynamoDB's error code (`ResourceNotFoundException`, `AccessDeniedException`...).
    pub code: Option<String>,
    pub message: String,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl IndexError {
    /// Whether a later attempt could succeed: not when the table is missing or access is denied.
    pub fn is_transient(&self) -> bool {
        !matches!(
            self.code.as_deref(),
            Some(
                "ResourceNotFoundException"
                    | "AccessDeniedException"
                    | "UnrecognizedClientException"
                    | "ValidationException"
            )
        )
    }
}

pub struct S3Index {
    client: aws_sdk_dynamodb::Client,
    table: String,
}

/// Ingest job recorded for cuboids made by downsampling (the Boss uses 0, as cutouts do).
const DOWNSAMPLE_INGEST_JOB: u64 = 0;

/// The GSI shard of an entry: the Boss spreads `lookup-key` over 100 suffixes at random; a hash
/// of the key keeps that spread and makes rewrites identical.
fn lookup_shard(object_key: &str) -> u64 {
    object_key
        .bytes()
        .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64))
        % 100
}

/// The item the Boss writes for a cuboid.
pub fn index_item(id: &CuboidId) -> HashMap<String, AttributeValue> {
    let object_key = id.object_key();
    let s = |v: String| AttributeValue::S(v);
    HashMap::from([
        ("object-key".to_string(), s(object_key.clone())),
        ("version-node".to_string(), AttributeValue::N("0".into())),
        ("ingest-job-hash".to_string(), s(id.collection.to_string())),
        (
            "ingest-job-range".to_string(),
            s(format!(
                "{}&{}&{}&{DOWNSAMPLE_INGEST_JOB}",
                id.experiment, id.channel, id.resolution
            )),
        ),
        (
            "lookup-key".to_string(),
            s(format!(
                "{}&{}&{}&{}#{}",
                id.collection,
                id.experiment,
                id.channel,
                id.resolution,
                lookup_shard(&object_key)
            )),
        ),
    ])
}

impl S3Index {
    pub fn new(sdk: &aws_config::SdkConfig, endpoint: Option<String>, table: &str) -> S3Index {
        let mut config = aws_sdk_dynamodb::config::Builder::from(sdk);
        if let Some(endpoint) = endpoint {
            config = config.endpoint_url(endpoint);
        }
        S3Index {
            client: aws_sdk_dynamodb::Client::from_conf(config.build()),
            table: table.to_string(),
        }
    }

    /// Adds the cuboid's entry unless it exists (an existing entry may belong to an ingest job,
    /// which must not be overwritten); running it twice is harmless.
    pub async fn ensure_entry(&self, id: &CuboidId) -> Result<(), IndexError> {
        let result = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(index_item(id)))
            .condition_expression("attribute_not_exists(#k)")
            .expression_attribute_names("#k", "object-key")
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_conditional_check_failed_exception()) =>
            {
                Ok(())
            }
            Err(e) => Err(IndexError {
                table: self.table.clone(),
                object_key: id.object_key(),
                code: e.code().map(str::to_string),
                message: DisplayErrorContext(&e).to_string(),
                source: Box::new(e),
            }),
        }
    }
}
