//! The data directory: created private, refused when others can read it, held by
//! one `serve` at a time (a pid file under `flock`), and the channel through which
//! `portcullis reload` learns how the running bastion took its SIGHUP.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rustix::fs::{flock, FlockOperation};
use serde::{Deserialize, Serialize};

/// The pid of the `serve` holding the data directory; locked while it runs.
pub const PID_FILE: &str = "portcullis.pid";

/// The outcome of the running bastion's last policy load (at start or SIGHUP).
pub const RELOAD_FILE: &str = "reload.json";

/// Makes every file and directory this process creates private to its owner,
/// whatever umask it was started with: the data directory holds keys, the
/// database and recordings (keystrokes typed at password prompts included).
pub fn private_umask() {
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
}

/// Creates the file `path` with `bytes`, mode 0600, and syncs it; refuses to
/// replace a file that exists (a key must never be overwritten by accident).
pub fn create_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    Ok(())
}

/// Creates `dir` (mode 0700) when it is missing; refuses one that others can
/// read or enter, or that this user cannot write, with the fix in the message.
pub fn prepare(dir: &Path) -> Result<()> {
    match fs::metadata(dir) {
        Ok(meta) if !meta.is_dir() => bail!(
            "data dir {} is not a directory; point data_dir at a directory",
            dir.display()
        ),
        Ok(_) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|err| unwritable(dir, &err))?;
        }
        Err(err) => {
            return Err(anyhow::anyhow!(err))
                .with_context(|| format!("cannot read data dir {}", dir.display()))
        }
    }
    let meta = fs::metadata(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "data dir {} is open to other users (mode {mode:o}); it holds keys and recordings. Run: chmod 700 {}",
            dir.display(),
            shell_word(dir)
        );
    }
    let writable = rustix::fs::access(
        dir,
        rustix::fs::Access::WRITE_OK | rustix::fs::Access::EXEC_OK,
    );
    if let Err(err) = writable {
        return Err(unwritable(dir, &std::io::Error::from(err)));
    }
    Ok(())
}

/// What to say when the data directory cannot be created or written.
fn unwritable(dir: &Path, err: &std::io::Error) -> anyhow::Error {
    let uid = rustix::process::getuid().as_raw();
    // The directory itself, or the nearest parent that exists, says who may write.
    let existing = dir.ancestors().find(|p| p.exists()).unwrap_or(dir);
    let owner = fs::metadata(existing)
        .map(|m| {
            format!(
                "{} belongs to uid {} (mode {:o})",
                existing.display(),
                m.uid(),
                m.mode() & 0o777
            )
        })
        .unwrap_or_default();
    anyhow::anyhow!(
        "data dir {} is not writable by this user (uid {uid}): {err}; {owner}. Run portcullis as that directory's owner, point data_dir elsewhere, or give it to this user: chown -R {uid} {}",
        dir.display(),
        shell_word(existing)
    )
}

/// A path as one word for a pasted shell command.
fn shell_word(path: &Path) -> String {
    let text = path.display().to_string();
    if !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:@,+%".contains(&b))
    {
        text
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

/// The running bastion's hold on its data directory: an exclusive `flock` on the
/// pid file, released when the process ends however it ends.
pub struct Lock {
    file: File,
    path: PathBuf,
}

impl Lock {
    /// Takes the data directory for this process, or says which process has it.
    pub fn acquire(dir: &Path) -> Result<Lock> {
        let path = dir.join(PID_FILE);
        loop {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)
                .map_err(|err| match err.raw_os_error() {
                    Some(libc::ELOOP) => anyhow::anyhow!(
                        "{} is a symbolic link; portcullis keeps its lock file in the data dir itself. Remove the link",
                        path.display()
                    ),
                    _ => unwritable(dir, &err),
                })?;
            if let Err(err) = flock(&file, FlockOperation::NonBlockingLockExclusive) {
                if err == rustix::io::Errno::WOULDBLOCK {
                    let mut text = String::new();
                    let _ = file.read_to_string(&mut text);
                    let pid = text.trim();
                    let pid = if pid.is_empty() { "unknown" } else { pid };
                    bail!("another portcullis (pid {pid}) is using {}", dir.display());
                }
                return Err(std::io::Error::from(err))
                    .with_context(|| format!("cannot lock {}", path.display()));
            }
            // The holder we waited out removes the file before unlocking it: a lock
            // on the removed file would let the next `serve` lock a new one too.
            if !is_at(&file, &path) {
                continue;
            }
            file.set_len(0)?;
            file.rewind()?;
            writeln!(file, "{}", std::process::id())?;
            file.sync_all()?;
            return Ok(Lock { file, path });
        }
    }
}

/// Whether `file` is still the file at `path` (not one removed since it was opened).
fn is_at(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), fs::metadata(path)) {
        (Ok(open), Ok(named)) => open.dev() == named.dev() && open.ino() == named.ino(),
        _ => false,
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        // Still locked here, so no other serve reads an empty file meanwhile.
        let _ = fs::remove_file(&self.path);
        let _ = flock(&self.file, FlockOperation::Unlock);
    }
}

