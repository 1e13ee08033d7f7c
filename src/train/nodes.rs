//! Training on several nodes: one `lfm train` process per node, launched with the usual variables (`WORLD_SIZE`,
//! `RANK`, `MASTER_ADDR`, `MASTER_PORT`), every node computing the gradients of its share of each step's batch and
//! the sum taken by a ring all-reduce over TCP, so that every node applies the same update to the same weights.
//!
//! Why not Burn's own multi-node stack (`burn-collective`'s global all-reduce): in 0.21.0 its second all-reduce
//! never returns — `SyncService::sync` clears a copy of its list of synced peers, not the list, so every later
//! barrier waits for a peer count it can never reach (reproduced here with two processes and all three of its
//! strategies). A training step needs one all-reduce per step, every step.
//!
//! Rendezvous: rank 0 listens on the master port; every other rank connects (retrying until the timeout, so the
//! nodes may start in any order), says who it is and which run it belongs to (a fingerprint of the model, the
//! settings and the data), and learns every node's ring address. Each node then connects to the next rank and
//! accepts the previous one: the ring carries the reduce-scatter and all-gather halves of the all-reduce, each node
//! sending and receiving `2·(W−1)/W` of the buffer per step.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::ops::Range;
use std::time::{Duration, Instant};

/// First bytes of every rendezvous message, with the protocol version.
const MAGIC: &[u8; 8] = b"LFMNODE1";

/// Where a node stands in a multi-node run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    /// This node's rank, `0..world`.
    pub rank: usize,
    /// The number of nodes.
    pub world: usize,
    /// Host name or address of rank 0.
    pub master_addr: String,
    /// Port rank 0 listens on for the rendezvous.
    pub master_port: u16,
    /// How long to wait for every node to join.
    pub timeout: Duration,
}

/// Why a multi-node run could not start or go on.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The settings do not describe a valid group.
    #[error("{0}")]
    Invalid(String),
    /// A network operation failed.
    #[error("{what}: {source}")]
    Network {
        /// What was being done.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Another node belongs to a different run, or broke the protocol.
    #[error("{0}")]
    Mismatch(String),
}

