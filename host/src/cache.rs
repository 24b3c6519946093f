//! Output caching ("time travel"): cache policies and cache keys.
//!
//! A task with `cache_for` stores its output when it completes; a later run of the same task
//! (in this process or another) whose key matches, within `cache_for`, takes that output as a
//! Cached state without instantiating the component. The validators follow Prefect 1's
//! `prefect.engine.cache_validators`: `duration_only` (the default), `all_inputs`,
//! `all_parameters`, `partial_inputs_only(names)`, `partial_parameters_only(names)` and
//! `never_use`.
//!
//! Deliberate differences from Prefect, so that a cached output is only ever served where the
//! task would have computed the same thing:
//!
//! - The key always includes the task's *identity*: the blake3 of its component bytes, its name,
//!   its map index, its limits and its capability grants (the sandbox grants none yet, so the
//!   limits are the whole of it). A changed task never returns a stale result; Prefect 1 keys
//!   only by task name and would return the old output of a changed function.
//! - The key always includes the run's *scope* ([`CacheScope`]): the flow's name (or the
//!   `cache_namespace` its manifest names, so flows can share entries deliberately) and every
//!   user context value the task can read (the flow's `[context]` table and `--context`). A
//!   task that reads `context::get("key")` never gets an output computed under another `key`,
//!   and a task of another flow with the same name never gets this one's. The built-in context
//!   keys are left out: `flow_run_id`, `task_run_id`, `attempt` and `scheduled_start` differ in
//!   every run (with them nothing would ever hit), `deployment` would keep a deployment's runs
//!   from a hand-started run's outputs, `task_name` and `map_index` are already part
//!   of the identity, and `parameters` are what the validator chooses to look at (as in
//!   Prefect, `duration_only` ignores them).
//!
//! Values are hashed in their canonical JSON form, the text the host keeps them in
//! ([`Json`]): object keys sorted and no whitespace, but every number exactly as it was written,
//! so `1` and `1.0` are different values (a task may accept one and refuse the other) and
//! `18446744073709551617` stays that integer instead of becoming a float. The canonical form is
//! exactly the text the guest reads (the host sends values in this form) or wrote, up to key
//! order and whitespace, and blobs in the store use it too, so a cached output is replayed
//! exactly as the guest returned it. (The alternative, hashing the raw text the guest wrote,
//! would make key order and whitespace matter.)

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ids::TenantId;
use crate::json::Json;
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
    /// blake3 of the task's limits and map index, and of the run's scope (cache namespace and
    /// context values).
    pub config: String,
    /// The digest of the task's grants ([`Grants::digest`](crate::grants::Grants::digest));
    /// empty when nothing is granted.
    pub grants: String,
    /// The keyed digest of its granted secrets' values; empty without secrets.
    pub secrets: String,
    /// blake3 of the validated inputs (for input validators).
    pub inputs: Option<String>,
    /// blake3 of the validated parameters (for parameter validators).
    pub parameters: Option<String>,
    /// The validator, as written.
    pub validator: String,
}

/// What every cache key of a flow run shares: the flow's cache namespace and the user context
/// values its tasks can read. Computed once per run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheScope {
    hash: String,
}

/// The context key of a run's scheduled start (its slot, for a deployment's run; else when it
/// was created).
pub const SCHEDULED_START: &str = "scheduled_start";

/// The context key naming the deployment that started a run (a server's deployment's runs).
pub const DEPLOYMENT: &str = "deployment";

impl CacheScope {
    /// The scope of a run of flow `flow`, whose manifest may name a cache `namespace`, with the
    /// user context values `context` (the flow's `[context]` and `--context`, without the keys
    /// the runner fills in per run).
    pub fn new(flow: &str, namespace: Option<&str>, context: &BTreeMap<String, String>) -> Self {
        let mut h = blake3::Hasher::new();
        h.update(b"sluice-cache-scope-v1\0");
        let field = |h: &mut blake3::Hasher, s: &str| {
            h.update(&(s.len() as u64).to_le_bytes());
            h.update(s.as_bytes());
        };
        // A namespace and a flow of the same name are different scopes.
        match namespace {
            Some(ns) => {
                field(&mut h, "namespace");
                field(&mut h, ns);
            }
            None => {
                field(&mut h, "flow");
                field(&mut h, flow);
            }
        }
        // `scheduled_start` is a deployment run's slot and `deployment` its deployment: per
        // run, like the other built-in keys (a deployment's runs and a hand-started run share
        // a cache).
        let user = || {
            context
                .iter()
                .filter(|(k, _)| *k != SCHEDULED_START && *k != DEPLOYMENT)
        };
        h.update(&(user().count() as u64).to_le_bytes());
        for (k, v) in user() {
            field(&mut h, k);
            field(&mut h, v);
        }
        Self {
            hash: h.finalize().to_hex().to_string(),
        }
    }

