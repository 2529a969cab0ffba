//! Exec commands as argument vectors: splitting a client's command line into the
//! words the bastion compares, and quoting those words back into the one
//! *canonical* command line that the target runs.
//!
//! An SSH exec request is a string that the target's login shell (or sshd's
//! `force-command`, through `$SHELL -c`) interprets again. Comparing words and then
//! forwarding the client's string would let that second interpretation widen a
//! grant (brace expansion, tildes, `=` assignments, comments). So the bastion never
//! forwards the client's string for a command grant: it forwards [`canonical`],
//! where every word that is not made of inert characters is single-quoted, and a
//! single-quoted word means exactly its characters to every POSIX shell (bash,
//! dash, zsh, busybox sh) and to fish.

/// Characters that make a command more than a plain list of words for `sh -c`,
/// even once its words are quoted again (they would surprise whoever reads the
/// command in a grant or an audit event), with how a refusal names them.
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
    // csh and tcsh expand `!` history references even inside single quotes, and
    // no quoting works in both csh and fish.
    (
        '!',
        "'!' (history expansion in csh and tcsh, even inside quotes)",
    ),
];

/// Characters that no shell gives a meaning to anywhere in a word: a word made
/// only of these (and ASCII letters and digits) is sent without quotes, so audit
/// events stay readable. Everything else, `{ } ~ # = % ^ ' " ]` and all of
/// Unicode included, is quoted, and so is the command name.
const INERT: &[char] = &['_', '-', '.', '/', ',', ':', '@', '+'];

/// Longest command or pattern accepted, in bytes.
pub const MAX_COMMAND_LEN: usize = 4096;

/// Splits a client's exec command into the words to compare, or says why it is
/// not a plain list of words that a command grant could ever allow.
pub fn split(command: &str) -> Result<Vec<String>, String> {
    split_with(command, None)
}

/// [`split`] for command patterns, where `*` is the wildcard.
pub fn split_pattern(pattern: &str) -> Result<Vec<String>, String> {
    split_with(pattern, Some('*'))
}

fn split_with(command: &str, wildcard: Option<char>) -> Result<Vec<String>, String> {
    if command.len() > MAX_COMMAND_LEN {
        return Err("more than 4096 bytes".into());
    }
    let special = SHELL_SPECIAL
        .iter()
        .filter(|(c, _)| Some(*c) != wildcard)
        .find(|(c, _)| command.contains(*c));
    if let Some((_, what)) = special {
        return Err((*what).into());
    }
    if let Some(odd) = command.chars().find(|c| !allowed_char(*c)) {
        return Err(describe_char(odd));
    }
    if starts_a_comment(command) {
        return Err("a comment ('#' at the start of a word)".into());
    }
    match shlex::split(command) {
        None => Err("unbalanced quotes".into()),
        Some(words) if words.is_empty() => Err("no command at all".into()),
        // bash reads a command named `%...` as `fg %...`, quoted or not.
        Some(words) if words[0].starts_with('%') => {
            Err("a job specification ('%' starting the command name)".into())
        }
        // sshd runs `$SHELL -c LINE`: a line starting with `-` is read as the
        // shell's own options, quoted or not.
        Some(words) if words[0].starts_with('-') => {
            Err("an option where the command name belongs ('-' starting the command)".into())
        }
        Some(words) if is_reserved_word(&words[0]) => Err(format!(
            "the shell keyword {:?} as the command name (fish reads it as a keyword even quoted)",
            words[0]
        )),
        Some(words) => Ok(words),
    }
}

/// Whether `word` is a reserved word of bash, zsh, ksh or fish. Quoting keeps a
/// POSIX shell from reading it as one, but not fish, so none may name a command.
pub fn is_reserved_word(word: &str) -> bool {
    const RESERVED: &[&str] = &[
        "{",
        "}",
        "[[",
        "]]",
        "and",
        "begin",
        "case",
        "coproc",
        "declare",
        "do",
        "done",
        "elif",
        "else",
        "end",
        "esac",
        "export",
        "fi",
        "float",
        "for",
        "foreach",
        "function",
        "if",
        "in",
        "integer",
        "local",
        "nocorrect",
        "noglob",
        "not",
        "or",
        "readonly",
        "repeat",
        "select",
        "switch",
        "then",
        "time",
        "typeset",
        "until",
        "while",
    ];
    RESERVED.contains(&word)
}

/// Printable ASCII (tab and other controls are not), and beyond ASCII only
/// letters: no format characters (bidi overrides, zero-width joiners), no Unicode
/// spaces, look-alike punctuation or numeric symbols, and none of the Hangul
/// fillers, which are letters that print as nothing. All of them would make a
/// grant or an audit line read differently from what runs.
fn allowed_char(c: char) -> bool {
    const INVISIBLE_LETTERS: &[char] = &['\u{115F}', '\u{1160}', '\u{3164}', '\u{FFA0}'];
    if c.is_ascii() {
        c == ' ' || c.is_ascii_graphic()
    } else {
        c.is_alphabetic() && !INVISIBLE_LETTERS.contains(&c)
    }
}

