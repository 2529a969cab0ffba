//! Untrusted text made safe to show on a terminal, in a log line or a chat message.
//!
//! Reasons, comments, command lines, usernames and patterns come from users. Shown
//! as they are, an ESC sequence in an exec string rewrites the rows of an auditor's
//! `sessions` table, and a bidi override (U+202E) makes `rm -rf /tmp/x` read as
//! something else. [`escape`] renders every character that is not plain visible text
//! as a visible escape, so what an approver or auditor reads is what was typed.
//!
//! This module depends on nothing else in the crate, so every layer can use it.

use std::borrow::Cow;

/// `text` with every control character (C0, DEL, C1) shown as `\xNN` or `\u{NN}`,
/// and every Unicode format character (general category Cf: bidi embeddings,
/// overrides and isolates, zero-width characters, the soft hyphen, the BOM, …) and
/// line or paragraph separator shown as `\u{XXXX}`. Everything else, backslashes
/// included, is kept: the result is idempotent (escaping twice changes nothing),
/// and paths or regexes stay readable. Exact bytes are in the `--json` output.
pub fn escape(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if !needs_escape(c) {
            out.push(c);
        } else if (c as u32) < 0x80 {
            out.push_str(&format!("\\x{:02x}", c as u32));
        } else {
            out.push_str(&format!("\\u{{{:04x}}}", c as u32));
        }
    }
    Cow::Owned(out)
}

/// Whether `escape` rewrites `c`.
pub fn needs_escape(c: char) -> bool {
    c.is_control() || is_format(c)
}

/// Unicode format characters (general category Cf) plus the line and paragraph
/// separators (Zl, Zp): invisible, yet they change how the text around them is
/// laid out or read. The table is Cf as of Unicode 15.1; a format character added
/// later would be shown as it is until the table learns it.
pub fn is_format(c: char) -> bool {
    matches!(
        c as u32,
        0x00AD
            | 0x0600..=0x0605
            | 0x061C
            | 0x06DD
            | 0x070F
            | 0x0890..=0x0891
            | 0x08E2
            | 0x180E
            | 0x200B..=0x200F
            | 0x2028..=0x202E
            | 0x2060..=0x2064
            | 0x2066..=0x206F
            | 0xFEFF
            | 0xFFF9..=0xFFFB
            | 0x110BD
            | 0x110CD
            | 0x13430..=0x1343F
            | 0x1BCA0..=0x1BCA3
            | 0x1D173..=0x1D17A
            | 0xE0001
            | 0xE0020..=0xE007F
    )
}

/// Slack's `mrkdwn` escaping: `&`, `<` and `>` as entities, so text cannot form a
/// link (`<http://x|y>`) or a mention (`<!channel>`, `<@U123>`).
pub fn slack(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_and_format_characters_become_visible() {
        assert_eq!(
            escape("plain text, ünïcödé 日本"),
            "plain text, ünïcödé 日本"
        );
        assert!(matches!(escape("plain"), Cow::Borrowed(_)));
        assert_eq!(escape("a\u{1b}[2Jb"), "a\\x1b[2Jb");
        assert_eq!(
            escape("tab\there\nnl\r\x7f"),
            "tab\\x09here\\x0anl\\x0d\\x7f"
        );
        assert_eq!(escape("\u{9b}31m"), "\\u{009b}31m");
        assert_eq!(escape("rm \u{202e}x/fr- "), "rm \\u{202e}x/fr- ");
        for c in [
            '\u{200b}',
            '\u{200f}',
            '\u{2066}',
            '\u{2069}',
            '\u{feff}',
            '\u{ad}',
            '\u{2028}',
            '\u{2029}',
            '\u{e0041}',
        ] {
            assert!(needs_escape(c), "{:04x}", c as u32);
        }
        for c in ['a', 'é', ' ', '\\', '日', '\u{300}'] {
            assert!(!needs_escape(c), "{:04x}", c as u32);
        }
    }

    #[test]
    fn escaping_is_idempotent() {
        for text in [
            "a\u{1b}]52;c;x\u{7}",
            "\u{202e}\u{2066}",
            "back\\slash\\x1b",
        ] {
            let once = escape(text).into_owned();
            assert_eq!(escape(&once), once);
            assert!(!once.chars().any(needs_escape));
        }
    }

    #[test]
    fn slack_markup_is_inert() {
        assert_eq!(
            slack("<!channel> <http://evil|ok> a&b"),
            "&lt;!channel&gt; &lt;http://evil|ok&gt; a&amp;b"
        );
    }
}
