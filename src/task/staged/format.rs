//! The intermediate objects' container and encodings: the 64-byte header, the gzip payload, the
//! store wrapper that reads and checks them ([`Staging`]), varints and the checked [`Reader`].

use super::{rounds, StagedError, STAGING};
use crate::formats::precomputed::{gunzip, gzip};
use crate::store::{ContentEncoding, Store};
use crate::task::segment::SegmentError;
use md5::{Digest, Md5};
use std::sync::Arc;

/// The kinds of intermediate object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Labels = 1,
    Summary = 2,
    Done = 4,
    Fragments = 6,
    Edges = 7,
    Left = 9,
    Border = 10,
    Links = 11,
    Up = 12,
    Map = 13,
    Final = 14,
    Components = 15,
    Rows = 16,
    Prefix = 17,
    Total = 18,
    Ranks = 19,
    Plateaus = 20,
    Finals = 21,
    FaceFragments = 22,
    RoundMap = 23,
}

impl Kind {
    pub(super) fn suffix(self) -> &'static str {
        match self {
            Kind::Labels => "labels",
            Kind::Summary => "summary",
            Kind::Done => "done",
            Kind::Fragments => "fragments",
            Kind::Edges => "edges",
            Kind::Left => "left",
            Kind::Border => "border",
            Kind::Links => "links",
            Kind::Up => "up",
            Kind::Map => "map",
            Kind::Final => "final",
            Kind::Components => "components",
            Kind::Rows => "rows",
            Kind::Prefix => "prefix",
            Kind::Total => "total",
            Kind::Ranks => "ranks",
            Kind::Plateaus => "plateaus",
            Kind::Finals => "finals",
            Kind::FaceFragments => "face-fragments",
            Kind::RoundMap => "map",
        }
    }

    /// The object's name before its suffix, from its index: a block's (`block-<i>`), a merge
    /// round's group (`round-<level>-<group>`, indexed by [`rounds::round_index`]), a union
    /// level's group (`union-<level>-<group>`, the same index), or a numbering scan's
    /// (`scan-<axis>-<level>-<line>-<part>`, indexed by [`scan_index`]).
    fn stem(self, index: usize) -> String {
        match self {
            Kind::Left | Kind::Finals | Kind::RoundMap => {
                let (level, group) = rounds::level_and_group(index);
                format!("round-{level}-{group}")
            }
            Kind::Up | Kind::Map | Kind::Final => {
                let (level, group) = rounds::level_and_group(index);
                format!("union-{level}-{group}")
            }
            Kind::Prefix | Kind::Total => {
                let (axis, level, line, part) = scan_parts(index);
                format!("scan-{}-{level}-{line}-{part}", ["x", "y", "z"][axis])
            }
            _ => format!("block-{index}"),
        }
    }
}

/// The index of a numbering scan's object: its axis (0, 1, 2), level, line and part (the child
/// a prefix belongs to, or the segment a total sums), packed into 64 bits.
pub(super) fn scan_index(axis: usize, level: u32, line: usize, part: usize) -> usize {
    assert!(axis < 3 && level < 64 && line < 1 << 30 && part < 1 << 26);
    (axis << 62) | ((level as usize) << 56) | (line << 26) | part
}

fn scan_parts(index: usize) -> (usize, usize, usize, usize) {
    (
        index >> 62,
        (index >> 56) & 63,
        (index >> 26) & ((1 << 30) - 1),
        index & ((1 << 26) - 1),
    )
}

pub(super) const MAGIC: &[u8; 8] = b"CUBOIDS\0";
pub(super) const VERSION: u32 = 4;
pub(super) const HEADER: usize = 64;
/// The largest payload a header may claim (a block of 2^31 voxels' labels is 8 GiB).
pub(super) const MAX_PAYLOAD: u64 = 1 << 36;

pub(super) fn plan_bytes(id: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = id
            .get(2 * i..2 * i + 2)
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .unwrap_or(0);
    }
    out
}

pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Intermediates a merge fetches at once: enough to hide S3 round trips, few enough that the
/// objects held while waiting for the slowest stay small.
pub(super) const READ_CONCURRENCY: usize = 4;

/// The intermediates of one plan in the output store.
pub(super) struct Staging {
    pub(super) store: Arc<dyn Store>,
    pub(super) plan: String,
}

impl Staging {
    pub(super) fn key(&self, kind: Kind, index: usize) -> String {
        format!(
            "{STAGING}/{}/{}.{}",
            self.plan,
            kind.stem(index),
            kind.suffix()
        )
    }

    /// Stores an intermediate: the header, then the payload gzipped on a blocking thread (a
    /// block's labels take tens of milliseconds, which would stall the async workers).
    pub(super) async fn put(
        &self,
        kind: Kind,
        block: usize,
        payload: Vec<u8>,
    ) -> Result<(), StagedError> {
        let sealed = self.seal(kind, block, payload).await?;
        self.store(kind, block, sealed).await
    }

