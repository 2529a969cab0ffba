//! The client compatibility suite (issue 17): the SSH clients and tools teams use
//! through a bastion, each driven for real through portcullis to a real sshd — PuTTY,
//! Paramiko (PyPI and Debian's), asyncssh, libssh, Ansible, git, sshfs and curl.
//!
//! The tests of this binary share one target sshd and two bastions (see
//! [`Fixture`]), started by the first test that needs them and stopped when the
//! binary exits. Each test works in a directory of its own. Versions of the PyPI
//! packages are pinned in `scripts/requirements.txt`; Debian's come from the
//! distribution (`scripts/test` installs both).

pub mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use common::*;

/// What the tests of this binary share: a target sshd (that accepts
/// `GIT_PROTOCOL`) behind a bastion on defaults, a second bastion with
/// `legacy_clients = true` and an `accept_env` without `GIT_PROTOCOL` in front of
/// the same sshd, and an asyncssh server as a target that is not OpenSSH.
///
/// Fields drop in order: the extra daemons first, then the world and its directory.
struct Fixture {
    legacy: Bastion,
    asyncssh_target: Daemon,
    world: World,
}

/// The fixture while tests run; taken and dropped when the binary exits.
static FIXTURE: Mutex<Option<Arc<Fixture>>> = Mutex::new(None);

extern "C" {
    fn atexit(callback: extern "C" fn()) -> std::ffi::c_int;
}

/// Stops the shared daemons and removes their directory as the binary exits
/// (statics are never dropped otherwise).
extern "C" fn stop_fixture() {
    let fixture = FIXTURE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .take();
    drop(fixture);
}

/// The shared fixture, started on first use.
fn fixture() -> Arc<Fixture> {
    let mut slot = FIXTURE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(fixture) = slot.as_ref() {
        return fixture.clone();
    }
    let fixture = Arc::new(Fixture::start());
    // SAFETY: registers a plain function with the C runtime; it only takes the
    // fixture out of its mutex and drops it.
    unsafe {
        atexit(stop_fixture);
    }
    *slot = Some(fixture.clone());
    fixture
}

/// The target name of the asyncssh server in the policies.
const ASYNCSSH_TARGET: &str = "asyncssh";

/// The link target the client scripts ask for; a symlink created in the wrong
/// order would appear as `$HOME/portcullis-link-target`.
const LINK_TARGET: &str = "portcullis-link-target";

impl Fixture {
    fn start() -> Fixture {
        let world = World::start_with(WorldOptions {
            sshd_config: "AcceptEnv GIT_PROTOCOL\n".into(),
            ..WorldOptions::default()
        });
        let asyncssh_target = start_asyncssh_target(&world);
        let legacy = start_second_bastion(
            &world,
            "legacy",
            "legacy_clients = true\naccept_env = \"LANG LC_* TZ\"\n",
        );
        Fixture {
            legacy,
            asyncssh_target,
            world,
        }
    }

    /// A fresh directory for one test, on the target (which is this machine).
    fn workdir(&self, name: &str) -> PathBuf {
        let dir = self.world.path(&format!("work-{name}"));
        fs::create_dir_all(&dir).expect("create a work directory");
        dir
    }

    /// alice on the default bastion.
    fn alice(&self) -> &Client {
        &self.world.alice
    }

    /// alice's private key.
    fn key(&self) -> &Path {
        self.world.alice.key()
    }

    /// `bastion`'s host key line, for clients that pin it.
    fn host_key(&self, bastion: &Bastion) -> String {
        fs::read_to_string(bastion.data_dir().join("host_ed25519.pub"))
            .expect("read the bastion's host key")
            .trim()
            .to_string()
    }

    /// Every daemon's log, for failure messages.
    fn logs(&self) -> String {
        format!(
            "{}\n--- legacy bastion log ---\n{}\n--- asyncssh target log ---\n{}",
            self.world.logs(),
            self.legacy.log(),
            self.asyncssh_target.log()
        )
    }

