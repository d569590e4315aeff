//! Property tests of the untrusted-input boundaries and the pure engine:
//! arbitrary event sequences (duplicates, reordering, late replies for old
//! attempts, operator events, signals early, late and repeated, timers firing
//! early, late and stale, restarts through the stored JSON) never panic and
//! never break the saga invariants; the YAML loader never panics on arbitrary text.

use std::{path::PathBuf, time::Duration};

use proptest::prelude::*;
use saga_core::{
    definition::{self, OnFailure, RetryPolicy, SagaDefinition, StepDefinition, StepKind},
    engine::{self, Command, Event, Outcome, Saga, SagaState, StepStatus, Timer, TransitionError},
};
use saga_wire::{CommandKind, Item, OrderPayload};

/// Steps of a shape whose kind byte is 3 await `sig{i}`, 4 sleep; others are
/// commands, 5 with a `when:` that is false, 6 one that is true.
fn kind_of(i: usize, kind: u8) -> StepKind {
    match kind {
        3 => StepKind::Await {
            signal: format!("sig{i}"),
        },
        4 => StepKind::Sleep {
            duration: Duration::from_secs(5),
        },
        _ => StepKind::Command,
    }
}

/// A definition from a shape: per step, whether it has a compensation, its
/// attempts, whether it joins the previous step's parallel group, its
/// `on_failure` (0 compensate, 1 continue, 2 retry forever) and its kind
/// ([`kind_of`]); with a deadline when `deadline`.
fn definition(steps: &[(bool, u32, bool, u8, u8)], deadline: bool) -> SagaDefinition {
    let mut groups = Vec::with_capacity(steps.len());
    for (i, (_, _, joins, _, _)) in steps.iter().enumerate() {
        let g = if *joins && i > 0 { groups[i - 1] } else { i };
        groups.push(g);
    }
    SagaDefinition {
        name: "p".into(),
        version: 1,
        steps: steps
            .iter()
            .enumerate()
            .map(|(i, (has_comp, attempts, _, on_failure, kind))| {
                let shape_kind = *kind;
                let kind = kind_of(i, *kind);
                let command = kind.is_command();
                StepDefinition {
                    name: format!("s{i}"),
                    participant: if command { format!("p{i}") } else { String::new() },
                    action: if command { "do".into() } else { String::new() },
                    compensation: (*has_comp && command).then(|| "undo".to_string()),
                    timeout: Duration::from_secs(if command { 1 } else { 5 }),
                    retry: RetryPolicy {
                        max_attempts: if command { *attempts } else { 1 },
                        ..RetryPolicy::default()
                    },
                    group: Some(groups[i]),
                    on_failure: match (on_failure % 3, command) {
                        (0, _) | (2, false) => OnFailure::Compensate,
                        (1, _) => OnFailure::Continue,
                        _ => OnFailure::RetryForever,
                    },
                    input: Default::default(),
                    compensation_input: Default::default(),
                    output_schema: None,
                    kind,
                    when: match shape_kind {
                        5 => saga_core::condition::Condition::parse("order.amount_cents > 5", &[]).ok(),
                        6 => saga_core::condition::Condition::parse("size(order.items) == 1", &[]).ok(),
                        _ => None,
                    },
                }
            })
            .collect(),
        input_schema: None,
        events: Default::default(),
        deadline: deadline.then(|| Duration::from_secs(60)),
        source: PathBuf::new(),
    }
}

fn order() -> OrderPayload {
    OrderPayload {
        order_id: "o".into(),
        customer_id: "c".into(),
        items: vec![Item {
            sku: "A".into(),
            quantity: 1,
        }],
        amount_cents: 1,
        currency: "EUR".into(),
    }
}

fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        Just(Outcome::Ok(serde_json::json!({}))),
        Just(Outcome::Rejected("no".into())),
        Just(Outcome::Transient("timeout".into())),
        Just(Outcome::NotApplied("no responders".into())),
    ]
}

