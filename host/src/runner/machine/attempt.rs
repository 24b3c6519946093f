//! Attempts: starting queued units within the flow's concurrency and tag limits, the output
//! cache (asking for a key, taking the answer, caching what completed), an attempt's start and
//! end (retry policy, usage, logs), and what follows it (a retry timer, the output handed on).

use super::*;

impl FlowMachine {
    /// Start queued units while the global and per-tag limits allow.
    pub(super) fn start_ready(&mut self) {
        while self.running < self.def.concurrency {
            let Some(unit) = self.ready.pop_front() else {
                return;
            };
            if self.record_ref(unit).state.is_terminal() {
                // Cancelled while it waited for its retry timer.
                continue;
            }
            if self.cancelled {
                let s = State::new(StateName::Cancelled, self.now())
                    .with_message("the flow run was cancelled before this task started");
                self.transition(unit, s, None, Then::Finished);
                continue;
            }
            let def = self.def.clone();
            let task = &def.tasks[self.nodes[unit.task].template];
            if let Some(tag) = task.tags.iter().find(|t| {
                def.tag_limits.get(*t).is_some_and(|&limit| {
                    self.running_by_tag.get(*t).copied().unwrap_or(0) >= limit
                })
            }) {
                self.tag_blocked
                    .entry(tag.clone())
                    .or_default()
                    .push_back(unit);
                continue;
            }
            // The slot is held while the cache is consulted, so the limits hold for what the
            // answer starts.
            self.take_slot(unit);
            if !self.ask_cache(unit) {
                self.ready_to_start(unit);
            }
        }
    }

    pub(super) fn take_slot(&mut self, unit: Unit) {
        self.running += 1;
        for tag in &self.def.tasks[self.nodes[unit.task].template].tags {
            *self.running_by_tag.entry(tag.clone()).or_default() += 1;
        }
    }

    /// Give the unit's slot back; units blocked on its tags are queued again.
    pub(super) fn release_slot(&mut self, unit: Unit) {
        self.running = self.running.saturating_sub(1);
        for tag in &self.def.tasks[self.nodes[unit.task].template].tags {
            if let Some(n) = self.running_by_tag.get_mut(tag) {
                *n = n.saturating_sub(1);
            }
            if let Some(blocked) = self.tag_blocked.get_mut(tag) {
                while let Some(u) = blocked.pop_back() {
                    self.ready.push_front(u);
                }
            }
        }
    }

    /// Attempts the unit made before this run (when resuming); retries count from there.
    pub(super) fn base_attempts(&self, unit: Unit) -> u32 {
        match (unit.child, &self.nodes[unit.task].map) {
            (Some(c), Some(map)) => map.base_attempts.get(c as usize).copied().unwrap_or(0),
            (Some(_), None) => 0,
            (None, _) => self.nodes[unit.task].base_attempts,
        }
    }

    /// The unit's resolved input.
    pub(super) fn unit_input(&self, unit: Unit) -> Json {
        match (unit.child, &self.nodes[unit.task].map) {
            (Some(c), Some(map)) => map.inputs[c as usize].clone(),
            _ => self.nodes[unit.task]
                .input
                .clone()
                .unwrap_or_else(Json::null),
        }
    }

    /// Output caching: on the unit's first attempt in this run, ask for its key (returns true;
    /// the answer comes as [`Event::CacheAnswered`]).
    pub(super) fn ask_cache(&mut self, unit: Unit) -> bool {
        let def = self.def.clone();
        let template = self.nodes[unit.task].template;
        let task = &def.tasks[template];
        let Some(policy) = task.cache.as_ref().filter(|_| self.settings.record) else {
            return false;
        };
        if self.record_ref(unit).attempts > self.base_attempts(unit)
            || self.skip_cache.remove(&unit)
        {
            return false;
        }
        let input = self.unit_input(unit);
        let identity = TaskIdentity {
            scope: &self.cache_scope,
            task: &task.name,
            component: &self.settings.digests[template],
            budget: &task.budget,
            grants: &self.settings.grants[template].0,
            secrets: &self.settings.grants[template].1,
            map_index: self.map_index(unit),
        };
        let Some(key) = CacheKey::new(policy, identity, &input, &self.run.parameters) else {
            return false;
        };
        self.lookups += 1;
        self.commands.push_back(Command::LookupCache {
            unit,
            key: key.clone(),
        });
        self.cache_keys.insert(unit, key);
        true
    }

