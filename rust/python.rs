//! The PyO3 bindings: the only file that knows about Python. Arrays in, arrays out, shapes and
//! dtypes checked with messages that name what was expected and what was given; the GIL released
//! around every numpy call but the smallest, and held for a tensor read through DLPack (see
//! `run_new_from_dlpack`).

use numpy::{
    PyArray1, PyArray2, PyArrayDescr, PyArrayMethods, PyReadonlyArray2, PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyMemoryError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyCapsule, PyString, PyTuple};

use crate::dispatch::{self, Bf16Form, Float, Isa, IsaError, Weights};
use crate::kernels::{Bf16, LINE_BYTES};
use crate::mlp::{AnyMlp, DType, Error, LayerSpec, Mlp};
use crate::ops::PostOp;
use crate::threads;

fn to_py_err(error: Error) -> PyErr {
    match error {
        Error::Shape(message) => PyValueError::new_err(message),
        Error::Isa(error @ IsaError::Unknown(_)) => PyValueError::new_err(error.to_string()),
        Error::Isa(error) => PyRuntimeError::new_err(error.to_string()),
        Error::Threads(message) => PyRuntimeError::new_err(message),
        Error::Precision(message) => PyValueError::new_err(message),
        Error::Memory(message) => PyMemoryError::new_err(message),
    }
}

/// "a 3-D float64 array" or "a list": what the caller passed, for error messages.
fn describe(value: &Bound<'_, PyAny>) -> String {
    let attr = |name: &str| {
        value
            .getattr(name)
            .and_then(|v| v.str().map(|s| s.to_string()))
    };
    match (attr("ndim"), attr("dtype")) {
        (Ok(ndim), Ok(dtype)) => format!("a {ndim}-D {dtype} array"),
        _ => value.get_type().name().map_or_else(
            |_| "an unknown object".to_owned(),
            |name| format!("a {name}"),
        ),
    }
}

fn cast_matrix<'a, 'py, T: Float + numpy::Element>(
    value: &'a Bound<'py, PyAny>,
    what: &str,
) -> PyResult<&'a Bound<'py, PyArray2<T>>> {
    value.cast::<PyArray2<T>>().map_err(|_| {
        PyTypeError::new_err(format!(
            "{what}: expected a 2-D {} numpy array, got {}",
            T::NAME,
            describe(value)
        ))
    })
}

/// The array's elements in memory order, which is row order only for a C-contiguous array
/// (`as_slice` also accepts Fortran order).
fn c_order<'a, T: numpy::Element, D: numpy::ndarray::Dimension>(
    array: &'a numpy::PyReadonlyArray<'_, T, D>,
    what: &str,
) -> PyResult<&'a [T]> {
    c_order_values(array.as_slice(), array.is_c_contiguous(), what)
}

/// An array's values from its `as_slice`, refused unless it is C-contiguous.
fn c_order_values<'a, T>(
    values: Result<&'a [T], numpy::AsSliceError>,
    c_contiguous: bool,
    what: &str,
) -> PyResult<&'a [T]> {
    match values {
        Ok(slice) if c_contiguous => Ok(slice),
        _ => Err(PyValueError::new_err(format!(
            "{what} must be C-contiguous and aligned"
        ))),
    }
}

/// The ISA `name`d, or the one new chains use; an error if unknown or unsupported here.
fn isa_or_selected(name: Option<&str>) -> PyResult<Isa> {
    name.map_or_else(dispatch::selected, Isa::parse)
        .map_err(|e| to_py_err(Error::Isa(e)))
}

/// Layer `index`'s post-op: a name (`"relu"`), or a tuple of a name and its parameters.
fn parse_post_op(value: &Bound<'_, PyAny>, index: usize) -> PyResult<PostOp> {
    let parsed = if let Ok(name) = value.cast::<PyString>() {
        PostOp::parse(name.to_str()?, &[])
    } else if let Ok(tuple) = value.cast::<PyTuple>() {
        let name: String = tuple
            .get_item(0)
            .and_then(|name| name.extract())
            .map_err(|_| {
                PyTypeError::new_err(format!(
                    "layer {index}: a post-op tuple starts with the op's name, got {tuple}"
                ))
            })?;
        let params: Vec<f64> = tuple.get_slice(1, tuple.len()).extract()?;
        PostOp::parse(&name, &params)
    } else {
        return Err(PyTypeError::new_err(format!(
            "layer {index}: a post-op is a name or a (name, *parameters) tuple, got {}",
            describe(value)
        )));
    };
    parsed.map_err(|message| PyValueError::new_err(format!("layer {index}: {message}")))
}

