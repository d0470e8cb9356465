//! Harness shared by the property and mutation tests (tests/properties.rs, tests/fuzz_parsers.rs).
//!
//! * [`check`] runs one property with proptest's `TestRunner`: a modest default case count for
//!   `cargo test`, or `PROPTEST_CASES` when set (proptest reads it into `Config::default()`);
//!   failures are persisted to `proptest-regressions/<binary>.txt` and replayed first on every
//!   later run, so a crash found by a long `scripts/fuzz` run stays a regression test.
//! * A watchdog turns a hang into a failure: a case running longer than
//!   `CAC_FUZZ_CASE_TIMEOUT_S` (default 20 s) prints its input and ends the process with exit
//!   status 124 (cargo-fuzz's "timeout"); proptest's own timeout needs its `fork` feature.
//! * `CAC_FUZZ_STATS=FILE` appends one line per property, `NAME<TAB>CASES<TAB>passed|failed`,
//!   which `scripts/fuzz` adds up.
//! * [`Mutation`] / [`mutations`]: byte-level mutations of a real file (bit flips, overwritten
//!   and inserted bytes, removed ranges, truncation, interesting little/big-endian words,
//!   duplicated ranges), biased towards a "hot" prefix where the headers live.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, FileFailurePersistence, TestCaseError, TestError, TestRunner};

/// Cases per property when `PROPTEST_CASES` is not set; each property scales this default by
/// its own weight (cheap properties run more cases than image decoding).
pub const DEFAULT_CASES: u32 = 64;

/// Runs `property` on `cases_weight × DEFAULT_CASES` (or `cases_weight × PROPTEST_CASES`)
/// inputs drawn from `strategy`; panics with the minimal failing input.
///
/// `regressions` is the failure file, e.g. `"fuzz_parsers"` → `proptest-regressions/fuzz_parsers.txt`.
pub fn check<S>(
    name: &'static str,
    regressions: &'static str,
    cases_weight: f64,
    strategy: S,
    property: impl Fn(S::Value) -> Result<(), TestCaseError>,
) where
    S: Strategy,
    S::Value: std::fmt::Debug,
{
    let mut runner = TestRunner::new(config(regressions, cases_weight));
    let executed = AtomicU64::new(0);
    let result = runner.run(&strategy, |value| {
        executed.fetch_add(1, Ordering::Relaxed);
        let _guard = Watchdog::start(name, &value);
        property(value)
    });
    let executed = executed.load(Ordering::Relaxed);
    record_stats(name, executed, result.is_ok());
    match result {
        Ok(()) => {}
        Err(TestError::Fail(reason, value)) => {
            panic!("{name}: property failed after {executed} cases: {reason}\nminimal failing input: {value:#?}")
        }
        Err(TestError::Abort(reason)) => panic!("{name}: aborted after {executed} cases: {reason}"),
    }
}

/// A uniform f64 in `[low, high)`, drawn from an integer.
///
/// proptest's own float ranges (1.12) fail a `debug_assert` in `float_samplers.rs` now and
/// then when `|low| < |high|` (e.g. `0.01f64..100.0`): the first split may overshoot `low`,
/// and the check compares that overshoot with a negative step. In a debug test build this
/// panics outside the property, so no input is reported. Shrinks towards `low`.
pub fn uniform(low: f64, high: f64) -> impl Strategy<Value = f64> + Clone {
    assert!(low < high && (high - low).is_finite(), "uniform({low}, {high}): an empty or unbounded range");
    (0u64..1 << 53).prop_map(move |step| {
        let value = low + (high - low) * (step as f64 / (1u64 << 53) as f64);
        // Rounding may land on `high` itself; the range is half-open.
        if value < high {
            value
        } else {
            low
        }
    })
}

/// [`uniform`] as an f32 in `[low, high)`.
pub fn uniform_f32(low: f32, high: f32) -> impl Strategy<Value = f32> + Clone {
    uniform(f64::from(low), f64::from(high)).prop_map(move |value| {
        let value = value as f32;
        if value < high {
            value.max(low)
        } else {
            low
        }
    })
}

