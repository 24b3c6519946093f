//! JSON values as the host keeps them: [`Json`], a value held as its canonical text.
//!
//! Task inputs and outputs pass through the host many times (into the store, the output cache,
//! downstream inputs, mapped children, state handlers) but the host almost never needs to look
//! inside them. Parsed into a `serde_json::Value` a value costs up to ~16× its text, so the host
//! keeps each one as text, validated and put in canonical form once, when it enters (a guest's
//! output, a stored blob, a composed input), and shared by reference after that: host memory per
//! value is about its size.
//!
//! The canonical form (the one values are hashed in for the output cache, see [`crate::cache`]):
//! object keys sorted by their bytes and unique (the last of repeated keys wins, as when parsing
//! into a map), no whitespace, strings escaped as serde_json escapes them, and every number
//! exactly as it was written (serde_json's `arbitrary_precision` keeps each number's text: `1.0`
//! stays `1.0`, `18446744073709551617` stays that integer; the one change is the spelling of an
//! exponent, `1E2` becomes `1e+2`). It is therefore exactly the text a guest reads, and what a
//! guest wrote up to key order and whitespace.
//!
//! Canonicalizing streams: arrays and strings are written as they are read; an object is written
//! in the order it came and re-sorted only when its keys were not already in order, so the
//! working memory is the output's size plus that of the largest unsorted object.

use std::fmt;
use std::sync::Arc;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;
use serde_json::value::RawValue;

/// A JSON value held as its canonical text (see the module documentation). Cloning shares the
/// text. (An `Arc<String>` rather than an `Arc<str>`: the text is built in a `String` and moved
/// in without a copy, and the guest bindings take a `&String`.)
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Json(Arc<String>);

impl Json {
    /// Parse `text` (any valid JSON, at most 128 levels deep) into canonical form.
    pub fn parse(text: &str) -> Result<Json, serde_json::Error> {
        let mut out = Vec::with_capacity(text.len());
        let mut de = serde_json::Deserializer::from_str(text);
        Canon(&mut out).deserialize(&mut de)?;
        de.end()?;
        Ok(Json::from_canonical_bytes(out))
    }

    /// The canonical form of `value`.
    pub fn from_value(value: &Value) -> Json {
        let mut out = Vec::new();
        canonical(value, &mut out);
        Json::from_canonical_bytes(out)
    }

    /// `null`.
    pub fn null() -> Json {
        Json(Arc::new("null".to_owned()))
    }

    /// A value from text the host wrote in canonical form itself (a stored blob, checked against
    /// its hash). Not checked: a wrong text breaks only cache identity, never memory safety.
    pub(crate) fn from_canonical(text: &str) -> Json {
        Json(Arc::new(text.to_owned()))
    }

