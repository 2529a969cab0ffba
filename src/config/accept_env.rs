//! Which environment variables a client may pass on to targets: `accept_env` in
//! portcullis.toml, in sshd's `AcceptEnv` syntax.
//!
//! The target's own sshd filters again with its `AcceptEnv`; this list is the
//! bastion's side of it. Some variables change what a shell, the dynamic linker or
//! the granted program itself runs (`BASH_ENV`, `LD_PRELOAD`, exported bash
//! functions, git's `GIT_CONFIG_*`, with which `git-upload-pack` runs any program as
//! its pack hook…): passing one would let a command grant run something other than
//! its command, so no pattern may match them.
//!
//! No list can name every variable some program reads as a command (systemd's
//! pager, tar's `TAR_OPTIONS`, npm's `npm_config_*`…), so the list only guards
//! shell grants, whose users could set any variable in their shell anyway. A session
//! that may run only granted commands gets a closed set instead: of what
//! `accept_env` allows, only the default list's variables ([`AcceptEnv::allows_for_commands`]).

/// The default list: locale, time zone, and git's protocol version (git sends
/// `GIT_PROTOCOL=version=2` to speak protocol v2).
pub const DEFAULT_ACCEPT_ENV: &str = "LANG LC_* TZ GIT_PROTOCOL";

/// What a session limited to granted commands may receive, whatever `accept_env`
/// allows: the language, the time zone and git's protocol version. glibc reads a
/// locale name as a name under its own directory, never as a path to load, and
/// `TZ` as time zone data; none of them names a program.
const FOR_COMMAND_GRANTS: &[&str] = &["LANG", "LC_*", "TZ", "GIT_PROTOCOL"];

/// How many patterns `accept_env` may hold, and how long one may be.
const MAX_PATTERNS: usize = 64;
const MAX_PATTERN_LEN: usize = 128;

/// Longest variable name passed on: real ones are short, and a client's name of
/// hundreds of KiB matched against 64 patterns would cost seconds of CPU.
const MAX_NAME_LEN: usize = 256;

/// Names no pattern may match: they change what runs on the target (the shell's
/// start-up files, options and prompts, the search path, a pager or editor that a
/// command starts, glibc's character-set modules and tunables) or who the session
/// is, or what a target's forced command reads as the client's command.
const NEVER_PASSED: &[&str] = &[
    "BASH_ENV",
    "BASHOPTS",
    "BASH_LOADABLES_PATH",
    "BROWSER",
    "EDITOR",
    "ENV",
    "EXINIT",
    "FPATH",
    "GCONV_PATH",
    "GETCONF_DIR",
    "GLIBC_TUNABLES",
    "HOME",
    "HOSTALIASES",
    "IFS",
    "INPUTRC",
    "JAVA_TOOL_OPTIONS",
    "JDK_JAVA_OPTIONS",
    "LOCPATH",
    "LOGNAME",
    "NLSPATH",
    "PAGER",
    "PATH",
    "PROMPT_COMMAND",
    "PS0",
    "PS1",
    "PS2",
    "PS4",
    "SHELL",
    "SHELLOPTS",
    "TERMCAP",
    "TERMINFO",
    "USER",
    "VIMINIT",
    "VISUAL",
    "ZDOTDIR",
    "_JAVA_OPTIONS",
];

