//! A flow run's timeline (Gantt chart) for the web UI, drawn as SVG on the server: a row per
//! task, a bar per attempt (from entering Running or Retrying to the next transition, coloured
//! by the state it ended in), a hatched bar for each wait between attempts (AwaitingRetry,
//! Paused, Scheduled), and a tick for a task that ended without running (a cache hit, a skip).
//! A mapped task is one row: the union of its children's attempts, merged where they touch, so
//! a 10,000-child map draws at most a few hundred bars (its own page draws each child of a page
//! as a row). Times come from the recorded history; the right edge is `now` while the run is
//! live. No I/O.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use maud::{Markup, PreEscaped, html};

use super::graph::{state_class, truncate};
use crate::runner::record::{TaskRun, Transition};
use crate::state::{StateName, StateType};

/// The width of the bars' area, in pixels.
const WIDTH: f64 = 720.0;
/// The width of the label column.
const LABEL: f64 = 180.0;
const ROW: f64 = 24.0;
const AXIS: f64 = 22.0;

/// One bar of a row.
#[derive(Debug, Clone, PartialEq)]
pub struct Bar {
    /// When it starts.
    pub start: DateTime<Utc>,
    /// When it ends (`now` for an attempt still running).
    pub end: DateTime<Utc>,
    /// What it is.
    pub kind: BarKind,
}

/// What a bar shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    /// Attempt `n` (from 1), and the state it ended in (`None`: still running).
    Attempt(u32, Option<StateName>),
    /// Waiting in this state between attempts (or before the first, when scheduled).
    Wait(StateName),
    /// Ended in this state without running.
    Mark(StateName),
    /// Mapped children running (the union of their attempts), coloured as their parent.
    Children(Option<StateName>),
}

/// A task run's bars, from its history: `now` ends an attempt or a wait still going on.
pub fn bars(history: &[Transition], now: DateTime<Utc>) -> Vec<Bar> {
    let mut out = Vec::new();
    let mut attempt = 0;
    let mut ran = false;
    for (i, t) in history.iter().enumerate() {
        let next = history.get(i + 1);
        let end = next.map_or(now, |n| n.time).max(t.time);
        match t.to.state_type() {
            StateType::Running => {
                attempt += 1;
                ran = true;
                out.push(Bar {
                    start: t.time,
                    end,
                    kind: BarKind::Attempt(attempt, next.map(|n| n.to)),
                });
            }
            StateType::Scheduled | StateType::Paused => out.push(Bar {
                start: t.time,
                end,
                kind: BarKind::Wait(t.to),
            }),
            ty if ty.is_terminal() && !ran && i + 1 == history.len() => out.push(Bar {
                start: t.time,
                end: t.time,
                kind: BarKind::Mark(t.to),
            }),
            _ => {}
        }
    }
    out
}

/// A mapped task's children as bars: the union of their attempts, where two closer than `gap`
/// are one bar.
pub fn children_bars(task: &TaskRun, now: DateTime<Utc>, gap: chrono::Duration) -> Vec<Bar> {
    union_bars(&task.children, Some(task.state.name), now, gap)
}

