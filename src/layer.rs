//! The sequence layer: any [`Cell`] over time, stacked, optionally bidirectional, with dropout
//! between layers, masks for right-padded batches, and states in and out in PyTorch's
//! `[layers·directions, batch, hidden]` order.
//!
//! # Carrying state across batches (truncated backprop through time)
//! Feed the final state of one chunk as the initial state of the next, detached so that the
//! backward pass stops at the chunk boundary:
//! ```
//! # use burn::backend::{Autodiff, NdArray};
//! # use burn::tensor::{Distribution, Tensor};
//! # use rnn_zoo::prelude::*;
//! # type B = Autodiff<NdArray>;
//! # let device = Default::default();
//! let layer = RnnLayerConfig::new(AnyCellConfig::named("lstm", 4, 8).unwrap()).init::<B>(&device);
//! let mut state = None;
//! for _chunk in 0..3 {
//!     let x = Tensor::<B, 3>::random([2, 5, 4], Distribution::Default, &device);
//!     let (output, next) = layer.forward(x, state);
//!     let _grads = output.sum().backward();
//!     state = Some(next.detach());
//! }
//! ```

use std::marker::PhantomData;
use std::path::Path;

use burn::module::Module;
use burn::nn::{Dropout, DropoutConfig, Linear};
use burn::tensor::{backend::Backend, Bool, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::cell::{project_sequence, Cell, CellConfig, Position};
use crate::import::{to_safetensors_bytes, write_atomically, ImportError, StateDict, TensorSource};
use crate::ops::{self, RecurrencePath, RnnBackend};
use crate::regularisation::StateNoise;

/// Configuration of an [`RnnLayer`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RnnLayerConfig<C> {
    /// The cell of the first layer (later layers take their input width from the layer below).
    pub cell: C,
    /// Number of stacked layers.
    #[serde(default = "one")]
    pub num_layers: usize,
    /// Run a second cell from the end of each sequence and concatenate the outputs.
    #[serde(default)]
    pub bidirectional: bool,
    /// Dropout probability on the outputs of every layer but the last (training only).
    #[serde(default)]
    pub dropout: f64,
    /// Variational dropout of the hidden state each step reads, one mask per sequence
    /// (training only; see [`crate::regularisation`]). Only for cells whose step reads `h`
    /// only through its recurrent product (not GRU, MGU, SRU).
    #[serde(default)]
    pub recurrent_dropout: f64,
    /// Zoneout probability of every state unit at every step (the expectation at evaluation;
    /// see [`crate::regularisation`]).
    #[serde(default)]
    pub zoneout: f64,
}

fn one() -> usize {
    1
}

impl<C: CellConfig> RnnLayerConfig<C> {
    /// One unidirectional layer of `cell`, no dropout.
    pub fn new(cell: C) -> Self {
        Self {
            cell,
            num_layers: 1,
            bidirectional: false,
            dropout: 0.0,
            recurrent_dropout: 0.0,
            zoneout: 0.0,
        }
    }
    /// Sets the number of stacked layers.
    pub fn with_num_layers(mut self, num_layers: usize) -> Self {
        self.num_layers = num_layers;
        self
    }
    /// Makes the layer bidirectional (or not).
    pub fn with_bidirectional(mut self, bidirectional: bool) -> Self {
        self.bidirectional = bidirectional;
        self
    }
    /// Sets the dropout between layers.
    pub fn with_dropout(mut self, dropout: f64) -> Self {
        self.dropout = dropout;
        self
    }
    /// Sets the variational dropout of the recurrent state.
    pub fn with_recurrent_dropout(mut self, recurrent_dropout: f64) -> Self {
        self.recurrent_dropout = recurrent_dropout;
        self
    }
    /// Sets the zoneout probability.
    pub fn with_zoneout(mut self, zoneout: f64) -> Self {
        self.zoneout = zoneout;
        self
    }

    /// Number of directions, 1 or 2.
    pub fn num_directions(&self) -> usize {
        if self.bidirectional {
            2
        } else {
            1
        }
    }

