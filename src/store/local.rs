//! A directory on local disk. Gzipped objects are stored as `<key>.gz` (CloudVolume's convention);
//! writes go to a temporary file renamed into place, so a crash never leaves half an object.

use super::{check_key, ContentEncoding, Object, Store, StoreError};
use async_trait::async_trait;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

pub struct LocalStore {
    root: PathBuf,
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl LocalStore {
    pub fn new(root: impl Into<PathBuf>) -> LocalStore {
        LocalStore { root: root.into() }
    }

    fn path(&self, key: &str, encoding: ContentEncoding) -> Result<PathBuf, StoreError> {
        check_key(key)?;
        Ok(match encoding {
            ContentEncoding::Identity => self.root.join(key),
            ContentEncoding::Gzip => self.root.join(format!("{key}.gz")),
        })
    }
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A file written under a temporary name, renamed to the object's when finished (removed if
/// it never is).
struct FileWriter {
    file: tokio::io::BufWriter<tokio::fs::File>,
    temp: PathBuf,
    path: PathBuf,
    /// The gzip form of the same key, removed when this one is in place.
    other: PathBuf,
}

#[async_trait]
impl super::ObjectWriter for FileWriter {
    async fn write(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        use tokio::io::AsyncWriteExt;
        self.file
            .write_all(bytes)
            .await
            .map_err(io_error(&self.temp))
    }

    async fn finish(mut self: Box<Self>) -> Result<(), StoreError> {
        use tokio::io::AsyncWriteExt;
        self.file.flush().await.map_err(io_error(&self.temp))?;
        self.file
            .get_mut()
            .sync_all()
            .await
            .map_err(io_error(&self.temp))?;
        tokio::fs::rename(&self.temp, &self.path)
            .await
            .map_err(io_error(&self.path))?;
        let other = std::mem::take(&mut self.other);
        remove_if_exists(&other).await
    }
}

impl Drop for FileWriter {
    /// A writer dropped before it finished leaves no temporary file behind.
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.temp);
    }
}

async fn read_if_exists(path: &Path) -> Result<Option<Vec<u8>>, StoreError> {
    match tokio::fs::read(path).await {
        Ok(data) => Ok(Some(data)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error(path)(e)),
    }
}

/// A fresh temporary name beside `path` (its folder created): where an object is written
/// before it is renamed into place, so readers never see part of it.
async fn temp_beside(path: &Path) -> Result<PathBuf, StoreError> {
    let dir = path.parent().expect("keys are relative to the root");
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(io_error(dir))?;
    let name = path.file_name().expect("checked key").to_string_lossy();
    Ok(dir.join(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    )))
}

async fn remove_if_exists(path: &Path) -> Result<(), StoreError> {
    match tokio::fs::remove_file(path).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_error(path)(e)),
        _ => Ok(()),
    }
}

#[async_trait]
impl Store for LocalStore {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    async fn get(&self, key: &str) -> Result<Option<Object>, StoreError> {
        for encoding in [ContentEncoding::Identity, ContentEncoding::Gzip] {
            if let Some(data) = read_if_exists(&self.path(key, encoding)?).await? {
                return Ok(Some(Object { data, encoding }));
            }
        }
        Ok(None)
    }

    async fn get_range(
        &self,
        key: &str,
        start: u64,
        len: u64,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        let path = self.path(key, ContentEncoding::Identity)?;
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error(&path)(e)),
        };
        let size = file.metadata().await.map_err(io_error(&path))?.len();
        let to = start.saturating_add(len).min(size);
        if start >= to {
            return Ok(Some(Vec::new()));
        }
        file.seek(std::io::SeekFrom::Start(start))
            .await
            .map_err(io_error(&path))?;
        let mut data = vec![0; (to - start) as usize];
        file.read_exact(&mut data).await.map_err(io_error(&path))?;
        Ok(Some(data))
    }

    async fn put(
        &self,
        key: &str,
        data: Vec<u8>,
        encoding: ContentEncoding,
    ) -> Result<(), StoreError> {
        let path = self.path(key, encoding)?;
        let temp = temp_beside(&path).await?;
        tokio::fs::write(&temp, data)
            .await
            .map_err(io_error(&temp))?;
        if let Err(e) = tokio::fs::rename(&temp, &path).await {
            let _ = tokio::fs::remove_file(&temp).await;
            return Err(io_error(&path)(e));
        }
        // The other encoding of the same key would be ambiguous (and stale): remove it.
        let other = match encoding {
            ContentEncoding::Identity => ContentEncoding::Gzip,
            ContentEncoding::Gzip => ContentEncoding::Identity,
        };
        remove_if_exists(&self.path(key, other)?).await
    }

    /// A temporary file beside the object, renamed into place when finished.
    async fn writer<'a>(
        &'a self,
        key: &str,
    ) -> Result<Box<dyn super::ObjectWriter + 'a>, StoreError> {
        let path = self.path(key, ContentEncoding::Identity)?;
        let temp = temp_beside(&path).await?;
        let file = tokio::fs::File::create(&temp)
            .await
            .map_err(io_error(&temp))?;
        let other = self.path(key, ContentEncoding::Gzip)?;
        Ok(Box::new(FileWriter {
            file: tokio::io::BufWriter::new(file),
            temp,
            path,
            other,
        }))
    }

    /// Looks at metadata only: the chunk's bytes are not read. A directory is not an object.
    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        for encoding in [ContentEncoding::Identity, ContentEncoding::Gzip] {
            let path = self.path(key, encoding)?;
            match tokio::fs::metadata(&path).await {
                Ok(meta) if meta.is_file() => return Ok(true),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error(&path)(e)),
            }
        }
        Ok(false)
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        for encoding in [ContentEncoding::Identity, ContentEncoding::Gzip] {
            remove_if_exists(&self.path(key, encoding)?).await?;
        }
        // Directories only exist for the keys in them: prune the ones this leaves empty.
        let mut dir = self.path(key, ContentEncoding::Identity)?;
        while dir.pop() && dir.starts_with(&self.root) && dir != self.root {
            if tokio::fs::remove_dir(&dir).await.is_err() {
                break;
            }
        }
        Ok(())
    }
}
