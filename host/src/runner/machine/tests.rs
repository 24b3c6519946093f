//! Property tests of the flow state machine: random flows (DAGs of 1–12 tasks with random
//! triggers, retries, delays, mapping, reference tasks, tags, handler components) and random
//! outcomes per attempt (an output, each signal, a trap, a time-out, a limit, a host fault, a
//! cancel at a random step), driven by a small synchronous driver on a [`SimClock`], with the
//! invariants checked on every command and on the final record:
//!
//! 1. when the machine is idle and finished, every task and mapped child is in one final place:
//!    terminal, Paused, or (only in a Paused flow run) Pending because it waits on a paused task
//!    or on paused children; every history is a chain that never leaves a terminal state;
//! 2. no attempt of a task starts before every upstream task is finished, and nothing starts
//!    after the run is cancelled; the trigger and skip rules decided what ran;
//! 3. attempts of every unit never exceed `retries + 1`, and match the record's `attempts`;
//! 4. the flow run's state follows its reference tasks (computed here from the final record);
//! 5. replaying the event log (same events, same clock readings) into a fresh machine gives the
//!    same commands and the same transitions (determinism: the basis of replay).
//!
//! CI runs a fixed number of cases from a fixed seed (see [`config`]). To run more, or another
//! seed: `PROPTEST_CASES=100000 cargo test --release --lib runner::machine::tests` (and
//! `PROPTEST_RNG_SEED=<u64>`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};
use serde_json::json;

use super::*;
use crate::clock::{Clock, SimClock};
use crate::flow::{Backoff, FlowBuilder, Input, TaskDef, Trigger};
use crate::sandbox::{Limit, LimitExceeded, Signal, TimeLimit, Usage};
use crate::store::{CacheEntry, TaskWrite};

/// Cases in CI (about 0.4 s in release; 100,000 take about 40 s).
const CASES: u32 = 1024;
/// The seed in CI, so every CI run checks the same cases.
const SEED: u64 = 0x51_00C0_FFEE;

/// Fixed cases and seed unless `PROPTEST_CASES` / `PROPTEST_RNG_SEED` say otherwise. Failures
/// are not written to the source tree (the seed is fixed; minimal cases found become tests).
fn config() -> Config {
    let mut c = Config::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = CASES;
    }
    if std::env::var_os("PROPTEST_RNG_SEED").is_none() {
        c.rng_seed = RngSeed::Fixed(SEED);
    }
    c.failure_persistence = None;
    c
}

// ---------------------------------------------------------------------------------------------
// What is generated

/// A value an attempt returns.
#[derive(Debug, Clone, Copy)]
enum Out {
    /// A list of this many numbers (a mapped task downstream makes one child each).
    List(u8),
    /// A number (a mapped task downstream fails: not a list).
    Scalar,
}

impl Out {
    fn value(self) -> Value {
        match self {
            Out::List(n) => Value::Array((0..n).map(|i| json!(i)).collect()),
            Out::Scalar => json!(7),
        }
    }
}

/// How one attempt ends.
#[derive(Debug, Clone, Copy)]
enum Outcome {
    Output(Out),
    Success(Out),
    Fail,
    /// RETRY, with the delay it asks for (seconds).
    Retry(Option<u8>),
    Skip,
    Pause,
    Trap,
    TimedOut,
    Limit,
    HostFault,
}

impl Outcome {
    fn ending(self) -> Ending {
        let m = || "scripted".to_owned();
        match self {
            Outcome::Output(o) => Ending::Output(o.value().into()),
            Outcome::Success(o) => Ending::Signal(Signal::Success {
                output: o.value().into(),
                message: m(),
            }),
            Outcome::Fail => Ending::Signal(Signal::Fail { message: m() }),
            Outcome::Retry(d) => Ending::Signal(Signal::Retry {
                message: m(),
                delay: d.map(|s| Duration::from_secs(s.into())),
            }),
            Outcome::Skip => Ending::Signal(Signal::Skip { message: m() }),
            Outcome::Pause => Ending::Signal(Signal::Pause { message: m() }),
            Outcome::Trap => Ending::GuestFault {
                message: "wasm trap: unreachable".into(),
            },
            Outcome::TimedOut => Ending::TimedOut(TimeLimit::Fuel(1000)),
            Outcome::Limit => Ending::LimitExceeded(LimitExceeded {
                limit: Limit::Memory,
                max: 1 << 20,
                requested: Some(2 << 20),
            }),
            Outcome::HostFault => Ending::HostFault {
                message: "host failed".into(),
            },
        }
    }
}

fn outcome() -> impl Strategy<Value = Outcome> {
    let out = prop_oneof![(0u8..4).prop_map(Out::List), Just(Out::Scalar)];
    prop_oneof![
        4 => out.clone().prop_map(Outcome::Output),
        1 => out.prop_map(Outcome::Success),
        2 => Just(Outcome::Fail),
        1 => proptest::option::of(0u8..20).prop_map(Outcome::Retry),
        1 => Just(Outcome::Skip),
        1 => Just(Outcome::Pause),
        1 => Just(Outcome::Trap),
        1 => Just(Outcome::TimedOut),
        1 => Just(Outcome::Limit),
        1 => Just(Outcome::HostFault),
    ]
}

/// Where a mapped task's list comes from.
#[derive(Debug, Clone, Copy)]
enum MapSource {
    /// The parameter `items`.
    Param,
    /// The output of its first data upstream task (the parameter when it has none).
    Upstream,
}

/// One task, with numbers read modulo what they index.
#[derive(Debug, Clone)]
struct TaskSpec {
    /// Upstream tasks: (index modulo this task's index, whether it is a data dependency).
    ups: Vec<(u8, bool)>,
    trigger: Trigger,
    retries: u32,
    retry_delay: u8,
    backoff: Option<(u8, u8)>,
    /// `max_retry_delay` in seconds (the cap on a RETRY signal's delay).
    max_retry_delay: Option<u8>,
    /// Mapped: over what, and whether over a field of an object input (instead of the input).
    map: Option<(MapSource, bool)>,
    skip_on_upstream_skip: bool,
    /// Tagged `t` (limited by the flow's tag limit).
    tagged: bool,
    /// Handler components: (on_state, on_completion, on_failure, on_retry).
    hooks: (bool, bool, bool, bool),
    /// Scripts of attempts: the task (and child 0) follow the first, child `c` the
    /// `c % len`th. Past its end, an attempt returns an empty list.
    scripts: Vec<Vec<Outcome>>,
}

fn task_spec() -> impl Strategy<Value = TaskSpec> {
    let hooks = prop_oneof![
        3 => Just((false, false, false, false)),
        1 => any::<(bool, bool, bool, bool)>(),
    ];
    (
        proptest::collection::vec((any::<u8>(), any::<bool>()), 0..4),
        proptest::sample::select(Trigger::ALL.to_vec()),
        0u32..4,
        0u8..5,
        proptest::option::weighted(0.2, (1u8..4, 1u8..30)),
        proptest::option::weighted(0.3, 1u8..10),
        proptest::option::weighted(
            0.3,
            (
                prop_oneof![Just(MapSource::Param), Just(MapSource::Upstream)],
                any::<bool>(),
            ),
        ),
        proptest::bool::weighted(0.8),
        proptest::bool::weighted(0.2),
        hooks,
        proptest::collection::vec(proptest::collection::vec(outcome(), 0..5), 1..4),
    )
        .prop_map(
            |(
                ups,
                trigger,
                retries,
                retry_delay,
                backoff,
                max_retry_delay,
                map,
                skip_on_upstream_skip,
                tagged,
                hooks,
                scripts,
            )| TaskSpec {
                ups,
                trigger,
                retries,
                retry_delay,
                backoff,
                max_retry_delay,
                map,
                skip_on_upstream_skip,
                tagged,
                hooks,
                scripts,
            },
        )
}

/// A flow, its outcomes and how the driver interleaves what happens.
#[derive(Debug, Clone)]
struct Scenario {
    tasks: Vec<TaskSpec>,
    /// Reference tasks (indices modulo the task count); empty: the terminal tasks.
    refs: Vec<u8>,
    /// The parameter `items`: a list of this many numbers.
    items: u8,
    concurrency: usize,
    tag_limit: usize,
    max_mapped_children: usize,
    events: bool,
    /// Which outstanding thing happens next, step by step (modulo how many are outstanding).
    choices: Vec<u8>,
    /// How far the clock moves before each step (milliseconds).
    steps_ms: Vec<u16>,
    /// Cancel before this step.
    cancel_at: Option<u8>,
    /// After the cancel, attempts end interrupted (`Ending::Cancelled`) rather than as scripted.
    interrupt: bool,
    /// The executor queues: each attempt waits for a slot it grants ([`Command::Acquire`]).
    acquire: bool,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        proptest::collection::vec(task_spec(), 1..=12),
        proptest::collection::vec(any::<u8>(), 0..3),
        0u8..4,
        prop_oneof![Just(64usize), 1usize..4],
        1usize..3,
        prop_oneof![3 => Just(100usize), 1 => 0usize..6],
        any::<bool>(),
        proptest::collection::vec(any::<u8>(), 1..16),
        proptest::collection::vec(0u16..3000, 1..8),
        proptest::option::weighted(0.3, 0u8..40),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(
                tasks,
                refs,
                items,
                concurrency,
                tag_limit,
                max_mapped_children,
                events,
                choices,
                steps_ms,
                cancel_at,
                interrupt,
                acquire,
            )| Scenario {
                tasks,
                refs,
                items,
                concurrency,
                tag_limit,
                max_mapped_children,
                events,
                choices,
                steps_ms,
                cancel_at,
                interrupt,
                acquire,
            },
        )
}

/// The flow a scenario describes, with each task's upstream tasks (indices, all lower).
struct Flow {
    def: Arc<FlowDef>,
    upstream: Vec<Vec<usize>>,
    /// The reference tasks the flow's state follows (explicit, or the terminal tasks).
    refs: Vec<usize>,
}

fn name(i: usize) -> String {
    format!("t{i}")
}

fn build_flow(s: &Scenario) -> Flow {
    let n = s.tasks.len();
    let mut b = FlowBuilder::new("prop")
        .parameter(
            "items",
            Value::Array((0..s.items).map(|i| json!(i)).collect()),
        )
        .concurrency(s.concurrency)
        .tag_limit("t", s.tag_limit)
        .max_mapped_children(s.max_mapped_children);
    let mut upstream = Vec::with_capacity(n);
    for (i, spec) in s.tasks.iter().enumerate() {
        let mut data: Vec<usize> = Vec::new();
        let mut state_only: Vec<usize> = Vec::new();
        if i > 0 {
            for &(u, is_data) in &spec.ups {
                let u = usize::from(u) % i;
                if data.contains(&u) || state_only.contains(&u) {
                    continue;
                }
                match is_data {
                    true => data.push(u),
                    false => state_only.push(u),
                }
            }
        }
        let mut t = TaskDef::new(name(i), "x.wasm");
        let refs: Vec<Input> = data.iter().map(|&u| Input::Task(name(u))).collect();
        t.input = match spec.map {
            None => match refs.is_empty() {
                true => Input::Literal(json!(i).into()),
                false => Input::Array(refs),
            },
            Some((source, fields)) => {
                let list = match (source, data.first()) {
                    (MapSource::Upstream, Some(&u)) => Input::Task(name(u)),
                    _ => Input::Param("items".into()),
                };
                t.map = match fields {
                    true => MapOver::Fields(vec!["x".into()]),
                    false => MapOver::Input,
                };
                match fields {
                    // The other data upstream tasks are read by a field that is not mapped.
                    true => Input::Object(vec![
                        (
                            "rest".into(),
                            Input::Array(refs.into_iter().skip(1).collect()),
                        ),
                        ("x".into(), list),
                    ]),
                    false => list,
                }
            }
        };
        t.upstream_tasks = state_only.iter().map(|&u| name(u)).collect();
        t.trigger = spec.trigger;
        t.retries = spec.retries;
        t.retry_delay = Duration::from_secs(spec.retry_delay.into());
        // No jitter: a jittered delay is random by design (see the determinism property).
        t.backoff = spec.backoff.map(|(factor, max)| Backoff {
            factor: f64::from(factor),
            max: Duration::from_secs(max.into()),
            jitter: 0.0,
        });
        if let Some(d) = spec.max_retry_delay {
            t.max_retry_delay = Duration::from_secs(d.into());
        }
        t.skip_on_upstream_skip = spec.skip_on_upstream_skip;
        if spec.tagged {
            t.tags = vec!["t".into()];
        }
        let h = || vec![PathBuf::from("h.wasm")];
        let (on_state, on_completion, on_failure, on_retry) = spec.hooks;
        t.hooks.on_state = if on_state { h() } else { Vec::new() };
        t.hooks.on_completion = if on_completion { h() } else { Vec::new() };
        t.hooks.on_failure = if on_failure { h() } else { Vec::new() };
        t.hooks.on_retry = if on_retry { h() } else { Vec::new() };
        // The tasks it depends on: those its input reads (a mapped task may read only the
        // parameter), and its state-only dependencies.
        let ups: Vec<usize> = (0..i)
            .filter(|&u| t.upstream().contains(&name(u).as_str()))
            .collect();
        upstream.push(ups);
        b = b.task(t);
    }
    let mut refs: Vec<usize> = s.refs.iter().map(|&r| usize::from(r) % n).collect();
    refs.sort_unstable();
    refs.dedup();
    b = b.reference_tasks(refs.iter().map(|&r| name(r)));
    if refs.is_empty() {
        refs = (0..n)
            .filter(|&i| !upstream.iter().any(|ups: &Vec<usize>| ups.contains(&i)))
            .collect();
    }
    let def = b.build().expect("a generated flow is valid");
    Flow {
        def: Arc::new(def),
        upstream,
        refs,
    }
}

