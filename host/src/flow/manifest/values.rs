//! The values of the task keys that take more than one form (`component`, `map`,
//! `cache_validator`), checked with messages that say what is expected, and the lexical path
//! normalization used for component, source and handler paths.

use std::path::{Path, PathBuf};

use toml::Spanned;

use super::ManifestError;
use super::source::Source;
use crate::cache::CacheValidator;
use crate::flow::{Hint, MapOver};

/// `component` (or a flow's `code`, which also takes the keys in `extra`): a path, or
/// `{ path, build, sources }` (no other keys). `owner` says whose it is in messages ("task
/// `x`").
pub(super) fn component(
    src: &Source<'_>,
    (owner, key): (&str, &str),
    v: &Spanned<toml::Value>,
    extra: &[&str],
) -> Result<(String, Option<String>, Vec<String>), ManifestError> {
    const KEYS: [&str; 3] = ["path", "build", "sources"];
    let err = |message: String| src.error(v.span(), format!("{owner}: {message}"));
    let table = match v.get_ref() {
        toml::Value::String(path) => return Ok((path.clone(), None, Vec::new())),
        toml::Value::Table(t) => t,
        other => {
            return Err(err(format!(
                "`{key}` = {other} must be a path like \"tasks/a.wasm\" or a table like \
                 {{ path = \"tasks/a.wasm\", build = \"make\", sources = [\"src/\"] }}"
            )));
        }
    };
    let known = || KEYS.iter().chain(extra).copied();
    if let Some(unknown) = table.keys().find(|k| !known().any(|n| n == k.as_str())) {
        let names: Vec<String> = known().map(|n| format!("`{n}`")).collect();
        return Err(err(format!(
            "unknown key `{unknown}` in `{key}`{}; expected one of {}",
            Hint::closest(unknown, known()),
            names.join(", ")
        )));
    }
    let string = |k: &str| -> Result<Option<String>, ManifestError> {
        match table.get(k) {
            None => Ok(None),
            Some(toml::Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(err(format!("`{key}.{k}` = {other} must be a string"))),
        }
    };
    let path = string("path")?.ok_or_else(|| {
        err(format!(
            "`{key}` needs `path` (the component file, built by `build` if given)"
        ))
    })?;
    let build = string("build")?;
    let sources = match table.get("sources") {
        None => Vec::new(),
        Some(toml::Value::Array(items)) => items
            .iter()
            .map(|i| {
                i.as_str().map(str::to_owned).ok_or_else(|| {
                    err(format!(
                        "`{key}.sources` takes a list of paths (strings), not {i}"
                    ))
                })
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(err(format!(
                "`{key}.sources` = {other} must be a list of paths, like [\"src/\"]"
            )));
        }
    };
    Ok((path, build, sources))
}

/// A size: a string like `example` (`64MiB`) or a number of bytes; `what` names the key.
pub(super) fn size(
    src: &Source<'_>,
    what: &str,
    v: &Spanned<toml::Value>,
    example: &str,
) -> Result<u64, ManifestError> {
    let bad = |detail: String| {
        src.error(
            v.span(),
            format!(
                "{what} = {} must be a size like \"{example}\" or a number of bytes{detail}",
                v.get_ref()
            ),
        )
    };
    match v.get_ref() {
        toml::Value::Integer(n) if *n >= 0 => Ok(n.unsigned_abs()),
        toml::Value::String(t) => t
            .parse::<bytesize::ByteSize>()
            .map(|b| b.as_u64())
            .map_err(|e| bad(format!(": {e}"))),
        _ => Err(bad(String::new())),
    }
}

/// `map`: `true`, `false`, or a list of field names.
pub(super) fn map_over(
    src: &Source<'_>,
    task: &str,
    v: &Spanned<toml::Value>,
) -> Result<MapOver, ManifestError> {
    let err = || {
        src.error(
            v.span(),
            format!(
                "task `{task}`: `map` = {} must be true (one run per element of the input \
                 list), false, or a list of field names like [\"x\"]",
                v.get_ref()
            ),
        )
    };
    match v.get_ref() {
        toml::Value::Boolean(false) => Ok(MapOver::No),
        toml::Value::Boolean(true) => Ok(MapOver::Input),
        toml::Value::Array(items) => items
            .iter()
            .map(|i| i.as_str().map(str::to_owned).ok_or_else(err))
            .collect::<Result<_, _>>()
            .map(MapOver::Fields),
        _ => Err(err()),
    }
}

/// `path` with `.` and `..` components resolved lexically (without looking at the file system,
/// so the file need not exist yet): `flows/x/../build/a.wasm` is `flows/build/a.wasm`. A `..`
/// that would climb above the start of a relative path is kept.
pub fn normalize(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out: Vec<Component<'_>> = Vec::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => match out.last() {
                Some(Component::Normal(_)) => {
                    out.pop();
                }
                // The parent of the root is the root.
                Some(Component::RootDir | Component::Prefix(_)) => {}
                _ => out.push(c),
            },
            _ => out.push(c),
        }
    }
    if out.is_empty() {
        return PathBuf::from(".");
    }
    out.iter().collect()
}

/// `cache_validator`: a name, or `{ partial_inputs_only = [...] }` /
/// `{ partial_parameters_only = [...] }`.
pub(super) fn cache_validator(
    src: &Source<'_>,
    task: &str,
    v: &Spanned<toml::Value>,
) -> Result<CacheValidator, ManifestError> {
    const NAMES: [&str; 6] = [
        "duration_only",
        "all_inputs",
        "all_parameters",
        "never_use",
        "partial_inputs_only",
        "partial_parameters_only",
    ];
    let err = |message: String| src.error(v.span(), format!("task `{task}`: {message}"));
    let names = |list: &toml::Value, key: &str| -> Result<Vec<String>, ManifestError> {
        let items = list.as_array().ok_or_else(|| {
            err(format!(
                "`{key}` takes a list of names, like {key} = [\"x\"]"
            ))
        })?;
        items
            .iter()
            .map(|i| {
                i.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| err(format!("`{key}` takes a list of names (strings)")))
            })
            .collect()
    };
    match v.get_ref() {
        toml::Value::String(s) => match s.as_str() {
            "duration_only" => Ok(CacheValidator::DurationOnly),
            "all_inputs" => Ok(CacheValidator::AllInputs),
            "all_parameters" => Ok(CacheValidator::AllParameters),
            "never_use" => Ok(CacheValidator::NeverUse),
            "partial_inputs_only" | "partial_parameters_only" => Err(err(format!(
                "`{s}` needs the names to validate: cache_validator = {{ {s} = [\"x\"] }}"
            ))),
            other => Err(err(format!(
                "unknown cache_validator `{other}`{}; expected one of {}",
                Hint::closest(other, NAMES),
                NAMES.join(", ")
            ))),
        },
        toml::Value::Table(t) if t.len() == 1 => {
            let (k, list) = t.iter().next().ok_or_else(|| err("empty table".into()))?;
            match k.as_str() {
                "partial_inputs_only" => Ok(CacheValidator::PartialInputsOnly(names(list, k)?)),
                "partial_parameters_only" => {
                    Ok(CacheValidator::PartialParametersOnly(names(list, k)?))
                }
                other => Err(err(format!(
                    "unknown cache_validator `{other}`{}; the table form is {{ partial_inputs_only = [...] }} or {{ partial_parameters_only = [...] }}",
                    Hint::closest(other, NAMES)
                ))),
            }
        }
        _ => Err(err(
            "`cache_validator` is a name like \"all_inputs\" or a table like { partial_inputs_only = [\"x\"] }".into(),
        )),
    }
}
