//! Exec commands against command patterns: never a panic, and a command with shell
//! control syntax never matches.
#![no_main]
use libfuzzer_sys::fuzz_target;
use portcullis::grant::scope::{command_matches, plain_words_problem};

fuzz_target!(|data: (&str, &str)| {
    let (pattern, command) = data;
    let matched = command_matches(pattern, command);
    if ["; ", "&&", "||", "|", "`", "$(", ">", "<", "\n"]
        .iter()
        .any(|op| command.contains(op))
    {
        assert!(!matched, "{command:?} matched {pattern:?}");
        assert!(plain_words_problem(command).is_some());
    }
});
