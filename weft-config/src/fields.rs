//! The field names each modeled type accepts, by path, so an unknown field can be answered with
//! "did you mean `destination`?". Learned from the types themselves: a stand-in deserializer
//! walks a type once, feeding each struct the names serde asks for, and records them.

use std::collections::HashMap;
use std::sync::OnceLock;

use serde::de::value::{Error, StrDeserializer};
use serde::de::{self, DeserializeOwned, DeserializeSeed, IntoDeserializer, Visitor};

/// One struct of a type: the path to it (`spec.http[].route[]`, map entries as `*`) and its
/// fields.
type Schema = Vec<(Vec<String>, &'static [&'static str])>;

/// Deeper than this the walk stops (the modeled types are not recursive; this is a guard).
const MAX_DEPTH: usize = 24;

/// The fields accepted next to the unknown field at `path` (`spec.http[0].route[0].destinaton`)
/// in a document of type `T`, if the walk knows that place.
pub(crate) fn siblings<T: DeserializeOwned + 'static>(path: &str) -> Option<&'static [&'static str]> {
    let schema = schema_of::<T>();
    let parent = parent_segments(path)?;
    schema.iter().find(|(pattern, _)| matches(pattern, &parent)).map(|(_, fields)| *fields)
}

/// The schemas walked so far, by type (each walked once and kept for the process's life: there
/// are a dozen modeled kinds).
fn schema_of<T: DeserializeOwned + 'static>() -> &'static Schema {
    static CACHE: OnceLock<std::sync::Mutex<HashMap<std::any::TypeId, &'static Schema>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let id = std::any::TypeId::of::<T>();
    // A poisoned lock only means another walk panicked; the map itself is still valid.
    let mut map = cache.lock().unwrap_or_else(|e| e.into_inner());
    map.entry(id).or_insert_with(|| {
        let mut schema = Schema::new();
        let _ = T::deserialize(Walker { path: Vec::new(), schema: &mut schema });
        Box::leak(Box::new(schema))
    })
}

/// `spec.http[0].route[0].destinaton` -> `[spec, http, [], route, []]`.
fn parent_segments(path: &str) -> Option<Vec<String>> {
    if path.is_empty() {
        return None;
    }
    let mut segments = Vec::new();
    for part in path.split('.') {
        let (name, rest) = part.split_once('[').unwrap_or((part, ""));
        segments.push(name.to_owned());
        for _ in rest.split('[').filter(|s| !s.is_empty()) {
            segments.push("[]".to_owned());
        }
    }
    segments.pop()?;
    Some(segments)
}

fn matches(pattern: &[String], path: &[String]) -> bool {
    pattern.len() == path.len() && pattern.iter().zip(path).all(|(p, s)| p == "*" || p == s)
}

/// A deserializer that answers every request with a placeholder and records struct fields.
struct Walker<'s> {
    path: Vec<String>,
    schema: &'s mut Schema,
}

impl Walker<'_> {
    fn child(&mut self, segment: &str) -> Walker<'_> {
        let mut path = self.path.clone();
        path.push(segment.to_owned());
        Walker { path, schema: &mut *self.schema }
    }

    fn too_deep(&self) -> Result<(), Error> {
        if self.path.len() > MAX_DEPTH {
            return Err(de::Error::custom("too deep"));
        }
        Ok(())
    }
}

impl<'de> de::Deserializer<'de> for Walker<'_> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        // Int-or-string and opaque JSON values: a number fits both.
        visitor.visit_u64(1)
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_bool(false)
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        // "0" is a valid duration as well as text.
        visitor.visit_str("0")
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_str("0")
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_some(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(mut self, visitor: V) -> Result<V::Value, Error> {
        self.too_deep()?;
        visitor.visit_seq(Seq { walker: Some(self.child("[]")) })
    }

    fn deserialize_map<V: Visitor<'de>>(mut self, visitor: V) -> Result<V::Value, Error> {
        self.too_deep()?;
        visitor.visit_map(Fields { keys: &["1"], next: 0, walker: self.child("*"), per_key_path: false })
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.too_deep()?;
        self.schema.push((self.path.clone(), fields));
        visitor.visit_map(Fields { keys: fields, next: 0, walker: self, per_key_path: true })
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        let variant = variants.first().copied().ok_or_else(|| de::Error::custom("no variants"))?;
        visitor.visit_enum(Enum { variant, walker: self })
    }

    serde::forward_to_deserialize_any! {
        i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char bytes byte_buf unit unit_struct
        newtype_struct tuple tuple_struct identifier ignored_any
    }
}

/// A one-element sequence.
struct Seq<'s> {
    walker: Option<Walker<'s>>,
}

impl<'de> de::SeqAccess<'de> for Seq<'_> {
    type Error = Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, Error> {
        match self.walker.take() {
            Some(walker) => seed.deserialize(walker).map(Some),
            None => Ok(None),
        }
    }
}

/// A map with the given keys (a struct's fields, or one placeholder key).
struct Fields<'s> {
    keys: &'static [&'static str],
    next: usize,
    walker: Walker<'s>,
    /// Whether each value's path ends in its key (structs) or is the walker's own (map entries).
    per_key_path: bool,
}

impl<'de> de::MapAccess<'de> for Fields<'_> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, Error> {
        let Some(key) = self.keys.get(self.next) else { return Ok(None) };
        let key: StrDeserializer<Error> = key.into_deserializer();
        seed.deserialize(key).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        let key = self.keys.get(self.next).copied().unwrap_or_default();
        self.next += 1;
        if self.per_key_path {
            seed.deserialize(self.walker.child(key))
        } else {
            let walker = Walker { path: self.walker.path.clone(), schema: &mut *self.walker.schema };
            seed.deserialize(walker)
        }
    }
}

/// An enum answered with its first variant.
struct Enum<'s> {
    variant: &'static str,
    walker: Walker<'s>,
}

impl<'de, 's> de::EnumAccess<'de> for Enum<'s> {
    type Error = Error;
    type Variant = Walker<'s>;

    fn variant_seed<V: DeserializeSeed<'de>>(self, seed: V) -> Result<(V::Value, Walker<'s>), Error> {
        let name: StrDeserializer<Error> = self.variant.into_deserializer();
        Ok((seed.deserialize(name)?, self.walker))
    }
}

impl<'de> de::VariantAccess<'de> for Walker<'_> {
    type Error = Error;

    fn unit_variant(self) -> Result<(), Error> {
        Ok(())
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, Error> {
        seed.deserialize(self)
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, Error> {
        de::Deserializer::deserialize_seq(self, visitor)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        de::Deserializer::deserialize_struct(self, "", fields, visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::networking::VirtualService;
    use crate::security::PeerAuthentication;

    #[test]
    fn the_walk_finds_the_fields_next_to_an_unknown_one() {
        let fields = siblings::<VirtualService>("spec.http[0].route[1].destinaton").unwrap();
        assert_eq!(fields, ["destination", "weight", "headers"]);
        let fields = siblings::<VirtualService>("spec.hots").unwrap();
        assert!(fields.contains(&"hosts") && fields.contains(&"exportTo"), "{fields:?}");
        let fields = siblings::<VirtualService>("metadata.lables").unwrap();
        assert!(fields.contains(&"labels"));
        let fields = siblings::<PeerAuthentication>("spec.portLevelMtls.8080.mdoe").unwrap();
        assert_eq!(fields, ["mode"]);
        let fields = siblings::<VirtualService>("spec.http[0].match[0].uri.exact").unwrap_or_default();
        assert!(fields.is_empty());
        assert!(siblings::<VirtualService>("").is_none());
    }
}
