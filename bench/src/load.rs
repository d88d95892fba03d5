//! The load generator. Every response is checked against the dataset: a
//! wrong answer or an error status is counted as a failure, never as work done.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures::{StreamExt, channel::mpsc, stream};
use tokio::time::MissedTickBehavior;
use tonic::{Response, Status, Streaming, transport::Channel};
use user_manager::proto::{
    UserRequest, UserResponse, UserTypeRequest, user_manager_client::UserManagerClient,
};

use crate::dataset::{self, RARE_TYPE, Rng, STREAMED_TYPE};

pub type Client = UserManagerClient<Channel>;

/// What one workload did against one server.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Requests (or stream messages) answered correctly inside the window.
    pub ops: u64,
    /// Requests answered correctly in all, warm-up included (0: as `ops`):
    /// what the server's context switches over the workload are divided by.
    pub ops_total: u64,
    pub elapsed: Duration,
    /// Latencies of the measured requests, in nanoseconds (empty for bulk streams).
    pub latencies: Vec<u64>,
    pub failures: u64,
    pub first_failure: Option<String>,
}

impl Outcome {
    pub fn rate(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The `p`th percentile latency (`latencies` must be sorted).
    pub fn percentile(&self, p: f64) -> Option<Duration> {
        let n = self.latencies.len();
        (n > 0).then(|| {
            let rank = ((p / 100.0) * n as f64).ceil() as usize;
            Duration::from_nanos(self.latencies[rank.clamp(1, n) - 1])
        })
    }
}

/// Failures seen by concurrent tasks; the first one is kept to be shown.
#[derive(Default)]
struct Failures {
    count: AtomicU64,
    first: Mutex<Option<String>>,
}

impl Failures {
    fn record(&self, what: String) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.first.lock().unwrap().get_or_insert(what);
    }

    fn into_outcome(self, ops: u64, elapsed: Duration, mut latencies: Vec<u64>) -> Outcome {
        latencies.sort_unstable();
        Outcome {
            ops,
            ops_total: 0,
            elapsed,
            latencies,
            failures: self.count.into_inner(),
            first_failure: self.first.into_inner().unwrap(),
        }
    }
}

/// A warm-up, then the measured window.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub warmup: Duration,
    pub measure: Duration,
}

fn status(s: &Status) -> String {
    format!("{:?} {}", s.code(), s.message())
}

/// Checks a unary answer that must carry exactly the user stored under `id`.
fn expect_user(result: Result<Response<UserResponse>, Status>, id: u32) -> Result<(), String> {
    let response = result.map_err(|s| format!("id {id}: {}", status(&s)))?;
    check_found(&response.into_inner(), id)
}

fn check_found(response: &UserResponse, id: u32) -> Result<(), String> {
    match &response.user {
        Some(user) if !response.error && dataset::is_user(user, id) => Ok(()),
        _ => Err(format!("id {id}: wrong answer {response:?}")),
    }
}

