//! The reader task both clients run, across their connections: read one
//! connection until it ends, reconnect, put the new one in use, and on a
//! drain notice move to another broker while still reading the old one.
//! What differs between the publisher and the consumer (what they read,
//! what they send again) is their [`Session`].

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;

use super::{ClientConn, FrameReader, Link};
use crate::error::CloseReason;

/// Why a connection's reader stopped.
#[derive(Debug)]
pub enum Ended {
    /// The connection ended, for this reason.
    Lost(CloseReason),
    /// The broker is draining and serves for this long at most.
    Drain(Duration),
}

/// One client's side of [`supervise`].
pub trait Session: Send {
    /// Reads `reader`'s connection until it ends or its broker says it is
    /// draining. Must be cancel-safe: while a client moves off a draining
    /// broker, a read is dropped once the new connection is up.
    fn read<'a>(
        &'a mut self,
        reader: &'a mut FrameReader,
    ) -> impl Future<Output = Ended> + Send + 'a;

    /// The connection in use was lost; `unwritten` holds the whole frames
    /// it never wrote. Returns what to send first on the next connection.
    fn lost(&mut self, reason: &CloseReason, unwritten: BytesMut) -> BytesMut;

    /// The circuit is open (called after each failed attempt while it is).
    fn circuit_open(&mut self, link: &Link);

    /// Puts `next` in use (through [`Link::install`]): after an outage, or,
    /// with `moved`, in place of a draining broker's connection.
    fn resume(&mut self, next: &ClientConn, moved: bool);
}

/// Runs `session` over `conn` and every connection after it, until the
/// link ends ([`Link::ended`] says why).
pub async fn supervise(link: Arc<Link>, mut conn: ClientConn, session: &mut impl Session) {
    loop {
        let reason = match session.read(&mut conn.reader).await {
            Ended::Lost(reason) => reason,
            Ended::Drain(within) => {
                // Keep reading the draining connection (its messages and
                // answers still come) while another is made.
                let moving = link.elsewhere(within);
                tokio::pin!(moving);
                let lost = loop {
                    tokio::select! {
                        next = &mut moving => {
                            if let Some(next) = next {
                                session.resume(&next, true);
                                conn = next;
                            }
                            break None;
                        }
                        ended = session.read(&mut conn.reader) => {
                            if let Ended::Lost(reason) = ended {
                                break Some(reason);
                            }
                        }
                    }
                };
                match lost {
                    Some(reason) => reason,
                    // Moved, or nowhere to move to: read on.
                    None => continue,
                }
            }
        };
        // Closed by the application: that is the reason, whatever the
        // reader saw after it.
        let reason = conn
            .outbox
            .close_reason()
            .filter(|r| *r == CloseReason::Closed)
            .unwrap_or(reason);
        let carried = session.lost(&reason, conn.outbox.close_and_take(reason.clone()));
        let next = {
            let mut opened = |link: &Link| session.circuit_open(link);
            link.reconnect(reason, carried, &mut opened).await
        };
        match next {
            Some(next) => {
                session.resume(&next, false);
                conn = next;
            }
            None => return,
        }
    }
}