    /// Builds the layer with freshly initialised cells.
    pub fn init<B: Backend>(&self, device: &B::Device) -> RnnLayer<B, C::Cell<B>> {
        assert!(self.num_layers > 0, "an RNN layer needs at least one layer");
        for (what, p) in [
            ("dropout", self.dropout),
            ("recurrent_dropout", self.recurrent_dropout),
            ("zoneout", self.zoneout),
        ] {
            assert!((0.0..1.0).contains(&p), "{what} = {p} is not in [0, 1)");
        }
        let dirs = self.num_directions();
        let hidden = self.cell.hidden_size();
        let cells = (0..self.num_layers)
            .flat_map(|layer| (0..dirs).map(move |direction| (layer, direction)))
            .map(|(layer, direction)| {
                let input_size = if layer == 0 {
                    self.cell.input_size()
                } else {
                    hidden * dirs
                };
                self.cell
                    .at_position(Position {
                        input_size,
                        direction,
                        num_directions: dirs,
                    })
                    .init_cell(device)
            })
            .collect();
        RnnLayer {
            cells,
            dropout: DropoutConfig::new(self.dropout).init(),
            recurrent_dropout: self.recurrent_dropout,
            zoneout: self.zoneout,
            num_layers: self.num_layers,
            bidirectional: self.bidirectional,
            _backend: PhantomData,
        }
    }
}

/// Recurrent state of a layer: one tensor `[layers·directions, batch, hidden]` per state
/// component of the cell (`h` and `c` for an LSTM, `h` for RNN and GRU, `c` for SRU), in the
/// order of [`Cell::state_names`]. Index `layer·directions + direction`, as PyTorch.
#[derive(Debug, Clone)]
pub struct RnnState<B: Backend> {
    /// The state components.
    pub components: Vec<Tensor<B, 3>>,
}

impl<B: Backend> RnnState<B> {
    /// The same state cut from the autodiff graph (for truncated backprop through time).
    pub fn detach(self) -> Self {
        Self {
            components: self.components.into_iter().map(|t| t.detach()).collect(),
        }
    }
}

/// Which steps of a right-padded batch are real.
#[derive(Debug, Clone)]
pub struct Mask<B: Backend> {
    /// `[T, batch]`, 1 for a real step, 0 for padding (time-major, as the recurrence reads it).
    keep: Tensor<B, 2>,
    lengths: Vec<usize>,
}

/// A mask that does not describe right-padded sequences.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MaskError {
    /// A real step follows a padded one.
    #[error("mask row {row} is not a prefix: step {step} is real after padding")]
    NotPrefix {
        /// Batch row.
        row: usize,
        /// First real step after padding.
        step: usize,
    },
    /// A length is longer than the sequence.
    #[error("length {length} of row {row} exceeds the sequence length {max}")]
    TooLong {
        /// Batch row.
        row: usize,
        /// Its length.
        length: usize,
        /// The sequence length.
        max: usize,
    },
}

impl<B: Backend> Mask<B> {
    /// From a `[batch, T]` boolean mask (`true` = real step); each row must be a prefix.
    pub fn from_bool(mask: Tensor<B, 2, Bool>) -> Result<Self, MaskError> {
        let [batch, len] = mask.dims();
        let values = mask.to_data().to_vec::<bool>().expect("bool mask");
        let mut lengths = Vec::with_capacity(batch);
        for (row, steps) in values.chunks(len.max(1)).take(batch).enumerate() {
            let length = steps.iter().take_while(|&&real| real).count();
            if let Some(offset) = steps[length..].iter().position(|&real| real) {
                return Err(MaskError::NotPrefix {
                    row,
                    step: length + offset,
                });
            }
            lengths.push(length);
        }
        Ok(Self {
            keep: mask.float().transpose(),
            lengths,
        })
    }

    /// From the length of each sequence in a batch padded to `max_len` steps.
    pub fn from_lengths(
        lengths: &[usize],
        max_len: usize,
        device: &B::Device,
    ) -> Result<Self, MaskError> {
        let mut keep = vec![0.0f32; max_len * lengths.len()];
        for (row, &length) in lengths.iter().enumerate() {
            if length > max_len {
                return Err(MaskError::TooLong {
                    row,
                    length,
                    max: max_len,
                });
            }
            for t in 0..length {
                keep[t * lengths.len() + row] = 1.0;
            }
        }
        let keep = TensorData::new(keep, [max_len, lengths.len()]);
        Ok(Self {
            keep: Tensor::from_data(keep, device),
            lengths: lengths.to_vec(),
        })
    }

