//! Memory under load: what the bastion's RSS does as it records gigabytes, holds
//! sessions whose clients read nothing, and exports a large recording.
//!
//! ```text
//! cargo bench --bench soak
//! ```
//!
//! Starts a real sshd target and the portcullis bastion (release build, default
//! limits) on loopback, then, with the real `ssh` client:
//!
//! 1. records `SOAK_GIB` GiB (default 4) of random input, `SOAK_SESSION_MIB` MiB
//!    (default 512) per session piped into `cat > /dev/null`, printing the RSS after
//!    each session and the bytes stored per byte recorded (goal: RSS under 200 MiB),
//!    then once the recordings are sealed;
//! 2. holds `SOAK_STALLED` sessions (default 100) whose client never reads while the
//!    target writes, printing the RSS (goal: under 100 MiB + 1 MiB per session);
//! 3. exports a `SOAK_EXPORT_MIB` MiB session (default 1024) and prints how far the
//!    bastion's peak RSS rose above its resident size before (goal: under 100 MiB).

#[path = "../tests/common/mod.rs"]
pub mod common;

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{
    cpu_seconds, du_bytes, env_number, login_user, quote_words, random_file, stat_fields,
    status_kib, text, wait_until, World, CONTROL_USER,
};

fn main() {
    let gib: u64 = env_number("SOAK_GIB", 4);
    let session_mib: u64 = env_number("SOAK_SESSION_MIB", 512);
    let stalled: usize = env_number("SOAK_STALLED", 100);
    let export_mib: u64 = env_number("SOAK_EXPORT_MIB", 1024);
    let w = World::start();
    let pid = w.bastion.pid();
    let target = format!("{}@local", login_user());
    let mib = |field: &str| status_kib(pid, field) / 1024;
    println!("bastion RSS at start: {} MiB", mib("VmRSS:"));

    // 1. Recording gigabytes.
    let input = w.path("random");
    random_file(&input, (session_mib << 20) as usize);
    let sessions = (gib << 10) / session_mib;
    let started = Instant::now();
    let (cpu_before, faults_before) = (cpu_seconds(pid), minor_faults(pid));
    for n in 1..=sessions {
        record_file(&w, &target, &input);
        println!(
            "recorded {:>5} MiB: RSS {:>4} MiB",
            n * session_mib,
            mib("VmRSS:")
        );
    }
    let stored = du_bytes(&w.bastion.data_dir());
    println!(
        "bastion while recording: {:.2} s of CPU and {:.0} minor page faults per GiB",
        (cpu_seconds(pid) - cpu_before) / gib as f64,
        (minor_faults(pid) - faults_before) as f64 / gib as f64
    );
    println!(
        "recorded {gib} GiB in {:.0} s: RSS {} MiB (goal < 200), peak {} MiB; data dir {:.2} bytes per byte recorded",
        started.elapsed().as_secs_f64(),
        mib("VmRSS:"),
        mib("VmHWM:"),
        stored as f64 / (gib << 30) as f64
    );

    // What stays once the last session's recording is sealed and the allocator
    // has had two trims to hand back what the recording freed.
    let sealed = wait_until(Duration::from_secs(60), || {
        w.ok(&w.dave, &["sessions", "--active", "--json"]).trim() == "[]"
    });
    std::thread::sleep(portcullis::allocator::TRIM_EVERY * 2);
    println!(
        "once every recording was sealed{}: RSS {} MiB",
        if sealed {
            ""
        } else {
            " (still live after 60 s)"
        },
        mib("VmRSS:")
    );

    // 2. Sessions whose clients read nothing.
    let before = mib("VmRSS:");
    let held: Vec<Child> = (0..stalled)
        .map(|_| {
            w.alice
                .ssh_command(&target, &[], &["cat /dev/zero"])
                .stdin(Stdio::null())
                .stdout(Stdio::piped()) // never read
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let live = || w.bastion.log().matches("session started").count() as u64;
    let all_started = wait_until(Duration::from_secs(120), || {
        live() >= sessions + stalled as u64
    });
    std::thread::sleep(Duration::from_secs(5)); // every window and pipe fills
    let rss = mib("VmRSS:");
    println!(
        "{stalled} stalled sessions{}: RSS {rss} MiB (was {before}; +{:.2} MiB per session; goal < {} MiB)",
        if all_started {
            ""
        } else {
            " (not all started)"
        },
        rss.saturating_sub(before) as f64 / stalled.max(1) as f64,
        100 + stalled
    );
    for mut child in held {
        let _ = child.kill();
        let _ = child.wait();
    }

    // 3. Exporting a large session.
    random_file(&input, (export_mib << 20) as usize);
    record_file(&w, &target, &input);
    std::thread::sleep(Duration::from_secs(2));
    let listed: Vec<serde_json::Value> =
        serde_json::from_str(&w.ok(&w.dave, &["sessions", "--json"])).unwrap();
    let id = listed.last().unwrap()["id"].to_string();
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
    let before = mib("VmRSS:");
    let started = Instant::now();
    let out = w
        .dave
        .ssh_command(CONTROL_USER, &[], &[&quote_words(&["export", &id])])
        .stdout(Stdio::piped())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    println!(
        "export of a {export_mib} MiB session ({} MiB of asciicast) in {:.1} s: peak {} MiB above the {before} MiB before (goal < 100)",
        out.stdout.len() >> 20,
        started.elapsed().as_secs_f64(),
        mib("VmHWM:").saturating_sub(before)
    );
}

/// One recorded session that pipes `file` into `cat > /dev/null` on the target.
fn record_file(w: &World, target: &str, file: &std::path::Path) {
    let out = w
        .alice
        .ssh_command(target, &[], &["cat > /dev/null"])
        .stdin(std::fs::File::open(file).unwrap())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// Minor page faults a process has taken so far (pages it touched for the first
/// time: what an allocator that hands memory back and takes it again pays).
fn minor_faults(pid: u32) -> u64 {
    stat_fields(pid)
        .get(7)
        .and_then(|f| f.parse().ok())
        .unwrap_or(0)
}
