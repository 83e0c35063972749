//! The SRU recurrence as one CubeCL kernel per pass (burn's GPU backends), and what the fused
//! kernels share (`cube_lstm` has the LSTM's).
//!
//! SRU's recurrence is elementwise: hidden unit `j` of batch row `b` only ever reads its own
//! columns. So one thread per `(b, j)` walks the whole sequence with its state in a register,
//! and a pass over any length is one launch with no synchronisation between threads. The
//! backward walks the sequence in the opposite order the same way; the parameter gradients,
//! sums over the batch, are left per thread and summed afterwards with a tensor op.
//!
//! Mask, direction and `use_tanh` are run-time arguments: one compiled kernel per pass and
//! float type, whatever the layer (shader compilation dominates start-up on a GPU).

use burn::tensor::{DType, Shape};
use burn_cubecl::{
    kernel::into_contiguous, ops::numeric::empty_device_contiguous_dtype, tensor::CubeTensor,
    CubeRuntime,
};
use cubecl::{calculate_cube_count_elemwise, prelude::*};

use crate::cell::sru::SruKernel;

/// Step index of the `i`-th step visited.
#[cube]
pub(super) fn visited_step(i: usize, len: usize, reverse: u32) -> usize {
    if reverse != 0 {
        len - 1 - i
    } else {
        i
    }
}

/// The mask value of `row` (`t·batch + b`): 1 when unmasked.
#[cube]
pub(super) fn keep_of<F: Float>(mask: &Tensor<F>, row: usize, masked: u32) -> F {
    let mut keep = F::new(1.0);
    if masked != 0 {
        keep = mask[row];
    }
    keep
}

/// `σ(x)` written as the plain path writes it, through `tanh`.
#[cube]
pub(super) fn sigmoid<F: Float>(x: F) -> F {
    ((x * F::new(0.5)).tanh() + F::new(1.0)) * F::new(0.5)
}

/// Forward: reads `xp` `[T, B, 4H]` (`U0 | U1 | U2 | x'`), `state0` `[B, H]`, `params` `[4H]`
/// (`v_f | v_r | b_f | b_r`) and, when `masked`, `mask` `[T, B]`; writes `packed`
/// `[T, B, 4H]` (`h | c | f | r`) and `visible` `[T, B, 2H]` (`h | c`).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn sru_forward_kernel<F: Float>(
    xp: &Tensor<F>,
    state0: &Tensor<F>,
    params: &Tensor<F>,
    mask: &Tensor<F>,
    packed: &mut Tensor<F>,
    visible: &mut Tensor<F>,
    num_steps: u32,
    batch_size: u32,
    hidden_size: u32,
    switches: u32,
    #[define(F)] _dtype: StorageType,
) {
    let len = num_steps as usize;
    let batch = batch_size as usize;
    let hidden = hidden_size as usize;
    let masked = switches & MASKED;
    let reverse = switches & REVERSE;
    let use_tanh = switches & USE_TANH;
    let unit = ABSOLUTE_POS;
    if unit >= batch * hidden {
        terminate!();
    }
    let b = unit / hidden;
    let j = unit % hidden;
    let v_f = params[j];
    let v_r = params[hidden + j];
    let b_f = params[2 * hidden + j];
    let b_r = params[3 * hidden + j];
    let mut c = state0[unit];
    for i in 0..len {
        let row = visited_step(i, len, reverse) * batch + b;
        let at = row * 4 * hidden + j;
        let u0 = xp[at];
        let skip = xp[at + 3 * hidden];
        let f = sigmoid::<F>(xp[at + hidden] + v_f * c + b_f);
        let r = sigmoid::<F>(xp[at + 2 * hidden] + v_r * c + b_r);
        let c_new = u0 + (c - u0) * f;
        let mut act = c_new;
        if use_tanh != 0 {
            act = c_new.tanh();
        }
        let h = skip + (act - skip) * r;
        // A masked step carries the state and outputs zero (the plain path's arithmetic).
        let keep = keep_of::<F>(mask, row, masked);
        let carried = c + (c_new - c) * keep;
        let out = h * keep;
        packed[at] = out;
        packed[at + hidden] = carried;
        packed[at + 2 * hidden] = f;
        packed[at + 3 * hidden] = r;
        let seen = row * 2 * hidden + j;
        visible[seen] = out;
        visible[seen + hidden] = carried;
        c = carried;
    }
}

