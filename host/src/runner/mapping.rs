//! Mapping a task over its input: how many children an input makes, and each child's input
//! (a list's elements, or list-valued fields zipped). Pure functions of the input.

use std::sync::Arc;

use serde_json::Value;

use crate::flow::MapOver;

/// A value's kind, for messages ("a list", "an object", …).
pub(crate) fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// How many children mapping `input` makes, when it can be mapped (the errors are reported when
/// the children are made).
pub(crate) fn map_len(input: &Value, map: &MapOver) -> Option<usize> {
    match (map, input) {
        (MapOver::No, _) => None,
        (MapOver::Input, Value::Array(items)) => Some(items.len()),
        (MapOver::Fields(fields), Value::Object(obj)) => match obj.get(fields.first()?)? {
            Value::Array(a) => Some(a.len()),
            _ => None,
        },
        _ => None,
    }
}

/// The children's inputs, or why `input` cannot be mapped.
pub(crate) fn children(input: &Value, map: &MapOver) -> Result<Vec<Arc<Value>>, String> {
    match map {
        MapOver::No => Ok(Vec::new()),
        MapOver::Input => match input {
            Value::Array(items) => Ok(items.iter().cloned().map(Arc::new).collect()),
            other => Err(format!(
                "`map = true` needs a list as input, got {}",
                kind_of(other)
            )),
        },
        MapOver::Fields(fields) => zip_fields(input, fields),
    }
}

/// Split an object input into child inputs by zipping the list-valued `fields`.
fn zip_fields(input: &Value, fields: &[String]) -> Result<Vec<Arc<Value>>, String> {
    let Value::Object(obj) = input else {
        return Err(format!(
            "mapping over fields needs an object input, got {}",
            kind_of(input)
        ));
    };
    let mut len = None;
    for f in fields {
        match obj.get(f) {
            Some(Value::Array(a)) => match len {
                None => len = Some(a.len()),
                Some(n) if n != a.len() => {
                    return Err(format!(
                        "mapped fields have different lengths: `{f}` has {}, others {n}",
                        a.len()
                    ));
                }
                Some(_) => {}
            },
            other => {
                return Err(format!(
                    "mapped field `{f}` must be a list, got {}",
                    other.map_or("nothing", kind_of)
                ));
            }
        }
    }
    Ok((0..len.unwrap_or(0))
        .map(|i| {
            let mut child = obj.clone();
            for f in fields {
                if let Some(Value::Array(a)) = obj.get(f) {
                    child.insert(f.clone(), a[i].clone());
                }
            }
            Arc::new(Value::Object(child))
        })
        .collect())
}