    /// A hit completes the unit as Cached without running the component; a miss records why
    /// and keeps the key, so the output is cached when the unit completes.
    pub(super) fn cache_answered(&mut self, unit: Unit, answer: Result<CacheLookup, String>) {
        let Some(key) = self.cache_keys.remove(&unit) else {
            return;
        };
        let miss = |key: &CacheKey, reason: String| CacheInfo {
            status: CacheStatus::Miss,
            key: key.key.clone(),
            validator: key.validator.clone(),
            reason,
            source_flow_run: None,
            source_task_run: None,
            expires_at: None,
            cached_at: None,
        };
        if self.cancelled {
            // The answer came too late: the unit ends Cancelled, not from the cache.
            self.release_slot(unit);
            let s = State::new(StateName::Cancelled, self.now())
                .with_message("the flow run was cancelled before this task started");
            return self.transition(unit, s, None, Then::Finished);
        }
        match answer {
            Ok(CacheLookup::Hit {
                output,
                blob,
                entry,
            }) => {
                self.release_slot(unit);
                let now = self.now();
                let state = State::new(StateName::Cached, now)
                    .with_message(format!("cached result from flow run {}", entry.flow_run));
                self.record(unit).cache = Some(CacheInfo::hit(
                    key.key,
                    key.validator,
                    (entry.flow_run, entry.task_run),
                    entry.created_at,
                    entry.expires_at,
                ));
                let then = Then::Proceed {
                    output: Some(output),
                    from_cache: true,
                    guest_cancelled: false,
                };
                self.transition(unit, state, Some(Blob::Stored(blob)), then);
            }
            Ok(CacheLookup::Miss(reason)) => {
                self.record(unit).cache = Some(miss(&key, reason));
                self.cache_keys.insert(unit, key);
                self.ready_to_start(unit);
            }
            Err(e) => {
                let task = self.name_of(unit.task);
                tracing::warn!(task = %task, "cache lookup failed: {e}");
                self.record(unit).cache = Some(miss(&key, format!("the lookup failed: {e}")));
                self.ready_to_start(unit);
            }
        }
    }

    /// The unit holds the run's slot and its component is to run: with an executor that
    /// queues, it first waits, Pending, for one of the executor's slots; else it begins now.
    fn ready_to_start(&mut self, unit: Unit) {
        if self.settings.acquire {
            self.awaiting.insert(unit);
            self.commands.push_back(Command::Acquire(unit));
        } else {
            self.begin_attempt(unit);
        }
    }

    /// The unit holds a slot and runs: Running (or Retrying), then its component.
    pub(super) fn begin_attempt(&mut self, unit: Unit) {
        let attempt = self.record_ref(unit).attempts.saturating_add(1);
        let base = self.base_attempts(unit);
        let retrying = attempt > base + 1;
        let name = match retrying {
            true => StateName::Retrying,
            false => StateName::Running,
        };
        let mut s = State::new(name, self.now());
        s.message = retrying.then(|| format!("attempt {attempt}"));
        // Counted before the transition is recorded, so a crash mid-attempt still counts it.
        self.record(unit).attempts = attempt;
        self.transition(unit, s, None, Then::Launch);
    }

    pub(super) fn context_of(&self, unit: Unit, attempt: u32) -> TaskContext {
        TaskContext {
            flow_run_id: self.run.id,
            task_run_id: self.record_ref(unit).id,
            task_name: self.name_of(unit.task).clone(),
            attempt,
            map_index: self.map_index(unit),
            parameters: self.parameters.clone(),
            values: self.context.clone(),
        }
    }