    /// An intermediate's bytes, compressed and checksummed on a blocking thread.
    pub(super) async fn seal(
        &self,
        kind: Kind,
        block: usize,
        payload: Vec<u8>,
    ) -> Result<Vec<u8>, StagedError> {
        let plan = plan_bytes(&self.plan);
        Ok(
            tokio::task::spawn_blocking(move || seal(kind, block, plan, &payload))
                .await
                .map_err(SegmentError::from)?,
        )
    }

    /// Writes a sealed intermediate.
    pub(super) async fn store(
        &self,
        kind: Kind,
        block: usize,
        data: Vec<u8>,
    ) -> Result<(), StagedError> {
        let key = self.key(kind, block);
        self.store
            .put(&key, data, ContentEncoding::Identity)
            .await
            .map_err(|source| StagedError::Store {
                key,
                source: Box::new(source),
            })
    }

    /// Reads an intermediate and checks it (on a blocking thread: checksum and gunzip).
    pub(super) async fn get(&self, kind: Kind, block: usize) -> Result<Vec<u8>, StagedError> {
        let key = self.key(kind, block);
        let object = self
            .store
            .get(&key)
            .await
            .map_err(|source| StagedError::Store {
                key: key.clone(),
                source: Box::new(source),
            })?
            .ok_or_else(|| StagedError::Missing { key: key.clone() })?;
        let plan = self.plan.clone();
        tokio::task::spawn_blocking(move || decode(&key, &object.data, kind, block, &plan))
            .await
            .map_err(SegmentError::from)?
    }
}

/// An intermediate's bytes: header (magic, version, kind, plan, block, payload length, MD5 of
/// the body), then the body, the payload gzipped.
pub(super) fn seal(kind: Kind, block: usize, plan: [u8; 16], payload: &[u8]) -> Vec<u8> {
    // Level 1: labels compress well at any level, and the stages should not wait on it.
    let body = gzip(payload, 1);
    let mut data = Vec::with_capacity(HEADER + body.len());
    data.extend_from_slice(MAGIC);
    data.extend_from_slice(&VERSION.to_le_bytes());
    data.extend_from_slice(&(kind as u32).to_le_bytes());
    data.extend_from_slice(&plan);
    data.extend_from_slice(&(block as u64).to_le_bytes());
    data.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    data.extend_from_slice(&Md5::digest(&body));
    data.extend_from_slice(&body);
    data
}

/// Checks an intermediate's header and returns its payload.
pub(super) fn decode(
    key: &str,
    data: &[u8],
    kind: Kind,
    block: usize,
    plan: &str,
) -> Result<Vec<u8>, StagedError> {
    let corrupt = |why: String| StagedError::Corrupt {
        key: key.to_string(),
        why,
    };
    if data.len() < HEADER || &data[..8] != MAGIC {
        return Err(corrupt(format!(
            "{} bytes without a cuboids header",
            data.len()
        )));
    }
    let word = |at: usize| u32::from_le_bytes(data[at..at + 4].try_into().expect("4 bytes"));
    let long = |at: usize| u64::from_le_bytes(data[at..at + 8].try_into().expect("8 bytes"));
    if word(8) != VERSION {
        return Err(corrupt(format!(
            "format version {} (expected {VERSION})",
            word(8)
        )));
    }
    if word(12) != kind as u32 {
        return Err(corrupt(format!(
            "kind {} (expected {})",
            word(12),
            kind as u32
        )));
    }
    if data[16..32] != plan_bytes(plan) {
        return Err(StagedError::OtherPlan {
            key: key.to_string(),
            found: hex(&data[16..32]),
            expected: plan.to_string(),
        });
    }
    if long(32) != block as u64 {
        return Err(corrupt(format!(
            "written as object {} (expected {block}): another object's bytes",
            long(32)
        )));
    }
    let length = long(40);
    if length > MAX_PAYLOAD {
        return Err(corrupt(format!("claims a payload of {length} bytes")));
    }
    let body = &data[HEADER..];
    if Md5::digest(body)[..] != data[48..64] {
        return Err(corrupt("checksum mismatch (truncated or altered)".into()));
    }
    let payload = gunzip(body, length as usize).map_err(|e| corrupt(format!("gzip: {e}")))?;
    if payload.len() as u64 != length {
        return Err(corrupt(format!(
            "payload of {} bytes, header says {length}",
            payload.len()
        )));
    }
    Ok(payload)
}

/// Appends `v` as a zigzag varint: (v << 1) ^ (v >> 63), small for small values of either sign.
pub(super) fn put_zigzag(out: &mut Vec<u8>, v: i64) {
    put_varint(out, ((v << 1) ^ (v >> 63)) as u64);
}

/// Appends sorted values as varint increases from 0.
pub(super) fn put_increases(out: &mut Vec<u8>, values: impl Iterator<Item = u64>) {
    let mut last = 0;
    for v in values {
        put_varint(out, v - last);
        last = v;
    }
}

