//! The recurrence on host memory: the fast CPU path of the recurrence op.
//!
//! Burn's generic tensor ops cost a dispatch and an allocation per op, and its matmul reaches a
//! fraction of what the CPU can do; over hundreds of small steps that is most of a training step.
//! Here a step is a few slice loops and at most two GEMMs (the `gemm` crate, which dispatches to
//! AVX2/AVX-512 kernels at run time; the step's products with the recurrent weight and with the
//! in-walk projection's weight through copies packed once per pass, module `packed`), and the
//! weight gradients are summed over the whole sequence in one large GEMM at the end instead of
//! one small one per step. For a narrow layer input the walk can also compute each step's input
//! projection itself ([`Projection`]); the gradient of the projected input then lives only as
//! long as its step, and the weight gradients are summed step by step.
//!
//! Each cell's kernel writes its host step next to its tensor step (see
//! [`Recurrence::host_step`]); this module owns time, masks, buffers and the final products.

use std::mem::MaybeUninit;
use std::ops::Range;

use rayon::prelude::*;

use crate::ops::Recurrence;

mod packed;
pub use packed::{Packed, PackedKernel, PackedRef};

/// A float type the host path computes in: `f32` with vectorised activations, or `f64` (used by
/// the gradient checks) with the standard library's.
pub trait HostFloat:
    num_traits::Float
    + core::ops::AddAssign
    + core::ops::MulAssign
    + Default
    + Send
    + Sync
    + core::fmt::Debug
    + burn::tensor::Element
    + 'static
{
    /// `x ← σ(x)` for every element.
    fn sigmoid_in_place(xs: &mut [Self]);
    /// `x ← tanh(x)` for every element.
    fn tanh_in_place(xs: &mut [Self]);
    /// The packed-product kernel this CPU runs for this float type, if any (then step weights
    /// are packed).
    fn packed_kernel() -> Option<PackedKernel<Self>> {
        None
    }
}

impl HostFloat for f64 {
    fn sigmoid_in_place(xs: &mut [f64]) {
        // The same formula as the tensor path, so that both agree to the last bits in f64.
        xs.iter_mut()
            .for_each(|x| *x = ((*x * 0.5).tanh() + 1.0) * 0.5);
    }
    fn tanh_in_place(xs: &mut [f64]) {
        xs.iter_mut().for_each(|x| *x = x.tanh());
    }
}

impl HostFloat for f32 {
    fn sigmoid_in_place(xs: &mut [f32]) {
        fast_math::sigmoid(xs)
    }
    fn tanh_in_place(xs: &mut [f32]) {
        fast_math::tanh(xs)
    }
    fn packed_kernel() -> Option<PackedKernel<f32>> {
        packed::f32_kernel()
    }
}

/// Branch-free `f32` exp, sigmoid and tanh (Cephes polynomials, a few ulp from the exact
/// value, NaN in gives NaN out) so that the compiler vectorises them; compiled a second time
/// with AVX2 + FMA and with AVX-512, picked at run time (AVX-512: SRU step 8.8 → 7.5 ms, LSTM
/// 24 → 21 ms at config A on a Zen 5 EPYC).
// The coefficients are Cephes' as published.
#[allow(clippy::excessive_precision)]
mod fast_math {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    /// `1.5 · 2^23`: adding it rounds to an integer that can be read from the bits.
    const ROUND: f32 = 12_582_912.0;

    /// `a·b + c`: one rounding (an FMA instruction) where the CPU has it, two elsewhere.
    type MulAdd = fn(f32, f32, f32) -> f32;
    const PLAIN: MulAdd = |a, b, c| a * b + c;
    // Only inlined into functions compiled with FMA; elsewhere `mul_add` is a library call.
    const FUSED: MulAdd = f32::mul_add;

    #[inline(always)]
    fn exp(x: f32, madd: MulAdd) -> f32 {
        // `clamp` keeps NaN (min/max would not).
        let x = x.clamp(-87.0, 88.0);
        let shifted = madd(x, LOG2E, ROUND);
        let n = shifted - ROUND;
        let r = madd(n, 2.121_944_4e-4, madd(n, -0.693_359_4, x));
        let p = [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            5.000_000_1e-1,
        ]
        .into_iter()
        .fold(1.987_569_1e-4, |p, c| madd(p, r, c));
        let y = madd(p * r, r, r + 1.0);
        let exponent = (shifted.to_bits() as i32)
            .wrapping_sub(0x4B40_0000)
            .wrapping_add(127);
        y * f32::from_bits((exponent << 23) as u32)
    }

    #[inline(always)]
    fn sigmoid_one(x: f32, madd: MulAdd) -> f32 {
        1.0 / (1.0 + exp(-x, madd))
    }

    #[inline(always)]
    fn tanh_one(x: f32, madd: MulAdd) -> f32 {
        let a = x.abs();
        let z = a * a;
        // Near 0 a polynomial keeps the relative accuracy that `1 − 2/(e^{2a}+1)` loses.
        let small = [
            2.063_908_9e-2,
            -5.373_971_6e-2,
            1.333_144_2e-1,
            -3.333_328_2e-1,
        ]
        .into_iter()
        .fold(-5.704_988_7e-3, |p, c| madd(p, z, c));
        let small = madd(small * z, a, a);
        let large = 1.0 - 2.0 / (exp(2.0 * a, madd) + 1.0);
        let magnitude = if a < 0.625 { small } else { large };
        magnitude.copysign(x)
    }

    macro_rules! dispatched {
        ($name:ident, $one:ident, $avx2:ident, $avx512:ident) => {
            pub(super) fn $name(xs: &mut [f32]) {
                #[cfg(target_arch = "x86_64")]
                {
                    use std::arch::is_x86_feature_detected as has;
                    if has!("avx512f") {
                        // SAFETY: the CPU supports the features the function is compiled for.
                        unsafe { $avx512(xs) };
                        return;
                    }
                    if has!("avx2") && has!("fma") {
                        // SAFETY: as above.
                        unsafe { $avx2(xs) };
                        return;
                    }
                }
                xs.iter_mut().for_each(|x| *x = $one(*x, PLAIN));
            }

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn $avx2(xs: &mut [f32]) {
                xs.iter_mut().for_each(|x| *x = $one(*x, FUSED));
            }

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,fma")]
            unsafe fn $avx512(xs: &mut [f32]) {
                xs.iter_mut().for_each(|x| *x = $one(*x, FUSED));
            }
        };
    }

    dispatched!(sigmoid, sigmoid_one, sigmoid_avx2, sigmoid_avx512);
    dispatched!(tanh, tanh_one, tanh_avx2, tanh_avx512);

    #[cfg(test)]
    mod tests {
        #[test]
        fn fast_activations_match_the_standard_library() {
            let xs: Vec<f32> = (-4000..=4000).map(|i| i as f32 * 0.01).collect();
            let (mut s, mut t) = (xs.clone(), xs.clone());
            super::sigmoid(&mut s);
            super::tanh(&mut t);
            for ((&x, s), t) in xs.iter().zip(s).zip(t) {
                let exact_s = 1.0 / (1.0 + (-(x as f64)).exp());
                let exact_t = (x as f64).tanh();
                // The portable fallback (two roundings where the SIMD versions fuse them).
                let (plain_s, plain_t) = (
                    super::sigmoid_one(x, super::PLAIN),
                    super::tanh_one(x, super::PLAIN),
                );
                assert!((plain_s as f64 - exact_s).abs() <= 2e-7 * exact_s.max(1e-3));
                assert!(
                    (plain_t as f64 - exact_t).abs() <= 2e-7,
                    "fallback tanh({x})"
                );
                assert!(
                    (s as f64 - exact_s).abs() <= 2e-7 * exact_s.max(1e-3),
                    "σ({x})"
                );
                assert!(
                    (t as f64 - exact_t).abs() <= 2e-7,
                    "tanh({x}) = {t} vs {exact_t}"
                );
            }
            let mut special = vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e-30, -200.0];
            super::tanh(&mut special);
            assert!(special[0].is_nan());
            assert_eq!(&special[1..], &[1.0, -1.0, 1e-30, -1.0]);
            let mut nan = vec![f32::NAN];
            super::sigmoid(&mut nan);
            assert!(nan[0].is_nan());
        }
    }
}

/// A read-only strided matrix view over a slice.
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a, F> {
    data: &'a [F],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
    /// The same matrix packed for the step product, where it was (see [`MatRef::with_packed`]).
    packed: Option<PackedRef<'a, F>>,
}

/// A mutable matrix view whose rows are contiguous (`row_stride` apart).
#[derive(Debug)]
pub struct MatMut<'a, F> {
    data: &'a mut [F],
    rows: usize,
    cols: usize,
    row_stride: usize,
}

fn extent(rows: usize, cols: usize, row_stride: usize, col_stride: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * row_stride + (cols - 1) * col_stride + 1
    }
}

/// Panics unless a row-major `[rows, cols]` view with rows `row_stride` apart fits in `len`.
fn check_view(len: usize, rows: usize, cols: usize, row_stride: usize) {
    assert!(
        extent(rows, cols, row_stride, 1) <= len,
        "view out of bounds"
    );
}

impl<'a, F: Copy> MatRef<'a, F> {
    /// A row-major `[rows, cols]` view whose rows start `row_stride` apart.
    pub fn strided(data: &'a [F], rows: usize, cols: usize, row_stride: usize) -> Self {
        check_view(data.len(), rows, cols, row_stride);
        Self {
            data,
            rows,
            cols,
            row_stride,
            col_stride: 1,
            packed: None,
        }
    }
    /// The same view, multiplied through `packed` (the same matrix packed) where it is the
    /// right operand of a product.
    pub fn with_packed(self, packed: &'a Packed<F>) -> Self {
        Self {
            packed: Some(packed.as_ref()),
            ..self
        }
    }
    /// A contiguous row-major `[rows, cols]` view.
    pub fn new(data: &'a [F], rows: usize, cols: usize) -> Self {
        Self::strided(data, rows, cols, cols)
    }
    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Number of columns.
    pub fn width(&self) -> usize {
        self.cols
    }
    /// Columns `start..start + width`.
    pub fn cols(self, start: usize, width: usize) -> Self {
        assert!(start + width <= self.cols, "columns out of bounds");
        let offset = if width == 0 {
            0
        } else {
            start * self.col_stride
        };
        Self {
            data: &self.data[offset.min(self.data.len())..],
            cols: width,
            packed: self.packed.and_then(|p| p.from_col(start)),
            ..self
        }
    }
    /// Rows `start..start + count`.
    pub fn rows_range(self, start: usize, count: usize) -> Self {
        Self {
            packed: self.packed.map(|p| p.from_row(start)),
            ..self.t().cols(start, count).t()
        }
    }
    /// The transposed view (no copy).
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            packed: None,
            ..self
        }
    }
    /// Row `r` as a slice (rows of a transposed view are not contiguous).
    pub fn row(&self, r: usize) -> &'a [F] {
        assert_eq!(self.col_stride, 1, "row of a transposed view");
        &self.data[r * self.row_stride..r * self.row_stride + self.cols]
    }
}

