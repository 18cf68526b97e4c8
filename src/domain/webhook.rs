//! Merchant webhooks, the pure part (docs/API.md, "Webhook endpoints"): event ids, which
//! endpoint wants which event, the signature a merchant verifies, the retry schedule, and which
//! targets payrail refuses to call.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The public id of the outbox row `id`: `evt_` and 16 hex digits, so ids sort as rows do.
pub fn event_id(id: i64) -> String {
    format!("evt_{id:016x}")
}

/// The outbox row of an event id; `None` for anything [`event_id`] does not make.
pub fn parse_event_id(s: &str) -> Option<i64> {
    let hex = s.strip_prefix("evt_")?;
    if hex.len() != 16 || !hex.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
        return None;
    }
    i64::from_str_radix(hex, 16).ok().filter(|id| *id > 0)
}

/// The event a merchant reads and receives, built the same way by the relay, the events API
/// and every delivery: `{"object":"event","id","type","created","created_at","data":{"object"}}`.
pub fn event_object(
    id: i64,
    event_type: &str,
    created_at: chrono::DateTime<chrono::Utc>,
    object: &serde_json::Value,
) -> serde_json::Value {
    serde_json::json!({
        "object": "event",
        "id": event_id(id),
        "type": event_type,
        "created": created_at.timestamp(),
        "created_at": crate::domain::record::timestamp(created_at),
        "data": { "object": object },
    })
}

/// [`event_object`] as bytes, around an object that is JSON text already (the outbox relay's:
/// the stored payload is published without being parsed into a tree and serialized again).
pub fn event_bytes(
    id: i64,
    event_type: &str,
    created_at: chrono::DateTime<chrono::Utc>,
    object: &serde_json::value::RawValue,
) -> Result<Vec<u8>, serde_json::Error> {
    #[derive(serde::Serialize)]
    struct Data<'a> {
        object: &'a serde_json::value::RawValue,
    }
    #[derive(serde::Serialize)]
    struct Event<'a> {
        object: &'static str,
        id: String,
        #[serde(rename = "type")]
        event_type: &'a str,
        created: i64,
        created_at: String,
        data: Data<'a>,
    }
    serde_json::to_vec(&Event {
        object: "event",
        id: event_id(id),
        event_type,
        created: created_at.timestamp(),
        created_at: crate::domain::record::timestamp(created_at),
        data: Data { object },
    })
}

/// JSON text without the whitespace between its tokens (PostgreSQL writes `jsonb` as
/// `{"a": 1, "b": [2, 3]}`); whitespace inside strings is kept. Input that is not JSON comes
/// out as garbled as it went in: the caller validates.
pub fn compact_json(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    for c in text.chars() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
            out.push(c);
        } else if !c.is_ascii_whitespace() {
            out.push(c);
        }
    }
    out
}

/// Event types an endpoint may name: `*`, a known type, or a family such as `payment.*`.
pub const EVENT_FAMILIES: &[&str] = &[
    "payment",
    "refund",
    "dispute",
    "webhook_endpoint",
    "account",
    "transfer",
    "payout",
];

/// Whether `enabled` (an endpoint's `enabled_events`) takes `event_type`.
pub fn wants(enabled: &[String], event_type: &str) -> bool {
    enabled.iter().any(|e| {
        e == "*"
            || e == event_type
            || e.strip_suffix(".*")
                .is_some_and(|family| event_type.strip_prefix(family).is_some_and(|r| r.starts_with('.')))
    })
}

/// Whether `pattern` is something an endpoint may subscribe to.
pub fn valid_event_pattern(pattern: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    let Some((family, rest)) = pattern.split_once('.') else {
        return false;
    };
    EVENT_FAMILIES.contains(&family)
        && !rest.is_empty()
        && rest.len() <= 64
        && (rest == "*" || rest.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
}

type HmacSha256 = Hmac<Sha256>;

/// The `Payrail-Signature` header for `payload` sent at `t` (Unix seconds): `t=<t>` and one
/// `v1=<hex HMAC-SHA256 of "t.payload">` per secret, exactly as Stripe signs, so Stripe's own
/// libraries verify it. During a rotation both the new and the old secret sign.
pub fn signature_header(payload: &[u8], secrets: &[&str], t: i64) -> String {
    let mut header = format!("t={t}");
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        let mut mac = HmacSha256::new_from_slice(secret.as_bytes())
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(t.to_string().as_bytes());
        mac.update(b".");
        mac.update(payload);
        header.push_str(",v1=");
        header.push_str(&hex::encode(mac.finalize().into_bytes()));
    }
    header
}

