//! Inputs that once broke a fuzz target, kept in
//! `fuzz/regressions/<target>/`: every one replays through its harness,
//! whose invariants must all hold. `make fuzz` also feeds them to
//! libFuzzer as seeds.

mod support;

use std::path::Path;
use support::fuzz_record::TARGETS;

#[test]
fn every_kept_crash_input_replays_cleanly() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions");
    let mut replayed = 0;
    for target in TARGETS {
        let dir = root.join(target.name());
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries {
            let path = entry.expect("read fuzz/regressions").path();
            let data = std::fs::read(&path).expect("read a regression input");
            // The harness panics on a broken invariant; the path says which input.
            let outcome = std::panic::catch_unwind(|| target.run(&data));
            assert!(outcome.is_ok(), "{} broke the {} harness again", path.display(), target.name());
            replayed += 1;
        }
    }
    // The overflow the transmission target found is one of them; every
    // target, the server role's included, replays its directory.
    assert!(replayed >= 1, "no regression inputs found under {}", root.display());
}
