//! The on-disk shape of `users.toml`, `targets.toml` and `flows.toml`.
//!
//! Every value that validation may complain about is `Spanned`, so the error can name
//! its line. Unknown keys are refused: a typo like `host_kye` must not silently
//! disable host key pinning.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsersFile {
    #[serde(default)]
    pub users: BTreeMap<Spanned<String>, RawUser>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUser {
    #[serde(default)]
    pub keys: Vec<Spanned<String>>,
    #[serde(default)]
    pub groups: Vec<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetsFile {
    #[serde(default)]
    pub targets: BTreeMap<Spanned<String>, RawTarget>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTarget {
    pub address: Spanned<String>,
    pub host_key: Spanned<String>,
    pub logins: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub auth: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowsFile {
    #[serde(default)]
    pub flows: Vec<Spanned<RawFlow>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFlow {
    pub name: Spanned<String>,
    #[serde(default, rename = "match")]
    pub matches: BTreeMap<String, String>,
    #[serde(default)]
    pub requesters: Vec<Spanned<String>>,
    #[serde(default)]
    pub approvers: Vec<Spanned<String>>,
    pub approvals: Option<Spanned<i64>>,
    pub max_ttl: Option<Spanned<String>>,
    pub pending_ttl: Option<Spanned<String>>,
    pub step_up: Option<Spanned<String>>,
    #[serde(default)]
    pub shell: bool,
    #[serde(default)]
    pub auto_approve: bool,
    #[serde(default)]
    pub commands: Vec<Spanned<String>>,
}
