//! Human output: aligned tables and relative times ("expires in 27m", "3h ago").

use chrono::{DateTime, Utc};

/// Left-aligned columns separated by two spaces; the last column is not padded.
pub fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            out.push_str(cell);
            if i < last {
                let pad = widths[i] - cell.chars().count() + 2;
                out.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.truncate(out.trim_end().len());
        out.push('\n');
        out
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// `in 27m`, `3h ago`, `now`.
pub fn relative(at: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let secs = (at - now).num_seconds();
    if secs.abs() < 1 {
        return "now".to_string();
    }
    let span = short_span(secs.unsigned_abs());
    if secs > 0 {
        format!("in {span}")
    } else {
        format!("{span} ago")
    }
}

/// `45s`, `27m`, `3h12m`, `2d4h`.
pub fn short_span(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86400 => {
            let (h, m) = (secs / 3600, secs % 3600 / 60);
            if m == 0 {
                format!("{h}h")
            } else {
                format!("{h}h{m}m")
            }
        }
        _ => {
            let (d, h) = (secs / 86400, secs % 86400 / 3600);
            if h == 0 {
                format!("{d}d")
            } else {
                format!("{d}d{h}h")
            }
        }
    }
}

/// Shortens free text for a table cell.
pub fn clip(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_string()
    } else {
        let mut out: String = text.chars().take(max.saturating_sub(1)).collect();
        out.push('…');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align() {
        let out = render(
            &["ID", "STATE", "REASON"],
            &[
                vec!["7f3a9c".into(), "pending".into(), "INC-1".into()],
                vec!["01".into(), "ok".into(), "".into()],
            ],
        );
        assert_eq!(
            out,
            "ID      STATE    REASON\n7f3a9c  pending  INC-1\n01      ok\n"
        );
    }

    #[test]
    fn times_are_relative() {
        let now = Utc::now();
        assert_eq!(relative(now + chrono::Duration::minutes(27), now), "in 27m");
        assert_eq!(relative(now - chrono::Duration::hours(3), now), "3h ago");
        assert_eq!(
            relative(now + chrono::Duration::seconds(5430), now),
            "in 1h30m"
        );
        assert_eq!(relative(now, now), "now");
        assert_eq!(short_span(2 * 86400 + 3600), "2d1h");
    }
}
