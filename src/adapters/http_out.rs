//! Outgoing HTTP to merchants' webhook endpoints: awc, TLS by rustls with the Mozilla roots, no
//! redirects, a deadline on the whole exchange, and a resolver that refuses private addresses
//! at every connection (so a name that resolved to a public address when the endpoint was
//! created cannot be pointed at the internal network later: DNS rebinding). Merchants'
//! answers are never parsed: the first 1 KiB is kept as text for the delivery log.

use std::error::Error as StdError;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use actix_tls::connect::{Resolve, Resolver};
use futures_util::future::LocalBoxFuture;
use futures_util::StreamExt;

use crate::domain::webhook::{is_public, parse_target, TargetError};

/// Bytes of an answer kept for the log.
pub const RESPONSE_EXCERPT: usize = 1024;

/// Resolves with the system resolver and refuses the whole answer if any address is not public.
struct PublicOnly;

impl Resolve for PublicOnly {
    fn lookup<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> LocalBoxFuture<'a, Result<Vec<SocketAddr>, Box<dyn StdError>>> {
        Box::pin(async move {
            resolve_public(host, port)
                .await
                .map_err(|e| Box::new(e) as Box<dyn StdError>)
        })
    }
}

/// The addresses of `host`, all of them public, within 5 s: the one check, at creation and at
/// every connection.
async fn resolve_public(host: &str, port: u16) -> Result<Vec<SocketAddr>, TargetError> {
    let lookup = tokio::time::timeout(Duration::from_secs(5), tokio::net::lookup_host((host, port))).await;
    let addrs: Vec<SocketAddr> = match lookup {
        Err(_) => return Err(TargetError::ResolverUnavailable),
        Ok(Err(_)) => return Err(TargetError::Unresolved),
        Ok(Ok(addrs)) => addrs.collect(),
    };
    if addrs.is_empty() {
        return Err(TargetError::Unresolved);
    }
    match addrs.iter().find(|a| !is_public(a.ip())) {
        Some(bad) => Err(TargetError::Private(bad.ip())),
        None => Ok(addrs),
    }
}

/// The form of `url` (https unless `allow_private`) and, for an address literal (which no
/// resolver sees), whether it is public. Cheap: no lookup.
pub fn check_form(url: &str, allow_private: bool) -> Result<(), TargetError> {
    let target = parse_target(url, allow_private)?;
    match target.host.parse::<IpAddr>() {
        Ok(ip) if !allow_private && !is_public(ip) => Err(TargetError::Private(ip)),
        _ => Ok(()),
    }
}

/// Checks, when an endpoint is created or its URL changed, that `url` is a target payrail may
/// call: [`check_form`], and every address its host resolves to public.
pub async fn check_target(url: &str, allow_private: bool) -> Result<(), TargetError> {
    check_form(url, allow_private)?;
    let target = parse_target(url, allow_private)?;
    if allow_private || target.host.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    resolve_public(&target.host, target.port).await.map(|_| ())
}

/// What one POST came to.
#[derive(Debug, Clone, PartialEq)]
pub struct Sent {
    pub status: Option<u16>,
    pub latency: Duration,
    pub response: Option<String>,
    /// Why there is no status, or why the status does not count (`timeout`, `connect`…).
    pub error: Option<String>,
    /// A metric label for the outcome: `succeeded`, `http_error`, `timeout`, `connect_error`,
    /// `refused_target`.
    pub outcome: &'static str,
}

impl Sent {
    pub fn succeeded(&self) -> bool {
        self.outcome == "succeeded"
    }
}

/// The client of one thread (awc is single-threaded).
pub struct WebhookClient {
    client: awc::Client,
    allow_private: bool,
    timeout: Duration,
}

impl WebhookClient {
    pub fn new(allow_private: bool, timeout: Duration, connections: usize) -> WebhookClient {
        let connector = awc::Connector::new()
            .timeout(timeout.min(Duration::from_secs(5)))
            .limit(connections);
        // The connector's type differs with the resolver, so the builder is spelt out twice.
        macro_rules! client {
            ($connector:expr) => {
                awc::Client::builder()
                    .connector($connector)
                    .disable_redirects()
                    .timeout(timeout)
                    .add_default_header(("User-Agent", "payrail-webhooks/1"))
                    .finish()
            };
        }
        let client = if allow_private {
            client!(connector)
        } else {
            client!(connector.connector(actix_tls::connect::Connector::new(Resolver::custom(PublicOnly)).service()))
        };
        WebhookClient {
            client,
            allow_private,
            timeout,
        }
    }

