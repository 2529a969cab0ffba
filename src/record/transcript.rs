//! The transcript format: timed chunks, framed into batches, compressed with zstd
//! unless that would not pay.
//!
//! A batch is the concatenation of frames `offset_us: u64 BE | stream: u8 |
//! len: u32 BE | data`, stored either as one zstd frame or, when its data does not
//! compress (encrypted archives, compressed tarballs, git packs piped through `ssh`),
//! as it is behind a single [`RAW_TAG`] byte. A zstd frame never starts with that
//! byte (its magic number is `28 b5 2f fd`, a skippable frame's `5? 2a 4d 18`), so
//! batches written before raw storage existed read as they always did. The
//! transcript digest is the SHA-256 of the stored batches in order: it proves the
//! stored bytes are unchanged, and verifying it needs no decompression.

use std::borrow::Cow;
use std::cell::RefCell;
use std::io::Write;

use bytes::{Buf, Bytes};
use sha2::{Digest, Sha256};
use thiserror::Error;

/// zstd level: the fastest, so recording stays cheap next to the relay's own
/// encryption; terminal output still compresses about eightfold.
const ZSTD_LEVEL: i32 = 1;

/// Recorded bytes (framed) past which a group of compressible runs is closed and
/// the next run starts a new stored batch: what one batch decodes to is bounded
/// for every reader (`export`, `watch`, recovery), whatever a flush held.
const GROUP_BYTES: usize = 1024 * 1024;

/// Largest batch accepted when decompressing (a batch holds at most one group of
/// [`GROUP_BYTES`] plus a run, or one chunk).
const MAX_BATCH: usize = 64 * 1024 * 1024;

const FRAME_HEADER: usize = 8 + 1 + 4;

/// First byte of a batch stored uncompressed.
const RAW_TAG: u8 = 0;

/// Bytes of a batch's data compressed on trial to decide whether the whole batch is
/// worth compressing: enough for zstd to find repetition in terminal output, cheap
/// next to compressing (or failing to compress) a whole batch.
const SAMPLE: usize = 16 * 1024;

/// A batch is compressed only if its sample shrinks to at most this fraction (in
/// percent): below a 10 % gain, zstd costs CPU on every write and every read for
/// almost no space.
const WORTH_COMPRESSING_PERCENT: usize = 90;

/// Where a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
    Stdin,
    /// A terminal resize; the data is `COLSxROWS`.
    Resize,
}

impl Stream {
    fn code(self) -> u8 {
        match self {
            Stream::Stdout => 0,
            Stream::Stderr => 1,
            Stream::Stdin => 2,
            Stream::Resize => 3,
        }
    }

    fn from_code(code: u8) -> Option<Stream> {
        Some(match code {
            0 => Stream::Stdout,
            1 => Stream::Stderr,
            2 => Stream::Stdin,
            3 => Stream::Resize,
            _ => return None,
        })
    }

    /// Output the user saw (stdout and stderr).
    pub fn is_output(self) -> bool {
        matches!(self, Stream::Stdout | Stream::Stderr)
    }
}

/// One piece of a transcript.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Microseconds since the session started (monotonic clock).
    pub offset_us: u64,
    pub stream: Stream,
    pub data: Bytes,
}

#[derive(Debug, Error)]
pub enum TranscriptError {
    #[error("damaged transcript batch: {0}")]
    Damaged(String),
}

/// Splits an uncompressed batch back into chunks.
pub fn decode(batch: &[u8]) -> Result<Vec<Chunk>, TranscriptError> {
    let mut buf = Bytes::copy_from_slice(batch);
    let mut chunks = Vec::new();
    while buf.has_remaining() {
        if buf.remaining() < FRAME_HEADER {
            return Err(TranscriptError::Damaged("truncated frame header".into()));
        }
        let offset_us = buf.get_u64();
        let code = buf.get_u8();
        let len = buf.get_u32() as usize;
        let stream = Stream::from_code(code)
            .ok_or_else(|| TranscriptError::Damaged(format!("unknown stream {code}")))?;
        if buf.remaining() < len {
            return Err(TranscriptError::Damaged("truncated frame".into()));
        }
        chunks.push(Chunk {
            offset_us,
            stream,
            data: buf.split_to(len),
        });
    }
    Ok(chunks)
}

