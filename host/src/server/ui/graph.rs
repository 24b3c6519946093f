//! A flow run's graph for the web UI, laid out and drawn as SVG on the server: one node per
//! task of the flow (a mapped task is one node, with its children counted by state), edges
//! from each task's upstream tasks, coloured by state. The layout is layered: a task's column
//! is the length of the longest path to it from a root, and within a column tasks are ordered
//! by the mean row of their upstream tasks (two sweeps), which keeps edges short and mostly
//! uncrossed for the graphs flows have (tens of tasks; a 10,000-task map is one node). No I/O.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use maud::{Markup, PreEscaped, html};

use crate::runner::record::TaskRun;
use crate::state::StateName;

/// One task of the flow, as the graph shows it.
#[derive(Debug, Clone)]
pub struct Node {
    /// The task's name.
    pub name: String,
    /// Its state, when it has a task run.
    pub state: Option<StateName>,
    /// For a mapped task: its children by state.
    pub children: BTreeMap<&'static str, usize>,
    /// The tasks it depends on (data or state).
    pub upstream: Vec<String>,
}

impl Node {
    /// The node of `task` as `run` has it (`None` when it has no task run yet).
    pub fn new(name: &str, upstream: Vec<String>, run: Option<&TaskRun>) -> Node {
        let mut children = BTreeMap::new();
        for c in run.map(|r| r.children.as_slice()).unwrap_or_default() {
            *children.entry(c.state.name.as_str()).or_insert(0) += 1;
        }
        Node {
            name: name.to_owned(),
            state: run.map(|r| r.state.name),
            children,
            upstream,
        }
    }
}

impl Node {
    /// The node of a task a code flow's body ran more than once: its runs counted by state as
    /// a mapped task's children are, its state its newest run's.
    pub fn repeated(name: &str, upstream: Vec<String>, runs: &[&TaskRun]) -> Node {
        let mut children = BTreeMap::new();
        for r in runs {
            *children.entry(r.state.name.as_str()).or_insert(0) += 1;
        }
        Node {
            name: name.to_owned(),
            state: runs.last().map(|r| r.state.name),
            children,
            upstream,
        }
    }
}

const W: i64 = 190;
const H: i64 = 52;
const GAP_X: i64 = 70;
const GAP_Y: i64 = 24;
const PAD: i64 = 12;

/// Where each node goes: its (column, row), by index.
pub fn layout(nodes: &[Node]) -> Vec<(usize, usize)> {
    let index: HashMap<&str, usize> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.name.as_str(), i))
        .collect();
    let ups: Vec<Vec<usize>> = nodes
        .iter()
        .map(|n| {
            n.upstream
                .iter()
                .filter_map(|u| index.get(u.as_str()).copied())
                .collect()
        })
        .collect();
    // Columns: longest path from a root. Manifests are acyclic (checked when parsed); a cycle
    // here would only stop growing after `nodes.len()` rounds.
    let mut column = vec![0usize; nodes.len()];
    for _ in 0..nodes.len() {
        let mut changed = false;
        for (i, us) in ups.iter().enumerate() {
            let c = us.iter().map(|&u| column[u] + 1).max().unwrap_or(0);
            if c > column[i] {
                column[i] = c;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    let columns = column.iter().copied().max().map_or(0, |m| m + 1);
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); columns];
    for (i, &c) in column.iter().enumerate() {
        members[c].push(i);
    }
    let mut row = vec![0f64; nodes.len()];
    for m in &members {
        for (r, &i) in m.iter().enumerate() {
            row[i] = r as f64;
        }
    }
    for _ in 0..2 {
        for m in members.iter_mut().skip(1) {
            let key = |i: &usize| {
                let us = &ups[*i];
                match us.is_empty() {
                    true => row[*i],
                    false => us.iter().map(|&u| row[u]).sum::<f64>() / us.len() as f64,
                }
            };
            m.sort_by(|a, b| key(a).total_cmp(&key(b)));
            for (r, &i) in m.iter().enumerate() {
                row[i] = r as f64;
            }
        }
    }
    (0..nodes.len())
        .map(|i| (column[i], row[i] as usize))
        .collect()
}

/// The CSS class of a state.
pub fn state_class(state: Option<StateName>) -> String {
    match state {
        Some(s) => format!("st-{}", s.as_str().to_ascii_lowercase()),
        None => "st-none".to_owned(),
    }
}

