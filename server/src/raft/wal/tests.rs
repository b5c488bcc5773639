use super::*;

fn opts(segment_bytes: u64) -> WalOptions {
    WalOptions {
        segment_bytes,
        fsync: true,
        direct_io: true,
    }
}

fn data(i: u64) -> Vec<u8> {
    format!("entry {i} ")
        .repeat(1 + (i % 7) as usize)
        .into_bytes()
}

fn append(wal: &Wal, range: std::ops::RangeInclusive<u64>) -> Result<()> {
    let bodies: Vec<(u64, Vec<u8>)> = range.map(|i| (i, data(i))).collect();
    let records: Vec<Record<'_>> = bodies
        .iter()
        .map(|(index, d)| Record::Entry {
            index: *index,
            data: d,
        })
        .collect();
    wal.write(&records, true)
}

/// The indexes `wal` holds, read back and checked against what was written.
fn held(wal: &Wal) -> anyhow::Result<Vec<u64>> {
    let got = wal.read(0, u64::MAX)?;
    for (i, b) in &got {
        anyhow::ensure!(
            b.as_ref() == data(*i).as_slice(),
            "entry {i} reads back wrong"
        );
    }
    Ok(got.into_iter().map(|(i, _)| i).collect())
}

fn segment_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    v.retain(|p| p.extension().is_some_and(|x| x == "wal"));
    v.sort();
    Ok(v)
}

#[test]
fn entries_come_back_in_order_across_segments_and_a_reopen() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let wal = Wal::open(dir.path(), opts(4096))?;
    for start in (0..300).step_by(10) {
        append(&wal, start..=start + 9)?;
    }
    assert_eq!(held(&wal)?, (0..300).collect::<Vec<_>>());
    let segments = wal.state().segments;
    assert!(segments > 3, "{segments} segments of 4 KiB for ~17 KiB");
    // Every segment file is made at its full length.
    for f in segment_files(dir.path())? {
        assert!(fs::metadata(&f)?.len() >= 4096, "{}", f.display());
    }
    let part: Vec<u64> = wal.read(95, 205)?.into_iter().map(|(i, _)| i).collect();
    assert_eq!(part, (95..205).collect::<Vec<_>>());
    drop(wal);

    let wal = Wal::open(dir.path(), opts(4096))?;
    assert_eq!(held(&wal)?, (0..300).collect::<Vec<_>>());
    assert_eq!(wal.state().entries, Some((0, 299)));
    append(&wal, 300..=300)?;
    assert_eq!(wal.state().entries, Some((0, 300)));
    Ok(())
}

#[test]
fn an_entry_out_of_order_is_refused_and_nothing_is_written() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let wal = Wal::open(dir.path(), opts(1 << 20))?;
    append(&wal, 1..=5)?;
    for bad in [5, 7, 1] {
        match append(&wal, bad..=bad) {
            Err(WalError::OutOfOrder { expected: 6, got }) => assert_eq!(got, bad),
            other => anyhow::bail!("entry {bad}: {other:?}"),
        }
    }
    // A batch whose second entry is out of order writes nothing at all.
    let (a, b) = (data(6), data(8));
    assert!(wal
        .write(
            &[
                Record::Entry { index: 6, data: &a },
                Record::Entry { index: 8, data: &b },
            ],
            true,
        )
        .is_err());
    drop(wal);
    let wal = Wal::open(dir.path(), opts(1 << 20))?;
    assert_eq!(held(&wal)?, vec![1, 2, 3, 4, 5]);
    Ok(())
}

#[test]
fn a_truncated_suffix_stays_gone_and_its_replacement_is_read() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let wal = Wal::open(dir.path(), opts(1 << 20))?;
    append(&wal, 1..=10)?;
    wal.truncate(6)?;
    assert_eq!(held(&wal)?, vec![1, 2, 3, 4, 5]);
    let other = b"replacement".to_vec();
    wal.write(
        &[Record::Entry {
            index: 6,
            data: &other,
        }],
        true,
    )?;
    drop(wal);
    let wal = Wal::open(dir.path(), opts(1 << 20))?;
    let got = wal.read(0, u64::MAX)?;
    assert_eq!(got.len(), 6);
    assert_eq!(got[5].1.as_ref(), b"replacement");
    // Truncating everything, with nothing purged, leaves any index free to come next.
    wal.truncate(0)?;
    assert_eq!(wal.state().entries, None);
    append(&wal, 40..=41)?;
    assert_eq!(held(&wal)?, vec![40, 41]);
    Ok(())
}

