//! Transitions: every state change goes through the in-process handlers, then the task's handler
//! components (a command, answered later), then what their replacement may be (the retry budget
//! for an attempt's state), and is recorded and written; cancellation; the flow run's own state.

use super::*;

impl FlowMachine {
    pub(super) fn begin_cancel(&mut self) {
        self.cancelled = true;
        self.flow_transition(
            State::new(StateName::Cancelling, self.now())
                .with_message("cancel requested: interrupting running tasks"),
        );
        // Units waiting for an executor's slot never started: Cancelled, their requests
        // given up (a slot granted later goes back).
        let mut awaiting: Vec<Unit> = self.awaiting.drain().collect();
        awaiting.sort_unstable();
        for unit in awaiting {
            self.release_slot(unit);
            self.commands.push_back(Command::Release(unit));
            let s = State::new(StateName::Cancelled, self.now())
                .with_message("the flow run was cancelled before this task started");
            self.transition(unit, s, None, Then::Finished);
        }
        // Handlers still running are not waited for: their transitions are recorded as the
        // in-process handlers left them.
        if !self.hooks.is_empty() {
            self.commands.push_back(Command::AbortHooks);
            let mut pending: Vec<(Unit, Pending)> = self.hooks.drain().collect();
            pending.sort_by_key(|(_, p)| p.seq);
            for (unit, p) in pending {
                if matches!(p.then, Then::Launch) {
                    // An attempt whose start (Running) awaited the handlers does not start
                    // now: nothing new starts once cancelled.
                    self.abandon_start(unit);
                    let s = State::new(StateName::Cancelled, self.now())
                        .with_message("the flow run was cancelled before this task started");
                    self.transition(unit, s, None, Then::Finished);
                    continue;
                }
                self.complete_transition(unit, p.old, p.state, p.output, p.proposed, p.then);
            }
        }
        // Retries waiting on a timer will not run.
        if self.timers > 0 {
            self.timers = 0;
            self.commands.push_back(Command::AbortTimers);
        }
        let waiting: Vec<Unit> = (0..self.run.tasks.len())
            .flat_map(|i| {
                let t = &self.run.tasks[i];
                let own = (t.state.state_type() == StateType::Scheduled).then_some(Unit::task(i));
                // Only children of a mapped run in progress (not records from before a resume).
                let active = self.nodes[i].map.is_some();
                let children = t
                    .children
                    .iter()
                    .enumerate()
                    .filter(move |(_, c)| active && c.state.state_type() == StateType::Scheduled)
                    .map(move |(c, _)| Unit {
                        task: i,
                        child: Some(c as u32),
                    });
                own.into_iter().chain(children)
            })
            .collect();
        for unit in waiting {
            let s = State::new(StateName::Cancelled, self.now())
                .with_message("the flow run was cancelled while this task awaited a retry");
            self.transition(unit, s, None, Then::Finished);
        }
    }

    /// The flow run's state once nothing runs: Cancelled, Paused (tasks wait to be resumed), or
    /// what its reference tasks (by default the tasks nothing depends on) say.
    pub(super) fn final_state(&self) -> State {
        let now = self.now();
        let unfinished: Vec<&str> = self
            .run
            .tasks
            .iter()
            .filter(|t| !t.state.is_terminal())
            .map(|t| t.name.as_str())
            .collect();
        if self.cancelled {
            return State::new(StateName::Cancelled, now)
                .with_message("the flow run was cancelled");
        }
        if !unfinished.is_empty() {
            return State::new(StateName::Paused, now).with_message(format!(
                "waiting on paused tasks: {}",
                unfinished.join(", ")
            ));
        }
        if self.def.body.is_some() {
            return self.code_final_state(now);
        }
        let refs: Vec<usize> = if self.def.reference_tasks.is_empty() {
            (0..self.nodes.len())
                .filter(|&i| self.nodes[i].downstream.is_empty())
                .collect()
        } else {
            self.def
                .reference_tasks
                .iter()
                .filter_map(|r| self.index.get(r).copied())
                .collect()
        };
        let failed: Vec<&str> = refs
            .iter()
            .filter(|&&i| {
                matches!(
                    self.run.tasks[i].state.state_type(),
                    StateType::Failed | StateType::Crashed
                )
            })
            .map(|&i| self.run.tasks[i].name.as_str())
            .collect();
        if !failed.is_empty() {
            State::new(StateName::Failed, now).with_message(format!(
                "reference tasks did not succeed: {}",
                failed.join(", ")
            ))
        } else if refs
            .iter()
            .all(|&i| self.run.tasks[i].state.state_type() == StateType::Completed)
        {
            State::new(StateName::Completed, now).with_message("all reference tasks succeeded")
        } else {
            State::new(StateName::Cancelled, now)
                .with_message("some reference tasks were cancelled")
        }
    }

