//! Independent random streams from one seed: each home, person and device
//! draws from its own, so adding a device to one room does not change what
//! happens in another.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// The RNG of stream `stream` of run `seed`.
pub fn stream(seed: u64, stream: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(splitmix(seed ^ splitmix(stream)))
}

/// A stream id made of parts (`[home, person, day]`).
pub fn id(parts: &[u64]) -> u64 {
    parts
        .iter()
        .fold(0x9e37_79b9_7f4a_7c15, |acc, part| splitmix(acc ^ part))
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    #[test]
    fn the_same_seed_and_stream_draw_the_same_numbers() {
        let a: Vec<u32> = (0..5)
            .map(|_| 0)
            .scan(stream(7, 1), |r, _: u32| Some(r.gen()))
            .collect();
        let b: Vec<u32> = (0..5)
            .map(|_| 0)
            .scan(stream(7, 1), |r, _: u32| Some(r.gen()))
            .collect();
        let c: Vec<u32> = (0..5)
            .map(|_| 0)
            .scan(stream(7, 2), |r, _: u32| Some(r.gen()))
            .collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn ids_depend_on_order() {
        assert_ne!(id(&[1, 2]), id(&[2, 1]));
    }
}
