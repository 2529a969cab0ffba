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
];

/// Characters that no shell gives a meaning to anywhere in a word: a word made
/// only of these (and ASCII letters and digits) is sent without quotes, so audit
/// events stay readable. Everything else, `{ } ~ # ! = % ^ ' " ]` and all of
/// Unicode included, is quoted.
const INERT: &[char] = &['_', '-', '.', '/', ',', ':', '@', '+'];

/// Longest command or pattern accepted, in bytes.
pub const MAX_COMMAND_LEN: usize = 4096;

/// Splits a client's exec command into the words to compare, or says why it is
/// not a plain list of words that a command grant could ever allow.
pub fn split(command: &str) -> Result<Vec<String>, String> {
    split_with(command, None)
}

/// [`split`] for command patterns, where `*` is the wildcard.
pub(crate) fn split_pattern(pattern: &str) -> Result<Vec<String>, String> {
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
        Some(words) => Ok(words),
    }
}

/// Printable ASCII (tab and other controls are not), and beyond ASCII only
/// letters and digits: no format characters (bidi overrides, zero-width joiners),
/// no Unicode spaces or look-alike punctuation that would make a grant or an audit
/// line read differently from what runs.
fn allowed_char(c: char) -> bool {
    if c.is_ascii() {
        c == ' ' || c.is_ascii_graphic()
    } else {
        c.is_alphanumeric()
    }
}

fn describe_char(c: char) -> String {
    if c.is_ascii() {
        format!("a control character ({:#04x})", c as u32)
    } else {
        format!(
            "the character U+{:04X}, which is not a letter or digit",
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

/// The command line that makes every POSIX shell run exactly `words`.
pub fn canonical(words: &[String]) -> String {
    words
        .iter()
        .map(|word| quote(word))
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

/// Whether `words`, run without a pty, can only be a file transfer: OpenSSH's
/// `scp -t`/`scp -f` sink or source (as `scp -O` starts it), or an rsync server
/// without daemon mode. Only these keep metadata-only recordings; any other
/// word, flag or extra argument makes the session an ordinary, fully recorded one.
pub fn is_file_transfer(words: &[String]) -> bool {
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    match words.as_slice() {
        ["scp", rest @ ..] => is_scp_server(rest),
        ["rsync", "--server", rest @ ..] => is_rsync_server(rest),
        _ => false,
    }
}

/// `[-v] [-r] [-p] [-d] (-t|-f) [--] PATH`, as scp.c builds it.
fn is_scp_server(args: &[&str]) -> bool {
    let Some((path, flags)) = args.split_last() else {
        return false;
    };
    let flags = flags.strip_suffix(&["--"]).unwrap_or(flags);
    let direction = flags.iter().filter(|f| ["-t", "-f"].contains(f)).count();
    direction == 1
        && flags
            .iter()
            .all(|f| ["-t", "-f", "-v", "-r", "-p", "-d"].contains(f))
        && !path.is_empty()
}

/// `[--sender] OPTIONS... . PATH...` where no option turns on daemon mode (which
/// runs rsyncd.conf's `pre-xfer exec` hooks) or writes files of its own choosing.
fn is_rsync_server(args: &[&str]) -> bool {
    const FORBIDDEN: &[&str] = &[
        "--daemon",
        "--config",
        "--dparam",
        "--log-file",
        "--write-batch",
        "--only-write-batch",
        "--read-batch",
        "--early-input",
    ];
    let Some(dot) = args.iter().position(|a| *a == ".") else {
        return false;
    };
    let (options, paths) = (&args[..dot], &args[dot + 1..]);
    !paths.is_empty()
        && options.iter().all(|o| {
            o.starts_with('-')
                && !FORBIDDEN
                    .iter()
                    .any(|f| o.split('=').next() == Some(*f) || o.starts_with(&format!("{f}=")))
        })
        && options.iter().filter(|o| !o.starts_with("--")).all(|o| {
            o.chars()
                .skip(1)
                .all(|c| c.is_ascii_alphanumeric() || c == '.')
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
            "tail -n 20 /var/log/app.log"
        );
        assert_eq!(
            canonical(&words(&["echo", "{a,b}", "~root", "#x", "A=b", ""])),
            "echo '{a,b}' '~root' '#x' 'A=b' ''"
        );
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
            ("%1", "job"),
            ("'%vi'", "job"),
            ("-i", "option"),
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

    #[test]
    fn only_exact_scp_and_rsync_server_invocations_are_file_transfers() {
        for transfer in [
            "scp -t /tmp",
            "scp -v -r -p -d -t -- /tmp/x",
            "scp -f /etc/hostname",
            "rsync --server -vlogDtpre.iLsfxCIvu . /tmp/dest",
            "rsync --server --sender -vlogDtpre.iLsfxCIvu . /srv/a /srv/b",
            "rsync --server -logDtpre.iLsfxCIvu --delete --partial-dir=.p . /tmp/x",
        ] {
            assert!(is_file_transfer(&split(transfer).unwrap()), "{transfer}");
        }
        for other in [
            "scp",
            "scp -t",
            "scp -t -f /tmp",
            "scp -t /tmp /etc",
            "scp -S /bin/sh -t /tmp",
            "scpx -t /tmp",
            "rsync --server",
            "rsync --server -e.x /tmp",
            "rsync --server --daemon . /tmp",
            "rsync --server --config=/tmp/c --daemon . /tmp",
            "rsync --server --log-file=/root/.bashrc . /tmp",
            "rsync --server bash -i . /tmp",
            "rsync -vv --server . /tmp",
            "bash -i",
        ] {
            assert!(!is_file_transfer(&split(other).unwrap()), "{other}");
        }
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
        "{a,b}", "x{1..3}", "~", "~root", "~/x", "a=b", "=ls", "#x", "!", "!!", "!-1", "%1",
        "^x^y", "{", "}", "-", "%", "a b", "'", "\"", "it's", "", "--", "-c", "é語", "x,y", ":",
        "@",
    ];

    /// A hostile word or a random one from the characters shells care about.
    fn word() -> impl proptest::strategy::Strategy<Value = String> {
        prop_oneof![
            proptest::sample::select(HOSTILE).prop_map(str::to_string),
            proptest::string::string_regex("[a-zA-Z0-9{}~#!=%^'\" ,:@+./é語_-]{0,10}").unwrap(),
            proptest::string::string_regex("\\p{L}{1,3}|x{300}").unwrap(),
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
                    prop_assert!(compared[0].starts_with(['%', '-']), "{:?}: {}", line, why);
                    return Ok(());
                }
            }
            let dir = tempfile::tempdir().unwrap();
            for shell in [&["/bin/bash"][..], &["/bin/dash"], &["/bin/zsh"], &["/bin/busybox", "sh"]] {
                let argv = executed_by(shell, &line, &compared[0], dir.path());
                prop_assert_eq!(&argv, &compared, "{:?} ran {:?}", shell, line);
            }
        }
    }
}
