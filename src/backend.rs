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

/// Makes glibc keep freed memory in the heap instead of handing large blocks back to the OS.
///
/// A training step allocates and frees buffers of tens of MB (the packed sequence, its
/// gradients); glibc serves blocks over 32 MB with `mmap`, so every step paid for fresh
/// zeroed pages (a page fault per 4 KB): measured 25-30% of an LSTM/GRU/SRU training step at
/// B=128, T=100, H=128. The binaries call this first; a library user may too. No effect off
/// glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only changes allocator parameters; it is called before any threads
    // are started by the binaries.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        // One arena: the recurrence allocates on rayon's threads and burn frees on the caller's.
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Makes a panic print one line, `error: <message> (<file>:<line>)`, instead of a backtrace
/// (still shown when `RUST_BACKTRACE` is set). The binaries call this first: a backend that
/// cannot start (a CUDA build without the driver library, a wgpu build without a Vulkan
/// driver) panics inside burn, and a user should read what is missing, not a trace.
pub fn report_panics_in_one_line() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::env::var_os("RUST_BACKTRACE").is_some() {
            return default(info);
        }
        let place = info
            .location()
            .map(|l| format!(" ({}:{})", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!("error: {}{place}", panic_message(info.payload()));
    }));
}

/// The text of a panic's payload (`"unreadable"` when it is not a string).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unreadable".into())
}
