//! Tokens: how they are obtained (`grant`), parsed (`response`), held and refreshed
//! (`credential`, `refresher`), persisted (`state`) and looked up (`store`).

pub mod credential;
pub mod grant;
pub mod refresher;
pub mod response;
pub mod state;
pub mod store;
pub mod verify;

pub use credential::{ActiveToken, Credential, Snapshot, Start, Unavailable};
pub use store::TokenStore;