    /// POSTs `body` to `url` with `signature`; 2xx within the timeout is success. Never
    /// follows a redirect; reads at most [`RESPONSE_EXCERPT`] bytes of the answer.
    pub async fn post(&self, url: &str, signature: &str, body: actix_web::web::Bytes) -> Sent {
        let started = Instant::now();
        let refused = |e: TargetError| Sent {
            status: None,
            latency: started.elapsed(),
            response: None,
            error: Some(e.to_string()),
            outcome: "refused_target",
        };
        // Again at send time: the URL's form, and an address literal (which no resolver sees).
        if let Err(e) = check_form(url, self.allow_private) {
            return refused(e);
        }
        let exchange = async {
            let mut resp = self
                .client
                .post(url)
                .insert_header(("Content-Type", "application/json"))
                .insert_header(("Payrail-Signature", signature))
                .send_body(body)
                .await?;
            let status = resp.status().as_u16();
            let mut excerpt = Vec::new();
            while excerpt.len() < RESPONSE_EXCERPT {
                match resp.next().await {
                    Some(Ok(chunk)) => {
                        let room = RESPONSE_EXCERPT - excerpt.len();
                        excerpt.extend_from_slice(&chunk[..chunk.len().min(room)]);
                    }
                    _ => break,
                }
            }
            Ok::<_, awc::error::SendRequestError>((status, excerpt))
        };
        let result = tokio::time::timeout(self.timeout, exchange).await;
        let latency = started.elapsed();
        match result {
            Ok(Ok((status, excerpt))) => {
                let ok = (200..300).contains(&status);
                Sent {
                    status: Some(status),
                    latency,
                    response: (!excerpt.is_empty()).then(|| excerpt_text(&excerpt)),
                    error: (!ok).then(|| format!("the endpoint answered {status}")),
                    outcome: if ok { "succeeded" } else { "http_error" },
                }
            }
            Ok(Err(awc::error::SendRequestError::Timeout)) | Err(_) => Sent {
                status: None,
                latency,
                response: None,
                error: Some(format!("no answer within {} ms", self.timeout.as_millis())),
                outcome: "timeout",
            },
            Ok(Err(awc::error::SendRequestError::Connect(e))) => {
                let text = e.to_string();
                let private = matches!(&e, awc::error::ConnectError::Resolver(inner)
                    if matches!(inner.downcast_ref::<TargetError>(), Some(TargetError::Private(_))));
                Sent {
                    status: None,
                    latency,
                    response: None,
                    error: Some(bounded(&format!("cannot connect: {text}"))),
                    outcome: if private { "refused_target" } else { "connect_error" },
                }
            }
            Ok(Err(e)) => Sent {
                status: None,
                latency,
                response: None,
                error: Some(bounded(&format!("the exchange failed: {e}"))),
                outcome: "connect_error",
            },
        }
    }
}

/// At most [`RESPONSE_EXCERPT`] bytes of `raw` as text, cut on a character boundary.
fn excerpt_text(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    bounded(&text)
}

/// At most [`RESPONSE_EXCERPT`] bytes of `text`, without NUL (PostgreSQL's text refuses it: one
/// merchant's odd answer must not stop the recorder).
fn bounded(text: &str) -> String {
    let text = text.replace('\0', "\u{fffd}");
    let mut end = text.len().min(RESPONSE_EXCERPT);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[actix_rt::test]
    async fn names_and_literals_that_reach_private_addresses_are_refused() {
        for url in [
            "https://127.0.0.1/x",
            "https://10.0.0.1/x",
            "https://169.254.169.254/latest/meta-data",
            "https://[::1]/x",
            "https://localhost/x",
            "http://93.184.216.34/x",
        ] {
            assert!(check_target(url, false).await.is_err(), "{url}");
        }
        assert!(check_target("http://127.0.0.1:9/x", true).await.is_ok());
        let resolved = PublicOnly.lookup("localhost", 443).await;
        assert!(
            resolved.is_err(),
            "the connect-time resolver refuses a name that resolves to loopback"
        );
    }

    #[test]
    fn excerpts_are_cut_on_character_boundaries_and_hold_no_nul() {
        let long = "é".repeat(600);
        let cut = excerpt_text(long.as_bytes());
        assert!(cut.len() <= RESPONSE_EXCERPT && cut.chars().all(|c| c == 'é'));
        assert_eq!(excerpt_text(b"a\0b\xff"), "a\u{fffd}b\u{fffd}");
        let nuls = excerpt_text(&[0u8; 2048]);
        assert!(
            nuls.len() <= RESPONSE_EXCERPT && !nuls.contains('\0'),
            "replaced, then cut: {}",
            nuls.len()
        );
    }
}
