//! The session floor: what the layers that serve a session share. `server`
//! accepts connections and authenticates, `control` runs control-plane commands,
//! `proxy` relays to targets; all three stand on this module and none imports the
//! others' internals.
//!
//! - [`State`]: the bastion's shared state, its [`Phase`], the [`LiveSession`] guard;
//! - [`channel`]: the identity on a connection, a channel's context, its set-up and
//!   start, and the client's side of it;
//! - [`route`]: where a connection wants to go, read from its SSH username;
//! - [`per_user`]: per-user caps on connections and sessions;
//! - [`hint`]: control-plane command lines that work when pasted;
//! - [`transport`]: SSH algorithms, identification, windows, packet sizes;
//! - [`wait`]: waiting for a decision on a request with the client on the line.

pub mod channel;
pub mod hint;
pub mod per_user;
pub mod route;
pub mod state;
pub mod transport;
pub mod wait;

pub use channel::{
    ChannelContext, ClientChannel, ClientOut, Identity, PtyRequest, SessionSetup, Start,
    WindowSize, CTRL_C, CTRL_D,
};
pub use per_user::{PerUser, Slot};
pub use route::{InvalidUsername, Route};
pub use state::{warn_about, LiveSession, Phase, State};
pub use transport::{
    preferred_algorithms, server_id, CHANNEL_QUEUE, MAX_PACKET_SIZE, READ_BUFFER, WINDOW_SIZE,
};