/// The retry schedule: after the `failures`-th failed attempt, wait `base · 2^(failures-1)`,
/// at most `max`, then take a random point in its upper half (`jitter` is any `u64`, uniform),
/// so endpoints that failed together do not all come back at once.
pub fn retry_delay(failures: u32, base: Duration, max: Duration, jitter: u64) -> Duration {
    let exp = failures.saturating_sub(1).min(32);
    let full = base.saturating_mul(1u32 << exp.min(31)).min(max);
    let half = full / 2;
    let spread = half.as_millis() as u64;
    let extra = if spread == 0 { 0 } else { jitter % (spread + 1) };
    half + Duration::from_millis(extra)
}

/// Why a target URL is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("url must be an absolute https URL")]
    NotHttps,
    #[error("url must be an absolute http(s) URL with a host")]
    Malformed,
    #[error("url must not carry credentials")]
    Credentials,
    #[error("url points to a private, loopback or link-local address ({0})")]
    Private(IpAddr),
    #[error("url's host does not resolve")]
    Unresolved,
    #[error("url's host could not be resolved in time; try again")]
    ResolverUnavailable,
}

/// A target URL, checked for form: scheme, host, port. Whether its addresses are public is
/// checked when it is created and again at every connection (DNS can change in between).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub https: bool,
    pub host: String,
    pub port: u16,
}

/// Parses `url` as a webhook target; `allow_http` admits `http` (local and test setups only).
pub fn parse_target(url: &str, allow_http: bool) -> Result<Target, TargetError> {
    let uri: actix_web::http::Uri = url.parse().map_err(|_| TargetError::Malformed)?;
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") if allow_http => false,
        Some("http") => return Err(TargetError::NotHttps),
        _ => return Err(TargetError::Malformed),
    };
    let authority = uri.authority().ok_or(TargetError::Malformed)?;
    if authority.as_str().contains('@') {
        return Err(TargetError::Credentials);
    }
    let host = authority.host().trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || url.len() > 2048 || url.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err(TargetError::Malformed);
    }
    Ok(Target {
        https,
        host: host.to_ascii_lowercase(),
        port: authority.port_u16().unwrap_or(if https { 443 } else { 80 }),
    })
}

