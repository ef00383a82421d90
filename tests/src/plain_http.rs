//! A plain HTTP/1.1 server for tests (the MCP servers behind `mcp.plain`
//! targets): each request's head and whole body go to a handler, whose
//! answer is sent as the chunks it gives, one write each.

use std::{net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http_body_util::{BodyExt as _, StreamBody};
use hyper::body::Frame;

/// What the handler answers.
pub struct Answer {
    pub status: http::StatusCode,
    /// Empty: no `Content-Type`.
    pub content_type: &'static str,
    /// Empty: no `Content-Encoding` (the chunks are sent as they are).
    pub content_encoding: &'static str,
    pub chunks: Vec<Bytes>,
}

impl Answer {
    /// `200` with a JSON body.
    pub fn json(body: &serde_json::Value) -> Self {
        Self {
            status: http::StatusCode::OK,
            content_type: "application/json",
            content_encoding: "",
            chunks: vec![body.to_string().into()],
        }
    }
}

/// Serves every connection `listener` accepts until the runtime ends;
/// `handler` gets the peer, the request head and its body.
pub fn serve<F>(listener: tokio::net::TcpListener, handler: F)
where
    F: Fn(SocketAddr, &http::request::Parts, &[u8]) -> Answer + Send + Sync + 'static,
{
    let handler = Arc::new(handler);
    tokio::spawn(async move {
        while let Ok((stream, peer)) = listener.accept().await {
            let handler = Arc::clone(&handler);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let handler = Arc::clone(&handler);
                    async move {
                        let (head, body) = req.into_parts();
                        let body = body.collect().await?.to_bytes();
                        let answer = handler(peer, &head, &body);
                        let status = answer.status;
                        let (content_type, content_encoding) = (answer.content_type, answer.content_encoding);
                        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, hyper::Error>>(8);
                        tokio::spawn(async move {
                            for chunk in answer.chunks {
                                if tx.send(Ok(Frame::data(chunk))).await.is_err() {
                                    return;
                                }
                                tokio::task::yield_now().await;
                            }
                        });
                        let frames =
                            futures_util::stream::unfold(rx, |mut rx| async { rx.recv().await.map(|f| (f, rx)) });
                        let mut response = http::Response::new(StreamBody::new(frames));
                        *response.status_mut() = status;
                        for (name, value) in [
                            (http::header::CONTENT_TYPE, content_type),
                            (http::header::CONTENT_ENCODING, content_encoding),
                        ] {
                            if !value.is_empty() {
                                response.headers_mut().insert(name, http::HeaderValue::from_static(value));
                            }
                        }
                        Ok::<_, hyper::Error>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}