    /// This scope within tenant `tenant` of a server: the same flow, namespace and context in
    /// two tenants are two scopes, so no key of one tenant is ever a key of another.
    pub fn within(self, tenant: TenantId) -> Self {
        let mut h = blake3::Hasher::new();
        h.update(b"sluice-cache-scope-tenant-v1\0");
        h.update(tenant.to_string().as_bytes());
        h.update(self.hash.as_bytes());
        Self {
            hash: h.finalize().to_hex().to_string(),
        }
    }
}

/// What the cache identity of a task depends on, besides its inputs and parameters.
#[derive(Debug, Clone, Copy)]
pub struct TaskIdentity<'a> {
    /// The flow run's scope: cache namespace and context values.
    pub scope: &'a CacheScope,
    /// The task's name.
    pub task: &'a str,
    /// blake3 (hex) of the component's bytes.
    pub component: &'a str,
    /// The task's limits.
    pub budget: &'a RunBudget,
    /// The digest of its grants (empty when nothing is granted).
    pub grants: &'a str,
    /// The keyed digest of its granted secrets' values (empty without secrets).
    pub secrets: &'a str,
    /// For a child of a mapped task, its index.
    pub map_index: Option<u32>,
}

impl CacheKey {
    /// The key of a run of `task` with `input` under `parameters`, or `None` for `never_use`.
    pub fn new(
        policy: &CachePolicy,
        task: TaskIdentity<'_>,
        input: &Json,
        parameters: &BTreeMap<String, Value>,
    ) -> Option<CacheKey> {
        let mut config = blake3::Hasher::new();
        config.update(b"sluice-task-config-v2\0");
        config.update(task.scope.hash.as_bytes());
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
        // The limits that only matter with grants join only with grants, so the keys of tasks
        // without grants stay what they were.
        if !task.grants.is_empty() {
            for n in [
                u64::from(b.http_requests),
                b.http_response_bytes,
                u64::try_from(b.http_connect_timeout.as_micros()).unwrap_or(u64::MAX),
                u64::try_from(b.http_read_timeout.as_micros()).unwrap_or(u64::MAX),
            ] {
                config.update(&n.to_le_bytes());
            }
        }
        let config = config.finalize().to_hex().to_string();
        let (inputs, params) = match &policy.validator {
            CacheValidator::NeverUse => return None,
            CacheValidator::DurationOnly => (None, None),
            CacheValidator::AllInputs => (Some(input.hash()), None),
            CacheValidator::AllParameters => {
                let all = parameters
                    .iter()
                    .map(|(k, v)| (k.clone(), Json::from_value(v)));
                (None, Some(Json::object(all).hash()))
            }
            CacheValidator::PartialInputsOnly(names) => {
                let fields = input.fields().unwrap_or_default();
                let picked = pick(names, |n| {
                    fields.iter().find_map(|(k, v)| (k == n).then(|| v.clone()))
                });
                (Some(picked.hash()), None)
            }
            CacheValidator::PartialParametersOnly(names) => {
                let picked = pick(names, |n| parameters.get(n).map(Json::from_value));
                (None, Some(picked.hash()))
            }
        };
        let mut key = blake3::Hasher::new();
        key.update(b"sluice-cache-key-v1\0");
        // Grants join the key only when there are any: a task without grants keeps the key it
        // had before grants existed.
        let granted = (!task.grants.is_empty())
            .then_some([Some(task.grants), Some(task.secrets)])
            .into_iter()
            .flatten();
        for part in [
            Some(task.task),
            Some(task.component),
            Some(config.as_str()),
            inputs.as_deref(),
            params.as_deref(),
        ]
        .into_iter()
        .chain(granted)
        {
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
            grants: task.grants.to_owned(),
            secrets: task.secrets.to_owned(),
            inputs,
            parameters: params,
            validator,
        })
    }
}

