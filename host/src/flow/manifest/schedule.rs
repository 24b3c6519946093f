//! The `[schedule]` table of a manifest (what `sluice deploy` registers): a cron pattern with
//! its time zone, or an interval with an optional anchor, the runs' parameters, the catch-up
//! policy and when a run is Late, each checked with its position.

use std::collections::BTreeMap;
use std::str::FromStr as _;

use chrono::{DateTime, TimeDelta, Utc};
use serde::Deserialize;
use toml::Spanned;

use super::ManifestError;
use super::source::Source;
use crate::schedule::{Catchup, DEFAULT_LATE_AFTER, Every, Schedule};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSchedule {
    cron: Option<Spanned<String>>,
    timezone: Option<Spanned<String>>,
    interval: Option<Spanned<String>>,
    anchor: Option<Spanned<toml::Value>>,
    #[serde(default)]
    parameters: BTreeMap<String, Spanned<toml::Value>>,
    catchup: Option<Spanned<toml::Value>>,
    late_after: Option<Spanned<String>>,
}

/// Check `[schedule]` (at `span`) against the flow's `parameters`.
pub(super) fn schedule(
    src: &Source<'_>,
    raw: Spanned<RawSchedule>,
    flow_parameters: &BTreeMap<String, serde_json::Value>,
) -> Result<Schedule, ManifestError> {
    let span = raw.span();
    let raw = raw.into_inner();
    let duration = |s: &Spanned<String>, what: &str| -> Result<TimeDelta, ManifestError> {
        humantime::parse_duration(s.get_ref())
            .map_err(|e| e.to_string())
            .and_then(|d| TimeDelta::from_std(d).map_err(|e| e.to_string()))
            .map_err(|e| {
                src.error(
                    s.span(),
                    format!(
                        "`schedule.{what}` = \"{}\" is not a duration like \"10m\" or \"1h 30m\": {e}",
                        s.get_ref()
                    ),
                )
            })
    };
    let every = match (&raw.cron, &raw.interval) {
        (Some(_), Some(i)) => {
            return Err(src.error(
                i.span(),
                "`[schedule]` takes `cron` or `interval`, not both",
            ));
        }
        (None, None) => {
            return Err(src.error(
                span,
                "`[schedule]` needs `cron` (like \"0 6 * * 1-5\", with `timezone`) or \
                 `interval` (like \"10m\")",
            ));
        }
        (Some(c), None) => {
            if let Some(a) = &raw.anchor {
                return Err(src.error(
                    a.span(),
                    "`schedule.anchor` is for an `interval`; a cron pattern has its own times",
                ));
            }
            let cron = croner::Cron::from_str(c.get_ref()).map_err(|e| {
                src.error(
                    c.span(),
                    format!(
                        "`schedule.cron` = \"{}\" is not a cron pattern like \"0 6 * * 1-5\" \
                         (minute hour day-of-month month day-of-week): {e}",
                        c.get_ref()
                    ),
                )
            })?;
            let timezone = match &raw.timezone {
                None => chrono_tz::UTC,
                Some(z) => chrono_tz::Tz::from_str(z.get_ref()).map_err(|_| {
                    src.error(
                        z.span(),
                        format!(
                            "`schedule.timezone` = \"{}\" is not a time zone of the IANA \
                             database, like \"Europe/Berlin\" or \"UTC\"",
                            z.get_ref()
                        ),
                    )
                })?,
            };
            Every::Cron {
                cron: Box::new(cron),
                timezone,
            }
        }
        (None, Some(i)) => {
            if let Some(z) = &raw.timezone {
                return Err(src.error(
                    z.span(),
                    "`schedule.timezone` is for a `cron` pattern; an interval is in real time",
                ));
            }
            let every = duration(i, "interval")?;
            if every < TimeDelta::seconds(1) {
                return Err(src.error(
                    i.span(),
                    format!(
                        "`schedule.interval` = \"{}\" is shorter than the shortest interval, 1s",
                        i.get_ref()
                    ),
                ));
            }
            let anchor = match &raw.anchor {
                None => None,
                Some(a) => Some(anchor(src, a)?),
            };
            Every::Interval { every, anchor }
        }
    };
    let mut parameters = BTreeMap::new();
    for (name, value) in raw.parameters {
        if !flow_parameters.contains_key(&name) {
            let known: Vec<&str> = flow_parameters.keys().map(String::as_str).collect();
            return Err(src.error(
                value.span(),
                format!(
                    "`schedule.parameters.{name}`: the flow has no parameter `{name}`{}",
                    if known.is_empty() {
                        " (it has none)".to_owned()
                    } else {
                        format!(" (it has {})", known.join(", "))
                    }
                ),
            ));
        }
        parameters.insert(name, super::to_json(value.into_inner()));
    }
    let catchup = match &raw.catchup {
        None => Catchup::default(),
        Some(v) => match v.get_ref() {
            toml::Value::String(s) if s == "all" => Catchup::All,
            toml::Value::String(s) if s == "none" => Catchup::Last(0),
            toml::Value::Integer(n) if u32::try_from(*n).is_ok() => {
                Catchup::Last(u32::try_from(*n).unwrap_or(0))
            }
            other => {
                return Err(src.error(
                    v.span(),
                    format!(
                        "`schedule.catchup` = {other} must be \"none\", \"all\" or how many of \
                         the latest missed runs to start (a number, default 1)"
                    ),
                ));
            }
        },
    };
    let late_after = match &raw.late_after {
        None => DEFAULT_LATE_AFTER,
        Some(d) => duration(d, "late_after")?,
    };
    Ok(Schedule {
        every,
        parameters,
        catchup,
        late_after,
    })
}

/// `anchor`: a TOML date-time with an offset, or the same as an RFC 3339 string.
fn anchor(src: &Source<'_>, v: &Spanned<toml::Value>) -> Result<DateTime<Utc>, ManifestError> {
    let text = match v.get_ref() {
        toml::Value::Datetime(d) => d.to_string(),
        toml::Value::String(s) => s.clone(),
        _ => String::new(),
    };
    DateTime::parse_from_rfc3339(&text)
        .map(|d| d.with_timezone(&Utc))
        .map_err(|_| {
            src.error(
                v.span(),
                format!(
                    "`schedule.anchor` = {} must be a date and time with an offset, like \
                     2026-01-01T06:00:00Z",
                    v.get_ref()
                ),
            )
        })
}
