//! A private tmux server: a real terminal whose size the test controls.

use super::*;

/// A private tmux server, giving a command a real terminal whose size the test
/// controls. Killed on drop.
pub struct Tmux {
    socket: PathBuf,
}

impl Tmux {
    /// Starts a detached `cols`×`rows` session running `shell_line`. The pane
    /// stays open after the command ends so its screen can still be captured.
    pub fn start(dir: &Path, cols: u16, rows: u16, shell_line: &str) -> Tmux {
        let tmux = Tmux {
            socket: dir.join("tmux.sock"),
        };
        let keep_open = format!("{shell_line}; echo \"[exited $?]\"; sleep 60");
        let out = run(tmux
            .command()
            .args([
                "new-session",
                "-d",
                "-x",
                &cols.to_string(),
                "-y",
                &rows.to_string(),
            ])
            .arg(keep_open));
        assert_success(&out, "tmux new-session");
        tmux
    }

    /// `tmux -S SOCKET -f /dev/null`, so no user configuration interferes.
    fn command(&self) -> Command {
        let mut cmd = Command::new("tmux");
        cmd.arg("-S").arg(&self.socket).args(["-f", "/dev/null"]);
        cmd
    }

    /// Resizes the window, as a user resizing their terminal would.
    pub fn resize(&self, cols: u16, rows: u16) {
        let out = run(self.command().args([
            "resize-window",
            "-x",
            &cols.to_string(),
            "-y",
            &rows.to_string(),
        ]));
        assert_success(&out, "tmux resize-window");
    }

    /// Types `keys` (tmux key names such as `Enter` or `C-c`, or literal text with
    /// `literal`).
    pub fn send(&self, keys: &str, literal: bool) {
        let mut cmd = self.command();
        cmd.args(["send-keys", "-t", "0"]);
        if literal {
            cmd.arg("-l");
        }
        let out = run(cmd.arg(keys));
        assert_success(&out, "tmux send-keys");
    }

    /// Waits until the screen shows `needle`; returns whether it did.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.screen().contains(needle))
    }

    /// The visible text of the pane, for failure messages.
    pub fn screen(&self) -> String {
        let out = run(self.command().args(["capture-pane", "-p"]));
        text(&out.stdout)
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self
            .command()
            .arg("kill-server")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
