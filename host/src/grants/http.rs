//! HTTP grants: the patterns a manifest (or a policy) writes, such as `https://api.example.com`,
//! `http://127.0.0.1:*` or `https://*.example.org/v1/`, parsed into [`HttpGrant`]s; whether one
//! allows a request, and whether one covers another (for narrowing and the policy).
//!
//! Grammar: `scheme://host[:port][/path-prefix]`, with
//! - `scheme`: `http` or `https` (required);
//! - `host`: a DNS name (ASCII, lower-cased; `xn--` for international names), `*.` and a name
//!   (any subdomain of it, not the name itself), an IPv4 address, or an IPv6 address in
//!   brackets. Names and addresses never match each other: `localhost` does not allow
//!   `127.0.0.1`, and `127.0.0.1` does not allow `127.0.0.2`;
//! - `port`: a number or `*`; without one, the scheme's (80 or 443);
//! - `path-prefix`: matched at segment boundaries (`/v1` allows `/v1` and `/v1/x`, not `/v10`); a
//!   request whose path has a `..` or `.` segment, or an encoded `.` or `/`, is refused by a grant
//!   with a path prefix.
//!
//! No user info, query or fragment. A table `{ url = "…", methods = ["GET", "POST"] }` also
//! limits the methods (upper-case; default: any).

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

use serde::{Serialize, Serializer};

/// Which hosts a grant allows.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HostPattern {
    /// Exactly this DNS name (lower case).
    Name(String),
    /// Any subdomain of this name (`*.example.org`: `a.example.org`, `a.b.example.org`).
    Subdomains(String),
    /// Exactly this address.
    Ip(IpAddr),
}

/// One granted HTTP origin (and optional path prefix and methods).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HttpGrant {
    /// `http` or `https`.
    pub scheme: String,
    /// The hosts.
    pub host: HostPattern,
    /// The port; `None` for any.
    pub port: Option<u16>,
    /// A path prefix; `None` for any path.
    pub path: Option<String>,
    /// The methods allowed; `None` for any.
    pub methods: Option<BTreeSet<String>>,
}

impl Serialize for HttpGrant {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl fmt::Display for HttpGrant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://", self.scheme)?;
        match &self.host {
            HostPattern::Name(n) => f.write_str(n)?,
            HostPattern::Subdomains(n) => write!(f, "*.{n}")?,
            HostPattern::Ip(IpAddr::V6(a)) => write!(f, "[{a}]")?,
            HostPattern::Ip(a) => write!(f, "{a}")?,
        }
        match self.port {
            Some(p) => write!(f, ":{p}")?,
            None => f.write_str(":*")?,
        }
        if let Some(p) = &self.path {
            f.write_str(p)?;
        }
        if let Some(m) = &self.methods {
            let list: Vec<&str> = m.iter().map(String::as_str).collect();
            write!(f, " ({})", list.join(", "))?;
        }
        Ok(())
    }
}

/// The methods a grant may name.
const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE",
];

impl HttpGrant {
    /// Parse a pattern (see the module's documentation), with `methods` from a table form.
    pub fn parse(pattern: &str, methods: Option<&[String]>) -> Result<HttpGrant, String> {
        let (scheme, rest) = pattern.split_once("://").ok_or_else(|| {
            format!("\"{pattern}\" has no scheme: write it like \"https://api.example.com\"")
        })?;
        let scheme = scheme.to_ascii_lowercase();
        if scheme != "http" && scheme != "https" {
            return Err(format!(
                "\"{pattern}\": the scheme must be http or https, not `{scheme}`"
            ));
        }
        let default_port = if scheme == "https" { 443 } else { 80 };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], Some(&rest[i..])),
            None => (rest, None),
        };
        if authority.contains('@') || rest.contains(['?', '#']) {
            return Err(format!(
                "\"{pattern}\": no user, query or fragment: scheme, host, port and path only"
            ));
        }
        let (host, port) = split_port(authority)
            .ok_or_else(|| format!("\"{pattern}\": the port must be a number or `*`"))?;
        let port = match port {
            None => Some(default_port),
            Some("*") => None,
            Some(p) => Some(p.parse::<u16>().map_err(|_| {
                format!("\"{pattern}\": the port `{p}` must be a number up to 65535 or `*`")
            })?),
        };
        let host = host_pattern(host).map_err(|e| format!("\"{pattern}\": {e}"))?;
        let path = match path {
            None | Some("/") => None,
            Some(p) if has_dot_segments(p) => {
                return Err(format!(
                    "\"{pattern}\": the path prefix `{p}` has `.` or `..` segments"
                ));
            }
            Some(p) => Some(p.to_owned()),
        };
        let methods = match methods {
            None => None,
            Some(list) => {
                let mut set = BTreeSet::new();
                for m in list {
                    if !METHODS.contains(&m.as_str()) {
                        return Err(format!(
                            "\"{pattern}\": unknown method `{m}`; expected one of {}",
                            METHODS.join(", ")
                        ));
                    }
                    set.insert(m.clone());
                }
                Some(set)
            }
        };
        Ok(HttpGrant {
            scheme,
            host,
            port,
            path,
            methods,
        })
    }

    /// Whether this grant allows a request with `method` to `scheme://host:port` and `path`
    /// (`host` as the request's URI gives it; IPv6 in brackets).
    pub fn allows(&self, method: &str, scheme: &str, host: &str, port: u16, path: &str) -> bool {
        if !scheme.eq_ignore_ascii_case(&self.scheme) || self.port.is_some_and(|p| p != port) {
            return false;
        }
        if self.methods.as_ref().is_some_and(|m| !m.contains(method)) {
            return false;
        }
        let host_ok = match (&self.host, request_host(host)) {
            (HostPattern::Ip(a), RequestHost::Ip(b)) => *a == b,
            (HostPattern::Name(n), RequestHost::Name(h)) => *n == h,
            (HostPattern::Subdomains(n), RequestHost::Name(h)) => is_subdomain(&h, n),
            _ => false,
        };
        host_ok
            && match &self.path {
                None => true,
                Some(prefix) => !has_dot_segments(path) && path_under(path, prefix),
            }
    }

    /// Whether this grant allows everything `other` allows.
    pub fn covers(&self, other: &HttpGrant) -> bool {
        let host = match (&self.host, &other.host) {
            (a, b) if a == b => true,
            (HostPattern::Subdomains(n), HostPattern::Name(h) | HostPattern::Subdomains(h)) => {
                is_subdomain(h, n)
            }
            _ => false,
        };
        let methods = match (&self.methods, &other.methods) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(a), Some(b)) => b.is_subset(a),
        };
        let path = match (&self.path, &other.path) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(a), Some(b)) => path_under(b, a),
        };
        self.scheme == other.scheme
            && host
            && (self.port.is_none() || self.port == other.port)
            && methods
            && path
    }
}

