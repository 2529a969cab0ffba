//! Recording limits: how much one session and one user may record, and how much
//! free space the data directory keeps (`[recording]` in the config).
//!
//! Free space is read with `statvfs` (a system call, no I/O), at every session start
//! and once a second by the server's upkeep, which ends the largest live sessions
//! while the disk is below `min_free_disk`: sled must never be the one to find the
//! disk full, because its write errors are sticky until a restart.

use std::fmt;
use std::path::Path;

/// `[recording]` limits; `None` is unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordingLimits {
    /// Bytes one session may store (transcript as stored, after compression).
    pub session_quota: Option<u64>,
    /// Bytes the live sessions of one user may store together.
    pub user_quota: Option<u64>,
    /// Free bytes the data directory's file system keeps: below it, new sessions
    /// are refused and the largest live sessions are ended.
    pub min_free_disk: u64,
}

impl RecordingLimits {
    /// No quotas and no watermark (tests of other things).
    pub const UNLIMITED: RecordingLimits = RecordingLimits {
        session_quota: None,
        user_quota: None,
        min_free_disk: 0,
    };
}

impl Default for RecordingLimits {
    fn default() -> RecordingLimits {
        RecordingLimits {
            session_quota: Some(16 << 30),
            user_quota: Some(32 << 30),
            min_free_disk: 1 << 30,
        }
    }
}

/// Bytes available to the bastion (not to root) on the file system holding `path`.
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    let stat = rustix::fs::statvfs(path)?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// A byte count as operators write it in the config: `512MiB`, `2GiB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
        let mut value = self.0 as f64;
        let mut unit = 0;
        while value >= 1024.0 && unit < UNITS.len() - 1 {
            value /= 1024.0;
            unit += 1;
        }
        if unit == 0 || value.fract() == 0.0 {
            write!(f, "{value}{}", UNITS[unit])
        } else {
            write!(f, "{value:.1}{}", UNITS[unit])
        }
    }
}

/// Parses `123`, `64KiB`, `512MiB`, `2GiB`, `1TiB` (also `K`, `M`, `G`, `T`, all
/// powers of 1024).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size like 512MiB or 2GiB"))?;
    let shift = match unit.trim() {
        "" | "B" => 0,
        "K" | "KiB" => 10,
        "M" | "MiB" => 20,
        "G" | "GiB" => 30,
        "T" | "TiB" => 40,
        other => {
            return Err(format!(
                "unknown size unit {other:?}; use B, KiB, MiB, GiB or TiB"
            ))
        }
    };
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// A quota: a size, or `"none"` for unlimited.
pub fn parse_quota(text: &str) -> Result<Option<u64>, String> {
    if text.trim() == "none" {
        Ok(None)
    } else {
        parse_size(text).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_print_in_binary_units() {
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("2GB").is_err());
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert_eq!(parse_quota("none"), Ok(None));
        assert_eq!(Size(1 << 30).to_string(), "1GiB");
        assert_eq!(Size(1536 << 10).to_string(), "1.5MiB");
    }

    #[test]
    fn free_space_is_read_from_the_file_system() {
        let dir = tempfile::tempdir().unwrap();
        assert!(free_bytes(dir.path()).unwrap() > 0);
        assert!(free_bytes(&dir.path().join("missing")).is_err());
    }
}