/// Appends `v` as an LEB128 varint (7 bits a byte, low first).
pub(super) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A block's labels payload: its (label, run length) pairs as varints (most labels and runs
/// fit a byte or two, and gzip then has a third of the bytes to compress).
pub(super) fn encode_runs(runs: &[u32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(runs.len() * 2);
    for &w in runs {
        put_varint(&mut out, w as u64);
    }
    out
}

/// The (label, run length) words of a labels payload. A tight loop rather than the checked
/// [`Reader`]: a segment block has millions of runs.
pub(super) fn decode_runs(key: &str, bytes: &[u8]) -> Result<Vec<u32>, StagedError> {
    let corrupt = |why: String| StagedError::Corrupt {
        key: key.to_string(),
        why,
    };
    let mut words = Vec::with_capacity(bytes.len() / 2);
    let mut word = 0u64;
    let mut shift = 0;
    for &byte in bytes {
        word |= ((byte & 0x7f) as u64) << shift;
        if byte < 0x80 {
            words.push(
                u32::try_from(word)
                    .map_err(|_| corrupt(format!("run word {word} past 32 bits")))?,
            );
            word = 0;
            shift = 0;
        } else {
            shift += 7;
            if shift > 28 {
                return Err(corrupt("a run word past 32 bits".into()));
            }
        }
    }
    if shift != 0 {
        return Err(corrupt("the last run word is cut off".into()));
    }
    Ok(words)
}

/// Reads little-endian fields, failing with the object's key where they run out.
pub(super) struct Reader<'a> {
    pub(super) bytes: &'a [u8],
    pub(super) at: usize,
    pub(super) key: &'a str,
}

impl Reader<'_> {
    pub(super) fn corrupt(&self, why: String) -> StagedError {
        StagedError::Corrupt {
            key: self.key.to_string(),
            why,
        }
    }

    pub(super) fn check(&self, n: usize) -> Result<(), StagedError> {
        if self.bytes.len() - self.at < n {
            return Err(self.corrupt(format!("ends at byte {} of a summary", self.bytes.len())));
        }
        Ok(())
    }

    pub(super) fn take<const N: usize>(&mut self) -> Result<[u8; N], StagedError> {
        self.check(N)?;
        let out = self.bytes[self.at..self.at + N]
            .try_into()
            .expect("N bytes");
        self.at += N;
        Ok(out)
    }

    pub(super) fn u32(&mut self) -> Result<u32, StagedError> {
        Ok(u32::from_le_bytes(self.take()?))
    }

    pub(super) fn u64(&mut self) -> Result<u64, StagedError> {
        Ok(u64::from_le_bytes(self.take()?))
    }

    /// A count of entries of two varints each. Every varint takes a byte at least, so a count
    /// past what the bytes left can hold is corrupt, not a reason to allocate.
    pub(super) fn count_of_pairs(&mut self) -> Result<u64, StagedError> {
        self.count_of(2)
    }

    /// A count of entries of `varints` varints each (see [`Reader::count_of_pairs`]).
    pub(super) fn count_of(&mut self, varints: usize) -> Result<u64, StagedError> {
        let n = self.varint()?;
        self.check(
            usize::try_from(n)
                .unwrap_or(usize::MAX)
                .saturating_mul(varints),
        )?;
        Ok(n)
    }

    /// A zigzag varint ([`put_zigzag`]).
    pub(super) fn zigzag(&mut self) -> Result<i64, StagedError> {
        let z = self.varint()?;
        Ok(((z >> 1) as i64) ^ -((z & 1) as i64))
    }

    /// `n` values stored as increases ([`put_increases`]).
    pub(super) fn increases(&mut self, n: u64) -> Result<Vec<u64>, StagedError> {
        let mut out = Vec::with_capacity(n.min(self.bytes.len() as u64) as usize);
        let mut last = 0u64;
        for _ in 0..n {
            last = last
                .checked_add(self.varint()?)
                .ok_or_else(|| self.corrupt("values past 2^64".into()))?;
            out.push(last);
        }
        Ok(out)
    }

    /// Fails unless every byte was read (`what`: the payload's name, for the message).
    pub(super) fn finish(&self, what: &str) -> Result<(), StagedError> {
        if self.at != self.bytes.len() {
            return Err(self.corrupt(format!(
                "{} bytes after the {what}",
                self.bytes.len() - self.at
            )));
        }
        Ok(())
    }

    /// An LEB128 varint of at most 64 bits.
    pub(super) fn varint(&mut self) -> Result<u64, StagedError> {
        let mut v = 0u64;
        let mut shift = 0;
        loop {
            let Some(&byte) = self.bytes.get(self.at) else {
                return Err(self.corrupt(format!("ends at byte {} of a summary", self.bytes.len())));
            };
            self.at += 1;
            v |= ((byte & 0x7f) as u64) << shift;
            if byte < 0x80 && (shift < 63 || byte <= 1) {
                return Ok(v);
            }
            shift += 7;
            if shift > 63 {
                return Err(self.corrupt(format!("a varint past 64 bits at byte {}", self.at)));
            }
        }
    }
}
