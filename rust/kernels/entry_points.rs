//! [`target_kernels!`]: every ISA's entry points written from one list, so adding one (a
//! backward, another precision) means adding it here once, not to each ISA file.

/// Defines, for each `name: RegisterType => Weight, Elem`, a `pub fn name() -> Kernel<Weight, Elem>`
/// (weights stored as `Weight`, computed in the register's `Elem`) whose entry points
/// are thin wrappers, compiled with `#[target_feature(enable = $features)]` (none for the
/// portable kernel), around the generic loop nest ([`forward_rows`](super::forward_rows)) and
/// FMA loop ([`fma_loop`](super::fma_loop)) for that register type, with `mr` rows and up to
/// `nv_max` registers per tile. The SIMD bodies stay written out per ISA in its [`SimdVec`]
/// (super::SimdVec) implementation.
macro_rules! target_kernels {
    (
        features = $features:literal,
        mr = $mr:expr,
        nv_max = $nv_max:expr,
        $($name:ident: $register:ty => $weight:ty, $elem:ty);+ $(;)?
    ) => {
        $(target_kernels!(@one [target_feature(enable = $features)] $mr, $nv_max, $name, $register, $weight, $elem);)+
    };
    (mr = $mr:expr, nv_max = $nv_max:expr, $($name:ident: $register:ty => $weight:ty, $elem:ty);+ $(;)?) => {
        $(target_kernels!(@one [] $mr, $nv_max, $name, $register, $weight, $elem);)+
    };
    // The post-ops' passes over stored tiles (`StoredEpilogue`), compiled for `$register`.
    (@stored_epilogue [$($attribute:meta)?] $register:ty) => {
        /// # Safety
        /// As `epilogue::apply_to_stored_tile`'s.
        $(#[$attribute])?
        #[inline(never)]
        unsafe fn stored_tile(
            op: $crate::kernels::PostOp,
            out: *mut <$register as $crate::kernels::SimdVec>::Elem,
            ldo: usize,
            rows: usize,
            registers: usize,
            half: bool,
        ) {
            // SAFETY: forwarded from the caller.
            unsafe {
                $crate::kernels::epilogue::apply_to_stored_tile::<$register>(
                    op, out, ldo, rows, registers, half,
                )
            }
        }

        /// # Safety
        /// As `epilogue::apply_to_stored_values`'s.
        $(#[$attribute])?
        #[inline(never)]
        unsafe fn stored_values(
            op: $crate::kernels::PostOp,
            out: *mut <$register as $crate::kernels::SimdVec>::Elem,
            ldo: usize,
            rows: usize,
            outs: usize,
        ) {
            // SAFETY: forwarded from the caller.
            unsafe {
                $crate::kernels::epilogue::apply_to_stored_values::<$register>(
                    op, out, ldo, rows, outs,
                )
            }
        }
    };
    (@one [$($attribute:meta)?] $mr:expr, $nv_max:expr, $name:ident, $register:ty, $weight:ty, $elem:ty) => {
        pub fn $name() -> $crate::kernels::Kernel<$weight, $elem> {
            use $crate::kernels::{
                backward_rows, fma_loop, forward_rows, BackwardCalls, BackwardInputs, Kernel, Packed,
                SimdVec, StoredEpilogue, TileShape,
            };
            use $crate::kernels::microkernel::{tile_rows, Tile};
            type Elem = <$register as SimdVec>::Elem;

            target_kernels!(@stored_epilogue [$($attribute)?] $register);

            /// # Safety
            /// The CPU supports the ISA's features; `forward_rows` checks everything else.
            $(#[$attribute])?
            unsafe fn forward(
                shape: &TileShape,
                chain: Packed<'_, $weight, Elem>,
                input: &[Elem],
                output: &mut [Elem],
                scratch: &mut [Elem],
                saved: Option<&mut [Elem]>,
            ) {
                // SAFETY: the caller guarantees the features; `forward_rows` checks the rest.
                unsafe {
                    forward_rows::<$register, $weight, { $mr }, { $nv_max }>(
                        shape,
                        chain,
                        input,
                        output,
                        scratch,
                        saved,
                        // Opaque to the optimizer: with the passes' addresses known, LLVM inlined
                        // them (`inline(never)` notwithstanding) and kept their constants in
                        // registers across the loop nest, which it then reloaded on every step of
                        // the register tiles' `k` loop.
                        std::hint::black_box(StoredEpilogue {
                            tile: stored_tile,
                            values: stored_values,
                        }),
                    )
                }
            }

            /// # Safety
            /// As [`tile_rows`]'s.
            $(#[$attribute])?
            #[inline(never)]
            unsafe fn input_gradient_tile(rows: usize, registers: usize, tile: &Tile<Elem, Elem, Elem>) {
                // SAFETY: forwarded from the caller.
                unsafe { tile_rows::<$register, Elem, Elem, { $mr }, { $nv_max }, false>(rows, registers, tile) }
            }

            /// # Safety
            /// As [`tile_rows`]'s.
            $(#[$attribute])?
            #[inline(never)]
            unsafe fn weight_gradient_tile(rows: usize, registers: usize, tile: &Tile<Elem, Elem, Elem>) {
                // SAFETY: forwarded from the caller.
                unsafe { tile_rows::<$register, Elem, Elem, { $mr }, { $nv_max }, true>(rows, registers, tile) }
            }

            /// # Safety
            /// The CPU supports the ISA's features; `backward_rows` checks everything else.
            $(#[$attribute])?
            unsafe fn backward(
                shape: &TileShape,
                chain: Packed<'_, $weight, Elem>,
                inputs: &BackwardInputs<'_, Elem>,
                grad_input: Option<&mut [Elem]>,
                grads: &mut [Elem],
                scratch: &mut [Elem],
            ) {
                // SAFETY: the caller guarantees the features; `backward_rows` checks the rest.
                unsafe {
                    backward_rows::<$register, $weight, { $mr }, { $nv_max }>(
                        shape,
                        chain,
                        inputs,
                        grad_input,
                        grads,
                        scratch,
                        // Opaque, as in `forward`.
                        std::hint::black_box(BackwardCalls {
                            input_gradient_tile,
                            weight_gradient_tile,
                            epilogue: StoredEpilogue {
                                tile: stored_tile,
                                values: stored_values,
                            },
                        }),
                    )
                }
            }

            /// # Safety
            /// The CPU supports the ISA's features.
            $(#[$attribute])?
            unsafe fn peak(iterations: usize, seed: &[Elem]) -> Elem {
                // SAFETY: the caller guarantees the features.
                unsafe { fma_loop::<$register, false>(iterations, seed) }
            }

            /// # Safety
            /// The CPU supports the ISA's features, and the register type has a half register.
            $(#[$attribute])?
            unsafe fn peak_half(iterations: usize, seed: &[Elem]) -> Elem {
                // SAFETY: the caller guarantees the features and the half register.
                unsafe { fma_loop::<$register, true>(iterations, seed) }
            }

            /// # Safety
            /// The CPU supports the ISA's features.
            $(#[$attribute])?
            unsafe fn transpose(src: &[Elem], cols: usize, dst: &mut [Elem], dst_stride: usize) {
                // SAFETY: forwarded from the caller.
                unsafe { $crate::kernels::chain::transpose_matrix::<$register>(src, cols, dst, dst_stride) }
            }

            let half_register_lanes = <$register as SimdVec>::HALF_LANES;
            Kernel {
                shape: TileShape::for_register::<$register>($mr, $nv_max),
                forward,
                forward_by_halves: None,
                backward: Some(backward),
                peak,
                peak_half: (half_register_lanes > 0).then_some(peak_half as _),
                transpose: Some(transpose),
                half_register_lanes,
            }
        }
    };
}

/// Defines `pub fn name() -> Kernel<$storage, f32>` for a form taking `k` in groups of
/// `$k_group` (`pairs.rs`: bf16 pairs, `quads.rs`: int8 quads) on register type `$register`,
/// its entry points (the form's loop nest `$forward` and ceiling loop `$peak`) compiled with
/// `#[target_feature(enable = $features)]`; inference only (no backward). The form takes
/// the register type's half registers (and the dot form beside them) where they are cheaper.
// Only x86-64 kernels use it so far.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_macros))]
macro_rules! grouped_kernel {
    (
        features = $features:literal,
        mr = $mr:expr,
        nv_max = $nv_max:expr,
        k_group = $k_group:expr,
        $name:ident: $register:ty => $storage:ty, $forward:ident, $peak:ident $(;)?
    ) => {
        pub fn $name() -> $crate::kernels::Kernel<$storage, f32> {
            use $crate::kernels::{$forward, $peak, Kernel, Packed, StoredEpilogue, TileShape};

            target_kernels!(@stored_epilogue [target_feature(enable = $features)] $register);

            /// The loop nest, with the half-register tiles compiled in or not (`HALVES`): two
            /// copies (see `Kernel::forward_by_halves`).
            ///
            /// # Safety
            /// The CPU supports the ISA's features; the loop nest checks everything else.
            #[target_feature(enable = $features)]
            unsafe fn forward<const HALVES: bool>(
                shape: &TileShape,
                chain: Packed<'_, $storage, f32>,
                input: &[f32],
                output: &mut [f32],
                scratch: &mut [f32],
                saved: Option<&mut [f32]>,
            ) {
                // SAFETY: the caller guarantees the features; the loop nest checks the rest.
                unsafe {
                    $forward::<$register, { $mr }, { $nv_max }, HALVES>(
                        shape,
                        chain,
                        input,
                        output,
                        scratch,
                        saved,
                        // Opaque, as in `target_kernels!`.
                        std::hint::black_box(StoredEpilogue {
                            tile: stored_tile,
                            values: stored_values,
                        }),
                    )
                }
            }

            /// # Safety
            /// The CPU supports the ISA's features.
            #[target_feature(enable = $features)]
            unsafe fn peak(iterations: usize, seed: &[f32]) -> f32 {
                // SAFETY: the caller guarantees the features.
                unsafe { $peak::<$register>(iterations, seed) }
            }

            Kernel {
                shape: TileShape {
                    k_group: $k_group,
                    ..TileShape::for_register::<$register>($mr, $nv_max)
                },
                forward: forward::<false>,
                forward_by_halves: Some([
                    forward::<false> as $crate::kernels::ChainKernel<$storage, f32>,
                    forward::<true>,
                ]),
                backward: None,
                peak,
                peak_half: None,
                transpose: None,
                half_register_lanes: <$register as $crate::kernels::SimdVec>::HALF_LANES,
            }
        }
    };
}
