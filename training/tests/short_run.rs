//! A short training run on the tensor-op backend lowers the validation loss and writes metrics.

use std::process::Command;

#[test]
fn short_run_lowers_validation_loss() {
    let dir = std::env::temp_dir().join(format!("fla-train-test-{}", std::process::id()));
    let metrics = dir.join("metrics.csv");
    let out = Command::new(env!("CARGO_BIN_EXE_fla-train"))
        .args([
            "--backend",
            "ndarray",
            "--steps",
            "15",
            "--batch",
            "4",
            "--seq-len",
            "32",
        ])
        .args(["--eval-every", "15", "--warmup", "3", "--metrics"])
        .arg(&metrics)
        .output()
        .expect("fla-train runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fla-train failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().expect("a summary line");
    // "validation loss A -> B; metrics in ..."
    let nums: Vec<f64> = last
        .trim_start_matches("validation loss ")
        .split([' ', ';'])
        .filter_map(|w| w.parse().ok())
        .collect();
    assert_eq!(nums.len(), 2, "summary line: {last}");
    assert!(
        nums[1] < nums[0] - 0.5,
        "validation loss did not fall clearly: {last}"
    );
    let csv = std::fs::read_to_string(&metrics).expect("metrics written");
    assert_eq!(
        csv.lines().count(),
        1 + 1 + 15,
        "header, step 0 and 15 steps"
    );
}

#[test]
fn unknown_backend_is_an_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_fla-train"))
        .args(["--backend", "tpu", "--steps", "1"])
        .output()
        .expect("fla-train runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not built in"));
}