/// Whether payrail may call `ip`: a unicast address on the public internet. Refused: loopback,
/// private (RFC 1918, unique local), link-local (cloud metadata services live there), shared
/// (CGNAT), unspecified, multicast, broadcast, documentation and reserved ranges, and IPv6
/// forms that embed a refused IPv4 address.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.is_documentation()
        || a == 0
        || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
        || (a == 192 && b == 0 && c == 0) // IETF protocol assignments
        || (a == 198 && (18..20).contains(&b)) // benchmarking
        || (a == 192 && b == 88 && c == 99) // 6to4 relay anycast
        || a >= 240) // reserved
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_public_v4(v4);
    }
    let s = ip.segments();
    // NAT64 (64:ff9b::/96) and 6to4 (2002::/16) reach an IPv4 address: judge that one.
    if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
        return is_public_v4(Ipv4Addr::new(
            (s[6] >> 8) as u8,
            s[6] as u8,
            (s[7] >> 8) as u8,
            s[7] as u8,
        ));
    }
    if s[0] == 0x2002 {
        return is_public_v4(Ipv4Addr::new(
            (s[1] >> 8) as u8,
            s[1] as u8,
            (s[2] >> 8) as u8,
            s[2] as u8,
        ));
    }
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || (s[0] & 0xfe00) == 0xfc00 // unique local
        || (s[0] & 0xffc0) == 0xfe80 // link-local
        || (s[0] & 0xffc0) == 0xfec0 // site-local (deprecated, still routed by some)
        || (s[0] == 0x2001 && s[1] == 0) // Teredo: an obfuscated IPv4 address inside
        || (s[0] == 0x64 && s[1] == 0xff9b) // local-use NAT64 (64:ff9b:1::/48) and the rest of it
        || (s[0] == 0x100 && s[1..4] == [0, 0, 0]) // discard-only
        || (s[0..5] == [0, 0, 0, 0, 0] && s[5] == 0xffff) // IPv4-mapped, any form
        || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
        || s[0..6] == [0, 0, 0, 0, 0, 0]) // IPv4-compatible (deprecated)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn events_built_around_stored_json_text_are_the_events_built_from_trees() {
        // As PostgreSQL writes jsonb: a space after every ':' and ',' between tokens, and
        // strings that hold both, quotes and backslashes.
        let stored = r#"{"id": "pay_1", "amount": 1500, "metadata": {"note": "a: b, c \"d\" \\"}, "splits": [1, 2], "card": null}"#;
        let tree: serde_json::Value = serde_json::from_str(stored).unwrap();
        let compact = compact_json(stored);
        assert_eq!(compact, serde_json::to_string(&tree).unwrap());
        let raw = serde_json::value::RawValue::from_string(compact).unwrap();
        let at = chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        let bytes = event_bytes(42, "payment.settled", at, &raw).unwrap();
        assert_eq!(
            bytes,
            serde_json::to_vec(&event_object(42, "payment.settled", at, &tree)).unwrap()
        );
    }

    fn json_tree() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            "[ -~\\t\\n\"\\\\é€]{0,12}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
                prop::collection::vec(("[ -~]{0,8}", inner), 0..6)
                    .prop_map(|kv| serde_json::Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn compacting_json_text_keeps_every_value_and_drops_only_the_space_between_tokens(tree in json_tree()) {
            let spaced = serde_json::to_string_pretty(&tree).unwrap();
            prop_assert_eq!(compact_json(&spaced), serde_json::to_string(&tree).unwrap());
        }
    }

    #[test]
    fn event_ids_round_trip_and_sort_as_rows_do() {
        assert_eq!(event_id(1), "evt_0000000000000001");
        assert_eq!(parse_event_id(&event_id(0x1234_5678_9abc)), Some(0x1234_5678_9abc));
        assert!(event_id(9) < event_id(10) && event_id(255) < event_id(256));
        for bad in [
            "evt_1",
            "evt_000000000000000G",
            "evt_0000000000000000",
            "pay_0000000000000001",
            "evt_000000000000000A",
        ] {
            assert_eq!(parse_event_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn endpoints_take_exact_types_families_or_everything() {
        let e = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(wants(&e(&["*"]), "payment.captured"));
        assert!(wants(&e(&["payment.captured"]), "payment.captured"));
        assert!(!wants(&e(&["payment.captured"]), "payment.capture"));
        assert!(wants(&e(&["refund.*"]), "refund.succeeded"));
        assert!(!wants(&e(&["refund.*"]), "refunds.succeeded"));
        assert!(!wants(&e(&["payment.*"]), "payment"));
        assert!(valid_event_pattern("payment.*") && valid_event_pattern("dispute.won") && valid_event_pattern("*"));
        assert!(
            !valid_event_pattern("payment") && !valid_event_pattern("ledger.*") && !valid_event_pattern("payment.X")
        );
    }

    #[test]
    fn stripe_signs_the_same_bytes() {
        // Computed independently: printf '1700000000.{"a":1}' | openssl dgst -sha256 -hmac whsec_test
        let h = signature_header(br#"{"a":1}"#, &["whsec_test"], 1_700_000_000);
        assert_eq!(
            h,
            "t=1700000000,v1=38877139021993b830af32feea6e18a8da83eb2f6e49ee50bd9e4cf4ca4d3789"
        );
        let two = signature_header(b"x", &["whsec_a", "", "whsec_b"], 5);
        assert_eq!(two.matches("v1=").count(), 2);
        let verified = crate::adapters::psp::signature::verify_stripe(&two, b"x", &["whsec_b"], 300, 5);
        assert_eq!(verified, Ok(5));
    }

    #[test]
    fn the_schedule_doubles_with_jitter_and_is_capped() {
        let (base, max) = (Duration::from_secs(10), Duration::from_secs(7200));
        assert_eq!(retry_delay(1, base, max, 0), Duration::from_secs(5));
        assert_eq!(retry_delay(1, base, max, u64::MAX), retry_delay(1, base, max, u64::MAX));
        assert!(retry_delay(1, base, max, 5_000) == Duration::from_secs(10));
        assert_eq!(retry_delay(4, base, max, 0), Duration::from_secs(40));
        assert_eq!(retry_delay(40, base, max, 0), Duration::from_secs(3600));
        for n in 1..100u32 {
            for j in [0, 1, 999, 12_345_678, u64::MAX] {
                let d = retry_delay(n, base, max, j);
                assert!(d <= max && d >= retry_delay(n, base, max, 0));
            }
        }
    }

    #[test]
    fn private_targets_are_refused() {
        for ip in [
            "127.0.0.1",
            "10.0.0.1",
            "172.16.5.4",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:10.1.2.3",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::1",
            "::",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "fec0::1",
            "64:ff9b:1::808:808",
            "100::1",
            "192.88.99.1",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["93.184.216.34", "8.8.8.8", "2606:4700::1111", "::ffff:8.8.8.8"] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn targets_are_parsed_strictly() {
        let t = parse_target("https://hooks.example.com/payrail?x=1", false).unwrap();
        assert_eq!((t.https, t.host.as_str(), t.port), (true, "hooks.example.com", 443));
        assert_eq!(parse_target("http://example.com/", false), Err(TargetError::NotHttps));
        assert_eq!(parse_target("http://127.0.0.1:9/", true).unwrap().port, 9);
        assert_eq!(parse_target("https://[::1]:8443/x", false).unwrap().host, "::1");
        assert_eq!(
            parse_target("https://u:p@example.com/", false),
            Err(TargetError::Credentials)
        );
        for bad in [
            "ftp://example.com/",
            "example.com/hook",
            "https:///x",
            "",
            "https://exa mple.com/",
        ] {
            assert!(parse_target(bad, true).is_err(), "{bad}");
        }
    }
}