impl<'a, F: Copy + Send + Sync> MatMut<'a, F> {
    /// A mutable row-major `[rows, cols]` view whose rows start `row_stride` apart.
    pub fn strided(data: &'a mut [F], rows: usize, cols: usize, row_stride: usize) -> Self {
        check_view(data.len(), rows, cols, row_stride);
        Self {
            data,
            rows,
            cols,
            row_stride,
        }
    }
    /// A contiguous mutable `[rows, cols]` view.
    pub fn new(data: &'a mut [F], rows: usize, cols: usize) -> Self {
        Self::strided(data, rows, cols, cols)
    }
    /// The same view, read-only.
    pub fn as_ref(&self) -> MatRef<'_, F> {
        MatRef::strided(self.data, self.rows, self.cols, self.row_stride)
    }
    /// A reborrow of the same view.
    pub fn reborrow(&mut self) -> MatMut<'_, F> {
        MatMut::strided(self.data, self.rows, self.cols, self.row_stride)
    }
    /// Columns `start..start + width`, mutable.
    pub fn cols_mut(&mut self, start: usize, width: usize) -> MatMut<'_, F> {
        assert!(start + width <= self.cols, "columns out of bounds");
        let len = self.data.len();
        MatMut::strided(
            &mut self.data[start.min(len)..],
            self.rows,
            width,
            self.row_stride,
        )
    }
    /// Row `r`, mutable.
    pub fn row_mut(&mut self, r: usize) -> &mut [F] {
        &mut self.data[r * self.row_stride..r * self.row_stride + self.cols]
    }
    /// Runs `f(row index, row)` on every row, in parallel when the work is large enough to
    /// pay for it (rows are independent; each is written by one thread, so the result does not
    /// depend on the thread count).
    pub fn for_each_row(&mut self, f: impl Fn(usize, &mut [F]) + Send + Sync) {
        let (cols, stride) = (self.cols, self.row_stride.max(1));
        let rows = self.rows;
        if rows == 0 || cols == 0 {
            return;
        }
        let data = &mut self.data[..(rows - 1) * stride + cols];
        if worth_parallel(rows, cols) {
            data.par_chunks_mut(stride)
                .enumerate()
                .for_each(|(r, chunk)| f(r, &mut chunk[..cols]));
        } else {
            data.chunks_mut(stride)
                .enumerate()
                .for_each(|(r, chunk)| f(r, &mut chunk[..cols]));
        }
    }
}

/// Whether row-parallel work of this size pays for rayon's dispatch.
fn worth_parallel(rows: usize, cols: usize) -> bool {
    rows > 1 && rows * cols >= 32_768 && parallel_inside()
}

thread_local! {
    /// Set while this thread runs one block of batch rows and the blocks already occupy
    /// every thread: the block's loops and GEMMs then stay on this thread.
    static SERIAL: core::cell::Cell<bool> = const { core::cell::Cell::new(false) };
}

/// Whether the work at hand may be split over rayon's threads.
fn parallel_inside() -> bool {
    rayon::current_num_threads() > 1 && !SERIAL.with(|serial| serial.get())
}

/// Batch rows never interact in the recurrence, so it runs each block of rows through the
/// whole sequence on its own, blocks in parallel: no synchronisation at every step. The blocks
/// depend on the batch size only (at least 64 rows each, so that a step's GEMM stays
/// efficient, but two of half as many where the batch has fewer than 128 rows and at least
/// 32, so that two threads share a small batch), which keeps the results independent of the
/// thread count.
fn batch_blocks(batch: usize) -> Vec<Range<usize>> {
    const MIN_ROWS: usize = 64;
    let count = (batch / MIN_ROWS).max(if batch >= MIN_ROWS / 2 { 2 } else { 1 });
    (0..count)
        .map(|i| i * batch / count..(i + 1) * batch / count)
        .collect()
}

/// Runs `f` on every block, in parallel; inside a block the kernels' loops and GEMMs stay on
/// one thread when the blocks already occupy every thread.
fn for_each_block<T: Send, R: Send>(blocks: Vec<T>, f: impl Fn(T) -> R + Send + Sync) -> Vec<R> {
    let serial = blocks.len() >= rayon::current_num_threads();
    blocks
        .into_par_iter()
        .map(|block| with_serial(serial, || f(block)))
        .collect()
}

/// Runs `f` with the loops and GEMMs inside it kept on this thread (`serial`) or not.
fn with_serial<R>(serial: bool, f: impl FnOnce() -> R) -> R {
    let outer = SERIAL.with(|flag| flag.replace(serial));
    let result = f();
    SERIAL.with(|flag| flag.set(outer));
    result
}

/// Cuts a time-major `[T, batch, width]` buffer into each block's rows at every step
/// (`[block][t]`); an empty buffer gives empty rows.
fn block_rows<'a, F>(
    buffer: &'a mut [F],
    blocks: &[Range<usize>],
    steps: usize,
    width: usize,
) -> Vec<Vec<&'a mut [F]>> {
    let mut rows: Vec<Vec<&'a mut [F]>> = blocks.iter().map(|_| Vec::new()).collect();
    if buffer.is_empty() {
        rows.iter_mut()
            .for_each(|block| block.resize_with(steps, Default::default));
        return rows;
    }
    let batch = blocks.last().map_or(0, |block| block.end);
    for mut step in buffer.chunks_mut((batch * width).max(1)).take(steps) {
        for (block, rows) in blocks.iter().zip(rows.iter_mut()) {
            let (head, tail) = std::mem::take(&mut step).split_at_mut(block.len() * width);
            rows.push(head);
            step = tail;
        }
    }
    rows
}

/// A row of a buffer that was allocated without being zeroed: zeroed here, by the thread that
/// writes it next and while it is in that thread's cache (one `memset` of a whole sequence
/// buffer on the calling thread took ~10% of a two-thread training step).
fn zeroed<F: HostFloat>(row: &mut [MaybeUninit<F>]) -> &mut [F] {
    row.fill(MaybeUninit::new(F::zero()));
    // SAFETY: every element was initialised just above, and `MaybeUninit<F>` has the layout
    // of `F`.
    unsafe { &mut *(row as *mut [MaybeUninit<F>] as *mut [F]) }
}

/// A buffer of `total` values in chunks of `chunk_len` (the last one may be shorter), each
/// written by `write(index, chunk)`, chunks in parallel. Nothing is zeroed first: a zero fill
/// of a buffer of many MB before the copies that overwrite it only adds memory traffic.
///
/// # Safety
/// `write` must initialise every element of the chunk it is given.
pub unsafe fn written_by_chunks<F: HostFloat>(
    total: usize,
    chunk_len: usize,
    write: impl Fn(usize, &mut [MaybeUninit<F>]) + Send + Sync,
) -> Vec<F> {
    let mut values = Vec::with_capacity(total);
    if total > 0 {
        values.spare_capacity_mut()[..total]
            .par_chunks_mut(chunk_len)
            .enumerate()
            .for_each(|(index, chunk)| write(index, chunk));
    }
    // SAFETY: the chunks cover all `total` elements, and the caller's `write` initialised each
    // of them.
    unsafe { values.set_len(total) };
    values
}

/// `dst ← src` into memory not yet initialised, as one `memcpy` (the standard library's
/// `write_copy_of_slice` needs Rust 1.93).
pub fn copy_uninit<F: Copy>(dst: &mut [MaybeUninit<F>], src: &[F]) {
    assert_eq!(dst.len(), src.len(), "copy between slices of one length");
    // SAFETY: the lengths are equal, a shared and a unique borrow cannot overlap, and
    // `MaybeUninit<F>` has the layout of `F`.
    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.as_mut_ptr().cast::<F>(), src.len()) }
}

/// Sequences larger than this many bytes are written with streaming stores where they can
/// be: they cannot stay in the cache until they are read back (32 MiB, the last-level cache of
/// the CPUs measured), so fetching each line before overwriting it would only add traffic.
const STREAMED_BYTES: usize = 32 << 20;

/// `dst ← src` as [`copy_uninit`] does, through streaming (non-temporal) stores where `dst`
/// starts on a 16-byte boundary and holds whole 16-byte lanes: they write past the caches
/// without reading the lines first. The writing thread calls [`streamed`] when done.
fn stream_uninit<F: Copy>(dst: &mut [MaybeUninit<F>], src: &[F]) {
    assert_eq!(dst.len(), src.len(), "copy between slices of one length");
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_stream_si128};
        const LANE: usize = 16;
        let bytes = std::mem::size_of_val(src);
        let (to, from) = (dst.as_mut_ptr().cast::<u8>(), src.as_ptr().cast::<u8>());
        if (to as usize).is_multiple_of(LANE) && bytes.is_multiple_of(LANE) {
            for offset in (0..bytes).step_by(LANE) {
                // SAFETY: both ranges hold `bytes` bytes (equal lengths, asserted), `to + offset`
                // is 16-byte aligned, and SSE2 is part of every x86_64 CPU.
                unsafe {
                    let lane = _mm_loadu_si128(from.add(offset).cast::<__m128i>());
                    _mm_stream_si128(to.add(offset).cast::<__m128i>(), lane);
                }
            }
            return;
        }
    }
    copy_uninit(dst, src);
}

/// Whether a new buffer of `bytes` is written with streaming stores: above 32 MiB, which
/// cannot stay in the cache until it is read back.
pub fn streams(bytes: usize) -> bool {
    bytes > STREAMED_BYTES
}

/// `dst ← src` through streaming stores when `stream` (where `dst` is 16-byte aligned and
/// whole 16-byte lanes; the writing thread then calls [`streamed`] when done), else
/// [`copy_uninit`].
pub fn write_uninit<F: Copy>(dst: &mut [MaybeUninit<F>], src: &[F], stream: bool) {
    match stream {
        true => stream_uninit(dst, src),
        false => copy_uninit(dst, src),
    }
}

/// Orders the calling thread's streaming stores before its later stores, so that whoever it
/// hands its work to reads them (a no-op off x86_64).
pub fn streamed() {
    // SAFETY: a store fence has no preconditions; SSE is part of every x86_64 CPU.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        std::arch::x86_64::_mm_sfence()
    };
}

/// The rows of `m`, one after another (no allocation: the walks call this at every step).
fn rows_mut<'a, F>(m: &'a mut MatMut<'_, F>) -> impl Iterator<Item = &'a mut [F]> {
    let (cols, stride) = (m.cols, m.row_stride.max(m.cols));
    let mut rest: &'a mut [F] = &mut m.data[..];
    (0..m.rows).map(move |_| {
        let at = stride.min(rest.len());
        let (row, tail) = std::mem::take(&mut rest).split_at_mut(at);
        rest = tail;
        &mut row[..cols]
    })
}