// ---------------------------------------------------------------------------------------------
// The driver

/// An event as logged (replayable).
#[derive(Debug, Clone)]
enum Logged {
    Attempt(Unit, RunOutcome),
    Timer(Unit),
    Hooks(Unit, u64, State),
    Granted(Unit),
    Cancel,
}

impl Logged {
    fn event(&self) -> Event {
        match self.clone() {
            Logged::Attempt(unit, outcome) => Event::AttemptEnded { unit, outcome },
            Logged::Timer(unit) => Event::TimerFired(unit),
            Logged::Hooks(unit, seq, state) => Event::HooksDone {
                unit,
                seq,
                state,
                logs: Vec::new(),
            },
            Logged::Granted(unit) => Event::SlotGranted(unit),
            Logged::Cancel => Event::CancelRequested,
        }
    }
}

/// Something the machine waits for.
#[derive(Debug)]
enum Outstanding {
    Attempt(Unit),
    Timer(Unit, DateTime<Utc>),
    Hooks(Unit, u64, State),
    /// An executor's slot, asked for.
    Slot(Unit),
}

/// A synchronous driver: carries out the machine's commands, checking each, and logs every
/// event with the clock reading it was handled at.
struct Harness {
    machine: FlowMachine,
    clock: SimClock,
    def: Arc<FlowDef>,
    upstream: Vec<Vec<usize>>,
    outstanding: Vec<Outstanding>,
    /// Every event handled, with the clock reading.
    log: Vec<(DateTime<Utc>, Logged)>,
    /// Every command, as text without random ids (for the determinism check).
    trace: Vec<String>,
    /// Run commands per unit.
    runs: HashMap<Unit, u32>,
    cancelled: bool,
}

fn start_time() -> DateTime<Utc> {
    DateTime::from_timestamp(1_700_000_000, 0).expect("valid timestamp")
}

/// The machine's settings in these tests: no store, no events, no handlers, no executor queue,
/// `tasks` tasks, on `clock`.
fn settings(clock: &SimClock, tasks: usize) -> Settings {
    Settings {
        clock: Arc::new(clock.clone()),
        handlers: Arc::new(StateHandlers::default()),
        record: false,
        events: false,
        digests: vec![String::new(); tasks],
        grants: vec![(String::new(), String::new()); tasks],
        logs_before: 0,
        tenant: None,
        keep_retry_budget: false,
        acquire: false,
    }
}

/// A task named `name` whose input is `input`.
fn task(name: &str, input: Value) -> TaskDef {
    let mut t = TaskDef::new(name, PathBuf::from(format!("{name}.wasm")));
    t.input = Input::Literal(input.into());
    t
}

impl Harness {
    fn new(flow: &Flow, events: bool, items: u8, acquire: bool) -> Self {
        let clock = SimClock::new(start_time());
        let settings = Settings {
            events,
            acquire,
            ..settings(&clock, flow.def.tasks.len())
        };
        let mut params = BTreeMap::new();
        params.insert(
            "items".to_owned(),
            Value::Array((0..items).map(|i| json!(i)).collect()),
        );
        let run = FlowRun::new(&flow.def, params, BTreeMap::new(), clock.now());
        Self {
            machine: FlowMachine::new(flow.def.clone(), run, &[], settings),
            clock,
            def: flow.def.clone(),
            upstream: flow.upstream.clone(),
            outstanding: Vec::new(),
            log: Vec::new(),
            trace: Vec::new(),
            runs: HashMap::new(),
            cancelled: false,
        }
    }

    fn start(&mut self) {
        self.machine.start();
        self.pump();
    }

    fn feed(&mut self, now: DateTime<Utc>, logged: Logged) {
        self.clock.set(now);
        if matches!(logged, Logged::Cancel)
            || matches!(&logged, Logged::Attempt(_, o) if o.ending == Ending::Cancelled)
        {
            self.cancelled = true;
        }
        // What it answers is no longer awaited.
        let answered = self.outstanding.iter().position(|o| match (o, &logged) {
            (Outstanding::Attempt(u), Logged::Attempt(v, _)) => u == v,
            (Outstanding::Timer(u, _), Logged::Timer(v)) => u == v,
            (Outstanding::Hooks(u, s, _), Logged::Hooks(v, t, _)) => u == v && s == t,
            (Outstanding::Slot(u), Logged::Granted(v)) => u == v,
            _ => false,
        });
        match (answered, &logged) {
            (Some(k), _) => drop(self.outstanding.remove(k)),
            (None, Logged::Cancel) => {}
            (None, _) => panic!("{logged:?} answers nothing the machine asked for"),
        }
        self.trace.push(format!("{now} {logged:?}"));
        self.machine.handle(logged.event());
        self.log.push((now, logged));
        self.pump();
    }

    fn finish(&mut self) {
        self.machine.finish();
        self.pump();
        assert!(
            self.outstanding.is_empty(),
            "finish left work: {:?}",
            self.outstanding
        );
    }

    /// Carry out every command, checking the ones that start work.
    fn pump(&mut self) {
        while let Some(command) = self.machine.next_command() {
            match command {
                Command::Run(a) => {
                    let unit = a.unit;
                    let run = self.machine.run();
                    let task = &self.def.tasks[unit.task];
                    // Property 2: every upstream task is finished.
                    for &u in &self.upstream[unit.task] {
                        assert!(
                            run.tasks[u].state.is_terminal(),
                            "{} starts while upstream {} is {}",
                            task.name,
                            name(u),
                            run.tasks[u].state.name
                        );
                    }
                    // Nothing starts once the run is cancelled.
                    assert!(
                        !self.cancelled,
                        "{unit:?} of {} starts after the cancel",
                        task.name
                    );
                    let rec = unit_record(run, unit);
                    assert!(
                        matches!(rec.state.name, StateName::Running | StateName::Retrying),
                        "{unit:?} starts in state {}",
                        rec.state.name
                    );
                    // Property 3: at most retries + 1 attempts, counted as the record does.
                    let n = self.runs.entry(unit).or_default();
                    *n += 1;
                    assert!(
                        *n <= task.retries + 1,
                        "{unit:?} of {} starts attempt {n} with retries = {}",
                        task.name,
                        task.retries
                    );
                    assert_eq!(a.ctx.attempt, *n, "{unit:?}: the attempt number");
                    assert_eq!(rec.attempts, *n, "{unit:?}: the record's attempts");
                    assert_eq!(a.ctx.map_index, unit.child);
                    // Within the concurrency and tag limits.
                    let running = self
                        .outstanding
                        .iter()
                        .filter(|o| matches!(o, Outstanding::Attempt(_)))
                        .count();
                    assert!(running < self.def.concurrency, "over the concurrency limit");
                    if !task.tags.is_empty() {
                        let tagged = self
                            .outstanding
                            .iter()
                            .filter(|o| {
                                matches!(o, Outstanding::Attempt(u)
                                    if !self.def.tasks[u.task].tags.is_empty())
                            })
                            .count();
                        assert!(tagged < self.def.tag_limits["t"], "over the tag limit");
                    }
                    self.trace
                        .push(format!("run {unit:?} attempt {} input {}", n, a.input));
                    self.outstanding.push(Outstanding::Attempt(unit));
                }
                Command::Timer { unit, at } => {
                    // `at` may have passed already (decided before a handler component
                    // answered): the timer fires at once.
                    self.trace.push(format!("timer {unit:?} at {at}"));
                    self.outstanding.push(Outstanding::Timer(unit, at));
                }
                Command::RunHooks(r) => {
                    self.trace.push(format!(
                        "hooks {:?} #{} {} -> {} {:?}",
                        r.unit, r.seq, r.old.name, r.new.name, r.kinds
                    ));
                    self.outstanding
                        .push(Outstanding::Hooks(r.unit, r.seq, r.new));
                }
                Command::AbortTimers => {
                    self.trace.push("abort timers".into());
                    self.outstanding
                        .retain(|o| !matches!(o, Outstanding::Timer(..)));
                }
                Command::AbortHooks => {
                    self.trace.push("abort hooks".into());
                    self.outstanding
                        .retain(|o| !matches!(o, Outstanding::Hooks(..)));
                }
                Command::Event(e) => self.trace.push(format!("event {e:?}")),
                Command::Acquire(unit) => {
                    // A unit asks once, and only before its attempt.
                    assert!(
                        !self
                            .outstanding
                            .iter()
                            .any(|o| matches!(o, Outstanding::Slot(u) | Outstanding::Attempt(u) if *u == unit)),
                        "{unit:?} asks for a slot twice"
                    );
                    assert!(!self.cancelled, "{unit:?} asks for a slot after the cancel");
                    self.trace.push(format!("acquire {unit:?}"));
                    self.outstanding.push(Outstanding::Slot(unit));
                }
                Command::Release(unit) => {
                    // The executor drops the request (a queue drops those of a cancelled run).
                    self.trace.push(format!("release {unit:?}"));
                    self.outstanding
                        .retain(|o| !matches!(o, Outstanding::Slot(u) if *u == unit));
                }
                Command::LookupCache { unit, .. } => {
                    panic!("{unit:?}: a cache lookup without a store")
                }
                Command::Write(w) => panic!("a write without a store: {w:?}"),
                Command::Settled(i) => panic!("a DAG's task run {i} settled as a code flow's"),
            }
        }
        // Once cancelled, no retry is awaited (a timer decided while the cancel is taken in
        // is aborted at once).
        assert!(
            !self.cancelled
                || !self
                    .outstanding
                    .iter()
                    .any(|o| matches!(o, Outstanding::Timer(..))),
            "a retry timer awaited after the cancel"
        );
        // The machine is idle exactly when it waits for nothing.
        assert_eq!(
            self.machine.is_idle(),
            self.outstanding.is_empty(),
            "idle while waiting for {:?}",
            self.outstanding
        );
    }
}

fn unit_record(run: &FlowRun, unit: Unit) -> &TaskRun {
    let t = &run.tasks[unit.task];
    match unit.child {
        Some(c) => &t.children[c as usize],
        None => t,
    }
}

/// The scripted outcome of the unit's attempt `n` (from 1).
fn scripted(s: &Scenario, unit: Unit, n: u32) -> Outcome {
    let scripts = &s.tasks[unit.task].scripts;
    let script = &scripts[unit.child.map_or(0, |c| c as usize % scripts.len())];
    script
        .get(n as usize - 1)
        .copied()
        .unwrap_or(Outcome::Output(Out::List(0)))
}