/// How a chain is packed from its layers: `Mlp::new`, `Mlp::rounded_to_bf16` or
/// `Mlp::rounded_to_int8`.
type Pack<T, W> = fn(&[LayerSpec<'_, T>], Isa) -> Result<Mlp<T, W>, Error>;

/// The chain of these arrays and post-ops, checked, packed by `pack`.
fn build<T: Float + numpy::Element, W: Weights<T>>(
    weights: &[Bound<'_, PyAny>],
    biases: &[Option<Bound<'_, PyAny>>],
    post_ops: &[Bound<'_, PyAny>],
    isa: Isa,
    pack: Pack<T, W>,
) -> PyResult<Mlp<T, W>> {
    if biases.len() != weights.len() || post_ops.len() != weights.len() {
        return Err(PyValueError::new_err(format!(
            "need one bias and one post-op per weight: got {} weights, {} biases, {} post-ops",
            weights.len(),
            biases.len(),
            post_ops.len()
        )));
    }
    let mut weight_arrays = Vec::with_capacity(weights.len());
    let mut bias_arrays = Vec::with_capacity(weights.len());
    for (index, (weight, bias)) in weights.iter().zip(biases).enumerate() {
        let what = format!("layer {index} weight");
        weight_arrays.push(cast_matrix::<T>(weight, &what)?.readonly());
        bias_arrays.push(match bias {
            None => None,
            Some(bias) => Some(
                bias.cast::<PyArray1<T>>()
                    .map_err(|_| {
                        PyTypeError::new_err(format!(
                            "layer {index} bias: expected a 1-D {} numpy array or None, got {}",
                            T::NAME,
                            describe(bias)
                        ))
                    })?
                    .readonly(),
            ),
        });
    }
    let mut specs = Vec::with_capacity(weights.len());
    for (index, ((weight, bias), post_op)) in weight_arrays
        .iter()
        .zip(&bias_arrays)
        .zip(post_ops)
        .enumerate()
    {
        let shape = weight.shape();
        specs.push(LayerSpec {
            weight: c_order(weight, &format!("layer {index} weight"))?,
            bias: match bias {
                Some(bias) => Some(c_order(bias, &format!("layer {index} bias"))?),
                None => None,
            },
            out_features: shape[0],
            in_features: shape[1],
            post_op: parse_post_op(post_op, index)?,
        });
    }
    pack(&specs, isa).map_err(to_py_err)
}

/// `x` checked as a `(rows, in_features)` array of the chain's dtype.
fn checked_matrix<'a, 'py, T: Float + numpy::Element, W: Weights<T>>(
    mlp: &Mlp<T, W>,
    x: &'a Bound<'py, PyAny>,
) -> PyResult<&'a Bound<'py, PyArray2<T>>> {
    let x = cast_matrix::<T>(x, "x")?;
    let in_features = x.shape()[1];
    if in_features != mlp.in_features() {
        return Err(PyValueError::new_err(format!(
            "x has {in_features} features per row, but the first layer takes {}",
            mlp.in_features()
        )));
    }
    Ok(x)
}

/// `x` borrowed for reading (numpy's borrow tracking, shared across Rust extensions).
fn borrowed<'py, T: Float + numpy::Element>(
    x: &Bound<'py, PyArray2<T>>,
) -> PyResult<PyReadonlyArray2<'py, T>> {
    x.try_readonly()
        .map_err(|e| PyValueError::new_err(format!("x: {e}")))
}

fn run_into<T: Float + numpy::Element, W: Weights<T>>(
    py: Python<'_>,
    mlp: &Mlp<T, W>,
    x: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let input = borrowed(checked_matrix(mlp, x)?)?;
    let rows = input.shape()[0];
    let out = cast_matrix::<T>(out, "out")?;
    if out.shape() != [rows, mlp.out_features()] {
        return Err(PyValueError::new_err(format!(
            "out must have shape ({rows}, {}), got {:?}",
            mlp.out_features(),
            out.shape()
        )));
    }
    let mut output = out.try_readwrite().map_err(|e| {
        PyValueError::new_err(format!(
            "out must be writeable and must not overlap x ({e})"
        ))
    })?;
    let input = c_order(&input, "x")?;
    let c_contiguous_out = output.is_c_contiguous();
    let output = match output.as_slice_mut() {
        Ok(slice) if c_contiguous_out => slice,
        _ => {
            return Err(PyValueError::new_err(
                "out must be C-contiguous and aligned",
            ))
        }
    };
    run_kernel(py, mlp, input, output)
}

fn run_kernel<T: Float, W: Weights<T>>(
    py: Python<'_>,
    mlp: &Mlp<T, W>,
    input: &[T],
    output: &mut [T],
) -> PyResult<()> {
    // A small call (a few microseconds) keeps the GIL: releasing and re-taking it would cost
    // more than other Python threads could do meanwhile (numpy draws the same line).
    if mlp.is_small(input.len() / mlp.in_features()) {
        mlp.forward(input, output)
    } else {
        py.detach(|| mlp.forward(input, output))
    }
    .map_err(to_py_err)
}

/// Largest output allocated through numpy's C API, which reports an allocation failure only as
/// a panic; larger ones go through `numpy.empty`, where it is a MemoryError.
const DIRECT_ALLOC_MAX_BYTES: usize = 1 << 20;

static NUMPY_EMPTY: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
static BUILTIN_SLICE: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

/// `numpy.empty`, looked up once (the module's import does it: a call during interpreter
/// shutdown, from a `__del__`, cannot import).
fn numpy_empty(py: Python<'_>) -> PyResult<&Bound<'_, PyAny>> {
    NUMPY_EMPTY.import(py, "numpy", "empty")
}

/// The built-in `slice`, looked up once.
fn builtin_slice(py: Python<'_>) -> PyResult<&Bound<'_, PyAny>> {
    BUILTIN_SLICE.import(py, "builtins", "slice")
}

/// A new uninitialised `(rows, width)` array for the kernel to fill.
///
/// # Safety
/// The caller writes every element before Python can see the array.
unsafe fn new_array<'py, T: Float + numpy::Element>(
    py: Python<'py>,
    rows: usize,
    width: usize,
) -> PyResult<Bound<'py, PyArray2<T>>> {
    let bytes = rows
        .checked_mul(width)
        .and_then(|n| n.checked_mul(std::mem::size_of::<T>()));
    match bytes {
        Some(bytes) if bytes <= DIRECT_ALLOC_MAX_BYTES => {
            // SAFETY: left uninitialised for the caller to fill, as the contract says.
            Ok(unsafe { PyArray2::<T>::new(py, [rows, width], false) })
        }
        Some(bytes) if bytes <= isize::MAX as usize - LINE_BYTES => {
            // numpy's large blocks start 16 or 32 bytes past a cache line, so every register
            // store of a wide output splits in two, and an op applied over the stored tile
            // (Sigmoid, GELU, ...) reads them back: the MNIST AE ending in Sigmoid ran 3-5%
            // slower than into an aligned array. Allocate a little more and start at a line.
            let values = rows * width;
            let spare = LINE_BYTES / std::mem::size_of::<T>();
            let block = numpy_empty(py)?
                .call1((values + spare, T::NAME))?
                .cast_into::<PyArray1<T>>()?;
            let address = block.data() as usize;
            let skip = (address.next_multiple_of(LINE_BYTES) - address) / std::mem::size_of::<T>();
            // Not `PySlice::new`: PyO3 0.30's leaks its three ints (28 bytes a call here).
            let slice = builtin_slice(py)?.call1((skip, skip + values))?;
            let out = block
                .get_item(slice)?
                .call_method1(intern!(py, "reshape"), ((rows, width),))?;
            Ok(out.cast_into::<PyArray2<T>>()?)
        }
        _ => Err(PyValueError::new_err(format!(
            "an output of {rows} x {width} {} values is larger than memory can address",
            T::NAME
        ))),
    }
}

/// [`new_array`] of `(rows, out_features)`.
///
/// # Safety
/// As for [`new_array`].
unsafe fn new_output<'py, T: Float + numpy::Element, W: Weights<T>>(
    py: Python<'py>,
    mlp: &Mlp<T, W>,
    rows: usize,
) -> PyResult<Bound<'py, PyArray2<T>>> {
    // SAFETY: forwarded from the caller.
    unsafe { new_array(py, rows, mlp.out_features()) }
}

/// Runs the chain on `input` into a new array.
fn run_new_from<'py, T: Float + numpy::Element, W: Weights<T>>(
    py: Python<'py>,
    mlp: &Mlp<T, W>,
    input: &[T],
    rows: usize,
) -> PyResult<Bound<'py, PyAny>> {
    // SAFETY: the kernel below writes every element; if it fails, the array is dropped here,
    // never seen by Python.
    let out = unsafe { new_output(py, mlp, rows) }?;
    // SAFETY: `out` was created above as a C-contiguous array and no other reference to it
    // exists yet, so nothing else reads or writes it while the kernel fills it. (The borrow
    // tracking of `readwrite` would cost a sixth of a batch-1 call.)
    let output = unsafe { out.as_slice_mut() }
        .map_err(|e| PyRuntimeError::new_err(format!("new output array: {e}")))?;
    run_kernel(py, mlp, input, output)?;
    Ok(out.into_any())
}

