//! The control plane: commands run with `ssh portcullis@bastion CMD ...`.
//!
//! The exec line is split into shell words and parsed with clap; output goes to
//! stdout, errors to stderr with exit status 1 and a hint of what to do next.

mod args;
mod audit;
use crate::session::hint;
mod requests;
mod sessions;
mod step_up;
mod table;

use std::time::{Duration, Instant};

use chrono::Utc;
use clap::{CommandFactory, FromArgMatches};
use russh::ChannelMsg;

use crate::audit::AuditEvent;
use crate::grant::{Grant, GrantState, Scope};
use crate::session::{ChannelContext, ClientChannel, ClientOut, Start};
pub use args::ControlArgs;
use args::{AuditAction, Command, TotpAction};
use requests::{to_json, Caller, Filter, RequestArgs};

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
    let caller = Caller {
        user,
        state: &context.state,
        policy: context.state.policy(),
        now: Utc::now(),
    };
    let reply = match args.command {
        Command::Whoami { json } => whoami(&caller, json),
        Command::Request {
            target,
            login,
            shell,
            sftp,
            commands,
            ttl,
            reason,
            wait,
            json,
        } => {
            let args = RequestArgs {
                target,
                login,
                scope: Scope {
                    shell,
                    sftp,
                    commands,
                },
                ttl,
                reason,
            };
            match requests::request(&caller, args).await {
                Ok(grant) if wait && grant.state == GrantState::Pending => {
                    if !json {
                        out.stdout(&requests::describe_outcome(&caller, &grant))
                            .await;
                    }
                    wait_and_report(context, &mut client, &caller, grant, json).await;
                    return;
                }
                filed => filed.map(|grant| requests::outcome(&caller, &grant, json)),
            }
        }
        Command::Requests {
            pending,
            mine,
            all,
            json,
        } => requests::list(&caller, Filter { pending, mine, all }, json),
        Command::Show { id, json } => requests::show(&caller, &id, json),
        Command::Approve {
            id,
            comment,
            totp,
            json,
        } => match step_up::for_decision(context, &mut client, &caller, &id, totp).await {
            Ok(()) => requests::approve(&caller, &id, comment, json).await,
            Err(refusal) => Err(refusal),
        },
        Command::Deny {
            id,
            reason,
            totp,
            json,
        } => match step_up::for_decision(context, &mut client, &caller, &id, totp).await {
            Ok(()) => requests::deny(&caller, &id, reason, json).await,
            Err(refusal) => Err(refusal),
        },
        Command::Totp {
            action: TotpAction::Enroll { invite },
        } => step_up::enroll(context, &mut client, invite).await,
        Command::Totp {
            action: TotpAction::Status,
        } => step_up::status(&caller),
        Command::Revoke { id, reason, json } => requests::revoke(&caller, &id, reason, json).await,
        Command::Grants { json } => requests::grants(&caller, json),
        auditor_command => {
            let reply = match auditor(&caller) {
                Ok(()) => run_auditor(&caller, &mut client, auditor_command).await,
                Err(refusal) => Err(refusal),
            };
            finish(&client.out, reply).await;
            return;
        }
    };
    finish(&client.out, reply).await;
}

/// Refuses auditor commands to everyone outside `auditors`.
fn auditor(caller: &Caller) -> Result<(), String> {
    let auditors = &caller.state.config.auditors;
    if caller.policy.is_member(caller.user, auditors) {
        Ok(())
    } else {
        Err(format!(
            "only auditors ({}) may read recordings and the audit log",
            auditors.join(", ")
        ))
    }
}

/// Runs an auditor command and records that the auditor ran it.
async fn run_auditor(
    caller: &Caller<'_>,
    client: &mut ClientChannel,
    command: Command,
) -> requests::Reply {
    let event = |kind: &str| AuditEvent::new(kind, caller.user, Utc::now());
    match command {
        Command::Sessions {
            user,
            target,
            since,
            active,
            grep,
            json,
        } => {
            caller
                .state
                .audit_or_refuse(event("auditor.sessions").detail("grep", grep.clone()))?;
            let filter = sessions::SessionFilter {
                user,
                target,
                since,
                active,
                grep,
            };
            sessions::list(caller, filter, json).await
        }
        Command::Replay {
            session,
            speed,
            raw,
        } => {
            let record = sessions::find(caller, &session)?;
            caller.state.audit_or_refuse(
                event("auditor.replay")
                    .detail("session", record.id)
                    .detail("raw", raw),
            )?;
            sessions::replay(caller, &client.out, &record, speed, raw).await
        }
        Command::Watch { session, raw } => {
            let record = sessions::find(caller, &session)?;
            caller.state.audit_or_refuse(
                event("auditor.watch")
                    .detail("session", record.id)
                    .detail("raw", raw),
            )?;
            sessions::watch(caller, client, &record, raw).await
        }
        Command::Export { session } => {
            let record = sessions::find(caller, &session)?;
            caller
                .state
                .audit_or_refuse(event("auditor.export").detail("session", record.id))?;
            sessions::export(caller, &client.out, &record).await
        }
        Command::Audit {
            action:
                Some(AuditAction::Verify {
                    recordings,
                    anchors,
                }),
            ..
        } => {
            let anchored: Vec<String> = anchors.iter().map(|a| a.to_string()).collect();
            caller.state.audit_or_refuse(
                event("auditor.verify")
                    .detail("recordings", recordings)
                    .detail("anchors", anchored),
            )?;
            audit::verify(caller, recordings, &anchors)
        }
        Command::Audit {
            action: None,
            since,
            json,
        } => {
            caller
                .state
                .audit_or_refuse(event("auditor.audit").detail("since", since.clone()))?;
            audit::list(caller, since, json)
        }
        other => Err(format!("{other:?} is not an auditor command")),
    }
}

