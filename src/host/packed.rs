//! The recurrence's step product `h · W` with `W` packed once per pass.
//!
//! At every step the recurrence multiplies a few dozen rows by the same weight. A general GEMM
//! repacks that weight at every call (a 4 MB copy per step at hidden 512), and on few rows its
//! blocking fits badly: `gemm` ran the steps of config C at 44-68 GFLOP/s here. Packed once into
//! panels of 16 columns, the weight is read by a small AVX2 kernel (6 rows × 16 columns held
//! in registers) at 100-120 GFLOP/s on two threads, or where the CPU has AVX-512 by one that
//! holds 8 rows × 32 columns. Each output element is one running sum over `k` in order (the
//! same fused multiply-adds in both kernels), so the result depends neither on how the columns
//! are split over threads nor on which kernel ran.

use super::{HostFloat, MatRef};

/// Columns per panel: two 8-lane `f32` registers.
pub const PANEL: usize = 16;

/// `dst ← a · b` (or `dst + a · b`) for `a` with unit column stride and `b` `[a.cols, n]`
/// packed; `dst` is row-major with rows `row_stride` apart. Safety: as `gemm_raw`'s.
pub type PackedKernel<F> = unsafe fn(*mut F, usize, MatRef<'_, F>, PackedRef<'_, F>, usize, bool);

/// A `[k, n]` matrix in panels of `PANEL` (16) columns: panel `j` holds rows `0..k` of columns
/// `16j..16j + 16`, one row after the other (the last panel padded with zeros).
#[derive(Debug)]
pub struct Packed<F> {
    data: Vec<F>,
    rows: usize,
    kernel: PackedKernel<F>,
}

impl<F: HostFloat> Packed<F> {
    /// `m` packed, or `None` where `F` has no packed kernel on this CPU.
    pub fn of(m: MatRef<F>) -> Option<Self> {
        Some(Self::with_kernel(m, F::packed_kernel()?))
    }

    /// `m` packed for `kernel`, which the CPU must be able to run.
    fn with_kernel(m: MatRef<F>, kernel: PackedKernel<F>) -> Self {
        let (rows, cols) = (m.rows, m.cols);
        let mut data = vec![F::zero(); cols.div_ceil(PANEL) * rows * PANEL];
        for p in 0..rows {
            for (j, panel) in data.chunks_exact_mut(rows * PANEL).enumerate() {
                let width = PANEL.min(cols - j * PANEL);
                let row = &mut panel[p * PANEL..p * PANEL + width];
                for (c, value) in row.iter_mut().enumerate() {
                    *value = m.data[p * m.row_stride + (j * PANEL + c) * m.col_stride];
                }
            }
        }
        Self { data, rows, kernel }
    }
}

impl<F> Packed<F> {
    /// The whole matrix as panels.
    pub fn as_ref(&self) -> PackedRef<'_, F> {
        PackedRef {
            data: &self.data,
            panel_rows: self.rows,
            row: 0,
            panel: 0,
            kernel: self.kernel,
        }
    }
}

/// A view of a [`Packed`] matrix: rows from `row`, columns from panel `panel`; its shape is
/// that of the [`MatRef`] that carries it.
#[derive(Debug, Clone, Copy)]
pub struct PackedRef<'a, F> {
    data: &'a [F],
    panel_rows: usize,
    row: usize,
    panel: usize,
    kernel: PackedKernel<F>,
}

impl<'a, F> PackedRef<'a, F> {
    /// `dst ← a · self` (or `dst + a · self`) through the kernel it was packed for.
    ///
    /// # Safety
    /// As [`PackedKernel`]'s.
    pub unsafe fn product(
        self,
        dst: *mut F,
        row_stride: usize,
        a: MatRef<F>,
        n: usize,
        accumulate: bool,
    ) {
        // SAFETY: the caller's contract; the kernel is this CPU's (`HostFloat::packed_kernel`).
        unsafe { (self.kernel)(dst, row_stride, a, self, n, accumulate) }
    }

    /// The view from column `col` on, if it starts a panel.
    pub fn from_col(self, col: usize) -> Option<Self> {
        col.is_multiple_of(PANEL).then_some(Self {
            panel: self.panel + col / PANEL,
            ..self
        })
    }