    /// Panics with the daemons' logs unless `out` succeeded.
    fn assert_ok(&self, out: &Output, what: &str) {
        assert!(
            out.status.success(),
            "{what} failed:\n{}\n{}",
            describe(out),
            self.logs()
        );
    }
}

/// A second bastion in `world`'s directory under `name`, with `config` added to
/// its portcullis.toml, the same policies, and its upstream key trusted by the
/// world's sshd.
fn start_second_bastion(world: &World, name: &str, config: &str) -> Bastion {
    let dir = world.path(name);
    fs::create_dir_all(dir.join("policies")).expect("create the bastion's directory");
    fs::write(dir.join("portcullis.extra.toml"), config).expect("write its extra config");
    for file in ["users.toml", "targets.toml", "flows.toml"] {
        fs::copy(
            world.bastion.policies_dir().join(file),
            dir.join("policies").join(file),
        )
        .expect("copy a policy file");
    }
    let keys = Bastion::keys(&dir);
    world.sshd.authorize_key(&keys.upstream);
    Bastion::start(&dir)
}

/// An asyncssh SSH and SFTP server (identification `SSH-2.0-AsyncSSH_…`) that
/// trusts the bastion's upstream key, added to the policies as target
/// [`ASYNCSSH_TARGET`].
fn start_asyncssh_target(world: &World) -> Daemon {
    let dir = world.path("asyncssh-target");
    fs::create_dir_all(&dir).expect("create the asyncssh target's directory");
    let host_key = dir.join("host_key");
    let host_key_line = keygen(&host_key, "asyncssh-target");
    let authorized = dir.join("authorized_keys");
    fs::write(&authorized, format!("{}\n", world.keys.upstream)).expect("write authorized_keys");
    let daemon = Daemon::start("asyncssh target", &dir.join("log"), |port| {
        let mut cmd = Command::new(python());
        // Relative SFTP paths resolve here, where the tests look for stray links.
        cmd.current_dir(&dir)
            .arg(script("asyncssh_target.py"))
            .arg(&host_key)
            .arg(&authorized)
            .arg(port.to_string());
        cmd
    });
    let target = format!(
        "[targets.{ASYNCSSH_TARGET}]\naddress = \"127.0.0.1:{}\"\nhost_key = \"{host_key_line}\"\nlogins = [\"{}\"]\nlabels = {{ env = \"staging\" }}\n",
        daemon.port(),
        login_user()
    );
    world.edit_policy("targets.toml", |targets| targets + &target);
    daemon
}

/// The virtualenv's python that `scripts/test` fills from scripts/requirements.txt.
fn python() -> PathBuf {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/pytools/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/test, which installs the Python clients",
        python.display()
    );
    python
}

/// Debian's own python, with Debian's python3-paramiko (2.12).
const DEBIAN_PYTHON: &str = "/usr/bin/python3";

/// A client script in tests/clients/.
fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/clients")
        .join(name)
}

/// Runs a client script with `interpreter`: HOST PORT USER KEY HOST_KEY WORKDIR,
/// then `extra`.
fn run_script(
    f: &Fixture,
    interpreter: &Path,
    name: &str,
    bastion: &Bastion,
    user: &str,
    work: &Path,
    extra: &[&str],
) -> Output {
    run(Command::new(interpreter)
        .arg(script(name))
        .args(["127.0.0.1", &bastion.port().to_string(), user])
        .arg(f.key())
        .arg(f.host_key(bastion))
        .arg(work)
        .args(extra))
}

/// Runs a client script as alice to the target `local` through `bastion`.
fn run_local(
    f: &Fixture,
    interpreter: &Path,
    name: &str,
    bastion: &Bastion,
    work: &Path,
) -> Output {
    run_script(
        f,
        interpreter,
        name,
        bastion,
        &f.world.target_user(),
        work,
        &[],
    )
}

/// Asserts the script printed `ok STEP` for every step.
fn assert_steps(f: &Fixture, out: &Output, what: &str, steps: &[&str]) {
    f.assert_ok(out, what);
    let stdout = text(&out.stdout);
    for step in steps {
        assert!(
            stdout.lines().any(|l| l == format!("ok {step}")),
            "{what}: no `ok {step}`:\n{}",
            describe(out)
        );
    }
}

