//! Storage types narrower than the compute type: weights kept in them are widened back in
//! registers ([`LoadFrom`](super::LoadFrom)) or multiplied as they are by the instructions that
//! take them (`vdpbf16ps`).

/// A bfloat16 value: the top 16 bits of an f32 (8 exponent bits, 8 significant bits), so
/// widening is a shift and every bf16 is exactly an f32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(transparent)]
pub struct Bf16(pub u16);

impl Bf16 {
    /// `value` rounded to the nearest bf16, ties to even, as `torch.Tensor.to(torch.bfloat16)`
    /// and `vcvtneps2bf16` round it: finite values too large for bf16 become infinities, a NaN
    /// stays a (quiet) NaN of the same sign.
    pub fn round(value: f32) -> Bf16 {
        let bits = value.to_bits();
        if value.is_nan() {
            return Bf16(((bits >> 16) | 0x0040) as u16);
        }
        let rounded = bits + 0x7fff + ((bits >> 16) & 1);
        Bf16((rounded >> 16) as u16)
    }

    /// The f32 of the same value.
    pub fn widen(self) -> f32 {
        f32::from_bits(u32::from(self.0) << 16)
    }
}

#[cfg(test)]
mod tests {
    use super::Bf16;

    #[test]
    fn rounds_to_nearest_even_and_widens_exactly() {
        for (value, want) in [
            (1.0f32, 1.0f32),
            (1.0 + 1.0 / 256.0, 1.0), // a tie: to the even significand
            (1.0 + 3.0 / 256.0, 1.0 + 4.0 / 256.0), // a tie: up to the even one
            (1.0 + 1.0 / 256.0 + 1e-6, 1.0 + 2.0 / 256.0),
            (-3.5, -3.5),
            (0.0, 0.0),
            (f32::MAX, f32::INFINITY),
            (f32::INFINITY, f32::INFINITY),
            (1e-40, f32::from_bits(0x0001_0000)), // subnormals round like the rest
        ] {
            assert_eq!(Bf16::round(value).widen(), want, "{value:e}");
        }
        assert_eq!(Bf16::round(-0.0).0, 0x8000);
        assert!(Bf16::round(f32::NAN).widen().is_nan());
        assert!(
            Bf16::round(f32::from_bits(0x7f80_0001)).widen().is_nan(),
            "a NaN whose payload is in the low bits"
        );
        for bits in (0..u32::MAX).step_by(65_537) {
            let value = f32::from_bits(bits);
            if value.is_finite() {
                let rounded = f64::from(Bf16::round(value).widen());
                let error = (rounded - f64::from(value)).abs();
                assert!(
                    error <= f64::from(value).abs() * 2f64.powi(-8)
                        || rounded.is_infinite()
                        || !value.is_normal(), // subnormals: absolute spacing
                    "{value:e}"
                );
            }
        }
    }
}
