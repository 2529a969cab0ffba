//! The PROXY protocol: the real client address behind a TCP load balancer.
//!
//! A balancer in `proxy_protocol_from` (HAProxy's `send-proxy` or `send-proxy-v2`)
//! starts every connection with a header naming the client it relays, before the
//! client's first SSH byte. The bastion reads that header, and only that header
//! (what follows is SSH and stays in the socket for russh), and from then on the
//! client's address is the connection's address: for the pre-auth gate, lockouts,
//! the audit log and the logs.
//!
//! Nobody else is ever asked for a header: a connection from an address not
//! listed is SSH from its first byte, so a header it sends is a bad SSH version
//! line and cannot name anyone. A listed address that sends anything but a valid
//! header is refused (see `handler::drive`), since accepting a bare SSH stream
//! there would let any client behind a misconfigured balancer share one address.
//!
//! Parsing is the `ppp` crate's; this module decides how much to read and what a
//! parsed header means.

use std::net::{IpAddr, SocketAddr};

use ppp::{v1, v2, HeaderResult, PartialResult};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::config::Prefix;

/// The longest header accepted: the 16 fixed bytes of v2 plus 1008 bytes of
/// addresses and TLVs (HAProxy sends 12 or 36 address bytes and, unless told to
/// add TLVs, nothing more; v1 is at most 107 bytes). A v2 header that declares
/// more is refused before any of it is read, so a header costs at most this much
/// memory per connection.
pub const MAX_HEADER: usize = 1024;

/// The v2 signature's length: the first read, safe for both versions because no
/// v1 header is shorter (`PROXY UNKNOWN\r\n` is 15 bytes). Twelve bytes are also
/// enough for ppp to tell a v1 header's start from anything else.
const SIGNATURE: usize = 12;

/// The longest v1 header, by the protocol's specification.
const V1_MAX: usize = 107;

/// Why a listed balancer's connection had no usable header.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    /// Closed before sending a byte: a TCP health check, not an attack.
    #[error("closed before sending a PROXY header")]
    Silent,
    /// Closed part-way through the header.
    #[error("closed in the middle of the PROXY header")]
    Truncated,
    #[error("the PROXY header declares {0} bytes, more than the {MAX_HEADER} accepted")]
    TooLong(usize),
    /// Not a PROXY header at all (an SSH client talking to the bastion directly
    /// from a balancer's address, or a balancer without `send-proxy`), or a
    /// malformed one.
    #[error("no valid PROXY header ({0})")]
    Invalid(String),
    #[error("reading the PROXY header failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Whether connections from `peer` must start with a PROXY header.
pub fn is_balancer(balancers: &[Prefix], peer: IpAddr) -> bool {
    balancers.iter().any(|b| b.contains(peer))
}

/// Reads the PROXY header the balancer at `balancer` sends first and returns the
/// client address it names (or the balancer's own, see [`client_address`]).
/// Reads exactly the header's bytes, never past them; the caller bounds the time.
pub async fn read_client_address(
    stream: &mut (impl AsyncRead + Unpin),
    balancer: SocketAddr,
) -> Result<SocketAddr, HeaderError> {
    let mut header = Vec::with_capacity(SIGNATURE);
    read_to(stream, &mut header, SIGNATURE).await?;
    loop {
        let parsed = HeaderResult::parse(&header);
        if !parsed.is_incomplete() {
            return client_address(parsed, balancer);
        }
        // v2 says its length once its 16 fixed bytes are in.
        let want = match parsed {
            HeaderResult::V2(Err(v2::ParseError::Partial(_, payload))) => 16 + payload,
            HeaderResult::V2(_) => 16,
            HeaderResult::V1(_) => {
                read_line(stream, &mut header).await?;
                return client_address(HeaderResult::parse(&header), balancer);
            }
        };
        if want > MAX_HEADER {
            return Err(HeaderError::TooLong(want));
        }
        if want <= header.len() {
            // ppp asked for no more bytes yet did not decide: never spin on it.
            return Err(HeaderError::Invalid(format!(
                "undecided after {} bytes",
                header.len()
            )));
        }
        read_to(stream, &mut header, want).await?;
    }
}

/// Reads the rest of a v1 header: up to its `\n`, or [`V1_MAX`] bytes. A byte at a
/// time, since the client's SSH version line may follow in the same segment and
/// must stay unread; ppp's parser only judges a v1 header whole (a partial one can
/// look invalid: `PROXY TCP4 192.0.2.7 ` ends in an empty address).
async fn read_line(
    stream: &mut (impl AsyncRead + Unpin),
    header: &mut Vec<u8>,
) -> Result<(), HeaderError> {
    while !header.ends_with(b"\n") && header.len() < V1_MAX {
        read_to(stream, header, header.len() + 1).await?;
    }
    Ok(())
}

