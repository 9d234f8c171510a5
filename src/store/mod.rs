//! Where bytes live. One async trait, one shared test suite (tests/store_suite.rs) that every
//! backend must pass. Keys are `/`-separated paths relative to the store's root.

pub mod aws_env;
pub mod boss_index;
pub mod local;
pub mod s3;

use async_trait::async_trait;
use std::path::PathBuf;
use std::sync::Arc;
use thiserror::Error;

pub use local::LocalStore;
pub use s3::S3Store;

/// How an object's bytes are encoded at rest. Precomputed chunks may be gzipped: CloudVolume
/// writes `<key>.gz` on local disk and `Content-Encoding: gzip` on S3; a store maps this to its
/// own convention, so readers accept both forms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContentEncoding {
    Identity,
    Gzip,
}

/// An object as stored: its bytes and their encoding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Object {
    pub data: Vec<u8>,
    pub encoding: ContentEncoding,
}

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("I/O error on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid key {key:?}: {reason}")]
    InvalidKey { key: String, reason: &'static str },
    #[error("invalid location {location:?}: {reason}")]
    Location {
        location: String,
        reason: &'static str,
    },
    #[error("S3 {op} of {url} failed: {message}")]
    S3 {
        op: &'static str,
        url: String,
        /// The service's error code (`AccessDenied`, `SlowDown`...), when it answered.
        code: Option<String>,
        message: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// S3 error codes that no retry can fix: the request itself is refused.
const PERMANENT_S3_CODES: &[&str] = &[
    "AccessDenied",
    "AllAccessDisabled",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "NoSuchBucket",
    "InvalidBucketName",
];

impl StoreError {
    /// Whether running the same request later could succeed (a transient fault, after the
    /// SDK's own retries), as opposed to a refusal or a bad key.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Io { source, .. } => !matches!(
                source.kind(),
                std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::InvalidInput
            ),
            StoreError::InvalidKey { .. } | StoreError::Location { .. } => false,
            StoreError::S3 { code, .. } => code
                .as_deref()
                .is_none_or(|c| !PERMANENT_S3_CODES.contains(&c)),
        }
    }
}

/// Opens the store at a location: `s3://bucket/prefix` (configured from the AWS environment),
/// or a local directory.
pub async fn open_store(location: &str) -> Result<Arc<dyn Store>, StoreError> {
    if location.starts_with("s3://") {
        Ok(Arc::new(S3Store::from_env(location).await?))
    } else {
        open_store_with(location, &aws_config::SdkConfig::builder().build())
    }
}

/// Opens the store at a location with an AWS configuration already loaded.
pub fn open_store_with(
    location: &str,
    sdk: &aws_config::SdkConfig,
) -> Result<Arc<dyn Store>, StoreError> {
    if location.starts_with("s3://") {
        Ok(Arc::new(S3Store::with_config(
            location,
            sdk,
            aws_env::endpoint("AWS_ENDPOINT_URL_S3"),
        )?))
    } else {
        let path = location.strip_prefix("file://").unwrap_or(location);
        Ok(Arc::new(LocalStore::new(path)))
    }
}

/// The store holding a single object (a manifest, a task document) and its key: the object's
/// parent directory or prefix, and its last path component.
pub fn open_object(
    location: &str,
    sdk: &aws_config::SdkConfig,
) -> Result<(Arc<dyn Store>, String), StoreError> {
    let trimmed = location.trim_end_matches('/');
    match trimmed.rsplit_once('/') {
        Some((parent, name)) if !name.is_empty() && parent != "s3:/" => {
            let parent = if parent.is_empty() { "/" } else { parent };
            Ok((open_store_with(parent, sdk)?, name.to_string()))
        }
        _ if !location.starts_with("s3://") => {
            Ok((open_store_with(".", sdk)?, trimmed.to_string()))
        }
        _ => Err(StoreError::Location {
            location: location.to_string(),
            reason: "names a bucket, not an object",
        }),
    }
}

#[async_trait]
pub trait Store: Send + Sync {
    /// Where this store points, for messages (a path or URL).
    fn location(&self) -> String;

    /// The object at `key`, or `None` when it does not exist (which is not an error).
    async fn get(&self, key: &str) -> Result<Option<Object>, StoreError>;

    /// Writes an object whole: readers never see a partly written one.
    async fn put(
        &self,
        key: &str,
        data: Vec<u8>,
        encoding: ContentEncoding,
    ) -> Result<(), StoreError>;

    /// Bytes `start..start + len` of an identity-encoded object (a shard file), fewer where the
    /// object ends first (none past its end), or `None` when it does not exist. Readers of
    /// sharded volumes fetch only index entries and the chunks they need this way. The default
    /// reads the whole object; backends override it with real ranged reads.
    async fn get_range(
        &self,
        key: &str,
        start: u64,
        len: u64,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.get(key).await?.map(|object| {
            let data = object.data;
            let from = (start.min(data.len() as u64)) as usize;
            let to = (start.saturating_add(len).min(data.len() as u64)) as usize;
            data[from..to].to_vec()
        }))
    }

    /// A writer of a large identity-encoded object (a manifest of a million tasks), part by
    /// part, that holds about one part at a time; readers see nothing at `key` until it
    /// finishes, then the whole object. The default keeps the parts and puts them at the end;
    /// backends override it (a file renamed into place, an S3 multipart upload).
    async fn writer<'a>(&'a self, key: &str) -> Result<Box<dyn ObjectWriter + 'a>, StoreError> {
        check_key(key)?;
        Ok(Box::new(Buffered {
            store: self,
            key: key.to_string(),
            data: Vec::new(),
        }))
    }

    /// Removes the object in every encoding; removing a missing object is not an error.
    async fn delete(&self, key: &str) -> Result<(), StoreError>;

    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        Ok(self.get(key).await?.is_some())
    }
}

/// An object being written part by part ([`Store::writer`]).
#[async_trait]
pub trait ObjectWriter: Send {
    /// Appends bytes.
    async fn write(&mut self, bytes: &[u8]) -> Result<(), StoreError>;
    /// Makes the object whole and visible.
    async fn finish(self: Box<Self>) -> Result<(), StoreError>;
}

/// [`Store::writer`]'s default: the parts kept, put whole at the end.
struct Buffered<'a, S: Store + ?Sized> {
    store: &'a S,
    key: String,
    data: Vec<u8>,
}

#[async_trait]
impl<S: Store + ?Sized> ObjectWriter for Buffered<'_, S> {
    async fn write(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        self.data.extend_from_slice(bytes);
        Ok(())
    }

    async fn finish(self: Box<Self>) -> Result<(), StoreError> {
        self.store
            .put(&self.key, self.data, ContentEncoding::Identity)
            .await
    }
}

/// Rejects keys that could escape the store's root or name nothing.
pub fn check_key(key: &str) -> Result<(), StoreError> {
    let bad = |reason| {
        Err(StoreError::InvalidKey {
            key: key.to_string(),
            reason,
        })
    };
    if key.is_empty() {
        return bad("empty");
    }
    if key.starts_with('/') {
        return bad("absolute");
    }
    if key
        .split('/')
        .any(|part| part.is_empty() || part == "." || part == "..")
    {
        return bad("empty, '.' or '..' path component");
    }
    Ok(())
}
