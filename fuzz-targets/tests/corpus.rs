//! Every input in `fuzz/corpus/<target>/` (the seeds) and
//! `fuzz/regressions/<target>/` (each crash a fuzzer ever found, kept once
//! fixed) through its target. A plain `main`: the fs target jails the
//! process, which needs it single-threaded, so that happens first.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// An input that runs longer than this is a hang (libFuzzer's -timeout is
/// 20 s for inputs that take milliseconds).
const HANG: Duration = Duration::from_secs(60);

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).filter(|p| p.is_file()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fn main() {
    // `cargo test -- --list` and friends: nothing to list but one test.
    if std::env::args().any(|a| a == "--list") {
        println!("corpus: test");
        return;
    }
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    // Read every input before the jail hides the tree.
    // FUZZ_INPUT=<part of a path>: only the inputs whose path has it (to
    // look at one under gdb or strace).
    let only = std::env::var("FUZZ_INPUT").unwrap_or_default();
    let mut work = Vec::new();
    for (name, _) in tegmen_fuzz_targets::TARGETS {
        let seeds = inputs(&fuzz.join("corpus").join(name));
        let regressions = inputs(&fuzz.join("regressions").join(name));
        assert!(
            !seeds.is_empty(),
            "fuzz target {name} has no seed corpus in fuzz/corpus/{name}"
        );
        for p in seeds
            .into_iter()
            .chain(regressions)
            .filter(|p| p.to_string_lossy().contains(&only))
        {
            let data = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            work.push((*name, p, data));
        }
    }
    tegmen_fuzz_targets::fs::init();
    // A hang fails the test (naming the input) instead of stalling it.
    let current: Arc<Mutex<(String, Instant)>> = Arc::new(Mutex::new((String::new(), Instant::now())));
    let watched = current.clone();
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_secs(1));
        let (what, since) = watched.lock().unwrap().clone();
        if since.elapsed() > HANG {
            eprintln!("FAILED: {what} still runs after {} s: a hang", HANG.as_secs());
            std::process::exit(101);
        }
    });
    let mut per_target = std::collections::BTreeMap::<&str, (usize, f64)>::new();
    for (name, path, data) in &work {
        let t = Instant::now();
        *current.lock().unwrap() = (format!("fuzz target {name} on {}", path.display()), t);
        let outcome = std::panic::catch_unwind(|| tegmen_fuzz_targets::run(name, data));
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("{e}"),
            Err(_) => {
                eprintln!("FAILED: fuzz target {name} on {}", path.display());
                std::process::exit(101);
            }
        }
        let e = per_target.entry(name).or_default();
        e.0 += 1;
        e.1 += t.elapsed().as_secs_f64();
    }
    for (name, (n, secs)) in per_target {
        println!("fuzz corpus {name}: {n} inputs ok in {secs:.2} s");
    }
    println!("test result: ok. {} corpus inputs", work.len());
}
