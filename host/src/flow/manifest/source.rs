//! Positions in the manifest text: the spans later checks point at, turning a span into a
//! [`ManifestError`] with line and column, did-you-means for unknown keys, and pointing a flow
//! validation error at the part of the manifest it is about.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::Path;

use super::ManifestError;
use crate::flow::{FlowError, Hint};

/// Positions of the parts of a manifest that later checks point at.
#[derive(Debug, Default)]
pub(super) struct Spans {
    pub(super) tasks: BTreeMap<String, TaskSpans>,
    pub(super) reference_tasks: Vec<(String, Range<usize>)>,
}

#[derive(Debug, Default)]
pub(super) struct TaskSpans {
    pub(super) table: Range<usize>,
    pub(super) input: Option<Range<usize>>,
    pub(super) upstream: Vec<(String, Range<usize>)>,
    pub(super) map: Option<Range<usize>>,
}

pub(super) struct Source<'a> {
    pub(super) file: &'a Path,
    pub(super) text: &'a str,
}

impl Source<'_> {
    pub(super) fn error(&self, span: Range<usize>, message: impl fmt::Display) -> ManifestError {
        let at = span.start.min(self.text.len());
        let before = &self.text[..at];
        let line = before.matches('\n').count() + 1;
        let column = before
            .rfind('\n')
            .map_or(at, |nl| at - nl - 1)
            .saturating_add(1);
        ManifestError {
            file: self.file.to_owned(),
            line,
            column,
            message: message.to_string(),
        }
    }

    pub(super) fn toml_error(&self, e: &toml::de::Error) -> ManifestError {
        self.error(e.span().unwrap_or(0..0), with_did_you_mean(e.message()))
    }
}

/// Add a did-you-mean to serde's "unknown field `x`, expected one of `a`, `b`" messages.
fn with_did_you_mean(message: &str) -> String {
    let message = message.trim_end().to_owned();
    let Some(rest) = message.strip_prefix("unknown field `") else {
        return message;
    };
    let Some((field, expected)) = rest.split_once('`') else {
        return message;
    };
    let candidates: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
    let hint = Hint::closest(field, candidates);
    format!("{message}{hint}")
}

/// Point a validation error at the part of the manifest it is about.
pub(super) fn locate(src: &Source<'_>, spans: &Spans, e: FlowError) -> ManifestError {
    let task_span = |t: &str| spans.tasks.get(t).map(|s| s.table.clone()).unwrap_or(0..0);
    let span = match &e {
        FlowError::UnknownTask { task, unknown, .. } if task == "reference_tasks" => spans
            .reference_tasks
            .iter()
            .find(|(n, _)| n == unknown)
            .map_or(0..0, |(_, s)| s.clone()),
        FlowError::UnknownTask { task, unknown, .. } => {
            let t = spans.tasks.get(task.as_str());
            t.and_then(|t| t.upstream.iter().find(|(n, _)| n == unknown))
                .map(|(_, s)| s.clone())
                .or_else(|| t.and_then(|t| t.input.clone()))
                .unwrap_or_else(|| task_span(task))
        }
        FlowError::UnknownParameter { task, .. } => spans
            .tasks
            .get(task.as_str())
            .and_then(|t| t.input.clone())
            .unwrap_or_else(|| task_span(task)),
        FlowError::UnknownMapField { task, .. } => task_span(task),
        FlowError::DuplicateTask(task) => task_span(task),
        FlowError::BadName { what: "task", name } => task_span(name),
        FlowError::BadName { .. } => 0..0,
        FlowError::Cycle(path) => path.first().map_or(0..0, |t| task_span(t)),
        FlowError::NotATemplate { task, key } => {
            let t = spans.tasks.get(task.as_str());
            let at = match *key {
                "input" => t.and_then(|t| t.input.clone()),
                "map" => t.and_then(|t| t.map.clone()),
                _ => t.and_then(|t| t.upstream.first().map(|(_, s)| s.clone())),
            };
            at.unwrap_or_else(|| task_span(task))
        }
        FlowError::CodeReferenceTasks => spans
            .reference_tasks
            .first()
            .map_or(0..0, |(_, s)| s.clone()),
    };
    src.error(span, e)
}
