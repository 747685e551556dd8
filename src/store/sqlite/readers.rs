//! The read connections of the SQLite store, lent whole (see [`Readers`]).

use std::sync::PoisonError;

use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection, SqliteConnection};
use tokio::sync::{Semaphore, SemaphorePermit};

/// Connections for concurrent reads.
const READERS: u32 = 4;

/// The connections reads go through, lent whole. A `SqlitePool` pings every connection it
/// takes back, a round trip to that connection's worker thread; the issuance path reads twice
/// per request, so lending connections directly halves its trips to SQLite's threads. A read
/// cancelled half-way is harmless: its connection's worker finishes the statement before it
/// takes the next one, and each statement answers on its own channel.
pub(super) struct Readers {
    idle: std::sync::Mutex<Vec<SqliteConnection>>,
    /// One permit per idle connection; closed when the store is.
    available: Semaphore,
}

impl std::fmt::Debug for Readers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readers")
            .field("available", &self.available.available_permits())
            .finish_non_exhaustive()
    }
}

impl Readers {
    pub(super) async fn open(options: &SqliteConnectOptions) -> Result<Self, sqlx::Error> {
        let mut idle = Vec::with_capacity(READERS as usize);
        for _ in 0..READERS {
            idle.push(options.connect().await?);
        }
        Ok(Self {
            idle: std::sync::Mutex::new(idle),
            available: Semaphore::new(READERS as usize),
        })
    }

    /// An idle connection, waiting (first come, first served) for one when all are lent.
    pub(super) async fn get(&self) -> Result<Reader<'_>, sqlx::Error> {
        let permit = self
            .available
            .acquire()
            .await
            .map_err(|_| sqlx::Error::PoolClosed)?;
        let conn = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
            .ok_or(sqlx::Error::PoolClosed)?;
        Ok(Reader {
            conn: Some(conn),
            readers: self,
            _permit: permit,
        })
    }

    /// Waits for every lent connection to come back, then closes them all.
    pub(super) async fn close(&self) {
        if let Ok(all) = self.available.acquire_many(READERS).await {
            all.forget();
        }
        self.available.close();
        let idle = std::mem::take(&mut *self.idle.lock().unwrap_or_else(PoisonError::into_inner));
        for conn in idle {
            let _ = conn.close().await;
        }
    }
}

/// A lent read connection; it goes back to its [`Readers`] when dropped.
pub(super) struct Reader<'a> {
    conn: Option<SqliteConnection>,
    readers: &'a Readers,
    /// Released after `drop` has put the connection back, so whoever it wakes finds it.
    _permit: SemaphorePermit<'a>,
}

impl std::ops::Deref for Reader<'_> {
    type Target = SqliteConnection;
    fn deref(&self) -> &SqliteConnection {
        self.conn
            .as_ref()
            .expect("a lent connection is present until dropped")
    }
}

impl std::ops::DerefMut for Reader<'_> {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        self.conn
            .as_mut()
            .expect("a lent connection is present until dropped")
    }
}

impl Drop for Reader<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.readers
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(conn);
        }
    }
}
