//! What a grant lets its holder do, and how an exec command is matched against
//! command patterns.
//!
//! A pattern such as `systemctl restart *` is split into shell words like the command
//! is, and the two are compared word by word: the same number of words, each word
//! equal except that `*` matches any run of characters *within* that word. A command
//! that the remote shell would interpret beyond plain words (control operators,
//! redirections, substitutions, globs, quoting tricks with backslashes) never
//! matches: the target's shell must run exactly the argument vector that was
//! compared.

use serde::{Deserialize, Serialize};

use super::Action;

/// Characters that make a command more than a plain list of words for `sh -c`.
/// Refusing them anywhere (even inside quotes) is deliberately conservative: a
/// command grant is for fixed, boring commands.
const SHELL_SPECIAL: &[(char, &str)] = &[
    (';', "';'"),
    ('&', "'&'"),
    ('|', "'|'"),
    ('`', "a backquote"),
    ('$', "'$'"),
    ('>', "a redirection"),
    ('<', "a redirection"),
    ('(', "'('"),
    (')', "')'"),
    ('\n', "a newline"),
    ('\r', "a carriage return"),
    ('\\', "a backslash"),
    ('*', "a glob"),
    ('?', "a glob"),
    ('[', "a glob"),
    ('\0', "a NUL byte"),
];

/// Longest command or pattern accepted, in bytes.
pub const MAX_COMMAND_LEN: usize = 4096;

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
    pub fn covers(&self, action: &Action, pty: bool) -> Result<(), String> {
        if self.shell {
            return Ok(());
        }
        if pty {
            return Err("a terminal (pty) needs a shell grant; run the command without -t".into());
        }
        match action {
            Action::Shell => Err("an interactive shell needs a shell grant".into()),
            Action::Subsystem(name) if *name == "sftp" && self.sftp => Ok(()),
            Action::Subsystem(name) => Err(format!("the {name} subsystem is not granted")),
            Action::Exec(command) => {
                let command = std::str::from_utf8(command)
                    .map_err(|_| "the command is not valid UTF-8".to_string())?;
                if let Some(why) = plain_words_problem(command) {
                    return Err(format!(
                        "command {command:?} contains {why}, which a command grant never allows"
                    ));
                }
                if self.commands.iter().any(|p| command_matches(p, command)) {
                    Ok(())
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
        let mut parts = Vec::new();
        if self.shell {
            parts.push("shell".to_string());
        }
        if self.sftp {
            parts.push("sftp".to_string());
        }
        parts.extend(self.commands.iter().map(|c| format!("cmd '{c}'")));
        if parts.is_empty() {
            "nothing".to_string()
        } else {
            parts.join(" + ")
        }
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
pub fn plain_words_problem(command: &str) -> Option<&'static str> {
    if command.len() > MAX_COMMAND_LEN {
        return Some("more than 4096 bytes");
    }
    if let Some((_, what)) = SHELL_SPECIAL.iter().find(|(c, _)| command.contains(*c)) {
        return Some(what);
    }
    if command.chars().any(char::is_control) {
        return Some("a control character");
    }
    match shlex::split(command) {
        None => Some("unbalanced quotes"),
        Some(words) if words.is_empty() => Some("no command at all"),
        Some(words) if words[0].starts_with('#') => Some("a comment"),
        Some(_) => None,
    }
}

/// Why `pattern` is not a usable command pattern, if it is not: the same rules as
/// for commands, except that `*` is the wildcard.
pub fn pattern_problem(pattern: &str) -> Option<&'static str> {
    plain_words_problem(&pattern.replace('*', "x"))
}

/// Whether `command` matches `pattern`, word by word.
pub fn command_matches(pattern: &str, command: &str) -> bool {
    if plain_words_problem(command).is_some() {
        return false;
    }
    words_match(pattern, command)
}

/// Whether a requested pattern stays within a flow's pattern: each requested word,
/// `*` included, must be matched by the flow's word.
pub fn pattern_within(requested: &str, allowed: &str) -> bool {
    words_match(allowed, requested)
}

fn words_match(pattern: &str, text: &str) -> bool {
    let (Some(pattern), Some(text)) = (shlex::split(pattern), shlex::split(text)) else {
        return false;
    };
    pattern.len() == text.len() && pattern.iter().zip(&text).all(|(p, t)| word_matches(p, t))
}

/// Glob match of one word where `*` matches any run of characters.
fn word_matches(pattern: &str, word: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = word.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty(); // no `*` at all: exact match
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
            "uname \\-a",
            "uname 'unbalanced",
        ] {
            assert!(!command_matches("uname *", hostile), "{hostile:?}");
            assert!(plain_words_problem(hostile).is_some(), "{hostile:?}");
        }
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
        fn star_never_crosses_words(words in proptest::collection::vec("[a-z0-9./-]{1,8}", 1..6)) {
            let command = words.join(" ");
            let stars = vec!["*"; words.len()].join(" ");
            proptest::prop_assert!(command_matches(&stars, &command));
            let fewer = vec!["*"; words.len() - 1].join(" ");
            proptest::prop_assert!(!command_matches(&fewer, &command));
        }

        #[test]
        fn arbitrary_text_never_panics(pattern in ".{0,60}", command in ".{0,60}") {
            let _ = command_matches(&pattern, &command);
            let _ = pattern_within(&pattern, &command);
            let _ = plain_words_problem(&command);
        }
    }
}
