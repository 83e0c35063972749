use rnn_zoo::host::{matmul, MatMut, MatRef};
use std::time::Instant;
fn main() {
    rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build_global()
        .unwrap();
    let (m, k, n) = (128usize, 512usize, 128usize);
    let a = vec![0.5f32; m * k];
    let w = vec![0.25f32; n * k]; // [n, k]: used transposed
    let wt = vec![0.25f32; k * n];
    let mut c = vec![0f32; m * n];
    let reps = 500;
    for (name, b) in [
        ("W^T view", MatRef::new(&w, n, k).t()),
        ("contiguous", MatRef::new(&wt, k, n)),
    ] {
        for _ in 0..5 {
            matmul(
                &mut MatMut::new(&mut c, m, n),
                MatRef::new(&a, m, k),
                b,
                false,
            );
        }
        let t = Instant::now();
        for _ in 0..reps {
            matmul(
                &mut MatMut::new(&mut c, m, n),
                MatRef::new(&a, m, k),
                b,
                false,
            );
        }
        let s = t.elapsed().as_secs_f64() / reps as f64;
        println!(
            "{name}: {:.3} ms, {:.1} GFLOP/s",
            s * 1e3,
            2.0 * (m * n * k) as f64 / s / 1e9
        );
    }
    // the final product: A^T (strided rows) x G
    let (rows, kk, nn, stride) = (12800usize, 128usize, 512usize, 896usize);
    let packed = vec![0.1f32; rows * stride];
    let g = vec![0.2f32; rows * nn];
    let mut dw = vec![0f32; kk * nn];
    for (name, a) in [(
        "A^T strided",
        MatRef::strided(&packed, rows, kk, stride).t(),
    )] {
        let t = Instant::now();
        for _ in 0..10 {
            matmul(
                &mut MatMut::new(&mut dw, kk, nn),
                a,
                MatRef::new(&g, rows, nn),
                true,
            );
        }
        let s = t.elapsed().as_secs_f64() / 10.0;
        println!(
            "{name}: {:.3} ms, {:.1} GFLOP/s",
            s * 1e3,
            2.0 * (rows * nn * kk) as f64 / s / 1e9
        );
    }
    for (m, k, n) in [(128usize, 128usize, 128usize), (128, 128, 512)] {
        let a = vec![0.5f32; m * k];
        let b = vec![0.25f32; k * n];
        let mut c = vec![0f32; m * n];
        for par in [true, false] {
            let t = Instant::now();
            for _ in 0..reps {
                if par {
                    matmul(
                        &mut MatMut::new(&mut c, m, n),
                        MatRef::new(&a, m, k),
                        MatRef::new(&b, k, n),
                        false,
                    );
                } else {
                    rayon::ThreadPoolBuilder::new()
                        .num_threads(1)
                        .build()
                        .unwrap()
                        .install(|| {
                            matmul(
                                &mut MatMut::new(&mut c, m, n),
                                MatRef::new(&a, m, k),
                                MatRef::new(&b, k, n),
                                false,
                            )
                        });
                }
            }
            let s = t.elapsed().as_secs_f64() / reps as f64;
            println!(
                "{m}x{k}x{n} par={par}: {:.3} ms, {:.1} GFLOP/s",
                s * 1e3,
                2.0 * (m * n * k) as f64 / s / 1e9
            );
        }
    }
}
