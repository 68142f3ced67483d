//! What travels on the control socket, shared by the daemon and `tmemctl`.
//!
//! A request is one JSON object: `cmd` names the command and the other keys
//! are its arguments. [`Request`] is the list of commands, and serde's derive
//! reads it, refusing unknown commands and unknown fields. A reply is
//! `"ok":true` with the command's one result key ([`Answer`]), or `"ok":false`
//! with an `"error"` ([`Reply`]).

use std::{
    fmt,
    str::{FromStr, Utf8Error},
    time::Duration,
};

use serde::{
    de::{
        self,
        value::{MapDeserializer, SeqDeserializer},
        Expected, IntoDeserializer, Unexpected, Visitor,
    },
    forward_to_deserialize_any, Deserialize, Deserializer, Serialize, Serializer,
};
use serde_json::{json, Map, Value};
use thiserror::Error;

use super::MAX_LINE;
use crate::{
    size::{ByteSize, SizeError},
    stats::Latency,
    store::{DedupDomain, GuestBudget, StoreStats},
};

/// One request. The variants are the commands: `cmd` is a variant's name in
/// kebab-case, and its fields are the request's other keys.
// The commands that take nothing are empty structs, not unit variants: serde
// lets a tagged unit variant ignore whatever keys come with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Store counters (global, per device, per pool) and request latency.
    Stats {},
    /// The settings in force.
    GetConfig {},
    /// Changes settings at run time; answered with the settings then in force.
    SetConfig {
        /// The store's RAM budget.
        #[serde(skip_serializing_if = "Option::is_none")]
        mem_limit: Option<ByteSize>,
    },
    /// Moves up to `pages` of the coldest RAM pages to the spill file.
    Writeback { pages: u64 },
    /// Drops every page of one pool of one device.
    DropPool { device: u32, pool: u32 },
    /// Changes one device's cap or weight at run time; answered with its
    /// budget then.
    SetDevice {
        device: u32,
        /// Cap on the guest's RAM plus spill, or `"none"`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max: Option<Cap>,
        /// Its weight in the sharing of RAM.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        weight: Option<u32>,
    },
}

/// A device's cap: a size (a number of bytes or a size string), or
/// `"none"` for no cap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cap {
    None,
    Bytes(ByteSize),
}

impl Cap {
    pub fn bytes(&self) -> Option<u64> {
        match self {
            Cap::None => None,
            Cap::Bytes(size) => Some(size.bytes()),
        }
    }
}

impl FromStr for Cap {
    type Err = SizeError;

    fn from_str(text: &str) -> Result<Self, SizeError> {
        if text == "none" {
            return Ok(Cap::None);
        }
        text.parse().map(Cap::Bytes)
    }
}

impl Serialize for Cap {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Cap::None => serializer.serialize_str("none"),
            Cap::Bytes(size) => size.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for Cap {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(CapVisitor)
    }
}

struct CapVisitor;