/// Events an engine may see: mostly replies to plausible commands (so
/// sagas make progress), plus stale attempts, wrong kinds, unknown steps,
/// repeated starts and operator events.
fn event(steps: usize) -> impl Strategy<Value = Event> {
    prop_oneof![
        8 => (0..steps, any::<bool>(), 0u32..5, outcome()).prop_map(|(step, fwd, attempt, outcome)| Event::Reply {
            step,
            kind: if fwd { CommandKind::Forward } else { CommandKind::Compensate },
            attempt,
            outcome,
        }),
        1 => (steps..steps + 3, 0u32..3, outcome()).prop_map(|(step, attempt, outcome)| Event::Reply {
            step,
            kind: CommandKind::Forward,
            attempt,
            outcome,
        }),
        1 => Just(Event::Start),
        1 => Just(Event::Abort { reason: "prop".into() }),
        1 => Just(Event::Retry),
        3 => (0..steps + 1, 0u8..3, 0u8..3).prop_map(|(step, id, payload)| Event::Signal {
            name: format!("sig{step}"),
            id: format!("id{id}"),
            payload: serde_json::json!({ "p": payload }),
        }),
        2 => (0..steps + 2).prop_map(|step| Event::Timer(Timer::Step { step })),
        1 => Just(Event::Timer(Timer::Deadline)),
    ]
}

/// What happens between two events: time passes (by up to 40 s, so timers
/// come due or not) and, sometimes, a restart (the saga read back from the
/// JSON the stores keep).
fn pause() -> impl Strategy<Value = (u64, bool)> {
    (0u64..40_000, prop::bool::weighted(0.1))
}

