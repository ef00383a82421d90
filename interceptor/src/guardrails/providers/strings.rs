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

use std::{borrow::Cow, fmt};

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

use crate::guardrails::usage::{self, Fields};

/// What the walk saw besides the strings: members of the top-level object
/// (and of the objects in its top-level `choices` or `candidates` array)
/// that say what a body is. Strings are borrowed from the body unless they
/// had escapes. A member read as a string is absent when its value is
/// anything else; a repeated member keeps its last value, as the parsed
/// document does.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Walked<'de> {
    /// The top-level `model`.
    pub model: Option<Cow<'de, str>>,
    /// The token counts of the top-level `usage` object (see
    /// [`usage::from_fields`]).
    pub usage: Fields,
    /// The token counts of the top-level `usageMetadata` object (Gemini's).
    pub usage_metadata: Fields,
    /// The top-level string members that say what an answer is, by
    /// [`Member`].
    texts: [Option<Cow<'de, str>>; Member::COUNT],
    /// Each choice's (or candidate's) `finish_reason`, else its
    /// `finishReason`, in document order.
    pub choice_reasons: Vec<Cow<'de, str>>,
}

/// A top-level string member [`Walked`] keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Member {
    /// `type`
    Type,
    /// `object`
    Object,
    /// `status`
    Status,
    /// `modelVersion`
    ModelVersion,
    /// `id`
    Id,
    /// `responseId`
    ResponseId,
    /// `stop_reason`
    StopReason,
    /// `stopReason`
    StopReasonCamel,
    /// `finish_reason`
    FinishReason,
}

impl Member {
    const COUNT: usize = 9;

    fn named(key: &str) -> Option<Self> {
        Some(match key {
            "type" => Self::Type,
            "object" => Self::Object,
            "status" => Self::Status,
            "modelVersion" => Self::ModelVersion,
            "id" => Self::Id,
            "responseId" => Self::ResponseId,
            "stop_reason" => Self::StopReason,
            "stopReason" => Self::StopReasonCamel,
            "finish_reason" => Self::FinishReason,
            _ => return None,
        })
    }
}

impl<'de> Walked<'de> {
    /// The top-level string `member`.
    pub fn text(&self, member: Member) -> Option<&Cow<'de, str>> {
        self.texts[member as usize].as_ref()
    }

    /// Takes the top-level string `member`.
    pub fn take(&mut self, member: Member) -> Option<Cow<'de, str>> {
        self.texts[member as usize].take()
    }
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
pub fn each_string<'de>(body: &'de [u8], each: &mut dyn FnMut(&str) -> bool) -> Result<Walked<'de>, WalkError> {
    // JSON is UTF-8 throughout: checked once here, not string by string.
    let text = std::str::from_utf8(body).map_err(|_| WalkError::NotJson)?;
    let mut de = serde_json::Deserializer::from_str(text);
    let mut walked = Walked::default();
    let mut stopped = false;
    let root = Node { each, stopped: &mut stopped, at: At::Top(&mut walked) };
    let result = root.deserialize(&mut de).and_then(|()| de.end());
    match result {
        Ok(()) => Ok(walked),
        Err(_) if stopped => Err(WalkError::Stopped),
        Err(_) => Err(WalkError::NotJson),
    }
}

/// One value of the document, and where it is.
struct Node<'w, 'de> {
    each: &'w mut dyn FnMut(&str) -> bool,
    stopped: &'w mut bool,
    at: At<'w, 'de>,
}

/// Where a value is, as far as [`Walked`] cares.
enum At<'w, 'de> {
    /// The root: its members are read into [`Walked`].
    Top(&'w mut Walked<'de>),
    /// The top-level `choices` or `candidates` value: its elements are
    /// choices.
    Choices(&'w mut Vec<Cow<'de, str>>),
    /// One choice: its finish reason is kept.
    Choice(&'w mut Vec<Cow<'de, str>>),
    /// Anywhere else.
    Inner,
}

impl<'de> DeserializeSeed<'de> for Node<'_, 'de> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'w, 'de> Node<'w, 'de> {
    fn string<E: de::Error>(self, s: &str) -> Result<(), E> {
        if (self.each)(s) {
            return Ok(());
        }
        *self.stopped = true;
        Err(E::custom("stopped"))
    }
}

