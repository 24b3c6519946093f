//! The graph side of the machine: preparing the node table from a record (fresh or resumed),
//! evaluating a task once every upstream task finished (cancel, skip propagation, its trigger),
//! resolving its input (sharing upstream outputs, released once the last consumer has them),
//! making mapped children (under the flow's cap), and waking downstream tasks when a task
//! finishes.

use super::*;

impl FlowMachine {
    /// Prepare the node table from the run record (a fresh run, or one being resumed).
    pub(super) fn restore(&mut self) {
        let now = self.now();
        for i in 0..self.nodes.len() {
            let rec = &mut self.run.tasks[i];
            self.nodes[i].base_attempts = if self.settings.keep_retry_budget {
                0
            } else {
                rec.attempts
            };
            if rec.state.state_type() == StateType::Completed {
                self.nodes[i].output = rec.output.take();
                continue;
            }
            if !matches!(rec.state.name, StateName::Pending) {
                reset_to_pending(rec, now);
                self.persist(Unit::task(i), None);
            }
            // Children are kept: when the task is scheduled again, completed children keep their
            // outputs and only the others run.
        }
        // Count unfinished upstream tasks; completed ones already delivered (or still hold)
        // their outputs.
        for i in 0..self.nodes.len() {
            if self.starts.contains(&i) {
                self.nodes[i].waiting_on = 0;
                continue;
            }
            let waiting = self.nodes[i]
                .upstream
                .iter()
                .filter(|&&u| !self.run.tasks[u].state.is_terminal())
                .count();
            self.nodes[i].waiting_on = waiting;
        }
        for i in 0..self.nodes.len() {
            let unchanged = self.nodes[i]
                .data_upstream
                .iter()
                .all(|&u| self.run.tasks[u].state.state_type() == StateType::Completed);
            self.nodes[i].input_unchanged = unchanged;
        }
        // A consumer that already received an output (it has a cached input, or completed)
        // no longer holds it.
        for i in 0..self.nodes.len() {
            let received = self.run.tasks[i].cached_input.is_some()
                || self.run.tasks[i].state.state_type() == StateType::Completed;
            if received {
                for u in self.nodes[i].data_upstream.clone() {
                    self.release_one(u);
                }
            }
        }
    }

    /// Every upstream task finished (or the task is a start task): decide whether it runs.
    pub(super) fn evaluate(&mut self, i: usize) {
        if std::mem::replace(&mut self.nodes[i].evaluated, true) {
            return;
        }
        let unit = Unit::task(i);
        if self.cancelled {
            let s = State::new(StateName::Cancelled, self.now())
                .with_message("the flow run was cancelled before this task started");
            return self.transition(unit, s, None, Then::Finished);
        }
        if !self.starts.contains(&i) {
            let def = self.def.clone();
            let task = &def.tasks[self.nodes[i].template];
            let trigger = self.nodes[i].trigger.unwrap_or(task.trigger);
            let ups = self.nodes[i].upstream.clone();
            // Prefect 1 expands a mapped upstream task into its children's states, for the
            // trigger and for skip propagation alike.
            let states: Vec<StateName> =
                ups.iter().flat_map(|&u| self.upstream_states(u)).collect();
            if task.skip_on_upstream_skip && states.contains(&StateName::Skipped) {
                let u = ups
                    .iter()
                    .copied()
                    .find(|&u| self.upstream_states(u).any(|s| s == StateName::Skipped))
                    .unwrap_or(i);
                let what = match self.expands(u) {
                    true => format!("a mapped child of upstream task `{}`", self.name_of(u)),
                    false => format!("upstream task `{}`", self.name_of(u)),
                };
                let s = State::new(StateName::Skipped, self.now())
                    .with_message(format!("{what} was skipped"));
                return self.transition(unit, s, None, Then::Finished);
            }
            match trigger.decide_expanded(!ups.is_empty(), &states) {
                TriggerDecision::Run => {}
                TriggerDecision::Fail => {
                    let detail: Vec<String> =
                        ups.iter().map(|&u| self.upstream_detail(u)).collect();
                    let msg = format!(
                        "trigger `{}` did not pass: {}",
                        trigger.as_str(),
                        detail.join(", ")
                    );
                    let s = State::new(StateName::TriggerFailed, self.now()).with_message(msg);
                    return self.transition(unit, s, None, Then::Finished);
                }
                TriggerDecision::Pause => {
                    self.resolve_input(i);
                    let s = State::new(StateName::Paused, self.now()).with_message(
                        "manual_only: waiting to be resumed with this task as a start task",
                    );
                    return self.transition(unit, s, None, Then::Wait);
                }
            }
        }
        self.resolve_input(i);
        self.schedule(i);
    }

    /// Whether upstream task `u` counts as its mapped children: it is mapped and made its
    /// children (an empty map made none and counts as no state; a map that failed before making
    /// any counts as its own state).
    pub(super) fn expands(&self, u: usize) -> bool {
        let rec = &self.run.tasks[u];
        self.task_def(u).map != MapOver::No
            && (rec.state.name == StateName::Mapped || !rec.children.is_empty())
    }