    /// Move a unit to `new`, through the state handlers, carrying `output` (recorded when the
    /// unit ends in a Completed-type state); `then` follows once it is recorded. What the
    /// handlers replace `new` with is held to what `then` can follow
    /// ([`FlowMachine::police_replacement`]).
    pub(super) fn transition(&mut self, unit: Unit, new: State, output: Option<Blob>, then: Then) {
        let name = self.name_of(unit.task).clone();
        let old = self.record_ref(unit).state.clone();
        let proposed = (new.name, new.scheduled_for);
        let mut state = new;
        let handlers = self.settings.handlers.clone();
        if let Some(hs) = handlers.task.get(&*name) {
            for h in hs {
                state = h(&name, &old, state);
            }
        }
        for h in &handlers.every_task {
            state = h(&name, &old, state);
        }
        let kinds = self.hook_kinds(unit.task, &state);
        if kinds != HookKinds::default() && !self.cancelled {
            self.next_seq += 1;
            let seq = self.next_seq;
            let attempt = self.record_ref(unit).attempts.max(1);
            let request = HookRequest {
                unit,
                template: self.nodes[unit.task].template,
                seq,
                old: old.clone(),
                new: state.clone(),
                kinds,
                ctx: self.context_of(unit, attempt),
            };
            self.commands.push_back(Command::RunHooks(request));
            let pending = Pending {
                seq,
                old,
                state,
                proposed,
                output,
                then,
            };
            self.hooks.insert(unit, pending);
            return;
        }
        self.complete_transition(unit, old, state, output, proposed, then);
    }

    /// Which of the task's handler lists apply to a transition into `state`.
    pub(super) fn hook_kinds(&self, task: usize, state: &State) -> HookKinds {
        let hooks = &self.task_def(task).hooks;
        let ty = state.state_type();
        HookKinds {
            on_state: !hooks.on_state.is_empty(),
            on_completion: ty == StateType::Completed && !hooks.on_completion.is_empty(),
            on_failure: matches!(ty, StateType::Failed | StateType::Crashed)
                && !hooks.on_failure.is_empty(),
            on_retry: state.name == StateName::Retrying && !hooks.on_retry.is_empty(),
        }
    }

