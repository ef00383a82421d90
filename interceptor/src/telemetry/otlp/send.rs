//! Sends encoded OTLP export requests to the collector: HTTP/protobuf
//! (`POST <endpoint>/v1/traces`, `/v1/logs`) with reqwest, or gRPC
//! (`TraceService/Export`, `LogsService/Export`) with tonic, as a unary call
//! whose message is already encoded ([`Encoded`]).
//!
//! A failure that may pass (the collector unreachable, `429`, `502`–`504`,
//! gRPC `UNAVAILABLE` or `RESOURCE_EXHAUSTED`) is retried after 100 ms,
//! 200 ms, 400 ms; all attempts together take at most the export's
//! `timeout`. Any other failure is returned at once. Nothing here logs:
//! the caller counts and reports.

use std::time::{Duration, Instant};

use bytes::{Buf as _, BufMut as _, Bytes};
use http::uri::PathAndQuery;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

use super::{OtlpConfig, OtlpError, OtlpProtocol, Signal};

/// First wait before a retry; each next one doubles.
const FIRST_RETRY: Duration = Duration::from_millis(100);
/// Most retries of one export.
const RETRIES: u32 = 3;

/// Where and how exports go.
pub enum Sender {
    Http { client: reqwest::Client, traces: String, logs: String, headers: http::HeaderMap },
    Grpc { channel: tonic::transport::Channel, metadata: tonic::metadata::MetadataMap },
}

/// Why an export failed, and whether trying again may help.
#[derive(Debug)]
pub struct Failure {
    pub message: String,
    transient: bool,
}

impl Sender {
    /// The sender `cfg` describes. Needs a tokio runtime (tonic's channel).
    pub fn new(cfg: &OtlpConfig) -> Result<Self, OtlpError> {
        let invalid = |message: String| OtlpError::Exporter { message };
        let mut headers = http::HeaderMap::new();
        for (name, value) in &cfg.headers {
            let name = http::HeaderName::from_bytes(name.as_bytes()).map_err(|e| invalid(e.to_string()))?;
            let mut value = http::HeaderValue::from_str(value).map_err(|e| invalid(e.to_string()))?;
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        match cfg.protocol {
            OtlpProtocol::Http => {
                let client = reqwest::Client::builder()
                    .no_proxy()
                    .user_agent(concat!("interceptor/", env!("CARGO_PKG_VERSION")))
                    .timeout(cfg.timeout)
                    .build()
                    .map_err(|e| invalid(e.to_string()))?;
                Ok(Self::Http {
                    client,
                    traces: cfg.http_url(Signal::Traces),
                    logs: cfg.http_url(Signal::Logs),
                    headers,
                })
            }
            OtlpProtocol::Grpc => {
                let endpoint = tonic::transport::Endpoint::from_shared(cfg.endpoint.clone())
                    .map_err(|e| invalid(e.to_string()))?
                    .timeout(cfg.timeout)
                    .connect_timeout(cfg.timeout);
                let endpoint = if cfg.endpoint.starts_with("https://") {
                    let tls = tonic::transport::ClientTlsConfig::new().with_native_roots();
                    endpoint.tls_config(tls).map_err(|e| invalid(e.to_string()))?
                } else {
                    endpoint
                };
                Ok(Self::Grpc {
                    channel: endpoint.connect_lazy(),
                    metadata: tonic::metadata::MetadataMap::from_headers(headers),
                })
            }
        }
    }

    /// Sends one export request of `signal`, retrying what may pass;
    /// gives up after `timeout` in all.
    pub async fn send(&self, signal: Signal, body: Bytes, timeout: Duration) -> Result<(), Failure> {
        let deadline = Instant::now() + timeout;
        let mut wait = FIRST_RETRY;
        let mut retries = 0;
        loop {
            // Each attempt gets what is left of `timeout`.
            let left = deadline.saturating_duration_since(Instant::now());
            match self.send_once(signal, body.clone(), left).await {
                Ok(()) => return Ok(()),
                Err(failure) if failure.transient && retries < RETRIES && Instant::now() + wait < deadline => {
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                    retries += 1;
                }
                Err(failure) => return Err(failure),
            }
        }
    }

    async fn send_once(&self, signal: Signal, body: Bytes, timeout: Duration) -> Result<(), Failure> {
        match self {
            Self::Http { client, traces, logs, headers } => {
                let url = match signal {
                    Signal::Traces => traces,
                    Signal::Logs => logs,
                };
                let response = client
                    .post(url)
                    .headers(headers.clone())
                    .header(http::header::CONTENT_TYPE, "application/x-protobuf")
                    .timeout(timeout)
                    .body(body)
                    .send()
                    .await
                    .map_err(|e| Failure { message: error_chain(&e), transient: true })?;
                let status = response.status();
                // Read the answer to its end, so the connection is kept.
                let _ = response.bytes().await;
                if status.is_success() {
                    return Ok(());
                }
                let transient = matches!(status.as_u16(), 429 | 502 | 503 | 504);
                Err(Failure { message: format!("the collector answered {status}"), transient })
            }
            Self::Grpc { channel, metadata } => {
                let path = PathAndQuery::from_static(match signal {
                    Signal::Traces => "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                    Signal::Logs => "/opentelemetry.proto.collector.logs.v1.LogsService/Export",
                });
                let mut grpc = tonic::client::Grpc::new(channel.clone());
                let unavailable = |e: tonic::transport::Error| Failure { message: error_chain(&e), transient: true };
                grpc.ready().await.map_err(unavailable)?;
                let mut request = tonic::Request::from_parts(metadata.clone(), Default::default(), body);
                request.set_timeout(timeout);
                match grpc.unary(request, path, Encoded).await {
                    Ok(_) => Ok(()),
                    Err(status) => Err(Failure {
                        transient: matches!(status.code(), tonic::Code::Unavailable | tonic::Code::ResourceExhausted),
                        message: format!("the collector answered {:?}: {}", status.code(), status.message()),
                    }),
                }
            }
        }
    }
}

/// An error and its causes, `: `-separated (reqwest's own message is only
/// "error sending request"). As `crate::error::chain`, which `telemetry`,
/// a leaf of the crate, does not import.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

/// The gRPC codec of a message that is already encoded; the answer
/// (`Export*ServiceResponse`) is read and set aside.
#[derive(Clone, Copy, Default)]
struct Encoded;

impl Codec for Encoded {
    type Encode = Bytes;
    type Decode = ();
    type Encoder = Encoded;
    type Decoder = Encoded;

    fn encoder(&mut self) -> Encoded {
        Encoded
    }

    fn decoder(&mut self) -> Encoded {
        Encoded
    }
}

impl Encoder for Encoded {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for Encoded {
    type Item = ();
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<()>, tonic::Status> {
        src.advance(src.remaining());
        Ok(Some(()))
    }
}
