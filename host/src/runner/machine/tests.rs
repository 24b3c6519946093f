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

impl Harness {
    fn new(flow: &Flow, events: bool, items: u8, acquire: bool) -> Self {
        let clock = SimClock::new(start_time());
        let settings = Settings {
            clock: Arc::new(clock.clone()),
            handlers: Arc::new(StateHandlers::default()),
            record: false,
            events,
            digests: vec![String::new(); flow.def.tasks.len()],
            grants: vec![(String::new(), String::new()); flow.def.tasks.len()],
            logs_before: 0,
            tenant: None,
            keep_retry_budget: false,
            acquire,
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
    let mut t = TaskDef::new("t", PathBuf::from("t.wasm"));
    t.input = Input::Literal(json!(1).into());
    t.retries = 1;
    t.cache = Some(crate::cache::CachePolicy {
        cache_for: Duration::from_secs(3600),
        validator: crate::cache::CacheValidator::AllInputs,
    });
    let def = Arc::new(FlowBuilder::new("cached").task(t).build().expect("flow"));
    let clock = SimClock::new(start_time());
    let settings = Settings {
        clock: Arc::new(clock.clone()),
        handlers: Arc::new(StateHandlers::default()),
        record: true,
        events: false,
        digests: vec![String::new()],
        grants: vec![(String::new(), String::new())],
        logs_before: 0,
        tenant: None,
        keep_retry_budget: false,
        acquire: false,
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
    assert!(
        matches!(commands.as_slice(), [Command::LookupCache { unit: u, .. }] if *u == unit),
        "{commands:?}"
    );
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
    m.handle(Event::AttemptEnded {
        unit,
        outcome: outcome(Ending::Output(json!(2).into())),
    });
    let _ = next(&mut m);
    assert!(m.is_idle());
    assert_eq!(m.run().tasks[0].state.name, StateName::Completed);
}

/// With an executor that queues: a unit stays Pending until the executor grants it a slot, is
/// Running (attempt counted) only then, and on a retry asks for a slot again. A cancel while a
/// unit waits ends it Cancelled without an attempt and gives back a slot granted later.
#[test]
fn with_an_executor_that_queues_a_unit_is_pending_until_granted_a_slot() {
    let mut a = TaskDef::new("a", PathBuf::from("a.wasm"));
    a.input = Input::Literal(json!(1).into());
    a.retries = 1;
    let mut b = TaskDef::new("b", PathBuf::from("b.wasm"));
    b.input = Input::Literal(json!(2).into());
    let def = Arc::new(
        FlowBuilder::new("queued")
            .task(a)
            .task(b)
            .build()
            .expect("flow"),
    );
    let clock = SimClock::new(start_time());
    let settings = Settings {
        clock: Arc::new(clock.clone()),
        handlers: Arc::new(StateHandlers::default()),
        record: false,
        events: false,
        digests: vec![String::new(); 2],
        grants: vec![(String::new(), String::new()); 2],
        logs_before: 0,
        tenant: None,
        keep_retry_budget: false,
        acquire: true,
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
