//! The safe API: a chain of Linear layers packed once, run on row-major slices. Shapes are
//! checked here; threads split the batch into contiguous row chunks, each running the whole chain.

use std::cell::RefCell;
use std::fmt;
use std::sync::{Mutex, PoisonError};

use bytemuck::Zeroable;

pub use crate::dispatch::DType;
use crate::dispatch::{Bf16Form, Float, Isa, IsaError, Weights, PAIRS_MAX_ROWS};
use crate::kernels::{
    backward_scratch_len, gradient_layout, saved_columns, saved_width, scratch_len, BackwardInputs,
    Bf16, Element, Kernel, SavedColumns, LINE_BYTES,
};
pub use crate::pack::LayerSpec;
use crate::pack::{AlignedBuf, CacheLine, PackedChain, PanelTranspose, Storage};
use crate::threads;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    /// A shape is wrong; the message names what was expected and what was given.
    Shape(String),
    Isa(IsaError),
    /// The thread pool could not start, or a task panicked (a bug in fusedae).
    Threads(String),
    /// What was asked of the chain needs another precision than it was packed at.
    Precision(String),
    /// A call's working memory could not be allocated.
    Memory(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Shape(message)
            | Error::Threads(message)
            | Error::Precision(message)
            | Error::Memory(message) => f.write_str(message),
            Error::Isa(error) => error.fmt(f),
        }
    }
}

impl std::error::Error for Error {}

impl From<IsaError> for Error {
    fn from(error: IsaError) -> Self {
        Error::Isa(error)
    }
}

fn shape_error<T>(message: String) -> Result<T, Error> {
    Err(Error::Shape(message))
}

/// Below this much work (about 10 us on one core) a call stays on the calling thread: handing
/// out chunks costs more than it saves. Above it, 16 rows of the 784-42-16 encoder already run
/// 1.8x faster on two threads than on one (the pool's threads spin between calls).
const SMALL_CALL_FLOPS: usize = 1_000_000;

/// Largest scratch buffer a thread keeps between calls.
const SCRATCH_KEEP_BYTES: usize = 8 << 20;
/// Row chunks per thread, so a thread slowed by a noisy neighbour does not hold up the call.
/// Handing out a chunk costs an atomic add, so they can be small: at 4096 rows on 2 threads, 8
/// per thread ran the digits encoder 3% faster than 4 (the last chunk is shorter, and balances
/// better when small); the 784-wide models were unchanged.
const CHUNKS_PER_THREAD: usize = 8;

/// What a chain is, whatever its element type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChainInfo {
    pub dtype: DType,
    /// The precision the chain computes at: its weights' ([`Weights::PRECISION`]), or "bf16"
    /// for f32 weights rounded to bf16 ([`Mlp::rounded_to_bf16`]).
    pub precision: &'static str,
    /// Whether it may keep activations and run a backward (only at its dtype's own precision).
    pub trains: bool,
    pub isa: Isa,
    pub in_features: usize,
    pub out_features: usize,
    /// Floating-point operations per input row (2 per multiply-add).
    pub flops_per_row: usize,
    /// Outputs of every layer but the last, per row (see [`Mlp::forward_saving`]).
    pub saved_width: usize,
}

/// A chain of any element type: the one place the type is matched on (the Python binding holds
/// one and dispatches each call from it).
#[derive(Debug)]
pub enum AnyMlp {
    F32(Mlp<f32>),
    F64(Mlp<f64>),
    Bf16(Mlp<f32, Bf16>),
    Int8(Mlp<f32, i8>),
}

impl AnyMlp {
    pub fn info(&self) -> &ChainInfo {
        match self {
            AnyMlp::F32(mlp) => &mlp.info,
            AnyMlp::F64(mlp) => &mlp.info,
            AnyMlp::Bf16(mlp) => &mlp.info,
            AnyMlp::Int8(mlp) => &mlp.info,
        }
    }

    /// See [`Mlp::saved_columns`].
    pub fn saved_columns(&self) -> Vec<SavedColumns> {
        match self {
            AnyMlp::F32(mlp) => mlp.saved_columns(),
            AnyMlp::F64(mlp) => mlp.saved_columns(),
            AnyMlp::Bf16(mlp) => mlp.saved_columns(),
            AnyMlp::Int8(mlp) => mlp.saved_columns(),
        }
    }
}

/// A chain of Linear layers packed for one ISA, computing in `T` (its inputs and outputs too)
/// with its weights stored as `W`.
#[derive(Debug)]
pub struct Mlp<T: Float, W: Weights<T> = T> {
    info: ChainInfo,
    kernel: Kernel<W, T>,
    packed: PackedChain<W, T>,
    /// Every layer's weight as given (`out x in` row-major), one after another: the backward's
    /// panels for the inputs' gradients. Empty in a chain that does not train.
    weights: AlignedBuf<T>,
    /// Another packing of the same chain that runs calls of few rows faster, if any.
    few_rows: Option<FewRows<T>>,
}

/// A chain's forward, whatever its weights' storage (what [`FewRows`] holds).
trait Forward<T>: fmt::Debug + Send + Sync {
    fn forward(&self, input: &[T], output: &mut [T]) -> Result<(), Error>;
}

impl<T: Float, W: Weights<T>> Forward<T> for Mlp<T, W> {
    fn forward(&self, input: &[T], output: &mut [T]) -> Result<(), Error> {
        Mlp::forward(self, input, output)
    }
}

/// The chain packed another way for the forwards of at most `max_rows` rows
/// ([`Mlp::rounded_to_bf16`]'s pairs).
#[derive(Debug)]
struct FewRows<T> {
    max_rows: usize,
    chain: Box<dyn Forward<T>>,
}