impl Visitor<'_> for CapVisitor {
    type Value = Cap;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a number of bytes, a size string like \"1G\", or \"none\"")
    }

    fn visit_u64<E: de::Error>(self, bytes: u64) -> Result<Cap, E> {
        Ok(Cap::Bytes(ByteSize::from(bytes)))
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<Cap, E> {
        match u64::try_from(value) {
            Ok(bytes) => Ok(Cap::Bytes(ByteSize::from(bytes))),
            Err(_) => Err(E::invalid_value(Unexpected::Signed(value), &self)),
        }
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Cap, E> {
        text.parse().map_err(E::custom)
    }
}

impl Request {
    /// Decodes one request line (without its newline).
    pub fn from_line(line: &[u8]) -> Result<Request, RequestError> {
        if line.len() > MAX_LINE {
            return Err(RequestError::TooLong);
        }
        let text = std::str::from_utf8(line).map_err(RequestError::NotUtf8)?.trim();
        if text.is_empty() {
            return Err(RequestError::Empty);
        }
        let value: Value = serde_json::from_str(text).map_err(RequestError::Malformed)?;
        Request::from_value(&value)
    }

    /// Decodes a request object.
    pub fn from_value(value: &Value) -> Result<Request, RequestError> {
        let Value::Object(object) = value else {
            return Err(RequestError::NotAnObject(value.to_string()));
        };
        // serde would take a number here as the index of a command, and would
        // name neither the field nor the commands when it is missing.
        let cmd = match object.get("cmd") {
            Some(Value::String(cmd)) => cmd,
            Some(other) => return Err(RequestError::CmdNotAString(other.to_string())),
            None => return Err(RequestError::MissingCmd),
        };
        let error = match Request::deserialize(Json(value)) {
            Ok(request) => return Ok(request),
            Err(error) => error,
        };
        let cmd = cmd.clone();
        Err(match error {
            DeError::UnknownVariant { variant, expected } => RequestError::UnknownCmd {
                cmd: variant,
                expected,
            },
            DeError::UnknownField { field, expected } => RequestError::UnknownField {
                cmd,
                field,
                accepted: expected,
            },
            DeError::MissingField(field) => RequestError::MissingField { cmd, field },
            DeError::Invalid { expected, got } => RequestError::WrongType {
                cmd,
                field: culprit(object),
                expected,
                got,
            },
            DeError::Custom(reason) => RequestError::BadValue {
                cmd,
                field: culprit(object),
                reason,
            },
        })
    }

    /// The `cmd` values, as serde reads them.
    pub fn commands() -> &'static [&'static str] {
        // serde keeps its list of variant names to itself, except in the
        // error for a variant that does not exist.
        match Request::deserialize(Json(&json!({"cmd": ""}))) {
            Err(DeError::UnknownVariant { expected, .. }) => expected,
            _ => &[],
        }
    }
}

/// The argument of `object` whose value serde refused.
///
/// serde reads a tagged object whole before it looks at any field, so its
/// complaint about a value does not say whose value it was. The same
/// complaint about the command with that argument alone does.
fn culprit(object: &Map<String, Value>) -> Option<String> {
    let cmd = object.get("cmd")?;
    object
        .iter()
        .filter(|(name, _)| name.as_str() != "cmd")
        .find(|(name, value)| {
            let alone = Value::Object(Map::from_iter([
                ("cmd".to_owned(), cmd.clone()),
                ((*name).clone(), (*value).clone()),
            ]));
            matches!(
                Request::deserialize(Json(&alone)),
                Err(DeError::Invalid { .. } | DeError::Custom(_))
            )
        })
        .map(|(name, _)| name.clone())
}

/// Why a request line is not a request.
#[derive(Debug, Error)]
pub enum RequestError {
    #[error("request line longer than {MAX_LINE} bytes")]
    TooLong,
    #[error("request line not finished within {0:?}")]
    TooSlow(Duration),
    #[error("request is not UTF-8")]
    NotUtf8(#[source] Utf8Error),
    #[error("empty request: expected a JSON object such as {{\"cmd\":\"stats\"}}")]
    Empty,
    #[error("request is not valid JSON")]
    Malformed(#[source] serde_json::Error),
    #[error("expected a JSON object with a \"cmd\" field, got {0}")]
    NotAnObject(String),
    #[error("missing \"cmd\" field (one of {})", List(Request::commands()))]
    MissingCmd,
    #[error("\"cmd\" must be a string, got {0}")]
    CmdNotAString(String),
    #[error("unknown cmd {cmd:?}; expected one of {}", List(expected))]
    UnknownCmd {
        cmd: String,
        expected: &'static [&'static str],
    },
    #[error("{cmd}: unknown field {field:?} (accepted: {})", List(accepted))]
    UnknownField {
        cmd: String,
        field: String,
        accepted: &'static [&'static str],
    },
    #[error("{cmd}: missing field {field:?}")]
    MissingField { cmd: String, field: &'static str },
    #[error("{cmd}: {} must be {expected}, got {got}", Field(field))]
    WrongType {
        cmd: String,
        field: Option<String>,
        expected: String,
        got: String,
    },
    #[error("{cmd}: {}: {reason}", Field(field))]
    BadValue {
        cmd: String,
        field: Option<String>,
        reason: String,
    },
}

/// Names, comma-separated.
struct List<'a>(&'a [&'a str]);

impl fmt::Display for List<'_> {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("none");
        }
        f.write_str(&self.0.join(", "))
    }
}

