//! The rules of `await` steps, signals, `sleep` steps and the saga
//! `deadline`, through the public API of the pure core: definitions parsed
//! from YAML, transitions applied at chosen times.

use std::{path::Path, sync::Arc};

use saga_core::{
    definition::{self, EventKind, SagaDefinition},
    engine::{
        self, Event, Outcome, Saga, SagaState, SignalFate, SignalRefused, StepStatus, Timer, Transition,
    },
};
use saga_wire::{CommandKind, Item, OrderPayload};

const THREE_DS: &str = r#"name: order-3ds
version: 1
deadline: 15m
steps:
  - name: reserve
    participant: inventory
    action: reserve
    compensation: release
  - name: charge
    participant: payment
    action: charge
    compensation: refund
  - name: confirm
    await: payment-confirmed
    timeout: 10m
    output_schema:
      type: object
      required: [code]
  - name: cool-off
    sleep: 30s
  - name: ship
    participant: shipping
    action: create-shipment
    compensation: cancel-shipment
    input:
      code: "${steps.confirm.output.code}"
"#;

const MIN: u64 = 60_000;

fn def(text: &str) -> Arc<SagaDefinition> {
    match definition::parse(Path::new("3ds.yaml"), text) {
        Ok(d) => Arc::new(d),
        Err(e) => panic!("{e}"),
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
        amount_cents: 100,
        currency: "EUR".into(),
    }
}

/// A saga of `text` created at t=0 and started at t=1.
fn started(text: &str) -> Saga {
    let saga = engine::create("s".into(), def(text), order(), "corr".into(), None, 0).saga;
    apply(&saga, Event::Start, 1).saga
}

fn apply(saga: &Saga, event: Event, now: u64) -> Transition {
    match engine::transition(saga, &event, now) {
        Ok(Some(t)) => t,
        other => panic!("{event:?} in {:?} at {now}: {other:?}", saga.state),
    }
}

fn no_op(saga: &Saga, event: Event, now: u64) {
    assert_eq!(engine::transition(saga, &event, now), Ok(None), "{event:?}");
}

fn ok(step: usize, kind: CommandKind) -> Event {
    Event::Reply {
        step,
        kind,
        attempt: 1,
        outcome: Outcome::Ok(serde_json::json!({})),
    }
}

fn signal(id: &str, payload: serde_json::Value) -> Event {
    Event::Signal {
        name: "payment-confirmed".into(),
        id: id.into(),
        payload,
    }
}

fn kinds(t: &Transition) -> Vec<EventKind> {
    t.history.iter().map(|h| h.kind).collect()
}

/// Reserve and charge done: the saga waits for `payment-confirmed` (at t=3).
fn waiting() -> Saga {
    let s = started(THREE_DS);
    let s = apply(&s, ok(0, CommandKind::Forward), 2).saga;
    let t = apply(&s, ok(1, CommandKind::Forward), 3);
    assert!(t.commands.is_empty(), "an await sends nothing");
    assert_eq!(kinds(&t), [EventKind::StepSucceeded, EventKind::StepWaiting]);
    t.saga
}

