//! Card data guards. payrail never stores a card number (PAN): the only place one is held is
//! the sandbox tokenizer's request, inside a [`CardNumber`] that cannot be printed. Every free
//! text field a merchant sends is scanned so a PAN pasted into `description` or `metadata`
//! is refused instead of stored.

use std::fmt;

/// A primary account number on its way to the tokenizer. `Debug` and `Display` print `***`,
/// so no log line, error or trace can show it.
pub struct CardNumber(String);

impl CardNumber {
    /// Accepts 12–19 digits (spaces and dashes allowed between them) that pass the Luhn check.
    pub fn parse(raw: &str) -> Option<CardNumber> {
        let digits: String = raw.chars().filter(|c| *c != ' ' && *c != '-').collect();
        let ok = (12..=19).contains(&digits.len())
            && digits.bytes().all(|b| b.is_ascii_digit())
            && luhn_valid(digits.as_bytes());
        ok.then_some(CardNumber(digits))
    }

    pub fn last4(&self) -> &str {
        &self.0[self.0.len() - 4..]
    }

    /// The card brand from the leading digits, as far as a sandbox needs it.
    pub fn brand(&self) -> &'static str {
        let d = self.0.as_bytes();
        match (d[0], d[1]) {
            (b'4', _) => "visa",
            (b'5', b'1'..=b'5') | (b'2', _) => "mastercard",
            (b'3', b'4') | (b'3', b'7') => "amex",
            (b'6', _) => "discover",
            _ => "unknown",
        }
    }

    /// The digits, for the sandbox's lookup of its test-card behaviours, and nothing else.
    pub fn expose_digits(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for CardNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for CardNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// The Luhn (mod 10) check over ASCII digits.
pub fn luhn_valid(digits: &[u8]) -> bool {
    let mut sum = 0u32;
    for (i, b) in digits.iter().rev().enumerate() {
        let mut d = u32::from(b - b'0');
        if i % 2 == 1 {
            d *= 2;
            if d > 9 {
                d -= 9;
            }
        }
        sum += d;
    }
    sum.is_multiple_of(10)
}

/// True when `text` holds something that looks like a card number: 13 to 19 digits that start
/// like a card network's number (2 to 6) and pass the Luhn check, written together or in groups
/// split by single spaces or dashes, standing apart from letters (so the digits inside an id
/// such as `pay_0193a8…` are not a card, nor a timestamp starting with 1).
pub fn contains_pan(text: &str) -> bool {
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if !bytes[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        let glued_before = i > 0 && bytes[i - 1].is_ascii_alphabetic();
        // One run: digit groups joined by single separators.
        let mut groups: Vec<&[u8]> = Vec::new();
        let mut start = i;
        while i < bytes.len() {
            if bytes[i].is_ascii_digit() {
                i += 1;
            } else if (bytes[i] == b' ' || bytes[i] == b'-') && i + 1 < bytes.len() && bytes[i + 1].is_ascii_digit() {
                groups.push(&bytes[start..i]);
                i += 1;
                start = i;
            } else {
                break;
            }
        }
        groups.push(&bytes[start..i]);
        if glued_before || (i < bytes.len() && bytes[i].is_ascii_alphabetic()) {
            continue;
        }
        // Any whole groups in a row may be the card: "order 9 4242 4242 4242 4242" holds one.
        for first in 0..groups.len() {
            let mut digits = Vec::with_capacity(19);
            for g in &groups[first..] {
                digits.extend_from_slice(g);
                if digits.len() > 19 {
                    break;
                }
                if digits.len() >= 13 && (b'2'..=b'6').contains(&digits[0]) && luhn_valid(&digits) {
                    return true;
                }
            }
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEST_CARDS: &[&str] = &[
        "4242424242424242",
        "5555555555554444",
        "4000000000000002",
        "4000000000009995",
        "4000000000003220",
        "4000000000000259",
        "4100000000000019",
    ];

    #[test]
    fn every_sandbox_test_card_is_a_valid_pan() {
        for pan in TEST_CARDS {
            assert!(CardNumber::parse(pan).is_some(), "{pan}");
            assert!(contains_pan(pan), "{pan}");
        }
    }

    #[test]
    fn pans_are_found_inside_text_with_separators() {
        assert!(contains_pan("card 4242 4242 4242 4242 thanks"));
        assert!(contains_pan("4242-4242-4242-4242"));
        assert!(contains_pan("(4242424242424242)"));
        assert!(contains_pan("5555-5555-5555-4444 exp 12/30"));
        assert!(contains_pan("order 9 4242424242424242"));
    }

    #[test]
    fn ordinary_text_and_numbers_are_not_pans() {
        assert!(!contains_pan("ord_9x7k2m"));
        assert!(!contains_pan("cart 12345"));
        assert!(!contains_pan("2026-04-03 12:00"));
        // Underscores and dots do not join groups: ids and numbers of other kinds hold them
        // (20261127000010 passes the Luhn check).
        assert!(!contains_pan("order_20261127_000010"));
        assert!(!contains_pan("203.0.113.255 198.51.100.7"));
        assert!(!contains_pan("4242424242424241")); // fails Luhn
        assert!(!contains_pan("1234567890123")); // fails Luhn
        assert!(!contains_pan("pay_a4242424242424242b")); // digits inside an id
        assert!(!contains_pan("1764145911-1234560")); // Luhn-valid, but no card starts with 1
        assert!(!contains_pan("8000000000000003")); // nor with 8
    }

    #[test]
    fn luhn_rejects_a_changed_digit() {
        assert!(CardNumber::parse("4242424242424243").is_none());
        assert!(CardNumber::parse("42424242").is_none());
    }

    #[test]
    fn a_card_number_never_formats_its_digits() {
        let pan = CardNumber::parse("4242 4242 4242 4242").unwrap();
        assert_eq!(format!("{pan:?} {pan}"), "*** ***");
        assert_eq!(pan.last4(), "4242");
        assert_eq!(pan.brand(), "visa");
    }
}
