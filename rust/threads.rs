//! fusedae's private thread pool: batch rows are split across it, never PyTorch's or rayon's
//! global pool, so `set_num_threads` affects only fusedae.

use std::sync::{Arc, Mutex, PoisonError};

use rayon::{ThreadPool, ThreadPoolBuilder};

struct PoolState {
    threads: usize,
    pool: Option<Arc<ThreadPool>>,
}

static STATE: Mutex<PoolState> = Mutex::new(PoolState {
    threads: 0,
    pool: None,
});

fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Threads a large batch is split across (the CPUs this process may use, unless set).
pub fn num_threads() -> usize {
    resolved_threads(&mut STATE.lock().unwrap_or_else(PoisonError::into_inner))
}

fn resolved_threads(state: &mut PoolState) -> usize {
    if state.threads == 0 {
        // Asked once: finding the CPU quota reads cgroup files, far slower than a small batch.
        state.threads = default_threads();
    }
    state.threads
}

/// Sets the thread count for later calls; calls already running keep their pool.
pub fn set_num_threads(threads: usize) -> Result<(), String> {
    if threads == 0 {
        return Err("the number of threads must be at least 1, got 0".to_owned());
    }
    let mut state = STATE.lock().unwrap_or_else(PoisonError::into_inner);
    if state.threads != threads {
        state.threads = threads;
        state.pool = None;
    }
    Ok(())
}

/// The pool for the current thread count, built on first use.
pub fn pool() -> Result<Arc<ThreadPool>, String> {
    let mut state = STATE.lock().unwrap_or_else(PoisonError::into_inner);
    let threads = resolved_threads(&mut state);
    if let Some(pool) = &state.pool {
        return Ok(Arc::clone(pool));
    }
    let pool = ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("fusedae-{i}"))
        .build()
        .map_err(|e| format!("could not start {threads} fusedae threads: {e}"))?;
    let pool = Arc::new(pool);
    state.pool = Some(Arc::clone(&pool));
    Ok(pool)
}