#[test]
fn an_await_takes_its_signal_as_output_then_a_sleep_wakes_and_the_next_step_gets_the_payload() {
    let s = waiting();
    assert_eq!(s.steps[2].status, StepStatus::Waiting);
    assert_eq!(s.steps[2].due_at_ms, Some(3 + 10 * MIN));
    assert_eq!(
        engine::timers(&s),
        [
            (15 * MIN, Timer::Deadline),
            (3 + 10 * MIN, Timer::Step { step: 2 })
        ]
    );
    let payload = serde_json::json!({"code": "3ds-ok"});
    assert_eq!(
        engine::check_signal(&s, "payment-confirmed", "sig-1", &payload),
        Ok(SignalFate::Consumed)
    );
    let t = apply(&s, signal("sig-1", payload.clone()), 4);
    assert_eq!(kinds(&t), [EventKind::StepSucceeded, EventKind::StepSleeping]);
    let s = t.saga;
    assert_eq!(s.steps[2].output, Some(payload));
    assert_eq!(s.steps[2].signal_id.as_deref(), Some("sig-1"));
    assert_eq!(s.steps[3].status, StepStatus::Sleeping);
    // Not due yet: nothing; due: the sleep ends and the shipment goes out.
    no_op(&s, Event::Timer(Timer::Step { step: 3 }), 4 + 29_999);
    let t = apply(&s, Event::Timer(Timer::Step { step: 3 }), 4 + 30_000);
    assert_eq!(t.commands.len(), 1);
    assert_eq!(t.commands[0].message.input, serde_json::json!({"code": "3ds-ok"}));
    // A fired timer, once more (a restart re-arming it): a no-op.
    no_op(&t.saga, Event::Timer(Timer::Step { step: 3 }), 4 + 30_001);
    let done = apply(&t.saga, ok(4, CommandKind::Forward), 40_000).saga;
    assert_eq!(done.state, SagaState::Completed);
    assert!(engine::timers(&done).is_empty());
}

#[test]
fn a_signal_before_the_await_is_kept_and_taken_when_the_step_is_reached() {
    let s = started(THREE_DS);
    let payload = serde_json::json!({"code": "early"});
    assert_eq!(
        engine::check_signal(&s, "payment-confirmed", "sig-1", &payload),
        Ok(SignalFate::Kept)
    );
    let t = apply(&s, signal("sig-1", payload.clone()), 2);
    assert_eq!(kinds(&t), [EventKind::SignalReceived]);
    assert_eq!(t.saga.state, SagaState::Running { step: 0 });
    assert_eq!(t.saga.signals.len(), 1);
    // The same id again: nothing; another id for the same name: refused.
    assert_eq!(
        engine::check_signal(&t.saga, "payment-confirmed", "sig-1", &payload),
        Ok(SignalFate::Duplicate)
    );
    no_op(&t.saga, signal("sig-1", payload.clone()), 3);
    assert!(matches!(
        engine::check_signal(&t.saga, "payment-confirmed", "sig-2", &payload),
        Err(SignalRefused::AlreadyReceived { id, .. }) if id == "sig-1"
    ));
    let s = apply(&t.saga, ok(0, CommandKind::Forward), 4).saga;
    // Reaching the await takes the kept signal in the same transition: on to the sleep.
    let t = apply(&s, ok(1, CommandKind::Forward), 5);
    assert_eq!(
        kinds(&t),
        [
            EventKind::StepSucceeded,
            EventKind::StepSucceeded,
            EventKind::StepSleeping
        ]
    );
    assert!(t.saga.signals.is_empty());
    assert_eq!(t.saga.steps[2].output, Some(payload));
    assert_eq!(t.saga.steps[2].status, StepStatus::Succeeded);
    assert_eq!(t.saga.state, SagaState::Running { step: 3 });
}

#[test]
fn an_await_that_times_out_compensates_and_a_late_signal_is_refused() {
    let s = waiting();
    no_op(&s, Event::Timer(Timer::Step { step: 2 }), 2 + 10 * MIN);
    let t = apply(&s, Event::Timer(Timer::Step { step: 2 }), 3 + 10 * MIN);
    assert_eq!(kinds(&t), [EventKind::StepFailed, EventKind::Compensating]);
    assert_eq!(t.saga.state, SagaState::Compensating { step: 1 });
    assert_eq!(t.saga.steps[2].status, StepStatus::Failed);
    assert_eq!(
        t.saga.reason.as_deref(),
        Some("step confirm: no signal payment-confirmed within 10m")
    );
    assert_eq!(t.commands.len(), 1, "the charge is refunded first");
    assert_eq!(t.commands[0].kind, CommandKind::Compensate);
    assert!(matches!(
        engine::check_signal(
            &t.saga,
            "payment-confirmed",
            "late",
            &serde_json::json!({"code": "x"})
        ),
        Err(SignalRefused::NotWaiting { .. })
    ));
    let s = apply(&t.saga, ok(1, CommandKind::Compensate), 3 + 10 * MIN + 1).saga;
    let s = apply(&s, ok(0, CommandKind::Compensate), 3 + 10 * MIN + 2).saga;
    assert_eq!(s.state, SagaState::Compensated);
    assert!(matches!(
        engine::check_signal(&s, "payment-confirmed", "late", &serde_json::json!({"code": "x"})),
        Err(SignalRefused::Finished {
            state: engine::StateTag::Compensated
        })
    ));
}

