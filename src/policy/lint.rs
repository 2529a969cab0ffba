//! What `policy check` warns about beyond errors: a policy that loads but cannot
//! work as its author meant. Flows nobody can approve, principals that name
//! nobody (a group nobody is in, often a misspelling), users in no group, and
//! targets that no flow matches.
//!
//! These are warnings, not errors, because they depend on who is in
//! `users.toml`: a reload refused for them would keep the previous policy, and
//! with it, say, the key of the last approver being removed. What can never work
//! whatever the users (more approvals than listed approvers) is an error of
//! `flows.toml` itself (see `load`).

use std::collections::BTreeSet;

use super::{Policy, GROUP_PREFIX};

impl Policy {
    /// Problems that are not errors, for `policy check`, serve and reload:
    /// [`Policy::warnings`] plus everything about who is (not) named, with the
    /// config's `auditors` among the principals.
    pub fn warnings_for(&self, auditors: &[String]) -> Vec<String> {
        let mut warnings = self.warnings();
        warnings.extend(self.lint(auditors));
        warnings
    }

    fn lint(&self, auditors: &[String]) -> Vec<String> {
        let groups: BTreeSet<&str> = self
            .users
            .values()
            .flat_map(|user| user.groups.iter().map(String::as_str))
            .collect();
        let mut warnings = Vec::new();
        let mut named_users: BTreeSet<String> = BTreeSet::new();
        let mut check = |principals: &[String], place: &str, warnings: &mut Vec<String>| {
            for principal in principals {
                match principal.strip_prefix(GROUP_PREFIX) {
                    Some(group) if !groups.contains(group) => {
                        let hint = closest(group, &groups)
                            .map(|g| format!(" (did you mean {GROUP_PREFIX}{g}?)"))
                            .unwrap_or_else(|| {
                                format!(
                                    "; add it to a user's groups in users.toml{}",
                                    if groups.is_empty() {
                                        String::new()
                                    } else {
                                        format!(
                                            " (groups in use: {})",
                                            groups.iter().copied().collect::<Vec<_>>().join(", ")
                                        )
                                    }
                                )
                            });
                        warnings.push(format!(
                            "{place} names {principal}, but no user is in group '{group}'{hint}"
                        ));
                    }
                    Some(_) => {}
                    None if self.users.contains_key(principal) => {
                        named_users.insert(principal.clone());
                    }
                    None => warnings.push(format!(
                        "{place} names '{principal}', who is not a user in users.toml"
                    )),
                }
            }
        };
        for flow in &self.flows {
            check(
                &flow.requesters,
                &format!("flow '{}' requesters", flow.name),
                &mut warnings,
            );
            if !flow.auto_approve {
                check(
                    &flow.approvers,
                    &format!("flow '{}' approvers", flow.name),
                    &mut warnings,
                );
            }
        }
        check(auditors, "auditors (portcullis.toml)", &mut warnings);

        for flow in self.flows.iter().filter(|flow| !flow.auto_approve) {
            let approvers: Vec<&str> = self
                .users
                .values()
                .filter(|user| !user.keys.is_empty() && self.is_member(&user.name, &flow.approvers))
                .map(|user| user.name.as_str())
                .collect();
            if approvers.is_empty() {
                warnings.push(format!(
                    "flow '{}' can never be approved: no user with a key is among its approvers ({})",
                    flow.name,
                    flow.approvers.join(", ")
                ));
            } else if approvers.len() < flow.approvals as usize {
                warnings.push(format!(
                    "flow '{}' needs {} approvals from distinct approvers, but only {} user(s) can approve ({})",
                    flow.name,
                    flow.approvals,
                    approvers.len(),
                    approvers.join(", ")
                ));
            }
        }

        for user in self.users.values() {
            if user.groups.is_empty() && !user.keys.is_empty() && !named_users.contains(&user.name)
            {
                warnings.push(format!(
                    "user '{}' is in no group and no flow names them: they can log in, but not request, approve or audit anything",
                    user.name
                ));
            }
        }

        for target in self.targets.values() {
            if self.flow_for(target).is_none() {
                warnings.push(format!(
                    "target '{}' matches no flow (labels {:?}), so nobody can request it",
                    target.name, target.labels
                ));
            }
        }
        warnings
    }
}