/// A field, by name when it is known.
struct Field<'a>(&'a Option<String>);

impl fmt::Display for Field<'_> {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self.0 {
            Some(name) => write!(f, "field {name:?}"),
            None => f.write_str("a field"),
        }
    }
}

/// The result of a request that succeeded. Externally tagged: on the wire it
/// is the one key beside `"ok":true`, named after the variant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Answer {
    /// To `stats`.
    Stats(Stats),
    /// To `get-config` and `set-config`: the settings in force.
    Config(ConfigView),
    /// To `writeback`: pages moved to the spill file.
    Written(u64),
    /// To `drop-pool`: pages dropped.
    Dropped(u64),
    /// To `set-device`: the device's budget with the new setting.
    Budget(GuestBudget),
}

/// One reply line: `{"ok":true,<answer>}` or `{"ok":false,"error":"..."}`.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Ok(Answer),
    /// What was wrong, for a person to read.
    Error(String),
}

impl Serialize for Reply {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Done<'a> {
            ok: bool,
            #[serde(flatten)]
            answer: &'a Answer,
        }
        #[derive(Serialize)]
        struct Failed<'a> {
            ok: bool,
            error: &'a str,
        }
        match self {
            Reply::Ok(answer) => Done { ok: true, answer }.serialize(serializer),
            Reply::Error(error) => Failed { ok: false, error }.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for Reply {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Wire {
            ok: bool,
            error: Option<String>,
            #[serde(flatten)]
            answer: Map<String, Value>,
        }
        let wire = Wire::deserialize(deserializer)?;
        match (wire.ok, wire.error) {
            (true, None) => Answer::deserialize(Value::Object(wire.answer))
                .map(Reply::Ok)
                .map_err(de::Error::custom),
            (false, Some(error)) => Ok(Reply::Error(error)),
            (true, Some(_)) => Err(de::Error::custom("a reply with \"ok\":true has an \"error\"")),
            (false, None) => Err(de::Error::missing_field("error")),
        }
    }
}

/// One device in a `stats` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceStats {
    pub id: u32,
    /// "tmem" or "blk"; for blk, put/get/invalidate latency is of writes,
    /// reads and discards (with write-zeroes).
    #[serde(default = "tmem_kind")]
    pub kind: String,
    pub socket: String,
    pub connected: bool,
    pub queues: u16,
    pub latency: Latency,
}

fn tmem_kind() -> String {
    "tmem".to_owned()
}

/// A `stats` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub store: StoreStats,
    pub devices: Vec<DeviceStats>,
}

/// A `config` answer: the settings in force.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigView {
    pub mem_limit: u64,
    pub spill_file: Option<String>,
    pub spill_limit: Option<u64>,
    pub zstd_level: i32,
    pub dedup: DedupDomain,
    pub queues: u16,
    pub capacity_pages: u64,
    pub poll_us: u64,
    pub sockets: Vec<String>,
}