/// `host[:port]` → (host, port text); IPv6 in brackets keeps its brackets. `None` when the
/// part after a `:` is empty.
fn split_port(authority: &str) -> Option<(&str, Option<&str>)> {
    let colon = if authority.starts_with('[') {
        authority
            .find(']')
            .and_then(|i| authority[i..].find(':').map(|j| i + j))
    } else {
        authority.rfind(':')
    };
    match colon {
        None => Some((authority, None)),
        Some(i) if i + 1 == authority.len() => None,
        Some(i) => Some((&authority[..i], Some(&authority[i + 1..]))),
    }
}

fn host_pattern(host: &str) -> Result<HostPattern, String> {
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return v6
            .parse::<Ipv6Addr>()
            .map(|a| HostPattern::Ip(IpAddr::V6(a)))
            .map_err(|_| format!("`{host}` is not an IPv6 address"));
    }
    if let Ok(a) = host.parse::<IpAddr>() {
        return Ok(HostPattern::Ip(a));
    }
    let (wild, name) = match host.strip_prefix("*.") {
        Some(n) => (true, n),
        None => (false, host),
    };
    let name = name.to_ascii_lowercase();
    if !super::is_host_name(&name) {
        return Err(format!(
            "`{host}` is not a host name, `*.` and a name, an IPv4 address or a bracketed \
             IPv6 address"
        ));
    }
    Ok(if wild {
        HostPattern::Subdomains(name)
    } else {
        HostPattern::Name(name)
    })
}

enum RequestHost {
    Name(String),
    Ip(IpAddr),
}

fn request_host(host: &str) -> RequestHost {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    match bare.parse::<IpAddr>() {
        Ok(a) => RequestHost::Ip(a),
        Err(_) => RequestHost::Name(host.to_ascii_lowercase()),
    }
}

/// `host` is a proper subdomain of `name`.
fn is_subdomain(host: &str, name: &str) -> bool {
    host.len() > name.len() + 1
        && host.ends_with(name)
        && host.as_bytes()[host.len() - name.len() - 1] == b'.'
}

/// `path` is `prefix` or below it, at a segment boundary.
fn path_under(path: &str, prefix: &str) -> bool {
    let prefix = prefix.strip_suffix('/').unwrap_or(prefix);
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/') || rest.starts_with('?'),
        None => false,
    }
}

