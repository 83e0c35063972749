//! Parity with PyTorch and the official SRU package, driven by the fixture files: every
//! `*.safetensors` in `tests/fixtures/` (or `$RNN_ZOO_FIXTURES`) is loaded, the layer its
//! metadata describes is built and run, and its output, final states and the gradients of
//! `sum(output * grad_out)` (input and every parameter) are compared with the stored ones.

use std::path::{Path, PathBuf};

use burn::backend::{Autodiff, NdArray};
use burn::tensor::{Tensor, TensorData};
use rnn_zoo::cell::sru::SruConfig;
use rnn_zoo::import::{StateDict, TensorSource};
use rnn_zoo::prelude::*;
use serde_json::{Map, Value};

type B = Autodiff<NdArray<f32>>;

const TOLERANCE: f64 = 1e-4;

/// Metadata keys the test understands; any other key fails the fixture.
const CONFIG_KEYS: &[&str] = &[
    "module",
    "input_size",
    "hidden_size",
    "num_layers",
    "bidirectional",
    "layouts",
    "batch_first",
    "nonlinearity",
    "rescale",
    "highway_bias",
    "has_skip_term",
    "use_tanh",
    "cell",
    "formula",
    // Informational.
    "library",
    "gate_order",
    "notes",
    "loss",
    "computed_in",
];

fn fixture_dir() -> PathBuf {
    std::env::var_os("RNN_ZOO_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"))
}

struct FixtureConfig {
    cell: AnyCellConfig,
    num_layers: usize,
    bidirectional: bool,
    /// Official SRU layout: time-major tensors, states `[layers, batch, hidden·dirs]`.
    official_sru: bool,
}

fn get<'a>(config: &'a Map<String, Value>, key: &str) -> &'a Value {
    config
        .get(key)
        .unwrap_or_else(|| panic!("config has no '{key}'"))
}

fn usize_of(config: &Map<String, Value>, key: &str) -> usize {
    get(config, key).as_u64().expect("an integer") as usize
}

fn bool_of(config: &Map<String, Value>, key: &str) -> bool {
    get(config, key).as_bool().expect("a boolean")
}

fn parse_config(text: &str) -> FixtureConfig {
    let config: Map<String, Value> = serde_json::from_str(text).expect("config is JSON");
    for key in config.keys() {
        assert!(
            CONFIG_KEYS.contains(&key.as_str()),
            "unknown config key '{key}'"
        );
    }
    let (input, hidden) = (
        usize_of(&config, "input_size"),
        usize_of(&config, "hidden_size"),
    );
    let module = get(&config, "module").as_str().expect("module is a string");
    let named = |name: &str| AnyCellConfig::named(name, input, hidden).unwrap();
    let cell = match module {
        "torch.nn.RNN" => match config.get("nonlinearity").and_then(Value::as_str) {
            None | Some("tanh") => named("rnn"),
            Some("relu") => named("rnn-relu"),
            Some(other) => panic!("unknown nonlinearity '{other}'"),
        },
        "torch.nn.LSTM" => named("lstm"),
        "torch.nn.GRU" => named("gru"),
        "sru.SRU" => AnyCellConfig::Sru(
            SruConfig::new(input, hidden)
                .with_rescale(bool_of(&config, "rescale"))
                .with_highway_bias(get(&config, "highway_bias").as_f64().unwrap())
                .with_has_skip_term(bool_of(&config, "has_skip_term"))
                .with_use_tanh(bool_of(&config, "use_tanh")),
        ),
        reference if reference.starts_with("reference.") => {
            let cell = get(&config, "cell").as_str().unwrap();
            assert_eq!(
                reference,
                format!("reference.{cell}"),
                "module and cell disagree"
            );
            named(cell)
        }
        other => panic!("unknown module '{other}'"),
    };
    let official_sru = module == "sru.SRU";
    if !official_sru {
        assert!(
            bool_of(&config, "batch_first"),
            "only batch-first torch fixtures are known"
        );
    }
    FixtureConfig {
        cell,
        num_layers: usize_of(&config, "num_layers"),
        bidirectional: bool_of(&config, "bidirectional"),
        official_sru,
    }
}

fn take_any(dict: &mut StateDict, name: &str) -> TensorData {
    let shape = dict
        .shape(name)
        .unwrap_or_else(|| panic!("fixture has no '{name}'"));
    dict.take(name, &shape).unwrap()
}

fn tensor<const D: usize>(data: TensorData) -> Tensor<B, D> {
    Tensor::from_data(data, &Default::default())
}

