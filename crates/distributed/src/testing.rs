//! A stand-in collective for tests without MPI: `k` ranks that all hold the same tensors, so a
//! sum is `k` times the input and a broadcast the input itself. What a real job computes is
//! tested under `mpirun` (crates/cli/tests/distributed.rs).

use crate::collective::{Collective, Reduce};
use candle_core::{Result, Tensor};
use std::sync::atomic::{AtomicUsize, Ordering};

/// `k` identical ranks; counts the collective calls made.
#[derive(Debug)]
pub struct Copies {
    k: usize,
    calls: AtomicUsize,
}

impl Copies {
    /// `k` identical ranks.
    pub fn new(k: usize) -> Self {
        Self {
            k,
            calls: AtomicUsize::new(0),
        }
    }

    /// Collective calls made so far.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Collective for Copies {
    fn transport(&self) -> &'static str {
        "copies (test)"
    }

    fn all_reduce(&self, t: &Tensor, op: Reduce) -> Result<Tensor> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        match op {
            Reduce::Sum => t * self.k as f64,
            Reduce::Max => Ok(t.clone()),
        }
    }

    fn broadcast(&self, t: &Tensor, _root: usize) -> Result<Tensor> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Ok(t.clone())
    }

    fn abort(&self, code: i32) -> ! {
        panic!("abort({code}) in a test")
    }
}

/// `size` ranks as threads of one process, each with its own handle ([`Threads::rank`]): a
/// real collective (distinct values per rank) for tests that need no MPI.
#[derive(Debug)]
pub struct Threads {
    size: usize,
    slots: std::sync::Mutex<Vec<Vec<f64>>>,
    barrier: std::sync::Barrier,
}

impl Threads {
    /// A group of `size` thread ranks.
    pub fn new(size: usize) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self {
            size,
            slots: std::sync::Mutex::new(vec![Vec::new(); size]),
            barrier: std::sync::Barrier::new(size),
        })
    }

    /// The world of thread rank `rank`.
    pub fn rank(self: &std::sync::Arc<Self>, rank: usize) -> crate::World {
        let handle = ThreadRank {
            rank,
            group: self.clone(),
        };
        crate::World::new(rank, self.size, rank, std::sync::Arc::new(handle))
    }
}

struct ThreadRank {
    rank: usize,
    group: std::sync::Arc<Threads>,
}

impl ThreadRank {
    /// Every rank's values, once every rank has given its own.
    fn exchange(&self, mine: Vec<f64>) -> Vec<Vec<f64>> {
        self.group.slots.lock().expect("slots")[self.rank] = mine;
        self.group.barrier.wait();
        let all = self.group.slots.lock().expect("slots").clone();
        self.group.barrier.wait();
        all
    }
}

impl Collective for ThreadRank {
    fn transport(&self) -> &'static str {
        "threads (test)"
    }

    fn all_reduce(&self, t: &Tensor, op: Reduce) -> Result<Tensor> {
        let mine = t
            .flatten_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_vec1::<f64>()?;
        let all = self.exchange(mine);
        let combined: Vec<f64> = (0..all[0].len())
            .map(|i| {
                let values = all.iter().map(|v| v[i]);
                match op {
                    Reduce::Sum => values.sum(),
                    Reduce::Max => values.fold(f64::NEG_INFINITY, f64::max),
                }
            })
            .collect();
        Tensor::from_vec(combined, t.shape(), t.device())?.to_dtype(t.dtype())
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        let mine = t
            .flatten_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_vec1::<f64>()?;
        let all = self.exchange(mine);
        Tensor::from_vec(all[root].clone(), t.shape(), t.device())?.to_dtype(t.dtype())
    }

    fn abort(&self, code: i32) -> ! {
        panic!("abort({code}) in a test")
    }
}