/// The group name `name` was most likely meant to be: one or two edits away, or
/// the same but for a trailing `s`.
fn closest<'a>(name: &str, groups: &BTreeSet<&'a str>) -> Option<&'a str> {
    groups
        .iter()
        .map(|g| (edit_distance(name, g), *g))
        .filter(|(distance, g)| *distance <= 2.min(g.len() / 3 + 1))
        .min()
        .map(|(_, g)| g)
}

/// Levenshtein distance over characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (diagonal + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(above + 1);
            diagonal = above;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBnPj0TH2hTmIobo5mbbFnqBThDCSdHTvEKAbAeRh9+H alice@laptop";
    const KEY2: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHHX82dilXNCtglMu6vQyR3JHcc+LrvBjrFKtmr+N2Ft bob@laptop";

    fn policy(users: &str, flows: &str) -> Policy {
        super::super::from_texts(users, "", flows)
    }

    #[test]
    fn edit_distances() {
        assert_eq!(edit_distance("sre-lead", "sre-leads"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn a_misspelled_or_empty_approver_group_is_a_warning() {
        let users = format!(
            "[users.alice]\nkeys = [\"{KEY}\"]\ngroups = [\"engineers\"]\n[users.bob]\nkeys = [\"{KEY2}\"]\ngroups = [\"sre-leads\", \"auditors\"]\n"
        );
        let flow = |approvers: &str| {
            format!("[[flows]]\nname = \"prod\"\nrequesters = [\"group:engineers\"]\napprovers = [{approvers}]\n")
        };
        let auditors = ["group:auditors".to_string()];
        let clean = policy(&users, &flow("\"group:sre-leads\""));
        assert_eq!(clean.warnings_for(&auditors), Vec::<String>::new());

        let typo = policy(&users, &flow("\"group:sre-lead\""));
        let warnings = typo.warnings_for(&auditors).join("\n");
        assert!(
            warnings.contains("flow 'prod' approvers names group:sre-lead, but no user is in group 'sre-lead' (did you mean group:sre-leads?)"),
            "{warnings}"
        );
        assert!(
            warnings.contains("flow 'prod' can never be approved"),
            "{warnings}"
        );

        let nobody = policy(&users, &flow("\"group:dbas\", \"carol\""));
        let warnings = nobody.warnings_for(&auditors).join("\n");
        assert!(
            warnings.contains("no user is in group 'dbas'; add it"),
            "{warnings}"
        );
        assert!(
            warnings.contains("names 'carol', who is not a user"),
            "{warnings}"
        );

        let two = policy(
            &users,
            "[[flows]]\nname = \"crit\"\nrequesters = [\"group:engineers\"]\napprovers = [\"group:sre-leads\"]\napprovals = 2\n",
        );
        let warnings = two.warnings_for(&auditors).join("\n");
        assert!(
            warnings.contains(
                "needs 2 approvals from distinct approvers, but only 1 user(s) can approve (bob)"
            ),
            "{warnings}"
        );
    }

    #[test]
    fn users_in_no_group_and_empty_auditors_are_warnings() {
        let users =
            format!("[users.alice]\nkeys = [\"{KEY}\"]\n[users.bob]\nkeys = [\"{KEY2}\"]\n");
        let flows = "[[flows]]\nname = \"x\"\nrequesters = [\"bob\"]\nauto_approve = true\n";
        let warnings = policy(&users, flows)
            .warnings_for(&["group:auditors".to_string()])
            .join("\n");
        assert!(
            warnings.contains("user 'alice' is in no group"),
            "{warnings}"
        );
        assert!(
            !warnings.contains("user 'bob'"),
            "bob is named by a flow: {warnings}"
        );
        assert!(warnings.contains("auditors (portcullis.toml) names group:auditors, but no user is in group 'auditors'"), "{warnings}");
    }
}
