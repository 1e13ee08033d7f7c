//! How processes launched without MPI (`torchrun`-style variables: `WORLD_SIZE`, `RANK`, `MASTER_ADDR`,
//! `MASTER_PORT`) find each other, agree that they run the same job, and learn NCCL's unique id; then how each one
//! notices that another has gone.
//!
//! Rank 0 listens on the master port; every other rank connects (retrying until the timeout, so the processes may
//! start in any order) and says who it is and which run it belongs to (a fingerprint of the model, the settings and
//! the data). Once all have joined, rank 0 sends each of them the payload (NCCL's unique id). The connections stay
//! open as heartbeat links: each side sends a byte every [`HEARTBEAT`] and expects one within [`PEER_TIMEOUT`], so a
//! process killed mid-run (its socket closed by the kernel) or a machine gone silent is noticed within a bounded
//! time instead of leaving the others blocked in a collective until a scheduler's wall clock runs out.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::GroupError;

/// First bytes of every rendezvous message, with the protocol version.
const MAGIC: &[u8; 8] = b"LFMRDV02";
/// How often each side of a link says it is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// How long a link may stay silent before its peer is taken for lost.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(20);
/// The heartbeat byte, and the one a process sends when it leaves at the end of a run.
const ALIVE: u8 = 1;
const BYE: u8 = 0;

/// Where a process stands in a run launched with `torchrun`-style variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    /// This process's rank, `0..world`.
    pub rank: usize,
    /// The number of processes.
    pub world: usize,
    /// Host name or address of rank 0.
    pub master_addr: String,
    /// Port rank 0 listens on for the rendezvous.
    pub master_port: u16,
    /// How long to wait for every process to join.
    pub timeout: Duration,
}

fn network(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> GroupError {
    let what = what.into();
    move |source| GroupError::Network { what, source }
}

/// The processes of a run after the rendezvous: rank 0 holds a link to every other rank, the others one link to
/// rank 0.
#[derive(Debug)]
pub struct Rendezvous {
    /// This process's rank.
    pub rank: usize,
    /// The number of processes.
    pub world: usize,
    /// What rank 0 handed out.
    pub payload: Vec<u8>,
    links: Vec<(usize, TcpStream)>,
}

impl Rendezvous {
    /// Joins the run `spec` describes; `fingerprint` identifies the run (every process must compute the same) and
    /// `payload` makes, on rank 0 only, what every process receives. Returns once every process has joined.
    pub fn join(
        spec: &NodeSpec,
        fingerprint: u64,
        payload: impl FnOnce() -> Result<Vec<u8>, GroupError>,
    ) -> Result<Self, GroupError> {
        let NodeSpec { rank, world, .. } = *spec;
        if world == 0 || rank >= world {
            return Err(GroupError::Invalid(format!(
                "rank {rank} is not below the world size {world} (RANK counts from 0 to WORLD_SIZE − 1)"
            )));
        }
        let deadline = Instant::now() + spec.timeout;
        if rank == 0 {
            let payload = payload()?;
            let links = lead(spec, fingerprint, &payload, deadline)?;
            Ok(Self { rank, world, payload, links })
        } else {
            let (link, payload) = follow(spec, fingerprint, deadline)?;
            Ok(Self { rank, world, payload, links: vec![(0, link)] })
        }
    }

    /// Starts watching the links: `lost` is called (once, from a watcher thread) with a message naming the process
    /// that stopped answering. The watch ends when the returned [`Watchdog`] finishes or is dropped.
    pub fn watch(self, lost: impl Fn(String) + Send + Sync + 'static) -> Result<Watchdog, GroupError> {
        let finished = Arc::new(AtomicBool::new(false));
        let reported = Arc::new(AtomicBool::new(false));
        let lost = Arc::new(lost);
        let mut writers = Vec::new();
        for (peer, link) in self.links {
            link.set_read_timeout(Some(PEER_TIMEOUT)).map_err(network("configuring a heartbeat link"))?;
            let mut reader = link.try_clone().map_err(network("configuring a heartbeat link"))?;
            let (finished, reported, lost) = (finished.clone(), reported.clone(), lost.clone());
            std::thread::Builder::new()
                .name(format!("lfm-watch-{peer}"))
                .spawn(move || {
                    let mut byte = [0u8; 1];
                    let why = loop {
                        match reader.read_exact(&mut byte) {
                            Ok(()) if byte[0] == ALIVE => continue,
                            Ok(()) => return, // The peer finished its run.
                            Err(e) => match e.kind() {
                                // Closed by its kernel: the process is gone (a reset when unread heartbeats were left).
                                ErrorKind::UnexpectedEof
                                | ErrorKind::ConnectionReset
                                | ErrorKind::ConnectionAborted => break "closed its connection",
                                ErrorKind::WouldBlock | ErrorKind::TimedOut => break "went silent",
                                _ => break "dropped its connection",
                            },
                        }
                    };
                    if !finished.load(Ordering::SeqCst) && !reported.swap(true, Ordering::SeqCst) {
                        lost(format!(
                            "process {peer} of the run {why} (killed, crashed or unreachable for {} s): every process \
                             must run until the end; rerun the same command with --resume to continue from the last \
                             checkpoint",
                            PEER_TIMEOUT.as_secs()
                        ));
                    }
                })
                .map_err(network("starting a heartbeat thread"))?;
            writers.push(link);
        }
        let beating = writers.iter().map(|l| l.try_clone()).collect::<Result<Vec<_>, _>>();
        let mut beating = beating.map_err(network("configuring a heartbeat link"))?;
        let stop = finished.clone();
        std::thread::Builder::new()
            .name("lfm-heartbeat".into())
            .spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    for link in &mut beating {
                        // A failed write shows up on the reading side as well: nothing to do here.
                        let _ = link.write_all(&[ALIVE]);
                    }
                    std::thread::sleep(HEARTBEAT);
                }
            })
            .map_err(network("starting the heartbeat thread"))?;
        Ok(Watchdog { finished, links: writers })
    }
}