/// Asserts `link` is a symlink to [`LINK_TARGET`], and that no link landed in the
/// login's home the other way round (the issue's silent misplacement).
fn assert_link_where_asked(link: &Path) {
    let stray = home().join(LINK_TARGET);
    let misplaced = fs::symlink_metadata(&stray).is_ok();
    if misplaced {
        let _ = fs::remove_file(&stray);
    }
    assert!(!misplaced, "a stray {} appeared", stray.display());
    let pointed =
        fs::read_link(link).unwrap_or_else(|e| panic!("{} is not a symlink: {e}", link.display()));
    assert_eq!(pointed, Path::new(LINK_TARGET));
}

// ---------------------------------------------------------------------------
// PuTTY (Debian's putty-tools)
// ---------------------------------------------------------------------------

/// alice's key in PuTTY's format, converted with puttygen.
fn ppk(f: &Fixture) -> PathBuf {
    let ppk = f.world.path("alice.ppk");
    if !ppk.exists() {
        let out = run(Command::new("puttygen")
            .arg(f.key())
            .args(["-O", "private", "-o"])
            .arg(&ppk));
        f.assert_ok(&out, "puttygen");
    }
    ppk
}

/// A PuTTY tool with alice's key, the bastion's host key pinned and no prompts.
fn putty(f: &Fixture, tool: &str, user: &str) -> Command {
    let host_key = fingerprint(&f.world.bastion.data_dir().join("host_ed25519.pub"));
    let mut cmd = Command::new(tool);
    cmd.args(["-batch", "-hostkey", &host_key, "-i"])
        .arg(ppk(f))
        .args(["-P", &f.world.bastion.port().to_string(), "-l", user]);
    cmd
}

#[test]
fn putty_plink_runs_commands_and_a_terminal() {
    let f = fixture();
    let user = f.world.target_user();
    let out = run(putty(&f, "plink", &user).args(["127.0.0.1", "echo out; echo err >&2; exit 3"]));
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}\n{}",
        describe(&out),
        f.logs()
    );
    assert_eq!(text(&out.stdout), "out\n");
    assert_eq!(text(&out.stderr), "err\n");
    let out = run(putty(&f, "plink", &user).args(["-t", "127.0.0.1", "test -t 0 && echo tty"]));
    f.assert_ok(&out, "plink -t");
    assert_eq!(text(&out.stdout).trim(), "tty");
}

#[test]
fn putty_pscp_and_psftp_copy_files() {
    let f = fixture();
    let user = f.world.target_user();
    let work = f.workdir("putty");
    let local = work.join("local.bin");
    random_file(&local, 200_000);
    // pscp speaks SFTP unless told -scp (an exec of `scp -t` / `scp -f`).
    for (mode, flags) in [("sftp", &[][..]), ("scp", &["-scp"][..])] {
        let remote = work.join(format!("remote-{mode}.bin"));
        let back = work.join(format!("back-{mode}.bin"));
        let out = run(putty(&f, "pscp", &user)
            .args(flags)
            .arg(&local)
            .arg(format!("127.0.0.1:{}", remote.display())));
        f.assert_ok(&out, &format!("pscp {mode} upload"));
        let out = run(putty(&f, "pscp", &user)
            .args(flags)
            .arg(format!("127.0.0.1:{}", remote.display()))
            .arg(&back));
        f.assert_ok(&out, &format!("pscp {mode} download"));
        assert_eq!(sha256_file(&back), sha256_file(&local), "pscp {mode}");
    }
    let batch = work.join("psftp.batch");
    let dir = work.join("psftp");
    fs::write(
        &batch,
        format!(
            "mkdir {dir}\nput {local} {dir}/up.bin\nget {dir}/up.bin {back}\nls {dir}\nquit\n",
            dir = dir.display(),
            local = local.display(),
            back = work.join("psftp-back.bin").display()
        ),
    )
    .unwrap();
    let out = run(putty(&f, "psftp", &user)
        .arg("-b")
        .arg(&batch)
        .arg("127.0.0.1"));
    f.assert_ok(&out, "psftp -b");
    assert!(text(&out.stdout).contains("up.bin"), "{}", describe(&out));
    assert_eq!(
        sha256_file(&work.join("psftp-back.bin")),
        sha256_file(&local)
    );
}

