//! The model a run trains (a recurrent layer and a linear head on every step), its optimiser,
//! global-norm gradient clipping and chrono initialisation.

use burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
use burn::nn::{Linear, LinearConfig};
use burn::optim::{
    adaptor::OptimizerAdaptor, Adam, AdamConfig, GradientsParams, Optimizer, RmsProp, RmsPropConfig,
};
use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::{backend::AutodiffBackend, backend::Backend, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};

use super::config::OptimizerKind;
use crate::cell::{AnyCell, AnyCellConfig};
use crate::import::StateDict;
use crate::layer::{linear_per_step, RnnLayer, RnnLayerConfig};
use crate::ops::RnnBackend;

/// A recurrent layer and a linear head applied to every step's output.
#[derive(Module, Debug)]
pub struct SequenceModel<B: Backend> {
    /// The recurrent layer.
    pub rnn: RnnLayer<B, AnyCell<B>>,
    /// The per-step head.
    pub head: Linear<B>,
}

impl<B: Backend> SequenceModel<B> {
    /// A model of `cell` layers with `outputs` outputs per step.
    pub fn new(config: &RnnLayerConfig<AnyCellConfig>, outputs: usize, device: &B::Device) -> Self {
        let hidden = config.num_directions() * crate::cell::CellConfig::hidden_size(&config.cell);
        Self {
            rnn: config.init(device),
            head: LinearConfig::new(hidden, outputs).init(device),
        }
    }
}

impl<B: RnnBackend> SequenceModel<B> {
    /// `[batch, T, input]` to `[batch, T, outputs]`.
    pub fn forward(&self, input: Tensor<B, 3>) -> Tensor<B, 3> {
        let (output, _) = self.rnn.forward(input, None);
        linear_per_step(&self.head, output)
    }
}

/// Adam or RMSprop behind one type.
pub enum AnyOptimizer<B: AutodiffBackend> {
    /// Adam.
    Adam(OptimizerAdaptor<Adam, SequenceModel<B>, B>),
    /// RMSprop.
    RmsProp(OptimizerAdaptor<RmsProp, SequenceModel<B>, B>),
}

impl<B: AutodiffBackend> AnyOptimizer<B>
where
    SequenceModel<B>: AutodiffModule<B>,
{
    /// The optimiser with PyTorch's defaults.
    pub fn new(kind: OptimizerKind) -> Self {
        match kind {
            OptimizerKind::Adam => Self::Adam(AdamConfig::new().with_epsilon(1e-8).init()),
            OptimizerKind::Rmsprop => Self::RmsProp(
                RmsPropConfig::new()
                    .with_alpha(0.99)
                    .with_momentum(0.0)
                    .with_epsilon(1e-8)
                    .init(),
            ),
        }
    }

    /// One update.
    pub fn step(
        &mut self,
        lr: f64,
        model: SequenceModel<B>,
        grads: GradientsParams,
    ) -> SequenceModel<B> {
        match self {
            Self::Adam(o) => o.step(lr, model, grads),
            Self::RmsProp(o) => o.step(lr, model, grads),
        }
    }

    /// The optimiser state in full precision.
    pub fn to_bytes(&self) -> Result<Vec<u8>, String> {
        let recorder = BinBytesRecorder::<FullPrecisionSettings>::default();
        match self {
            Self::Adam(o) => Recorder::<B>::record(&recorder, o.to_record(), ()),
            Self::RmsProp(o) => Recorder::<B>::record(&recorder, o.to_record(), ()),
        }
        .map_err(|e| e.to_string())
    }

    /// Restores the state written by [`to_bytes`](AnyOptimizer::to_bytes).
    pub fn load_bytes(self, bytes: Vec<u8>, device: &B::Device) -> Result<Self, String> {
        let recorder = BinBytesRecorder::<FullPrecisionSettings>::default();
        Ok(match self {
            Self::Adam(o) => {
                Self::Adam(o.load_record(recorder.load(bytes, device).map_err(|e| e.to_string())?))
            }
            Self::RmsProp(o) => Self::RmsProp(
                o.load_record(recorder.load(bytes, device).map_err(|e| e.to_string())?),
            ),
        })
    }
}

struct SquaredNorm<'a> {
    grads: &'a GradientsParams,
    total: f64,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for SquaredNorm<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
            // Summed on the host in a fixed order so that a resumed run repeats exactly.
            let values = g.into_data().convert::<f64>();
            self.total += values.iter::<f64>().map(|v| v * v).sum::<f64>();
        }
    }
}

struct Scale<'a> {
    grads: &'a mut GradientsParams,
    factor: f64,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Scale<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) {
            self.grads
                .register::<B::InnerBackend, D>(param.id, g * self.factor);
        }
    }
}

/// Scales all gradients together so that their global L2 norm is at most `max_norm`, as
/// PyTorch's `clip_grad_norm_` (burn's own clipping works per parameter). Returns the norm
/// before clipping.
pub fn clip_global_norm<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: &mut GradientsParams,
    max_norm: f64,
) -> f64 {
    let mut norm = SquaredNorm { grads, total: 0.0 };
    model.visit(&mut norm);
    let total = norm.total.sqrt();
    if max_norm > 0.0 && total > max_norm {
        let factor = max_norm / (total + 1e-6);
        model.visit(&mut Scale { grads, factor });
    }
    total
}