    /// The length of each sequence.
    pub fn lengths(&self) -> &[usize] {
        &self.lengths
    }
}

/// A stack of recurrent layers of cell `C`. Input and output are batch-first:
/// `[batch, T, input]` in, `[batch, T, directions·hidden]` out.
#[derive(Module, Debug)]
pub struct RnnLayer<B: Backend, C: Module<B>> {
    /// The cells, index `layer·directions + direction`.
    pub cells: Vec<C>,
    /// Dropout between layers.
    pub dropout: Dropout,
    /// Variational dropout of the recurrent state (see [`RnnLayerConfig::recurrent_dropout`]).
    pub recurrent_dropout: f64,
    /// Zoneout probability (see [`RnnLayerConfig::zoneout`]).
    pub zoneout: f64,
    /// Number of stacked layers.
    pub num_layers: usize,
    /// Two directions.
    pub bidirectional: bool,
    _backend: PhantomData<B>,
}

impl<B: Backend, C: Cell<B>> RnnLayer<B, C> {
    /// The layer after a training step on sequences of up to `max_len` steps: each cell's
    /// parameters back in their allowed range (see [`Cell::constrain_recurrent`]).
    pub fn constrain_recurrent(self, max_len: usize) -> Self {
        Self {
            cells: self
                .cells
                .into_iter()
                .map(|cell| cell.constrain_recurrent(max_len))
                .collect(),
            ..self
        }
    }

    /// 1 or 2.
    pub fn num_directions(&self) -> usize {
        if self.bidirectional {
            2
        } else {
            1
        }
    }
    /// Width of the input.
    pub fn input_size(&self) -> usize {
        self.cells[0].input_size()
    }
    /// Width of each cell's hidden state.
    pub fn hidden_size(&self) -> usize {
        self.cells[0].hidden_size()
    }
    /// Width of the output (`directions · hidden`).
    pub fn output_size(&self) -> usize {
        self.num_directions() * self.hidden_size()
    }
    /// Names of the state components (see [`RnnState`]).
    pub fn state_names(&self) -> &'static [&'static str] {
        self.cells[0].state_names()
    }

    /// A zero state for `batch` sequences.
    pub fn zero_state(&self, batch: usize, device: &B::Device) -> RnnState<B> {
        let shape = [self.cells.len(), batch, self.hidden_size()];
        RnnState {
            components: self
                .state_names()
                .iter()
                .map(|_| Tensor::zeros(shape, device))
                .collect(),
        }
    }

    fn check_state(&self, state: &RnnState<B>, batch: usize) {
        let expected = [self.cells.len(), batch, self.hidden_size()];
        assert_eq!(
            state.components.len(),
            self.state_names().len(),
            "state has {} components but the cell's state is {:?}",
            state.components.len(),
            self.state_names()
        );
        for (name, tensor) in self.state_names().iter().zip(&state.components) {
            assert_eq!(
                tensor.dims(),
                expected,
                "state '{name}' has shape {:?}, expected {expected:?} ([layers*directions, batch, hidden])",
                tensor.dims()
            );
        }
    }
}

impl<B: RnnBackend, C: Cell<B>> RnnLayer<B, C> {
    /// Runs the layer over full-length sequences `[batch, T, input]`, from `state` (zeros if
    /// `None`). Returns the output `[batch, T, directions·hidden]` and the final state.
    pub fn forward(
        &self,
        input: Tensor<B, 3>,
        state: Option<RnnState<B>>,
    ) -> (Tensor<B, 3>, RnnState<B>) {
        let noise = self.sample_noise(&input);
        self.run(input, None, state, RecurrencePath::Fused, noise.as_deref())
    }

    /// Runs the layer over a right-padded batch: padded steps output zeros and leave the state
    /// unchanged; the forward direction's final state is the one at each sequence's last real
    /// step, the reverse direction's the one after step 0 (as PyTorch packed sequences).
    pub fn forward_masked(
        &self,
        input: Tensor<B, 3>,
        mask: &Mask<B>,
        state: Option<RnnState<B>>,
    ) -> (Tensor<B, 3>, RnnState<B>) {
        self.forward_with_path(input, Some(mask), state, RecurrencePath::Fused)
    }

