//! Human durations as written in policies and on the command line: `90s`, `30m`, `8h`, `7d`,
//! or a sum of them such as `1h30m`.

use std::time::Duration;

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
#[error(
    "invalid duration {0:?}: write a number followed by s, m, h or d (for example 30m or 1h30m)"
)]
pub struct InvalidDuration(pub String);

/// Parses `1h30m`-style durations. Zero and overflowing values are refused.
pub fn parse(text: &str) -> Result<Duration, InvalidDuration> {
    let invalid = || InvalidDuration(text.to_string());
    let mut total: u64 = 0;
    let mut digits = String::new();
    for ch in text.trim().chars() {
        if ch.is_ascii_digit() {
            digits.push(ch);
            continue;
        }
        let unit = match ch {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            _ => return Err(invalid()),
        };
        let value: u64 = digits.parse().map_err(|_| invalid())?;
        total = value
            .checked_mul(unit)
            .and_then(|secs| total.checked_add(secs))
            .ok_or_else(invalid)?;
        digits.clear();
    }
    if !digits.is_empty() || total == 0 || total > 10 * 365 * 86400 {
        return Err(invalid());
    }
    Ok(Duration::from_secs(total))
}

/// Formats a duration compactly, the inverse of [`parse`] for whole units.
pub fn format(duration: Duration) -> String {
    let secs = duration.as_secs();
    let (d, h, m, s) = (
        secs / 86400,
        secs % 86400 / 3600,
        secs % 3600 / 60,
        secs % 60,
    );
    let parts = [(d, "d"), (h, "h"), (m, "m"), (s, "s")];
    let text: String = parts
        .iter()
        .filter(|(value, _)| *value > 0)
        .map(|(value, unit)| format!("{value}{unit}"))
        .collect();
    if text.is_empty() {
        "0s".to_string()
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_sums() {
        assert_eq!(parse("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("2d"), Ok(Duration::from_secs(172800)));
        assert_eq!(parse("45s"), Ok(Duration::from_secs(45)));
    }

    #[test]
    fn refuses_garbage() {
        for bad in [
            "",
            "0m",
            "30",
            "m",
            "1x",
            "-5m",
            "99999999999999999999d",
            "1h 30m",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn formats_round_trip() {
        assert_eq!(format(Duration::from_secs(5400)), "1h30m");
        assert_eq!(
            parse(&format(Duration::from_secs(93784)))
                .unwrap()
                .as_secs(),
            93784
        );
    }
}
