//! The control plane: commands run with `ssh portcullis@bastion CMD ...`.
//!
//! The exec line is split into shell words and parsed with clap; output goes to
//! stdout, errors to stderr with exit status 1 and a hint of what to do next.

mod audit;
mod cmd;
mod error;
mod requests;
mod sessions;
mod step_up;
mod table;

use clap::{CommandFactory, FromArgMatches};

use crate::session::hint;
use crate::session::{ChannelContext, ClientChannel, ClientOut, Start};
use cmd::Call;
pub use cmd::ControlArgs;
pub use error::{ControlError, Reply};
use requests::Caller;

/// Longest command line the control plane reads, in bytes.
const MAX_LINE: usize = 64 * 1024;

/// The command table shown by `help`.
pub const HELP: &str = "\
portcullis control plane — run as: ssh -p PORT portcullis@BASTION COMMAND [ARGS]

  whoami [--json]                         your identity, groups and active grants
  request TARGET [--login L] [--shell] [--sftp] [--command PATTERN]...
          [--ttl 30m] --reason TEXT [--wait] [--json]
                                          ask for access; --wait blocks until decided
  requests [--pending] [--mine] [--all] [--json]
                                          requests you can see (--all: with history)
  show ID [--json]                        one request with its approvals
  approve ID [--comment TEXT] [--json]    approve (approvers of the request's flow)
  deny ID --reason TEXT [--json]          deny (approvers of the request's flow)
  revoke ID [--reason TEXT] [--json]      end a grant and its sessions, or withdraw a request
  grants [--json]                         active grants you can see
  totp enroll [--invite CODE] | totp status  TOTP for step-up (approve/deny take --totp CODE)

auditors:
  sessions [--user U] [--target T] [--since 24h] [--active] [--grep TEXT] [--json]
                                          recorded sessions
  replay SESSION [--speed N] [--raw]      play a recording with its original timing
  watch SESSION [--raw]                   follow a live session read-only
                                          (--raw: also clipboard, title, link and
                                          query sequences, dropped by default)
  export SESSION                          asciicast v2 on stdout (asciinema play)
  audit [--since 24h] [--json]            audit events (JSON lines with --json)
  audit verify [--recordings] [--anchor SEQ:DIGEST]...
                                          check the hash chain, session records against
                                          it, logged chain heads (and every recording)

  help                                    this table

Connect to a target with: ssh -p PORT LOGIN@TARGET@BASTION (or TARGET@BASTION for its default login)
";

/// The command table for this bastion: `ssh` is how its control plane is reached
/// (`ssh -p 2222 portcullis@127.0.0.1`).
pub fn help(ssh: &str) -> String {
    let targets = ssh.replacen(
        &format!("{}@", crate::policy::CONTROL_USER),
        "LOGIN@TARGET@",
        1,
    );
    let host = ssh.rsplit_once('@').map_or("BASTION", |(_, host)| host);
    HELP.replace("ssh -p PORT portcullis@BASTION", ssh)
        .replace("ssh -p PORT LOGIN@TARGET@BASTION", &targets)
        .replace("TARGET@BASTION", &format!("TARGET@{host}"))
}

/// Options whose value is free text, which ssh's word joining splits up.
const TEXT_OPTIONS: [&str; 4] = ["--reason", "--comment", "--command", "--grep"];

/// What a command line turned out to be.
pub enum Parsed {
    Command(ControlArgs),
    /// Help was asked for: print this and exit 0.
    Help(String),
    /// Not a valid command: this says why and what to do.
    Error(String),
}

/// Parses an exec command line (raw bytes from the client) into a command. Never
/// panics, whatever the bytes; fuzzed and property-tested.
pub fn parse(command: &[u8]) -> Parsed {
    parse_with(command, "ssh portcullis@BASTION")
}

/// [`parse`], naming the control plane as `ssh` (e.g. `ssh -p 2222
/// portcullis@127.0.0.1`) in usage lines and in the command lines it suggests.
pub fn parse_with(command: &[u8], ssh: &str) -> Parsed {
    if command.len() > MAX_LINE {
        return Parsed::Error(format!(
            "the command line is {} bytes; the control plane accepts at most {MAX_LINE}",
            command.len()
        ));
    }
    let Some(words) = std::str::from_utf8(command).ok().and_then(shlex::split) else {
        return Parsed::Error(
            "cannot parse the command line: use UTF-8 and balanced quotes".into(),
        );
    };
    if matches!(
        words.first().map(String::as_str),
        None | Some("help") | Some("--help")
    ) {
        return Parsed::Help(help(ssh));
    }
    match try_parse(&words, ssh) {
        Ok(args) => Parsed::Command(args),
        Err(err) if err.kind() == clap::error::ErrorKind::DisplayHelp => {
            Parsed::Help(err.render().to_string())
        }
        Err(err) => Parsed::Error(explain(&err, &words, ssh)),
    }
}

fn try_parse(words: &[String], ssh: &str) -> Result<ControlArgs, clap::Error> {
    let matches = ControlArgs::command()
        .bin_name(ssh.to_string())
        .try_get_matches_from(words)?;
    ControlArgs::from_arg_matches(&matches)
}

/// clap's message, made right for a command line that came through ssh: when
/// the words parse once the values ssh's word joining split up are put back
/// together, say so and show the quoted command; never clap's `use '-- -a'` tip
/// (wrong here), and `--help` in the quoted form that reaches the control plane.
fn explain(err: &clap::Error, words: &[String], ssh: &str) -> String {
    use clap::error::ErrorKind;
    if err.kind() == ErrorKind::UnknownArgument {
        if let Some((split, regrouped)) = regroup(words) {
            if try_parse(&regrouped, ssh).is_ok() {
                let split: Vec<String> = split
                    .iter()
                    .map(|(option, value)| format!("{option} {}", hint::quote_word(value)))
                    .collect();
                return format!(
                    "ssh joins its arguments with spaces, so {} arrived as separate words; quote the whole command, with each value of several words in single quotes inside it:\n  {ssh} {}",
                    split.join(" and "),
                    hint::remote(&regrouped)
                );
            }
        }
    }
    let rendered = err.render().to_string();
    let mut message = String::new();
    for line in rendered.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("tip: to pass") || trimmed.starts_with("For more information") {
            continue;
        }
        if line.is_empty() && (message.is_empty() || message.ends_with("\n\n")) {
            continue;
        }
        message.push_str(line);
        message.push('\n');
    }
    let subcommand = words
        .first()
        .filter(|w| ControlArgs::command().find_subcommand(w.as_str()).is_some());
    // A stray plain word is most often one word of a value ssh split up.
    let stray_word = match err.get(clap::error::ContextKind::InvalidArg) {
        Some(clap::error::ContextValue::String(arg)) => !arg.starts_with('-'),
        _ => false,
    };
    if err.kind() == ErrorKind::UnknownArgument && stray_word {
        message.push_str("note: ssh joins its arguments with spaces; quote the whole command, with each value of several words in single quotes inside it\n");
    }
    match subcommand {
        Some(name) => message.push_str(&format!(
            "For more information: {ssh} \"{name} --help\" (in quotes, ssh never takes --help for an option of its own)"
        )),
        None => message.push_str(&format!("Commands: {ssh} help")),
    }
    message.trim_end().to_string()
}

/// An option and the value of several words that ssh split up.
type SplitValue = (String, String);

/// `words` with the free-text values that ssh split up joined again (everything
/// after `--reason` up to the next option of the same subcommand), and which
/// those were; `None` when nothing was split.
fn regroup(words: &[String]) -> Option<(Vec<SplitValue>, Vec<String>)> {
    let command = ControlArgs::command();
    let subcommand = command.find_subcommand(words.first()?)?;
    let known: Vec<String> = subcommand
        .get_arguments()
        .filter_map(|arg| arg.get_long())
        .map(|long| format!("--{long}"))
        .chain(["--help".to_string()])
        .collect();
    let is_option = |word: &str| {
        known.iter().any(|k| {
            word == k
                || word
                    .strip_prefix(k.as_str())
                    .is_some_and(|r| r.starts_with('='))
        })
    };
    let (mut out, mut split) = (Vec::new(), Vec::new());
    let mut i = 0;
    while i < words.len() {
        let word = &words[i];
        out.push(word.clone());
        i += 1;
        if TEXT_OPTIONS.contains(&word.as_str()) && known.contains(word) {
            let start = i;
            while i < words.len() && !is_option(&words[i]) {
                i += 1;
            }
            if i > start {
                let value = words[start..i].join(" ");
                if i - start > 1 {
                    split.push((word.clone(), value.clone()));
                }
                out.push(value);
            }
        }
    }
    (!split.is_empty()).then_some((split, out))
}

/// Runs one control-plane command on a session channel.
pub async fn run(context: &ChannelContext, mut client: ClientChannel, start: Start) {
    let out = &client.out;
    let ssh = hint::ssh_prefix(&context.state.config);
    let command = match start {
        Start::Exec(command) => command,
        Start::Shell => {
            out.stdout(&help(&ssh)).await;
            out.exit(0).await;
            return;
        }
        Start::Subsystem(name) => {
            out.fail(&format!("the control plane has no subsystem {:?}; run commands with {ssh} COMMAND (e.g. {ssh} help)", crate::display::escape(&name)), 1).await;
            return;
        }
    };
    let args = match parse_with(&command, &ssh) {
        Parsed::Command(args) => args,
        Parsed::Help(text) => {
            out.stdout(&text).await;
            out.exit(0).await;
            return;
        }
        Parsed::Error(message) => {
            out.fail(&message, 1).await;
            return;
        }
    };
    let user = context.identity.user.as_str();
    tracing::info!(user, command = ?args.command.name(), "control command");
    let mut call = Call {
        context,
        client: &mut client,
        caller: Caller {
            user,
            state: &context.state,
            policy: context.state.policy(),
            now: context.state.now(),
        },
    };
    let reply = args.command.run(&mut call).await;
    finish(&client.out, reply).await;
}

/// Answers the client: the text on stdout and exit status 0, or the error on
/// stderr (a `portcullis: ...` line) and exit status 1.
async fn finish(out: &ClientOut, reply: Reply) {
    match reply {
        Ok(text) => {
            if !text.is_empty() {
                out.stdout(&text).await;
            }
            out.exit(0).await;
        }
        Err(ControlError::NotApprovedJson(json)) => {
            out.stdout(&json).await;
            out.exit(1).await;
        }
        Err(ControlError::Gone) => {}
        Err(err) => out.fail(&err.to_string(), 1).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines_parse_into_commands_help_or_errors() {
        assert!(matches!(
            parse(b"approve 7f3a9c --comment 'ok then'"),
            Parsed::Command(_)
        ));
        assert!(matches!(parse(b""), Parsed::Help(_)));
        assert!(matches!(parse(b"approve --help"), Parsed::Help(_)));
        let Parsed::Error(message) = parse(b"request db --reason two words") else {
            panic!("unquoted words are an error")
        };
        assert!(message.contains("quote the whole command"), "{message}");
        assert!(matches!(parse(b"\xff\xfe"), Parsed::Error(_)));
        assert!(matches!(parse(&vec![b'a'; MAX_LINE + 1]), Parsed::Error(_)));
    }

    #[test]
    fn words_split_by_ssh_are_explained_with_the_quoted_command() {
        let ssh = "ssh -p 2222 portcullis@127.0.0.1";
        let Parsed::Error(message) = parse_with(
            b"request db-prod-1 --login root --command uname -a --reason WHY",
            ssh,
        ) else {
            panic!("unquoted words are an error")
        };
        assert_eq!(
            message,
            "ssh joins its arguments with spaces, so --command 'uname -a' arrived as separate words; quote the whole command, with each value of several words in single quotes inside it:\n  ssh -p 2222 portcullis@127.0.0.1 \"request db-prod-1 --login root --command 'uname -a' --reason 'WHY'\""
        );
        let Parsed::Error(message) =
            parse_with(b"approve 7f3a9c --comment ok, INC-4411 --totp 123456", ssh)
        else {
            panic!("unquoted words are an error")
        };
        assert!(
            message.ends_with("\"approve 7f3a9c --comment 'ok, INC-4411' --totp 123456\""),
            "{message}"
        );
        // Nothing to regroup: clap's own words, without its `-- -a` tip, and the
        // quoted --help.
        let Parsed::Error(message) = parse_with(b"requests -a", ssh) else {
            panic!("-a is no option of requests")
        };
        assert!(!message.contains("-- -a"), "{message}");
        assert!(!message.contains("try '--help'"), "{message}");
        assert!(
            message.contains("For more information: ssh -p 2222 portcullis@127.0.0.1 \"requests --help\" (in quotes"),
            "{message}"
        );
        assert!(
            matches!(parse_with(b"requests --help", ssh), Parsed::Help(text) if text.contains("Usage: ssh -p 2222 portcullis@127.0.0.1 requests"))
        );
    }

    proptest::proptest! {
        #[test]
        fn any_command_line_parses_without_panicking(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn any_words_parse_without_panicking(words in proptest::collection::vec(".{0,12}", 0..8)) {
            let line = words
                .iter()
                .map(|w| shlex::try_quote(w).map(|q| q.into_owned()).unwrap_or_default())
                .collect::<Vec<_>>()
                .join(" ");
            let _ = parse(line.as_bytes());
        }
    }
}
