//! What a definition will do, worked out from the definition alone
//! (`sagactl plan`): the execution graph, group by group, and for each step
//! that can fail the compensation plan the engine would run.
//!
//! The rules mirror [`crate::engine`] (the tests below drive the engine to
//! check the plan against it):
//! - a step's failure (rejected, or out of attempts) waits for the rest of its
//!   group, then undoes, newest group first, every step that succeeded or whose
//!   outcome is unknown and that has a compensation; the steps of one group are
//!   undone at once;
//! - the failed step itself is undone only when its outcome is unknown (an
//!   attempt may have been applied: a timeout or a lost reply), never when it
//!   was rejected;
//! - `on_failure: continue` goes on with the next group instead;
//!   `on_failure: retry_forever` retries a transient failure until it answers,
//!   so only a rejection compensates;
//! - an `await` step fails by timing out (nothing to undo for it); a `sleep`
//!   step cannot fail; a failing sibling cuts both short;
//! - the saga's `deadline`, passing while it runs, undoes everything done
//!   so far, the commands in flight counted as unknown.

use serde::Serialize;

use crate::definition::{InputValue, OnFailure, SagaDefinition, StepKind};

/// The plan of one definition.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// `name@version`.
    pub definition: String,
    /// The file it came from.
    pub source: String,
    /// The groups in execution order.
    pub groups: Vec<PlanGroup>,
    /// One entry per step that can fail, in order: what its failure does.
    pub failures: Vec<FailurePlan>,
    /// The definition's `deadline` (e.g. `15m`), if any.
    pub deadline: Option<String>,
}

/// A group of steps run at the same time (one step when sequential).
#[derive(Debug, Clone, Serialize)]
pub struct PlanGroup {
    /// 1-based position.
    pub number: usize,
    /// Whether it came from a `parallel:` block.
    pub parallel: bool,
    /// Its steps.
    pub steps: Vec<PlanStep>,
}

/// One step as the plan shows it.
#[derive(Debug, Clone, Serialize)]
pub struct PlanStep {
    /// Step name.
    pub name: String,
    /// `command`, `await` or `sleep`.
    pub kind: &'static str,
    /// An await step's signal.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    /// Participant.
    pub participant: String,
    /// Forward action.
    pub action: String,
    /// Compensating action (`None`: `compensation: none`).
    pub compensation: Option<String>,
    /// Per-attempt timeout, e.g. `2s` (an await: how long it waits; a sleep: how long it sleeps).
    pub timeout: String,
    /// Attempts of the action (and of its compensation).
    pub max_attempts: u32,
    /// `compensate`, `retry_forever` or `continue`.
    pub on_failure: &'static str,
    /// Steps whose output the step or its compensation uses.
    pub uses_output_of: Vec<String>,
    /// Its `when:`, if any: false, the step is skipped (and never undone).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub when: Option<String>,
}

/// What happens when one step fails.
#[derive(Debug, Clone, Serialize)]
pub struct FailurePlan {
    /// The failing step.
    pub step: String,
    /// Its group's number.
    pub group: usize,
    /// How it can fail: `rejected`, and `out of attempts` unless it retries
    /// forever; an await: `timed out`.
    pub failures: Vec<&'static str>,
    /// `on_failure: continue`: the saga goes on (with this group, if any, next).
    pub continues_with: Option<usize>,
    /// Whether `continue` ends the saga COMPLETED (it was the last group).
    pub continues_to_completion: bool,
    /// Siblings awaited before anything is undone.
    pub awaits: Vec<String>,
    /// The undo stages, newest group first; empty: COMPENSATED at once.
    pub undo: Vec<UndoStage>,
}

/// The compensations of one group, sent at once.
#[derive(Debug, Clone, Serialize)]
pub struct UndoStage {
    /// The group's number.
    pub group: usize,
    /// What is undone.
    pub steps: Vec<Undo>,
}

/// One compensation of a plan.
#[derive(Debug, Clone, Serialize)]
pub struct Undo {
    /// The step undone.
    pub step: String,
    /// Participant.
    pub participant: String,
    /// Compensating action.
    pub action: String,
    /// When it runs: `if it succeeded` (a sibling or an earlier step that may
    /// have failed with `on_failure: continue`), `if its outcome is unknown`
    /// (the failing step), or `always` (an earlier step that must have succeeded).
    pub when: &'static str,
}

