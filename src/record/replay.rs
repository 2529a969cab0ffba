//! Replay timing: a recording's output with its original pauses, idle gaps capped
//! so a session left open over lunch replays in seconds, scaled by `--speed`.

use std::time::Duration;

use bytes::Bytes;

use super::Chunk;

/// Longest pause replayed, before scaling by the speed.
pub const MAX_IDLE: Duration = Duration::from_secs(2);

/// Output chunks with the pause to wait before each; input too when `with_input`
/// (a session without a pty, whose output never echoes what was piped in).
pub fn schedule(chunks: &[Chunk], speed: f64, with_input: bool) -> Vec<(Duration, Bytes)> {
    let mut timing = Timing::default();
    timing.schedule(chunks, speed, with_input)
}

/// Replay timing carried from one batch to the next, so a replay reads one batch at
/// a time.
#[derive(Default)]
pub struct Timing {
    last_us: u64,
}

impl Timing {
    /// The chunks of one batch that are shown, each with the pause before it.
    pub fn schedule(
        &mut self,
        chunks: &[Chunk],
        speed: f64,
        with_input: bool,
    ) -> Vec<(Duration, Bytes)> {
        chunks
            .iter()
            .filter(|c| shown(c, with_input))
            .map(|chunk| {
                let gap = Duration::from_micros(chunk.offset_us.saturating_sub(self.last_us))
                    .min(MAX_IDLE);
                self.last_us = chunk.offset_us;
                (gap.div_f64(speed), chunk.data.clone())
            })
            .collect()
    }
}

/// Whether replay and watch show `chunk` to the auditor.
pub fn shown(chunk: &Chunk, with_input: bool) -> bool {
    chunk.stream.is_output() || (with_input && chunk.stream == super::Stream::Stdin)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Stream;

    fn chunk(offset_s: f64, stream: Stream, data: &'static str) -> Chunk {
        Chunk {
            offset_us: (offset_s * 1e6) as u64,
            stream,
            data: Bytes::from_static(data.as_bytes()),
        }
    }

    #[test]
    fn gaps_are_kept_capped_and_scaled() {
        let chunks = [
            chunk(0.5, Stream::Stdout, "a"),
            chunk(0.7, Stream::Stdin, "typed"),
            chunk(1.5, Stream::Stderr, "b"),
            chunk(601.5, Stream::Stdout, "c"),
        ];
        let plan = schedule(&chunks, 1.0, false);
        let gaps: Vec<Duration> = plan.iter().map(|(gap, _)| *gap).collect();
        assert_eq!(
            gaps,
            [Duration::from_millis(500), Duration::from_secs(1), MAX_IDLE]
        );
        assert_eq!(plan[1].1, Bytes::from_static(b"b"));
        let fast = schedule(&chunks, 4.0, false);
        assert_eq!(fast[2].0, Duration::from_millis(500));
        let piped = schedule(&chunks, 1.0, true);
        assert_eq!(piped.len(), 4);
        assert_eq!(piped[1].1, Bytes::from_static(b"typed"));
    }
}