/// Task runs as one row of bars: the union of their attempts, where two closer than `gap` are
/// one bar, coloured by `state`.
pub fn union_bars<'t>(
    runs: impl IntoIterator<Item = &'t TaskRun>,
    state: Option<StateName>,
    now: DateTime<Utc>,
    gap: chrono::Duration,
) -> Vec<Bar> {
    let mut spans: Vec<(DateTime<Utc>, DateTime<Utc>)> = runs
        .into_iter()
        .flat_map(|c| bars(&c.history, now))
        .filter(|b| matches!(b.kind, BarKind::Attempt(..)))
        .map(|b| (b.start, b.end))
        .collect();
    spans.sort_unstable();
    let mut merged: Vec<(DateTime<Utc>, DateTime<Utc>)> = Vec::new();
    for (s, e) in spans {
        match merged.last_mut() {
            Some(last) if s <= last.1 + gap => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    merged
        .into_iter()
        .map(|(start, end)| Bar {
            start,
            end,
            kind: BarKind::Children(state),
        })
        .collect()
}

/// The most rows a task run many times (by a code flow's body) gets, a row each; beyond, one
/// row for all of them (the union of their attempts).
pub const REPEATED_ROWS: usize = 20;

/// One row of the chart.
#[derive(Debug, Clone)]
pub struct Row {
    /// What it is labelled with (a task's name, or `name[i]` for a child).
    pub label: String,
    /// Where the label links to.
    pub href: String,
    /// Its bars.
    pub bars: Vec<Bar>,
}

/// The rows of `tasks` (a run's task runs, or a mapped task's children): each a label, a link
/// and its task run (`None`: a task without a run yet, an empty row). `span` is the chart's:
/// children closer than one pixel apart are one bar.
pub fn rows<'t>(
    tasks: impl IntoIterator<Item = (String, String, Option<&'t TaskRun>)>,
    now: DateTime<Utc>,
    span: chrono::Duration,
) -> Vec<Row> {
    let gap = one_pixel(span);
    tasks
        .into_iter()
        .map(|(label, href, run)| Row {
            href,
            bars: match run {
                None => Vec::new(),
                Some(t) if !t.children.is_empty() => children_bars(t, now, gap),
                Some(t) => bars(&t.history, now),
            },
            label,
        })
        .collect()
}

/// The time one pixel of a chart spanning `span` stands for: bars closer than it are one.
pub fn one_pixel(span: chrono::Duration) -> chrono::Duration {
    span / WIDTH as i32
}

/// The time `runs` span: from their first transition to their last (or `now`, when `live`).
pub fn extent<'t>(
    runs: impl IntoIterator<Item = &'t TaskRun>,
    start: DateTime<Utc>,
    live: bool,
    now: DateTime<Utc>,
) -> (DateTime<Utc>, DateTime<Utc>) {
    let mut end = start;
    for t in runs {
        for h in t
            .history
            .iter()
            .chain(t.children.iter().flat_map(|c| &c.history))
        {
            end = end.max(h.time);
        }
    }
    if live {
        end = end.max(now);
    }
    (start, end)
}

/// A duration as an axis label: `0`, `250 ms`, `1.5 s`, `2 min`, `1.5 h`.
pub fn label(ms: f64) -> String {
    let trim = |v: f64| {
        let s = format!("{v:.1}");
        s.strip_suffix(".0").map(str::to_owned).unwrap_or(s)
    };
    match ms {
        ms if ms <= 0.0 => "0".to_owned(),
        ms if ms < 1000.0 => format!("{} ms", trim(ms)),
        ms if ms < 60_000.0 => format!("{} s", trim(ms / 1e3)),
        ms if ms < 3_600_000.0 => format!("{} min", trim(ms / 6e4)),
        ms => format!("{} h", trim(ms / 3.6e6)),
    }
}

/// The axis's step for a span of `ms`: 1, 2 or 5 times a power of ten, for fewer than 10
/// steps.
pub fn step(ms: f64) -> f64 {
    let raw = (ms / 6.0).max(0.001);
    let pow = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * pow)
        .find(|s| ms / s < 10.0)
        .unwrap_or(10.0 * pow)
}

fn describe(b: &Bar) -> String {
    let ms = (b.end - b.start).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e3;
    let took = label(ms);
    match b.kind {
        BarKind::Attempt(n, Some(to)) => format!("attempt {n}: {took}, then {}", to.as_str()),
        BarKind::Attempt(n, None) => format!("attempt {n}: running for {took}"),
        BarKind::Wait(s) => format!("{} for {took}", s.as_str()),
        BarKind::Mark(s) => format!("{} without running", s.as_str()),
        BarKind::Children(_) => format!("children running: {took}"),
    }
}

