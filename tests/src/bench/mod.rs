//! `saga-bench`: the benchmark harness of issue 4.
//!
//! It starts nats-server, the participants and the coordinator as separate
//! processes on loopback (or drives running ones with `--target`), measures
//! the floors of this machine (raw NATS request-reply, raw sled
//! insert+flush), drives orders over gRPC and reports the engine's figures
//! next to those floors. The modules:
//!
//! - `cli`: the flags;
//! - `sys`: the processes, their CPU and memory from `/proc`, `/metrics` scrapes;
//! - `drive`: order generation, driving N orders with C in flight, following each to its end;
//! - `floors`: the NATS and sled floors;
//! - `scenarios`: the sweep, recovery, soak and stored-store scenarios;
//! - `report`: the tables and the JSON.
//!
//! Nothing here is part of the engine: it only talks to it the way a client
//! and an operator would (gRPC, `/metrics`, signals).

pub(crate) mod cli;
pub(crate) mod drive;
pub(crate) mod floors;
pub(crate) mod report;
pub(crate) mod scenarios;
pub(crate) mod sys;
