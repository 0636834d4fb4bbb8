//! The Redis / Valkey backend: one server (through a connection manager
//! that reconnects by itself) or a cluster (connected on first use and
//! again after a broken connection or a timeout; the client follows a
//! failover by itself, reading the slot map again). Each operation is one
//! round trip on one key, so it works unchanged on a cluster.

use super::StoreError;
use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue, Script};
use std::future::Future;
use std::time::Duration;
use tokio::sync::Mutex;

enum Conn {
    Single(ConnectionManager),
    Cluster {
        client: Box<redis::cluster::ClusterClient>,
        conn: Mutex<Option<ClusterConnection>>,
        /// The store's deadline, so that a call it gives up on is known here.
        deadline: Duration,
    },
}

pub struct Remote {
    conn: Conn,
    get_or_set: Script,
    incr: Script,
    gcra: Script,
}

fn err(e: redis::RedisError) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn secs(ttl: Duration) -> u64 {
    ttl.as_secs().max(1)
}

impl Remote {
    /// `url`: `redis://host:port/db`; for a cluster, any of its nodes
    /// (several separated by commas). Connects lazily.
    pub fn open(url: &str, cluster: bool, deadline: Duration) -> Result<Remote, StoreError> {
        let conn = if cluster {
            let nodes: Vec<&str> = url.split(',').map(str::trim).collect();
            let client = redis::cluster::ClusterClient::builder(nodes)
                .connection_timeout(deadline)
                .response_timeout(deadline)
                .build()
                .map_err(err)?;
            Conn::Cluster {
                client: Box::new(client),
                conn: Mutex::new(None),
                deadline,
            }
        } else {
            let client = redis::Client::open(url).map_err(err)?;
            let cfg = redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(1)))
                .set_number_of_retries(1);
            Conn::Single(ConnectionManager::new_lazy_with_config(client, cfg).map_err(err)?)
        };
        Ok(Remote {
            conn,
            // One key, one round trip: the existing value, or nil after
            // storing the new one.
            get_or_set: Script::new(
                "local v = redis.call('GET', KEYS[1]) \
                 if v then return v end \
                 redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2]) \
                 return false",
            ),
            // GCRA on one key holding the theoretical arrival time (µs;
            // Lua's doubles hold these exactly until 2255).
            gcra: Script::new(
                "local now = tonumber(ARGV[1]) \
                 local tat = tonumber(redis.call('GET', KEYS[1]) or now) \
                 if tat < now then tat = now end \
                 local new = tat + tonumber(ARGV[4]) * tonumber(ARGV[2]) \
                 local over = new - now - tonumber(ARGV[3]) \
                 if over > 0 then return over end \
                 redis.call('SET', KEYS[1], string.format('%.0f', new), \
                   'PX', string.format('%.0f', math.max(1, math.ceil((new - now) / 1000)))) \
                 return 0",
            ),
            incr: Script::new(
                "local n = redis.call('INCR', KEYS[1]) \
                 if n == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end \
                 return n",
            ),
        })
    }

    async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T, StoreError> {
        match &self.conn {
            Conn::Single(m) => cmd.query_async(&mut m.clone()).await.map_err(err),
            Conn::Cluster { .. } => {
                let mut c = self.cluster().await?;
                self.settle(cmd.query_async(&mut c)).await
            }
        }
    }

    async fn script<T: FromRedisValue>(
        &self,
        script: &Script,
        key: &str,
        args: &[String],
    ) -> Result<T, StoreError> {
        let mut inv = script.prepare_invoke();
        inv.key(key);
        for a in args {
            inv.arg(a);
        }
        match &self.conn {
            Conn::Single(m) => inv.invoke_async(&mut m.clone()).await.map_err(err),
            Conn::Cluster { .. } => {
                let mut c = self.cluster().await?;
                self.settle(inv.invoke_async(&mut c)).await
            }
        }
    }

    async fn cluster(&self) -> Result<ClusterConnection, StoreError> {
        let Conn::Cluster { client, conn, .. } = &self.conn else {
            return Err(StoreError::Backend("not a cluster".into()));
        };
        let mut held = conn.lock().await;
        if let Some(c) = held.as_ref() {
            return Ok(c.clone());
        }
        let c = client.get_async_connection().await.map_err(err)?;
        *held = Some(c.clone());
        Ok(c)
    }

    /// Runs one cluster call within the deadline. A connection that broke
    /// or went silent is made again on the next call (the client also
    /// follows a failover by itself, reading the slot map again).
    async fn settle<T>(
        &self,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        let Conn::Cluster { conn, deadline, .. } = &self.conn else {
            return Err(StoreError::Backend("not a cluster".into()));
        };
        let broken = match tokio::time::timeout(*deadline, call).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e))
                if !(e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal()) =>
            {
                return Err(err(e));
            }
            Ok(Err(e)) => err(e),
            Err(_) => StoreError::Timeout(*deadline),
        };
        *conn.lock().await = None;
        Err(broken)
    }

    pub async fn get(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.query(redis::cmd("GET").arg(key)).await
    }

    pub async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<String>>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        self.query(redis::cmd("MGET").arg(keys)).await
    }

    pub async fn get_or_set(
        &self,
        key: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<Option<String>, StoreError> {
        let args = [value.to_string(), secs(ttl).to_string()];
        self.script(&self.get_or_set, key, &args).await
    }

    pub async fn set(&self, key: &str, value: &str, ttl: Duration) -> Result<(), StoreError> {
        self.query(
            redis::cmd("SET")
                .arg(key)
                .arg(value)
                .arg("EX")
                .arg(secs(ttl)),
        )
        .await
    }

    pub async fn gcra(
        &self,
        key: &str,
        now: u64,
        interval: u64,
        burst: u64,
        cost: u64,
    ) -> Result<u64, StoreError> {
        let args = [now, interval, burst, cost].map(|n| n.to_string());
        self.script(&self.gcra, key, &args).await
    }

    pub async fn incr(&self, key: &str, ttl: Duration) -> Result<i64, StoreError> {
        self.script(&self.incr, key, &[secs(ttl).to_string()]).await
    }
}