/// Run the scenario to its end; returns the driver with its log.
fn explore(s: &Scenario, flow: &Flow) -> Harness {
    let mut h = Harness::new(flow, s.events, s.items, s.acquire);
    h.start();
    let mut step = 0usize;
    while !h.outstanding.is_empty() {
        assert!(step < 10_000, "the run does not end");
        let mut now =
            h.clock.now() + TimeDelta::milliseconds(s.steps_ms[step % s.steps_ms.len()].into());
        if s.cancel_at.map(usize::from) == Some(step) && !h.cancelled {
            h.feed(now, Logged::Cancel);
            step += 1;
            continue;
        }
        let pick = usize::from(s.choices[step % s.choices.len()]) % h.outstanding.len();
        let logged = match &h.outstanding[pick] {
            &Outstanding::Attempt(unit) => {
                let n = h.runs[&unit];
                let ending = match h.cancelled && s.interrupt {
                    true => Ending::Cancelled,
                    false => scripted(s, unit, n).ending(),
                };
                let outcome = RunOutcome {
                    ending,
                    logs: Vec::new(),
                    logs_dropped_bytes: 0,
                    usage: Usage::default(),
                };
                Logged::Attempt(unit, outcome)
            }
            &Outstanding::Timer(unit, at) => {
                now = now.max(at);
                Logged::Timer(unit)
            }
            // The handler components leave the state as it is.
            Outstanding::Hooks(unit, seq, state) => Logged::Hooks(*unit, *seq, state.clone()),
            &Outstanding::Slot(unit) => Logged::Granted(unit),
        };
        h.feed(now, logged);
        step += 1;
    }
    h.finish();
    h
}

// ---------------------------------------------------------------------------------------------
// The properties on the final record

fn is_failed_type(s: StateName) -> bool {
    matches!(s.state_type(), StateType::Failed | StateType::Crashed)
}

/// Every history is a chain (each transition leaves the state the previous one entered) that
/// ends in the unit's state and never leaves a terminal state.
fn check_history(what: &str, rec: &TaskRun) {
    let h = &rec.history;
    assert_eq!(
        h.first().map(|t| t.from),
        Some(None),
        "{what}: first transition"
    );
    for w in h.windows(2) {
        assert_eq!(w[1].from, Some(w[0].to), "{what}: broken chain {h:?}");
        assert!(
            !w[0].to.state_type().is_terminal(),
            "{what}: leaves terminal {} for {}",
            w[0].to,
            w[1].to
        );
    }
    assert_eq!(
        h.last().map(|t| t.to),
        Some(rec.state.name),
        "{what}: state"
    );
}

/// Property 1 (and what the trigger decided), on the finished run.
fn check_final_states(s: &Scenario, flow: &Flow, h: &Harness, run: &FlowRun) {
    let cancelled = h.cancelled;
    let paused_flow = run.state.name == StateName::Paused;
    for (i, rec) in run.tasks.iter().enumerate() {
        let what = name(i);
        check_history(&what, rec);
        let ups = &flow.upstream[i];
        let ups_done = ups.iter().all(|&u| run.tasks[u].state.is_terminal());
        let mapped = flow.def.tasks[i].map != MapOver::No;
        for c in &rec.children {
            let cw = format!("{what}[{}]", c.map_index.unwrap_or_default());
            check_history(&cw, c);
            assert!(mapped, "{cw}: a child of a task that is not mapped");
            assert!(
                c.state.is_terminal() || (c.state.name == StateName::Paused && !cancelled),
                "{cw} ends {}",
                c.state.name
            );
            assert_eq!(
                c.attempts,
                h.runs
                    .get(&Unit {
                        task: i,
                        child: c.map_index
                    })
                    .copied()
                    .unwrap_or(0),
                "{cw}: attempts"
            );
        }
        assert_eq!(
            rec.attempts,
            h.runs.get(&Unit::task(i)).copied().unwrap_or(0),
            "{what}: attempts"
        );
        match rec.state.name {
            n if n.state_type().is_terminal() => {
                if n == StateName::Mapped {
                    assert!(mapped, "{what}: Mapped but not mapped");
                    assert!(
                        rec.children
                            .iter()
                            .all(|c| c.state.state_type() == StateType::Completed),
                        "{what}: Mapped with a child that did not complete"
                    );
                } else if !rec.children.is_empty() {
                    assert!(
                        rec.children.iter().all(|c| c.state.is_terminal()),
                        "{what} is {n} with unfinished children"
                    );
                }
            }
            StateName::Paused => {
                assert!(!cancelled, "{what}: Paused in a cancelled run");
                assert!(paused_flow, "{what}: Paused in a flow run that is not");
                assert!(
                    rec.children.is_empty(),
                    "{what}: a Paused task with children"
                );
            }
            StateName::Pending => {
                assert!(!cancelled, "{what}: Pending in a cancelled run");
                assert!(
                    paused_flow,
                    "{what}: Pending in a flow run that is not Paused"
                );
                let paused_children = !rec.children.is_empty()
                    && rec
                        .children
                        .iter()
                        .any(|c| c.state.name == StateName::Paused);
                assert!(
                    !ups_done || paused_children,
                    "{what}: Pending though its upstream tasks finished and no child is paused"
                );
            }
            other => panic!("{what} ends {other}"),
        }
        // What the trigger and the skip rule decided, once the upstream tasks finished.
        if !cancelled && ups_done && !ups.is_empty() {
            let def = &flow.def.tasks[i];
            // Prefect 1: a mapped upstream task that made its children (none for an empty
            // map) counts as its children's states.
            let states: Vec<StateName> = ups
                .iter()
                .flat_map(|&u| {
                    let up = &run.tasks[u];
                    let expands = flow.def.tasks[u].map != MapOver::No
                        && (up.state.name == StateName::Mapped || !up.children.is_empty());
                    match expands {
                        true => up.children.iter().map(|c| c.state.name).collect::<Vec<_>>(),
                        false => vec![up.state.name],
                    }
                })
                .collect();
            let skip = def.skip_on_upstream_skip && states.contains(&StateName::Skipped);
            let decision = def.trigger.decide_expanded(true, &states);
            let ran = rec.attempts > 0 || !rec.children.is_empty();
            if skip {
                assert_eq!(
                    rec.state.name,
                    StateName::Skipped,
                    "{what}: upstream skipped"
                );
                assert!(!ran, "{what}: ran though an upstream task was skipped");
            } else {
                match decision {
                    TriggerDecision::Fail => {
                        assert_eq!(rec.state.name, StateName::TriggerFailed, "{what}");
                        assert!(!ran, "{what}: ran though its trigger failed");
                    }
                    TriggerDecision::Pause => {
                        assert_eq!(rec.state.name, StateName::Paused, "{what}");
                        assert!(!ran, "{what}: ran though manual_only");
                    }
                    TriggerDecision::Run => {
                        assert_ne!(rec.state.name, StateName::TriggerFailed, "{what}");
                        assert!(
                            ran || mapped,
                            "{what}: its trigger passed but it never ran ({})",
                            rec.state.name
                        );
                    }
                }
            }
        }
        if !cancelled && ups.is_empty() && s.tasks[i].trigger == Trigger::ManualOnly {
            assert_eq!(
                rec.state.name,
                StateName::Paused,
                "{what}: manual_only root"
            );
        }
    }
}

/// Property 4: the flow run's state, from the final record.
fn check_flow_state(flow: &Flow, h: &Harness, run: &FlowRun) {
    let unfinished = run.tasks.iter().any(|t| !t.state.is_terminal());
    let refs: Vec<StateName> = flow.refs.iter().map(|&r| run.tasks[r].state.name).collect();
    let expected = if h.cancelled {
        StateName::Cancelled
    } else if unfinished {
        StateName::Paused
    } else if refs.iter().any(|&s| is_failed_type(s)) {
        StateName::Failed
    } else {
        // Not cancelled, nothing unfinished: every reference task succeeded or failed.
        assert!(
            refs.iter().all(|s| s.state_type() == StateType::Completed),
            "reference tasks neither failed nor completed: {refs:?}"
        );
        StateName::Completed
    };
    assert_eq!(
        run.state.name, expected,
        "the flow run's state (refs {refs:?})"
    );
    let flow_states: Vec<StateName> = run.history.iter().map(|t| t.to).collect();
    let mut want = vec![StateName::Pending, StateName::Running];
    if h.cancelled {
        want.push(StateName::Cancelling);
    }
    want.push(expected);
    assert_eq!(flow_states, want, "the flow run's history");
}

/// What replay must reproduce: every transition (names, times, messages) and attempt count.
fn transitions(run: &FlowRun) -> Vec<String> {
    let mut out = vec![format!("flow {:?}", run.history)];
    for t in &run.tasks {
        out.push(format!(
            "{} {} {:?} {:?}",
            t.name, t.attempts, t.history, t.output
        ));
        for c in &t.children {
            out.push(format!(
                "{}[{:?}] {} {:?} {:?}",
                c.name, c.map_index, c.attempts, c.history, c.output
            ));
        }
    }
    out
}

fn check(s: &Scenario) {
    let flow = build_flow(s);
    let mut h = explore(s, &flow);
    let end = h.clock.now();
    let trace = std::mem::take(&mut h.trace);
    let log = std::mem::take(&mut h.log);
    let run = h.machine.run().clone();
    check_final_states(s, &flow, &h, &run);
    check_flow_state(&flow, &h, &run);

    // Property 5: the same events at the same clock readings, into fresh machines. Each
    // machine's hash maps have their own random order, so an order leaking into a decision
    // shows as a difference (more often, the more replays).
    for _ in 0..REPLAYS {
        let mut r = Harness::new(&flow, s.events, s.items, s.acquire);
        r.start();
        for (now, logged) in &log {
            r.feed(*now, logged.clone());
        }
        r.clock.set(end);
        r.finish();
        assert_eq!(r.trace, trace, "replay issued other commands");
        assert_eq!(
            transitions(r.machine.run()),
            transitions(&run),
            "replay made other transitions"
        );
    }
}

/// Replays of each case.
const REPLAYS: usize = 3;

proptest! {
    #![proptest_config(config())]

    #[test]
    fn machine_invariants_hold(s in scenario()) {
        check(&s);
    }
}

/// A root task without mapping, tags or backoff, for the minimal cases below.
fn plain_task(
    retries: u32,
    hooks: (bool, bool, bool, bool),
    scripts: Vec<Vec<Outcome>>,
) -> TaskSpec {
    TaskSpec {
        ups: Vec::new(),
        trigger: Trigger::AllSuccessful,
        retries,
        retry_delay: 0,
        backoff: None,
        max_retry_delay: None,
        map: None,
        skip_on_upstream_skip: false,
        tagged: false,
        hooks,
        scripts,
    }
}

/// A scenario of `tasks` that answers in order and is cancelled at step `cancel_at`.
fn cancelled_at(tasks: Vec<TaskSpec>, items: u8, cancel_at: u8) -> Scenario {
    Scenario {
        tasks,
        refs: Vec::new(),
        items,
        concurrency: 64,
        tag_limit: 1,
        max_mapped_children: 100,
        events: false,
        choices: vec![0],
        steps_ms: vec![0],
        cancel_at: Some(cancel_at),
        interrupt: false,
        acquire: false,
    }
}

/// A task with no upstream tasks and an `on_state` handler component (so its start, Running,
/// awaits the handler), and a cancel before anything else happens. Minimal case found by the
/// property: the cancel completed the pending Running transition and launched the attempt
/// after the cancel; now the attempt does not start and the task ends Cancelled, not counted.
#[test]
fn a_cancel_while_a_start_awaits_its_handlers_starts_nothing() {
    let task = plain_task(0, (true, false, false, false), vec![Vec::new()]);
    let s = cancelled_at(vec![task], 0, 0);
    check(&s);
    let flow = build_flow(&s);
    let h = explore(&s, &flow);
    let t = &h.machine.run().tasks[0];
    assert_eq!(t.state.name, StateName::Cancelled);
    assert_eq!(t.attempts, 0);
    assert!(h.runs.is_empty());
}