/// Runs `concurrency` callers spread over `channels`, each issuing one
/// request at a time: as fast as answers come back (`rate` None), or paced
/// so that all callers together send `rate` requests per second.
async fn callers<F, Fut>(
    channels: &[Channel],
    concurrency: usize,
    window: Window,
    rate: Option<f64>,
    call: F,
) -> Outcome
where
    F: Fn(Client, &mut Rng) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = (Client, Result<(), String>)> + Send,
{
    let failures = Arc::new(Failures::default());
    let start = tokio::time::Instant::now();
    let from = (start + window.warmup).into_std();
    let until = from + window.measure;
    let tasks: Vec<_> = (0..concurrency)
        .map(|i| {
            let mut client = UserManagerClient::new(channels[i % channels.len()].clone());
            let failures = failures.clone();
            let call = call.clone();
            // Paced callers start evenly spread over one period.
            let mut ticks = rate.map(|rate| {
                let period = Duration::from_secs_f64(concurrency as f64 / rate);
                let mut ticks = tokio::time::interval_at(
                    start + period.mul_f64(i as f64 / concurrency as f64),
                    period,
                );
                ticks.set_missed_tick_behavior(MissedTickBehavior::Burst);
                ticks
            });
            tokio::spawn(async move {
                let mut rng = Rng::new(i as u64 + 1);
                let mut latencies = Vec::new();
                let mut answered = 0;
                loop {
                    if let Some(ticks) = &mut ticks {
                        ticks.tick().await;
                    }
                    let sent = Instant::now();
                    if sent >= until {
                        break;
                    }
                    let (back, result) = call(client, &mut rng).await;
                    client = back;
                    let done = Instant::now();
                    answered += u64::from(result.is_ok());
                    match result {
                        Ok(()) if sent >= from && done <= until => {
                            latencies.push((done - sent).as_nanos() as u64);
                        }
                        Ok(()) => {}
                        Err(what) => failures.record(what),
                    }
                }
                (latencies, answered)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    let mut answered = 0;
    for task in tasks {
        let (some, n) = task.await.expect("a load task panicked");
        latencies.extend(some);
        answered += n;
    }
    let failures = Arc::into_inner(failures).expect("every task has finished");
    let mut outcome = failures.into_outcome(latencies.len() as u64, window.measure, latencies);
    outcome.ops_total = answered;
    outcome
}

/// `calls` calls in all from `concurrency` callers spread over `channels`,
/// one request in flight each, as fast as answers come back: a fixed amount
/// of work, for counting instructions.
pub async fn fixed_calls<F, Fut>(
    channels: &[Channel],
    concurrency: usize,
    calls: u64,
    call: F,
) -> Outcome
where
    F: Fn(Client, &mut Rng) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = (Client, Result<(), String>)> + Send,
{
    let failures = Arc::new(Failures::default());
    let left = Arc::new(AtomicU64::new(calls));
    let start = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|i| {
            let mut client = UserManagerClient::new(channels[i % channels.len()].clone());
            let (failures, left, call) = (failures.clone(), left.clone(), call.clone());
            tokio::spawn(async move {
                let mut rng = Rng::new(1000 + i as u64);
                let mut answered = 0;
                while left
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                    .is_ok()
                {
                    let (back, result) = call(client, &mut rng).await;
                    client = back;
                    match result {
                        Ok(()) => answered += 1,
                        Err(what) => failures.record(what),
                    }
                }
                answered
            })
        })
        .collect();
    let mut ops = 0;
    for task in tasks {
        ops += task.await.expect("a load task panicked");
    }
    let failures = Arc::into_inner(failures).expect("every task has finished");
    failures.into_outcome(ops, start.elapsed(), Vec::new())
}

/// One GetUser of a uniformly drawn existing id, checked.
pub fn get_user_call(users: u32) -> impl Fn(Client, &mut Rng) -> Call + Clone + Send + 'static {
    move |mut client, rng| {
        let id = rng.id(users);
        Box::pin(async move {
            let result = client.get_user(UserRequest { id }).await;
            (client, expect_user(result, id))
        })
    }
}

pub type Call = Pin<Box<dyn Future<Output = (Client, Result<(), String>)> + Send>>;

/// One short GetUsersByType call, for the type only a handful of users have:
/// exactly those users, in id order.
pub fn by_rare_type_call(users: u32) -> impl Fn(Client, &mut Rng) -> Call + Clone + Send + 'static {
    let expected: Arc<[u32]> = dataset::rare_ids(users).collect();
    move |mut client, _| {
        let expected = expected.clone();
        Box::pin(async move {
            let request = UserTypeRequest {
                user_type: RARE_TYPE,
            };
            let result = match client.get_users_by_type(request).await {
                Ok(r) => check_users(r.into_inner(), expected.iter().copied())
                    .await
                    .map_err(|(what, _)| what),
                Err(s) => Err(status(&s)),
            };
            (client, result.map(drop))
        })
    }
}

/// One short CountAlreadyUsers call of `ids` ids drawn from twice the id
/// range (about half exist), its count checked.
pub fn count_call(
    users: u32,
    ids: u32,
) -> impl Fn(Client, &mut Rng) -> Call + Clone + Send + 'static {
    move |mut client, rng| {
        let range = users.saturating_mul(2);
        let drawn: Vec<u32> = (0..ids).map(|_| rng.id(range)).collect();
        let expected = drawn.iter().filter(|&&id| id <= users).count() as u32;
        Box::pin(async move {
            let requests = stream::iter(drawn.into_iter().map(|id| UserRequest { id }));
            let result = match client.count_already_users(requests).await {
                Ok(r) if !r.get_ref().error && r.get_ref().user_cnt == expected => Ok(()),
                Ok(r) => Err(format!("expected {expected}, got {:?}", r.into_inner())),
                Err(s) => Err(status(&s)),
            };
            (client, result)
        })
    }
}

