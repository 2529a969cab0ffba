//! Human output: aligned tables and relative times ("expires in 27m", "3h ago").

use chrono::{DateTime, Utc};

use crate::display::escape;
use crate::grant::Scope;

/// Left-aligned columns separated by two spaces; the last column is not padded.
/// Cells are escaped ([`escape`]) before they are measured, so a cell can neither
/// move the cursor nor hide part of itself, and columns stay aligned.
pub fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| row.iter().map(|cell| escape(cell).into_owned()).collect())
        .collect();
    let rows = rows.as_slice();
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

/// Shortens free text for a table cell (escaped first, so the cut never splits an
/// escape and the length is what the reader sees).
pub fn clip(text: &str, max: usize) -> String {
    let text = escape(text);
    if text.chars().count() <= max {
        text.into_owned()
    } else {
        let mut out: String = text.chars().take(max.saturating_sub(1)).collect();
        out.push('…');
        out
    }
}

/// A scope for a table cell: whole parts (`shell`, `sftp`, `cmd '…'`) while they fit
/// in about `max` characters, then `+N more` — never part of a pattern, so an approver
/// always sees that there is more (`show ID` lists every part). The first part is
/// always shown whole, however long.
pub fn scope_cell(scope: &Scope, max: usize) -> String {
    let parts: Vec<String> = scope
        .parts()
        .iter()
        .map(|part| escape(part).into_owned())
        .collect();
    if parts.is_empty() {
        return scope.describe();
    }
    let mut shown = String::new();
    for (i, part) in parts.iter().enumerate() {
        let more = parts.len() - i;
        let candidate = if i == 0 {
            part.clone()
        } else {
            format!("{shown} + {part}")
        };
        let suffix = if more > 1 {
            format!(" +{} more", more - 1)
        } else {
            String::new()
        };
        if i > 0 && candidate.chars().count() + suffix.chars().count() > max {
            return format!("{shown} +{more} more");
        }
        shown = candidate;
    }
    shown
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
    fn cells_are_escaped_before_they_are_measured() {
        let out = render(
            &["A", "B"],
            &[
                vec!["x\u{1b}[2K".into(), "1".into()],
                vec!["\u{202e}y".into(), "2".into()],
            ],
        );
        assert_eq!(out, "A          B\nx\\x1b[2K   1\n\\u{202e}y  2\n");
        assert_eq!(clip("a\u{7}bcdef", 6), "a\\x07…");
    }

    #[test]
    fn scopes_are_never_cut_inside_a_part() {
        let scope = Scope {
            shell: false,
            sftp: true,
            commands: vec![
                "systemctl restart nginx-frontend-eu-west-1".into(),
                "journalctl -u nginx -n *".into(),
                "bash -c *".into(),
            ],
        };
        let cell = scope_cell(&scope, 40);
        assert_eq!(cell, "sftp +3 more");
        let some = scope_cell(&scope, 70);
        assert_eq!(
            some,
            "sftp + cmd 'systemctl restart nginx-frontend-eu-west-1' +2 more"
        );
        let wide = scope_cell(&scope, 200);
        assert!(wide.ends_with("cmd 'bash -c *'"), "{wide}");
        let one = Scope {
            commands: vec!["x".repeat(60)],
            ..Scope::default()
        };
        assert_eq!(scope_cell(&one, 40), format!("cmd '{}'", "x".repeat(60)));
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