/// The chain on `x` into a new array: one native call for the common case, where batch-1
/// latency is mostly call overhead.
fn run_new<'py, T: Float + numpy::Element, W: Weights<T>>(
    py: Python<'py>,
    mlp: &Mlp<T, W>,
    x: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    let x = checked_matrix(mlp, x)?;
    let rows = x.shape()[0];
    if !mlp.is_small(rows) {
        return run_new_from(py, mlp, c_order(&borrowed(x)?, "x")?, rows);
    }
    // SAFETY: a small call holds the GIL until it returns, so no Python code writes `x` while
    // the kernel reads it, and the output is a new array, so they cannot overlap. Borrow
    // tracking would only add the writers of other Rust extensions that released the GIL (not
    // numpy's own loops, which ignore it) and cost a tenth of a batch-1 call.
    let input = c_order_values(unsafe { x.as_slice() }, x.is_c_contiguous(), "x")?;
    run_new_from(py, mlp, input, rows)
}

/// DLPack's structs (`dlpack.h`, unversioned ABI), as far as a consumer reads them.
mod dlpack {
    use std::ffi::c_void;

    /// `kDLCPU`.
    pub const CPU: i32 = 1;
    /// `kDLFloat`.
    pub const FLOAT: u8 = 2;
    /// A capsule holding an unconsumed [`ManagedTensor`].
    pub const CAPSULE_NAME: &std::ffi::CStr = c"dltensor";

    #[repr(C)]
    pub struct Device {
        pub device_type: i32,
        pub device_id: i32,
    }

    #[repr(C)]
    pub struct DataType {
        pub code: u8,
        pub bits: u8,
        pub lanes: u16,
    }

    #[repr(C)]
    pub struct Tensor {
        pub data: *mut c_void,
        pub device: Device,
        pub ndim: i32,
        pub dtype: DataType,
        pub shape: *const i64,
        /// Null: compact row-major.
        pub strides: *const i64,
        pub byte_offset: u64,
    }

    #[repr(C)]
    pub struct ManagedTensor {
        pub dl_tensor: Tensor,
        pub manager_ctx: *mut c_void,
        pub deleter: Option<unsafe extern "C" fn(*mut ManagedTensor)>,
    }
}

