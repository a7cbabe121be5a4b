//! Retries with exponential backoff and jitter, for what a retry can fix.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::FetchError;
use crate::config::SourceConfig;
use crate::metrics::Metrics;

/// The most a single backoff waits.
const MAX_BACKOFF_MS: u64 = 5_000;

/// Called with the URL when an origin transfer stalls (times out): the network layer may know
/// why (an MTU black hole) and fix it for the retry.
pub type StallHook = Arc<dyn Fn(&str) + Send + Sync>;

#[derive(Clone)]
pub struct Retry {
    attempts: u32,
    backoff_ms: u64,
    metrics: Arc<Metrics>,
    pub(super) stall: Arc<std::sync::OnceLock<StallHook>>,
}

impl Retry {
    pub fn new(cfg: &SourceConfig, metrics: Arc<Metrics>) -> Retry {
        Retry {
            attempts: cfg.attempts.max(1),
            backoff_ms: cfg.backoff_ms,
            metrics,
            stall: Arc::default(),
        }
    }

    /// Runs `op` until it succeeds, fails for good, or runs out of attempts.
    pub async fn run<T, F, Fut, E>(&self, what: &str, mut op: F) -> Result<T, FetchError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: Into<FetchError>,
    {
        let mut attempt = 1;
        loop {
            let res = op().await.map_err(Into::into);
            if let Err(e) = &res {
                self.metrics.failure(e.cause());
                if let (
                    "timeout",
                    FetchError::Source(crate::source::SourceError::Transfer { url, .. }),
                    Some(hook),
                ) = (e.cause(), e, self.stall.get())
                {
                    hook(url);
                }
            }
            match res {
                Ok(v) => return Ok(v),
                Err(e) if e.is_retryable() && attempt < self.attempts => {
                    let wait = self.backoff(attempt);
                    tracing::warn!(%what, attempt, error = %e, retry_in_ms = wait.as_millis() as u64, "retrying");
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// `backoff_ms * 2^(attempt-1)`, capped, times a jitter in [0.75, 1.25).
    fn backoff(&self, attempt: u32) -> Duration {
        let base = self
            .backoff_ms
            .saturating_mul(1 << (attempt - 1).min(16))
            .min(MAX_BACKOFF_MS);
        let jitter = rand::random::<f64>() * 0.5 + 0.75;
        Duration::from_millis((base as f64 * jitter) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let r = Retry {
            attempts: 10,
            backoff_ms: 100,
            metrics: Arc::default(),
            stall: Arc::default(),
        };
        let b1 = r.backoff(1).as_millis();
        let b3 = r.backoff(3).as_millis();
        let b20 = r.backoff(20).as_millis();
        assert!((75..125).contains(&b1), "{b1}");
        assert!((300..500).contains(&b3), "{b3}");
        assert!(b20 <= 6250, "{b20}");
    }
}