/// A value nested in another, at `at`.
fn node<'n, 'de>(each: &'n mut dyn FnMut(&str) -> bool, stopped: &'n mut bool, at: At<'n, 'de>) -> Node<'n, 'de> {
    Node { each, stopped, at }
}

impl<'de> Visitor<'de> for Node<'_, 'de> {
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
        let Node { each, stopped, mut at } = self;
        loop {
            let at = match &mut at {
                At::Choices(reasons) => At::Choice(reasons),
                _ => At::Inner,
            };
            if seq.next_element_seed(Node { each: &mut *each, stopped: &mut *stopped, at })?.is_none() {
                return Ok(());
            }
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Node { each, stopped, mut at } = self;
        // A choice's own reason, else its camel-case one.
        let mut reason = (None, None);
        // Only the root's and a choice's members are told apart.
        let seed = KeyName { read: !matches!(at, At::Inner | At::Choices(_)) };
        while let Some(key) = map.next_key_seed(seed)? {
            match (&mut at, key) {
                (At::Top(walked), Key::Model) => {
                    walked.model = map.next_value_seed(LeafSeed(node(each, stopped, At::Inner)))?.text()
                }
                (At::Top(walked), Key::Usage) => {
                    walked.usage = map.next_value_seed(Usage(node(each, stopped, At::Inner)))?
                }
                (At::Top(walked), Key::UsageMetadata) => {
                    walked.usage_metadata = map.next_value_seed(Usage(node(each, stopped, At::Inner)))?
                }
                (At::Top(walked), Key::Choices) => {
                    map.next_value_seed(node(each, stopped, At::Choices(&mut walked.choice_reasons)))?
                }
                (At::Top(walked), Key::Text(member)) => {
                    walked.texts[member as usize] =
                        map.next_value_seed(LeafSeed(node(each, stopped, At::Inner)))?.text()
                }
                (At::Choice(_), Key::Text(Member::FinishReason)) => {
                    reason.0 = map.next_value_seed(LeafSeed(node(each, stopped, At::Inner)))?.text()
                }
                (At::Choice(_), Key::FinishReasonCamel) => {
                    reason.1 = map.next_value_seed(LeafSeed(node(each, stopped, At::Inner)))?.text()
                }
                _ => map.next_value_seed(node(each, stopped, At::Inner))?,
            }
        }
        if let (At::Choice(reasons), Some(reason)) = (&mut at, reason.0.or(reason.1)) {
            reasons.push(reason);
        }
        Ok(())
    }
}

/// An object key: the members the walk looks at (where they count).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Key {
    Model,
    Usage,
    UsageMetadata,
    /// `choices` or `candidates`.
    Choices,
    /// `finishReason` (a choice's).
    FinishReasonCamel,
    Text(Member),
    Other,
}

/// Reads an object key as a [`Key`].
#[derive(Clone, Copy)]
struct KeyName {
    /// Whether the key is looked at (else it is [`Key::Other`]).
    read: bool,
}

