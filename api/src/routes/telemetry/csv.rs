//! `format=csv`: a series, or several one after another, as `metric,ts,value` lines
//! (RFC 4180: CRLF line ends, a header line, fields holding a comma, a quote or a line break
//! quoted with their quotes doubled), streamed with no cap on the number of lines.
//!
//! Memory stays bounded whatever the range: a producer task reads the store one chunk at a
//! time ([`CHUNK`] raw points, or a window of [`CHUNK`] bucket widths), each read on the
//! blocking pool, encodes the chunk and sends it into a channel of [`CHANNEL_CHUNKS`] chunks
//! that the response body drains. When the client reads slowly the channel fills and the
//! producer waits (an async wait: no blocking-pool thread is held by a slow client); when the
//! client goes away the channel closes and the producer stops. A store error after the
//! first bytes were sent can no longer change the status, so it is logged and the body is
//! cut short with an error: the client sees a broken transfer, never a silently short file.

use std::fmt::Write as _;
use std::sync::Arc;

use axum::{
    body::{Body, Bytes},
    http::{header, HeaderValue},
    response::{IntoResponse, Response},
};
use tellus_core::{DeviceId, TimestampMs, Value};
use tellus_ingest::TelemetryStore;
use tokio::sync::mpsc;

use super::{
    plan::{bucket_start, Shape},
    read,
};
use crate::{routes::blocking, ApiError};

/// Raw points, or bucket widths, read from the store per call.
pub const CHUNK: usize = 4096;
/// Encoded chunks waiting for the client, at most.
pub const CHANNEL_CHUNKS: usize = 4;

pub const CONTENT_TYPE: &str = "text/csv; charset=utf-8";

/// One series to stream: its metric, its shape, and the raw points already read while
/// planning it (when planning found the range small enough to answer raw).
pub struct Series {
    pub metric: String,
    pub shape: Shape,
    pub prefetched: Option<read::Points>,
}

/// The response streaming `series` of `device` over `from..=to`.
pub fn response(
    store: Arc<dyn TelemetryStore>,
    device: DeviceId,
    series: Vec<Series>,
    range: (TimestampMs, TimestampMs),
) -> Response {
    let (tx, mut rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(CHANNEL_CHUNKS);
    tokio::spawn(async move {
        if let Err(Some(e)) = produce(store, device, series, range, &tx).await {
            tracing::error!(error = %e, "CSV export failed after it started");
            let _ = tx
                .send(Err(std::io::Error::other("telemetry export failed")))
                .await;
        }
    });
    let stream = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE))],
        Body::from_stream(stream),
    )
        .into_response()
}

/// Sends the header line, then every series chunk by chunk. `Err(None)`: the client went
/// away; `Err(Some(e))`: reading the store failed.
async fn produce(
    store: Arc<dyn TelemetryStore>,
    device: DeviceId,
    series: Vec<Series>,
    (from, to): (TimestampMs, TimestampMs),
    tx: &mpsc::Sender<Result<Bytes, std::io::Error>>,
) -> Result<(), Option<ApiError>> {
    let send = |text: String| async move { tx.send(Ok(Bytes::from(text))).await.map_err(|_| None) };
    send("metric,ts,value\r\n".to_owned()).await?;
    let device = Arc::new(device);
    for s in series {
        let metric: Arc<str> = s.metric.into();
        if let Some(points) = s.prefetched {
            send(lines(&metric, &points)).await?;
            continue;
        }
        match s.shape {
            Shape::Raw => {
                let mut cursor = from;
                loop {
                    let (store, device, m) = (store.clone(), device.clone(), metric.clone());
                    let (points, next) = blocking(move || {
                        read::raw_page(store.as_ref(), &device, &m, (cursor, to), CHUNK)
                    })
                    .await
                    .map_err(Some)?;
                    send(lines(&metric, &points)).await?;
                    match next {
                        Some(next) => cursor = next,
                        None => break,
                    }
                }
            }
            Shape::Buckets { step, agg } => {
                let mut cursor = bucket_start(from, step);
                loop {
                    let end = read::window_end(cursor, step, CHUNK as i64, to);
                    let (store, device, m) = (store.clone(), device.clone(), metric.clone());
                    let buckets = blocking(move || store.buckets(&device, &m, cursor, end, step))
                        .await
                        .map_err(Some)?;
                    if !buckets.is_empty() {
                        send(lines(&metric, &read::points(&buckets, agg))).await?;
                    } else if tx.is_closed() {
                        // Empty windows send nothing, so check that someone still reads.
                        return Err(None);
                    }
                    if end >= to {
                        break;
                    }
                    cursor = end + 1;
                }
            }
        }
    }
    Ok(())
}

/// `metric,ts,value` lines for `points`.
pub fn lines(metric: &str, points: &[(TimestampMs, Value)]) -> String {
    let mut metric_field = String::new();
    field(&mut metric_field, metric);
    let mut out = String::with_capacity(points.len() * (metric_field.len() + 24));
    for (ts, value) in points {
        out.push_str(&metric_field);
        let _ = write!(out, ",{ts},");
        match value {
            Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Value::Int(i) => {
                let _ = write!(out, "{i}");
            }
            // As JSON writes it (shortest form that reads back the same); a sum that
            // overflowed to infinity is an empty field, as it is null in JSON.
            Value::Float(f) if f.is_finite() => out.push_str(
                &serde_json::Number::from_f64(*f).map_or_else(String::new, |n| n.to_string()),
            ),
            Value::Float(_) => {}
            Value::Text(t) => field(&mut out, t),
        }
        out.push_str("\r\n");
    }
    out
}

/// Appends `text` as one CSV field, quoted if RFC 4180 requires it.
fn field(out: &mut String, text: &str) {
    if text.contains([',', '"', '\r', '\n']) {
        out.push('"');
        out.push_str(&text.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_quoted_only_when_needed() {
        let points = vec![
            (1, Value::Float(21.5)),
            (2, Value::Int(22)),
            (3, Value::Bool(true)),
            (4, Value::Text("plain".into())),
            (5, Value::Text("a, \"b\"\r\nc".into())),
            (6, Value::Float(22.0)),
            (7, Value::Float(f64::INFINITY)),
        ];
        assert_eq!(
            lines("env.t", &points),
            "env.t,1,21.5\r\nenv.t,2,22\r\nenv.t,3,true\r\nenv.t,4,plain\r\n\
             env.t,5,\"a, \"\"b\"\"\r\nc\"\r\nenv.t,6,22.0\r\nenv.t,7,\r\n"
        );
        assert_eq!(lines("a,b", &[(1, Value::Int(1))]), "\"a,b\",1,1\r\n");
    }
}
