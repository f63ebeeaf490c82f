//! Load generation: closed-loop HTTP GETs on keep-alive connections (a
//! ceiling and cached queries), and latencies in HDR histograms.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

/// Latencies in microseconds, 1 µs to 10 min, 3 significant figures.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds")
}

pub fn record(histogram: &mut Histogram<u64>, elapsed: Duration) {
    let _ = histogram.record((elapsed.as_micros() as u64).max(1));
}

/// The path of the `i`-th request.
pub type Paths = Arc<dyn Fn(u64) -> String + Send + Sync>;

/// What a load run measured.
pub struct Measured {
    pub per_second: f64,
    pub latency: Histogram<u64>,
}

/// `connections` keep-alive connections, each sending the next GET as soon
/// as the last is answered, for `duration`; request `i` carries token
/// `tokens[i % len]`.
pub async fn closed_loop(
    addr: SocketAddr,
    tokens: Arc<Vec<String>>,
    connections: usize,
    duration: Duration,
    paths: Paths,
) -> anyhow::Result<Measured> {
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::new();
    for c in 0..connections {
        let (tokens, paths) = (tokens.clone(), paths.clone());
        tasks.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            let mut latency = histogram();
            let mut i = c as u64;
            while Instant::now() < deadline {
                let request = hyper::Request::get(paths(i))
                    .header("host", "bench")
                    .header(
                        "authorization",
                        format!("Bearer {}", tokens[i as usize % tokens.len()]),
                    )
                    .body(Empty::<Bytes>::new())?;
                let sent = Instant::now();
                let response = sender.send_request(request).await?;
                let status = response.status();
                response.into_body().collect().await?;
                anyhow::ensure!(status.is_success(), "GET answered {status}");
                record(&mut latency, sent.elapsed());
                i += connections as u64;
            }
            anyhow::Ok(latency)
        }));
    }
    let mut latency = histogram();
    for task in tasks {
        latency.add(task.await??)?;
    }
    Ok(Measured {
        per_second: latency.len() as f64 / started.elapsed().as_secs_f64(),
        latency,
    })
}

/// Milliseconds at quantile `q`.
pub fn ms(histogram: &Histogram<u64>, q: f64) -> f64 {
    histogram.value_at_quantile(q) as f64 / 1000.0
}