/// Checks what must hold after every transition.
fn check(
    before: &Saga,
    saga: &Saga,
    commands: &[Command],
    history_seqs: &[u64],
) -> Result<(), TestCaseError> {
    // History is contiguous.
    let expected: Vec<u64> = (before.seq + 1..=saga.seq).collect();
    prop_assert_eq!(history_seqs, expected.as_slice());
    // Commands only for steps of the group in flight, at most one per step.
    let def = &saga.definition;
    let mut seen = std::collections::HashSet::new();
    for c in commands {
        prop_assert!(seen.insert((c.step, c.kind)), "two commands for step {}", c.step);
        prop_assert!(
            def.steps[c.step].kind.is_command(),
            "a command for a wait step {}",
            c.step
        );
        match saga.state {
            SagaState::Running { step: g } => {
                prop_assert_eq!(def.group_of(c.step), g);
                prop_assert_eq!(c.kind, CommandKind::Forward);
                prop_assert_eq!(saga.steps[c.step].status, StepStatus::Running);
                prop_assert_eq!(c.message.attempt, saga.steps[c.step].attempts);
            }
            SagaState::Compensating { step: g } => {
                prop_assert_eq!(def.group_of(c.step), g);
                prop_assert_eq!(c.kind, CommandKind::Compensate);
                prop_assert_eq!(saga.steps[c.step].status, StepStatus::Compensating);
                prop_assert_eq!(c.message.attempt, saga.steps[c.step].compensation_attempts);
                prop_assert!(def.steps[c.step].compensation.is_some());
            }
            other => prop_assert!(false, "command {:?} sent in {:?}", c.kind, other),
        }
        prop_assert_eq!(
            c.message.idempotency_key.clone(),
            format!("{}/{}/{}", saga.id, c.message.step, c.kind.as_str())
        );
    }
    // Attempts never exceed the policy (unless the step retries forever).
    for (p, d) in saga.steps.iter().zip(&def.steps) {
        if d.on_failure != OnFailure::RetryForever {
            prop_assert!(p.attempts <= d.retry.max_attempts);
        }
        prop_assert!(p.compensation_attempts <= d.retry.max_attempts);
    }
    // Only the group the state names has work in flight.
    let busy = |status: StepStatus| {
        saga.steps
            .iter()
            .enumerate()
            .filter(move |(_, p)| p.status == status)
            .map(|(k, _)| k)
    };
    match saga.state {
        SagaState::Running { step: g } => {
            let in_flight: Vec<usize> = (0..saga.steps.len())
                .filter(|&k| saga.steps[k].status.in_flight())
                .collect();
            prop_assert!(in_flight.iter().all(|&k| def.group_of(k) == g));
            prop_assert!(!in_flight.is_empty(), "running with nothing in flight");
            prop_assert_eq!(busy(StepStatus::Compensating).count(), 0);
        }
        SagaState::Compensating { step: g } => {
            prop_assert!(busy(StepStatus::Compensating).all(|k| def.group_of(k) == g));
            prop_assert!(
                busy(StepStatus::Compensating).count() > 0,
                "compensating with nothing in flight"
            );
            prop_assert_eq!(busy(StepStatus::Running).count(), 0);
        }
        _ => {
            prop_assert_eq!(busy(StepStatus::Running).count(), 0);
            prop_assert_eq!(busy(StepStatus::Compensating).count(), 0);
        }
    }
    // Waits and sleeps: only their own kind of step, with a timer, in the
    // group running; a signal kept is for an await not reached yet, once.
    for (k, (p, d)) in saga.steps.iter().zip(&def.steps).enumerate() {
        match p.status {
            StepStatus::Waiting => {
                prop_assert!(
                    d.awaits().is_some() && p.due_at_ms.is_some(),
                    "waiting step {} without a timer",
                    k
                )
            }
            StepStatus::Sleeping => {
                let sleeps = matches!(d.kind, StepKind::Sleep { .. });
                prop_assert!(
                    sleeps && p.due_at_ms.is_some(),
                    "sleeping step {} without a timer",
                    k
                )
            }
            _ => prop_assert!(p.due_at_ms.is_none(), "step {} ended with a timer", k),
        }
        if p.status.in_flight()
            && !matches!(saga.state, SagaState::Running { step: g } if g == def.group_of(k))
        {
            prop_assert!(false, "step {} in flight outside its group's run", k);
        }
        if !d.kind.is_command() {
            prop_assert_eq!(p.attempts, 0);
            prop_assert!(!matches!(
                p.status,
                StepStatus::Unknown | StepStatus::Compensating
            ));
        }
    }
    let mut names = std::collections::HashSet::new();
    for signal in &saga.signals {
        prop_assert!(
            names.insert(signal.name.clone()),
            "signal {} kept twice",
            signal.name
        );
        let k = def.await_step(&signal.name);
        prop_assert!(k.is_some_and(|k| saga.steps[k].status == StepStatus::Pending));
    }
    // A step's signal, once taken, is never replaced.
    for (b, a) in before.steps.iter().zip(&saga.steps) {
        if b.signal_id.is_some() {
            prop_assert_eq!(&b.signal_id, &a.signal_id);
            prop_assert_eq!(&b.output, &a.output);
        }
    }
    if saga.state.is_terminal() {
        prop_assert!(engine::timers(saga).is_empty(), "a finished saga keeps timers");
    }
    match saga.state {
        SagaState::Completed => {
            for (p, d) in saga.steps.iter().zip(&def.steps) {
                let fine = matches!(p.status, StepStatus::Succeeded | StepStatus::Skipped)
                    || (d.on_failure == OnFailure::Continue
                        && matches!(
                            p.status,
                            StepStatus::Rejected | StepStatus::Failed | StepStatus::Unknown
                        ));
                prop_assert!(fine, "completed saga with a step in {:?}", p.status);
            }
        }
        SagaState::Compensated => {
            // Nothing that may have an effect is left undone.
            for (p, d) in saga.steps.iter().zip(&def.steps) {
                let undone = match p.status {
                    // `compensation: none` declares there is nothing to undo.
                    StepStatus::Succeeded | StepStatus::Unknown => d.compensation.is_none(),
                    StepStatus::Running
                    | StepStatus::Compensating
                    | StepStatus::Waiting
                    | StepStatus::Sleeping => false,
                    StepStatus::Skipped
                    | StepStatus::Pending
                    | StepStatus::Rejected
                    | StepStatus::Failed
                    | StepStatus::Compensated
                    | StepStatus::CompensationFailed => true,
                };
                prop_assert!(undone, "compensated saga with step in {:?}", p.status);
            }
        }
        SagaState::Failed { step } => {
            prop_assert_eq!(saga.steps[step].status, StepStatus::CompensationFailed);
        }
        SagaState::Pending | SagaState::Running { .. } | SagaState::Compensating { .. } => {}
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_event_sequences_keep_the_invariants(
        shape in prop::collection::vec((any::<bool>(), 1u32..4, any::<bool>(), 0u8..3, 0u8..7), 1..6),
        deadline in any::<bool>(),
        events in prop::collection::vec((event(6), pause()), 0..80),
    ) {
        let def = definition(&shape, deadline);
        let n = def.steps.len();
        let mut saga = engine::create("s".into(), def.into(), order(), "c".into(), None, 0).saga;
        let mut now = 1;
        for (e, (pause, restart)) in std::iter::once((Event::Start, (1, false))).chain(events) {
            now += pause;
            if restart {
                let json = serde_json::to_string(&saga).map_err(|e| TestCaseError::fail(e.to_string()))?;
                let back: Saga = serde_json::from_str(&json).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(&back, &saga);
                saga = back;
            }
            // A timer fires only when due, as the runner fires them.
            if let Event::Timer(timer) = &e {
                let due = engine::timers(&saga).iter().any(|(at, t)| t == timer && *at <= now);
                if !due && now % 2 == 0 {
                    continue;
                }
            }
            if let Event::Signal { name, id, payload } = &e {
                // What `check_signal` promised is what the transition does.
                let promised = engine::check_signal(&saga, name, id, payload);
                let t = engine::transition(&saga, &e, now);
                let moved = matches!(t, Ok(Some(_)));
                let expected = matches!(promised, Ok(engine::SignalFate::Consumed | engine::SignalFate::Kept));
                prop_assert_eq!(moved, expected, "check_signal said {:?}", promised);
            }
            match engine::transition(&saga, &e, now) {
                Ok(Some(t)) => {
                    let seqs: Vec<u64> = t.history.iter().map(|h| h.seq).collect();
                    check(&saga, &t.saga, &t.commands, &seqs)?;
                    if saga.state.is_terminal() {
                        // Only an operator retry moves a terminal (FAILED) saga.
                        let operator_retry = matches!((saga.state, &e), (SagaState::Failed { .. }, Event::Retry));
                        prop_assert!(operator_retry, "terminal saga moved by {:?}", e);
                    }
                    saga = t.saga;
                }
                Ok(None) => {}
                Err(TransitionError::NoSuchStep { step, .. }) => prop_assert!(step >= n),
                Err(TransitionError::Unexpected { .. }) => {
                    prop_assert_eq!(saga.state, SagaState::Pending);
                }
            }
        }
    }

    #[test]
    fn the_yaml_loader_never_panics(text in ".{0,400}") {
        let _ = definition::parse(std::path::Path::new("fuzz.yaml"), &text);
    }

    #[test]
    fn the_yaml_loader_never_panics_on_near_valid_files(
        cut in 0usize..400,
        junk in "[a-z:{}\\[\\], \\n-]{0,20}",
    ) {
        let good = "name: order\nversion: 1\ndefaults:\n  timeout: 2s\n  retry: { max_attempts: 5, initial_backoff: 50ms }\nsteps:\n  - name: a\n    participant: p\n    action: x\n    compensation: y\n    timeout: 5s\n";
        let cut = cut.min(good.len());
        let text = format!("{}{}{}", &good[..cut], junk, &good[cut..]);
        let _ = definition::parse(std::path::Path::new("fuzz.yaml"), &text);
    }

    #[test]
    fn envelopes_never_panic_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = serde_json::from_slice::<saga_wire::Command>(&bytes);
        let _ = serde_json::from_slice::<saga_wire::Reply>(&bytes);
    }
}
