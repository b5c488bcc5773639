//! Prints the `MetaStoreCluster` CustomResourceDefinition as YAML.
//!
//! `cargo run --release -p metastore-operator --bin crdgen > crds/metastoreclusters.metastore.io.yaml`

fn main() -> anyhow::Result<()> {
    print!("{}", metastore_operator::crd::crd_yaml()?);
    Ok(())
}