/// A mapped task whose child PAUSEs, and a cancel: minimal case found by the property (the
/// child stayed Paused in the Cancelled run while its parent was recorded as "cancelled before
/// this task ran"). Now the child ends Cancelled and the parent as cancelled mapped runs.
#[test]
fn a_cancel_ends_paused_mapped_children_cancelled() {
    let mut mapped = plain_task(0, (false, false, false, false), vec![vec![Outcome::Pause]]);
    mapped.map = Some((MapSource::Param, false));
    // A task still retrying keeps the run going until the cancel.
    let retrying = plain_task(
        2,
        (false, false, false, false),
        vec![vec![Outcome::Trap, Outcome::Trap]],
    );
    let s = cancelled_at(vec![mapped, retrying], 1, 2);
    check(&s);
    let flow = build_flow(&s);
    let h = explore(&s, &flow);
    let t = &h.machine.run().tasks[0];
    assert_eq!(t.children[0].state.name, StateName::Cancelled);
    assert_eq!(t.state.name, StateName::Cancelled);
    assert_eq!(
        t.state.message.as_deref(),
        Some("mapped runs were cancelled")
    );
}

/// A cached task with a store: the machine asks the cache once, on the first attempt only, and
/// is not idle while the answer is awaited; a retry after a miss runs the component without
/// asking again.
#[test]
fn the_cache_is_asked_once_and_awaited_before_the_run_can_end() {
    let mut t = task("t", json!(1));
    t.retries = 1;
    t.cache = Some(crate::cache::CachePolicy {
        cache_for: Duration::from_secs(3600),
        validator: crate::cache::CacheValidator::AllInputs,
    });
    let def = Arc::new(FlowBuilder::new("cached").task(t).build().expect("flow"));
    let clock = SimClock::new(start_time());
    let settings = Settings {
        record: true,
        ..settings(&clock, 1)
    };
    let run = FlowRun::new(&def, BTreeMap::new(), BTreeMap::new(), clock.now());
    let mut m = FlowMachine::new(def, run, &[], settings);
    // Every command but the store's writes.
    let next = |m: &mut FlowMachine| -> Vec<Command> {
        std::iter::from_fn(|| m.next_command())
            .filter(|c| !matches!(c, Command::Write(_)))
            .collect()
    };
    m.start();
    let unit = Unit::task(0);
    let commands = next(&mut m);
    let key = match commands.as_slice() {
        [Command::LookupCache { unit: u, key }] if *u == unit => key.key.clone(),
        _ => panic!("{commands:?}"),
    };
    assert!(!m.is_idle(), "idle while the cache answer is awaited");
    m.handle(Event::CacheAnswered {
        unit,
        answer: Ok(CacheLookup::Miss("no entry".into())),
    });
    let commands = next(&mut m);
    assert!(
        matches!(commands.as_slice(), [Command::Run(a)] if a.ctx.attempt == 1),
        "{commands:?}"
    );
    let outcome = |ending| RunOutcome {
        ending,
        logs: Vec::new(),
        logs_dropped_bytes: 0,
        usage: Usage::default(),
    };
    m.handle(Event::AttemptEnded {
        unit,
        outcome: outcome(Outcome::Retry(None).ending()),
    });
    let commands = next(&mut m);
    assert!(
        matches!(commands.as_slice(), [Command::Timer { unit: u, .. }] if *u == unit),
        "{commands:?}"
    );
    m.handle(Event::TimerFired(unit));
    // The retry runs the component: no second lookup.
    let commands = next(&mut m);
    assert!(
        matches!(commands.as_slice(), [Command::Run(a)] if a.ctx.attempt == 2),
        "{commands:?}"
    );
    clock.advance(TimeDelta::seconds(7));
    m.handle(Event::AttemptEnded {
        unit,
        outcome: outcome(Ending::Output(json!(2).into())),
    });
    // The output is cached under the key that missed, from the moment it completed.
    let writes: Vec<CacheWrite> = std::iter::from_fn(|| m.next_command())
        .filter_map(|c| match c {
            Command::Write(Write::Cache(w)) => Some(*w),
            _ => None,
        })
        .collect();
    assert_eq!(writes.len(), 1, "{writes:?}");
    assert_eq!(writes[0].key.key, key);
    assert_eq!(writes[0].output, Json::from(json!(2)));
    assert_eq!(writes[0].created_at, clock.now());
    assert_eq!(writes[0].expires_at, clock.now() + TimeDelta::seconds(3600));
    assert_eq!(writes[0].task_run, m.run().tasks[0].id);
    assert!(m.is_idle());
    assert_eq!(m.run().tasks[0].state.name, StateName::Completed);
}

/// With an executor that queues: a unit stays Pending until the executor grants it a slot, is
/// Running (attempt counted) only then, and on a retry asks for a slot again. A cancel while a
/// unit waits ends it Cancelled without an attempt and gives back a slot granted later.
#[test]
fn with_an_executor_that_queues_a_unit_is_pending_until_granted_a_slot() {
    let mut a = task("a", json!(1));
    a.retries = 1;
    let b = task("b", json!(2));
    let def = Arc::new(
        FlowBuilder::new("queued")
            .task(a)
            .task(b)
            .build()
            .expect("flow"),
    );
    let clock = SimClock::new(start_time());
    let settings = Settings {
        acquire: true,
        ..settings(&clock, 2)
    };
    let run = FlowRun::new(&def, BTreeMap::new(), BTreeMap::new(), clock.now());
    let mut m = FlowMachine::new(def, run, &[], settings);
    let next =
        |m: &mut FlowMachine| -> Vec<Command> { std::iter::from_fn(|| m.next_command()).collect() };
    let (ua, ub) = (Unit::task(0), Unit::task(1));
    m.start();
    let mut asked: Vec<Unit> = next(&mut m)
        .into_iter()
        .map(|c| match c {
            Command::Acquire(u) => u,
            other => panic!("{other:?}"),
        })
        .collect();
    asked.sort_unstable();
    assert_eq!(asked, [ua, ub]);
    let state = |m: &FlowMachine, u: Unit| m.run().tasks[u.task].state.name;
    assert_eq!(state(&m, ua), StateName::Pending);
    assert_eq!(m.run().tasks[0].attempts, 0);
    assert!(!m.is_idle());
    clock.advance(TimeDelta::seconds(5));
    m.handle(Event::SlotGranted(ua));
    let commands = next(&mut m);
    assert!(
        matches!(commands.as_slice(), [Command::Run(x)] if x.unit == ua && x.ctx.attempt == 1),
        "{commands:?}"
    );
    assert_eq!(state(&m, ua), StateName::Running);
    // Running from the grant, not from the request.
    assert_eq!(m.run().tasks[0].state.timestamp, clock.now());
    assert_eq!(state(&m, ub), StateName::Pending);
    // A retry waits for a slot again.
    m.handle(Event::AttemptEnded {
        unit: ua,
        outcome: RunOutcome {
            ending: Outcome::Retry(None).ending(),
            logs: Vec::new(),
            logs_dropped_bytes: 0,
            usage: Usage::default(),
        },
    });
    let commands = next(&mut m);
    assert!(
        matches!(commands.as_slice(), [Command::Timer { unit, .. }] if *unit == ua),
        "{commands:?}"
    );
    m.handle(Event::TimerFired(ua));
    let commands = next(&mut m);
    assert!(
        matches!(commands.as_slice(), [Command::Acquire(x)] if *x == ua),
        "{commands:?}"
    );
    assert_eq!(state(&m, ua), StateName::AwaitingRetry);
    // Cancelled while both wait: neither runs; a grant that comes later goes back.
    m.handle(Event::CancelRequested);
    let commands = next(&mut m);
    let released: Vec<Unit> = commands
        .iter()
        .filter_map(|c| match c {
            Command::Release(u) => Some(*u),
            _ => None,
        })
        .collect();
    assert_eq!(released, [ua, ub]);
    assert!(!commands.iter().any(|c| matches!(c, Command::Run(_))));
    assert_eq!(state(&m, ua), StateName::Cancelled);
    assert_eq!(state(&m, ub), StateName::Cancelled);
    assert_eq!(m.run().tasks[0].attempts, 1);
    assert_eq!(m.run().tasks[1].attempts, 0);
    m.handle(Event::SlotGranted(ub));
    let commands = next(&mut m);
    assert!(
        matches!(commands.as_slice(), [Command::Release(x)] if *x == ub),
        "{commands:?}"
    );
    assert!(m.is_idle());
}

/// A machine over `def` with no store, no handler components and no executor queue, on a
/// [`SimClock`] at [`start_time`].
fn bare_machine(
    def: FlowDef,
    run: Option<FlowRun>,
    keep_retry_budget: bool,
) -> (FlowMachine, SimClock) {
    machine_with(def, run, keep_retry_budget, false)
}

/// [`bare_machine`], with a store (`record`) or not.
fn machine_with(
    def: FlowDef,
    run: Option<FlowRun>,
    keep_retry_budget: bool,
    record: bool,
) -> (FlowMachine, SimClock) {
    let def = Arc::new(def);
    let clock = SimClock::new(start_time());
    let n = def.tasks.len();
    let settings = Settings {
        record,
        keep_retry_budget,
        ..settings(&clock, n)
    };
    let run =
        run.unwrap_or_else(|| FlowRun::new(&def, BTreeMap::new(), BTreeMap::new(), clock.now()));
    (FlowMachine::new(def, run, &[], settings), clock)
}

/// A machine for `def` (with a store when `record`) whose every transition goes through
/// `handler`.
fn handled_machine(
    def: FlowDef,
    handler: crate::runner::StateHandler,
    record: bool,
) -> (FlowMachine, SimClock) {
    let def = Arc::new(def);
    let clock = SimClock::new(start_time());
    let mut handlers = StateHandlers::default();
    handlers.every_task.push(handler);
    let settings = Settings {
        handlers: Arc::new(handlers),
        record,
        ..settings(&clock, def.tasks.len())
    };
    let run = FlowRun::new(&def, BTreeMap::new(), BTreeMap::new(), clock.now());
    (FlowMachine::new(def, run, &[], settings), clock)
}

/// Every command the machine has queued.
fn drain(m: &mut FlowMachine) -> Vec<Command> {
    std::iter::from_fn(|| m.next_command()).collect()
}

/// Hands every command the machine gives to `answer`, until it gives none.
fn drive(m: &mut FlowMachine, mut answer: impl FnMut(&mut FlowMachine, Command)) {
    loop {
        let commands = drain(m);
        if commands.is_empty() {
            return;
        }
        for c in commands {
            answer(m, c);
        }
    }
}

/// The attempts the commands start.
fn runs(commands: Vec<Command>) -> Vec<Attempt> {
    commands
        .into_iter()
        .filter_map(|c| match c {
            Command::Run(a) => Some(a),
            _ => None,
        })
        .collect()
}

fn ended(ending: Ending, logs: Vec<LogRecord>, usage: Usage) -> RunOutcome {
    RunOutcome {
        ending,
        logs,
        logs_dropped_bytes: 0,
        usage,
    }
}

fn history(rec: &TaskRun) -> Vec<StateName> {
    rec.history.iter().map(|t| t.to).collect()
}

/// A retry is Retrying (the first attempt Running); a task run's usage is the sum of its
/// attempts' time and fuel and the most memory of any one; a completed task keeps its output.
#[test]
fn a_task_runs_usage_sums_its_attempts_and_its_retry_is_retrying() {
    let mut t = task("t", json!(1));
    t.retries = 1;
    let (mut m, _clock) = bare_machine(
        FlowBuilder::new("f").task(t).build().expect("flow"),
        None,
        false,
    );
    let unit = Unit::task(0);
    m.start();
    let first = runs(drain(&mut m));
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].ctx.attempt, 1);
    assert_eq!(m.run().tasks[0].state.name, StateName::Running);
    let usage = |fuel, secs, memory| Usage {
        fuel_consumed: fuel,
        duration: Duration::from_secs(secs),
        memory_peak_bytes: memory,
    };
    m.handle(Event::AttemptEnded {
        unit,
        outcome: ended(Outcome::Retry(None).ending(), Vec::new(), usage(10, 1, 300)),
    });
    let _ = drain(&mut m);
    m.handle(Event::TimerFired(unit));
    let second = runs(drain(&mut m));
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].ctx.attempt, 2);
    assert_eq!(m.run().tasks[0].state.name, StateName::Retrying);
    m.handle(Event::AttemptEnded {
        unit,
        outcome: ended(
            Ending::Output(json!(7).into()),
            Vec::new(),
            usage(5, 2, 200),
        ),
    });
    let _ = drain(&mut m);
    assert!(m.is_idle());
    m.finish();
    let rec = &m.run().tasks[0];
    assert_eq!(
        history(rec),
        [
            StateName::Pending,
            StateName::Running,
            StateName::AwaitingRetry,
            StateName::Retrying,
            StateName::Completed
        ]
    );
    assert_eq!(rec.attempts, 2);
    assert_eq!(rec.fuel_consumed, 15);
    assert_eq!(rec.run_time, Duration::from_secs(3));
    assert_eq!(rec.memory_peak_bytes, 300);
    assert_eq!(rec.output, Some(json!(7).into()));
    // Input caching: a completed task needs its input no more.
    assert_eq!(rec.cached_input, None);
}