/// The stored batches of one flush, cut into `runs` (in order): each run is
/// judged on a sample of its data, a run that does not compress is framed as it
/// is behind [`RAW_TAG`], and consecutive runs that do are compressed together as
/// one batch. Either way each byte is copied once. Terminal
/// output then takes one stored batch per flush rather than one per run: fewer
/// writes (on PostgreSQL, rows) and a better ratio, while incompressible data
/// is still never run through zstd.
pub fn encode_runs<'a>(runs: impl IntoIterator<Item = &'a [Chunk]>) -> Vec<Vec<u8>> {
    let mut batches = Vec::new();
    let mut compressible: Vec<&[Chunk]> = Vec::new();
    let mut grouped = 0;
    for run in runs {
        if worth_compressing(run) {
            if grouped >= GROUP_BYTES {
                batches.push(compress_runs(&compressible));
                compressible.clear();
                grouped = 0;
            }
            grouped += framed_size(run);
            compressible.push(run);
            continue;
        }
        if !compressible.is_empty() {
            batches.push(compress_runs(&compressible));
            compressible.clear();
            grouped = 0;
        }
        batches.push(raw_chunks(run));
    }
    if !compressible.is_empty() {
        batches.push(compress_runs(&compressible));
    }
    batches
}

thread_local! {
    /// The zstd context that compresses samples on this thread. A fresh context per
    /// sample (allocated, its tables zeroed) cost the bastion about as much CPU as
    /// compressing the sample itself.
    static SAMPLER: RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { RefCell::new(None) };
}

/// Whether zstd shrinks the first [`SAMPLE`] bytes of the batch's data enough.
fn worth_compressing(chunks: &[Chunk]) -> bool {
    let sample: Cow<[u8]> = match chunks.first() {
        Some(chunk) if chunk.data.len() >= SAMPLE => Cow::Borrowed(&chunk.data[..SAMPLE]),
        _ => {
            let mut sample = Vec::with_capacity(SAMPLE);
            for chunk in chunks {
                let take = (SAMPLE - sample.len()).min(chunk.data.len());
                sample.extend_from_slice(&chunk.data[..take]);
                if sample.len() == SAMPLE {
                    break;
                }
            }
            Cow::Owned(sample)
        }
    };
    if sample.len() < 256 {
        // Keystrokes and prompts: too little to gain anything, and a zstd context
        // for each of them (hundreds of idle sessions flush every second) costs
        // the bastion CPU its relay needs.
        return false;
    }
    SAMPLER.with_borrow_mut(|sampler| {
        if sampler.is_none() {
            *sampler = zstd::bulk::Compressor::new(ZSTD_LEVEL).ok();
        }
        match sampler.as_mut().map(|zstd| zstd.compress(&sample)) {
            Some(Ok(compressed)) => {
                compressed.len() * 100 <= sample.len() * WORTH_COMPRESSING_PERCENT
            }
            _ => false,
        }
    })
}

/// Bytes `chunks` take framed, uncompressed.
fn framed_size(chunks: &[Chunk]) -> usize {
    chunks.iter().map(|c| FRAME_HEADER + c.data.len()).sum()
}

/// Frames `chunks` behind [`RAW_TAG`], uncompressed.
fn raw_chunks(chunks: &[Chunk]) -> Vec<u8> {
    let size = framed_size(chunks);
    let mut out = Vec::with_capacity(1 + size);
    out.push(RAW_TAG);
    for chunk in chunks {
        out.extend_from_slice(&frame_header(chunk));
        out.extend_from_slice(&chunk.data);
    }
    out
}

fn frame_header(chunk: &Chunk) -> [u8; FRAME_HEADER] {
    let mut header = [0u8; FRAME_HEADER];
    header[..8].copy_from_slice(&chunk.offset_us.to_be_bytes());
    header[8] = chunk.stream.code();
    header[9..].copy_from_slice(&(chunk.data.len() as u32).to_be_bytes());
    header
}