/// serde's verdict on a request object, kept as data so that
/// [`Request::from_value`] can say which command and field it concerns.
#[derive(Debug, Error)]
enum DeError {
    #[error("unknown variant {variant:?}")]
    UnknownVariant {
        variant: String,
        expected: &'static [&'static str],
    },
    #[error("unknown field {field:?}")]
    UnknownField {
        field: String,
        expected: &'static [&'static str],
    },
    #[error("missing field {0:?}")]
    MissingField(&'static str),
    #[error("expected {expected}, got {got}")]
    Invalid { expected: String, got: String },
    #[error("{0}")]
    Custom(String),
}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        DeError::Custom(msg.to_string())
    }

    fn invalid_type(unexp: Unexpected, exp: &dyn Expected) -> Self {
        DeError::Invalid {
            expected: in_json_terms(exp.to_string()),
            got: as_json(unexp),
        }
    }

    fn invalid_value(unexp: Unexpected, exp: &dyn Expected) -> Self {
        Self::invalid_type(unexp, exp)
    }

    fn unknown_variant(variant: &str, expected: &'static [&'static str]) -> Self {
        DeError::UnknownVariant {
            variant: variant.to_owned(),
            expected,
        }
    }

    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        DeError::UnknownField {
            field: field.to_owned(),
            expected,
        }
    }

    fn missing_field(field: &'static str) -> Self {
        DeError::MissingField(field)
    }
}

/// serde's integers describe themselves as Rust types; a person writing JSON
/// wants the range.
fn in_json_terms(expected: String) -> String {
    match expected.as_str() {
        "u64" => "a non-negative integer".to_owned(),
        "u32" => format!("an integer from 0 to {}", u32::MAX),
        _ => expected,
    }
}

/// A value serde refused, as it was written in the request.
fn as_json(unexp: Unexpected) -> String {
    match unexp {
        Unexpected::Bool(b) => b.to_string(),
        Unexpected::Unsigned(n) => n.to_string(),
        Unexpected::Signed(n) => n.to_string(),
        Unexpected::Float(x) => Value::from(x).to_string(),
        Unexpected::Str(s) => Value::from(s).to_string(),
        Unexpected::Unit => "null".to_owned(),
        Unexpected::Seq => "an array".to_owned(),
        Unexpected::Map => "an object".to_owned(),
        other => other.to_string(),
    }
}

/// A parsed request, fed to serde with [`DeError`] as the error type.
struct Json<'a>(&'a Value);

impl<'de> Deserializer<'de> for Json<'_> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.0 {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(*b),
            Value::Number(n) => {
                if let Some(n) = n.as_u64() {
                    visitor.visit_u64(n)
                } else if let Some(n) = n.as_i64() {
                    visitor.visit_i64(n)
                } else {
                    // Without arbitrary precision every other number is an f64.
                    visitor.visit_f64(n.as_f64().unwrap_or(f64::NAN))
                }
            }
            Value::String(s) => visitor.visit_str(s),
            Value::Array(items) => SeqDeserializer::new(items.iter().map(Json)).deserialize_any(visitor),
            Value::Object(map) => {
                MapDeserializer::new(map.iter().map(|(k, v)| (k.as_str(), Json(v)))).deserialize_any(visitor)
            }
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match self.0 {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit unit_struct newtype_struct seq tuple tuple_struct
        map struct enum identifier ignored_any
    }
}

impl<'de, 'a> IntoDeserializer<'de, DeError> for Json<'a> {
    type Deserializer = Json<'a>;

    fn into_deserializer(self) -> Json<'a> {
        self
    }
}

#[cfg(test)]
mod tests {
    use assert_matches::assert_matches;

    use super::*;
    use crate::stats::OpLatency;

    fn parse(line: &str) -> Result<Request, RequestError> {
        Request::from_line(line.as_bytes())
    }

