//! The pool's connections, observed at each collection:
//! `db.client.connection.count` (idle and used) and
//! `db.client.connection.max`, as the database conventions name them.

use opentelemetry::KeyValue;
use sqlx::PgPool;

use crate::instruments::{self, DbSystem, pool_attrs};

/// Registers the callbacks for `pool`, which they keep alive (one store
/// per process; closing it leaves them reporting 0 connections).
pub(super) fn observe_pool(pool: &PgPool, max_connections: u32) {
    let meter = instruments::meter();
    let [system, name] = pool_attrs(DbSystem::Postgres);
    let state = |state: &'static str| {
        [
            system.clone(),
            name.clone(),
            KeyValue::new("db.client.connection.state", state),
        ]
    };
    let (idle, used) = (state("idle"), state("used"));
    let observed = pool.clone();
    let _count = meter
        .i64_observable_up_down_counter("db.client.connection.count")
        .with_unit("{connection}")
        .with_description("Connections of the pool, by state")
        .with_callback(move |observer| {
            let size = i64::from(observed.size());
            let idle_now = i64::try_from(observed.num_idle()).unwrap_or(size);
            observer.observe(idle_now, &idle);
            observer.observe((size - idle_now).max(0), &used);
        })
        .build();
    let attrs = [system, name];
    let _max = meter
        .i64_observable_up_down_counter("db.client.connection.max")
        .with_unit("{connection}")
        .with_description("The most connections the pool opens")
        .with_callback(move |observer| observer.observe(i64::from(max_connections), &attrs))
        .build();
}