/// `{name: value}` for each of `names`; absent ones are `null` (so absent and `null` match, as in
/// Prefect, where a missing key reads as `None`).
fn pick(names: &[String], get: impl Fn(&str) -> Option<Json>) -> Json {
    Json::object(
        names
            .iter()
            .map(|n| (n.clone(), get(n).unwrap_or_else(Json::null))),
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
    #[serde(default)]
    pub reason: String,
    /// For a hit: the flow run that produced the value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_flow_run: Option<String>,
    /// For a hit: the task run that produced the value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_task_run: Option<String>,
    /// For a hit: until when the entry is valid.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "crate::timestamp::serialize_option"
    )]
    pub expires_at: Option<chrono::DateTime<chrono::Utc>>,
    /// For a hit: when the entry was written.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "crate::timestamp::serialize_option"
    )]
    pub cached_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl CacheInfo {
    /// A hit on the entry `flow_run` and `task_run` wrote at `cached_at`, valid until
    /// `expires_at`, found under `key` with `validator`; its reason names all four.
    pub fn hit(
        key: String,
        validator: String,
        (flow_run, task_run): (String, String),
        cached_at: chrono::DateTime<chrono::Utc>,
        expires_at: chrono::DateTime<chrono::Utc>,
    ) -> CacheInfo {
        let reason = hit_reason(&flow_run, &task_run, &cached_at, &expires_at);
        CacheInfo {
            status: CacheStatus::Hit,
            key,
            validator,
            reason,
            source_flow_run: Some(flow_run),
            source_task_run: Some(task_run),
            expires_at: Some(expires_at),
            cached_at: Some(cached_at),
        }
    }

    /// As the store keeps it: JSON, without a hit's reason (it is derived from the entry it
    /// names, see [`CacheInfo::from_stored`]).
    pub fn to_stored(&self) -> String {
        let derived = self.status == CacheStatus::Hit
            && self.cached_at.is_some()
            && self.source_flow_run.is_some()
            && self.source_task_run.is_some()
            && self.expires_at.is_some();
        let stored = Stored {
            status: self.status,
            key: &self.key,
            validator: &self.validator,
            reason: (!derived).then_some(self.reason.as_str()),
            source_flow_run: self.source_flow_run.as_deref(),
            source_task_run: self.source_task_run.as_deref(),
            expires_at: self.expires_at,
            cached_at: self.cached_at,
        };
        // Strings and timestamps: writing them to memory cannot fail.
        serde_json::to_string(&stored).unwrap_or_default()
    }

    /// Read what [`CacheInfo::to_stored`] wrote (or, before it, the whole record).
    pub fn from_stored(text: &str) -> Result<CacheInfo, serde_json::Error> {
        let mut info: CacheInfo = serde_json::from_str(text)?;
        if info.reason.is_empty() {
            match (
                info.status,
                &info.source_flow_run,
                &info.source_task_run,
                &info.cached_at,
                &info.expires_at,
            ) {
                (CacheStatus::Hit, Some(flow), Some(task), Some(cached), Some(expires)) => {
                    info.reason = hit_reason(flow, task, cached, expires);
                }
                _ => return Err(serde::de::Error::missing_field("reason")),
            }
        }
        Ok(info)
    }
}

/// A hit's reason: the entry it used, when that was written and until when it is valid.
fn hit_reason(
    flow_run: &str,
    task_run: &str,
    cached_at: &chrono::DateTime<chrono::Utc>,
    expires_at: &chrono::DateTime<chrono::Utc>,
) -> String {
    let mut reason = String::with_capacity(160);
    reason.push_str("output of flow run ");
    reason.push_str(flow_run);
    reason.push_str(" (task run ");
    reason.push_str(task_run);
    reason.push_str("), cached at ");
    crate::timestamp::push(&mut reason, cached_at);
    reason.push_str(", valid until ");
    crate::timestamp::push(&mut reason, expires_at);
    reason
}

