//! Prefixed identifiers. Each kind is its own type, so a refund id cannot be passed where a
//! payment id is expected. The body is a UUIDv7: time-ordered, so index inserts stay local.

use std::fmt;

macro_rules! prefixed_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        ///
        /// Shared, not copied: a clone is a reference count, so a payment's actor, its registry
        /// entry and its state hold one id between them, and every payment of a merchant one
        /// merchant id.
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(std::sync::Arc<str>);

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                String::deserialize(d).map(Self::from_trusted)
            }
        }

        impl $name {
            pub const PREFIX: &'static str = $prefix;

            pub fn generate() -> Self {
                $name(format!("{}{}", $prefix, uuid::Uuid::now_v7().simple()).into())
            }

            /// Accepts what `generate` makes and what an older deployment may have made: the
            /// prefix, then 1 to 64 ASCII letters, digits or underscores.
            pub fn parse(s: &str) -> Option<Self> {
                let body = s.strip_prefix($prefix)?;
                let ok = !body.is_empty()
                    && body.len() <= 64
                    && body.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
                ok.then(|| $name(s.into()))
            }

            /// For values read back from our own storage, which only ever holds valid ids.
            pub fn from_trusted(s: String) -> Self {
                $name(s.into())
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

prefixed_id!(/// A payment, `pay_…`.
    PaymentId, "pay_");
prefixed_id!(/// A refund, `re_…`.
    RefundId, "re_");
prefixed_id!(/// A merchant, `mer_…`.
    MerchantId, "mer_");
prefixed_id!(/// A ledger journal, `jr_…`.
    JournalId, "jr_");
prefixed_id!(/// A dispute, `dp_…`.
    DisputeId, "dp_");
prefixed_id!(/// A platform's connected (seller) account, `acct_…`.
    AccountId, "acct_");
prefixed_id!(/// A transfer from a platform to one of its sellers, `tr_…`.
    TransferId, "tr_");
prefixed_id!(/// One attempt at a PSP operation, `att_…`; it is also the idempotency key sent to the PSP.
    AttemptId, "att_");

/// The id of a merchant's own sandbox connector: derived from the merchant's id (migration V7
/// computes the same), so the demo merchant's is known in advance.
pub fn sandbox_connector_id(merchant: &MerchantId) -> String {
    use sha2::Digest;
    format!(
        "mca_{}",
        &hex::encode(sha2::Sha256::digest(merchant.as_str().as_bytes()))[..24]
    )
}

/// FNV-1a: stable across builds and platforms, so a key keeps its shard or partition.
pub fn stable_hash(key: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_parse_and_keep_their_prefix() {
        let id = PaymentId::generate();
        assert!(id.as_str().starts_with("pay_"));
        assert_eq!(PaymentId::parse(id.as_str()), Some(id));
    }

    #[test]
    fn wrong_prefix_or_characters_are_rejected() {
        assert!(PaymentId::parse("re_abc").is_none());
        assert!(PaymentId::parse("pay_").is_none());
        assert!(PaymentId::parse("pay_abc-def").is_none());
        assert!(PaymentId::parse("pay_abc'; drop table payments").is_none());
        assert!(PaymentId::parse(&format!("pay_{}", "a".repeat(65))).is_none());
    }

    #[test]
    fn v7_ids_sort_by_creation_time() {
        let a = PaymentId::generate();
        let b = PaymentId::generate();
        assert!(a < b);
    }
}
