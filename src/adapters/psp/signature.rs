//! PSP webhook signatures. Stripe (and the sandbox, which signs like Stripe): the header
//! `t=<unix>,v1=<hex>[,v1=…]` over `"{t}.{raw body}"`, HMAC-SHA256, any `v1` under any of the
//! configured secrets (rotation), timestamps within a tolerance. Adyen: HMAC-SHA256 over the
//! notification's fields with a hex key, base64. Every comparison is constant-time (`hmac`'s
//! `verify_slice`).

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("missing or malformed signature header")]
    Malformed,
    #[error("the timestamp is outside the tolerance")]
    Stale,
    #[error("no signature matches")]
    Mismatch,
}

/// Verifies a `Stripe-Signature` header for `payload` at time `now` (Unix seconds); returns the
/// signed timestamp. `secrets` holds the current and the previous secret (empty ones skipped).
pub fn verify_stripe(
    header: &str,
    payload: &[u8],
    secrets: &[&str],
    tolerance_secs: i64,
    now: i64,
) -> Result<i64, SignatureError> {
    let mut timestamp = None;
    let mut signatures = Vec::new();
    let mut v1s = 0;
    for part in header.split(',') {
        let (k, v) = part.trim().split_once('=').ok_or(SignatureError::Malformed)?;
        match k {
            "t" => timestamp = Some(v.parse::<i64>().map_err(|_| SignatureError::Malformed)?),
            // Only v1 is a signature scheme we accept; v0 and others are ignored.
            "v1" => {
                // Stripe sends one or two (during a secret's rotation): a header with many is not
                // Stripe's, and refused before any MAC is computed.
                v1s += 1;
                if v1s > MAX_SIGNATURES {
                    return Err(SignatureError::Malformed);
                }
                let sig = hex::decode(v).map_err(|_| SignatureError::Malformed)?;
                // A signature of another length can match no HMAC-SHA256: skipped.
                if sig.len() == SIGNATURE_LEN {
                    signatures.push(sig);
                }
            }
            _ => {}
        }
    }
    let t = timestamp.ok_or(SignatureError::Malformed)?;
    if v1s == 0 {
        return Err(SignatureError::Malformed);
    }
    // `abs_diff`: a timestamp far in the past or future (i64::MIN) is stale, never an overflow.
    if now.abs_diff(t) > tolerance_secs.max(0).unsigned_abs() {
        return Err(SignatureError::Stale);
    }
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        // The body's MAC once per secret; each signature is checked against a copy of its state
        // (constant-time), so the work is one pass over the body per secret, whatever the header.
        let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).map_err(|_| SignatureError::Malformed)?;
        mac.update(t.to_string().as_bytes());
        mac.update(b".");
        mac.update(payload);
        if signatures.iter().any(|sig| mac.clone().verify_slice(sig).is_ok()) {
            return Ok(t);
        }
    }
    Err(SignatureError::Mismatch)
}

/// The most `v1` signatures a `Stripe-Signature` header may carry.
pub const MAX_SIGNATURES: usize = 8;

/// The length of an HMAC-SHA256 signature, in bytes.
const SIGNATURE_LEN: usize = 32;

/// The `Stripe-Signature` header for `payload` at `t`, as the sandbox sends it.
pub fn sign_stripe(payload: &[u8], secret: &str, t: i64) -> String {
    let mut mac =
        HmacSha256::new_from_slice(secret.as_bytes()).unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(payload);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// The fields Adyen signs, in order.
#[derive(Debug, Clone, Default)]
pub struct AdyenFields<'a> {
    pub psp_reference: &'a str,
    pub original_reference: &'a str,
    pub merchant_account_code: &'a str,
    pub merchant_reference: &'a str,
    pub value: &'a str,
    pub currency: &'a str,
    pub event_code: &'a str,
    pub success: &'a str,
}

impl AdyenFields<'_> {
    /// `psp:original:merchantAccount:merchantReference:value:currency:eventCode:success`, each
    /// field with `\` doubled and `:` escaped as `\:`.
    pub fn signed_string(&self) -> String {
        let esc = |s: &str| s.replace('\\', "\\\\").replace(':', "\\:");
        [
            self.psp_reference,
            self.original_reference,
            self.merchant_account_code,
            self.merchant_reference,
            self.value,
            self.currency,
            self.event_code,
            self.success,
        ]
        .iter()
        .map(|f| esc(f))
        .collect::<Vec<_>>()
        .join(":")
    }
}

/// Signs an Adyen notification item as Adyen does (for doubles and tests); `None` for a key
/// that is not hex.
pub fn sign_adyen(fields: &AdyenFields<'_>, key_hex: &str) -> Option<String> {
    let key = hex::decode(key_hex).ok()?;
    let mut mac = HmacSha256::new_from_slice(&key).ok()?;
    mac.update(fields.signed_string().as_bytes());
    Some(base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()))
}

/// Verifies an Adyen notification item's `hmacSignature` (base64) with the hex key.
pub fn verify_adyen(fields: &AdyenFields<'_>, key_hex: &str, signature_b64: &str) -> Result<(), SignatureError> {
    let key = hex::decode(key_hex).map_err(|_| SignatureError::Malformed)?;
    let signature = base64::engine::general_purpose::STANDARD
        .decode(signature_b64)
        .map_err(|_| SignatureError::Malformed)?;
    let mut mac = HmacSha256::new_from_slice(&key).map_err(|_| SignatureError::Malformed)?;
    mac.update(fields.signed_string().as_bytes());
    mac.verify_slice(&signature).map_err(|_| SignatureError::Mismatch)
}