    fn from_canonical_bytes(bytes: Vec<u8>) -> Json {
        // Every byte written is serde_json's output or a copy of valid UTF-8 text.
        let mut text = match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        };
        text.shrink_to_fit();
        Json(Arc::new(text))
    }

    /// The canonical text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The canonical text, as a `String` (for APIs that take a `&String`).
    pub fn as_string(&self) -> &String {
        &self.0
    }

    /// The text's length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the text is empty (never: the shortest JSON text is one digit).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether this is `null`.
    pub fn is_null(&self) -> bool {
        self.0.as_str() == "null"
    }

    /// The value parsed (for code that must look inside it). Fails only past serde_json's
    /// nesting limit of 128, which a composed input can reach by nesting outputs in a template.
    pub fn to_value(&self) -> Result<Value, serde_json::Error> {
        serde_json::from_str(&self.0)
    }

    /// blake3 (hex) of the canonical text: the value's identity in the store and the cache.
    pub fn hash(&self) -> String {
        blake3::hash(self.0.as_bytes()).to_hex().to_string()
    }

    /// The elements, when this is an array (each already canonical: a slice of this text).
    pub fn elements(&self) -> Option<Vec<Json>> {
        if !self.0.starts_with('[') {
            return None;
        }
        let items: Vec<&RawValue> = serde_json::from_str(&self.0).ok()?;
        Some(items.into_iter().map(Json::of_raw).collect())
    }

    /// The number of elements, when this is an array (counted without copying any).
    pub fn array_len(&self) -> Option<usize> {
        struct Count;
        impl<'de> Visitor<'de> for Count {
            type Value = usize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON array")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<usize, A::Error> {
                let mut n = 0;
                while seq.next_element::<de::IgnoredAny>()?.is_some() {
                    n += 1;
                }
                Ok(n)
            }
        }
        if !self.0.starts_with('[') {
            return None;
        }
        let mut de = serde_json::Deserializer::from_str(&self.0);
        de.deserialize_seq(Count).ok()
    }

    /// What kind of value this is, for messages: "null", "a boolean", "a number", "a string",
    /// "a list" or "an object".
    pub fn kind(&self) -> &'static str {
        match self.0.as_bytes().first() {
            Some(b'n') => "null",
            Some(b't' | b'f') => "a boolean",
            Some(b'"') => "a string",
            Some(b'[') => "a list",
            Some(b'{') => "an object",
            _ => "a number",
        }
    }

    /// The fields in key order, when this is an object.
    pub fn fields(&self) -> Option<Vec<(String, Json)>> {
        if !self.0.starts_with('{') {
            return None;
        }
        let fields: Vec<(String, &RawValue)> =
            serde_json::from_str::<RawFields<'_>>(&self.0).ok()?.0;
        Some(
            fields
                .into_iter()
                .map(|(k, v)| (k, Json::of_raw(v)))
                .collect(),
        )
    }

    /// The field `name`, when this is an object that has it.
    pub fn field(&self, name: &str) -> Option<Json> {
        self.fields()?
            .into_iter()
            .find_map(|(k, v)| (k == name).then_some(v))
    }

    /// An object of `fields` (keys sorted and unique: the last of a repeated key wins).
    pub fn object(fields: impl IntoIterator<Item = (String, Json)>) -> Json {
        let mut fields: Vec<(String, Json)> = fields.into_iter().collect();
        fields.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        // Sized up front: a value may be large, and growing by doubling would copy it.
        let size = fields
            .iter()
            .map(|(k, v)| k.len() + v.len() + 4)
            .sum::<usize>()
            + 2;
        let mut out = Vec::with_capacity(size);
        out.push(b'{');
        let mut first = true;
        for (i, (k, v)) in fields.iter().enumerate() {
            if fields.get(i + 1).is_some_and(|next| next.0 == *k) {
                continue;
            }
            if !first {
                out.push(b',');
            }
            first = false;
            string(k, &mut out);
            out.push(b':');
            out.extend_from_slice(v.as_str().as_bytes());
        }
        out.push(b'}');
        Json::from_canonical_bytes(out)
    }

    /// An array of `items`.
    pub fn array(items: impl IntoIterator<Item = Json>) -> Json {
        let items: Vec<Json> = items.into_iter().collect();
        // Sized up front: a value may be large, and growing by doubling would copy it.
        let mut out = Vec::with_capacity(items.iter().map(|v| v.len() + 1).sum::<usize>() + 2);
        out.push(b'[');
        for (i, v) in items.into_iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(v.as_str().as_bytes());
        }
        out.push(b']');
        Json::from_canonical_bytes(out)
    }

    fn of_raw(raw: &RawValue) -> Json {
        Json::from_canonical(raw.get())
    }
}

impl fmt::Debug for Json {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for Json {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<Value> for Json {
    fn from(value: Value) -> Json {
        Json::from_value(&value)
    }
}

impl From<&Value> for Json {
    fn from(value: &Value) -> Json {
        Json::from_value(value)
    }
}

impl PartialEq<Value> for Json {
    fn eq(&self, other: &Value) -> bool {
        *self == Json::from_value(other)
    }
}

impl Serialize for Json {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let raw: &RawValue = serde_json::from_str(&self.0).map_err(serde::ser::Error::custom)?;
        raw.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Json, D::Error> {
        let mut out = Vec::new();
        Canon(&mut out).deserialize(deserializer)?;
        Ok(Json::from_canonical_bytes(out))
    }
}

/// An object's fields as they come, values unparsed.
struct RawFields<'a>(Vec<(String, &'a RawValue)>);

impl<'de: 'a, 'a> Deserialize<'de> for RawFields<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawFields<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut fields = Vec::new();
                while let Some(entry) = map.next_entry::<String, &'de RawValue>()? {
                    fields.push(entry);
                }
                Ok(RawFields(fields))
            }
        }
        deserializer.deserialize_map(V)
    }
}

/// serde_json's marker for a number kept as text (`arbitrary_precision`).
const NUMBER_TOKEN: &str = "$serde_json::private::Number";

/// Writes the canonical form of the value it deserializes into its buffer.
struct Canon<'o>(&'o mut Vec<u8>);

