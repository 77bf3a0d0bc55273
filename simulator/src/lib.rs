//! tidesync-sim: a deterministic fleet simulation of core's sans-IO state machines.
//!
//! Devices, gateways and one cloud run as `tidesync_core::sync` sessions over simulated disks
//! ([`disk::SimDisk`], which keeps unsynced writes apart from durable ones) in one process, on a
//! virtual clock, with one `ChaCha8Rng` seeded from the run's seed ([`world::World`]). Faults are
//! drawn from the seed ([`options::DrawnFaults`]) and printed; after the workload the faults
//! stop, the fleet heals, and [`check`] verifies exactly-once delivery, per-device order, shadow
//! convergence, projections and gaps. The same seed and binary give the same run bit for bit,
//! summarised by a trace digest ([`digest::TraceDigest`]).
//!
//! Invariant: nothing in this crate's library reads a clock, spawns a thread or draws an unseeded
//! random number; the binary only measures wall time for its report.

pub mod check;
pub mod dice;
pub mod digest;
pub mod disk;
pub mod options;
pub mod projection;
pub mod report;
pub mod world;

pub use options::{Bugs, FaultKind, SimOptions};
pub use report::Outcome;
pub use world::World;

/// Runs one simulation to the end and checks it. `progress` gets (simulated ms so far,
/// simulated ms at most) now and then.
pub fn run(options: SimOptions, progress: impl FnMut(u64, u64)) -> Outcome {
    let mut world = World::new(options);
    run_world(&mut world, progress)
}

/// Runs an already built world (for callers that print its drawn faults first) and checks it.
pub fn run_world(world: &mut World, progress: impl FnMut(u64, u64)) -> Outcome {
    let span = tracing::info_span!("sim", seed = world.options().seed);
    let _entered = span.enter();
    world.run(progress);
    let failures = check::check_all(world);
    Outcome {
        options: world.options().clone(),
        drawn: world.drawn().clone(),
        digest: world.digest(),
        stats: world.stats().clone(),
        n_events_durable: world.oracle.iter().map(|oracle| oracle.len() as u64).sum(),
        n_events_cloud: world.cloud.disk.durable().ledger.len() as u64,
        simulated_ms: world.elapsed_ms(),
        heal_start_ms: world.heal_start_ms(),
        converge_ms: world.converge_ms(),
        plot: world.plot().to_vec(),
        failures,
        security: world.security_report(),
    }
}