// ---------------------------------------------------------------------------
// Python libraries
// ---------------------------------------------------------------------------

#[test]
fn paramiko_runs_exec_sftp_and_a_pty() {
    let f = fixture();
    let work = f.workdir("paramiko");
    let out = run_local(&f, &python(), "paramiko_client.py", &f.world.bastion, &work);
    assert_steps(&f, &out, "paramiko (PyPI)", &["exec", "sftp", "pty"]);
}

#[test]
fn asyncssh_runs_exec_sftp_a_pty_and_puts_a_symlink_where_asked() {
    let f = fixture();
    let work = f.workdir("asyncssh");
    let out = run_local(&f, &python(), "asyncssh_client.py", &f.world.bastion, &work);
    assert_steps(&f, &out, "asyncssh", &["exec", "sftp", "pty", "symlink"]);
    assert_link_where_asked(&work.join("link"));
}

#[test]
fn libssh_runs_exec_sftp_and_puts_a_symlink_where_asked() {
    let f = fixture();
    let work = f.workdir("libssh");
    let out = run_local(&f, &python(), "libssh_client.py", &f.world.bastion, &work);
    assert_steps(
        &f,
        &out,
        "libssh (ssh-python)",
        &["exec", "sftp", "symlink"],
    );
    assert_link_where_asked(&work.join("libssh-link"));
}

/// OpenSSH's sftp always sends OpenSSH's order; it must keep working too.
#[test]
fn openssh_sftp_puts_a_symlink_where_asked() {
    let f = fixture();
    let work = f.workdir("openssh-sftp");
    let batch = work.join("batch");
    fs::write(
        &batch,
        format!("symlink {LINK_TARGET} {}/link\n", work.display()),
    )
    .unwrap();
    let out = f.alice().sftp_batch(&f.world.target_user(), &batch);
    f.assert_ok(&out, "sftp symlink");
    assert_link_where_asked(&work.join("link"));
}

/// Behind the bastion's OpenSSH-like identification, a client sends OpenSSH's
/// order; a target that is not OpenSSH might read the other one, so the bastion
/// ends the session rather than let a link land somewhere else. Everything else
/// in the sftp session works.
#[test]
fn a_symlink_to_a_target_that_is_not_openssh_ends_the_session_instead_of_misplacing_it() {
    let f = fixture();
    let work = f.workdir("asyncssh-target");
    let user = format!("{}@{ASYNCSSH_TARGET}", login_user());
    let out = run_script(
        &f,
        &python(),
        "asyncssh_client.py",
        &f.world.bastion,
        &user,
        &work,
        &["sftp,symlink"],
    );
    assert!(!out.status.success(), "{}", describe(&out));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("ok sftp"), "sftp works: {}", describe(&out));
    assert!(!stdout.contains("ok symlink"), "{}", describe(&out));
    assert!(fs::symlink_metadata(work.join("link")).is_err());
    for dir in [home(), f.world.path("asyncssh-target")] {
        assert!(fs::symlink_metadata(dir.join(LINK_TARGET)).is_err());
    }
    assert!(
        f.world
            .bastion
            .log()
            .contains("sftp symlink refused: target 'asyncssh' does not identify as OpenSSH"),
        "{}",
        f.logs()
    );
}

/// The home directory of the login on the target (the tests' own user).
fn home() -> PathBuf {
    PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
}

// ---------------------------------------------------------------------------
// Clients without AEAD ciphers: legacy_clients
// ---------------------------------------------------------------------------