impl<'de> DeserializeSeed<'de> for Canon<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Canon<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.0.extend_from_slice(b"null");
        Ok(())
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.visit_unit()
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        self.deserialize(deserializer)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        self.0
            .extend_from_slice(if v { b"true" as &[u8] } else { b"false" });
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.0.extend_from_slice(v.to_string().as_bytes());
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.0.extend_from_slice(v.to_string().as_bytes());
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        match serde_json::Number::from_f64(v) {
            Some(n) => {
                self.0.extend_from_slice(n.to_string().as_bytes());
                Ok(())
            }
            None => Err(E::custom("a non-finite number is not JSON")),
        }
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        string(v, self.0);
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let out = self.0;
        out.push(b'[');
        let mut first = true;
        loop {
            let mark = out.len();
            if !first {
                out.push(b',');
            }
            if seq.next_element_seed(Canon(&mut *out))?.is_none() {
                out.truncate(mark);
                break;
            }
            first = false;
        }
        out.push(b']');
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let out = self.0;
        let Some(first) = map.next_key::<String>()? else {
            out.extend_from_slice(b"{}");
            return Ok(());
        };
        if first == NUMBER_TOKEN {
            // A number serde_json kept as text (or an object spelling its marker, which
            // serde_json's own `Value` reads as that number too): check it and keep its text.
            let text: String = map.next_value()?;
            text.parse::<serde_json::Number>()
                .map_err(|_| de::Error::custom(format!("`{text}` is not a JSON number")))?;
            out.extend_from_slice(text.as_bytes());
            return Ok(());
        }
        let start = out.len();
        out.push(b'{');
        let mut in_order = true;
        let mut previous = first;
        string(&previous, out);
        out.push(b':');
        map.next_value_seed(Canon(&mut *out))?;
        while let Some(key) = map.next_key::<String>()? {
            in_order &= key.as_bytes() > previous.as_bytes();
            out.push(b',');
            string(&key, out);
            out.push(b':');
            map.next_value_seed(Canon(&mut *out))?;
            previous = key;
        }
        out.push(b'}');
        if !in_order {
            let sorted = {
                let written = std::str::from_utf8(&out[start..]).map_err(de::Error::custom)?;
                let fields = serde_json::from_str::<RawFields<'_>>(written)
                    .map_err(de::Error::custom)?
                    .0;
                Json::object(fields.into_iter().map(|(k, v)| (k, Json::of_raw(v))))
            };
            out.truncate(start);
            out.extend_from_slice(sorted.as_str().as_bytes());
        }
        Ok(())
    }
}

/// Append the canonical JSON form of `value` to `out` (see the module documentation).
pub fn canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => out.extend_from_slice(n.to_string().as_bytes()),
        Value::String(s) => string(s, out),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical(item, out);
            }
            out.push(b']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push(b'{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                string(k, out);
                out.push(b':');
                canonical(v, out);
            }
            out.push(b'}');
        }
    }
}

