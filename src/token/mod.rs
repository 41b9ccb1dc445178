//! Tokens: how they are obtained (`grant`), parsed (`response`), verified (`verify`), held
//! for requests (`credential`, the read side), written (`refresher`, the one writer, with
//! its pure `schedule`, stepped by the one `scheduler` task), stored (`state`, the storage
//! seam) and looked up (`store`).

pub mod credential;
pub mod grant;
pub mod published;
pub mod refresher;
pub mod response;
pub mod schedule;
pub mod scheduler;
pub mod state;
pub mod store;
pub mod verify;

pub use credential::{ActiveToken, Credential, Snapshot, Unavailable};
pub use refresher::{Refresher, Start};
pub use store::TokenStore;
