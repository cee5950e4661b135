//! The keys each preference kind takes, and learning on the tiny model (the losses against
//! TRL's: tests/preference_losses.rs).

use std::path::Path;

use super::*;
use crate::peft::files::TargetModules;
use crate::train::metrics_log::read_metrics;
use crate::train::tests::{rng_lock, tiny, AD};

#[test]
fn keys_of_other_kinds_typos_and_ranges_are_refused() {
    let parse = |toml: &str| -> Result<PreferenceConfig, String> {
        let value: toml::Value = toml::from_str(toml).unwrap();
        PreferenceConfig::deserialize(value).map_err(|e| e.to_string())
    };
    let err = parse("bta = 0.2").unwrap_err();
    assert!(
        err.contains("unknown field `bta`") && err.contains("`beta`"),
        "{err}"
    );
    assert!(err.contains("`learning_rate`"), "{err}");
    let cfg = parse("beta = 0.2\nmethod = \"full\"\nloss_type = \"ipo\"").unwrap();
    assert_eq!(cfg.train.method, Method::Full);
    assert_eq!(cfg.train.learning_rate, 1e-6, "TRL's default learning rate");
    assert!(matches!(
        cfg.loss(PreferenceKind::Dpo).unwrap(),
        PreferenceLoss::Dpo { loss_type: DpoLossType::Ipo, beta, .. } if beta == 0.2
    ));
    let err = cfg.loss(PreferenceKind::Simpo).unwrap_err().to_string();
    assert!(err.contains("loss_type") && err.contains("dpo"), "{err}");
    let err = parse("gamma = 1.0")
        .unwrap()
        .loss(PreferenceKind::Dpo)
        .unwrap_err()
        .to_string();
    assert!(err.contains("`gamma`") && err.contains("simpo"), "{err}");
    let err = parse("beta = 0")
        .unwrap()
        .loss(PreferenceKind::Dpo)
        .unwrap_err()
        .to_string();
    assert!(err.contains("beta"), "{err}");
    let err = parse("label_smoothing = 0.5")
        .unwrap()
        .loss(PreferenceKind::Dpo)
        .unwrap_err();
    assert!(err.to_string().contains("[0, 0.5)"), "{err}");
    let err = parse("batch_size = 1")
        .unwrap()
        .loss(PreferenceKind::Kto)
        .unwrap_err();
    assert!(err.to_string().contains("batch_size"), "{err}");
    let err = parse("learning_rate = \"fast\"").unwrap_err();
    assert!(err.contains("learning_rate"), "{err}");
    // Written back as one flat table, read again unchanged.
    let back: PreferenceConfig =
        serde_json::from_value(serde_json::to_value(&cfg).unwrap()).unwrap();
    assert_eq!(back, cfg);
}

/// Pairs on the tiny model's vocabulary: a shared prompt, then two different responses.
fn pairs() -> PreferenceData {
    let (mut chosen, mut rejected) = (Vec::new(), Vec::new());
    for k in 0..6u32 {
        let prompt: Vec<u32> = (0..3).map(|i| (k * 11 + i * 5 + 2) % 64).collect();
        let make = |offset: u32| {
            let mut ids = prompt.clone();
            ids.extend((0..5).map(|i| (k * 7 + i * 3 + offset) % 64));
            let mut ex = TokenizedExample::all_tokens(ids);
            ex.labels[..3].fill(IGNORE_INDEX);
            ex
        };
        chosen.push(make(1));
        rejected.push(make(33));
    }
    PreferenceData::Pairs { chosen, rejected }
}

fn values(dir: &Path, key: &str) -> Vec<f64> {
    read_metrics(&dir.join("metrics.jsonl"))
        .unwrap()
        .iter()
        .filter_map(|r| r.extra.get(key).and_then(|v| v.as_f64()))
        .collect()
}

