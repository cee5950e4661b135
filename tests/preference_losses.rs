//! Preference losses, their gradients and logged rewards against TRL's float64 formulas
//! (tests/fixtures/preference/losses.json from scripts/make_preference_fixture.py), through the
//! objectives' own micro-batch code with the model's log-probs given.
//!
//! Its own test binary: it trains on burn's f64 CPU backend, and burn keeps one default dtype per
//! CPU device for the whole process, which f32 tests running beside it would share.

use std::path::Path;

use burn::backend::{Autodiff, NdArray};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use serde::Deserialize;
use serde_json::Value;

use runner::train::data::{Batch, TokenizedExample, IGNORE_INDEX};
use runner::train::objective::{totals, MicroLoss, Objective, Stat};
use runner::train::preference::{
    KtoSet, PairSet, PreferenceConfig, PreferenceKind, PreferenceSet, PREFERENCE_KEYS,
};
use runner::train::sft::CausalModel;

type F64 = Autodiff<NdArray<f64>>;

/// A "model" whose row log-probs are given: the losses are checked apart from any network.
struct FixedLogProbs<B: Backend> {
    values: Tensor<B, 1>,
}

impl<B: Backend> CausalModel<B> for FixedLogProbs<B> {
    fn logits(&self, _input_ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        unreachable!("the preference objectives read row log-probs only")
    }

    fn row_log_probs(&self, batch: &Batch<B>) -> Tensor<B, 1> {
        assert_eq!(batch.rows, self.values.dims()[0]);
        self.values.clone()
    }
}

/// A row of one prompt token and `labelled` response tokens.
fn row(labelled: f64) -> TokenizedExample {
    let n = labelled as usize;
    let mut labels = vec![IGNORE_INDEX];
    labels.extend(std::iter::repeat_n(1, n));
    TokenizedExample {
        input_ids: vec![1; n + 1],
        labels,
    }
}

fn floats(case: &Value, key: &str) -> Vec<f64> {
    case[key]
        .as_array()
        .unwrap_or_else(|| panic!("fixture key {key}"))
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

fn close(got: f64, want: f64, what: &str) {
    let scale = want.abs().max(1e-12);
    assert!(
        ((got - want) / scale).abs() <= 1e-6 || (got - want).abs() < 1e-12,
        "{what}: {got} vs TRL {want}"
    );
}

fn fixture() -> Vec<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/preference/losses.json");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    doc["cases"].as_array().unwrap().clone()
}

fn config_of(case: &Value) -> (PreferenceKind, PreferenceConfig) {
    let mut table = serde_json::Map::new();
    for key in PREFERENCE_KEYS {
        if let Some(v) = case.get(key) {
            table.insert(key.to_string(), v.clone());
        }
    }
    let kind = match case["kind"].as_str().unwrap() {
        "dpo" => PreferenceKind::Dpo,
        "orpo" => PreferenceKind::Orpo,
        "simpo" => PreferenceKind::Simpo,
        _ => PreferenceKind::Kto,
    };
    (
        kind,
        PreferenceConfig::deserialize(Value::Object(table)).unwrap(),
    )
}

/// The loss of one step of `set`'s units (one micro-batch) with the model's row log-probs set to
/// `values`, its gradient with respect to them, and the logged statistics.
fn step_of<O: Objective>(
    set: &O,
    values: Vec<f64>,
    device: &burn::backend::ndarray::NdArrayDevice,
) -> (f64, Vec<f64>, Vec<Stat<F64>>) {
    let n = values.len();
    let values = Tensor::<F64, 1>::from_data(TensorData::new(values, [n]), device);
    let (micro, grad) = run_step(set, values, device);
    let g = grad.unwrap().into_data().to_vec::<f64>().unwrap();
    let l = micro.loss.into_data().to_vec::<f64>().unwrap()[0];
    (l, g, micro.stats)
}

/// A fixture case's objective, with its reference log-probs set, and the model's row log-probs
/// for one step over all its units.
enum CaseSet {
    Pairs(PairSet),
    Kto(KtoSet),
}

fn case_set(case: &Value, kind: PreferenceKind, cfg: &PreferenceConfig) -> (CaseSet, Vec<f64>) {
    let loss = cfg.loss(kind).unwrap();
    if kind == PreferenceKind::Kto {
        let rows: Vec<_> = floats(case, "length").into_iter().map(row).collect();
        let desirable = case["desirable"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_bool().unwrap())
            .collect();
        let mut set = KtoSet::new(rows, desirable, loss);
        set.set_reference(floats(case, "reference"), floats(case, "reference_kl"));
        let mut values = floats(case, "policy");
        values.extend(floats(case, "policy_kl"));
        (CaseSet::Kto(set), values)
    } else {
        let chosen: Vec<_> = floats(case, "len_chosen").into_iter().map(row).collect();
        let rejected: Vec<_> = floats(case, "len_rejected").into_iter().map(row).collect();
        let mut set = PairSet::new(chosen, rejected, loss);
        if kind == PreferenceKind::Dpo {
            set.set_reference(
                floats(case, "reference_chosen"),
                floats(case, "reference_rejected"),
            );
        }
        let mut values = floats(case, "policy_chosen");
        values.extend(floats(case, "policy_rejected"));
        (CaseSet::Pairs(set), values)
    }
}