/// Frames and compresses the chunks of `runs`, in order, as one batch, in one
/// pass, without first copying them into one contiguous batch.
fn compress_runs(runs: &[&[Chunk]]) -> Vec<u8> {
    let chunks = || runs.iter().flat_map(|run| run.iter());
    let size: usize = runs.iter().map(|run| framed_size(run)).sum();
    let mut encoder = zstd::stream::Encoder::new(Vec::with_capacity(size / 4), ZSTD_LEVEL)
        .expect("zstd encoder in memory");
    encoder
        .set_pledged_src_size(Some(size as u64))
        .expect("pledged size before writing");
    for chunk in chunks() {
        encoder
            .write_all(&frame_header(chunk))
            .expect("writing to memory");
        encoder.write_all(&chunk.data).expect("writing to memory");
    }
    encoder.finish().expect("zstd compression in memory")
}

/// The framed batch from its stored form (raw or zstd).
pub fn decompress(stored: &[u8]) -> Result<Vec<u8>, TranscriptError> {
    if let Some((&RAW_TAG, framed)) = stored.split_first() {
        return Ok(framed.to_vec());
    }
    zstd::bulk::decompress(stored, MAX_BATCH)
        .map_err(|err| TranscriptError::Damaged(format!("zstd: {err}")))
}

/// The running SHA-256 over a transcript's stored batches.
#[derive(Clone, Default)]
pub struct TranscriptDigest(Sha256);

impl TranscriptDigest {
    pub fn update(&mut self, batch: &[u8]) {
        self.0.update(batch);
    }