fn train_kind(kind: PreferenceKind, toml: &str, steps: u64, dir: &Path) -> SftReport {
    let value: toml::Value = toml::from_str(toml).unwrap();
    let mut cfg = PreferenceConfig::deserialize(value).unwrap();
    cfg.train.max_steps = Some(steps);
    cfg.train.logging_steps = 1;
    cfg.train.batch_size = 3;
    cfg.train.target_modules = TargetModules::Pattern("all-linear".into());
    let (config, tensors) = tiny();
    let device = Default::default();
    let _guard = rng_lock();
    train_preference::<AD>(
        &cfg,
        kind,
        BaseModel::Loaded {
            config: &config,
            tensors: &tensors,
        },
        pairs(),
        PreferenceData::Pairs {
            chosen: Vec::new(),
            rejected: Vec::new(),
        },
        dir,
        &device,
        None,
    )
    .unwrap()
}

#[test]
fn dpo_learns_the_preference_and_starts_from_its_reference() {
    let dir = tempfile::tempdir().unwrap();
    let report = train_kind(
        PreferenceKind::Dpo,
        "method = \"lora\"\nlearning_rate = 3e-2\nlora_r = 4\nlora_alpha = 8\nbeta = 0.5\n\
         lr_scheduler = \"constant\"",
        24,
        dir.path(),
    );
    assert!(report
        .adapter_dir
        .unwrap()
        .join("adapter_model.safetensors")
        .is_file());
    assert!(report.model_dir.unwrap().join("config.json").is_file());
    let accuracies = values(dir.path(), "rewards/accuracies");
    let margins = values(dir.path(), "rewards/margins");
    assert_eq!(accuracies.len(), 24);
    // The first step's policy is the reference (LoRA's B starts at zero): every reward is 0.
    let first_chosen = values(dir.path(), "rewards/chosen")[0];
    assert!(
        first_chosen.abs() < 1e-5,
        "reward at step 1: {first_chosen}"
    );
    assert!(margins[0].abs() < 1e-5, "margin at step 1: {}", margins[0]);
    let tail = |v: &[f64]| v[v.len() - 4..].iter().sum::<f64>() / 4.0;
    assert!(tail(&accuracies) >= 0.9, "accuracies {accuracies:?}");
    assert!(tail(&margins) > margins[0] + 0.5, "margins {margins:?}");
    let losses: Vec<f64> = read_metrics(&dir.path().join("metrics.jsonl"))
        .unwrap()
        .iter()
        .filter_map(|r| r.loss)
        .collect();
    assert!(
        (losses[0] - std::f64::consts::LN_2).abs() < 1e-4,
        "DPO starts at ln 2: {}",
        losses[0]
    );
    assert!(losses[losses.len() - 1] < 0.5 * losses[0], "{losses:?}");
}

#[test]
fn orpo_simpo_and_kto_train_in_the_preferred_direction() {
    for (kind, toml) in [
        (
            PreferenceKind::Orpo,
            "method = \"lora\"\nlearning_rate = 3e-2\nlora_r = 4\nbeta = 0.5",
        ),
        (
            PreferenceKind::Simpo,
            "method = \"lora\"\nlearning_rate = 3e-2\nlora_r = 4",
        ),
        (
            PreferenceKind::Kto,
            "method = \"full\"\nlearning_rate = 1e-2\nbeta = 0.5",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        train_kind(kind, toml, 16, dir.path());
        let chosen = values(dir.path(), "rewards/chosen");
        let rejected = values(dir.path(), "rewards/rejected");
        let gap = |i: usize| chosen[i] - rejected[i];
        let last = chosen.len() - 1;
        assert!(
            gap(last) > gap(0) + 0.1,
            "{}: chosen {chosen:?} rejected {rejected:?}",
            kind.name()
        );
        if kind == PreferenceKind::Kto {
            assert!(!values(dir.path(), "kl").is_empty());
        }
        if kind == PreferenceKind::Orpo {
            let nll = values(dir.path(), "nll_loss");
            assert!(nll[nll.len() - 1] < nll[0], "ORPO's NLL falls: {nll:?}");
        }
    }
}
