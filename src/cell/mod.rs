//! Recurrent cells: one trait, one file per cell family, one registry.
//!
//! A cell splits its work in two: [`Cell::project`] runs the input-to-hidden matmul for every
//! step of a sequence at once, and its [`Recurrence`] kernel advances the state one step from
//! that projection (one stacked matmul per step at most). The [layer](crate::layer) owns time.

// `AnyCell` and the record burn derives for it are as large as the largest family (LN-LSTM's
// seven parameters): a layer holds one or two cells, so a box would buy nothing.
#![allow(clippy::large_enum_variant)]

pub mod gru;
pub mod indrnn;
pub mod ln_lstm;
pub mod lstm;
pub mod mgu;
pub mod rnn;
pub mod sru;

use burn::module::{Module, ModuleDisplay, Param};
use burn::tensor::{backend::Backend, Distribution, Tensor, TensorData, TensorPrimitive};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::import::{ImportError, TensorSource};
use crate::ops::{self, Passthrough, Recurrence, RecurrencePath, RnnBackend};
use crate::regularisation::StateNoise;

/// A recurrent cell: what the layer needs to run it over a sequence.
pub trait Cell<B: Backend>: Module<B> + ModuleDisplay + core::fmt::Debug {
    /// The cell's backend-free recurrent step.
    type Kernel: Recurrence;

    /// Width of the input at each step.
    fn input_size(&self) -> usize;
    /// Width of the hidden state (and of the output at each step).
    fn hidden_size(&self) -> usize;
    /// Names of the state components, each `[batch, hidden]`, in the order the packed state
    /// holds them (`["h", "c"]` for an LSTM).
    fn state_names(&self) -> &'static [&'static str];
    /// The recurrent kernel, configured for this cell.
    fn kernel(&self) -> Self::Kernel;
    /// The input projection as one affine map `x · Wᵀ + b`: `W` `[kernel.input_width(),
    /// input]` and `b`. The recurrence op may then compute each step's projection itself (see
    /// [`RnnBackend::rnn_projected_recurrence`]); anything more (a normalisation) is the
    /// kernel's, inside the step.
    fn input_affine(&self) -> (Tensor<B, 2>, Option<Tensor<B, 1>>);
    /// Columns of the input that the kernel reads after [`input_affine`](Cell::input_affine)'s,
    /// unprojected (SRU's skip term when input and output widths agree); `None` for most cells.
    fn input_passthrough(&self) -> Option<Passthrough> {
        None
    }
    /// Projects a whole time-major input sequence `[T, batch, input]` at once into the
    /// per-step kernel input `[T, batch, kernel.input_width()]`, through
    /// [`input_affine`](Cell::input_affine) and [`input_passthrough`](Cell::input_passthrough).
    fn project(&self, input: Tensor<B, 3>) -> Tensor<B, 3>
    where
        B: RnnBackend,
    {
        let (weight, bias) = self.input_affine();
        project_sequence(input, weight, bias, self.input_passthrough())
    }
    /// The kernel's recurrent parameters, flattened and concatenated in its order.
    fn recurrent_params(&self) -> Tensor<B, 1>;

    /// The cell after a training step on sequences of up to `max_len` steps, with its
    /// parameters put back into their allowed range (IndRNN clips its recurrent weights);
    /// most cells have no constraint.
    fn constrain_recurrent(self, max_len: usize) -> Self
    where
        Self: Sized,
    {
        let _ = max_len;
        self
    }

    /// Loads the cells of one layer (one per direction) from a state dict, replacing the
    /// parameters of `cells`; names follow the convention of the cell's family.
    fn load_layer(
        cells: Vec<Self>,
        layer: usize,
        source: &mut dyn TensorSource,
    ) -> Result<Vec<Self>, ImportError>
    where
        Self: Sized;

    /// The named tensors of one layer's cells (one per direction), as [`load_layer`] reads them.
    ///
    /// [`load_layer`]: Cell::load_layer
    fn save_layer(cells: &[Self], layer: usize) -> Vec<(String, TensorData)>
    where
        Self: Sized;

    /// Runs the cell over a time-major sequence from a packed state `[batch, state_width]`,
    /// with recurrent `noise` (dropout, zoneout) if any, returning the op's per-step output
    /// and state `[T, batch, output_width + state_width]` (see [the recurrence op](crate::ops)).
    fn run(
        &self,
        input: Tensor<B, 3>,
        state: Tensor<B, 2>,
        mask: Option<Tensor<B, 2>>,
        reverse: bool,
        path: RecurrencePath,
        noise: Option<&StateNoise<B>>,
    ) -> Tensor<B, 3>
    where
        B: RnnBackend,
    {
        let params = self.recurrent_params();
        // The projection and the recurrence as one op (the backend decides whether to fuse
        // them); recurrent noise, as more columns of the kernel's input, goes with it.
        if path == RecurrencePath::Fused {
            let (weight, bias) = self.input_affine();
            check_input_width(&input, &weight);
            let passthrough = self.input_passthrough();
            let input = ops::ProjectedInput::new(
                input,
                weight,
                bias,
                passthrough,
                state,
                params,
                mask,
                reverse,
            );
            return match noise {
                None => ops::projected_recurrence(&self.kernel(), input),
                Some(noise) => ops::projected_recurrence(
                    &noise.wrapped(self.kernel()),
                    ops::ProjectedInput {
                        noise: Some(noise.input_noise()),
                        ..input
                    },
                ),
            };
        }
        let projected = self.project(input);
        match noise {
            None => ops::recurrence_with(
                path,
                &self.kernel(),
                projected,
                state,
                params,
                mask,
                reverse,
            ),
            Some(noise) => {
                let (kernel, projected) = noise.wrap(self.kernel(), projected);
                ops::recurrence_with(path, &kernel, projected, state, params, mask, reverse)
            }
        }
    }
}