/// Runs `f(row index, row of a, row of b)` on every row of two views with as many rows, in
/// parallel when large enough (each row is written by one thread: no dependence on the thread
/// count).
pub fn for_each_row_pair<F: Copy + Send + Sync>(
    a: &mut MatMut<F>,
    b: &mut MatMut<F>,
    f: impl Fn(usize, &mut [F], &mut [F]) + Send + Sync,
) {
    assert_eq!(a.rows, b.rows, "row counts differ");
    let parallel = worth_parallel(a.rows, a.cols + b.cols);
    let pairs = rows_mut(a).zip(rows_mut(b)).enumerate();
    if parallel {
        pairs
            .collect::<Vec<_>>()
            .into_par_iter()
            .for_each(|(r, (x, y))| f(r, x, y));
    } else {
        pairs.for_each(|(r, (x, y))| f(r, x, y));
    }
}

/// [`for_each_row_pair`] over three views.
pub fn for_each_row_triple<F: Copy + Send + Sync>(
    a: &mut MatMut<F>,
    b: &mut MatMut<F>,
    c: &mut MatMut<F>,
    f: impl Fn(usize, &mut [F], &mut [F], &mut [F]) + Send + Sync,
) {
    assert!(a.rows == b.rows && b.rows == c.rows, "row counts differ");
    let parallel = worth_parallel(a.rows, a.cols + b.cols + c.cols);
    let triples = rows_mut(a).zip(rows_mut(b)).zip(rows_mut(c)).enumerate();
    if parallel {
        triples
            .collect::<Vec<_>>()
            .into_par_iter()
            .for_each(|(r, ((x, y), z))| f(r, x, y, z));
    } else {
        triples.for_each(|(r, ((x, y), z))| f(r, x, y, z));
    }
}

/// `dst ← a · b`, or `dst ← dst + a · b` when `accumulate`.
pub fn matmul<F: HostFloat>(dst: &mut MatMut<F>, a: MatRef<F>, b: MatRef<F>, accumulate: bool) {
    assert_eq!((dst.rows, dst.cols), (a.rows, b.cols), "matmul shapes");
    // SAFETY: `dst` is a bounds-checked view of that shape, borrowed mutably (so it cannot
    // alias `a` or `b`) and initialised.
    unsafe { gemm_raw(dst.data.as_mut_ptr(), dst.row_stride, a, b, accumulate) }
}

/// Rows per task of [`linear_grads`] and [`product_by_rows`].
pub(crate) const LINEAR_ROWS: usize = 2048;

/// Output widths up to which a linear map's products run as [`product_by_rows`] and
/// [`linear_grads`] do (a per-step output head); wider ones (an input projection) go to
/// `gemm` split its own way, which ran them up to 8% faster.
pub const FEW_OUTPUTS: usize = 32;

/// `a · b (+ bias on every row)` in a new row-major buffer, a chunk of `a`'s rows per task, `b`
/// packed once for the step product's kernel where the CPU has one: for the many rows and
/// few columns of a per-step output head, which `gemm` ran 15-30% slower (it repacks `b`
/// for every block of rows).
pub fn product_by_rows<F: HostFloat>(a: MatRef<F>, b: MatRef<F>, bias: Option<&[F]>) -> Vec<F> {
    let (m, n) = (a.rows, b.cols);
    assert!(
        bias.is_none_or(|bias| bias.len() == n),
        "one bias per column"
    );
    if m == 0 || n == 0 {
        return Vec::new();
    }
    let packed = Packed::of(b);
    let b = packed.as_ref().map_or(b, |packed| b.with_packed(packed));
    // SAFETY: every chunk is zeroed before the product adds into it.
    unsafe {
        written_by_chunks(m * n, LINEAR_ROWS * n, |chunk, dst| {
            let rows = dst.len() / n;
            let a = a.rows_range(chunk * LINEAR_ROWS, rows);
            // Each row starts as the bias (or zeros) for the product to add to.
            let dst = zeroed(dst);
            if let Some(bias) = bias {
                dst.chunks_exact_mut(n)
                    .for_each(|row| row.copy_from_slice(bias));
            }
            with_serial(true, || matmul(&mut MatMut::new(dst, rows, n), a, b, true));
        })
    }
}

/// Both gradients of a linear map `x · wᵀ (+ b)` from the gradient `g` of its output (`g`
/// `[rows, out]`, `x` `[rows, inner]`, `w` `[out, inner]`): `(g · w, gᵀ · x, g's column
/// sums)`, in one pass over the rows, a chunk of rows per task. On a long sequence (more rows
/// than the cache holds) the weight gradient's reads of `x` and the input gradient's writes
/// then overlap, where two passes would each wait on memory in turn. Each chunk's share of the
/// weight and bias gradients is summed in chunk order: no dependence on the thread count.
pub fn linear_grads<F: HostFloat>(
    g: MatRef<F>,
    x: MatRef<F>,
    w: MatRef<F>,
) -> (Vec<F>, Vec<F>, Vec<F>) {
    let (rows, out, inner) = (g.rows, g.cols, x.cols);
    assert!(
        x.rows == rows && (w.rows, w.cols) == (out, inner),
        "linear shapes"
    );
    let share = out * inner + out;
    if rows == 0 || inner == 0 {
        return (
            Vec::new(),
            vec![F::zero(); out * inner],
            vec![F::zero(); out],
        );
    }
    let mut shares = vec![F::zero(); rows.div_ceil(LINEAR_ROWS) * share];
    let mut dx = Vec::with_capacity(rows * inner);
    dx.spare_capacity_mut()[..rows * inner]
        .par_chunks_mut(LINEAR_ROWS * inner)
        .zip(shares.par_chunks_mut(share))
        .enumerate()
        .for_each(|(chunk, (dx, share))| {
            let (start, n) = (chunk * LINEAR_ROWS, dx.len() / inner);
            let (g, x) = (g.rows_range(start, n), x.rows_range(start, n));
            let (dw, db) = share.split_at_mut(out * inner);
            with_serial(true, || {
                // SAFETY: `dx` holds `n × inner` elements, borrowed mutably; `gemm_raw`
                // without `accumulate` writes every one of them and reads none.
                unsafe { gemm_raw(dx.as_mut_ptr().cast::<F>(), inner, g, w, false) };
                matmul(&mut MatMut::new(dw, out, inner), g.t(), x, false);
                add_column_sums(db, g);
            });
        });
    // SAFETY: the chunks cover all `rows × inner` elements, each written by its GEMM.
    unsafe { dx.set_len(rows * inner) };
    let mut dw = vec![F::zero(); share];
    shares
        .chunks_exact(share)
        .for_each(|share| add_into(&mut dw, share));
    let db = dw.split_off(out * inner);
    (dx, dw, db)
}

/// `a · b` in a new row-major buffer, which the GEMM writes without it being zeroed first.
pub fn product<F: HostFloat>(a: MatRef<F>, b: MatRef<F>) -> Vec<F> {
    let (m, n) = (a.rows, b.cols);
    let mut out = Vec::with_capacity(m * n);
    // SAFETY: the buffer holds `m × n` elements; `gemm_raw` without `accumulate` writes every
    // one of them and reads none, so all are initialised before `set_len`.
    unsafe {
        gemm_raw(out.as_mut_ptr(), n, a, b, false);
        out.set_len(m * n);
    }
    out
}

/// `dst ← a · b` (or `dst + a · b`) for a row-major `dst` of `a.rows × b.cols` elements whose
/// rows start `row_stride` apart.
///
/// # Safety
/// `dst` must be valid for writes of that extent, not overlap `a` or `b`, and be initialised
/// when `accumulate`.
unsafe fn gemm_raw<F: HostFloat>(
    dst: *mut F,
    row_stride: usize,
    a: MatRef<F>,
    b: MatRef<F>,
    accumulate: bool,
) {
    let (m, n, k) = (a.rows, b.cols, a.cols);
    assert_eq!(b.rows, k, "matmul shapes");
    // The packed kernel reads rows of `a`.
    let b = MatRef {
        packed: b.packed.filter(|_| a.col_stride == 1),
        ..b
    };
    let threads = rayon::current_num_threads();
    let parallel = m * n * k >= 1 << 18 && parallel_inside();
    let by_columns = m <= FEW_ROWS || b.packed.is_some();
    if !parallel || !by_columns || n < 2 * COLUMN_ALIGN * threads {
        let parallelism = if parallel && b.packed.is_none() {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        // SAFETY: the caller's contract.
        return unsafe { gemm_call(dst, row_stride, a, b, accumulate, parallelism) };
    }
    // With few rows (a step of the recurrence) `gemm` keeps most of the work on one thread
    // (64×512×2048 ran no faster on two threads than on one here); one column slice per
    // thread ran 1.4-2x faster. A packed weight is always split by columns (whole panels), so
    // that its products do not depend on the thread count.
    let slice = n.div_ceil(threads).next_multiple_of(COLUMN_ALIGN);
    let dst = dst as usize;
    (0..n.div_ceil(slice)).into_par_iter().for_each(|index| {
        let start = index * slice;
        let width = slice.min(n - start);
        // SAFETY: each slice writes its own columns `start..start + width` of `dst` (disjoint
        // parts of the region the caller vouched for); `a` and `b` are only read.
        unsafe {
            gemm_call(
                (dst as *mut F).add(start),
                row_stride,
                a,
                b.cols(start, width),
                accumulate,
                gemm::Parallelism::None,
            )
        }
    });
}

/// Output rows up to which a parallel GEMM is split by columns rather than by `gemm` itself.
const FEW_ROWS: usize = 128;
/// Column slices start at multiples of this (whole vector registers, whole packed panels).
const COLUMN_ALIGN: usize = packed::PANEL;

/// One `gemm` call: see [`gemm_raw`] for the contract.
unsafe fn gemm_call<F: HostFloat>(
    dst: *mut F,
    row_stride: usize,
    a: MatRef<F>,
    b: MatRef<F>,
    accumulate: bool,
    parallelism: gemm::Parallelism,
) {
    let (m, n, k) = (a.rows, b.cols, a.cols);
    if let Some(packed) = b.packed {
        // SAFETY: the caller's contract.
        return unsafe { packed.product(dst, row_stride, a, n, accumulate) };
    }
    // SAFETY: the caller's contract for `dst`; `a` and `b` were bounds-checked on construction;
    // `gemm` supports `f32` and `f64` (all `HostFloat`s), and without `read_dst` it writes
    // every element of `dst` (zeros when `k` is 0) and reads none.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            row_stride as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            F::one(),
            F::one(),
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// A weight gradient that is a sum over steps of `a_tᵀ · g_t` (`a_t` is `[batch, k]`, `g_t`
/// `[batch, n]`): the driver sums the products over the whole sequence in one GEMM into columns
/// `col..col + n` of parameter `param`. Each operand is either read where it already lies (the
/// previous state, the gradient of the projected input) or written by the backward step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WeightProduct {
    /// Index of the parameter (a `[k, ·]` matrix).
    pub param: usize,
    /// First column of the parameter that the product fills.
    pub col: usize,
    /// Width of `a_t`.
    pub k: usize,
    /// Width of `g_t`.
    pub n: usize,
    /// Where `a_t` comes from.
    pub a: Operand,
    /// Where `g_t` comes from.
    pub g: Operand,
}

/// Where an operand of a [`WeightProduct`] lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operand {
    /// Written by the backward step into [`HostStepGrads::products`].
    Written,
    /// Columns `col..` of the previous state (for `a_t`).
    PrevState(usize),
    /// Columns `col..` of the gradient of the projected input (for `g_t`).
    GradInput(usize),
    /// The `g_t` that the step writes for the product with this index (for `g_t`).
    GradOf(usize),
    /// A column of ones (for `a_t`, `k` = 1): the product sums `g_t` over the batch, the
    /// gradient of a bias broadcast over it.
    Ones,
}

