//! The embedded backend against the shared conformance suite.

mod common;

use settle_conformance::conformance_tests;

conformance_tests!(common::fresh(2));