/// Official SRU `[layers, batch, hidden·dirs]` to the zoo's `[layers·dirs, batch, hidden]`.
fn sru_state_to_zoo(t: Tensor<B, 3>, dirs: usize) -> Tensor<B, 3> {
    let [layers, batch, width] = t.dims();
    let hidden = width / dirs;
    t.reshape([layers, batch, dirs, hidden])
        .permute([0, 2, 1, 3])
        .reshape([layers * dirs, batch, hidden])
}

fn sru_state_from_zoo(t: Tensor<B, 3>, dirs: usize) -> Tensor<B, 3> {
    let [ld, batch, hidden] = t.dims();
    t.reshape([ld / dirs, dirs, batch, hidden])
        .permute([0, 2, 1, 3])
        .reshape([ld / dirs, batch, dirs * hidden])
}

/// Runs one fixture; returns (tensors compared, largest error).
fn check_fixture(path: &Path) -> (usize, f64) {
    let mut dict = StateDict::from_file(path, "").unwrap();
    let config = parse_config(
        dict.metadata()
            .get("config")
            .expect("metadata has a config"),
    );
    let dirs = if config.bidirectional { 2 } else { 1 };
    let layer_config = RnnLayerConfig::new(config.cell.clone())
        .with_num_layers(config.num_layers)
        .with_bidirectional(config.bidirectional);
    let layer = layer_config
        .init::<B>(&Default::default())
        .load_state_dict(&mut dict)
        .unwrap();

    let time_major = config.official_sru;
    let to_batch_first = |t: Tensor<B, 3>| if time_major { t.swap_dims(0, 1) } else { t };
    let input = tensor::<3>(take_any(&mut dict, "input")).require_grad();
    let state_names = layer.state_names();
    let initial: Vec<Option<Tensor<B, 3>>> = state_names
        .iter()
        .map(|name| {
            let key = format!("{name}0");
            dict.unused().contains(&key).then(|| {
                let t = tensor::<3>(take_any(&mut dict, &key));
                if config.official_sru {
                    sru_state_to_zoo(t, dirs)
                } else {
                    t
                }
            })
        })
        .collect();
    let state = initial.iter().any(Option::is_some).then(|| {
        let zero = layer.zero_state(
            input.dims()[if time_major { 1 } else { 0 }],
            &Default::default(),
        );
        RnnState {
            components: initial
                .into_iter()
                .zip(zero.components)
                .map(|(given, zero)| given.unwrap_or(zero))
                .collect(),
        }
    });

    let (output, final_state) = layer.forward(to_batch_first(input.clone()), state);
    let output = to_batch_first(output);
    let grad_out = tensor::<3>(take_any(&mut dict, "grad_out"));
    let grads = (output.clone() * grad_out).sum().backward();

    let mut compared = 0;
    let mut worst: f64 = 0.0;
    let mut compare = |name: &str, actual: TensorData, expected: TensorData| {
        let err = rnn_zoo::check::max_abs_diff(name, &actual, &expected);
        assert!(
            err <= TOLERANCE,
            "{}: {name} differs by {err:e}",
            path.display()
        );
        compared += 1;
        worst = worst.max(err);
    };

    compare("output", output.into_data(), take_any(&mut dict, "output"));
    for (name, component) in state_names.iter().zip(final_state.components) {
        let component = if config.official_sru {
            sru_state_from_zoo(component, dirs)
        } else {
            component
        };
        compare(
            &format!("{name}_n"),
            component.into_data(),
            take_any(&mut dict, &format!("{name}_n")),
        );
    }
    let grad_input = input.grad(&grads).expect("input gradient");
    compare(
        "grad.input",
        grad_input.into_data(),
        take_any(&mut dict, "grad.input"),
    );

    let grad_layer = rnn_zoo::check::gradients_of(layer, &grads);
    for (name, grad) in grad_layer.state_dict() {
        let key = format!("grad.{name}");
        if dict.unused().contains(&key) {
            let expected = take_any(&mut dict, &key);
            compare(&key, grad, expected);
        } else {
            // Buffers (SRU's scale_x) have no gradient in the fixture.
            assert!(
                name.ends_with("scale_x"),
                "{}: fixture has no '{key}'",
                path.display()
            );
        }
    }
    let unused = dict.unused();
    assert!(
        unused.is_empty(),
        "{}: tensors not compared: {unused:?}",
        path.display()
    );
    (compared, worst)
}

#[test]
fn parity_with_fixtures() {
    let dir = fixture_dir();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read fixture folder {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "no *.safetensors fixtures in {}",
        dir.display()
    );
    let mut tensors = 0;
    for file in &files {
        let (n, worst) = check_fixture(file);
        println!(
            "parity: {:<36} {n:>3} tensors, max abs error {worst:.2e}",
            file.file_name().unwrap().to_string_lossy()
        );
        tensors += n;
    }
    println!("parity: compared {} files, {tensors} tensors", files.len());
}
