//! Money: integer minor units in one ISO 4217 currency, with checked arithmetic only.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The largest amount one payment may carry, in minor units (docs/API.md: 1 ≤ value ≤ 99,999,999,999).
pub const MAX_AMOUNT: i64 = 99_999_999_999;

/// ISO 4217 alpha-3 codes payrail knows, with their minor-unit exponents. The configured list
/// (`[payments] currencies`) chooses which of these a deployment accepts.
const ISO_4217: &[(&str, u8)] = &[
    ("AED", 2),
    ("AUD", 2),
    ("BHD", 3),
    ("BRL", 2),
    ("CAD", 2),
    ("CHF", 2),
    ("CLP", 0),
    ("CNY", 2),
    ("CZK", 2),
    ("DKK", 2),
    ("EUR", 2),
    ("GBP", 2),
    ("HKD", 2),
    ("HUF", 2),
    ("IDR", 2),
    ("ILS", 2),
    ("INR", 2),
    ("ISK", 0),
    ("JOD", 3),
    ("JPY", 0),
    ("KRW", 0),
    ("KWD", 3),
    ("MXN", 2),
    ("NOK", 2),
    ("NZD", 2),
    ("OMR", 3),
    ("PLN", 2),
    ("RON", 2),
    ("SEK", 2),
    ("SGD", 2),
    ("THB", 2),
    ("TND", 3),
    ("TRY", 2),
    ("USD", 2),
    ("VND", 0),
    ("ZAR", 2),
];

/// An ISO 4217 currency. Copyable and three bytes wide, so it travels inside every amount.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Currency {
    code: [u8; 3],
    exponent: u8,
}

impl Currency {
    /// Parses an upper-case alpha-3 code that ISO 4217 defines; lower case is not accepted
    /// (docs/API.md), so `usd` is an unknown currency rather than a silent alias.
    pub fn parse(code: &str) -> Option<Currency> {
        ISO_4217.iter().find(|(c, _)| *c == code).map(|(c, e)| {
            let b = c.as_bytes();
            Currency {
                code: [b[0], b[1], b[2]],
                exponent: *e,
            }
        })
    }

    pub fn code(&self) -> &str {
        // The bytes came from the ASCII table above.
        std::str::from_utf8(&self.code).unwrap_or("???")
    }

    /// Digits after the decimal point: 2 for USD, 0 for JPY, 3 for KWD.
    pub fn exponent(&self) -> u8 {
        self.exponent
    }

    /// Whether `psp` counts this currency's amounts in its ISO 4217 minor units, as payrail
    /// sends and reads them. Not so: Stripe's ISK (two decimals in its API), Adyen's CLP and
    /// ISK (two) and IDR (none). Such a payment is never routed to that PSP: its amount would be
    /// charged at a hundredth or a hundred times, and its events and reports read the same way.
    pub fn psp_counts_in_iso_units(&self, psp: &str) -> bool {
        !matches!((psp, self.code()), ("stripe", "ISK") | ("adyen", "CLP" | "ISK" | "IDR"))
    }
}

impl fmt::Debug for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

impl Serialize for Currency {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.code())
    }
}

impl<'de> Deserialize<'de> for Currency {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Currency::parse(&s).ok_or_else(|| serde::de::Error::custom("unknown currency"))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("currencies differ: {0} and {1}")]
    CurrencyMismatch(Currency, Currency),
    #[error("amount overflow")]
    Overflow,
}

/// An amount in minor units of one currency. Arithmetic is checked and refuses to mix
/// currencies; there is no conversion to or from floating point anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Money {
    #[serde(rename = "value")]
    pub minor: i64,
    pub currency: Currency,
}

impl Money {
    pub fn new(minor: i64, currency: Currency) -> Money {
        Money { minor, currency }
    }

    pub fn checked_add(self, other: Money) -> Result<Money, MoneyError> {
        self.same_currency(other)?;
        let minor = self.minor.checked_add(other.minor).ok_or(MoneyError::Overflow)?;
        Ok(Money {
            minor,
            currency: self.currency,
        })
    }

    pub fn checked_sub(self, other: Money) -> Result<Money, MoneyError> {
        self.same_currency(other)?;
        let minor = self.minor.checked_sub(other.minor).ok_or(MoneyError::Overflow)?;
        Ok(Money {
            minor,
            currency: self.currency,
        })
    }

    fn same_currency(self, other: Money) -> Result<(), MoneyError> {
        if self.currency == other.currency {
            Ok(())
        } else {
            Err(MoneyError::CurrencyMismatch(self.currency, other.currency))
        }
    }
}

