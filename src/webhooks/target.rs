//! Where a webhook may be sent (the SSRF guard, webhooks.md "Delivery").
//!
//! * At creation: `http`/`https` only, no user info, at most 2048 bytes; a cloud metadata address
//!   (by IP or well-known name) is refused always, an IP literal on a private network unless
//!   `CONTROLLER_WEBHOOK_ALLOW_PRIVATE=true`.
//! * At connect time: [`GuardedResolver`] resolves the name and drops loopback, private, link-local,
//!   unique-local (and unspecified, broadcast, multicast) addresses unless allowed, so a name that
//!   resolves (or re-resolves) to the internal network is never connected to. IP literals skip DNS,
//!   so the delivery checks them itself ([`literal_refused`]).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use reqwest::Url;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Longest accepted target URL.
pub const MAX_URL_LEN: usize = 2048;

/// Instance-metadata endpoints of the clouds (AWS, GCP, Azure, Alibaba, ECS task metadata, AWS IPv6,
/// Oracle Cloud, Azure's wireserver, GCP IPv6).
const METADATA_IPS: [IpAddr; 7] = [
    IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)),
    IpAddr::V4(Ipv4Addr::new(169, 254, 170, 2)),
    IpAddr::V4(Ipv4Addr::new(100, 100, 100, 200)),
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254)),
    IpAddr::V4(Ipv4Addr::new(192, 0, 0, 192)),
    IpAddr::V4(Ipv4Addr::new(168, 63, 129, 16)),
    IpAddr::V6(Ipv6Addr::new(0xfd20, 0x00ce, 0, 0, 0, 0, 0, 0x0254)),
];
const METADATA_NAMES: [&str; 3] = ["metadata.google.internal", "metadata", "instance-data"];

/// Whether an address is a cloud metadata endpoint.
pub fn is_metadata(ip: IpAddr) -> bool {
    METADATA_IPS.contains(&canonical(ip))
}

/// IPv6 addresses that carry an IPv4 address are judged as that address: IPv4-mapped (`::ffff:a.b.c.d`),
/// IPv4-compatible (`::a.b.c.d`), NAT64 (`64:ff9b::/96`) and 6to4 (`2002:AABB:CCDD::/48`).
fn canonical(ip: IpAddr) -> IpAddr {
    let IpAddr::V6(v6) = ip else { return ip };
    if let Some(v4) = v6.to_ipv4_mapped() {
        return IpAddr::V4(v4);
    }
    let s = v6.segments();
    let embedded = |hi: u16, lo: u16| IpAddr::V4(Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8));
    if s[..6] == [0; 6] && !(s[6] == 0 && s[7] <= 1) {
        return embedded(s[6], s[7]);
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return embedded(s[6], s[7]);
    }
    if s[0] == 0x2002 {
        return embedded(s[1], s[2]);
    }
    ip
}

/// Loopback, private, link-local, unique-local, unspecified, broadcast or multicast: never a
/// receiver on the public internet.
pub fn is_private(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => {
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                // 100.64.0.0/10, carrier-grade NAT (shared address space)
                || (v4.octets()[0] == 100 && (v4.octets()[1] & 0xc0) == 64)
                // 0.0.0.0/8 ("this network"), 192.0.0.0/24 (protocol assignments), 198.18.0.0/15
                // (benchmarking), 240.0.0.0/4 (reserved)
                || v4.octets()[0] == 0
                || v4.octets()[..3] == [192, 0, 0]
                || (v4.octets()[0] == 198 && (v4.octets()[1] & 0xfe) == 18)
                || v4.octets()[0] >= 240
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00 // unique local fc00::/7
                || (first & 0xffc0) == 0xfe80 // link local fe80::/10
        }
    }
}

fn host_ip(url: &Url) -> Option<IpAddr> {
    match url.host()? {
        url::Host::Ipv4(v4) => Some(IpAddr::V4(v4)),
        url::Host::Ipv6(v6) => Some(IpAddr::V6(v6)),
        url::Host::Domain(_) => None,
    }
}