    /// [`forward`](RnnLayer::forward) or [`forward_masked`](RnnLayer::forward_masked) along a
    /// chosen [`RecurrencePath`] (e.g. the plain path, to check the fused one).
    pub fn forward_with_path(
        &self,
        input: Tensor<B, 3>,
        mask: Option<&Mask<B>>,
        state: Option<RnnState<B>>,
        path: RecurrencePath,
    ) -> (Tensor<B, 3>, RnnState<B>) {
        let noise = self.sample_noise(&input);
        self.forward_with_noise(input, mask, state, noise.as_deref(), path)
    }

    /// [`forward_with_path`](RnnLayer::forward_with_path) with given recurrent noise, one
    /// per cell (from [`sample_noise`](RnnLayer::sample_noise)), or none: the same noise
    /// gives the same result.
    pub fn forward_with_noise(
        &self,
        input: Tensor<B, 3>,
        mask: Option<&Mask<B>>,
        state: Option<RnnState<B>>,
        noise: Option<&[StateNoise<B>]>,
        path: RecurrencePath,
    ) -> (Tensor<B, 3>, RnnState<B>) {
        match mask {
            Some(mask) => {
                self.check_mask(&input, mask);
                self.run(input, Some(mask.keep.clone()), state, path, noise)
            }
            None => self.run(input, None, state, path, noise),
        }
    }

    /// Recurrent dropout and zoneout noise for a batch `input` `[batch, T, ·]`, one per cell:
    /// random in training (an autodiff backend, as burn's `Dropout`), deterministic at
    /// evaluation; `None` when the layer has neither.
    pub fn sample_noise(&self, input: &Tensor<B, 3>) -> Option<Vec<StateNoise<B>>> {
        let [batch, len, _] = input.dims();
        let device = input.device();
        let training = B::ad_enabled(&device);
        self.cells
            .iter()
            .map(|cell| {
                StateNoise::sample(
                    cell.state_names(),
                    cell.hidden_size(),
                    [len, batch],
                    (self.recurrent_dropout, self.zoneout),
                    training,
                    &device,
                )
            })
            .collect()
    }

    /// One step for inference or step-by-step generation: `input [batch, input]` gives the
    /// output `[batch, hidden]` and the next state. Unidirectional layers only.
    pub fn step(
        &self,
        input: Tensor<B, 2>,
        state: Option<RnnState<B>>,
    ) -> (Tensor<B, 2>, RnnState<B>) {
        assert!(
            !self.bidirectional,
            "step-by-step use needs a unidirectional layer"
        );
        let input = input.unsqueeze_dim(1);
        let noise = self.sample_noise(&input);
        let (output, state) = self.run(input, None, state, RecurrencePath::Fused, noise.as_deref());
        (output.squeeze_dim(1), state)
    }

    fn check_mask(&self, input: &Tensor<B, 3>, mask: &Mask<B>) {
        let [batch, len, _] = input.dims();
        assert_eq!(
            mask.keep.dims(),
            [len, batch],
            "mask covers [batch, T] = {:?} but the input is [batch, T] = {:?}",
            [mask.keep.dims()[1], mask.keep.dims()[0]],
            [batch, len]
        );
    }