/// Where a cell sits in a layer stack; some cells (SRU) build themselves differently by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// Width of this layer's input.
    pub input_size: usize,
    /// 0 for the forward direction, 1 for the reverse one.
    pub direction: usize,
    /// 1 or 2.
    pub num_directions: usize,
}

/// A cell's configuration: serialisable, named, and able to build the cell.
pub trait CellConfig: Clone + core::fmt::Debug + Serialize + DeserializeOwned {
    /// The cell this config builds.
    type Cell<B: Backend>: Cell<B>;

    /// The short names this config answers to (`"lstm"`, `"peephole-lstm"`, ...).
    fn names() -> &'static [&'static str];
    /// The config a short name stands for, with the zoo's defaults; `None` if not ours.
    fn from_name(name: &str, input_size: usize, hidden_size: usize) -> Option<Self>;
    /// The short name of this config.
    fn name(&self) -> &'static str;
    /// Width of the input.
    fn input_size(&self) -> usize;
    /// Width of the hidden state.
    fn hidden_size(&self) -> usize;
    /// This config for the cell at `position` in a layer stack.
    fn at_position(&self, position: Position) -> Self;
    /// Builds the cell with freshly initialised parameters.
    fn init_cell<B: Backend>(&self, device: &B::Device) -> Self::Cell<B>;
}

/// Values drawn from `U(-bound, bound)`, PyTorch's default for recurrent weights.
pub(crate) fn uniform<B: Backend, const D: usize>(
    shape: [usize; D],
    bound: f64,
    device: &B::Device,
) -> Tensor<B, D> {
    Tensor::random(shape, Distribution::Uniform(-bound, bound), device)
}

/// A parameter drawn from `U(-bound, bound)`.
pub(crate) fn uniform_param<B: Backend, const D: usize>(
    shape: [usize; D],
    bound: f64,
    device: &B::Device,
) -> Param<Tensor<B, D>> {
    Param::from_tensor(uniform(shape, bound, device))
}

/// `x W^T + b` over a sequence: `[T, batch, in]` (or `[batch, T, in]`) with `weight [out, in]`
/// gives `[T, batch, out]` (`[batch, T, out]`), in one matmul; `passthrough`'s columns of `x`
/// appended.
pub(crate) fn project_sequence<B: RnnBackend>(
    input: Tensor<B, 3>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    passthrough: Option<Passthrough>,
) -> Tensor<B, 3> {
    check_input_width(&input, &weight);
    let [len, batch, _] = input.dims();
    let out = weight.dims()[0] + passthrough.map_or(0, |p| p.width);
    let projected = B::rnn_linear(
        input.into_primitive().tensor(),
        weight.into_primitive().tensor(),
        bias.map(|bias| bias.into_primitive().tensor()),
        passthrough,
    );
    let projected = Tensor::<B, 3>::from_primitive(TensorPrimitive::Float(projected));
    debug_assert_eq!(projected.dims(), [len, batch, out]);
    projected
}

