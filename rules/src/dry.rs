//! Dry runs: a rule evaluated over given inputs by the same [`Engine`] the service runs,
//! with the effects collected instead of carried out. Nothing is written anywhere.
//!
//! The inputs' own times are the clock: each input is evaluated at its `at_ms`, and waits
//! (`for`) end when a later input's time (or the end of the run) passes them, so a rule
//! with `for: 5m` run over an hour of stored readings fires where it would have fired live.

use std::{collections::BTreeMap, sync::Arc};

use serde::Serialize;
use tellus_core::{DeviceId, Rule, RuleInput, TimestampMs};

use crate::{
    engine::{Compiled, Directory, Engine, Figures, Firing, Match, RuleFiguresSnapshot, Tags},
    expr::with_stack,
};

/// The most inputs one dry run evaluates.
pub const MAX_INPUTS: usize = 100_000;
/// The most matches and firings one dry run reports (each); past them it says `truncated`.
pub const MAX_REPORTED: usize = 10_000;

/// What a dry run found.
#[derive(Debug, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DryRun {
    /// Inputs the rule was evaluated on (those its device selector picks).
    pub evaluated: u64,
    /// Every input the condition held for, or failed on.
    pub matches: Vec<Match>,
    /// Every time the rule would have acted, with the effects.
    pub firings: Vec<Firing>,
    /// More matches or firings happened than are reported.
    pub truncated: bool,
    pub figures: RuleFiguresSnapshot,
}

struct Known(BTreeMap<DeviceId, Tags>);

impl Directory for Known {
    fn tags(&mut self, device: &DeviceId) -> Option<Tags> {
        Some(self.0.get(device).cloned().unwrap_or_default())
    }
}

/// Runs `rule` over `inputs` (sorted here by time), ending at `end_ms` (default: the last
/// input's time). `tags` gives each device's tags (a device not in it has none). The error
/// says why the rule does not compile.
pub fn dry_run(
    rule: &Rule,
    mut inputs: Vec<RuleInput>,
    tags: BTreeMap<DeviceId, BTreeMap<String, String>>,
    end_ms: Option<TimestampMs>,
) -> Result<DryRun, String> {
    inputs.truncate(MAX_INPUTS);
    inputs.sort_by_key(|i| i.at_ms);
    let end = end_ms.or(inputs.last().map(|i| i.at_ms));
    let mut directory = Known(tags.into_iter().map(|(d, t)| (d, Arc::new(t))).collect());
    with_stack(move || {
        let figures = Arc::new(Figures::default());
        let compiled = Compiled::new(rule, figures.rule(&rule.id))?;
        let mut engine = Engine::new(figures.clone());
        engine.keep_trace();
        engine.load(vec![compiled], &[]);
        let mut firings = Vec::new();
        let mut matches = Vec::new();
        let mut truncated = false;
        let mut keep = |engine: &mut Engine, more: Vec<Firing>| {
            for firing in more {
                if firings.len() < MAX_REPORTED {
                    firings.push(firing);
                } else {
                    truncated = true;
                }
            }
            let trace = engine.take_trace();
            let room = MAX_REPORTED.saturating_sub(matches.len());
            if trace.len() > room {
                truncated = true;
            }
            matches.extend(trace.into_iter().take(room));
        };
        for input in &inputs {
            let due = engine.tick(input.at_ms);
            keep(&mut engine, due);
            let fired = engine.handle(input, input.at_ms, &mut directory);
            keep(&mut engine, fired);
        }
        if let Some(end) = end {
            let due = engine.tick(end);
            keep(&mut engine, due);
        }
        let figures = figures
            .get(&rule.id)
            .ok_or_else(|| "the rule's figures are missing".to_owned())?;
        Ok(DryRun {
            evaluated: figures.evaluations,
            matches,
            firings,
            truncated,
            figures,
        })
    })
}

#[cfg(test)]
mod tests {
    use tellus_core::{rule::InputKind, RuleSpec, Value};

    use super::*;

    #[test]
    fn a_dry_run_uses_the_inputs_times_as_its_clock() {
        let rule = Rule {
            id: "r-1".into(),
            spec: serde_json::from_value::<RuleSpec>(serde_json::json!({
                "name": "hot", "trigger": "telemetry", "condition": "metrics.t > 30",
                "for": "5m", "actions": [{"type": "alert"}, {"type": "webhook", "url": "http://127.0.0.1:9/x"}]
            }))
            .unwrap(),
            enabled: true,
            version: 1,
            created_at_ms: 0,
            updated_at_ms: 0,
        };
        let d = DeviceId::parse("d").unwrap();
        let minute = 60_000;
        // Hot from minute 0 to 9, cool at 10: fires at minute 5, clears at 10.
        let inputs = (0..=10)
            .map(|m| RuleInput {
                device: d.clone(),
                at_ms: m * minute,
                kind: InputKind::Telemetry {
                    ts_ms: m * minute,
                    metrics: vec![("t".into(), Value::Int(if m < 10 { 35 } else { 20 }))],
                },
            })
            .rev()
            .collect();
        let run = dry_run(&rule, inputs, BTreeMap::new(), None).unwrap();
        assert_eq!(run.evaluated, 11);
        assert_eq!(run.matches.len(), 10);
        assert_eq!(run.firings.len(), 2);
        assert_eq!(run.firings[0].at_ms, 5 * minute);
        assert_eq!(run.firings[0].effects.len(), 2);
        assert_eq!(run.firings[1].at_ms, 10 * minute);
        assert!(!run.truncated);
    }
}