impl<T: Float, W: Weights<T>> Mlp<T, W> {
    /// Checks that the layers chain and packs them for `isa`, the weights rounded to `W`.
    pub fn new(specs: &[LayerSpec<'_, T>], isa: Isa) -> Result<Self, Error> {
        let isa = crate::dispatch::require(isa)?;
        let kernel = W::kernel_for(isa).ok_or_else(|| {
            Error::Precision(format!(
                "{isa} has no kernel for weights stored as {}",
                W::PRECISION
            ))
        })?;
        check_storable::<T, W>(specs)?;
        check_summable::<T, W>(specs)?;
        Self::with_kernel(specs, isa, kernel)
    }

    /// [`Mlp::new`] with `kernel`, which must be `isa`'s (tests vary its shape's `half_lanes`).
    fn with_kernel(
        specs: &[LayerSpec<'_, T>],
        isa: Isa,
        kernel: Kernel<W, T>,
    ) -> Result<Self, Error> {
        let isa = crate::dispatch::require(isa)?;
        if specs.is_empty() {
            return shape_error("an MLP needs at least one layer, got 0".to_owned());
        }
        let mut flops_per_row: usize = 0;
        for (index, spec) in specs.iter().enumerate() {
            if spec.out_features == 0 || spec.in_features == 0 {
                return shape_error(format!(
                    "layer {index}: widths must be at least 1, got weight shape ({}, {})",
                    spec.out_features, spec.in_features
                ));
            }
            let weight_len = spec.out_features.checked_mul(spec.in_features);
            if weight_len != Some(spec.weight.len()) {
                return shape_error(format!(
                    "layer {index}: weight of shape ({}, {}) needs {} values, got {}",
                    spec.out_features,
                    spec.in_features,
                    weight_len.map_or("too many".to_owned(), |n| n.to_string()),
                    spec.weight.len()
                ));
            }
            if let Some(bias) = spec.bias {
                if bias.len() != spec.out_features {
                    return shape_error(format!(
                        "layer {index}: bias must have {} values (the weight's rows), got {}",
                        spec.out_features,
                        bias.len()
                    ));
                }
            }
            if index > 0 && specs[index - 1].out_features != spec.in_features {
                return shape_error(format!(
                    "layer {index}: takes {} inputs but layer {} gives {} outputs",
                    spec.in_features,
                    index - 1,
                    specs[index - 1].out_features
                ));
            }
            // (PyTorch refuses such a parameter for a tensor of this type, "cannot be converted
            // without overflow"; rounded, it would be an infinity.)
            let params = spec.post_op.params();
            if let Some(param) = params.iter().find(|&&p| !T::from_f64(p).is_finite()) {
                return Err(Error::Precision(format!(
                    "layer {index}: post-op parameter {param:e} overflows {}",
                    T::PRECISION
                )));
            }
            flops_per_row = flops_per_row.saturating_add(2 * spec.weight.len());
        }
        let transpose = kernel.transpose.map(|transpose| {
            move |src: &[T], cols: usize, dst: &mut [T], dst_stride: usize| {
                // SAFETY: `dispatch::require` above checked that this CPU runs `isa`, the
                // kernel's ISA.
                unsafe { transpose(src, cols, dst, dst_stride) }
            }
        });
        let transpose = transpose
            .as_ref()
            .map(|transpose| transpose as PanelTranspose<'_, T>);
        let packed = PackedChain::pack(&kernel.shape, specs, transpose);
        let layers = packed.layers();
        let info = ChainInfo {
            dtype: T::DTYPE,
            precision: W::PRECISION,
            trains: W::TRAINS,
            isa,
            in_features: layers[0].in_features,
            out_features: layers[layers.len() - 1].out_features,
            flops_per_row,
            saved_width: saved_width(layers),
        };
        Ok(Mlp {
            info,
            kernel,
            packed,
            weights: if W::TRAINS {
                AlignedBuf::concat(&specs.iter().map(|spec| spec.weight).collect::<Vec<_>>())
            } else {
                AlignedBuf::zeros(0)
            },
            few_rows: None,
        })
    }

    pub fn info(&self) -> &ChainInfo {
        &self.info
    }

    pub fn isa(&self) -> Isa {
        self.info.isa
    }

    pub fn in_features(&self) -> usize {
        self.info.in_features
    }

    pub fn out_features(&self) -> usize {
        self.info.out_features
    }

    /// Floating-point operations per input row (2 per multiply-add).
    pub fn flops_per_row(&self) -> usize {
        self.info.flops_per_row
    }

    /// Runs the chain: `input` is `rows x in_features`, `output` is `rows x out_features`, both
    /// row-major. Large batches are split across fusedae's thread pool.
    pub fn forward(&self, input: &[T], output: &mut [T]) -> Result<(), Error> {
        self.run(input, output, None)
    }

    /// [`Mlp::forward`] that also writes, for each row, every layer's outputs but the last's
    /// (after its post-op), one layer after another, into `saved` (`rows x` [`ChainInfo::
    /// saved_width`]): what a backward needs. It runs every row in the panel form (rows in the
    /// lanes would leave the activations transposed), so on a chain that has that form its output
    /// can differ from [`Mlp::forward`]'s in the last bits; saved activations and output agree.
    /// (The training issue is its first caller.)
    pub fn forward_saving(
        &self,
        input: &[T],
        output: &mut [T],
        saved: &mut [T],
    ) -> Result<(), Error> {
        self.run(input, output, Some(saved))
    }

    /// Refuses what only training does (keeping activations, a backward) on a chain whose
    /// weights are stored narrower than it computes: those are for inference.
    fn check_trains(&self) -> Result<(), Error> {
        if self.info.trains {
            return Ok(());
        }
        Err(Error::Precision(format!(
            "a chain packed at precision {} is for inference only; train at fp32 and pack again",
            self.info.precision
        )))
    }

    fn run(&self, input: &[T], output: &mut [T], saved: Option<&mut [T]>) -> Result<(), Error> {
        if saved.is_some() {
            self.check_trains()?;
        }
        let (in_features, out_features) = (self.in_features(), self.out_features());
        if let (Some(few), None) = (&self.few_rows, &saved) {
            // Before the checks: the other chain makes the same ones, on the same shapes.
            if input.len() / in_features <= few.max_rows {
                return few.chain.forward(input, output);
            }
        }
        self.check_rows(input, output, saved.as_deref())?;
        let rows = input.len() / in_features;
        let saved_width = self.info.saved_width;
        let Some((threads, chunk_rows)) = self.chunk_rows(rows, saved.is_some()) else {
            let mut ran = Ok(());
            threads::run_caught(|| ran = self.run_on_this_thread(input, output, saved))
                .map_err(Error::Threads)?;
            return ran;
        };
        let inputs: Vec<&[T]> = input.chunks(chunk_rows * in_features).collect();
        // One lock per chunk hands each task its own part of `output` (and `saved`); none is
        // ever contended.
        let outputs: Vec<Mutex<&mut [T]>> = output
            .chunks_mut(chunk_rows * out_features)
            .map(Mutex::new)
            .collect();
        let saved: Vec<Mutex<&mut [T]>> = match saved {
            Some(saved) if saved_width > 0 => saved
                .chunks_mut(chunk_rows * saved_width)
                .map(Mutex::new)
                .collect(),
            _ => Vec::new(),
        };
        let failed = Mutex::new(None);
        threads::run(threads, inputs.len(), &|chunk| {
            let mut output = outputs[chunk]
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let mut saved = saved
                .get(chunk)
                .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner));
            let ran = self.run_on_this_thread(
                inputs[chunk],
                &mut output,
                saved.as_deref_mut().map(|s| &mut **s),
            );
            keep_first_error(&failed, ran);
        })
        .map_err(Error::Threads)?;
        first_error(failed)
    }

    /// The chain's backward for the rows of a [`Mlp::forward_saving`] call: from its `input`,
    /// `saved`, `output` and the gradient of that output (`grad_output`, the output's shape),
    /// writes the input's gradient into `grad_input` (if given, the input's shape) and each
    /// layer's weight and bias gradients into `grads` ([`Mlp::gradients_len`] values: layer after
    /// layer, the weight's `out x in` row-major, then the bias's `out`), zeros for a layer whose
    /// `needs_params` is false. Large batches are split across the
    /// thread pool, each thread summing its rows' weight gradients apart; the threads' sums are
    /// added in a fixed order, so the result is the same on every call with the same thread count.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        input: &[T],
        saved: &[T],
        output: &[T],
        grad_output: &[T],
        needs_params: &[bool],
        grad_input: Option<&mut [T]>,
        grads: &mut [T],
    ) -> Result<(), Error> {
        self.check_trains()?;
        // Every kernel with a backward has a transpose (the f32 and f64 ones).
        let (Some(kernel_backward), Some(transpose)) =
            (self.kernel.backward, self.kernel.transpose)
        else {
            return Err(Error::Precision(
                "this chain's kernel has no backward (inference only)".to_owned(),
            ));
        };
        let (in_features, out_features) = (self.in_features(), self.out_features());
        self.check_rows(input, output, Some(saved))?;
        let rows = input.len() / in_features;
        if grad_output.len() != output.len() {
            return shape_error(format!(
                "grad_output for {rows} rows must have {rows} x {out_features} values, got {}",
                grad_output.len()
            ));
        }
        if let Some(grad_input) = &grad_input {
            if grad_input.len() != input.len() {
                return shape_error(format!(
                    "grad_input must have the input's {} values, got {}",
                    input.len(),
                    grad_input.len()
                ));
            }
        }
        let layers = self.packed.layers();
        if needs_params.len() != layers.len() {
            return shape_error(format!(
                "the backward takes a flag for each of the {} layers, got {}",
                layers.len(),
                needs_params.len()
            ));
        }
        if grads.len() != self.gradients_len() {
            return shape_error(format!(
                "grads must have {} values (every layer's weight and bias), got {}",
                self.gradients_len(),
                grads.len()
            ));
        }
        let mut rest = self.weights.as_slice();
        let weights: Vec<&[T]> = layers
            .iter()
            .map(|layer| {
                let (weight, after) = rest.split_at(layer.out_features * layer.in_features);
                rest = after;
                weight
            })
            .collect();
        let inputs = BackwardInputs {
            input,
            saved,
            output,
            grad_output,
            weights: &weights,
            needs_params,
        };
        let (places, partial_len) = gradient_layout(&self.kernel.shape, layers);
        let (threads, chunk_rows) = self.chunk_rows(rows, true).unwrap_or((1, rows.max(1)));
        // Chunks of at most `SUMMED_ROWS` rows, as many for each thread (each sums a fixed
        // share of them), whole register tiles (`SUMMED_ROWS` is a multiple of every ISA's).
        let chunk_rows = if chunk_rows > SUMMED_ROWS {
            let chunks = rows.div_ceil(SUMMED_ROWS).next_multiple_of(threads);
            rows.div_ceil(chunks).next_multiple_of(self.kernel.shape.mr)
        } else {
            chunk_rows
        };
        let tasks = rows.div_ceil(chunk_rows);
        let grad_input: Vec<Mutex<&mut [T]>> = match grad_input {
            Some(grad_input) => grad_input
                .chunks_mut(chunk_rows * in_features)
                .map(Mutex::new)
                .collect(),
            None => Vec::new(),
        };
        let failed = Mutex::new(None);
        let partials = threads::run_reduce(
            threads,
            tasks,
            &|| GradientSums::<T>::new(partial_len),
            &|sums, chunk| {
                let Ok(sums) = sums else {
                    return; // (the share's allocation error, returned below)
                };
                let first = chunk * chunk_rows;
                let count = chunk_rows.min(rows - first);
                let chunk_inputs = BackwardInputs {
                    input: &input[first * in_features..][..count * in_features],
                    saved: &saved[first * self.info.saved_width..][..count * self.info.saved_width],
                    output: &output[first * out_features..][..count * out_features],
                    grad_output: &grad_output[first * out_features..][..count * out_features],
                    ..inputs
                };
                let mut grad_input = grad_input
                    .get(chunk)
                    .map(|g| g.lock().unwrap_or_else(PoisonError::into_inner));
                let len = backward_scratch_len(&self.kernel.shape, layers, count);
                let ran = sums.add_rows(count, |sums| {
                    with_scratch(len, |scratch: &mut [T]| {
                        // SAFETY: `Mlp::with_kernel` packed the layers with `self.kernel.shape`
                        // and checked through `dispatch::require` that this CPU supports
                        // `self.isa`, the kernel's ISA.
                        unsafe {
                            kernel_backward(
                                &self.kernel.shape,
                                self.packed.view(),
                                &chunk_inputs,
                                grad_input.as_deref_mut().map(|g| &mut **g),
                                sums,
                                scratch,
                            )
                        }
                    })
                });
                keep_first_error(&failed, ran);
            },
        )
        .map_err(Error::Threads)?;
        first_error(failed)?;
        let partials = partials.into_iter().collect::<Result<Vec<_>, _>>()?;
        // The threads' sums, in order, then each layer's rows without their padding.
        let mut partials = partials.into_iter().map(GradientSums::into_total);
        let mut total = partials.next().expect("one share at least");
        for partial in partials {
            add_to(&mut total, &partial);
        }
        let mut at = 0;
        for (place, layer) in places.iter().zip(layers) {
            let (inputs, outputs) = (layer.in_features, layer.out_features);
            let weight = &mut grads[at..][..outputs * inputs];
            if place.transposed {
                let src = &total[place.weight_at..][..inputs * place.weight_stride];
                // SAFETY: `Mlp::with_kernel` checked that this CPU runs the kernel's ISA.
                unsafe { transpose(src, place.weight_stride, weight, inputs) };
            } else {
                let rows = total[place.weight_at..].chunks(place.weight_stride);
                for (row, grad_row) in rows.zip(weight.chunks_exact_mut(inputs)) {
                    grad_row.copy_from_slice(&row[..inputs]);
                }
            }
            at += outputs * inputs;
            grads[at..][..outputs].copy_from_slice(&total[place.bias_at..][..outputs]);
            at += outputs;
        }
        Ok(())
    }

    /// Where a row of [`Mlp::forward_saving`]'s `saved` keeps each layer's values.
    pub fn saved_columns(&self) -> Vec<SavedColumns> {
        saved_columns(self.packed.layers()).0
    }

    /// Values of every layer's weight and bias gradients, as [`Mlp::backward`] writes them.
    pub fn gradients_len(&self) -> usize {
        self.packed
            .layers()
            .iter()
            .map(|layer| layer.out_features * (layer.in_features + 1))
            .sum()
    }

    /// Checks that `input` is whole rows and `output` (and `saved`) has as many.
    fn check_rows(&self, input: &[T], output: &[T], saved: Option<&[T]>) -> Result<(), Error> {
        let (in_features, out_features) = (self.in_features(), self.out_features());
        if !input.len().is_multiple_of(in_features) {
            return shape_error(format!(
                "input must be whole rows of {in_features} features, got {} values",
                input.len()
            ));
        }
        let rows = input.len() / in_features;
        if rows.checked_mul(out_features) != Some(output.len()) {
            return shape_error(format!(
                "output for {rows} rows must have {rows} x {out_features} values, got {}",
                output.len()
            ));
        }
        let saved_width = self.info.saved_width;
        if let Some(saved) = saved {
            if rows.checked_mul(saved_width) != Some(saved.len()) {
                return shape_error(format!(
                    "saved activations for {rows} rows must have {rows} x {saved_width} values, \
                     got {}",
                    saved.len()
                ));
            }
        }
        Ok(())
    }