/// The `(rows, in_features)` values of the tensor in a DLPack capsule (`torch.utils.dlpack.
/// to_dlpack(x)`), read where they lie: a CPU tensor of `T`, C-contiguous, of shape
/// `(*, in_features)`. Everything the kernel will read is derived from the capsule's own
/// description of the tensor, never from a number the caller chose. The values stay valid while
/// `capsule` is alive (it owns a reference to the tensor) and the tensor is not resized, which
/// the GIL held for the call keeps any Python thread from starting; a resize already running in
/// another thread (PyTorch releases the GIL inside `resize_`) races with every reader of the
/// tensor, PyTorch's own ops included, and is the caller's to avoid. The pointer arithmetic
/// here is that of reading a foreign struct, not of a kernel.
fn dlpack_rows<'a, T: Float>(
    capsule: &'a Bound<'_, PyAny>,
    in_features: usize,
) -> PyResult<(&'a [T], usize)> {
    let capsule = capsule.cast::<PyCapsule>().map_err(|_| {
        PyTypeError::new_err(format!(
            "expected a DLPack capsule, got {}",
            describe(capsule)
        ))
    })?;
    let managed = capsule
        .pointer_checked(Some(dlpack::CAPSULE_NAME))
        .map_err(|_| PyValueError::new_err("expected an unconsumed 'dltensor' DLPack capsule"))?;
    // SAFETY: by the DLPack protocol, a capsule named "dltensor" holds a valid `ManagedTensor`
    // that lives at least as long as the capsule, which `capsule` keeps alive for 'a.
    let tensor = unsafe { &managed.cast::<dlpack::ManagedTensor>().as_ref().dl_tensor };
    let dtype = &tensor.dtype;
    if tensor.device.device_type != dlpack::CPU {
        return Err(PyValueError::new_err(format!(
            "the fused kernel takes CPU tensors, got DLPack device type {}",
            tensor.device.device_type
        )));
    }
    if (dtype.code, usize::from(dtype.bits), dtype.lanes) != (dlpack::FLOAT, 8 * size_of::<T>(), 1)
    {
        return Err(PyTypeError::new_err(format!(
            "expected {} values, got DLPack type code {} of {} bits x {} lanes",
            T::NAME,
            dtype.code,
            dtype.bits,
            dtype.lanes
        )));
    }
    let ndim = usize::try_from(tensor.ndim).unwrap_or(0);
    let shape: &[i64] = if ndim == 0 {
        &[]
    } else {
        // SAFETY: DLPack's `shape` points to `ndim` values.
        unsafe { std::slice::from_raw_parts(tensor.shape, ndim) }
    };
    let dims: Option<Vec<usize>> = shape.iter().map(|&d| usize::try_from(d).ok()).collect();
    let dims = dims.unwrap_or_default();
    if dims.len() != ndim || dims.last() != Some(&in_features) {
        return Err(PyValueError::new_err(format!(
            "expected a tensor of shape (*, {in_features}), got shape {shape:?}"
        )));
    }
    let too_large = || PyValueError::new_err(format!("a tensor of shape {shape:?} is too large"));
    let len = dims
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .filter(|n| {
            n.checked_mul(size_of::<T>())
                .is_some_and(|b| b <= isize::MAX as usize)
        })
        .ok_or_else(too_large)?;
    let rows = len / in_features;
    if len == 0 {
        return Ok((&[], rows));
    }
    if !tensor.strides.is_null() {
        // SAFETY: DLPack's `strides`, where not null, points to `ndim` values.
        let strides = unsafe { std::slice::from_raw_parts(tensor.strides, ndim) };
        let mut expected: i64 = 1;
        for (&dim, &stride) in shape.iter().zip(strides).rev() {
            if dim > 1 && stride != expected {
                return Err(PyValueError::new_err(
                    "the fused kernel reads C-contiguous tensors",
                ));
            }
            expected = expected.saturating_mul(dim);
        }
    }
    let offset = usize::try_from(tensor.byte_offset).map_err(|_| too_large())?;
    let data = tensor.data.cast::<u8>().wrapping_add(offset).cast::<T>();
    if data.is_null() || !data.is_aligned() {
        return Err(PyValueError::new_err(format!(
            "the tensor's data is not that of aligned {} values",
            T::NAME
        )));
    }
    // SAFETY: by DLPack, a CPU tensor's `data + byte_offset` holds its `len` values, here
    // C-contiguous, non-null and aligned (checked above); the capsule borrowed for 'a keeps them
    // alive, and the caller's GIL keeps Python threads from resizing the tensor; the contract
    // above leaves a resize already running in another thread to the Python caller.
    Ok((unsafe { std::slice::from_raw_parts(data, len) }, rows))
}

/// The chain on the tensor in a DLPack capsule, into a new `(rows, out_features)` array. The GIL
/// stays held (see `dlpack_rows`), also for a large call, unlike the numpy path: another Python
/// thread could otherwise resize the tensor, and PyTorch free its memory, under the kernel. The
/// price: other Python threads wait for a large torch call (fusedae's own threads still share
/// its rows).
fn run_new_from_dlpack<'py, T: Float + numpy::Element, W: Weights<T>>(
    py: Python<'py>,
    mlp: &Mlp<T, W>,
    capsule: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    let (input, rows) = dlpack_rows::<T>(capsule, mlp.in_features())?;
    // SAFETY: the kernel below writes every element; if it fails, the array is dropped here,
    // never seen by Python.
    let out = unsafe { new_output(py, mlp, rows) }?;
    // SAFETY: as in `run_new_from`: a new C-contiguous array no one else references yet.
    let output = unsafe { out.as_slice_mut() }
        .map_err(|e| PyRuntimeError::new_err(format!("new output array: {e}")))?;
    mlp.forward(input, output).map_err(to_py_err)?;
    Ok(out.into_any())
}

