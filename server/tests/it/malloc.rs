//! The real binary fixes glibc's allocator thresholds at start, unless the environment sets
//! them (`metastore::malloc`); its log, written to a file, is plain text.

use std::fs::File;
use std::process::Stdio;

use crate::common::{free_port, Proc};

/// Starts the binary with `env`, waits until it serves, stops it; returns its log.
fn log_of_a_start(env: &[(&str, &str)]) -> anyhow::Result<String> {
    let dir = tempfile::tempdir()?;
    let log_path = dir.path().join("server.log");
    let log = File::create(&log_path)?;
    let mut env = env.to_vec();
    env.push(("METASTORE_LOG_LEVEL", "debug"));
    let mut p = Proc::spawn_logging(
        &dir.path().join("data"),
        free_port()?,
        &env,
        Stdio::from(log),
    )?;
    p.signal("TERM")?;
    Ok(std::fs::read_to_string(log_path)?)
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn the_server_fixes_glibc_malloc_thresholds_at_start() -> anyhow::Result<()> {
    // The test's environment is the server's: if it sets a threshold, so would the server.
    if let Some(setting) = metastore::malloc::environment_setting() {
        eprintln!("skipped: this test's own environment sets {setting}");
        return Ok(());
    }
    let log = log_of_a_start(&[])?;
    assert!(
        !log.contains('\u{1b}'),
        "colour codes in a log file:\n{log}"
    );
    let line = log
        .lines()
        .find(|l| l.contains("glibc malloc thresholds fixed"))
        .ok_or_else(|| anyhow::anyhow!("no tuning line in the log:\n{log}"))?;
    assert!(
        line.contains("mmap=4194304") && line.contains("trim=8388608"),
        "{line}"
    );
    Ok(())
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn glibc_malloc_thresholds_set_in_the_environment_are_left_alone() -> anyhow::Result<()> {
    let log = log_of_a_start(&[("MALLOC_TRIM_THRESHOLD_", "1048576")])?;
    let line = log
        .lines()
        .find(|l| l.contains("glibc malloc thresholds left to the environment"))
        .ok_or_else(|| anyhow::anyhow!("no deferral line in the log:\n{log}"))?;
    assert!(line.contains("MALLOC_TRIM_THRESHOLD_"), "{line}");
    assert!(!log.contains("thresholds fixed"), "{log}");
    Ok(())
}
