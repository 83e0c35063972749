//! The GRU recurrence (`torch.nn.GRU`'s cell: the reset gate applied after the recurrent
//! matmul, recurrent bias `b_hh`) as one CubeCL kernel per pass on burn's GPU backends.
//!
//! Its threads are laid out as the LSTM's ([`cube_lstm`](super::cube_lstm)): one cube per
//! batch row, `split` groups of one thread per hidden unit, each group summing its share of
//! the step's dot products into shared memory, the first group applying the elementwise step
//! with the state in a register: two synchronisations per step. The kernel's backward gives
//! the gradients of the projected input and of the recurrent pre-activations
//! (`[dr, dz, r ⊙ dn]`, which differ in their last block); the weight and bias gradients, sums
//! over all steps and rows, are one chunked matmul afterwards.

use burn_cubecl::{kernel::into_contiguous, tensor::CubeTensor, CubeRuntime};
use cubecl::prelude::*;

use super::cube::{keep_of, sigmoid, visited_step, CubeInput, MASKED, REVERSE};
use super::cube_lstm::{launch_size, share_of, split_of};

/// Forward: reads `xp` `[T, B, 3H]` (r, z, n), `state0` `[B, H]`, `params` (`W_hhᵀ`
/// `[H, 3H]` then `b_hh` `[3H]`, flat) and the mask; writes `packed` `[T, B, 6H]`
/// (`h out | h | r | z | n | W_hn h + b_hn`) and `visible` `[T, B, 2H]` (`h out | h`).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn gru_forward_kernel<F: Float>(
    xp: &Tensor<F>,
    state0: &Tensor<F>,
    params: &Tensor<F>,
    mask: &Tensor<F>,
    packed: &mut Tensor<F>,
    visible: &mut Tensor<F>,
    num_steps: u32,
    batch_size: u32,
    switches: u32,
    #[comptime] hidden: usize,
    #[comptime] split: usize,
    #[define(F)] _dtype: StorageType,
) {
    let len = num_steps as usize;
    let batch = batch_size as usize;
    let masked = switches & MASKED;
    let reverse = switches & REVERSE;
    let gates = 3 * hidden;
    let bias_at = hidden * gates;
    let b = CUBE_POS;
    let j = UNIT_POS_X as usize;
    let group = UNIT_POS_Y as usize;
    let (k_start, k_end) = share_of(group, hidden, split);
    let mut h_shared = SharedMemory::<F>::new(hidden);
    // Each group's share of the three recurrent pre-activations: `[split, 3H]`.
    let mut shares = SharedMemory::<F>::new(split * gates);
    let mut h = F::new(0.0);
    if group == 0 {
        h = state0[b * hidden + j];
        h_shared[j] = h;
    }
    sync_cube();
    for i in 0..len {
        let row = visited_step(i, len, reverse) * batch + b;
        let mut a_r = F::new(0.0);
        let mut a_z = F::new(0.0);
        let mut a_n = F::new(0.0);
        for k in k_start..k_end {
            let h_k = h_shared[k];
            let w = k * gates + j;
            a_r += h_k * params[w];
            a_z += h_k * params[w + hidden];
            a_n += h_k * params[w + 2 * hidden];
        }
        let s = group * gates + j;
        shares[s] = a_r;
        shares[s + hidden] = a_z;
        shares[s + 2 * hidden] = a_n;
        // Every share is written, and every group has read the old h.
        sync_cube();
        if group == 0 {
            let mut hz_r = params[bias_at + j];
            let mut hz_z = params[bias_at + hidden + j];
            let mut hz_n = params[bias_at + 2 * hidden + j];
            #[unroll]
            for q in 0..split {
                let s = q * gates + j;
                hz_r += shares[s];
                hz_z += shares[s + hidden];
                hz_n += shares[s + 2 * hidden];
            }
            let at = row * gates + j;
            let gate_r = sigmoid::<F>(xp[at] + hz_r);
            let gate_z = sigmoid::<F>(xp[at + hidden] + hz_z);
            let gate_n = (xp[at + 2 * hidden] + gate_r * hz_n).tanh();
            let h_new = gate_n + (h - gate_n) * gate_z;
            // A masked step carries the state and outputs zero (the plain path's arithmetic).
            let keep = keep_of::<F>(mask, row, masked);
            let out = h_new * keep;
            h += (h_new - h) * keep;
            let p = row * 6 * hidden + j;
            packed[p] = out;
            packed[p + hidden] = h;
            packed[p + 2 * hidden] = gate_r;
            packed[p + 3 * hidden] = gate_z;
            packed[p + 4 * hidden] = gate_n;
            packed[p + 5 * hidden] = hz_n;
            let v = row * 2 * hidden + j;
            visible[v] = out;
            visible[v + hidden] = h;
            h_shared[j] = h;
        }
        // The new h is published, and every share is read before the next step's are written.
        sync_cube();
    }
}

