//! S3 (and S3-compatible servers). Configuration comes from the standard AWS environment:
//! credentials, `AWS_REGION`, and `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` for other servers
//! (which then get path-style addressing). Gzipped objects carry `Content-Encoding: gzip`, as
//! CloudVolume writes them. Throttling and 5xx answers are retried with exponential backoff by the
//! SDK's standard retry mode; requests in flight are bounded by a semaphore.

use super::{check_key, ContentEncoding, Object, Store, StoreError};
use async_trait::async_trait;
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata};
use aws_sdk_s3::primitives::ByteStream;
use std::sync::Arc;
use tokio::sync::Semaphore;

/// Requests in flight per store.
const MAX_IN_FLIGHT: usize = 64;

/// The size of a multipart upload's parts (S3's least is 5 MiB, but for the last).
const PART_BYTES: usize = 8 << 20;

pub struct S3Store {
    client: aws_sdk_s3::Client,
    bucket: String,
    prefix: String,
    permits: Arc<Semaphore>,
}

/// `s3://bucket/some/prefix` → ("bucket", "some/prefix").
pub fn parse_s3_url(location: &str) -> Result<(String, String), StoreError> {
    let bad = |reason| StoreError::Location {
        location: location.to_string(),
        reason,
    };
    let rest = location
        .strip_prefix("s3://")
        .ok_or(bad("not an s3:// URL"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(bad("no bucket"));
    }
    Ok((bucket.to_string(), prefix.trim_matches('/').to_string()))
}

impl S3Store {
    /// Connects with the standard AWS environment.
    pub async fn from_env(location: &str) -> Result<S3Store, StoreError> {
        let sdk = super::aws_env::sdk_config().await;
        S3Store::with_config(
            location,
            &sdk,
            super::aws_env::endpoint("AWS_ENDPOINT_URL_S3"),
        )
    }

    /// Connects with an explicit SDK configuration (tests, embedding programs).
    pub fn with_config(
        location: &str,
        sdk: &aws_config::SdkConfig,
        endpoint: Option<String>,
    ) -> Result<S3Store, StoreError> {
        let (bucket, prefix) = parse_s3_url(location)?;
        let mut config = aws_sdk_s3::config::Builder::from(sdk);
        if let Some(endpoint) = endpoint {
            config = config.endpoint_url(endpoint).force_path_style(true);
        }
        Ok(S3Store {
            client: aws_sdk_s3::Client::from_conf(config.build()),
            bucket,
            prefix,
            permits: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        })
    }

    fn object_key(&self, key: &str) -> Result<String, StoreError> {
        check_key(key)?;
        Ok(if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        })
    }

    /// A response body, whole (a connection that breaks mid-body is an error of `op` on `key`).
    async fn read_body(
        &self,
        body: ByteStream,
        op: &'static str,
        key: &str,
    ) -> Result<Vec<u8>, StoreError> {
        let bytes = body.collect().await.map_err(|e| StoreError::S3 {
            op,
            url: format!("s3://{}/{}", self.bucket, key),
            code: None,
            message: DisplayErrorContext(&e).to_string(),
            source: Box::new(e),
        })?;
        Ok(bytes.into_bytes().to_vec())
    }

    fn error(
        &self,
        op: &'static str,
        key: &str,
        e: impl std::error::Error + ProvideErrorMetadata + Send + Sync + 'static,
    ) -> StoreError {
        StoreError::S3 {
            op,
            url: format!("s3://{}/{}", self.bucket, key),
            code: e.code().map(str::to_string),
            message: DisplayErrorContext(&e).to_string(),
            source: Box::new(e),
        }
    }
}

#[async_trait]
impl Store for S3Store {
    fn location(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }

