//! The SSH transport both sides of the bastion speak: algorithms, identification,
//! windows and packet sizes, read buffering.

use russh::{cipher, kex, mac, Preferred};

/// Algorithms offered to clients and targets: post-quantum hybrid key exchange first,
/// AEAD ciphers only. The cipher order only matters where portcullis is the SSH
/// client (towards targets; the client's order wins a negotiation), and there it puts
/// AES-GCM first only when the CPU has AES instructions, ChaCha20-Poly1305 otherwise.
///
/// curve25519 stays behind ML-KEM unless `post_quantum_only`: OpenSSH before 9.9
/// (Debian 12 ships 9.2) has no ML-KEM, and russh has no sntrup761.
///
/// `legacy_clients` (server side only) adds AES-CTR with SHA-2 MACs after the AEAD
/// ciphers, for clients that have nothing else (Paramiko 2.12, libssh2 1.10): a
/// client that has an AEAD cipher still picks it, since its own order wins.
pub fn preferred_algorithms(post_quantum_only: bool, legacy_clients: bool) -> Preferred {
    const WITH_CLASSIC: &[kex::Name] = &[
        kex::MLKEM768X25519_SHA256,
        kex::CURVE25519,
        kex::CURVE25519_PRE_RFC_8731,
        kex::EXTENSION_SUPPORT_AS_SERVER,
        kex::EXTENSION_SUPPORT_AS_CLIENT,
        kex::EXTENSION_OPENSSH_STRICT_KEX_AS_SERVER,
        kex::EXTENSION_OPENSSH_STRICT_KEX_AS_CLIENT,
    ];
    const PQ_ONLY: &[kex::Name] = &[
        kex::MLKEM768X25519_SHA256,
        kex::EXTENSION_SUPPORT_AS_SERVER,
        kex::EXTENSION_SUPPORT_AS_CLIENT,
        kex::EXTENSION_OPENSSH_STRICT_KEX_AS_SERVER,
        kex::EXTENSION_OPENSSH_STRICT_KEX_AS_CLIENT,
    ];
    const AEAD_AES_FIRST: &[cipher::Name] = &[
        cipher::AES_256_GCM,
        cipher::CHACHA20_POLY1305,
        cipher::AES_128_GCM,
    ];
    const AEAD_CHACHA_FIRST: &[cipher::Name] = &[
        cipher::CHACHA20_POLY1305,
        cipher::AES_256_GCM,
        cipher::AES_128_GCM,
    ];
    const LEGACY: &[cipher::Name] = &[
        cipher::AES_256_GCM,
        cipher::CHACHA20_POLY1305,
        cipher::AES_128_GCM,
        cipher::AES_256_CTR,
        cipher::AES_128_CTR,
    ];
    // With AEAD ciphers only, no MAC is ever used; the list is still advertised, and
    // encrypt-then-MAC is the only kind worth advertising. Legacy clients get the
    // plain SHA-2 MACs too (Paramiko 2.12 and libssh2 1.10 have no -etm).
    const ETM: &[mac::Name] = &[mac::HMAC_SHA512_ETM, mac::HMAC_SHA256_ETM];
    const LEGACY_MACS: &[mac::Name] = &[
        mac::HMAC_SHA256_ETM,
        mac::HMAC_SHA512_ETM,
        mac::HMAC_SHA256,
        mac::HMAC_SHA512,
    ];
    let cipher: &[cipher::Name] = match (legacy_clients, has_aes_hardware()) {
        (true, _) => LEGACY,
        (false, true) => AEAD_AES_FIRST,
        (false, false) => AEAD_CHACHA_FIRST,
    };
    Preferred {
        kex: std::borrow::Cow::Borrowed(if post_quantum_only {
            PQ_ONLY
        } else {
            WITH_CLASSIC
        }),
        cipher: std::borrow::Cow::Borrowed(cipher),
        mac: std::borrow::Cow::Borrowed(if legacy_clients { LEGACY_MACS } else { ETM }),
        ..Preferred::default()
    }
}

/// The identification string clients see. The comment names OpenSSH because
/// SFTP clients such as asyncssh and libssh choose the argument order of
/// `SSH_FXP_SYMLINK` by looking for "OpenSSH" in it: OpenSSH's sftp-server reads
/// the two paths in the reverse of the draft's order, every other major client
/// (OpenSSH's own, Paramiko, PuTTY) always sends that order, and the bastion makes
/// sure that order is what a target gets (see `proxy::sftp`). OpenSSH itself matches
/// its compatibility table against the start of the string, which stays
/// `portcullis_`.
pub fn server_id() -> String {
    format!(
        "SSH-2.0-portcullis_{} OpenSSH_9.0-compatible",
        env!("CARGO_PKG_VERSION")
    )
}

/// Whether AES-GCM runs in hardware here (AES-NI and carry-less multiply on x86,
/// the crypto extension on ARM); without it ChaCha20 is the faster AEAD.
fn has_aes_hardware() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// Flow-control settings shared by both sides of the relay. Large windows keep bulk
/// copies from stalling on round trips.
pub const WINDOW_SIZE: u32 = 8 * 1024 * 1024;
pub const MAX_PACKET_SIZE: u32 = 32 * 1024;

/// Messages russh queues per channel before its connection's reader waits (russh's
/// default, made explicit). The queue sits in front of the relay's byte-bounded
/// pipe and outside the memory budget: a session whose peer reads nothing can pin
/// up to this many packets of [`MAX_PACKET_SIZE`] (3.2 MiB) per direction on top of
/// its pipe, and `[limits] sessions_per_user` bounds how many such sessions one
/// user holds. Shallower queues made bulk copies slower: with 16 or 32, zeros
/// moved at 0.87 to 0.98× and took 8 to 9 % more CPU per GiB
/// (`benches/proxy.rs`), while 100 stalled sessions saved about 0.25 MiB each
/// (`benches/soak.rs`).
pub const CHANNEL_QUEUE: usize = 100;

/// Read buffer in front of every SSH connection, client or target. russh reads a
/// packet with two exact reads (its first block, then the rest); unbuffered, each is
/// a `recv` of its own, plus one more that finds the socket empty. Buffered, one
/// `recv` brings a keystroke's whole packet, or a burst of them. Reads bigger than
/// the buffer (bulk copies) bypass it.
pub const READ_BUFFER: usize = 16 * 1024;
