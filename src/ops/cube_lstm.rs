//! The LSTM recurrence (`torch.nn.LSTM`'s cell, no peepholes, separate gates) as one CubeCL
//! kernel per pass on burn's GPU backends.
//!
//! Unlike SRU's, an LSTM step needs the whole previous `h` of its batch row (`h · W_hhᵀ`), so
//! the threads of a row must meet at every step. One cube per batch row; `split` groups of one
//! thread per hidden unit. Each group computes its share of the step's dot products (a slice of
//! `k` in the forward, of the gate rows in the backward) into shared memory, and the first
//! group sums the shares, applies the cell's elementwise step with the state in registers and
//! publishes the new `h` (or `dz`) in shared memory: two synchronisations per step. The
//! recurrent weight, read from L2 at every step, is the bound: splitting each dot product over
//! `split` times more warps keeps `split` times more of those reads in flight (one warp per 32
//! units, unsplit, waited on each read in turn: 2.7x slower at hidden 128 on an H100). The
//! weight gradient, a sum over all steps and rows, is one chunked matmul afterwards
//! ([`linear::tensor_grad_params`](super::linear::tensor_grad_params)). Hidden sizes up to the
//! device's threads per cube (1024 on NVIDIA GPUs) run here; larger ones take the plain path.

use burn_cubecl::{kernel::into_contiguous, tensor::CubeTensor, CubeRuntime};
use cubecl::prelude::*;

use super::cube::{keep_of, sigmoid, visited_step, CubeInput, MASKED, REVERSE};

/// The most thread groups a step's dot products are split over. On an H100 at hidden 128
/// (batch 128, 100 steps) a training step took 6.75 ms unsplit, 3.2 ms split 4 ways and 2.5 ms
/// split 8 ways (1024 threads, a cube's most).
const MAX_SPLIT: usize = 8;

/// The `[start, end)` slice of `0..len` that group `group` of `split` sums over.
#[cube]
pub(super) fn share_of(
    group: usize,
    #[comptime] len: usize,
    #[comptime] split: usize,
) -> (usize, usize) {
    let chunk = comptime!(len.div_ceil(split));
    let start = group * chunk;
    let mut end = start + chunk;
    if end > len {
        end = len;
    }
    (start, end)
}

/// Forward: reads `xp` `[T, B, 4H]` (gates i, f, g, o), `state0` `[B, 2H]` (`h | c`),
/// `weight_t` = `W_hhᵀ` `[H, 4H]` and the mask; writes `packed` `[T, B, 7H]`
/// (`h out | h | c | i, f, g, o`) and `visible` `[T, B, 3H]` (`h out | h | c`).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn lstm_forward_kernel<F: Float>(
    xp: &Tensor<F>,
    state0: &Tensor<F>,
    weight_t: &Tensor<F>,
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
    let gates = 4 * hidden;
    let b = CUBE_POS;
    let j = UNIT_POS_X as usize;
    let group = UNIT_POS_Y as usize;
    let (k_start, k_end) = share_of(group, hidden, split);
    let mut h_shared = SharedMemory::<F>::new(hidden);
    // Each group's share of the four pre-activations: `[split, 4H]`.
    let mut shares = SharedMemory::<F>::new(split * gates);
    let mut h = F::new(0.0);
    let mut c = F::new(0.0);
    if group == 0 {
        h = state0[b * 2 * hidden + j];
        c = state0[b * 2 * hidden + hidden + j];
        h_shared[j] = h;
    }
    sync_cube();
    for i in 0..len {
        let row = visited_step(i, len, reverse) * batch + b;
        let mut z_i = F::new(0.0);
        let mut z_f = F::new(0.0);
        let mut z_g = F::new(0.0);
        let mut z_o = F::new(0.0);
        for k in k_start..k_end {
            let h_k = h_shared[k];
            let w = k * gates + j;
            z_i += h_k * weight_t[w];
            z_f += h_k * weight_t[w + hidden];
            z_g += h_k * weight_t[w + 2 * hidden];
            z_o += h_k * weight_t[w + 3 * hidden];
        }
        let s = group * gates + j;
        shares[s] = z_i;
        shares[s + hidden] = z_f;
        shares[s + 2 * hidden] = z_g;
        shares[s + 3 * hidden] = z_o;
        // Every share is written, and every group has read the old h.
        sync_cube();
        if group == 0 {
            let at = row * gates + j;
            let mut z_i = xp[at];
            let mut z_f = xp[at + hidden];
            let mut z_g = xp[at + 2 * hidden];
            let mut z_o = xp[at + 3 * hidden];
            #[unroll]
            for q in 0..split {
                let s = q * gates + j;
                z_i += shares[s];
                z_f += shares[s + hidden];
                z_g += shares[s + 2 * hidden];
                z_o += shares[s + 3 * hidden];
            }
            let gate_i = sigmoid::<F>(z_i);
            let gate_f = sigmoid::<F>(z_f);
            let gate_g = z_g.tanh();
            let gate_o = sigmoid::<F>(z_o);
            let c_new = gate_f * c + gate_i * gate_g;
            let h_new = gate_o * c_new.tanh();
            // A masked step carries the state and outputs zero (the plain path's arithmetic).
            let keep = keep_of::<F>(mask, row, masked);
            let out = h_new * keep;
            h += (h_new - h) * keep;
            c += (c_new - c) * keep;
            let p = row * 7 * hidden + j;
            packed[p] = out;
            packed[p + hidden] = h;
            packed[p + 2 * hidden] = c;
            packed[p + 3 * hidden] = gate_i;
            packed[p + 4 * hidden] = gate_f;
            packed[p + 5 * hidden] = gate_g;
            packed[p + 6 * hidden] = gate_o;
            let v = row * 3 * hidden + j;
            visible[v] = out;
            visible[v + hidden] = h;
            visible[v + 2 * hidden] = c;
            h_shared[j] = h;
        }
        // The new h is published, and every share is read before the next step's are written.
        sync_cube();
    }
}