    /// How a call on `rows` rows is shared out: `(threads, rows per chunk)`, or None to run on
    /// the calling thread. `saving`: the call keeps activations (or is a backward), so it runs
    /// every row in registers of outputs, and chunks need not be whole rows-in-lanes blocks.
    fn chunk_rows(&self, rows: usize, saving: bool) -> Option<(usize, usize)> {
        let mr = self.kernel.shape.mr;
        let threads = if rows < 2 * mr || self.is_small(rows) {
            1
        } else {
            threads::num_threads()
        };
        if threads <= 1 {
            return None;
        }
        // Several chunks per thread balance a noisy machine, once each chunk is still a few
        // blocks of work; a smaller batch is split evenly, one chunk per thread.
        let block_rows = self.kernel.shape.block_rows;
        let chunks = if rows >= threads.saturating_mul(CHUNKS_PER_THREAD * block_rows) {
            threads * CHUNKS_PER_THREAD
        } else {
            threads
        };
        // Chunks of whole rows-in-lanes blocks where the chain has that packing, so no chunk
        // leaves a tail to the slower path.
        let granule = if self.packed.view().lanes_layers.is_empty() || saving {
            mr
        } else {
            self.kernel.shape.lanes_block()
        };
        Some((threads, rows.div_ceil(chunks).next_multiple_of(granule)))
    }

    /// Whether `rows` rows are too little work to share out: such a call runs on the calling
    /// thread (and the Python binding keeps the GIL for it).
    pub fn is_small(&self, rows: usize) -> bool {
        rows.saturating_mul(self.info.flops_per_row) < SMALL_CALL_FLOPS
    }

    fn run_on_this_thread(
        &self,
        input: &[T],
        output: &mut [T],
        saved: Option<&mut [T]>,
    ) -> Result<(), Error> {
        let rows = input.len() / self.in_features();
        let len = scratch_len(&self.kernel.shape, &self.packed.view(), rows);
        with_scratch(len, |scratch: &mut [T]| {
            // SAFETY: `Mlp::with_kernel` packed the layers with `self.kernel.shape` and checked
            // through `dispatch::require` that this CPU supports `self.isa`, the kernel's ISA.
            unsafe {
                (self.kernel.forward)(
                    &self.kernel.shape,
                    self.packed.view(),
                    input,
                    output,
                    scratch,
                    saved,
                )
            }
        })
    }
}