/// [`run_new_from_dlpack`] that also returns every hidden layer's outputs (after its post-op),
/// `(rows, saved_width)`, layer after layer in each row (see [`Mlp::forward_saving`]): what a
/// backward reads instead of computing the forward again.
fn run_saving_from_dlpack<'py, T: Float + numpy::Element, W: Weights<T>>(
    py: Python<'py>,
    mlp: &Mlp<T, W>,
    capsule: &Bound<'py, PyAny>,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
    let (input, rows) = dlpack_rows::<T>(capsule, mlp.in_features())?;
    // SAFETY: the kernel below writes every element; if it fails, the array is dropped here,
    // never seen by Python.
    let out = unsafe { new_output(py, mlp, rows) }?;
    // SAFETY: as for `out`: `forward_saving` writes every saved value.
    let saved = unsafe { new_array::<T>(py, rows, mlp.info().saved_width) }?;
    // SAFETY: as in `run_new_from`: new C-contiguous arrays no one else references yet.
    let (output, saved_values) = unsafe { (out.as_slice_mut(), saved.as_slice_mut()) };
    let error = |e| PyRuntimeError::new_err(format!("new output array: {e}"));
    mlp.forward_saving(input, output.map_err(error)?, saved_values.map_err(error)?)
        .map_err(to_py_err)?;
    Ok((out.into_any(), saved.into_any()))
}

/// The tensors a backward reads, as DLPack capsules (see `Chain._backward_dlpack`).
struct BackwardCapsules<'a, 'py> {
    input: &'a Bound<'py, PyAny>,
    saved: &'a Bound<'py, PyAny>,
    output: &'a Bound<'py, PyAny>,
    grad_output: &'a Bound<'py, PyAny>,
}

/// The chain's backward ([`Mlp::backward`]) on tensors read through DLPack where they lie, the
/// GIL held (see `dlpack_rows`): `(grad_input or None, grads)`, `grads` a new 1-d array of
/// every layer's weight and bias gradients, one after another.
fn backward_from_dlpack<'py, T: Float + numpy::Element, W: Weights<T>>(
    py: Python<'py>,
    mlp: &Mlp<T, W>,
    capsules: &BackwardCapsules<'_, 'py>,
    needs_params: &[bool],
    needs_input: bool,
) -> PyResult<(Option<Bound<'py, PyAny>>, Bound<'py, PyAny>)> {
    let info = mlp.info();
    let (input, rows) = dlpack_rows::<T>(capsules.input, info.in_features)?;
    let (output, _) = dlpack_rows::<T>(capsules.output, info.out_features)?;
    let (grad_output, _) = dlpack_rows::<T>(capsules.grad_output, info.out_features)?;
    let saved = if info.saved_width == 0 {
        &[][..]
    } else {
        dlpack_rows::<T>(capsules.saved, info.saved_width)?.0
    };
    // SAFETY: the backward below writes every element; if it fails, the arrays are dropped
    // here, never seen by Python.
    let grads = unsafe { new_array::<T>(py, 1, mlp.gradients_len()) }?;
    let grad_input = if needs_input {
        // SAFETY: as for `grads`.
        Some(unsafe { new_array::<T>(py, rows, info.in_features) }?)
    } else {
        None
    };
    let error = |e| PyRuntimeError::new_err(format!("new gradient array: {e}"));
    // SAFETY: new C-contiguous arrays no one else references yet.
    let grads_values = unsafe { grads.as_slice_mut() }.map_err(error)?;
    let grad_input_values = match &grad_input {
        // SAFETY: as above.
        Some(array) => Some(unsafe { array.as_slice_mut() }.map_err(error)?),
        None => None,
    };
    mlp.backward(
        input,
        saved,
        output,
        grad_output,
        needs_params,
        grad_input_values,
        grads_values,
    )
    .map_err(to_py_err)?;
    Ok((grad_input.map(Bound::into_any), grads.into_any()))
}

/// What a call reads.
#[derive(Clone, Copy)]
enum Input<'a, 'py> {
    /// A numpy array, and where to write (a new array if none).
    Array(&'a Bound<'py, PyAny>, Option<&'a Bound<'py, PyAny>>),
    /// A DLPack capsule (a torch tensor's), into a new array.
    DLPack(&'a Bound<'py, PyAny>),
}

/// Runs `mlp` on `input`: the one function every call goes through, whatever the dtype.
fn call<'py, T: Float + numpy::Element, W: Weights<T>>(
    py: Python<'py>,
    mlp: &Mlp<T, W>,
    input: Input<'_, 'py>,
) -> PyResult<Bound<'py, PyAny>> {
    match input {
        Input::Array(x, None) => run_new(py, mlp, x),
        Input::Array(x, Some(out)) => run_into(py, mlp, x, out).map(|()| out.clone()),
        Input::DLPack(capsule) => run_new_from_dlpack(py, mlp, capsule),
    }
}