/// Families of names no pattern may match, by prefix, with the members that are
/// harmless and may be named exactly. A family is refused whole because its
/// members keep growing with each release of the program that reads them.
const NEVER_PASSED_FAMILIES: &[Family] = &[
    Family {
        prefix: "BASH_FUNC_",
        why: "exported bash functions",
        harmless: &[],
    },
    Family {
        prefix: "BUNDLE_",
        why: "Bundler's Gemfile and settings",
        harmless: &[],
    },
    Family {
        prefix: "GEM_",
        why: "RubyGems' paths",
        harmless: &[],
    },
    Family {
        prefix: "GIT_",
        why: "git's configuration, hooks and helper programs (GIT_CONFIG_*, GIT_SSH_COMMAND, GIT_EXEC_PATH…)",
        harmless: &["GIT_PROTOCOL"],
    },
    Family {
        prefix: "LD_",
        why: "the dynamic linker's preloads and search paths",
        harmless: &[],
    },
    Family {
        prefix: "LESS",
        why: "less's input preprocessor, key bindings and options",
        harmless: &[],
    },
    Family {
        prefix: "MALLOC_",
        why: "glibc's allocator tunables",
        harmless: &[],
    },
    Family {
        prefix: "NODE_",
        why: "Node.js options and module paths",
        harmless: &[],
    },
    Family {
        prefix: "NPM_CONFIG_",
        why: "npm's settings, such as the script shell and Node.js options; npm reads them in any case",
        harmless: &[],
    },
    Family {
        prefix: "PERL",
        why: "Perl's options and module paths",
        harmless: &[],
    },
    Family {
        prefix: "PYTHON",
        why: "Python's start-up file and module paths",
        harmless: &[],
    },
    Family {
        prefix: "RSYNC_",
        why: "rsync's remote shell and connect programs",
        harmless: &[],
    },
    Family {
        prefix: "RUBY",
        why: "Ruby's options and library paths",
        harmless: &[],
    },
    Family {
        prefix: "SSH_",
        why: "SSH_ASKPASS runs a program, SSH_ORIGINAL_COMMAND is what a forced command reads as the client's command, SSH_CONNECTION says where the session comes from",
        harmless: &[],
    },
    Family {
        prefix: "SUDO_",
        why: "sudo's askpass and editor programs",
        harmless: &[],
    },
    Family {
        prefix: "SYSTEMD_",
        why: "systemd's pager and editor (SYSTEMD_PAGER runs any program)",
        harmless: &[],
    },
    Family {
        prefix: "TAR_",
        why: "GNU tar's options (TAR_OPTIONS can add --checkpoint-action=exec)",
        harmless: &[],
    },
    Family {
        prefix: "XDG_",
        why: "where programs (git among them) read their configuration",
        harmless: &[],
    },
];

/// Names starting with `prefix` in any case (npm reads `npm_config_*` and
/// `NPM_CONFIG_*` alike), refused but for `harmless` ones.
#[derive(Debug, Clone)]
struct Family {
    prefix: &'static str,
    why: &'static str,
    harmless: &'static [&'static str],
}

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

    /// Whether a variable called `name` may be passed on. A name must look like
    /// one (letters, digits and `_`, not led by a digit, at most [`MAX_NAME_LEN`]):
    /// `PATH=x` or a name with a NUL in it never reaches a target, whatever the
    /// target's sshd would make of it.
    pub fn allows(&self, name: &str) -> bool {
        is_variable_name(name)
            && self
                .patterns
                .iter()
                .any(|pattern| matches(pattern.as_bytes(), name.as_bytes()))
    }

    /// Whether `name` may be passed to a session that runs only granted commands:
    /// what [`AcceptEnv::allows`] and [`FOR_COMMAND_GRANTS`] both allow.
    pub fn allows_for_commands(&self, name: &str) -> bool {
        self.allows(name)
            && FOR_COMMAND_GRANTS
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
    if let Some(what) = never_passed_match(pattern) {
        return Err(format!(
            "accept_env pattern '{pattern}' would pass {what}, which changes what runs on the target; list the variables you need instead (e.g. \"{DEFAULT_ACCEPT_ENV}\")"
        ));
    }
    Ok(())
}

fn is_variable_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    name.len() <= MAX_NAME_LEN
        && bytes
            .next()
            .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// What `pattern` would pass that no pattern may: one of [`NEVER_PASSED`], or a
/// member of one of [`NEVER_PASSED_FAMILIES`] (a pattern with a wildcard that may
/// match a name starting with the family's prefix matches infinitely many, so
/// only a harmless member named exactly passes).
fn never_passed_match(pattern: &str) -> Option<String> {
    if let Some(name) = NEVER_PASSED
        .iter()
        .find(|name| matches(pattern.as_bytes(), name.as_bytes()))
    {
        return Some((*name).to_string());
    }
    let exact = !pattern.contains(['*', '?']);
    NEVER_PASSED_FAMILIES
        .iter()
        .find(|family| {
            may_start_with(pattern.as_bytes(), family.prefix.as_bytes())
                && !(exact && family.harmless.contains(&pattern))
        })
        .map(|family| format!("variables starting with {} ({})", family.prefix, family.why))
}

