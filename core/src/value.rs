//! `Value`: the JSON-like values a shadow holds and a `shadow_reported` event carries.
//!
//! Decoding is depth-limited ([`VALUE_DEPTH_MAX`]) so that hostile bytes cannot exhaust the stack.

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use serde::de::{DeserializeSeed, EnumAccess, MapAccess, SeqAccess, VariantAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

/// Deepest nesting of maps and lists a value may have.
pub const VALUE_DEPTH_MAX: usize = 16;

/// A JSON-like value: scalars, lists and maps with text keys. Numbers keep their type (an integer
/// stays an integer), so a value read back is the value written.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum Value {
    /// No value.
    Null,
    /// A boolean.
    Bool(bool),
    /// A signed integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// UTF-8 text.
    Text(String),
    /// A list, compared as a whole.
    List(Vec<Value>),
    /// A map with text keys, kept sorted.
    Map(BTreeMap<String, Value>),
}

impl Value {
    /// An empty map.
    pub fn empty_map() -> Value {
        Value::Map(BTreeMap::new())
    }

    /// How deep the value nests: 0 for a scalar, 1 for a map of scalars.
    pub fn depth(&self) -> usize {
        match self {
            Value::List(items) => 1 + items.iter().map(Value::depth).max().unwrap_or(0),
            Value::Map(entries) => 1 + entries.values().map(Value::depth).max().unwrap_or(0),
            _ => 0,
        }
    }

    /// The entries, if this is a map.
    pub fn as_map(&self) -> Option<&BTreeMap<String, Value>> {
        match self {
            Value::Map(entries) => Some(entries),
            _ => None,
        }
    }
}

#[cfg(feature = "std")]
impl Value {
    /// The value as JSON. Non-finite floats, which JSON cannot hold, become `null`.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Value::Null => serde_json::Value::Null,
            Value::Bool(flag) => serde_json::Value::Bool(*flag),
            Value::Int(number) => serde_json::Value::from(*number),
            Value::Float(number) => {
                serde_json::Number::from_f64(*number).map_or(serde_json::Value::Null, serde_json::Value::Number)
            }
            Value::Text(text) => serde_json::Value::String(text.clone()),
            Value::List(items) => serde_json::Value::Array(items.iter().map(Value::to_json).collect()),
            Value::Map(entries) => {
                serde_json::Value::Object(entries.iter().map(|(key, value)| (key.clone(), value.to_json())).collect())
            }
        }
    }

    /// A value from JSON. Integers that fit an `i64` stay integers; other numbers become floats.
    /// Fails when the JSON nests deeper than [`VALUE_DEPTH_MAX`].
    pub fn from_json(json: &serde_json::Value) -> Result<Value, ValueTooDeep> {
        fn convert(json: &serde_json::Value, depth: usize) -> Result<Value, ValueTooDeep> {
            if depth > VALUE_DEPTH_MAX {
                return Err(ValueTooDeep);
            }
            Ok(match json {
                serde_json::Value::Null => Value::Null,
                serde_json::Value::Bool(flag) => Value::Bool(*flag),
                serde_json::Value::Number(number) => match number.as_i64() {
                    Some(int) => Value::Int(int),
                    None => Value::Float(number.as_f64().unwrap_or(f64::NAN)),
                },
                serde_json::Value::String(text) => Value::Text(text.clone()),
                serde_json::Value::Array(items) => {
                    Value::List(items.iter().map(|item| convert(item, depth + 1)).collect::<Result<_, _>>()?)
                }
                serde_json::Value::Object(entries) => Value::Map(
                    entries
                        .iter()
                        .map(|(key, value)| Ok((key.clone(), convert(value, depth + 1)?)))
                        .collect::<Result<_, _>>()?,
                ),
            })
        }
        convert(json, 0)
    }
}

/// A value nests deeper than [`VALUE_DEPTH_MAX`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("value nests deeper than {VALUE_DEPTH_MAX} levels")]
pub struct ValueTooDeep;

impl<'de> Deserialize<'de> for Value {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        ValueSeed { depth: 0 }.deserialize(deserializer)
    }
}

const VARIANTS: &[&str] = &["Null", "Bool", "Int", "Float", "Text", "List", "Map"];

#[derive(Deserialize)]
enum Tag {
    Null,
    Bool,
    Int,
    Float,
    Text,
    List,
    Map,
}

/// Deserializes a [`Value`] no deeper than [`VALUE_DEPTH_MAX`] below `depth`.
#[derive(Clone, Copy)]
struct ValueSeed {
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for ValueSeed {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        if self.depth > VALUE_DEPTH_MAX {
            return Err(serde::de::Error::custom(ValueTooDeep));
        }
        deserializer.deserialize_enum("Value", VARIANTS, self)
    }
}

impl<'de> Visitor<'de> for ValueSeed {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a tidesync value")
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<Value, A::Error> {
        let (tag, variant) = data.variant::<Tag>()?;
        let inner = ValueSeed { depth: self.depth + 1 };
        Ok(match tag {
            Tag::Null => {
                variant.unit_variant()?;
                Value::Null
            }
            Tag::Bool => Value::Bool(variant.newtype_variant()?),
            Tag::Int => Value::Int(variant.newtype_variant()?),
            Tag::Float => Value::Float(variant.newtype_variant()?),
            Tag::Text => Value::Text(variant.newtype_variant()?),
            Tag::List => Value::List(variant.newtype_variant_seed(ListSeed(inner))?),
            Tag::Map => Value::Map(variant.newtype_variant_seed(MapSeed(inner))?),
        })
    }
}

struct ListSeed(ValueSeed);

impl<'de> DeserializeSeed<'de> for ListSeed {
    type Value = Vec<Value>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Vec<Value>, D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for ListSeed {
    type Value = Vec<Value>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of values")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Value>, A::Error> {
        // The declared length comes from the input: trust it only as far as a small bound, so a
        // forged length cannot make us allocate before the items are actually there.
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(item) = seq.next_element_seed(self.0)? {
            items.push(item);
        }
        Ok(items)
    }
}

struct MapSeed(ValueSeed);

impl<'de> DeserializeSeed<'de> for MapSeed {
    type Value = BTreeMap<String, Value>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for MapSeed {
    type Value = BTreeMap<String, Value>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a map of values")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut entries = BTreeMap::new();
        while let Some(key) = map.next_key::<String>()? {
            let value = map.next_value_seed(self.0)?;
            entries.insert(key, value);
        }
        Ok(entries)
    }
}
