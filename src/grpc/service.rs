//! The `UserManager` handlers: parse the request at the edge, ask the store,
//! shape the original service's responses. Errors leave through `?`.

use std::pin::Pin;

use futures::{Stream, StreamExt, TryStreamExt, stream};
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::{
    domain::{TypeFilter, User, UserId, UserType},
    grpc::proto::{self, UserCntResponse, UserRequest, UserResponse, UserTypeRequest},
    health::Health,
    store::{AddOutcome, StoreError, UserStore},
    wire::EncodedUser,
};

/// Ids looked up in one query at most, from what a client stream has already
/// delivered: big enough to amortise a query, small enough to stay prompt.
const ID_BATCH: usize = 512;
/// Users read per page by GetUsersByType; a stream holds at most one page.
/// (Reading the next page while sending this one was measured: on two cores
/// shared with the clients it cost more CPU than it saved time.)
const TYPE_PAGE: u32 = 512;

type ResponseStream = Pin<Box<dyn Stream<Item = Result<UserResponse, Status>> + Send>>;

/// The handlers. Calls still open at the drain deadline are ended by
/// `middleware::drain`, not here.
pub(crate) struct UserManagerService<S> {
    store: S,
    health: Health,
}

impl<S: UserStore> UserManagerService<S> {
    pub(crate) fn new(store: S, health: Health) -> Self {
        Self { store, health }
    }

    /// Refuses calls while the readiness check can't read the database:
    /// connections opened before a file vanished would answer from a ghost.
    fn available(&self) -> Result<(), Status> {
        if self.health.database_ok() {
            Ok(())
        } else {
            Err(Status::unavailable(
                "the user database is unavailable, try again later",
            ))
        }
    }
}

#[tonic::async_trait]
impl<S: UserStore> proto::user_manager_server::UserManager for UserManagerService<S> {
    async fn get_user(
        &self,
        request: Request<UserRequest>,
    ) -> Result<Response<UserResponse>, Status> {
        self.available()?;
        // Id 0 can't exist: "not found", as the original service answered.
        let user = match UserId::new(request.into_inner().id) {
            Some(id) => self.store.get(id).await?,
            None => None,
        };
        Ok(Response::new(
            user.map_or_else(not_found, UserResponse::from),
        ))
    }

    async fn add_user(
        &self,
        request: Request<proto::User>,
    ) -> Result<Response<UserResponse>, Status> {
        self.available()?;
        let raw = request.into_inner();
        let user = User::parse(raw.id, raw.nickname, raw.mail_address, raw.user_type)?;
        let response = match self.store.add(user.clone()).await? {
            AddOutcome::Added => found(user),
            AddOutcome::AlreadyExists => failure("already exist"),
        };
        Ok(Response::new(response))
    }

    async fn count_already_users(
        &self,
        request: Request<Streaming<UserRequest>>,
    ) -> Result<Response<UserCntResponse>, Status> {
        self.available()?;
        // Full batches, not whatever has arrived: the answer comes at the end
        // anyway, and a short call's ids go in one query instead of a few.
        let mut batches = request.into_inner().chunks(ID_BATCH);
        let mut count: u64 = 0;
        while let Some(batch) = batches.next().await {
            let (ids, failed) = split_batch(batch);
            if !ids.is_empty() {
                count += self.store.count_existing(&ids).await?;
            }
            if let Some(status) = failed {
                return Err(status);
            }
        }
        let user_cnt = u32::try_from(count)
            .map_err(|_| Status::out_of_range("more than 2^32-1 existing ids were sent"))?;
        Ok(Response::new(UserCntResponse {
            error: false,
            user_cnt,
        }))
    }

    type GetUsersByTypeStream = ResponseStream;

