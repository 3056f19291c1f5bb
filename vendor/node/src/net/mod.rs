//! The node's network: libp2p host, block exchange.

pub mod dht;
pub mod engine;
pub mod fetch;
pub mod frames;
pub mod host;
pub mod message;
pub mod serving;
pub mod spr;