/// What a host step's backward reads.
#[derive(Debug, Clone, Copy)]
pub struct HostStep<'a, F> {
    /// The step's projected input, `[batch, input_width]`.
    pub xp: MatRef<'a, F>,
    /// The state the step started from, `[batch, state_width]`.
    pub prev: MatRef<'a, F>,
    /// The step's packed row `[batch, output | state | saved]` (`[batch, state | saved]` for
    /// a kernel whose output is in its state).
    pub row: MatRef<'a, F>,
    /// Gradient arriving at the output, `[batch, output_width]` (empty for a kernel whose
    /// output is in its state: `grad_state` holds it then).
    pub grad_output: MatRef<'a, F>,
    /// Gradient arriving at the new state, `[batch, state_width]`.
    pub grad_state: MatRef<'a, F>,
    /// The transposed parameters, contiguous (a GEMM reads them 2-3x faster than a transposed
    /// view), in the order of [`Recurrence::param_shapes`].
    pub params_t: &'a [MatRef<'a, F>],
    /// Rows that the next steps read from far apart in memory (`[batch, ·]` each): the kernel
    /// fetches row `b` of each while it works on its own row `b`
    /// ([`fetch_ahead`](HostStep::fetch_ahead)).
    pub ahead: &'a [MatRef<'a, F>],
}

impl<F: Copy> HostStep<'_, F> {
    /// Asks for row `b` of every [`ahead`](HostStep::ahead) view: called from the kernel's
    /// loop over its rows, the fetches go out a row at a time between its computations,
    /// where all of them at once would queue behind each other and stall the walk.
    pub fn fetch_ahead(&self, b: usize) {
        for rows in self.ahead {
            prefetch(rows.row(b));
        }
    }
}

/// Where a host step's backward writes.
#[derive(Debug)]
pub struct HostStepGrads<'a, F> {
    /// Gradient of the projected input, `[batch, input_width]` (overwrite).
    pub xp: MatMut<'a, F>,
    /// Gradient of the previous state, `[batch, state_width]` (overwrite).
    pub prev: MatMut<'a, F>,
    /// Gradients of the parameters that are not [`WeightProduct`]s (accumulate).
    pub params: Vec<MatMut<'a, F>>,
    /// `(a_t, g_t)` of each of the kernel's [`WeightProduct`]s, in order (overwrite); an
    /// operand that is not [`Operand::Written`] gets an empty view.
    pub products: Vec<(MatMut<'a, F>, MatMut<'a, F>)>,
}

/// The recurrence op's inputs as host slices.
#[derive(Debug, Clone, Copy)]
pub struct HostInput<'a, F> {
    /// `[T, batch, input_width]`, or empty when `projection` computes it step by step.
    pub xp: &'a [F],
    /// The input projection, when the recurrence computes each step's projected input itself
    /// instead of reading it from `xp`.
    pub projection: Option<Projection<'a, F>>,
    /// `[batch, state_width]`.
    pub state0: &'a [F],
    /// The flat parameters.
    pub params: &'a [F],
    /// `[T, batch]` of 0/1, or `None`.
    pub mask: Option<&'a [F]>,
    /// Sequence length.
    pub len: usize,
    /// Batch size.
    pub batch: usize,
    /// Walk from the end to the start.
    pub reverse: bool,
}

/// An input projection `x · Wᵀ + b` computed step by step inside the recurrence, for inputs
/// so narrow that the projection costs less than writing its result and reading it back: the
/// projected rows (`input_width` values each) and their gradient then never leave the cache.
#[derive(Debug, Clone, Copy)]
pub struct Projection<'a, F> {
    /// The layer input `[T, batch, width]` from its first element: each row contiguous,
    /// steps `x_strides[0]` and batch rows `x_strides[1]` apart (the layer passes a
    /// batch-major input, transposed).
    pub x: &'a [F],
    /// How far apart steps and batch rows of `x` lie.
    pub x_strides: [usize; 2],
    /// Width of one step's input.
    pub width: usize,
    /// `Wᵀ` `[width, input_width]`, with `b` as one more row when there is a bias: the GEMM
    /// then adds the bias (each row of `x` gets a 1 appended), and its gradient is one more
    /// row of the weight gradient's.
    pub weights: MatRef<'a, F>,
    /// Whether the backward computes the gradient of `x` (not for a layer's first input).
    pub grad_x: bool,
    /// Recurrent noise, the step input's columns after the projection's (see
    /// [`Regularised`](crate::regularisation::Regularised)): a multiplier per sequence,
    /// `[batch, ·]`, the same at every step (dropout's) ...
    pub keep: Option<MatRef<'a, F>>,
    /// ... then rows of every step (zoneout's), `[T, batch, ·]`.
    pub zone: Option<SequenceRows<'a, F>>,
}

impl<'a, F: HostFloat> Projection<'a, F> {
    /// Rows `rows` of step `t` of the input, each with a 1 appended when there is a bias
    /// (`buf` holds them then): `[n, weights.rows]`.
    fn step_x<'s>(&'s self, t: usize, rows: &Range<usize>, buf: &'s mut Vec<F>) -> MatRef<'s, F> {
        let x = self.x_rows(t, rows);
        if self.weights.rows == self.width {
            return x;
        }
        buf.clear();
        for r in 0..x.rows {
            buf.extend_from_slice(x.row(r));
            buf.push(F::one());
        }
        MatRef::new(buf, x.rows, self.width + 1)
    }

    /// Writes the noise of step `t`'s rows `rows` into the noise columns of `xp` (the
    /// projection's own are the first `weights.cols`).
    fn add_noise(&self, t: usize, rows: &Range<usize>, xp: &mut MatMut<F>) {
        let keep = self
            .keep
            .map(|keep| keep.rows_range(rows.start, rows.len()));
        let zone = self.zone.map(|zone| zone.step_rows(t, rows));
        let mut at = self.weights.cols;
        for noise in [keep, zone].into_iter().flatten() {
            xp.cols_mut(at, noise.cols)
                .for_each_row(|b, row| row.copy_from_slice(noise.row(b)));
            at += noise.cols;
        }
    }

    /// Rows `rows` of step `t` of the input, where they lie.
    fn x_rows(&self, t: usize, rows: &Range<usize>) -> MatRef<'a, F> {
        let [step, row] = self.x_strides;
        let first = t * step + rows.start * row;
        MatRef::strided(&self.x[first..], rows.len(), self.width, row)
    }
}

/// A block's buffers for one step's projection (empty without one).
#[derive(Default)]
struct StepScratch<F> {
    /// The step's input rows with their column of ones.
    x: Vec<F>,
    /// The projected input.
    xp: Vec<F>,
}

impl<F: HostFloat> StepScratch<F> {
    fn for_block(input: &HostInput<F>, rows: usize, width: usize) -> Self {
        match input.projection {
            Some(_) => Self {
                x: Vec::new(),
                xp: vec![F::zero(); rows * width],
            },
            None => Self::default(),
        }
    }
}

/// The projected input of step `t` for a block's rows, `[n, width]`: read where it lies, or
/// computed into `scratch` when the recurrence projects its input itself (then also the input
/// rows it was computed from, as [`Projection::step_x`] gives them).
fn step_input<'a, F: HostFloat>(
    input: &'a HostInput<'a, F>,
    t: usize,
    rows: &Range<usize>,
    width: usize,
    scratch: &'a mut StepScratch<F>,
) -> (MatRef<'a, F>, Option<MatRef<'a, F>>) {
    match &input.projection {
        Some(projection) => {
            let x = projection.step_x(t, rows, &mut scratch.x);
            let mut xp = MatMut::new(&mut scratch.xp, rows.len(), width);
            let projected = projection.weights.cols;
            matmul(&mut xp.cols_mut(0, projected), x, projection.weights, false);
            projection.add_noise(t, rows, &mut xp);
            (MatRef::new(&scratch.xp, rows.len(), width), Some(x))
        }
        None => {
            let strides = RowStrides::time_major(input.batch, width);
            (strides.step_rows(input.xp, t, rows, width), None)
        }
    }
}

fn order(len: usize, reverse: bool) -> Vec<usize> {
    if reverse {
        (0..len).rev().collect()
    } else {
        (0..len).collect()
    }
}

fn param_views<'a, F: Copy>(shapes: &[[usize; 2]], mut flat: &'a [F]) -> Vec<MatRef<'a, F>> {
    shapes
        .iter()
        .map(|&[rows, cols]| {
            let (head, tail) = flat.split_at(rows * cols);
            flat = tail;
            MatRef::new(head, rows, cols)
        })
        .collect()
}

/// The step weights (parameters of more than one row) packed for the step product, where the
/// float type has a packed kernel: packed once per pass, read at every step.
fn packed_weights<F: HostFloat>(params: &[MatRef<F>]) -> Vec<Option<Packed<F>>> {
    params
        .iter()
        .map(|p| if p.rows > 1 { Packed::of(*p) } else { None })
        .collect()
}

/// `params`, each multiplied through its packed copy where it has one.
fn with_packed<'a, F: HostFloat>(
    params: &[MatRef<'a, F>],
    packed: &'a [Option<Packed<F>>],
) -> Vec<MatRef<'a, F>> {
    params
        .iter()
        .zip(packed)
        .map(|(p, packed)| packed.as_ref().map_or(*p, |packed| p.with_packed(packed)))
        .collect()
}

fn param_views_mut<'a, F: Copy + Send + Sync>(
    shapes: &[[usize; 2]],
    mut flat: &'a mut [F],
) -> Vec<MatMut<'a, F>> {
    shapes
        .iter()
        .map(|&[rows, cols]| {
            let (head, tail) = std::mem::take(&mut flat).split_at_mut(rows * cols);
            flat = tail;
            MatMut::new(head, rows, cols)
        })
        .collect()
}

/// The widths of the recurrence's tensors.
#[derive(Debug, Clone, Copy)]
struct Widths {
    output: usize,
    state: usize,
    input: usize,
    /// First column of the state in a packed row: after the output, or 0 when the row leaves
    /// the output out (see [`Recurrence::host_output_in_state`]).
    state_at: usize,
    /// First column of the part of a row that the kernel writes: 0, or `state_at` when the
    /// driver copies the output out of the kernel's state (a mask then zeroes it apart).
    kernel_at: usize,
    /// A packed row: output (unless left out), state and saved values.
    packed: usize,
}

