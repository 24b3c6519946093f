//! Captures a run's logs: the `log` import's records and the guest's stdout and stderr, split
//! into lines, into one bounded buffer. Bytes beyond the run's log budget are dropped and
//! counted, and a marker record says how many. A single write larger than the host-call limit
//! traps the guest.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError, StreamResult};

use super::outcome::{Limit, LimitExceeded, LogLevel, LogRecord, LogSource};
use crate::clock::ClockRef;

/// What each record costs against the log budget besides its text, so a flood of empty lines is
/// bounded like any other.
pub(super) const RECORD_OVERHEAD: u64 = LogRecord::OVERHEAD;

/// How many bytes a guest may write to stdout or stderr per `check-write` permit.
const WRITE_PERMIT: usize = 64 << 10;

/// The log buffer of one run.
#[derive(Debug)]
pub(super) struct LogSink {
    clock: ClockRef,
    limit: u64,
    used: u64,
    dropped: u64,
    dropped_records: u64,
    records: Vec<LogRecord>,
    /// Partial lines of stdout and stderr.
    pending: [Vec<u8>; 2],
    /// Set when a single write exceeded the host-call limit.
    pub(super) violation: Option<LimitExceeded>,
}

/// The logs of a finished run.
#[derive(Debug)]
pub(super) struct Logs {
    pub(super) records: Vec<LogRecord>,
    pub(super) dropped_bytes: u64,
}

impl LogSink {
    pub(super) fn new(limit: u64, clock: ClockRef) -> Self {
        Self {
            clock,
            limit,
            used: 0,
            dropped: 0,
            dropped_records: 0,
            records: Vec::new(),
            pending: [Vec::new(), Vec::new()],
            violation: None,
        }
    }

    /// Record one message, or count its bytes as dropped when the budget is full. A record costs
    /// its length plus [`RECORD_OVERHEAD`].
    pub(super) fn push(&mut self, source: LogSource, level: LogLevel, message: String) {
        let n = message.len() as u64;
        let cost = n.saturating_add(RECORD_OVERHEAD);
        if self.used.saturating_add(cost) > self.limit {
            self.dropped = self.dropped.saturating_add(n);
            self.dropped_records = self.dropped_records.saturating_add(1);
            return;
        }
        self.used += cost;
        self.records.push(LogRecord {
            time: self.clock.now(),
            source,
            level,
            message,
        });
    }

    fn write_stream(&mut self, source: LogSource, mut bytes: &[u8]) {
        let idx = usize::from(source == LogSource::Stderr);
        while let Some(nl) = bytes.iter().position(|&b| b == b'\n') {
            let mut line = std::mem::take(&mut self.pending[idx]);
            line.extend_from_slice(&bytes[..nl]);
            self.push_line(source, &line);
            bytes = &bytes[nl + 1..];
        }
        // A line without a newline is held until it ends, but never beyond what the budget could
        // still take: a newline-free flood is dropped as it arrives.
        let room = self.limit.saturating_sub(self.used);
        let held = self.pending[idx].len() as u64;
        if held.saturating_add(bytes.len() as u64) > room {
            self.dropped = self
                .dropped
                .saturating_add(held)
                .saturating_add(bytes.len() as u64);
            self.pending[idx].clear();
        } else {
            self.pending[idx].extend_from_slice(bytes);
        }
    }

    fn push_line(&mut self, source: LogSource, line: &[u8]) {
        let level = match source {
            LogSource::Stderr => LogLevel::Warn,
            _ => LogLevel::Info,
        };
        let text = String::from_utf8_lossy(line);
        let text = text.strip_suffix('\r').unwrap_or(&text).to_owned();
        self.push(source, level, text);
    }

    /// The logs, with partial lines flushed and a marker record when anything was dropped.
    pub(super) fn finish(&mut self) -> Logs {
        for (idx, source) in [(0, LogSource::Stdout), (1, LogSource::Stderr)] {
            let rest = std::mem::take(&mut self.pending[idx]);
            if !rest.is_empty() {
                self.push_line(source, &rest);
            }
        }
        let mut records = std::mem::take(&mut self.records);
        if self.dropped > 0 || self.dropped_records > 0 {
            records.push(LogRecord {
                time: self.clock.now(),
                source: LogSource::Log,
                level: LogLevel::Warn,
                message: format!(
                    "[sluice] logs truncated: the log budget of {} bytes was full, {} more bytes \
                     in {} lines were dropped",
                    self.limit, self.dropped, self.dropped_records
                ),
            });
        }
        Logs {
            records,
            dropped_bytes: self.dropped,
        }
    }