fn describe_char(c: char) -> String {
    if c.is_ascii() {
        format!("a control character ({:#04x})", c as u32)
    } else {
        format!(
            "the character U+{:04X}, which is neither ASCII nor a visible letter",
            c as u32
        )
    }
}

/// Whether an unquoted `#` starts a word anywhere: the shell would drop the rest
/// of the line as a comment, and `shlex` does too, so refusing it keeps "what was
/// compared" and "what the user meant" the same. (Backslashes are refused before
/// this runs, so quotes are the only state.)
fn starts_a_comment(command: &str) -> bool {
    let (mut single, mut double, mut previous) = (false, false, ' ');
    for c in command.chars() {
        match c {
            '#' if !single && !double && previous == ' ' => return true,
            '\'' if !double => single = !single,
            '"' if !single => double = !double,
            _ => {}
        }
        previous = c;
    }
    false
}

/// The command line that makes every POSIX shell run exactly `words`. The command
/// name is always quoted: a quoted word is never a reserved word (`time`, `if`,
/// `coproc`, fish's `not`) nor an alias, so it can only name a command.
pub fn canonical(words: &[String]) -> String {
    words
        .iter()
        .enumerate()
        .map(|(i, word)| {
            if i == 0 {
                single_quoted(word)
            } else {
                quote(word)
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// One word, quoted so that no shell expands anything in it. Words of inert
/// characters stay as they are; anything else is wrapped in single quotes, and a
/// single quote inside becomes `"'"` between two quoted runs (never `''`, which zsh's
/// `RC_QUOTES` would read as a quote character, and no backslash, which fish reads
/// inside single quotes).
pub fn quote(word: &str) -> String {
    if !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || INERT.contains(&c))
    {
        return word.to_string();
    }
    single_quoted(word)
}

/// `word` in single quotes, whatever it holds.
fn single_quoted(word: &str) -> String {
    if word.is_empty() {
        return "''".to_string();
    }
    word.split('\'')
        .map(|run| {
            if run.is_empty() {
                String::new()
            } else {
                format!("'{run}'")
            }
        })
        .collect::<Vec<_>>()
        .join("\"'\"")
}

/// Why `pattern` is not a usable command pattern, if it is not: the same rules as
/// for commands, `*` is the wildcard, and `**` stands only as a whole path segment.
pub fn pattern_problem(pattern: &str) -> Option<String> {
    let words = match split_pattern(pattern) {
        Ok(words) => words,
        Err(why) => return Some(why),
    };
    let misplaced = words
        .iter()
        .flat_map(|w| w.split('/'))
        .any(|segment| segment != "**" && segment.contains("**"));
    misplaced.then(|| {
        "'**' inside a path segment ('**' crosses directories only as a whole segment, as in /srv/app/**)".to_string()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn words(list: &[&str]) -> Vec<String> {
        list.iter().map(|w| w.to_string()).collect()
    }

    #[test]
    fn quoting_keeps_plain_words_readable_and_quotes_the_rest() {
        assert_eq!(
            canonical(&words(&["tail", "-n", "20", "/var/log/app.log"])),
            "'tail' -n 20 /var/log/app.log"
        );
        assert_eq!(
            canonical(&words(&["echo", "{a,b}", "~root", "#x", "A=b", ""])),
            "'echo' '{a,b}' '~root' '#x' 'A=b' ''"
        );
        assert_eq!(canonical(&words(&["timeout", "x"])), "'timeout' x");
        assert_eq!(quote("it's"), r#"'it'"'"'s'"#);
        assert_eq!(quote("'"), r#""'""#);
        assert_eq!(quote("a''b"), r#"'a'"'""'"'b'"#);
        assert_eq!(quote("résumé"), "'résumé'");
    }

    #[test]
    fn split_refuses_what_no_command_grant_allows() {
        assert_eq!(split("uname  'a b'").unwrap(), words(&["uname", "a b"]));
        for (hostile, why) in [
            ("tail -n 1 #x", "comment"),
            ("#x", "comment"),
            ("echo a\u{202e}b", "U+202E"),
            ("echo a\u{200b}b", "U+200B"),
            ("echo a\u{a0}b", "U+00A0"),
            ("echo a\tb", "control character"),
            ("echo 'a", "unbalanced"),
            ("   ", "no command"),
            ("echo *", "glob"),
            ("grep x '/var/log/syslog!#:1'", "'!'"),
            ("echo a\u{3164}b", "U+3164"),
            ("echo \u{bd}", "U+00BD"),
            ("%1", "job"),
            ("'%vi'", "job"),
            ("-i", "option"),
            ("time x", "keyword"),
            ("'not' x", "keyword"),
            ("'-O' extglob", "option"),
        ] {
            let err = split(hostile).unwrap_err();
            assert!(err.contains(why), "{hostile:?}: {err}");
        }
        assert_eq!(split("echo a#b").unwrap(), words(&["echo", "a#b"]));
        assert_eq!(
            split("echo 'a #b' '#c'").unwrap(),
            words(&["echo", "a #b", "#c"])
        );
    }

    /// Runs `line` with `shell -c` in a directory whose only `PATH` entry holds a
    /// probe named after the first word, which prints its name and arguments
    /// NUL-terminated. Returns the argument vector the shell really executed.
    fn executed_by(shell: &[&str], line: &str, first: &str, dir: &std::path::Path) -> Vec<String> {
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let probe = bin.join(first);
        std::fs::write(&probe, "#!/bin/sh\nprintf '%s\\0' \"${0##*/}\" \"$@\"\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&probe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let out = Command::new(shell[0])
            .args(&shell[1..])
            .arg("-c")
            .arg(line)
            .env_clear()
            .env("PATH", &bin)
            .env("HOME", dir)
            .env("LANG", "C.UTF-8")
            .current_dir(dir)
            .output()
            .unwrap_or_else(|e| panic!("{shell:?} must be installed (scripts/test does): {e}"));
        std::fs::remove_file(&probe).unwrap();
        assert!(out.status.success(), "{shell:?} -c {line:?}: {out:?}");
        let mut argv: Vec<String> = out
            .stdout
            .split(|b| *b == 0)
            .map(|w| String::from_utf8(w.to_vec()).unwrap())
            .collect();
        assert_eq!(argv.pop().as_deref(), Some(""), "NUL-terminated");
        argv
    }

    /// Words that some shell would expand, split or skip if they were not quoted.
    const HOSTILE: &[&str] = &[
        "{a,b}", "x{1..3}", "~", "~root", "~/x", "a=b", "=ls", "#x", "%1", "^x^y", "{", "}", "!!",
        "x!#:0", "-", "%", "a b", "'", "\"", "it's", "", "--", "-c", "é語", "x,y", ":", "@",
        "time", "coproc", "if", "function", "then", "not", "begin",
    ];

    /// A hostile word or a random one from the characters shells care about.
    fn word() -> impl proptest::strategy::Strategy<Value = String> {
        prop_oneof![
            proptest::sample::select(HOSTILE).prop_map(str::to_string),
            proptest::string::string_regex("[a-zA-Z0-9{}~#!=%^'\" ,:@+./é語_-]{0,10}").unwrap(),
            proptest::string::string_regex("\\p{L}{1,3}|x{300}")
                .unwrap()
                .prop_filter("visible letters", |w| w.chars().all(allowed_char)),
        ]
    }

    /// First words: a hostile word (none of them a builtin, which would never reach
    /// the probe), or a random one after a `probe` prefix. The probe is created under
    /// that name. An unquoted `{` or `!` would be a keyword; quoted, it must be a plain
    /// command name like any other.
    fn first_word() -> impl proptest::strategy::Strategy<Value = String> {
        prop_oneof![
            proptest::sample::select(HOSTILE)
                .prop_filter("a file name, not a builtin", |w| {
                    !w.is_empty() && !w.contains('/') && *w != ":"
                })
                .prop_map(str::to_string),
            word()
                .prop_filter("a file name", |w| !w.contains('/') && w.len() < 200)
                .prop_map(|w| format!("probe{w}")),
        ]
    }

    /// The login shells a target may have: every one of them must run the canonical
    /// line as exactly the compared words.
    const SHELLS: &[&[&str]] = &[
        &["/bin/bash"],
        &["/bin/dash"],
        &["/bin/zsh"],
        &["/bin/busybox", "sh"],
        &["/bin/tcsh"],
        &["/usr/bin/fish"],
    ];

    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// The differential proof of the canonical form: for commands the splitter
        /// accepts, every real shell executes exactly the compared words.
        #[test]
        fn every_shell_executes_exactly_the_compared_words(
            first in first_word(),
            args in proptest::collection::vec(word(), 0..6),
        ) {
            let mut compared = vec![first];
            compared.extend(args);
            let line = canonical(&compared);
            // The canonical line splits back into the compared words.
            match split(&line) {
                Ok(again) => prop_assert_eq!(&again, &compared),
                Err(why) => {
                    // Only the one thing no quoting can make safe is refused.
                    // Only what no quoting can make safe is refused: csh history,
                    // job specs, options and keywords where the command belongs.
                    prop_assert!(
                        compared.iter().any(|w| w.contains('!'))
                            || compared[0].starts_with(['%', '-'])
                            || is_reserved_word(&compared[0]),
                        "{:?}: {}",
                        line,
                        why
                    );
                    return Ok(());
                }
            }
            let dir = tempfile::tempdir().unwrap();
            for shell in SHELLS {
                let argv = executed_by(shell, &line, &compared[0], dir.path());
                prop_assert_eq!(&argv, &compared, "{:?} ran {:?}", shell, line);
            }
        }
    }
}