    pub(super) fn launch(&mut self, unit: Unit) {
        let attempt = self.record_ref(unit).attempts;
        let ctx = self.context_of(unit, attempt);
        let input = self.unit_input(unit);
        let template = self.nodes[unit.task].template;
        self.commands.push_back(Command::Run(Attempt {
            unit,
            template,
            input,
            ctx,
        }));
    }

    pub(super) fn attempt_ended(&mut self, unit: Unit, outcome: RunOutcome) {
        self.release_slot(unit);
        let def = self.def.clone();
        let task = &def.tasks[self.nodes[unit.task].template];
        let base = self.base_attempts(unit);
        let made = self.record_ref(unit).attempts;
        let attempts = made - base.min(made);
        let retry = if self.cancelled {
            Retry::Exhausted
        } else if attempts <= task.retries {
            let delay =
                TimeDelta::from_std(task.retry_delay_for(attempts)).unwrap_or(TimeDelta::MAX);
            let max_delay = TimeDelta::from_std(task.retry_delay_cap()).unwrap_or(TimeDelta::MAX);
            Retry::Remaining { delay, max_delay }
        } else {
            Retry::Exhausted
        };
        let guest_cancelled = matches!(outcome.ending, Ending::Cancelled);
        let mut state = State::after_run(&outcome.ending, retry, self.now());
        if let Ending::Lost { message } = &outcome.ending
            && state.state_type() == StateType::Scheduled
        {
            self.record_crashed(unit, message);
        }
        let output = (state.state_type() == StateType::Completed)
            .then(|| state.result.take().unwrap_or_else(Json::null));
        let record = self.record(unit);
        record.run_time += outcome.usage.duration;
        record.fuel_consumed += outcome.usage.fuel_consumed;
        record.memory_peak_bytes = record
            .memory_peak_bytes
            .max(outcome.usage.memory_peak_bytes);
        self.add_logs(Some(unit), outcome.logs);
        let then = Then::Proceed {
            output: output.clone(),
            from_cache: false,
            guest_cancelled,
        };
        self.transition(unit, state, output.map(Blob::Value), then);
    }

    /// The unit's attempt was lost with its worker and will be retried: the Crashed state is
    /// recorded first, so its history says what happened to the attempt before its retry.
    fn record_crashed(&mut self, unit: Unit, message: &str) {
        let crashed = State::new(StateName::Crashed, self.now()).with_message(message);
        let record = self.record(unit);
        record.history.push(Transition {
            from: Some(record.state.name),
            to: crashed.name,
            time: crashed.timestamp,
            message: crashed.message.clone(),
        });
        record.state = crashed;
        self.persist(unit, None);
        if self.settings.events {
            let event = FlowEvent::Task {
                name: self.name_of(unit.task).to_string(),
                map_index: self.map_index(unit),
                state: StateName::Crashed,
            };
            self.commands.push_back(Command::Event(event));
        }
    }

    /// Take in log records of the unit (`None`: of a code flow's body), within the flow run's
    /// `max_log_bytes`: with a store they are handed to it and not kept here (the record's
    /// `logs` stay empty); without one they go into the unit's record (the run's, for the
    /// body). Records past the cap are dropped and counted (see
    /// [`FlowMachine::note_dropped_logs`]).
    pub(super) fn add_logs(&mut self, unit: Option<Unit>, mut logs: Vec<LogRecord>) {
        let cap = self.def.max_log_bytes;
        let mut kept = 0;
        for r in &logs {
            let cost = r.cost();
            if self.logs.dropped_records > 0 || self.logs.kept.saturating_add(cost) > cap {
                break;
            }
            self.logs.kept += cost;
            kept += 1;
        }
        if kept < logs.len() {
            let dropped = logs.split_off(kept);
            self.logs.first_dropped.get_or_insert(unit);
            self.logs.dropped_records += dropped.len() as u64;
            self.logs.dropped_bytes = dropped.iter().fold(self.logs.dropped_bytes, |n, r| {
                n.saturating_add(r.message.len() as u64)
            });
        }
        if !logs.is_empty() {
            self.deliver_logs(unit, logs);
        }
    }

