//! Counters shared by the nodes of a cluster through Redis
//! (`budgets.redis_url`), the way LiteLLM and Envoy's global rate limit
//! service share theirs: one key per budget and window, incremented
//! atomically (`INCRBY`) and given an expiry at the end of its window (a
//! Lua script, so the increment and the expiry are one step). No node
//! decides anything with another: Redis' atomic increment is the whole
//! agreement.
//!
//! Every call is bounded by `budgets.redis_timeout`. The connection is a
//! `redis` connection manager (it reconnects by itself); while none could be
//! made yet, a new attempt is made at most once a second, so an unreachable
//! Redis costs a request one failed attempt at most, and usually nothing.

use std::{
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::store::CounterKey;

/// Adds ARGV[1] to KEYS[1] and, when the key has no expiry yet, makes it
/// expire ARGV[2] seconds from now; returns the new value.
const INCR_EXPIRE: &str = r"
local v = redis.call('INCRBY', KEYS[1], ARGV[1])
if redis.call('TTL', KEYS[1]) < 0 then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return v
";

/// Shortest time between two attempts to connect.
const RECONNECT_EVERY: Duration = Duration::from_secs(1);

/// Why Redis did not answer.
#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("no connection to redis yet (next attempt within a second)")]
    NotConnected,
    #[error("redis failed")]
    Redis(#[source] redis::RedisError),
}

pub struct Shared {
    client: redis::Client,
    timeout: Duration,
    conn: Mutex<Connection>,
    script: redis::Script,
}

#[derive(Default)]
struct Connection {
    manager: Option<ConnectionManager>,
    last_attempt: Option<Instant>,
}

impl Shared {
    /// A client for `url` (checked, not connected).
    pub fn new(url: &str, timeout: Duration) -> Result<Self, redis::RedisError> {
        Ok(Self {
            client: redis::Client::open(url)?,
            timeout,
            conn: Mutex::new(Connection::default()),
            script: redis::Script::new(INCR_EXPIRE),
        })
    }

    /// The connection, made now if none is and no attempt was made in the
    /// last second.
    async fn connection(&self) -> Result<ConnectionManager, SharedError> {
        {
            let mut conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(m) = &conn.manager {
                return Ok(m.clone());
            }
            if conn.last_attempt.is_some_and(|t| t.elapsed() < RECONNECT_EVERY) {
                return Err(SharedError::NotConnected);
            }
            conn.last_attempt = Some(Instant::now());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(self.timeout)
            .set_response_timeout(self.timeout)
            .set_number_of_retries(1);
        let manager = self.client.get_connection_manager_with_config(config).await.map_err(SharedError::Redis)?;
        self.conn.lock().unwrap_or_else(PoisonError::into_inner).manager = Some(manager.clone());
        Ok(manager)
    }

    async fn bounded<T>(&self, op: impl Future<Output = Result<T, SharedError>>) -> Result<T, SharedError> {
        tokio::time::timeout(self.timeout, op).await.map_err(|_| SharedError::Timeout(self.timeout))?
    }

    /// The counter's value (0 when it does not exist).
    pub async fn get(&self, key: &CounterKey) -> Result<u64, SharedError> {
        self.bounded(async {
            let mut conn = self.connection().await?;
            let value: Option<u64> =
                redis::cmd("GET").arg(key.redis_key()).query_async(&mut conn).await.map_err(SharedError::Redis)?;
            Ok(value.unwrap_or(0))
        })
        .await
    }

    /// Adds `n` to the counter (expiring at the end of its window, plus a
    /// minute for clocks that differ); returns its new value.
    pub async fn add(&self, key: &CounterKey, n: u64, now: u64) -> Result<u64, SharedError> {
        let ttl = key.ends().saturating_sub(now).saturating_add(60);
        self.bounded(async {
            let mut conn = self.connection().await?;
            let mut call = self.script.key(key.redis_key());
            call.arg(n).arg(ttl);
            call.invoke_async(&mut conn).await.map_err(SharedError::Redis)
        })
        .await
    }
}