/// Reads until `header` holds `len` bytes.
async fn read_to(
    stream: &mut (impl AsyncRead + Unpin),
    header: &mut Vec<u8>,
    len: usize,
) -> Result<(), HeaderError> {
    let start = header.len();
    header.resize(len, 0);
    let mut filled = start;
    while filled < len {
        match stream.read(&mut header[filled..]).await? {
            0 if filled == 0 => return Err(HeaderError::Silent),
            0 => return Err(HeaderError::Truncated),
            n => filled += n,
        }
    }
    Ok(())
}

/// The client a complete header names. `LOCAL` (the balancer's own health
/// checks), `UNKNOWN`, and families or transports that carry no TCP client
/// (unspecified, Unix sockets, datagrams) mean the connection is the balancer's
/// own, so it keeps the balancer's address, as the protocol's specification says
/// a receiver should.
pub fn client_address(
    parsed: HeaderResult,
    balancer: SocketAddr,
) -> Result<SocketAddr, HeaderError> {
    let client = match parsed {
        HeaderResult::V1(Ok(header)) => match header.addresses {
            v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
            v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
            v1::Addresses::Unknown => None,
        },
        HeaderResult::V2(Ok(header)) => match (header.command, header.protocol, header.addresses) {
            (v2::Command::Proxy, v2::Protocol::Stream, v2::Addresses::IPv4(a)) => {
                Some(SocketAddr::from((a.source_address, a.source_port)))
            }
            (v2::Command::Proxy, v2::Protocol::Stream, v2::Addresses::IPv6(a)) => {
                Some(SocketAddr::from((a.source_address, a.source_port)))
            }
            _ => None,
        },
        HeaderResult::V1(Err(error)) => return Err(HeaderError::Invalid(error.to_string())),
        HeaderResult::V2(Err(error)) => return Err(HeaderError::Invalid(error.to_string())),
    };
    // A client on an IPv4-mapped address is the IPv4 client it is, for lockouts
    // and networks alike.
    Ok(client.map_or(balancer, |c| {
        SocketAddr::new(c.ip().to_canonical(), c.port())
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BALANCER: &str = "10.0.0.5:40000";

    fn lb() -> SocketAddr {
        BALANCER.parse().unwrap()
    }

    /// Reads a header from `bytes` and returns the address and what was left unread.
    fn read(bytes: &[u8]) -> (Result<SocketAddr, HeaderError>, Vec<u8>) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async {
            let mut stream = bytes;
            let result = read_client_address(&mut stream, lb()).await;
            (result, stream.to_vec())
        })
    }

    fn v2(command: v2::Command, addresses: impl Into<v2::Addresses>) -> Vec<u8> {
        v2::Builder::with_addresses(v2::Version::Two | command, v2::Protocol::Stream, addresses)
            .build()
            .unwrap()
    }

    const SSH: &[u8] = b"SSH-2.0-OpenSSH_9.2p1\r\n";

    #[test]
    fn v1_names_the_client_and_leaves_ssh_unread() {
        let mut bytes = b"PROXY TCP4 192.0.2.7 10.0.0.9 51000 2222\r\n".to_vec();
        bytes.extend_from_slice(SSH);
        let (client, rest) = read(&bytes);
        assert_eq!(client.unwrap(), "192.0.2.7:51000".parse().unwrap());
        assert_eq!(rest, SSH);
        let mut bytes = b"PROXY TCP6 2001:db8::7 2001:db8::9 51000 2222\r\n".to_vec();
        bytes.extend_from_slice(SSH);
        let (client, rest) = read(&bytes);
        assert_eq!(client.unwrap(), "[2001:db8::7]:51000".parse().unwrap());
        assert_eq!(rest, SSH);
    }

    #[test]
    fn v2_names_the_client_and_leaves_ssh_unread() {
        let client: SocketAddr = "192.0.2.7:51000".parse().unwrap();
        let server: SocketAddr = "10.0.0.9:2222".parse().unwrap();
        let mut bytes = v2(v2::Command::Proxy, (client, server));
        bytes.extend_from_slice(SSH);
        let (read_client, rest) = read(&bytes);
        assert_eq!(read_client.unwrap(), client);
        assert_eq!(rest, SSH);
        let mapped: SocketAddr = "[::ffff:192.0.2.8]:1".parse().unwrap();
        let v6server: SocketAddr = "[2001:db8::9]:2222".parse().unwrap();
        let (read_client, _) = read(&v2(v2::Command::Proxy, (mapped, v6server)));
        assert_eq!(read_client.unwrap(), "192.0.2.8:1".parse().unwrap());
    }

    #[test]
    fn local_unknown_and_unsupported_families_keep_the_balancers_address() {
        let client: SocketAddr = "192.0.2.7:51000".parse().unwrap();
        let server: SocketAddr = "10.0.0.9:2222".parse().unwrap();
        let local = v2(v2::Command::Local, (client, server));
        let unspecified = v2(v2::Command::Proxy, v2::Addresses::Unspecified);
        let unix = v2(v2::Command::Proxy, v2::Unix::new([b'a'; 108], [b'b'; 108]));
        let datagram = v2::Builder::with_addresses(
            v2::Version::Two | v2::Command::Proxy,
            v2::Protocol::Datagram,
            (client, server),
        )
        .build()
        .unwrap();
        for bytes in [
            local,
            unspecified,
            unix,
            datagram,
            b"PROXY UNKNOWN\r\n".to_vec(),
            b"PROXY UNKNOWN 1.2.3.4 5.6.7.8 1 2\r\n".to_vec(),
        ] {
            let (address, rest) = read(&bytes);
            assert_eq!(address.unwrap(), lb(), "{bytes:?}");
            assert!(rest.is_empty());
        }
    }

    #[test]
    fn v2_tlvs_are_read_past() {
        let client: SocketAddr = "192.0.2.7:51000".parse().unwrap();
        let server: SocketAddr = "10.0.0.9:2222".parse().unwrap();
        let mut bytes = v2::Builder::with_addresses(
            v2::Version::Two | v2::Command::Proxy,
            v2::Protocol::Stream,
            (client, server),
        )
        .write_tlv(v2::Type::UniqueId, b"request-42".as_slice())
        .unwrap()
        .build()
        .unwrap();
        bytes.extend_from_slice(SSH);
        let (address, rest) = read(&bytes);
        assert_eq!(address.unwrap(), client);
        assert_eq!(rest, SSH);
    }

    #[test]
    fn anything_but_a_valid_header_is_refused() {
        // A bare SSH client (a balancer without send-proxy), garbage, bad fields.
        for bytes in [
            SSH,
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            b"PROXY TCP4 999.0.2.7 10.0.0.9 51000 2222\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.9 051000 2222\r\n",
            b"PROXY TCP5 192.0.2.7 10.0.0.9 51000 2222\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.9 51000 2222\n",
            b"\r\n\r\n\0\r\nQUIT\n\x31\x11\x00\x0c", // version 3
            b"\r\n\r\n\0\r\nQUIT\n\x22\x11\x00\x0c", // command 2
            b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x04", // too short for IPv4
            b"PROXY TCP4 \xff\xfe 10.0.0.9 1 2\r\n",
        ] {
            let (result, _) = read(bytes);
            assert!(
                matches!(result, Err(HeaderError::Invalid(_))),
                "{:?}: {result:?}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    #[tokio::test]
    async fn garbage_is_refused_from_its_first_bytes_without_waiting_for_more() {
        let (mut client, mut server) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut client, b"SSH-2.0-Open")
            .await
            .unwrap();
        // `client` stays open and silent: only the 12 bytes decide.
        let result = read_client_address(&mut server, lb()).await;
        assert!(matches!(result, Err(HeaderError::Invalid(_))), "{result:?}");
        drop(client);
    }

    #[test]
    fn oversized_headers_are_refused_before_they_are_read() {
        // v2 declaring 65535 bytes: refused from its first 16.
        let mut huge = v2::PROTOCOL_PREFIX.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        let (result, rest) = read(&huge);
        assert!(
            matches!(result, Err(HeaderError::TooLong(65551))),
            "{result:?}"
        );
        assert!(rest.is_empty());
        // v1 without its end of line: refused at ppp's 107 bytes.
        let mut long = b"PROXY TCP4 ".to_vec();
        long.extend(std::iter::repeat_n(b'1', 400));
        let (result, rest) = read(&long);
        assert!(matches!(result, Err(HeaderError::Invalid(_))), "{result:?}");
        assert!(rest.len() > 400 - 107, "read no further than v1's limit");
    }

    #[test]
    fn a_closed_connection_is_silent_or_truncated() {
        assert!(matches!(read(b"").0, Err(HeaderError::Silent)));
        assert!(matches!(
            read(b"PROXY TCP4 192.0.2.7").0,
            Err(HeaderError::Truncated)
        ));
        assert!(matches!(
            read(&v2::PROTOCOL_PREFIX[..5]).0,
            Err(HeaderError::Truncated)
        ));
    }

    #[test]
    fn only_listed_addresses_are_balancers() {
        let listed: Vec<Prefix> = vec!["127.0.0.1".parse().unwrap(), "10.0.0.0/8".parse().unwrap()];
        assert!(is_balancer(&listed, "127.0.0.1".parse().unwrap()));
        assert!(is_balancer(&listed, "10.200.3.4".parse().unwrap()));
        assert!(is_balancer(&listed, "::ffff:127.0.0.1".parse().unwrap()));
        assert!(!is_balancer(&listed, "127.0.0.2".parse().unwrap()));
        assert!(!is_balancer(&[], "127.0.0.1".parse().unwrap()));
    }
}