    async fn get(&self, key: &str) -> Result<Option<Object>, StoreError> {
        let key = self.object_key(key)?;
        let _permit = self.permits.acquire().await.expect("never closed");
        let out = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&key)
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => return Ok(None),
            Err(e) => return Err(self.error("GetObject", &key, e)),
        };
        let encoding = match out.content_encoding() {
            Some(enc) if enc.eq_ignore_ascii_case("gzip") => ContentEncoding::Gzip,
            _ => ContentEncoding::Identity,
        };
        let data = self.read_body(out.body, "GetObject (body)", &key).await?;
        Ok(Some(Object { data, encoding }))
    }

    async fn get_range(
        &self,
        key: &str,
        start: u64,
        len: u64,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        if len == 0 {
            return Ok(self.exists(key).await?.then(Vec::new));
        }
        let key = self.object_key(key)?;
        let _permit = self.permits.acquire().await.expect("never closed");
        let range = format!("bytes={start}-{}", start.saturating_add(len) - 1);
        let out = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&key)
            .range(range)
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => return Ok(None),
            // A range that starts past the end of the object.
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 416) => {
                return Ok(Some(Vec::new()))
            }
            Err(e) => return Err(self.error("GetObject (range)", &key, e)),
        };
        let data = self
            .read_body(out.body, "GetObject (range body)", &key)
            .await?;
        Ok(Some(data))
    }

    async fn put(
        &self,
        key: &str,
        data: Vec<u8>,
        encoding: ContentEncoding,
    ) -> Result<(), StoreError> {
        let key = self.object_key(key)?;
        let _permit = self.permits.acquire().await.expect("never closed");
        let mut req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(&key)
            .content_type("application/octet-stream")
            .body(ByteStream::from(data));
        if encoding == ContentEncoding::Gzip {
            req = req.content_encoding("gzip");
        }
        req.send()
            .await
            .map_err(|e| self.error("PutObject", &key, e))?;
        Ok(())
    }

    /// A multipart upload of parts of [`PART_BYTES`] (one PutObject for a smaller object),
    /// completed when finished and aborted when dropped before.
    async fn writer<'a>(
        &'a self,
        key: &str,
    ) -> Result<Box<dyn super::ObjectWriter + 'a>, StoreError> {
        Ok(Box::new(MultipartWriter {
            store: self,
            key: self.object_key(key)?,
            buffer: Vec::new(),
            upload: None,
            parts: Vec::new(),
        }))
    }

    /// A HEAD request: the object's bytes are not fetched.
    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        let key = self.object_key(key)?;
        let _permit = self.permits.acquire().await.expect("never closed");
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(&key)
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => Ok(false),
            Err(e) => Err(self.error("HeadObject", &key, e)),
        }
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let key = self.object_key(key)?;
        let _permit = self.permits.acquire().await.expect("never closed");
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(&key)
            .send()
            .await
            .map_err(|e| self.error("DeleteObject", &key, e))?;
        Ok(())
    }
}

/// An object written as a multipart upload ([`Store::writer`]).
struct MultipartWriter<'a> {
    store: &'a S3Store,
    key: String,
    buffer: Vec<u8>,
    /// The upload's id, once the first part is sent.
    upload: Option<String>,
    parts: Vec<aws_sdk_s3::types::CompletedPart>,
}

impl MultipartWriter<'_> {
    /// Sends the buffer as the next part, starting the upload before the first.
    async fn send_part(&mut self) -> Result<(), StoreError> {
        let (store, key) = (self.store, self.key.clone());
        if self.upload.is_none() {
            let _permit = store.permits.acquire().await.expect("never closed");
            let out = store
                .client
                .create_multipart_upload()
                .bucket(&store.bucket)
                .key(&key)
                .content_type("application/octet-stream")
                .send()
                .await
                .map_err(|e| store.error("CreateMultipartUpload", &key, e))?;
            self.upload = out.upload_id().map(str::to_string);
        }
        let number = self.parts.len() as i32 + 1;
        let _permit = store.permits.acquire().await.expect("never closed");
        let out = store
            .client
            .upload_part()
            .bucket(&store.bucket)
            .key(&key)
            .upload_id(self.upload.clone().unwrap_or_default())
            .part_number(number)
            .body(ByteStream::from(std::mem::take(&mut self.buffer)))
            .send()
            .await
            .map_err(|e| store.error("UploadPart", &key, e))?;
        self.parts.push(
            aws_sdk_s3::types::CompletedPart::builder()
                .part_number(number)
                .set_e_tag(out.e_tag().map(str::to_string))
                .build(),
        );
        Ok(())
    }
}

#[async_trait]
impl super::ObjectWriter for MultipartWriter<'_> {
    async fn write(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        self.buffer.extend_from_slice(bytes);
        if self.buffer.len() >= PART_BYTES {
            self.send_part().await?;
        }
        Ok(())
    }

    async fn finish(mut self: Box<Self>) -> Result<(), StoreError> {
        let (store, key) = (self.store, self.key.clone());
        if self.upload.is_none() {
            let _permit = store.permits.acquire().await.expect("never closed");
            store
                .client
                .put_object()
                .bucket(&store.bucket)
                .key(&key)
                .content_type("application/octet-stream")
                .body(ByteStream::from(std::mem::take(&mut self.buffer)))
                .send()
                .await
                .map_err(|e| store.error("PutObject", &key, e))?;
            return Ok(());
        }
        if !self.buffer.is_empty() {
            self.send_part().await?;
        }
        let _permit = store.permits.acquire().await.expect("never closed");
        let parts = aws_sdk_s3::types::CompletedMultipartUpload::builder()
            .set_parts(Some(std::mem::take(&mut self.parts)))
            .build();
        store
            .client
            .complete_multipart_upload()
            .bucket(&store.bucket)
            .key(&key)
            .upload_id(self.upload.take().unwrap_or_default())
            .multipart_upload(parts)
            .send()
            .await
            .map_err(|e| store.error("CompleteMultipartUpload", &key, e))?;
        Ok(())
    }
}

impl Drop for MultipartWriter<'_> {
    /// An upload dropped before it finished is aborted, so that its parts do not linger.
    fn drop(&mut self) {
        if let Some(upload) = self.upload.take() {
            let request = self
                .store
                .client
                .abort_multipart_upload()
                .bucket(&self.store.bucket)
                .key(&self.key)
                .upload_id(upload);
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move {
                    let _ = request.send().await;
                });
            }
        }
    }
}
