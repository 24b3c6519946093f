//! Deployments' schedules: when a deployment's runs are due (a cron pattern in a named time zone,
//! or a fixed interval), and what the scheduler does about them at one instant ([`plan`]): which
//! slots to record ahead, which are Late, which to start and which a catch-up policy skips. No
//! I/O and no clock: the time is an argument, so the server's deployments (which execute the
//! plan) and the tests (with a `SimClock`) share these rules.
//!
//! The rules, after Prefect's states (seed 003):
//! - A deployment's slots are recorded ahead as **Scheduled** runs: every slot of the next
//!   [`AHEAD`] and at least the next [`AHEAD_SLOTS`] slots (at most [`MAX_RECORDED`] per plan).
//!   A paused deployment records none.
//! - A slot is due when its time has come; it starts at once unless its deployment is paused or
//!   a quota of the tenant holds it (it waits, and starts when the quota allows). A due slot not
//!   started `late_after` (default 15 s) after its time is **Late**.
//! - A slot is *missed* when its time passed while nothing could start it: the server was not
//!   running, or the deployment was paused. When the scheduler begins (the server starts) and
//!   when a deployment is resumed, `catchup` decides what happens to the slots more than
//!   `late_after` overdue: `all` starts each of them, oldest first; `none` starts none; a number
//!   N starts the last N (the default is 1: the latest missed slot runs once). A skipped slot
//!   that was recorded ends **Cancelled**; one that was never recorded is not recorded.
//! - Each slot starts at most once: slots are recorded by time, so a slot recorded before a
//!   restart is the same slot after it.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::Value;

/// Slots of the next hour are recorded ahead.
pub const AHEAD: TimeDelta = TimeDelta::hours(1);
/// At least this many future slots are recorded ahead.
pub const AHEAD_SLOTS: usize = 3;
/// The most slots one plan records (catching up on many missed slots takes several plans).
pub const MAX_RECORDED: usize = 100;
/// The default `late_after`.
pub const DEFAULT_LATE_AFTER: TimeDelta = TimeDelta::seconds(15);

/// A deployment's schedule (a manifest's `[schedule]` table).
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    /// When its slots are.
    pub every: Every,
    /// The parameters of its runs (over the flow's defaults).
    pub parameters: BTreeMap<String, Value>,
    /// What happens to missed slots.
    pub catchup: Catchup,
    /// How long after its time a slot that has not started is Late.
    pub late_after: TimeDelta,
}

/// When a schedule's slots are.
#[derive(Debug, Clone, PartialEq)]
pub enum Every {
    /// The times matching a cron pattern in a time zone (five fields, or six with seconds).
    /// Across a daylight saving change, a slot in the skipped hour runs just after the gap and a
    /// slot in the repeated hour runs once, when its wall-clock time first comes (croner's rules
    /// for fixed-time patterns; patterns with `*` or steps run on each matching instant).
    Cron {
        /// The pattern.
        cron: Box<croner::Cron>,
        /// Its time zone.
        timezone: chrono_tz::Tz,
    },
    /// `anchor + k × every` for every whole k: from the manifest's `anchor`, else from the time
    /// the deployment was created.
    Interval {
        /// The interval (at least one second).
        every: TimeDelta,
        /// The anchor, when the manifest gives one.
        anchor: Option<DateTime<Utc>>,
    },
}

/// What happens to slots missed while the server was down or the deployment paused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Catchup {
    /// Each missed slot runs, oldest first.
    All,
    /// The last N missed slots run (0: none).
    Last(u32),
}

impl Default for Catchup {
    /// The last missed slot runs once.
    fn default() -> Self {
        Catchup::Last(1)
    }
}

impl fmt::Display for Catchup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Catchup::All => f.write_str("all"),
            Catchup::Last(0) => f.write_str("none"),
            Catchup::Last(n) => write!(f, "last {n}"),
        }
    }
}

impl fmt::Display for Every {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Every::Cron { cron, timezone } => write!(f, "cron \"{}\" ({timezone})", cron.as_str()),
            Every::Interval { every, .. } => match every.to_std() {
                Ok(d) => write!(f, "every {}", humantime::format_duration(d)),
                Err(_) => write!(f, "every {every}"),
            },
        }
    }
}

