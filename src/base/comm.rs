//! Message passing between ranks (rsmpi): the few collectives dust3d needs, on plain slices.
//!
//! MPI is initialised only when a launcher started the process (`mpirun`, `srun`: the
//! variables `OMPI_COMM_WORLD_SIZE`, `PMI_SIZE`, `PMIX_RANK`); a plain process is a
//! one-rank run that never touches MPI. Only the main thread calls MPI (rayon workers
//! never do), so the library is initialised `Funneled`. Every call counts the bytes this
//! rank sends and the thread-CPU time it spends inside MPI, for the history and `plan`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use mpi::datatype::{Partition, PartitionMut};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use mpi::Count;

static WORLD: OnceLock<(usize, usize)> = OnceLock::new();
static ANY_THREAD: OnceLock<bool> = OnceLock::new();
static BYTES_SENT: AtomicU64 = AtomicU64::new(0);
static MPI_NANOS: AtomicU64 = AtomicU64::new(0);

/// Keeps MPI initialised; finalises it when dropped (at the end of `main`).
pub struct Guard {
    _universe: Option<mpi::environment::Universe>,
}

/// True if a process launcher started this process as one rank of a job.
pub fn launched_by_mpi() -> bool {
    [
        "OMPI_COMM_WORLD_SIZE",
        "PMI_SIZE",
        "PMIX_RANK",
        "MPI_LOCALNRANKS",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some())
}

/// Initialise MPI if a launcher started the process; a no-op (one rank) otherwise.
pub fn init() -> Guard {
    if WORLD.get().is_some() || !launched_by_mpi() {
        WORLD.get_or_init(|| (0, 1));
        return Guard { _universe: None };
    }
    // serialized: the commands run on a thread of the pool, not the main one (one thread at
    // a time calls MPI)
    let (universe, provided) = mpi::initialize_with_threading(mpi::Threading::Serialized)
        .expect("MPI initialisation failed");
    ANY_THREAD.get_or_init(|| provided >= mpi::Threading::Serialized);
    let w = universe.world();
    WORLD.get_or_init(|| (w.rank() as usize, w.size() as usize));
    Guard {
        _universe: Some(universe),
    }
}

/// Whether MPI takes calls from any one thread at a time (always without MPI); else only
/// from the main thread.
pub fn calls_from_any_thread() -> bool {
    *ANY_THREAD.get_or_init(|| true)
}

/// This process's rank (0 without MPI).
pub fn rank() -> usize {
    WORLD.get().map_or(0, |w| w.0)
}

/// Number of ranks (1 without MPI).
pub fn size() -> usize {
    WORLD.get().map_or(1, |w| w.1)
}

/// True on rank 0.
pub fn is_root() -> bool {
    rank() == 0
}

/// Bytes this rank has sent through MPI so far.
pub fn bytes_sent() -> u64 {
    BYTES_SENT.load(Ordering::Relaxed)
}

/// Thread-CPU seconds this rank has spent inside MPI calls so far.
pub fn mpi_cpu_seconds() -> f64 {
    MPI_NANOS.load(Ordering::Relaxed) as f64 * 1e-9
}

