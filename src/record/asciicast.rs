//! Export to asciicast v2 (<https://docs.asciinema.org/manual/asciicast/v2/>): a
//! header line, then one `[seconds, code, data]` line per event: `"o"` for output,
//! `"i"` for input, `"r"` for a resize (`"COLSxROWS"`).

use serde_json::json;

use super::{Chunk, SessionRecord, Stream};

/// The whole recording as an asciicast v2 document (for tests and small tools;
/// `export` streams with [`Cast`]).
pub fn export(session: &SessionRecord, chunks: &[Chunk]) -> String {
    let mut cast = Cast::default();
    cast.header(session) + &cast.events(chunks)
}

/// An asciicast document written piece by piece: the header, then the events of
/// each batch as it is read, so an export holds one batch in memory.
#[derive(Default)]
pub struct Cast {
    /// Chunks may split a UTF-8 character; each stream carries its incomplete tail
    /// over to its next chunk.
    carry: [Vec<u8>; 3],
}

impl Cast {
    /// The header line.
    pub fn header(&self, session: &SessionRecord) -> String {
        let mut title = format!(
            "{}@{} by {} (session {}",
            session.login, session.target, session.user, session.id
        );
        if let Some(command) = &session.command {
            title.push_str(&format!(": {command}"));
        }
        title.push(')');
        let header = json!({
            "version": 2,
            "width": session.cols.max(1),
            "height": session.rows.max(1),
            "timestamp": session.started_at.timestamp(),
            "title": title,
            "env": { "TERM": session.term.clone().unwrap_or_else(|| "xterm".into()) },
        });
        format!("{header}\n")
    }

    /// One event line per chunk (fewer where a chunk holds only part of a character).
    pub fn events(&mut self, chunks: &[Chunk]) -> String {
        let mut out = String::new();
        for chunk in chunks {
            let (code, slot) = match chunk.stream {
                Stream::Stdout | Stream::Stderr => ("o", 0),
                Stream::Stdin => ("i", 1),
                Stream::Resize => ("r", 2),
            };
            let buffer = &mut self.carry[slot];
            buffer.extend_from_slice(&chunk.data);
            let text = take_complete_utf8(buffer);
            if text.is_empty() {
                continue;
            }
            let seconds = chunk.offset_us as f64 / 1e6;
            out.push_str(&json!([seconds, code, text]).to_string());
            out.push('\n');
        }
        out
    }
}

/// Removes and returns the longest prefix of `buffer` that is complete UTF-8
/// (invalid bytes become U+FFFD); an incomplete character at the end stays.
fn take_complete_utf8(buffer: &mut Vec<u8>) -> String {
    let keep = match std::str::from_utf8(buffer) {
        Ok(_) => 0,
        Err(err) if err.error_len().is_none() => buffer.len() - err.valid_up_to(),
        Err(_) => 0,
    };
    let rest = buffer.split_off(buffer.len() - keep);
    let text = String::from_utf8_lossy(buffer).into_owned();
    *buffer = rest;
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_characters_are_joined() {
        let mut buffer = "é".as_bytes()[..1].to_vec();
        assert_eq!(take_complete_utf8(&mut buffer), "");
        buffer.extend_from_slice(&"é".as_bytes()[1..]);
        buffer.extend_from_slice(b"x");
        assert_eq!(take_complete_utf8(&mut buffer), "éx");
        assert!(buffer.is_empty());
        let mut invalid = vec![b'a', 0xff, b'b'];
        assert_eq!(take_complete_utf8(&mut invalid), "a\u{fffd}b");
    }
}
