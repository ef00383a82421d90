//! One pass over a JSON body that hands every string value to a callback,
//! without building a [`serde_json::Value`]: strings without escapes are
//! borrowed from the body, escaped ones are unescaped into the parser's
//! scratch buffer. Object keys are not texts and are not handed over.
//!
//! Every text a provider parser (or the walk over the fields it does not
//! read) takes from a request or whole response body is one of these string
//! values, verbatim: a callback that finds nothing in any of them proves
//! that a scan of the parsed texts would find nothing either. The parse is
//! serde_json's own, so a body is accepted here exactly when
//! `serde_json::from_slice::<Value>` accepts it. Pure: no I/O.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

use crate::guardrails::usage::{self, Fields};

/// What the walk saw besides the strings.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Walked {
    /// The top-level `model`, when it is a string (the last one, as the
    /// parsed document keeps it).
    pub model: Option<String>,
    /// The token counts of the top-level `usage` object (see
    /// [`usage::from_fields`]).
    pub usage: Fields,
    /// The token counts of the top-level `usageMetadata` object (Gemini's).
    pub usage_metadata: Fields,
}

/// Why a walk did not finish.
#[derive(Debug, PartialEq, Eq)]
pub enum WalkError {
    /// Not JSON (as `serde_json` reads it).
    NotJson,
    /// The callback asked to stop.
    Stopped,
}

/// Hands every string value of `body` to `each` in document order, until it
/// returns `false`.
pub fn each_string(body: &[u8], each: &mut dyn FnMut(&str) -> bool) -> Result<Walked, WalkError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let mut walked = Walked::default();
    let mut stopped = false;
    let root = Node { each, stopped: &mut stopped, top: Some(&mut walked) };
    let result = root.deserialize(&mut de).and_then(|()| de.end());
    match result {
        Ok(()) => Ok(walked),
        Err(_) if stopped => Err(WalkError::Stopped),
        Err(_) => Err(WalkError::NotJson),
    }
}

/// One value of the document; `top` only for the root.
struct Node<'w> {
    each: &'w mut dyn FnMut(&str) -> bool,
    stopped: &'w mut bool,
    top: Option<&'w mut Walked>,
}

impl<'de> DeserializeSeed<'de> for Node<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl Node<'_> {
    fn string<E: de::Error>(self, s: &str) -> Result<(), E> {
        if (self.each)(s) {
            return Ok(());
        }
        *self.stopped = true;
        Err(E::custom("stopped"))
    }
}

impl<'de> Visitor<'de> for Node<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_i128<E: de::Error>(self, _: i128) -> Result<(), E> {
        Ok(())
    }

    fn visit_u128<E: de::Error>(self, _: u128) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<(), E> {
        self.string(s)
    }

    fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<(), E> {
        self.string(s)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let (each, stopped) = (self.each, self.stopped);
        while seq.next_element_seed(Node { each: &mut *each, stopped: &mut *stopped, top: None })?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let (each, stopped, mut top) = (self.each, self.stopped, self.top);
        while let Some(key) = map.next_key_seed(Key)? {
            match (top.as_deref_mut(), key) {
                (Some(walked), TopKey::Model) => {
                    let model = map.next_value_seed(Model { each: &mut *each, stopped: &mut *stopped })?;
                    walked.model = model;
                }
                (Some(walked), TopKey::Usage | TopKey::UsageMetadata) => {
                    let fields = map.next_value_seed(Usage { each: &mut *each, stopped: &mut *stopped })?;
                    // A repeated key: the last one, as the parsed document keeps it.
                    match key {
                        TopKey::Usage => walked.usage = fields,
                        _ => walked.usage_metadata = fields,
                    }
                }
                _ => map.next_value_seed(Node { each: &mut *each, stopped: &mut *stopped, top: None })?,
            }
        }
        Ok(())
    }
}

/// The object keys the walk looks at (at the top level only).
#[derive(Clone, Copy, PartialEq, Eq)]
enum TopKey {
    Model,
    Usage,
    UsageMetadata,
    Other,
}

/// An object key: which of the [`TopKey`]s it is.
struct Key;

impl<'de> DeserializeSeed<'de> for Key {
    type Value = TopKey;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<TopKey, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key {
    type Value = TopKey;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<TopKey, E> {
        Ok(match s {
            "model" => TopKey::Model,
            "usage" => TopKey::Usage,
            "usageMetadata" => TopKey::UsageMetadata,
            _ => TopKey::Other,
        })
    }
}

/// A top-level usage object: the token counts among its members (see
/// [`usage::field`]), every string in it still handed to the callback. A
/// value that is not an object is walked as any value and counts nothing.
struct Usage<'w> {
    each: &'w mut dyn FnMut(&str) -> bool,
    stopped: &'w mut bool,
}