/// Panics unless `input` (`[T, batch, width]`) has the width `weight` (`[out, width]`) projects.
fn check_input_width<B: Backend>(input: &Tensor<B, 3>, weight: &Tensor<B, 2>) {
    let [len, batch, width] = input.dims();
    let expected = weight.dims()[1];
    assert_eq!(
        width,
        expected,
        "input has {width} features per step but the cell expects {expected} (input shape {:?})",
        [len, batch, width]
    );
}

/// Flattens 2-D parameters into the kernel's flat parameter vector.
pub(crate) fn flatten_params<B: Backend>(params: Vec<Tensor<B, 2>>) -> Tensor<B, 1> {
    let flat = params
        .into_iter()
        .map(|p| {
            let n = p.shape().num_elements();
            p.reshape([n])
        })
        .collect();
    Tensor::cat(flat, 0)
}

/// Columns `[start, start + width)` of a `[batch, features]` tensor.
pub(crate) fn cols<B: Backend>(t: &Tensor<B, 2>, start: usize, width: usize) -> Tensor<B, 2> {
    t.clone().narrow(1, start, width)
}

/// The logistic sigmoid as `(1 + tanh(x/2)) / 2`: stable for any `x`, and exact to the float
/// type (burn-ndarray's own sigmoid is only f32-accurate on f64 tensors).
pub(crate) fn sigmoid<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    ((x * 0.5).tanh() + 1.0) * 0.5
}

/// `σ'(x)` written through `s = σ(x)`.
pub(crate) fn sigmoid_grad<B: Backend>(s: Tensor<B, 2>) -> Tensor<B, 2> {
    s.clone() * (s.neg() + 1.0)
}

/// `tanh'(x)` written through `y = tanh(x)`.
pub(crate) fn tanh_grad<B: Backend>(y: Tensor<B, 2>) -> Tensor<B, 2> {
    y.square().neg() + 1.0
}

/// Adds `value` to the accumulator `acc`.
pub(crate) fn accumulate<B: Backend>(acc: &mut Tensor<B, 2>, value: Tensor<B, 2>) {
    *acc = acc.clone() + value;
}

/// Column sums of a `[batch, width]` tensor as `[1, width]` (the gradient of a broadcast row).
pub(crate) fn batch_sum<B: Backend>(t: Tensor<B, 2>) -> Tensor<B, 2> {
    t.sum_dim(0)
}

/// The PyTorch-style name of a per-direction parameter: `weight_ih_l0`, `bias_hh_l1_reverse`.
pub fn torch_name(base: &str, layer: usize, direction: usize) -> String {
    let suffix = if direction == 1 { "_reverse" } else { "" };
    format!("{base}_l{layer}{suffix}")
}

/// Reads a tensor from `source` into a parameter of the same shape as `like`.
pub(crate) fn load_param<B: Backend, const D: usize>(
    source: &mut dyn TensorSource,
    name: &str,
    like: &Param<Tensor<B, D>>,
) -> Result<Param<Tensor<B, D>>, ImportError> {
    let current = like.val();
    let data = source.take(name, &current.dims())?;
    Ok(Param::from_tensor(Tensor::from_data(
        data.convert::<B::FloatElem>(),
        &current.device(),
    )))
}

/// The four tensors of a PyTorch-style cell: `weight_ih`, `weight_hh`, `bias_ih`, `bias_hh`.
pub(crate) type TorchParams<B> = (
    Param<Tensor<B, 2>>,
    Param<Tensor<B, 2>>,
    Param<Tensor<B, 1>>,
    Param<Tensor<B, 1>>,
);

/// References to a cell's four PyTorch-style tensors, in [`TorchParams`] order.
pub(crate) type TorchRefs<'a, B> = (
    &'a Param<Tensor<B, 2>>,
    &'a Param<Tensor<B, 2>>,
    &'a Param<Tensor<B, 1>>,
    &'a Param<Tensor<B, 1>>,
);

/// Loads a PyTorch-style cell's four tensors for `layer` and `direction`, shaped like `like`.
pub(crate) fn load_torch_params<B: Backend>(
    source: &mut dyn TensorSource,
    layer: usize,
    direction: usize,
    like: TorchRefs<'_, B>,
) -> Result<TorchParams<B>, ImportError> {
    let name = |base: &str| torch_name(base, layer, direction);
    Ok((
        load_param(source, &name("weight_ih"), like.0)?,
        load_param(source, &name("weight_hh"), like.1)?,
        load_param(source, &name("bias_ih"), like.2)?,
        load_param(source, &name("bias_hh"), like.3)?,
    ))
}

