//! Byte sizes as operators write them on command lines and in control
//! requests: `4096`, `512K`, `512M`, `4G`, `1T`, optionally followed by `B` or
//! `iB` (`512KiB`, `4GB`). Units are binary (K = 1024), because every budget
//! here is compared with page counts and host memory, never with disk vendors'
//! decimal sizes.

use std::{fmt, str::FromStr};

use serde::{
    de::{self, Unexpected, Visitor},
    Deserialize, Deserializer, Serialize, Serializer,
};
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SizeError {
    #[error("empty size")]
    Empty,
    #[error("size {0:?} does not start with a number")]
    NoNumber(String),
    #[error(
        "size {input:?} has an unknown unit {unit:?} (use K, M, G or T, optionally followed by B or iB)"
    )]
    UnknownUnit { input: String, unit: String },
    #[error("size {0:?} does not fit in 64 bits")]
    Overflow(String),
}

/// Parses a byte size such as `512M` or `4GiB` into bytes.
pub fn parse_size(input: &str) -> Result<u64, SizeError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(SizeError::Empty);
    }
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(digits_end);
    if digits.is_empty() {
        return Err(SizeError::NoNumber(input.to_owned()));
    }
    let overflow = || SizeError::Overflow(input.to_owned());
    let mut number: u64 = 0;
    for d in digits.bytes() {
        number = number
            .checked_mul(10)
            .and_then(|n| n.checked_add(u64::from(d - b'0')))
            .ok_or_else(overflow)?;
    }
    let shift = match unit.trim_start().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => {
            return Err(SizeError::UnknownUnit {
                input: input.to_owned(),
                unit: unit.to_owned(),
            })
        }
    };
    number.checked_mul(1u64 << shift).ok_or_else(overflow)
}

/// A byte size as an operator gave it: a number of bytes, or a size string
/// such as `"512M"`. The string is kept, so that a request passed on reads as
/// it was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ByteSize {
    bytes: u64,
    text: Option<String>,
}

impl ByteSize {
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl From<u64> for ByteSize {
    fn from(bytes: u64) -> Self {
        ByteSize { bytes, text: None }
    }
}

impl FromStr for ByteSize {
    type Err = SizeError;

    fn from_str(text: &str) -> Result<Self, SizeError> {
        Ok(ByteSize {
            bytes: parse_size(text)?,
            text: Some(text.to_owned()),
        })
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match &self.text {
            Some(text) => serializer.serialize_str(text),
            None => serializer.serialize_u64(self.bytes),
        }
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ByteSizeVisitor)
    }
}

struct ByteSizeVisitor;

impl Visitor<'_> for ByteSizeVisitor {
    type Value = ByteSize;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a number of bytes or a size string like \"1G\"")
    }

    fn visit_u64<E: de::Error>(self, bytes: u64) -> Result<ByteSize, E> {
        Ok(ByteSize::from(bytes))
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<ByteSize, E> {
        match u64::try_from(value) {
            Ok(bytes) => Ok(ByteSize::from(bytes)),
            // Only a negative number gets here, and this says so.
            Err(_) => Err(E::invalid_value(Unexpected::Signed(value), &self)),
        }
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<ByteSize, E> {
        text.parse().map_err(E::custom)
    }
}

#[cfg(test)]
mod tests {
    use assert_matches::assert_matches;

    use super::*;

    #[test]
    fn plain_bytes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("4096B"), Ok(4096));
        assert_eq!(parse_size(" 7 "), Ok(7));
    }

    #[test]
    fn binary_units_with_optional_suffix() {
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size("512KB"), Ok(512 << 10));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("4gb"), Ok(4 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("1TiB"), Ok(1 << 40));
        assert_eq!(parse_size("3 M"), Ok(3 << 20));
    }

    #[test]
    fn empty_is_an_error() {
        assert_matches!(parse_size(""), Err(SizeError::Empty));
        assert_matches!(parse_size("   "), Err(SizeError::Empty));
    }

    #[test]
    fn unit_without_number_is_an_error() {
        assert_matches!(parse_size("M"), Err(SizeError::NoNumber(_)));
        assert_matches!(parse_size("-1"), Err(SizeError::NoNumber(_)));
    }

    #[test]
    fn unknown_units_are_errors() {
        assert_matches!(parse_size("5X"), Err(SizeError::UnknownUnit { .. }));
        assert_matches!(parse_size("1.5G"), Err(SizeError::UnknownUnit { .. }));
        assert_matches!(parse_size("4iB"), Err(SizeError::UnknownUnit { .. }));
        assert_matches!(parse_size("4GiBB"), Err(SizeError::UnknownUnit { .. }));
        assert_matches!(parse_size("1P"), Err(SizeError::UnknownUnit { .. }));
    }

    #[test]
    fn overflow_is_an_error() {
        assert_matches!(parse_size("16777216T"), Err(SizeError::Overflow(_)));
        assert_matches!(parse_size("99999999999999999999"), Err(SizeError::Overflow(_)));
        assert_eq!(parse_size("16777215T"), Ok(16_777_215u64 << 40));
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
    }

    #[test]
    fn byte_size_reads_numbers_and_strings_and_writes_them_back_as_given() {
        let size: ByteSize = serde_json::from_str(r#""1G""#).unwrap();
        assert_eq!(size.bytes(), 1 << 30);
        assert_eq!(serde_json::to_string(&size).unwrap(), r#""1G""#);
        let size: ByteSize = serde_json::from_str("4096").unwrap();
        assert_eq!(size, ByteSize::from(4096));
        assert_eq!(serde_json::to_string(&size).unwrap(), "4096");
        assert_eq!("512M".parse::<ByteSize>().unwrap().bytes(), 512 << 20);
    }

    #[test]
    fn byte_size_refuses_what_is_not_a_size() {
        for (json, says) in [
            (r#""12Q""#, "unknown unit"),
            ("-5", "expected a number of bytes or a size string"),
            ("1.5", "expected a number of bytes or a size string"),
            ("[1]", "expected a number of bytes or a size string"),
            ("null", "expected a number of bytes or a size string"),
        ] {
            let err = serde_json::from_str::<ByteSize>(json).unwrap_err().to_string();
            assert!(err.contains(says), "{json}: {err}");
        }
        assert_matches!("12Q".parse::<ByteSize>(), Err(SizeError::UnknownUnit { .. }));
    }
}