fn string(s: &str, out: &mut Vec<u8>) {
    // Writing a str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn text(v: &Value) -> String {
        Json::from_value(v).as_str().to_owned()
    }

    fn hash(v: &Value) -> String {
        Json::from_value(v).hash()
    }

    #[test]
    fn canonical_form_sorts_keys_and_keeps_numbers_exactly() {
        let a: Value =
            serde_json::from_str(r#"{"b": [1.0, -0.0, 2.5, 1e2], "a": {"y": 1, "x": "é\n"}}"#)
                .expect("json");
        // serde_json writes an exponent as `e+` / `e-` (its only change to a number's text).
        assert_eq!(
            text(&a),
            r#"{"a":{"x":"é\n","y":1},"b":[1.0,-0.0,2.5,1e+2]}"#
        );
        // Key order and whitespace do not matter.
        let b: Value =
            serde_json::from_str(r#"{"a": {"y": 1, "x": "é\n"},   "b": [1.0, -0.0, 2.5, 1e2]}"#)
                .expect("json");
        assert_eq!(hash(&a), hash(&b));
        // The spelling of a number does: a task may accept `1` and refuse `1.0`.
        let c: Value =
            serde_json::from_str(r#"{"a": {"x": "é\n", "y": 1.0}, "b": [1, 0, 2.5, 100]}"#)
                .expect("json");
        assert_ne!(hash(&a), hash(&c));
        assert_ne!(hash(&json!(1)), hash(&json!(1.0)));
        assert_ne!(hash(&json!(1)), hash(&json!("1")));
        assert_ne!(hash(&json!([1, 2])), hash(&json!([2, 1])));
        // Integers past 64 bits stay integers, each its own.
        let big: Value =
            serde_json::from_str("[18446744073709551617, 18446744073709551616]").expect("json");
        assert_eq!(text(&big), "[18446744073709551617,18446744073709551616]");
        assert_eq!(text(&json!(u64::MAX)), u64::MAX.to_string());
        assert_eq!(text(&json!(i64::MIN)), i64::MIN.to_string());
        // The canonical text parses back to the same value.
        for v in [a, big] {
            let back: Value = serde_json::from_str(&text(&v)).expect("json");
            assert_eq!(back, v);
            assert_eq!(text(&back), text(&v));
        }
    }

    fn canon(text: &str) -> String {
        Json::parse(text).expect("valid JSON").as_str().to_owned()
    }

    #[test]
    fn parsing_sorts_keys_drops_whitespace_and_keeps_numbers_exactly() {
        assert_eq!(
            canon(r#" { "b" : 1.0 , "a" : [ 1 , 2e3 , -0 ] } "#),
            r#"{"a":[1,2e+3,-0],"b":1.0}"#
        );
        assert_eq!(
            canon("[18446744073709551617, 18446744073709551616, 1E2, -12]"),
            "[18446744073709551617,18446744073709551616,1e+2,-12]"
        );
        assert_eq!(canon(r#""\u00e9\/\n""#), "\"é/\\n\"");
        assert_eq!(canon(r#"{"a":1,"a":2}"#), r#"{"a":2}"#);
        assert_eq!(
            canon(r#"{"b":{"d":1,"c":2},"a":null}"#),
            r#"{"a":null,"b":{"c":2,"d":1}}"#
        );
        assert_eq!(canon("[]"), "[]");
        assert_eq!(canon("{}"), "{}");
        assert_eq!(canon("[[],{},[{}]]"), "[[],{},[{}]]");
        assert_eq!(canon("true"), "true");
    }

    #[test]
    fn parsing_agrees_with_the_canonical_form_of_the_parsed_value() {
        for text in [
            r#"{"z":[1,{"y":"\u0000","x":1.50}],"a":{"k":[true,false,null]},"é":"ü","E":1e-7}"#,
            r#"[{"b":1,"a":2},{"a":2,"b":1},"$$x",-1.0e10]"#,
            r#"{"$serde_json::private::Number":"12"}"#,
        ] {
            let value: Value = serde_json::from_str(text).expect("valid");
            assert_eq!(canon(text), Json::from_value(&value).as_str(), "{text}");
        }
    }

    #[test]
    fn invalid_text_and_deep_nesting_are_refused() {
        for bad in [
            "",
            "[1,",
            "{\"a\"}",
            "01",
            "nul",
            "[1] 2",
            r#"{"$serde_json::private::Number":"x"}"#,
        ] {
            assert!(Json::parse(bad).is_err(), "{bad:?}");
        }
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert!(Json::parse(&deep).is_err());
        let ok = format!("{}{}", "[".repeat(100), "]".repeat(100));
        assert_eq!(canon(&ok), ok);
    }

    #[test]
    fn elements_fields_and_builders_stay_canonical() {
        let v = Json::parse(r#"[{"b":2,"a":1}, 3, "x"]"#).expect("valid");
        let items = v.elements().expect("an array");
        assert_eq!(items[0].as_str(), r#"{"a":1,"b":2}"#);
        assert_eq!(items[0].field("b").map(|j| j.to_string()), Some("2".into()));
        assert_eq!(items[0].field("c"), None);
        assert_eq!(Json::array(items.clone()), v);
        assert_eq!(
            Json::object([
                ("b".into(), items[1].clone()),
                ("a".into(), items[2].clone())
            ])
            .as_str(),
            r#"{"a":"x","b":3}"#
        );
        assert!(v.fields().is_none());
        assert_eq!(v.array_len(), Some(3));
        assert_eq!(Json::parse("[]").expect("valid").array_len(), Some(0));
        assert_eq!(items[0].array_len(), None);
        let kinds: Vec<&str> = ["null", "true", "-1", "\"s\"", "[]", "{}"]
            .iter()
            .map(|t| Json::parse(t).expect("valid").kind())
            .collect();
        assert_eq!(
            kinds,
            [
                "null",
                "a boolean",
                "a number",
                "a string",
                "a list",
                "an object"
            ]
        );
        assert!(items[1].elements().is_none());
        assert_eq!(
            Json::from_value(&json!({"b": [1.0], "a": "s"})).as_str(),
            r#"{"a":"s","b":[1.0]}"#
        );
        assert_eq!(v.to_value().expect("parses"), json!([{"a":1,"b":2},3,"x"]));
        assert_eq!(Json::from_value(&json!(1.0)), json!(1.0));
        assert_ne!(Json::from_value(&json!(1.0)), json!(1));
    }

    #[test]
    fn serde_round_trips_the_text() {
        let v = Json::parse(r#"{"n":1.0,"big":18446744073709551617}"#).expect("valid");
        let text = serde_json::to_string(&json!({"x": v})).expect("serializes");
        assert_eq!(text, r#"{"x":{"big":18446744073709551617,"n":1.0}}"#);
        let back: Json =
            serde_json::from_str(r#"{ "n": 1.0, "big": 18446744073709551617 }"#).expect("parses");
        assert_eq!(back, v);
        #[derive(Serialize, Deserialize)]
        struct S {
            v: Json,
        }
        let s: S = serde_json::from_str(&serde_json::to_string(&S { v: v.clone() }).expect("ser"))
            .expect("de");
        assert_eq!(s.v, v);
    }
}