impl<'de> DeserializeSeed<'de> for Usage<'_> {
    type Value = Fields;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Fields, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Usage<'_> {
    type Value = Fields;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields, A::Error> {
        let (each, stopped) = (self.each, self.stopped);
        let mut fields = Fields::default();
        while let Some(field) = map.next_key_seed(FieldName)? {
            match field {
                Some(index) => {
                    let count = map.next_value_seed(Count { each: &mut *each, stopped: &mut *stopped })?;
                    if let Some(count) = count {
                        fields.set(index, count);
                    }
                }
                None => map.next_value_seed(Node { each: &mut *each, stopped: &mut *stopped, top: None })?,
            }
        }
        Ok(fields)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Fields, A::Error> {
        Node { each: self.each, stopped: self.stopped, top: None }.visit_seq(seq).map(|()| Fields::default())
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Fields, E> {
        Node { each: self.each, stopped: self.stopped, top: None }.string(s).map(|()| Fields::default())
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Fields, E> {
        Ok(Fields::default())
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Fields, E> {
        Ok(Fields::default())
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Fields, E> {
        Ok(Fields::default())
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Fields, E> {
        Ok(Fields::default())
    }

    fn visit_unit<E: de::Error>(self) -> Result<Fields, E> {
        Ok(Fields::default())
    }
}

/// A usage object's member name: the index of the usage field it names.
struct FieldName;

impl<'de> DeserializeSeed<'de> for FieldName {
    type Value = Option<usize>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<usize>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for FieldName {
    type Value = Option<usize>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Option<usize>, E> {
        Ok(usage::field(s))
    }
}

/// A token count: a `u64` (as `Value::as_u64` reads it), else `None`, any
/// string in the value still handed to the callback.
struct Count<'w> {
    each: &'w mut dyn FnMut(&str) -> bool,
    stopped: &'w mut bool,
}

impl<'de> DeserializeSeed<'de> for Count<'_> {
    type Value = Option<u64>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<u64>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Count<'_> {
    type Value = Option<u64>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Option<u64>, E> {
        Ok(Some(n))
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Option<u64>, E> {
        Ok(None)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Option<u64>, E> {
        Ok(None)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Option<u64>, E> {
        Ok(None)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Option<u64>, E> {
        Ok(None)
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Option<u64>, E> {
        Node { each: self.each, stopped: self.stopped, top: None }.string(s).map(|()| None)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Option<u64>, A::Error> {
        Node { each: self.each, stopped: self.stopped, top: None }.visit_seq(seq).map(|()| None)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Option<u64>, A::Error> {
        Node { each: self.each, stopped: self.stopped, top: None }.visit_map(map).map(|()| None)
    }
}

/// The top-level `model` value: its text when it is a string (handed to
/// the callback like any other), else walked as any value.
struct Model<'w> {
    each: &'w mut dyn FnMut(&str) -> bool,
    stopped: &'w mut bool,
}

impl<'de> DeserializeSeed<'de> for Model<'_> {
    type Value = Option<String>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<String>, D::Error> {
        let mut model = None;
        let (each, stopped) = (self.each, self.stopped);
        let mut keep = |s: &str| {
            model = Some(s.to_owned());
            each(s)
        };
        Node { each: &mut keep, stopped, top: None }.deserialize(d)?;
        Ok(model)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    fn strings(body: &str) -> Result<(Vec<String>, Walked), WalkError> {
        let mut seen = Vec::new();
        let walked = each_string(body.as_bytes(), &mut |s| {
            seen.push(s.to_owned());
            true
        })?;
        Ok((seen, walked))
    }

    #[test]
    fn every_string_value_in_order_unescaped_without_keys() {
        let (seen, walked) =
            strings(r#"{"model":"gpt-4o","messages":[{"role":"user","content":"a\nb \u0041KIA"}],"n":1.5,"x":null}"#)
                .unwrap();
        assert_eq!(seen, ["gpt-4o", "user", "a\nb AKIA"]);
        assert_eq!(walked.model.as_deref(), Some("gpt-4o"));
    }

    #[test]
    fn the_model_is_the_last_top_level_string_as_the_parsed_document_keeps_it() {
        let (_, walked) = strings(r#"{"model":"a","inner":{"model":"b"},"model":"c"}"#).unwrap();
        assert_eq!(walked.model.as_deref(), Some("c"));
        let (_, walked) = strings(r#"{"model":"a","model":7}"#).unwrap();
        assert_eq!(walked.model, None);
        let (seen, walked) = strings(r#"["model","x"]"#).unwrap();
        assert_eq!((seen.len(), walked.model), (2, None));
    }

    #[test]
    fn top_level_usage_counts_are_read_and_their_strings_still_walked() {
        let body = r#"{"usage":{"input_tokens":3,"output_tokens":"x","cache_read_input_tokens":-1},
            "inner":{"usage":{"input_tokens":99}},
            "usageMetadata":{"promptTokenCount":4,"promptTokensDetails":[{"modality":"TEXT","tokenCount":4}]}}"#;
        let (seen, walked) = strings(body).unwrap();
        assert_eq!(seen, ["x", "TEXT"]);
        let doc: Value = serde_json::from_str(body).unwrap();
        assert_eq!(walked.usage, usage::Fields::of(&doc["usage"]));
        assert_eq!(walked.usage_metadata, usage::Fields::of(&doc["usageMetadata"]));
        let (_, walked) = strings(r#"{"usage":{"input_tokens":1},"usage":"none"}"#).unwrap();
        assert_eq!(walked.usage, usage::Fields::default());
    }

    #[test]
    fn accepts_exactly_what_serde_json_accepts() {
        let bodies = [
            "{}",
            "\"text\"",
            "[1,2,{\"a\":[true,false,null]}]",
            "{\"a\":1} ",
            "{\"a\":1} x",
            "{\"a\":",
            "{\"a\":\"\\ud800\"}",
            "1e400",
            "18446744073709551616",
            "{\"a\":1,\"a\":2}",
            "",
            "nul",
            "[\"\\u0000\"]",
        ];
        for body in bodies {
            let value = serde_json::from_str::<Value>(body).is_ok();
            assert_eq!(strings(body).is_ok(), value, "{body:?}");
        }
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert!(serde_json::from_str::<Value>(&deep).is_err());
        assert_eq!(strings(&deep).unwrap_err(), WalkError::NotJson);
    }

    #[test]
    fn the_callback_can_stop_the_walk() {
        let mut seen = 0;
        let r = each_string(br#"["a","b","c"]"#, &mut |s| {
            seen += 1;
            s != "b"
        });
        assert_eq!((r, seen), (Err(WalkError::Stopped), 2));
    }
}
