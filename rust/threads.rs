//! fusedae's threads: batch rows are split across a private pool, never another library's by
//! default, so `set_num_threads` affects only fusedae; in a process whose PyTorch runs its ops
//! on an OpenMP runtime, the front end hands fusedae's jobs to that runtime's threads instead
//! ([`share_openmp_threads`]), still `set_num_threads` of them.
//!
//! The calling thread works too, and the pool's threads keep spinning for a short while after a
//! job before they sleep. Waking a sleeping thread takes 20-60 us on a virtual machine (the
//! other vCPU is halted), a quarter to a half of a 4096-row call of a small model on two threads;
//! calls that follow one another (encoding a dataset, serving requests) then find the threads
//! awake. ONNX Runtime and OpenMP runtimes spin between parallel regions for the same reason,
//! which is why a training step shares PyTorch's: its OpenMP threads spin after each of its ops
//! (the loss, the optimizer), and the pool's threads, woken for the fused call in between, found
//! their cores taken (the seed AE's step at 4,096 rows on 2 threads took 20.4 ms through the
//! pool, 17.5 ms plain, Zen 4).

use std::ffi::{c_int, c_uint, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{
    Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, TryLockError,
};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle pool thread spins, waiting for the next job, before it sleeps.
const SPIN_BEFORE_SLEEP: Duration = Duration::from_millis(2);
/// Spin-loop rounds between two checks of the clock (and yields to other runnable threads).
const SPINS_PER_CHECK: u32 = 256;

/// One parallel call: `tasks` indices handed out one at a time to whoever is free.
struct Job<'a> {
    task: &'a (dyn Fn(usize) + Sync),
    tasks: usize,
    next: AtomicUsize,
    /// What the first task that panicked said.
    panic: Mutex<Option<String>>,
}

impl<'a> Job<'a> {
    fn new(task: &'a (dyn Fn(usize) + Sync), tasks: usize) -> Job<'a> {
        Job {
            task,
            tasks,
            next: AtomicUsize::new(0),
            panic: Mutex::new(None),
        }
    }

    /// Runs tasks until none is left. A panicking task is recorded, never propagated: this
    /// never unwinds, so every thread reports that it left the job.
    fn work(&self) {
        loop {
            let index = self.next.fetch_add(1, Ordering::Relaxed);
            if index >= self.tasks {
                return;
            }
            if let Err(message) = run_caught(|| (self.task)(index)) {
                let mut panic = self.panic.lock().unwrap_or_else(PoisonError::into_inner);
                panic.get_or_insert(message);
            }
        }
    }

    /// The job's outcome once every thread has left it: an error if a task panicked.
    fn finish(&self) -> Result<(), String> {
        match self
            .panic
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            Some(message) => Err(message),
            None => Ok(()),
        }
    }
}

/// Runs `work`, turning a panic into an error that quotes it (a bug in fusedae, reported as an
/// error rather than unwinding into the caller: Python sees a RuntimeError). The payload is
/// leaked, never dropped, as its own `drop` could panic again.
pub fn run_caught(work: impl FnOnce()) -> Result<(), String> {
    catch_unwind(AssertUnwindSafe(work)).map_err(|payload| {
        let said = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".to_owned());
        std::mem::forget(payload);
        format!("a fusedae kernel task panicked (a bug, please report it): {said}")
    })
}