impl Widths {
    fn of<K: Recurrence>(kernel: &K, masked: bool) -> Self {
        let (output, state) = (kernel.output_width(), kernel.state_width());
        // The driver puts the output columns back before the kernel's row where a mask needs
        // them and the kernel leaves them out.
        let kernel_at = if kernel.host_output_in_state() && masked {
            output
        } else {
            0
        };
        let packed = kernel_at + kernel.host_row_width();
        Self {
            output,
            state,
            input: kernel.input_width(),
            state_at: packed - state - kernel.host_saved_width(),
            kernel_at,
            packed,
        }
    }

    /// Width of the op's output: a packed row less its saved values.
    fn visible(&self) -> usize {
        self.state_at + self.state
    }
}

/// Width of the op's output on the host path, `[output | state]` or `[state]` (see
/// [`Recurrence::host_output_in_state`]); `masked`: the recurrence has a mask.
pub fn visible_width<K: Recurrence>(kernel: &K, masked: bool) -> usize {
    Widths::of(kernel, masked).visible()
}

/// Where the rows of a `[T, batch, width]` sequence lie in a buffer: step `t`'s row of
/// sequence `b` starts at element `t * step + b * row`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowStrides {
    /// Elements from one step's row to the next step's, of one sequence.
    pub step: usize,
    /// Elements from one sequence's row to the next sequence's, at one step.
    pub row: usize,
}

impl RowStrides {
    /// Step by step: a contiguous `[T, batch, width]`.
    pub fn time_major(batch: usize, width: usize) -> Self {
        Self {
            step: batch * width,
            row: width,
        }
    }

    /// Sequence by sequence: a contiguous `[batch, T, width]`.
    pub fn batch_major(len: usize, width: usize) -> Self {
        Self {
            step: width,
            row: len * width,
        }
    }

    /// Rows `rows` of step `t`, `width` values each.
    fn step_rows<'a, F: Copy>(
        self,
        values: &'a [F],
        t: usize,
        rows: &Range<usize>,
        width: usize,
    ) -> MatRef<'a, F> {
        let start = t * self.step + rows.start * self.row;
        MatRef::strided(&values[start..], rows.len(), width, self.row)
    }
}

/// Whether the packed sequence of `kernel`'s recurrence on `input` is batch-major (`[batch, T,
/// ·]`): when its rows are at most twice as wide as the outputs in them (the outputs alone for
/// IndRNN and the RNNs unmasked, `[h | c]` for the SRU) and the projection is computed in the
/// walk. The layer's batch-major output is then a view of the packed sequence rather than a
/// transposed copy (and for outputs alone so is the gradient it sends back), which saves more
/// than the walk's copy of each step's rows costs. Otherwise time-major: a step's rows lie
/// together, which the walks over wide rows read faster, and the weight products after a walk
/// without projection read the previous states as `[T · batch, ·]` rows one stride apart.
pub fn packs_batch_major<F, K: Recurrence>(kernel: &K, input: &HostInput<F>) -> bool {
    let w = Widths::of(kernel, input.mask.is_some());
    input.projection.is_some() && w.packed <= 2 * w.output
}

/// Where one block of batch rows of the forward writes: its rows of each step (a time-major
/// buffer cut by [`block_rows`]), or its sequences one after another (batch-major).
enum BlockRows<'a, F> {
    Steps(Vec<&'a mut [MaybeUninit<F>]>),
    Sequences(&'a mut [MaybeUninit<F>]),
}

/// Cuts the packed buffer into the blocks' [`BlockRows`].
fn block_destinations<'a, F>(
    buffer: &'a mut [MaybeUninit<F>],
    blocks: &[Range<usize>],
    len: usize,
    width: usize,
    batch_major: bool,
) -> Vec<BlockRows<'a, F>> {
    if !batch_major {
        return block_rows(buffer, blocks, len, width)
            .into_iter()
            .map(BlockRows::Steps)
            .collect();
    }
    let mut rest = buffer;
    blocks
        .iter()
        .map(|block| {
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(block.len() * len * width);
            rest = tail;
            BlockRows::Sequences(head)
        })
        .collect()
}

/// One step of a block: the kernel writes its rows into `out` (`[n, packed]`, zeroed), then
/// `keep` (the mask's column of the step) zeroes the padded rows' outputs and carries their
/// state.
#[allow(clippy::too_many_arguments)]
fn write_step<F: HostFloat, K: Recurrence>(
    kernel: &K,
    params: &[MatRef<F>],
    w: Widths,
    xp: MatRef<F>,
    prev: MatRef<F>,
    out: &mut [F],
    keep: Option<&[F]>,
) {
    let mut out = MatMut::new(out, prev.rows(), w.packed);
    let kernel_part = out.cols_mut(w.kernel_at, w.packed - w.kernel_at);
    kernel.host_step(params, xp, prev, kernel_part);
    if let Some(keep) = keep {
        out.for_each_row(|b, row| {
            let (output, rest) = row.split_at_mut(w.state_at);
            if w.kernel_at > 0 {
                output.copy_from_slice(&rest[..w.output]);
            }
            if keep[b] != F::one() {
                output.iter_mut().for_each(|o| *o *= keep[b]);
                for (s, &p) in rest[..w.state].iter_mut().zip(prev.row(b)) {
                    *s = p + (*s - p) * keep[b];
                }
            }
        });
    }
}

/// The input projection's weights packed for the step product, where it has them: its
/// per-step product (a few rows by `k` = the input width, often ~10) then skips `gemm`'s
/// repacking of the weight at every call.
fn packed_projection<F: HostFloat>(input: &HostInput<F>) -> Option<Packed<F>> {
    input.projection.and_then(|p| Packed::of(p.weights))
}

/// `input` with its projection multiplied through `packed`, where there is one.
fn with_packed_projection<'a, F: HostFloat>(
    input: HostInput<'a, F>,
    packed: &'a Option<Packed<F>>,
) -> HostInput<'a, F> {
    let projection = input.projection.map(|p| Projection {
        weights: packed
            .as_ref()
            .map_or(p.weights, |packed| p.weights.with_packed(packed)),
        ..p
    });
    HostInput {
        projection,
        ..input
    }
}

/// The forward of the recurrence op: the packed `[T, batch, O + S + V]` sequence (stored
/// `[batch, T, O + S + V]` where [`packs_batch_major`]).
pub fn forward<F: HostFloat, K: Recurrence>(kernel: &K, input: HostInput<F>) -> Vec<F> {
    let batch_major = packs_batch_major(kernel, &input);
    let projection = packed_projection(&input);
    let input = with_packed_projection(input, &projection);
    let w = Widths::of(kernel, input.mask.is_some());
    let (len, batch) = (input.len, input.batch);
    let shapes = kernel.param_shapes();
    let params = param_views(&shapes, input.params);
    let packed_params = packed_weights(&params);
    let params = with_packed(&params, &packed_params);
    let steps = order(len, input.reverse);
    let blocks = batch_blocks(batch);
    let total = len * batch * w.packed;
    let mut packed = Vec::with_capacity(total);
    let destinations = block_destinations(
        &mut packed.spare_capacity_mut()[..total],
        &blocks,
        len,
        w.packed,
        batch_major,
    );
    for_each_block(
        blocks.into_iter().zip(destinations).collect(),
        |(rows, destination)| {
            let n = rows.len();
            let mut scratch = StepScratch::for_block(&input, n, w.input);
            let keep = |t: usize| {
                let start = t * batch;
                input
                    .mask
                    .map(|mask| &mask[start + rows.start..start + rows.end])
            };
            let state0 =
                RowStrides::time_major(batch, w.state).step_rows(input.state0, 0, &rows, w.state);
            match destination {
                BlockRows::Steps(mut outputs) => {
                    let mut prev_row: Option<&[F]> = None;
                    for &t in &steps {
                        let (xp, _) = step_input(&input, t, &rows, w.input, &mut scratch);
                        let prev = match prev_row {
                            None => state0,
                            Some(row) => MatRef::strided(&row[w.state_at..], n, w.state, w.packed),
                        };
                        let out = zeroed(std::mem::take(&mut outputs[t]));
                        write_step(kernel, &params, w, xp, prev, out, keep(t));
                        prev_row = Some(out);
                    }
                }
                BlockRows::Sequences(sequences) => {
                    // Each step is written here first, then copied to its rows of the block's
                    // sequences; it stays here as the next step's previous state.
                    let mut current = vec![F::zero(); n * w.packed];
                    let mut last = current.clone();
                    let stream = streams(total * std::mem::size_of::<F>());
                    for (position, &t) in steps.iter().enumerate() {
                        let (xp, _) = step_input(&input, t, &rows, w.input, &mut scratch);
                        let prev = match position {
                            0 => state0,
                            _ => MatRef::strided(&last[w.state_at..], n, w.state, w.packed),
                        };
                        current.fill(F::zero());
                        write_step(kernel, &params, w, xp, prev, &mut current, keep(t));
                        for (g, row) in current.chunks_exact(w.packed).enumerate() {
                            let at = (g * len + t) * w.packed;
                            write_uninit(&mut sequences[at..at + w.packed], row, stream);
                        }
                        std::mem::swap(&mut current, &mut last);
                    }
                    streamed();
                }
            }
        },
    );
    // SAFETY: every block wrote its rows of every step, and the blocks cover the batch: all
    // `total` elements are initialised.
    unsafe { packed.set_len(total) };
    packed
}

/// Gradients of the recurrence op's inputs, on the host.
#[derive(Debug, Clone)]
pub struct HostGrads<F> {
    /// `[T, batch, input_width]`.
    pub xp: Vec<F>,
    /// `[batch, state_width]`.
    pub state0: Vec<F>,
    /// The flat parameters.
    pub params: Vec<F>,
    /// With a [`Projection`]: the gradients of `W` (`[input_width, width]`) and of `b` (empty
    /// without a bias); `xp` then holds the gradient of `x` (empty when not asked for).
    pub projection: Option<(Vec<F>, Vec<F>)>,
    /// With a [`HeadGrad`]: the head's weight gradient `[k, O]`.
    pub head_weight: Option<Vec<F>>,
}

/// A contiguous copy of `m` transposed.
pub fn transpose<F: HostFloat>(m: MatRef<F>) -> Vec<F> {
    let t = m.t();
    (0..t.rows)
        .flat_map(|r| (0..t.cols).map(move |c| t.data[r * t.row_stride + c * t.col_stride]))
        .collect()
}

/// Written operands of the weight products, time-major `[steps, batch, width]` (empty
/// otherwise).
fn operand_buffer<F: HostFloat>(operand: Operand, steps: usize, width: usize) -> Vec<F> {
    match operand {
        Operand::Written => vec![F::zero(); steps * width],
        _ => Vec::new(),
    }
}

