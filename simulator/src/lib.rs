//! tidesync-sim: deterministic fleet simulation of core's state machines, and the demo.
//!
//! It will own a virtual clock and a seeded RNG driving devices, gateways and a cloud made of
//! core's sans-IO sessions, with fault injection and after-heal checks, plus the real-process
//! demo. Filled by the simulator issue.