/// Debian 12's Paramiko (2.12) knows no AEAD cipher: refused by default with a log
/// line naming `legacy_clients`, served by a bastion that sets it.
#[test]
fn debian_paramiko_needs_legacy_clients() {
    let f = fixture();
    let work = f.workdir("debian-paramiko");
    let python = Path::new(DEBIAN_PYTHON);
    let out = run_local(&f, python, "paramiko_client.py", &f.world.bastion, &work);
    assert_failure_mentions(
        &out,
        "Debian's paramiko, default bastion",
        &["no acceptable ciphers"],
    );
    assert_refusal_names_legacy_clients(&f, "aes128-ctr,aes192-ctr,aes256-ctr,aes128-cbc");
    let out = run_local(&f, python, "paramiko_client.py", &f.legacy, &work);
    assert_steps(
        &f,
        &out,
        "Debian's paramiko, legacy_clients",
        &["exec", "sftp", "pty"],
    );
    assert!(
        text(&out.stdout).contains("cipher aes"),
        "{}",
        describe(&out)
    );
}

/// The bastion's refusal of a client offering `offered` names the option.
/// (The client may give up before the bastion has logged, so this waits a little.)
fn assert_refusal_names_legacy_clients(f: &Fixture, offered: &str) {
    let refused = || {
        f.world.bastion.log().lines().any(|l| {
            l.contains("no common cipher algorithm")
                && l.contains(offered)
                && l.contains("legacy_clients = true")
        })
    };
    assert!(
        wait_until(std::time::Duration::from_secs(5), refused),
        "no refusal naming legacy_clients for a client offering {offered}:\n{}",
        f.logs()
    );
}

/// curl's sftp (libssh2 1.10 on Debian 12) has no AEAD cipher either.
#[test]
fn debian_curl_sftp_needs_legacy_clients() {
    let f = fixture();
    let work = f.workdir("curl");
    let local = work.join("local.bin");
    random_file(&local, 100_000);
    let curl = |bastion: &Bastion, args: &[&str], url_path: &Path| {
        let host_key = fingerprint(&bastion.data_dir().join("host_ed25519.pub"));
        run(Command::new("curl")
            .args(["-sS", "-u", &format!("{}:", f.world.target_user()), "--key"])
            .arg(f.key())
            .arg("--pubkey")
            .arg(f.key().with_extension("pub"))
            .args(["--hostpubsha256", host_key.trim_start_matches("SHA256:")])
            .args(args)
            .arg(format!(
                "sftp://127.0.0.1:{}{}",
                bastion.port(),
                url_path.display()
            )))
    };
    let remote = work.join("remote.bin");
    let local_arg = local.display().to_string();
    let out = curl(&f.world.bastion, &["-T", &local_arg], &remote);
    assert!(!out.status.success(), "{}", describe(&out));
    assert_refusal_names_legacy_clients(&f, "aes128-ctr,aes192-ctr,aes256-ctr,aes256-cbc,rijndael");
    let out = curl(&f.legacy, &["-T", &local_arg], &remote);
    f.assert_ok(&out, "curl sftp upload, legacy_clients");
    let back = work.join("back.bin").display().to_string();
    let out = curl(&f.legacy, &["-o", &back], &remote);
    f.assert_ok(&out, "curl sftp download, legacy_clients");
    assert_eq!(sha256_file(Path::new(&back)), sha256_file(&local));
}

// ---------------------------------------------------------------------------
// Ansible
// ---------------------------------------------------------------------------

/// Stops the ControlPersist masters Ansible leaves behind (they detach from the
/// test's process group), also when the test fails.
struct Masters(PathBuf);

impl Drop for Masters {
    fn drop(&mut self) {
        for socket in fs::read_dir(&self.0).into_iter().flatten().flatten() {
            let _ = run(Command::new("ssh")
                .arg("-o")
                .arg(format!("ControlPath={}", socket.path().display()))
                .args(["-O", "exit", "127.0.0.1"]));
        }
    }
}