#[test]
fn a_truncation_below_the_purge_point_leaves_the_next_entry_after_it() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let wal = Wal::open(dir.path(), opts(1 << 20))?;
    append(&wal, 1..=10)?;
    drop(wal.purge(5, b"id 5")?);
    wal.truncate(3)?;
    assert_eq!(wal.state().entries, None);
    // What was purged stays purged: the next entry is 6, whether the truncation came in
    // an earlier write or in the same one, and a refused write leaves nothing behind.
    match append(&wal, 3..=3) {
        Err(WalError::OutOfOrder {
            expected: 6,
            got: 3,
        }) => {}
        other => anyhow::bail!("entry 3 after the truncation: {other:?}"),
    }
    let three = data(3);
    match wal.write(
        &[
            Record::Truncate { from: 3 },
            Record::Entry {
                index: 3,
                data: &three,
            },
        ],
        true,
    ) {
        Err(WalError::OutOfOrder {
            expected: 6,
            got: 3,
        }) => {}
        other => anyhow::bail!("truncation and entry 3 together: {other:?}"),
    }
    append(&wal, 6..=7)?;
    drop(wal);
    let wal = Wal::open(dir.path(), opts(1 << 20))?;
    assert_eq!(held(&wal)?, vec![6, 7]);
    assert_eq!(
        wal.state().purged,
        Some((5, bytes::Bytes::from_static(b"id 5")))
    );
    Ok(())
}

#[test]
fn a_very_large_write_does_not_keep_its_buffer() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let wal = Wal::open(dir.path(), opts(1 << 20))?;
    let big = vec![7u8; KEEP_BUFFER_BYTES + 1];
    wal.write(
        &[Record::Entry {
            index: 1,
            data: &big,
        }],
        true,
    )?;
    assert_eq!(lock(&wal.writer).buf.capacity(), 0);
    append(&wal, 2..=2)?;
    let kept = lock(&wal.writer).buf.capacity();
    assert!(kept > 0 && kept <= KEEP_BUFFER_BYTES, "{kept}");
    assert_eq!(wal.read(1, 2)?[0].1.len(), big.len());
    Ok(())
}

#[test]
fn a_deleted_segment_is_freed_a_step_at_a_time_then_closed() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("doomed");
    let file = Arc::new(File::create(&path)?);
    file.set_len(2 * RELEASE_STEP + 100)?;
    fs::remove_file(&path)?;
    let watcher = file.clone();
    let removed = Removed(vec![Segment {
        file,
        path,
        last_index: Some(1),
    }]);
    assert_eq!(removed.len(), 1);
    removed.close_gradually();
    // Shrunk by whole steps while more than one was left; the rest goes with the last handle.
    assert_eq!(watcher.metadata()?.len(), 100);
    assert_eq!(
        Arc::strong_count(&watcher),
        1,
        "the segment's own handle is closed"
    );
    Ok(())
}

#[test]
fn a_purge_deletes_the_segments_it_covers_and_survives_a_reopen() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let wal = Wal::open(dir.path(), opts(4096))?;
    for start in (1..=200).step_by(10) {
        append(&wal, start..=start + 9)?;
    }
    let before = segment_files(dir.path())?.len();
    let removed = wal.purge(150, b"id-150")?;
    // Deleted at once; only the closing is left to whoever drops `removed`.
    let after = segment_files(dir.path())?.len();
    assert!(after < before, "{before} -> {after} segments");
    assert_eq!(removed.len(), before - after);
    drop(removed);
    assert_eq!(after, wal.state().segments);
    assert_eq!(held(&wal)?, (151..=200).collect::<Vec<_>>());
    assert!(wal.read(0, 151)?.is_empty());
    drop(wal);

    let wal = Wal::open(dir.path(), opts(4096))?;
    assert_eq!(held(&wal)?, (151..=200).collect::<Vec<_>>());
    assert_eq!(
        wal.state().purged,
        Some((150, Bytes::from_static(b"id-150")))
    );
    // A purge past the end (a snapshot installed) empties the log, and the next entry
    // follows the purged index.
    drop(wal.purge(500, b"id-500")?);
    assert_eq!(wal.state().entries, None);
    assert_eq!(
        segment_files(dir.path())?.len(),
        1,
        "the last segment stays"
    );
    assert!(matches!(
        append(&wal, 201..=201),
        Err(WalError::OutOfOrder { expected: 501, .. })
    ));
    append(&wal, 501..=503)?;
    drop(wal);
    let wal = Wal::open(dir.path(), opts(4096))?;
    assert_eq!(held(&wal)?, vec![501, 502, 503]);
    assert_eq!(wal.state().purged.map(|(i, _)| i), Some(500));
    Ok(())
}

