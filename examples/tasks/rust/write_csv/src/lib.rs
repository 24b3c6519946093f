//! The last step of the http-fetch example (examples/http-fetch): writes a list of flat JSON
//! objects as a CSV file (a header of `columns`, RFC 4180 quoting) at `path`, a path inside a
//! directory the task is granted read-write, through `std::fs`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sluice_guest::{Signal, export_task, info};

#[derive(Deserialize)]
struct Input {
    /// Where to write, e.g. `/out/orders.csv`.
    path: String,
    /// The header, in order; by default the first row's keys (sorted).
    #[serde(default)]
    columns: Option<Vec<String>>,
    /// The rows: objects with exactly these keys, whose values are strings, numbers, booleans or
    /// null.
    rows: Vec<serde_json::Map<String, Value>>,
}

#[derive(Serialize)]
struct Written {
    path: String,
    rows: usize,
    bytes: usize,
}

/// One field, quoted when it holds a comma, a quote or a line break.
fn field(v: &Value) -> Result<String, String> {
    let text = match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => String::new(),
        other => return Err(format!("a nested value ({other}) has no CSV form")),
    };
    Ok(if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text
    })
}

fn run(input: Input) -> Result<Written, Signal> {
    let columns: Vec<String> = match (input.columns, input.rows.first()) {
        (Some(columns), _) => columns,
        (None, Some(first)) => first.keys().cloned().collect(),
        (None, None) => Vec::new(),
    };
    let mut csv = columns.join(",");
    csv.push('\n');
    for (i, row) in input.rows.iter().enumerate() {
        let keys: BTreeMap<&String, &Value> = row.iter().collect();
        if keys.len() != columns.len() || columns.iter().any(|c| !keys.contains_key(c)) {
            return Err(Signal::Fail(format!(
                "row {i} does not have exactly the columns {}",
                columns.join(", ")
            )));
        }
        let fields = columns
            .iter()
            .map(|c| field(&row[c]))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Signal::Fail(format!("row {i}: {e}")))?;
        csv.push_str(&fields.join(","));
        csv.push('\n');
    }
    std::fs::write(&input.path, &csv)
        .map_err(|e| Signal::Fail(format!("cannot write {}: {e}", input.path)))?;
    info!("wrote {} rows to {}", input.rows.len(), input.path);
    Ok(Written {
        path: input.path,
        rows: input.rows.len(),
        bytes: csv.len(),
    })
}

export_task!(run);
