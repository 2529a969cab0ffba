//! Policy files: any content loads or yields errors, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: (&str, &str, &str)| {
    let dir = std::env::temp_dir().join(format!("portcullis-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("users.toml"), data.0).unwrap();
    std::fs::write(dir.join("targets.toml"), data.1).unwrap();
    std::fs::write(dir.join("flows.toml"), data.2).unwrap();
    let _ = portcullis::policy::load_dir(&dir);
});