/// The name a step's nodes carry in [`Plan::render_mermaid`] (`s_<this>`
/// for the step, `u_<this>` for its compensation), so a caller can style them.
pub fn mermaid_id(step: &str) -> String {
    step.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

impl Plan {
    /// Works out the plan of `def`.
    pub fn of(def: &SagaDefinition) -> Plan {
        let ranges = def.groups();
        let number_of = |step: usize| ranges.iter().position(|r| r.contains(&step)).map_or(0, |p| p + 1);
        let groups = ranges
            .iter()
            .enumerate()
            .map(|(n, r)| PlanGroup {
                number: n + 1,
                parallel: r.len() > 1 || def.steps[r.start].group.is_some_and(|g| g != r.start),
                steps: r.clone().map(|i| plan_step(def, i)).collect(),
            })
            .collect();
        let failures = (0..def.steps.len())
            .filter(|&i| !matches!(def.steps[i].kind, StepKind::Sleep { .. }))
            .map(|i| failure_plan(def, &ranges, i, number_of(i)))
            .collect();
        Plan {
            definition: def.id(),
            source: def.source.display().to_string(),
            groups,
            failures,
            deadline: def.deadline.map(|d| humantime::format_duration(d).to_string()),
        }
    }

    /// The human text: the graph, then a compensation plan per failure point.
    pub fn render_text(&self) -> String {
        let mut out = format!("{}  ({})\n\nExecution\n", self.definition, self.source);
        for g in &self.groups {
            if g.parallel {
                out.push_str(&format!("  {}. parallel, all at once:\n", g.number));
            }
            for (k, s) in g.steps.iter().enumerate() {
                let lead = if !g.parallel {
                    format!("  {}.", g.number)
                } else if k + 1 == g.steps.len() {
                    "     └─".to_string()
                } else {
                    "     ├─".to_string()
                };
                let undo = s
                    .compensation
                    .as_ref()
                    .map_or("no compensation".to_string(), |c| {
                        format!("undo: {}.{c}", s.participant)
                    });
                let uses = if s.uses_output_of.is_empty() {
                    String::new()
                } else {
                    format!(" · uses output of {}", s.uses_output_of.join(", "))
                };
                let line = match (s.kind, &s.signal) {
                    ("await", Some(signal)) => format!(
                        "{lead} {}  await signal {signal}  (nothing to undo; timeout {}; on_failure {}{uses})\n",
                        s.name, s.timeout, s.on_failure
                    ),
                    ("sleep", _) => format!("{lead} {}  sleep {}  (a durable timer)\n", s.name, s.timeout),
                    _ => format!(
                        "{lead} {}  {}.{}  ({undo}; timeout {} × {} attempts; on_failure {}{uses})\n",
                        s.name, s.participant, s.action, s.timeout, s.max_attempts, s.on_failure
                    ),
                };
                match &s.when {
                    Some(w) => out.push_str(&format!("{}     only when: {w}\n", line.trim_end())),
                    None => out.push_str(&line),
                }
            }
        }
        out.push_str("  → COMPLETED\n");
        if let Some(d) = &self.deadline {
            out.push_str(&format!(
                "\nDeadline {d} after creation: a saga still running then undoes everything done so far \
                 (the commands in flight counted as unknown), as an abort would\n"
            ));
        }
        out.push_str("\nCompensation plans\n");
        for f in &self.failures {
            out.push_str(&format!("  {} fails ({}):\n", f.step, f.failures.join(" or ")));
            if f.continues_with.is_some() || f.continues_to_completion {
                let next = f
                    .continues_with
                    .map_or("→ COMPLETED".to_string(), |g| format!("go on with group {g}"));
                out.push_str(&format!("     on_failure continue: {next}, nothing undone now\n"));
                continue;
            }
            if !f.awaits.is_empty() {
                out.push_str(&format!("     await {} (same group)\n", f.awaits.join(", ")));
            }
            for (k, stage) in f.undo.iter().enumerate() {
                let what: Vec<String> = stage
                    .steps
                    .iter()
                    .map(|u| {
                        let when = if u.when == "always" {
                            String::new()
                        } else {
                            format!(" [{}]", u.when)
                        };
                        format!("{}.{} ({}){when}", u.participant, u.action, u.step)
                    })
                    .collect();
                let at_once = if stage.steps.len() > 1 { ", at once" } else { "" };
                out.push_str(&format!(
                    "     {}. undo group {}{at_once}: {}\n",
                    k + 1,
                    stage.group,
                    what.join(", ")
                ));
            }
            out.push_str("     → COMPENSATED (FAILED, for an operator, if a compensation is refused or runs out of attempts)\n");
        }
        out
    }

    /// A Mermaid flowchart: the groups as subgraphs, forward edges solid,
    /// each step's failure as a dashed edge into the compensation chain it
    /// starts, compensations walking back to COMPENSATED.
    pub fn render_mermaid(&self) -> String {
        let id = mermaid_id;
        let mut out = String::from("flowchart TD\n");
        out.push_str(&format!("  start([\"{} start\"])\n", self.definition));
        let mut prev = "start".to_string();
        for g in &self.groups {
            let gid = format!("g{}", g.number);
            let title = if g.parallel {
                format!("group {}: parallel", g.number)
            } else {
                format!("group {}", g.number)
            };
            out.push_str(&format!("  subgraph {gid} [\"{title}\"]\n"));
            for s in &g.steps {
                let what = match (s.kind, &s.signal) {
                    ("await", Some(signal)) => format!("await {signal}<br/>timeout {}", s.timeout),
                    ("sleep", _) => format!("sleep {}", s.timeout),
                    _ => format!("{}.{}", s.participant, s.action),
                };
                // Awaits and sleeps are drawn as rounded nodes: nothing is sent.
                let (open, close) = if s.kind == "command" {
                    ("[", "]")
                } else {
                    ("(", ")")
                };
                // A condition is shown as written, its quotes made safe for the label.
                let when = s
                    .when
                    .as_ref()
                    .map(|w| format!("<br/>when {}", w.replace('"', "#quot;")))
                    .unwrap_or_default();
                out.push_str(&format!(
                    "    s_{}{open}\"{}<br/>{what}{when}\"{close}\n",
                    id(&s.name),
                    s.name
                ));
            }
            out.push_str("  end\n");
            out.push_str(&format!("  {prev} --> {gid}\n"));
            prev = gid;
        }
        out.push_str(&format!("  {prev} --> completed([COMPLETED])\n"));
        out.push_str("  compensated([COMPENSATED])\n");
        // One compensation node per step that has one, chained group by group.
        let mut chain: Vec<(usize, Vec<String>)> = Vec::new();
        for g in &self.groups {
            let nodes: Vec<String> = g
                .steps
                .iter()
                .filter_map(|s| {
                    s.compensation.as_ref().map(|c| {
                        out.push_str(&format!(
                            "  u_{}[/\"{}.{c}<br/>undo {}\"/]\n",
                            id(&s.name),
                            s.participant,
                            s.name
                        ));
                        format!("u_{}", id(&s.name))
                    })
                })
                .collect();
            if !nodes.is_empty() {
                chain.push((g.number, nodes));
            }
        }
        for (k, (_, nodes)) in chain.iter().enumerate() {
            let next = chain
                .get(k.wrapping_sub(1))
                .filter(|_| k > 0)
                .map_or_else(|| vec!["compensated".to_string()], |(_, n)| n.clone());
            for from in nodes {
                for to in &next {
                    out.push_str(&format!("  {from} --> {to}\n"));
                }
            }
        }
        for f in &self.failures {
            let from = format!("s_{}", id(&f.step));
            if let Some(g) = f.continues_with {
                out.push_str(&format!("  {from} -. \"fails (continue)\" .-> g{g}\n"));
                continue;
            }
            if f.continues_to_completion {
                out.push_str(&format!("  {from} -. \"fails (continue)\" .-> completed\n"));
                continue;
            }
            match f.undo.first() {
                None => out.push_str(&format!("  {from} -. fails .-> compensated\n")),
                Some(stage) => {
                    for u in &stage.steps {
                        out.push_str(&format!("  {from} -. fails .-> u_{}\n", id(&u.step)));
                    }
                }
            }
        }
        out
    }
}

fn plan_step(def: &SagaDefinition, i: usize) -> PlanStep {
    let s = &def.steps[i];
    let mut uses: Vec<String> = s
        .input
        .values()
        .chain(s.compensation_input.values())
        .filter_map(|v| match v {
            InputValue::StepOutput { step, .. } if *step != i => def.steps.get(*step).map(|d| d.name.clone()),
            _ => None,
        })
        .collect();
    uses.sort();
    uses.dedup();
    PlanStep {
        name: s.name.clone(),
        kind: s.kind.as_str(),
        signal: s.awaits().map(str::to_string),
        participant: s.participant.clone(),
        action: s.action.clone(),
        compensation: s.compensation.clone(),
        timeout: humantime::format_duration(s.timeout).to_string(),
        max_attempts: s.retry.max_attempts,
        on_failure: s.on_failure.as_str(),
        uses_output_of: uses,
        when: s.when.as_ref().map(|w| w.source().to_string()),
    }
}

fn failure_plan(
    def: &SagaDefinition,
    ranges: &[std::ops::Range<usize>],
    i: usize,
    group: usize,
) -> FailurePlan {
    let step = &def.steps[i];
    let failures = match (&step.kind, step.on_failure) {
        (StepKind::Await { .. }, _) => vec!["timed out"],
        (_, OnFailure::RetryForever) => vec!["rejected"],
        _ => vec!["rejected", "out of attempts"],
    };
    let members = ranges.get(group.saturating_sub(1)).cloned().unwrap_or(i..i + 1);
    let mut plan = FailurePlan {
        step: step.name.clone(),
        group,
        failures,
        continues_with: None,
        continues_to_completion: false,
        awaits: members
            .clone()
            // Waits and sleeps of the group are cut short, not awaited.
            .filter(|&k| k != i && def.steps[k].kind.is_command())
            .map(|k| def.steps[k].name.clone())
            .collect(),
        undo: Vec::new(),
    };
    if step.on_failure == OnFailure::Continue {
        plan.awaits.clear();
        if group < ranges.len() {
            plan.continues_with = Some(group + 1);
        } else {
            plan.continues_to_completion = true;
        }
        return plan;
    }
    let undo = |k: usize, when: &'static str| {
        def.steps[k].compensation.as_ref().map(|c| Undo {
            step: def.steps[k].name.clone(),
            participant: def.steps[k].participant.clone(),
            action: c.clone(),
            when,
        })
    };
    // The failing group: siblings that succeeded, the step itself if unknown.
    let own: Vec<Undo> = members
        .clone()
        .filter_map(|k| {
            if k == i {
                undo(k, "if its outcome is unknown")
            } else {
                undo(k, "if it succeeded")
            }
        })
        .collect();
    if !own.is_empty() {
        plan.undo.push(UndoStage { group, steps: own });
    }
    for (n, r) in ranges.iter().enumerate().take(group.saturating_sub(1)).rev() {
        let steps: Vec<Undo> = r
            .clone()
            .filter_map(|k| {
                // A `continue` step may have failed and have nothing to undo.
                let when = if def.steps[k].on_failure == OnFailure::Continue {
                    "if it succeeded or its outcome is unknown"
                } else {
                    "always"
                };
                undo(k, when)
            })
            .collect();
        if !steps.is_empty() {
            plan.undo.push(UndoStage { group: n + 1, steps });
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::definition::parse;

    fn shipping() -> SagaDefinition {
        let text = r#"
name: order-with-shipping
version: 1
steps:
  - parallel:
      - { name: reserve, participant: inventory, action: reserve, compensation: release }
      - { name: charge, participant: payment, action: charge, compensation: refund }
  - name: note
    participant: crm
    action: note
    compensation: none
    on_failure: continue
  - name: ship
    participant: shipping
    action: create-shipment
    compensation: cancel-shipment
    input: { charge_id: "${steps.charge.output.charge_id}" }
"#;
        match parse(Path::new("t.yaml"), text) {
            Ok(d) => d,
            Err(e) => panic!("{e}"),
        }
    }

    fn stages(p: &FailurePlan) -> Vec<(usize, Vec<(&str, &str)>)> {
        p.undo
            .iter()
            .map(|s| {
                (
                    s.group,
                    s.steps.iter().map(|u| (u.step.as_str(), u.when)).collect(),
                )
            })
            .collect()
    }

    #[test]
    fn groups_and_failure_points_follow_the_engine_rules() {
        let plan = Plan::of(&shipping());
        assert_eq!(plan.groups.len(), 3);
        assert!(plan.groups[0].parallel);
        assert!(!plan.groups[2].parallel);
        assert_eq!(plan.groups[2].steps[0].uses_output_of, ["charge"]);

        let reserve = &plan.failures[0];
        assert_eq!(reserve.awaits, ["charge"]);
        assert_eq!(
            stages(reserve),
            [(
                1,
                vec![
                    ("reserve", "if its outcome is unknown"),
                    ("charge", "if it succeeded")
                ]
            )]
        );

        let note = &plan.failures[2];
        assert_eq!(note.continues_with, Some(3));
        assert!(note.undo.is_empty());

        // The shipment: itself if unknown, nothing for `note` (no compensation),
        // then both branches of group 1 at once.
        let ship = &plan.failures[3];
        assert!(ship.awaits.is_empty());
        assert_eq!(
            stages(ship),
            [
                (3, vec![("ship", "if its outcome is unknown")]),
                (1, vec![("reserve", "always"), ("charge", "always")]),
            ]
        );
        let text = plan.render_text();
        assert!(text.contains("1. parallel, all at once:"), "{text}");
        assert!(
            text.contains("2. undo group 1, at once: inventory.release (reserve), payment.refund (charge)"),
            "{text}"
        );
        assert!(text.contains("on_failure continue: go on with group 3"), "{text}");
    }

    #[test]
    fn retry_forever_fails_only_by_rejection() {
        let text = r#"
name: o
version: 1
steps:
  - { name: a, participant: p, action: x, compensation: y, on_failure: retry_forever }
"#;
        let def = match parse(Path::new("t.yaml"), text) {
            Ok(d) => d,
            Err(e) => panic!("{e}"),
        };
        let plan = Plan::of(&def);
        assert_eq!(plan.failures[0].failures, ["rejected"]);
    }

    #[test]
    fn mermaid_has_the_groups_the_chain_and_a_failure_edge_per_step() {
        let m = Plan::of(&shipping()).render_mermaid();
        assert!(m.starts_with("flowchart TD\n"), "{m}");
        assert!(m.contains("subgraph g1 [\"group 1: parallel\"]"), "{m}");
        assert!(m.contains("g3 --> completed([COMPLETED])"), "{m}");
        // The shipment's undo leads back to both branches', which lead to COMPENSATED.
        assert!(m.contains("u_ship --> u_reserve"), "{m}");
        assert!(m.contains("u_ship --> u_charge"), "{m}");
        assert!(m.contains("u_reserve --> compensated"), "{m}");
        assert!(m.contains("s_reserve -. fails .-> u_charge"), "{m}");
        assert!(m.contains("s_note -. \"fails (continue)\" .-> g3"), "{m}");
    }

    /// The plan against the engine: for every step of the shipping definition,
    /// reject it (or time it out on every attempt) with every other step
    /// succeeding, and check
    /// the compensations the engine sends, group by group, are the plan's.
    #[test]
    fn the_plan_matches_what_the_engine_does() {
        use saga_wire::{CommandKind, OrderPayload};

        use crate::engine::{self, Event, Outcome, Saga};
        let def = std::sync::Arc::new(shipping());
        let plan = Plan::of(&def);
        for (i, failure) in plan.failures.iter().enumerate() {
            if failure.continues_with.is_some() {
                continue;
            }
            for rejected in [true, false] {
                let order = OrderPayload {
                    order_id: "o-1".into(),
                    customer_id: "c-1".into(),
                    items: vec![saga_wire::Item {
                        sku: "A-1".into(),
                        quantity: 1,
                    }],
                    amount_cents: 100,
                    currency: "EUR".into(),
                };
                let mut saga: Saga = engine::create("s".into(), def.clone(), order, "c".into(), None, 0).saga;
                let mut pending: Vec<(usize, CommandKind, u32)> = Vec::new();
                let apply = |saga: &mut Saga, event: Event, pending: &mut Vec<(usize, CommandKind, u32)>| {
                    let t = match engine::transition(saga, &event, 1) {
                        Ok(Some(t)) => t,
                        other => panic!("{other:?}"),
                    };
                    pending.extend(t.commands.iter().map(|c| (c.step, c.kind, c.message.attempt)));
                    *saga = t.saga;
                };
                apply(&mut saga, Event::Start, &mut pending);
                let mut undone: Vec<Vec<String>> = Vec::new();
                while !pending.is_empty() {
                    let batch = std::mem::take(&mut pending);
                    let comps: Vec<String> = batch
                        .iter()
                        .filter(|(_, k, _)| *k == CommandKind::Compensate)
                        .map(|(s, _, _)| def.steps[*s].name.clone())
                        .collect();
                    if !comps.is_empty() {
                        undone.push(comps);
                    }
                    for (s, kind, attempt) in batch {
                        let outcome = if s == i && kind == CommandKind::Forward && rejected {
                            Outcome::Rejected("no".into())
                        } else if s == i && kind == CommandKind::Forward {
                            Outcome::Transient("timeout".into())
                        } else {
                            Outcome::Ok(serde_json::json!({}))
                        };
                        apply(
                            &mut saga,
                            Event::Reply {
                                step: s,
                                kind,
                                attempt,
                                outcome,
                            },
                            &mut pending,
                        );
                    }
                }
                // A rejected step is not undone, one out of attempts (unknown)
                // is; everything else the plan lists is.
                let expected: Vec<Vec<String>> = failure
                    .undo
                    .iter()
                    .map(|st| {
                        st.steps
                            .iter()
                            .filter(|u| !rejected || u.when != "if its outcome is unknown")
                            .map(|u| u.step.clone())
                            .collect::<Vec<_>>()
                    })
                    .filter(|v| !v.is_empty())
                    .collect();
                assert_eq!(
                    undone, expected,
                    "failure of {} (rejected: {rejected})",
                    failure.step
                );
            }
        }
    }
}