/// Whether some name that `pattern` matches starts with `prefix`, in any case. (Once the
/// prefix is spent, whatever is left of the pattern matches some rest.)
fn may_start_with(pattern: &[u8], prefix: &[u8]) -> bool {
    for (at, &wanted) in prefix.iter().enumerate() {
        match pattern.get(at) {
            Some(b'*') => return true,
            Some(&c) if c == b'?' || c.eq_ignore_ascii_case(&wanted) => {}
            _ => return false,
        }
    }
    true
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
    use proptest::prelude::*;

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
            "GIT_*",
            "GIT_CONFIG_*",
            "GIT_SSH_COMMAND",
            "G*",
            "SSH_*",
            "SSH_ORIGINAL_COMMAND",
            "PYTHON*",
            "XDG_CONFIG_HOME",
            "GLIBC_TUNABLES",
            "GCONV_PATH",
            "PS?",
            "?AGER",
            "SYSTEMD_PAGER",
            "TAR_OPTIONS",
            "T?R_OPTIONS",
            "npm_config_*",
            "NPM_CONFIG_NODE_OPTIONS",
            "LESSKEYIN",
            "BROWSER",
        ] {
            let err = AcceptEnv::parse(&format!("LANG {pattern}")).unwrap_err();
            assert!(err.contains("changes what runs"), "{pattern}: {err}");
        }
        assert!(AcceptEnv::parse("LC_* GIT_PROTOCOL TERM_PROGRAM COLORTERM").is_ok());
        let err = AcceptEnv::parse("GIT_PROTOCOL GIT_*").unwrap_err();
        assert!(err.contains("GIT_CONFIG_*"), "says why: {err}");
    }

    /// A name no pattern may pass: one of the list, or a family member that is not
    /// harmless (`prefix` + `rest`), always a well-formed name, so that what refuses
    /// it is the pattern check and not the name check.
    fn dangerous_name() -> impl Strategy<Value = String> {
        prop_oneof![
            proptest::sample::select(NEVER_PASSED).prop_map(str::to_string),
            (
                proptest::sample::select(NEVER_PASSED_FAMILIES),
                "[A-Z0-9_]{0,10}",
                any::<bool>()
            )
                .prop_map(|(family, rest, lower)| {
                    let prefix = if lower {
                        family.prefix.to_ascii_lowercase()
                    } else {
                        family.prefix.to_string()
                    };
                    format!("{prefix}{rest}")
                })
                .prop_filter("a harmless member", |name| {
                    !NEVER_PASSED_FAMILIES
                        .iter()
                        .any(|family| family.harmless.contains(&name.as_str()))
                }),
        ]
    }

    /// `name` with some characters turned into `?`, cut short and ended with `*`,
    /// or led by `*`: the near misses an operator could write.
    fn pattern_for(name: &str, marks: &[u8], cut: usize, lead: bool) -> String {
        let mut pattern: String = name
            .chars()
            .zip(marks.iter().cycle())
            .map(|(c, &mark)| if mark % 5 == 0 { '?' } else { c })
            .collect();
        if cut < pattern.len() {
            pattern.truncate(cut);
            pattern.push('*');
        }
        if lead {
            pattern.insert(0, '*');
        }
        pattern
    }

    proptest! {
        /// Whatever pattern is accepted, none passes a name that changes what runs.
        #[test]
        fn no_accepted_pattern_passes_a_dangerous_name(
            name in dangerous_name(),
            marks in proptest::collection::vec(any::<u8>(), 1..8),
            cut in 0usize..24,
            lead in any::<bool>(),
            others in "[A-Z_]{1,6}",
        ) {
            let pattern = pattern_for(&name, &marks, cut, lead);
            if let Ok(accept) = AcceptEnv::parse(&format!("LANG {others} {pattern}")) {
                prop_assert!(!accept.allows(&name), "'{pattern}' passes {name}");
            }
        }
    }

    #[test]
    fn names_that_are_not_variable_names_never_pass() {
        let accept = AcceptEnv::parse("LC_* PA*Z HOME?").unwrap();
        assert!(accept.allows("LC_ALL") && accept.allows("PAZ"));
        for name in [
            "LC_X=1",
            "LC_\0BASH_ENV",
            "PATH=Z",
            "HOME=",
            "LC_é",
            "1LC",
            "",
        ] {
            assert!(!accept.allows(name), "{name:?}");
        }
        let long = format!("LC_{}", "A".repeat(MAX_NAME_LEN));
        assert!(!accept.allows(&long));
    }

    #[test]
    fn a_command_grant_gets_only_language_time_zone_and_git_protocol() {
        let accept = AcceptEnv::parse("LANG LC_* TZ COLORTERM PROBE_MODE").unwrap();
        for name in ["LANG", "LC_ALL", "TZ"] {
            assert!(accept.allows_for_commands(name), "{name}");
        }
        for name in ["COLORTERM", "PROBE_MODE"] {
            assert!(
                accept.allows(name) && !accept.allows_for_commands(name),
                "{name}"
            );
        }
        // Never more than accept_env itself allows.
        assert!(!accept.allows_for_commands("GIT_PROTOCOL"));
        assert_eq!(FOR_COMMAND_GRANTS.join(" "), DEFAULT_ACCEPT_ENV);
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
