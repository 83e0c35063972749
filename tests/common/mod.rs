//! Helpers shared by the integration tests.
#![allow(dead_code)]

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{backend::AutodiffBackend, Tensor, TensorData};

/// Replaces every float parameter of a module by its gradient (zeros where it has none), so the
/// module's own naming (e.g. `state_dict`) names the gradients too.
pub struct GradientsAsParams<'a, B: AutodiffBackend> {
    pub grads: &'a B::Gradients,
}

impl<B: AutodiffBackend> ModuleMapper<B> for GradientsAsParams<'_, B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let grad = tensor
            .grad(self.grads)
            .map(Tensor::from_inner)
            .unwrap_or_else(|| tensor.zeros_like());
        Param::from_mapped_value(id, grad, mapper)
    }
}

/// The module with each parameter replaced by its gradient.
pub fn gradients_of<B: AutodiffBackend, M: Module<B>>(module: M, grads: &B::Gradients) -> M {
    module.map(&mut GradientsAsParams::<B> { grads })
}

/// Largest absolute difference between two tensors' values; panics on a shape mismatch.
pub fn max_abs_diff(what: &str, actual: &TensorData, expected: &TensorData) -> f64 {
    assert_eq!(
        actual.shape, expected.shape,
        "{what}: shape {:?} differs from the expected {:?}",
        actual.shape, expected.shape
    );
    let a = actual.clone().convert::<f64>().to_vec::<f64>().unwrap();
    let e = expected.clone().convert::<f64>().to_vec::<f64>().unwrap();
    a.iter()
        .zip(&e)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}