#[test]
fn losses_gradients_and_rewards_match_trl() {
    let device = Default::default();
    for case in fixture() {
        let (kind, cfg) = config_of(&case);
        let what = format!("{} {:?}", kind.name(), cfg.loss(kind).unwrap());
        let (step_loss, grads, stats) = match case_set(&case, kind, &cfg) {
            (CaseSet::Kto(set), values) => {
                let k = floats(&case, "policy").len();
                let (l, g, stats) = step_of(&set, values, &device);
                (l, g[..k].to_vec(), stats)
            }
            (CaseSet::Pairs(set), values) => step_of(&set, values, &device),
        };
        close(
            step_loss,
            case["loss"].as_f64().unwrap(),
            &format!("{what}: loss"),
        );
        let want_grads = if kind == PreferenceKind::Kto {
            floats(&case, "grad")
        } else {
            let mut g = floats(&case, "grad_chosen");
            g.extend(floats(&case, "grad_rejected"));
            g
        };
        for (i, (g, w)) in grads.iter().zip(&want_grads).enumerate() {
            close(*g, *w, &format!("{what}: gradient {i}"));
        }
        // Logged rewards: means of TRL's per-pair (per-completion) rewards.
        let mean_of = |name: &str| {
            let s = stats.iter().find(|s| s.name == name).unwrap();
            s.sum.clone().into_data().to_vec::<f64>().unwrap()[0] / s.count
        };
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        if kind == PreferenceKind::Kto {
            let rewards = floats(&case, "rewards");
            let flags = case["desirable"].as_array().unwrap();
            let pick = |want: bool| -> Vec<f64> {
                rewards
                    .iter()
                    .zip(flags)
                    .filter(|(_, f)| f.as_bool() == Some(want))
                    .map(|(r, _)| *r)
                    .collect()
            };
            close(
                mean_of("rewards/chosen"),
                mean(&pick(true)),
                &format!("{what}: chosen reward"),
            );
            close(
                mean_of("rewards/rejected"),
                mean(&pick(false)),
                &format!("{what}: rejected reward"),
            );
            close(
                mean_of("kl"),
                case["kl"].as_f64().unwrap(),
                &format!("{what}: kl"),
            );
        } else {
            let (c, r) = (
                floats(&case, "rewards_chosen"),
                floats(&case, "rewards_rejected"),
            );
            close(
                mean_of("rewards/chosen"),
                mean(&c),
                &format!("{what}: chosen reward"),
            );
            close(
                mean_of("rewards/rejected"),
                mean(&r),
                &format!("{what}: rejected reward"),
            );
            let margins: Vec<f64> = c.iter().zip(&r).map(|(a, b)| a - b).collect();
            close(
                mean_of("rewards/margins"),
                mean(&margins),
                &format!("{what}: margin"),
            );
            let right: Vec<f64> = c
                .iter()
                .zip(&r)
                .map(|(a, b)| f64::from(u8::from(a > b)))
                .collect();
            close(
                mean_of("rewards/accuracies"),
                mean(&right),
                &format!("{what}: accuracy"),
            );
        }
    }
}

/// Under mixed precision the model's row log-probs come in f32 (the chunked LM-head loss) while
/// the device's default float type is bf16; the reference log-probs, lengths and labels the
/// objectives build on the host must follow the log-probs' type. Here the default is f64 and the
/// log-probs f32: every kind must run and agree with TRL to f32 precision.
#[test]
fn log_probs_in_another_float_type_than_the_default_train() {
    use burn::tensor::DType;
    let device = Default::default();
    for case in fixture() {
        let (kind, cfg) = config_of(&case);
        let (values, micro_loss) = match case_set(&case, kind, &cfg) {
            (CaseSet::Kto(set), values) => (values.clone(), f32_step(&set, values, &device)),
            (CaseSet::Pairs(set), values) => (values.clone(), f32_step(&set, values, &device)),
        };
        assert!(!values.is_empty());
        assert_eq!(micro_loss.dtype(), DType::F32, "{}", kind.name());
        let got = micro_loss
            .into_data()
            .convert::<f64>()
            .to_vec::<f64>()
            .unwrap()[0];
        let want = case["loss"].as_f64().unwrap();
        assert!(
            (got - want).abs() <= 1e-4 * want.abs().max(1.0),
            "{}: f32 loss {got} vs TRL {want}",
            kind.name()
        );
    }
}

/// One step's loss with the row log-probs given as f32 on the f64 backend.
fn f32_step<O: Objective>(
    set: &O,
    values: Vec<f64>,
    device: &burn::backend::ndarray::NdArrayDevice,
) -> Tensor<F64, 1> {
    let n = values.len();
    let values: Vec<f32> = values.iter().map(|&v| v as f32).collect();
    let values = Tensor::<F64, 1>::from_data(
        TensorData::new(values, [n]),
        (device, burn::tensor::DType::F32),
    );
    let (micro, grad) = run_step(set, values, device);
    assert!(grad.is_some());
    micro.loss
}

/// One micro-batch of all `set`'s units with the model's row log-probs set to `values`: its loss
/// and statistics, and the gradient of the loss with respect to `values`.
fn run_step<O: Objective>(
    set: &O,
    values: Tensor<F64, 1>,
    device: &burn::backend::ndarray::NdArrayDevice,
) -> (
    MicroLoss<F64>,
    Option<Tensor<<F64 as burn::tensor::backend::AutodiffBackend>::InnerBackend, 1>>,
) {
    let values = values.require_grad();
    let model = FixedLogProbs {
        values: values.clone(),
    };
    let units: Vec<usize> = (0..set.len()).collect();
    let micro = set.micro_loss(
        &model,
        &units,
        totals(set, units.iter().copied()),
        0,
        device,
    );
    let grads = micro.loss.backward();
    let grad = values.grad(&grads);
    (micro, grad)
}