/// Checks a target URL when a subscription is created or changed; the error says why.
pub fn check_at_creation(raw: &str, allow_private: bool) -> Result<Url, String> {
    let raw = raw.trim();
    if raw.len() > MAX_URL_LEN {
        return Err(format!("url must be at most {MAX_URL_LEN} bytes"));
    }
    let url = Url::parse(raw).map_err(|_| "url must be an absolute http:// or https:// URL".to_string())?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err("url must be an absolute http:// or https:// URL".to_string());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("url must not carry user info (the signature authenticates deliveries)".to_string());
    }
    if let Some(ip) = host_ip(&url) {
        if is_metadata(ip) {
            return Err("url is a cloud metadata address: refused".to_string());
        }
        if !allow_private && is_private(ip) {
            return Err(
                "url is a loopback, private, link-local or unique-local address: refused (CONTROLLER_WEBHOOK_ALLOW_PRIVATE)"
                    .to_string(),
            );
        }
    } else if let Some(host) = url.host_str() {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if METADATA_NAMES.contains(&host.as_str()) {
            return Err("url is a cloud metadata address: refused".to_string());
        }
    }
    Ok(url)
}

/// Why a delivery to this URL's IP literal must not be attempted (DNS is not asked for literals).
pub fn literal_refused(url: &Url, allow_private: bool) -> Option<&'static str> {
    let ip = host_ip(url)?;
    if is_metadata(ip) {
        Some("target is a cloud metadata address")
    } else if !allow_private && is_private(ip) {
        Some(
            "target is a loopback, private, link-local or unique-local address (CONTROLLER_WEBHOOK_ALLOW_PRIVATE is off)",
        )
    } else {
        None
    }
}

/// The resolver of the delivery client: the system's, minus the addresses a webhook must not reach.
#[derive(Debug, Clone, Copy)]
pub struct GuardedResolver {
    pub allow_private: bool,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allow_private = self.allow_private;
        let host = name.as_str().to_string();
        Box::pin(async move {
            let resolved: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let kept: Vec<SocketAddr> = resolved
                .iter()
                .copied()
                .filter(|a| !is_metadata(a.ip()) && (allow_private || !is_private(a.ip())))
                .collect();
            if kept.is_empty() {
                let why = if resolved.is_empty() {
                    format!("{host} did not resolve")
                } else {
                    format!(
                        "{host} resolves only to loopback, private, link-local, unique-local or metadata addresses: refused (CONTROLLER_WEBHOOK_ALLOW_PRIVATE is off)"
                    )
                };
                return Err(why.into());
            }
            let addrs: Addrs = Box::new(kept.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_ranges() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.1.1",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "fd12::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::10.0.0.1",
            "64:ff9b::a00:1",
            "2002:c0a8:101::1",
            "0.1.2.3",
            "192.0.0.8",
            "198.18.0.1",
            "240.0.0.1",
        ] {
            assert!(is_private(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "2606:4700::1111",
            "100.128.0.1",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert!(!is_private(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn creation_refuses_metadata_always_and_private_literals_unless_allowed() {
        for url in [
            "http://169.254.169.254/latest/meta-data",
            "http://[fd00:ec2::254]/",
            "http://metadata.google.internal/",
            "http://[::ffff:169.254.169.254]/",
            "http://192.0.0.192/",
            "http://168.63.129.16/",
            "http://[fd20:ce::254]/",
            "http://[64:ff9b::a9fe:a9fe]/",
        ] {
            assert!(check_at_creation(url, true).is_err(), "{url}");
        }
        assert!(check_at_creation("http://127.0.0.1:9/", false).is_err());
        assert!(check_at_creation("http://127.0.0.1:9/", true).is_ok());
        assert!(check_at_creation("https://hooks.example.com/x", false).is_ok());
        assert!(check_at_creation("ftp://example.com/", true).is_err());
        assert!(check_at_creation("https://user:pw@example.com/", true).is_err());
        assert!(check_at_creation("/relative", true).is_err());
    }
}