/// The named tensors of a PyTorch-style cell for `layer` and `direction`.
pub(crate) fn save_torch_params<B: Backend>(
    layer: usize,
    direction: usize,
    params: TorchRefs<'_, B>,
) -> Vec<(String, TensorData)> {
    let name = |base: &str| torch_name(base, layer, direction);
    vec![
        (name("weight_ih"), param_data(params.0)),
        (name("weight_hh"), param_data(params.1)),
        (name("bias_ih"), param_data(params.2)),
        (name("bias_hh"), param_data(params.3)),
    ]
}

/// A cell whose tensors are PyTorch's four (`weight_ih`, `weight_hh`, `bias_ih`, `bias_hh`),
/// plus whatever else it keeps as it is.
pub(crate) trait TorchStyle<B: Backend>: Sized {
    /// References to the four tensors.
    fn torch_refs(&self) -> TorchRefs<'_, B>;
    /// The cell with the four tensors replaced.
    fn with_torch_params(self, params: TorchParams<B>) -> Self;
}

/// Implements [`TorchStyle`] for a cell struct with the four PyTorch-named fields.
macro_rules! torch_style {
    ($cell:ident) => {
        impl<B: Backend> super::TorchStyle<B> for $cell<B> {
            fn torch_refs(&self) -> super::TorchRefs<'_, B> {
                (
                    &self.weight_ih,
                    &self.weight_hh,
                    &self.bias_ih,
                    &self.bias_hh,
                )
            }
            // `..self` keeps a cell's other fields; MGU has none.
            #[allow(clippy::needless_update)]
            fn with_torch_params(self, params: super::TorchParams<B>) -> Self {
                let (weight_ih, weight_hh, bias_ih, bias_hh) = params;
                Self {
                    weight_ih,
                    weight_hh,
                    bias_ih,
                    bias_hh,
                    ..self
                }
            }
        }
    };
}
pub(crate) use torch_style;

/// [`Cell::load_layer`] of a [`TorchStyle`] cell: one cell per direction.
pub(crate) fn load_torch_layer<B: Backend, C: TorchStyle<B>>(
    cells: Vec<C>,
    layer: usize,
    source: &mut dyn TensorSource,
) -> Result<Vec<C>, ImportError> {
    cells
        .into_iter()
        .enumerate()
        .map(|(direction, cell)| {
            let params = load_torch_params(source, layer, direction, cell.torch_refs())?;
            Ok(cell.with_torch_params(params))
        })
        .collect()
}

/// [`Cell::save_layer`] of a [`TorchStyle`] cell.
pub(crate) fn save_torch_layer<B: Backend, C: TorchStyle<B>>(
    cells: &[C],
    layer: usize,
) -> Vec<(String, TensorData)> {
    cells
        .iter()
        .enumerate()
        .flat_map(|(direction, cell)| save_torch_params(layer, direction, cell.torch_refs()))
        .collect()
}

/// Implements [`CellConfig`] for a one-name cell family whose config has `input_size` and
/// `hidden_size` fields, `new(input_size, hidden_size)` and `init(device)`.
macro_rules! single_name_config {
    ($config:ident => $cell:ident, $name:literal) => {
        impl super::CellConfig for $config {
            type Cell<B: Backend> = $cell<B>;

            fn names() -> &'static [&'static str] {
                &[$name]
            }
            fn from_name(name: &str, input_size: usize, hidden_size: usize) -> Option<Self> {
                (name == $name).then(|| Self::new(input_size, hidden_size))
            }
            fn name(&self) -> &'static str {
                $name
            }
            fn input_size(&self) -> usize {
                self.input_size
            }
            fn hidden_size(&self) -> usize {
                self.hidden_size
            }
            fn at_position(&self, position: super::Position) -> Self {
                Self {
                    input_size: position.input_size,
                    ..self.clone()
                }
            }
            fn init_cell<B: Backend>(&self, device: &B::Device) -> $cell<B> {
                self.init(device)
            }
        }
    };
}
pub(crate) use single_name_config;

/// A parameter's values, for export.
pub(crate) fn param_data<B: Backend, const D: usize>(param: &Param<Tensor<B, D>>) -> TensorData {
    param.val().into_data()
}

