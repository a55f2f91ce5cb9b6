//! Bounding waits that almost never wait.
//!
//! A socket write or a hand-over to the NATS client is ready at once nearly
//! always, but must still be bounded for the rare time it is not (a device
//! that stops reading, a NATS client buffering through a reconnect). Arming
//! a timer for every message costs a timer-wheel entry and a clock read per
//! message, which showed in profiles; [`within`] arms one only after the
//! first poll found the operation pending.

use std::future::Future;
use std::pin::pin;
use std::task::Poll;
use std::time::Duration;

/// `future`'s output, or `Err` if it was still pending after `limit`.
pub(crate) async fn within<F: Future>(
    limit: Duration,
    future: F,
) -> Result<F::Output, tokio::time::error::Elapsed> {
    let mut future = pin!(future);
    let first = std::future::poll_fn(|cx| Poll::Ready(future.as_mut().poll(cx))).await;
    match first {
        Poll::Ready(output) => Ok(output),
        Poll::Pending => tokio::time::timeout(limit, future).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_ready_future_needs_no_timer_and_a_stuck_one_times_out() {
        assert_eq!(
            within(Duration::from_secs(1), async { 7 }).await.ok(),
            Some(7)
        );
        let stuck = within(Duration::from_secs(1), std::future::pending::<()>()).await;
        assert!(stuck.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_future_that_is_slow_but_in_time_completes() {
        let slow = async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            "done"
        };
        assert_eq!(
            within(Duration::from_secs(1), slow).await.ok(),
            Some("done")
        );
    }
}
