//! portcullis: a privileged SSH bastion with just-in-time access approval.
//!
//! Engineers reach production hosts through the bastion with a plain OpenSSH client;
//! the bastion authenticates them by key, decides every channel request against the
//! policy, and proxies the session to the target with its own credentials.

pub mod allocator;
pub mod audit;
pub mod budget;
pub mod cluster;
pub mod command;
pub mod config;
pub mod control;
pub mod datadir;
pub mod display;
pub mod duration;
pub mod grant;
pub mod init;
pub mod keys;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod record;
pub mod server;
pub mod session;
pub mod store;
pub mod totp;