impl<'de> DeserializeSeed<'de> for KeyName {
    type Value = Key;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Key, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeyName {
    type Value = Key;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Key, E> {
        if !self.read {
            return Ok(Key::Other);
        }
        Ok(match s {
            "model" => Key::Model,
            "usage" => Key::Usage,
            "usageMetadata" => Key::UsageMetadata,
            "choices" | "candidates" => Key::Choices,
            "finishReason" => Key::FinishReasonCamel,
            _ => Member::named(s).map_or(Key::Other, Key::Text),
        })
    }
}

/// A top-level usage object: the token counts among its members (see
/// [`usage::field`]), every string in it still handed to the callback. A
/// value that is not an object is walked as any value and counts nothing.
struct Usage<'w, 'de>(Node<'w, 'de>);

impl<'de> DeserializeSeed<'de> for Usage<'_, 'de> {
    type Value = Fields;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Fields, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Usage<'_, 'de> {
    type Value = Fields;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields, A::Error> {
        let Node { each, stopped, .. } = self.0;
        let mut fields = Fields::default();
        while let Some(field) = map.next_key_seed(FieldName)? {
            match field {
                Some(index) => {
                    if let Leaf::Count(count) = map.next_value_seed(LeafSeed(node(each, stopped, At::Inner)))? {
                        fields.set(index, count);
                    }
                }
                None => map.next_value_seed(node(each, stopped, At::Inner))?,
            }
        }
        Ok(fields)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Fields, A::Error> {
        self.0.visit_seq(seq).map(|()| Fields::default())
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Fields, E> {
        self.0.string(s).map(|()| Fields::default())
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

/// A member's value as the walk keeps it: a string (handed to the callback
/// like any other), a token count (a `u64`, as `Value::as_u64` reads it),
/// or anything else, walked as any value.
enum Leaf<'de> {
    Text(Cow<'de, str>),
    Count(u64),
    Other,
}

impl<'de> Leaf<'de> {
    fn text(self) -> Option<Cow<'de, str>> {
        match self {
            Leaf::Text(text) => Some(text),
            _ => None,
        }
    }
}

struct LeafSeed<'w, 'de>(Node<'w, 'de>);

impl<'de> DeserializeSeed<'de> for LeafSeed<'_, 'de> {
    type Value = Leaf<'de>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Leaf<'de>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for LeafSeed<'_, 'de> {
    type Value = Leaf<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Leaf<'de>, E> {
        Ok(Leaf::Count(n))
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Leaf<'de>, E> {
        Ok(Leaf::Other)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Leaf<'de>, E> {
        Ok(Leaf::Other)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Leaf<'de>, E> {
        Ok(Leaf::Other)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Leaf<'de>, E> {
        Ok(Leaf::Other)
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Leaf<'de>, E> {
        self.0.string(s).map(|()| Leaf::Text(Cow::Owned(s.to_owned())))
    }

    fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Leaf<'de>, E> {
        self.0.string(s).map(|()| Leaf::Text(Cow::Borrowed(s)))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Leaf<'de>, A::Error> {
        self.0.visit_seq(seq).map(|()| Leaf::Other)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Leaf<'de>, A::Error> {
        self.0.visit_map(map).map(|()| Leaf::Other)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    fn strings(body: &str) -> Result<(Vec<String>, Walked<'_>), WalkError> {
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

    /// Every string the document holds, in order, as a parsed document
    /// lists them.
    fn value_strings(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::String(s) => out.push(s.clone()),
            Value::Array(items) => items.iter().for_each(|i| value_strings(i, out)),
            Value::Object(map) => map.values().for_each(|i| value_strings(i, out)),
            _ => {}
        }
    }

    /// The members kept for an answer's facts are still handed to the
    /// callback, whatever their type: a secret in an `id` or a finish
    /// reason is scanned like any other string.
    #[test]
    fn kept_members_are_still_walked() {
        let body = r#"{"id":"sk-1","type":"t","object":"o","status":"s","modelVersion":"mv","responseId":"r",
            "stop_reason":"sr","stopReason":{"x":["sk-2"]},"finish_reason":["sk-3"],"model":"m",
            "choices":[{"finish_reason":"f1","finishReason":"f2","message":{"content":"sk-4"}},"sk-5",[{"finish_reason":"f3"}]],
            "candidates":{"finishReason":"sk-6"},"usage":{"input_tokens":"sk-7","x":["sk-8"]}}"#;
        let (seen, walked) = strings(body).unwrap();
        let mut expected = Vec::new();
        value_strings(&serde_json::from_str(body).unwrap(), &mut expected);
        assert_eq!(seen, expected);
        assert_eq!(walked.text(Member::Id).map(|s| s.as_ref()), Some("sk-1"));
        assert!(matches!(walked.text(Member::Status), Some(Cow::Borrowed("s"))));
        assert_eq!(walked.text(Member::StopReasonCamel), None);
        assert_eq!(walked.text(Member::FinishReason), None);
        // Only objects that are elements of the top-level array are choices.
        assert_eq!(walked.choice_reasons, ["f1"]);
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
        // Bytes that are not UTF-8, in a string, a key or between values.
        for body in [&b"[\"a\xffb\"]"[..], b"{\"k\xc3\":1}", b"[1,\xe2\x82]", b"[\"\xed\xa0\x80\"]", b"[\"\xc3\xa9\"]"]
        {
            let value = serde_json::from_slice::<Value>(body).is_ok();
            assert_eq!(each_string(body, &mut |_| true).is_ok(), value, "{body:?}");
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
