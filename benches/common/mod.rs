//! What the benchmark binaries share: METHOD.md's timing (warm-up, then the median of runs each
//! closed by a device sync), the dtype argument, and the results table.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::backend::Backend;
use burn::tensor::FloatDType;

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