/// A chain of Linear layers packed for the fused kernels.
///
/// Calling it takes the common case natively (batch-1 latency is mostly call overhead): a
/// C-contiguous `(rows, in_features)` array of the chain's dtype, into a new array or `out`.
/// What that refuses goes to the subclass's `_call_general(x, out)` if it has one
/// (`fusedae.MLP` converts other input there and words the errors), else raises.
#[pyclass(frozen, subclass, module = "fusedae._native")]
struct Chain {
    mlp: AnyMlp,
}

impl Chain {
    /// The one place a call is dispatched on the chain's dtype.
    fn call<'py>(&self, py: Python<'py>, input: Input<'_, 'py>) -> PyResult<Bound<'py, PyAny>> {
        match &self.mlp {
            AnyMlp::F32(mlp) => call(py, mlp, input),
            AnyMlp::F64(mlp) => call(py, mlp, input),
            AnyMlp::Bf16(mlp) => call(py, mlp, input),
            AnyMlp::Int8(mlp) => call(py, mlp, input),
        }
    }
}

#[pymethods]
impl Chain {
    #[new]
    #[pyo3(signature = (weights, biases, post_ops, isa=None, precision=None))]
    fn new(
        weights: Vec<Bound<'_, PyAny>>,
        biases: Vec<Option<Bound<'_, PyAny>>>,
        post_ops: Vec<Bound<'_, PyAny>>,
        isa: Option<&str>,
        precision: Option<&str>,
    ) -> PyResult<Self> {
        let isa = isa_or_selected(isa)?;
        let first = weights
            .first()
            .ok_or_else(|| PyValueError::new_err("an MLP needs at least one layer, got 0"))?;
        let is_f64 = first.cast::<PyArray2<f64>>().is_ok();
        let mlp = match (precision, is_f64) {
            (None, true) => AnyMlp::F64(build(&weights, &biases, &post_ops, isa, Mlp::new)?),
            (None, false) => AnyMlp::F32(build(&weights, &biases, &post_ops, isa, Mlp::new)?),
            (Some("bf16"), _) if dispatch::bf16_weights_narrow(isa) => {
                AnyMlp::Bf16(build::<f32, Bf16>(
                    &weights,
                    &biases,
                    &post_ops,
                    isa,
                    Mlp::new,
                )?)
            }
            (Some("bf16"), _) => AnyMlp::F32(build(
                &weights,
                &biases,
                &post_ops,
                isa,
                Mlp::rounded_to_bf16,
            )?),
            (Some("int8"), _) if dispatch::multiplies_int8(isa) => AnyMlp::Int8(build::<f32, i8>(
                &weights,
                &biases,
                &post_ops,
                isa,
                Mlp::new,
            )?),
            (Some("int8"), _) => AnyMlp::F32(build(
                &weights,
                &biases,
                &post_ops,
                isa,
                Mlp::rounded_to_int8,
            )?),
            (Some(other), _) => {
                return Err(PyValueError::new_err(format!(
                    "precision must be None (the weights' dtype), 'bf16' or 'int8', got {other:?}"
                )))
            }
        };
        Ok(Chain { mlp })
    }