impl Every {
    /// The first slot strictly after `t` (`anchor`: the deployment's creation, for an interval
    /// without its own). `None` past the year 5000.
    pub fn next_after(&self, t: DateTime<Utc>, anchor: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Every::Cron { cron, timezone } => cron
                .find_next_occurrence(&t.with_timezone(timezone), false)
                .ok()
                .map(|d| d.with_timezone(&Utc)),
            Every::Interval { every, anchor: a } => {
                let (anchor, step) = (a.unwrap_or(anchor), every.num_microseconds()?);
                if t < anchor {
                    return Some(anchor);
                }
                let k = (t - anchor).num_microseconds()?.checked_div(step)?;
                anchor.checked_add_signed(TimeDelta::microseconds(
                    k.checked_add(1)?.checked_mul(step)?,
                ))
            }
        }
    }

    /// The last slot at or before `t`, if any.
    pub fn last_at_or_before(
        &self,
        t: DateTime<Utc>,
        anchor: DateTime<Utc>,
    ) -> Option<DateTime<Utc>> {
        match self {
            Every::Cron { cron, timezone } => cron
                .find_previous_occurrence(&t.with_timezone(timezone), true)
                .ok()
                .map(|d| d.with_timezone(&Utc)),
            Every::Interval { every, anchor: a } => {
                let (anchor, step) = (a.unwrap_or(anchor), every.num_microseconds()?);
                if t < anchor {
                    return None;
                }
                let k = (t - anchor).num_microseconds()?.checked_div(step)?;
                anchor.checked_add_signed(TimeDelta::microseconds(k.checked_mul(step)?))
            }
        }
    }
}

/// A recorded slot that has not started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenSlot {
    /// Its time.
    pub at: DateTime<Utc>,
    /// Whether it is recorded Late already.
    pub late: bool,
}

/// What the scheduler knows of a deployment when it plans.
#[derive(Debug, Clone, Copy)]
pub struct PlanInput<'a> {
    /// The interval anchor when the schedule has none (the deployment's creation).
    pub anchor: DateTime<Utc>,
    /// Every slot at or before this time is recorded (or was skipped).
    pub planned_through: DateTime<Utc>,
    /// Whether the deployment is paused.
    pub paused: bool,
    /// Whether to apply the catch-up policy: the first plan after the server started, or after
    /// the deployment was resumed.
    pub catching_up: bool,
    /// Its recorded slots that have not started.
    pub open: &'a [OpenSlot],
}

/// What to do now, in this order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Record these new slots (Scheduled), oldest first.
    pub record: Vec<DateTime<Utc>>,
    /// Recorded slots the catch-up policy skips: they end Cancelled.
    pub skip: Vec<DateTime<Utc>>,
    /// Slots (recorded before or now) that become Late.
    pub late: Vec<DateTime<Utc>>,
    /// Slots to start now, oldest first (start them in order; stop at the first a quota holds).
    pub start: Vec<DateTime<Utc>>,
    /// The new `planned_through`.
    pub planned_through: DateTime<Utc>,
}

