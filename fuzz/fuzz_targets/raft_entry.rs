#![no_main]
//! cargo-fuzz target: `metastore::fuzz::raft_entry` (see that function for what it checks).

libfuzzer_sys::fuzz_target!(|data: &[u8]| metastore::fuzz::raft_entry(data));