/// The pid of the `serve` that holds `dir`, if one does.
pub fn serving_pid(dir: &Path) -> Result<Option<u32>> {
    let path = dir.join(PID_FILE);
    let mut file = match File::open(&path) {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => {
            return Err(anyhow::anyhow!(err))
                .with_context(|| format!("cannot read {}", path.display()))
        }
    };
    match flock(&file, FlockOperation::NonBlockingLockShared) {
        // Nobody holds it: a stale file from a bastion that was killed.
        Ok(()) => Ok(None),
        Err(err) if err == rustix::io::Errno::WOULDBLOCK => {
            let mut text = String::new();
            file.read_to_string(&mut text)?;
            Ok(text.trim().parse().ok())
        }
        Err(err) => Err(std::io::Error::from(err))
            .with_context(|| format!("cannot check {}", path.display())),
    }
}

/// How the running bastion took its last policy load.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReloadStatus {
    /// The bastion that wrote it.
    pub pid: u32,
    /// 0 for the load at start, then one more per SIGHUP.
    pub seq: u64,
    pub ok: bool,
    /// What `policy check` would say: counts on success, errors on failure.
    pub summary: String,
    pub warnings: Vec<String>,
}

impl ReloadStatus {
    /// Replaces the status file in one step, so a reader never sees half of it.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(RELOAD_FILE);
        let temp = dir.join(format!("{RELOAD_FILE}.tmp"));
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&temp)?;
        file.write_all(serde_json::to_string(self)?.as_bytes())?;
        file.sync_all()?;
        fs::rename(&temp, &path)?;
        Ok(())
    }

    pub fn read(dir: &Path) -> Option<ReloadStatus> {
        let text = fs::read_to_string(dir.join(RELOAD_FILE)).ok()?;
        serde_json::from_str(&text).ok()
    }
}

/// `portcullis reload`: signals the bastion serving `dir` and waits for its
/// verdict on the policy.
pub fn reload(dir: &Path, timeout: Duration) -> Result<ReloadStatus> {
    let Some(pid) = serving_pid(dir)? else {
        bail!(
            "no portcullis is serving {} (no locked {PID_FILE} there); start it with `portcullis serve`, which reads the policies at start",
            dir.display()
        );
    };
    let before = ReloadStatus::read(dir)
        .filter(|status| status.pid == pid)
        .map_or(0, |status| status.seq);
    let target = rustix::process::Pid::from_raw(pid as i32)
        .with_context(|| format!("bad pid {pid} in {}", dir.join(PID_FILE).display()))?;
    rustix::process::kill_process(target, rustix::process::Signal::HUP)
        .map_err(std::io::Error::from)
        .with_context(|| format!("cannot signal portcullis (pid {pid})"))?;
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = ReloadStatus::read(dir) {
            if status.pid == pid && status.seq > before {
                return Ok(status);
            }
        }
        if Instant::now() >= deadline {
            bail!(
                "portcullis (pid {pid}) did not report on the reload within {}s; see its log",
                timeout.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_data_dir_is_private_and_an_open_one_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a/data");
        prepare(&dir).unwrap();
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let err = prepare(&dir).unwrap_err().to_string();
        assert!(
            err.contains("mode 755") && err.contains(&format!("chmod 700 {}", dir.display())),
            "{err}"
        );
    }

    #[test]
    fn one_holder_at_a_time_and_the_pid_is_named() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(serving_pid(dir.path()).unwrap(), None);
        let lock = Lock::acquire(dir.path()).unwrap();
        // flock locks belong to the open file: a second open conflicts even here.
        let err = Lock::acquire(dir.path()).err().unwrap().to_string();
        assert_eq!(
            err,
            format!(
                "another portcullis (pid {}) is using {}",
                std::process::id(),
                dir.path().display()
            )
        );
        assert_eq!(serving_pid(dir.path()).unwrap(), Some(std::process::id()));
        drop(lock);
        assert_eq!(serving_pid(dir.path()).unwrap(), None);
        Lock::acquire(dir.path()).unwrap();
    }

    /// A link planted where the lock file goes would have the bastion create or
    /// lock a file elsewhere: refused, naming the link.
    #[test]
    fn the_lock_file_is_never_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere");
        std::os::unix::fs::symlink(&elsewhere, dir.path().join(PID_FILE)).unwrap();
        let err = Lock::acquire(dir.path()).err().unwrap().to_string();
        assert!(err.contains("is a symbolic link"), "{err}");
        assert!(!elsewhere.exists());
    }
}