/// A playbook (ping, command, copy, template, fetch) against an inventory that
/// reaches the target through the bastion, with pipelining off and on.
#[test]
fn ansible_playbook_runs_with_and_without_pipelining() {
    let f = fixture();
    let work = f.workdir("ansible");
    let user = f.world.target_user();
    fs::write(
        work.join("inventory.yml"),
        format!(
            "all:\n  hosts:\n    target:\n      ansible_host: 127.0.0.1\n      ansible_port: {port}\n      \
             ansible_ssh_private_key_file: {key}\n      \
             ansible_ssh_common_args: \"-F /dev/null -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o IdentitiesOnly=yes -o User={user}\"\n      \
             ansible_python_interpreter: /usr/bin/python3\n",
            port = f.world.bastion.port(),
            key = f.key().display(),
        ),
    )
    .unwrap();
    fs::write(
        work.join("greeting.j2"),
        "hello {{ who }} from {{ inventory_hostname }}\n",
    )
    .unwrap();
    fs::write(work.join("ansible.cfg"), "[defaults]\n").unwrap();
    for pipelining in ["False", "True"] {
        let run_dir = work.join(format!("pipelining-{pipelining}"));
        fs::create_dir_all(&run_dir).unwrap();
        fs::write(work.join("playbook.yml"), playbook(&run_dir, &user)).unwrap();
        let _masters = Masters(run_dir.join("cp"));
        let out = run_with_timeout(
            Command::new(python().with_file_name("ansible-playbook"))
                .current_dir(&work)
                .args(["-i", "inventory.yml", "playbook.yml"])
                .env("LC_ALL", "C.UTF-8")
                .env("ANSIBLE_CONFIG", work.join("ansible.cfg"))
                .env("ANSIBLE_HOME", run_dir.join("home"))
                .env("ANSIBLE_LOCAL_TEMP", run_dir.join("tmp"))
                .env("ANSIBLE_REMOTE_TEMP", run_dir.join("remote-tmp"))
                .env("ANSIBLE_SSH_CONTROL_PATH_DIR", run_dir.join("cp"))
                .env("ANSIBLE_PIPELINING", pipelining)
                .env("ANSIBLE_NOCOLOR", "1"),
            None,
            std::time::Duration::from_secs(300),
        );
        f.assert_ok(&out, &format!("ansible-playbook, pipelining {pipelining}"));
        assert!(text(&out.stdout).contains("failed=0"), "{}", describe(&out));
        assert_eq!(
            fs::read_to_string(run_dir.join("copied.txt")).unwrap(),
            "copied\n"
        );
        let greeting = "hello portcullis from target\n";
        assert_eq!(
            fs::read_to_string(run_dir.join("greeting.txt")).unwrap(),
            greeting
        );
        assert_eq!(
            fs::read_to_string(run_dir.join("fetched.txt")).unwrap(),
            greeting
        );
    }
}

/// The playbook for one run, writing into `dir` (on the target and, for fetch, on
/// the controller: both are this machine).
fn playbook(dir: &Path, user: &str) -> String {
    let login = user.split('@').next().unwrap_or(user);
    format!(
        r#"- hosts: all
  gather_facts: false
  vars:
    who: portcullis
  tasks:
    - ansible.builtin.ping:
    - ansible.builtin.command: id -un
      register: whoami
    - ansible.builtin.assert:
        that: whoami.stdout == "{login}"
    - ansible.builtin.copy:
        content: "copied\n"
        dest: {dir}/copied.txt
    - ansible.builtin.template:
        src: greeting.j2
        dest: {dir}/greeting.txt
    - ansible.builtin.fetch:
        src: {dir}/greeting.txt
        dest: {dir}/fetched.txt
        flat: true
"#,
        dir = dir.display()
    )
}

// ---------------------------------------------------------------------------
// git and sshfs
// ---------------------------------------------------------------------------

/// `GIT_SSH_COMMAND` for alice through `bastion`.
fn git_ssh(f: &Fixture, bastion: &Bastion) -> String {
    let mut ssh = vec!["ssh".to_string()];
    ssh.extend(f.alice().options().iter().map(|o| shell_quote(o)));
    ssh.extend(["-p".to_string(), bastion.port().to_string()]);
    ssh.join(" ")
}

/// Runs git in `dir` through `bastion`, tracing the protocol to stderr.
fn git(f: &Fixture, bastion: &Bastion, dir: &Path, args: &[&str]) -> Output {
    run(Command::new("git")
        .current_dir(dir)
        .args([
            "-c",
            "user.name=alice",
            "-c",
            "user.email=alice@example.com",
        ])
        .args(args)
        .env("GIT_SSH_COMMAND", git_ssh(f, bastion))
        .env("GIT_TRACE_PACKET", "1"))
}

