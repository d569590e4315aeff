//! The vendored sled's deferred syncs (`sled::with_inline_log_writes`,
//! proto/vendor/sled/PATCHES.md, patch 4) under kill -9: this test binary
//! runs itself as a child that commits inside the scope, with plain writers,
//! another transactional writer and flushes on other threads (what the
//! coordinator's prune, events log and probes do), and reports each commit
//! once `with_inline_log_writes` returned. The parent kills it at random
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
    let mut out = std::io::stdout();
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
        writeln!(out, "committed {next}").expect("stdout");
        out.flush().expect("stdout");
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
    let mut reported = 0;
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
                if let Some(n) = line
                    .strip_prefix("committed ")
                    .and_then(|n| n.parse::<u64>().ok())
                {
                    if tx.send(n).is_err() {
                        break;
                    }
                }
            }
        });
        // Progress first (no deadlock between the scope and the other
        // writers), then a kill at a point that moves from run to run.
        let first = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the child commits");
        reported = reported.max(first);
        let until = Instant::now() + Duration::from_millis(40 + run * 37);
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            if let Ok(n) = rx.recv_timeout(left) {
                reported = n;
            }
        }
        let progressed = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the child still commits");
        reported = reported.max(progressed);
        c.0.kill().expect("kill -9");
        c.0.wait().expect("reap");
        while let Ok(n) = rx.try_recv() {
            reported = reported.max(n);
        }
        let db = open(&path);
        let trees: Vec<sled::Tree> = ["a", "b", "c"]
            .iter()
            .map(|n| db.open_tree(n).expect("tree"))
            .collect();
        let kept = trees[0].len() as u64;
        assert!(
            kept >= reported,
            "run {run}: {reported} commits reported, {kept} keys kept"
        );
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