fn config(regressions: &'static str, cases_weight: f64) -> Config {
    // Config::default() has already read PROPTEST_CASES (and the other PROPTEST_* variables).
    let base = Config::default();
    let cases = if std::env::var_os("PROPTEST_CASES").is_some() { base.cases } else { DEFAULT_CASES };
    let path: &'static str =
        Box::leak(format!("{}/proptest-regressions/{regressions}.txt", env!("CARGO_MANIFEST_DIR")).into_boxed_str());
    Config {
        cases: ((f64::from(cases) * cases_weight).round() as u32).max(1),
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(path))),
        // Shrinking a decoder crash re-runs the decoder; keep it bounded in time.
        max_shrink_time: 60_000,
        ..base
    }
}

fn record_stats(name: &str, cases: u64, passed: bool) {
    let Some(path) = std::env::var_os("CAC_FUZZ_STATS") else { return };
    let line = format!("{name}\t{cases}\t{}\n", if passed { "passed" } else { "failed" });
    // Best effort: statistics must never fail a test.
    if let Ok(mut file) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
        let _ = file.write_all(line.as_bytes());
    }
}

// ------------------------------------------------------------------------------------- watchdog

struct Running {
    name: &'static str,
    started: Instant,
    input: String,
}

fn running() -> &'static Mutex<HashMap<ThreadId, Running>> {
    static RUNNING: OnceLock<Mutex<HashMap<ThreadId, Running>>> = OnceLock::new();
    RUNNING.get_or_init(|| {
        std::thread::spawn(watch);
        Mutex::new(HashMap::new())
    })
}

fn case_timeout() -> Duration {
    let seconds = std::env::var("CAC_FUZZ_CASE_TIMEOUT_S").ok().and_then(|value| value.parse().ok()).unwrap_or(20.0);
    Duration::from_secs_f64(seconds)
}

fn watch() {
    let limit = case_timeout();
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let table = running().lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(hung) = table.values().find(|case| case.started.elapsed() > limit) {
            eprintln!(
                "\nFUZZ-TIMEOUT {}: one case ran longer than {:?} (CAC_FUZZ_CASE_TIMEOUT_S); input:\n{}\n",
                hung.name, limit, hung.input
            );
            std::process::exit(124);
        }
    }
}

/// Registers the current case with the watchdog until dropped.
struct Watchdog;

impl Watchdog {
    fn start(name: &'static str, input: &impl std::fmt::Debug) -> Watchdog {
        let mut input = format!("{input:?}");
        if input.len() > 64 * 1024 {
            let mut cut = 64 * 1024;
            while !input.is_char_boundary(cut) {
                cut -= 1;
            }
            input.truncate(cut);
            input.push_str(" …(cut)");
        }
        let case = Running { name, started: Instant::now(), input };
        running().lock().unwrap_or_else(|poisoned| poisoned.into_inner()).insert(std::thread::current().id(), case);
        Watchdog
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        running().lock().unwrap_or_else(|poisoned| poisoned.into_inner()).remove(&std::thread::current().id());
    }
}

// ------------------------------------------------------------------------------------ mutations

/// Where a mutation applies: anywhere in the file, or at an offset in the hot prefix
/// (clamped to the file's length when applied).
#[derive(Debug, Clone)]
pub enum At {
    Anywhere(Index),
    Hot(usize),
}

impl At {
    fn resolve(&self, len: usize) -> usize {
        match self {
            _ if len == 0 => 0,
            At::Anywhere(index) => index.index(len),
            At::Hot(offset) => (*offset).min(len - 1),
        }
    }
}

#[derive(Debug, Clone)]
pub enum Mutation {
    FlipBit {
        at: At,
        bit: u8,
    },
    SetByte {
        at: At,
        value: u8,
    },
    Insert {
        at: At,
        bytes: Vec<u8>,
    },
    Remove {
        at: At,
        len: usize,
    },
    Truncate {
        keep: At,
    },
    /// An interesting value written over 1, 2, 4 or 8 bytes (little or big endian): header
    /// lengths, dimensions, counts and offsets live in such fields.
    SetWord {
        at: At,
        value: u64,
        width: u8,
        big_endian: bool,
    },
    /// Copies `len` bytes from one place over another (repeated chunks, markers, headers).
    Duplicate {
        from: At,
        to: At,
        len: usize,
    },
}