/// Chrono initialisation (Tallec & Ollivier 2018) for a model whose longest dependency is
/// `t_max` steps: the forget-like gate's bias ~ `log U[1, t_max − 1]`, and an LSTM's input
/// gate bias its negative. Applies to `lstm`, `peephole-lstm`, `cifg-lstm` (the input gate
/// carries `f = 1 − i`), `gru`, `gru-cho` (the update gate z) and `sru` (the forget gate);
/// other cells are an error.
pub fn chrono_init<B: Backend>(
    model: SequenceModel<B>,
    cell: &str,
    t_max: usize,
    seed: u64,
) -> Result<SequenceModel<B>, String> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0xC4_0A0);
    let upper = (t_max.max(3) - 1) as f64;
    let mut draw = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| rng.random_range(1.0..upper).ln() as f32)
            .collect()
    };
    let mut dict = model.rnn.state_dict();
    let hidden = model.rnn.hidden_size();
    for (name, data) in dict.iter_mut() {
        let mut values = data.clone().convert::<f32>().to_vec::<f32>().expect("f32");
        let is_ih = name.starts_with("bias_ih");
        let is_hh = name.starts_with("bias_hh");
        // (slice start, sign) of the gates chrono sets, in the bias layout of each family.
        let targets: Vec<(usize, f32)> = match cell {
            "lstm" | "peephole-lstm" if is_ih || is_hh => vec![(hidden, 1.0), (0, -1.0)],
            "ln-lstm" if name.starts_with("bias_l") => vec![(hidden, 1.0), (0, -1.0)],
            // CIFG's input gate and MGU's forget gate both weigh the new value against the old.
            "cifg-lstm" | "mgu" if is_ih || is_hh => vec![(0, -1.0)],
            "gru" | "gru-cho" if is_ih || is_hh => vec![(hidden, 1.0)],
            "sru" if name.ends_with(".bias") => vec![(0, 1.0)],
            "rnn" | "rnn-relu" | "irnn" | "indrnn" => {
                return Err(format!("--init chrono needs a gated cell, not {cell}"))
            }
            _ => vec![],
        };
        if targets.is_empty() {
            continue;
        }
        let chrono = draw(hidden);
        if cell == "sru" {
            // Official layout: every direction's forget biases, then every direction's reset ones.
            let forget = values.len() / 2;
            for (j, v) in values[..forget].iter_mut().enumerate() {
                *v = chrono[j % hidden];
            }
        } else {
            for (start, sign) in targets {
                for j in 0..hidden {
                    // bias_hh's slice is zeroed so that the two biases add up to chrono's value.
                    values[start + j] = if is_hh { 0.0 } else { sign * chrono[j] };
                }
            }
        }
        *data = burn::tensor::TensorData::new(values, data.shape.clone());
    }
    let rnn = model
        .rnn
        .load_state_dict(&mut StateDict::from_tensors(dict))
        .map_err(|e| e.to_string())?;
    Ok(SequenceModel { rnn, ..model })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::{values, F64};

    fn bias(model: &SequenceModel<F64>, name: &str) -> Vec<f64> {
        let dict = model.rnn.state_dict();
        values(&dict.iter().find(|(n, _)| n == name).expect("bias").1)
    }

    #[test]
    fn chrono_sets_forget_and_input_biases() {
        let device = Default::default();
        let config = RnnLayerConfig::new(AnyCellConfig::named("lstm", 3, 4).unwrap());
        let model = chrono_init(
            SequenceModel::<F64>::new(&config, 2, &device),
            "lstm",
            100,
            0,
        )
        .unwrap();
        let (b_ih, b_hh) = (bias(&model, "bias_ih_l0"), bias(&model, "bias_hh_l0"));
        for j in 0..4 {
            let forget = b_ih[4 + j];
            assert!((0.0..=(99f64).ln()).contains(&forget), "{forget}");
            assert!(
                (b_ih[j] + forget).abs() < 1e-6,
                "input bias is minus the forget bias"
            );
            assert_eq!((b_hh[j], b_hh[4 + j]), (0.0, 0.0));
        }
        let rnn = RnnLayerConfig::new(AnyCellConfig::named("rnn", 3, 4).unwrap());
        assert!(chrono_init(SequenceModel::<F64>::new(&rnn, 2, &device), "rnn", 100, 0).is_err());
    }

    #[test]
    fn global_norm_clipping_scales_all_gradients_together() {
        type B = burn::backend::Autodiff<F64>;
        let device = Default::default();
        let config = RnnLayerConfig::new(AnyCellConfig::named("gru", 3, 4).unwrap());
        let model = SequenceModel::<B>::new(&config, 2, &device);
        let x = Tensor::<B, 3>::ones([2, 5, 3], &device);
        let loss = (model.forward(x) * 100.0).sum();
        let mut grads = GradientsParams::from_grads(loss.backward(), &model);
        let before = clip_global_norm(&model, &mut grads, 1.0);
        assert!(before > 1.0);
        let after = clip_global_norm(&model, &mut grads, 0.0);
        assert!((after - 1.0).abs() < 1e-5, "norm after clipping: {after}");
    }
}