/// What every block of the backward reads.
struct BackwardShared<'a, F, K> {
    kernel: &'a K,
    input: HostInput<'a, F>,
    params: &'a [MatRef<'a, F>],
    params_t: &'a [MatRef<'a, F>],
    shapes: &'a [[usize; 2]],
    products: &'a [WeightProduct],
    packed: &'a [F],
    packed_strides: RowStrides,
    grad: OutputGrad<'a, F>,
    steps: &'a [usize],
    w: Widths,
    /// How many steps' rows a written product operand keeps: all of them, or (with a
    /// projection, whose products are summed step by step) one, rewritten at every step.
    kept_steps: usize,
}

/// One block's rows of a time-major buffer, step by step (`[t]`).
type StepRows<'a, F> = Vec<&'a mut [F]>;

/// One block's `(a_t, g_t)` rows of a weight product.
type ProductRows<'a, F> = (StepRows<'a, F>, StepRows<'a, F>);

/// Where one block of the backward writes.
struct BlockGrads<'a, F> {
    /// Not zeroed: each step zeroes its rows as it comes to them.
    xp: Vec<&'a mut [MaybeUninit<F>]>,
    /// The `(a_t, g_t)` rows of each weight product: of every step, or with a projection of
    /// the current step only.
    products: Vec<ProductRows<'a, F>>,
}

/// What one block of the backward returns: its rows of the initial state's gradient, its sums
/// of the parameter gradients that are not weight products (all of them with a projection),
/// of the projection's gradients and of a head's weight gradient.
type BlockResult<F> = (Vec<F>, Vec<F>, Vec<F>, Vec<F>);

/// The backward walk over one block of batch rows: writes its rows of the projected-input
/// gradient (of `x` with a projection) and of the written product operands; returns the
/// block's sums ([`BlockResult`]).
fn backward_block<F: HostFloat, K: Recurrence>(
    shared: &BackwardShared<'_, F, K>,
    rows: Range<usize>,
    mut out: BlockGrads<'_, F>,
) -> BlockResult<F> {
    let BackwardShared {
        kernel, input, w, ..
    } = *shared;
    let (n, batch) = (rows.len(), input.batch);
    let mut grad_params = vec![F::zero(); input.params.len()];
    let mut grad_state = vec![F::zero(); n * w.state];
    let mut grad_prev = vec![F::zero(); n * w.state];
    // The output gradient of a masked step (the mask zeroes its padded rows).
    let mut masked_output = vec![
        F::zero();
        if input.mask.is_some() {
            n * w.output
        } else {
            0
        }
    ];
    let mut carried = vec![F::zero(); n * w.state];
    // With a projection: each step's projected input and its gradient, and the block's sums
    // of the projection's gradients, `[Wᵀ | b]`.
    let mut scratch = StepScratch::for_block(&input, n, w.input);
    let mut grad_xp_scratch = vec![F::zero(); scratch.xp.len()];
    let mut grad_projection = vec![
        F::zero();
        input
            .projection
            .map_or(0, |p| p.weights.rows * p.weights.cols)
    ];
    let steps = shared.steps;
    let grad = shared.grad;
    // With a head: each step's output gradient, and the block's sum of the head's weight
    // gradient.
    let mut head_rows = vec![F::zero(); grad.head.map_or(0, |_| n * grad.width(w.output))];
    let mut head_weight = vec![F::zero(); grad.head_weight_len()];
    let mut ahead = Vec::new();
    for (position, &t) in steps.iter().enumerate().rev() {
        // Where this step finds its rows of the written operands.
        let slot = t % shared.kept_steps;
        let packed_rows = |t| {
            let strides = shared.packed_strides;
            strides.step_rows(shared.packed, t, &rows, w.packed)
        };
        let prev = match position {
            0 => RowStrides::time_major(batch, w.state).step_rows(input.state0, 0, &rows, w.state),
            _ => packed_rows(steps[position - 1]).cols(w.state_at, w.state),
        };
        let grad_rows = grad.step_rows(t, &rows, &mut head_rows);
        // What the next steps read where one batch row lies far from the next (a whole
        // `[batch, width]` slab, or in a batch-major buffer a whole sequence, where the
        // hardware's prefetcher loses track), for the kernel to fetch while it works: the
        // previous state of the step after next, the next step's gradient and input rows.
        ahead.clear();
        if position >= 2 {
            ahead.push(packed_rows(steps[position - 2]).cols(w.state_at, w.state));
        }
        if let Some(&next) = position.checked_sub(1).map(|p| &steps[p]) {
            ahead.extend(grad.rows_ahead(next, &rows));
            ahead.extend(input.projection.map(|p| p.x_rows(next, &rows)));
        }
        let row = packed_rows(t);
        for b in 0..n {
            let g = grad_rows.row(b);
            // This step's rows, where the last step did not fetch them (its first rows)
            // or the cache lost them: fetched here, a row at a time between the state
            // gradient's loads, they arrive while this loop runs instead of stalling the
            // kernel. The packed row without its output columns: no kernel's backward reads
            // them.
            prefetch(&g[..w.state_at]);
            prefetch(prev.row(b));
            prefetch(&row.row(b)[w.state_at..]);
            let gs = &mut grad_state[b * w.state..(b + 1) * w.state];
            add_into(gs, &g[w.state_at..]);
            if let Some(mask) = input.mask {
                let keep = mask[t * batch + rows.start + b];
                let carry = &mut carried[b * w.state..(b + 1) * w.state];
                for (c, s) in carry.iter_mut().zip(gs.iter_mut()) {
                    *c = *s * (F::one() - keep);
                    *s *= keep;
                }
                let masked = &mut masked_output[b * w.output..(b + 1) * w.output];
                for (o, &g) in masked.iter_mut().zip(g) {
                    *o = g * keep;
                }
                if w.kernel_at > 0 {
                    // The kernel's output is its state's first columns.
                    add_into(&mut gs[..w.output], masked);
                }
            }
        }
        // Unmasked, the step reads its output gradient where it lies in `grad`; a kernel
        // whose output is in its state found it added into the state's.
        let grad_output = match input.mask {
            _ if kernel.host_output_in_state() => grad_rows.cols(0, 0),
            Some(_) => MatRef::new(&masked_output, n, w.output),
            None => grad_rows.cols(0, w.output),
        };
        let (xp, projected_x) = step_input(&input, t, &rows, w.input, &mut scratch);
        let step = HostStep {
            xp,
            prev,
            row: row.cols(w.kernel_at, w.packed - w.kernel_at),
            grad_output,
            grad_state: MatRef::new(&grad_state, n, w.state),
            params_t: shared.params_t,
            ahead: &ahead,
        };
        let xp_rows = zeroed(std::mem::take(&mut out.xp[t]));
        let grad_xp = match input.projection {
            Some(_) => &mut grad_xp_scratch[..],
            None => &mut *xp_rows,
        };
        let grads = HostStepGrads {
            xp: MatMut::new(grad_xp, n, w.input),
            prev: MatMut::new(&mut grad_prev, n, w.state),
            params: param_views_mut(shared.shapes, &mut grad_params),
            products: shared
                .products
                .iter()
                .zip(out.products.iter_mut())
                .map(|(p, (a, g))| (operand_rows(a[slot], n, p.k), operand_rows(g[slot], n, p.n)))
                .collect(),
        };
        kernel.host_step_backward(shared.params, step, grads);
        grad.add_head_weight_grad(t, &rows, &mut head_weight);
        if let (Some(projection), Some(x)) = (&input.projection, projected_x) {
            let grad_xp = MatRef::new(&grad_xp_scratch, n, w.input);
            // The projection's own columns (the noise's gradient belongs to nothing).
            let (rows, cols) = (projection.weights.rows, projection.weights.cols);
            let grad_projected = grad_xp.cols(0, cols);
            // [Wᵀ | b] += [x | 1]ᵀ · g.
            matmul(
                &mut MatMut::new(&mut grad_projection, rows, cols),
                x.t(),
                grad_projected,
                true,
            );
            if projection.grad_x {
                let weight_t = projection.weights.rows_range(0, projection.width);
                let mut dx = MatMut::new(xp_rows, n, projection.width);
                matmul(&mut dx, grad_projected, weight_t.t(), false);
            }
            add_step_products(shared, prev, grad_xp, &out.products, slot, &mut grad_params);
        }
        std::mem::swap(&mut grad_state, &mut grad_prev);
        if input.mask.is_some() {
            add_into(&mut grad_state, &carried);
        }
    }
    (grad_state, grad_params, grad_projection, head_weight)
}

/// Asks the CPU to bring `values` into its caches; a no-op where there is no such instruction.
fn prefetch<F>(values: &[F]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        const LINE: usize = 64;
        let start = values.as_ptr().cast::<i8>();
        for offset in (0..std::mem::size_of_val(values)).step_by(LINE) {
            // SAFETY: a prefetch only hints; the address lies inside `values`.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(start.add(offset)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = values;
}

/// The kernel's weight products for one step's rows, added into the block's parameter
/// gradients: with a projection, the gradient of the projected input lives only as long as its
/// step, so the products are summed step by step rather than over the whole sequence at the end.
fn add_step_products<'a, F: HostFloat, K: Recurrence>(
    shared: &BackwardShared<'_, F, K>,
    prev: MatRef<'a, F>,
    grad_xp: MatRef<'a, F>,
    written: &'a [ProductRows<'_, F>],
    slot: usize,
    grad_params: &mut [F],
) {
    let n = grad_xp.rows;
    let operand = |operand: Operand, own: &'a [F], width: usize| match operand {
        Operand::Written => MatRef::new(own, n, width),
        Operand::GradOf(product) => MatRef::new(written[product].1[slot], n, width),
        Operand::GradInput(col) => grad_xp.cols(col, width),
        Operand::PrevState(col) => prev.cols(col, width),
        Operand::Ones => unreachable!("a column of ones is summed over, not read"),
    };
    let mut views = param_views_mut(shared.shapes, grad_params);
    for (p, (a, g)) in shared.products.iter().zip(written) {
        let g = operand(p.g, g[slot], p.n);
        let mut dst = views[p.param].cols_mut(p.col, p.n);
        match p.a {
            Operand::Ones => add_column_sums(dst.row_mut(0), g),
            _ => matmul(&mut dst, operand(p.a, a[slot], p.k).t(), g, true),
        }
    }
}

/// One step's rows of a written operand (an empty view when the operand is not written).
fn operand_rows<'a, F: Copy + Send + Sync>(
    rows: &'a mut [F],
    n: usize,
    width: usize,
) -> MatMut<'a, F> {
    let width = if rows.is_empty() { 0 } else { width };
    MatMut::new(rows, n, width)
}

/// Rows of a sequence where they lie: step `t`'s rows start `t · strides.step` in.
#[derive(Debug, Clone, Copy)]
pub struct SequenceRows<'a, F> {
    /// The rows, where `strides` says.
    pub values: &'a [F],
    /// Where the rows lie in `values`.
    pub strides: RowStrides,
    /// Columns per row.
    pub width: usize,
}