#[test]
fn the_committed_id_is_the_last_one_written() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let wal = Wal::open(dir.path(), opts(1 << 20))?;
    assert_eq!(wal.state().committed, None);
    wal.write(&[Record::Committed { meta: b"c1" }], true)?;
    wal.write(&[Record::Committed { meta: b"c2" }], true)?;
    drop(wal);
    let wal = Wal::open(dir.path(), opts(1 << 20))?;
    assert_eq!(wal.state().committed, Some(Bytes::from_static(b"c2")));
    wal.write(&[Record::Committed { meta: b"" }], true)?;
    drop(wal);
    let wal = Wal::open(dir.path(), opts(1 << 20))?;
    assert_eq!(wal.state().committed, None);
    Ok(())
}

/// The offset of the record of entry `index`.
fn offset_of(wal: &Wal, index: u64) -> (PathBuf, u64) {
    let ix = lock(&wal.index);
    let loc = ix.locs[(index - ix.shape.first) as usize];
    (ix.segments[&loc.seq].path.clone(), loc.offset)
}

fn poke(path: &Path, offset: u64, bytes: &[u8]) -> anyhow::Result<()> {
    let f = OpenOptions::new().write(true).open(path)?;
    f.write_all_at(bytes, offset)?;
    f.sync_all()?;
    Ok(())
}

#[test]
fn a_torn_last_write_is_cut_off_and_never_read_back_later() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let wal = Wal::open(dir.path(), opts(1 << 20))?;
    append(&wal, 1..=3)?;
    // One batch of three whose first record's header never reached the disk, while the
    // records after it did.
    append(&wal, 4..=6)?;
    let (path, at) = offset_of(&wal, 4);
    drop(wal);
    poke(&path, at, &[0; 8])?;

    let wal = Wal::open(dir.path(), opts(1 << 20))?;
    assert_eq!(held(&wal)?, vec![1, 2, 3]);
    // The same entry 4 again, the same length: the old records 5 and 6 that lay after it
    // must not come back with it.
    append(&wal, 4..=4)?;
    drop(wal);
    let wal = Wal::open(dir.path(), opts(1 << 20))?;
    assert_eq!(held(&wal)?, vec![1, 2, 3, 4]);

    // A torn record (its body half written) at the end: dropped too.
    append(&wal, 5..=5)?;
    let (path, at) = offset_of(&wal, 5);
    drop(wal);
    poke(&path, at + HEADER as u64 + 2, b"\xff\xff")?;
    let wal = Wal::open(dir.path(), opts(1 << 20))?;
    assert_eq!(held(&wal)?, vec![1, 2, 3, 4]);
    Ok(())
}

#[test]
fn damage_before_the_last_segment_is_reported_not_skipped() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let wal = Wal::open(dir.path(), opts(4096))?;
    for start in (1..=100).step_by(10) {
        append(&wal, start..=start + 9)?;
    }
    let (path, at) = offset_of(&wal, 2);
    drop(wal);
    assert_ne!(
        Some(&path),
        segment_files(dir.path())?.last(),
        "entry 2 is not in the last segment"
    );
    poke(&path, at + HEADER as u64 + 3, b"\x00\x01")?;
    match Wal::open(dir.path(), opts(4096)) {
        Err(WalError::Corrupt {
            path: p, offset, ..
        }) => {
            assert_eq!((p, offset), (path, at));
        }
        Err(e) => anyhow::bail!("another error: {e}"),
        Ok(_) => anyhow::bail!("a damaged segment was opened"),
    }
    Ok(())
}

#[test]
fn a_read_checks_what_it_reads() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let wal = Wal::open(dir.path(), opts(1 << 20))?;
    append(&wal, 1..=3)?;
    let (path, at) = offset_of(&wal, 2);
    poke(&path, at + HEADER as u64 + BODY_PREFIX as u64, b"X")?;
    assert!(matches!(wal.read(2, 3), Err(WalError::Corrupt { .. })));
    assert_eq!(wal.read(3, 4)?.len(), 1);
    Ok(())
}

#[test]
fn a_batch_larger_than_a_segment_gets_one_of_its_own() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let wal = Wal::open(dir.path(), opts(4096))?;
    append(&wal, 1..=1)?;
    let big = vec![7u8; 10_000];
    wal.write(
        &[Record::Entry {
            index: 2,
            data: &big,
        }],
        true,
    )?;
    append(&wal, 3..=3)?;
    drop(wal);
    let wal = Wal::open(dir.path(), opts(4096))?;
    let got = wal.read(0, u64::MAX)?;
    assert_eq!(got.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(got[1].1.as_ref(), big.as_slice());
    Ok(())
}