    #[test]
    fn every_command_parses() {
        assert_eq!(parse(r#"{"cmd":"stats"}"#).unwrap(), Request::Stats {});
        assert_eq!(parse(r#" {"cmd":"get-config"} "#).unwrap(), Request::GetConfig {});
        assert_eq!(
            parse(r#"{"cmd":"set-config","mem_limit":"1G"}"#).unwrap(),
            Request::SetConfig {
                mem_limit: Some("1G".parse().unwrap())
            }
        );
        assert_eq!(
            parse(r#"{"cmd":"set-config","mem_limit":4096}"#).unwrap(),
            Request::SetConfig {
                mem_limit: Some(ByteSize::from(4096))
            }
        );
        assert_eq!(
            parse(r#"{"cmd":"set-config"}"#).unwrap(),
            Request::SetConfig { mem_limit: None }
        );
        assert_eq!(
            parse(r#"{"pages":10,"cmd":"writeback"}"#).unwrap(),
            Request::Writeback { pages: 10 }
        );
        assert_eq!(
            parse(r#"{"cmd":"drop-pool","device":1,"pool":4294967295}"#).unwrap(),
            Request::DropPool {
                device: 1,
                pool: u32::MAX
            }
        );
    }

    #[test]
    fn requests_are_written_as_documented() {
        for (request, line) in [
            (Request::Stats {}, r#"{"cmd":"stats"}"#),
            (Request::GetConfig {}, r#"{"cmd":"get-config"}"#),
            (
                Request::SetConfig {
                    mem_limit: Some("1G".parse().unwrap()),
                },
                r#"{"cmd":"set-config","mem_limit":"1G"}"#,
            ),
            (
                Request::SetConfig {
                    mem_limit: Some(ByteSize::from(1 << 20)),
                },
                r#"{"cmd":"set-config","mem_limit":1048576}"#,
            ),
            (
                Request::Writeback { pages: 7 },
                r#"{"cmd":"writeback","pages":7}"#,
            ),
            (
                Request::DropPool { device: 0, pool: 3 },
                r#"{"cmd":"drop-pool","device":0,"pool":3}"#,
            ),
            (
                Request::SetDevice {
                    device: 1,
                    max: Some("2G".parse().unwrap()),
                    weight: None,
                },
                r#"{"cmd":"set-device","device":1,"max":"2G"}"#,
            ),
            (
                Request::SetDevice {
                    device: 1,
                    max: Some(Cap::None),
                    weight: Some(3),
                },
                r#"{"cmd":"set-device","device":1,"max":"none","weight":3}"#,
            ),
        ] {
            assert_eq!(serde_json::to_string(&request).unwrap(), line);
            assert_eq!(parse(line).unwrap(), request);
        }
    }

    #[test]
    fn the_commands_are_the_variants() {
        assert_eq!(
            Request::commands(),
            [
                "stats",
                "get-config",
                "set-config",
                "writeback",
                "drop-pool",
                "set-device"
            ]
        );
    }

    #[test]
    fn set_device_values() {
        assert_eq!(
            parse(r#"{"cmd":"set-device","device":0,"max":4096}"#).unwrap(),
            Request::SetDevice {
                device: 0,
                max: Some(Cap::Bytes(ByteSize::from(4096))),
                weight: None
            }
        );
        let e = parse(r#"{"cmd":"set-device","device":0,"max":"lots"}"#).unwrap_err();
        assert_matches!(&e, RequestError::BadValue { field: Some(f), .. } if f == "max");
        let e = parse(r#"{"cmd":"set-device","device":0,"max":-1}"#).unwrap_err();
        assert!(e.to_string().contains("\"none\""), "{e}");
        let e = parse(r#"{"cmd":"set-device","device":0,"weight":"heavy"}"#).unwrap_err();
        assert_matches!(&e, RequestError::WrongType { field: Some(f), .. } if f == "weight");
        assert_matches!(
            parse(r#"{"cmd":"set-device","weight":2}"#),
            Err(RequestError::MissingField { field: "device", .. })
        );
    }

    #[test]
    fn too_long() {
        let line = format!(r#"{{"cmd":"stats","pad":"{}"}}"#, "x".repeat(MAX_LINE));
        assert_matches!(parse(&line), Err(RequestError::TooLong));
    }

    #[test]
    fn not_utf8() {
        assert_matches!(
            Request::from_line(b"{\"cmd\":\"st\xffats\"}"),
            Err(RequestError::NotUtf8(_))
        );
    }

    #[test]
    fn empty() {
        assert_matches!(parse(""), Err(RequestError::Empty));
        assert_matches!(parse(" \t\r"), Err(RequestError::Empty));
    }

    #[test]
    fn malformed() {
        for line in [
            "garbage",
            r#"{"cmd":"stats""#,
            r#"{"cmd":"stats"} {"cmd":"stats"}"#,
            r#"{"cmd":"writeback","pages":1e999}"#,
            &"[".repeat(MAX_LINE),
        ] {
            assert_matches!(parse(line), Err(RequestError::Malformed(_)), "{line:.40}");
        }
    }

    #[test]
    fn not_an_object() {
        assert_matches!(parse("[1,2]"), Err(RequestError::NotAnObject(v)) if v == "[1,2]");
        // serde would read the first element of an array as the command.
        assert_matches!(parse(r#"["stats"]"#), Err(RequestError::NotAnObject(_)));
        assert_matches!(parse(r#""stats""#), Err(RequestError::NotAnObject(_)));
        assert_matches!(parse("null"), Err(RequestError::NotAnObject(_)));
    }

    #[test]
    fn missing_cmd() {
        let e = parse(r#"{"pages":3}"#).unwrap_err();
        assert_matches!(e, RequestError::MissingCmd);
        assert!(e.to_string().contains("stats, get-config"), "{e}");
    }

    #[test]
    fn cmd_not_a_string() {
        assert_matches!(parse(r#"{"cmd":7}"#), Err(RequestError::CmdNotAString(v)) if v == "7");
        // Not the index of the first command.
        assert_matches!(parse(r#"{"cmd":0}"#), Err(RequestError::CmdNotAString(_)));
        assert_matches!(parse(r#"{"cmd":null}"#), Err(RequestError::CmdNotAString(_)));
    }

    #[test]
    fn unknown_cmd() {
        let e = parse(r#"{"cmd":"explode","pages":1}"#).unwrap_err();
        assert_matches!(&e, RequestError::UnknownCmd { cmd, expected }
            if cmd == "explode" && expected.contains(&"drop-pool"));
        assert_eq!(
            e.to_string(),
            "unknown cmd \"explode\"; expected one of stats, get-config, set-config, writeback, drop-pool, set-device"
        );
        // Names are matched exactly.
        assert_matches!(parse(r#"{"cmd":"Stats"}"#), Err(RequestError::UnknownCmd { .. }));
        assert_matches!(
            parse(r#"{"cmd":"get_config"}"#),
            Err(RequestError::UnknownCmd { .. })
        );
    }

    #[test]
    fn unknown_field() {
        let e = parse(r#"{"cmd":"stats","x":1}"#).unwrap_err();
        assert_matches!(&e, RequestError::UnknownField { cmd, field, accepted }
            if cmd == "stats" && field == "x" && accepted.is_empty());
        assert_eq!(e.to_string(), "stats: unknown field \"x\" (accepted: none)");
        let e = parse(r#"{"cmd":"drop-pool","device":0,"pool":1,"pools":2}"#).unwrap_err();
        assert_matches!(&e, RequestError::UnknownField { field, accepted, .. }
            if field == "pools" && accepted == &["device", "pool"]);
        // A setting that exists but is not settable is still unknown here.
        assert_matches!(
            parse(r#"{"cmd":"set-config","queues":3}"#),
            Err(RequestError::UnknownField { field, .. }) if field == "queues"
        );
    }

    #[test]
    fn missing_field() {
        assert_matches!(
            parse(r#"{"cmd":"writeback"}"#),
            Err(RequestError::MissingField { cmd, field: "pages" }) if cmd == "writeback"
        );
        assert_matches!(
            parse(r#"{"cmd":"drop-pool","device":0}"#),
            Err(RequestError::MissingField { field: "pool", .. })
        );
    }

    #[test]
    fn wrong_type() {
        let e = parse(r#"{"cmd":"writeback","pages":"many"}"#).unwrap_err();
        assert_matches!(&e, RequestError::WrongType { cmd, field: Some(field), got, .. }
            if cmd == "writeback" && field == "pages" && got == "\"many\"");
        assert_eq!(
            e.to_string(),
            "writeback: field \"pages\" must be a non-negative integer, got \"many\""
        );
        let e = parse(r#"{"cmd":"drop-pool","device":0,"pool":4294967296}"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            "drop-pool: field \"pool\" must be an integer from 0 to 4294967295, got 4294967296"
        );
        let e = parse(r#"{"cmd":"set-config","mem_limit":-5}"#).unwrap_err();
        assert_matches!(&e, RequestError::WrongType { field: Some(field), got, .. }
            if field == "mem_limit" && got == "-5");
    }

    #[test]
    fn wrong_type_names_the_field_whichever_it_is() {
        for (line, culprit) in [
            (r#"{"cmd":"writeback","pages":-1}"#, "pages"),
            (r#"{"cmd":"writeback","pages":1.5}"#, "pages"),
            (r#"{"cmd":"writeback","pages":null}"#, "pages"),
            (r#"{"cmd":"drop-pool","device":"0","pool":1}"#, "device"),
            (r#"{"cmd":"drop-pool","device":0,"pool":[1]}"#, "pool"),
            (r#"{"cmd":"drop-pool","pool":{},"device":0}"#, "pool"),
            (r#"{"cmd":"set-config","mem_limit":true}"#, "mem_limit"),
        ] {
            assert_matches!(
                parse(line),
                Err(RequestError::WrongType { field: Some(field), .. }) if field == culprit,
                "{line}"
            );
        }
    }

    #[test]
    fn bad_value() {
        let e = parse(r#"{"cmd":"set-config","mem_limit":"12Q"}"#).unwrap_err();
        assert_matches!(&e, RequestError::BadValue { cmd, field: Some(field), .. }
            if cmd == "set-config" && field == "mem_limit");
        assert!(e.to_string().contains("\"12Q\" has an unknown unit"), "{e}");
    }

    fn sample_stats() -> Stats {
        Stats {
            store: StoreStats::default(),
            devices: vec![DeviceStats {
                kind: "tmem".into(),
                id: 0,
                socket: "/run/vm0.sock".into(),
                connected: true,
                queues: 1,
                latency: Latency {
                    put: OpLatency {
                        p50_us: 1.5,
                        p99_us: 9.25,
                        count: 4,
                    },
                    ..Latency::default()
                },
            }],
        }
    }

    #[test]
    fn replies_are_written_as_documented_and_read_back() {
        for (reply, line) in [
            (Reply::Ok(Answer::Written(3)), r#"{"ok":true,"written":3}"#),
            (Reply::Ok(Answer::Dropped(0)), r#"{"ok":true,"dropped":0}"#),
            (
                Reply::Error("no device 2".into()),
                r#"{"ok":false,"error":"no device 2"}"#,
            ),
        ] {
            assert_eq!(serde_json::to_string(&reply).unwrap(), line);
            assert_eq!(serde_json::from_str::<Reply>(line).unwrap(), reply);
        }
        let reply = Reply::Ok(Answer::Stats(sample_stats()));
        let line = serde_json::to_string(&reply).unwrap();
        assert!(line.starts_with(r#"{"ok":true,"stats":{"store":"#), "{line}");
        assert_eq!(serde_json::from_str::<Reply>(&line).unwrap(), reply);
    }

    #[test]
    fn replies_that_are_not_replies_are_refused() {
        for line in [
            r#"{"ok":true}"#,
            r#"{"ok":true,"written":"3"}"#,
            r#"{"ok":true,"written":3,"dropped":3}"#,
            r#"{"ok":true,"dropped":1,"error":"x"}"#,
            r#"{"ok":false}"#,
            r#"{"written":3}"#,
            r#"{"ok":"yes","written":3}"#,
        ] {
            assert!(serde_json::from_str::<Reply>(line).is_err(), "{line}");
        }
    }
}