/// An attempt lost with its worker, with a retry left: Crashed is recorded before the retry
/// waits, so the history says what happened to the attempt. Without a retry left, the task
/// ends Crashed.
#[test]
fn a_lost_attempt_is_recorded_crashed_before_its_retry() {
    let mut t = task("t", json!(1));
    t.retries = 1;
    let (mut m, _clock) = bare_machine(
        FlowBuilder::new("f").task(t).build().expect("flow"),
        None,
        false,
    );
    let unit = Unit::task(0);
    let lost = || Ending::Lost {
        message: "the worker stopped answering".into(),
    };
    m.start();
    let _ = drain(&mut m);
    m.handle(Event::AttemptEnded {
        unit,
        outcome: ended(lost(), Vec::new(), Usage::default()),
    });
    let _ = drain(&mut m);
    m.handle(Event::TimerFired(unit));
    assert_eq!(runs(drain(&mut m)).len(), 1);
    m.handle(Event::AttemptEnded {
        unit,
        outcome: ended(lost(), Vec::new(), Usage::default()),
    });
    let _ = drain(&mut m);
    m.finish();
    let rec = &m.run().tasks[0];
    assert_eq!(
        history(rec),
        [
            StateName::Pending,
            StateName::Running,
            StateName::Crashed,
            StateName::AwaitingRetry,
            StateName::Retrying,
            StateName::Crashed
        ]
    );
    assert_eq!(
        rec.history[2].message.as_deref(),
        Some("the worker stopped answering")
    );
    // Input caching: a task that did not complete keeps its input for a resume.
    assert_eq!(rec.cached_input, Some(json!(1).into()));
}

/// A resumed run's retries count from where it resumed (unless it keeps its retry budget): a
/// task that used its one retry before runs again as Running, attempt 3, and may retry once
/// more.
#[test]
fn a_resumed_task_counts_its_retries_from_the_resume() {
    let mut t = task("t", json!(1));
    t.retries = 1;
    let def = FlowBuilder::new("f").task(t).build().expect("flow");
    let clock = SimClock::new(start_time());
    let mut run = FlowRun::new(&def, BTreeMap::new(), BTreeMap::new(), clock.now());
    run.tasks[0].attempts = 2;
    run.tasks[0].state = State::new(StateName::Failed, clock.now());
    for keep in [false, true] {
        let (mut m, _clock) = bare_machine(def.clone(), Some(run.clone()), keep);
        let unit = Unit::task(0);
        m.start();
        let attempts = runs(drain(&mut m));
        assert_eq!(attempts.len(), 1);
        assert_eq!(attempts[0].ctx.attempt, 3);
        let started = m.run().tasks[0].state.name;
        m.handle(Event::AttemptEnded {
            unit,
            outcome: ended(Outcome::Retry(None).ending(), Vec::new(), Usage::default()),
        });
        let after = m.run().tasks[0].state.name;
        match keep {
            false => {
                assert_eq!(started, StateName::Running, "keep_retry_budget: {keep}");
                assert_eq!(after, StateName::AwaitingRetry, "keep_retry_budget: {keep}");
            }
            true => {
                assert_eq!(started, StateName::Retrying, "keep_retry_budget: {keep}");
                assert_eq!(after, StateName::Failed, "keep_retry_budget: {keep}");
            }
        }
    }
}

/// Each child of a mapped task runs with its own element of the list as input, and a task
/// downstream reads the children's outputs as a list, in map order.
#[test]
fn each_mapped_child_runs_with_its_element_and_downstream_reads_their_outputs() {
    let mut t = task("t", json!([10, 20, 30]));
    t.map = MapOver::Input;
    let mut d = TaskDef::new("d", PathBuf::from("d.wasm"));
    d.input = Input::Task("t".into());
    let def = FlowBuilder::new("f").task(t).task(d).build().expect("flow");
    let (mut m, _clock) = bare_machine(def, None, false);
    m.start();
    let mut children: Vec<(Option<u32>, Json, Unit)> = runs(drain(&mut m))
        .into_iter()
        .map(|a| (a.ctx.map_index, a.input, a.unit))
        .collect();
    children.sort_by_key(|(i, _, _)| *i);
    let inputs: Vec<(Option<u32>, Json)> = children
        .iter()
        .map(|(i, input, _)| (*i, input.clone()))
        .collect();
    assert_eq!(
        inputs,
        [
            (Some(0), json!(10).into()),
            (Some(1), json!(20).into()),
            (Some(2), json!(30).into())
        ]
    );
    // They finish out of order; each output goes to its own place.
    for (i, _, unit) in children.iter().rev() {
        let out = json!((i.unwrap_or(0) + 1) * 100);
        m.handle(Event::AttemptEnded {
            unit: *unit,
            outcome: ended(Ending::Output(out.into()), Vec::new(), Usage::default()),
        });
    }
    let downstream = runs(drain(&mut m));
    assert_eq!(downstream.len(), 1, "{downstream:?}");
    assert_eq!(downstream[0].unit, Unit::task(1));
    assert_eq!(downstream[0].input, Json::from(json!([100, 200, 300])));
}

/// The flow run's `max_log_bytes`: records are kept while they fit (one that fills the cap
/// exactly is kept); from the first that does not, every later record is dropped too, even one
/// that would fit, and the drop is reported once with what was dropped.
#[test]
fn logs_are_kept_up_to_the_cap_and_the_rest_dropped_and_counted() {
    let record = |text: &str| LogRecord {
        time: start_time(),
        source: LogSource::Stdout,
        level: LogLevel::Info,
        message: text.into(),
    };
    let cost = |text: &str| record(text).cost();
    // Each batch is one attempt's records; every attempt but the last asks for a retry.
    let run_with = |cap: u64, batches: &[&[&str]]| -> Vec<String> {
        let mut t = task("t", json!(1));
        t.retries = 1;
        let def = FlowBuilder::new("f")
            .max_log_bytes(cap)
            .task(t)
            .build()
            .expect("flow");
        let (mut m, _clock) = bare_machine(def, None, false);
        m.start();
        for (n, lines) in batches.iter().enumerate() {
            assert_eq!(runs(drain(&mut m)).len(), 1);
            let ending = match n + 1 == batches.len() {
                true => Ending::Output(json!(1).into()),
                false => Outcome::Retry(None).ending(),
            };
            let logs = lines.iter().map(|l| record(l)).collect();
            m.handle(Event::AttemptEnded {
                unit: Unit::task(0),
                outcome: ended(ending, logs, Usage::default()),
            });
            if let Some(Command::Timer { unit, .. }) = drain(&mut m).first() {
                m.handle(Event::TimerFired(*unit));
            }
        }
        m.finish();
        m.run().tasks[0]
            .logs
            .iter()
            .map(|r| r.message.clone())
            .collect()
    };
    // Exactly at the cap: all kept, nothing reported.
    let cap = 2 * cost("abc") + cost("d");
    assert_eq!(run_with(cap, &[&["abc", "abc", "d"]]), ["abc", "abc", "d"]);
    // One record over: it and every later one dropped, in the same attempt or a later one, even
    // "d", which would still fit.
    for batches in [
        &[&["abc", "abc", "too long", "d"][..]][..],
        &[&["abc", "abc", "too long"][..], &["d"][..]][..],
    ] {
        let kept = run_with(cap, batches);
        assert_eq!(kept.len(), 3, "{kept:?}");
        assert_eq!(kept[..2], ["abc", "abc"]);
        assert!(
            kept[2].contains(&format!("max_log_bytes = {cap} bytes"))
                && kept[2].contains("9 more bytes in 2 records"),
            "{kept:?}"
        );
    }
}

/// Only a Completed task's output is cached (an output, or a SUCCESS signal's): a task that
/// skipped itself (Skipped, of the Completed type, with no output) or failed caches nothing.
#[test]
fn only_a_completed_output_is_cached() {
    for (ending, cached) in [
        (Outcome::Output(Out::Scalar).ending(), true),
        (Outcome::Success(Out::Scalar).ending(), true),
        (Outcome::Skip.ending(), false),
        (Outcome::Fail.ending(), false),
    ] {
        let mut t = task("t", json!(1));
        t.cache = Some(crate::cache::CachePolicy {
            cache_for: Duration::from_secs(60),
            validator: crate::cache::CacheValidator::AllInputs,
        });
        let def = FlowBuilder::new("f").task(t).build().expect("flow");
        let (mut m, _clock) = machine_with(def, None, false, true);
        let unit = Unit::task(0);
        m.start();
        let _ = drain(&mut m);
        m.handle(Event::CacheAnswered {
            unit,
            answer: Ok(CacheLookup::Miss("no entry".into())),
        });
        assert_eq!(runs(drain(&mut m)).len(), 1);
        let what = format!("{ending:?}");
        m.handle(Event::AttemptEnded {
            unit,
            outcome: ended(ending, Vec::new(), Usage::default()),
        });
        let writes = drain(&mut m)
            .into_iter()
            .filter(|c| matches!(c, Command::Write(Write::Cache(_))))
            .count();
        assert_eq!(writes, usize::from(cached), "{what}");
    }
}

/// Resuming: a completed task keeps its output and does not run; a task that had not
/// completed is reset to Pending ("resumed") and runs again. A mapped task whose input is
/// unchanged (every upstream task it reads had completed) keeps its completed children and
/// runs the others, with retries counted from their earlier attempts; if an upstream task runs
/// again, every child runs again.
#[test]
fn a_resume_keeps_what_completed_and_runs_the_rest() {
    let a = task("a", json!(0));
    let mut m = TaskDef::new("m", PathBuf::from("m.wasm"));
    m.input = Input::Task("a".into());
    m.map = MapOver::Input;
    m.retries = 1;
    let mut d = TaskDef::new("d", PathBuf::from("d.wasm"));
    d.input = Input::Task("m".into());
    let def = FlowBuilder::new("f")
        .task(a)
        .task(m)
        .task(d)
        .build()
        .expect("flow");
    let now = start_time();
    let mut record = FlowRun::new(&def, BTreeMap::new(), BTreeMap::new(), now);
    let completed = |rec: &mut TaskRun, output: Value| {
        rec.state = State::new(StateName::Completed, now);
        rec.attempts = 1;
        rec.output = Some(output.into());
    };
    completed(&mut record.tasks[0], json!([1, 2]));
    record.tasks[1].state = State::new(StateName::Failed, now);
    record.tasks[1].attempts = 1;
    let mut c0 = TaskRun::new("m", Some(0), now);
    completed(&mut c0, json!(10));
    let mut c1 = TaskRun::new("m", Some(1), now);
    c1.state = State::new(StateName::Failed, now);
    c1.attempts = 2;
    record.tasks[1].children = vec![c0, c1];

    // `a` completed: `m`'s input is unchanged, only child 1 runs, as attempt 3, Running.
    let (mut machine, _clock) = bare_machine(def.clone(), Some(record.clone()), false);
    machine.start();
    let attempts = runs(drain(&mut machine));
    let started: Vec<(Unit, u32, Json)> = attempts
        .iter()
        .map(|a| (a.unit, a.ctx.attempt, a.input.clone()))
        .collect();
    let child1 = Unit {
        task: 1,
        child: Some(1),
    };
    assert_eq!(started, [(child1, 3, Json::from(json!(2)))]);
    let mapped = &machine.run().tasks[1];
    assert_eq!(
        mapped
            .history
            .last()
            .map(|t| (t.from, t.to, t.message.as_deref())),
        Some((Some(StateName::Failed), StateName::Pending, Some("resumed")))
    );
    assert_eq!(mapped.children[1].state.name, StateName::Running);
    machine.handle(Event::AttemptEnded {
        unit: child1,
        outcome: ended(Outcome::Retry(None).ending(), Vec::new(), Usage::default()),
    });
    // One retry is left, counted from the resume.
    assert_eq!(
        machine.run().tasks[1].children[1].state.name,
        StateName::AwaitingRetry
    );
    let _ = drain(&mut machine);
    machine.handle(Event::TimerFired(child1));
    let _ = drain(&mut machine);
    machine.handle(Event::AttemptEnded {
        unit: child1,
        outcome: ended(
            Ending::Output(json!(20).into()),
            Vec::new(),
            Usage::default(),
        ),
    });
    let downstream = runs(drain(&mut machine));
    assert_eq!(downstream.len(), 1);
    assert_eq!(downstream[0].input, Json::from(json!([10, 20])));

    // `a` had not completed: it runs again, and so does every child of `m`. Children keep
    // their task run ids by map index; a list now shorter drops the children past its end.
    record.tasks[0].state = State::new(StateName::Failed, now);
    record.tasks[0].output = None;
    let ids: Vec<TaskRunId> = record.tasks[1].children.iter().map(|c| c.id).collect();
    for (list, expected) in [(json!([1, 2]), 2), (json!([7]), 1)] {
        let (mut machine, _clock) = bare_machine(def.clone(), Some(record.clone()), false);
        machine.start();
        let first = runs(drain(&mut machine));
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].unit, Unit::task(0));
        machine.handle(Event::AttemptEnded {
            unit: Unit::task(0),
            outcome: ended(Ending::Output(list.into()), Vec::new(), Usage::default()),
        });
        let mut children: Vec<Option<u32>> = runs(drain(&mut machine))
            .iter()
            .map(|a| a.unit.child)
            .collect();
        children.sort_unstable();
        let want: Vec<Option<u32>> = (0..expected).map(|c| Some(c as u32)).collect();
        assert_eq!(children, want);
        let now_ids: Vec<TaskRunId> = machine.run().tasks[1]
            .children
            .iter()
            .map(|c| c.id)
            .collect();
        assert_eq!(now_ids, ids[..expected]);
    }
}

