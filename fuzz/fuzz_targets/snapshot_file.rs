#![no_main]
//! cargo-fuzz target: `metastore::fuzz::snapshot_file` (see that function for what it checks).

libfuzzer_sys::fuzz_target!(|data: &[u8]| metastore::fuzz::snapshot_file(data));
