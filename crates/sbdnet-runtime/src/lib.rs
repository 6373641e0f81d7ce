//! sbdnet-runtime
