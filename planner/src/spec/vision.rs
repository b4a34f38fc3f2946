//! Vision encoder specs (owned by the balancing work; placeholder).
