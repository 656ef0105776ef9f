//! The worker contract, implemented once (see `docs/contract.md`).
//!
//! A worker is a thin pipeline over these parts:
//! - [`options`]: the flags every worker accepts (`POPULATOR_*` environment too);
//! - [`target`]: what the volume is (directory, block device, image file) and its capacity;
//! - [`pipeline`]: source → [`digest`] → [`decompress`] → [`content`] sink → target,
//!   with [`writer`] turning zero regions into holes or BLKZEROOUT and
//!   [`archive`] extracting tar streams safely;
//! - [`progress`] and [`metrics`]: what a person and a controller see meanwhile;
//! - [`worker`]: the entry wrapper that writes the [`result`] and picks the exit
//!   code from the [`error`] kind;
//! - [`http`]: the HTTP(S) client with TLS, proxies, retries and ranges;
//! - [`secrets`], [`tls`], [`cancel`]: secrets from files, server certificates, SIGTERM.

pub mod archive;
pub mod cancel;
pub mod content;
pub mod decompress;
pub mod digest;
pub mod disk;
pub mod error;
pub mod http;
pub mod log;
pub mod metrics;
pub mod options;
pub mod pipeline;
pub mod progress;
pub mod result;
pub mod secrets;
pub mod target;
pub mod tls;
pub mod worker;
pub mod writeback;
pub mod writer;

pub use error::{fail, Kind};
pub use worker::{Context, Worker};
