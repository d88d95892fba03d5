//! The tower layers around the routes, one mechanism per module. Their order
//! on the server is in `crate::app`.

pub mod auth;
pub mod deadline;
pub mod drain;
pub mod limits;
pub mod trace;