/// Backward: reads `state0`, `weight` = `W_hh` `[3H, H]`, the mask, the forward's `packed` and
/// `grad` `[T, B, 2H]` (the gradient of `visible`); writes `grad_xp` `[T, B, 3H]` (`dr, dz,
/// dn`), `grad_hz` `[T, B, 3H]` (the recurrent pre-activations' `dr, dz, r ⊙ dn`) and
/// `grad_state0` `[B, H]`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn gru_backward_kernel<F: Float>(
    state0: &Tensor<F>,
    weight: &Tensor<F>,
    mask: &Tensor<F>,
    packed: &Tensor<F>,
    grad: &Tensor<F>,
    grad_xp: &mut Tensor<F>,
    grad_hz: &mut Tensor<F>,
    grad_state0: &mut Tensor<F>,
    num_steps: u32,
    batch_size: u32,
    switches: u32,
    #[comptime] hidden: usize,
    #[comptime] split: usize,
    #[define(F)] _dtype: StorageType,
) {
    let len = num_steps as usize;
    let batch = batch_size as usize;
    let masked = switches & MASKED;
    let reverse = switches & REVERSE;
    let gates = 3 * hidden;
    let b = CUBE_POS;
    let j = UNIT_POS_X as usize;
    let group = UNIT_POS_Y as usize;
    let (r_start, r_end) = share_of(group, gates, split);
    let one = F::new(1.0);
    let mut dz_shared = SharedMemory::<F>::new(gates);
    // Each group's share of `d_hz · W_hh`: `[split, H]`.
    let mut shares = SharedMemory::<F>::new(split * hidden);
    // The gradient reaching the state after the current step from the steps visited later,
    // and this step's part of the previous state's gradient that bypasses `W_hh`.
    let mut grad_h = F::new(0.0);
    let mut direct = F::new(0.0);
    for k in 0..len {
        let position = len - 1 - k;
        let row = visited_step(position, len, reverse) * batch + b;
        if group == 0 {
            let mut h_prev = state0[b * hidden + j];
            if position > 0 {
                let prev_row = visited_step(position - 1, len, reverse) * batch + b;
                h_prev = packed[prev_row * 6 * hidden + hidden + j];
            }
            let keep = keep_of::<F>(mask, row, masked);
            let g = row * 2 * hidden + j;
            let grad_new_h = grad_h + grad[g + hidden];
            // A masked step passes the state's gradient straight through; its own is zero.
            let dh = (grad[g] + grad_new_h) * keep;
            let p = row * 6 * hidden + j;
            let gate_r = packed[p + 2 * hidden];
            let gate_z = packed[p + 3 * hidden];
            let gate_n = packed[p + 4 * hidden];
            let hz_n = packed[p + 5 * hidden];
            let dn = dh * (one - gate_z) * (one - gate_n * gate_n);
            let dz = dh * (h_prev - gate_n) * gate_z * (one - gate_z);
            let dr = dn * hz_n * gate_r * (one - gate_r);
            let d_hn = dn * gate_r;
            let x = row * gates + j;
            grad_xp[x] = dr;
            grad_xp[x + hidden] = dz;
            grad_xp[x + 2 * hidden] = dn;
            grad_hz[x] = dr;
            grad_hz[x + hidden] = dz;
            grad_hz[x + 2 * hidden] = d_hn;
            dz_shared[j] = dr;
            dz_shared[hidden + j] = dz;
            dz_shared[2 * hidden + j] = d_hn;
            direct = dh * gate_z + grad_new_h * (one - keep);
        }
        // This step's recurrent pre-activation gradients are published.
        sync_cube();
        let mut share = F::new(0.0);
        for r in r_start..r_end {
            share += dz_shared[r] * weight[r * hidden + j];
        }
        shares[group * hidden + j] = share;
        // Every share is written, and every group has read this step's gradients.
        sync_cube();
        if group == 0 {
            let mut through_w = F::new(0.0);
            #[unroll]
            for q in 0..split {
                through_w += shares[q * hidden + j];
            }
            grad_h = through_w + direct;
        }
    }
    if group == 0 {
        grad_state0[b * hidden + j] = grad_h;
    }
}

