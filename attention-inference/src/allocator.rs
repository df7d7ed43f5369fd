//! The KV block allocator of the paged context: a fixed pool of block ids with a free list.

use crate::error::InferenceError;

/// Hands out block ids `0..total`. Allocation is all-or-nothing.
#[derive(Debug, Clone)]
pub struct BlockAllocator {
    total: i64,
    /// Free ids; the last one is handed out next (recently freed blocks are reused first).
    free: Vec<i64>,
}

impl BlockAllocator {
    /// A pool of `total` free blocks.
    pub fn new(total: i64) -> Self {
        Self { total, free: (0..total).rev().collect() }
    }

    /// All blocks.
    pub fn total(&self) -> i64 {
        self.total
    }

    /// Free blocks.
    pub fn free(&self) -> i64 {
        self.free.len() as i64
    }

    /// Blocks in use.
    pub fn used(&self) -> i64 {
        self.total - self.free()
    }

    /// `n` blocks, or [`InferenceError::OutOfBlocks`] and nothing allocated.
    pub fn allocate(&mut self, n: i64) -> Result<Vec<i64>, InferenceError> {
        if n < 0 || n > self.free() {
            return Err(InferenceError::OutOfBlocks {
                needed: n,
                free: self.free(),
                total: self.total,
            });
        }
        let at = self.free.len() - n as usize;
        Ok(self.free.split_off(at))
    }

    /// Returns blocks to the pool.
    ///
    /// # Panics
    /// In debug builds, on a block id out of range or already free (a bookkeeping bug of the
    /// context, never caused by user input).
    pub fn release(&mut self, blocks: &[i64]) {
        for &b in blocks {
            debug_assert!(
                (0..self.total).contains(&b) && !self.free.contains(&b),
                "double free of block {b}"
            );
            self.free.push(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_or_nothing() {
        let mut a = BlockAllocator::new(4);
        let x = a.allocate(3).unwrap();
        assert_eq!(x.len(), 3);
        assert_eq!(
            a.allocate(2),
            Err(InferenceError::OutOfBlocks { needed: 2, free: 1, total: 4 })
        );
        assert_eq!(a.free(), 1);
        a.release(&x);
        assert_eq!(a.free(), 4);
        assert_eq!(a.allocate(4).unwrap().len(), 4);
        assert_eq!(a.used(), 4);
    }
}
