//! Unit tests of the core (being written on branch i11-sim).
