//! A store whose writes a test can intercept (tests only): before each write
//! to a tree reaches sled, a hook sees it and may fail it, or act first, as
//! another bastion on the same database would between two of this one's
//! writes. That is how module tests reach the paths a shared database makes
//! possible (a write that fails after the one before it landed; a reader that
//! runs between two writes) without a real second node. Counters are not
//! intercepted.

use std::sync::{Arc, Mutex, PoisonError};

use super::{Backend, Entry, Removed, Result, Scan, Store, Subscription};

/// A write about to be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Write<'a> {
    Put {
        tree: &'a str,
        key: &'a [u8],
    },
    Remove {
        tree: &'a str,
        key: &'a [u8],
    },
    RemovePrefix {
        tree: &'a str,
        prefix: &'a [u8],
    },
    Swap {
        tree: &'a str,
        key: &'a [u8],
        old: Option<&'a [u8]>,
        new: Option<&'a [u8]>,
    },
}

impl Write<'_> {
    pub fn tree(&self) -> &str {
        match self {
            Write::Put { tree, .. }
            | Write::Remove { tree, .. }
            | Write::RemovePrefix { tree, .. }
            | Write::Swap { tree, .. } => tree,
        }
    }
}

/// What a test runs before each write: an error fails the write (it is not
/// made). The hook may use the store itself: it is taken out while it runs, so
/// the writes it makes, and any other thread's meanwhile, pass unhooked. A hook
/// that panics is gone.
pub type Hook = Box<dyn FnMut(Write<'_>) -> Result<()> + Send>;

/// Where a test puts the hook of an [`Intercepted`] store (kept after the store
/// is boxed into a [`Store`]).
#[derive(Clone, Default)]
pub struct Hooks(Arc<Mutex<Option<Hook>>>);

impl Hooks {
    /// Runs `hook` before every write from now on, instead of the last one.
    pub fn set(&self, hook: Hook) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(hook);
    }

    fn before(&self, write: Write<'_>) -> Result<()> {
        let taken = self.0.lock().unwrap_or_else(PoisonError::into_inner).take();
        let Some(mut hook) = taken else {
            return Ok(());
        };
        let outcome = hook(write);
        let mut slot = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        // A hook set while this one ran wins.
        if slot.is_none() {
            *slot = Some(hook);
        }
        outcome
    }
}

/// A sled store with a hook in front of its writes.
pub struct Intercepted {
    inner: Store,
    hooks: Hooks,
}

impl Intercepted {
    /// A sled store in `dir/db`, and where to put its hook.
    pub fn sled(dir: &std::path::Path) -> (Store, Hooks) {
        let hooks = Hooks::default();
        let intercepted = Intercepted {
            inner: Store::sled(dir).expect("open sled"),
            hooks: hooks.clone(),
        };
        (Store::on(Box::new(intercepted)), hooks)
    }

    fn before(&self, write: Write<'_>) -> Result<()> {
        self.hooks.before(write)
    }

    fn seam(&self) -> &dyn Backend {
        self.inner.backend()
    }
}

impl Backend for Intercepted {
    fn get(&self, tree: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.seam().get(tree, key)
    }

    fn get_run(&self, tree: &str, keys: &[Vec<u8>]) -> Result<Vec<Vec<u8>>> {
        self.seam().get_run(tree, keys)
    }

    fn scan<'a>(&'a self, tree: &str, prefix: &[u8], from: Option<&[u8]>) -> Scan<'a> {
        self.seam().scan(tree, prefix, from)
    }

    fn last(&self, tree: &str) -> Result<Option<Entry>> {
        self.seam().last(tree)
    }

    fn put(&self, tree: &str, key: &[u8], value: &[u8]) -> Result<()> {
        self.before(Write::Put { tree, key })?;
        self.seam().put(tree, key, value)
    }

    /// Each entry is shown to the hook as a put; a failure fails the batch.
    fn put_all(&self, tree: &str, entries: Vec<Entry>) -> Result<()> {
        for (key, _) in &entries {
            self.before(Write::Put { tree, key })?;
        }
        self.seam().put_all(tree, entries)
    }

    fn piece_bytes(&self) -> usize {
        self.seam().piece_bytes()
    }

    fn write_bytes(&self) -> usize {
        self.seam().write_bytes()
    }

    fn concurrent_writes(&self) -> usize {
        self.seam().concurrent_writes()
    }

    fn largest_piece(&self) -> usize {
        self.seam().largest_piece()
    }

    fn remove(&self, tree: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.before(Write::Remove { tree, key })?;
        self.seam().remove(tree, key)
    }

    fn remove_prefix(&self, tree: &str, prefix: &[u8]) -> Result<Removed> {
        self.before(Write::RemovePrefix { tree, prefix })?;
        self.seam().remove_prefix(tree, prefix)
    }

    fn compare_and_swap(
        &self,
        tree: &str,
        key: &[u8],
        old: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<bool> {
        self.before(Write::Swap {
            tree,
            key,
            old,
            new,
        })?;
        self.seam().compare_and_swap(tree, key, old, new)
    }

    fn increment(&self, name: &str) -> Result<u64> {
        self.seam().increment(name)
    }

    fn counter(&self, name: &str) -> Result<u64> {
        self.seam().counter(name)
    }

    fn seed_counter(&self, name: &str, value: u64) -> Result<()> {
        self.seam().seed_counter(name, value)
    }

    fn flush(&self) -> Result<()> {
        self.seam().flush()
    }

    fn trees(&self) -> Result<Vec<String>> {
        self.seam().trees()
    }

    fn counters(&self) -> Result<Vec<(String, u64)>> {
        self.seam().counters()
    }

    fn subscribe(&self, tree: &str) -> Result<Subscription> {
        self.seam().subscribe(tree)
    }

    fn failure(&self) -> Option<String> {
        self.seam().failure()
    }

    fn failure_is_sticky(&self) -> bool {
        self.seam().failure_is_sticky()
    }

    fn is_shared(&self) -> bool {
        self.seam().is_shared()
    }
}