/// Backward: reads `state0`, `weight` = `W_hh` `[4H, H]`, the mask, the forward's `packed` and
/// `grad` `[T, B, 3H]` (the gradient of `visible`); writes `grad_xp` `[T, B, 4H]` (the gate
/// pre-activations' gradients, `dz`) and `grad_state0` `[B, 2H]`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn lstm_backward_kernel<F: Float>(
    state0: &Tensor<F>,
    weight: &Tensor<F>,
    mask: &Tensor<F>,
    packed: &Tensor<F>,
    grad: &Tensor<F>,
    grad_xp: &mut Tensor<F>,
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
    let gates = 4 * hidden;
    let b = CUBE_POS;
    let j = UNIT_POS_X as usize;
    let group = UNIT_POS_Y as usize;
    let (r_start, r_end) = share_of(group, gates, split);
    let one = F::new(1.0);
    let mut dz_shared = SharedMemory::<F>::new(gates);
    // Each group's share of `dz · W_hh`: `[split, H]`.
    let mut shares = SharedMemory::<F>::new(split * hidden);
    // Gradients reaching the state after the current step from the steps visited later, and
    // the part of the next `grad_h` that a masked step passes straight through.
    let mut grad_h = F::new(0.0);
    let mut grad_c = F::new(0.0);
    let mut passed_h = F::new(0.0);
    for k in 0..len {
        let position = len - 1 - k;
        let row = visited_step(position, len, reverse) * batch + b;
        if group == 0 {
            let mut c_prev = state0[b * 2 * hidden + hidden + j];
            if position > 0 {
                let prev_row = visited_step(position - 1, len, reverse) * batch + b;
                c_prev = packed[prev_row * 7 * hidden + 2 * hidden + j];
            }
            let keep = keep_of::<F>(mask, row, masked);
            let g = row * 3 * hidden + j;
            let grad_new_h = grad_h + grad[g + hidden];
            let grad_new_c = grad_c + grad[g + 2 * hidden];
            // A masked step passes the state's gradients straight through; its own are zero.
            let dh = (grad[g] + grad_new_h) * keep;
            let p = row * 7 * hidden + j;
            let c_new = packed[p + 2 * hidden];
            let gate_i = packed[p + 3 * hidden];
            let gate_f = packed[p + 4 * hidden];
            let gate_g = packed[p + 5 * hidden];
            let gate_o = packed[p + 6 * hidden];
            let tanh_c = c_new.tanh();
            let dz_o = dh * tanh_c * gate_o * (one - gate_o);
            let dc = grad_new_c * keep + dh * gate_o * (one - tanh_c * tanh_c);
            let dz_i = dc * gate_g * gate_i * (one - gate_i);
            let dz_f = dc * c_prev * gate_f * (one - gate_f);
            let dz_g = dc * gate_i * (one - gate_g * gate_g);
            let x = row * gates + j;
            grad_xp[x] = dz_i;
            grad_xp[x + hidden] = dz_f;
            grad_xp[x + 2 * hidden] = dz_g;
            grad_xp[x + 3 * hidden] = dz_o;
            dz_shared[j] = dz_i;
            dz_shared[hidden + j] = dz_f;
            dz_shared[2 * hidden + j] = dz_g;
            dz_shared[3 * hidden + j] = dz_o;
            passed_h = grad_new_h * (one - keep);
            grad_c = dc * gate_f + grad_new_c * (one - keep);
        }
        // This step's dz is published.
        sync_cube();
        let mut share = F::new(0.0);
        for r in r_start..r_end {
            share += dz_shared[r] * weight[r * hidden + j];
        }
        shares[group * hidden + j] = share;
        // Every share is written, and every group has read this step's dz.
        sync_cube();
        if group == 0 {
            let mut dh_prev = F::new(0.0);
            #[unroll]
            for q in 0..split {
                dh_prev += shares[q * hidden + j];
            }
            grad_h = dh_prev + passed_h;
        }
    }
    if group == 0 {
        grad_state0[b * 2 * hidden + j] = grad_h;
        grad_state0[b * 2 * hidden + hidden + j] = grad_c;
    }
}