    /// The view from row `row` on.
    pub fn from_row(self, row: usize) -> Self {
        Self {
            row: self.row + row,
            ..self
        }
    }

    /// Panics unless `a · self[.., ..n]` is a product a kernel can run: `a` with rows
    /// contiguous, and `[a.cols, n]` from here inside the packed matrix.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn check_product(&self, a: &MatRef<F>, n: usize) {
        assert_eq!(a.col_stride, 1, "packed product of a transposed view");
        let k = a.cols;
        let panels = self.panel + n.div_ceil(PANEL);
        assert!(
            self.row + k <= self.panel_rows && panels * self.panel_rows * PANEL <= self.data.len(),
            "packed view out of bounds"
        );
    }
}

/// The fastest `f32` kernel this CPU runs, if any.
pub fn f32_kernel() -> Option<PackedKernel<f32>> {
    f32_kernels().first().copied()
}

/// Every `f32` kernel this CPU runs, fastest first.
fn f32_kernels() -> Vec<PackedKernel<f32>> {
    #[allow(unused_mut)]
    let mut kernels: Vec<PackedKernel<f32>> = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") {
            kernels.push(avx512::product);
        }
        if has!("avx2") && has!("fma") {
            kernels.push(avx2::product);
        }
    }
    kernels
}

#[cfg(target_arch = "x86_64")]
pub mod avx2 {
    use std::arch::x86_64::*;

    use super::{MatRef, PackedRef, PANEL};

    /// Rows per kernel call: 6 × 2 accumulators, 2 registers of `b` and 1 of `a` fill 15 of
    /// AVX2's 16 registers.
    const ROWS: usize = 6;