macro_rules! register_cells {
    ($($variant:ident => $module:ident :: { $cell:ident, $config:ident, $kernel:ident }),* $(,)?) => {
        /// Any cell of the zoo, chosen at run time by name.
        #[derive(Module, Debug)]
        pub enum AnyCell<B: Backend> {
            $(
                #[doc = concat!("A [`", stringify!($cell), "`](", stringify!($module), "::", stringify!($cell), ").")]
                $variant($module::$cell<B>),
            )*
        }

        /// The config of any cell of the zoo.
        #[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
        #[serde(tag = "family", rename_all = "kebab-case")]
        pub enum AnyCellConfig {
            $(
                #[doc = concat!("A [`", stringify!($config), "`](", stringify!($module), "::", stringify!($config), ").")]
                $variant($module::$config),
            )*
        }

        /// The kernel of any cell of the zoo.
        #[derive(Clone, Debug)]
        pub enum AnyKernel {
            $(
                #[doc = concat!("A [`", stringify!($kernel), "`](", stringify!($module), "::", stringify!($kernel), ").")]
                $variant($module::$kernel),
            )*
        }

        /// Every cell name the zoo knows, in registry order.
        pub fn cell_names() -> Vec<&'static str> {
            let mut names = Vec::new();
            $( names.extend_from_slice(<$module::$config as CellConfig>::names()); )*
            names
        }

        impl Recurrence for AnyKernel {
            fn input_width(&self) -> usize { match self { $(Self::$variant(k) => k.input_width()),* } }
            fn state_width(&self) -> usize { match self { $(Self::$variant(k) => k.state_width()),* } }
            fn output_width(&self) -> usize { match self { $(Self::$variant(k) => k.output_width()),* } }
            fn saved_width(&self) -> usize { match self { $(Self::$variant(k) => k.saved_width()),* } }
            fn host_saved_width(&self) -> usize { match self { $(Self::$variant(k) => k.host_saved_width()),* } }
            fn host_output_in_state(&self) -> bool { match self { $(Self::$variant(k) => k.host_output_in_state()),* } }
            fn param_shapes(&self) -> Vec<[usize; 2]> { match self { $(Self::$variant(k) => k.param_shapes()),* } }
            fn step<B: Backend>(
                &self,
                params: &[Tensor<B, 2>],
                xp: Tensor<B, 2>,
                state: Tensor<B, 2>,
            ) -> ops::StepOutput<B> {
                match self { $(Self::$variant(k) => k.step(params, xp, state)),* }
            }
            fn step_backward<B: Backend>(
                &self,
                params: &[Tensor<B, 2>],
                step: ops::StepRecord<B>,
                param_grads: &mut [Tensor<B, 2>],
            ) -> (Tensor<B, 2>, Tensor<B, 2>) {
                match self { $(Self::$variant(k) => k.step_backward(params, step, param_grads)),* }
            }
            fn host_step<F: crate::host::HostFloat>(
                &self,
                params: &[crate::host::MatRef<F>],
                xp: crate::host::MatRef<F>,
                prev: crate::host::MatRef<F>,
                out: crate::host::MatMut<F>,
            ) {
                match self { $(Self::$variant(k) => k.host_step(params, xp, prev, out)),* }
            }
            fn host_step_backward<F: crate::host::HostFloat>(
                &self,
                params: &[crate::host::MatRef<F>],
                step: crate::host::HostStep<F>,
                grads: crate::host::HostStepGrads<F>,
            ) {
                match self { $(Self::$variant(k) => k.host_step_backward(params, step, grads)),* }
            }
            fn host_weight_products(&self) -> Vec<crate::host::WeightProduct> {
                match self { $(Self::$variant(k) => k.host_weight_products()),* }
            }
            fn as_sru(&self) -> Option<&sru::SruKernel> {
                match self { $(Self::$variant(k) => k.as_sru()),* }
            }
            fn as_plain_lstm(&self) -> Option<usize> {
                match self { $(Self::$variant(k) => k.as_plain_lstm()),* }
            }
            fn as_plain_gru(&self) -> Option<usize> {
                match self { $(Self::$variant(k) => k.as_plain_gru()),* }
            }
            fn with_product_dropout(&self) -> Option<Self> {
                match self { $(Self::$variant(k) => k.with_product_dropout().map(Self::$variant)),* }
            }
        }

        impl<B: Backend> Cell<B> for AnyCell<B> {
            type Kernel = AnyKernel;
            fn input_size(&self) -> usize { match self { $(Self::$variant(c) => c.input_size()),* } }
            fn hidden_size(&self) -> usize { match self { $(Self::$variant(c) => c.hidden_size()),* } }
            fn state_names(&self) -> &'static [&'static str] { match self { $(Self::$variant(c) => c.state_names()),* } }
            fn kernel(&self) -> AnyKernel { match self { $(Self::$variant(c) => AnyKernel::$variant(c.kernel())),* } }
            fn input_affine(&self) -> (Tensor<B, 2>, Option<Tensor<B, 1>>) { match self { $(Self::$variant(c) => c.input_affine()),* } }
            fn input_passthrough(&self) -> Option<Passthrough> { match self { $(Self::$variant(c) => c.input_passthrough()),* } }
            fn project(&self, input: Tensor<B, 3>) -> Tensor<B, 3> where B: RnnBackend { match self { $(Self::$variant(c) => c.project(input)),* } }
            fn recurrent_params(&self) -> Tensor<B, 1> { match self { $(Self::$variant(c) => c.recurrent_params()),* } }
            fn constrain_recurrent(self, max_len: usize) -> Self {
                match self { $(Self::$variant(c) => Self::$variant(c.constrain_recurrent(max_len))),* }
            }

            fn load_layer(
                cells: Vec<Self>,
                layer: usize,
                source: &mut dyn TensorSource,
            ) -> Result<Vec<Self>, ImportError> {
                match cells.first() {
                    $(Some(Self::$variant(_)) => {
                        let inner = cells.into_iter().map(|c| match c {
                            Self::$variant(c) => c,
                            _ => unreachable!("a layer holds one cell family"),
                        }).collect();
                        Ok(<$module::$cell<B> as Cell<B>>::load_layer(inner, layer, source)?
                            .into_iter().map(Self::$variant).collect())
                    })*
                    None => Ok(Vec::new()),
                }
            }

            fn save_layer(cells: &[Self], layer: usize) -> Vec<(String, TensorData)> {
                match cells.first() {
                    $(Some(Self::$variant(_)) => {
                        let inner: Vec<$module::$cell<B>> = cells.iter().map(|c| match c {
                            Self::$variant(c) => c.clone(),
                            _ => unreachable!("a layer holds one cell family"),
                        }).collect();
                        <$module::$cell<B> as Cell<B>>::save_layer(&inner, layer)
                    })*
                    None => Vec::new(),
                }
            }
        }

        impl CellConfig for AnyCellConfig {
            type Cell<B: Backend> = AnyCell<B>;
            fn names() -> &'static [&'static str] {
                static NAMES: std::sync::OnceLock<Vec<&'static str>> = std::sync::OnceLock::new();
                NAMES.get_or_init(cell_names).as_slice()
            }
            fn from_name(name: &str, input_size: usize, hidden_size: usize) -> Option<Self> {
                $(
                    if let Some(config) = <$module::$config as CellConfig>::from_name(name, input_size, hidden_size) {
                        return Some(Self::$variant(config));
                    }
                )*
                None
            }
            fn name(&self) -> &'static str { match self { $(Self::$variant(c) => c.name()),* } }
            fn input_size(&self) -> usize { match self { $(Self::$variant(c) => c.input_size()),* } }
            fn hidden_size(&self) -> usize { match self { $(Self::$variant(c) => c.hidden_size()),* } }
            fn at_position(&self, position: Position) -> Self {
                match self { $(Self::$variant(c) => Self::$variant(c.at_position(position))),* }
            }
            fn init_cell<B: Backend>(&self, device: &B::Device) -> AnyCell<B> {
                match self { $(Self::$variant(c) => AnyCell::$variant(c.init_cell(device))),* }
            }
        }
    };
}

// The registry: adding a cell family is one line here plus its file. New families go at the
// end: a checkpoint records a cell by its position here.
register_cells! {
    Rnn => rnn::{ Rnn, RnnConfig, RnnKernel },
    Lstm => lstm::{ Lstm, LstmConfig, LstmKernel },
    Gru => gru::{ Gru, GruConfig, GruKernel },
    Sru => sru::{ Sru, SruConfig, SruKernel },
    IndRnn => indrnn::{ IndRnn, IndRnnConfig, IndRnnKernel },
    Mgu => mgu::{ Mgu, MguConfig, MguKernel },
    LnLstm => ln_lstm::{ LnLstm, LnLstmConfig, LnLstmKernel },
}

impl AnyCellConfig {
    /// The config for a cell name (`"gru"`, `"sru"`, ...), or an error listing the known names.
    pub fn named(name: &str, input_size: usize, hidden_size: usize) -> Result<Self, String> {
        Self::from_name(name, input_size, hidden_size)
            .ok_or_else(|| format!("unknown cell '{name}' (known: {})", cell_names().join(", ")))
    }
}