/// Values at and around field limits.
pub const INTERESTING: [u64; 22] = [
    0,
    1,
    2,
    0x7F,
    0x80,
    0xFF,
    0x100,
    0x3FFF,
    0x4000,
    0x4001,
    0x7FFF,
    0x8000,
    0xEA60, // 60000
    0xFFFF,
    0x1_0000,
    0x7FFF_FFFF,
    0x8000_0000,
    0xFFFF_FFFF,
    0x1_0000_0000,
    100_000_001, // one over safetensors' 100 MB header limit
    i64::MAX as u64,
    u64::MAX,
];

pub fn at(hot_len: usize) -> BoxedStrategy<At> {
    let hot_len = hot_len.max(1);
    prop_oneof![any::<Index>().prop_map(At::Anywhere), (0..hot_len).prop_map(At::Hot)].boxed()
}

pub fn mutation(hot_len: usize) -> BoxedStrategy<Mutation> {
    let word = prop_oneof![proptest::sample::select(&INTERESTING[..]), any::<u64>()];
    prop_oneof![
        3 => (at(hot_len), 0u8..8).prop_map(|(at, bit)| Mutation::FlipBit { at, bit }),
        3 => (at(hot_len), any::<u8>()).prop_map(|(at, value)| Mutation::SetByte { at, value }),
        1 => (at(hot_len), proptest::collection::vec(any::<u8>(), 1..64)).prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        1 => (at(hot_len), 1usize..4096).prop_map(|(at, len)| Mutation::Remove { at, len }),
        1 => at(hot_len).prop_map(|keep| Mutation::Truncate { keep }),
        3 => (at(hot_len), word, prop_oneof![Just(1u8), Just(2), Just(4), Just(8)], any::<bool>())
            .prop_map(|(at, value, width, big_endian)| Mutation::SetWord { at, value, width, big_endian }),
        1 => (at(hot_len), at(hot_len), 1usize..512).prop_map(|(from, to, len)| Mutation::Duplicate { from, to, len }),
    ]
    .boxed()
}

/// One to `max` mutations, applied in order.
pub fn mutations(hot_len: usize, max: usize) -> BoxedStrategy<Vec<Mutation>> {
    proptest::collection::vec(mutation(hot_len), 1..=max).boxed()
}

pub fn apply(original: &[u8], mutations: &[Mutation]) -> Vec<u8> {
    let mut bytes = original.to_vec();
    for mutation in mutations {
        apply_one(&mut bytes, mutation);
    }
    bytes
}

fn apply_one(bytes: &mut Vec<u8>, mutation: &Mutation) {
    let len = bytes.len();
    match mutation {
        Mutation::FlipBit { at, bit } if len > 0 => bytes[at.resolve(len)] ^= 1 << (bit % 8),
        Mutation::SetByte { at, value } if len > 0 => bytes[at.resolve(len)] = *value,
        Mutation::Insert { at, bytes: inserted } => {
            let position = if len == 0 { 0 } else { at.resolve(len) };
            bytes.splice(position..position, inserted.iter().copied());
        }
        Mutation::Remove { at, len: count } if len > 0 => {
            let start = at.resolve(len);
            bytes.drain(start..(start + count).min(len));
        }
        Mutation::Truncate { keep } => bytes.truncate(keep.resolve(len)),
        Mutation::SetWord { at, value, width, big_endian } if len > 0 => {
            let width = usize::from(*width);
            let word =
                if *big_endian { value.to_be_bytes()[8 - width..].to_vec() } else { value.to_le_bytes()[..width].to_vec() };
            let start = at.resolve(len);
            for (offset, byte) in word.into_iter().enumerate() {
                if let Some(slot) = bytes.get_mut(start + offset) {
                    *slot = byte;
                }
            }
        }
        Mutation::Duplicate { from, to, len: count } if len > 0 => {
            let from = from.resolve(len);
            let chunk: Vec<u8> = bytes[from..(from + count).min(len)].to_vec();
            let to = to.resolve(len);
            for (offset, byte) in chunk.into_iter().enumerate() {
                if let Some(slot) = bytes.get_mut(to + offset) {
                    *slot = byte;
                }
            }
        }
        _ => {} // a mutation that needs a byte, on an empty file
    }
}
