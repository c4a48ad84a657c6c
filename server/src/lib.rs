//! `petrel serve`: an OpenAI-compatible HTTP server over one model.
//!
//! Routes: `POST /v1/chat/completions` and `POST /v1/completions` (with `"stream": true`
//! as server-sent events, as OpenAI sends them, ending with `data: [DONE]`), `GET
//! /v1/models`, `GET /health`.
//!
//! Requests wait in one bounded queue (a full queue answers 429) for a fixed set of
//! workers, each owning one session; a request runs on an emptied session, so its reply
//! depends on the request alone, whatever else is queued. A client that disconnects
//! cancels its request after the current token. Malformed requests, unknown models,
//! `max_tokens` over the limit and prompts longer than the context are answered 400 with
//! OpenAI's error object, before any computation.

mod api;
mod worker;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, Stream, StreamExt};
use petrel::{Completion, Model, SessionParams};
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

pub use api::{ApiError, Limits};
use worker::{Event, Job, Pool, Refused};

/// How the server is set up.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// The id clients name in `"model"` and `/v1/models` lists.
    pub model_id: String,
    /// Address to listen on (`127.0.0.1:8080`).
    pub listen: SocketAddr,
    /// Each worker's session (context, threads, cache type).
    pub session: SessionParams,
    /// Requests computed at once, one session each.
    pub workers: usize,
    /// Requests that may wait for a worker; one more is answered 429.
    pub queue: usize,
    /// Largest `max_tokens` a request may ask for.
    pub max_tokens: usize,
    /// Largest request body in bytes (413 above).
    pub max_body_bytes: usize,
}

struct App {
    model_id: String,
    limits: Limits,
    pool: Pool,
    next_id: AtomicU64,
}

/// Which endpoint a reply is for.
#[derive(Clone, Copy, PartialEq)]
enum Endpoint {
    Chat,
    Completion,
}

/// The router over a started worker pool (the server minus its listener).
pub fn router(model: &Model, config: &ServeConfig) -> petrel::Result<Router> {
    let pool = Pool::start(model, &config.session, config.workers, config.queue)?;
    let app = Arc::new(App {
        model_id: config.model_id.clone(),
        limits: Limits { max_tokens: config.max_tokens },
        pool,
        next_id: AtomicU64::new(1),
    });
    Ok(Router::new()
        .route("/health", get(|| async { Json(json!({ "status": "ok" })) }))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .fallback(|| async {
            error(ApiError {
                status: 404,
                message: "no such route".into(),
                kind: "invalid_request_error",
                param: None,
                code: Some("not_found"),
            })
        })
        .layer(DefaultBodyLimit::max(config.max_body_bytes))
        .with_state(app))
}

/// Serves `model` until Ctrl-C (or SIGTERM); prints the address once listening.
pub fn serve(model: &Model, config: &ServeConfig) -> petrel::Result<()> {
    let internal = |what: &str, e: std::io::Error| petrel::Error::new(petrel::ErrorKind::Io, format!("{what}: {e}"));
    let router = router(model, config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| internal("cannot start the async runtime", e))?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|e| internal(&format!("cannot listen on {}", config.listen), e))?;
        let address = listener.local_addr().map_err(|e| internal("cannot read the listening address", e))?;
        eprintln!("petrel serve: {} at http://{address}/v1 (Ctrl-C stops)", config.model_id);
        axum::serve(listener, router)
            .with_graceful_shutdown(shutdown_signal())
            .await
            .map_err(|e| internal("the server failed", e))
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}

fn error(e: ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(e.body())).into_response()
}

fn unix_time() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

async fn models(State(app): State<Arc<App>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{ "id": app.model_id, "object": "model", "created": 0, "owned_by": "petrel" }],
    }))
}

async fn chat(State(app): State<Arc<App>>, body: Bytes) -> Response {
    match api::parse_chat(&body, &app.model_id, &app.limits) {
        Ok(request) => respond(app, request, Endpoint::Chat).await,
        Err(e) => error(e),
    }
}

async fn completions(State(app): State<Arc<App>>, body: Bytes) -> Response {
    match api::parse_completion(&body, &app.model_id, &app.limits) {
        Ok(request) => respond(app, request, Endpoint::Completion).await,
        Err(e) => error(e),
    }
}

/// What every response and chunk of one reply shares.
struct Reply {
    app: Arc<App>,
    id: String,
    created: u64,
    endpoint: Endpoint,
}

