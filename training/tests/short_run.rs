//! Short training runs on the tensor-op backend: the validation loss falls, metrics are written,
//! and a run resumed from a checkpoint continues exactly as an uninterrupted one.

use std::process::Command;

/// fla-train with its run folder (burn-train's checkpoints and logs), metrics and exported model
/// in `dir`.
fn fla_train(dir: &std::path::Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fla-train"));
    cmd.arg("--metrics")
        .arg(dir.join("metrics.csv"))
        .arg("--run-dir")
        .arg(dir)
        .arg("--export")
        .arg(dir.join("model"))
        // wgpu runs: Mesa warns without one.
        .env("XDG_RUNTIME_DIR", std::env::temp_dir());
    cmd
}

/// Runs `cmd` to its end; its stdout, once it has succeeded (else a failure quoting both
/// streams).
fn succeeds(cmd: &mut Command) -> String {
    let out = cmd.output().expect("the binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The held-out perplexity fla-eval prints ("... loss L, perplexity P, ...").
fn perplexity(stdout: &str) -> f64 {
    stdout
        .split("perplexity ")
        .nth(2)
        .and_then(|w| w.split(',').next())
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no perplexity in {stdout}"))
}

/// The two losses of fla-train's last line, "validation loss A -> B; metrics in ...".
fn summary_losses(stdout: &str) -> (String, Vec<f64>) {
    let last = stdout.lines().last().unwrap_or_default().to_string();
    let nums = last
        .trim_start_matches("validation loss ")
        .split([' ', ';'])
        .filter_map(|w| w.parse().ok())
        .collect();
    (last, nums)
}

#[test]
fn short_run_lowers_validation_loss() {
    let dir = std::env::temp_dir().join(format!("fla-train-test-{}", std::process::id()));
    let metrics = dir.join("metrics.csv");
    let stdout = succeeds(
        fla_train(&dir)
            .args(["--backend", "ndarray", "--steps", "15", "--batch", "4"])
            .args(["--seq-len", "32", "--eval-every", "15", "--warmup", "3"]),
    );
    let (last, nums) = summary_losses(&stdout);
    assert_eq!(nums.len(), 2, "summary line: {last}");
    assert!(
        nums[1] < nums[0] - 0.5,
        "validation loss did not fall clearly: {last}"
    );
    let csv = std::fs::read_to_string(&metrics).expect("metrics written");
    let svg = std::fs::read_to_string(metrics.with_extension("svg")).expect("loss curves drawn");
    assert!(svg.contains("validation"), "loss.svg without its curves");
    let png = std::fs::read(metrics.with_extension("png")).expect("loss curves drawn as PNG");
    assert!(png.starts_with(b"\x89PNG"), "metrics.png is not a PNG");
    assert_eq!(
        csv.lines().count(),
        1 + 1 + 15,
        "header, step 0 and 15 steps"
    );
    // burn-train's metric logs of the one evaluation window, training and validation.
    for split in ["train", "valid"] {
        let log = dir.join(split).join("epoch-1").join("Loss.log");
        let text =
            std::fs::read_to_string(&log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
        assert!(!text.trim().is_empty(), "{} is empty", log.display());
    }
    // The final checkpoint, in burn-train's layout with the loop's state beside it.
    for f in [
        "model-15.mpk",
        "optim-15.mpk",
        "scheduler-15.mpk",
        "state-15.json",
    ] {
        assert!(
            dir.join("checkpoint").join(f).is_file(),
            "no checkpoint/{f}"
        );
    }
    // The exported model (FLA's format) loads in fla-generate and continues a prompt.
    let out = Command::new(env!("CARGO_BIN_EXE_fla-generate"))
        .args([
            "--backend",
            "ndarray",
            "--prompt",
            "Of Man",
            "--max-new-tokens",
            "8",
        ])
        .arg("--model")
        .arg(dir.join("model"))
        .output()
        .expect("fla-generate runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "fla-generate failed: {text}\n{stderr}"
    );
    assert!(
        text.starts_with("Of Man") && text.trim_end().len() > 6,
        "{text}"
    );
    assert!(stderr.contains("decoding: 8 tokens"), "{stderr}");
    // The same prompt as ids ("Of Man" in bytes), greedy both times: the same new tokens, as ids,
    // and warm timings after a first run.
    let out = Command::new(env!("CARGO_BIN_EXE_fla-generate"))
        .args([
            "--backend",
            "ndarray",
            "--prompt-ids",
            "79,102,32,77,97,110",
        ])
        .args(["--max-new-tokens", "8", "--repeat", "2"])
        .arg("--model")
        .arg(dir.join("model"))
        .output()
        .expect("fla-generate runs");
    let ids = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{ids}\n{stderr}");
    let ids: Vec<u8> = ids
        .trim()
        .trim_matches(['[', ']'])
        .split(", ")
        .map(|i| i.parse().expect("a byte id"))
        .collect();
    assert_eq!(
        String::from_utf8_lossy(&ids),
        text.strip_prefix("Of Man")
            .and_then(|t| t.strip_suffix('\n'))
            .expect("prompt, new text, newline")
    );
    assert!(
        stderr.contains("median of 1 runs after a warm-up run"),
        "{stderr}"
    );
    // fla-eval reads it too: perplexity on the held-out split, below the 256 of a uniform guess
    // after the loss fell, and a multiple-choice file.
    let questions = dir.join("questions.jsonl");
    std::fs::write(
        &questions,
        "{\"context\": \"Of Man's first\", \"choices\": [\" disobedience\", \"zqx\"], \"label\": 0}\n",
    )
    .expect("write questions");
    let out = Command::new(env!("CARGO_BIN_EXE_fla-eval"))
        .args([
            "--backend",
            "ndarray",
            "--max-tokens",
            "300",
            "--seq-len",
            "64",
        ])
        .arg("--model")
        .arg(dir.join("model"))
        .arg("--choices")
        .arg(&questions)
        .output()
        .expect("fla-eval runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fla-eval failed: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ppl = perplexity(&text);
    assert!(ppl > 1.0 && ppl < 256.0, "{text}");
    assert!(
        text.contains("299 tokens") && text.contains("1 questions, acc"),
        "{text}"
    );
    // A directory without a model is a clear error.
    let out = Command::new(env!("CARGO_BIN_EXE_fla-generate"))
        .args(["--backend", "ndarray", "--prompt", "x", "--model"])
        .arg(dir.join("checkpoint"))
        .output()
        .expect("fla-generate runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("config.json"));
}

/// The Gated DeltaNet preset learns too (the delta-rule op's tensor-op backward in a real model).
#[test]
fn gated_deltanet_run_lowers_validation_loss() {
    family_run_lowers_validation_loss("gated-deltanet", "ndarray", "Gated DeltaNet");
}

/// The Transformer++ baseline learns on the fused attention kernels (wgpu: lavapipe in CI) through
/// their hand-derived backward.
#[test]
fn transformer_run_lowers_validation_loss() {
    family_run_lowers_validation_loss("transformer", "wgpu", "Transformer");
}

fn family_run_lowers_validation_loss(model: &str, backend: &str, family: &str) {
    let dir = std::env::temp_dir().join(format!("fla-train-{model}-{}", std::process::id()));
    let stdout = succeeds(
        fla_train(&dir)
            .args(["--backend", backend, "--model", model, "--steps", "15"])
            .args([
                "--batch",
                "4",
                "--seq-len",
                "32",
                "--eval-every",
                "15",
                "--warmup",
                "3",
            ]),
    );
    assert!(stdout.contains(family), "{stdout}");
    let (last, nums) = summary_losses(&stdout);
    assert!(
        nums.len() == 2 && nums[1] < nums[0] - 0.5,
        "validation loss did not fall clearly: {last}"
    );
}

#[test]
fn unknown_model_is_an_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_fla-train"))
        .args(["--backend", "ndarray", "--model", "mamba", "--steps", "1"])
        .output()
        .expect("fla-train runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown --model"));
}

#[test]
fn zero_heads_is_an_error() {
    for model in ["gla", "gated-deltanet", "hgrn2"] {
        let out = Command::new(env!("CARGO_BIN_EXE_fla-train"))
            .args(["--backend", "ndarray", "--model", model, "--heads", "0"])
            .args(["--steps", "1"])
            .output()
            .expect("fla-train runs");
        assert!(!out.status.success(), "{model}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--heads 0"), "{model}: {err}");
    }
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

/// Runs fla-train on the tensor-op backend with a small model in `dir`; returns (success, stdout,
/// stderr).
fn train(dir: &std::path::Path, extra: &[&str]) -> (bool, String, String) {
    // Two sequences per batch unless `extra` says otherwise.
    let batch: &[&str] = if extra.contains(&"--batch") {
        &[]
    } else {
        &["--batch", "2"]
    };
    let out = fla_train(dir)
        .args(batch)
        .args(["--backend", "ndarray", "--seq-len", "16", "--hidden", "32"])
        .args([
            "--eval-every",
            "4",
            "--warmup",
            "2",
            "--checkpoint-every",
            "4",
        ])
        .args(extra)
        .output()
        .expect("fla-train runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `(step, train loss, valid loss)` rows of a metrics CSV, as text (compared exactly).
fn rows(dir: &std::path::Path) -> Vec<(String, String, String)> {
    std::fs::read_to_string(dir.join("metrics.csv"))
        .expect("metrics written")
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[0].to_string(), f[1].to_string(), f[2].to_string())
        })
        .collect()
}

fn fresh(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("fla-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Stopped after 6 of 12 steps (a checkpoint at 4, the killed run's last save at 6 left
/// half-written: its optimizer record not yet renamed into place and no loop state; the cosine
/// schedule spans all 12 steps in both runs),
/// then resumed to 12: the losses equal an uninterrupted 12-step run's. Not bit for bit: NdArray
/// itself is not bit-repeatable (measured: two identical uninterrupted runs differ from the 7th
/// significant digit, before any checkpoint, with one rayon thread too), so equality is to 1e-5
/// relative; a different seed or a lost optimizer state moves the losses by 1e-2 and more.
#[test]
fn resume_reproduces_an_uninterrupted_run() {
    let whole = fresh("whole");
    let (ok, out, err) = train(&whole, &["--steps", "12"]);
    assert!(ok, "{out}{err}");

    let parts = fresh("parts");
    let (ok, out, err) = train(&parts, &["--steps", "12", "--stop-at", "6"]);
    assert!(ok, "{out}{err}");
    // A kill during the save at step 6 leaves a record under its temporary name and no state.
    let ckpt = parts.join("checkpoint");
    std::fs::rename(ckpt.join("optim-6.mpk"), ckpt.join("optim-6-partial.mpk")).unwrap();
    std::fs::remove_file(ckpt.join("state-6.json")).unwrap();
    let (ok, out, err) = train(&parts, &["--steps", "12", "--resume"]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("step 4)"),
        "resumed from the step-4 checkpoint: {out}"
    );
    let (a, b) = (rows(&whole), rows(&parts));
    assert_eq!(a.len(), b.len(), "{a:?}\n{b:?}");
    let close = |x: &str, y: &str| match (x.parse::<f64>(), y.parse::<f64>()) {
        (Ok(x), Ok(y)) => (x - y).abs() <= 1e-5 * x.abs().max(1.0),
        _ => x == y,
    };
    for (ra, rb) in a.iter().zip(&b) {
        assert!(
            ra.0 == rb.0 && close(&ra.1, &rb.1) && close(&ra.2, &rb.2),
            "{ra:?} vs {rb:?}"
        );
    }
}

#[test]
fn resume_errors_are_typed() {
    let dir = fresh("errors");
    let (ok, _, err) = train(&dir, &["--steps", "2", "--resume"]);
    assert!(!ok && err.contains("no checkpoint"), "{err}");

    let (ok, out, err) = train(&dir, &["--steps", "4"]);
    assert!(ok, "{out}{err}");
    let latest = dir.join("checkpoint");
    std::fs::write(latest.join("state-4.json"), "{ not json").unwrap();
    let (ok, _, err) = train(&dir, &["--steps", "8", "--resume"]);
    assert!(!ok && err.contains("corrupt"), "{err}");

    std::fs::write(
        latest.join("state-4.json"),
        r#"{"step":4,"start_valid":5.0,"last_valid":4.0}"#,
    )
    .unwrap();
    std::fs::write(latest.join("model-4.mpk"), b"garbage").unwrap();
    let (ok, _, err) = train(&dir, &["--steps", "8", "--resume"]);
    assert!(!ok && err.contains("corrupt"), "{err}");
}

/// Two micro-batches of 2 sequences accumulate to the step one batch of 4 takes (the same windows
/// are drawn in the same order, and the halves' mean losses average to the whole's): the
/// training losses of the two runs agree step for step.
#[test]
fn gradient_accumulation_matches_a_larger_batch() {
    let one = fresh("accum-one");
    let (ok, out, err) = train(&one, &["--steps", "8", "--batch", "4"]);
    assert!(ok, "{out}{err}");
    let two = fresh("accum-two");
    let (ok, out, err) = train(&two, &["--steps", "8", "--batch", "2", "--grad-accum", "2"]);
    assert!(ok, "{out}{err}");
    let (a, b) = (rows(&one), rows(&two));
    assert_eq!(a.len(), b.len());
    // Training losses only: the validation set is drawn in batches of `--batch`, so it differs.
    for (x, y) in a.iter().zip(&b).skip(1) {
        let (p, q): (f64, f64) = (x.1.parse().unwrap(), y.1.parse().unwrap());
        assert!((p - q).abs() <= 1e-4 * p.abs(), "step {}: {p} vs {q}", x.0);
    }
}

/// Ctrl-C (SIGINT) mid-run: the step in flight finishes, a checkpoint of it is saved, the
/// process exits cleanly, and `--resume` continues from that step.
#[cfg(unix)]
#[test]
fn ctrl_c_stops_with_a_checkpoint_that_resumes() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;

    let dir = fresh("interrupt");
    let mut child = fla_train(&dir)
        .args(["--backend", "ndarray", "--seq-len", "16", "--hidden", "32"])
        .args([
            "--batch",
            "2",
            "--steps",
            "1000000",
            "--checkpoint-every",
            "0",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("fla-train starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = String::new();
    // The starting validation loss is printed just before the first step.
    for line in lines.by_ref() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("valid loss") {
            break;
        }
    }
    // SIGINT as a terminal's Ctrl-C sends it (no `kill` executable needed on the machine).
    // SAFETY: a plain system call on the child's pid, which has not been waited for yet.
    let sent = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    assert_eq!(sent, 0, "SIGINT delivered");
    for line in lines {
        seen.push_str(&line.unwrap());
        seen.push('\n');
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "{seen}");
    let step: usize = seen
        .split("stopped after step ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no interruption message: {seen}"));
    assert!(step < 1_000_000);
    assert!(dir.join(format!("checkpoint/state-{step}.json")).is_file());
    assert!(dir.join("model/model.safetensors").is_file(), "{seen}");
    let (ok, out, err) = train(&dir, &["--steps", &(step + 2).to_string(), "--resume"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains(&format!("(step {step})")), "{out}");
    assert_eq!(rows(&dir).last().unwrap().0, (step + 2).to_string());
}

/// Gradients that are not finite even at the smallest loss scale stop the run with an error
/// naming the likely causes (rather than skipping steps forever): a scale already at that floor
/// and a learning rate that blows the weights up after the first step.
#[test]
fn overflow_at_the_smallest_loss_scale_stops_the_run() {
    let dir = fresh("f16-diverged");
    let out = fla_train(&dir)
        .args(["--backend", "wgpu", "--precision", "f16-mixed"])
        .args(["--loss-scale", "1e-5", "--lr", "1e4", "--warmup", "1"])
        .args([
            "--steps",
            "6",
            "--batch",
            "2",
            "--seq-len",
            "16",
            "--eval-every",
            "6",
        ])
        .output()
        .expect("the binary runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the run went on: {stderr}");
    assert!(
        stderr.contains("not finite even at loss scale") && stderr.contains("--lr"),
        "{stderr}"
    );
}

#[test]
fn loss_scale_without_f16_mixed_is_an_error() {
    for (extra, message) in [
        (
            &["--loss-scale", "1024"][..],
            "applies to --precision f16-mixed only",
        ),
        (
            &["--precision", "f16-mixed", "--loss-scale", "0"][..],
            "must be positive",
        ),
    ] {
        let out = fla_train(&fresh("loss-scale"))
            .args(["--backend", "ndarray", "--steps", "1"])
            .args(extra)
            .output()
            .expect("fla-train runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(message),
            "{stderr}"
        );
    }
}

#[test]
fn unsupported_precision_is_an_error() {
    for (precision, message) in [
        ("bf16", "needs"),
        ("bf16-mixed", "needs"),
        ("f16-mixed", "f16-mixed needs wgpu"),
        ("f16", "underflows"),
        ("f8", "unknown --precision"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_fla-train"))
            .args([
                "--backend",
                "ndarray",
                "--precision",
                precision,
                "--steps",
                "1",
            ])
            .output()
            .expect("fla-train runs");
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(message),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `--precision f16-mixed` on wgpu (lavapipe computes f16): f32 parameters and AdamW state, each
/// step on an f16 copy, the loss scaled. Started at a scale under which this preset's backward
/// overflows f16 (2^18, measured; weight gradients sum over the batch's tokens), the first steps
/// are skipped and the scale halved until the gradients are finite (measured: two skips, then
/// 2^16); the run still learns, the exported
/// weights are f32, and the checkpoint carries the scale for `--resume` (a run stopped at step 6
/// and resumed reproduced an uninterrupted one's losses exactly, measured by hand). The exported
/// model then runs in f16 in `fla-eval` and `fla-generate`.
#[test]
fn f16_mixed_precision_keeps_f32_weights_and_scales_the_loss() {
    let dir = fresh("f16-mixed");
    let stdout = succeeds(
        fla_train(&dir)
            .args(["--backend", "wgpu", "--precision", "f16-mixed"])
            .args(["--loss-scale", "262144", "--steps", "15", "--batch", "4"])
            .args(["--seq-len", "32", "--eval-every", "15", "--warmup", "3"]),
    );
    assert!(
        stdout.contains("step skipped, loss scale now 131072"),
        "no overflow seen at 2^18: {stdout}"
    );
    let (last, nums) = summary_losses(&stdout);
    assert!(
        nums.len() == 2 && nums[1] < nums[0] - 0.5,
        "validation loss did not fall clearly: {last}"
    );
    // The metrics give each step's loss scale and whether it was skipped: as many as printed,
    // the first step at the scale asked for.
    let csv = std::fs::read_to_string(dir.join("metrics.csv")).expect("metrics written");
    let skipped = csv.lines().skip(1).filter(|l| l.ends_with(",1")).count();
    assert_eq!(skipped, stdout.matches("step skipped").count(), "{csv}");
    let step1: Vec<&str> = csv.lines().nth(2).expect("step 1").split(',').collect();
    assert_eq!((step1[0], step1[6]), ("1", "262144"), "{csv}");
    // safetensors: an 8-byte length, then the JSON header naming each tensor's dtype.
    let st = std::fs::read(dir.join("model/model.safetensors")).expect("model exported");
    let len = u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8_lossy(&st[8..8 + len]);
    assert!(
        header.contains("\"F32\"") && !header.contains("\"F16\""),
        "{header}"
    );
    let state = std::fs::read_to_string(dir.join("checkpoint/state-15.json")).expect("state");
    let state: serde_json::Value = serde_json::from_str(&state).unwrap();
    let scale = state["loss_scale"]["scale"]
        .as_f64()
        .expect("loss scale saved");
    assert!(scale <= 131072.0, "{state}");
    // Inference in f16 from the f32 checkpoint (`--precision f16`: the weights cast on loading):
    // the perplexity is f32's to f16's rounding (measured 68.225 against 68.222), and greedy
    // decoding runs.
    let ppl = |precision: &str| {
        perplexity(&succeeds(
            Command::new(env!("CARGO_BIN_EXE_fla-eval"))
                .args(["--backend", "wgpu", "--precision", precision])
                .args(["--max-tokens", "128", "--seq-len", "64", "--model"])
                .arg(dir.join("model"))
                .env("XDG_RUNTIME_DIR", std::env::temp_dir()),
        ))
    };
    let (full, half) = (ppl("f32"), ppl("f16"));
    assert!(
        (half - full).abs() <= 1e-2 * full,
        "perplexity f16 {half}, f32 {full}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_fla-generate"))
        .args([
            "--backend",
            "wgpu",
            "--precision",
            "f16",
            "--prompt",
            "Of Man",
        ])
        .args(["--max-new-tokens", "8", "--model"])
        .arg(dir.join("model"))
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        .output()
        .expect("fla-generate runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "fla-generate failed: {stderr}");
    assert!(stderr.contains("decoding: 8 tokens"), "{stderr}");
}

/// `--config` builds the model from one of FLA's config.json files (here a tiny GLA with FLA's
/// field names, short convolutions on); the exported config carries its fields. A vocabulary
/// smaller than the tokeniser's and a file of another shape are refused with errors naming them.
#[test]
fn config_file_builds_the_model() {
    let dir = fresh("config");
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("gla.json");
    std::fs::write(
        &config,
        r#"{"model_type": "gla", "hidden_size": 32, "num_heads": 2, "num_hidden_layers": 1,
            "use_short_conv": true, "conv_size": 3, "vocab_size": 300, "use_cache": true}"#,
    )
    .unwrap();
    let (ok, out, err) = train(
        &dir,
        &["--steps", "2", "--config", config.to_str().unwrap()],
    );
    assert!(ok, "{out}{err}");
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("model/config.json")).unwrap())
            .unwrap();
    assert_eq!(saved["vocab_size"], 300);
    assert_eq!(saved["num_hidden_layers"], 1);
    assert_eq!(saved["conv_size"], 3);

    // Each refused with an error naming the problem.
    let refused = |json: &str, message: &str| {
        std::fs::write(&config, json).unwrap();
        let (ok, _, err) = train(
            &dir,
            &["--steps", "2", "--config", config.to_str().unwrap()],
        );
        assert!(!ok && err.contains(message), "{err}");
    };
    refused(
        r#"{"model_type": "gla", "hidden_size": 32, "vocab_size": 100}"#,
        "vocab_size 100 is smaller than the tokeniser's 256",
    );
    // Another family's file parses (unknown fields are allowed) but its model_type tells.
    refused(
        r#"{"model_type": "gated_deltanet", "hidden_size": 32, "vocab_size": 300}"#,
        "model_type \"gated_deltanet\" is not --model GLA's",
    );
    refused(r#"{"hidden_size": "wide"}"#, "is not a GLA config");

    // `--init` from a folder that holds no saved model, then one with a config but no weights:
    // each error names the missing file.
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let init = |what: &str| {
        let (ok, _, err) = train(&dir, &["--steps", "1", "--init", empty.to_str().unwrap()]);
        assert!(!ok && err.contains(what), "{err}");
    };
    init("config.json");
    std::fs::copy(dir.join("model/config.json"), empty.join("config.json")).unwrap();
    init("model.safetensors");
}

/// The fused kernels (wgpu: lavapipe in CI) and the tensor-op fallback (ndarray) train the same
/// GLA from the same initial weights (`--init`: a 0-step run's export, as both backends' own
/// generators draw different weights) to the same losses step by step: the kernels' backward is
/// right inside a real model. Within f32 noise, stated as a relative tolerance of 1e-5 on each
/// training and validation loss over 12 steps (measured: 2.6e-7 at worst on lavapipe).
#[test]
fn fused_kernels_and_fallback_train_alike() {
    let init = fresh("init");
    let (ok, out, err) = train(&init, &["--steps", "0"]);
    assert!(ok, "{out}{err}");
    let run = |backend: &str| {
        let dir = fresh(&format!("alike-{backend}"));
        let out = fla_train(&dir)
            .args(["--backend", backend, "--steps", "12", "--batch", "2"])
            .args(["--seq-len", "16", "--eval-every", "4", "--warmup", "2"])
            .arg("--init")
            .arg(init.join("model"))
            .output()
            .expect("fla-train runs");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        rows(&dir)
    };
    let (fallback, fused) = (run("ndarray"), run("wgpu"));
    assert_eq!(fallback.len(), 13, "step 0 and 12 steps: {fallback:?}");
    assert_eq!(fallback.len(), fused.len());
    let mut worst: f64 = 0.0;
    for (a, b) in fallback.iter().zip(&fused) {
        for (x, y) in [(&a.1, &b.1), (&a.2, &b.2)] {
            if let (Ok(x), Ok(y)) = (x.parse::<f64>(), y.parse::<f64>()) {
                worst = worst.max((x - y).abs() / x.abs());
            } else {
                assert_eq!(
                    x, y,
                    "step {}: one backend has a value the other has not",
                    a.0
                );
            }
        }
    }
    assert!(
        worst < 1e-5,
        "relative loss difference {worst:e}:\n{fallback:?}\n{fused:?}"
    );
    // The losses moved: a run that did not train would agree trivially.
    let first: f64 = fused[1].1.parse().unwrap();
    let last: f64 = fused[12].1.parse().unwrap();
    assert!(last < first - 0.05, "{fused:?}");
    println!("worst relative loss difference over 12 steps: {worst:e}");
}
