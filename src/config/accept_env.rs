//! Which environment variables a client may pass on to targets: `accept_env` in
//! portcullis.toml, in sshd's `AcceptEnv` syntax.
//!
//! The target's own sshd filters again with its `AcceptEnv`; this list is the
//! bastion's side of it. Some variables change what a shell or the dynamic linker
//! runs (`BASH_ENV`, `LD_PRELOAD`, exported bash functions…): passing one would let a
//! command grant run something other than its command, so no pattern may match them.

/// The default list: locale, time zone, and git's protocol version (git sends
/// `GIT_PROTOCOL=version=2` to speak protocol v2).
pub const DEFAULT_ACCEPT_ENV: &str = "LANG LC_* TZ GIT_PROTOCOL";

/// How many patterns `accept_env` may hold, and how long one may be.
const MAX_PATTERNS: usize = 64;
const MAX_PATTERN_LEN: usize = 128;

/// Names no pattern may match: they change what runs on the target (the shell's
/// start-up files, options and functions, the search path, the dynamic linker) or
/// who the session is, or what a target's forced command reads as the client's
/// command. `BASH_FUNC_x%%` stands for bash's exported functions.
const NEVER_PASSED: &[&str] = &[
    "BASH_ENV",
    "BASH_FUNC_x%%",
    "BASHOPTS",
    "ENV",
    "HOME",
    "IFS",
    "LD_AUDIT",
    "LD_LIBRARY_PATH",
    "LD_PRELOAD",
    "LOGNAME",
    "PATH",
    "PROMPT_COMMAND",
    "PS4",
    "SHELL",
    "SHELLOPTS",
    "SSH_ORIGINAL_COMMAND",
    "USER",
    "ZDOTDIR",
];

/// The patterns of `accept_env`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptEnv {
    patterns: Vec<String>,
}

impl Default for AcceptEnv {
    fn default() -> AcceptEnv {
        AcceptEnv::parse(DEFAULT_ACCEPT_ENV).expect("the default accept_env is valid")
    }
}

impl AcceptEnv {
    /// Parses whitespace-separated patterns (`*` and `?` are wildcards), refusing
    /// any that would pass a variable in [`NEVER_PASSED`]. An empty string passes
    /// nothing.
    pub fn parse(text: &str) -> Result<AcceptEnv, String> {
        let patterns: Vec<String> = text.split_whitespace().map(str::to_string).collect();
        if patterns.len() > MAX_PATTERNS {
            return Err(format!(
                "accept_env has {} patterns; at most {MAX_PATTERNS}",
                patterns.len()
            ));
        }
        for pattern in &patterns {
            check(pattern)?;
        }
        Ok(AcceptEnv { patterns })
    }

    /// Whether a variable called `name` may be passed on.
    pub fn allows(&self, name: &str) -> bool {
        self.patterns
            .iter()
            .any(|pattern| matches(pattern.as_bytes(), name.as_bytes()))
    }
}

fn check(pattern: &str) -> Result<(), String> {
    if pattern.len() > MAX_PATTERN_LEN {
        return Err(format!(
            "accept_env pattern '{}…' is longer than {MAX_PATTERN_LEN} characters",
            crate::display::escape(&pattern.chars().take(40).collect::<String>())
        ));
    }
    if !pattern.bytes().all(|b| b.is_ascii_graphic() && b != b'=') {
        return Err(format!(
            "accept_env pattern '{}' may hold only printable ASCII other than '=' (variable names, * and ?)",
            crate::display::escape(pattern)
        ));
    }
    if let Some(name) = NEVER_PASSED
        .iter()
        .find(|name| matches(pattern.as_bytes(), name.as_bytes()))
    {
        return Err(format!(
            "accept_env pattern '{pattern}' would pass {name}, which changes what runs on the target; list the variables you need instead (e.g. \"{DEFAULT_ACCEPT_ENV}\")"
        ));
    }
    Ok(())
}

/// sshd's `match_pattern`: `*` matches any run of characters, `?` any one. Runs in
/// O(pattern × name) time whatever the input (one backtracking point, the last `*`).
fn matches(pattern: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, n));
                p += 1;
            }
            Some(&c) if c == b'?' || c == name[n] => {
                p += 1;
                n += 1;
            }
            _ => match star {
                Some((star_p, star_n)) => {
                    p = star_p + 1;
                    n = star_n + 1;
                    star = Some((star_p, star_n + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_locale_time_zone_and_git_protocol() {
        let accept = AcceptEnv::default();
        for name in ["LANG", "LC_ALL", "LC_CTYPE", "TZ", "GIT_PROTOCOL"] {
            assert!(accept.allows(name), "{name}");
        }
        for name in [
            "LC",
            "LANGUAGE",
            "GIT_DIR",
            "BASH_ENV",
            "LD_PRELOAD",
            "",
            "lang",
        ] {
            assert!(!accept.allows(name), "{name}");
        }
    }

    #[test]
    fn wildcards_follow_sshd() {
        assert!(matches(b"A?C", b"ABC"));
        assert!(!matches(b"A?C", b"AC"));
        assert!(matches(b"*_X_*", b"A_X_B"));
        assert!(matches(b"*", b""));
        assert!(!matches(b"", b"A"));
        assert!(matches(b"A*B*C", b"AxxBxxBxxC"));
        assert!(!matches(b"A*B*C", b"AxxBxxD"));
        // Many stars against a long near-miss stays quick (no exponential backtracking).
        let name = vec![b'a'; 4000];
        assert!(!matches(b"*a*a*a*a*a*a*a*a*b", &name));
    }

    #[test]
    fn patterns_that_would_pass_what_changes_execution_are_refused() {
        for pattern in [
            "*",
            "B*",
            "L*",
            "LD_*",
            "*PATH",
            "PAT?",
            "BASH_FUNC_*",
            "*_ENV",
        ] {
            let err = AcceptEnv::parse(&format!("LANG {pattern}")).unwrap_err();
            assert!(err.contains("changes what runs"), "{pattern}: {err}");
        }
        assert!(AcceptEnv::parse("LC_* GIT_PROTOCOL TERM_PROGRAM").is_ok());
    }

    #[test]
    fn odd_patterns_are_refused_with_what_to_write() {
        assert!(AcceptEnv::parse("LANG=C").unwrap_err().contains("'='"));
        assert!(AcceptEnv::parse("LA\u{1b}NG")
            .unwrap_err()
            .contains("\\x1b"));
        assert!(AcceptEnv::parse(&"A".repeat(200))
            .unwrap_err()
            .contains("longer"));
        let many: Vec<String> = (0..65).map(|i| format!("V{i}")).collect();
        assert!(AcceptEnv::parse(&many.join(" "))
            .unwrap_err()
            .contains("at most 64"));
        assert_eq!(AcceptEnv::parse("").unwrap().patterns.len(), 0);
    }
}