/// `mutex` locked if no one holds it (poisoned or not: what it guards stays consistent, as
/// nothing panics while holding these locks), else None.
fn lock_if_free<T>(mutex: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
    match mutex.try_lock() {
        Ok(guard) => Some(guard),
        Err(TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
        Err(TryLockError::WouldBlock) => None,
    }
}

/// What the caller and the pool threads share.
#[derive(Debug)]
struct Shared {
    /// The job being run, or null. Type-erased: see `Pool::run` for why it outlives every use.
    job: AtomicPtr<Job<'static>>,
    /// Pool threads inside a job (between taking `job` and finishing their tasks).
    busy: AtomicUsize,
    /// Bumped for every job, so a spinning thread sees new work without reading `job` in a loop.
    generation: AtomicUsize,
    sleepers: AtomicUsize,
    shutdown: AtomicBool,
    sleep_lock: Mutex<()>,
    wake: Condvar,
}

impl Shared {
    fn worker(&self) {
        let mut seen = self.generation.load(Ordering::SeqCst);
        while self.wait_for_job(seen) {
            seen = self.generation.load(Ordering::SeqCst);
            // Announce before reading `job`: the caller retires the job and then waits until
            // `busy` is 0, so either this thread sees null here or the caller waits for it.
            self.busy.fetch_add(1, Ordering::SeqCst);
            let job = self.job.load(Ordering::SeqCst);
            // SAFETY: a non-null `job` points to the caller's `Job`, which stays alive until
            // `busy` drops to 0 after the caller reset `job` to null (see `Retire`).
            if let Some(job) = unsafe { job.as_ref() } {
                job.work(); // never unwinds
            }
            self.busy.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Spins, then sleeps, until the generation moves on from `seen`; false on shutdown.
    fn wait_for_job(&self, seen: usize) -> bool {
        let start = Instant::now();
        loop {
            for _ in 0..SPINS_PER_CHECK {
                if self.generation.load(Ordering::SeqCst) != seen {
                    return true;
                }
                std::hint::spin_loop();
            }
            if self.shutdown.load(Ordering::SeqCst) {
                return false;
            }
            if start.elapsed() >= SPIN_BEFORE_SLEEP {
                break;
            }
            std::thread::yield_now();
        }
        let mut guard = self
            .sleep_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.sleepers.fetch_add(1, Ordering::SeqCst);
        while self.generation.load(Ordering::SeqCst) == seen
            && !self.shutdown.load(Ordering::SeqCst)
        {
            guard = self
                .wake
                .wait(guard)
                .unwrap_or_else(PoisonError::into_inner);
        }
        self.sleepers.fetch_sub(1, Ordering::SeqCst);
        !self.shutdown.load(Ordering::SeqCst)
    }

    fn wake_sleepers(&self) {
        // A thread registers as a sleeper under the lock and checks the generation after, so
        // with the generation bumped first no thread can fall asleep on a job unnoticed.
        if self.sleepers.load(Ordering::SeqCst) > 0 {
            let _guard = self
                .sleep_lock
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            self.wake.notify_all();
        }
    }
}

/// A fixed set of threads that, with the calling thread, run the tasks of one job at a time.
#[derive(Debug)]
struct Pool {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    /// Held by the caller whose job the pool runs.
    submit: Mutex<()>,
}

impl Pool {
    /// A pool in which `threads` threads work on each job: the caller and `threads - 1` more.
    fn new(threads: usize) -> Result<Pool, String> {
        let shared = Arc::new(Shared {
            job: AtomicPtr::new(ptr::null_mut()),
            busy: AtomicUsize::new(0),
            generation: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
            sleep_lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let mut pool = Pool {
            shared,
            threads: Vec::with_capacity(threads.saturating_sub(1)),
            submit: Mutex::new(()),
        };
        for index in 1..threads {
            let shared = Arc::clone(&pool.shared);
            let handle = std::thread::Builder::new()
                .name(format!("fusedae-{index}"))
                .spawn(move || shared.worker())
                .map_err(|e| format!("could not start {threads} fusedae threads: {e}"))?;
            pool.threads.push(handle);
        }
        Ok(pool)
    }

    /// Threads working on a job, the caller included.
    fn threads(&self) -> usize {
        self.threads.len() + 1
    }

    /// Runs `task(i)` for every `i` in `0..tasks`, spread over the pool and the calling thread,
    /// and returns when all have run. If another caller holds the pool, this one runs its tasks
    /// alone rather than wait. An error if a task panicked.
    fn run(&self, tasks: usize, task: &(dyn Fn(usize) + Sync)) -> Result<(), String> {
        let job = Job::new(task, tasks);
        let Some(submit) = lock_if_free(&self.submit) else {
            job.work();
            return job.finish();
        };
        let erased = ptr::from_ref(&job).cast::<Job<'static>>().cast_mut();
        self.shared.job.store(erased, Ordering::SeqCst);
        // Declared after `job`, so dropped before it, on return or unwinding alike.
        let retire = Retire(&self.shared);
        self.shared.generation.fetch_add(1, Ordering::SeqCst);
        self.shared.wake_sleepers();
        job.work();
        drop(retire);
        drop(submit);
        job.finish()
    }
}

/// Retires the published job when dropped: resets `job` to null, then waits for every thread
/// that may have taken it. After that no thread holds or can take a pointer to the job.
struct Retire<'a>(&'a Shared);

impl Drop for Retire<'_> {
    fn drop(&mut self) {
        self.0.job.store(ptr::null_mut(), Ordering::SeqCst);
        let mut spins = 0u32;
        while self.0.busy.load(Ordering::SeqCst) != 0 {
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(SPINS_PER_CHECK) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        {
            let _guard = self
                .shared
                .sleep_lock
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            self.shared.wake.notify_all();
        }
        for handle in self.threads.drain(..) {
            let _ = handle.join();
        }
    }
}

/// Most threads `set_num_threads` accepts: far beyond any CPU this runs on, low enough that a
/// typo cannot start a million threads.
pub const MAX_THREADS: usize = 1024;

/// Threads a large batch is split across; 0 until first asked (or set).
static THREADS: AtomicUsize = AtomicUsize::new(0);

/// Where `THREADS` came from, for `fusedae.info()`.
static THREADS_SOURCE: Mutex<String> = Mutex::new(String::new());

/// The pool, with the process that started its threads: a child forked from that process has
/// none of them. Only ever locked briefly (never while a job runs or threads are joined), and
/// only with `try_lock` on the calling path, so a child forked while another thread held it
/// runs its calls on one thread rather than hang.
static POOL: Mutex<Option<(Arc<Pool>, u32)>> = Mutex::new(None);

/// Threads a large batch is split across. Resolved at first use, not when the module loads:
/// engines set the variables below when a task starts (Ray sets `OMP_NUM_THREADS` to a worker's
/// CPUs, Dask's nanny to 1, Spark to `spark.task.cpus`), in a process that may have imported
/// fusedae long before.
pub fn num_threads() -> usize {
    match THREADS.load(Ordering::Relaxed) {
        0 => {
            // Asked once: finding the CPU quota reads cgroup files, far slower than a small batch.
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            let variable = |name| std::env::var(name).ok();
            let (threads, source) = resolve_threads(
                variable("FUSEDAE_NUM_THREADS"),
                variable("OMP_NUM_THREADS"),
                variable("OMP_THREAD_LIMIT"),
                cpus,
            );
            let mut source_slot = THREADS_SOURCE
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            match THREADS.compare_exchange(0, threads, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => {
                    *source_slot = source;
                    threads
                }
                Err(set_meanwhile) => set_meanwhile,
            }
        }
        threads => threads,
    }
}

/// Where the thread count came from: `set_num_threads`, one of the variables (with its value),
/// or the CPUs this process may use; a variable that was set but ignored is named with why.
pub fn threads_source() -> String {
    num_threads();
    THREADS_SOURCE
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
}

/// The thread count, and where it came from, from `FUSEDAE_NUM_THREADS`, else
/// `OMP_NUM_THREADS` (its first item: OpenMP's value may list one count per nesting level),
/// else `cpus` (the CPUs this process may use: its affinity mask and cgroup quota); at most
/// `OMP_THREAD_LIMIT` (`limit`), as the OpenMP runtime caps PyTorch's threads and fusedae's calls
/// on them (a job limited to one thread ran two on fusedae's pool).
fn resolve_threads(
    fusedae: Option<String>,
    omp: Option<String>,
    limit: Option<String>,
    cpus: usize,
) -> (usize, String) {
    let mut ignored = Vec::new();
    let mut count = |name: &str, value: Option<String>| {
        let value = value.filter(|value| !value.trim().is_empty())?;
        let first = value.split(',').next().unwrap_or_default().trim();
        match first.parse::<usize>() {
            Ok(threads) if (1..=MAX_THREADS).contains(&threads) => {
                Some((threads, format!("{name}={value}")))
            }
            _ => {
                ignored.push(format!(
                    "{name}={value:?} ignored: not a count from 1 to {MAX_THREADS}"
                ));
                None
            }
        }
    };
    let chosen = count("FUSEDAE_NUM_THREADS", fusedae).or_else(|| count("OMP_NUM_THREADS", omp));
    let (mut threads, mut source) = chosen.unwrap_or_else(|| {
        let source = "the CPUs this process may use".to_string();
        (cpus.clamp(1, MAX_THREADS), source)
    });
    // One count, as OpenMP reads it (no list); one above `MAX_THREADS` limits nothing here.
    if let Some(value) = limit.filter(|value| !value.trim().is_empty()) {
        match value.trim().parse::<usize>() {
            Ok(limit) if limit >= 1 => {
                if limit < threads {
                    threads = limit;
                    source = format!("{source}, capped by OMP_THREAD_LIMIT={limit}");
                }
            }
            _ => ignored.push(format!(
                "OMP_THREAD_LIMIT={value:?} ignored: not a count of 1 or more"
            )),
        }
    }
    if ignored.is_empty() {
        (threads, source)
    } else {
        (threads, format!("{source} ({})", ignored.join("; ")))
    }
}

/// Sets the thread count for later calls; calls already running keep their pool.
pub fn set_num_threads(threads: usize) -> Result<(), String> {
    if !(1..=MAX_THREADS).contains(&threads) {
        return Err(format!(
            "the number of threads must be between 1 and {MAX_THREADS}, got {threads}"
        ));
    }
    let mut source = THREADS_SOURCE
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    THREADS.store(threads, Ordering::Relaxed);
    *source = "set_num_threads".to_string();
    Ok(())
}

/// Runs `task(i)` for every `i` in `0..tasks` on `threads` threads, the caller included (the
/// pool's, or those of the OpenMP runtime shared with [`share_openmp_threads`]), and returns when
/// all have run. An error if the pool could not start or a task panicked.
pub fn run(threads: usize, tasks: usize, task: &(dyn Fn(usize) + Sync)) -> Result<(), String> {
    if threads <= 1 || tasks <= 1 {
        return run_caught(|| (0..tasks).for_each(task));
    }
    if let Some(parallel) = shared_openmp() {
        // One job at a time on the shared threads, as on the pool: a caller that finds them
        // taken runs its tasks alone.
        return match lock_if_free(&OPENMP_SUBMIT) {
            Some(_running) => run_on_openmp(parallel, threads.min(tasks), tasks, task),
            None => run_caught(|| (0..tasks).for_each(task)),
        };
    }
    match current_pool(threads)? {
        Some(pool) => pool.run(tasks, task),
        None => run_caught(|| (0..tasks).for_each(task)),
    }
}

/// `GOMP_parallel(function, data, threads, flags)`: runs `function(data)` on a team of
/// `threads` threads, the caller among them, and returns once every one has returned. GNU
/// libgomp's entry point for `#pragma omp parallel`, which LLVM's and Intel's runtimes export
/// too.
type GompParallel = unsafe extern "C" fn(extern "C" fn(*mut c_void), *mut c_void, c_uint, c_uint);

/// `omp_get_max_threads()`: the calling thread's team size for its next parallel region, which
/// PyTorch's `set_num_threads` sets (1 in a `DataLoader` worker).
type OmpGetMaxThreads = unsafe extern "C" fn() -> c_int;

/// The OpenMP runtime whose threads run the jobs ([`share_openmp_threads`]).
#[derive(Clone, Copy)]
struct SharedOpenMp {
    parallel: GompParallel,
    max_threads: Option<OmpGetMaxThreads>,
    /// The process that found it: its threads do not survive `fork`, so a child uses the pool
    /// (whose threads it starts afresh).
    process: u32,
    /// The thread that shared it ([`thread_token`]), the only one whose jobs go to the team:
    /// the runtime keeps a team of threads for each thread that starts one, so sixteen Python
    /// threads calling in turn would have kept sixteen teams.
    thread: u64,
}

impl SharedOpenMp {
    /// Whether the calling thread, in this process, shared it.
    fn shared_by_this_thread(&self) -> bool {
        self.process == std::process::id() && self.thread == thread_token()
    }

    /// Whether a job of the calling thread goes to the team: in the process and from the thread
    /// that shared it, while the runtime would run that thread's parallel regions on more than
    /// one thread. At one (PyTorch's `set_num_threads(1)`, as in a `DataLoader` worker) the
    /// team's threads are not running PyTorch's ops, so they are not in the pool's way; and in
    /// a process forked from one whose team had started, the team's threads are gone but the
    /// runtime still counts them: a parallel region there never ends.
    fn runs_this_thread(&self) -> bool {
        self.shared_by_this_thread()
            // SAFETY: the runtime's `omp_get_max_threads`, found beside its `GOMP_parallel`.
            && self.max_threads.is_none_or(|max_threads| unsafe { max_threads() } > 1)
    }
}

/// A number that tells the calling thread from every other thread of the process.
fn thread_token() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    thread_local! {
        static TOKEN: u64 = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    TOKEN.with(|token| *token)
}

/// The runtime shared, with its name for `threads_runtime`; None: the private pool. Read far
/// more often than written (every threaded call, every training call's gate), so a read lock.
static OPENMP: RwLock<Option<(SharedOpenMp, String)>> = RwLock::new(None);
/// Held by the caller whose job the shared runtime's threads run.
static OPENMP_SUBMIT: Mutex<()> = Mutex::new(());

/// The shared runtime and its name, read if no thread is changing it (`try_read`, as
/// [`lock_if_free`]: a forked child must not wait on a lock a parent thread held); None while
/// one is.
fn read_if_free() -> Option<RwLockReadGuard<'static, Option<(SharedOpenMp, String)>>> {
    match OPENMP.try_read() {
        Ok(slot) => Some(slot),
        Err(TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
        Err(TryLockError::WouldBlock) => None,
    }
}

/// The shared runtime's `GOMP_parallel`, if it runs the calling thread's jobs
/// ([`SharedOpenMp::runs_this_thread`]).
fn shared_openmp() -> Option<GompParallel> {
    let slot = read_if_free()?;
    slot.as_ref()
        .map(|(openmp, _)| openmp)
        .filter(|openmp| openmp.runs_this_thread())
        .map(|openmp| openmp.parallel)
}

/// [`run`] on an OpenMP team of `threads`: each member takes tasks as the pool's threads do.
fn run_on_openmp(
    parallel: GompParallel,
    threads: usize,
    tasks: usize,
    task: &(dyn Fn(usize) + Sync),
) -> Result<(), String> {
    extern "C" fn work(job: *mut c_void) {
        // SAFETY: `job` is the `Job` below, alive until `GOMP_parallel` returns, which is after
        // every member of the team has returned from here.
        unsafe { &*job.cast::<Job<'static>>() }.work(); // never unwinds
    }
    let job = Job::new(task, tasks);
    let erased = ptr::from_ref(&job).cast::<Job<'static>>().cast_mut();
    let threads = c_uint::try_from(threads).unwrap_or(c_uint::MAX);
    // SAFETY: the runtime's `GOMP_parallel` (found by name in a loaded OpenMP runtime), called
    // as its contract says; `work` unwinds into no foreign frame.
    unsafe { parallel(work, erased.cast(), threads, 0) };
    job.finish()
}

/// Hands the calling thread's jobs to the OpenMP runtime `library` (a path, or a loaded
/// library's name) from now on, in this process (see [`SharedOpenMp::runs_this_thread`]);
/// false, and nothing changes, if no library of that name is loaded or it has no
/// `GOMP_parallel`. Only a runtime the process has loaded already is taken (PyTorch's), never
/// one loaded for the purpose: two OpenMP runtimes would each keep a team.
pub fn share_openmp_threads(library: &str) -> bool {
    let Some((parallel, max_threads)) = loaded_openmp(library) else {
        return false;
    };
    let openmp = SharedOpenMp {
        parallel,
        max_threads,
        process: std::process::id(),
        thread: thread_token(),
    };
    *OPENMP.write().unwrap_or_else(PoisonError::into_inner) = Some((openmp, library.to_owned()));
    true
}

/// `library`'s `GOMP_parallel` and `omp_get_max_threads` (if it has one), if it is loaded.
#[cfg(unix)]
fn loaded_openmp(library: &str) -> Option<(GompParallel, Option<OmpGetMaxThreads>)> {
    if library.is_empty() {
        return None; // `dlopen` would read it as the program itself, and all it loaded
    }
    let name = std::ffi::CString::new(library).ok()?;
    // SAFETY: `dlopen` with `RTLD_NOLOAD` returns a loaded library (with a reference that
    // keeps it loaded: never closed) or null, and loads nothing; `dlsym` reads its symbols.
    let (parallel, max_threads) = unsafe {
        let handle = libc::dlopen(name.as_ptr(), libc::RTLD_LAZY | libc::RTLD_NOLOAD);
        if handle.is_null() {
            return None;
        }
        (
            libc::dlsym(handle, c"GOMP_parallel".as_ptr()),
            libc::dlsym(handle, c"omp_get_max_threads".as_ptr()),
        )
    };
    if parallel.is_null() {
        return None;
    }
    // SAFETY: non-null, these symbols are those functions, of these signatures in every
    // runtime that exports them.
    unsafe {
        Some((
            std::mem::transmute::<*mut c_void, GompParallel>(parallel),
            (!max_threads.is_null())
                .then(|| std::mem::transmute::<*mut c_void, OmpGetMaxThreads>(max_threads)),
        ))
    }
}

#[cfg(not(unix))]
fn loaded_openmp(_library: &str) -> Option<(GompParallel, Option<OmpGetMaxThreads>)> {
    None
}

/// Goes back to the private pool for fusedae's jobs.
pub fn use_own_threads() {
    *OPENMP.write().unwrap_or_else(PoisonError::into_inner) = None;
}

/// The threads the calling thread's jobs are handed to: `"openmp:"` and the shared runtime's
/// name where this process and thread shared it (while that runtime would run this thread's
/// parallel regions on one thread, the pool runs them: [`SharedOpenMp::runs_this_thread`]),
/// else `"fusedae"` (the private pool; also while another thread changes it: [`read_if_free`]).
pub fn threads_runtime() -> String {
    match read_if_free().as_deref() {
        Some(Some((openmp, library))) if openmp.shared_by_this_thread() => {
            format!("openmp:{library}")
        }
        _ => "fusedae".to_owned(),
    }
}

/// Runs `task(accumulator, i)` for every `i` in `0..tasks` on `threads` threads and returns one
/// accumulator per share of the tasks, in order, for the caller to reduce: share `s` starts
/// from `init()` and runs a contiguous range of tasks, in order. Which tasks go into which
/// accumulator depends only on `tasks` and `threads`, so a reduction in the order returned gives
/// the same bits on every call with the same thread count (weight gradients summed over row
/// blocks, say).
pub fn run_reduce<A: Send>(
    threads: usize,
    tasks: usize,
    init: &(dyn Fn() -> A + Sync),
    task: &(dyn Fn(&mut A, usize) + Sync),
) -> Result<Vec<A>, String> {
    let shares = threads.clamp(1, tasks.max(1));
    let accumulators: Vec<Mutex<Option<A>>> = (0..shares).map(|_| Mutex::new(None)).collect();
    run(threads, shares, &|share| {
        let mut accumulator = init();
        for index in tasks * share / shares..tasks * (share + 1) / shares {
            task(&mut accumulator, index);
        }
        *accumulators[share]
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(accumulator);
    })?;
    Ok(accumulators
        .into_iter()
        .map(|slot| {
            slot.into_inner()
                .unwrap_or_else(PoisonError::into_inner)
                .expect("every share ran")
        })
        .collect())
}

/// The pool of `threads` threads for this process, started if need be; None if the slot is
/// locked by another thread (for an instant) or, in a forked child, by one that no longer
/// exists.
fn current_pool(threads: usize) -> Result<Option<Arc<Pool>>, String> {
    let process = std::process::id();
    let Some(mut slot) = lock_if_free(&POOL) else {
        return Ok(None);
    };
    if let Some((pool, owner)) = slot.as_ref() {
        if *owner == process && pool.threads() == threads {
            return Ok(Some(Arc::clone(pool)));
        }
    }
    let fresh = Arc::new(Pool::new(threads)?);
    let stale = slot.replace((Arc::clone(&fresh), process));
    drop(slot);
    if let Some((pool, owner)) = stale {
        if owner == process {
            drop(pool); // joins its threads once calls still running on it are done
        } else {
            // Inherited through fork: its threads exist only in the parent, so it can be
            // neither used nor dropped (dropping joins them).
            std::mem::forget(pool);
        }
    }
    Ok(Some(fresh))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_with_callers_racing_for_the_pool() {
        let pool = Arc::new(Pool::new(3).unwrap());
        let callers: Vec<_> = (0..4)
            .map(|_| {
                let pool = Arc::clone(&pool);
                std::thread::spawn(move || {
                    for tasks in [0, 1, 2, 7, 64] {
                        let counts: Vec<AtomicUsize> =
                            (0..tasks).map(|_| AtomicUsize::new(0)).collect();
                        pool.run(tasks, &|i| {
                            counts[i].fetch_add(1, Ordering::Relaxed);
                        })
                        .unwrap();
                        assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 1));
                    }
                })
            })
            .collect();
        for caller in callers {
            caller.join().unwrap();
        }
    }

    #[test]
    fn sleeping_threads_wake_for_the_next_job() {
        let pool = Pool::new(2).unwrap();
        std::thread::sleep(SPIN_BEFORE_SLEEP * 3);
        let ran_elsewhere = AtomicBool::new(false);
        let caller = std::thread::current().id();
        // Enough slow tasks that the woken thread takes some of them.
        pool.run(20, &|_| {
            std::thread::sleep(Duration::from_millis(2));
            if std::thread::current().id() != caller {
                ran_elsewhere.store(true, Ordering::Relaxed);
            }
        })
        .unwrap();
        assert!(ran_elsewhere.load(Ordering::Relaxed));
    }

    #[test]
    fn a_panicking_task_is_reported_after_every_thread_left_the_job() {
        struct PanicsWhenDropped;
        impl Drop for PanicsWhenDropped {
            fn drop(&mut self) {
                panic!("a payload that panics again when dropped");
            }
        }
        let pool = Pool::new(2).unwrap();
        let outcome = pool.run(8, &|i| {
            if i == 5 {
                std::panic::panic_any(PanicsWhenDropped);
            }
            if i == 6 {
                panic!("task {i} failed");
            }
        });
        assert!(outcome.unwrap_err().contains("panicked"));
        assert_eq!(pool.shared.busy.load(Ordering::SeqCst), 0);
        assert!(pool.shared.job.load(Ordering::SeqCst).is_null());
        let ran = AtomicUsize::new(0);
        pool.run(4, &|_| {
            ran.fetch_add(1, Ordering::Relaxed);
        })
        .unwrap();
        assert_eq!(ran.load(Ordering::Relaxed), 4);
    }

    /// Threads the last `team_parallel` call was asked for.
    static TEAM_ASKED: AtomicUsize = AtomicUsize::new(0);

    /// `GOMP_parallel` as an OpenMP runtime keeps it: `function(data)` on the caller and
    /// `threads - 1` more threads, returning once all have.
    unsafe extern "C" fn team_parallel(
        function: extern "C" fn(*mut c_void),
        data: *mut c_void,
        threads: c_uint,
        _flags: c_uint,
    ) {
        TEAM_ASKED.store(threads as usize, Ordering::SeqCst);
        let data = data as usize; // a raw pointer is not `Send`
        std::thread::scope(|scope| {
            for _ in 1..threads {
                scope.spawn(move || function(data as *mut c_void));
            }
            function(data as *mut c_void);
        });
    }

    #[test]
    fn an_openmp_team_runs_every_task_once_and_reports_a_panic() {
        let runs: Vec<AtomicUsize> = (0..100).map(|_| AtomicUsize::new(0)).collect();
        run_on_openmp(team_parallel, 4, runs.len(), &|i| {
            runs[i].fetch_add(1, Ordering::Relaxed);
        })
        .unwrap();
        assert_eq!(TEAM_ASKED.load(Ordering::SeqCst), 4);
        assert!(runs.iter().all(|count| count.load(Ordering::Relaxed) == 1));
        let error = run_on_openmp(team_parallel, 3, 10, &|i| {
            assert!(i != 7, "task {i} failed")
        })
        .unwrap_err();
        assert!(error.contains("task 7 failed"), "{error}");
    }

    /// Teams `counting_parallel` started, and what `stand_in_max_threads` says.
    static TEAMS_STARTED: AtomicUsize = AtomicUsize::new(0);
    static STAND_IN_MAX_THREADS: AtomicUsize = AtomicUsize::new(2);

    unsafe extern "C" fn counting_parallel(
        function: extern "C" fn(*mut c_void),
        data: *mut c_void,
        threads: c_uint,
        flags: c_uint,
    ) {
        TEAMS_STARTED.fetch_add(1, Ordering::SeqCst);
        // SAFETY: forwarded.
        unsafe { team_parallel(function, data, threads, flags) }
    }

    unsafe extern "C" fn stand_in_max_threads() -> c_int {
        STAND_IN_MAX_THREADS.load(Ordering::SeqCst) as c_int
    }

    #[test]
    fn only_the_sharing_thread_runs_on_the_team_while_it_runs_more_than_one_thread() {
        let stand_in = SharedOpenMp {
            parallel: counting_parallel,
            max_threads: Some(stand_in_max_threads),
            process: std::process::id(),
            thread: thread_token(),
        };
        *OPENMP.write().unwrap() = Some((stand_in, "stand-in".to_owned()));
        let run_all = || {
            let ran: Vec<AtomicUsize> = (0..8).map(|_| AtomicUsize::new(0)).collect();
            run(2, ran.len(), &|i| {
                ran[i].fetch_add(1, Ordering::Relaxed);
            })
            .unwrap();
            assert!(ran.iter().all(|count| count.load(Ordering::Relaxed) == 1));
        };
        run_all();
        assert_eq!(TEAMS_STARTED.load(Ordering::SeqCst), 1);
        assert_eq!(threads_runtime(), "openmp:stand-in");
        // Another thread's jobs go to the pool: the runtime would keep a team for it.
        std::thread::scope(|scope| {
            scope.spawn(|| {
                run_all();
                assert_eq!(threads_runtime(), "fusedae");
            });
        });
        assert_eq!(TEAMS_STARTED.load(Ordering::SeqCst), 1);
        // The runtime at one thread for this one (PyTorch's `set_num_threads(1)`): the pool.
        STAND_IN_MAX_THREADS.store(1, Ordering::SeqCst);
        run_all();
        assert_eq!(TEAMS_STARTED.load(Ordering::SeqCst), 1);
        use_own_threads();
        assert_eq!(threads_runtime(), "fusedae");
    }

    #[test]
    fn an_openmp_runtime_not_loaded_is_not_taken() {
        assert!(!share_openmp_threads("libfusedae-no-such-runtime.so.1"));
        assert!(!share_openmp_threads("nul\0in the name"));
        assert!(!share_openmp_threads(""));
        assert_eq!(threads_runtime(), "fusedae");
    }

    #[test]
    fn a_panic_on_the_calling_thread_is_an_error_that_quotes_it() {
        let error = run(1, 3, &|i| assert!(i < 2, "index {i} too large")).unwrap_err();
        assert!(error.contains("index 2 too large"), "{error}");
    }

    #[test]
    fn the_thread_count_comes_from_the_first_source_that_gives_one() {
        let some = |text: &str| Some(text.to_string());
        let cpus = "the CPUs this process may use";
        let bad = |name: &str, value: &str| {
            format!("{name}={value:?} ignored: not a count from 1 to 1024")
        };
        let cases = [
            (some("3"), some("2"), 3, "FUSEDAE_NUM_THREADS=3".to_string()),
            (None, some("2"), 2, "OMP_NUM_THREADS=2".to_string()),
            (None, some("4,2"), 4, "OMP_NUM_THREADS=4,2".to_string()),
            (some(" "), some(""), 6, cpus.to_string()),
            (None, None, 6, cpus.to_string()),
            (
                some("0"),
                some("2"),
                2,
                format!("OMP_NUM_THREADS=2 ({})", bad("FUSEDAE_NUM_THREADS", "0")),
            ),
            (
                some("many"),
                some("-1"),
                6,
                format!(
                    "{cpus} ({}; {})",
                    bad("FUSEDAE_NUM_THREADS", "many"),
                    bad("OMP_NUM_THREADS", "-1")
                ),
            ),
            (
                some("5000"),
                None,
                6,
                format!("{cpus} ({})", bad("FUSEDAE_NUM_THREADS", "5000")),
            ),
        ];
        for (fusedae, omp, threads, source) in cases {
            assert_eq!(resolve_threads(fusedae, omp, None, 6), (threads, source));
        }
        assert_eq!(resolve_threads(None, None, None, 4096).0, MAX_THREADS);
        // OMP_THREAD_LIMIT caps whatever the count came from; a limit above it changes nothing.
        let limited = [
            (
                some("3"),
                some("1"),
                1,
                "FUSEDAE_NUM_THREADS=3, capped by OMP_THREAD_LIMIT=1",
            ),
            (None, some("4"), 4, cpus),
            (None, some("4096"), 4, cpus),
            (
                None,
                some(" 2 "),
                2,
                "the CPUs this process may use, capped by OMP_THREAD_LIMIT=2",
            ),
        ];
        for (fusedae, limit, threads, source) in limited {
            assert_eq!(
                resolve_threads(fusedae, None, limit, 4),
                (threads, source.to_string())
            );
        }
        for limit in ["0", "2,1"] {
            assert_eq!(
                resolve_threads(None, None, some(limit), 4),
                (
                    4,
                    format!(
                        "{cpus} (OMP_THREAD_LIMIT={limit:?} ignored: not a count of 1 or more)"
                    )
                )
            );
        }
    }

    #[test]
    fn run_reduce_gives_the_same_shares_on_every_call() {
        for (threads, tasks) in [(1, 0), (1, 5), (2, 1), (2, 9), (3, 64), (5, 3)] {
            let sums = |_: ()| {
                run_reduce(threads, tasks, &Vec::new, &|seen: &mut Vec<usize>, i| {
                    seen.push(i)
                })
                .unwrap()
            };
            let first = sums(());
            assert_eq!(first.len(), threads.min(tasks).max(1));
            assert_eq!(first.concat(), (0..tasks).collect::<Vec<_>>());
            for _ in 0..5 {
                assert_eq!(sums(()), first, "{threads} threads, {tasks} tasks");
            }
        }
    }
}
