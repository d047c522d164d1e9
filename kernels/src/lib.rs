//! Placeholder; replaced by the kernels implementation.
#![no_std]