/// The flow's `max_mapped_children` counts every mapped task's children in the run: at the cap
/// every child is made; one over fails the task that would pass it, before it makes any, and
/// says how many there would be.
#[test]
fn max_mapped_children_counts_the_whole_run() {
    let run = |first: usize, second: usize| -> FlowRun {
        let list = |n: usize| Input::Literal(json!(vec![0; n]).into());
        let mut m1 = TaskDef::new("m1", PathBuf::from("m.wasm"));
        m1.input = list(first);
        m1.map = MapOver::Input;
        let mut m2 = TaskDef::new("m2", PathBuf::from("m.wasm"));
        m2.input = list(second);
        m2.map = MapOver::Input;
        m2.upstream_tasks = vec!["m1".into()];
        let def = FlowBuilder::new("f")
            .max_mapped_children(5)
            .task(m1)
            .task(m2)
            .build()
            .expect("flow");
        let (mut m, _clock) = bare_machine(def, None, false);
        m.start();
        loop {
            let attempts = runs(drain(&mut m));
            if attempts.is_empty() {
                break;
            }
            for a in attempts {
                m.handle(Event::AttemptEnded {
                    unit: a.unit,
                    outcome: ended(
                        Ending::Output(json!(1).into()),
                        Vec::new(),
                        Usage::default(),
                    ),
                });
            }
        }
        m.finish();
        m.run().clone()
    };
    let at = run(3, 2);
    assert_eq!(at.tasks[1].state.name, StateName::Mapped);
    assert_eq!(at.tasks[1].children.len(), 2);
    let over = run(3, 3);
    assert_eq!(over.tasks[0].state.name, StateName::Mapped);
    assert_eq!(over.tasks[1].state.name, StateName::Failed);
    assert!(over.tasks[1].children.is_empty());
    assert_eq!(
        over.tasks[1].state.message.as_deref(),
        Some(
            "mapping over 3 elements would make 6 mapped children in this flow run (3 already), \
             more than the flow's max_mapped_children of 5"
        )
    );
    // One task alone: at the cap, and one over.
    assert_eq!(run(0, 5).tasks[1].children.len(), 5);
    let alone = run(0, 6);
    assert_eq!(
        alone.tasks[1].state.message.as_deref(),
        Some(
            "mapping over 6 elements would make more mapped children than the flow's \
             max_mapped_children of 5"
        )
    );
}

/// A task skipped because an upstream task was skipped names that task, not another upstream.
#[test]
fn a_skip_names_the_upstream_task_that_was_skipped() {
    let a = task("a", json!(1));
    let b = task("b", json!(2));
    let mut c = task("c", json!(3));
    c.upstream_tasks = vec!["a".into(), "b".into()];
    c.skip_on_upstream_skip = true;
    let def = FlowBuilder::new("f")
        .task(a)
        .task(b)
        .task(c)
        .build()
        .expect("flow");
    let (mut m, _clock) = bare_machine(def, None, false);
    m.start();
    for attempt in runs(drain(&mut m)) {
        let ending = match attempt.unit.task {
            0 => Outcome::Output(Out::Scalar).ending(),
            _ => Outcome::Skip.ending(),
        };
        m.handle(Event::AttemptEnded {
            unit: attempt.unit,
            outcome: ended(ending, Vec::new(), Usage::default()),
        });
    }
    assert!(runs(drain(&mut m)).is_empty());
    m.finish();
    let c = &m.run().tasks[2];
    assert_eq!(c.state.name, StateName::Skipped);
    assert_eq!(
        c.state.message.as_deref(),
        Some("upstream task `b` was skipped")
    );
}

/// Resuming: a consumer that had already received an output (it completed, or holds it as its
/// cached input) no longer counts as waiting for it; those that had not received it still
/// get it, and once the last of them has it, it is released.
#[test]
fn a_resume_releases_an_output_once_its_last_consumer_takes_it() {
    let a = task("a", json!(1));
    let mut tasks = vec![a];
    for name in ["b", "c", "d", "e"] {
        let mut t = TaskDef::new(name, PathBuf::from("x.wasm"));
        t.input = Input::Task("a".into());
        tasks.push(t);
    }
    let mut builder = FlowBuilder::new("f");
    for t in tasks {
        builder = builder.task(t);
    }
    let def = builder.build().expect("flow");
    let now = start_time();
    let mut record = FlowRun::new(&def, BTreeMap::new(), BTreeMap::new(), now);
    record.tasks[0].state = State::new(StateName::Completed, now);
    record.tasks[0].output = Some(json!(5).into());
    // `b` completed; `c` had received its input and failed; `d` and `e` never ran.
    record.tasks[1].state = State::new(StateName::Completed, now);
    record.tasks[2].state = State::new(StateName::Failed, now);
    record.tasks[2].cached_input = Some(json!(5).into());
    let (mut m, _clock) = bare_machine(def, Some(record), false);
    m.start();
    let mut started: Vec<(usize, Json)> = runs(drain(&mut m))
        .into_iter()
        .map(|a| (a.unit.task, a.input))
        .collect();
    started.sort_by_key(|(t, _)| *t);
    let five = Json::from(json!(5));
    assert_eq!(
        started,
        [(2, five.clone()), (3, five.clone()), (4, five.clone())]
    );
    let a = &m.run().tasks[0];
    assert!(a.output_released, "{a:?}");
    assert!(m.nodes[0].output.is_none());
}

/// A TriggerFailed message says how each upstream task stood: its state, or for a mapped task
/// its children counted by state (in order of first appearance), or that it mapped none.
#[test]
fn a_trigger_failed_message_says_how_each_upstream_task_stood() {
    let a = task("a", json!(1));
    let mut m = task("m", json!([0, 1, 2]));
    m.map = MapOver::Input;
    let mut e = task("e", json!([]));
    e.map = MapOver::Input;
    let mut d = task("d", json!(3));
    d.upstream_tasks = vec!["a".into(), "m".into(), "e".into()];
    let def = FlowBuilder::new("f")
        .task(a)
        .task(m)
        .task(e)
        .task(d)
        .build()
        .expect("flow");
    let (mut machine, _clock) = bare_machine(def, None, false);
    machine.start();
    for attempt in runs(drain(&mut machine)) {
        let ending = match (attempt.unit.task, attempt.unit.child) {
            (0, _) | (1, Some(0)) => Outcome::Fail.ending(),
            _ => Outcome::Output(Out::Scalar).ending(),
        };
        machine.handle(Event::AttemptEnded {
            unit: attempt.unit,
            outcome: ended(ending, Vec::new(), Usage::default()),
        });
    }
    assert!(runs(drain(&mut machine)).is_empty());
    machine.finish();
    let d = &machine.run().tasks[3];
    assert_eq!(d.state.name, StateName::TriggerFailed);
    assert_eq!(
        d.state.message.as_deref(),
        Some(
            "trigger `all_successful` did not pass: `a` is Failed, `m`'s mapped children are \
             1 Failed, 2 Completed, `e` mapped no children"
        )
    );
}

/// Runs a one-task flow whose task makes the given attempts (answering every handler-component
/// request with the state it proposes), with `hooks` and the in-process `handler`; returns the
/// handler-component requests as (the state entered, the lists asked for), and the record.
fn with_hooks(
    hooks: crate::flow::Hooks,
    retries: u32,
    endings: Vec<Ending>,
    handler: Option<crate::runner::StateHandler>,
) -> (Vec<(StateName, HookKinds)>, TaskRun) {
    let mut t = task("t", json!(1));
    t.retries = retries;
    t.hooks = hooks;
    t.max_retry_delay = Duration::from_secs(60);
    let def = FlowBuilder::new("f").task(t).build().expect("flow");
    let handler = handler.unwrap_or_else(|| Arc::new(|_: &str, _: &State, new: State| new));
    let (mut m, clock) = handled_machine(def, handler, false);
    let mut endings = endings.into_iter();
    let mut asked = Vec::new();
    m.start();
    drive(&mut m, |m, c| match c {
        Command::RunHooks(r) => {
            asked.push((r.new.name, r.kinds));
            m.handle(Event::HooksDone {
                unit: r.unit,
                seq: r.seq,
                state: r.new,
                logs: Vec::new(),
            });
        }
        Command::Run(a) => {
            let ending = endings.next().expect("an ending for every attempt");
            m.handle(Event::AttemptEnded {
                unit: a.unit,
                outcome: ended(ending, Vec::new(), Usage::default()),
            });
        }
        Command::Timer { unit, at } => {
            clock.set(at);
            m.handle(Event::TimerFired(unit));
        }
        _ => {}
    });
    assert!(m.is_idle());
    m.finish();
    (asked, m.run().tasks[0].clone())
}

/// Each list of handler components is asked for exactly on its transitions: `on_state` on
/// every one, `on_completion` into a Completed-type state, `on_failure` into a Failed-type or
/// Crashed state, `on_retry` into Retrying.
#[test]
fn each_handler_list_runs_on_its_transitions_only() {
    let hooks = |which: &str| {
        let mut h = crate::flow::Hooks::default();
        let list = match which {
            "on_state" => &mut h.on_state,
            "on_completion" => &mut h.on_completion,
            "on_failure" => &mut h.on_failure,
            _ => &mut h.on_retry,
        };
        list.push(PathBuf::from("h.wasm"));
        h
    };
    let kinds = |which: &str| HookKinds {
        on_state: which == "on_state",
        on_completion: which == "on_completion",
        on_failure: which == "on_failure",
        on_retry: which == "on_retry",
    };
    let retry_then = |last: Ending| vec![Outcome::Retry(None).ending(), last];
    use StateName::*;
    for which in ["on_state", "on_completion", "on_failure", "on_retry"] {
        let k = kinds(which);
        let mut seen = 0;
        // Retried, then completed; retried, then failed; lost, then crashed for good.
        let scripts = [
            retry_then(Outcome::Output(Out::Scalar).ending()),
            retry_then(Outcome::Fail.ending()),
            vec![Ending::Lost {
                message: "gone".into(),
            }],
        ];
        for (n, script) in scripts.into_iter().enumerate() {
            let retries = if n == 2 { 0 } else { 1 };
            let (asked, rec) = with_hooks(hooks(which), retries, script, None);
            // Every transition (the record's creation, Pending, is none).
            let want: Vec<(StateName, HookKinds)> = rec
                .history
                .iter()
                .filter(|t| t.from.is_some())
                .map(|t| t.to)
                .filter(|s| match which {
                    "on_state" => true,
                    "on_completion" => s.state_type() == StateType::Completed,
                    "on_failure" => {
                        matches!(s.state_type(), StateType::Failed | StateType::Crashed)
                    }
                    _ => *s == Retrying,
                })
                .map(|s| (s, k))
                .collect();
            assert_eq!(asked, want, "{which}, script {n}: {:?}", history(&rec));
            seen += asked.len();
        }
        assert!(seen > 0, "{which} never ran");
    }
    // The histories those ran over.
    let (_, rec) = with_hooks(
        hooks("on_state"),
        1,
        retry_then(Outcome::Fail.ending()),
        None,
    );
    assert_eq!(
        history(&rec),
        [Pending, Running, AwaitingRetry, Retrying, Failed]
    );
}

