//! What the benchmark binaries share: METHOD.md's timing (warm-up, then the median of runs each
//! closed by a device sync), the dtype argument, and the results table.

use std::path::Path;
use std::time::Instant;

use burn::tensor::backend::Backend;
use burn::tensor::FloatDType;

pub fn median(mut xs: Vec<f64>) -> f64 {
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

/// `f32`, `f16` or `bf16`, as the benches' `--dtype` names them.
pub fn dtype(name: &str) -> FloatDType {
    match name {
        "f32" => FloatDType::F32,
        "f16" => FloatDType::F16,
        "bf16" => FloatDType::BF16,
        other => panic!("unknown dtype {other}"),
    }
}

/// A results table, printed row by row as it fills and written as `NAME.csv` and `NAME.md`.
pub struct Table {
    csv: String,
    md: String,
}

impl Table {
    /// `columns` as the CSV header; `md_header` the markdown table's header and rule lines.
    pub fn new(columns: &str, md_header: &str) -> Self {
        print!("{md_header}");
        Table {
            csv: format!("{columns}\n"),
            md: md_header.to_string(),
        }
    }

    /// One row: `md_row` (a markdown line, printed) and `csv_row`.
    pub fn row(&mut self, md_row: &str, csv_row: &str) {
        println!("{md_row}");
        self.md.push_str(md_row);
        self.md.push('\n');
        self.csv.push_str(csv_row);
        self.csv.push('\n');
    }

    /// Writes `NAME.csv` and `NAME.md` into `dir` (created), if given.
    pub fn write(&self, dir: Option<&Path>, name: &str) {
        if let Some(dir) = dir {
            std::fs::create_dir_all(dir).expect("output folder");
            std::fs::write(dir.join(format!("{name}.csv")), &self.csv).expect("write the CSV");
            std::fs::write(dir.join(format!("{name}.md")), &self.md).expect("write the table");
        }
    }
}
