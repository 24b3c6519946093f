//! Output caching ("time travel"): cache policies, the canonical JSON form that values are hashed
//! in, and cache keys.
//!
//! A task with `cache_for` stores its output when it completes; a later run of the same task
//! (in this process or another) whose key matches, within `cache_for`, takes that output as a
//! Cached state without instantiating the component. The validators follow Prefect 1's
//! `prefect.engine.cache_validators`: `duration_only` (the default), `all_inputs`,
//! `all_parameters`, `partial_inputs_only(names)`, `partial_parameters_only(names)` and
//! `never_use`.
//!
//! One deliberate difference from Prefect: the key always includes the task's *identity* — the
//! blake3 of its component bytes, its name, its map index, its limits and its capability grants
//! (the sandbox grants none yet, so the limits are the whole of it) — so a changed task never
//! returns a stale result. Prefect 1 keys only by task name and would return the old output of a
//! changed function.
//!
//! Values are hashed in a canonical JSON form ([`canonical`]): object keys sorted, numbers
//! normalized (`1`, `1.0` and `-0.0`/`0` are equal), no whitespace; so equal values hit
//! regardless of key order or number spelling. Blobs in the store use the same form.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::sandbox::RunBudget;

/// How a cached output is validated (Prefect 1's cache validators).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheValidator {
    /// Never use a cached output (outputs are not stored either).
    NeverUse,
    /// Valid for `cache_for`, whatever the inputs and parameters.
    DurationOnly,
    /// Valid while the task's whole input is equal.
    AllInputs,
    /// Valid while every flow parameter is equal.
    AllParameters,
    /// Valid while these fields of the task's (object) input are equal.
    PartialInputsOnly(Vec<String>),
    /// Valid while these flow parameters are equal.
    PartialParametersOnly(Vec<String>),
}

impl CacheValidator {
    /// The validator's name, as written in manifests.
    pub fn name(&self) -> &'static str {
        match self {
            CacheValidator::NeverUse => "never_use",
            CacheValidator::DurationOnly => "duration_only",
            CacheValidator::AllInputs => "all_inputs",
            CacheValidator::AllParameters => "all_parameters",
            CacheValidator::PartialInputsOnly(_) => "partial_inputs_only",
            CacheValidator::PartialParametersOnly(_) => "partial_parameters_only",
        }
    }
}

impl fmt::Display for CacheValidator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CacheValidator::PartialInputsOnly(n) | CacheValidator::PartialParametersOnly(n) => {
                write!(f, "{}({})", self.name(), n.join(", "))
            }
            _ => f.write_str(self.name()),
        }
    }
}

/// A task's output caching: how long, and under which validator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachePolicy {
    /// How long a stored output stays valid.
    pub cache_for: Duration,
    /// What else must match.
    pub validator: CacheValidator,
}

/// The key a task run's output is cached under, with its parts kept apart so that a miss can
/// say which part changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheKey {
    /// The lookup key: blake3 over every part below and the validator.
    pub key: String,
    /// The task's name.
    pub task: String,
    /// blake3 of the component's bytes.
    pub component: String,
    /// blake3 of the task's limits, capability grants and map index.
    pub config: String,
    /// blake3 of the validated inputs (for input validators).
    pub inputs: Option<String>,
    /// blake3 of the validated parameters (for parameter validators).
    pub parameters: Option<String>,
    /// The validator, as written.
    pub validator: String,
}

/// What the cache identity of a task depends on, besides its inputs and parameters.
#[derive(Debug, Clone, Copy)]
pub struct TaskIdentity<'a> {
    /// The task's name.
    pub task: &'a str,
    /// blake3 (hex) of the component's bytes.
    pub component: &'a str,
    /// The task's limits.
    pub budget: &'a RunBudget,
    /// For a child of a mapped task, its index.
    pub map_index: Option<u32>,
}

