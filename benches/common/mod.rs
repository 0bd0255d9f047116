//! What the benchmark binaries share: METHOD.md's timing (warm-up, then the median of runs each
//! closed by a device sync), the dtype argument, and the results table.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{FloatDType, Tensor, TensorPrimitive};

/// The upper middle of an even count.
fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.partial_cmp(b).unwrap());
    xs[xs.len() / 2]
}

/// Median milliseconds of `f`, each run closed by a device sync. Each run's output is dropped only
/// after its sync: fusion does not compute what a fused block drops unread, so timing a dropped
/// result would time less than the op (measured: a fused matmul with an element-wise op after it
/// took 0.05 ms dropped, 1.5 ms kept, on lavapipe).
pub fn time<B: Backend, T>(
    device: &B::Device,
    warmup: usize,
    iters: usize,
    mut f: impl FnMut() -> T,
) -> f64 {
    for _ in 0..warmup {
        let out = f();
        B::sync(device).expect("device sync");
        drop(out);
    }
    let runs = (0..iters)
        .map(|_| {
            let t0 = Instant::now();
            let out = f();
            B::sync(device).expect("device sync");
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            drop(out);
            ms
        })
        .collect();
    median(runs)
}

/// A graph node whose backward hands its parent a given gradient, whatever reaches it: the root
/// of [`backward_with`].
#[derive(Debug)]
#[allow(dead_code)] // benches/matmul.rs shares this module and times no backward.
struct Seed;

impl<B: Backend> Backward<B, 1> for Seed {
    /// The gradient to hand on.
    type State = FloatTensor<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _c: &mut Checkpointer) {
        // The ones Burn seeds the root with: taken off the graph, not used.
        drop(grads.consume::<B>(&ops.node));
        if let Some(parent) = &ops.parents[0] {
            grads.register::<B>(parent.id, ops.state);
        }
    }
}

/// The backward of `o` with `d_o` as its output's gradient, as torch's `o.backward(d_o)` (what
/// FLA's benchmarks and `benches/fla_gated.py` time). Burn's `backward` starts from ones of the
/// root's shape, so the usual spelling, `(o · d_o).sum().backward()`, adds a product, a sum and
/// the product's backward to what is timed (about 0.5 ms of an 8 ms `chunk_gla` at T = 4096 on
/// an H100, CubeCL's profiler, 2026-12-07); here only the ones are added (one fill).
#[allow(dead_code)] // As `Seed`.
pub fn backward_with<B: Backend>(o: Tensor<Autodiff<B>, 4>, d_o: Tensor<B, 4>) -> Gradients {
    let o = o.into_primitive().tensor();
    let d_o = d_o.into_primitive().tensor();
    let out = match Seed
        .prepare::<NoCheckpointing>([o.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(d_o, o.primitive.clone()),
        OpsKind::UnTracked(prep) => prep.finish(o.primitive.clone()),
    };
    Tensor::<Autodiff<B>, 4>::from_primitive(TensorPrimitive::Float(out)).backward()
}

/// `f32`, `f16` or `bf16`, as the benches' `--dtype` names them.
pub fn dtype(name: &str) -> FloatDType {
    match name {
        "f32" => FloatDType::F32,
        "f16" => FloatDType::F16,
        "bf16" => FloatDType::BF16,
        other => panic!("unknown dtype {other}"),
    }
}

/// A results table, printed row by row as it fills and, given a folder, written there as
/// `NAME.csv` and `NAME.md` after every row (a run cut short by a time limit keeps what it
/// measured).
pub struct Table {
    csv: String,
    md: String,
    out: Option<(PathBuf, String)>,
}

impl Table {
    /// `columns` as the CSV header; `md_header` the markdown table's header and rule lines;
    /// `out`: the folder (created) and the files' name.
    pub fn new(columns: &str, md_header: &str, out: Option<(&Path, &str)>) -> Self {
        print!("{md_header}");
        let out = out.map(|(dir, name)| {
            std::fs::create_dir_all(dir).expect("output folder");
            (dir.to_path_buf(), name.to_string())
        });
        Table {
            csv: format!("{columns}\n"),
            md: md_header.to_string(),
            out,
        }
    }

    /// One row: `md_row` (a markdown line, printed) and `csv_row`.
    pub fn row(&mut self, md_row: &str, csv_row: &str) {
        println!("{md_row}");
        self.md.push_str(md_row);
        self.md.push('\n');
        self.csv.push_str(csv_row);
        self.csv.push('\n');
        if let Some((dir, name)) = &self.out {
            std::fs::write(dir.join(format!("{name}.csv")), &self.csv).expect("write the CSV");
            std::fs::write(dir.join(format!("{name}.md")), &self.md).expect("write the table");
        }
    }
}