impl Reply {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completion, _) => "text_completion",
        }
    }

    fn usage(completion: &Completion) -> Value {
        let (prompt, reply) = (completion.prompt_tokens, completion.tokens.len());
        json!({ "prompt_tokens": prompt, "completion_tokens": reply, "total_tokens": prompt + reply })
    }

    /// The whole reply as one JSON object.
    fn body(&self, completion: &Completion) -> Value {
        let finish = completion.stop.finish_reason();
        let choice = match self.endpoint {
            Endpoint::Chat => json!({
                "index": 0,
                "message": { "role": "assistant", "content": completion.text },
                "logprobs": null,
                "finish_reason": finish,
            }),
            Endpoint::Completion => {
                json!({ "index": 0, "text": completion.text, "logprobs": null, "finish_reason": finish })
            }
        };
        json!({
            "id": self.id,
            "object": self.object(false),
            "created": self.created,
            "model": self.app.model_id,
            "choices": [choice],
            "usage": Self::usage(completion),
        })
    }

    /// One streamed chunk: `text` as the delta, or the end with `finish`.
    fn chunk(&self, text: Option<&str>, role: bool, finish: Option<&str>) -> Value {
        let choice = match self.endpoint {
            Endpoint::Chat => {
                let mut delta = serde_json::Map::new();
                if role {
                    delta.insert("role".into(), "assistant".into());
                }
                if let Some(t) = text {
                    delta.insert("content".into(), t.into());
                }
                json!({ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish })
            }
            Endpoint::Completion => {
                json!({ "index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish })
            }
        };
        json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.app.model_id,
            "choices": [choice],
        })
    }
}

async fn respond(app: Arc<App>, request: api::Request, endpoint: Endpoint) -> Response {
    let (sender, mut events) = unbounded_channel();
    let (stream, include_usage) = (request.stream, request.include_usage);
    match app.pool.submit(Job { request, events: sender }) {
        Ok(()) => {}
        Err(Refused::Full) => {
            return error(ApiError {
                status: 429,
                message: "the server is busy (its request queue is full); retry later".into(),
                kind: "rate_limit_error",
                param: None,
                code: Some("rate_limit_exceeded"),
            })
        }
        Err(Refused::Stopped) => {
            return error(ApiError {
                status: 500,
                message: "the workers have stopped".into(),
                kind: "server_error",
                param: None,
                code: None,
            })
        }
    }
    let prefix = if endpoint == Endpoint::Chat { "chatcmpl" } else { "cmpl" };
    let reply = Reply {
        id: format!("{prefix}-{}", app.next_id.fetch_add(1, Ordering::Relaxed)),
        created: unix_time(),
        app,
        endpoint,
    };
    // Wait for the first event: a request that fails (a prompt over the context) is then
    // still answered with a status, not a stream.
    let first = match events.recv().await {
        Some(Event::Failed(e)) => return error(ApiError::from_petrel(&e)),
        Some(event) => event,
        None => {
            return error(ApiError {
                status: 500,
                message: "the worker stopped".into(),
                kind: "server_error",
                param: None,
                code: None,
            })
        }
    };
    if !stream {
        let mut event = first;
        loop {
            match event {
                Event::Text(_) => {}
                Event::Done(completion) => return Json(reply.body(&completion)).into_response(),
                Event::Failed(e) => return error(ApiError::from_petrel(&e)),
            }
            event = match events.recv().await {
                Some(e) => e,
                None => {
                    return error(ApiError {
                        status: 500,
                        message: "the worker stopped".into(),
                        kind: "server_error",
                        param: None,
                        code: None,
                    })
                }
            };
        }
    }
    Sse::new(sse_stream(reply, first, events, include_usage)).into_response()
}

/// The chunks of a streamed reply, then `[DONE]`.
fn sse_stream(
    reply: Reply,
    first: Event,
    events: UnboundedReceiver<Event>,
    include_usage: bool,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let data = |v: Value| SseEvent::default().data(v.to_string());
    let opening = (reply.endpoint == Endpoint::Chat).then(|| data(reply.chunk(Some(""), true, None)));
    let rest =
        stream::unfold((Some(first), events, reply, false), move |(pending, mut events, reply, ended)| async move {
            if ended {
                return None;
            }
            let event = match pending {
                Some(e) => Some(e),
                None => events.recv().await,
            };
            let data = |v: Value| SseEvent::default().data(v.to_string());
            let out: Vec<SseEvent> = match event {
                Some(Event::Text(text)) => vec![data(reply.chunk(Some(&text), false, None))],
                Some(Event::Done(completion)) => {
                    let mut last = vec![data(reply.chunk(None, false, Some(completion.stop.finish_reason())))];
                    if include_usage {
                        let mut usage = reply.chunk(None, false, None);
                        usage["choices"] = json!([]);
                        usage["usage"] = Reply::usage(&completion);
                        last.push(data(usage));
                    }
                    last.push(SseEvent::default().data("[DONE]"));
                    return Some((last, (None, events, reply, true)));
                }
                Some(Event::Failed(e)) => {
                    let body = ApiError::from_petrel(&e).body();
                    return Some((vec![data(body), SseEvent::default().data("[DONE]")], (None, events, reply, true)));
                }
                None => return None,
            };
            Some((out, (None, events, reply, false)))
        });
    stream::iter(opening).chain(rest.flat_map(stream::iter)).map(Ok)
}
