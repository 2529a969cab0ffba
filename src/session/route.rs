//! Where a connection wants to go, read from its SSH username.
//!
//! `LOGIN@TARGET` or `TARGET`; OpenSSH splits `ssh a@b@bastion` at the last `@`, so the
//! username arrives as `a@b`. `:` is never a separator: scp and rsync would split on it.

use std::fmt;

use crate::policy::{is_valid_login, is_valid_name, CONTROL_USER};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Control-plane commands (`ssh portcullis@bastion CMD`).
    Control,
    /// A proxied session; `login` is `None` for the target's default login.
    Target {
        target: String,
        login: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidUsername(pub String);

impl fmt::Display for InvalidUsername {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid username {:?}: use LOGIN@TARGET or TARGET, e.g. ssh -p 2222 postgres@db-prod-1@bastion (or {CONTROL_USER} for the control plane)",
            self.0.escape_debug().to_string()
        )
    }
}

impl Route {
    pub fn parse(username: &str) -> Result<Route, InvalidUsername> {
        let invalid = || InvalidUsername(username.chars().take(80).collect());
        if username == CONTROL_USER {
            return Ok(Route::Control);
        }
        let (login, target) = match username.split_once('@') {
            Some((login, target)) => (Some(login), target),
            None => (None, username),
        };
        if !is_valid_name(target) || login.is_some_and(|login| !is_valid_login(login)) {
            return Err(invalid());
        }
        Ok(Route::Target {
            target: target.to_string(),
            login: login.map(str::to_string),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_forms() {
        assert_eq!(Route::parse("portcullis"), Ok(Route::Control));
        assert_eq!(
            Route::parse("postgres@db-prod-1"),
            Ok(Route::Target {
                target: "db-prod-1".into(),
                login: Some("postgres".into())
            })
        );
        assert_eq!(
            Route::parse("db-prod-1"),
            Ok(Route::Target {
                target: "db-prod-1".into(),
                login: None
            })
        );
    }

    #[test]
    fn refuses_odd_usernames() {
        for bad in [
            "",
            "@db",
            "root@",
            "a@b@c",
            "root:db",
            "root@db;id",
            "root@db\n",
            "ro ot@db",
            "root@-x",
        ] {
            assert!(Route::parse(bad).is_err(), "{bad:?}");
        }
        let long = "x".repeat(10_000);
        let message = Route::parse(&long).unwrap_err().to_string();
        assert!(message.len() < 300, "error messages stay short");
    }

    proptest::proptest! {
        #[test]
        fn any_username_parses_or_is_refused_without_panicking(name in ".{0,300}") {
            let _ = Route::parse(&name);
        }

        #[test]
        fn well_formed_usernames_round_trip(
            login in "[a-z_][a-z0-9_-]{0,31}",
            target in "[a-z0-9][a-z0-9.-]{0,40}",
        ) {
            match Route::parse(&format!("{login}@{target}")) {
                Ok(Route::Target { target: t, login: Some(l) }) => {
                    proptest::prop_assert_eq!(t, target);
                    proptest::prop_assert_eq!(l, login);
                }
                other => proptest::prop_assert!(false, "{other:?}"),
            }
        }
    }
}
