#![warn(missing_docs)]
//! # rnn-zoo
//!
//! Recurrent cells (Elman RNN with tanh or relu, IRNN, LSTM, peephole LSTM, CIFG LSTM,
//! LayerNorm LSTM, GRU in both reset placements, MGU, SRU, IndRNN) as backend-generic
//! [Burn](https://burn.dev) modules, a sequence layer that runs any of them (stacked,
//! bidirectional, masked, stateful, with recurrent dropout and zoneout), weight import from
//! PyTorch and the official SRU package, long-dependency tasks and the experiment runner
//! behind the `experiment` binary.
//!
//! ```
//! use burn::backend::{Autodiff, NdArray};
//! use burn::tensor::{Distribution, Tensor};
//! use rnn_zoo::prelude::*;
//!
//! type B = Autodiff<NdArray>;
//! let device = Default::default();
//! // A 2-layer bidirectional GRU over 16 input features, 32 hidden units per direction.
//! let config = RnnLayerConfig::new(AnyCellConfig::named("gru", 16, 32).unwrap())
//!     .with_num_layers(2)
//!     .with_bidirectional(true);
//! let layer = config.init::<B>(&device);
//! let x = Tensor::<B, 3>::random([4, 10, 16], Distribution::Default, &device);
//! let (output, state) = layer.forward(x, None);
//! assert_eq!(output.dims(), [4, 10, 64]);
//! assert_eq!(state.components[0].dims(), [4, 4, 32]); // [layers*dirs, batch, hidden]
//! let _grads = output.sum().backward();
//! ```

pub mod backend;
pub mod bench;
pub mod cell;
#[cfg(feature = "ndarray")]
pub mod check;
pub mod host;
pub mod import;
pub mod layer;
pub mod ops;
pub mod plot;
pub mod regularisation;
pub mod suite;
pub mod task;
pub mod train;

// The README's examples are compiled and run as doc tests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

/// The names most programs need.
pub mod prelude {
    pub use crate::cell::{AnyCell, AnyCellConfig, Cell, CellConfig};
    pub use crate::layer::{load_safetensors, Mask, RnnLayer, RnnLayerConfig, RnnState};
    pub use crate::ops::RnnBackend;
}