/// Runs the forward kernel: the full packed sequence `[T, B, 6H]` and the op's output
/// `[T, B, 2H]`. `input.params` is `W_hhᵀ` then `b_hh`, flat (`[H · 3H + 3H]`).
pub fn gru_forward<R: CubeRuntime>(
    hidden: usize,
    input: CubeInput<R>,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let input = input.contiguous();
    let (len, batch) = input.dims();
    let packed = input.new_tensor(vec![len, batch, 6 * hidden]);
    let visible = input.new_tensor(vec![len, batch, 2 * hidden]);
    let split = split_of(&input.xp, hidden);
    let (count, cube_dim) = launch_size(batch, hidden, split);
    gru_forward_kernel::launch::<R>(
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
        input.switches(),
        hidden,
        split,
        input.dtype().into(),
    );
    (packed, visible)
}

/// What the backward kernel gives: the gradients of the projected input and of the initial
/// state, and the recurrent pre-activations' gradient, from which the caller sums the weight
/// and bias gradients.
pub struct GruGrads<R: CubeRuntime> {
    /// `[T, B, 3H]`.
    pub xp: CubeTensor<R>,
    /// `[T, B, 3H]`.
    pub hz: CubeTensor<R>,
    /// `[B, H]`.
    pub state0: CubeTensor<R>,
}

/// Runs the backward kernel. `weight` is `W_hh` `[3H, H]`.
pub fn gru_backward<R: CubeRuntime>(
    hidden: usize,
    input: CubeInput<R>,
    weight: CubeTensor<R>,
    packed: CubeTensor<R>,
    grad: CubeTensor<R>,
) -> GruGrads<R> {
    let input = input.contiguous();
    let (weight, packed, grad) = (
        into_contiguous(weight),
        into_contiguous(packed),
        into_contiguous(grad),
    );
    let (len, batch) = input.dims();
    let grad_xp = input.new_tensor(vec![len, batch, 3 * hidden]);
    let grad_hz = input.new_tensor(vec![len, batch, 3 * hidden]);
    let grad_state0 = input.new_tensor(vec![batch, hidden]);
    let split = split_of(&input.xp, hidden);
    let (count, cube_dim) = launch_size(batch, hidden, split);
    gru_backward_kernel::launch::<R>(
        &input.xp.client,
        count,
        cube_dim,
        input.state0.clone().into_tensor_arg(),
        weight.into_tensor_arg(),
        input.mask_arg().into_tensor_arg(),
        packed.into_tensor_arg(),
        grad.into_tensor_arg(),
        grad_xp.clone().into_tensor_arg(),
        grad_hz.clone().into_tensor_arg(),
        grad_state0.clone().into_tensor_arg(),
        len as u32,
        batch as u32,
        input.switches(),
        hidden,
        split,
        input.dtype().into(),
    );
    GruGrads {
        xp: grad_xp,
        hz: grad_hz,
        state0: grad_state0,
    }
}