/// [`CacheInfo`] as stored: its reason only where it cannot be derived.
#[derive(Serialize)]
struct Stored<'a> {
    status: CacheStatus,
    key: &'a str,
    validator: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    source_flow_run: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    source_task_run: Option<&'a str>,
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "crate::timestamp::serialize_option"
    )]
    expires_at: Option<chrono::DateTime<chrono::Utc>>,
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "crate::timestamp::serialize_option"
    )]
    cached_at: Option<chrono::DateTime<chrono::Utc>>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_hit_is_stored_without_its_reason_and_reads_back_whole() {
        let at = |s: &str| s.parse::<chrono::DateTime<chrono::Utc>>().expect("time");
        let hit = CacheInfo::hit(
            "k".repeat(64),
            "all_inputs".into(),
            ("01FLOW".into(), "01TASK".into()),
            at("2030-01-01T00:00:00.5Z"),
            at("2030-01-01T01:00:00Z"),
        );
        assert_eq!(
            hit.reason,
            "output of flow run 01FLOW (task run 01TASK), cached at 2030-01-01T00:00:00.500Z, \
             valid until 2030-01-01T01:00:00Z"
        );
        let stored = hit.to_stored();
        assert!(!stored.contains("reason"), "{stored}");
        assert_eq!(CacheInfo::from_stored(&stored).expect("read"), hit);
        // A miss keeps its reason; so does a record written whole (before compact rows).
        let miss = CacheInfo {
            status: CacheStatus::Miss,
            reason: "the inputs changed".into(),
            source_flow_run: None,
            source_task_run: None,
            expires_at: None,
            cached_at: None,
            ..hit.clone()
        };
        assert_eq!(
            CacheInfo::from_stored(&miss.to_stored()).expect("read"),
            miss
        );
        let whole = serde_json::to_string(&hit).expect("json");
        assert_eq!(CacheInfo::from_stored(&whole).expect("read"), hit);
        // A hit without a reason it could be derived from is refused, naming the field.
        let broken = r#"{"status":"hit","key":"k","validator":"v","source_flow_run":"f"}"#;
        let e = CacheInfo::from_stored(broken).expect_err("no reason");
        assert!(e.to_string().contains("reason"), "{e}");
    }

    fn key(policy: &CachePolicy, input: Value, params: Value) -> Option<CacheKey> {
        let params: BTreeMap<String, Value> =
            serde_json::from_value(params).expect("parameters object");
        let scope = CacheScope::new("f", None, &BTreeMap::new());
        CacheKey::new(
            policy,
            TaskIdentity {
                scope: &scope,
                task: "t",
                component: "c0ffee",
                budget: &RunBudget::default(),
                grants: "",
                secrets: "",
                map_index: None,
            },
            &Json::from_value(&input),
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
            k(AllInputs, json!({"b": 2, "a": 1}), json!({"p": 2}))
        );
        assert_ne!(
            k(AllInputs, json!({"a": 1}), json!({})),
            k(AllInputs, json!({"a": 1.0}), json!({}))
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
        let scope = CacheScope::new("f", None, &BTreeMap::new());
        let base = TaskIdentity {
            scope: &scope,
            task: "t",
            component: "c0ffee",
            budget: &RunBudget::default(),
            grants: "",
            secrets: "",
            map_index: None,
        };
        let k =
            |id: TaskIdentity<'_>| CacheKey::new(&p, id, &json!(1).into(), &params).map(|k| k.key);
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
        let granted = TaskIdentity {
            grants: "g1",
            ..base
        };
        assert_ne!(k(base), k(granted));
        assert_ne!(
            k(granted),
            k(TaskIdentity {
                grants: "g2",
                ..base
            })
        );
        assert_ne!(
            k(granted),
            k(TaskIdentity {
                secrets: "s1",
                ..granted
            })
        );
    }

    #[test]
    fn the_scope_is_always_part_of_the_key() {
        let p = policy(CacheValidator::DurationOnly);
        let params = BTreeMap::new();
        let ctx = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let k = |scope: &CacheScope| {
            let id = TaskIdentity {
                scope,
                task: "t",
                component: "c0ffee",
                budget: &RunBudget::default(),
                grants: "",
                secrets: "",
                map_index: None,
            };
            CacheKey::new(&p, id, &json!(1).into(), &params).map(|k| k.key)
        };
        let abc = ctx(&[("key", "abc")]);
        let base = CacheScope::new("f", None, &abc);
        assert_eq!(k(&base), k(&CacheScope::new("f", None, &abc)));
        // Another context value, another key, one more key: different.
        assert_ne!(
            k(&base),
            k(&CacheScope::new("f", None, &ctx(&[("key", "WRONG")])))
        );
        assert_ne!(
            k(&base),
            k(&CacheScope::new(
                "f",
                None,
                &ctx(&[("key", "abc"), ("x", "")])
            ))
        );
        assert_ne!(k(&base), k(&CacheScope::new("f", None, &ctx(&[]))));
        // Within a tenant: not the scope outside any tenant, nor the scope within another.
        let (t1, t2) = (TenantId::new(), TenantId::new());
        let within = |t| k(&CacheScope::new("f", None, &abc).within(t));
        assert_ne!(within(t1), k(&base));
        assert_ne!(within(t1), within(t2));
        assert_eq!(within(t1), within(t1));
        // Keys and values cannot be shifted into each other.
        assert_ne!(
            k(&CacheScope::new("f", None, &ctx(&[("ab", "c")]))),
            k(&CacheScope::new("f", None, &ctx(&[("a", "bc")])))
        );
        // Another flow: different; a namespace is shared by every flow naming it, and is not
        // the flow of the same name.
        assert_ne!(k(&base), k(&CacheScope::new("g", None, &abc)));
        assert_eq!(
            k(&CacheScope::new("f", Some("ns"), &abc)),
            k(&CacheScope::new("g", Some("ns"), &abc))
        );
        assert_ne!(k(&base), k(&CacheScope::new("x", Some("f"), &abc)));
    }
}
