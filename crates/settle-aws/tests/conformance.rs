//! The AWS backend against the shared conformance suite, on the emulator
//! at `AWS_ENDPOINT_URL` (moto_server): each test gets its own queues and
//! tables under a unique name prefix.

mod common;

use settle_conformance::conformance_tests;

conformance_tests!(common::fresh(2));