impl<'a, F: Copy> SequenceRows<'a, F> {
    /// Rows `rows` of step `t`.
    fn step_rows(&self, t: usize, rows: &Range<usize>) -> MatRef<'a, F> {
        self.strides.step_rows(self.values, t, rows, self.width)
    }

    /// Whether one batch row lies a sequence apart from the next (the layer's own gradient,
    /// passed as a view).
    fn is_batch_major(&self) -> bool {
        self.strides.step < self.strides.row
    }
}

/// The gradient of a per-step linear head `y_t = x_t · Wᵀ + b` on the op's outputs (`x_t`),
/// in factors: the gradient `g_t` of `y_t` and `W`. The walk adds `g_t · W` to its step's
/// output gradient and `g_tᵀ · x_t` to the head's weight gradient while the step's rows are
/// in cache, where the head's own backward would write the whole `[T, batch, O]` gradient
/// to memory for the walk to read back.
#[derive(Debug, Clone, Copy)]
pub struct HeadGrad<'a, F> {
    /// `g`, `k` columns.
    pub grad: SequenceRows<'a, F>,
    /// `W` `[k, O]`.
    pub weight: MatRef<'a, F>,
    /// `x`, the head's input: the op's outputs, `O` columns.
    pub input: SequenceRows<'a, F>,
    /// Whether to sum the weight gradient.
    pub weight_grad: bool,
}

/// The gradient of the recurrence op's output as the backward reads it: a tensor's rows, a
/// head's factors, or both summed.
#[derive(Debug, Clone, Copy)]
pub struct OutputGrad<'a, F> {
    /// Rows of the op's whole output (`[T, batch, O + S]`, or `[T, batch, S]` where the rows
    /// leave the output out), or of its first `O` columns alone, the state's gradient then
    /// zero (see [`crate::ops::RnnBackend::rnn_takes_output_grads`]).
    pub rows: Option<SequenceRows<'a, F>>,
    /// A per-step head's gradient, added to the output columns.
    pub head: Option<HeadGrad<'a, F>>,
}

impl<'a, F: HostFloat> OutputGrad<'a, F> {
    /// Columns per row of the gradient the walk reads (`output`: the op's output width).
    fn width(&self, output: usize) -> usize {
        self.rows.map_or(output, |rows| rows.width)
    }

    /// Rows `rows` of step `t`: where they lie, or with a head written into `scratch` (`n ×`
    /// [`width`](Self::width)).
    fn step_rows<'s>(&self, t: usize, rows: &Range<usize>, scratch: &'s mut [F]) -> MatRef<'s, F>
    where
        'a: 's,
    {
        let Some(head) = self.head else {
            return self.rows.expect("a gradient").step_rows(t, rows);
        };
        let (n, output) = (rows.len(), head.weight.cols);
        let width = scratch.len() / n.max(1);
        let mut dst = MatMut::new(scratch, n, width);
        let g = head.grad.step_rows(t, rows);
        match self.rows {
            Some(dense) => {
                let dense = dense.step_rows(t, rows);
                for b in 0..n {
                    dst.row_mut(b).copy_from_slice(dense.row(b));
                }
                matmul(&mut dst.cols_mut(0, output), g, head.weight, true);
            }
            None => matmul(&mut dst, g, head.weight, false),
        }
        MatRef::new(scratch, n, width)
    }

    /// Elements of the head's weight gradient, where the walk sums it (else 0).
    fn head_weight_len(&self) -> usize {
        let summed = self.head.filter(|head| head.weight_grad);
        summed.map_or(0, |head| head.weight.rows * head.weight.cols)
    }

    /// Adds step `t`'s share of the head's weight gradient, `g_tᵀ · x_t` over `rows`, to `acc`,
    /// where the walk sums it.
    fn add_head_weight_grad(&self, t: usize, rows: &Range<usize>, acc: &mut [F]) {
        if let Some(head) = self.head.filter(|head| head.weight_grad) {
            let (k, output) = (head.weight.rows, head.weight.cols);
            let (g, x) = (head.grad.step_rows(t, rows), head.input.step_rows(t, rows));
            matmul(&mut MatMut::new(acc, k, output), g.t(), x, true);
        }
    }

    /// Step `t`'s rows worth fetching ahead: those of a batch-major gradient (the layer's
    /// own, passed as a view), whose rows lie a sequence apart, and the head's gradient.
    fn rows_ahead(&self, t: usize, rows: &Range<usize>) -> impl Iterator<Item = MatRef<'a, F>> {
        let dense = self.rows.filter(|dense| dense.is_batch_major());
        let head = self.head.map(|head| head.grad);
        let rows = rows.clone();
        [dense, head]
            .into_iter()
            .flatten()
            .map(move |sequence| sequence.step_rows(t, &rows))
    }
}

/// The backward of the recurrence op, from its inputs, the full packed sequence (as
/// [`forward`] lays it out) and the gradient of the op's output.
pub fn backward<F: HostFloat, K: Recurrence>(
    kernel: &K,
    input: HostInput<F>,
    packed: &[F],
    grad: OutputGrad<F>,
) -> HostGrads<F> {
    let projection = packed_projection(&input);
    let input = with_packed_projection(input, &projection);
    let w = Widths::of(kernel, input.mask.is_some());
    let width = grad.width(w.output);
    assert!(
        width == w.visible() || width == w.output,
        "the gradient has {width} columns: the op's output has {} and its outputs alone {}",
        w.visible(),
        w.output
    );
    assert!(
        grad.rows.is_some() || grad.head.is_some(),
        "a gradient of the op's output"
    );
    let (len, batch) = (input.len, input.batch);
    let packed_strides = match packs_batch_major(kernel, &input) {
        true => RowStrides::batch_major(len, w.packed),
        false => RowStrides::time_major(batch, w.packed),
    };
    let shapes = kernel.param_shapes();
    let params = param_views(&shapes, input.params);
    let transposed: Vec<Vec<F>> = params.iter().map(|p| transpose(*p)).collect();
    let params_t: Vec<MatRef<F>> = transposed
        .iter()
        .zip(&shapes)
        .map(|(values, &[rows, cols])| MatRef::new(values, cols, rows))
        .collect();
    let packed_t = packed_weights(&params_t);
    let params_t = with_packed(&params_t, &packed_t);
    let products = kernel.host_weight_products();
    let steps = order(len, input.reverse);

    // With a projection the gradient of the projected input stays inside the walk; what
    // leaves it is the gradient of x, when asked for.
    let grad_width = match input.projection {
        Some(projection) => usize::from(projection.grad_x) * projection.width,
        None => w.input,
    };
    let grad_total = len * batch * grad_width;
    let mut grad_xp = Vec::with_capacity(grad_total);
    // With a projection the products are summed step by step, so a written operand is read
    // only in its own step: one step's rows, rewritten at every step, rather than T of them.
    let kept_steps = if input.projection.is_some() { 1 } else { len };
    let mut written: Vec<(Vec<F>, Vec<F>)> = products
        .iter()
        .map(|p| {
            (
                operand_buffer(p.a, kept_steps * batch, p.k),
                operand_buffer(p.g, kept_steps * batch, p.n),
            )
        })
        .collect();
    let blocks = batch_blocks(batch);
    let uninit_xp = &mut grad_xp.spare_capacity_mut()[..grad_total];
    let mut block_xp = block_rows(uninit_xp, &blocks, len, grad_width).into_iter();
    let mut block_products: Vec<_> = written
        .iter_mut()
        .zip(&products)
        .map(|((a, g), p)| {
            let a = block_rows(a, &blocks, kept_steps, p.k).into_iter();
            (a, block_rows(g, &blocks, kept_steps, p.n).into_iter())
        })
        .collect();
    let work: Vec<(Range<usize>, BlockGrads<F>)> = blocks
        .iter()
        .map(|rows| {
            let grads = BlockGrads {
                xp: block_xp.next().expect("one per block"),
                products: block_products
                    .iter_mut()
                    .map(|(a, g)| {
                        (
                            a.next().expect("one per block"),
                            g.next().expect("one per block"),
                        )
                    })
                    .collect(),
            };
            (rows.clone(), grads)
        })
        .collect();
    let shared = BackwardShared {
        kernel,
        input,
        params: &params,
        params_t: &params_t,
        shapes: &shapes,
        products: &products,
        packed,
        packed_strides,
        grad,
        steps: &steps,
        w,
        kept_steps,
    };
    let results = for_each_block(work, |(rows, grads)| backward_block(&shared, rows, grads));
    // SAFETY: every block zeroed its rows of every step (then wrote them), and the blocks
    // cover the batch: all `grad_total` elements are initialised.
    unsafe { grad_xp.set_len(grad_total) };
    // Blocks are summed in order: the same result for any thread count.
    let mut grad_state = Vec::with_capacity(batch * w.state);
    let mut grad_params = vec![F::zero(); input.params.len()];
    let mut grad_projection = Vec::new();
    let mut head_weight = Vec::new();
    for (state, params, projection, head) in results {
        grad_state.extend_from_slice(&state);
        add_into(&mut grad_params, &params);
        for (sum, block) in [(&mut grad_projection, projection), (&mut head_weight, head)] {
            if sum.is_empty() {
                *sum = block;
            } else {
                add_into(sum, &block);
            }
        }
    }
    let head_weight = grad
        .head
        .filter(|head| head.weight_grad)
        .map(|_| head_weight);
    if let Some(projection) = input.projection {
        // The products were summed step by step.
        // Without a bias, `bias` is empty.
        let cols = projection.weights.cols;
        let (weight_t, bias) = grad_projection.split_at(projection.width * cols);
        let weight = transpose(MatRef::new(weight_t, projection.width, cols));
        return HostGrads {
            xp: grad_xp,
            state0: grad_state,
            params: grad_params,
            projection: Some((weight, bias.to_vec())),
            head_weight,
        };
    }

    let sources = ProductSources {
        packed,
        state0: input.state0,
        grad_xp: &grad_xp,
        len,
        batch,
        widths: w,
        reverse: input.reverse,
    };
    let mut grad_views = param_views_mut(&shapes, &mut grad_params);
    for (p, (a, g)) in products.iter().zip(&written) {
        let target = &mut grad_views[p.param];
        let mut dst = target.cols_mut(p.col, p.n);
        for block in [Block::First, Block::Rest] {
            let g_block = sources.block(p.g, &written, g, p.n, block);
            match p.a {
                // A bias broadcast over the batch: the column sums of `g`.
                Operand::Ones => add_column_sums(dst.row_mut(0), g_block),
                _ => {
                    let a_block = sources.block(p.a, &written, a, p.k, block);
                    matmul(&mut dst, a_block.t(), g_block, true);
                }
            }
        }
    }
    HostGrads {
        xp: grad_xp,
        state0: grad_state,
        params: grad_params,
        projection: None,
        head_weight,
    }
}

/// The steps of a weight product: the first one visited (whose previous state is `state0`)
/// and all the others (whose previous states lie in consecutive packed rows).
#[derive(Debug, Clone, Copy)]
enum Block {
    First,
    Rest,
}

/// Where the operands of the weight products lie once the backward walk is done.
struct ProductSources<'a, F> {
    packed: &'a [F],
    state0: &'a [F],
    grad_xp: &'a [F],
    len: usize,
    batch: usize,
    widths: Widths,
    reverse: bool,
}

