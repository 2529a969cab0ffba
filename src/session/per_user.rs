//! Per-user caps on what one user holds at once (connections, sessions), so that
//! one user, or one stolen key, cannot take the bastion's memory from everyone.
//!
//! A [`Slot`] counts while it lives; dropping it gives the place back.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Counts, per user, the places taken of one kind, up to a limit.
pub struct PerUser {
    /// What is counted, for messages: `connections`, `sessions`.
    what: &'static str,
    /// The `[limits]` key that sets `limit`.
    key: &'static str,
    limit: usize,
    taken: Mutex<HashMap<String, usize>>,
}

/// One place taken by one user.
pub struct Slot {
    owner: Arc<PerUser>,
    user: String,
}

impl PerUser {
    pub fn new(what: &'static str, key: &'static str, limit: usize) -> Arc<PerUser> {
        Arc::new(PerUser {
            what,
            key,
            limit,
            taken: Mutex::new(HashMap::new()),
        })
    }

    /// Takes a place for `user`, or says why not (and what to do).
    pub fn take(self: &Arc<Self>, user: &str) -> Result<Slot, String> {
        let mut taken = self.taken.lock().expect("per-user lock poisoned");
        let count = taken.entry(user.to_string()).or_default();
        if *count >= self.limit {
            return Err(format!(
                "{user} already has {count} {} open, the most allowed ([limits] {} = {}); close some and try again",
                self.what, self.key, self.limit
            ));
        }
        *count += 1;
        Ok(Slot {
            owner: self.clone(),
            user: user.to_string(),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut taken = self.owner.taken.lock().expect("per-user lock poisoned");
        if let Some(count) = taken.get_mut(&self.user) {
            *count -= 1;
            if *count == 0 {
                taken.remove(&self.user);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_come_back_when_their_slots_drop() {
        let sessions = PerUser::new("sessions", "sessions_per_user", 2);
        let a = sessions.take("alice").unwrap();
        let _b = sessions.take("alice").unwrap();
        let err = sessions.take("alice").err().unwrap();
        assert!(err.contains("sessions_per_user = 2"), "{err}");
        assert!(sessions.take("bob").is_ok(), "other users are not affected");
        drop(a);
        assert!(sessions.take("alice").is_ok());
        assert!(
            sessions.taken.lock().unwrap().get("bob").is_none(),
            "empty entries go"
        );
    }
}