impl CacheKey {
    /// The key of a run of `task` with `input` under `parameters`, or `None` for `never_use`.
    pub fn new(
        policy: &CachePolicy,
        task: TaskIdentity<'_>,
        input: &Value,
        parameters: &BTreeMap<String, Value>,
    ) -> Option<CacheKey> {
        let mut config = blake3::Hasher::new();
        // The sandbox grants no capabilities (deny-all), so the limits are the whole grant set;
        // grants added later are hashed here.
        config.update(b"sluice-task-config-v1\0");
        let b = task.budget;
        for n in [
            b.fuel.map_or(u64::MAX, |f| f),
            u64::try_from(b.timeout.as_micros()).unwrap_or(u64::MAX),
            b.memory_bytes,
            b.table_elements,
            u64::from(b.instances),
            b.output_bytes,
            b.log_bytes,
            b.host_call_bytes,
            task.map_index.map_or(u64::MAX, u64::from),
        ] {
            config.update(&n.to_le_bytes());
        }
        let config = config.finalize().to_hex().to_string();
        let (inputs, params) = match &policy.validator {
            CacheValidator::NeverUse => return None,
            CacheValidator::DurationOnly => (None, None),
            CacheValidator::AllInputs => (Some(hash(input)), None),
            CacheValidator::AllParameters => {
                let all: serde_json::Map<String, Value> = parameters
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                (None, Some(hash(&Value::Object(all))))
            }
            CacheValidator::PartialInputsOnly(names) => {
                let picked = pick(names, |n| input.as_object().and_then(|o| o.get(n)));
                (Some(hash(&picked)), None)
            }
            CacheValidator::PartialParametersOnly(names) => {
                let picked = pick(names, |n| parameters.get(n));
                (None, Some(hash(&picked)))
            }
        };
        let mut key = blake3::Hasher::new();
        key.update(b"sluice-cache-key-v1\0");
        for part in [
            Some(task.task),
            Some(task.component),
            Some(config.as_str()),
            inputs.as_deref(),
            params.as_deref(),
        ] {
            match part {
                Some(p) => {
                    key.update(&(p.len() as u64).to_le_bytes());
                    key.update(p.as_bytes());
                }
                None => {
                    key.update(&u64::MAX.to_le_bytes());
                }
            }
        }
        let validator = policy.validator.to_string();
        key.update(validator.as_bytes());
        Some(CacheKey {
            key: key.finalize().to_hex().to_string(),
            task: task.task.to_owned(),
            component: task.component.to_owned(),
            config,
            inputs,
            parameters: params,
            validator,
        })
    }
}

/// `{name: value}` for each of `names`; absent ones are `null` (so absent and `null` match, as in
/// Prefect, where a missing key reads as `None`).
fn pick<'v>(names: &[String], get: impl Fn(&str) -> Option<&'v Value>) -> Value {
    Value::Object(
        names
            .iter()
            .map(|n| (n.clone(), get(n).cloned().unwrap_or(Value::Null)))
            .collect(),
    )
}

/// Why a task run did or did not use a cached output (shown by `sluice show`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheInfo {
    /// `hit` or `miss`.
    pub status: CacheStatus,
    /// The key looked up.
    pub key: String,
    /// The validator.
    pub validator: String,
    /// Why: which entry was used, or what differed from the newest entry of the task.
    pub reason: String,
    /// For a hit: the flow run that produced the value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_flow_run: Option<String>,
    /// For a hit: the task run that produced the value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_task_run: Option<String>,
    /// For a hit: until when the entry is valid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// Whether the cache was used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheStatus {
    /// A valid entry was found and its output used.
    Hit,
    /// No valid entry: the task ran.
    Miss,
}

/// blake3 (hex) of `value`'s canonical form.
pub fn hash(value: &Value) -> String {
    let mut hasher = blake3::Hasher::new();
    let mut buf = Vec::new();
    canonical(value, &mut buf);
    hasher.update(&buf);
    hasher.finalize().to_hex().to_string()
}

/// Append the canonical JSON form of `value` to `out`: object keys sorted by their bytes, no
/// whitespace, integral numbers written as integers (`1.0` → `1`, `-0.0` → `0`), other numbers in
/// their shortest round-trip form, strings escaped as JSON does.
pub fn canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => number(n, out),
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