    /// `dst ← a · b` (or `dst + a · b`) for `a` with unit column stride and `b` `[a.cols, n]`
    /// packed; `dst` is row-major with rows `row_stride` apart.
    ///
    /// # Safety
    /// As `gemm_raw`'s; and the CPU must have AVX2 and FMA ([`super::f32_kernel`]).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn product(
        dst: *mut f32,
        row_stride: usize,
        a: MatRef<f32>,
        b: PackedRef<f32>,
        n: usize,
        accumulate: bool,
    ) {
        b.check_product(&a, n);
        let (m, k) = (a.rows, a.cols);
        for j in 0..n.div_ceil(PANEL) {
            let cols = PANEL.min(n - j * PANEL);
            let panel = (b.panel + j) * b.panel_rows + b.row;
            let tile = Tile {
                k,
                a_stride: a.row_stride,
                b: b.data[panel * PANEL..].as_ptr(),
                dst_stride: row_stride,
                cols,
                accumulate,
            };
            for i in (0..m).step_by(ROWS) {
                // SAFETY: rows `i..i + R` of `a` and of `dst`, columns `16j..16j + cols` of
                // `dst`: inside the views the caller vouched for.
                unsafe {
                    let a = a.data.as_ptr().add(i * a.row_stride);
                    let dst = dst.add(i * row_stride + j * PANEL);
                    match m - i {
                        1 => tile.run::<1>(a, dst),
                        2 => tile.run::<2>(a, dst),
                        3 => tile.run::<3>(a, dst),
                        4 => tile.run::<4>(a, dst),
                        5 => tile.run::<5>(a, dst),
                        _ => tile.run::<ROWS>(a, dst),
                    }
                }
            }
        }
    }

    /// One panel's product with `R` rows of `a`.
    struct Tile {
        k: usize,
        a_stride: usize,
        b: *const f32,
        dst_stride: usize,
        cols: usize,
        accumulate: bool,
    }

    impl Tile {
        #[inline(always)]
        unsafe fn run<const R: usize>(&self, a: *const f32, dst: *mut f32) {
            // SAFETY (whole body): `a` has `R` rows of `k` values, `self.b` `k` rows of 16,
            // `dst` `R` rows of `cols` (see `product`); the intrinsics need AVX2 + FMA,
            // enabled on the caller.
            unsafe {
                let mut acc = [[_mm256_setzero_ps(); 2]; R];
                for p in 0..self.k {
                    let b0 = _mm256_loadu_ps(self.b.add(p * PANEL));
                    let b1 = _mm256_loadu_ps(self.b.add(p * PANEL + 8));
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let a = _mm256_broadcast_ss(&*a.add(r * self.a_stride + p));
                        acc[0] = _mm256_fmadd_ps(a, b0, acc[0]);
                        acc[1] = _mm256_fmadd_ps(a, b1, acc[1]);
                    }
                }
                for (r, acc) in acc.iter().enumerate() {
                    let row = dst.add(r * self.dst_stride);
                    if self.cols == PANEL {
                        let (mut low, mut high) = (acc[0], acc[1]);
                        if self.accumulate {
                            low = _mm256_add_ps(low, _mm256_loadu_ps(row));
                            high = _mm256_add_ps(high, _mm256_loadu_ps(row.add(8)));
                        }
                        _mm256_storeu_ps(row, low);
                        _mm256_storeu_ps(row.add(8), high);
                        continue;
                    }
                    let mut sums = [0.0f32; PANEL];
                    _mm256_storeu_ps(sums.as_mut_ptr(), acc[0]);
                    _mm256_storeu_ps(sums.as_mut_ptr().add(8), acc[1]);
                    for (c, &sum) in sums[..self.cols].iter().enumerate() {
                        let out = row.add(c);
                        *out = if self.accumulate { *out + sum } else { sum };
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub mod avx512 {
    use std::arch::x86_64::*;

    use super::{MatRef, PackedRef, PANEL};

    /// Rows per tile: 8 rows × 2 panels = 16 accumulators (enough independent fused
    /// multiply-adds to keep both units busy), 2 registers of `b` and 1 of `a`: 19 of 32.
    const ROWS: usize = 8;
    /// Rows from which a product prefetches its rows of `a` ahead.
    const TALL: usize = 1024;
    /// `f32`s per cache line.
    const LINE: usize = 16;

    /// As [`super::avx2::product`], two panels (32 columns) at a time, partial panels through
    /// masked loads and stores.
    ///
    /// # Safety
    /// As `gemm_raw`'s; and the CPU must have AVX-512F ([`super::f32_kernel`]).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn product(
        dst: *mut f32,
        row_stride: usize,
        a: MatRef<f32>,
        b: PackedRef<f32>,
        n: usize,
        accumulate: bool,
    ) {
        b.check_product(&a, n);
        let (m, k) = (a.rows, a.cols);
        let panels = n.div_ceil(PANEL);
        // A tall product (a per-step head over a whole sequence) reads `a` from memory: each
        // full tile fetches the rows of the tile two ahead as it goes (the head's forward at
        // T = 1000 2.5-2.9 -> 2.1-2.3 ms).
        let prefetch = m >= TALL && panels <= 2;
        for j in (0..panels).step_by(2) {
            let panel = (b.panel + j) * b.panel_rows + b.row;
            let tile = Tile {
                k,
                a_stride: a.row_stride,
                b: b.data[panel * PANEL..].as_ptr(),
                next_panel: b.panel_rows * PANEL,
                dst_stride: row_stride,
                masks: [column_mask(n, j), column_mask(n, j + 1)],
                accumulate,
                ahead: 2 * ROWS * a.row_stride,
            };
            for i in (0..m).step_by(ROWS) {
                // SAFETY: rows `i..i + R` of `a` and of `dst`, the columns of panels `j` and
                // `j + 1` below `n`: inside the views the caller vouched for.
                unsafe {
                    let a = a.data.as_ptr().add(i * a.row_stride);
                    let dst = dst.add(i * row_stride + j * PANEL);
                    match (m - i, j + 1 < panels) {
                        (rows, true) if prefetch && rows >= ROWS => {
                            tile.run::<ROWS, 2, true>(a, dst)
                        }
                        (rows, false) if prefetch && rows >= ROWS => {
                            tile.run::<ROWS, 1, true>(a, dst)
                        }
                        (1, true) => tile.run::<1, 2, false>(a, dst),
                        (2, true) => tile.run::<2, 2, false>(a, dst),
                        (3, true) => tile.run::<3, 2, false>(a, dst),
                        (4, true) => tile.run::<4, 2, false>(a, dst),
                        (5, true) => tile.run::<5, 2, false>(a, dst),
                        (6, true) => tile.run::<6, 2, false>(a, dst),
                        (7, true) => tile.run::<7, 2, false>(a, dst),
                        (_, true) => tile.run::<ROWS, 2, false>(a, dst),
                        (1, false) => tile.run::<1, 1, false>(a, dst),
                        (2, false) => tile.run::<2, 1, false>(a, dst),
                        (3, false) => tile.run::<3, 1, false>(a, dst),
                        (4, false) => tile.run::<4, 1, false>(a, dst),
                        (5, false) => tile.run::<5, 1, false>(a, dst),
                        (6, false) => tile.run::<6, 1, false>(a, dst),
                        (7, false) => tile.run::<7, 1, false>(a, dst),
                        (_, false) => tile.run::<ROWS, 1, false>(a, dst),
                    }
                }
            }
        }
    }

    /// The columns of panel `j` below `n`, as a lane mask.
    fn column_mask(n: usize, j: usize) -> __mmask16 {
        let cols = n.saturating_sub(j * PANEL).min(PANEL);
        ((1u32 << cols) - 1) as __mmask16
    }

    /// The product of `R` rows of `a` with `P` panels.
    struct Tile {
        k: usize,
        a_stride: usize,
        b: *const f32,
        next_panel: usize,
        dst_stride: usize,
        masks: [__mmask16; 2],
        accumulate: bool,
        /// Elements from a tile's first row to the first row it prefetches, if it does.
        ahead: usize,
    }

    impl Tile {
        #[inline(always)]
        unsafe fn run<const R: usize, const P: usize, const PREFETCH: bool>(
            &self,
            a: *const f32,
            dst: *mut f32,
        ) {
            // SAFETY (whole body): `a` has `R` rows of `k` values, `self.b` `P` panels of `k`
            // rows of 16, `dst` `R` rows with the masked columns of `P` panels (see
            // `product`); the intrinsics need AVX-512F, enabled on the caller.
            unsafe {
                let mut acc = [[_mm512_setzero_ps(); P]; R];
                let lines = self.k.div_ceil(LINE);
                for p in 0..self.k {
                    if PREFETCH && p < R * lines {
                        let (r, line) = (p / lines, p % lines);
                        let at = a.wrapping_add(self.ahead + r * self.a_stride + line * LINE);
                        _mm_prefetch::<_MM_HINT_T0>(at.cast::<i8>());
                    }
                    let mut b = [_mm512_setzero_ps(); P];
                    for (q, b) in b.iter_mut().enumerate() {
                        *b = _mm512_loadu_ps(self.b.add(q * self.next_panel + p * PANEL));
                    }
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let a = _mm512_set1_ps(*a.add(r * self.a_stride + p));
                        for (acc, &b) in acc.iter_mut().zip(&b) {
                            *acc = _mm512_fmadd_ps(a, b, *acc);
                        }
                    }
                }
                for (r, acc) in acc.iter().enumerate() {
                    for (q, &sum) in acc.iter().enumerate() {
                        let (out, mask) = (dst.add(r * self.dst_stride + q * PANEL), self.masks[q]);
                        let sum = if self.accumulate {
                            _mm512_add_ps(sum, _mm512_maskz_loadu_ps(mask, out))
                        } else {
                            sum
                        };
                        _mm512_mask_storeu_ps(out, mask, sum);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{matmul, MatMut};
    use super::*;

    fn value(i: usize) -> f32 {
        ((i * 7919) % 997) as f32 / 997.0 - 0.5
    }

    /// `dst[r][c] (+)= Σ a[r][i] · b[i][c]`, summed in f64.
    fn naive(a: MatRef<f32>, b: MatRef<f32>, dst: &mut [f32], stride: usize, accumulate: bool) {
        for r in 0..a.rows {
            for c in 0..b.cols {
                let sum: f64 = (0..a.cols)
                    .map(|i| {
                        let x = a.data[r * a.row_stride + i * a.col_stride];
                        x as f64 * b.data[i * b.row_stride + c * b.col_stride] as f64
                    })
                    .sum();
                let cell = &mut dst[r * stride + c];
                *cell = if accumulate {
                    *cell + sum as f32
                } else {
                    sum as f32
                };
            }
        }
    }

    /// `a · b` through `matmul` on `threads` threads, into a strided output that starts as
    /// `start`, and the naive product of the same.
    fn both(
        a: MatRef<f32>,
        b: MatRef<f32>,
        accumulate: bool,
        threads: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        let (m, n) = (a.rows, b.cols);
        let stride = n + 3;
        let start: Vec<f32> = (0..m * stride).map(|i| value(i + 5)).collect();
        let (mut fast, mut expected) = (start.clone(), start);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            matmul(
                &mut MatMut::strided(&mut fast, m, n, stride),
                a,
                b,
                accumulate,
            )
        });
        naive(a, b, &mut expected, stride, accumulate);
        (fast, expected)
    }

    fn assert_close(fast: &[f32], expected: &[f32], what: &str) {
        let worst = fast
            .iter()
            .zip(expected)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(worst < 1e-5, "{what}: {worst}");
    }

    #[test]
    fn packed_products_match_the_naive_product() {
        // 13 rows (tiles of 6 and 8 rows and a remainder), 45 columns (two panels and a partial
        // one: a pair and a single for the two-panel kernel), `a` with rows wider than it.
        let (m, k, n) = (13, 37, 45);
        let a_data: Vec<f32> = (0..m * (k + 2)).map(value).collect();
        let b_data: Vec<f32> = (0..k * n).map(|i| value(i + 11)).collect();
        let a = MatRef::strided(&a_data, m, k, k + 2);
        let plain = MatRef::new(&b_data, k, n);
        assert_eq!(Packed::of(plain).is_some(), f32_kernel().is_some());
        for kernel in f32_kernels() {
            let packed = Packed::with_kernel(plain, kernel);
            let b = plain.with_packed(&packed);
            for accumulate in [false, true] {
                // The whole weight, columns from a panel's start (still packed, one and a
                // half panels), columns from inside a panel (not packed), a range of its rows.
                let cases = [
                    ("whole", a, b),
                    ("cols 16..45", a, b.cols(16, 29)),
                    ("cols 5..15", a, b.cols(5, 10)),
                    ("rows 4..24", a.cols(0, 20), b.rows_range(4, 20)),
                ];
                for (what, a, b) in cases {
                    assert_eq!(b.packed.is_some(), what != "cols 5..15");
                    let (fast, expected) = both(a, b, accumulate, 1);
                    assert_close(&fast, &expected, what);
                }
            }
        }
    }

    #[test]
    fn every_kernel_gives_the_same_sums() {
        // A step's product, in panels split over two threads.
        let (m, k, n) = (21, 128, 520);
        let a_data: Vec<f32> = (0..m * k).map(value).collect();
        let b_data: Vec<f32> = (0..k * n).map(|i| value(i + 3)).collect();
        let (a, plain) = (MatRef::new(&a_data, m, k), MatRef::new(&b_data, k, n));
        let results: Vec<Vec<f32>> = f32_kernels()
            .into_iter()
            .map(|kernel| {
                let packed = Packed::with_kernel(plain, kernel);
                both(a, plain.with_packed(&packed), true, 2).0
            })
            .collect();
        assert!(results.windows(2).all(|pair| pair[0] == pair[1]));
    }

    #[test]
    fn packed_products_do_not_depend_on_the_thread_count() {
        // A step's product, large enough to be split by columns over two threads.
        let (m, k, n) = (64, 128, 520);
        let a_data: Vec<f32> = (0..m * k).map(value).collect();
        let b_data: Vec<f32> = (0..k * n).map(|i| value(i + 3)).collect();
        let plain = MatRef::new(&b_data, k, n);
        let packed = Packed::of(plain);
        let b = packed.as_ref().map_or(plain, |p| plain.with_packed(p));
        let a = MatRef::new(&a_data, m, k);
        let (one, expected) = both(a, b, true, 1);
        let (two, _) = both(a, b, true, 2);
        assert_close(&one, &expected, "one thread");
        assert_eq!(one, two);
    }
}