/// A state handler that replaces a finished attempt's state (here Completed) with a Scheduled
/// one runs the task again only with a retry left, and no later than the task's longest retry
/// delay; one that replaces it with a state that cannot follow an attempt (Running) fails the
/// task.
#[test]
fn a_handlers_replacement_is_held_to_the_retry_policy() {
    let later = |hours: i64| -> crate::runner::StateHandler {
        Arc::new(move |_name: &str, _old: &State, new: State| {
            if new.name == StateName::Completed {
                let mut s = State::new(StateName::AwaitingRetry, new.timestamp);
                s.scheduled_for = Some(new.timestamp + TimeDelta::hours(hours));
                s
            } else {
                new
            }
        })
    };
    let complete_twice = || vec![Outcome::Output(Out::Scalar).ending(); 2];
    // One retry: the replacement runs it again, its start capped at max_retry_delay (60 s);
    // then no retry is left and the task fails, saying why.
    let (_, rec) = with_hooks(
        crate::flow::Hooks::default(),
        1,
        complete_twice(),
        Some(later(1)),
    );
    use StateName::*;
    assert_eq!(
        history(&rec),
        [Pending, Running, AwaitingRetry, Retrying, Failed],
        "{:?}",
        rec.history
    );
    let waited = &rec.history[2];
    assert!(
        waited
            .message
            .as_deref()
            .is_some_and(|m| m.contains("is capped at 1m from now")),
        "{waited:?}"
    );
    assert_eq!(
        rec.history[3].time - rec.history[2].time,
        TimeDelta::seconds(60)
    );
    assert_eq!(
        rec.state.message.as_deref(),
        Some(
            "a state handler replaced Completed with AwaitingRetry to run the task again, but no \
             retries remain (2 attempts made, retries = 1)"
        )
    );
    // Within the cap, and exactly at it: no note, and the handler's own time.
    for secs in [30, 60] {
        let soon: crate::runner::StateHandler = Arc::new(move |_: &str, _: &State, new: State| {
            if new.name == StateName::Completed {
                let mut s = State::new(StateName::AwaitingRetry, new.timestamp);
                s.scheduled_for = Some(new.timestamp + TimeDelta::seconds(secs));
                s
            } else {
                new
            }
        });
        let (_, rec) = with_hooks(
            crate::flow::Hooks::default(),
            1,
            complete_twice(),
            Some(soon),
        );
        assert_eq!(rec.history[2].message, None, "{secs} s");
        assert_eq!(
            rec.history[3].time - rec.history[2].time,
            TimeDelta::seconds(secs)
        );
    }
    // Running cannot follow an attempt.
    let running: crate::runner::StateHandler =
        Arc::new(|_: &str, _: &State, new: State| match new.name {
            StateName::Completed => State::new(StateName::Running, new.timestamp),
            _ => new,
        });
    let (_, rec) = with_hooks(
        crate::flow::Hooks::default(),
        0,
        vec![Outcome::Output(Out::Scalar).ending()],
        Some(running),
    );
    assert_eq!(rec.state.name, Failed);
    assert_eq!(
        rec.state.message.as_deref(),
        Some(
            "a state handler replaced Completed with Running, which cannot follow a finished \
             attempt (only a finished, paused or scheduled state can)"
        )
    );
}

/// With a store, every transition is written as it happens: a task run's write carries its
/// newest transition (a mapped child's first write, its whole history so far, and its parent),
/// and only a Completed write carries the output.
#[test]
fn each_transition_is_written_with_the_output_only_when_completed() {
    let mut t = task("t", json!(1));
    t.retries = 1;
    let mut m = task("m", json!([5]));
    m.map = MapOver::Input;
    m.upstream_tasks = vec!["t".into()];
    let def = FlowBuilder::new("f").task(t).task(m).build().expect("flow");
    let (mut machine, _clock) = machine_with(def, None, false, true);
    let mut writes: Vec<TaskWrite> = Vec::new();
    let mut take = |machine: &mut FlowMachine| -> Vec<Attempt> {
        let mut attempts = Vec::new();
        for c in drain(machine) {
            match c {
                Command::Write(Write::Task(w)) => writes.push(*w),
                Command::Run(a) => attempts.push(a),
                Command::Timer { unit, .. } => machine.handle(Event::TimerFired(unit)),
                _ => {}
            }
        }
        attempts
    };
    machine.start();
    let mut endings = vec![
        Outcome::Retry(None).ending(),
        Ending::Output(json!(7).into()),
        Ending::Output(json!(8).into()),
    ]
    .into_iter();
    loop {
        let attempts = take(&mut machine);
        let attempts = if attempts.is_empty() {
            take(&mut machine)
        } else {
            attempts
        };
        if attempts.is_empty() {
            break;
        }
        for a in attempts {
            let ending = endings.next().expect("an ending");
            machine.handle(Event::AttemptEnded {
                unit: a.unit,
                outcome: ended(ending, Vec::new(), Usage::default()),
            });
        }
    }
    assert_eq!(endings.next(), None);
    let t_id = machine.run().tasks[0].id;
    let of_t: Vec<&TaskWrite> = writes.iter().filter(|w| w.id == t_id).collect();
    let states: Vec<StateName> = of_t.iter().map(|w| w.state.name).collect();
    use StateName::*;
    assert_eq!(states, [Running, AwaitingRetry, Retrying, Completed]);
    for w in &of_t {
        assert_eq!(
            w.transitions.iter().map(|t| t.to).collect::<Vec<_>>(),
            [w.state.name],
            "{w:?}"
        );
        match w.state.name {
            Completed => assert!(
                matches!(&w.output, Some(Blob::Value(v)) if &Json::from(json!(7)) == v),
                "{w:?}"
            ),
            _ => assert!(w.output.is_none(), "{w:?}"),
        }
    }
    let child = &machine.run().tasks[1].children[0];
    let of_child: Vec<&TaskWrite> = writes.iter().filter(|w| w.id == child.id).collect();
    assert_eq!(
        of_child[0]
            .transitions
            .iter()
            .map(|t| t.to)
            .collect::<Vec<_>>(),
        [Pending, Running]
    );
    assert_eq!(of_child[0].parent, Some(machine.run().tasks[1].id));
    assert!(
        of_child.last().is_some_and(
            |w| matches!(&w.output, Some(Blob::Value(v)) if &Json::from(json!(8)) == v)
        ),
        "{of_child:?}"
    );
}

/// A cache hit that a state handler sends back to run again runs the component: it does not
/// ask the cache again (which would answer the same).
#[test]
fn a_cache_hit_a_handler_reschedules_runs_the_component() {
    let mut t = task("t", json!(1));
    t.retries = 1;
    t.cache = Some(crate::cache::CachePolicy {
        cache_for: Duration::from_secs(60),
        validator: crate::cache::CacheValidator::AllInputs,
    });
    let def = FlowBuilder::new("f").task(t).build().expect("flow");
    let handler = Arc::new(|_: &str, _: &State, new: State| match new.name {
        StateName::Cached => State::new(StateName::AwaitingRetry, new.timestamp),
        _ => new,
    });
    let (mut m, clock) = handled_machine(def, handler, true);
    let next = |m: &mut FlowMachine| -> Vec<Command> {
        drain(m)
            .into_iter()
            .filter(|c| !matches!(c, Command::Write(_)))
            .collect()
    };
    let unit = Unit::task(0);
    m.start();
    let commands = next(&mut m);
    let Some(Command::LookupCache { key, .. }) = commands.first() else {
        panic!("{commands:?}");
    };
    let entry = CacheEntry {
        key: key.key.clone(),
        task: "t".into(),
        validator: key.validator.clone(),
        component: String::new(),
        blob: "b".into(),
        size: 1,
        created_at: clock.now(),
        expires_at: clock.now() + TimeDelta::seconds(60),
        flow_run: "earlier".into(),
        task_run: "earlier".into(),
    };
    m.handle(Event::CacheAnswered {
        unit,
        answer: Ok(CacheLookup::Hit {
            output: json!(2).into(),
            blob: "b".into(),
            entry: Box::new(entry),
        }),
    });
    let commands = next(&mut m);
    assert!(
        matches!(commands.as_slice(), [Command::Timer { .. }]),
        "{commands:?}"
    );
    m.handle(Event::TimerFired(unit));
    let commands = next(&mut m);
    assert!(
        matches!(commands.as_slice(), [Command::Run(a)] if a.ctx.attempt == 1),
        "{commands:?}"
    );
}

/// A flow written as code: a task run whose handle the body still holds shows the body its
/// output; one whose handle the body dropped keeps none (its output is released); and a task
/// run that pauses fails, since nobody could resume it (the body would wait for ever).
#[test]
fn a_code_flows_task_runs_keep_outputs_only_for_held_handles_and_cannot_pause() {
    let t = TaskDef::new("t", PathBuf::from("t.wasm"));
    let def = FlowBuilder::new("code")
        .body(crate::flow::BodyDef::new("body.wasm"))
        .task(t)
        .build()
        .expect("flow");
    let (mut m, _clock) = bare_machine(def, None, false);
    m.start();
    let submit = |m: &mut FlowMachine, input: Value| -> usize {
        let made = m
            .submit(Submission {
                task: "t",
                inputs: vec![input.into()],
                mapped: false,
                wait_for: &[],
                trigger: None,
                subflow: false,
            })
            .expect("submitted");
        made[0].0
    };
    let (held, dropped, paused) = (
        submit(&mut m, json!(1)),
        submit(&mut m, json!(2)),
        submit(&mut m, json!(3)),
    );
    m.release(dropped);
    for a in runs(drain(&mut m)) {
        let ending = match a.unit.task {
            i if i == paused => Outcome::Pause.ending(),
            i => Ending::Output(json!(i * 10).into()),
        };
        m.handle(Event::AttemptEnded {
            unit: a.unit,
            outcome: ended(ending, Vec::new(), Usage::default()),
        });
    }
    let held_state = m.state_of(held).expect("a task run");
    assert_eq!(held_state.name, StateName::Completed);
    assert_eq!(held_state.result, Some(json!(held * 10).into()));
    let dropped_state = m.state_of(dropped).expect("a task run");
    assert_eq!(dropped_state.name, StateName::Completed);
    assert_eq!(dropped_state.result, None);
    assert!(m.run().tasks[dropped].output_released);
    assert!(!m.run().tasks[held].output_released);
    let paused_state = m.state_of(paused).expect("a task run");
    assert_eq!(paused_state.name, StateName::Failed);
    assert!(
        paused_state
            .message
            .as_deref()
            .is_some_and(|msg| msg.starts_with("a task run of a flow written as code cannot pause")),
        "{paused_state:?}"
    );
}

