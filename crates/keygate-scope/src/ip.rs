//! The client address: the connection's peer, or — only behind a trusted proxy — the
//! forwarding header read from the right.

use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;
use ipnet::IpNet;
use keygate_core::canonical_ip;
use serde::{Deserialize, Serialize};

/// Which forwarding header trusted proxies set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ForwardedHeader {
    /// `X-Forwarded-For: client, proxy1, proxy2`.
    #[default]
    XForwardedFor,
    /// RFC 7239 `Forwarded: for=client, for=proxy1`.
    Forwarded,
}

/// Proxies whose forwarding header is believed.
///
/// # Security
///
/// Only list proxies you run. A request from a listed address can name any client address in
/// its forwarding header; the header is walked from the right, skipping trusted proxies, and
/// the first address that is not one of them is the client. Headers from any other peer are
/// ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustedProxies {
    /// The proxies' address ranges.
    pub ranges: Vec<IpNet>,
    /// The header they set.
    #[serde(default)]
    pub header: ForwardedHeader,
}

impl TrustedProxies {
    /// Trusts `ranges`, reading `X-Forwarded-For`.
    pub fn new(ranges: impl IntoIterator<Item = IpNet>) -> Self {
        TrustedProxies {
            ranges: ranges.into_iter().collect(),
            header: ForwardedHeader::XForwardedFor,
        }
    }

    /// Reads `header` instead.
    #[must_use]
    pub fn with_header(mut self, header: ForwardedHeader) -> Self {
        self.header = header;
        self
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        self.ranges.iter().any(|net| net.contains(&ip))
    }

    /// The client's address given the connection's `peer`: `None` when it cannot be known
    /// (no peer, or a trusted proxy sent an entry that is not an address).
    pub fn client_ip(&self, peer: Option<IpAddr>, headers: &HeaderMap) -> Option<IpAddr> {
        let peer = canonical_ip(peer?);
        if self.ranges.is_empty() || !self.trusts(peer) {
            return Some(peer);
        }
        let mut last = peer;
        match self.header {
            ForwardedHeader::XForwardedFor => {
                for value in headers.get_all("x-forwarded-for").iter().rev() {
                    let value = value.to_str().ok()?;
                    for entry in value.rsplit(',') {
                        let ip = canonical_ip(parse_addr(entry.trim())?);
                        if !self.trusts(ip) {
                            return Some(ip);
                        }
                        last = ip;
                    }
                }
            }
            ForwardedHeader::Forwarded => {
                for value in headers.get_all(http::header::FORWARDED).iter().rev() {
                    let value = value.to_str().ok()?;
                    for element in value.rsplit(',') {
                        let ip = canonical_ip(forwarded_for(element)?);
                        if !self.trusts(ip) {
                            return Some(ip);
                        }
                        last = ip;
                    }
                }
            }
        }
        Some(last)
    }
}

fn parse_addr(s: &str) -> Option<IpAddr> {
    let s = s.trim_matches('"');
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Some(v6) = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        return v6.parse().ok();
    }
    s.parse::<SocketAddr>().ok().map(|a| a.ip())
}

fn forwarded_for(element: &str) -> Option<IpAddr> {
    for pair in element.split(';') {
        let (k, v) = pair.trim().split_once('=')?;
        if k.trim().eq_ignore_ascii_case("for") {
            return parse_addr(v.trim());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(name: &'static str, values: &[&'static str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(name, HeaderValue::from_static(v));
        }
        h
    }

    fn proxies() -> TrustedProxies {
        TrustedProxies::new(["10.0.0.0/8".parse().unwrap()])
    }

    #[test]
    fn untrusted_peer_header_is_ignored() {
        let h = headers("x-forwarded-for", &["1.2.3.4"]);
        let peer = "203.0.113.9".parse().ok();
        assert_eq!(proxies().client_ip(peer, &h), peer);
        assert_eq!(TrustedProxies::default().client_ip(peer, &h), peer);
    }

    #[test]
    fn trusted_peer_header_is_walked_from_the_right() {
        let h = headers("x-forwarded-for", &["6.6.6.6, 1.2.3.4", "10.0.0.2"]);
        let ip = proxies().client_ip("10.0.0.1".parse().ok(), &h);
        assert_eq!(ip, "1.2.3.4".parse().ok());
    }

    #[test]
    fn garbage_from_trusted_proxy_is_unknown() {
        let h = headers("x-forwarded-for", &["nonsense"]);
        assert_eq!(proxies().client_ip("10.0.0.1".parse().ok(), &h), None);
    }

    #[test]
    fn ipv4_mapped_peer_is_compared_as_ipv4() {
        let h = headers("x-forwarded-for", &["1.2.3.4"]);
        let ip = proxies().client_ip("::ffff:10.0.0.1".parse().ok(), &h);
        assert_eq!(ip, "1.2.3.4".parse().ok());
        let ip = TrustedProxies::default().client_ip("::ffff:1.2.3.4".parse().ok(), &h);
        assert_eq!(ip, "1.2.3.4".parse().ok());
    }

    #[test]
    fn forwarded_header_is_read_when_configured() {
        let h = headers(
            "forwarded",
            &[r#"for=6.6.6.6, for="[2001:db8::17]:4711";proto=https, for=10.1.1.1"#],
        );
        let p = proxies().with_header(ForwardedHeader::Forwarded);
        assert_eq!(
            p.client_ip("10.0.0.1".parse().ok(), &h),
            "2001:db8::17".parse().ok()
        );
        let h = headers("forwarded", &["for=unknown"]);
        assert_eq!(p.client_ip("10.0.0.1".parse().ok(), &h), None);
    }

    #[test]
    fn no_peer_is_unknown() {
        assert_eq!(proxies().client_ip(None, &HeaderMap::new()), None);
    }
}