/// The platform fee on a capture of `amount`: `round_half_up(amount × fee_bps / 10000) +
/// fee_fixed`, never more than `amount` and never negative (docs/API.md, "Postings").
pub fn platform_fee(amount: i64, fee_bps: u32, fee_fixed: i64) -> i64 {
    // i128 holds amount × bps for every i64 amount and u32 rate, so nothing here can overflow.
    let variable = (i128::from(amount) * i128::from(fee_bps) + 5_000) / 10_000;
    let fee = variable + i128::from(fee_fixed.max(0));
    fee.clamp(0, i128::from(amount.max(0))) as i64
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_psp_whose_minor_units_differ_from_iso_takes_no_such_currency() {
        let c = |code| Currency::parse(code).unwrap();
        for (psp, code) in [("stripe", "ISK"), ("adyen", "CLP"), ("adyen", "ISK"), ("adyen", "IDR")] {
            assert!(!c(code).psp_counts_in_iso_units(psp), "{psp} {code}");
        }
        for (psp, code) in [
            ("stripe", "JPY"),
            ("stripe", "CLP"),
            ("adyen", "JPY"),
            ("sandbox", "ISK"),
            ("stripe", "USD"),
        ] {
            assert!(c(code).psp_counts_in_iso_units(psp), "{psp} {code}");
        }
    }

    use super::*;
    use proptest::prelude::*;

    fn usd() -> Currency {
        Currency::parse("USD").unwrap()
    }

    #[test]
    fn exponents_follow_iso_4217() {
        assert_eq!(Currency::parse("USD").unwrap().exponent(), 2);
        assert_eq!(Currency::parse("JPY").unwrap().exponent(), 0);
        assert_eq!(Currency::parse("KWD").unwrap().exponent(), 3);
        assert!(Currency::parse("usd").is_none());
        assert!(Currency::parse("XXX").is_none());
        assert!(Currency::parse("").is_none());
    }

    #[test]
    fn mixing_currencies_is_an_error() {
        let eur = Currency::parse("EUR").unwrap();
        let r = Money::new(1, usd()).checked_add(Money::new(1, eur));
        assert_eq!(r, Err(MoneyError::CurrencyMismatch(usd(), eur)));
    }

    #[test]
    fn overflow_is_an_error_not_a_wrap() {
        let r = Money::new(i64::MAX, usd()).checked_add(Money::new(1, usd()));
        assert_eq!(r, Err(MoneyError::Overflow));
        let r = Money::new(i64::MIN, usd()).checked_sub(Money::new(1, usd()));
        assert_eq!(r, Err(MoneyError::Overflow));
    }

    #[test]
    fn fee_rounds_half_up_and_adds_fixed() {
        // 2.9% + 30 on 4999: 144.971 → 145, + 30.
        assert_eq!(platform_fee(4999, 290, 30), 175);
        // 0.5 rounds up: 100 × 50 bps = 0.5.
        assert_eq!(platform_fee(100, 50, 0), 1);
        assert_eq!(platform_fee(99, 50, 0), 0);
        // Never more than the amount.
        assert_eq!(platform_fee(10, 290, 30), 10);
        assert_eq!(platform_fee(MAX_AMOUNT, 10_000, 0), MAX_AMOUNT);
    }

    proptest! {
        #[test]
        fn fee_is_between_zero_and_amount(amount in 0..=MAX_AMOUNT, bps in 0u32..=10_000, fixed in 0i64..=1_000_000) {
            let fee = platform_fee(amount, bps, fixed);
            prop_assert!(fee >= 0 && fee <= amount);
        }

        #[test]
        fn add_then_sub_is_identity(a in -MAX_AMOUNT..=MAX_AMOUNT, b in -MAX_AMOUNT..=MAX_AMOUNT) {
            let x = Money::new(a, usd());
            let y = Money::new(b, usd());
            prop_assert_eq!(x.checked_add(y).unwrap().checked_sub(y).unwrap(), x);
        }

        #[test]
        fn checked_add_agrees_with_i128(a in any::<i64>(), b in any::<i64>()) {
            let wide = i128::from(a) + i128::from(b);
            let r = Money::new(a, usd()).checked_add(Money::new(b, usd()));
            match i64::try_from(wide) {
                Ok(v) => prop_assert_eq!(r.unwrap().minor, v),
                Err(_) => prop_assert_eq!(r, Err(MoneyError::Overflow)),
            }
        }
    }
}
