//! TOTP enrolment through the real `totp enroll` command, and `SSH_ASKPASS`
//! programs that answer the step-up prompt, for the tests of TOTP step-up.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;

use chrono::Utc;

use super::*;

/// Enrols `client` (user `name`) through `totp enroll` without a pty, typing the
/// code computed from the URL it prints (or `wrong_code`). Returns the secret and
/// the command's output.
pub fn enroll(
    world: &World,
    client: &Client,
    name: &str,
    wrong_code: Option<&str>,
) -> (String, std::process::Output) {
    enroll_with(world, client, name, Code::Typed(wrong_code), "")
}

/// The confirmation code [`enroll_with`] types.
pub enum Code<'a> {
    /// This code, or the right one for now when `None`.
    Typed(Option<&'a str>),
    /// The right code of the previous 30 s step, so that the current and the next
    /// step are still unused for step-ups right after.
    PreviousStep,
}

/// [`enroll`] with extra `totp enroll` arguments (such as `--invite CODE`).
pub fn enroll_with(
    world: &World,
    client: &Client,
    name: &str,
    typed: Code,
    extra: &str,
) -> (String, std::process::Output) {
    let mut child = client
        .ssh_command(CONTROL_USER, &[], &[&format!("totp enroll {extra}")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn totp enroll");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut printed = String::new();
    let url = loop {
        let mut line = String::new();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "totp enroll printed no URL:\n{printed}\n{}",
            world.logs()
        );
        printed.push_str(&line);
        if line.starts_with("otpauth://") {
            break line.trim().to_string();
        }
    };
    assert!(url.contains("issuer=portcullis"), "{url}");
    assert!(
        printed.contains('█') || printed.contains('▀'),
        "a QR code is drawn:\n{printed}"
    );
    let secret = portcullis::totp::secret_of_url(&url).expect("secret in the URL");
    let code = match typed {
        Code::Typed(Some(code)) => code.to_string(),
        Code::Typed(None) => portcullis::totp::code_at(&secret, name, Utc::now()).unwrap(),
        Code::PreviousStep => {
            let earlier = Utc::now() - chrono::Duration::seconds(30);
            portcullis::totp::code_at(&secret, name, earlier).unwrap()
        }
    };
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "{code}").unwrap();
    drop(stdin);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    let mut out = child.wait_with_output().unwrap();
    out.stdout = (printed + &rest).into_bytes();
    (secret, out)
}

/// An `SSH_ASKPASS` program `dir/name` that always types `code` (the same code on
/// every connection, to test that a used one is refused).
pub fn fixed_askpass(dir: &Path, name: &str, code: &str) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, format!("#!/bin/sh\necho {code}\n")).expect("write askpass");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod askpass");
    path
}