/// Whether the fused kernel runs an LSTM of `hidden` units on `tensor`'s device: at least one
/// thread per unit in a cube.
pub fn fits<R: CubeRuntime>(tensor: &CubeTensor<R>, hidden: usize) -> bool {
    hidden <= max_units_per_cube(tensor)
}

fn max_units_per_cube<R: CubeRuntime>(tensor: &CubeTensor<R>) -> usize {
    tensor.client.properties().hardware.max_units_per_cube as usize
}

/// How many thread groups share a step's dot products: the most, up to [`MAX_SPLIT`], that
/// fit in a cube.
pub(super) fn split_of<R: CubeRuntime>(tensor: &CubeTensor<R>, hidden: usize) -> usize {
    let max_units = max_units_per_cube(tensor);
    (1..=MAX_SPLIT)
        .rev()
        .find(|split| hidden * split <= max_units)
        .unwrap_or(1)
}

pub(super) fn launch_size(batch: usize, hidden: usize, split: usize) -> (CubeCount, CubeDim) {
    (
        CubeCount::Static(batch as u32, 1, 1),
        CubeDim::new_2d(hidden as u32, split as u32),
    )
}

/// Runs the forward kernel: the full packed sequence `[T, B, 7H]` and the op's output
/// `[T, B, 3H]`. `input.params` is `W_hhᵀ` flattened, `[H · 4H]`.
pub fn lstm_forward<R: CubeRuntime>(
    hidden: usize,
    input: CubeInput<R>,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let input = input.contiguous();
    let (len, batch) = input.dims();
    let packed = input.new_tensor(vec![len, batch, 7 * hidden]);
    let visible = input.new_tensor(vec![len, batch, 3 * hidden]);
    let split = split_of(&input.xp, hidden);
    let (count, cube_dim) = launch_size(batch, hidden, split);
    lstm_forward_kernel::launch::<R>(
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

/// Runs the backward kernel: the gradients of the projected input (`dz`, `[T, B, 4H]`) and of
/// the initial state (`[B, 2H]`). `weight` is `W_hh` `[4H, H]`; the caller sums the weight
/// gradient from `dz` and the previous states.
pub fn lstm_backward<R: CubeRuntime>(
    hidden: usize,
    input: CubeInput<R>,
    weight: CubeTensor<R>,
    packed: CubeTensor<R>,
    grad: CubeTensor<R>,
) -> (CubeTensor<R>, CubeTensor<R>) {
    let input = input.contiguous();
    let (weight, packed, grad) = (
        into_contiguous(weight),
        into_contiguous(packed),
        into_contiguous(grad),
    );
    let (len, batch) = input.dims();
    let grad_xp = input.new_tensor(vec![len, batch, 4 * hidden]);
    let grad_state0 = input.new_tensor(vec![batch, 2 * hidden]);
    let split = split_of(&input.xp, hidden);
    let (count, cube_dim) = launch_size(batch, hidden, split);
    lstm_backward_kernel::launch::<R>(
        &input.xp.client,
        count,
        cube_dim,
        input.state0.clone().into_tensor_arg(),
        weight.into_tensor_arg(),
        input.mask_arg().into_tensor_arg(),
        packed.into_tensor_arg(),
        grad.into_tensor_arg(),
        grad_xp.clone().into_tensor_arg(),
        grad_state0.clone().into_tensor_arg(),
        len as u32,
        batch as u32,
        input.switches(),
        hidden,
        split,
        input.dtype().into(),
    );
    (grad_xp, grad_state0)
}