#[test]
fn an_await_with_on_failure_continue_goes_on_without_its_signal() {
    let text = THREE_DS.replace(
        "    timeout: 10m\n",
        "    timeout: 10m\n    on_failure: continue\n",
    );
    let s = started(&text);
    let s = apply(&s, ok(0, CommandKind::Forward), 2).saga;
    let s = apply(&s, ok(1, CommandKind::Forward), 3).saga;
    let t = apply(&s, Event::Timer(Timer::Step { step: 2 }), 3 + 10 * MIN);
    assert_eq!(t.saga.state, SagaState::Running { step: 3 });
    assert_eq!(t.saga.reason, None);
}

#[test]
fn the_deadline_passing_mid_step_counts_the_step_in_flight_as_unknown() {
    let s = started(THREE_DS);
    let s = apply(&s, ok(0, CommandKind::Forward), 2).saga;
    assert_eq!(s.steps[1].status, StepStatus::Running);
    no_op(&s, Event::Timer(Timer::Deadline), 15 * MIN - 1);
    let t = apply(&s, Event::Timer(Timer::Deadline), 15 * MIN);
    assert_eq!(kinds(&t), [EventKind::DeadlinePassed, EventKind::Compensating]);
    assert_eq!(
        t.settled,
        [(1, CommandKind::Forward)],
        "the charge in flight is withdrawn"
    );
    assert_eq!(
        t.saga.steps[1].status,
        StepStatus::Compensating,
        "unknown, so refunded"
    );
    assert_eq!(
        t.saga.reason.as_deref(),
        Some("deadline passed (15m after creation)")
    );
    assert_eq!(t.commands.len(), 1);
    assert_eq!(
        (t.commands[0].step, t.commands[0].kind),
        (1, CommandKind::Compensate)
    );
    // While compensating, the deadline no longer applies.
    assert!(engine::timers(&t.saga).is_empty());
    no_op(&t.saga, Event::Timer(Timer::Deadline), 16 * MIN);
}

#[test]
fn the_deadline_cuts_a_wait_short_with_nothing_to_undo_for_it() {
    let s = waiting();
    let t = apply(&s, Event::Timer(Timer::Deadline), 15 * MIN);
    assert_eq!(t.saga.steps[2].status, StepStatus::Failed);
    assert_eq!(t.saga.steps[2].due_at_ms, None);
    assert!(t.settled.is_empty());
    assert_eq!(
        (t.commands[0].step, t.commands[0].kind),
        (1, CommandKind::Compensate)
    );
}

#[test]
fn the_deadline_of_a_saga_never_started_ends_it_compensated() {
    let s = engine::create("s".into(), def(THREE_DS), order(), "corr".into(), None, 0).saga;
    assert_eq!(engine::timers(&s), [(15 * MIN, Timer::Deadline)]);
    let t = apply(&s, Event::Timer(Timer::Deadline), 15 * MIN);
    assert_eq!(t.saga.state, SagaState::Compensated);
    assert!(t.commands.is_empty());
}