/// One short GetUsersByIds call of `ids` existing ids, every answer checked
/// in order.
pub fn by_ids_call(
    users: u32,
    ids: u32,
) -> impl Fn(Client, &mut Rng) -> Call + Clone + Send + 'static {
    move |mut client, rng| {
        let drawn: Vec<u32> = (0..ids).map(|_| rng.id(users)).collect();
        Box::pin(async move {
            let requests = stream::iter(drawn.clone().into_iter().map(|id| UserRequest { id }));
            let result = match client.get_users_by_ids(requests).await {
                Ok(r) => check_users(r.into_inner(), drawn.into_iter())
                    .await
                    .map_err(|(what, _)| what),
                Err(s) => Err(status(&s)),
            };
            (client, result.map(drop))
        })
    }
}

/// Short calls from `concurrency` callers over the window, as fast as
/// answers come back.
pub async fn short_calls(
    channels: &[Channel],
    concurrency: usize,
    window: Window,
    call: impl Fn(Client, &mut Rng) -> Call + Clone + Send + 'static,
) -> Outcome {
    callers(channels, concurrency, window, None, call).await
}

/// GetUser of uniformly drawn existing ids.
pub async fn get_user(
    channels: &[Channel],
    users: u32,
    concurrency: usize,
    window: Window,
    rate: Option<f64>,
) -> Outcome {
    callers(channels, concurrency, window, rate, get_user_call(users)).await
}

/// AddUser of new users, ids taken from `next_id` so every call adds one.
pub async fn add_user(
    channels: &[Channel],
    next_id: Arc<AtomicU32>,
    concurrency: usize,
    window: Window,
) -> Outcome {
    callers(channels, concurrency, window, None, move |mut client, _| {
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        async move {
            let result = client.add_user(dataset::user(id)).await;
            (client, expect_user(result, id))
        }
    })
    .await
}

/// Reads a stream that must carry exactly the users `expected`, in order;
/// returns how many answers were right before the first wrong one.
async fn expect_users(
    answers: Streaming<UserResponse>,
    expected: impl Iterator<Item = u32>,
    failures: &Failures,
) -> u64 {
    match check_users(answers, expected).await {
        Ok(ops) => ops,
        Err((what, ops)) => {
            failures.record(what);
            ops
        }
    }
}

/// Reads a stream that must carry exactly the users `expected`, in order:
/// how many there were, or what was wrong and how many were right before.
async fn check_users(
    mut answers: Streaming<UserResponse>,
    mut expected: impl Iterator<Item = u32>,
) -> Result<u64, (String, u64)> {
    let mut ops = 0;
    while let Some(answer) = answers.next().await {
        let checked = match (answer, expected.next()) {
            (Ok(answer), Some(id)) => check_found(&answer, id),
            (Ok(answer), None) => Err(format!("unexpected extra answer {answer:?}")),
            (Err(s), _) => Err(status(&s)),
        };
        if let Err(what) = checked {
            return Err((what, ops));
        }
        ops += 1;
    }
    match expected.next() {
        Some(id) => Err((format!("the stream ended before user {id}"), ops)),
        None => Ok(ops),
    }
}

/// One GetUsersByType stream, checked message by message: every user of the
/// type, in ascending id order, and nothing else.
pub async fn users_by_type(channel: &Channel, users: u32) -> Outcome {
    let failures = Failures::default();
    let start = Instant::now();
    let expected = (1..=users).filter(|&id| dataset::user_type(id) == STREAMED_TYPE);
    let request = UserTypeRequest {
        user_type: STREAMED_TYPE,
    };
    let ops = match UserManagerClient::new(channel.clone())
        .get_users_by_type(request)
        .await
    {
        Ok(response) => expect_users(response.into_inner(), expected, &failures).await,
        Err(s) => {
            failures.record(status(&s));
            0
        }
    };
    failures.into_outcome(ops, start.elapsed(), Vec::new())
}