/// Backward: reads the forward's inputs, its `packed` output and `grad` `[T, B, 2H]` (the
/// gradient of `visible`); writes `grad_xp` `[T, B, 4H]`, `grad_state0` `[B, H]` and
/// `grad_params` `[B, 4H]`, the parameter gradients of each batch row (summed by the caller).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn sru_backward_kernel<F: Float>(
    xp: &Tensor<F>,
    state0: &Tensor<F>,
    params: &Tensor<F>,
    mask: &Tensor<F>,
    packed: &Tensor<F>,
    grad: &Tensor<F>,
    grad_xp: &mut Tensor<F>,
    grad_state0: &mut Tensor<F>,
    grad_params: &mut Tensor<F>,
    num_steps: u32,
    batch_size: u32,
    hidden_size: u32,
    switches: u32,
    #[define(F)] _dtype: StorageType,
) {
    let len = num_steps as usize;
    let batch = batch_size as usize;
    let hidden = hidden_size as usize;
    let masked = switches & MASKED;
    let reverse = switches & REVERSE;
    let use_tanh = switches & USE_TANH;
    let unit = ABSOLUTE_POS;
    if unit >= batch * hidden {
        terminate!();
    }
    let b = unit / hidden;
    let j = unit % hidden;
    let v_f = params[j];
    let v_r = params[hidden + j];
    let one = F::new(1.0);

    let mut grad_v_f = F::new(0.0);
    let mut grad_v_r = F::new(0.0);
    let mut grad_b_f = F::new(0.0);
    let mut grad_b_r = F::new(0.0);
    // Gradient reaching the state after the current step from the steps visited later.
    let mut grad_state = F::new(0.0);
    for k in 0..len {
        let position = len - 1 - k;
        let row = visited_step(position, len, reverse) * batch + b;
        let mut c_prev = state0[unit];
        if position > 0 {
            let prev_row = visited_step(position - 1, len, reverse) * batch + b;
            c_prev = packed[prev_row * 4 * hidden + hidden + j];
        }
        let at = row * 4 * hidden + j;
        let seen = row * 2 * hidden + j;
        let keep = keep_of::<F>(mask, row, masked);
        let grad_new_state = grad_state + grad[seen + hidden];
        // A masked step passes the state's gradient straight through.
        let grad_carried = grad_new_state * (one - keep);
        let grad_h = grad[seen] * keep;
        let grad_step_state = grad_new_state * keep;

        let c_new = packed[at + hidden];
        let f = packed[at + 2 * hidden];
        let r = packed[at + 3 * hidden];
        let u0 = xp[at];
        let skip = xp[at + 3 * hidden];
        let mut act = c_new;
        let mut slope = one;
        if use_tanh != 0 {
            act = c_new.tanh();
            slope = one - act * act;
        }
        let dz_r = grad_h * (act - skip) * (r * (one - r));
        let grad_c = grad_step_state + grad_h * r * slope;
        let dz_f = grad_c * (c_prev - u0) * (f * (one - f));
        grad_xp[at] = grad_c * (one - f);
        grad_xp[at + hidden] = dz_f;
        grad_xp[at + 2 * hidden] = dz_r;
        grad_xp[at + 3 * hidden] = grad_h * (one - r);

        grad_v_f += dz_f * c_prev;
        grad_v_r += dz_r * c_prev;
        grad_b_f += dz_f;
        grad_b_r += dz_r;
        grad_state = grad_c * f + dz_f * v_f + dz_r * v_r + grad_carried;
    }
    grad_state0[unit] = grad_state;
    let param_row = b * 4 * hidden + j;
    grad_params[param_row] = grad_v_f;
    grad_params[param_row + hidden] = grad_v_r;
    grad_params[param_row + 2 * hidden] = grad_b_f;
    grad_params[param_row + 3 * hidden] = grad_b_r;
}

/// Bit of the kernels' `switches`: `mask` holds the `[T, B]` mask (else every step is real).
pub(super) const MASKED: u32 = 1;
/// Bit of the kernels' `switches`: walk the sequence from its end.
pub(super) const REVERSE: u32 = 2;
/// Bit of the kernels' `switches`: `h = r⊙tanh(c') + ..`.
const USE_TANH: u32 = 4;

/// The recurrence op's inputs as the fused kernels read them: contiguous, on one device.
pub struct CubeInput<R: CubeRuntime> {
    /// `[T, B, input width]`.
    pub xp: CubeTensor<R>,
    /// `[B, state width]`.
    pub state0: CubeTensor<R>,
    /// The flat recurrent parameters.
    pub params: CubeTensor<R>,
    /// `[T, B]`, or `None` when every step is real.
    pub mask: Option<CubeTensor<R>>,
    /// Walk the sequence from its end.
    pub reverse: bool,
}

impl<R: CubeRuntime> CubeInput<R> {
    pub(super) fn contiguous(self) -> Self {
        if let Some(mask) = &self.mask {
            // The kernels read the mask as the same float type as the input.
            assert_eq!(
                mask.dtype, self.xp.dtype,
                "mask and input float types differ"
            );
        }
        Self {
            xp: into_contiguous(self.xp),
            state0: into_contiguous(self.state0),
            params: into_contiguous(self.params),
            mask: self.mask.map(into_contiguous),
            reverse: self.reverse,
        }
    }

