//! A webhook receiver for the rules tests: an HTTP server on 127.0.0.1:0 that records every
//! POST (headers and JSON body) and answers the first `failures` of them with 500.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{extract::State, http::HeaderMap, http::StatusCode, routing::post, Json, Router};
use serde_json::Value;
use tokio::{net::TcpListener, sync::oneshot};

/// One call received.
#[derive(Debug, Clone)]
pub struct Call {
    pub headers: HeaderMap,
    pub body: Value,
    pub answered: u16,
}

#[derive(Default)]
struct Book {
    calls: Vec<Call>,
    failures: usize,
}

/// The receiver; stops when dropped.
pub struct Webhook {
    pub addr: SocketAddr,
    book: Arc<Mutex<Book>>,
    _stop: oneshot::Sender<()>,
}

async fn receive(
    State(book): State<Arc<Mutex<Book>>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> StatusCode {
    let mut book = book.lock().unwrap();
    let status = if book.failures > 0 {
        book.failures -= 1;
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::OK
    };
    book.calls.push(Call {
        headers,
        body,
        answered: status.as_u16(),
    });
    status
}

impl Webhook {
    /// Listens on 127.0.0.1:0 and answers the first `failures` calls with 500.
    pub async fn start(failures: usize) -> Webhook {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let book = Arc::new(Mutex::new(Book {
            calls: Vec::new(),
            failures,
        }));
        let app = Router::new()
            .route("/hook", post(receive))
            .with_state(book.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
        });
        Webhook {
            addr,
            book,
            _stop: stop,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    pub fn calls(&self) -> Vec<Call> {
        self.book.lock().unwrap().calls.clone()
    }

    /// Waits until `n` calls have arrived (at most [`crate::EVENTUALLY`]); returns them.
    pub async fn wait_for(&self, n: usize) -> Vec<Call> {
        let deadline = Instant::now() + crate::EVENTUALLY;
        loop {
            let calls = self.calls();
            if calls.len() >= n {
                return calls;
            }
            assert!(
                Instant::now() < deadline,
                "expected {n} webhook calls, got {}",
                calls.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