/// A flow `a` → `b` → `c` (`c` reads `b`'s output; `b` caches its output, one retry, and may
/// be `manual_only`) run to its end, with an in-process state handler on `b` that replaces
/// `from` with `to` (`to` = `from`: the same state, dated an hour later). Tasks named in
/// `fail` fail every attempt; the others output 1. Every cache lookup misses and every
/// executor slot is granted at once (with `acquire`). Returns the record and every command
/// the machine gave.
fn run_replacing(
    b: TaskDef,
    (from, to): (StateName, StateName),
    fail: &[&str],
    acquire: bool,
) -> (FlowRun, Vec<Command>) {
    let a = task("a", json!(1));
    let mut c = task("c", json!(null));
    c.input = Input::Task("b".into());
    let def = Arc::new(
        FlowBuilder::new("f")
            .task(a)
            .task(b)
            .task(c)
            .build()
            .expect("flow"),
    );
    let names: Vec<String> = def.tasks.iter().map(|t| t.name.clone()).collect();
    let clock = SimClock::new(start_time());
    let mut handlers = StateHandlers::default();
    let handler: crate::runner::StateHandler = Arc::new(move |_: &str, _: &State, new: State| {
        if new.name != from {
            return new;
        }
        let mut to = State::new(to, new.timestamp);
        if to.name == from {
            to.scheduled_for = Some(new.timestamp + TimeDelta::hours(1));
        }
        to
    });
    handlers.task.insert("b".into(), vec![handler]);
    let settings = Settings {
        handlers: Arc::new(handlers),
        record: true,
        acquire,
        ..settings(&clock, 3)
    };
    let run = FlowRun::new(&def, BTreeMap::new(), BTreeMap::new(), clock.now());
    let mut m = FlowMachine::new(def, run, &[], settings);
    let mut seen = Vec::new();
    m.start();
    drive(&mut m, |m, c| {
        match &c {
            Command::Run(a) => {
                let ending = match fail.contains(&names[a.unit.task].as_str()) {
                    true => Outcome::Fail.ending(),
                    false => Outcome::Output(Out::Scalar).ending(),
                };
                m.handle(Event::AttemptEnded {
                    unit: a.unit,
                    outcome: ended(ending, Vec::new(), Usage::default()),
                });
            }
            Command::Timer { unit, at } => {
                clock.set(*at);
                m.handle(Event::TimerFired(*unit));
            }
            Command::LookupCache { unit, .. } => m.handle(Event::CacheAnswered {
                unit: *unit,
                answer: Ok(CacheLookup::Miss("no entry".into())),
            }),
            Command::Acquire(unit) => m.handle(Event::SlotGranted(*unit)),
            _ => {}
        }
        seen.push(c);
    });
    assert!(m.is_idle());
    m.finish();
    (m.into_run(), seen)
}

/// `b` as [`run_replacing`] wants it: cached, one retry.
fn replaced_task() -> TaskDef {
    let mut b = task("b", json!(1));
    b.upstream_tasks = vec!["a".into()];
    b.retries = 1;
    b.cache = Some(crate::cache::CachePolicy {
        cache_for: Duration::from_secs(60),
        validator: crate::cache::CacheValidator::AllInputs,
    });
    b
}

/// What `b` went through, its attempts and its message; and the flow run's state.
fn replaced_outcome(run: &FlowRun) -> (Vec<StateName>, u32, Option<&str>, StateName) {
    let b = &run.tasks[1];
    (
        history(b),
        b.attempts,
        b.state.message.as_deref(),
        run.state.name,
    )
}

/// As in Prefect 1, where each step of the task runner checks the state it is handed, a state
/// handler's replacement of an attempt's start (Running, Retrying) stands if it is a Running
/// one; a finished one ends the task run without running the component (not counted as an
/// attempt, nothing cached, an executor's slot given back, a Completed output null); any other
/// would leave the task waiting on nothing, and fails it.
#[test]
fn a_replacement_of_an_attempts_start_runs_it_skips_it_or_fails_the_task() {
    use StateName::*;
    let ran_b = |seen: &[Command]| {
        seen.iter()
            .filter(|c| matches!(c, Command::Run(a) if a.unit.task == 1))
            .count()
    };
    for acquire in [false, true] {
        let (run, seen) = run_replacing(replaced_task(), (Running, Completed), &[], acquire);
        assert_eq!(
            replaced_outcome(&run),
            (vec![Pending, Completed], 0, None, Completed)
        );
        assert_eq!(ran_b(&seen), 0);
        assert!(
            !seen
                .iter()
                .any(|c| matches!(c, Command::Write(Write::Cache(_)))),
            "nothing ran, so nothing is cached: {seen:?}"
        );
        let c_input = seen.iter().find_map(|c| match c {
            Command::Run(a) if a.unit.task == 2 => Some(a.input.clone()),
            _ => None,
        });
        assert_eq!(c_input, Some(Json::null()));
        let released = seen
            .iter()
            .filter(|c| matches!(c, Command::Release(u) if u.task == 1))
            .count();
        assert_eq!(released, 1, "acquire = {acquire}: {seen:?}");
    }
    // Skipped: what reads it is skipped too.
    let (run, _) = run_replacing(replaced_task(), (Running, Skipped), &[], false);
    assert_eq!(run.tasks[2].state.name, Skipped);
    // A retry replaced with Completed: one attempt made.
    let (run, seen) = run_replacing(replaced_task(), (Retrying, Completed), &["b"], false);
    assert_eq!(
        replaced_outcome(&run),
        (
            vec![Pending, Running, AwaitingRetry, Completed],
            1,
            None,
            Completed
        )
    );
    assert_eq!(ran_b(&seen), 1);
    // Retrying for Running: a Running-type state, so the attempt runs.
    let (run, seen) = run_replacing(replaced_task(), (Running, Retrying), &[], false);
    assert_eq!(
        replaced_outcome(&run),
        (vec![Pending, Retrying, Completed], 1, None, Completed)
    );
    assert_eq!(ran_b(&seen), 1);
    for to in [Paused, AwaitingRetry, Pending, Cancelling] {
        let (run, seen) = run_replacing(replaced_task(), (Running, to), &[], false);
        let message = format!(
            "a state handler replaced Running with {to} before the attempt started (only \
             Running, Retrying, or a finished state, which skips the attempt, can replace it)"
        );
        assert_eq!(
            replaced_outcome(&run),
            (vec![Pending, Failed], 0, Some(message.as_str()), Failed)
        );
        assert_eq!(ran_b(&seen), 0);
        assert_eq!(run.tasks[2].state.name, TriggerFailed);
    }
}

/// A `manual_only` task's pause replaced by the handlers: a paused state waits, a finished one
/// ends the task run (what reads it goes on), and any other fails it.
#[test]
fn a_replacement_of_a_pause_waits_or_ends_the_task() {
    use StateName::*;
    let manual = || {
        let mut b = replaced_task();
        b.trigger = Trigger::ManualOnly;
        b
    };
    let (run, seen) = run_replacing(manual(), (Paused, Skipped), &[], false);
    assert_eq!(
        replaced_outcome(&run),
        (vec![Pending, Skipped], 0, None, Completed)
    );
    assert_eq!(run.tasks[2].state.name, Skipped);
    assert!(
        !seen
            .iter()
            .any(|c| matches!(c, Command::Run(a) if a.unit.task == 1))
    );
    let (run, _) = run_replacing(manual(), (Paused, Completed), &[], false);
    assert_eq!(
        replaced_outcome(&run),
        (vec![Pending, Completed], 0, None, Completed)
    );
    assert_eq!(run.tasks[2].state.name, Completed);
    let (run, _) = run_replacing(manual(), (Paused, Running), &[], false);
    assert_eq!(
        replaced_outcome(&run),
        (
            vec![Pending, Failed],
            0,
            Some(
                "a state handler replaced Paused with Running (only a paused or a finished state \
                 can replace a pause)"
            ),
            Failed
        )
    );
    // A pause dated (as Prefect 1's Paused can carry a start time) still waits.
    let (run, _) = run_replacing(manual(), (Paused, Paused), &[], false);
    assert_eq!(
        replaced_outcome(&run),
        (vec![Pending, Paused], 0, None, Paused)
    );
    // Unreplaced, the flow run waits on it.
    let (run, _) = run_replacing(manual(), (Completed, Completed), &[], false);
    assert_eq!(
        replaced_outcome(&run),
        (
            vec![Pending, Paused],
            0,
            Some("manual_only: waiting to be resumed with this task as a start task"),
            Paused
        )
    );
}

/// A state that ends a task run without an attempt (here TriggerFailed; Cancelled below) can
/// be replaced only with a finished one: anything else would leave the task in a state
/// nothing moves it on from (and the flow run would say it waits on a paused task).
#[test]
fn a_replacement_of_a_state_that_ends_the_task_run_must_be_finished() {
    use StateName::*;
    let (run, seen) = run_replacing(replaced_task(), (TriggerFailed, Completed), &["a"], false);
    assert_eq!(
        replaced_outcome(&run),
        (vec![Pending, Completed], 0, None, Completed)
    );
    assert!(
        !seen
            .iter()
            .any(|c| matches!(c, Command::Run(a) if a.unit.task == 1))
    );
    for to in [Running, AwaitingRetry, Pending, Paused] {
        let (run, seen) = run_replacing(replaced_task(), (TriggerFailed, to), &["a"], false);
        let message = format!(
            "a state handler replaced TriggerFailed with {to} but TriggerFailed ends the task \
             run (only a finished state can replace it)"
        );
        assert_eq!(
            replaced_outcome(&run),
            (vec![Pending, Failed], 0, Some(message.as_str()), Failed)
        );
        assert!(
            !seen
                .iter()
                .any(|c| matches!(c, Command::Run(a) if a.unit.task == 1))
        );
    }
    // In a cancelled run, the refused replacement is Cancelled.
    let mut t = task("t", json!(1));
    t.retries = 1;
    let def = FlowBuilder::new("f").task(t).build().expect("flow");
    let handler = Arc::new(|_: &str, _: &State, new: State| match new.name {
        Cancelled => State::new(Running, new.timestamp),
        _ => new,
    });
    let (mut m, _clock) = handled_machine(def, handler, false);
    m.start();
    let [a] = runs(drain(&mut m)).try_into().expect("one attempt");
    m.handle(Event::AttemptEnded {
        unit: a.unit,
        outcome: ended(Outcome::Fail.ending(), Vec::new(), Usage::default()),
    });
    let _ = drain(&mut m);
    m.handle(Event::CancelRequested);
    assert!(m.is_idle());
    m.finish();
    let t = &m.run().tasks[0];
    assert_eq!(history(t), [Pending, Running, AwaitingRetry, Cancelled]);
    assert_eq!(
        t.state.message.as_deref(),
        Some(
            "a state handler replaced Cancelled with Running but Cancelled ends the task run \
             (only a finished state can replace it)"
        )
    );
}

/// Replacements hold for mapped tasks too: children whose start a handler replaced with
/// Skipped do not run and count as done (the parent is Mapped, their outputs null); a parent
/// whose Mapped a handler replaced with Failed keeps no list.
#[test]
fn a_mapped_tasks_replacements_are_held_to_the_same_rules() {
    use StateName::*;
    let mapped = || {
        let mut t = task("m", json!([1, 2]));
        t.map = MapOver::Input;
        FlowBuilder::new("f").task(t).build().expect("flow")
    };
    let replace = |from: StateName, to: StateName| -> crate::runner::StateHandler {
        Arc::new(
            move |_: &str, _: &State, new: State| match new.name == from {
                true => State::new(to, new.timestamp),
                false => new,
            },
        )
    };
    let (mut m, _clock) = handled_machine(mapped(), replace(Running, Skipped), false);
    m.start();
    assert!(runs(drain(&mut m)).is_empty(), "no child runs");
    assert!(m.is_idle());
    m.finish();
    let t = &m.run().tasks[0];
    assert_eq!(t.state.name, Mapped);
    assert_eq!(t.output, Some(json!([null, null]).into()));
    let children: Vec<(StateName, u32)> = t
        .children
        .iter()
        .map(|c| (c.state.name, c.attempts))
        .collect();
    assert_eq!(children, [(Skipped, 0), (Skipped, 0)]);

    let (mut m, _clock) = handled_machine(mapped(), replace(Mapped, Failed), false);
    m.start();
    for a in runs(drain(&mut m)) {
        m.handle(Event::AttemptEnded {
            unit: a.unit,
            outcome: ended(
                Outcome::Output(Out::Scalar).ending(),
                Vec::new(),
                Usage::default(),
            ),
        });
    }
    assert!(m.is_idle());
    m.finish();
    let t = &m.run().tasks[0];
    assert_eq!(history(t), [Pending, Failed]);
    assert_eq!(t.output, None);
}