    /// Record the transition the handlers left and do what follows it.
    pub(super) fn complete_transition(
        &mut self,
        unit: Unit,
        old: State,
        mut state: State,
        output: Option<Blob>,
        proposed: (StateName, Option<DateTime<Utc>>),
        mut then: Then,
    ) {
        if (state.name, state.scheduled_for) != proposed {
            (state, then) = self.police_replacement(unit, proposed.0, state, then);
        }
        if self.def.body.is_some() && state.state_type() == StateType::Paused {
            // Nobody could resume it: a code flow's body waits for its task runs.
            state = State::new(StateName::Failed, state.timestamp).with_message(format!(
                "a task run of a flow written as code cannot pause (its body would wait for it \
                 for ever){}",
                state
                    .message
                    .as_deref()
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default()
            ));
        }
        let record = self.record(unit);
        record.history.push(Transition {
            from: Some(old.name),
            to: state.name,
            time: state.timestamp,
            message: state.message.clone(),
        });
        record.state = state.clone();
        self.persist(unit, output);
        if self.settings.events {
            let event = FlowEvent::Task {
                name: self.name_of(unit.task).to_string(),
                map_index: self.map_index(unit),
                state: state.name,
            };
            self.commands.push_back(Command::Event(event));
        }
        match then {
            Then::Wait | Then::End => {}
            Then::Finished => self.unit_finished(unit),
            Then::Launch => self.launch(unit),
            Then::Proceed {
                output,
                from_cache,
                guest_cancelled,
            } => {
                if !from_cache && state.is_terminal() {
                    self.cache_output(unit, &state, output.as_ref());
                }
                if from_cache && state.state_type() == StateType::Scheduled {
                    // A handler asked to run it again: this time the component runs.
                    self.skip_cache.insert(unit);
                }
                if guest_cancelled && !self.cancelled {
                    // The guest saw the cancel before the driver did.
                    self.begin_cancel();
                }
                self.proceed(unit, &state, output);
            }
        }
    }

    /// The state handlers replaced `proposed` with `state`: a replacement stands only where
    /// what follows `proposed` can go on from it. Otherwise the task run is Failed (Cancelled
    /// once the flow run is being cancelled), saying why, rather than left in a state nothing
    /// moves it on from (Sluice's rule: Prefect 1 leaves a task in whatever state a handler
    /// returns; its task runner does run only a Running task, as below).
    ///
    /// - The start of an attempt (Running, Retrying): a Running-type state starts it; a
    ///   finished state ends the task run without running the component (the attempt is not
    ///   counted and nothing is cached).
    /// - The end of an attempt or a cache hit: see [`FlowMachine::police_attempt_replacement`].
    /// - A pause (`manual_only`): a paused state waits; a finished one ends the task run.
    /// - A state that ends the task run without an attempt (Skipped, TriggerFailed, Cancelled,
    ///   a mapped parent's end): only a finished state.
    pub(super) fn police_replacement(
        &mut self,
        unit: Unit,
        proposed: StateName,
        state: State,
        then: Then,
    ) -> (State, Then) {
        // A unit that ends here without (another) attempt: output null if it completed.
        let ends = Then::Proceed {
            output: None,
            from_cache: false,
            guest_cancelled: false,
        };
        let ty = state.state_type();
        match then {
            Then::Proceed { .. } => (self.police_attempt_replacement(unit, proposed, state), then),
            Then::Launch if ty == StateType::Running => (state, then),
            Then::Launch => {
                self.abandon_start(unit);
                if state.is_terminal() {
                    return (state, ends);
                }
                let why = " before the attempt started (only Running, Retrying, or a finished \
                           state, which skips the attempt, can replace it)";
                (self.refuse(proposed, &state, why), ends)
            }
            Then::Wait if ty == StateType::Paused => (state, then),
            Then::Wait if state.is_terminal() => (state, ends),
            Then::Wait => {
                let why = " (only a paused or a finished state can replace a pause)";
                (self.refuse(proposed, &state, why), ends)
            }
            Then::Finished | Then::End if state.is_terminal() => (state, then),
            Then::Finished | Then::End => {
                let why = format!(
                    " but {proposed} ends the task run (only a finished state can replace it)"
                );
                (self.refuse(proposed, &state, &why), then)
            }
        }
    }

    /// An attempt whose start was recorded does not start after all: it is not counted, its
    /// slots (the run's and an executor's) go back, and the key a cache miss kept to cache its
    /// output is dropped.
    fn abandon_start(&mut self, unit: Unit) {
        let rec = self.record(unit);
        rec.attempts = rec.attempts.saturating_sub(1);
        self.release_slot(unit);
        self.commands.push_back(Command::Release(unit));
        self.cache_keys.remove(&unit);
    }