/// The chart of `rows` over `[start, end]`.
pub fn svg(rows: &[Row], start: DateTime<Utc>, end: DateTime<Utc>) -> Markup {
    let span_ms = ((end - start).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e3).max(1.0);
    let x = |t: DateTime<Utc>| {
        let ms = (t - start).num_microseconds().unwrap_or(0) as f64 / 1e3;
        LABEL + (ms / span_ms * WIDTH).clamp(0.0, WIDTH)
    };
    let height = AXIS + ROW * rows.len() as f64 + 4.0;
    let width = LABEL + WIDTH + 40.0;
    let mut axis = String::new();
    let step = step(span_ms);
    let mut at = 0.0;
    while at <= span_ms + step * 1e-9 {
        let px = LABEL + at / span_ms * WIDTH;
        let _ = write!(
            axis,
            r#"<line class="tick" x1="{px:.1}" y1="{AXIS}" x2="{px:.1}" y2="{height}"/><text x="{px:.1}" y="14" class="axis">{}</text>"#,
            label(at)
        );
        at += step;
    }
    html! {
        svg class="timeline" role="group" aria-label="Timeline: each task's attempts over time"
            width=(width) height=(height) viewBox={"0 0 " (width) " " (height)} {
            defs {
                pattern id="wait" width="6" height="6" patternUnits="userSpaceOnUse"
                    patternTransform="rotate(45)" {
                    rect width="3" height="6" class="hatch" {}
                }
            }
            g class="axis" { (PreEscaped(axis)) }
            @for (i, row) in rows.iter().enumerate() {
                @let y = AXIS + ROW * i as f64;
                g class="row" {
                    a href=(row.href) {
                        text x="4" y=(format!("{:.1}", y + 16.0)) class="label" { (truncate(&row.label, 24)) }
                        title { (row.label) }
                    }
                    @for b in &row.bars {
                        @let x1 = x(b.start);
                        @let w = (x(b.end) - x1).max(2.0);
                        @let (class, h, dy) = match b.kind {
                            BarKind::Attempt(_, to) => (format!("bar {}", state_class(Some(to.unwrap_or(StateName::Running)))), 16.0, 4.0),
                            BarKind::Children(s) => (format!("bar {}", state_class(s)), 16.0, 4.0),
                            BarKind::Wait(_) => ("wait".to_owned(), 8.0, 8.0),
                            BarKind::Mark(s) => (format!("mark {}", state_class(Some(s))), 16.0, 4.0),
                        };
                        rect class=(class) x=(format!("{x1:.1}")) y=(format!("{:.1}", y + dy))
                            width=(format!("{w:.1}")) height=(h) {
                            title { (row.label) ", " (describe(b)) }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(1_700_000_000_000 + ms).expect("time")
    }

    fn history(steps: &[(i64, StateName)]) -> Vec<Transition> {
        steps
            .iter()
            .map(|&(ms, to)| Transition {
                from: None,
                to,
                time: at(ms),
                message: None,
            })
            .collect()
    }

    /// Each attempt is a bar from Running/Retrying to the next transition, ending in what
    /// followed; the wait between them is a bar of its own; a live attempt ends now.
    #[test]
    fn attempts_and_waits_come_from_the_history() {
        use StateName::*;
        let h = history(&[
            (0, Pending),
            (10, Running),
            (30, AwaitingRetry),
            (1030, Retrying),
            (1100, Failed),
        ]);
        let b = bars(&h, at(5000));
        assert_eq!(
            b,
            vec![
                Bar {
                    start: at(10),
                    end: at(30),
                    kind: BarKind::Attempt(1, Some(AwaitingRetry))
                },
                Bar {
                    start: at(30),
                    end: at(1030),
                    kind: BarKind::Wait(AwaitingRetry)
                },
                Bar {
                    start: at(1030),
                    end: at(1100),
                    kind: BarKind::Attempt(2, Some(Failed))
                },
            ]
        );
        let live = bars(&history(&[(0, Pending), (10, Running)]), at(70));
        assert_eq!(
            live,
            vec![Bar {
                start: at(10),
                end: at(70),
                kind: BarKind::Attempt(1, None)
            }]
        );
        // A cache hit never ran: a mark where it ended.
        let hit = bars(&history(&[(0, Pending), (5, Cached)]), at(70));
        assert_eq!(
            hit,
            vec![Bar {
                start: at(5),
                end: at(5),
                kind: BarKind::Mark(Cached)
            }]
        );
    }

    /// A mapped task's children are the union of their attempts: overlapping or closer than
    /// the gap merge, a longer pause between them does not.
    #[test]
    fn children_merge_into_the_union_of_their_attempts() {
        use StateName::*;
        let mut parent = TaskRun::new("m", None, at(0));
        parent.state.name = Completed;
        for (s, e) in [(10, 50), (40, 80), (81, 90), (200, 210)] {
            let mut c = TaskRun::new("m", Some(0), at(0));
            c.history = history(&[(0, Pending), (s, Running), (e, Completed)]);
            parent.children.push(c);
        }
        let b = children_bars(&parent, at(500), chrono::Duration::milliseconds(2));
        let spans: Vec<_> = b.iter().map(|b| (b.start, b.end)).collect();
        assert_eq!(spans, vec![(at(10), at(90)), (at(200), at(210))]);
        assert!(
            b.iter()
                .all(|b| b.kind == BarKind::Children(Some(Completed)))
        );
    }

    #[test]
    fn the_axis_steps_by_one_two_or_five_and_labels_its_unit() {
        assert_eq!(step(1000.0), 200.0);
        assert_eq!(step(90.0), 10.0);
        assert_eq!(step(7_200_000.0), 1_000_000.0);
        assert_eq!(label(0.0), "0");
        assert_eq!(label(250.0), "250 ms");
        assert_eq!(label(1500.0), "1.5 s");
        assert_eq!(label(120_000.0), "2 min");
        assert_eq!(label(5_400_000.0), "1.5 h");
    }

    /// Rows link their task; bars carry their class by state and a title saying what they
    /// are; a mapped task of many children draws merged bars, not one per child.
    #[test]
    fn the_chart_draws_a_row_per_task_with_titled_bars() {
        use StateName::*;
        let mut a = TaskRun::new("a", None, at(0));
        a.history = history(&[(0, Pending), (0, Running), (100, Failed)]);
        let mut m = TaskRun::new("m", None, at(0));
        m.state.name = Completed;
        for i in 0..10_000 {
            let mut c = TaskRun::new("m", Some(i), at(0));
            let s = 100 + i64::from(i) / 100;
            c.history = history(&[(0, Pending), (s, Running), (s + 1, Completed)]);
            m.children.push(c);
        }
        let tasks = [("a", Some(&a)), ("m", Some(&m)), ("z", None)]
            .map(|(n, t)| (n.to_owned(), format!("/t/{n}"), t));
        let (start, end) = extent([&a, &m], at(0), false, at(999_999));
        assert_eq!(end, at(200));
        let rows = rows(tasks, end, end - start);
        assert_eq!(rows[1].bars.len(), 1, "10,000 touching children: one bar");
        assert!(rows[2].bars.is_empty());
        let svg = svg(&rows, start, end).into_string();
        assert!(svg.contains(r#"href="/t/a""#), "{svg}");
        assert!(svg.contains(r#"class="bar st-failed""#), "{svg}");
        assert!(svg.contains("a, attempt 1: 100 ms, then Failed"), "{svg}");
        assert!(svg.contains("m, children running"), "{svg}");
        assert!(svg.len() < 10_000, "{} bytes", svg.len());
    }
}
