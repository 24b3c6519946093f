//! TCP grants: `host:port` entries such as `127.0.0.1:5432`, `db.internal:5432` or `[::1]:*`,
//! for database clients and other protocols over `wasi:sockets`. An address grant allows
//! connecting to that address; a name grant allows looking the name up (no other name may be
//! looked up at all) and connecting to the addresses that lookup gave, in the same run. The port
//! is a number or `*`. Nothing else is allowed: no listening, no UDP.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

use serde::{Serialize, Serializer};

/// What a TCP grant names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TcpHost {
    /// An address.
    Ip(IpAddr),
    /// A DNS name (lower case): looking it up is allowed, and connecting to what it resolves to.
    Name(String),
}

/// One granted TCP destination.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TcpGrant {
    /// The host.
    pub host: TcpHost,
    /// The port; `None` for any.
    pub port: Option<u16>,
}

impl Serialize for TcpGrant {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl fmt::Display for TcpGrant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            TcpHost::Ip(IpAddr::V6(a)) => write!(f, "[{a}]")?,
            TcpHost::Ip(a) => write!(f, "{a}")?,
            TcpHost::Name(n) => f.write_str(n)?,
        }
        match self.port {
            Some(p) => write!(f, ":{p}"),
            None => f.write_str(":*"),
        }
    }
}

impl TcpGrant {
    /// Parse `host:port` (`[v6]:port`; the port may be `*`).
    pub fn parse(entry: &str) -> Result<TcpGrant, String> {
        let (host, port) = entry.rsplit_once(':').ok_or_else(|| {
            format!(
                "\"{entry}\" needs a port: write it like \"127.0.0.1:5432\" or \"db.internal:*\""
            )
        })?;
        let port = match port {
            "*" => None,
            p => Some(p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| {
                format!("\"{entry}\": the port `{p}` must be a number from 1 to 65535 or `*`")
            })?),
        };
        let host = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            TcpHost::Ip(IpAddr::V6(v6.parse::<Ipv6Addr>().map_err(|_| {
                format!("\"{entry}\": `{host}` is not an IPv6 address")
            })?))
        } else if let Ok(ip) = host.parse::<IpAddr>() {
            TcpHost::Ip(ip)
        } else {
            let name = host.to_ascii_lowercase();
            if !super::is_host_name(&name) {
                return Err(format!(
                    "\"{entry}\": `{host}` is not a host name, an IPv4 address or a bracketed \
                     IPv6 address"
                ));
            }
            TcpHost::Name(name)
        };
        Ok(TcpGrant { host, port })
    }

    /// Whether this grant covers everything `other` allows.
    pub fn covers(&self, other: &TcpGrant) -> bool {
        self.host == other.host && (self.port.is_none() || self.port == other.port)
    }

    /// Whether this grant allows port `port`.
    pub fn allows_port(&self, port: u16) -> bool {
        self.port.is_none_or(|p| p == port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_parse_print_and_cover() {
        for (e, canonical) in [
            ("127.0.0.1:5432", "127.0.0.1:5432"),
            ("DB.internal:*", "db.internal:*"),
            ("[::1]:80", "[::1]:80"),
        ] {
            assert_eq!(TcpGrant::parse(e).expect(e).to_string(), canonical);
        }
        for bad in [
            "127.0.0.1",
            "127.0.0.1:0",
            "127.0.0.1:70000",
            ":80",
            "[::1:80",
            "a..b:80",
            "127.1:80",
            "a b:80",
        ] {
            assert!(TcpGrant::parse(bad).is_err(), "{bad} parsed");
        }
        let any = TcpGrant::parse("db:*").expect("valid");
        let one = TcpGrant::parse("db:5432").expect("valid");
        assert!(any.covers(&one));
        assert!(!one.covers(&any));
        assert!(!one.covers(&TcpGrant::parse("db2:5432").expect("valid")));
        assert!(one.allows_port(5432) && !one.allows_port(5433) && any.allows_port(1));
    }
}