    fn run(
        &self,
        input: Tensor<B, 3>,
        mask: Option<Tensor<B, 2>>,
        state: Option<RnnState<B>>,
        path: RecurrencePath,
        noise: Option<&[StateNoise<B>]>,
    ) -> (Tensor<B, 3>, RnnState<B>) {
        let [batch, len, width] = input.dims();
        assert_eq!(
            width,
            self.input_size(),
            "input has shape {:?} but the layer expects [batch, T, {}]",
            [batch, len, width],
            self.input_size()
        );
        assert!(
            len > 0,
            "input has no time steps (shape {:?})",
            [batch, len, width]
        );
        let state = state.unwrap_or_else(|| self.zero_state(batch, &input.device()));
        self.check_state(&state, batch);

        let (dirs, hidden) = (self.num_directions(), self.hidden_size());
        let n_components = self.state_names().len();
        let mut finals: Vec<Vec<Tensor<B, 2>>> = vec![Vec::new(); n_components];
        // Batch-major between layers; each cell reads a time-major view.
        let mut x = input;
        for layer in 0..self.num_layers {
            let mut outputs = Vec::with_capacity(dirs);
            for direction in 0..dirs {
                let index = layer * dirs + direction;
                let state0 = Tensor::cat(
                    state
                        .components
                        .iter()
                        .map(|c| c.clone().narrow(0, index, 1).reshape([batch, hidden]))
                        .collect(),
                    1,
                );
                let reverse = direction == 1;
                let packed = self.cells[index].run(
                    x.clone().swap_dims(0, 1),
                    state0,
                    mask.clone(),
                    reverse,
                    path,
                    noise.map(|noise| &noise[index]),
                );
                // The final state is the last row the recurrence visited, in its last columns
                // (the output columns come first, unless left out: `host_output_in_state`).
                let last = if reverse { 0 } else { len - 1 };
                let state_width = hidden * n_components;
                let (output, final_state) =
                    ops::layer_outputs(packed, hidden, state_width, last, path);
                for (k, parts) in finals.iter_mut().enumerate() {
                    parts.push(final_state.clone().narrow(1, k * hidden, hidden));
                }
                outputs.push(output);
            }
            x = match outputs.len() {
                1 => outputs.pop().expect("one direction"),
                _ => Tensor::cat(outputs, 2),
            };
            if layer + 1 < self.num_layers {
                x = self.dropout.forward(x);
            }
        }
        let state = RnnState {
            components: finals
                .into_iter()
                .map(|parts| Tensor::stack(parts, 0))
                .collect(),
        };
        (x, state)
    }
}

impl<B: Backend, C: Cell<B>> RnnLayer<B, C> {
    /// Replaces every parameter with the tensor of the same name from `source` (names as in
    /// [`crate::import`]).
    pub fn load_state_dict(self, source: &mut dyn TensorSource) -> Result<Self, ImportError> {
        let dirs = self.num_directions();
        let mut cells = self.cells.into_iter();
        let mut loaded = Vec::new();
        for layer in 0..self.num_layers {
            let layer_cells: Vec<C> = cells.by_ref().take(dirs).collect();
            loaded.extend(C::load_layer(layer_cells, layer, source)?);
        }
        Ok(Self {
            cells: loaded,
            ..self
        })
    }

    /// Every parameter as a named tensor, in the names [`load_state_dict`] reads.
    ///
    /// [`load_state_dict`]: RnnLayer::load_state_dict
    pub fn state_dict(&self) -> Vec<(String, TensorData)> {
        self.cells
            .chunks(self.num_directions())
            .enumerate()
            .flat_map(|(layer, cells)| C::save_layer(cells, layer))
            .collect()
    }

    /// Writes the layer's parameters as a safetensors file, names prefixed with `prefix`.
    pub fn save_safetensors(
        &self,
        path: impl AsRef<Path>,
        prefix: &str,
    ) -> Result<(), ImportError> {
        let bytes = to_safetensors_bytes(&self.state_dict(), prefix, None)?;
        write_atomically(path.as_ref(), &bytes)
    }
}

/// burn's `nn::Linear` on every step of a `[batch, T, H]` sequence (a per-step output head),
/// computed as `linear.forward(x)` is, through the layer's projection op: one GEMM each way on
/// the CPU path instead of burn-ndarray's batched matmul and the copies around it.
pub fn linear_per_step<B: RnnBackend>(linear: &Linear<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
    // burn stores the weight as `[in, out]`; the op reads `[out, in]`.
    let weight = linear.weight.val().transpose();
    project_sequence(x, weight, linear.bias.as_ref().map(|bias| bias.val()), None)
}

/// Builds the layer `config` describes and loads its parameters from a safetensors state dict,
/// reading only keys under `prefix` (`""` for a file of this layer alone, `"encoder.rnn."` for
/// a whole model's state dict). Every key under the prefix must be used.
pub fn load_safetensors<B: Backend, C: CellConfig>(
    config: &RnnLayerConfig<C>,
    path: impl AsRef<Path>,
    prefix: &str,
    device: &B::Device,
) -> Result<RnnLayer<B, C::Cell<B>>, ImportError> {
    let mut dict = StateDict::from_file(path, prefix)?;
    let layer = config.init::<B>(device).load_state_dict(&mut dict)?;
    dict.ensure_all_used()?;
    Ok(layer)
}