    async fn get_users_by_type(
        &self,
        request: Request<UserTypeRequest>,
    ) -> Result<Response<Self::GetUsersByTypeStream>, Status> {
        self.available()?;
        let stream: ResponseStream = match TypeFilter::from_number(request.into_inner().user_type)?
        {
            TypeFilter::Nobody => Box::pin(stream::empty()),
            TypeFilter::Only(user_type) => {
                Box::pin(users_of_type(self.store.clone(), user_type).map_ok(UserResponse::from))
            }
        };
        Ok(Response::new(stream))
    }

    type GetUsersByIdsStream = ResponseStream;

    async fn get_users_by_ids(
        &self,
        request: Request<Streaming<UserRequest>>,
    ) -> Result<Response<Self::GetUsersByIdsStream>, Status> {
        self.available()?;
        let store = self.store.clone();
        // A batch is whatever has arrived: a ping-pong client's batch is its one
        // id, answered before it sends the next.
        let answers = request
            .into_inner()
            .ready_chunks(ID_BATCH)
            .then(move |batch| {
                let store = store.clone();
                async move {
                    let (ids, failed) = split_batch(batch);
                    let users = if ids.is_empty() {
                        Vec::new()
                    } else {
                        run_detached(async move { store.get_many(&ids).await }).await?
                    };
                    let answers = users.into_iter().map(|u| Ok(UserResponse::from(u)));
                    Ok::<_, Status>(stream::iter(answers.chain(failed.map(Err))))
                }
            })
            .try_flatten();
        Ok(Response::new(Box::pin(answers)))
    }
}

/// Every user of `user_type` in ascending id order, read one page at a time
/// when the previous page has been sent: memory stays at one page, and no
/// connection or transaction is held while the client is slow to read.
fn users_of_type<S: UserStore>(
    store: S,
    user_type: UserType,
) -> impl Stream<Item = Result<EncodedUser, Status>> + Send {
    // The state is the cursor of the next page, or None once a short page ended it.
    stream::try_unfold(Some(None), move |cursor: Option<Option<UserId>>| {
        let store = store.clone();
        async move {
            let Some(after) = cursor else {
                return Ok(None);
            };
            let page =
                run_detached(async move { store.page_by_type(user_type, after, TYPE_PAGE).await })
                    .await?;
            let next = match page.last() {
                Some(last) if page.len() == TYPE_PAGE as usize => Some(Some(last.id())),
                _ => None,
            };
            Ok::<_, Status>(Some((stream::iter(page.into_iter().map(Ok)), next)))
        }
    })
    .try_flatten()
}

/// Runs a query of a response stream on its own task. The stream is polled
/// only while its client reads (HTTP/2 flow control); a query parked
/// mid-flight with it would keep its pooled connection, and four clients that
/// stop reading would block every read. Detached, it finishes, returns the
/// connection, and its one result waits for the stream.
async fn run_detached<T: Send + 'static>(
    query: impl Future<Output = Result<T, StoreError>> + Send + 'static,
) -> Result<T, Status> {
    match tokio::spawn(query.in_current_span()).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(Status::internal("a database query's task failed")),
    }
}

/// The valid ids of a batch of stream messages, up to the first stream error.
/// Id 0 names no user, so it is dropped like any other missing id.
fn split_batch(batch: Vec<Result<UserRequest, Status>>) -> (Vec<UserId>, Option<Status>) {
    let mut ids = Vec::with_capacity(batch.len());
    for message in batch {
        match message {
            Ok(req) => ids.extend(UserId::new(req.id)),
            Err(status) => return (ids, Some(status)),
        }
    }
    (ids, None)
}

fn found(user: User) -> UserResponse {
    UserResponse::new(false, String::new(), Some(to_proto(user)))
}

fn not_found() -> UserResponse {
    failure("not found")
}

fn failure(message: &str) -> UserResponse {
    UserResponse::new(true, message.to_owned(), None)
}

fn to_proto(user: User) -> proto::User {
    proto::User {
        id: user.id.get(),
        nickname: user.nickname.into_string(),
        mail_address: user.mail_address.into_string(),
        user_type: user.user_type.number(),
    }
}