fn cpu_nanos(clock: i32) -> u64 {
    let mut ts = Timespec { sec: 0, nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into the pointer we pass
    unsafe { clock_gettime(clock, &mut ts) };
    ts.sec as u64 * 1_000_000_000 + ts.nsec as u64
}

fn thread_cpu_nanos() -> u64 {
    cpu_nanos(3) // CLOCK_THREAD_CPUTIME_ID
}

/// CPU seconds this process has used so far, all threads (CLOCK_PROCESS_CPUTIME_ID).
pub fn process_cpu_seconds() -> f64 {
    cpu_nanos(2) as f64 * 1e-9
}

#[repr(C)]
struct Timespec {
    sec: i64,
    nsec: i64,
}

extern "C" {
    fn clock_gettime(clk: i32, ts: *mut Timespec) -> i32;
}

/// Run `f` on the world communicator, timing it and counting `sent` bytes.
fn with_world<T>(sent: usize, f: impl FnOnce(&SimpleCommunicator) -> T) -> T {
    let t = thread_cpu_nanos();
    let w = SimpleCommunicator::world();
    let out = f(&w);
    MPI_NANOS.fetch_add(thread_cpu_nanos().saturating_sub(t), Ordering::Relaxed);
    BYTES_SENT.fetch_add(sent as u64, Ordering::Relaxed);
    out
}

fn displs(counts: &[Count]) -> Vec<Count> {
    counts
        .iter()
        .scan(0, |acc, &c| {
            let d = *acc;
            *acc += c;
            Some(d)
        })
        .collect()
}

fn counts_of(c: &[usize]) -> Vec<Count> {
    c.iter()
        .map(|&v| Count::try_from(v).expect("message larger than 2^31 elements"))
        .collect()
}

/// Gather every rank's `local` (of known lengths `counts`, one per rank) on every rank,
/// concatenated in rank order.
pub fn all_gather<T: Equivalence + Copy + Default>(local: &[T], counts: &[usize]) -> Vec<T> {
    let mut out = vec![T::default(); counts.iter().sum()];
    all_gather_into(local, counts, &mut out);
    out
}

/// [`all_gather`] into a caller's buffer of length Σ `counts` (no allocation of the result).
pub fn all_gather_into<T: Equivalence + Copy>(local: &[T], counts: &[usize], out: &mut [T]) {
    if size() == 1 {
        out.copy_from_slice(local);
        return;
    }
    let c = counts_of(counts);
    let d = displs(&c);
    let bytes = std::mem::size_of_val(local) * (size() - 1);
    with_world(bytes, |w| {
        let mut part = PartitionMut::new(out, c, &d[..]);
        w.all_gather_varcount_into(local, &mut part);
    });
}

/// [`all_gather`] of f64 values.
pub fn all_gather_f64(local: &[f64], counts: &[usize]) -> Vec<f64> {
    all_gather(local, counts)
}

/// [`all_gather`] of u64 values.
pub fn all_gather_u64(local: &[u64], counts: &[usize]) -> Vec<u64> {
    all_gather(local, counts)
}

/// Personalised exchange: `send` holds the blocks for ranks 0, 1, … of lengths
/// `send_counts`; returns the blocks received, of lengths `recv_counts`, in rank order.
/// Both sides know the counts from their plans, so no counts travel.
pub fn all_to_all_f64(send: &[f64], send_counts: &[usize], recv_counts: &[usize]) -> Vec<f64> {
    let mut out = vec![0.0; recv_counts.iter().sum()];
    all_to_all_into(send, send_counts, recv_counts, &mut out);
    out
}

/// [`all_to_all_f64`] into a caller's buffer of length Σ `recv_counts`.
pub fn all_to_all_into(
    send: &[f64],
    send_counts: &[usize],
    recv_counts: &[usize],
    out: &mut [f64],
) {
    if size() == 1 {
        out.copy_from_slice(send);
        return;
    }
    let (sc, rc) = (counts_of(send_counts), counts_of(recv_counts));
    let (sd, rd) = (displs(&sc), displs(&rc));
    let me = rank();
    let sent = 8 * (send.len() - send_counts[me]);
    with_world(sent, |w| {
        let s = Partition::new(send, sc, &sd[..]);
        let mut r = PartitionMut::new(out, rc, &rd[..]);
        w.all_to_all_varcount_into(&s, &mut r);
    });
}

/// `op` of one value over all ranks.
fn all_reduce<T: Equivalence + Copy>(v: T, op: mpi::collective::SystemOperation) -> T {
    if size() == 1 {
        return v;
    }
    let mut out = v;
    with_world(std::mem::size_of::<T>(), |w| {
        w.all_reduce_into(&v, &mut out, op)
    });
    out
}

/// Maximum over ranks.
pub fn max_f64(v: f64) -> f64 {
    all_reduce(v, mpi::collective::SystemOperation::max())
}

/// Minimum over ranks.
pub fn min_u64(v: u64) -> u64 {
    all_reduce(v, mpi::collective::SystemOperation::min())
}

/// Sum over ranks (integers: exact in any order).
pub fn sum_u64(v: u64) -> u64 {
    all_reduce(v, mpi::collective::SystemOperation::sum())
}

/// True on every rank iff `b` is true on every rank (decisions all ranks must share).
pub fn all(b: bool) -> bool {
    min_u64(b as u64) == 1
}

/// Send `data` to rank `dest` (blocking, matched by [`recv_f64`]).
pub fn send_f64(dest: usize, data: &[f64]) {
    with_world(data.len() * 8, |w| {
        w.process_at_rank(dest as i32).send(data)
    });
}

/// Receive the f64 message that rank `src` sends next.
pub fn recv_f64(src: usize) -> Vec<f64> {
    with_world(0, |w| w.process_at_rank(src as i32).receive_vec::<f64>().0)
}

/// Wait until every rank arrives.
pub fn barrier() {
    if size() > 1 {
        with_world(0, |w| w.barrier());
    }
}

/// End the whole job: the error is printed on this rank first. Without MPI, exits.
pub fn abort(code: i32) -> ! {
    if size() > 1 {
        SimpleCommunicator::world().abort(code)
    }
    std::process::exit(code)
}

/// Send `data` to rank `dest` (blocking, matched by [`recv_bytes`]).
pub fn send_bytes(dest: usize, data: &[u8]) {
    with_world(data.len(), |w| w.process_at_rank(dest as i32).send(data));
}

/// Receive the byte message that rank `src` sends next.
pub fn recv_bytes(src: usize) -> Vec<u8> {
    with_world(0, |w| w.process_at_rank(src as i32).receive_vec::<u8>().0)
}