async fn finish(out: &ClientOut, reply: requests::Reply) {
    match reply {
        Ok(text) => {
            if !text.is_empty() {
                out.stdout(&text).await;
            }
            out.exit(0).await;
        }
        Err(message) => out.fail(&message, 1).await,
    }
}

/// `request --wait`: blocks until the request is decided (woken by the decision
/// itself), redrawing a status line on a terminal. Exits 0 only when approved. A
/// client that goes away stops waiting; the request stays pending.
async fn wait_and_report(
    context: &ChannelContext,
    client: &mut ClientChannel,
    caller: &Caller<'_>,
    grant: Grant,
    json: bool,
) {
    let grants = &context.state.grants;
    let started = Instant::now();
    let approvers = crate::grant::lifecycle::approvers_of(&grant, &caller.policy)
        .map(|a| a.join(", "))
        .unwrap_or_default();
    let mut redraw = tokio::time::interval(Duration::from_secs(1));
    let decided = grants.wait_decided(&grant.id);
    tokio::pin!(decided);
    let result = loop {
        tokio::select! {
            result = &mut decided => break result,
            _ = redraw.tick(), if client.out.pty => {
                let line = grant.waiting_status(&approvers, started.elapsed());
                client.out.stderr(&format!("\r\x1b[K{line}")).await;
            }
            msg = client.reader.wait() => {
                if matches!(msg, None | Some(ChannelMsg::Close)) {
                    return;
                }
            }
        }
    };
    if client.out.pty {
        client.out.stderr("\r\x1b[K").await;
    }
    let out = &client.out;
    let caller = Caller {
        user: caller.user,
        state: caller.state,
        policy: caller.policy.clone(),
        now: Utc::now(),
    };
    match result {
        Ok(decided) if json => {
            out.stdout(&to_json(&decided)).await;
            out.exit(if decided.state == GrantState::Approved {
                0
            } else {
                1
            })
            .await;
        }
        Ok(decided) if decided.state == GrantState::Approved => {
            out.stdout(&requests::describe_outcome(&caller, &decided))
                .await;
            out.exit(0).await;
        }
        Ok(decided) => {
            out.fail(requests::describe_outcome(&caller, &decided).trim_end(), 1)
                .await
        }
        Err(err) => out.fail(&err.to_string(), 1).await,
    }
}

fn whoami(caller: &Caller, json: bool) -> requests::Reply {
    let user = caller.user;
    let groups = caller
        .policy
        .users
        .get(user)
        .map(|u| u.groups.clone())
        .unwrap_or_default();
    let active = requests::own_active(caller)?;
    let totp = caller
        .state
        .totp
        .is_enrolled(user)
        .map_err(|e| e.to_string())?;
    if json {
        let doc = serde_json::json!({
            "user": user,
            "groups": groups,
            "totp_enrolled": totp,
            "grants": active,
        });
        return Ok(format!("{doc}\n"));
    }
    let mut text = format!(
        "user:   {user}\ngroups: {}\ntotp:   {}\ngrants: {}\n",
        if groups.is_empty() {
            "-".to_string()
        } else {
            groups.join(", ")
        },
        if totp { "enrolled" } else { "not enrolled" },
        if active.is_empty() { "none" } else { "" }
    );
    for grant in &active {
        text.push_str(&format!(
            "  {}  {}  {}  expires {}\n",
            grant.id,
            grant.destination(),
            crate::display::escape(&grant.scope.describe()),
            grant
                .expires_at
                .map(|at| table::relative(at, caller.now))
                .unwrap_or_default()
        ));
    }
    Ok(text)
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
