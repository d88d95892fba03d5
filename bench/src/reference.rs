//! The reference: the same proto served by tonic from an in-memory map, with
//! no storage, no tracing and no layers. It is the ceiling the framework
//! allows on this machine; user-manager's figures are ratios to it.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    ops::Bound,
    pin::Pin,
    sync::{Arc, RwLock},
};

use futures::{Stream, StreamExt, stream};
use tokio::net::TcpListener;
use tonic::{
    Request, Response, Status, Streaming,
    transport::{Server, server::TcpIncoming},
};
use user_manager::proto::{
    User, UserCntResponse, UserRequest, UserResponse, UserTypeRequest,
    user_manager_server::{UserManager, UserManagerServer},
};

use crate::dataset;

/// Users per page of GetUsersByType, as user-manager reads them.
const PAGE: usize = 512;

type Users = Arc<RwLock<BTreeMap<u32, User>>>;
type ResponseStream = Pin<Box<dyn Stream<Item = Result<UserResponse, Status>> + Send>>;

/// Serves users 1..=`users` on `listen` until killed.
pub fn serve(listen: SocketAddr, users: u32) -> anyhow::Result<()> {
    let map: BTreeMap<u32, User> = (1..=users).map(|id| (id, dataset::user(id))).collect();
    let service = Reference {
        users: Arc::new(RwLock::new(map)),
    };
    tokio::runtime::Runtime::new()?.block_on(async move {
        let listener = TcpListener::bind(listen).await?;
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        Server::builder()
            .add_service(UserManagerServer::new(service))
            .serve_with_incoming(incoming)
            .await?;
        Ok(())
    })
}

struct Reference {
    users: Users,
}

// The message type is user-manager's (hand-written so it can also carry
// pre-encoded bytes); built this way it encodes exactly as prost's derived
// code would, with the same prost encoding functions.
fn found(user: User) -> UserResponse {
    UserResponse::new(false, String::new(), Some(user))
}

fn failure(message: &str) -> UserResponse {
    UserResponse::new(true, message.into(), None)
}

fn lookup(users: &Users, id: u32) -> Option<User> {
    users.read().unwrap().get(&id).cloned()
}

#[tonic::async_trait]
impl UserManager for Reference {
    async fn get_user(
        &self,
        request: Request<UserRequest>,
    ) -> Result<Response<UserResponse>, Status> {
        let user = lookup(&self.users, request.into_inner().id);
        Ok(Response::new(
            user.map_or_else(|| failure("not found"), found),
        ))
    }

    async fn add_user(&self, request: Request<User>) -> Result<Response<UserResponse>, Status> {
        let user = request.into_inner();
        let mut users = self.users.write().unwrap();
        let response = match users.entry(user.id) {
            std::collections::btree_map::Entry::Occupied(_) => failure("already exist"),
            std::collections::btree_map::Entry::Vacant(slot) => found(slot.insert(user).clone()),
        };
        Ok(Response::new(response))
    }

    async fn count_already_users(
        &self,
        request: Request<Streaming<UserRequest>>,
    ) -> Result<Response<UserCntResponse>, Status> {
        let mut ids = request.into_inner();
        let mut user_cnt = 0;
        while let Some(req) = ids.next().await {
            if self.users.read().unwrap().contains_key(&req?.id) {
                user_cnt += 1;
            }
        }
        Ok(Response::new(UserCntResponse {
            error: false,
            user_cnt,
        }))
    }

    type GetUsersByTypeStream = ResponseStream;

    async fn get_users_by_type(
        &self,
        request: Request<UserTypeRequest>,
    ) -> Result<Response<ResponseStream>, Status> {
        let wanted = request.into_inner().user_type;
        let users = self.users.clone();
        // Page by page, as user-manager does, so no lock is held while sending.
        let pages = stream::unfold(Some(0), move |after| {
            let users = users.clone();
            async move {
                let after = after?;
                let page: Vec<User> = users
                    .read()
                    .unwrap()
                    .range((Bound::Excluded(after), Bound::Unbounded))
                    .map(|(_, u)| u)
                    .filter(|u| u.user_type == wanted)
                    .take(PAGE)
                    .cloned()
                    .collect();
                let next = (page.len() == PAGE).then(|| page[PAGE - 1].id);
                Some((stream::iter(page.into_iter().map(|u| Ok(found(u)))), next))
            }
        });
        Ok(Response::new(Box::pin(pages.flatten())))
    }

    type GetUsersByIdsStream = ResponseStream;

    async fn get_users_by_ids(
        &self,
        request: Request<Streaming<UserRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let users = self.users.clone();
        let answers = request.into_inner().filter_map(move |req| {
            let answer = match req {
                Ok(req) => lookup(&users, req.id).map(|u| Ok(found(u))),
                Err(status) => Some(Err(status)),
            };
            std::future::ready(answer)
        });
        Ok(Response::new(Box::pin(answers)))
    }
}