#[test]
fn signals_for_unknown_names_and_bad_payloads_are_refused() {
    let s = waiting();
    assert!(matches!(
        engine::check_signal(&s, "nope", "x", &serde_json::json!({})),
        Err(SignalRefused::UnknownName { awaited, .. }) if awaited == "payment-confirmed"
    ));
    no_op(
        &s,
        Event::Signal {
            name: "nope".into(),
            id: "x".into(),
            payload: serde_json::json!({}),
        },
        4,
    );
    // The step's output_schema checks the payload.
    assert!(matches!(
        engine::check_signal(&s, "payment-confirmed", "x", &serde_json::json!({"no": 1})),
        Err(SignalRefused::Payload { .. })
    ));
    no_op(&s, signal("x", serde_json::json!({"no": 1})), 4);
}

#[test]
fn a_failing_sibling_cuts_a_parallel_wait_short_and_compensates_at_once() {
    let text = r#"name: p
version: 1
steps:
  - name: reserve
    participant: inventory
    action: reserve
    compensation: release
  - parallel:
      - name: charge
        participant: payment
        action: charge
        compensation: refund
      - name: confirm
        await: payment-confirmed
        timeout: 1h
"#;
    let s = started(text);
    let s = apply(&s, ok(0, CommandKind::Forward), 2).saga;
    assert_eq!(s.steps[2].status, StepStatus::Waiting);
    let rejected = Event::Reply {
        step: 1,
        kind: CommandKind::Forward,
        attempt: 1,
        outcome: Outcome::Rejected("declined".into()),
    };
    let t = apply(&s, rejected, 3);
    assert_eq!(t.saga.steps[2].status, StepStatus::Failed);
    assert_eq!(t.saga.state, SagaState::Compensating { step: 0 });
    assert_eq!(
        (t.commands[0].step, t.commands[0].kind),
        (0, CommandKind::Compensate)
    );
}