    /// The state a refused replacement leaves: Failed, saying why (`why` follows "a state
    /// handler replaced X with Y"), or Cancelled once the flow run is being cancelled.
    fn refuse(&self, proposed: StateName, state: &State, why: &str) -> State {
        let name = match self.cancelled {
            true => StateName::Cancelled,
            false => StateName::Failed,
        };
        State::new(name, self.now()).with_message(format!(
            "a state handler replaced {proposed} with {}{why}",
            state.name
        ))
    }

    /// A state handler replaced the state an attempt ended in (`proposed`) with `state`. A
    /// Scheduled-type replacement asks to run the task again: it is a retry like any other, so
    /// it needs a retry left (attempts never exceed `retries + 1`), and it starts within the
    /// task's retry delay cap; otherwise the task is Failed, saying why. A replacement that
    /// would leave the task neither finished, paused nor scheduled (Running, Pending,
    /// Cancelling) would wait for ever, and fails too.
    fn police_attempt_replacement(
        &self,
        unit: Unit,
        proposed: StateName,
        mut state: State,
    ) -> State {
        let task = self.task_def(unit.task);
        let now = self.now();
        match state.state_type() {
            StateType::Scheduled => {
                let rec = self.record_ref(unit);
                let used = rec.attempts.saturating_sub(self.base_attempts(unit));
                if self.cancelled {
                    return self.refuse(proposed, &state, ", but the flow run is being cancelled");
                }
                if used > task.retries {
                    let why = format!(
                        " to run the task again, but no retries remain ({used} attempts made, \
                         retries = {})",
                        task.retries
                    );
                    return self.refuse(proposed, &state, &why);
                }
                let cap = TimeDelta::from_std(task.retry_delay_cap()).unwrap_or(TimeDelta::MAX);
                let latest = now
                    .checked_add_signed(cap)
                    .unwrap_or(DateTime::<Utc>::MAX_UTC);
                let at = state.scheduled_for.unwrap_or(now);
                if at > latest {
                    let note = format!(
                        "(the handler's start time {} is capped at {} from now, the task's \
                         longest retry delay: max_retry_delay, or backoff.max)",
                        at.to_rfc3339(),
                        humantime::format_duration(task.retry_delay_cap())
                    );
                    state.message = Some(match state.message.take() {
                        Some(m) => format!("{m} {note}"),
                        None => note,
                    });
                }
                state.scheduled_for = Some(at.min(latest));
                state
            }
            StateType::Running | StateType::Pending | StateType::Cancelling => {
                let why = ", which cannot follow a finished attempt (only a finished, paused or \
                           scheduled state can)";
                self.refuse(proposed, &state, why)
            }
            _ => state,
        }
    }

    /// Send the unit's state and its last transition to the store. Its input is stored when it
    /// will be needed later (a retry, or a paused task), its output when it completed.
    pub(super) fn persist(&mut self, unit: Unit, output: Option<Blob>) {
        if !self.settings.record {
            return;
        }
        let first = self.unwritten.remove(&unit);
        self.write(|m| {
            let parent = unit.child.map(|_| m.run.tasks[unit.task].id);
            let rec = m.record_ref(unit);
            let transitions = match first {
                true => rec.history.clone(),
                false => rec.history.last().cloned().into_iter().collect(),
            };
            let mut write = task_write(
                m.run.id,
                (unit.task, m.name_of(unit.task).clone()),
                parent,
                rec,
                transitions,
            );
            if rec.state.state_type() == StateType::Completed {
                write.output = output;
            }
            Write::Task(Box::new(write))
        });
    }

    pub(super) fn flow_transition(&mut self, new: State) {
        let old = self.run.state.clone();
        let mut state = new;
        let handlers = self.settings.handlers.clone();
        for h in &handlers.flow {
            state = h(&self.run.flow, &old, state);
        }
        let transition = Transition {
            from: Some(old.name),
            to: state.name,
            time: state.timestamp,
            message: state.message.clone(),
        };
        self.run.history.push(transition.clone());
        self.emit(|| FlowEvent::Flow(state.name));
        let run = self.run.id;
        self.write(|_| Write::FlowState {
            run,
            state: state.clone(),
            transition,
        });
        self.run.state = state;
    }
}