/// Watches the other processes of a run ([`Rendezvous::watch`]).
#[derive(Debug)]
pub struct Watchdog {
    finished: Arc<AtomicBool>,
    links: Vec<TcpStream>,
}

impl Watchdog {
    /// Tells the other processes that this one finished its run, and stops watching them.
    pub fn finish(&mut self) {
        if !self.finished.swap(true, Ordering::SeqCst) {
            for link in &mut self.links {
                let _ = link.write_all(&[BYE]);
            }
        }
    }
}

fn read_u64(stream: &mut TcpStream) -> std::io::Result<u64> {
    let mut bytes = [0u8; 8];
    stream.read_exact(&mut bytes)?;
    Ok(u64::from_le_bytes(bytes))
}

fn resolve(host: &str, port: u16) -> Result<SocketAddr, GroupError> {
    (host, port)
        .to_socket_addrs()
        .map_err(network(format!("resolving MASTER_ADDR {host}")))?
        .next()
        .ok_or_else(|| GroupError::Invalid(format!("MASTER_ADDR {host} resolves to no address")))
}

/// Connects, retrying until `deadline` (the other side may not be listening yet).
fn connect(address: SocketAddr, deadline: Instant, what: &str) -> Result<TcpStream, GroupError> {
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
fn accept(listener: &TcpListener, deadline: Instant, what: &str) -> Result<TcpStream, GroupError> {
    listener.set_nonblocking(true).map_err(network("configuring a listener"))?;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).map_err(network("configuring a connection"))?;
                return Ok(stream);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(GroupError::Network {
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

/// What a joining process says: magic, rank, world, fingerprint.
fn hello(rank: usize, world: usize, fingerprint: u64) -> Vec<u8> {
    let mut bytes = MAGIC.to_vec();
    for v in [rank as u64, world as u64, fingerprint] {
        bytes.extend(v.to_le_bytes());
    }
    bytes
}

/// Rank 0: waits for every other rank, checks that they belong to this run, sends everyone the payload.
fn lead(
    spec: &NodeSpec,
    fingerprint: u64,
    payload: &[u8],
    deadline: Instant,
) -> Result<Vec<(usize, TcpStream)>, GroupError> {
    let listener = TcpListener::bind(("0.0.0.0", spec.master_port))
        .map_err(network(format!("listening on MASTER_PORT {} (is another run using it?)", spec.master_port)))?;
    let mut joined: Vec<Option<TcpStream>> = (0..spec.world).map(|_| None).collect();
    let mut count = 1;
    while count < spec.world {
        let what = format!("{} more process(es) (WORLD_SIZE {})", spec.world - count, spec.world);
        let mut stream = accept(&listener, deadline, &what)?;
        let peer = stream.peer_addr().map_err(network("reading a process's address"))?;
        let mut message = [0u8; 32];
        stream.read_exact(&mut message).map_err(network(format!("reading the greeting of {peer}")))?;
        let field = |i: usize| u64::from_le_bytes(message[8 + 8 * i..16 + 8 * i].try_into().expect("eight bytes"));
        let problem = if &message[..8] != MAGIC {
            Some(format!("{peer} is not an lfm process of this version"))
        } else if field(1) != spec.world as u64 {
            Some(format!("{peer} says WORLD_SIZE {}, rank 0 {}", field(1), spec.world))
        } else if field(2) != fingerprint {
            Some(format!(
                "rank {} ({peer}) trains another model, settings or data than rank 0: start every process with the \
                 same command and data",
                field(0)
            ))
        } else if field(0) == 0 || field(0) >= spec.world as u64 || joined[field(0) as usize].is_some() {
            Some(format!("{peer} says RANK {}, which is out of range or taken", field(0)))
        } else {
            None
        };
        if let Some(problem) = problem {
            let _ = stream.write_all(problem.as_bytes());
            return Err(GroupError::Mismatch(problem));
        }
        joined[field(0) as usize] = Some(stream);
        count += 1;
    }
    let mut links = Vec::new();
    for (rank, stream) in joined.into_iter().enumerate() {
        let Some(mut stream) = stream else { continue };
        let mut reply = b"OK".to_vec();
        reply.extend((payload.len() as u64).to_le_bytes());
        reply.extend(payload);
        stream.write_all(&reply).map_err(network(format!("sending rank {rank} the run's id")))?;
        links.push((rank, stream));
    }
    Ok(links)
}

/// Every other rank: introduces itself to rank 0 and receives the payload.
fn follow(spec: &NodeSpec, fingerprint: u64, deadline: Instant) -> Result<(TcpStream, Vec<u8>), GroupError> {
    let master = resolve(&spec.master_addr, spec.master_port)?;
    let mut stream = connect(master, deadline, "rank 0 (MASTER_ADDR:MASTER_PORT)")?;
    stream.write_all(&hello(spec.rank, spec.world, fingerprint)).map_err(network("greeting rank 0"))?;
    let mut status = [0u8; 2];
    stream.read_exact(&mut status).map_err(network("waiting for rank 0 to accept this process"))?;
    if &status != b"OK" {
        let mut rest = String::new();
        let _ = stream.read_to_string(&mut rest);
        return Err(GroupError::Mismatch(format!(
            "rank 0 refused this process: {}{rest}",
            String::from_utf8_lossy(&status)
        )));
    }
    let len = read_u64(&mut stream).map_err(network("reading the run's id"))?;
    if len > 1 << 20 {
        return Err(GroupError::Mismatch(format!("rank 0 announced a {len}-byte id: not an lfm process")));
    }
    let mut payload = vec![0u8; len as usize];
    stream.read_exact(&mut payload).map_err(network("reading the run's id"))?;
    Ok((stream, payload))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn free_port() -> u16 {
        TcpListener::bind(("127.0.0.1", 0)).unwrap().local_addr().unwrap().port()
    }

    fn spec(rank: usize, world: usize, port: u16) -> NodeSpec {
        NodeSpec { rank, world, master_addr: "127.0.0.1".into(), master_port: port, timeout: Duration::from_secs(30) }
    }

    #[test]
    fn every_rank_receives_rank_zeros_payload() {
        let port = free_port();
        let joined: Vec<Rendezvous> = std::thread::scope(|scope| {
            let ranks: Vec<_> = [2, 0, 1]
                .into_iter()
                .map(|rank| {
                    scope.spawn(move || {
                        Rendezvous::join(&spec(rank, 3, port), 7, || Ok(b"nccl id".to_vec())).expect("joins")
                    })
                })
                .collect();
            ranks.into_iter().map(|r| r.join().unwrap()).collect()
        });
        for r in &joined {
            assert_eq!(r.payload, b"nccl id");
            assert_eq!(r.links.len(), if r.rank == 0 { 2 } else { 1 });
        }
    }

    #[test]
    fn processes_of_another_run_are_refused() {
        let port = free_port();
        let (lead, follow) = std::thread::scope(|scope| {
            let lead = scope.spawn(|| Rendezvous::join(&spec(0, 2, port), 1, || Ok(vec![])).map(|_| ()));
            let follow = scope.spawn(|| Rendezvous::join(&spec(1, 2, port), 2, || Ok(vec![])).map(|_| ()));
            (lead.join().unwrap(), follow.join().unwrap())
        });
        let lead = lead.unwrap_err().to_string();
        assert!(lead.contains("trains another model, settings or data"), "{lead}");
        let follow = follow.unwrap_err().to_string();
        assert!(follow.contains("rank 0 refused this process"), "{follow}");
        let bad = Rendezvous::join(&spec(2, 2, port), 1, || Ok(vec![])).unwrap_err().to_string();
        assert!(bad.contains("RANK counts from 0"), "{bad}");
    }

    /// A process whose links close without a goodbye (as when it is killed) is reported by the others within the
    /// heartbeat's bounds; one that finishes its run is not.
    #[test]
    fn a_vanished_process_is_reported_and_a_finished_one_is_not() {
        let port = free_port();
        let (mut joined, _) = std::thread::scope(|scope| {
            let ranks: Vec<_> = (0..3)
                .map(|rank| scope.spawn(move || Rendezvous::join(&spec(rank, 3, port), 7, || Ok(vec![])).unwrap()))
                .collect();
            (ranks.into_iter().map(|r| r.join().unwrap()).collect::<Vec<_>>(), ())
        });
        let (tx, rx) = mpsc::channel();
        let vanishing = joined.pop().expect("rank 2");
        let finishing = joined.pop().expect("rank 1");
        let lead = joined.pop().expect("rank 0");
        let tx0 = tx.clone();
        let _lead = lead.watch(move |why| tx0.send(why).unwrap()).unwrap();
        let mut finishing = finishing.watch(move |why| tx.send(why).unwrap()).unwrap();
        let started = Instant::now();
        finishing.finish();
        std::thread::sleep(HEARTBEAT * 2);
        assert!(rx.try_recv().is_err(), "a finished process is not reported");
        drop(vanishing); // Its sockets close without a goodbye, as when the kernel reaps a killed process.
        let why = rx.recv_timeout(PEER_TIMEOUT + HEARTBEAT * 2).expect("the lost process is reported");
        assert!(why.contains("process 2 of the run closed its connection") && why.contains("--resume"), "{why}");
        assert!(started.elapsed() < PEER_TIMEOUT, "reported in {:?}", started.elapsed());
        assert!(rx.recv_timeout(HEARTBEAT).is_err(), "reported once");
    }
}