    /// Hand log records of the unit (or the body) to the store, or keep them on its record when
    /// the run has no store.
    fn deliver_logs(&mut self, unit: Option<Unit>, records: Vec<LogRecord>) {
        match (self.settings.record, unit) {
            (true, Some(unit)) => {
                let write = Write::Logs {
                    run: self.run.id,
                    task_run: self.record_ref(unit).id,
                    task: self.name_of(unit.task).clone(),
                    map_index: self.map_index(unit),
                    records,
                };
                self.commands.push_back(Command::Write(write));
            }
            (true, None) => {
                let write = Write::Logs {
                    run: self.run.id,
                    task_run: TaskRunId::of_body(self.run.id),
                    task: Arc::from(BODY_LOG_NAME),
                    map_index: None,
                    records,
                };
                self.commands.push_back(Command::Write(write));
            }
            (false, Some(unit)) => self.record(unit).logs.extend(records),
            (false, None) => self.run.logs.extend(records),
        }
    }

    /// At the end of the run, when the flow run's `max_log_bytes` dropped records: one record,
    /// on the task run that first lost some, naming the cap and what was dropped.
    pub(super) fn note_dropped_logs(&mut self) {
        let Some(who) = self.logs.first_dropped.take() else {
            return;
        };
        let record = LogRecord {
            time: self.now(),
            source: LogSource::Log,
            level: LogLevel::Warn,
            message: format!(
                "[sluice] logs truncated: the flow run's log cap (max_log_bytes = {} bytes) was \
                 reached in this task run; {} more bytes in {} records were dropped from the flow \
                 run's logs",
                self.def.max_log_bytes, self.logs.dropped_bytes, self.logs.dropped_records
            ),
        };
        self.deliver_logs(who, vec![record]);
    }

    /// After an attempt (or a cache hit) ended in `state`: wait for the retry, hand the output
    /// on, or finish the unit.
    pub(super) fn proceed(&mut self, unit: Unit, state: &State, output: Option<Json>) {
        match state.state_type() {
            StateType::Scheduled => {
                let at = state.scheduled_for.unwrap_or_else(|| self.now());
                self.timers += 1;
                self.commands.push_back(Command::Timer { unit, at });
            }
            StateType::Completed => {
                let out = output.unwrap_or_else(Json::null);
                // A code flow's body that dropped its handle reads nothing of it.
                let unwanted = self.def.body.is_some() && self.nodes[unit.task].consumers_left == 0;
                match (unit.child, &mut self.nodes[unit.task].map) {
                    (Some(c), Some(map)) => map.outputs[c as usize] = Some(out),
                    _ if unwanted => self.run.tasks[unit.task].output_released = true,
                    _ => self.nodes[unit.task].output = Some(out),
                }
                self.unit_finished(unit);
            }
            _ if state.is_terminal() => self.unit_finished(unit),
            // Paused: waits to be resumed with its cached input.
            _ => {}
        }
    }

    /// A unit that missed the cache completed: its output is cached under the key it missed.
    pub(super) fn cache_output(&mut self, unit: Unit, state: &State, output: Option<&Json>) {
        let Some(key) = self.cache_keys.remove(&unit) else {
            return;
        };
        let (Some(policy), Some(out)) = (&self.task_def(unit.task).cache, output) else {
            return;
        };
        if state.name != StateName::Completed || !self.settings.record {
            return;
        }
        let expires_at = TimeDelta::from_std(policy.cache_for)
            .ok()
            .and_then(|d| state.timestamp.checked_add_signed(d))
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        let write = CacheWrite {
            key,
            output: out.clone(),
            created_at: state.timestamp,
            expires_at,
            flow_run: self.run.id,
            task_run: self.record_ref(unit).id,
        };
        self.commands
            .push_back(Command::Write(Write::Cache(Box::new(write))));
    }
}
