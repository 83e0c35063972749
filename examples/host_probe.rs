use rnn_zoo::cell::{gru::GruKernel, lstm::LstmKernel, rnn::RnnKernel};
use rnn_zoo::host::{backward, forward, HostInput};
use rnn_zoo::ops::Recurrence;
use std::time::Instant;
fn probe<K: Recurrence>(name: &str, k: K, len: usize, batch: usize) {
    let n_in = len * batch * k.input_width();
    let xp: Vec<f32> = (0..n_in)
        .map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5)
        .collect();
    let s0 = vec![0.1f32; batch * k.state_width()];
    let np: usize = k.param_shapes().iter().map(|[r, c]| r * c).sum();
    let params: Vec<f32> = (0..np)
        .map(|i| ((i * 104729) % 1000) as f32 * 1e-4 - 0.05)
        .collect();
    let input = HostInput {
        xp: &xp,
        state0: &s0,
        params: &params,
        mask: None,
        len,
        batch,
        reverse: false,
    };
    let grad = vec![0.01f32; len * batch * (k.output_width() + k.state_width())];
    let mut packed = forward(&k, input);
    let reps = 10;
    let t = Instant::now();
    for _ in 0..reps {
        packed = forward(&k, input);
    }
    let f = t.elapsed().as_secs_f64() / reps as f64 * 1e3;
    let t = Instant::now();
    for _ in 0..reps {
        let _ = backward(&k, input, &packed, &grad);
    }
    let b = t.elapsed().as_secs_f64() / reps as f64 * 1e3;
    println!("{name}: fwd {f:.2} ms  bwd {b:.2} ms");
}
fn main() {
    let threads: usize = std::env::var("T")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(2);
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .unwrap();
    probe(
        "rnn",
        RnnKernel {
            hidden: 128,
            relu: false,
        },
        100,
        128,
    );
    if std::env::var("ONLY_RNN").is_ok() {
        return;
    }
    probe(
        "lstm",
        LstmKernel {
            hidden: 128,
            peephole: false,
            coupled: false,
        },
        100,
        128,
    );
    probe(
        "gru",
        GruKernel {
            hidden: 128,
            reset_after: true,
        },
        100,
        128,
    );
}
