//! The PyO3 bindings: the only file that knows about Python. Arrays in, arrays out, shapes and
//! dtypes checked with messages that name what was expected and what was given, and the GIL
//! released around every kernel call but the smallest.

use numpy::{
    PyArray1, PyArray2, PyArrayDescr, PyArrayMethods, PyReadonlyArray2, PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;

use crate::dispatch::{self, Float, Isa, IsaError};
use crate::mlp::{Error, LayerSpec, Mlp};
use crate::pack::Activation;
use crate::threads;

fn to_py_err(error: Error) -> PyErr {
    match error {
        Error::Shape(message) => PyValueError::new_err(message),
        Error::Isa(error @ IsaError::Unknown(_)) => PyValueError::new_err(error.to_string()),
        Error::Isa(error) => PyRuntimeError::new_err(error.to_string()),
        Error::Threads(message) => PyRuntimeError::new_err(message),
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
    match array.as_slice() {
        Ok(slice) if array.is_c_contiguous() => Ok(slice),
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

fn parse_activation(name: &str, index: usize) -> PyResult<Activation> {
    match name {
        "relu" => Ok(Activation::Relu),
        "identity" => Ok(Activation::Identity),
        other => Err(PyValueError::new_err(format!(
            "layer {index}: activation must be 'relu' or 'identity', got {other:?}"
        ))),
    }
}

fn build<T: Float + numpy::Element>(
    weights: &[Bound<'_, PyAny>],
    biases: &[Option<Bound<'_, PyAny>>],
    activations: &[String],
    isa: Isa,
) -> PyResult<Mlp<T>> {
    if biases.len() != weights.len() || activations.len() != weights.len() {
        return Err(PyValueError::new_err(format!(
            "need one bias and one activation per weight: got {} weights, {} biases, {} activations",
            weights.len(),
            biases.len(),
            activations.len()
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
    for (index, ((weight, bias), activation)) in weight_arrays
        .iter()
        .zip(&bias_arrays)
        .zip(activations)
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
            activation: parse_activation(activation, index)?,
        });
    }
    Mlp::new(&specs, isa).map_err(to_py_err)
}

/// `x` checked as a `(rows, in_features)` array of the chain's dtype, borrowed for reading.
fn checked_input<'py, T: Float + numpy::Element>(
    mlp: &Mlp<T>,
    x: &Bound<'py, PyAny>,
) -> PyResult<PyReadonlyArray2<'py, T>> {
    let x = cast_matrix::<T>(x, "x")?;
    let in_features = x.shape()[1];
    if in_features != mlp.in_features() {
        return Err(PyValueError::new_err(format!(
            "x has {in_features} features per row, but the first layer takes {}",
            mlp.in_features()
        )));
    }
    x.try_readonly()
        .map_err(|e| PyValueError::new_err(format!("x: {e}")))
}

fn run_into<T: Float + numpy::Element>(
    py: Python<'_>,
    mlp: &Mlp<T>,
    x: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let input = checked_input(mlp, x)?;
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

fn run_kernel<T: Float>(
    py: Python<'_>,
    mlp: &Mlp<T>,
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

/// A new uninitialised `(rows, out_features)` array for the kernel to fill.
///
/// # Safety
/// The caller writes every element before Python can see the array.
unsafe fn new_output<'py, T: Float + numpy::Element>(
    py: Python<'py>,
    mlp: &Mlp<T>,
    rows: usize,
) -> PyResult<Bound<'py, PyArray2<T>>> {
    let bytes = rows
        .checked_mul(mlp.out_features())
        .and_then(|n| n.checked_mul(std::mem::size_of::<T>()));
    match bytes {
        Some(bytes) if bytes <= DIRECT_ALLOC_MAX_BYTES => {
            // SAFETY: left uninitialised for the caller to fill, as the contract says.
            Ok(unsafe { PyArray2::<T>::new(py, [rows, mlp.out_features()], false) })
        }
        Some(bytes) if bytes <= isize::MAX as usize => {
            let empty = py.import("numpy")?.getattr("empty")?;
            let out = empty.call1(((rows, mlp.out_features()), T::NAME))?;
            Ok(out.cast_into::<PyArray2<T>>()?)
        }
        _ => Err(PyValueError::new_err(format!(
            "an output of {rows} x {} {} values is larger than memory can address",
            mlp.out_features(),
            T::NAME
        ))),
    }
}

/// Runs the chain on `input` into a new array.
fn run_new_from<'py, T: Float + numpy::Element>(
    py: Python<'py>,
    mlp: &Mlp<T>,
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
fn run_new<'py, T: Float + numpy::Element>(
    py: Python<'py>,
    mlp: &Mlp<T>,
    x: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    let input = checked_input(mlp, x)?;
    let rows = input.shape()[0];
    run_new_from(py, mlp, c_order(&input, "x")?, rows)
}

/// The chain on `rows` rows at `address` into a new array (see `Chain._forward_from_address`).
///
/// # Safety
/// `address` is that of `rows x in_features` values of type `T` in row order, readable and
/// written by nothing else until this returns.
unsafe fn run_new_from_address<'py, T: Float + numpy::Element>(
    py: Python<'py>,
    mlp: &Mlp<T>,
    address: usize,
    rows: usize,
) -> PyResult<Bound<'py, PyAny>> {
    let len = rows
        .checked_mul(mlp.in_features())
        .filter(|&len| {
            len.checked_mul(std::mem::size_of::<T>())
                .is_some_and(|b| b <= isize::MAX as usize)
        })
        .ok_or_else(|| PyValueError::new_err(format!("{rows} rows are more than memory holds")))?;
    if len > 0 && (address == 0 || !address.is_multiple_of(std::mem::align_of::<T>())) {
        return Err(PyValueError::new_err(format!(
            "address {address:#x} is not that of {} values",
            T::NAME
        )));
    }
    let input = if len == 0 {
        &[]
    } else {
        // SAFETY: non-null and aligned (checked above), `len` values that stay readable and
        // unwritten for the call (the caller's contract), a size that fits an `isize`.
        unsafe { std::slice::from_raw_parts(address as *const T, len) }
    };
    run_new_from(py, mlp, input, rows)
}

enum TypedMlp {
    F32(Mlp<f32>),
    F64(Mlp<f64>),
}

/// A chain of Linear layers packed for the fused kernels.
///
/// Calling it takes the common case natively (batch-1 latency is mostly call overhead): a
/// C-contiguous `(rows, in_features)` array of the chain's dtype, into a new array or `out`.
/// What that refuses goes to the subclass's `_call_general(x, out)` if it has one
/// (`fusedae.MLP` converts other input there and words the errors), else raises.
#[pyclass(frozen, subclass, module = "fusedae._native")]
struct Chain {
    mlp: TypedMlp,
}

#[pymethods]
impl Chain {
    #[new]
    #[pyo3(signature = (weights, biases, activations, isa=None))]
    fn new(
        weights: Vec<Bound<'_, PyAny>>,
        biases: Vec<Option<Bound<'_, PyAny>>>,
        activations: Vec<String>,
        isa: Option<&str>,
    ) -> PyResult<Self> {
        let isa = isa_or_selected(isa)?;
        let first = weights
            .first()
            .ok_or_else(|| PyValueError::new_err("an MLP needs at least one layer, got 0"))?;
        let mlp = if first.cast::<PyArray2<f64>>().is_ok() {
            TypedMlp::F64(build(&weights, &biases, &activations, isa)?)
        } else {
            TypedMlp::F32(build(&weights, &biases, &activations, isa)?)
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
        match (&self.mlp, out) {
            (TypedMlp::F32(mlp), None) => run_new(py, mlp, x),
            (TypedMlp::F64(mlp), None) => run_new(py, mlp, x),
            (TypedMlp::F32(mlp), Some(out)) => run_into(py, mlp, x, out).map(|()| out.clone()),
            (TypedMlp::F64(mlp), Some(out)) => run_into(py, mlp, x, out).map(|()| out.clone()),
        }
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

    /// The chain on `rows` rows of `in_features` values of the chain's dtype, stored in row
    /// order at memory `address`, into a new array.
    ///
    /// Private to `fusedae.torch`, which passes a checked contiguous CPU tensor's `data_ptr()`
    /// (`Tensor.numpy()` would add 0.6 us to a 5.4 us one-row call). Nothing here can check the
    /// address holds that many values: a wrong one reads arbitrary memory, as with `ctypes`.
    /// The tensor must stay alive and unresized for the call; like `numpy`, larger calls release
    /// the GIL, so another thread changing it meanwhile is a data race, as for any array.
    fn _forward_from_address<'py>(
        &self,
        py: Python<'py>,
        address: usize,
        rows: usize,
    ) -> PyResult<Bound<'py, PyAny>> {
        // SAFETY: the Python caller's contract above (a private method, used by `fusedae.torch`
        // after checking the tensor it reads).
        unsafe {
            match &self.mlp {
                TypedMlp::F32(mlp) => run_new_from_address(py, mlp, address, rows),
                TypedMlp::F64(mlp) => run_new_from_address(py, mlp, address, rows),
            }
        }
    }

    /// The numpy dtype of the chain's values (float32 or float64).
    #[getter]
    fn dtype<'py>(&self, py: Python<'py>) -> Bound<'py, PyArrayDescr> {
        match &self.mlp {
            TypedMlp::F32(_) => numpy::dtype::<f32>(py),
            TypedMlp::F64(_) => numpy::dtype::<f64>(py),
        }
    }

    #[getter]
    fn isa(&self) -> &'static str {
        match &self.mlp {
            TypedMlp::F32(mlp) => mlp.isa().name(),
            TypedMlp::F64(mlp) => mlp.isa().name(),
        }
    }

    #[getter]
    fn in_features(&self) -> usize {
        match &self.mlp {
            TypedMlp::F32(mlp) => mlp.in_features(),
            TypedMlp::F64(mlp) => mlp.in_features(),
        }
    }

    #[getter]
    fn out_features(&self) -> usize {
        match &self.mlp {
            TypedMlp::F32(mlp) => mlp.out_features(),
            TypedMlp::F64(mlp) => mlp.out_features(),
        }
    }

    #[getter]
    fn flops_per_row(&self) -> usize {
        match &self.mlp {
            TypedMlp::F32(mlp) => mlp.flops_per_row(),
            TypedMlp::F64(mlp) => mlp.flops_per_row(),
        }
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

/// Whether the selected ISA's kernels found half a register to cost half (Zen 4's AVX-512).
#[pyfunction]
fn half_registers_cheaper() -> PyResult<bool> {
    dispatch::selected()
        .map(dispatch::half_registers_cheaper)
        .map_err(|e| to_py_err(Error::Isa(e)))
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

/// GFLOP/s of one thread running register-only FMAs for about `seconds` (`dtype` "float32" or
/// "float64"; `isa` defaults to the selected one): the ceiling to quote kernel speed against.
#[pyfunction]
#[pyo3(signature = (seconds=0.2, dtype="float32", isa=None))]
fn fma_peak_gflops(py: Python<'_>, seconds: f64, dtype: &str, isa: Option<&str>) -> PyResult<f64> {
    let isa = isa_or_selected(isa)?;
    let result = match dtype {
        "float32" => py.detach(|| crate::mlp::fma_peak_gflops::<f32>(isa, seconds)),
        "float64" => py.detach(|| crate::mlp::fma_peak_gflops::<f64>(isa, seconds)),
        other => {
            return Err(PyTypeError::new_err(format!(
                "dtype must be 'float32' or 'float64', got {other:?}"
            )))
        }
    };
    result.map_err(to_py_err)
}

#[pymodule]
fn _native(module: &Bound<'_, PyModule>) -> PyResult<()> {
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
    module.add_class::<Chain>()?;
    module.add_function(wrap_pyfunction!(selected_isa, module)?)?;
    module.add_function(wrap_pyfunction!(available_isas, module)?)?;
    module.add_function(wrap_pyfunction!(half_registers_cheaper, module)?)?;
    module.add_function(wrap_pyfunction!(set_num_threads, module)?)?;
    module.add_function(wrap_pyfunction!(get_num_threads, module)?)?;
    module.add_function(wrap_pyfunction!(fma_peak_gflops, module)?)?;
    Ok(())
}
