//! Byte sizes as operators write them on command lines and in control
//! requests: `4096`, `512K`, `512M`, `4G`, `1T`, optionally followed by `B` or
//! `iB` (`512KiB`, `4GB`). Units are binary (K = 1024), because every budget
//! here is compared with page counts and host memory, never with disk vendors'
//! decimal sizes.

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
}