/// `git clone` and `git push` over ssh through the bastion, in protocol v2: git
/// passes `GIT_PROTOCOL=version=2` as an environment variable, which the default
/// `accept_env` lets through (a bastion whose `accept_env` leaves it out falls back
/// to protocol v0).
#[test]
fn git_clones_and_pushes_in_protocol_v2() {
    let f = fixture();
    let work = f.workdir("git");
    let origin = work.join("origin.git");
    f.assert_ok(
        &run(Command::new("git")
            .args(["init", "-q", "--bare"])
            .arg(&origin)),
        "git init",
    );
    let url = format!("{}@127.0.0.1:{}", f.world.target_user(), origin.display());

    let out = git(&f, &f.world.bastion, &work, &["clone", &url, "clone"]);
    f.assert_ok(&out, "git clone");
    assert!(
        text(&out.stderr).contains("clone< version 2"),
        "protocol v2 was not negotiated:\n{}",
        describe(&out)
    );
    let clone = work.join("clone");
    fs::write(clone.join("README"), "pushed through portcullis\n").unwrap();
    f.assert_ok(
        &git(&f, &f.world.bastion, &clone, &["add", "README"]),
        "git add",
    );
    f.assert_ok(
        &git(&f, &f.world.bastion, &clone, &["commit", "-qm", "one"]),
        "git commit",
    );
    let out = git(
        &f,
        &f.world.bastion,
        &clone,
        &["push", "origin", "HEAD:main"],
    );
    f.assert_ok(&out, "git push");
    let shown = run(Command::new("git")
        .arg("--git-dir")
        .arg(&origin)
        .args(["show", "main:README"]));
    assert_eq!(text(&shown.stdout), "pushed through portcullis\n");

    let out = git(&f, &f.legacy, &work, &["clone", &url, "clone-v0"]);
    f.assert_ok(
        &out,
        "git clone through a bastion without GIT_PROTOCOL in accept_env",
    );
    assert!(
        !text(&out.stderr).contains("version 2"),
        "{}",
        describe(&out)
    );
}

/// Unmounts on drop, also when the test fails.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = run(Command::new("fusermount3").arg("-u").arg("-z").arg(&self.0));
    }
}

#[test]
fn sshfs_mounts_reads_writes_and_links() {
    if !Path::new("/dev/fuse").exists() {
        eprintln!("skipped sshfs_mounts_reads_writes_and_links: /dev/fuse does not exist here");
        return;
    }
    let f = fixture();
    let work = f.workdir("sshfs");
    let (remote, mountpoint) = (work.join("remote"), work.join("mnt"));
    fs::create_dir_all(&remote).unwrap();
    fs::create_dir_all(&mountpoint).unwrap();
    fs::write(remote.join("there.txt"), "from the target\n").unwrap();
    let out = run(Command::new("sshfs")
        .arg("-o")
        .arg(format!("ssh_command={}", git_ssh(&f, &f.world.bastion)))
        .arg(format!(
            "{}@127.0.0.1:{}",
            f.world.target_user(),
            remote.display()
        ))
        .arg(&mountpoint));
    f.assert_ok(&out, "sshfs");
    let _mount = Mount(mountpoint.clone());
    // Through child processes with a timeout: a hung mount must fail the test,
    // not hang it.
    let sh = |script: &str| {
        run(Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(&mountpoint))
    };
    let out = sh("cat there.txt && echo written > here.txt && ln -s there.txt link && ls");
    f.assert_ok(&out, "file operations on the sshfs mount");
    assert!(
        text(&out.stdout).starts_with("from the target\n"),
        "{}",
        describe(&out)
    );
    assert_eq!(
        fs::read_to_string(remote.join("here.txt")).unwrap(),
        "written\n"
    );
    assert_eq!(
        fs::read_link(remote.join("link")).unwrap(),
        Path::new("there.txt")
    );
}