    /// The chain on `x` into a new `(rows, out_features)` array, or into `out` (returned); raises
    /// on anything but the common case above, whatever the subclass.
    #[pyo3(signature = (x, out=None))]
    fn forward<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        out: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.call(py, Input::Array(x, out))
    }

    /// `forward`, or the subclass's `_call_general` for what `forward` refuses.
    #[pyo3(signature = (x, out=None))]
    fn __call__<'py>(
        slf: &Bound<'py, Self>,
        x: &Bound<'py, PyAny>,
        out: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = slf.py();
        match slf.get().forward(py, x, out) {
            Err(refused)
                if refused.is_instance_of::<PyTypeError>(py)
                    || refused.is_instance_of::<PyValueError>(py) =>
            {
                match slf.getattr(intern!(py, "_call_general")) {
                    Ok(general) => general.call1((x, out)),
                    Err(_) => Err(refused),
                }
            }
            result => result,
        }
    }

    /// The chain on the tensor in a DLPack `capsule` (`torch.utils.dlpack.to_dlpack(x)` of a
    /// C-contiguous CPU tensor of the chain's dtype and shape `(*, in_features)`), into a new
    /// `(rows, out_features)` array. Private to `fusedae.torch`, which reads a tensor where it
    /// lies through it (`Tensor.numpy()` costs more on a one-row call). The GIL stays held for the
    /// call, so another Python thread resizing the tensor waits until it is done.
    fn _forward_dlpack<'py>(
        &self,
        py: Python<'py>,
        capsule: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.call(py, Input::DLPack(capsule))
    }

    /// `_forward_dlpack` that also returns every hidden layer's outputs (after its post-op), one
    /// layer after another in each row: `(output, saved)`, `saved` of shape `(rows, sum of the
    /// hidden layers' widths)`, for the backward of `fusedae.torch`. Private to it.
    fn _forward_saving_dlpack<'py>(
        &self,
        py: Python<'py>,
        capsule: &Bound<'py, PyAny>,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
        match &self.mlp {
            AnyMlp::F32(mlp) => run_saving_from_dlpack(py, mlp, capsule),
            AnyMlp::F64(mlp) => run_saving_from_dlpack(py, mlp, capsule),
            AnyMlp::Bf16(mlp) => run_saving_from_dlpack(py, mlp, capsule),
            AnyMlp::Int8(mlp) => run_saving_from_dlpack(py, mlp, capsule),
        }
    }

    /// The chain's backward, for `fusedae.torch`'s autograd Function (private to it): from the
    /// forward's input `x`, kept activations `saved` and output `y` (as
    /// `_forward_saving_dlpack` returned them) and `grad_output`, all C-contiguous CPU tensors
    /// of the chain's dtype as DLPack capsules: `(grad_x or None, grads)`, `grads` 1-d, every layer's
    /// weight gradient (`out x in`) then bias gradient (`out`), zeros where `needs_params` is
    /// false; `grad_x` `(rows, in_features)` where `needs_input`.
    #[allow(clippy::too_many_arguments)]
    fn _backward_dlpack<'py>(
        &self,
        py: Python<'py>,
        x: &Bound<'py, PyAny>,
        saved: &Bound<'py, PyAny>,
        y: &Bound<'py, PyAny>,
        grad_output: &Bound<'py, PyAny>,
        needs_params: Vec<bool>,
        needs_input: bool,
    ) -> PyResult<(Option<Bound<'py, PyAny>>, Bound<'py, PyAny>)> {
        let capsules = BackwardCapsules {
            input: x,
            saved,
            output: y,
            grad_output,
        };
        match &self.mlp {
            AnyMlp::F32(mlp) => {
                backward_from_dlpack(py, mlp, &capsules, &needs_params, needs_input)
            }
            AnyMlp::F64(mlp) => {
                backward_from_dlpack(py, mlp, &capsules, &needs_params, needs_input)
            }
            AnyMlp::Bf16(mlp) => {
                backward_from_dlpack(py, mlp, &capsules, &needs_params, needs_input)
            }
            AnyMlp::Int8(mlp) => {
                backward_from_dlpack(py, mlp, &capsules, &needs_params, needs_input)
            }
        }
    }

    /// Where a row of `saved` keeps each layer's values: per layer, `(outputs, pre)`, the
    /// columns its outputs (every layer but the last) and its pre-activations (where its op's
    /// gradient reads them) start at, or None.
    #[getter]
    fn saved_columns(&self) -> Vec<(Option<usize>, Option<usize>)> {
        self.mlp
            .saved_columns()
            .into_iter()
            .map(|columns| (columns.outputs, columns.pre))
            .collect()
    }

    #[getter]
    fn saved_width(&self) -> usize {
        self.mlp.info().saved_width
    }

    /// The numpy dtype of the chain's values (float32 or float64).
    #[getter]
    fn dtype<'py>(&self, py: Python<'py>) -> Bound<'py, PyArrayDescr> {
        // numpy's own descriptors, not a name parsed on each call (300 ns, on the training path).
        match self.mlp.info().dtype {
            DType::F32 => numpy::dtype::<f32>(py),
            DType::F64 => numpy::dtype::<f64>(py),
        }
    }

    /// How the weights are stored: "fp32", "fp64" (the dtype's) or "bf16".
    #[getter]
    fn precision(&self) -> &'static str {
        self.mlp.info().precision
    }

    #[getter]
    fn isa(&self) -> &'static str {
        self.mlp.info().isa.name()
    }

    #[getter]
    fn in_features(&self) -> usize {
        self.mlp.info().in_features
    }

    #[getter]
    fn out_features(&self) -> usize {
        self.mlp.info().out_features
    }

    #[getter]
    fn flops_per_row(&self) -> usize {
        self.mlp.info().flops_per_row
    }
}

/// The ISA new chains use (`FUSEDAE_ISA` or the best detected); raises if the forced one is
/// unknown or unsupported here.
#[pyfunction]
fn selected_isa() -> PyResult<&'static str> {
    dispatch::selected()
        .map(Isa::name)
        .map_err(|e| to_py_err(Error::Isa(e)))
}

/// Whether the selected ISA's kernels count half a register as half the cost of a whole one
/// (decided from the CPU's identity: Zen 4's AVX-512; see `dispatch::half_registers_cheaper`).
#[pyfunction]
fn half_registers_cheaper() -> PyResult<bool> {
    dispatch::selected()
        .map(dispatch::half_registers_cheaper)
        .map_err(|e| to_py_err(Error::Isa(e)))
}

/// The CPU's vendor as CPUID names it (`"AuthenticAMD"`, `"GenuineIntel"`), `""` off x86-64.
#[pyfunction]
fn cpu_vendor() -> &'static str {
    dispatch::cpu_vendor()
}

/// Every ISA this CPU can run, best first.
#[pyfunction]
fn available_isas() -> Vec<&'static str> {
    dispatch::available().into_iter().map(Isa::name).collect()
}

#[pyfunction]
fn set_num_threads(threads: i64) -> PyResult<()> {
    let count = usize::try_from(threads).unwrap_or(0);
    threads::set_num_threads(count).map_err(|_| {
        PyValueError::new_err(format!(
            "threads must be between 1 and {}, got {threads}",
            threads::MAX_THREADS
        ))
    })
}

#[pyfunction]
fn get_num_threads() -> usize {
    threads::num_threads()
}

/// Where the thread count came from: set_num_threads, FUSEDAE_NUM_THREADS, OMP_NUM_THREADS or
/// the CPUs this process may use, and OMP_THREAD_LIMIT where it capped the last three.
#[pyfunction]
fn threads_source() -> String {
    threads::threads_source()
}

