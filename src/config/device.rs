//! One `--socket` value: where a device listens, what kind of device it is,
//! and what share of the store its guest may take.
//!
//! The syntax is `PATH[,KEY=VALUE]...`, the way QEMU and cloud-hypervisor
//! write device options. A comma inside the path is written twice (`,,`), as
//! in QEMU, so any path can be given.

use std::{num::ParseIntError, path::PathBuf, str::FromStr};

use thiserror::Error;

use crate::{
    protocol::PAGE_SIZE,
    size::{parse_size, SizeError},
};

/// Largest `weight=`: shares are computed in 64 bits from weights and byte
/// budgets, and no operator needs a ratio above this between two guests.
pub const MAX_WEIGHT: u32 = 10_000;

/// What kind of virtio device a socket serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// The tmem device (virtio ID 63) and its guest driver.
    Tmem,
    /// A virtio-blk disk of `size` bytes, for unmodified guests and VMMs.
    Blk { size: u64 },
}

/// A parsed `--socket` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    pub path: PathBuf,
    pub kind: DeviceKind,
    /// Hard cap on the guest's RAM plus spill, in bytes.
    pub max: Option<u64>,
    /// The guest's share of RAM under contention, relative to the others'.
    pub weight: u32,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DeviceSpecError {
    #[error("no socket path before the options")]
    EmptyPath,
    #[error("{0:?} is not KEY=VALUE")]
    NotKeyValue(String),
    #[error("unknown option {0:?} (known: blk, max, weight)")]
    UnknownKey(String),
    #[error("option {0} is given more than once")]
    Repeated(&'static str),
    #[error("invalid {key}= size")]
    Size {
        key: &'static str,
        #[source]
        source: SizeError,
    },
    #[error("blk={0} must be a non-zero multiple of {PAGE_SIZE} bytes")]
    BlkSize(u64),
    #[error("max={0} is smaller than one page ({PAGE_SIZE} bytes)")]
    MaxTooSmall(u64),
    #[error("invalid weight={0:?}")]
    WeightNumber(String, #[source] ParseIntError),
    #[error("weight={0} must be between 1 and {MAX_WEIGHT}")]
    WeightRange(u32),
}

impl FromStr for DeviceSpec {
    type Err = DeviceSpecError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut fields = split_fields(text).into_iter();
        let path = fields.next().unwrap_or_default();
        if path.is_empty() {
            return Err(DeviceSpecError::EmptyPath);
        }
        let mut spec = DeviceSpec {
            path: PathBuf::from(path),
            kind: DeviceKind::Tmem,
            max: None,
            weight: 1,
        };
        let mut seen: Vec<&'static str> = Vec::new();
        for field in fields {
            let (key, value) = field
                .split_once('=')
                .ok_or_else(|| DeviceSpecError::NotKeyValue(field.clone()))?;
            let key: &'static str = match key {
                "blk" => "blk",
                "max" => "max",
                "weight" => "weight",
                _ => return Err(DeviceSpecError::UnknownKey(key.to_owned())),
            };
            if seen.contains(&key) {
                return Err(DeviceSpecError::Repeated(key));
            }
            seen.push(key);
            let size =
                |value: &str| parse_size(value).map_err(|source| DeviceSpecError::Size { key, source });
            match key {
                "blk" => {
                    let size = size(value)?;
                    if size == 0 || size % PAGE_SIZE as u64 != 0 {
                        return Err(DeviceSpecError::BlkSize(size));
                    }
                    spec.kind = DeviceKind::Blk { size };
                }
                "max" => {
                    let max = size(value)?;
                    if max < PAGE_SIZE as u64 {
                        return Err(DeviceSpecError::MaxTooSmall(max));
                    }
                    spec.max = Some(max);
                }
                _ => {
                    let weight = value
                        .parse::<u32>()
                        .map_err(|e| DeviceSpecError::WeightNumber(value.to_owned(), e))?;
                    if !(1..=MAX_WEIGHT).contains(&weight) {
                        return Err(DeviceSpecError::WeightRange(weight));
                    }
                    spec.weight = weight;
                }
            }
        }
        Ok(spec)
    }
}

/// Splits at single commas; `,,` stands for a comma inside a field.
fn split_fields(text: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != ',' {
            fields.last_mut().expect("never empty").push(c);
        } else if chars.peek() == Some(&',') {
            chars.next();
            fields.last_mut().expect("never empty").push(',');
        } else {
            fields.push(String::new());
        }
    }
    fields
}

#[cfg(test)]
mod tests {
    use assert_matches::assert_matches;

    use super::*;

    fn spec(text: &str) -> Result<DeviceSpec, DeviceSpecError> {
        text.parse()
    }

    #[test]
    fn a_bare_path_is_a_tmem_device_of_weight_one() {
        let s = spec("/run/vm0.sock").unwrap();
        assert_eq!(s.path, PathBuf::from("/run/vm0.sock"));
        assert_eq!(s.kind, DeviceKind::Tmem);
        assert_eq!((s.max, s.weight), (None, 1));
    }

    #[test]
    fn every_option_in_any_order() {
        let s = spec("/run/vm1.sock,weight=3,blk=8G,max=2G").unwrap();
        assert_eq!(s.kind, DeviceKind::Blk { size: 8 << 30 });
        assert_eq!(s.max, Some(2 << 30));
        assert_eq!(s.weight, 3);
    }

    #[test]
    fn a_doubled_comma_is_part_of_the_path() {
        let s = spec("/run/a,,b.sock,max=1M").unwrap();
        assert_eq!(s.path, PathBuf::from("/run/a,b.sock"));
        assert_eq!(s.max, Some(1 << 20));
        assert_eq!(spec("/x,,").unwrap().path, PathBuf::from("/x,"));
    }

    #[test]
    fn mistakes_are_named() {
        assert_matches!(spec(""), Err(DeviceSpecError::EmptyPath));
        assert_matches!(spec(",blk=1G"), Err(DeviceSpecError::EmptyPath));
        assert_matches!(spec("/s,blk"), Err(DeviceSpecError::NotKeyValue(f)) if f == "blk");
        assert_matches!(spec("/s,"), Err(DeviceSpecError::NotKeyValue(f)) if f.is_empty());
        assert_matches!(spec("/s,size=1G"), Err(DeviceSpecError::UnknownKey(k)) if k == "size");
        assert_matches!(spec("/s,max=1G,max=2G"), Err(DeviceSpecError::Repeated("max")));
        assert_matches!(spec("/s,blk=lots"), Err(DeviceSpecError::Size { key: "blk", .. }));
        assert_matches!(spec("/s,blk=0"), Err(DeviceSpecError::BlkSize(0)));
        assert_matches!(spec("/s,blk=6000"), Err(DeviceSpecError::BlkSize(6000)));
        assert_matches!(spec("/s,max=100"), Err(DeviceSpecError::MaxTooSmall(100)));
        assert_matches!(spec("/s,weight=0"), Err(DeviceSpecError::WeightRange(0)));
        assert_matches!(spec("/s,weight=10001"), Err(DeviceSpecError::WeightRange(10_001)));
        assert_matches!(spec("/s,weight=-1"), Err(DeviceSpecError::WeightNumber(..)));
    }
}