/// Whether a path has `.` or `..` segments, or encodes `.` or `/` (which a server might decode
/// into them).
fn has_dot_segments(path: &str) -> bool {
    let path = path.split(['?', '#']).next().unwrap_or(path);
    let lower = path.to_ascii_lowercase();
    lower.contains("%2e")
        || lower.contains("%2f")
        || lower.contains("%5c")
        || path.split('/').any(|s| s == "." || s == "..")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(p: &str) -> HttpGrant {
        HttpGrant::parse(p, None).unwrap_or_else(|e| panic!("{p}: {e}"))
    }

    fn allows(grant: &str, url: &str) -> bool {
        allows_method(grant, "GET", url)
    }

    fn allows_method(grant: &str, method: &str, url: &str) -> bool {
        let uri: http::Uri = url.parse().expect("uri");
        let scheme = uri.scheme_str().expect("scheme");
        let port = uri
            .port_u16()
            .unwrap_or(if scheme == "https" { 443 } else { 80 });
        g(grant).allows(
            method,
            scheme,
            uri.host().expect("host"),
            port,
            uri.path_and_query().map_or("/", |p| p.as_str()),
        )
    }

    #[test]
    fn patterns_parse_and_print_canonically() {
        for (p, canonical) in [
            ("https://api.example.com", "https://api.example.com:443"),
            (
                "HTTP://API.Example.com:8080/",
                "http://api.example.com:8080",
            ),
            ("http://127.0.0.1:*", "http://127.0.0.1:*"),
            ("https://*.example.org/v1/", "https://*.example.org:443/v1/"),
            ("http://[::1]:9000", "http://[::1]:9000"),
        ] {
            assert_eq!(g(p).to_string(), canonical);
        }
        let m =
            HttpGrant::parse("https://a.b", Some(&["POST".into(), "GET".into()])).expect("valid");
        assert_eq!(m.to_string(), "https://a.b:443 (GET, POST)");
        for bad in [
            "api.example.com",
            "ftp://a.b",
            "https://",
            "https://a.b:",
            "https://a.b:99999",
            "https://a.b:x",
            "https://user@a.b",
            "https://a.b/?q=1",
            "https://a..b",
            "https://-a.b",
            "https://a_b.c",
            "https://127.1",
            "https://[::1",
            "https://a.b/x/../y",
            "https://*",
        ] {
            assert!(HttpGrant::parse(bad, None).is_err(), "{bad} parsed");
        }
        assert!(HttpGrant::parse("https://a.b", Some(&["get".into()])).is_err());
    }

    #[test]
    fn a_grant_allows_exactly_its_scheme_host_port_path_and_methods() {
        assert!(allows("http://127.0.0.1:*", "http://127.0.0.1:8080/x"));
        assert!(!allows("http://127.0.0.1:*", "http://127.0.0.2:8080/x"));
        assert!(!allows("http://127.0.0.1:*", "http://localhost:8080/x"));
        assert!(!allows("http://localhost:*", "http://127.0.0.1:8080/x"));
        assert!(!allows("http://127.0.0.1:*", "https://127.0.0.1:8080/x"));
        assert!(allows("http://127.0.0.1:8080", "http://127.0.0.1:8080/"));
        assert!(!allows("http://127.0.0.1:8080", "http://127.0.0.1:8081/"));
        assert!(allows(
            "https://api.example.com",
            "https://API.example.com/"
        ));
        assert!(!allows(
            "https://api.example.com",
            "https://api.example.com:8443/"
        ));
        assert!(!allows(
            "https://api.example.com",
            "https://api.example.com.evil.net/"
        ));
        assert!(allows("https://*.example.org", "https://a.example.org/"));
        assert!(allows("https://*.example.org", "https://a.b.example.org/"));
        assert!(!allows("https://*.example.org", "https://example.org/"));
        assert!(!allows("https://*.example.org", "https://badexample.org/"));
        assert!(allows("https://a.b/v1", "https://a.b/v1"));
        assert!(allows("https://a.b/v1", "https://a.b/v1/x?y=1"));
        assert!(allows("https://a.b/v1/", "https://a.b/v1/x"));
        assert!(!allows("https://a.b/v1", "https://a.b/v10"));
        assert!(!allows("https://a.b/v1", "https://a.b/v1/../admin"));
        assert!(!allows("https://a.b/v1", "https://a.b/v1/%2e%2e/admin"));
        assert!(!allows("https://a.b/v1", "https://a.b/v1%2F..%2Fadmin"));
        assert!(allows("http://[::1]:*", "http://[::1]:80/"));
        assert!(!allows("http://[::1]:*", "http://127.0.0.1:80/"));
        let post_only = HttpGrant::parse("https://a.b", Some(&["POST".into()])).expect("valid");
        assert!(post_only.allows("POST", "https", "a.b", 443, "/"));
        assert!(!post_only.allows("GET", "https", "a.b", 443, "/"));
    }

    #[test]
    fn covering_is_per_part() {
        let covers = |a: &str, b: &str| g(a).covers(&g(b));
        assert!(covers("http://127.0.0.1:*", "http://127.0.0.1:8080"));
        assert!(!covers("http://127.0.0.1:8080", "http://127.0.0.1:*"));
        assert!(covers("https://*.example.org", "https://a.example.org"));
        assert!(covers("https://*.example.org", "https://*.a.example.org"));
        assert!(!covers("https://*.example.org", "https://example.org"));
        assert!(!covers("https://a.example.org", "https://*.example.org"));
        assert!(covers("https://a.b", "https://a.b/v1"));
        assert!(covers("https://a.b/v1", "https://a.b/v1/x"));
        assert!(!covers("https://a.b/v1", "https://a.b"));
        assert!(!covers("https://a.b/v1", "https://a.b/v10"));
        assert!(!covers("http://a.b", "https://a.b"));
        let get = HttpGrant::parse("https://a.b", Some(&["GET".into()])).expect("valid");
        assert!(g("https://a.b").covers(&get));
        assert!(!get.covers(&g("https://a.b")));
    }
}