impl<'a, F: HostFloat> ProductSources<'a, F> {
    /// The rows of an operand for a block of steps, in step order `[steps · batch, width]`.
    fn block(
        &self,
        operand: Operand,
        written: &'a [(Vec<F>, Vec<F>)],
        own: &'a [F],
        width: usize,
        block: Block,
    ) -> MatRef<'a, F> {
        let w = self.widths;
        let (len, batch) = (self.len, self.batch);
        // First step and count of the block, in time order.
        let (t0, steps) = match (block, self.reverse) {
            (Block::First, false) => (0, 1),
            (Block::First, true) => (len - 1, 1),
            (Block::Rest, false) => (1, len - 1),
            (Block::Rest, true) => (0, len - 1),
        };
        let rows = steps * batch;
        if rows == 0 {
            return MatRef::new(&[], 0, width);
        }
        match operand {
            Operand::Written => MatRef::new(&own[t0 * batch * width..], rows, width),
            Operand::GradOf(product) => {
                MatRef::new(&written[product].1[t0 * batch * width..], rows, width)
            }
            Operand::Ones => unreachable!("a column of ones is summed over, not read"),
            Operand::GradInput(col) => MatRef::strided(
                &self.grad_xp[t0 * batch * w.input + col..],
                rows,
                width,
                w.input,
            ),
            Operand::PrevState(col) => match block {
                Block::First => MatRef::strided(&self.state0[col..], rows, width, w.state),
                Block::Rest => {
                    // The previous state of step t lies in packed row t − 1 (t + 1 in reverse).
                    let prev0 = if self.reverse { t0 + 1 } else { t0 - 1 };
                    let start = prev0 * batch * w.packed + w.state_at + col;
                    MatRef::strided(&self.packed[start..], rows, width, w.packed)
                }
            },
        }
    }
}

/// `acc[j] += Σ_r m[r][j]`: every column summed over the rows in order (the same sums for any
/// thread count), columns split between threads when large. (A GEMM with a row of ones packs
/// all of `m` first, and takes longer than the sums.)
pub fn add_column_sums<F: HostFloat>(acc: &mut [F], m: MatRef<F>) {
    assert_eq!(acc.len(), m.cols, "one sum per column");
    const COLUMNS_PER_TASK: usize = 64;
    let sum_columns = |first: usize, acc: &mut [F]| {
        for r in 0..m.rows {
            add_into(acc, &m.row(r)[first..first + acc.len()]);
        }
    };
    if m.cols > COLUMNS_PER_TASK && worth_parallel(m.rows, m.cols) {
        acc.par_chunks_mut(COLUMNS_PER_TASK)
            .enumerate()
            .for_each(|(i, acc)| sum_columns(i * COLUMNS_PER_TASK, acc));
    } else {
        sum_columns(0, acc);
    }
}

/// Adds `value` to every element of `acc` (used by kernels for per-step bias-like gradients).
pub fn add_into<F: HostFloat>(acc: &mut [F], value: &[F]) {
    acc.iter_mut().zip(value).for_each(|(a, &v)| *a += v);
}

/// Defines `fn $name<F: HostFloat>(args) -> ret` whose body is also compiled for AVX-512
/// and for AVX2 + FMA, the widest the CPU has picked at run time (a build for any x86_64 CPU
/// otherwise vectorises it 4 floats wide). The arithmetic is the same on every path: the
/// compiler does not fuse multiplies and adds unless asked to.
macro_rules! simd_dispatched {
    (
        $(#[$doc:meta])*
        $vis:vis fn $name:ident<F: HostFloat>($($arg:ident: $ty:ty),*) $(-> $ret:ty)? $body:block
    ) => {
        $(#[$doc])*
        $vis fn $name<F: HostFloat>($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body<F: HostFloat>($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                use std::arch::is_x86_feature_detected as has;
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512<F: HostFloat>($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2<F: HostFloat>($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if has!("avx512f") {
                    // SAFETY: the CPU has the features `avx512` is compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if has!("avx2") && has!("fma") {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

pub(crate) use simd_dispatched;

simd_dispatched! {
    /// Normalises one row in place to zero mean and unit variance (the variance plus
    /// `epsilon`, as PyTorch's `LayerNorm`); returns `1/√(var + epsilon)`.
    pub fn normalize_in_place<F: HostFloat>(row: &mut [F], epsilon: F) -> F {
        let n = <F as num_traits::NumCast>::from(row.len()).expect("a width fits the float type");
        let mean = lane_sum(row, row, |v, _| v) / n;
        let var = lane_sum(row, row, |v, _| (v - mean) * (v - mean)) / n;
        let inv_std = F::one() / (var + epsilon).sqrt();
        for v in row.iter_mut() {
            *v = (*v - mean) * inv_std;
        }
        inv_std
    }
}

simd_dispatched! {
    /// The gradient through [`normalize_in_place`] on one row, in place: `grad` (of the
    /// normalised row `normalized`) becomes the input's, `inv_std · (g − mean(g) −
    /// x̂·mean(g⊙x̂))`.
    pub fn normalize_backward_in_place<F: HostFloat>(normalized: &[F], inv_std: F, grad: &mut [F]) {
        let n = <F as num_traits::NumCast>::from(grad.len()).expect("a width fits the float type");
        let mean = lane_sum(grad, normalized, |g, _| g) / n;
        let mean_dot = lane_sum(grad, normalized, |g, x| g * x) / n;
        for (g, &x) in grad.iter_mut().zip(normalized) {
            *g = (*g - mean - x * mean_dot) * inv_std;
        }
    }
}

/// Partial sums per [`lane_sum`]: enough independent chains to fill a vector register.
const SUM_LANES: usize = 16;

/// `Σ_i term(a[i], b[i])` as `SUM_LANES` interleaved partial sums added at the end: a float sum
/// taken in order is one dependent chain the compiler may not reorder, so it runs a scalar add
/// per element; this one vectorises (and gives the same result for any thread count).
#[inline(always)]
fn lane_sum<F: HostFloat>(a: &[F], b: &[F], term: impl Fn(F, F) -> F) -> F {
    assert_eq!(a.len(), b.len(), "lane_sum of rows of one width");
    let (a_chunks, b_chunks) = (a.chunks_exact(SUM_LANES), b.chunks_exact(SUM_LANES));
    let tail = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .fold(F::zero(), |sum, (&x, &y)| sum + term(x, y));
    let mut lanes = [F::zero(); SUM_LANES];
    for (x, y) in a_chunks.zip(b_chunks) {
        for lane in 0..SUM_LANES {
            lanes[lane] += term(x[lane], y[lane]);
        }
    }
    lanes.iter().fold(tail, |sum, &lane| sum + lane)
}

#[cfg(test)]
mod gemm_tests {
    use super::*;

    /// `dst[r][c] (+)= Σ a[r][i] · b[i][c]` element by element.
    fn naive(a: MatRef<f64>, b: MatRef<f64>, dst: &mut [f64], stride: usize, accumulate: bool) {
        for r in 0..a.rows {
            for c in 0..b.cols {
                let sum: f64 = (0..a.cols)
                    .map(|i| {
                        a.data[r * a.row_stride + i * a.col_stride]
                            * b.data[i * b.row_stride + c * b.col_stride]
                    })
                    .sum();
                let cell = &mut dst[r * stride + c];
                *cell = if accumulate { *cell + sum } else { sum };
            }
        }
    }

    #[test]
    fn column_split_gemm_matches_the_naive_product() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        // Few rows and enough work: split by columns into uneven slices (64 and 36), with a
        // transposed `b` and an output whose rows are wider than the product.
        let (m, k, n, stride) = (64, 72, 100, 103);
        let value = |i: usize| ((i * 7919) % 997) as f64 / 997.0 - 0.5;
        let a_data: Vec<f64> = (0..m * k).map(value).collect();
        let b_data: Vec<f64> = (0..n * k).map(|i| value(i + 13)).collect();
        let a = MatRef::new(&a_data, m, k);
        let b = MatRef::new(&b_data, n, k).t();
        for accumulate in [false, true] {
            let start: Vec<f64> = (0..m * stride).map(|i| value(i + 5)).collect();
            let (mut fast, mut expected) = (start.clone(), start);
            pool.install(|| {
                let mut dst = MatMut::strided(&mut fast, m, n, stride);
                matmul(&mut dst, a, b, accumulate);
            });
            naive(a, b, &mut expected, stride, accumulate);
            let worst = fast
                .iter()
                .zip(&expected)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f64::max);
            assert!(worst < 1e-12, "accumulate {accumulate}: {worst}");
        }
    }
}

#[cfg(test)]
mod row_tests {
    use super::*;

    /// Streaming stores write what a plain copy writes, into aligned and unaligned rows, of
    /// whole 16-byte lanes or not (those fall back to the copy).
    #[test]
    fn streamed_rows_hold_the_copied_values() {
        let src: Vec<f32> = (0..67).map(|i| i as f32 * 0.5 - 3.0).collect();
        for (start, len) in [(0, 64), (1, 64), (4, 63), (0, 67), (3, 1)] {
            let mut dst = Vec::<f32>::with_capacity(start + len);
            let spare = &mut dst.spare_capacity_mut()[..start + len];
            write_uninit(&mut spare[start..], &src[..len], true);
            write_uninit(&mut spare[..start], &src[..start], false);
            streamed();
            // SAFETY: both writes above cover all `start + len` elements.
            unsafe { dst.set_len(start + len) };
            assert_eq!(&dst[start..], &src[..len], "rows from {start}, {len} long");
        }
    }

    #[test]
    fn lane_sums_match_sums_in_order() {
        // Widths below one chunk, of whole chunks, and with a tail.
        for width in [0, 1, 5, 16, 32, 37, 512] {
            let a: Vec<f64> = (0..width).map(|i| ((i * 37) % 11) as f64 - 4.5).collect();
            let b: Vec<f64> = (0..width).map(|i| ((i * 13) % 7) as f64 * 0.25).collect();
            let in_order: f64 = a.iter().zip(&b).map(|(x, y)| x * y + x).sum();
            let by_lanes = lane_sum(&a, &b, |x, y| x * y + x);
            assert!(
                (by_lanes - in_order).abs() < 1e-9,
                "{width}: {by_lanes} vs {in_order}"
            );
        }
    }

    #[test]
    fn a_normalised_row_has_zero_mean_and_unit_variance() {
        let mut row: Vec<f64> = (0..37).map(|i| ((i * 7) % 10) as f64 * 0.3 + 2.0).collect();
        let inv_std = normalize_in_place(&mut row, 0.0);
        let mean = row.iter().sum::<f64>() / 37.0;
        let var = row.iter().map(|v| v * v).sum::<f64>() / 37.0;
        assert!(
            mean.abs() < 1e-12 && (var - 1.0).abs() < 1e-12,
            "{mean} {var}"
        );
        assert!(inv_std > 0.0);
    }
}
