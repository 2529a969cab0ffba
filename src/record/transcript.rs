//! The transcript format: timed chunks, framed into batches, compressed with zstd.
//!
//! A batch is the concatenation of frames `offset_us: u64 BE | stream: u8 |
//! len: u32 BE | data`, compressed as one zstd frame. The transcript digest is the
//! SHA-256 of the stored (compressed) batches in order: it proves the stored bytes are
//! unchanged, costs a fraction of hashing the raw output, and verifying it needs no
//! decompression.

use std::io::Write;

use bytes::{Buf, Bytes};
use sha2::{Digest, Sha256};
use thiserror::Error;

/// zstd level: the fastest, so recording stays cheap next to the relay's own
/// encryption; terminal output still compresses about eightfold.
const ZSTD_LEVEL: i32 = 1;

/// Largest batch accepted when decompressing (a batch is flushed at ~1 MiB).
const MAX_BATCH: usize = 64 * 1024 * 1024;

const FRAME_HEADER: usize = 8 + 1 + 4;

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

/// Frames and compresses `chunks` in one pass, without first copying them into
/// one contiguous batch.
pub fn compress_chunks(chunks: &[Chunk]) -> Vec<u8> {
    let size: usize = chunks.iter().map(|c| FRAME_HEADER + c.data.len()).sum();
    let mut encoder = zstd::stream::Encoder::new(Vec::with_capacity(size / 4), ZSTD_LEVEL)
        .expect("zstd encoder in memory");
    encoder
        .set_pledged_src_size(Some(size as u64))
        .expect("pledged size before writing");
    for chunk in chunks {
        let mut header = [0u8; FRAME_HEADER];
        header[..8].copy_from_slice(&chunk.offset_us.to_be_bytes());
        header[8] = chunk.stream.code();
        header[9..].copy_from_slice(&(chunk.data.len() as u32).to_be_bytes());
        encoder.write_all(&header).expect("writing to memory");
        encoder.write_all(&chunk.data).expect("writing to memory");
    }
    encoder.finish().expect("zstd compression in memory")
}

pub fn decompress(stored: &[u8]) -> Result<Vec<u8>, TranscriptError> {
    zstd::bulk::decompress(stored, MAX_BATCH)
        .map_err(|err| TranscriptError::Damaged(format!("zstd: {err}")))
}

/// The running SHA-256 over a transcript's uncompressed batches.
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
            let stored = compress_chunks(&chunks);
            proptest::prop_assert_eq!(decode(&decompress(&stored).unwrap()).unwrap(), chunks);
        }
    }
}