    /// The states upstream task `u` counts as for triggers and skips.
    pub(super) fn upstream_states(&self, u: usize) -> impl Iterator<Item = StateName> + '_ {
        let rec = &self.run.tasks[u];
        let (own, children) = match self.expands(u) {
            true => (None, &rec.children[..]),
            false => (Some(rec.state.name), &[][..]),
        };
        own.into_iter().chain(children.iter().map(|c| c.state.name))
    }

    /// How upstream task `u` stands, for a TriggerFailed message.
    fn upstream_detail(&self, u: usize) -> String {
        let rec = &self.run.tasks[u];
        let name = self.name_of(u);
        if !self.expands(u) {
            return format!("`{name}` is {}", rec.state.name);
        }
        if rec.children.is_empty() {
            return format!("`{name}` mapped no children");
        }
        let mut counts: Vec<(StateName, usize)> = Vec::new();
        for c in &rec.children {
            match counts.iter_mut().find(|(s, _)| *s == c.state.name) {
                Some((_, n)) => *n += 1,
                None => counts.push((c.state.name, 1)),
            }
        }
        let counts: Vec<String> = counts.iter().map(|(s, n)| format!("{n} {s}")).collect();
        format!("`{name}`'s mapped children are {}", counts.join(", "))
    }

    /// Resolve the task's input from parameters and upstream outputs (or reuse the cached one),
    /// and cache it on the task run.
    pub(super) fn resolve_input(&mut self, i: usize) {
        if self.nodes[i].input.is_some() {
            return;
        }
        if let Some(cached) = self.run.tasks[i].cached_input.clone() {
            self.nodes[i].input = Some(cached);
            return;
        }
        let task = &self.def.tasks[self.nodes[i].template];
        let params = &self.run.parameters;
        let (nodes, index) = (&self.nodes, &self.index);
        // An output is shared, not copied (`Json` is reference-counted); the node's own share
        // goes once its last consumer has it (`release_one`).
        let value = task
            .input
            .resolve(&|p| params.get(p).map(Json::from_value), &mut |t| {
                nodes[*index.get(t)?].output.clone()
            });
        for u in self.nodes[i].data_upstream.clone() {
            self.release_one(u);
        }
        self.run.tasks[i].cached_input = Some(value.clone());
        self.nodes[i].input = Some(value);
    }

    /// One consumer of `u`'s output received it; drop the output when none is left.
    pub(super) fn release_one(&mut self, u: usize) {
        let node = &mut self.nodes[u];
        node.consumers_left = node.consumers_left.saturating_sub(1);
        if node.consumers_left == 0 && self.run.tasks[u].state.state_type() == StateType::Completed
        {
            node.output = None;
            self.run.tasks[u].output_released = true;
        }
    }

    /// Queue the task (or its mapped children). Newly ready work goes to the front of the queue
    /// (depth first): a consumer runs soon after its producer, so outputs waiting to be consumed
    /// stay few however wide the flow is.
    pub(super) fn schedule(&mut self, i: usize) {
        let def = self.def.clone();
        let task = &def.tasks[self.nodes[i].template];
        if task.map == MapOver::No {
            match self.def.body {
                // A code flow's task runs start in the order the body submitted them.
                Some(_) => self.ready.push_back(Unit::task(i)),
                None => self.ready.push_front(Unit::task(i)),
            }
            return;
        }
        let input = self.nodes[i].input.clone().unwrap_or_else(Json::null);
        let unit = Unit::task(i);
        // The cap on mapped children, checked before any child is created.
        let others = self
            .mapped_children
            .saturating_sub(self.run.tasks[i].children.len());
        if let Some(n) = mapping::map_len(&input, &task.map) {
            let cap = def.max_mapped_children;
            let total = others.saturating_add(n);
            if total > cap {
                let msg = match others {
                    0 => format!(
                        "mapping over {n} elements would make more mapped children than the \
                         flow's max_mapped_children of {cap}"
                    ),
                    _ => format!(
                        "mapping over {n} elements would make {total} mapped children in this \
                         flow run ({others} already), more than the flow's max_mapped_children \
                         of {cap}"
                    ),
                };
                let s = State::new(StateName::Failed, self.now()).with_message(msg);
                return self.transition(unit, s, None, Then::Finished);
            }
        }
        let children = match mapping::children(&input, &task.map) {
            Ok(c) => {
                self.mapped_children = others.saturating_add(c.len());
                c
            }
            Err(msg) => {
                let s = State::new(StateName::Failed, self.now()).with_message(msg);
                return self.transition(unit, s, None, Then::Finished);
            }
        };
        let now = self.now();
        let n = children.len();
        let mut map = MapRun {
            children_left: n,
            outputs: vec![None; n],
            inputs: children,
            base_attempts: vec![0; n],
        };
        // Resuming: children recorded before keep their place (by map index); completed ones
        // keep their outputs, the others run again with retries counted from the attempts they
        // made. Children never recorded are created.
        let previous = std::mem::take(&mut self.run.tasks[i].children);
        let mut slots: Vec<Option<TaskRun>> = (0..n).map(|_| None).collect();
        for child in previous {
            if let Some(k) = child.map_index.map(|k| k as usize)
                && k < n
                && slots[k].is_none()
            {
                slots[k] = Some(child);
            }
        }
        let mut fresh = vec![false; n];
        self.run.tasks[i].children = slots
            .into_iter()
            .enumerate()
            .map(|(c, slot)| {
                slot.unwrap_or_else(|| {
                    fresh[c] = true;
                    TaskRun::new(&task.name, Some(c as u32), now)
                })
            })
            .collect();
        let mut todo = Vec::with_capacity(n);
        for (c, is_new) in fresh.into_iter().enumerate() {
            let unit = Unit {
                task: i,
                child: Some(c as u32),
            };
            todo.push(c);
            if is_new {
                // Recorded with its first transition (one row write instead of two).
                self.unwritten.insert(unit);
                continue;
            }
            let keep = self.nodes[i].input_unchanged;
            let child = &mut self.run.tasks[i].children[c];
            map.base_attempts[c] = if self.settings.keep_retry_budget {
                0
            } else {
                child.attempts
            };
            if keep && child.state.state_type() == StateType::Completed {
                map.outputs[c] = Some(child.output.take().unwrap_or_else(Json::null));
                map.children_left -= 1;
                todo.pop();
                continue;
            }
            if child.state.name != StateName::Pending {
                reset_to_pending(child, now);
                self.persist(unit, None);
            }
        }
        let left = map.children_left;
        self.nodes[i].map = Some(Box::new(map));
        if left == 0 {
            return self.complete_mapped(i);
        }
        for c in todo.into_iter().rev() {
            self.ready.push_front(Unit {
                task: i,
                child: Some(c as u32),
            });
        }
    }

    pub(super) fn unit_finished(&mut self, unit: Unit) {
        match unit.child {
            None => self.task_finished(unit.task),
            Some(_) => {
                let left = self.nodes[unit.task].map.as_mut().map_or(0, |m| {
                    m.children_left = m.children_left.saturating_sub(1);
                    m.children_left
                });
                if left == 0 {
                    self.complete_mapped(unit.task);
                }
            }
        }
    }

    /// Every child of a mapped task finished: the parent is Mapped with the list of outputs, or
    /// Failed when any child did not succeed.
    pub(super) fn complete_mapped(&mut self, i: usize) {
        let children = &self.run.tasks[i].children;
        let bad: Vec<String> = children
            .iter()
            .filter(|c| c.state.state_type() != StateType::Completed)
            .map(|c| format!("{} is {}", c.map_index.unwrap_or_default(), c.state.name))
            .collect();
        let n = children.len();
        let now = self.now();
        let map = self.nodes[i].map.take().unwrap_or_default();
        let mut output = None;
        let state = if bad.is_empty() {
            let list = Json::array(
                map.outputs
                    .into_iter()
                    .map(|o| o.unwrap_or_else(Json::null)),
            );
            output = Some(Blob::Value(list.clone()));
            self.nodes[i].output = Some(list);
            State::new(StateName::Mapped, now).with_message(format!("{n} mapped runs completed"))
        } else if self.cancelled {
            State::new(StateName::Cancelled, now).with_message("mapped runs were cancelled")
        } else {
            State::new(StateName::Failed, now).with_message(format!(
                "{} of {n} mapped runs did not succeed: {}",
                bad.len(),
                bad.join(", ")
            ))
        };
        self.transition(Unit::task(i), state, output, Then::Finished);
    }

    /// The task reached a terminal state: release what it held and wake its downstream tasks.
    pub(super) fn task_finished(&mut self, i: usize) {
        self.nodes[i].input = None;
        if self.run.tasks[i].state.state_type() == StateType::Completed {
            self.run.tasks[i].cached_input = None;
        } else {
            // What did not complete hands nothing on (a mapped task's list, when a handler
            // replaced its Mapped).
            self.nodes[i].output = None;
        }
        let before = self.wake.len();
        for k in 0..self.nodes[i].downstream.len() {
            let d = self.nodes[i].downstream[k];
            let node = &mut self.nodes[d];
            node.waiting_on = node.waiting_on.saturating_sub(1);
            if node.waiting_on == 0 && !node.evaluated && !self.run.tasks[d].state.is_terminal() {
                self.wake.push(d);
            }
        }
        // A stack: the first woken is evaluated first, and what it wakes before the next one.
        self.wake[before..].reverse();
        if self.def.body.is_some() {
            self.commands.push_back(Command::Settled(i));
        }
    }
}