/// Plan `schedule` at `now` (see the module's rules).
pub fn plan(schedule: &Schedule, input: &PlanInput<'_>, now: DateTime<Utc>) -> Plan {
    let every = &schedule.every;
    let cutoff = now - schedule.late_after;
    let mut open: BTreeMap<DateTime<Utc>, bool> =
        input.open.iter().map(|s| (s.at, s.late)).collect();
    let mut plan = Plan {
        planned_through: input.planned_through,
        ..Plan::default()
    };
    if input.catching_up
        && !input.paused
        && let Catchup::Last(keep) = schedule.catchup
    {
        // The missed slots: recorded ones past the cutoff, and unrecorded ones up to it (only
        // the last `keep` of those are looked for: a long outage is not enumerated).
        let mut missed: Vec<(DateTime<Utc>, bool)> =
            open.range(..=cutoff).map(|(at, _)| (*at, true)).collect();
        let mut t = cutoff;
        for _ in 0..keep {
            match every.last_at_or_before(t, input.anchor) {
                Some(s) if s > plan.planned_through => {
                    missed.push((s, false));
                    t = s - TimeDelta::microseconds(1);
                }
                _ => break,
            }
        }
        missed.sort_unstable_by_key(|m| std::cmp::Reverse(m.0));
        for (i, (at, recorded)) in missed.into_iter().enumerate() {
            match (i < keep as usize, recorded) {
                (true, false) => {
                    plan.record.push(at);
                    open.insert(at, false);
                }
                (false, true) => {
                    plan.skip.push(at);
                    open.remove(&at);
                }
                _ => {}
            }
        }
        plan.record.sort_unstable();
        plan.planned_through = plan.planned_through.max(cutoff);
    }
    if !input.paused {
        let mut future = open.range(now..).filter(|(at, _)| **at > now).count();
        while plan.record.len() < MAX_RECORDED {
            let Some(s) = every.next_after(plan.planned_through, input.anchor) else {
                break;
            };
            if s > now + AHEAD && future >= AHEAD_SLOTS {
                break;
            }
            plan.record.push(s);
            open.insert(s, false);
            plan.planned_through = s;
            if s > now {
                future += 1;
            }
        }
    }
    for (at, late) in &open {
        if *at > now {
            break;
        }
        if *at < cutoff && !late {
            plan.late.push(*at);
        }
        if !input.paused {
            plan.start.push(*at);
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone as _;
    use std::str::FromStr as _;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("test time")
            .with_timezone(&Utc)
    }

    fn cron(pattern: &str, tz: &str) -> Every {
        Every::Cron {
            cron: Box::new(croner::Cron::from_str(pattern).expect("pattern")),
            timezone: tz.parse().expect("zone"),
        }
    }

    fn interval(secs: i64) -> Schedule {
        Schedule {
            every: Every::Interval {
                every: TimeDelta::seconds(secs),
                anchor: None,
            },
            parameters: BTreeMap::new(),
            catchup: Catchup::default(),
            late_after: DEFAULT_LATE_AFTER,
        }
    }

    fn slots(every: &Every, from: DateTime<Utc>, n: usize) -> Vec<String> {
        let mut out = Vec::new();
        let mut at = from;
        for _ in 0..n {
            at = every.next_after(at, from).expect("a next slot");
            out.push(at.to_rfc3339());
        }
        out
    }

    #[test]
    fn a_daily_cron_keeps_its_wall_clock_time_across_both_dst_changes() {
        let every = cron("0 6 * * *", "Europe/Berlin");
        // Berlin springs forward on 2026-03-29 (UTC+1 to UTC+2) and falls back on 2026-10-25.
        assert_eq!(
            slots(&every, t("2026-03-27T12:00:00Z"), 3),
            [
                "2026-03-28T05:00:00+00:00",
                "2026-03-29T04:00:00+00:00",
                "2026-03-30T04:00:00+00:00"
            ]
        );
        assert_eq!(
            slots(&every, t("2026-10-24T12:00:00Z"), 2),
            ["2026-10-25T05:00:00+00:00", "2026-10-26T05:00:00+00:00"]
        );
    }

    #[test]
    fn a_slot_in_the_skipped_hour_runs_after_the_gap_and_one_in_the_repeated_hour_runs_once() {
        let every = cron("30 2 * * *", "America/New_York");
        // 2026-03-08 02:30 does not exist in New York: the slot is 03:00 EDT (07:00 UTC).
        assert_eq!(
            slots(&every, t("2026-03-07T12:00:00Z"), 2),
            ["2026-03-08T07:00:00+00:00", "2026-03-09T06:30:00+00:00"]
        );
        // 2026-11-01 01:30 happens twice in New York; `30 1 * * *` runs on its first pass only.
        let every = cron("30 1 * * *", "America/New_York");
        assert_eq!(
            slots(&every, t("2026-10-31T12:00:00Z"), 2),
            ["2026-11-01T05:30:00+00:00", "2026-11-02T06:30:00+00:00"]
        );
    }

    #[test]
    fn weekdays_at_six_in_a_named_zone() {
        let every = cron("0 6 * * 1-5", "Asia/Tokyo");
        // Thursday 2026-12-03 21:00 JST: Friday 06:00 JST, then (no weekend) Monday and Tuesday.
        assert_eq!(
            slots(&every, t("2026-12-03T12:00:00Z"), 3),
            [
                "2026-12-03T21:00:00+00:00",
                "2026-12-06T21:00:00+00:00",
                "2026-12-07T21:00:00+00:00"
            ]
        );
    }

    #[test]
    fn interval_slots_are_counted_from_the_anchor() {
        let every = Every::Interval {
            every: TimeDelta::minutes(10),
            anchor: Some(
                Utc.with_ymd_and_hms(2026, 1, 1, 0, 5, 0)
                    .single()
                    .expect("time"),
            ),
        };
        let now = t("2026-12-01T10:17:00Z");
        assert_eq!(every.next_after(now, now), Some(t("2026-12-01T10:25:00Z")));
        assert_eq!(
            every.last_at_or_before(now, now),
            Some(t("2026-12-01T10:15:00Z"))
        );
        assert_eq!(
            every.last_at_or_before(t("2026-12-01T10:15:00Z"), now),
            Some(t("2026-12-01T10:15:00Z"))
        );
    }

    fn input<'a>(anchor: DateTime<Utc>, open: &'a [OpenSlot]) -> PlanInput<'a> {
        PlanInput {
            anchor,
            planned_through: anchor,
            paused: false,
            catching_up: false,
            open,
        }
    }

    #[test]
    fn a_new_deployment_records_the_next_hour_ahead_and_starts_nothing_yet() {
        let s = interval(600);
        let now = t("2026-12-01T10:00:00Z");
        let p = plan(&s, &input(now, &[]), now);
        assert_eq!(p.record.len(), 6, "10:10 … 11:00");
        assert_eq!(p.record[0], t("2026-12-01T10:10:00Z"));
        assert_eq!(p.planned_through, t("2026-12-01T11:00:00Z"));
        assert!(p.start.is_empty() && p.late.is_empty() && p.skip.is_empty());
        // A daily slot: at least three are recorded, though they are days ahead.
        let daily = Schedule {
            every: cron("0 6 * * *", "UTC"),
            ..interval(1)
        };
        assert_eq!(
            plan(&daily, &input(now, &[]), now).record.len(),
            AHEAD_SLOTS
        );
    }

    #[test]
    fn a_due_slot_starts_and_turns_late_only_after_late_after() {
        let s = interval(600);
        let anchor = t("2026-12-01T10:00:00Z");
        let open = [OpenSlot {
            at: t("2026-12-01T10:10:00Z"),
            late: false,
        }];
        let mut i = input(anchor, &open);
        i.planned_through = t("2026-12-01T11:00:00Z");
        let on_time = plan(&s, &i, t("2026-12-01T10:10:15Z"));
        assert_eq!(on_time.start, [open[0].at]);
        assert!(on_time.late.is_empty(), "15 s late is not Late");
        let late = plan(&s, &i, t("2026-12-01T10:10:16Z"));
        assert_eq!(
            (late.late.as_slice(), late.start.as_slice()),
            (&[open[0].at][..], &[open[0].at][..])
        );
        let paused = plan(
            &s,
            &PlanInput { paused: true, ..i },
            t("2026-12-01T10:10:16Z"),
        );
        assert_eq!(
            paused.late,
            [open[0].at],
            "a paused deployment's slot goes Late"
        );
        assert!(paused.start.is_empty() && paused.record.is_empty());
    }

    /// After an outage from 10:05 to 10:47 of a 10-minute schedule with slots recorded up to
    /// 10:30: 10:10, 10:20 and 10:30 are recorded and missed, 10:40 is missed and unrecorded.
    fn outage(catchup: Catchup) -> Plan {
        let s = Schedule {
            catchup,
            ..interval(600)
        };
        let anchor = t("2026-12-01T10:00:00Z");
        let open: Vec<OpenSlot> = ["10:10", "10:20", "10:30"]
            .map(|hm| OpenSlot {
                at: t(&format!("2026-12-01T{hm}:00Z")),
                late: false,
            })
            .to_vec();
        let i = PlanInput {
            planned_through: t("2026-12-01T10:30:00Z"),
            catching_up: true,
            ..input(anchor, &open)
        };
        plan(&s, &i, t("2026-12-01T10:47:00Z"))
    }

    fn hm(ts: &[DateTime<Utc>]) -> Vec<String> {
        ts.iter().map(|t| t.format("%H:%M").to_string()).collect()
    }

    #[test]
    fn catchup_all_starts_every_missed_slot_in_order() {
        let p = outage(Catchup::All);
        assert_eq!(hm(&p.start), ["10:10", "10:20", "10:30", "10:40"]);
        assert_eq!(hm(&p.late), ["10:10", "10:20", "10:30", "10:40"]);
        assert!(p.skip.is_empty());
        assert_eq!(hm(&p.record)[..2], ["10:40", "10:50"]);
    }

    #[test]
    fn catchup_none_skips_every_missed_slot() {
        let p = outage(Catchup::Last(0));
        assert_eq!(hm(&p.skip), ["10:30", "10:20", "10:10"]);
        assert!(p.start.is_empty() && p.late.is_empty());
        assert_eq!(hm(&p.record)[0], "10:50", "10:40 is never recorded");
    }

    #[test]
    fn catchup_last_n_starts_only_the_latest_missed_slots() {
        let p = outage(Catchup::Last(2));
        assert_eq!(hm(&p.start), ["10:30", "10:40"]);
        assert_eq!(hm(&p.skip), ["10:20", "10:10"]);
        assert_eq!(hm(&p.record)[..2], ["10:40", "10:50"]);
        let p = outage(Catchup::default());
        assert_eq!(hm(&p.start), ["10:40"]);
    }

    #[test]
    fn a_slot_overdue_less_than_late_after_at_startup_is_not_missed() {
        let s = Schedule {
            catchup: Catchup::Last(0),
            ..interval(600)
        };
        let anchor = t("2026-12-01T10:00:00Z");
        let open = [OpenSlot {
            at: t("2026-12-01T10:10:00Z"),
            late: false,
        }];
        let i = PlanInput {
            planned_through: t("2026-12-01T10:10:00Z"),
            catching_up: true,
            ..input(anchor, &open)
        };
        let p = plan(&s, &i, t("2026-12-01T10:10:10Z"));
        assert_eq!(hm(&p.start), ["10:10"]);
        assert!(p.skip.is_empty());
    }
}
