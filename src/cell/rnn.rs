//! The Elman RNN: `h' = φ(W_ih x + b_ih + W_hh h + b_hh)` with φ = tanh (`rnn`) or relu
//! (`rnn-relu`), and the IRNN (`irnn`, Le et al. 2015): the relu RNN started from identity
//! recurrent weights. Parameter names and layouts as `torch.nn.RNN`.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::tensor::{activation, backend::Backend, Tensor, TensorData};

use super::{
    accumulate, flatten_params, load_torch_layer, save_torch_layer, tanh_grad, uniform_param, Cell,
    CellConfig, Position,
};
use crate::host::{
    self, HostFloat, HostStep, HostStepGrads, MatMut, MatRef, Operand, WeightProduct,
};
use crate::import::{ImportError, TensorSource};
use crate::ops::{Recurrence, StepOutput, StepRecord};

/// Configuration of an [`Rnn`] cell.
#[derive(Config, Debug, PartialEq)]
pub struct RnnConfig {
    /// Width of the input.
    pub input_size: usize,
    /// Width of the hidden state.
    pub hidden_size: usize,
    /// relu instead of tanh.
    #[config(default = false)]
    pub relu: bool,
    /// IRNN initialisation (Le et al. 2015): `W_hh = I`, zero biases, `W_ih ~ N(0, 0.001²)`.
    #[config(default = false)]
    pub identity_init: bool,
}

/// An Elman RNN cell. Weights in PyTorch's layout: `weight_ih [H, I]`, `weight_hh [H, H]`.
#[derive(Module, Debug)]
pub struct Rnn<B: Backend> {
    /// Input-to-hidden weights `[H, I]`.
    pub weight_ih: Param<Tensor<B, 2>>,
    /// Hidden-to-hidden weights `[H, H]`.
    pub weight_hh: Param<Tensor<B, 2>>,
    /// Input bias `[H]`.
    pub bias_ih: Param<Tensor<B, 1>>,
    /// Hidden bias `[H]`.
    pub bias_hh: Param<Tensor<B, 1>>,
    /// relu instead of tanh.
    pub relu: bool,
}

impl RnnConfig {
    /// Builds the cell with PyTorch's initialisation, `U(-1/√H, 1/√H)` everywhere, or the
    /// IRNN's when `identity_init` is set.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Rnn<B> {
        let (i, h) = (self.input_size, self.hidden_size);
        if self.identity_init {
            return Rnn {
                weight_ih: Param::from_tensor(Tensor::random(
                    [h, i],
                    burn::tensor::Distribution::Normal(0.0, 0.001),
                    device,
                )),
                weight_hh: Param::from_tensor(Tensor::eye(h, device)),
                bias_ih: Param::from_tensor(Tensor::zeros([h], device)),
                bias_hh: Param::from_tensor(Tensor::zeros([h], device)),
                relu: true,
            };
        }
        let bound = 1.0 / (h as f64).sqrt();
        Rnn {
            weight_ih: uniform_param([h, i], bound, device),
            weight_hh: uniform_param([h, h], bound, device),
            bias_ih: uniform_param([h], bound, device),
            bias_hh: uniform_param([h], bound, device),
            relu: self.relu,
        }
    }
}

impl CellConfig for RnnConfig {
    type Cell<B: Backend> = Rnn<B>;

    fn names() -> &'static [&'static str] {
        &["rnn", "rnn-relu", "irnn"]
    }
    fn from_name(name: &str, input_size: usize, hidden_size: usize) -> Option<Self> {
        let (relu, identity_init) = match name {
            "rnn" => (false, false),
            "rnn-relu" => (true, false),
            "irnn" => (true, true),
            _ => return None,
        };
        Some(
            Self::new(input_size, hidden_size)
                .with_relu(relu)
                .with_identity_init(identity_init),
        )
    }
    fn name(&self) -> &'static str {
        match (self.relu, self.identity_init) {
            (_, true) => "irnn",
            (true, false) => "rnn-relu",
            (false, false) => "rnn",
        }
    }
    fn input_size(&self) -> usize {
        self.input_size
    }
    fn hidden_size(&self) -> usize {
        self.hidden_size
    }
    fn at_position(&self, position: Position) -> Self {
        Self {
            input_size: position.input_size,
            ..self.clone()
        }
    }
    fn init_cell<B: Backend>(&self, device: &B::Device) -> Rnn<B> {
        self.init(device)
    }
}

/// The Elman step; biases are folded into the projection.
#[derive(Debug, Clone)]
pub struct RnnKernel {
    /// Width of the hidden state.
    pub hidden: usize,
    /// relu instead of tanh.
    pub relu: bool,
}

impl Recurrence for RnnKernel {
    fn input_width(&self) -> usize {
        self.hidden
    }
    fn state_width(&self) -> usize {
        self.hidden
    }
    fn output_width(&self) -> usize {
        self.hidden
    }
    fn saved_width(&self) -> usize {
        0
    }
    fn host_output_in_state(&self) -> bool {
        true
    }
    fn param_shapes(&self) -> Vec<[usize; 2]> {
        vec![[self.hidden, self.hidden]]
    }

    fn step<B: Backend>(
        &self,
        params: &[Tensor<B, 2>],
        xp: Tensor<B, 2>,
        state: Tensor<B, 2>,
    ) -> StepOutput<B> {
        let pre = xp + state.matmul(params[0].clone());
        let h = if self.relu {
            activation::relu(pre)
        } else {
            pre.tanh()
        };
        StepOutput {
            output: h.clone(),
            state: h,
            saved: None,
        }
    }

