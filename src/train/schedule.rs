//! Learning-rate schedules with linear warmup, as transformers' `get_constant_schedule_with_warmup`,
//! `get_linear_schedule_with_warmup` and `get_cosine_schedule_with_warmup` (num_cycles 0.5) give them
//! (transformers 5.24 `optimization.py`), with torch `LambdaLR` semantics: the lr used by optimizer
//! step k (counted from 0) is `base_lr * lambda(k)`. Warmup as a step count or as a ratio resolved
//! like `TrainingArguments.get_warmup_steps`: `ceil(ratio * total_steps)`.

use serde::{Deserialize, Serialize};

/// Errors of the schedule configuration.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Error {
    #[error("schedule: set only one of `warmup_steps` ({steps}) and `warmup_ratio` ({ratio})")]
    BothWarmups { steps: u64, ratio: f64 },
    #[error("schedule: `warmup_ratio` must be in [0, 1], got {got}")]
    RatioOutOfRange { got: f64 },
}

/// The decay after warmup (`scheduler = "constant" | "linear" | "cosine"` in a recipe).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// `get_constant_schedule_with_warmup`.
    Constant,
    /// `get_linear_schedule_with_warmup` (transformers' default `lr_scheduler_type`).
    #[default]
    Linear,
    /// `get_cosine_schedule_with_warmup` with `num_cycles = 0.5`.
    Cosine,
}

/// The recipe keys: `scheduler`, and at most one of `warmup_steps` / `warmup_ratio`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    #[serde(default)]
    pub scheduler: Schedule,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_steps: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_ratio: Option<f64>,
}

impl ScheduleConfig {
    /// Warmup steps for a run of `total_steps` optimizer steps (`get_warmup_steps`).
    pub fn warmup_steps_for(&self, total_steps: u64) -> Result<u64, Error> {
        match (self.warmup_steps, self.warmup_ratio) {
            (Some(steps), Some(ratio)) => Err(Error::BothWarmups { steps, ratio }),
            (Some(steps), None) => Ok(steps),
            (None, Some(ratio)) if !(0.0..=1.0).contains(&ratio) => {
                Err(Error::RatioOutOfRange { got: ratio })
            }
            (None, Some(ratio)) => Ok((total_steps as f64 * ratio).ceil() as u64),
            (None, None) => Ok(0),
        }
    }

    /// Resolves the schedule for a run.
    pub fn build(&self, base_lr: f64, total_steps: u64) -> Result<LrSchedule, Error> {
        Ok(LrSchedule {
            kind: self.scheduler,
            base_lr,
            warmup_steps: self.warmup_steps_for(total_steps)?,
            total_steps,
        })
    }
}

/// A resolved schedule: the lr for each optimizer step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    pub kind: Schedule,
    pub base_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl LrSchedule {
    /// The multiplier `lr_lambda(step)` of transformers' schedule.
    pub fn factor(&self, step: u64) -> f64 {
        let (step, warmup, total) = (
            step as f64,
            self.warmup_steps as f64,
            self.total_steps as f64,
        );
        if step < warmup {
            return step / warmup.max(1.0);
        }
        // transformers computes these in Python ints then floats; i64 differences keep the sign.
        let decay_len = (self.total_steps as i64 - self.warmup_steps as i64).max(1) as f64;
        match self.kind {
            Schedule::Constant => 1.0,
            Schedule::Linear => ((total - step) / decay_len).max(0.0),
            Schedule::Cosine => {
                let progress = (step - warmup) / decay_len;
                let num_cycles = 0.5;
                (0.5 * (1.0 + (std::f64::consts::PI * num_cycles * 2.0 * progress).cos())).max(0.0)
            }
        }
    }

    /// The learning rate of optimizer step `step` (0-based, as `LambdaLR.last_epoch`).
    pub fn lr_at(&self, step: u64) -> f64 {
        self.base_lr * self.factor(step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Case {
        scheduler: Schedule,
        total_steps: u64,
        warmup: f64,
        warmup_steps: u64,
        base_lr: f64,
        lrs: Vec<f64>,
    }

    #[test]
    fn matches_transformers_fixture() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/train/schedule.json"
        ))
        .unwrap();
        let cases: Vec<Case> = serde_json::from_str(&text).unwrap();
        assert_eq!(cases.len(), 27);
        for case in cases {
            let config = ScheduleConfig {
                scheduler: case.scheduler,
                warmup_steps: (case.warmup >= 1.0).then_some(case.warmup as u64),
                warmup_ratio: (case.warmup < 1.0).then_some(case.warmup),
            };
            let schedule = config.build(case.base_lr, case.total_steps).unwrap();
            assert_eq!(schedule.warmup_steps, case.warmup_steps, "{:?}", config);
            for (step, want) in case.lrs.iter().enumerate() {
                let got = schedule.lr_at(step as u64);
                assert!(
                    (got - want).abs() <= 1e-15 * want.abs().max(1e-4),
                    "{config:?} total {} step {step}: got {got}, want {want}",
                    case.total_steps
                );
            }
        }
    }

    #[test]
    fn parses_recipe_keys() {
        let c: ScheduleConfig =
            toml::from_str("scheduler = \"cosine\"\nwarmup_ratio = 0.1").unwrap();
        assert_eq!(c.scheduler, Schedule::Cosine);
        assert_eq!(c.warmup_steps_for(95).unwrap(), 10);
        let c: ScheduleConfig = toml::from_str("scheduler = \"linear\"\nwarmup_steps = 5").unwrap();
        assert_eq!(c.warmup_steps_for(95).unwrap(), 5);
        let c: ScheduleConfig = toml::from_str("").unwrap();
        assert_eq!(
            (c.scheduler, c.warmup_steps_for(10).unwrap()),
            (Schedule::Linear, 0)
        );
        assert!(toml::from_str::<ScheduleConfig>("scheduler = \"poly\"").is_err());
        assert!(toml::from_str::<ScheduleConfig>("warmup = 3").is_err());
    }

    #[test]
    fn rejects_bad_warmup() {
        let both = ScheduleConfig {
            warmup_steps: Some(3),
            warmup_ratio: Some(0.1),
            ..Default::default()
        };
        assert_eq!(
            both.warmup_steps_for(10),
            Err(Error::BothWarmups {
                steps: 3,
                ratio: 0.1
            })
        );
        let big = ScheduleConfig {
            warmup_ratio: Some(1.5),
            ..Default::default()
        };
        let err = big.build(1e-4, 10).unwrap_err();
        assert!(err.to_string().contains("warmup_ratio"), "{err}");
    }
}
