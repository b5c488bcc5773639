//! What the load tool's integration tests share.

/// A single-member MetaStore in this process, with its data in `dir`, on loopback ports of
/// its own (tests run in parallel; the peer port of a lone member is never dialled).
pub async fn metastore(dir: &tempfile::TempDir) -> anyhow::Result<metastore::server::Server> {
    let data = dir.path().join("data").display().to_string();
    let config = metastore::server::config::Config::load([
        "metastore",
        "--listen-client-urls",
        "http://127.0.0.1:0",
        "--listen-peer-urls",
        "http://127.0.0.1:0",
        "--data-dir",
        &data,
    ])?;
    Ok(metastore::server::start(&config).await?)
}
