//! Shuyuan (数源): an edge gateway that collects public-utility data, de-identifies it,
//! seals it and pushes it to the city's big-data platform.
//!
//! The pipeline runs in one direction, each stage a module joined to the next by a bounded
//! channel so that a slow stage pushes back instead of growing memory:
//!
//! ```text
//! collect ──Record──▶ pipeline (policy + batch) ──Batch──▶ seal ──▶ outbox (SQLite) ──▶ uplink ──mTLS──▶ receiver
//! ```
//!
//! - [`config`]: the TOML schema, defaults, and validation that names file:line:col.
//! - [`collect`]: sources (Modbus TCP today) that turn device registers into [`collect::Record`]s.
//! - [`policy`]: de-identification rules, default deny.
//! - [`batch`]: groups policy output into JSON Lines batches closed by count, size or age.
//! - [`seal`]: the envelope: zstd, HPKE to the platform's key, ECDSA signature; and its opening.
//! - [`outbox`]: the durable SQLite queue of sealed batches; rows leave only when acked.
//! - [`uplink`]: the HTTPS client that pushes batches with retry and backoff.
//! - [`receiver`]: the reference platform receiver (used by tests, the demo and integrators).
//! - [`daemon`]: wires the stages together for `shuyuan run` and the demo.
//! - [`pki`], [`tls`], [`keys`]: certificates, TLS configs and key files.
//! - [`sim`]: a Modbus TCP device simulator for the demo, tests and load benchmarks.
//! - [`stats`]: counters shared by the stages, read by the demo's progress line.

#![forbid(unsafe_code)]

pub mod batch;
pub mod collect;
pub mod config;
pub mod daemon;
pub mod db;
pub mod demo;
pub mod enrol;
pub mod health;
pub mod keys;
pub mod mtls_server;
pub mod notify;
pub mod outbox;
pub mod pki;
pub mod policy;
pub mod receiver;
pub mod seal;
pub mod sim;
pub mod sim_files;
pub mod stats;
pub mod status;
pub mod timefmt;
pub mod tls;
pub mod uplink;