/// The graph as an SVG, each node a link to its task (`href(name)`).
pub fn svg(nodes: &[Node], href: impl Fn(&str) -> String) -> Markup {
    let at = layout(nodes);
    let x = |c: usize| PAD + c as i64 * (W + GAP_X);
    let y = |r: usize| PAD + r as i64 * (H + GAP_Y);
    let width = at
        .iter()
        .map(|&(c, _)| x(c) + W + PAD)
        .max()
        .unwrap_or(2 * PAD);
    let height = at
        .iter()
        .map(|&(_, r)| y(r) + H + PAD)
        .max()
        .unwrap_or(2 * PAD);
    let index: HashMap<&str, usize> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.name.as_str(), i))
        .collect();
    let mut edges = String::new();
    for (i, n) in nodes.iter().enumerate() {
        for u in &n.upstream {
            let Some(&j) = index.get(u.as_str()) else {
                continue;
            };
            let (x1, y1) = (x(at[j].0) + W, y(at[j].1) + H / 2);
            let (x2, y2) = (x(at[i].0), y(at[i].1) + H / 2);
            let mid = (x1 + x2) / 2;
            let _ = write!(
                edges,
                r#"<path class="edge" d="M{x1},{y1} C{mid},{y1} {mid},{y2} {x2},{y2}"/>"#
            );
        }
    }
    html! {
        svg class="graph" role="group" aria-label="The flow's graph: tasks coloured by state"
            width=(width) height=(height) viewBox={"0 0 " (width) " " (height)} {
            defs {
                marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6"
                    markerHeight="6" orient="auto-start-reverse" {
                    path d="M 0 0 L 10 5 L 0 10 z" class="arrow" {}
                }
            }
            g class="edges" { (PreEscaped(edges)) }
            @for (i, n) in nodes.iter().enumerate() {
                @let (c, r) = at[i];
                @let state = n.state.map_or("not started", StateName::as_str);
                @let counts = n.children.iter().map(|(s, k)| format!("{k} {s}")).collect::<Vec<_>>().join(", ");
                a href=(href(&n.name)) class={"node " (state_class(n.state))} data-task=(n.name)
                    data-state=(state) {
                    rect x=(x(c)) y=(y(r)) width=(W) height=(H) rx="6" {}
                    text x=(x(c) + 10) y=(y(r) + 20) class="name" { (truncate(&n.name, 22)) }
                    text x=(x(c) + 10) y=(y(r) + 40) class="state" {
                        @if n.children.is_empty() { (state) }
                        @else { (short_counts(&n.children)) }
                    }
                    title { (n.name) ": " (state) @if !counts.is_empty() { " (" (counts) ")" } }
                }
            }
        }
    }
}

/// A mapped node's children in a line: `9990 Completed · 10 Failed`, by state.
fn short_counts(children: &BTreeMap<&'static str, usize>) -> String {
    children
        .iter()
        .map(|(s, k)| format!("{k} {s}"))
        .collect::<Vec<_>>()
        .join(" · ")
}

/// `s` cut to `n` characters, with an ellipsis when it was.
pub(super) fn truncate(s: &str, n: usize) -> String {
    match s.char_indices().nth(n) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, up: &[&str]) -> Node {
        Node {
            name: name.into(),
            state: None,
            children: BTreeMap::new(),
            upstream: up.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    /// Columns follow the longest path; a task sits beside its upstream's row.
    #[test]
    fn tasks_are_layered_by_their_longest_path_and_kept_beside_their_upstream() {
        let nodes = [
            node("a", &[]),
            node("b", &[]),
            node("c", &["b"]),
            node("d", &["a"]),
            node("e", &["a", "c"]),
        ];
        let at = layout(&nodes);
        assert_eq!(at[0].0, 0);
        assert_eq!(at[1].0, 0);
        assert_eq!(at[2].0, 1);
        assert_eq!(at[3].0, 1);
        assert_eq!(at[4].0, 2, "after c, the longer path");
        // d follows a (row 0) and c follows b (row 1).
        assert!(at[3].1 < at[2].1, "{at:?}");
    }

    /// Each node shows its task and state (its text is its accessible name); a mapped one
    /// counts its children.
    #[test]
    fn nodes_carry_their_state_and_a_mapped_node_its_children() {
        let mut a = node("a", &[]);
        a.state = Some(StateName::Failed);
        a.children.insert("Completed", 3);
        a.children.insert("Failed", 1);
        let svg = svg(&[a, node("b", &["a"])], |n| format!("/t/{n}")).into_string();
        assert!(svg.contains(r#"class="node st-failed""#), "{svg}");
        assert!(svg.contains("a: Failed (3 Completed, 1 Failed)"), "{svg}");
        assert!(svg.contains("3 Completed · 1 Failed"), "{svg}");
        assert!(svg.contains(r#"href="/t/b""#), "{svg}");
        assert!(svg.contains(r#"data-state="not started""#), "{svg}");
        assert!(svg.contains("<path class=\"edge\""), "{svg}");
    }
}
