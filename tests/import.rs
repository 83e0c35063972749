//! Weight import and export: lossless round trips for every cell, key prefixes, and errors that
//! name the tensor.

use std::path::PathBuf;

use burn::backend::NdArray;
use rnn_zoo::cell::cell_names;
use rnn_zoo::import::ImportError;
use rnn_zoo::prelude::*;

type B = NdArray<f32>;

fn config(
    name: &str,
    layers: usize,
    bidirectional: bool,
    hidden: usize,
) -> RnnLayerConfig<AnyCellConfig> {
    RnnLayerConfig::new(AnyCellConfig::named(name, 3, hidden).unwrap())
        .with_num_layers(layers)
        .with_bidirectional(bidirectional)
}

fn temp_file(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rnn-zoo-import-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("{tag}.safetensors"))
}

#[test]
fn export_then_import_is_lossless_for_every_cell() {
    let device = Default::default();
    for name in cell_names() {
        let config = config(name, 2, true, 4);
        let layer = config.init::<B>(&device);
        let path = temp_file(&format!("roundtrip-{name}"));
        layer.save_safetensors(&path, "encoder.rnn.").unwrap();
        let loaded = load_safetensors::<B, _>(&config, &path, "encoder.rnn.", &device).unwrap();
        let (before, after) = (layer.state_dict(), loaded.state_dict());
        assert_eq!(before.len(), after.len(), "{name}");
        for ((n1, d1), (n2, d2)) in before.iter().zip(&after) {
            assert_eq!(n1, n2);
            assert_eq!(d1, d2, "{name}: {n1} changed in the round trip");
        }
    }
}

#[test]
fn pytorch_names_are_used() {
    let layer = config("lstm", 2, true, 4).init::<B>(&Default::default());
    let names: Vec<String> = layer.state_dict().into_iter().map(|(n, _)| n).collect();
    for expected in [
        "weight_ih_l0",
        "weight_hh_l0_reverse",
        "bias_ih_l1",
        "bias_hh_l1_reverse",
    ] {
        assert!(
            names.contains(&expected.to_string()),
            "{expected} not in {names:?}"
        );
    }
    let sru = config("sru", 1, true, 4).init::<B>(&Default::default());
    let names: Vec<String> = sru.state_dict().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        [
            "rnn_lst.0.weight",
            "rnn_lst.0.weight_c",
            "rnn_lst.0.bias",
            "rnn_lst.0.scale_x"
        ]
    );
}

#[test]
fn missing_extra_and_misshapen_tensors_are_named() {
    let device = Default::default();
    let path = temp_file("one-layer-gru");
    config("gru", 1, false, 4)
        .init::<B>(&device)
        .save_safetensors(&path, "")
        .unwrap();

    let missing =
        load_safetensors::<B, _>(&config("gru", 2, false, 4), &path, "", &device).unwrap_err();
    assert!(
        matches!(&missing, ImportError::Missing(n) if n == "weight_ih_l1"),
        "{missing}"
    );

    let two = temp_file("two-layer-gru");
    config("gru", 2, false, 4)
        .init::<B>(&device)
        .save_safetensors(&two, "")
        .unwrap();
    let extra =
        load_safetensors::<B, _>(&config("gru", 1, false, 4), &two, "", &device).unwrap_err();
    assert_eq!(
        extra.to_string(),
        "unexpected tensors: bias_hh_l1, bias_ih_l1, weight_hh_l1, weight_ih_l1"
    );

    let shape =
        load_safetensors::<B, _>(&config("gru", 1, false, 5), &path, "", &device).unwrap_err();
    assert_eq!(
        shape.to_string(),
        "tensor 'weight_ih_l0' has shape [12, 3], expected [15, 3]"
    );

    let wrong_prefix =
        load_safetensors::<B, _>(&config("gru", 1, false, 4), &path, "model.", &device)
            .unwrap_err();
    assert!(matches!(&wrong_prefix, ImportError::Missing(n) if n == "model.weight_ih_l0"));

    std::fs::write(&path, b"not a safetensors file").unwrap();
    let corrupt =
        load_safetensors::<B, _>(&config("gru", 1, false, 4), &path, "", &device).unwrap_err();
    assert!(matches!(corrupt, ImportError::Format(_)), "{corrupt}");
}