    pub(super) fn dims(&self) -> (usize, usize) {
        let dims = self.xp.meta.shape();
        (dims[0], dims[1])
    }

    /// The `MASKED` and `REVERSE` bits.
    pub(super) fn switches(&self) -> u32 {
        let bit = |on: bool, bit: u32| if on { bit } else { 0 };
        bit(self.mask.is_some(), MASKED) | bit(self.reverse, REVERSE)
    }

    /// A new contiguous tensor: the kernels index rows as `row · width`, while burn's default
    /// allocation may pad each row to an alignment (burn-cuda does: with H = 5 every result
    /// was wrong on an H100, while H = 4 and wgpu were right).
    pub(super) fn new_tensor(&self, dims: Vec<usize>) -> CubeTensor<R> {
        empty_device_contiguous_dtype(
            self.xp.client.clone(),
            self.xp.device.clone(),
            Shape::from(dims),
            self.xp.dtype,
        )
    }

    /// The mask, or a one-element stand-in that the kernel never reads.
    pub(super) fn mask_arg(&self) -> CubeTensor<R> {
        match &self.mask {
            Some(mask) => mask.clone(),
            None => self.new_tensor(vec![1]),
        }
    }

    fn launch_size(&self, kernel: &SruKernel) -> (CubeCount, CubeDim) {
        let (_, batch) = self.dims();
        let units = batch * kernel.hidden;
        let cube_dim = CubeDim::new(&self.xp.client, units);
        let count = calculate_cube_count_elemwise(&self.xp.client, units, cube_dim);
        (count, cube_dim)
    }

    pub(super) fn dtype(&self) -> DType {
        self.xp.dtype
    }
}

fn sru_switches<R: CubeRuntime>(input: &CubeInput<R>, kernel: &SruKernel) -> u32 {
    input.switches() | if kernel.use_tanh { USE_TANH } else { 0 }
}

/// Runs the forward kernel: the full packed sequence `[T, B, 4H]` and the op's output
/// `[T, B, 2H]`.
pub fn sru_forward<R: CubeRuntime>(
    kernel: &SruKernel,
    input: CubeInput<R>,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let input = input.contiguous();
    let (len, batch) = input.dims();
    let hd = kernel.hidden;
    let packed = input.new_tensor(vec![len, batch, 4 * hd]);
    let visible = input.new_tensor(vec![len, batch, 2 * hd]);
    let (count, cube_dim) = input.launch_size(kernel);
    sru_forward_kernel::launch::<R>(
        &input.xp.client,
        count,
        cube_dim,
        input.xp.clone().into_tensor_arg(),
        input.state0.clone().into_tensor_arg(),
        input.params.clone().into_tensor_arg(),
        input.mask_arg().into_tensor_arg(),
        packed.clone().into_tensor_arg(),
        visible.clone().into_tensor_arg(),
        len as u32,
        batch as u32,
        hd as u32,
        sru_switches(&input, kernel),
        input.dtype().into(),
    );
    (packed, visible)
}

/// The backward kernel's outputs; `params` is per batch row, `[B, 4H]`.
pub struct SruGrads<R: CubeRuntime> {
    /// `[T, B, 4H]`.
    pub xp: CubeTensor<R>,
    /// `[B, H]`.
    pub state0: CubeTensor<R>,
    /// `[B, 4H]`: sum over the rows for the parameters' gradient.
    pub params_per_row: CubeTensor<R>,
}

/// Runs the backward kernel from the forward's inputs, its packed sequence and the gradient of
/// its output.
pub fn sru_backward<R: CubeRuntime>(
    kernel: &SruKernel,
    input: CubeInput<R>,
    packed: CubeTensor<R>,
    grad: CubeTensor<R>,
) -> SruGrads<R> {
    let input = input.contiguous();
    let (packed, grad) = (into_contiguous(packed), into_contiguous(grad));
    let (len, batch) = input.dims();
    let hd = kernel.hidden;
    let grads = SruGrads {
        xp: input.new_tensor(vec![len, batch, 4 * hd]),
        state0: input.new_tensor(vec![batch, hd]),
        params_per_row: input.new_tensor(vec![batch, 4 * hd]),
    };
    let (count, cube_dim) = input.launch_size(kernel);
    sru_backward_kernel::launch::<R>(
        &input.xp.client,
        count,
        cube_dim,
        input.xp.clone().into_tensor_arg(),
        input.state0.clone().into_tensor_arg(),
        input.params.clone().into_tensor_arg(),
        input.mask_arg().into_tensor_arg(),
        packed.into_tensor_arg(),
        grad.into_tensor_arg(),
        grads.xp.clone().into_tensor_arg(),
        grads.state0.clone().into_tensor_arg(),
        grads.params_per_row.clone().into_tensor_arg(),
        len as u32,
        batch as u32,
        hd as u32,
        sru_switches(&input, kernel),
        input.dtype().into(),
    );
    grads
}
