//! The one integration test binary: end-to-end and fault tests sharing `shuyuan_tests`.

mod audit;
mod certs;
mod config_errors;
mod crash;
mod e2e;
mod files;
mod health;
mod interop;
mod outbox;
mod packaging;
mod privacy;
mod receiver;
mod rtu;
mod schedule;
mod status;
mod systemd;