fn network(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NodeError {
    let what = what.into();
    move |source| NodeError::Network { what, source }
}

/// The nodes of a run, connected in a ring.
#[derive(Debug)]
pub struct NodeGroup {
    rank: usize,
    world: usize,
    /// To rank + 1 (absent on a single node).
    next: Option<TcpStream>,
    /// From rank − 1.
    previous: Option<TcpStream>,
}

impl NodeGroup {
    /// A group of one: every operation is local.
    pub fn single() -> Self {
        Self { rank: 0, world: 1, next: None, previous: None }
    }

    /// Joins the group `spec` describes; `fingerprint` identifies the run (every node must compute the same).
    /// Returns once every node has joined and the ring is connected.
    pub fn join(spec: &NodeSpec, fingerprint: u64) -> Result<Self, NodeError> {
        let NodeSpec { rank, world, .. } = *spec;
        if world == 0 || rank >= world {
            return Err(NodeError::Invalid(format!(
                "node rank {rank} is not below the number of nodes {world} (RANK counts from 0 to WORLD_SIZE − 1)"
            )));
        }
        if world == 1 {
            return Ok(Self::single());
        }
        let deadline = Instant::now() + spec.timeout;
        // The ring listener exists before anyone learns its address, so connections to it queue until accepted.
        let ring = TcpListener::bind(("0.0.0.0", 0)).map_err(network("opening this node's ring port"))?;
        let ring_port = ring.local_addr().map_err(network("reading this node's ring port"))?.port();
        let addresses = if rank == 0 {
            lead_rendezvous(spec, fingerprint, ring_port, deadline)?
        } else {
            follow_rendezvous(spec, fingerprint, ring_port, deadline)?
        };
        let next_address = addresses[(rank + 1) % world];
        let mut next = connect(next_address, deadline, "the next node's ring port")?;
        next.write_all(&(rank as u64).to_le_bytes()).map_err(network("greeting the next node"))?;
        let mut previous = accept(&ring, deadline, "the previous node")?;
        let expected = (rank + world - 1) % world;
        let their_rank = read_u64(&mut previous).map_err(network("reading the previous node's greeting"))?;
        if their_rank != expected as u64 {
            return Err(NodeError::Mismatch(format!(
                "node {rank} expected node {expected} on its ring port, node {their_rank} connected"
            )));
        }
        for stream in [&next, &previous] {
            stream.set_nodelay(true).map_err(network("configuring the ring"))?;
        }
        tracing::info!("node {rank} of {world} joined the ring");
        Ok(Self { rank, world, next: Some(next), previous: Some(previous) })
    }

    /// This node's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of nodes.
    pub fn world(&self) -> usize {
        self.world
    }

    /// Whether this node writes the run's files (rank 0).
    pub fn is_leader(&self) -> bool {
        self.rank == 0
    }

    /// This node's rows of a batch of `n`: consecutive shares of `⌈n / world⌉` (the last ones may be shorter or
    /// empty), the micro-batches `--grad-accum world` would make on one node.
    pub fn rows(&self, n: usize) -> Range<usize> {
        let share = n.div_ceil(self.world);
        (self.rank * share).min(n)..((self.rank + 1) * share).min(n)
    }

    /// Replaces `values` on every node by their sum over the nodes (a ring all-reduce: reduce-scatter, then
    /// all-gather). Every node ends with the same bits. All nodes must pass buffers of the same length.
    pub fn all_reduce_sum(&mut self, values: &mut [f32]) -> Result<(), NodeError> {
        let (Some(next), Some(previous)) = (self.next.as_mut(), self.previous.as_mut()) else {
            return Ok(());
        };
        let (w, r, len) = (self.world, self.rank, values.len());
        // The lengths first: a node on another code path must fail here, not exchange garbage.
        next.write_all(&(len as u64).to_le_bytes()).map_err(network("sending to the next node"))?;
        let theirs = read_u64(previous).map_err(lost(r, w))?;
        if theirs != len as u64 {
            return Err(NodeError::Mismatch(format!(
                "node {r} sums {len} values but the previous node sent {theirs}: the nodes run different models or \
                 settings"
            )));
        }
        let chunk = |i: usize| (i * len / w)..((i + 1) * len / w);
        for phase in [Phase::ReduceScatter, Phase::AllGather] {
            for s in 0..w - 1 {
                let (send, receive) = match phase {
                    Phase::ReduceScatter => ((r + w - s) % w, (r + w - s - 1) % w),
                    Phase::AllGather => ((r + 1 + w - s) % w, (r + w - s) % w),
                };
                // The values travel as their in-memory bytes (every platform lfm runs on is little-endian).
                let mut incoming = vec![0f32; chunk(receive).len()];
                {
                    let outgoing: &[u8] = bytemuck::cast_slice(&values[chunk(send)]);
                    let incoming: &mut [u8] = bytemuck::cast_slice_mut(&mut incoming);
                    // Send and receive at once: with every node sending first, a blocking ring would deadlock as soon
                    // as a chunk outgrows the socket buffers.
                    std::thread::scope(|scope| -> Result<(), NodeError> {
                        let sender = scope.spawn(|| next.write_all(outgoing));
                        let received = previous.read_exact(incoming).map_err(lost(r, w));
                        let sent = sender.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                        received?;
                        sent.map_err(network("sending to the next node (did it stop?)"))
                    })?;
                }
                let target = &mut values[chunk(receive)];
                match phase {
                    Phase::ReduceScatter => target.iter_mut().zip(&incoming).for_each(|(v, x)| *v += x),
                    Phase::AllGather => target.copy_from_slice(&incoming),
                }
            }
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum Phase {
    ReduceScatter,
    AllGather,
}

fn lost(rank: usize, world: usize) -> impl FnOnce(std::io::Error) -> NodeError {
    let previous = (rank + world - 1) % world;
    network(format!("receiving from node {previous} (did it stop? every node must run until the end)"))
}

fn read_u64(stream: &mut TcpStream) -> std::io::Result<u64> {
    let mut bytes = [0u8; 8];
    stream.read_exact(&mut bytes)?;
    Ok(u64::from_le_bytes(bytes))
}

fn resolve(host: &str, port: u16) -> Result<SocketAddr, NodeError> {
    (host, port)
        .to_socket_addrs()
        .map_err(network(format!("resolving MASTER_ADDR {host}")))?
        .next()
        .ok_or_else(|| NodeError::Invalid(format!("MASTER_ADDR {host} resolves to no address")))
}

/// Connects, retrying until `deadline` (the other side may not be listening yet).
fn connect(address: SocketAddr, deadline: Instant, what: &str) -> Result<TcpStream, NodeError> {
    loop {
        match TcpStream::connect_timeout(&address, Duration::from_secs(5)) {
            Ok(stream) => return Ok(stream),
            Err(e) if Instant::now() >= deadline => {
                return Err(network(format!("connecting to {what} at {address} (timed out waiting for it)"))(e))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Accepts one connection before `deadline`.
fn accept(listener: &TcpListener, deadline: Instant, what: &str) -> Result<TcpStream, NodeError> {
    listener.set_nonblocking(true).map_err(network("configuring a listener"))?;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).map_err(network("configuring a connection"))?;
                return Ok(stream);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(NodeError::Network {
                        what: format!("waiting for {what} to connect"),
                        source: std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"),
                    });
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(network(format!("accepting {what}"))(e)),
        }
    }
}

/// What a joining node says: magic, rank, world, fingerprint, ring port.
fn hello(rank: usize, world: usize, fingerprint: u64, ring_port: u16) -> Vec<u8> {
    let mut bytes = MAGIC.to_vec();
    for v in [rank as u64, world as u64, fingerprint, ring_port as u64] {
        bytes.extend(v.to_le_bytes());
    }
    bytes
}

/// Rank 0: waits for every other rank, checks that they belong to this run, sends everyone the ring addresses.
fn lead_rendezvous(
    spec: &NodeSpec,
    fingerprint: u64,
    ring_port: u16,
    deadline: Instant,
) -> Result<Vec<SocketAddr>, NodeError> {
    let listener = TcpListener::bind(("0.0.0.0", spec.master_port))
        .map_err(network(format!("listening on MASTER_PORT {} (is another run using it?)", spec.master_port)))?;
    let own = resolve(&spec.master_addr, ring_port)?;
    let mut addresses: Vec<Option<SocketAddr>> = vec![None; spec.world];
    addresses[0] = Some(own);
    let mut followers = Vec::new();
    while followers.len() + 1 < spec.world {
        let what = format!("{} more node(s) (WORLD_SIZE {})", spec.world - 1 - followers.len(), spec.world);
        let mut stream = accept(&listener, deadline, &what)?;
        let peer = stream.peer_addr().map_err(network("reading a node's address"))?;
        let mut message = [0u8; 40];
        stream.read_exact(&mut message).map_err(network(format!("reading the greeting of {peer}")))?;
        let field = |i: usize| u64::from_le_bytes(message[8 + 8 * i..16 + 8 * i].try_into().expect("eight bytes"));
        let problem = if &message[..8] != MAGIC {
            Some(format!("{peer} is not an lfm node of this version"))
        } else if field(1) != spec.world as u64 {
            Some(format!("{peer} says WORLD_SIZE {}, this node {}", field(1), spec.world))
        } else if field(2) != fingerprint {
            Some(format!(
                "node {} ({peer}) trains another model, settings or data than node 0: start every node with the same \
                 command and data",
                field(0)
            ))
        } else if field(0) == 0 || field(0) >= spec.world as u64 || addresses[field(0) as usize].is_some() {
            Some(format!("{peer} says RANK {}, which is out of range or taken", field(0)))
        } else {
            None
        };
        if let Some(problem) = problem {
            let _ = stream.write_all(problem.as_bytes());
            return Err(NodeError::Mismatch(problem));
        }
        addresses[field(0) as usize] = Some(SocketAddr::new(peer.ip(), field(3) as u16));
        followers.push(stream);
    }
    let addresses: Vec<SocketAddr> = addresses.into_iter().map(|a| a.expect("every rank joined")).collect();
    let table = serde_json::to_vec(&addresses).expect("addresses serialise");
    for stream in &mut followers {
        let mut reply = b"OK".to_vec();
        reply.extend((table.len() as u64).to_le_bytes());
        reply.extend(&table);
        stream.write_all(&reply).map_err(network("sending the ring addresses"))?;
    }
    Ok(addresses)
}

/// Every other rank: introduces itself to rank 0 and receives the ring addresses.
fn follow_rendezvous(
    spec: &NodeSpec,
    fingerprint: u64,
    ring_port: u16,
    deadline: Instant,
) -> Result<Vec<SocketAddr>, NodeError> {
    let master = resolve(&spec.master_addr, spec.master_port)?;
    let mut stream = connect(master, deadline, "node 0 (MASTER_ADDR:MASTER_PORT)")?;
    stream.write_all(&hello(spec.rank, spec.world, fingerprint, ring_port)).map_err(network("greeting node 0"))?;
    let mut status = [0u8; 2];
    stream.read_exact(&mut status).map_err(network("waiting for node 0 to accept this node"))?;
    if &status != b"OK" {
        let mut rest = String::new();
        let _ = stream.read_to_string(&mut rest);
        return Err(NodeError::Mismatch(format!(
            "node 0 refused this node: {}{rest}",
            String::from_utf8_lossy(&status)
        )));
    }
    let len = read_u64(&mut stream).map_err(network("reading the ring addresses"))?;
    let mut table = vec![0u8; len as usize];
    stream.read_exact(&mut table).map_err(network("reading the ring addresses"))?;
    let mut addresses: Vec<SocketAddr> =
        serde_json::from_slice(&table).map_err(|e| NodeError::Mismatch(format!("node 0 sent a bad table: {e}")))?;
    // Rank 0's own entry is how rank 0 resolves MASTER_ADDR, which may be its loopback: use the address this node
    // reached it at.
    addresses[0] = SocketAddr::new(master.ip(), addresses[0].port());
    Ok(addresses)
}

/// A stable 64-bit hash (FNV-1a) of `bytes`, for run fingerprints.
pub fn fingerprint(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> u16 {
        TcpListener::bind(("127.0.0.1", 0)).unwrap().local_addr().unwrap().port()
    }

    fn spec(rank: usize, world: usize, port: u16) -> NodeSpec {
        NodeSpec { rank, world, master_addr: "127.0.0.1".into(), master_port: port, timeout: Duration::from_secs(30) }
    }

    #[test]
    fn ring_all_reduce_sums_exactly_on_every_node() {
        for world in [2, 3, 4] {
            let port = free_port();
            // Odd lengths: chunks of unequal sizes, some empty.
            let results: Vec<Vec<Vec<f32>>> = std::thread::scope(|scope| {
                let nodes: Vec<_> = (0..world)
                    .map(|rank| {
                        scope.spawn(move || {
                            let mut group = NodeGroup::join(&spec(rank, world, port), 7).expect("joins");
                            [1usize, 2, 1001, 100_003]
                                .iter()
                                .map(|&len| {
                                    let mut v: Vec<f32> =
                                        (0..len).map(|i| ((i * (rank + 1)) % 97) as f32 * 0.125).collect();
                                    group.all_reduce_sum(&mut v).expect("sums");
                                    v
                                })
                                .collect()
                        })
                    })
                    .collect();
                nodes.into_iter().map(|n| n.join().unwrap()).collect()
            });
            for (k, len) in [1usize, 2, 1001, 100_003].into_iter().enumerate() {
                // Multiples of 1/8 below 2^11: every order of the sum is exact.
                let expected: Vec<f32> =
                    (0..len).map(|i| (0..world).map(|rank| ((i * (rank + 1)) % 97) as f32 * 0.125).sum()).collect();
                for node in &results {
                    assert_eq!(node[k], expected, "world {world}, length {len}");
                }
            }
        }
    }

    #[test]
    fn nodes_of_another_run_are_refused() {
        let port = free_port();
        let (lead, follow) = std::thread::scope(|scope| {
            let lead = scope.spawn(|| NodeGroup::join(&spec(0, 2, port), 1).map(|_| ()));
            let follow = scope.spawn(|| NodeGroup::join(&spec(1, 2, port), 2).map(|_| ()));
            (lead.join().unwrap(), follow.join().unwrap())
        });
        let lead = lead.unwrap_err().to_string();
        assert!(lead.contains("trains another model, settings or data"), "{lead}");
        let follow = follow.unwrap_err().to_string();
        assert!(follow.contains("node 0 refused this node"), "{follow}");
        let bad = NodeGroup::join(&spec(2, 2, port), 1).unwrap_err().to_string();
        assert!(bad.contains("RANK counts from 0"), "{bad}");
    }

    #[test]
    fn rows_split_a_batch_as_gradient_accumulation_does() {
        let group = |rank, world| NodeGroup { rank, world, next: None, previous: None };
        assert_eq!((0..3).map(|r| group(r, 3).rows(8)).collect::<Vec<_>>(), vec![0..3, 3..6, 6..8]);
        assert_eq!((0..3).map(|r| group(r, 3).rows(2)).collect::<Vec<_>>(), vec![0..1, 1..2, 2..2]);
    }
}
