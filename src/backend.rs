//! The one place that maps cargo features to a backend: `cuda` > `wgpu` > `ndarray`.

use burn::backend::Autodiff;

/// The backend chosen at compile time (inference).
#[cfg(feature = "cuda")]
pub type DefaultBackend = burn::backend::Cuda;
/// The backend chosen at compile time (inference).
#[cfg(all(feature = "wgpu", not(feature = "cuda")))]
pub type DefaultBackend = burn::backend::Wgpu;
/// The backend chosen at compile time (inference).
#[cfg(all(feature = "ndarray", not(any(feature = "wgpu", feature = "cuda"))))]
pub type DefaultBackend = burn::backend::NdArray;

/// The training backend: [`DefaultBackend`] with autodiff.
pub type TrainBackend = Autodiff<DefaultBackend>;

/// The name of the compiled-in backend.
pub fn backend_name() -> &'static str {
    if cfg!(feature = "cuda") {
        "cuda"
    } else if cfg!(feature = "wgpu") {
        "wgpu"
    } else {
        "ndarray"
    }
}

/// The default device of the compiled-in backend.
pub fn default_device() -> burn::tensor::Device<DefaultBackend> {
    Default::default()
}

/// "backend on device", for the binaries to print.
pub fn describe() -> String {
    format!("{} on {:?}", backend_name(), default_device())
}

#[cfg(not(any(feature = "ndarray", feature = "wgpu", feature = "cuda")))]
compile_error!("enable one backend feature: ndarray (default), wgpu or cuda");
