//! Small value types the configuration kinds share: Kubernetes' int-or-string, Istio's
//! durations (`1h2m3.5s`), percentages, and port-number map keys. Each parses on the way in, so
//! a value that reaches the model is already valid.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// Kubernetes' `IntOrString` (a Service's `targetPort`: a number or a named container port).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum IntOrString {
    Int(i64),
    String(String),
}

impl<'de> Deserialize<'de> for IntOrString {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = IntOrString;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an integer or a string")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<IntOrString, E> {
                Ok(IntOrString::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<IntOrString, E> {
                i64::try_from(v)
                    .map(IntOrString::Int)
                    .map_err(|_| E::invalid_value(de::Unexpected::Unsigned(v), &self))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<IntOrString, E> {
                Ok(IntOrString::String(v.to_owned()))
            }
        }
        deserializer.deserialize_any(V)
    }
}

impl Serialize for IntOrString {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            IntOrString::Int(i) => serializer.serialize_i64(*i),
            IntOrString::String(s) => serializer.serialize_str(s),
        }
    }
}

/// A duration as Istio writes it: Go's form (`300ms`, `1.5s`, `1h30m`, units ns/us/µs/ms/s/m/h)
/// or protobuf JSON's (`1.500s`). Negative durations are refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct IstioDuration(pub Duration);

impl IstioDuration {
    /// Parses Go/protobuf duration text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || format!("`{text}` is not a duration (examples: 250ms, 1.5s, 5m, 1h30m)");
        let s = text.trim();
        if s == "0" {
            return Ok(IstioDuration(Duration::ZERO));
        }
        if s.is_empty() || s.starts_with('-') {
            return Err(bad());
        }
        let s = s.strip_prefix('+').unwrap_or(s);
        let mut rest = s;
        let mut total_nanos: u128 = 0;
        while !rest.is_empty() {
            let number_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(bad)?;
            let (number, tail) = rest.split_at(number_len);
            let unit_len = tail.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(tail.len());
            let (unit, tail) = tail.split_at(unit_len);
            let unit_nanos: u128 = match unit {
                "ns" => 1,
                "us" | "µs" | "μs" => 1_000,
                "ms" => 1_000_000,
                "s" => 1_000_000_000,
                "m" => 60 * 1_000_000_000,
                "h" => 3_600 * 1_000_000_000,
                _ => return Err(bad()),
            };
            let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
            if (whole.is_empty() && frac.is_empty()) || frac.contains('.') || whole.len() > 20 {
                return Err(bad());
            }
            let whole: u128 = if whole.is_empty() { 0 } else { whole.parse().map_err(|_| bad())? };
            let mut nanos = whole.checked_mul(unit_nanos).ok_or_else(bad)?;
            // Fractions beyond nanosecond precision are dropped, as Go does.
            let mut scale = unit_nanos;
            for digit in frac.chars().take(30) {
                scale /= 10;
                nanos += u128::from(digit.to_digit(10).ok_or_else(bad)?) * scale;
            }
            total_nanos = total_nanos.checked_add(nanos).ok_or_else(bad)?;
            rest = tail;
        }
        let secs = u64::try_from(total_nanos / 1_000_000_000).map_err(|_| bad())?;
        // The remainder of a division by 10^9 always fits in u32.
        let sub = (total_nanos % 1_000_000_000) as u32;
        Ok(IstioDuration(Duration::new(secs, sub)))
    }
}

impl fmt::Display for IstioDuration {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let d = self.0;
        if d.subsec_nanos() == 0 {
            write!(f, "{}s", d.as_secs())
        } else {
            write!(f, "{}.{:09}s", d.as_secs(), d.subsec_nanos())
        }
    }
}

impl<'de> Deserialize<'de> for IstioDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = IstioDuration;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration such as 250ms, 1.5s or 5m")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<IstioDuration, E> {
                IstioDuration::parse(v).map_err(E::custom)
            }
        }
        deserializer.deserialize_str(V)
    }
}

impl Serialize for IstioDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// A port number used as a map key (`portLevelMtls: {8080: ...}`); YAML keys arrive as text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortKey(pub u32);

impl<'de> Deserialize<'de> for PortKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = PortKey;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a port number (1-65535)")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PortKey, E> {
                match u32::try_from(v) {
                    Ok(port @ 1..=65535) => Ok(PortKey(port)),
                    _ => Err(E::invalid_value(de::Unexpected::Unsigned(v), &self)),
                }
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PortKey, E> {
                match v.parse::<u64>() {
                    Ok(n) => self.visit_u64(n),
                    Err(_) => Err(E::invalid_value(de::Unexpected::Str(v), &self)),
                }
            }
        }
        deserializer.deserialize_str(V)
    }
}

impl Serialize for PortKey {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&self.0)
    }
}

/// Istio's `Percent`: `{value: 12.5}`.
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
pub struct Percent {
    pub value: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_in_go_and_protobuf_forms() {
        let cases: &[(&str, Option<Duration>)] = &[
            ("0", Some(Duration::ZERO)),
            ("0s", Some(Duration::ZERO)),
            ("10s", Some(Duration::from_secs(10))),
            ("250ms", Some(Duration::from_millis(250))),
            ("1.5s", Some(Duration::from_millis(1500))),
            ("1.500s", Some(Duration::from_millis(1500))),
            (".5s", Some(Duration::from_millis(500))),
            ("5m", Some(Duration::from_secs(300))),
            ("1h30m", Some(Duration::from_secs(5400))),
            ("3us", Some(Duration::from_micros(3))),
            ("7ns", Some(Duration::from_nanos(7))),
            ("", None),
            ("10", None),
            ("-1s", None),
            ("1x", None),
            ("s", None),
            ("1..2s", None),
            ("99999999999999999999999h", None),
        ];
        for (text, want) in cases {
            assert_eq!(IstioDuration::parse(text).ok().map(|d| d.0), *want, "{text}");
        }
        assert_eq!(IstioDuration(Duration::from_millis(1500)).to_string(), "1.500000000s");
    }

    #[test]
    fn int_or_string_and_port_keys() {
        let v: Vec<IntOrString> = serde_json::from_str(r#"[8080, "http"]"#).unwrap();
        assert_eq!(v, vec![IntOrString::Int(8080), IntOrString::String("http".into())]);
        assert!(serde_json::from_str::<IntOrString>("true").is_err());
        let m: std::collections::BTreeMap<PortKey, u8> = serde_json::from_str(r#"{"8080": 1}"#).unwrap();
        assert_eq!(m.keys().next(), Some(&PortKey(8080)));
        assert!(serde_json::from_str::<std::collections::BTreeMap<PortKey, u8>>(r#"{"0": 1}"#).is_err());
        assert!(serde_json::from_str::<std::collections::BTreeMap<PortKey, u8>>(r#"{"x": 1}"#).is_err());
    }
}
