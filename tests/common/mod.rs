//! Helpers shared by the end-to-end tests of the `sbdnet` binary.

use std::process::{Command, Output};

/// Run `sbdnet` with `args`.
pub fn sbdnet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sbdnet")).args(args).output().expect("the binary runs")
}

/// The one JSON object a successful `--json` command printed.
pub fn json(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

/// A fresh path in the temporary directory, unique to this test process (not created).
pub fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("sbdnet-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}
