//! Command lines the bastion suggests (`request it with: …`, `approvers run: …`,
//! the quoted form of a command that ssh's word joining broke). Each must work
//! when pasted into a POSIX shell: the local shell hands ssh the whole remote
//! command as one argument, and the control plane splits it back into exactly
//! the words meant. `tests/first_hour.rs` pastes them through `sh -c` and ssh.

use crate::command::pattern_problem;
use crate::config::Config;
use crate::grant::scope::{pattern_within, plain_words_problem};
use crate::grant::Requestable;
use crate::policy::CONTROL_USER;
use crate::session::Start;

/// `ssh -p PORT portcullis@HOST` for this bastion. HOST is the listen address;
/// `BASTION` when it listens on every address (it cannot know the name clients
/// use then).
pub fn ssh_prefix(config: &Config) -> String {
    let listen = config.listen;
    let host = if listen.ip().is_unspecified() {
        "BASTION".to_string()
    } else {
        listen.ip().to_string()
    };
    match listen.port() {
        22 => format!("ssh {CONTROL_USER}@{host}"),
        port => format!("ssh -p {port} {CONTROL_USER}@{host}"),
    }
}

/// `ssh -p PORT portcullis@HOST COMMAND`, with COMMAND quoted for pasting.
pub fn control_line<S: AsRef<str>>(config: &Config, words: &[S]) -> String {
    format!("{} {}", ssh_prefix(config), remote(words))
}

/// The remote command as one shell word when it needs quoting: ssh joins its
/// arguments with bare spaces, so only a single quoted argument keeps `'uname -a'`
/// one word for the control plane.
pub fn remote<S: AsRef<str>>(words: &[S]) -> String {
    // Free text (a reason, a comment) is quoted even when it is one word, so that
    // whoever edits `'WHY'` into a sentence keeps it one value.
    let free_text = |i: usize| i > 0 && ["--reason", "--comment"].contains(&words[i - 1].as_ref());
    let inner = words
        .iter()
        .enumerate()
        .map(|(i, w)| match free_text(i) {
            true => format!("'{}'", w.as_ref().replace('\'', r"'\''")),
            false => quote_word(w.as_ref()),
        })
        .collect::<Vec<_>>()
        .join(" ");
    if words
        .iter()
        .enumerate()
        .all(|(i, w)| is_plain(w.as_ref()) && !free_text(i))
    {
        return inner;
    }
    // Double quotes read best; they keep `*` and single quotes as they are, but
    // not `$`, backquotes, backslashes or (interactive bash and zsh) `!`.
    if inner.contains(['"', '$', '`', '\\', '!']) {
        format!("'{}'", inner.replace('\'', r"'\''"))
    } else {
        format!("\"{inner}\"")
    }
}

/// One word for a POSIX shell (and for the control plane's own splitting).
pub fn quote_word(word: &str) -> String {
    if is_plain(word) {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// Needs no quoting anywhere: not empty, nothing a shell expands or splits on.
fn is_plain(word: &str) -> bool {
    !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:@,+%".contains(&b))
}

/// What a user refused for want of a grant can request, as the flow allows it:
/// `Ok(line)` is the `request` command line for exactly what `start` needs;
/// `Err(why)` says why no request would help and what the flow does allow.
pub fn request(
    config: &Config,
    requestable: &Requestable,
    start: &Start,
    pty: bool,
) -> Result<String, String> {
    let flow = &requestable.flow;
    let line = |scope: Vec<String>| {
        let mut words = vec![
            "request".to_string(),
            requestable.target.name.clone(),
            "--login".to_string(),
            requestable.login.clone(),
        ];
        words.extend(scope);
        words.extend(["--reason".to_string(), "WHY".to_string()]);
        control_line(config, &words)
    };
    let allowed_commands = || {
        flow.commands
            .iter()
            .map(|c| quote_word(c))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let ask_for_commands = || {
        let scope = flow
            .commands
            .iter()
            .flat_map(|c| ["--command".to_string(), c.clone()])
            .collect();
        line(scope)
    };
    let needs_shell = pty
        || match start {
            Start::Shell => true,
            Start::Subsystem(name) => name != "sftp",
            Start::Exec(_) => false,
        };
    if needs_shell {
        if flow.shell {
            return Ok(line(vec!["--shell".into()]));
        }
        let what = if pty { "terminals" } else { "shells" };
        return Err(if flow.commands.is_empty() {
            format!(
                "flow '{}' grants commands, not {what}: connect again with the command you need, without -t, to be shown how to request it",
                flow.name
            )
        } else {
            format!(
                "flow '{}' grants only the commands {}, not {what}; request them and run one without -t:\n  {}",
                flow.name,
                allowed_commands(),
                ask_for_commands()
            )
        });
    }
    match start {
        Start::Subsystem(_) => {
            if flow.shell || flow.commands.is_empty() {
                Ok(line(vec!["--sftp".into()]))
            } else {
                Err(format!(
                    "flow '{}' grants only the commands {}; sftp and scp are not among them",
                    flow.name,
                    allowed_commands()
                ))
            }
        }
        Start::Exec(command) => {
            let command = String::from_utf8_lossy(command);
            let shell_syntax = plain_words_problem(&command).or_else(|| pattern_problem(&command));
            let allowed = flow.commands.is_empty()
                || flow.commands.iter().any(|f| pattern_within(&command, f));
            match shell_syntax {
                None if allowed => Ok(line(vec!["--command".into(), command.into_owned()])),
                Some(_) if flow.shell => Ok(line(vec!["--shell".into()])),
                None if flow.shell => Ok(line(vec!["--shell".into()])),
                Some(problem) if flow.commands.is_empty() => Err(format!(
                    "this command line contains {problem}, which only a shell grant covers, and flow '{}' grants no shells; run a plain command",
                    flow.name
                )),
                _ => Err(format!(
                    "flow '{}' grants only the commands {}; this is not one of them. Request those with:\n  {}",
                    flow.name,
                    allowed_commands(),
                    ask_for_commands()
                )),
            }
        }
        // Needs a shell: answered above.
        Start::Shell => Ok(line(vec!["--shell".into()])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `line` in `sh -c` with `printf '%s\n'` standing in for ssh, and
    /// returns the remote command as ssh would send it (its arguments after the
    /// destination, joined with spaces).
    fn as_ssh_sends(line: &str) -> String {
        let script = format!("ssh() {{ shift 3; printf '%s' \"$*\"; }}; {line}");
        let out = std::process::Command::new("sh")
            .args(["-c", &script])
            .output()
            .unwrap();
        assert!(out.status.success(), "{line}: {:?}", out);
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn pasted_lines_arrive_as_the_words_meant() {
        let config = Config::load(None).unwrap();
        for words in [
            vec!["grants"],
            vec!["approve", "7f3a9c"],
            vec!["request", "db", "--command", "uname -a", "--reason", "WHY"],
            vec![
                "request",
                "db",
                "--command",
                "journalctl -u nginx -n *",
                "--reason",
                "it's down",
            ],
            vec![
                "request",
                "db",
                "--command",
                "echo $HOME \"x\" `id` \\ !",
                "--reason",
                "a",
            ],
            vec!["request", "db", "--reason", ""],
        ] {
            let line = control_line(&config, &words);
            assert!(
                line.starts_with("ssh -p 2222 portcullis@127.0.0.1 "),
                "{line}"
            );
            let sent = as_ssh_sends(&line);
            let split = shlex::split(&sent).unwrap();
            assert_eq!(split, words, "{line} sent {sent:?}");
        }
    }
}