    fn step_backward<B: Backend>(
        &self,
        params: &[Tensor<B, 2>],
        step: StepRecord<B>,
        param_grads: &mut [Tensor<B, 2>],
    ) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let grad_h = step.grad_output + step.grad_state;
        let slope = if self.relu {
            step.state.greater_elem(0.0).float()
        } else {
            tanh_grad(step.state)
        };
        let grad_pre = grad_h * slope;
        accumulate(
            &mut param_grads[0],
            step.prev_state.transpose().matmul(grad_pre.clone()),
        );
        let grad_prev = grad_pre.clone().matmul(params[0].clone().transpose());
        (grad_pre, grad_prev)
    }

    fn host_step<F: HostFloat>(
        &self,
        params: &[MatRef<F>],
        xp: MatRef<F>,
        prev: MatRef<F>,
        mut out: MatMut<F>,
    ) {
        // Row layout: [h] (the output is the state).
        host::matmul(&mut out, prev, params[0], false);
        out.for_each_row(|b, h| {
            host::add_into(h, xp.row(b));
            if self.relu {
                h.iter_mut().for_each(|h| *h = h.max(F::zero()));
            } else {
                F::tanh_in_place(h);
            }
        });
    }

    fn host_step_backward<F: HostFloat>(
        &self,
        _params: &[MatRef<F>],
        step: HostStep<F>,
        mut grads: HostStepGrads<F>,
    ) {
        let hd = self.hidden;
        grads.xp.for_each_row(|b, grad_pre| {
            step.fetch_ahead(b);
            // The state's gradient holds the output's too.
            let (h, g) = (step.row.row(b), step.grad_state.row(b));
            for j in 0..hd {
                let slope = if self.relu {
                    if h[j] > F::zero() {
                        F::one()
                    } else {
                        F::zero()
                    }
                } else {
                    F::one() - h[j] * h[j]
                };
                grad_pre[j] = g[j] * slope;
            }
        });
        host::matmul(&mut grads.prev, grads.xp.as_ref(), step.params_t[0], false);
    }

    fn host_weight_products(&self) -> Vec<WeightProduct> {
        vec![WeightProduct {
            param: 0,
            col: 0,
            k: self.hidden,
            n: self.hidden,
            a: Operand::PrevState(0),
            g: Operand::GradInput(0),
        }]
    }
}

impl<B: Backend> Cell<B> for Rnn<B> {
    type Kernel = RnnKernel;

    fn input_size(&self) -> usize {
        self.weight_ih.dims()[1]
    }
    fn hidden_size(&self) -> usize {
        self.weight_hh.dims()[0]
    }
    fn state_names(&self) -> &'static [&'static str] {
        &["h"]
    }
    fn kernel(&self) -> RnnKernel {
        RnnKernel {
            hidden: self.hidden_size(),
            relu: self.relu,
        }
    }
    fn input_affine(&self) -> (Tensor<B, 2>, Option<Tensor<B, 1>>) {
        let bias = self.bias_ih.val() + self.bias_hh.val();
        (self.weight_ih.val(), Some(bias))
    }
    fn recurrent_params(&self) -> Tensor<B, 1> {
        flatten_params(vec![self.weight_hh.val().transpose()])
    }

    fn load_layer(
        cells: Vec<Self>,
        layer: usize,
        source: &mut dyn TensorSource,
    ) -> Result<Vec<Self>, ImportError> {
        load_torch_layer(cells, layer, source)
    }

    fn save_layer(cells: &[Self], layer: usize) -> Vec<(String, TensorData)> {
        save_torch_layer(cells, layer)
    }
}

super::torch_style!(Rnn);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::{compare_step, finite_differences, reference::*};
    use crate::layer::RnnLayerConfig;

    fn reference_step(
        w: &Weights,
        x: &[f64],
        state: &[Vec<f64>],
        relu: bool,
    ) -> (Vec<f64>, Vec<Vec<f64>>) {
        let pre = add(
            &add(&w.mat("weight_ih_l0").matvec(x), &w.vec("bias_ih_l0")),
            &add(
                &w.mat("weight_hh_l0").matvec(&state[0]),
                &w.vec("bias_hh_l0"),
            ),
        );
        let h: Vec<f64> = pre
            .iter()
            .map(|&a| if relu { a.max(0.0) } else { a.tanh() })
            .collect();
        (h.clone(), vec![h])
    }

    #[test]
    fn step_matches_f64_reference() {
        for relu in [false, true] {
            let config = RnnConfig::new(3, 4).with_relu(relu);
            let err = compare_step(config, 3, |w, x, s| reference_step(w, x, s, relu));
            assert!(err < 1e-12, "relu={relu}: {err:e}");
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        for relu in [false, true] {
            let config = RnnLayerConfig::new(RnnConfig::new(3, 4).with_relu(relu));
            finite_differences(&config, 2, 4, None);
        }
    }

    #[test]
    fn irnn_starts_from_the_identity_and_steps_as_the_relu_rnn() {
        let config = RnnConfig::from_name("irnn", 3, 4).unwrap();
        assert_eq!((config.name(), config.relu), ("irnn", true));
        let cell = config.init::<crate::check::F64>(&Default::default());
        let eye = Tensor::<crate::check::F64, 2>::eye(4, &Default::default());
        assert_eq!(cell.weight_hh.val().into_data(), eye.into_data());
        assert!(cell.bias_ih.val().abs().max().into_scalar() == 0.0);
        let spread = cell.weight_ih.val().abs().max().into_scalar();
        assert!(
            spread > 0.0 && spread < 0.01,
            "N(0, 0.001²) input weights: {spread}"
        );
        let err = compare_step(config, 3, |w, x, s| reference_step(w, x, s, true));
        assert!(err < 1e-12, "{err:e}");
    }
}
