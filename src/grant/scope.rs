//! What a grant lets its holder do, and how an exec command is matched against
//! command patterns.
//!
//! A pattern such as `systemctl restart *` is split into shell words like the command
//! is ([`crate::command::split`]), and the two are compared word by word: the same
//! number of words, each word equal except for the wildcards. Matching is path-aware,
//! so that a pattern for a directory never reaches outside it:
//!
//! - `*` matches any run of characters except `/`, and never a whole `.` or `..`
//!   path segment nor an empty one (`/var/log/*` matches `/var/log/app.log`, not
//!   `/var/log/..` nor the directory itself as `/var/log/`);
//! - `**`, written as a whole path segment (`/srv/app/**`), matches any number of
//!   segments (at least one at the end of a word, so `/srv/**` is never `/srv`
//!   itself), none of which may be empty, `.` or `..`.
//!
//! A command that the remote shell would interpret beyond plain words never matches,
//! and what the target runs is the canonical form of the compared words
//! ([`crate::command::canonical`]), never the client's string.

use serde::{Deserialize, Serialize};

use super::Action;
use crate::command;

pub use command::MAX_COMMAND_LEN;

/// The granted scope: any combination of an interactive shell, sftp and commands.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scope {
    /// Everything the login can do: pty, shell, any exec, sftp.
    pub shell: bool,
    /// The sftp subsystem (OpenSSH ≥ 9 `scp` uses it too).
    pub sftp: bool,
    /// Exec command patterns.
    pub commands: Vec<String>,
}

impl Scope {
    /// Whether this scope covers `action` (with or without a pty); `Err` says why not.
    /// For an exec allowed by a command pattern, `Ok(Some(words))` holds the compared
    /// words: the target must run exactly those (see [`command::canonical`]).
    pub fn covers(&self, action: &Action, pty: bool) -> Result<Option<Vec<String>>, String> {
        if self.shell {
            return Ok(None);
        }
        if pty {
            return Err("a terminal (pty) needs a shell grant; run the command without -t".into());
        }
        match action {
            Action::Shell => Err("an interactive shell needs a shell grant".into()),
            Action::Subsystem(name) if *name == "sftp" && self.sftp => Ok(None),
            Action::Subsystem(name) => Err(format!("the {name} subsystem is not granted")),
            Action::Exec(command) => {
                let command = std::str::from_utf8(command)
                    .map_err(|_| "the command is not valid UTF-8".to_string())?;
                let words = command::split(command).map_err(|why| {
                    format!(
                        "command {command:?} contains {why}, which a command grant never allows"
                    )
                })?;
                if self.commands.iter().any(|p| pattern_matches(p, &words)) {
                    Ok(Some(words))
                } else {
                    Err(format!(
                        "command {command:?} matches none of the granted commands ({})",
                        self.describe_commands()
                    ))
                }
            }
        }
    }

    /// `shell`, `sftp`, `cmd 'uname *'`, joined with `+`, for tables.
    pub fn describe(&self) -> String {
        let parts = self.parts();
        if parts.is_empty() {
            "nothing".to_string()
        } else {
            parts.join(" + ")
        }
    }

    /// Each thing the scope grants, in the words of [`Scope::describe`]: `shell`,
    /// `sftp`, `cmd 'PATTERN'`.
    pub fn parts(&self) -> Vec<String> {
        let mut parts = Vec::new();
        if self.shell {
            parts.push("shell".to_string());
        }
        if self.sftp {
            parts.push("sftp".to_string());
        }
        parts.extend(self.commands.iter().map(|c| format!("cmd '{c}'")));
        parts
    }