impl Mlp<f32> {
    /// The bf16 precision on the f32 kernel: each weight rounded to bf16 (nearest even) and
    /// held as the f32 of the same value, the inputs and sums in f32. For the ISAs where
    /// widening bf16 in registers costs more than the bytes it saves
    /// ([`dispatch::bf16_weights_narrow`](crate::dispatch::bf16_weights_narrow)); the same
    /// numbers as a widening kernel, inference only. Where [`dispatch::bf16_form`] says
    /// [`Bf16Form::PairsForFewRows`], the weights are packed as bf16 pairs too, for the calls of
    /// at most [`PAIRS_MAX_ROWS`] rows (whose inputs the pairs round to bf16: other numbers,
    /// within the same bound).
    pub fn rounded_to_bf16(specs: &[LayerSpec<'_, f32>], isa: Isa) -> Result<Self, Error> {
        check_storable::<f32, Bf16>(specs)?;
        let mut mlp = Self::rounded_to::<Bf16>(specs, isa, |row| {
            row.iter().map(|&w| Bf16::round(w).widen()).collect()
        })?;
        if crate::dispatch::bf16_form(isa) == Bf16Form::PairsForFewRows {
            mlp.few_rows = Some(FewRows {
                max_rows: PAIRS_MAX_ROWS,
                chain: Box::new(Mlp::<f32, Bf16>::new(specs, isa)?),
            });
        }
        Ok(mlp)
    }

    /// The int8 precision on the f32 kernel: each output's weights rounded to its int8 values
    /// (`s_j * round(W_j / s_j)`, [`Storage::store_channel`](crate::pack::Storage)'s scale),
    /// held as f32, the inputs left in f32 (not quantized). For the ISAs without an int8 kernel
    /// ([`dispatch::multiplies_int8`](crate::dispatch::multiplies_int8)): inference only,
    /// within the int8 bound, of which it leaves out the inputs' rounding.
    pub fn rounded_to_int8(specs: &[LayerSpec<'_, f32>], isa: Isa) -> Result<Self, Error> {
        check_storable::<f32, i8>(specs)?;
        // The same widths as the int8 kernel, so that a chain that runs on one CPU runs on all.
        check_summable::<f32, i8>(specs)?;
        Self::rounded_to::<i8>(specs, isa, |row| {
            let scale = crate::pack::int8_scale(row);
            row.iter()
                .map(|&w| f32::from(<i8 as Storage<f32>>::store(w / scale)) * scale)
                .collect()
        })
    }

    /// The f32 kernel on each weight row replaced by `round(row)`, reporting `W`'s precision.
    fn rounded_to<W: Weights<f32>>(
        specs: &[LayerSpec<'_, f32>],
        isa: Isa,
        round: impl Fn(&[f32]) -> Vec<f32>,
    ) -> Result<Self, Error> {
        let rounded: Vec<Vec<f32>> = specs
            .iter()
            .map(|spec| {
                let k = spec.in_features.max(1);
                spec.weight.chunks(k).flat_map(&round).collect()
            })
            .collect();
        let specs: Vec<LayerSpec<'_, f32>> = specs
            .iter()
            .zip(&rounded)
            .map(|(spec, weight)| LayerSpec { weight, ..*spec })
            .collect();
        let mut mlp = Mlp::new(&specs, isa)?;
        mlp.info.precision = W::PRECISION;
        mlp.info.trains = false;
        mlp.weights = AlignedBuf::zeros(0);
        Ok(mlp)
    }
}

/// Weights `W` can store faithfully ([`Storage::refuses`]: int8's finite ones, bf16's within
/// its range).
fn check_storable<T: Float, W: Weights<T>>(specs: &[LayerSpec<'_, T>]) -> Result<(), Error> {
    for (index, spec) in specs.iter().enumerate() {
        let refused = spec
            .weight
            .iter()
            .enumerate()
            .find_map(|(at, &w)| W::refuses(w).map(|reason| (at, reason)));
        if let Some((at, reason)) = refused {
            return Err(Error::Precision(format!(
                "layer {index}: weight [{}, {}] is {:?}; precision {} {reason}",
                at / spec.in_features.max(1),
                at % spec.in_features.max(1),
                spec.weight[at],
                W::PRECISION
            )));
        }
    }
    Ok(())
}

/// Layers no wider than `W`'s kernel sums exactly ([`Weights::MAX_IN_FEATURES`]): int8's i32
/// sums overflowed from 66,312 inputs of one sign (a row of ones gave -66,222 for 66,400).
fn check_summable<T: Float, W: Weights<T>>(specs: &[LayerSpec<'_, T>]) -> Result<(), Error> {
    match specs
        .iter()
        .position(|spec| spec.in_features > W::MAX_IN_FEATURES)
    {
        Some(index) => Err(Error::Precision(format!(
            "layer {index}: {} inputs; precision {} sums at most {} exactly (in i32): run \
             this chain at fp32 or bf16",
            specs[index].in_features,
            W::PRECISION,
            W::MAX_IN_FEATURES
        ))),
        None => Ok(()),
    }
}

/// Rows whose weight and bias gradients a buffer sums on its own before they are added to a
/// share's total ([`GradientSums`]): each row's products are added one after another, so
/// float32 sums over 2^18 rows in one buffer drifted 8e-6 from the float64 reference (and over
/// 2^20, 1.5e-5: PyTorch's 7e-7), growing with the square root of the rows. Summing at most
/// this many at a time costs an addition of the buffer per 4608 rows; a multiple of every
/// ISA's register tile rows (4, 6 or 8), and a batch of 4096 still one chunk.
const SUMMED_ROWS: usize = 4608;

/// A share of the backward's rows' weight and bias gradient sums ([`Mlp::backward`]), in two
/// levels: its chunks of rows straight into `total` while they come to at most
/// [`SUMMED_ROWS`] rows, then the next chunks summed apart in `block`, added to `total` every
/// `SUMMED_ROWS` rows at most.
struct GradientSums<T> {
    total: Vec<T>,
    total_rows: usize,
    /// Empty until the rows overflow `total`'s first level.
    block: Vec<T>,
    block_rows: usize,
}

/// `values[i] += more[i]`.
fn add_to<T: Element>(values: &mut [T], more: &[T]) {
    for (value, &add) in values.iter_mut().zip(more) {
        *value = *value + add;
    }
}

/// Grows `buffer` with zeros to `len` elements (a no-op where it holds as many), or
/// [`Error::Memory`] with `message(megabytes)` where they cannot be allocated: scratch grows with
/// the widest layer and gradient sums are as large as the weights, and an infallible allocation
/// of either under a memory limit aborted the process.
fn grow_zeroed<E: Copy>(
    buffer: &mut Vec<E>,
    len: usize,
    zero: E,
    message: impl FnOnce(usize) -> String,
) -> Result<(), Error> {
    let Some(more) = len.checked_sub(buffer.len()).filter(|&more| more > 0) else {
        return Ok(());
    };
    buffer
        .try_reserve_exact(more)
        .map_err(|_| Error::Memory(message((len * std::mem::size_of::<E>()).div_ceil(1 << 20))))?;
    buffer.resize(len, zero);
    Ok(())
}

/// `len` zeros for a thread's weight gradient sums ([`grow_zeroed`]).
fn gradient_sums_zeros<T: Element>(len: usize) -> Result<Vec<T>, Error> {
    let mut zeros = Vec::new();
    grow_zeroed(&mut zeros, len, T::ZERO, |megabytes| {
        format!("could not allocate {megabytes} MB for a thread's weight gradient sums")
    })?;
    Ok(zeros)
}

impl<T: Element> GradientSums<T> {
    /// Zero sums of `len` values.
    fn new(len: usize) -> Result<Self, Error> {
        Ok(GradientSums {
            total: gradient_sums_zeros(len)?,
            total_rows: 0,
            block: Vec::new(),
            block_rows: 0,
        })
    }

    /// Runs `backward(sums)` for `rows` more rows (at most [`SUMMED_ROWS`]), adding to the
    /// sums whose turn it is; `backward`'s error, or [`Error::Memory`] where the second level
    /// cannot be allocated.
    fn add_rows(
        &mut self,
        rows: usize,
        backward: impl FnOnce(&mut [T]) -> Result<(), Error>,
    ) -> Result<(), Error> {
        if self.block.is_empty() && self.total_rows + rows <= SUMMED_ROWS {
            backward(&mut self.total)?;
            self.total_rows += rows;
            return Ok(());
        }
        if self.block_rows + rows > SUMMED_ROWS {
            self.flush();
        }
        if self.block.is_empty() {
            self.block = gradient_sums_zeros(self.total.len())?;
        }
        backward(&mut self.block)?;
        self.block_rows += rows;
        Ok(())
    }

    /// Adds the block's sums to the total, and zeros the block.
    fn flush(&mut self) {
        if self.block_rows > 0 {
            add_to(&mut self.total, &self.block);
            self.block.fill(T::ZERO);
            self.block_rows = 0;
        }
    }

    /// Every row's sums.
    fn into_total(mut self) -> Vec<T> {
        self.flush();
        self.total
    }
}

thread_local! {
    /// This thread's scratch, in cache lines (register stores into a buffer that starts
    /// mid-line, as large `malloc` blocks do, 16 bytes in, each touch two lines, and an op
    /// applied over the stored tile reads them back): one buffer whatever the element type.
    static SCRATCH: RefCell<Vec<CacheLine>> = const { RefCell::new(Vec::new()) };
}

/// Keeps `result`'s error in `failed` unless one is there: the first error of a call's tasks.
fn keep_first_error(failed: &Mutex<Option<Error>>, result: Result<(), Error>) {
    if let Err(error) = result {
        failed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert(error);
    }
}

/// The error [`keep_first_error`] kept, if any.
fn first_error(failed: Mutex<Option<Error>>) -> Result<(), Error> {
    match failed.into_inner().unwrap_or_else(PoisonError::into_inner) {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

/// Runs `run` on `len` elements of scratch: this thread's buffer, reused between calls (it saves
/// an allocation, and for wide layers fresh pages faulted in, on every call), or a new one if
/// it is in use (a re-entrant call) or would be oversized. [`Error::Memory`] where it cannot be
/// allocated (it grows with the widest layer: a 1 -> 6e7 -> 1 chain wanted 30 GB on 64 rows,
/// and aborted the process before).
fn with_scratch<T: Element>(len: usize, run: impl FnOnce(&mut [T])) -> Result<(), Error> {
    let lines = (len * std::mem::size_of::<T>()).div_ceil(LINE_BYTES);
    let grow = |buffer: &mut Vec<CacheLine>| {
        grow_zeroed(buffer, lines, CacheLine::zeroed(), |megabytes| {
            format!("could not allocate the call's {megabytes} MB of working memory")
        })
    };
    if lines * LINE_BYTES > SCRATCH_KEEP_BYTES {
        let mut fresh = Vec::new();
        grow(&mut fresh)?;
        run(&mut bytemuck::cast_slice_mut(&mut fresh)[..len]);
        return Ok(());
    }
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buffer) => {
            grow(&mut buffer)?;
            run(&mut bytemuck::cast_slice_mut(&mut buffer[..lines])[..len]);
            Ok(())
        }
        Err(_) => {
            let mut fresh = Vec::new();
            grow(&mut fresh)?;
            run(&mut bytemuck::cast_slice_mut(&mut fresh)[..len]);
            Ok(())
        }
    })
}

#[cfg(test)]
mod tests {
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::dispatch;
    use crate::kernels::TileShape;
    use crate::ops::PostOp;
    use crate::oracle::{
        reference, reference_backward, reference_layers, reference_linears, reference_op,
        OwnedLayer,
    };

    fn random_chain(rng: &mut SmallRng, widths: &[usize], relu_last: bool) -> Vec<OwnedLayer<f64>> {
        (0..widths.len() - 1)
            .map(|i| {
                let (fan_in, fan_out) = (widths[i], widths[i + 1]);
                let scale = 1.0 / (fan_in as f64).sqrt();
                OwnedLayer {
                    weight: (0..fan_in * fan_out)
                        .map(|_| rng.random_range(-scale..scale))
                        .collect(),
                    bias: (i % 3 != 2).then(|| {
                        (0..fan_out)
                            .map(|_| rng.random_range(-scale..scale))
                            .collect()
                    }),
                    out_features: fan_out,
                    in_features: fan_in,
                    post_op: if i + 2 < widths.len() || relu_last {
                        if i % 4 == 1 {
                            PostOp::Identity
                        } else {
                            PostOp::Relu
                        }
                    } else {
                        PostOp::Identity
                    },
                }
            })
            .collect()
    }

    fn to_f32(layers: &[OwnedLayer<f64>]) -> Vec<OwnedLayer<f32>> {
        layers
            .iter()
            .map(|l| OwnedLayer {
                weight: l.weight.iter().map(|&v| v as f32).collect(),
                bias: l
                    .bias
                    .as_ref()
                    .map(|b| b.iter().map(|&v| v as f32).collect()),
                out_features: l.out_features,
                in_features: l.in_features,
                post_op: l.post_op,
            })
            .collect()
    }

    /// `(grad_input, grads)` from the chain's saving forward and backward on `isa`.
    fn run_backward<T: Float>(
        layers: &[OwnedLayer<T>],
        isa: Isa,
        half: bool,
        input: &[T],
        grad_output: &[T],
        needs_params: &[bool],
    ) -> (Vec<T>, Vec<T>) {
        let (mlp, output, saved) = saving_forward(layers, isa, half, input);
        let mut grad_input = vec![T::ZERO; input.len()];
        let mut grads = vec![T::ZERO; mlp.gradients_len()];
        mlp.backward(
            input,
            &saved,
            &output,
            grad_output,
            needs_params,
            Some(&mut grad_input),
            &mut grads,
        )
        .unwrap();
        (grad_input, grads)
    }

    /// Every op, with parameters other than PyTorch's defaults where it has any.
    const EVERY_OP: [PostOp; 11] = [
        PostOp::Identity,
        PostOp::Relu,
        PostOp::LeakyRelu {
            negative_slope: 0.1,
        },
        PostOp::Sigmoid,
        PostOp::Tanh,
        PostOp::Gelu,
        PostOp::GeluTanh,
        PostOp::Silu,
        PostOp::Elu { alpha: 0.7 },
        PostOp::Hardtanh {
            min_val: -0.5,
            max_val: 0.8,
        },
        PostOp::Softplus {
            beta: 1.5,
            threshold: 20.0,
        },
    ];

    /// `layers` with every post-op drawn from [`EVERY_OP`] (the last one too with `last`).
    fn with_random_ops(
        rng: &mut SmallRng,
        mut layers: Vec<OwnedLayer<f64>>,
        last: bool,
    ) -> Vec<OwnedLayer<f64>> {
        let count = layers.len();
        for (i, layer) in layers.iter_mut().enumerate() {
            if i + 1 < count || last {
                layer.post_op = EVERY_OP[rng.random_range(0..EVERY_OP.len())];
            }
        }
        layers
    }

    /// `op` with its parameters rounded to f32, as the f32 kernels (and PyTorch) use them.
    fn with_f32_params(op: PostOp) -> PostOp {
        let params: Vec<f64> = op.params().iter().map(|&p| f64::from(p as f32)).collect();
        PostOp::parse(op.name(), &params).unwrap()
    }

    /// Runs `op` alone through every ISA (a 1 -> `width` layer of weights 1 and biases -0, so
    /// each output is `op(input)`, signed zeros included: a dot-form output at width 1, panels
    /// at 32) and checks every value against [`reference_op`] at the same input: NaN for NaN,
    /// infinities and zeros with their signs, else within `relative` of the reference, or 1e-30
    /// where the reference is below that.
    fn check_op_alone<T: Float>(op: PostOp, inputs: &[T], relative: f64) -> f64
    where
        f64: From<T>,
    {
        let mut worst = 0.0_f64;
        let reference = if std::mem::size_of::<T>() == 4 {
            with_f32_params(op)
        } else {
            op
        };
        for width in [1, 32] {
            let layer = OwnedLayer {
                weight: vec![T::from_f64(1.0); width],
                bias: Some(vec![T::from_f64(-0.0); width]),
                out_features: width,
                in_features: 1,
                post_op: op,
            };
            for isa in dispatch::available() {
                let got = run(std::slice::from_ref(&layer), isa, inputs);
                for (row, &x) in inputs.iter().enumerate() {
                    let x = f64::from(x);
                    let mut want = reference_op(reference, x);
                    if std::mem::size_of::<T>() == 4 {
                        // What f32 can hold of it (beyond its range, infinity).
                        want = (want as f32) as f64;
                    }
                    for &value in &got[row * width..][..width] {
                        let value = f64::from(value);
                        let context =
                            format!("{op} {isa} width {width} at {x:e}: {value:e} vs {want:e}");
                        if want.is_nan() || !want.is_finite() || want == 0.0 {
                            let same = (want.is_nan() && value.is_nan())
                                || (value == want
                                    && value.is_sign_negative() == want.is_sign_negative())
                                || (want == 0.0 && value.abs() < 1e-30);
                            assert!(same, "{context}");
                            continue;
                        }
                        let error = (value - want).abs();
                        if want.abs() < 1e-30 {
                            assert!(error < 1e-30, "{context}");
                            continue;
                        }
                        worst = worst.max(error / want.abs());
                        assert!(error <= relative * want.abs(), "{context}");
                    }
                }
            }
        }
        worst
    }

    /// Inputs across the whole range: a dense grid where the ops bend, a geometric one out to
    /// the largest values, and the special values.
    fn activation_inputs(limit: f64, max: f64) -> Vec<f64> {
        let mut inputs: Vec<f64> = (0..=20_000)
            .map(|i| -limit + 2.0 * limit * i as f64 / 20_000.0)
            .collect();
        let mut magnitude = 1e-30;
        while magnitude < max {
            inputs.extend([magnitude, -magnitude]);
            magnitude *= 1.37;
        }
        inputs.extend([
            0.0,
            -0.0,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::NAN,
            max,
            -max,
        ]);
        inputs
    }

    #[test]
    fn every_activation_matches_its_f64_reference_on_every_isa() {
        let inputs64 = activation_inputs(40.0, f64::MAX);
        let inputs32: Vec<f32> = activation_inputs(20.0, f64::from(f32::MAX))
            .into_iter()
            .map(|v| v as f32)
            .collect();
        for op in EVERY_OP {
            let worst32 = check_op_alone(op, &inputs32, 1e-6);
            let worst64 = check_op_alone(op, &inputs64, 1e-13);
            println!("{op}: worst relative error f32 {worst32:.2e}, f64 {worst64:.2e}");
        }
    }

    fn run<T: Float>(layers: &[OwnedLayer<T>], isa: Isa, input: &[T]) -> Vec<T> {
        run_with(layers, isa, T::kernel(isa), input)
    }

    fn run_with<T: Float>(
        layers: &[OwnedLayer<T>],
        isa: Isa,
        kernel: Kernel<T, T>,
        input: &[T],
    ) -> Vec<T> {
        let specs: Vec<_> = layers.iter().map(OwnedLayer::spec).collect();
        let mlp = Mlp::with_kernel(&specs, isa, kernel).unwrap();
        let rows = input.len() / mlp.in_features();
        let mut output = vec![T::ZERO; rows * mlp.out_features()];
        mlp.forward(input, &mut output).unwrap();
        output
    }

    /// Largest |got - want| relative to the size of the values compared.
    fn max_relative_error(got: impl Iterator<Item = f64>, want: &[f64]) -> f64 {
        let scale = want.iter().fold(1e-30_f64, |m, v| m.max(v.abs()));
        got.zip(want)
            .fold(0.0, |m, (g, w)| m.max((g - w).abs() / scale))
    }

    const CHAINS: &[&[usize]] = &[
        &[784, 42, 16],
        &[784, 42, 16, 42, 784],
        &[64, 42, 2],
        &[784, 42, 1],
        &[784, 1],
        &[1, 1],
        &[17, 1, 17],
        &[42, 64, 42, 17, 1],
        &[3, 100, 5],
        &[130, 97, 33, 256],
        // f64 130 -> 45 as 44 + 1 with half registers (a split after a half); 784 -> 42 last,
        // so a half register (f32: 40 + 2) writes straight into the caller's output.
        &[130, 45, 784, 42],
        // A last panel of one register or less shares the one before it: f32 56 as 32 + 24 (a
        // half), f64 56 as 3 x 8 + 16 + 16 and 30 as 16 + 14.
        &[56, 30, 56],
    ];
    const BATCHES: &[usize] = &[0, 1, 2, 7, 9, 64, 1000];

    /// Every ISA this CPU runs, AVX-512 both with and without the cheaper half registers (the
    /// forms packing picks on Zen 4 and on CPUs with two 512-bit FMA units).
    fn isa_forms() -> Vec<(Isa, bool)> {
        let mut forms = Vec::new();
        for isa in dispatch::available() {
            forms.push((isa, false));
            if isa == Isa::Avx512 {
                forms.push((isa, true));
            }
        }
        forms
    }

    /// `isa`'s kernel with the half registers counted as cheaper (`half`) or not.
    fn with_half<T: Float>(isa: Isa, half: bool) -> Kernel<T, T> {
        let kernel = T::kernel(isa);
        let half_lanes = if half { kernel.shape.lanes / 2 } else { 0 };
        Kernel {
            shape: TileShape {
                half_lanes,
                ..kernel.shape
            },
            ..kernel
        }
    }

    /// `layers` packed for `isa` with and without its kernel's transpose.
    fn packed_both_ways<T: Float>(
        layers: &[OwnedLayer<T>],
        isa: Isa,
        half: bool,
    ) -> (PackedChain<T, T>, PackedChain<T, T>) {
        let kernel = with_half::<T>(isa, half);
        let transpose = kernel.transpose.expect("every f32/f64 kernel transposes");
        // SAFETY: `dispatch::available` listed `isa`, so this CPU runs it.
        let by_squares = |src: &[T], cols: usize, dst: &mut [T], dst_stride: usize| unsafe {
            transpose(src, cols, dst, dst_stride)
        };
        let specs: Vec<_> = layers.iter().map(OwnedLayer::spec).collect();
        (
            PackedChain::pack(&kernel.shape, &specs, Some(&by_squares)),
            PackedChain::pack(&kernel.shape, &specs, None),
        )
    }

    #[test]
    fn packing_by_register_squares_lays_out_what_packing_value_by_value_does() {
        let mut rng = SmallRng::seed_from_u64(11);
        for widths in CHAINS {
            let layers = random_chain(&mut rng, widths, false);
            let layers32 = to_f32(&layers);
            for (isa, half) in isa_forms() {
                let (squares, values) = packed_both_ways(&layers, isa, half);
                assert_eq!(
                    squares.view().weights,
                    values.view().weights,
                    "f64 {isa} {widths:?}"
                );
                let (squares, values) = packed_both_ways(&layers32, isa, half);
                assert_eq!(
                    squares.view().weights,
                    values.view().weights,
                    "f32 {isa} {widths:?}"
                );
            }
        }
    }

    /// Every ISA's transpose against the plain one, on shapes with and without edges in either
    /// direction (a register's lanes, one short and one over, and the seed's 42 and 784), into
    /// rows as long as the source's columns and into longer ones, whose padding it leaves.
    fn transposes_like_the_definition<T: Float>(isa: Isa) {
        let transpose = T::kernel(isa)
            .transpose
            .expect("every f32/f64 kernel transposes");
        let sizes = [0, 1, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 33, 42, 784];
        for rows in sizes {
            for cols in sizes {
                let src: Vec<T> = (0..rows * cols)
                    .map(|i| T::from_f64(i as f64 + 1.0))
                    .collect();
                for dst_stride in [rows, rows + 3] {
                    let padding = T::from_f64(-1.0);
                    let mut dst = vec![padding; cols * dst_stride];
                    // SAFETY: `dispatch::available` listed `isa`, so this CPU runs it.
                    unsafe { transpose(&src, cols, &mut dst, dst_stride) };
                    for (c, dst_row) in dst.chunks_exact(dst_stride.max(1)).enumerate() {
                        for r in 0..rows {
                            assert_eq!(dst_row[r], src[r * cols + c], "{isa} {rows}x{cols}");
                        }
                        assert!(
                            dst_row[rows..].iter().all(|&value| value == padding),
                            "{isa} {rows}x{cols} into rows of {dst_stride}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn every_isa_transposes_like_the_definition() {
        for isa in dispatch::available() {
            transposes_like_the_definition::<f32>(isa);
            transposes_like_the_definition::<f64>(isa);
        }
    }

    #[test]
    fn every_isa_matches_the_reference_and_the_scalar_kernel() {
        let mut rng = SmallRng::seed_from_u64(7);
        for widths in CHAINS {
            for relu_last in [false, true] {
                let layers = random_chain(&mut rng, widths, relu_last);
                let layers = with_random_ops(&mut rng, layers, relu_last);
                let layers32 = to_f32(&layers);
                for &rows in BATCHES {
                    let input: Vec<f64> = (0..rows * widths[0])
                        .map(|_| rng.random_range(-2.0..2.0))
                        .collect();
                    let input32: Vec<f32> = input.iter().map(|&v| v as f32).collect();
                    let want = reference(&layers, &input);
                    let scalar64 = run(&layers, Isa::Scalar, &input);
                    let scalar32 = run(&layers32, Isa::Scalar, &input32);
                    for (isa, half) in isa_forms() {
                        let got64 = run_with(&layers, isa, with_half(isa, half), &input);
                        let got32 = run_with(&layers32, isa, with_half(isa, half), &input32);
                        let context = format!("{isa} half={half} {widths:?} rows={rows}");
                        assert!(
                            max_relative_error(got64.iter().copied(), &want) < 1e-12,
                            "{context}"
                        );
                        assert!(
                            max_relative_error(got64.iter().copied(), &scalar64) < 1e-13,
                            "{context}"
                        );
                        let as64 = |v: &Vec<f32>| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
                        let got32_64 = as64(&got32);
                        assert!(
                            max_relative_error(got32_64.iter().copied(), &want) < 1e-5,
                            "{context}"
                        );
                        assert!(
                            max_relative_error(got32_64.iter().copied(), &as64(&scalar32)) < 1e-5,
                            "{context}"
                        );
                    }
                }
            }
        }
    }

    /// Every bf16 kernel this CPU runs: AVX-512's widening one (with and without the cheaper
    /// half registers) and, with AVX512_BF16, the one multiplying bf16 pairs. The other ISAs run
    /// bf16 as the f32 kernel on rounded weights, which the bound test checks too.
    fn bf16_kernels() -> Vec<(String, Isa, Kernel<Bf16, f32>)> {
        // Empty off x86-64.
        #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
        let mut found = Vec::new();
        #[cfg(target_arch = "x86_64")]
        if Isa::Avx512.is_supported() {
            use crate::kernels::avx512::{kernel_bf16, kernel_bf16_pairs};
            for half in [false, true] {
                let widening = kernel_bf16().with_half_registers(half);
                let name = format!("avx512 widening half={half}");
                found.push((name, Isa::Avx512, widening));
            }
            if std::arch::is_x86_feature_detected!("avx512bf16") {
                for half in [false, true] {
                    let pairs = kernel_bf16_pairs().with_half_registers(half);
                    let name = format!("avx512 bf16 pairs half={half}");
                    found.push((name, Isa::Avx512, pairs));
                }
            }
        }
        found
    }

    /// The bf16 kernels against the f64 reference on the unrounded weights, every output
    /// within its first-order bound ([`Precision::BF16`](crate::oracle::Precision::BF16):
    /// weights and inputs rounded to bf16, then f32 sums), on chains of every op and odd widths.
    #[test]
    fn every_bf16_kernel_stays_within_its_error_bound() {
        stays_within_bound(
            11,
            crate::oracle::Precision::BF16,
            &bf16_kernels(),
            Mlp::rounded_to_bf16,
        );
    }

    /// Softplus jumps where `beta x` passes `threshold` (PyTorch's switch to `x`): a
    /// pre-activation that bf16's rounding moves across it (10.03 -> 10 at `beta = 0.1,
    /// threshold = 1`) changes the output by the whole jump, 3.13, which the bound adds there.
    #[test]
    fn bf16_bound_covers_softplus_switch() {
        use crate::oracle::forward_bounds;
        let op = with_f32_params(PostOp::Softplus {
            beta: 0.1,
            threshold: 1.0,
        });
        let weight = 10.03f32;
        let exact = [OwnedLayer {
            weight: vec![f64::from(weight)],
            bias: None,
            out_features: 1,
            in_features: 1,
            post_op: op,
        }];
        let (_, out_bounds) = forward_bounds(&exact, &[1.0], crate::oracle::Precision::BF16);
        let want = reference(&exact, &[1.0])[0];
        let layer = [LayerSpec {
            weight: &[weight],
            bias: None,
            out_features: 1,
            in_features: 1,
            post_op: op,
        }];
        for isa in dispatch::available() {
            let mlp = Mlp::rounded_to_bf16(&layer, isa).unwrap();
            let mut got = [0.0f32];
            mlp.forward(&[1.0], &mut got).unwrap();
            let error = (f64::from(got[0]) - want).abs();
            assert!(error > 3.0, "{isa}: the rounding crosses the switch");
            assert!(
                error <= out_bounds[0][0],
                "{isa}: {error} > {}",
                out_bounds[0][0]
            );
        }
    }

    /// Every int8 kernel this CPU runs: AVX512_VNNI's, with and without the cheaper half
    /// registers (and the dot form beside them: 784 -> 42 as 40 + 2).
    fn int8_kernels() -> Vec<(String, Isa, Kernel<i8, f32>)> {
        let mut found = Vec::new();
        for isa in dispatch::available() {
            if let Some(kernel) = i8::kernel_for(isa) {
                for half in [false, true] {
                    let name = format!("{isa} int8 half={half}");
                    found.push((name, isa, kernel.with_half_registers(half)));
                }
            }
        }
        found
    }

    /// An int8 chain computes the same bits with the half registers and the dot form as with
    /// panels of whole registers: its sums are exact integers, and a dot-form output's float
    /// epilogue is the tiles', operation for operation.
    #[test]
    fn int8_half_registers_and_dot_form_change_no_bit() {
        let mut rng = SmallRng::seed_from_u64(23);
        for (name, isa, kernel) in int8_kernels() {
            if !name.ends_with("half=true") {
                continue;
            }
            for widths in CHAINS {
                let layers = random_chain(&mut rng, widths, false);
                let layers = with_random_ops(&mut rng, layers, false);
                let layers32 = to_f32(&layers);
                let specs: Vec<_> = layers32.iter().map(OwnedLayer::spec).collect();
                let half = Mlp::<f32, i8>::with_kernel(&specs, isa, kernel).unwrap();
                let whole =
                    Mlp::<f32, i8>::with_kernel(&specs, isa, kernel.with_half_registers(false))
                        .unwrap();
                if widths[..2] == [784, 42] {
                    let layer = half.packed.view().layers[0];
                    assert_eq!((layer.dot_from, layer.padded_out), (40, 42), "{name}");
                }
                for &rows in BATCHES {
                    let input: Vec<f32> = (0..rows * widths[0])
                        .map(|_| rng.random_range(-2.0f32..2.0))
                        .collect();
                    let mut got = vec![0.0f32; rows * half.out_features()];
                    let mut want = got.clone();
                    half.forward(&input, &mut got).unwrap();
                    whole.forward(&input, &mut want).unwrap();
                    let same = got
                        .iter()
                        .zip(&want)
                        .all(|(g, w)| g.to_bits() == w.to_bits());
                    assert!(same, "{name} {widths:?} rows={rows}");
                }
            }
        }
    }

    /// The int8 kernels as the bf16 ones, within [`Precision::INT8`](crate::oracle::Precision)'s
    /// bound (weights per output channel, inputs per row).
    #[test]
    fn every_int8_kernel_stays_within_its_error_bound() {
        stays_within_bound(
            17,
            crate::oracle::Precision::INT8,
            &int8_kernels(),
            Mlp::rounded_to_int8,
        );
    }

    /// `Mlp::rounded_to_bf16` or `Mlp::rounded_to_int8`.
    type RoundedPack = fn(&[LayerSpec<'_, f32>], Isa) -> Result<Mlp<f32>, Error>;

    /// `kernels` and, on every ISA, the f32 kernel on weights rounded by `rounded`, against the
    /// f64 reference on the unrounded weights: every output within its bound at `precision`.
    fn stays_within_bound<W: Weights<f32>>(
        seed: u64,
        precision: crate::oracle::Precision,
        kernels: &[(String, Isa, Kernel<W, f32>)],
        rounded: RoundedPack,
    ) {
        use crate::oracle::forward_bounds;
        let mut rng = SmallRng::seed_from_u64(seed);
        for widths in CHAINS {
            for relu_last in [false, true] {
                let layers = random_chain(&mut rng, widths, relu_last);
                let layers = with_random_ops(&mut rng, layers, relu_last);
                let layers32 = to_f32(&layers);
                // The reference runs the f32 parameters the kernels were given.
                let exact: Vec<OwnedLayer<f64>> = layers32
                    .iter()
                    .zip(&layers)
                    .map(|(l32, l)| OwnedLayer {
                        weight: l32.weight.iter().map(|&v| f64::from(v)).collect(),
                        bias: l32
                            .bias
                            .as_ref()
                            .map(|b| b.iter().map(|&v| f64::from(v)).collect()),
                        post_op: with_f32_params(l.post_op),
                        ..*l
                    })
                    .collect();
                let specs: Vec<_> = layers32.iter().map(OwnedLayer::spec).collect();
                for &rows in BATCHES {
                    let input32: Vec<f32> = (0..rows * widths[0])
                        .map(|_| rng.random_range(-2.0f32..2.0))
                        .collect();
                    let input: Vec<f64> = input32.iter().map(|&v| f64::from(v)).collect();
                    let want = reference(&exact, &input);
                    let (_, out_bounds) = forward_bounds(&exact, &input, precision);
                    let bounds = out_bounds.last().unwrap();
                    let emulated = dispatch::available().into_iter().map(|isa| {
                        let mlp = rounded(&specs, isa).unwrap();
                        assert_eq!(mlp.info().precision, W::PRECISION);
                        let mut got = vec![0.0f32; rows * mlp.out_features()];
                        mlp.forward(&input32, &mut got).unwrap();
                        (format!("{isa} f32 kernel on rounded weights"), got)
                    });
                    let narrow = kernels.iter().map(|(name, isa, kernel)| {
                        let mlp = Mlp::<f32, W>::with_kernel(&specs, *isa, *kernel).unwrap();
                        let mut got = vec![0.0f32; rows * mlp.out_features()];
                        mlp.forward(&input32, &mut got).unwrap();
                        (name.clone(), got)
                    });
                    for (name, got) in narrow.chain(emulated) {
                        for (at, ((&got, &want), &bound)) in
                            got.iter().zip(&want).zip(bounds).enumerate()
                        {
                            let error = (f64::from(got) - want).abs();
                            assert!(
                                error <= bound + 1e-30,
                                "{name} {widths:?} rows={rows} at {at}: {got} vs {want}, error \
                                 {error:e} > bound {bound:e}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// int8 keeps non-finite inputs visible: a row holding a NaN or an infinity comes out all
    /// NaN, the other rows as they would alone; a non-finite weight is refused at packing.
    #[test]
    fn int8_rows_with_non_finite_inputs_come_out_nan() {
        let weight: Vec<f32> = (0..12).map(|i| i as f32 / 7.0 - 0.8).collect();
        let spec = LayerSpec {
            weight: &weight,
            bias: None,
            out_features: 3,
            in_features: 4,
            post_op: PostOp::Relu,
        };
        // A 4-wide row (a partial register), and a 100-wide one: four whole registers quantized
        // together, then two alone, then a partial one (on 16-lane ISAs), its NaN's row NaN
        // through the next layer too, whose input is a hidden layer's.
        let mut rng = SmallRng::seed_from_u64(13);
        let wide = to_f32(&random_chain(&mut rng, &[100, 42, 5], true));
        let wide_specs: Vec<_> = wide.iter().map(OwnedLayer::spec).collect();
        let wide_row: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let check = |specs: &[LayerSpec<'_, f32>], clean: &[f32], places: &[usize]| {
            let out = specs[specs.len() - 1].out_features;
            for (name, isa, kernel) in int8_kernels() {
                let mlp = Mlp::<f32, i8>::with_kernel(specs, isa, kernel).unwrap();
                let mut alone = vec![0.0f32; out];
                mlp.forward(clean, &mut alone).unwrap();
                for (&at, bad) in places
                    .iter()
                    .flat_map(|at| [f32::NAN, f32::INFINITY, f32::NEG_INFINITY].map(|v| (at, v)))
                {
                    let mut row = clean.to_vec();
                    row[at] = bad;
                    let input = [clean, &row, clean].concat();
                    let mut output = vec![0.0f32; 3 * out];
                    mlp.forward(&input, &mut output).unwrap();
                    assert!(
                        output[out..2 * out].iter().all(|v| v.is_nan()),
                        "{name} {bad} at {at}: {output:?}"
                    );
                    assert_eq!(&output[..out], &alone, "{name} {bad} at {at}");
                    assert_eq!(&output[2 * out..], &alone, "{name} {bad} at {at}");
                }
            }
        };
        check(&[spec], &[0.5, -1.0, 2.0, 0.25], &[1]);
        check(&wide_specs, &wide_row, &[0, 37, 63, 64, 90, 96, 99]);
        let mut bad_weight = weight.clone();
        bad_weight[5] = f32::INFINITY;
        let bad = LayerSpec {
            weight: &bad_weight,
            ..spec
        };
        for isa in dispatch::available() {
            let error = Mlp::rounded_to_int8(&[bad], isa).unwrap_err();
            assert!(
                error.to_string().contains("weight [1, 1] is inf"),
                "{error}"
            );
            if dispatch::multiplies_int8(isa) {
                let error = Mlp::<f32, i8>::new(&[bad], isa).unwrap_err();
                assert!(
                    error.to_string().contains("needs finite weights"),
                    "{error}"
                );
            }
        }
    }

    /// Where bf16's form is [`Bf16Form::PairsForFewRows`], a chain on rounded weights runs its
    /// calls of at most [`PAIRS_MAX_ROWS`] rows on the pairs, bit for bit, and the larger ones
    /// on the f32 kernel; elsewhere it holds no pairs.
    #[test]
    fn bf16_calls_of_few_rows_run_on_the_pairs_where_the_form_says() {
        let mut rng = SmallRng::seed_from_u64(31);
        let layers = to_f32(&random_chain(&mut rng, &[37, 42, 5], false));
        let specs: Vec<_> = layers.iter().map(OwnedLayer::spec).collect();
        for isa in dispatch::available() {
            let chain = Mlp::rounded_to_bf16(&specs, isa).unwrap();
            let pairs = (dispatch::bf16_form(isa) == Bf16Form::PairsForFewRows)
                .then(|| Mlp::<f32, Bf16>::new(&specs, isa).unwrap());
            assert_eq!(chain.few_rows.is_some(), pairs.is_some(), "{isa}");
            let mut rounded = Mlp::rounded_to_bf16(&specs, isa).unwrap();
            rounded.few_rows = None;
            for rows in 0..=2 * PAIRS_MAX_ROWS + 1 {
                let input: Vec<f32> = (0..rows * 37)
                    .map(|_| rng.random_range(-2.0f32..2.0))
                    .collect();
                let run = |mlp: &dyn Forward<f32>| {
                    let mut output = vec![0.0f32; rows * 5];
                    mlp.forward(&input, &mut output).unwrap();
                    output
                };
                let want = match &pairs {
                    Some(pairs) if rows <= PAIRS_MAX_ROWS => run(pairs),
                    _ => run(&rounded),
                };
                assert_eq!(run(&chain), want, "{isa} rows={rows}");
            }
        }
    }

    /// Inference only: a bf16 chain, stored narrow or as rounded f32, refuses to keep activations
    /// or run a backward, with an error; an ISA without a bf16 kernel refuses bf16 storage.
    #[test]
    fn bf16_chains_refuse_to_train() {
        fn refuses_to_train<W: Weights<f32>>(mlp: &Mlp<f32, W>) {
            assert_eq!(mlp.info().precision, "bf16");
            let (input, mut output, mut saved) = ([1.0f32; 3], [0.0f32; 2], [0.0f32; 0]);
            let error = mlp
                .forward_saving(&input, &mut output, &mut saved)
                .unwrap_err();
            assert!(matches!(error, Error::Precision(_)), "{error}");
            assert!(error.to_string().contains("precision bf16"), "{error}");
            let mut grads = vec![0.0f32; mlp.gradients_len()];
            let error = mlp
                .backward(&input, &saved, &output, &output, &[true], None, &mut grads)
                .unwrap_err();
            assert!(error.to_string().contains("inference only"), "{error}");
            mlp.forward(&input, &mut output).unwrap();
            assert_eq!(output, [1.5, 1.5]);
        }
        let weight = [0.5f32; 6];
        let spec = LayerSpec {
            weight: &weight,
            bias: None,
            out_features: 2,
            in_features: 3,
            post_op: PostOp::Relu,
        };
        for isa in dispatch::available() {
            refuses_to_train(&Mlp::rounded_to_bf16(&[spec], isa).unwrap());
            match Mlp::<f32, Bf16>::new(&[spec], isa) {
                Ok(narrow) => {
                    assert_ne!(dispatch::bf16_form(isa), Bf16Form::Emulated);
                    refuses_to_train(&narrow);
                }
                Err(error) => {
                    assert_eq!(dispatch::bf16_form(isa), Bf16Form::Emulated);
                    assert!(error
                        .to_string()
                        .contains("no kernel for weights stored as bf16"));
                }
            }
        }
    }

    #[test]
    fn saved_activations_are_every_hidden_layer_on_every_isa() {
        let mut rng = SmallRng::seed_from_u64(13);
        for widths in [
            &[784, 42, 16, 42, 784][..],
            &[64, 42, 2],
            &[17, 1, 17],
            &[5, 3],
        ] {
            let layers = random_chain(&mut rng, widths, true);
            let layers = with_random_ops(&mut rng, layers, true);
            let layers32 = to_f32(&layers);
            for rows in [0, 1, 9, 100, 1000] {
                let input: Vec<f64> = (0..rows * widths[0])
                    .map(|_| rng.random_range(-2.0..2.0))
                    .collect();
                let input32: Vec<f32> = input.iter().map(|&v| v as f32).collect();
                let want = reference_layers(&layers, &input);
                let linears = reference_linears(&layers, &input);
                // Each row: the hidden layers' outputs, then the Linear of every layer whose
                // op's gradient reads it.
                let mut want_saved = Vec::new();
                for r in 0..rows {
                    for (layer, outputs) in layers.iter().zip(&want).take(layers.len() - 1) {
                        let out = layer.out_features;
                        want_saved.extend_from_slice(&outputs[r * out..][..out]);
                    }
                    for (layer, linear) in layers.iter().zip(&linears) {
                        if layer.post_op.gradient_reads_pre() {
                            let out = layer.out_features;
                            want_saved.extend_from_slice(&linear[r * out..][..out]);
                        }
                    }
                }
                for (isa, half) in isa_forms() {
                    let context = format!("{isa} half={half} {widths:?} rows={rows}");
                    let (got, saved) = run_saving(&layers, isa, half, &input);
                    assert!(max_relative_error(got.into_iter(), &want[want.len() - 1]) < 1e-12);
                    assert!(
                        max_relative_error(saved.into_iter(), &want_saved) < 1e-12,
                        "{context}"
                    );
                    let (got, saved) = run_saving(&layers32, isa, half, &input32);
                    let got = got.into_iter().map(f64::from);
                    assert!(
                        max_relative_error(got, &want[want.len() - 1]) < 1e-5,
                        "{context}"
                    );
                    let saved = saved.into_iter().map(f64::from);
                    assert!(max_relative_error(saved, &want_saved) < 1e-5, "{context}");
                }
            }
        }
    }

    #[test]
    fn backward_matches_the_reference_on_every_isa() {
        let mut rng = SmallRng::seed_from_u64(17);
        let mut worst32: f64 = 0.0;
        for widths in [
            &[784, 42, 16, 42, 784][..],
            &[64, 42, 2],
            &[17, 1, 17],
            &[5, 3],
            &[42, 64, 42, 17, 1],
            &[130, 45, 784, 42],
            // Layers whose weight gradient runs transposed on every SIMD ISA (1 -> 64, and
            // 2 -> 64 without a bias: `transposes_weight_gradient`).
            &[3, 1, 64],
            &[5, 9, 2, 64],
        ] {
            let layers = random_chain(&mut rng, widths, true);
            let layers = with_random_ops(&mut rng, layers, true);
            let layers32 = to_f32(&layers);
            let every = vec![true; layers.len()];
            for rows in [0, 1, 2, 9, 70, 300] {
                let draw = |rng: &mut SmallRng, n: usize| -> Vec<f64> {
                    (0..n).map(|_| rng.random_range(-2.0..2.0)).collect()
                };
                let input = draw(&mut rng, rows * widths[0]);
                let grad_output = draw(&mut rng, rows * widths[widths.len() - 1]);
                let (want_input, want) = reference_backward(&layers, &input, &grad_output);
                let input32: Vec<f32> = input.iter().map(|&v| v as f32).collect();
                let grad32: Vec<f32> = grad_output.iter().map(|&v| v as f32).collect();
                for (isa, half) in isa_forms() {
                    let context = format!("{isa} half={half} {widths:?} rows={rows}");
                    let (got_input, got) =
                        run_backward(&layers, isa, half, &input, &grad_output, &every);
                    let error = max_relative_error(got.into_iter(), &want)
                        .max(max_relative_error(got_input.into_iter(), &want_input));
                    assert!(error < 1e-8, "{context}: f64 error {error:e}");
                    let (got_input, got) =
                        run_backward(&layers32, isa, half, &input32, &grad32, &every);
                    let error = max_relative_error(got.into_iter().map(f64::from), &want).max(
                        max_relative_error(got_input.into_iter().map(f64::from), &want_input),
                    );
                    assert!(error < 1e-5, "{context}: f32 error {error:e}");
                    worst32 = worst32.max(error);
                }
            }
        }
        println!("worst f32 gradient error: {worst32:e}");
    }

    #[test]
    fn backward_skips_the_layers_below_the_gradients_wanted() {
        let mut rng = SmallRng::seed_from_u64(19);
        let layers = random_chain(&mut rng, &[9, 42, 5, 42, 9], true);
        let layers = with_random_ops(&mut rng, layers, true);
        let input: Vec<f64> = (0..33 * 9).map(|_| rng.random_range(-1.0..1.0)).collect();
        let grad_output: Vec<f64> = (0..33 * 9).map(|_| rng.random_range(-1.0..1.0)).collect();
        let (_, want) = reference_backward(&layers, &input, &grad_output);
        let (mlp, output, saved) = saving_forward(&layers, Isa::detect(), false, &input);
        let needs = [false, true, false, true];
        let mut grads = vec![f64::NAN; mlp.gradients_len()];
        mlp.backward(
            &input,
            &saved,
            &output,
            &grad_output,
            &needs,
            None,
            &mut grads,
        )
        .unwrap();
        let mut at = 0;
        for (layer, &needed) in layers.iter().zip(&needs) {
            let len = layer.out_features * (layer.in_features + 1);
            let (got, wanted) = (&grads[at..at + len], &want[at..at + len]);
            if needed {
                let error = max_relative_error(got.iter().copied(), wanted);
                assert!(error < 1e-10, "{:?}: {error:e}", layer.post_op);
            } else {
                assert!(
                    got.iter().all(|&v| v == 0.0),
                    "an unwanted layer's gradients are zeros"
                );
            }
            at += len;
        }
        let mut short = vec![0.0; mlp.gradients_len() - 1];
        let error = mlp
            .backward(
                &input,
                &saved,
                &output,
                &grad_output,
                &needs,
                None,
                &mut short,
            )
            .unwrap_err();
        assert!(error.to_string().contains("grads must have"), "{error}");
        let error = mlp
            .backward(
                &input,
                &saved,
                &output,
                &grad_output[1..],
                &needs,
                None,
                &mut grads,
            )
            .unwrap_err();
        assert!(
            error.to_string().contains("grad_output for 33 rows"),
            "{error}"
        );
    }

    #[test]
    fn weight_gradients_over_many_rows_stay_as_accurate_as_over_a_few() {
        // float32 products of 2^18 rows: one running sum per value drifted 8e-6 from the
        // float64 reference (error growing with the square root of the rows); summed
        // `SUMMED_ROWS` at a time, about what that many rows alone give.
        let mut rng = SmallRng::seed_from_u64(29);
        let layers = random_chain(&mut rng, &[16, 32, 16], true);
        let layers = with_random_ops(&mut rng, layers, true);
        let rows = 1 << 18;
        let draw = |rng: &mut SmallRng, n: usize| -> Vec<f64> {
            (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
        };
        let input = draw(&mut rng, rows * 16);
        let grad_output = draw(&mut rng, rows * 16);
        let (_, want) = reference_backward(&layers, &input, &grad_output);
        let input32: Vec<f32> = input.iter().map(|&v| v as f32).collect();
        let grad32: Vec<f32> = grad_output.iter().map(|&v| v as f32).collect();
        let every = [true, true];
        let (_, got) = run_backward(
            &to_f32(&layers),
            Isa::detect(),
            false,
            &input32,
            &grad32,
            &every,
        );
        let error = max_relative_error(got.into_iter().map(f64::from), &want);
        assert!(
            error < 2e-6,
            "f32 gradient error over {rows} rows: {error:e}"
        );
    }

    /// The chain on `isa`, with its output and saved activations for `input`.
    fn saving_forward<T: Float>(
        layers: &[OwnedLayer<T>],
        isa: Isa,
        half: bool,
        input: &[T],
    ) -> (Mlp<T>, Vec<T>, Vec<T>) {
        let specs: Vec<_> = layers.iter().map(OwnedLayer::spec).collect();
        let mlp = Mlp::with_kernel(&specs, isa, with_half(isa, half)).unwrap();
        let rows = input.len() / mlp.in_features();
        let mut output = vec![T::ZERO; rows * mlp.out_features()];
        let mut saved = vec![T::ZERO; rows * mlp.info().saved_width];
        mlp.forward_saving(input, &mut output, &mut saved).unwrap();
        (mlp, output, saved)
    }

    /// The chain's output and saved activations for `input`.
    fn run_saving<T: Float>(
        layers: &[OwnedLayer<T>],
        isa: Isa,
        half: bool,
        input: &[T],
    ) -> (Vec<T>, Vec<T>) {
        let (mlp, mut output, saved) = saving_forward(layers, isa, half, input);
        let mut short = vec![T::ZERO; saved.len().saturating_sub(1)];
        if !saved.is_empty() {
            let error = mlp
                .forward_saving(input, &mut output, &mut short)
                .unwrap_err();
            assert!(error.to_string().contains("saved activations"), "{error}");
        }
        (output, saved)
    }

    #[test]
    fn nan_and_inf_propagate_per_row() {
        // 16 outputs run in panel form, 3 (on SIMD ISAs) in dot-product form; with 99 rows, the
        // first 96 run with rows in the lanes where the ISA has it, where a row is one lane.
        for out in [16, 3] {
            nan_and_inf_propagate_through(out);
        }
    }

    fn nan_and_inf_propagate_through(out: usize) {
        let mut rng = SmallRng::seed_from_u64(3);
        let layers = to_f32(&random_chain(&mut rng, &[20, 42, out], false));
        let rows = 99;
        let mut input: Vec<f32> = (0..rows * 20)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let (nan_rows, inf_rows) = ([1, 60], [2, 97]);
        for row in nan_rows {
            input[row * 20 + 5] = f32::NAN;
        }
        for row in inf_rows {
            input[row * 20 + 2] = f32::INFINITY;
        }
        let scalar = run(&layers, Isa::Scalar, &input);
        for isa in dispatch::available() {
            let got = run(&layers, isa, &input);
            for (row, values) in got.chunks_exact(out).enumerate() {
                if nan_rows.contains(&row) {
                    assert!(values.iter().all(|v| v.is_nan()), "{isa}: NaN row {row}");
                } else if inf_rows.contains(&row) {
                    assert!(
                        values.iter().all(|v| !v.is_finite()),
                        "{isa}: Inf row {row}"
                    );
                } else {
                    assert!(
                        values.iter().all(|v| v.is_finite()),
                        "{isa}: row {row} clean"
                    );
                    let want: Vec<f64> = scalar[row * out..][..out]
                        .iter()
                        .map(|&v| v as f64)
                        .collect();
                    let got = values.iter().map(|&v| v as f64);
                    assert!(max_relative_error(got, &want) < 1e-5, "{isa}: row {row}");
                }
            }
        }
    }

    #[test]
    fn each_chain_gets_the_form_its_cost_model_picks() {
        let mut rng = SmallRng::seed_from_u64(5);
        for isa in dispatch::available() {
            let simd = isa != Isa::Scalar;
            let mut mlp = |widths: &[usize]| {
                let layers = to_f32(&random_chain(&mut rng, widths, false));
                let specs: Vec<_> = layers.iter().map(OwnedLayer::spec).collect();
                Mlp::<f32>::new(&specs, isa).unwrap()
            };
            // The 784-wide encoder and the whole AE keep the panel form (measured faster);
            // the digits encoder also gets rows in the lanes.
            for (widths, in_lanes) in [
                (&[784, 42, 16][..], false),
                (&[784, 42, 16, 42, 784][..], false),
                (&[64, 42, 2][..], simd),
            ] {
                let chain = mlp(widths);
                let lanes_layers = chain.packed.view().lanes_layers;
                assert_eq!(!lanes_layers.is_empty(), in_lanes, "{isa} {widths:?}");
            }
        }
        // On 16 lanes, 784 -> 42 stays padded (a dot-form tail of 10 measured slower) unless a
        // half register costs half: then 40 in panels (2.5 registers) and 2 in dot form. A
        // 2-wide output is all dot form, 130 -> 97 splits off its last output, and 784 -> 58
        // pads, or with cheaper halves takes 56 as panels of 32 + 24 (the half shares the last
        // panel) and 2 in dot form. On 8 lanes (f64) the half
        // split goes the other way for 784 -> 42 and takes 130 -> 45 to 44 + 1.
        if dispatch::available().contains(&Isa::Avx512) {
            for half in [false, true] {
                let mut form32 =
                    |widths: &[usize]| form(&to_f32(&random_chain(&mut rng, widths, false)), half);
                let padded = if half { (40, 42) } else { (42, 48) };
                assert_eq!(form32(&[784, 42]), padded, "half={half}");
                assert_eq!(form32(&[42, 2]), (0, 2), "half={half}");
                assert_eq!(form32(&[130, 97]), (96, 97), "half={half}");
                let padded = if half { (56, 58) } else { (58, 64) };
                assert_eq!(form32(&[784, 58]), padded, "half={half}");
                let mut form64 =
                    |widths: &[usize]| form(&random_chain(&mut rng, widths, false), half);
                let padded = if half { (42, 48) } else { (40, 42) };
                assert_eq!(form64(&[784, 42]), padded, "half={half}");
                let padded = if half { (44, 45) } else { (45, 48) };
                assert_eq!(form64(&[130, 45]), padded, "half={half}");
            }
        }
    }

    /// The first layer's `(dot_from, padded_out)` on AVX-512, half registers cheaper or not.
    fn form<T: Float>(layers: &[OwnedLayer<T>], half: bool) -> (usize, usize) {
        let specs: Vec<_> = layers.iter().map(OwnedLayer::spec).collect();
        let mlp = Mlp::with_kernel(&specs, Isa::Avx512, with_half(Isa::Avx512, half)).unwrap();
        let layer = mlp.packed.view().layers[0];
        (layer.dot_from, layer.padded_out)
    }

    #[test]
    fn threads_give_the_same_bits_as_one_thread() {
        let mut rng = SmallRng::seed_from_u64(11);
        let layers = to_f32(&random_chain(&mut rng, &[784, 42, 16], false));
        let input: Vec<f32> = (0..5000 * 784)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        threads::set_num_threads(1).unwrap();
        let single = run(&layers, Isa::detect(), &input);
        threads::set_num_threads(3).unwrap();
        let multi = run(&layers, Isa::detect(), &input);
        // The backward's weight gradients: the same bits on every call with 3 threads (each
        // thread's share of the rows is fixed), close to one thread's.
        let grad_output: Vec<f32> = (0..5000 * 16)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let every = [true, true];
        let (_, first) = run_backward(&layers, Isa::detect(), false, &input, &grad_output, &every);
        let (_, again) = run_backward(&layers, Isa::detect(), false, &input, &grad_output, &every);
        threads::set_num_threads(1).unwrap();
        let (_, alone) = run_backward(&layers, Isa::detect(), false, &input, &grad_output, &every);
        threads::set_num_threads(2).unwrap();
        assert_eq!(single, multi);
        assert_eq!(first, again);
        let alone: Vec<f64> = alone.into_iter().map(f64::from).collect();
        assert!(max_relative_error(first.into_iter().map(f64::from), &alone) < 1e-5);
        assert_eq!(
            threads::set_num_threads(0),
            Err("the number of threads must be between 1 and 1024, got 0".into())
        );
        assert!(threads::set_num_threads(threads::MAX_THREADS + 1).is_err());
        assert_eq!(threads::num_threads(), 2);
    }

    #[test]
    fn bad_shapes_are_errors_naming_both_sides() {
        let weight = vec![0.0f32; 6];
        let spec = |out, inp, bias| LayerSpec {
            weight: &weight,
            bias,
            out_features: out,
            in_features: inp,
            post_op: PostOp::Relu,
        };
        let message = |r: Result<Mlp<f32>, Error>| r.unwrap_err().to_string();
        assert!(message(Mlp::new(&[], Isa::Scalar)).contains("at least one layer"));
        assert!(
            message(Mlp::new(&[spec(2, 4, None)], Isa::Scalar)).contains("needs 8 values, got 6")
        );
        assert!(
            message(Mlp::new(&[spec(2, 3, Some(&[0.0; 3]))], Isa::Scalar))
                .contains("bias must have 2 values")
        );
        assert!(message(Mlp::new(
            &[spec(2, 3, None), spec(3, 2, None), spec(3, 2, None)],
            Isa::Scalar
        ))
        .contains("layer 2: takes 2 inputs but layer 1 gives 3 outputs"));
        assert!(message(Mlp::new(&[spec(usize::MAX, 2, None)], Isa::Scalar)).contains("too many"));
        let mlp = Mlp::<f32>::new(&[spec(2, 3, None)], Isa::Scalar).unwrap();
        let mut out = vec![0.0; 4];
        assert!(mlp
            .forward(&[0.0; 7], &mut out)
            .unwrap_err()
            .to_string()
            .contains("whole rows of 3"));
        assert!(mlp
            .forward(&[0.0; 9], &mut out)
            .unwrap_err()
            .to_string()
            .contains("3 x 2 values, got 4"));
    }

    #[test]
    fn fma_peak_is_measured_for_every_isa() {
        for isa in dispatch::available() {
            let gflops = crate::probe::fma_peak_gflops::<f32>(isa, 0.01).unwrap();
            assert!(gflops.is_finite() && gflops > 0.0, "{isa}: {gflops}");
        }
    }

    #[test]
    fn isa_names_round_trip_and_unknown_names_are_errors() {
        for isa in Isa::ALL {
            assert_eq!(Isa::parse(isa.name()), Ok(isa));
        }
        assert!(Isa::parse("sse9")
            .unwrap_err()
            .to_string()
            .contains("expected one of"));
        assert!(dispatch::available().contains(&Isa::Scalar));
        assert!(dispatch::available().contains(&Isa::detect()));
        // Every AArch64 CPU has NEON: the tests above must have run it, not only the scalar kernel.
        #[cfg(target_arch = "aarch64")]
        assert_eq!(Isa::detect(), Isa::Neon);
    }
}