/// One CountAlreadyUsers stream of `count` ids drawn from twice the id range,
/// so about half of them exist.
pub async fn count_already_users(channel: &Channel, users: u32, count: u32) -> Outcome {
    let failures = Failures::default();
    let range = users.saturating_mul(2);
    let draw = move || {
        let mut rng = Rng::new(7);
        (0..count).map(move |_| rng.id(range))
    };
    let expected = draw().filter(|&id| id <= users).count() as u32;
    let start = Instant::now();
    let requests = stream::iter(draw().map(|id| UserRequest { id }));
    match UserManagerClient::new(channel.clone())
        .count_already_users(requests)
        .await
    {
        Ok(r) if !r.get_ref().error && r.get_ref().user_cnt == expected => {}
        Ok(r) => failures.record(format!("expected {expected}, got {:?}", r.into_inner())),
        Err(s) => failures.record(status(&s)),
    }
    let ops = if failures.count.load(Ordering::Relaxed) == 0 {
        u64::from(count)
    } else {
        0
    };
    failures.into_outcome(ops, start.elapsed(), Vec::new())
}

/// GetUsersByIds on one stream, one id at a time: each answer arrives before
/// the next id is sent, so this measures the round trip.
pub async fn users_by_ids_ping_pong(channel: &Channel, users: u32, window: Window) -> Outcome {
    let failures = Failures::default();
    let (ids, requests) = mpsc::unbounded();
    let mut rng = Rng::new(11);
    let mut latencies = Vec::new();
    let mut answered = 0;
    let start = Instant::now();
    let from = start + window.warmup;
    let until = from + window.measure;
    let mut id = rng.id(users);
    let mut sent = Instant::now();
    let _ = ids.unbounded_send(UserRequest { id });
    match UserManagerClient::new(channel.clone())
        .get_users_by_ids(requests)
        .await
    {
        Err(s) => failures.record(status(&s)),
        Ok(response) => {
            let mut answers = response.into_inner();
            loop {
                let checked = match answers.next().await {
                    Some(Ok(answer)) => check_found(&answer, id),
                    Some(Err(s)) => Err(status(&s)),
                    None => Err(format!("the stream ended before answering id {id}")),
                };
                let done = Instant::now();
                if let Err(what) = checked {
                    failures.record(what);
                    break;
                }
                answered += 1;
                if sent >= from {
                    latencies.push((done - sent).as_nanos() as u64);
                }
                if done >= until {
                    break;
                }
                id = rng.id(users);
                sent = Instant::now();
                let _ = ids.unbounded_send(UserRequest { id });
            }
            ids.close_channel();
            while let Some(extra) = answers.next().await {
                if let Err(s) = extra {
                    failures.record(format!("closing: {}", status(&s)));
                }
            }
        }
    }
    let mut outcome = failures.into_outcome(latencies.len() as u64, window.measure, latencies);
    outcome.ops_total = answered;
    outcome
}

/// GetUsersByIds on one stream per channel, each sending `per_stream` ids as
/// fast as flow control allows while its answers are read and checked in order.
pub async fn users_by_ids_bulk(channels: &[Channel], users: u32, per_stream: u32) -> Outcome {
    let failures = Arc::new(Failures::default());
    let start = Instant::now();
    let draw = move |seed: u64| {
        let mut rng = Rng::new(seed);
        (0..per_stream).map(move |_| rng.id(users))
    };
    let tasks: Vec<_> = channels
        .iter()
        .enumerate()
        .map(|(i, channel)| {
            let mut client = UserManagerClient::new(channel.clone());
            let failures = failures.clone();
            let seed = 100 + i as u64;
            tokio::spawn(async move {
                let requests = stream::iter(draw(seed).map(|id| UserRequest { id }));
                match client.get_users_by_ids(requests).await {
                    Ok(response) => {
                        expect_users(response.into_inner(), draw(seed), &failures).await
                    }
                    Err(s) => {
                        failures.record(status(&s));
                        0
                    }
                }
            })
        })
        .collect();
    let mut ops = 0;
    for task in tasks {
        ops += task.await.expect("a load task panicked");
    }
    let elapsed = start.elapsed();
    let failures = Arc::into_inner(failures).expect("every task has finished");
    failures.into_outcome(ops, elapsed, Vec::new())
}
