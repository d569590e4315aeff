//! The vendored sled's deferred syncs (`sled::with_inline_log_writes` and
//! `sled::with_deferred_log_writes`, proto/vendor/sled/PATCHES.md, patches 4
//! and 5) under kill -9: this test binary runs itself as a child that commits
//! inside the first scope (as the coordinator does) and, on another thread,
//! inside the second followed by a flush (as the participants do), beside
//! plain writers, another transactional writer and flushes (what the
//! coordinator's prune, events log and probes do). It reports each commit
//! once durable. The parent kills it at random
//! points and reopens: every reported commit is there, whole, and the child
//! made progress before each kill (no thread waits on syncs another holds
//! back). A kill keeps the page cache, so this checks the bookkeeping, not
//! the sync itself: that one `sync_file_range` covers a commit's writes is
//! shown with strace (docs/benchmarks.md).

use std::{
    io::{BufRead, BufReader, Write},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use sled::{transaction::ConflictableTransactionError, Transactional};

/// Set in the child's environment: the database directory to write to.
const CHILD_ENV: &str = "SAGA_SLED_INLINE_CHILD";
const TEST_NAME: &str = "store::sled::inline_log_tests::commits_reported_after_the_scope_survive_kill_9";
/// Small segments, so that buffers fill and roll to new segments often.
const SEGMENT_BYTES: usize = 64 * 1024;

fn open(dir: &str) -> sled::Db {
    sled::Config::new()
        .path(dir)
        .segment_size(SEGMENT_BYTES)
        .mode(sled::Mode::HighThroughput)
        .open()
        .expect("open")
}

fn key(i: u64) -> [u8; 8] {
    i.to_be_bytes()
}

type TxResult = Result<(), ConflictableTransactionError<()>>;

/// The child: never returns (killed by the parent).
fn child(dir: &str) -> ! {
    let db = open(dir);
    let trees: Vec<sled::Tree> = ["a", "b", "c"]
        .iter()
        .map(|n| db.open_tree(n).expect("tree"))
        .collect();
    let mut next = trees[0].len() as u64;
    let plain = db.open_tree("plain").expect("tree");
    let flusher = db.clone();
    std::thread::spawn(move || {
        for i in 0u64.. {
            plain
                .insert(key(i % 2_000), vec![7u8; (i % 300) as usize])
                .expect("insert");
            if i % 50 == 0 {
                flusher.flush().expect("flush");
            }
        }
    });
    let other = db.open_tree("other").expect("tree");
    std::thread::spawn(move || {
        for i in 0u64.. {
            other
                .transaction(|t| -> TxResult {
                    t.insert(&key(i % 100), &b"x"[..])?;
                    Ok(())
                })
                .expect("transaction");
        }
    });
    // As the participants commit: the transaction's buffers left for the flush.
    let deferred = db.open_tree("deferred").expect("tree");
    let mut next_deferred = deferred.len() as u64;
    let (db2, out2) = (db.clone(), std::io::stdout());
    std::thread::spawn(move || loop {
        sled::with_deferred_log_writes(|| {
            deferred
                .transaction(|t| -> TxResult {
                    t.insert(
                        &key(next_deferred),
                        vec![3u8; 100 + (next_deferred % 900) as usize],
                    )?;
                    Ok(())
                })
                .expect("transaction")
        });
        db2.flush().expect("flush");
        next_deferred += 1;
        let mut out = out2.lock();
        writeln!(out, "deferred {next_deferred}").expect("stdout");
        out.flush().expect("stdout");
    });
    let out = std::io::stdout();
    loop {
        let n = 1 + next % 4;
        sled::with_inline_log_writes(|| {
            (&trees[0], &trees[1], &trees[2])
                .transaction(|(a, b, c)| -> TxResult {
                    for i in next..next + n {
                        let v = vec![(i % 251) as u8; 40 + (i % 700) as usize];
                        a.insert(&key(i), v.clone())?;
                        b.insert(&key(i), v.clone())?;
                        c.insert(&key(i), v)?;
                    }
                    Ok(())
                })
                .expect("transaction");
            db.flush().expect("flush");
        });
        next += n;
        let mut out = out.lock();
        writeln!(out, "committed {next}").expect("stdout");
        out.flush().expect("stdout");
    }
}

/// Waits (30 s at most) for a report of each writer.
fn both_commit(rx: &mpsc::Receiver<(usize, u64)>, reported: &mut [u64; 2], run: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = [false; 2];
    while seen != [true; 2] {
        let left = deadline.saturating_duration_since(Instant::now());
        let (kind, n) = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("run {run}: a writer stopped committing ({seen:?})"));
        seen[kind] = true;
        reported[kind] = reported[kind].max(n);
    }
}

/// The child, killed when the test ends, also when it fails (a deadlocked
/// child would hold the test's output open).
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn commits_reported_after_the_scope_survive_kill_9() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        child(&dir);
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().to_str().expect("utf-8 temp path").to_owned();
    let exe = std::env::current_exe().expect("test binary");
    // Per kind of writer (inline, deferred): the highest commit reported.
    let mut reported = [0u64; 2];
    for run in 0u64..6 {
        let mut c = Killed(
            Command::new(&exe)
                .args([TEST_NAME, "--exact", "--nocapture", "--test-threads=1"])
                .env(CHILD_ENV, &path)
                .stdout(Stdio::piped())
                .spawn()
                .expect("spawn the child"),
        );
        let stdout = c.0.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let report = match line.split_once(' ') {
                    Some(("committed", n)) => n.parse().ok().map(|n: u64| (0, n)),
                    Some(("deferred", n)) => n.parse().ok().map(|n: u64| (1, n)),
                    _ => None,
                };
                if let Some(r) = report {
                    if tx.send(r).is_err() {
                        break;
                    }
                }
            }
        });
        // Both writers commit (no deadlock between the scopes and the other
        // writers), for a while that moves from run to run, and still do
        // just before the kill.
        both_commit(&rx, &mut reported, run);
        let until = Instant::now() + Duration::from_millis(40 + run * 37);
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            if let Ok((kind, n)) = rx.recv_timeout(left) {
                reported[kind] = reported[kind].max(n);
            }
        }
        both_commit(&rx, &mut reported, run);
        c.0.kill().expect("kill -9");
        c.0.wait().expect("reap");
        while let Ok((kind, n)) = rx.try_recv() {
            reported[kind] = reported[kind].max(n);
        }
        let db = open(&path);
        let trees: Vec<sled::Tree> = ["a", "b", "c"]
            .iter()
            .map(|n| db.open_tree(n).expect("tree"))
            .collect();
        let kept = trees[0].len() as u64;
        assert!(
            kept >= reported[0],
            "run {run}: {} commits reported, {kept} keys kept",
            reported[0]
        );
        let deferred = db.open_tree("deferred").expect("tree").len() as u64;
        assert!(
            deferred >= reported[1],
            "run {run}: {} deferred commits reported, {deferred} kept",
            reported[1]
        );
        for i in 0..deferred {
            assert!(
                db.open_tree("deferred")
                    .expect("tree")
                    .contains_key(key(i))
                    .expect("read"),
                "run {run}: deferred key {i} lost"
            );
        }
        for t in &trees[1..] {
            assert_eq!(t.len() as u64, kept, "run {run}: a transaction kept in part");
        }
        for i in 0..kept {
            for t in &trees {
                assert!(t.contains_key(key(i)).expect("read"), "run {run}: key {i} lost");
            }
        }
    }
}