/// Runs the calling thread's multithreaded calls on the threads of the OpenMP runtime `library`
/// (a path or a loaded library's name) already loaded in this process, while it runs that
/// thread's parallel regions on more than one thread: False, and nothing changes, where none of
/// that name is loaded or it has no `GOMP_parallel`.
#[pyfunction]
fn share_openmp_threads(library: &str) -> bool {
    threads::share_openmp_threads(library)
}

/// Runs fusedae's multithreaded calls on its own pool again.
#[pyfunction]
fn use_own_threads() {
    threads::use_own_threads();
}

/// The threads the calling thread's multithreaded calls are handed to: "fusedae" (its pool) or
/// "openmp:" and the library (whose threads run them while it runs that thread on more than one).
#[pyfunction]
fn threads_runtime() -> String {
    threads::threads_runtime()
}

/// GFLOP/s of one thread running register-only FMAs for about `seconds` (`dtype` "float32" or
/// "float64"; `isa` defaults to the selected one): the ceiling to quote kernel speed against.
/// `precision="bf16"` or `"int8"`: the ceiling of that precision's kernel's own instruction
/// instead (`vdpbf16ps`, `vpdpbusd` where it has one, counted as the FMAs it replaces; else the
/// float32 FMA).
#[pyfunction]
#[pyo3(signature = (seconds=0.2, dtype="float32", isa=None, precision=None))]
fn fma_peak_gflops(
    py: Python<'_>,
    seconds: f64,
    dtype: &str,
    isa: Option<&str>,
    precision: Option<&str>,
) -> PyResult<f64> {
    let isa = isa_or_selected(isa)?;
    let result = match (dtype, precision) {
        ("float32", None) => py.detach(|| crate::probe::fma_peak_gflops::<f32>(isa, seconds)),
        ("float64", None) => py.detach(|| crate::probe::fma_peak_gflops::<f64>(isa, seconds)),
        ("float32", Some("bf16")) => py.detach(|| crate::probe::bf16_peak_gflops(isa, seconds)),
        ("float32", Some("int8")) => py.detach(|| crate::probe::int8_peak_gflops(isa, seconds)),
        (_, Some(other)) if other != "bf16" && other != "int8" => {
            return Err(PyValueError::new_err(format!(
                "precision must be None, 'bf16' or 'int8', got {other:?}"
            )))
        }
        (other, _) => {
            return Err(PyTypeError::new_err(format!(
                "dtype must be 'float32' or 'float64' (float32 for bf16 and int8), got {other:?}"
            )))
        }
    };
    result.map_err(to_py_err)
}

/// How each precision runs on `isa` (default: the selected one): `"native"` where the kernel
/// multiplies in that precision's own instructions, `"widened"` where the weights are stored
/// narrow and widened to float32 in registers, `"emulated"` where the float32 kernel runs the
/// weights rounded to it (int8: the inputs left in float32), `"mixed"` for bf16 native in calls
/// of a row or two and emulated in larger ones.
#[pyfunction]
#[pyo3(signature = (isa=None))]
fn precision_support(isa: Option<&str>) -> PyResult<Vec<(&'static str, &'static str)>> {
    let isa = isa_or_selected(isa)?;
    let bf16 = match dispatch::bf16_form(isa) {
        Bf16Form::Pairs => "native",
        Bf16Form::PairsForFewRows => "mixed",
        Bf16Form::Widening => "widened",
        Bf16Form::Emulated => "emulated",
    };
    let int8 = if dispatch::multiplies_int8(isa) {
        "native"
    } else {
        "emulated"
    };
    Ok(vec![
        ("fp32", "native"),
        ("fp64", "native"),
        ("bf16", bf16),
        ("int8", int8),
    ])
}

#[pymodule]
fn _native(module: &Bound<'_, PyModule>) -> PyResult<()> {
    numpy_empty(module.py())?;
    builtin_slice(module.py())?;
    module.add("__version__", env!("CARGO_PKG_VERSION"))?;
    module.add(
        "build_profile",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
    )?;
    module.add("target_arch", std::env::consts::ARCH)?;
    module.add("POST_OPS", PyTuple::new(module.py(), PostOp::NAMES)?)?;
    module.add_class::<Chain>()?;
    module.add_function(wrap_pyfunction!(selected_isa, module)?)?;
    module.add_function(wrap_pyfunction!(available_isas, module)?)?;
    module.add_function(wrap_pyfunction!(half_registers_cheaper, module)?)?;
    module.add_function(wrap_pyfunction!(cpu_vendor, module)?)?;
    module.add_function(wrap_pyfunction!(set_num_threads, module)?)?;
    module.add_function(wrap_pyfunction!(get_num_threads, module)?)?;
    module.add_function(wrap_pyfunction!(threads_source, module)?)?;
    module.add_function(wrap_pyfunction!(share_openmp_threads, module)?)?;
    module.add_function(wrap_pyfunction!(use_own_threads, module)?)?;
    module.add_function(wrap_pyfunction!(threads_runtime, module)?)?;
    module.add("MAX_THREADS", threads::MAX_THREADS)?;
    module.add_function(wrap_pyfunction!(fma_peak_gflops, module)?)?;
    module.add_function(wrap_pyfunction!(precision_support, module)?)?;
    Ok(())
}
