//! Secrets at rest: connectors' credentials sealed with AES-256-GCM (ring's AEAD, already
//! compiled in for TLS). A sealed value is a fresh 12-byte random nonce followed by the
//! ciphertext and its 16-byte tag; the associated data binds it to its row (the connector id),
//! so a sealed value copied to another connector does not open.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("[secrets] key must be 64 hex digits (32 bytes)")]
    BadKey,
    #[error("no [secrets] key is configured (PAYRAIL__SECRETS__KEY): credentials cannot be stored")]
    NoKey,
    #[error("a sealed secret did not open: wrong key, wrong row, or tampered with")]
    Open,
    #[error("the system's random source failed")]
    Random,
}

pub struct Sealer {
    key: LessSafeKey,
    random: SystemRandom,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(…)")
    }
}

impl Sealer {
    /// The sealer of `[secrets] key`; `Ok(None)` when none is configured.
    pub fn from_config(key: &str) -> Result<Option<Sealer>, SecretError> {
        let key = key.trim();
        if key.is_empty() {
            return Ok(None);
        }
        let bytes = hex::decode(key).map_err(|_| SecretError::BadKey)?;
        let unbound = UnboundKey::new(&AES_256_GCM, &bytes).map_err(|_| SecretError::BadKey)?;
        Ok(Some(Sealer {
            key: LessSafeKey::new(unbound),
            random: SystemRandom::new(),
        }))
    }

    pub fn seal(&self, row: &str, plain: &[u8]) -> Result<Vec<u8>, SecretError> {
        let mut nonce = [0u8; NONCE_LEN];
        self.random.fill(&mut nonce).map_err(|_| SecretError::Random)?;
        let mut data = plain.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(row.as_bytes()),
                &mut data,
            )
            .map_err(|_| SecretError::Random)?;
        let mut out = Vec::with_capacity(NONCE_LEN + data.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&data);
        Ok(out)
    }

    pub fn open(&self, row: &str, sealed: &[u8]) -> Result<Vec<u8>, SecretError> {
        if sealed.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return Err(SecretError::Open);
        }
        let (nonce, data) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SecretError::Open)?;
        let mut data = data.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(row.as_bytes()), &mut data)
            .map_err(|_| SecretError::Open)?;
        Ok(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    #[test]
    fn sealed_credentials_open_only_with_their_key_and_row() {
        let s = Sealer::from_config(KEY).unwrap().unwrap();
        let sealed = s.seal("mca_1", b"{\"api_key\":\"sk_test_x\"}").unwrap();
        assert!(
            !sealed.windows(7).any(|w| w == b"sk_test"),
            "the plaintext is not in the sealed value"
        );
        assert_eq!(s.open("mca_1", &sealed).unwrap(), b"{\"api_key\":\"sk_test_x\"}");
        // Two seals of the same value differ (a fresh nonce each time).
        assert_ne!(s.seal("mca_1", b"x").unwrap(), s.seal("mca_1", b"x").unwrap());
        assert_eq!(s.open("mca_2", &sealed), Err(SecretError::Open), "another row");
        let mut tampered = sealed.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert_eq!(s.open("mca_1", &tampered), Err(SecretError::Open));
        let other = Sealer::from_config(&KEY.replace("00", "ff")).unwrap().unwrap();
        assert_eq!(other.open("mca_1", &sealed), Err(SecretError::Open), "another key");
        assert_eq!(s.open("mca_1", &sealed[..20]), Err(SecretError::Open));
    }

    #[test]
    fn keys_are_checked() {
        assert!(Sealer::from_config("").unwrap().is_none());
        assert_eq!(Sealer::from_config("abcd").unwrap_err(), SecretError::BadKey);
        assert_eq!(Sealer::from_config(&"zz".repeat(32)).unwrap_err(), SecretError::BadKey);
    }
}