fn number(n: &serde_json::Number, out: &mut Vec<u8>) {
    use std::io::Write as _;
    if let Some(i) = n.as_i64() {
        let _ = write!(out, "{i}");
    } else if let Some(u) = n.as_u64() {
        let _ = write!(out, "{u}");
    } else if let Some(f) = n.as_f64() {
        // 2^63: integral floats below it are written as the integer they equal.
        const LIMIT: f64 = 9_223_372_036_854_775_808.0;
        if f.fract() == 0.0 && f.abs() < LIMIT {
            #[allow(clippy::cast_possible_truncation)]
            let i = f as i64;
            let _ = write!(out, "{i}");
        } else {
            // Rust's float Display is the shortest form that round-trips.
            let _ = write!(out, "{f}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn text(v: &Value) -> String {
        let mut out = Vec::new();
        canonical(v, &mut out);
        String::from_utf8(out).expect("utf-8")
    }

    #[test]
    fn canonical_form_sorts_keys_and_normalizes_numbers() {
        let a: Value =
            serde_json::from_str(r#"{"b": [1.0, -0.0, 2.5], "a": {"y": 1, "x": "é\n"}}"#)
                .expect("json");
        assert_eq!(text(&a), r#"{"a":{"x":"é\n","y":1},"b":[1,0,2.5]}"#);
        let b: Value = serde_json::from_str(r#"{"a": {"x": "é\n", "y": 1.0}, "b": [1, 0, 2.5]}"#)
            .expect("json");
        assert_eq!(hash(&a), hash(&b));
        assert_ne!(hash(&json!(1)), hash(&json!("1")));
        assert_ne!(hash(&json!([1, 2])), hash(&json!([2, 1])));
        assert_eq!(text(&json!(1e300)), format!("{}", 1e300_f64));
        assert_eq!(text(&json!(u64::MAX)), u64::MAX.to_string());
    }

    fn key(policy: &CachePolicy, input: Value, params: Value) -> Option<CacheKey> {
        let params: BTreeMap<String, Value> =
            serde_json::from_value(params).expect("parameters object");
        CacheKey::new(
            policy,
            TaskIdentity {
                task: "t",
                component: "c0ffee",
                budget: &RunBudget::default(),
                map_index: None,
            },
            &input,
            &params,
        )
    }

    fn policy(validator: CacheValidator) -> CachePolicy {
        CachePolicy {
            cache_for: Duration::from_secs(60),
            validator,
        }
    }

    #[test]
    fn each_validator_keys_on_what_it_validates() {
        use CacheValidator::*;
        let k = |v: CacheValidator, i: Value, p: Value| key(&policy(v), i, p).map(|k| k.key);
        // duration_only ignores inputs and parameters.
        assert_eq!(
            k(DurationOnly, json!(1), json!({"p": 1})),
            k(DurationOnly, json!(2), json!({"p": 2}))
        );
        // all_inputs: the input, not the parameters.
        assert_eq!(
            k(AllInputs, json!({"a": 1, "b": 2}), json!({"p": 1})),
            k(AllInputs, json!({"b": 2, "a": 1.0}), json!({"p": 2}))
        );
        assert_ne!(
            k(AllInputs, json!(1), json!({})),
            k(AllInputs, json!(2), json!({}))
        );
        // all_parameters: the parameters, not the input.
        assert_eq!(
            k(AllParameters, json!(1), json!({"p": 1})),
            k(AllParameters, json!(2), json!({"p": 1}))
        );
        assert_ne!(
            k(AllParameters, json!(1), json!({"p": 1})),
            k(AllParameters, json!(1), json!({"p": 2}))
        );
        // partial: only the named fields.
        let only_a = || PartialInputsOnly(vec!["a".into()]);
        assert_eq!(
            k(only_a(), json!({"a": 1, "b": 1}), json!({})),
            k(only_a(), json!({"a": 1, "b": 2}), json!({}))
        );
        assert_ne!(
            k(only_a(), json!({"a": 1}), json!({})),
            k(only_a(), json!({"a": 2}), json!({}))
        );
        let only_p = || PartialParametersOnly(vec!["p".into()]);
        assert_eq!(
            k(only_p(), json!(0), json!({"p": 1, "q": 1})),
            k(only_p(), json!(0), json!({"p": 1, "q": 2}))
        );
        assert_ne!(
            k(only_p(), json!(0), json!({"p": 1})),
            k(only_p(), json!(0), json!({"p": 2}))
        );
        // Different validators never share entries.
        assert_ne!(
            k(DurationOnly, json!(1), json!({})),
            k(AllInputs, json!(1), json!({}))
        );
        assert_eq!(k(NeverUse, json!(1), json!({})), None);
    }

    #[test]
    fn the_identity_is_always_part_of_the_key() {
        let p = policy(CacheValidator::DurationOnly);
        let params = BTreeMap::new();
        let base = TaskIdentity {
            task: "t",
            component: "c0ffee",
            budget: &RunBudget::default(),
            map_index: None,
        };
        let k = |id: TaskIdentity<'_>| CacheKey::new(&p, id, &json!(1), &params).map(|k| k.key);
        let other_budget = RunBudget {
            fuel: Some(1),
            ..RunBudget::default()
        };
        assert_ne!(k(base), k(TaskIdentity { task: "u", ..base }));
        assert_ne!(
            k(base),
            k(TaskIdentity {
                component: "decade",
                ..base
            })
        );
        assert_ne!(
            k(base),
            k(TaskIdentity {
                budget: &other_budget,
                ..base
            })
        );
        assert_ne!(
            k(base),
            k(TaskIdentity {
                map_index: Some(0),
                ..base
            })
        );
    }
}