    /// The last `n` lines the guest wrote to stderr, oldest first.
    pub(super) fn stderr_tail(&self, n: usize) -> Vec<String> {
        let mut tail: Vec<String> = self
            .records
            .iter()
            .rev()
            .filter(|r| r.source == LogSource::Stderr)
            .take(n)
            .map(|r| r.message.clone())
            .collect();
        let pending = &self.pending[1];
        if !pending.is_empty() {
            tail.insert(0, String::from_utf8_lossy(pending).into_owned());
            tail.truncate(n);
        }
        tail.reverse();
        tail
    }
}

pub(super) type SharedSink = Arc<Mutex<LogSink>>;

pub(super) fn lock(sink: &SharedSink) -> MutexGuard<'_, LogSink> {
    // A poisoned lock only means a panic elsewhere while holding it; the buffer is still usable.
    sink.lock().unwrap_or_else(|e| e.into_inner())
}

/// stdout or stderr of one run, writing into its [`LogSink`].
#[derive(Clone)]
pub(super) struct Capture {
    sink: SharedSink,
    source: LogSource,
    max_write: u64,
}

impl Capture {
    pub(super) fn new(sink: SharedSink, source: LogSource, max_write: u64) -> Self {
        Self {
            sink,
            source,
            max_write,
        }
    }

    fn write_bytes(&self, bytes: &[u8]) -> Result<(), LimitExceeded> {
        let mut sink = lock(&self.sink);
        if bytes.len() as u64 > self.max_write {
            let v = LimitExceeded {
                limit: Limit::HostCallBytes,
                max: self.max_write,
                requested: Some(bytes.len() as u64),
            };
            sink.violation.get_or_insert(v);
            return Err(v);
        }
        sink.write_stream(self.source, bytes);
        Ok(())
    }
}

impl IsTerminal for Capture {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for Capture {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[async_trait::async_trait]
impl Pollable for Capture {
    async fn ready(&mut self) {}
}

impl OutputStream for Capture {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.write_bytes(&bytes)
            .map_err(|v| StreamError::Trap(wasmtime::Error::msg(v.to_string())))
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(WRITE_PERMIT
            .min(usize::try_from(self.max_write).unwrap_or(usize::MAX))
            .max(1))
    }
}

impl AsyncWrite for Capture {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Poll::Ready(
            self.write_bytes(buf)
                .map(|()| buf.len())
                .map_err(std::io::Error::other),
        )
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;

    fn sink(limit: u64) -> LogSink {
        LogSink::new(limit, Arc::new(SystemClock))
    }

    #[test]
    fn stream_bytes_become_lines() {
        let mut s = sink(1000);
        s.write_stream(LogSource::Stdout, b"one\ntw");
        s.write_stream(LogSource::Stderr, b"err\r\n");
        s.write_stream(LogSource::Stdout, b"o\nthree");
        let logs = s.finish();
        let lines: Vec<_> = logs
            .records
            .iter()
            .map(|r| (r.source, r.message.as_str()))
            .collect();
        assert_eq!(
            lines,
            [
                (LogSource::Stdout, "one"),
                (LogSource::Stderr, "err"),
                (LogSource::Stdout, "two"),
                (LogSource::Stdout, "three"),
            ]
        );
        assert_eq!(logs.dropped_bytes, 0);
    }

    #[test]
    fn the_budget_drops_and_marks() {
        let mut s = sink(10 + 2 * RECORD_OVERHEAD);
        s.push(LogSource::Log, LogLevel::Info, "12345".into());
        s.push(LogSource::Log, LogLevel::Info, "12345".into());
        s.push(LogSource::Log, LogLevel::Info, "x".into());
        s.write_stream(LogSource::Stdout, &[b'a'; 100]);
        let logs = s.finish();
        assert_eq!(logs.dropped_bytes, 101);
        assert_eq!(logs.records.len(), 3);
        let marker = &logs.records[2].message;
        assert!(
            marker.contains("101 more bytes in 1 lines were dropped"),
            "{marker}"
        );
    }

    #[test]
    fn empty_lines_cost_budget_too() {
        let mut s = sink(10 * RECORD_OVERHEAD);
        s.write_stream(LogSource::Stdout, &[b'\n'; 1000]);
        let logs = s.finish();
        assert_eq!(logs.records.len(), 11, "10 empty lines and the marker");
        assert!(
            logs.records[10]
                .message
                .contains("in 990 lines were dropped")
        );
    }

    #[test]
    fn a_write_over_the_host_call_limit_is_refused() {
        let shared = Arc::new(Mutex::new(sink(1000)));
        let c = Capture::new(shared.clone(), LogSource::Stdout, 4);
        assert!(c.write_bytes(b"abcd").is_ok());
        let err = c.write_bytes(b"abcde").expect_err("over the limit");
        assert_eq!(err.limit, Limit::HostCallBytes);
        assert_eq!(lock(&shared).violation, Some(err));
    }
}
