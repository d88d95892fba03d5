//! The tower layers around the routes, one mechanism per module. Their order
//! on the server is in `crate::app`.

pub(crate) mod auth;
pub(crate) mod deadline;
pub(crate) mod drain;
pub(crate) mod limits;
pub(crate) mod metrics;
pub(crate) mod trace;
