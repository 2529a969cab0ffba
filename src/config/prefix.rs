//! Addresses and networks in the config file (`"203.0.113.7"`, `"10.0.0.0/8"`), as
//! `[limits] penalty_exempt` and `proxy_protocol_from` list them.

use std::net::IpAddr;

use serde::{Deserialize, Deserializer};

/// An address and prefix length, as in `10.0.0.0/8`; a bare address is a /32 (or
/// /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix {
    pub network: IpAddr,
    pub len: u8,
}

impl Prefix {
    /// Whether `ip` is in this network. An IPv4-mapped IPv6 address (how a
    /// dual-stack listener sees an IPv4 peer) is matched as the IPv4 address it is.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.network.is_ipv4() && mask(ip, self.len) == self.network
    }
}

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.len)
    }
}

impl std::str::FromStr for Prefix {
    type Err = String;

    fn from_str(text: &str) -> Result<Prefix, String> {
        let (address, len) = match text.split_once('/') {
            Some((address, len)) => (address, Some(len)),
            None => (text, None),
        };
        let ip: IpAddr = address
            .parse()
            .map_err(|_| format!("{text:?} is not an address or prefix like 10.0.0.0/8"))?;
        let bits = if ip.is_ipv4() { 32 } else { 128 };
        let len = match len {
            None => bits,
            Some(len) => len
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= bits)
                .ok_or_else(|| format!("{text:?}: prefix length must be 0 to {bits}"))?,
        };
        Ok(Prefix {
            network: mask(ip, len),
            len,
        })
    }
}

/// `ip` with all but its first `len` bits cleared.
pub fn mask(ip: IpAddr, len: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4)
                & u32::MAX
                    .checked_shl(32 - u32::from(len.min(32)))
                    .unwrap_or(0);
            IpAddr::V4(bits.into())
        }
        IpAddr::V6(v6) => {
            let shift = 128 - u32::from(len.min(128));
            let bits = u128::from(v6) & u128::MAX.checked_shl(shift).unwrap_or(0);
            IpAddr::V6(bits.into())
        }
    }
}

/// Deserializes a list of addresses and prefixes (`deserialize_with`).
pub fn list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Prefix>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|p| p.parse().map_err(serde::de::Error::custom))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_mask_addresses() {
        let p: Prefix = "10.1.2.3/8".parse().unwrap();
        assert_eq!(p.network.to_string(), "10.0.0.0");
        assert_eq!(p.to_string(), "10.0.0.0/8");
        assert!(p.contains("10.200.0.1".parse().unwrap()));
        assert!(!p.contains("11.0.0.1".parse().unwrap()));
        let v6: Prefix = "2001:db8::1/64".parse().unwrap();
        assert!(v6.contains("2001:db8::ffff".parse().unwrap()));
        assert!(!v6.contains("2001:db9::1".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<Prefix>().is_err());
        assert_eq!(mask("1.2.3.4".parse().unwrap(), 0).to_string(), "0.0.0.0");
    }

    #[test]
    fn ipv4_mapped_addresses_match_as_ipv4() {
        let p: Prefix = "127.0.0.1".parse().unwrap();
        assert!(p.contains("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!p.contains("::ffff:127.0.0.2".parse().unwrap()));
        let v6: Prefix = "::1".parse().unwrap();
        assert!(!v6.contains("127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn bad_prefixes_say_what_is_wanted() {
        let err = "10.0.0.0/33".parse::<Prefix>().unwrap_err();
        assert_eq!(err, "\"10.0.0.0/33\": prefix length must be 0 to 32");
        let err = "db-1/8".parse::<Prefix>().unwrap_err();
        assert!(
            err.contains("not an address or prefix like 10.0.0.0/8"),
            "{err}"
        );
        assert!("10.0.0.0/".parse::<Prefix>().is_err());
        assert!("::/129".parse::<Prefix>().is_err());
    }
}