    pub fn hex(&self) -> String {
        hex::encode(self.0.clone().finalize())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{BufMut, BytesMut};

    /// The uncompressed batch, framed the straightforward way.
    fn encode(chunks: &[Chunk]) -> Vec<u8> {
        let size = chunks.iter().map(|c| FRAME_HEADER + c.data.len()).sum();
        let mut out = BytesMut::with_capacity(size);
        for chunk in chunks {
            out.put_u64(chunk.offset_us);
            out.put_u8(chunk.stream.code());
            out.put_u32(chunk.data.len() as u32);
            out.put_slice(&chunk.data);
        }
        out.to_vec()
    }

    /// One run stored as one batch.
    fn encode_stored(chunks: &[Chunk]) -> Vec<u8> {
        let mut batches = encode_runs([chunks]);
        assert_eq!(batches.len(), 1);
        batches.pop().unwrap()
    }

    fn compress_chunks(chunks: &[Chunk]) -> Vec<u8> {
        compress_runs(&[chunks])
    }

    fn decoded(batches: &[Vec<u8>]) -> Vec<Chunk> {
        batches
            .iter()
            .flat_map(|b| decode(&decompress(b).unwrap()).unwrap())
            .collect()
    }

    /// Consecutive runs that compress become one batch; one that does not stays
    /// a batch of its own, raw; the order is kept.
    #[test]
    fn compressible_runs_are_stored_together() {
        let text = || stdout(Bytes::from("$ ls -l\r\ntotal 0\r\n".repeat(1000)));
        let chunks = vec![text(), text(), stdout(random(20_000)), text()];
        let runs: Vec<&[Chunk]> = chunks.chunks(1).collect();
        let batches = encode_runs(runs);
        assert_eq!(batches.len(), 3);
        assert_ne!(batches[0][0], RAW_TAG);
        assert_eq!(batches[1][0], RAW_TAG);
        assert_ne!(batches[2][0], RAW_TAG);
        assert_eq!(decoded(&batches), chunks);
    }

    /// A flush of compressible output is cut into batches that each decode to
    /// about [`GROUP_BYTES`] at most.
    #[test]
    fn compressible_groups_are_capped() {
        let line = Bytes::from("$ ls -l\r\ntotal 0\r\n".repeat(3000));
        let chunks: Vec<Chunk> = (0..100).map(|_| stdout(line.clone())).collect();
        let runs: Vec<&[Chunk]> = chunks.chunks(1).collect();
        let batches = encode_runs(runs);
        assert!(batches.len() > 1, "{} batches", batches.len());
        for batch in &batches {
            let framed = decompress(batch).unwrap().len();
            assert!(
                framed <= GROUP_BYTES + FRAME_HEADER + line.len(),
                "{framed}"
            );
        }
        assert_eq!(decoded(&batches), chunks);
    }

    #[test]
    fn batches_round_trip() {
        let chunks = vec![
            Chunk {
                offset_us: 0,
                stream: Stream::Stdout,
                data: Bytes::from_static(b"hello\r\n"),
            },
            Chunk {
                offset_us: 1_500_000,
                stream: Stream::Resize,
                data: Bytes::from_static(b"100x30"),
            },
            Chunk {
                offset_us: u64::MAX,
                stream: Stream::Stdin,
                data: Bytes::new(),
            },
        ];
        let batch = encode(&chunks);
        let stored = compress_chunks(&chunks);
        assert_eq!(decompress(&stored).unwrap(), batch);
        assert_eq!(decode(&decompress(&stored).unwrap()).unwrap(), chunks);
        assert!(decode(&batch[..batch.len() - 1]).is_err());
        assert!(decompress(b"not zstd").is_err());
    }

    fn random(n: usize) -> Bytes {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    fn stdout(data: Bytes) -> Chunk {
        Chunk {
            offset_us: 7,
            stream: Stream::Stdout,
            data,
        }
    }

    #[test]
    fn incompressible_batches_are_stored_as_they_are() {
        let chunks = vec![stdout(random(40_000)), stdout(random(30_000))];
        let stored = encode_stored(&chunks);
        assert_eq!(stored[0], RAW_TAG);
        assert_eq!(
            stored.len(),
            1 + encode(&chunks).len(),
            "one tag byte, no more"
        );
        assert_eq!(decode(&decompress(&stored).unwrap()).unwrap(), chunks);
    }

    #[test]
    fn terminal_output_is_still_compressed() {
        let listing = "drwxr-xr-x 2 root root 4096 Jan  1 00:00 bin\r\n".repeat(2000);
        let chunks = vec![stdout(Bytes::from(listing))];
        let stored = encode_stored(&chunks);
        assert_ne!(stored[0], RAW_TAG);
        assert!(
            stored.len() * 20 < encode(&chunks).len(),
            "{}",
            stored.len()
        );
        assert_eq!(decode(&decompress(&stored).unwrap()).unwrap(), chunks);
    }

    #[test]
    fn batches_stored_before_raw_storage_still_read() {
        // What the previous version wrote for every batch: one zstd frame.
        let chunks = vec![stdout(random(20_000))];
        let old = compress_chunks(&chunks);
        assert_eq!(decode(&decompress(&old).unwrap()).unwrap(), chunks);
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_decode_or_fail_cleanly(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = decode(&bytes);
            let _ = decompress(&bytes);
        }

        #[test]
        fn chunks_round_trip(chunks in proptest::collection::vec(
            (proptest::num::u64::ANY, 0u8..4, proptest::collection::vec(proptest::num::u8::ANY, 0..64)),
            0..20,
        )) {
            let chunks: Vec<Chunk> = chunks
                .into_iter()
                .map(|(offset_us, code, data)| Chunk {
                    offset_us,
                    stream: Stream::from_code(code).unwrap(),
                    data: Bytes::from(data),
                })
                .collect();
            let stored = encode_stored(&chunks);
            proptest::prop_assert_eq!(decode(&decompress(&stored).unwrap()).unwrap(), chunks.clone());
            let stored = compress_chunks(&chunks);
            proptest::prop_assert_eq!(decode(&decompress(&stored).unwrap()).unwrap(), chunks.clone());
            let runs: Vec<&[Chunk]> = chunks.chunks(3).collect();
            proptest::prop_assert_eq!(decoded(&encode_runs(runs)), chunks);
        }
    }
}