#[test]
fn a_segment_left_half_made_is_removed() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let wal = Wal::open(dir.path(), opts(4096))?;
    append(&wal, 1..=3)?;
    drop(wal);
    fs::write(dir.path().join(format!("{:016x}{TEMP_SUFFIX}", 2)), b"junk")?;
    let wal = Wal::open(dir.path(), opts(4096))?;
    assert_eq!(held(&wal)?, vec![1, 2, 3]);
    assert_eq!(fs::read_dir(dir.path())?.count(), 1);
    Ok(())
}

#[test]
fn every_synced_write_is_timed_and_no_other() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let wal = Wal::open(dir.path(), opts(1 << 20))?;
    let syncs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = syncs.clone();
    wal.on_sync(Arc::new(move |took| {
        assert!(took < Duration::from_secs(60));
        counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }));
    append(&wal, 1..=3)?;
    append(&wal, 4..=4)?;
    wal.write(&[Record::Committed { meta: b"c" }], false)?;
    wal.write(&[], true)?;
    assert_eq!(syncs.load(std::sync::atomic::Ordering::Relaxed), 3);

    // Without fsync nothing is synced, so nothing is timed.
    let other = tempfile::tempdir()?;
    let unsynced = Wal::open(
        other.path(),
        WalOptions {
            segment_bytes: 1 << 20,
            fsync: false,
            direct_io: true,
        },
    )?;
    let counted = syncs.clone();
    unsynced.on_sync(Arc::new(move |_| {
        counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }));
    append(&unsynced, 1..=3)?;
    assert_eq!(syncs.load(std::sync::atomic::Ordering::Relaxed), 3);
    Ok(())
}

/// Writes the same records (entries of many sizes, a truncation, a purge, committed ids,
/// unsynced writes and a roll to a new segment) to a log in `dir`.
fn write_a_history(dir: &Path, opts: WalOptions) -> anyhow::Result<Wal> {
    let wal = Wal::open(dir, opts)?;
    append(&wal, 1..=40)?;
    let big = vec![7u8; 9_000];
    wal.write(
        &[Record::Entry {
            index: 41,
            data: &big,
        }],
        true,
    )?;
    wal.write(&[Record::Committed { meta: b"c41" }], false)?;
    wal.truncate(30)?;
    append(&wal, 30..=60)?;
    wal.write(&[], true)?;
    drop(wal.purge(10, b"p10")?);
    wal.write(&[Record::Committed { meta: b"c60" }], true)?;
    Ok(wal)
}

#[test]
fn direct_io_writes_the_same_bytes_as_the_page_cache() -> anyhow::Result<()> {
    // A segment length that is no whole number of blocks is rounded up to one, so that
    // a direct write of whole blocks never grows a segment.
    let buffered_dir = tempfile::tempdir()?;
    let direct_dir = tempfile::tempdir()?;
    let buffered_opts = WalOptions {
        direct_io: false,
        ..opts(10_000)
    };
    let buffered = write_a_history(buffered_dir.path(), buffered_opts)?;
    let direct = write_a_history(direct_dir.path(), opts(10_000))?;
    assert_eq!(held(&direct)?, held(&buffered)?);
    assert_eq!(direct.state(), buffered.state());
    drop((buffered, direct));

    let files = segment_files(buffered_dir.path())?;
    assert!(
        files.len() > 1,
        "the history should span segments: {files:?}"
    );
    let direct_files = segment_files(direct_dir.path())?;
    assert_eq!(files.len(), direct_files.len());
    for (b, d) in files.iter().zip(&direct_files) {
        let (b_bytes, d_bytes) = (fs::read(b)?, fs::read(d)?);
        assert_eq!(b_bytes.len() % 4096, 0, "{}", b.display());
        assert!(
            b_bytes == d_bytes,
            "{} and {} differ",
            b.display(),
            d.display()
        );
    }

    // And a log written directly opens, reads and takes writes as any other.
    let wal = Wal::open(direct_dir.path(), opts(10_000))?;
    assert_eq!(held(&wal)?, (11..=60).collect::<Vec<_>>());
    append(&wal, 61..=62)?;
    drop(wal);
    let wal = Wal::open(direct_dir.path(), opts(10_000))?;
    assert_eq!(held(&wal)?, (11..=62).collect::<Vec<_>>());
    assert_eq!(wal.state().committed.as_deref(), Some(&b"c60"[..]));
    Ok(())
}
