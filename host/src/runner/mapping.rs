//! Mapping a task over its input: how many children an input makes, and each child's input
//! (a list's elements, or list-valued fields zipped). Pure functions of the input, which stays
//! text: each child's input is a slice of it.

use crate::flow::MapOver;
use crate::json::Json;

/// How many children mapping `input` makes, when it can be mapped (the errors are reported when
/// the children are made). Counts without copying, so the cap on mapped children is checked
/// before any child exists.
pub(crate) fn map_len(input: &Json, map: &MapOver) -> Option<usize> {
    match map {
        MapOver::No => None,
        MapOver::Input => input.array_len(),
        MapOver::Fields(fields) => input.field(fields.first()?)?.array_len(),
    }
}

/// The children's inputs, or why `input` cannot be mapped.
pub(crate) fn children(input: &Json, map: &MapOver) -> Result<Vec<Json>, String> {
    match map {
        MapOver::No => Ok(Vec::new()),
        MapOver::Input => input
            .elements()
            .ok_or_else(|| format!("`map = true` needs a list as input, got {}", input.kind())),
        MapOver::Fields(fields) => zip_fields(input, fields),
    }
}

/// Split an object input into child inputs by zipping the list-valued `fields`.
fn zip_fields(input: &Json, fields: &[String]) -> Result<Vec<Json>, String> {
    let Some(obj) = input.fields() else {
        return Err(format!(
            "mapping over fields needs an object input, got {}",
            input.kind()
        ));
    };
    let mut lists: Vec<(usize, Vec<Json>)> = Vec::with_capacity(fields.len());
    let mut len = None;
    for f in fields {
        let Some(k) = obj.iter().position(|(name, _)| name == f) else {
            return Err(format!("mapped field `{f}` must be a list, got nothing"));
        };
        let Some(items) = obj[k].1.elements() else {
            return Err(format!(
                "mapped field `{f}` must be a list, got {}",
                obj[k].1.kind()
            ));
        };
        match len {
            None => len = Some(items.len()),
            Some(n) if n != items.len() => {
                return Err(format!(
                    "mapped fields have different lengths: `{f}` has {}, others {n}",
                    items.len()
                ));
            }
            Some(_) => {}
        }
        lists.push((k, items));
    }
    Ok((0..len.unwrap_or(0))
        .map(|i| {
            let mut child = obj.clone();
            for (k, items) in &lists {
                child[*k].1 = items[i].clone();
            }
            Json::object(child)
        })
        .collect())
}