    fn describe_commands(&self) -> String {
        if self.commands.is_empty() {
            "none".to_string()
        } else {
            self.commands
                .iter()
                .map(|c| format!("'{c}'"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    }
}

/// Why `command` is not a plain list of shell words, if it is not.
pub fn plain_words_problem(command: &str) -> Option<String> {
    command::split(command).err()
}

/// Whether `command` matches `pattern`, word by word.
pub fn command_matches(pattern: &str, command: &str) -> bool {
    command::split(command).is_ok_and(|words| pattern_matches(pattern, &words))
}

/// Whether a requested pattern stays within a flow's pattern: every command the
/// requested pattern matches, the flow's pattern matches too.
pub fn pattern_within(requested: &str, allowed: &str) -> bool {
    let (Ok(allowed), Ok(requested)) = (
        command::split_pattern(allowed),
        command::split_pattern(requested),
    ) else {
        return false;
    };
    allowed.len() == requested.len()
        && allowed
            .iter()
            .zip(&requested)
            .all(|(a, r)| segments_match(a, r, Wildcards::InText))
}

fn pattern_matches(pattern: &str, words: &[String]) -> bool {
    let Ok(pattern) = command::split_pattern(pattern) else {
        return false;
    };
    pattern.len() == words.len()
        && pattern
            .iter()
            .zip(words)
            .all(|(p, w)| segments_match(p, w, Wildcards::InPatternOnly))
}

/// Whether the text being matched is a command word (its `*` is a plain character)
/// or another pattern (its wildcards stand for what they match).
#[derive(Clone, Copy, PartialEq)]
enum Wildcards {
    InPatternOnly,
    InText,
}

/// Path-aware match of one word: both are split at `/` and compared segment by
/// segment, `**` standing for any number of segments.
fn segments_match(pattern: &str, text: &str, wildcards: Wildcards) -> bool {
    let pattern: Vec<&str> = pattern.split('/').collect();
    let text: Vec<&str> = text.split('/').collect();
    // reachable[j]: the pattern's first i segments can match the text's first j.
    let mut reachable = vec![false; text.len() + 1];
    reachable[0] = true;
    for (i, p) in pattern.iter().enumerate() {
        let mut next = vec![false; text.len() + 1];
        if *p == "**" {
            // A trailing `**` stands for at least one segment: what is below the
            // directory, not the directory.
            let at_least_one = i + 1 == pattern.len();
            for j in 0..=text.len() {
                // `**` continues over the next segment if that one may be crossed.
                let crossed = j > 0
                    && crossable(text[j - 1])
                    && (next[j - 1] || (at_least_one && reachable[j - 1]));
                next[j] = (reachable[j] && !at_least_one) || crossed;
            }
        } else {
            for j in 1..=text.len() {
                next[j] = reachable[j - 1] && segment_matches(p, text[j - 1], wildcards);
            }
        }
        reachable = next;
    }
    reachable[text.len()]
}

/// A segment that a wildcard may stand for: not empty (that would name the
/// directory itself), not `.` or `..`.
fn crossable(segment: &str) -> bool {
    !segment.is_empty() && segment != "." && segment != ".."
}

/// Glob match of one path segment where `*` matches any run of characters; a
/// segment matched by a wildcard is never empty, `.` or `..`.
fn segment_matches(pattern: &str, segment: &str, wildcards: Wildcards) -> bool {
    if !pattern.contains('*') {
        return pattern == segment;
    }
    if !crossable(segment) {
        return false;
    }
    if wildcards == Wildcards::InText && segment.contains("**") {
        return false; // a requested `**` is wider than any single-segment glob
    }
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = segment.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::pattern_problem;

    fn commands(patterns: &[&str]) -> Scope {
        Scope {
            commands: patterns.iter().map(|p| p.to_string()).collect(),
            ..Scope::default()
        }
    }

    #[test]
    fn words_are_compared_one_by_one() {
        assert!(command_matches("id", "id"));
        assert!(command_matches("uname *", "uname -a"));
        assert!(command_matches(
            "systemctl restart *",
            "systemctl  restart 'nginx'"
        ));
        assert!(!command_matches("uname *", "uname"));
        assert!(
            !command_matches("uname *", "uname -a -r"),
            "* never crosses words"
        );
        assert!(!command_matches("id", "id -u"));
        assert!(!command_matches("id", "ID"));
        assert!(command_matches(
            "tail -n * /var/log/*.log",
            "tail -n 50 /var/log/app.log"
        ));
        assert!(!command_matches(
            "tail /var/log/*.log",
            "tail /var/log/app.txt"
        ));
        assert!(command_matches("echo a*b*c", "echo abbbc"));
        assert!(!command_matches("echo a*b*c", "echo acb"));
    }

    #[test]
    fn shell_syntax_never_matches() {
        for hostile in [
            "uname -a; id",
            "uname -a && id",
            "uname -a || id",
            "uname -a | id",
            "uname `id`",
            "uname $(id)",
            "uname -a > /tmp/x",
            "uname -a < /etc/shadow",
            "uname -a\nid",
            "uname -a &",
            "uname $HOME",
            "uname 'a;b'",
            "uname /*",
            "uname #x",
            "uname a\u{202e}b",
            "uname \\-a",
            "uname 'unbalanced",
        ] {
            assert!(!command_matches("uname *", hostile), "{hostile:?}");
            assert!(plain_words_problem(hostile).is_some(), "{hostile:?}");
        }
    }

    #[test]
    fn wildcards_are_path_aware() {
        assert!(command_matches(
            "tail -n 20 /var/log/*",
            "tail -n 20 /var/log/syslog"
        ));
        for escape in [
            "tail -n 20 /var/log/../../etc/shadow",
            "tail -n 20 /var/log/..",
            "tail -n 20 /var/log/.",
            "tail -n 20 /var/log/a/b",
        ] {
            assert!(
                !command_matches("tail -n 20 /var/log/*", escape),
                "{escape}"
            );
        }
        assert!(!command_matches(
            "tail -n * /etc/hostname",
            "tail -n {1,/etc/shadow} /etc/hostname"
        ));
        assert!(!command_matches("cat /var/log/.*", "cat /var/log/.."));
        assert!(command_matches(
            "cat /var/log/.*",
            "cat /var/log/.bash_history"
        ));
        assert!(command_matches("cat /srv/**", "cat /srv/a/b/c.txt"));
        assert!(command_matches("cat /srv/**/*.log", "cat /srv/a/b/c.log"));
        assert!(command_matches("cat /srv/**/*.log", "cat /srv/c.log"));
        assert!(!command_matches(
            "cat /srv/**",
            "cat /srv/a/../../etc/shadow"
        ));
        assert!(!command_matches("cat /srv/**", "cat /srv/./x"));
        assert!(!command_matches(
            "rm -rf /srv/cache/*",
            "rm -rf /srv/cache/"
        ));
        assert!(!command_matches("rm -rf /srv/**", "rm -rf /srv"));
        assert!(!command_matches("rm -rf /srv/**", "rm -rf /srv/"));
        assert!(command_matches("rm -rf /srv/**", "rm -rf /srv/a"));
        assert!(!command_matches("echo *", "echo ''"));
        assert!(
            command_matches("cat /srv/../srv/x", "cat /srv/../srv/x"),
            "literal .. is the pattern's own"
        );
        assert!(!command_matches("cat /srv/**/x", "cat /etc/x"));
        assert!(
            command_matches("echo *", "echo {a,b}"),
            "braces are inert once quoted"
        );
        assert_eq!(pattern_problem("cat /srv/**"), None);
        assert!(pattern_problem("cat /srv/**.log")
            .unwrap()
            .contains("whole segment"));
        assert!(pattern_within("cat /srv/*", "cat /srv/**"));
        assert!(pattern_within("cat /srv/a/**", "cat /srv/**"));
        assert!(!pattern_within("cat /srv/**", "cat /srv/*"));
        assert!(!pattern_within("cat /srv/..", "cat /srv/*"));
    }

    #[test]
    fn scope_covers_actions() {
        let scope = commands(&["id"]);
        assert!(scope.covers(&Action::Exec(b"id"), false).is_ok());
        assert!(
            scope.covers(&Action::Exec(b"id"), true).is_err(),
            "pty needs shell"
        );
        assert!(scope.covers(&Action::Shell, false).is_err());
        assert!(scope.covers(&Action::Subsystem("sftp"), false).is_err());
        let err = scope.covers(&Action::Exec(b"id; id"), false).unwrap_err();
        assert!(err.contains("';'"), "{err}");
        let sftp = Scope {
            sftp: true,
            ..Scope::default()
        };
        assert!(sftp.covers(&Action::Subsystem("sftp"), false).is_ok());
        assert!(sftp.covers(&Action::Exec(b"scp -t /tmp"), false).is_err());
        let shell = Scope {
            shell: true,
            ..Scope::default()
        };
        assert!(shell.covers(&Action::Exec(b"id; uname"), true).is_ok());
        assert!(shell.covers(&Action::Subsystem("sftp"), false).is_ok());
    }

    #[test]
    fn requested_patterns_must_stay_within_the_flow() {
        assert!(pattern_within("uname -a", "uname *"));
        assert!(pattern_within("uname *", "uname *"));
        assert!(!pattern_within("uname * *", "uname *"));
        assert!(!pattern_within("rm -rf *", "uname *"));
        assert!(!pattern_within(
            "systemctl restart *",
            "systemctl restart nginx"
        ));
        assert_eq!(pattern_problem("systemctl restart *"), None);
        assert!(pattern_problem("a; b *").is_some());
    }

    proptest::proptest! {
        /// Whatever the pattern, a command with shell control syntax never matches.
        #[test]
        fn control_syntax_never_matches(
            pattern in "[a-z*/ .-]{0,40}",
            before in "[a-z0-9 /.-]{0,20}",
            operator in proptest::sample::select(vec![";", "&&", "||", "|", "`", "$(", ">", "<", "\n", "&", "\\"]),
            after in "[a-z0-9 /.-]{0,20}",
        ) {
            let command = format!("{before}{operator}{after}");
            proptest::prop_assert!(!command_matches(&pattern, &command));
            proptest::prop_assert!(!command_matches("*", &command));
            proptest::prop_assert!(!command_matches("* *", &command));
        }

        /// `*` matches within one word only: a pattern of N words matches only
        /// commands of N words.
        #[test]
        fn star_never_crosses_words(words in proptest::collection::vec("[a-z0-9_][a-z0-9._-]{0,7}", 1..6)) {
            let command = words.join(" ");
            // A shell keyword as the command name (`in`, `do`) is refused outright.
            proptest::prop_assume!(command::split(&command).is_ok());
            let stars = vec!["*"; words.len()].join(" ");
            proptest::prop_assert!(command_matches(&stars, &command));
            let fewer = vec!["*"; words.len() - 1].join(" ");
            proptest::prop_assert!(!command_matches(&fewer, &command));
        }

        /// `*` never matches `/`, and no wildcard ever stands for a `.` or `..`
        /// segment: whatever path a matching word names stays below the pattern's
        /// literal prefix.
        #[test]
        fn wildcards_never_leave_the_directory(
            segments in proptest::collection::vec(
                proptest::sample::select(vec!["a", "b.log", ".", "..", "", "x..y", ".hidden", "**", "*"]),
                1..6,
            ),
        ) {
            let word = format!("/var/log/{}", segments.join("/"));
            let climbs = segments.iter().any(|s| *s == "." || *s == "..");
            for pattern in ["/var/log/*", "/var/log/**", "/var/log/**/*", "/var/log/*/*.log", "/var/log/.*"] {
                let command = format!("tail {word}");
                if command::split(&command).is_err() {
                    continue;
                }
                let matched = command_matches(&format!("tail {pattern}"), &command);
                if climbs {
                    proptest::prop_assert!(!matched, "{pattern} matched {word}");
                }
                if pattern == "/var/log/*" && matched {
                    proptest::prop_assert_eq!(segments.len(), 1);
                }
            }
        }

        #[test]
        fn arbitrary_text_never_panics(pattern in ".{0,60}", command in ".{0,60}") {
            let _ = command_matches(&pattern, &command);
            let _ = pattern_within(&pattern, &command);
            let _ = plain_words_problem(&command);
        }
    }
}