fn refused(text: &str) -> String {
    match definition::parse(Path::new("w.yaml"), text) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn wait_steps_are_checked_at_load_with_file_line_and_column() {
    let head = "name: w\nversion: 1\nsteps:\n";
    let cases = [
        (
            "  - name: a\n    await: go\n",
            "w.yaml:4:5: `await` step `a` needs a `timeout`",
        ),
        (
            "  - name: a\n    await: go\n    timeout: 1m\n    participant: p\n",
            "w.yaml:4:5: `await` step `a` takes no `participant`",
        ),
        (
            "  - name: a\n    sleep: 1m\n    timeout: 1m\n",
            "w.yaml:4:5: `sleep` step `a` takes no `timeout`",
        ),
        (
            "  - name: a\n    await: go\n    sleep: 1m\n    timeout: 1m\n",
            "w.yaml:4:5: step `a` both awaits and sleeps",
        ),
        (
            "  - name: a\n    await: go\n    timeout: 1m\n    on_failure: retry_forever\n",
            "w.yaml:7:17: on_failure `retry_forever`: an await is not retried",
        ),
        (
            "  - name: a\n    await: go\n    timeout: 1m\n  - name: b\n    await: go\n    timeout: 1m\n",
            "w.yaml:8:12: signal `go` is already awaited by step `a`",
        ),
        (
            "  - name: a\n    sleep: 0s\n",
            "w.yaml:5:12: sleep must be > 0 and ≤ 30 days",
        ),
        (
            "  - name: a\n    await: go\n    timeout: 31days\n",
            "w.yaml:6:14: timeout must be > 0 and ≤ 30 days",
        ),
        (
            "  - name: a\n    await: Go!\n    timeout: 1m\n",
            "w.yaml:5:12: await `Go!` is not a valid name",
        ),
    ];
    for (steps, expected) in cases {
        let e = refused(&format!("{head}{steps}"));
        assert!(e.starts_with(expected), "{steps}\n got: {e}\nwant: {expected}");
    }
    let e = refused("name: w\nversion: 1\ndeadline: soon\nsteps:\n  - name: a\n    sleep: 1s\n");
    assert!(
        e.starts_with("w.yaml:3:11: deadline: `soon` is not a duration"),
        "{e}"
    );
}

#[test]
fn wait_steps_round_trip_through_the_stored_definition() {
    let d = def(THREE_DS);
    let json = serde_json::to_string(&*d).unwrap_or_default();
    let back: SagaDefinition = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}"));
    assert_eq!(back, *d);
    // A command step's snapshot is as earlier versions wrote it (no `kind`).
    assert!(!json.contains(r#""kind":{"type":"command""#), "{json}");
}

const WHEN: &str = r#"name: w
version: 1
steps:
  - name: reserve
    participant: inventory
    action: reserve
    compensation: release
  - name: ship
    when: 'order.items.exists(i, !i.sku.startsWith("DIGITAL-"))'
    participant: shipping
    action: create-shipment
    compensation: cancel-shipment
  - parallel:
      - name: gift
        participant: loyalty
        action: wrap
        compensation: unwrap
      - name: confirm
        await: gift-ok
        timeout: 1m
    when: order.amount_cents > 5000
  - name: charge
    participant: payment
    action: charge
    compensation: refund
"#;

fn created_with(text: &str, sku: &str, amount_cents: i64) -> Saga {
    let order = OrderPayload {
        items: vec![Item {
            sku: sku.into(),
            quantity: 1,
        }],
        amount_cents,
        ..order()
    };
    let saga = engine::create("s".into(), def(text), order, "corr".into(), None, 0).saga;
    apply(&saga, Event::Start, 1).saga
}

#[test]
fn a_false_when_skips_the_step_and_a_skipped_step_is_never_undone() {
    // A digital order of 1.00: no shipment, no gift group.
    let s = created_with(WHEN, "DIGITAL-1", 100);
    let t = apply(&s, ok(0, CommandKind::Forward), 2);
    assert_eq!(
        kinds(&t),
        [
            EventKind::StepSucceeded,
            EventKind::StepSkipped,
            EventKind::StepSkipped,
            EventKind::StepSkipped
        ]
    );
    assert_eq!(t.saga.steps[1].status, StepStatus::Skipped);
    assert_eq!(
        t.history[1].detail.as_deref(),
        Some(r#"when: order.items.exists(i, !i.sku.startsWith("DIGITAL-")) is false"#)
    );
    assert_eq!(t.saga.state, SagaState::Running { step: 4 });
    assert_eq!(t.commands.len(), 1, "straight on to the charge");
    // A signal for the skipped await is refused.
    assert!(matches!(
        engine::check_signal(&t.saga, "gift-ok", "x", &serde_json::Value::Null),
        Err(SignalRefused::NotWaiting { .. })
    ));
    // The charge declined: only the reservation is released.
    let declined = Event::Reply {
        step: 4,
        kind: CommandKind::Forward,
        attempt: 1,
        outcome: Outcome::Rejected("declined".into()),
    };
    let t = apply(&t.saga, declined, 3);
    assert_eq!(t.commands.len(), 1);
    assert_eq!(
        (t.commands[0].step, t.commands[0].kind),
        (0, CommandKind::Compensate)
    );
    let done = apply(&t.saga, ok(0, CommandKind::Compensate), 4).saga;
    assert_eq!(done.state, SagaState::Compensated);
    assert_eq!(done.steps[1].status, StepStatus::Skipped);
}

#[test]
fn a_true_when_runs_the_step_and_a_groups_when_covers_its_steps() {
    let s = created_with(WHEN, "A-1", 9_000);
    let t = apply(&s, ok(0, CommandKind::Forward), 2);
    assert_eq!(t.commands.len(), 1, "the shipment");
    let t = apply(&t.saga, ok(1, CommandKind::Forward), 3);
    assert_eq!(t.saga.state, SagaState::Running { step: 2 });
    assert_eq!(t.saga.steps[2].status, StepStatus::Running);
    assert_eq!(t.saga.steps[3].status, StepStatus::Waiting);
}

#[test]
fn a_when_that_cannot_be_evaluated_fails_its_step_without_sending_it() {
    let text = r#"name: e
version: 1
steps:
  - name: reserve
    participant: inventory
    action: reserve
    compensation: release
  - name: ship
    when: steps.reserve.output.physical == true
    participant: shipping
    action: create-shipment
    compensation: cancel-shipment
"#;
    let s = started(text);
    // The reservation's output has no `physical`.
    let t = apply(&s, ok(0, CommandKind::Forward), 2);
    assert_eq!(t.saga.steps[1].status, StepStatus::Failed);
    assert_eq!(t.saga.state, SagaState::Compensating { step: 0 });
    assert!(
        t.saga
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("cannot be evaluated")),
        "{:?}",
        t.saga.reason
    );
    assert_eq!(
        (t.commands[0].step, t.commands[0].kind),
        (0, CommandKind::Compensate)
    );
}

#[test]
fn conditions_are_checked_at_load_with_file_line_and_column() {
    let head = "name: w\nversion: 1\nsteps:\n  - name: a\n    participant: p\n    action: x\n    compensation: none\n";
    let cases = [
        ("  - name: b\n    when: ordr.amount_cents > 1\n    sleep: 1s\n", "w.yaml:9:11: when: unknown name `ordr`"),
        (
            "  - name: b\n    when: steps.c.output.x == 1\n    sleep: 1s\n  - name: c\n    sleep: 1s\n",
            "w.yaml:9:11: when: `steps.c` is not a step that runs before this one",
        ),
        (
            "  - parallel:\n      - name: b\n        sleep: 1s\n        when: order.amount_cents > 1\n      - name: c\n        sleep: 1s\n    when: order.amount_cents > 2\n",
            "w.yaml:11:15: a step of a `parallel:` group with a `when:` has none of its own",
        ),
        ("  - name: b\n    when: 'order.amount_cents >'\n    sleep: 1s\n", "w.yaml:9:11: when: invalid CEL"),
    ];
    for (steps, expected) in cases {
        let e = refused(&format!("{head}{steps}"));
        assert!(e.starts_with(expected), "{steps}\n got: {e}\nwant: {expected}");
    }
}

#[test]
fn the_published_event_schema_names_every_event_kind() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../saga-definitions/schemas/saga-event.v1.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let schema: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}"));
    let listed: Vec<&str> = schema["properties"]["event"]["enum"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    let kinds: Vec<&str> = EventKind::ALL.iter().map(|k| k.as_str()).collect();
    assert_eq!(listed, kinds, "saga-event.v1.json and EventKind::ALL");
}

#[test]
fn signals_kept_for_later_steps_are_bounded_in_bytes() {
    let text = r#"name: k
version: 1
steps:
  - name: reserve
    participant: inventory
    action: reserve
    compensation: release
  - name: a
    await: first
    timeout: 1m
  - name: b
    await: second
    timeout: 1m
"#;
    let s = started(text);
    let big = serde_json::json!({ "blob": "x".repeat(40 * 1024) });
    let first = Event::Signal {
        name: "first".into(),
        id: "1".into(),
        payload: big.clone(),
    };
    let s = apply(&s, first, 2).saga;
    // A second 40 KiB payload would keep more than 64 KiB: refused, nothing changes.
    assert!(matches!(
        engine::check_signal(&s, "second", "2", &big),
        Err(SignalRefused::TooMuchKept { .. })
    ));
    no_op(
        &s,
        Event::Signal {
            name: "second".into(),
            id: "2".into(),
            payload: big,
        },
        3,
    );
    // A small one still fits.
    assert_eq!(
        engine::check_signal(&s, "second", "2", &serde_json::json!({"ok": true})),
        Ok(SignalFate::Kept)
    );
}
